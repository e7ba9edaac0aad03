"""Replay of DeepEP V2 (ElasticBuffer) dispatches; their cached dispatches and combines replay
through normal.py unchanged (V2's `dispatch(x, handle=...)` and `combine(x, handle, topk_weights=)`
take the same arguments there).

Legend: see ops.py (M physical ranks, B virtual per physical, Tp tokens of a physical batch,
Mp = V2's num_max_tokens_per_rank of the replay: the largest Tp of the call).

A V2 record holds V1's arrays (capture/build_v2.py), so the expected receive and every check are
normal.py's; only the call and where the received rows came from differ: V2 names each row's
source as the global index q * Mp + token in recv_src_metadata[:, 0]. The replay dispatches in
the non-expanded layout with a CPU sync whatever the recording used: the expanded layout is a
rearrangement of the same rows, and the recorded rows are folded to one per token anyway.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from epreplay.replay import inputs as I
from epreplay.replay import normal as N_


def max_tokens(eng: Any, call: Any) -> int:
    """Mp: the largest physical batch of this call (the same on every physical rank)."""
    return max(1, max(sum(call.tokens_N[v] for v in eng.plan.virtual_of(q)) for q in range(eng.plan.physical)))


def dispatch(eng: Any, call: Any, recs: dict) -> tuple[int, int]:
    vs = eng.vs
    fp8 = N_._is_fp8(recs[vs[0]].meta)
    topk, w = N_._routing(eng, call, recs)
    x = {v: eng.payload(call, v, recs[v], call.tokens_N[v], fp8) for v in vs}
    fp8 = isinstance(x[vs[0]], tuple)
    x_p = N_._to(I.cat_rows([x[v] for v in vs]), eng.device)
    topk_p = torch.cat([topk[v] for v in vs]).to(eng.device)
    w_p = torch.cat([w[v] for v in vs]).to(eng.device)
    align = int(I.meta_value(recs[vs[0]].meta, "expert_alignment", default=1) or 1)
    Mp = max_tokens(eng, call)
    buf = eng.buffer(call)
    t0 = time.perf_counter_ns()
    recv_x, recv_idx, recv_w, handle, _ = buf.dispatch(
        x_p, topk_idx=topk_p, topk_weights=w_p, num_experts=eng.job.experts, num_max_tokens_per_rank=Mp,
        expert_alignment=align, do_cpu_sync=True)
    eng.sync()  # GPU kernels run asynchronously: time them to completion
    dt = time.perf_counter_ns() - t0
    n_exp = torch.bincount(topk_p[topk_p >= 0].cpu(), minlength=eng.job.experts)
    N_._sender_counts(eng, call, recs, topk, n_exp)
    N = int(handle.psum_num_recv_tokens_per_scaleup_rank[-1])
    g = handle.recv_src_metadata[:N, 0].cpu().numpy().astype(np.int64)
    N_.verify_dispatch(eng, call, recs, handle, x, topk, w, recv_x, recv_idx, recv_w,
                       handle.num_recv_tokens_per_expert_list, g // Mp, g % Mp, fp8)
    return dt, N_._nbytes(x_p)


def make_buffer(backend: str, device: str) -> Any:
    """An ElasticBuffer over the whole replay group: the emulation, or the real V2 deep_ep."""
    import torch.distributed as dist

    group = dist.group.WORLD
    if backend == "emulated":
        from epreplay.emulate.v2 import ElasticBuffer

        return ElasticBuffer(group, deterministic=True, explicitly_destroy=True)
    import deep_ep

    if not hasattr(deep_ep, "ElasticBuffer"):
        raise RuntimeError("the recording is of DeepEP V2 (ElasticBuffer) but this deep_ep is V1; "
                           "replay with --backend emulated or install DeepEP V2")
    return deep_ep.ElasticBuffer(group, num_bytes=None, num_max_tokens_per_rank=0, deterministic=True,
                                 explicitly_destroy=True)
