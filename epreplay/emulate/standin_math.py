"""`deep_ep.utils.math` of the stand-in: the tensor helpers DeepEP's V1 tests check results with.

Legend: T tokens (rows), H hidden, S = ceil(H / 128) scale groups, K slots, E experts, G groups.
Written for epreplay to the behaviour DeepEP's tests rely on (not DeepEP's code). Tensors are
made on their inputs' device, whatever the default device.
"""
from __future__ import annotations

from typing import Any

import torch

GROUP = 128  # values per FP8 scale, as DeepEP's kernels
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
AMAX_FLOOR = 1e-4  # keeps all-zero groups finite, as DeepEP's casts


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - cosine-like similarity of (x + 1) and (y + 1) in float64: 0.0 for identical tensors."""
    a, b = x.double() + 1, y.double() + 1
    return float((1 - 2 * (a * b).sum() / (a * a + b * b).sum()).item())


def safe_div(a: Any, b: Any) -> Any:
    """a / b, with 0 / 0 = 0 (other divisions by zero still raise)."""
    if b == 0 and a == 0:
        return 0
    return a / b


def ceil_div(x: int, y: int) -> int:
    return -(-x // y)


def align(x: int, y: int) -> int:
    return ceil_div(x, y) * y


def _grouped(x_TH: torch.Tensor) -> torch.Tensor:
    """[T, H] -> float32 [T, S, 128], H zero-padded to a multiple of 128."""
    T, H = x_TH.shape
    pad = align(H, GROUP) - H
    xf = x_TH.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    return xf.view(T, -1, GROUP)


def per_token_cast_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, H] -> (e4m3 [T, H], float32 scale_inv [T, S]): each 128 values scaled to amax 448."""
    assert x.dim() == 2, f"per_token_cast_to_fp8: x must be [T, H], got {list(x.shape)}"
    T, H = x.shape
    g = _grouped(x)
    amax_TS = g.abs().amax(dim=2).clamp(min=AMAX_FLOOR)
    q = (g * (E4M3_MAX / amax_TS).unsqueeze(2)).to(torch.float8_e4m3fn).view(T, -1)[:, :H].contiguous()
    return q, amax_TS / E4M3_MAX


def per_token_cast_back(x_fp8: torch.Tensor, x_scales: torch.Tensor) -> torch.Tensor:
    """(e4m3 [T, H], scales [T, S] float32, or int32 UE8M0: 4 exponent bytes per int) -> bf16 [T, H]."""
    if x_fp8.numel() == 0:
        return x_fp8.to(torch.bfloat16)
    assert x_fp8.dim() == 2, f"per_token_cast_back: x_fp8 must be [T, H], got {list(x_fp8.shape)}"
    T, H = x_fp8.shape
    if x_scales.dtype == torch.int32:  # UE8M0: every byte is a float32 exponent
        # flattened first: a [T, 1] column can be 'contiguous' with a stride != 1, which view() refuses
        x_scales = (x_scales.contiguous().view(-1).view(torch.uint8).to(torch.int32) << 23).view(torch.float32)
    g = _grouped(x_fp8)
    return (g * x_scales.reshape(T, -1, 1)).view(T, -1)[:, :H].to(torch.bfloat16).contiguous()


def inplace_unique(x: torch.Tensor, num_slots: int) -> None:
    """Rewrite each row of x [T, K] (values in [0, num_slots) or -1) as its distinct values,
    largest first, then -1s."""
    assert x.dim() == 2, f"inplace_unique: x must be [T, K], got {list(x.shape)}"
    T, K = x.shape
    present = torch.zeros(T, num_slots + 1, dtype=torch.bool, device=x.device)
    present.scatter_(1, torch.where(x < 0, num_slots, x).to(torch.int64), True)
    ids = torch.arange(num_slots, device=x.device, dtype=x.dtype).expand(T, num_slots)
    ranked = torch.where(present[:, :num_slots], ids, torch.full_like(ids, -1)).sort(dim=1, descending=True).values
    n = min(num_slots, K)
    x.fill_(-1)
    x[:, :n] = ranked[:, :n]


def create_grouped_scores(scores: torch.Tensor, group_idx: torch.Tensor, num_groups: int) -> torch.Tensor:
    """scores [T, E] with the experts of groups not listed in group_idx [T, G'] zeroed (G groups)."""
    T, E = scores.shape
    keep_TG = torch.zeros(T, num_groups, dtype=torch.bool, device=scores.device).scatter_(1, group_idx, True)
    return (scores.view(T, num_groups, -1) * keep_TG.unsqueeze(-1)).view(T, E)


def hash_tensor(t: torch.Tensor) -> int:
    """Sum of the tensor's bytes read as int32 words (a cheap bitwise fingerprint)."""
    return int(t.view(torch.int32).sum().item())


def hash_tensors(*tensors: Any) -> int:
    """XOR of hash_tensor over tensors (nested tuples/lists walked, None skipped)."""
    value = 0
    for t in tensors:
        if isinstance(t, (tuple, list)):
            value ^= hash_tensors(*t)
        elif isinstance(t, torch.Tensor):
            value ^= hash_tensor(t)
    return value


def count_bytes(*tensors: Any) -> int:
    """Total bytes of the tensors (nested tuples/lists walked, None skipped)."""
    total = 0
    for t in tensors:
        if isinstance(t, (tuple, list)):
            total += count_bytes(*t)
        elif t is not None:
            total += t.numel() * t.element_size()
    return total
