"""DeepEP-shaped traffic driver: the calls DeepEP's own tests and benchmarks make, on any Buffer.

Legend: T tokens per rank, H hidden, E experts, K top-k, R ranks, L = E / R local experts,
M = num_max_dispatch_tokens_per_rank (low-latency).

Used by bench/gpu_bench.py (capture overhead on DeepEP's benchmark shapes), by the GPU tests
(record with real DeepEP, then replay) and by anything that needs realistic DeepEP call sequences
without a model. Works with the real `deep_ep.Buffer` and with `epreplay.emulate.Buffer`: it only
uses the public V1 API.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Shape:
    """One benchmark shape. DeepEP's published ones: normal T=4096, H=7168, top-8 of 256;
    low-latency T=128 (= M), H=7168, top-8."""

    tokens: int = 4096
    hidden: int = 7168
    experts: int = 256
    topk: int = 8
    fp8: bool = False


@dataclass
class Inputs:
    """One rank's inputs for a step: x_TH bf16, topk_idx_TK int64, topk_weights_TK fp32."""

    x_TH: torch.Tensor
    topk_idx_TK: torch.Tensor
    topk_weights_TK: torch.Tensor
    x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None


def per_token_cast_to_fp8(x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepEP's test helper: per 128-value group, scale = amax / 448 (amax >= 1e-4).
    Returns (e4m3 [T, H], scales fp32 [T, H/128])."""
    T, H = x_TH.shape
    groups = x_TH.view(T, H // 128, 128).float()
    amax = groups.abs().amax(dim=2).clamp(min=1e-4)
    q = (groups * (448.0 / amax.unsqueeze(2))).to(torch.float8_e4m3fn)
    return q.view(T, H), amax / 448.0


def make_inputs(shape: Shape, *, rank: int, step: int, device: str | torch.device,
                seed: int = 0) -> Inputs:
    """Skewed routing like DeepEP's tests (scores = |randn| + 1, rank-dependent), deterministic
    in (seed, rank, step)."""
    g = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + rank) * 10_007 + step)
    x = (torch.randn(shape.tokens, shape.hidden, generator=g) * 0.5).to(torch.bfloat16)
    scores = torch.randn(shape.tokens, shape.experts, generator=g).abs() + 1
    # A few hot experts per step, as real routers have, so the traffic is not uniform.
    hot = torch.randint(0, shape.experts, (max(1, shape.experts // 32),), generator=g)
    scores[:, hot] += 0.75
    topk_idx = torch.topk(scores, shape.topk, dim=-1, largest=True, sorted=False).indices
    weights = torch.rand(shape.tokens, shape.topk, generator=g)
    inp = Inputs(x.to(device), topk_idx.to(torch.int64).to(device), weights.to(device))
    if shape.fp8:
        inp.x_fp8 = per_token_cast_to_fp8(inp.x_TH)
    return inp


def _when(**flags: bool) -> dict[str, bool]:
    """The flags that are set: a call without them is the call DeepEP's own benchmarks make."""
    return {k: True for k, v in flags.items() if v}


def normal_step(buffer: Any, inp: Inputs, num_experts: int, *, async_finish: bool = False) -> torch.Tensor:
    """layout -> dispatch -> (identity experts) -> combine, DeepEP's normal (prefill) path;
    async_finish: the dispatch and combine return at once and the step waits on their events.
    Returns combined_x [T, H] bf16."""
    n_rank, n_rdma, n_expert, in_rank, _ = buffer.get_dispatch_layout(inp.topk_idx_TK, num_experts)
    x = inp.x_fp8 if inp.x_fp8 is not None else inp.x_TH
    recv_x, _, recv_w, _, handle, event = buffer.dispatch(
        x, num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma,
        is_token_in_rank=in_rank, num_tokens_per_expert=n_expert,
        topk_idx=inp.topk_idx_TK, topk_weights=inp.topk_weights_TK, **_when(async_finish=async_finish))
    if async_finish:
        event.current_stream_wait()
    if isinstance(recv_x, tuple):  # FP8 in, BF16 back: dequantise as an expert would
        q, s = recv_x
        recv_x = (q.float().view(q.shape[0], -1, 128) * s.unsqueeze(2)).view(q.shape).to(torch.bfloat16)
    combined, _, event = buffer.combine(recv_x, handle, topk_weights=recv_w, **_when(async_finish=async_finish))
    if async_finish:
        event.current_stream_wait()
    return combined


def ll_step(buffer: Any, inp: Inputs, num_experts: int, max_tokens: int, *,
            use_fp8: bool = False, recv_hook: bool = False) -> torch.Tensor:
    """low_latency_dispatch -> (identity experts) -> low_latency_combine, the decode path;
    recv_hook: the dispatch and the combine return at once and their recv hooks are called
    before the experts and after the combine (DeepEP's overlapped decode). Returns combined_x
    [T, H] bf16."""
    recv_x, recv_count, handle, _, hook = buffer.low_latency_dispatch(
        inp.x_TH, inp.topk_idx_TK, max_tokens, num_experts, use_fp8=use_fp8, **_when(return_recv_hook=recv_hook))
    if recv_hook:
        hook()
    if isinstance(recv_x, tuple):
        q, s = recv_x
        L, rows, H = q.shape
        recv_x = (q.float().view(L, rows, H // 128, 128) * s.unsqueeze(3)).view(L, rows, H).to(torch.bfloat16)
    combined, _, hook = buffer.low_latency_combine(recv_x, inp.topk_idx_TK, inp.topk_weights_TK, handle,
                                                   **_when(return_recv_hook=recv_hook))
    if recv_hook:
        hook()
    return combined


def elastic_step(buffer: Any, inp: Inputs, num_experts: int) -> torch.Tensor:
    """DeepEP V2 (ElasticBuffer): dispatch -> (identity experts) -> combine. Returns combined_x
    [T, H] bf16."""
    recv_x, _, recv_w, handle, _ = buffer.dispatch(inp.x_TH, topk_idx=inp.topk_idx_TK, topk_weights=inp.topk_weights_TK,
                                                   num_experts=num_experts)
    combined, _, _ = buffer.combine(recv_x, handle, topk_weights=recv_w)
    return combined


def make_elastic_buffer(module: Any, group: Any, shape: Shape) -> Any:
    """A V2 ElasticBuffer for `shape` (module: deep_ep or epreplay.emulate.v2)."""
    return module.ElasticBuffer(group, num_max_tokens_per_rank=shape.tokens, hidden=shape.hidden, num_topk=shape.topk,
                                deterministic=True)


def make_buffer(module: Any, group: Any, shape: Shape, *, low_latency: bool, max_tokens: int | None = None) -> Any:
    """A Buffer sized the way DeepEP's tests size theirs (module: deep_ep or epreplay.emulate);
    max_tokens: the low-latency calls' num_max_dispatch_tokens_per_rank (default: the shape's T)."""
    R = group.size()
    if low_latency:
        rdma = module.Buffer.get_low_latency_rdma_size_hint(max_tokens or shape.tokens, shape.hidden, R, shape.experts)
        return module.Buffer(group, num_rdma_bytes=rdma, low_latency_mode=True,
                             num_qps_per_rank=shape.experts // R,
                             allow_nvlink_for_low_latency_mode=True, explicitly_destroy=True)
    # 2 GB of NVLink buffer, as DeepEP's intranode test allocates.
    return module.Buffer(group, int(2e9), 0, low_latency_mode=False, num_qps_per_rank=1,
                         explicitly_destroy=True)


def time_calls(fn: Any, *, iters: int, warmup: int = 3) -> float:
    """Mean seconds per call of fn() measured with CUDA events (or perf_counter on CPU)."""
    import time

    for _ in range(warmup):
        fn()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters
