"""The demo's card on DeepEP V2: one ElasticBuffer for prefill and decode (V2 has no separate
low-latency mode), the same experts and routing as demo_run's V1 card.

Legend as demo/run.py (T tokens, K top-k, L local experts, H hidden, N rows received).

Prefill and decode both run dispatch -> local SwiGLU experts (weights applied on the expert side)
-> combine in V2's non-expanded layout; decode passes cumulative_local_expert_recv_stats as the V1
low-latency path does. The routing (what `epreplay diff` compares) is the workload's, so a V1 and
a V2 run of one seed route every token alike; only the ops differ (decode: dispatch, not
ll_dispatch).
"""
from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from epreplay import marks
from epreplay.demo.model import DemoConfig, swiglu
from epreplay.format.fp8 import cast_fp8


def elastic_class(backend: str) -> Any:
    """The ElasticBuffer class of a backend: epreplay's emulation, the real deep_ep's, or
    "module:Class"."""
    if backend == "deepep":
        import deep_ep

        if not hasattr(deep_ep, "ElasticBuffer"):
            raise RuntimeError("--deepep v2 --backend deepep: this deep_ep has no ElasticBuffer (DeepEP V1); "
                               "install DeepEP V2 (needs NCCL >= 2.30.4) or use --backend emulated")
        return deep_ep.ElasticBuffer
    if ":" in backend:
        module, _, name = backend.partition(":")
        return getattr(importlib.import_module(module), name)
    from epreplay.emulate.v2 import ElasticBuffer

    return ElasticBuffer


def _dequant(recv_x: Any) -> Any:
    from epreplay.demo.run import _dequant as dq

    return dq(recv_x)


class ElasticCard:
    """One rank's model state on V2 (demo.run._Card's interface: expert, destroy, moe_normal, moe_ll)."""

    def __init__(self, cfg: DemoConfig, rank: int, world: int, device: str, Elastic: Any) -> None:
        import torch.distributed as dist

        from epreplay.demo.run import _Card

        self.cfg, self.rank, self.R, self.device = cfg, rank, world, device
        self.L = cfg.experts // world
        self.M = max(cfg.prefill_tokens, cfg.decode_tokens)  # every rank's T is at most this
        self.buf = Elastic(dist.group.WORLD, num_max_tokens_per_rank=self.M, hidden=cfg.hidden,
                           num_topk=cfg.topk, use_fp8_dispatch=cfg.fp8, deterministic=True,
                           explicitly_destroy=True)
        self._experts: dict[tuple[int, int], tuple] = {}
        self.expert = _Card.expert.__get__(self)

    def destroy(self) -> None:
        self.buf.destroy()

    def _moe(self, layer: int, u_TH: Any, idx_TK: Any, w_TK: Any, tags_T: np.ndarray, stats_L: Any) -> tuple:
        import torch

        cfg = self.cfg
        x_bf = u_TH.to(torch.bfloat16)
        x = cast_fp8(x_bf) if cfg.fp8 else x_bf
        marks.tag_tokens(tags_T)
        recv_x, recv_idx, recv_w, handle, _ = self.buf.dispatch(
            x, topk_idx=idx_TK, topk_weights=w_TK, num_experts=cfg.experts, num_max_tokens_per_rank=self.M,
            cumulative_local_expert_recv_stats=stats_L)
        xr_NH = _dequant(recv_x)
        out_NH = torch.zeros_like(xr_NH)
        for e in range(self.L):
            rows, slots = (recv_idx == e).nonzero(as_tuple=True)
            if rows.numel():
                y = swiglu(xr_NH[rows], self.expert(layer, e)) * recv_w[rows, slots].unsqueeze(1)
                out_NH.index_add_(0, rows, y)
        combined_TH, _, _ = self.buf.combine(out_NH.to(torch.bfloat16), handle)
        return combined_TH.float(), handle

    def moe_normal(self, layer: int, u_TH: Any, idx_TK: Any, w_TK: Any, tags_T: np.ndarray) -> tuple[Any, int]:
        """Prefill. Returns (routed output [T, H] float32, rows received)."""
        out, handle = self._moe(layer, u_TH, idx_TK, w_TK, tags_T, None)
        return out, int(handle.psum_num_recv_tokens_per_scaleup_rank[-1])

    def moe_ll(self, layer: int, u_TH: Any, idx_TK: Any, w_TK: Any, tags_T: np.ndarray,
               stats_L: Any) -> tuple[Any, int]:
        """Decode. Returns (routed output [T, H] float32, (token, expert) slots received, as V1's
        low-latency count)."""
        out, handle = self._moe(layer, u_TH, idx_TK, w_TK, tags_T, stats_L)
        return out, int(handle.num_unaligned_recv_tokens_per_expert.sum())
