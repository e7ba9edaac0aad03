"""The emulated low-latency Buffer inside a CUDA graph (GPU only; skipped without CUDA).

DeepEP's low-latency kernels are captured in CUDA graphs by serving engines (decode steps).
The emulated dispatch/combine (recv hooks included) are captured with torch.cuda.graph and
replayed on new inputs copied into the captured ones; every replay must equal an eager,
uncaptured call (dynamic path, ll_order_seed=-1: the captured path's ascending order) on the
same inputs, and the captured region must make no host sync (capture would raise). Also checks
the emulation with DeepEP's test defaults: default device 'cuda', default dtype bfloat16, and
that a CUDA-only kineto profile (as DeepEP's bench_kineto takes) has one line per
"dispatch"/"combine" (the emulation's named ranges).
"""
from __future__ import annotations

import pytest
import torch

from epreplay.launch import run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

T, H, K, E, M = 48, 1024, 8, 32, 64


def _inputs(seed: int, T: int, dev: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, cpu, f32 = torch.Generator(device="cpu").manual_seed(seed), "cpu", torch.float32  # not the default device
    x = torch.randn(T, H, generator=g, dtype=f32, device=cpu).to(torch.bfloat16)
    idx = torch.rand(T, E, generator=g, dtype=f32, device=cpu).topk(K, dim=1).indices
    idx[torch.rand(T, K, generator=g, dtype=f32, device=cpu) < 0.1] = -1
    w = torch.rand(T, K, generator=g, dtype=f32, device=cpu)
    return x.to(dev), idx.to(dev), w.to(dev)


def _step(buf, x, idx, w, use_fp8: bool) -> list[torch.Tensor]:
    recv, count, handle, _, hook = buf.low_latency_dispatch(x, idx, M, E, use_fp8=use_fp8, return_recv_hook=True)
    hook()
    y_in = recv[0].float().to(torch.bfloat16) if use_fp8 else recv  # "expert output": the rows, as bf16
    y, _, hook = buf.low_latency_combine(y_in, idx, w, handle, return_recv_hook=True)
    hook()
    return [count, handle[1], y, recv[0] if use_fp8 else recv, handle[0]]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[str]:
    """count, layout_range and combine exactly; received rows/src_info on the valid prefix only."""
    bad = [n for n, p, q in zip(("recv_count", "layout_range", "combined"), a[:3], b[:3]) if not torch.equal(p, q)]
    for e, n in enumerate(a[0].tolist()):
        for name, p, q in (("recv_x", a[3], b[3]), ("src_info", a[4], b[4])):
            p, q = p[e, :n], q[e, :n]
            if p.dtype == torch.float8_e4m3fn:
                p, q = p.view(torch.uint8), q.view(torch.uint8)
            if not torch.equal(p, q):
                bad.append(f"{name}[{e}]")
    return bad


def _graph_rank(ctx) -> list[str]:
    import torch.distributed as dist

    from epreplay.emulate import Buffer

    torch.set_default_device("cuda")  # as DeepEP's init_dist does
    torch.set_default_dtype(torch.bfloat16)
    group = dist.new_group(list(range(ctx.world_size)))
    fails = []
    for use_fp8 in (False, True):
        eager = Buffer(group, low_latency_mode=True, ll_order_seed=-1)
        graphed = Buffer(group, low_latency_mode=True)
        xs, idxs, ws = _inputs(1000 + ctx.rank, T, "cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph advises
            _step(graphed, xs, idxs, ws, use_fp8)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = _step(graphed, xs, idxs, ws, use_fp8)
        for trial in range(3):
            x, idx, w = _inputs(trial * 10 + ctx.rank, T, "cuda")
            xs.copy_(x), idxs.copy_(idx), ws.copy_(w)
            graph.replay()
            torch.cuda.synchronize()
            want = _step(eager, x, idx, w, use_fp8)
            bad = _same(want, outs)
            if bad:
                fails.append(f"rank {ctx.rank} fp8={use_fp8} replay {trial}: {bad} differ from the eager call")
    return fails


def test_ll_dispatch_combine_capture_and_replay_in_cuda_graph() -> None:
    world = min(torch.cuda.device_count(), 2)
    fails = [f for r in run_ranks(_graph_rank, world, device="cuda", timeout=600) for f in r]
    assert not fails, "\n".join(fails)


def _kineto_rank(ctx) -> list[str]:
    import torch.distributed as dist

    from epreplay.emulate import Buffer

    torch.set_default_device("cuda")
    group = dist.new_group(list(range(ctx.world_size)))
    buf = Buffer(group, low_latency_mode=True)
    x, idx, w = _inputs(ctx.rank, T, "cuda")
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
    with prof:
        for _ in range(3):
            _step(buf, x, idx, w, True)
        torch.cuda.synchronize()
    lines = prof.key_averages().table(sort_by="cuda_time_total", max_name_column_width=100).split("\n")
    fails = []
    for name in ("dispatch", "combine"):
        hits = [line for line in lines if name in line]
        if len(hits) != 1:
            fails.append(f"{len(hits)} profile lines contain {name!r} (DeepEP's bench_kineto wants 1):\n"
                         + "\n".join(lines))
    return fails


def test_cuda_only_profile_names_dispatch_and_combine_once() -> None:
    fails = [f for r in run_ranks(_kineto_rank, 1, device="cuda", timeout=300) for f in r]
    assert not fails, "\n".join(fails)


def _recorded_graph_rank(ctx, run_dir: str, level: str, replays: int) -> dict:
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.emulate import Buffer

    torch.set_default_device("cuda")
    group = dist.new_group(list(range(ctx.world_size)))
    capture.start(run_dir, level=level)  # the default hot path: the ring, compiled where built
    buf = Buffer(group, low_latency_mode=True)
    xs, idxs, ws = _inputs(2000 + ctx.rank, T, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _step(buf, xs, idxs, ws, False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _step(buf, xs, idxs, ws, False)
    fed = []
    for i in range(replays):
        x, idx, w = _inputs(3000 + 10 * i + ctx.rank, T, "cuda")
        xs.copy_(x), idxs.copy_(idx), ws.copy_(w)
        graph.replay()
        fed.append((idx.cpu().numpy(), w.cpu().numpy()))
    torch.cuda.synchronize()
    facts = capture.stop()
    return {"facts": facts, "fed": fed}


@pytest.mark.parametrize("level", ["routing", "fingerprints"])
def test_calls_captured_in_a_cuda_graph_are_recorded_at_each_replay(tmp_path, level) -> None:
    """On the ring path (the default): the graph's calls are staged into the graph (graph_ring.py),
    not taken for ring calls, and each replay is one record per call with the replay's routing."""
    import numpy as np

    from epreplay.capture.graph_ring import GRAPH_SEQ_BASE
    from epreplay.format.records import Op
    from epreplay.format.shard import open_shard

    replays = 5
    run = tmp_path / "run"
    out = run_ranks(_recorded_graph_rank, 1, str(run), level, replays, device="cuda", timeout=600)[0]
    assert out["facts"]["disabled"] is None, out["facts"]
    with open_shard(run / "shards" / "rank-00000.eprs") as scan:
        recs = [r for r in scan.records(ops=[Op.LL_DISPATCH, Op.LL_COMBINE]) if r.header.seq >= GRAPH_SEQ_BASE]
    dispatches = sorted((r for r in recs if r.header.op == Op.LL_DISPATCH), key=lambda r: r.header.seq)
    assert len(dispatches) == replays and len(recs) == 2 * replays
    combines = sorted((r for r in recs if r.header.op == Op.LL_COMBINE), key=lambda r: r.header.seq)
    for d, c, (idx, w) in zip(dispatches, combines, out["fed"]):
        assert np.array_equal(d.arrays["topk_idx_TK"], idx), (d.header.seq, d.arrays["topk_idx_TK"][:2], idx[:2])
        assert np.array_equal(c.arrays["topk_idx_TK"], idx) and np.array_equal(c.arrays["topk_weights_TK"], w)
