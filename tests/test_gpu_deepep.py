"""Real DeepEP on GPUs: record at DeepEP's benchmark shapes, replay through real DeepEP and the
emulation, CUDA-graph capture of low-latency decode.

Skipped (with the reason) without CUDA, without enough GPUs, or where `deep_ep` does not import:
DeepEP is not installable from the registries; build it from source on a GPU machine and put it
on PYTHONPATH to run these.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from epreplay.launch import run_ranks

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
deep_ep = pytest.importorskip("deep_ep", reason="deep_ep does not import (build DeepEP from source)")

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
# DeepEP's benchmark shapes (deepep-semantics.md): normal T=4096, H=7168, top-8 of 256 in BF16
# and FP8; low-latency T=128, H=7168, top-8 of 256.
NORMAL = dict(tokens=4096, hidden=7168, experts=256, topk=8)
LOWLAT = dict(tokens=128, hidden=7168, experts=256, topk=8)


def _record_rank(ctx, steps: int) -> list[np.ndarray]:
    """Each step: one normal BF16, one normal FP8 and one low-latency dispatch/combine."""
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.demo import epbench

    capture.install()
    group = dist.new_group(list(range(ctx.world_size)))
    normal = epbench.make_buffer(deep_ep, group, epbench.Shape(**NORMAL), low_latency=False)
    ll_shape = epbench.Shape(**LOWLAT)
    ll = epbench.make_buffer(deep_ep, group, ll_shape, low_latency=True)
    sent = []
    for step in range(steps):
        with capture.step(step):
            for layer, fp8 in enumerate((False, True)):
                with capture.layer(layer):
                    inp = epbench.make_inputs(epbench.Shape(**NORMAL, fp8=fp8), rank=ctx.rank,
                                              step=step * 2 + layer, device=ctx.device)
                    epbench.normal_step(normal, inp, NORMAL["experts"])
                    sent.append(inp.topk_idx_TK.cpu().numpy())
            with capture.layer(2):
                inp = epbench.make_inputs(ll_shape, rank=ctx.rank, step=100 + step, device=ctx.device)
                epbench.ll_step(ll, inp, LOWLAT["experts"], LOWLAT["tokens"])
                sent.append(inp.topk_idx_TK.cpu().numpy())
    torch.cuda.synchronize()
    capture.stop()
    normal.destroy()
    ll.destroy()
    return sent


def _record(tmp_path: Path, ranks: int, *, level: str = "fingerprints", steps: int = 2) -> Path:
    from epreplay import capture

    run = tmp_path / f"run{ranks}"
    env = capture.env_for(run, level=level, fresh=True)
    run_ranks(_record_rank, ranks, steps, device="cuda", env=env, timeout=600)
    return run


def _replay(run: Path, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "epreplay", "replay", str(run), "--format", "json", *args],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode in (0, 1), out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert out.returncode == 0 and report["divergences"] == 0, json.dumps(report, indent=1)[:3000]
    return report


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")
def test_two_rank_recording_replays_on_deepep_and_on_cpu(tmp_path):
    run = _record(tmp_path, 2)
    on_gpu = _replay(run, "--backend", "deepep", "--device", "cuda")
    on_cpu = _replay(run, "--backend", "emulated", "--device", "cpu")
    for report in (on_gpu, on_cpu):
        calls = report["calls"]
        total = sum(calls.values()) if isinstance(calls, dict) else calls
        assert total >= 2 * 2 * 3  # 2 steps x (2 normal + 1 LL) dispatches, on each of 2 ranks


@pytest.mark.skipif(GPUS < 4, reason="needs 4 GPUs")
def test_four_rank_recording_replays_on_two_gpus_through_deepep(tmp_path):
    run = _record(tmp_path, 4, level="routing", steps=1)
    _replay(run, "--backend", "deepep", "--device", "cuda", "--ranks", "2")


def _graph_rank(ctx, replays: int) -> list[np.ndarray]:
    """LL dispatch/combine captured in a CUDA graph, replayed with new routing each time."""
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.demo import epbench

    capture.install()
    group = dist.new_group(list(range(ctx.world_size)))
    shape = epbench.Shape(**LOWLAT)
    buf = epbench.make_buffer(deep_ep, group, shape, low_latency=True)
    static = epbench.make_inputs(shape, rank=ctx.rank, step=0, device=ctx.device)
    epbench.ll_step(buf, static, shape.experts, shape.tokens)  # eager warm-up (recorded eagerly)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        epbench.ll_step(buf, static, shape.experts, shape.tokens)
    fed = []
    for i in range(replays):
        nxt = epbench.make_inputs(shape, rank=ctx.rank, step=1 + i, device=ctx.device)
        static.topk_idx_TK.copy_(nxt.topk_idx_TK)
        static.topk_weights_TK.copy_(nxt.topk_weights_TK)
        static.x_TH.copy_(nxt.x_TH)
        graph.replay()
        fed.append(nxt.topk_idx_TK.cpu().numpy())
    torch.cuda.synchronize()
    capture.stop()
    buf.destroy()
    return fed


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")
def test_cuda_graph_replays_are_each_recorded(tmp_path):
    from epreplay import capture
    from epreplay.capture.graph_ring import GRAPH_SEQ_BASE
    from epreplay.format.records import Op
    from epreplay.format.shard import open_shard

    replays = 12
    run = tmp_path / "graph"
    env = capture.env_for(run, level="fingerprints", fresh=True)
    fed = run_ranks(_graph_rank, 2, replays, device="cuda", env=env, timeout=600)
    for rank, fed_rank in enumerate(fed):
        scan = open_shard(run / "shards" / f"rank-{rank:05d}.eprs")
        graph_ll = [r for r in scan.records(ops=[Op.LL_DISPATCH]) if r.header.seq >= GRAPH_SEQ_BASE]
        assert len(graph_ll) == replays
        for i, rec in enumerate(sorted(graph_ll, key=lambda r: r.header.seq)):
            assert np.array_equal(rec.arrays["topk_idx_TK"], fed_rank[i]), (rank, i)
            assert int(rec.arrays["recv_count_L"].sum()) == len(rec.arrays["src_info_V"])
        combines = [r for r in scan.records(ops=[Op.LL_COMBINE]) if r.header.seq >= GRAPH_SEQ_BASE]
        assert len(combines) == replays
