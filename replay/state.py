"""What a later combine or cached dispatch needs from a replayed dispatch (one physical rank)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class DispatchState:
    """A replayed dispatch, kept until the last call that uses its handle.

    Attributes:
        handle: the backend's physical handle.
        x_V: virtual rank of this block -> its x as sent (bf16 [T, H] or an FP8 pair).
        topk_V / w_V: virtual rank -> [T, K] int64 expert ids / float32 weights as sent.
        recv_x: the physical receive (normal: [Np, H]; low-latency: [Lp, M*Mll*B, H]).
        extra: op-specific per-virtual-rank views (rows, expected rows, factors).
    """

    handle: Any
    x_V: dict[int, Any]
    topk_V: dict[int, torch.Tensor]
    w_V: dict[int, torch.Tensor]
    recv_x: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
