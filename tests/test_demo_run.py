"""The demo workload on real processes through the emulated Buffer, and its recording.

What the ranks route is checked against the one-process computation (demo_model.local_routing),
so the Buffer calls, the per-rank batches and the aggregation must all agree with the maths.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from conftest import DEMO_RUN, missing_parts

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(missing_parts("epreplay.emulate") is not None,
                                 reason="the emulated Buffer is not built yet")]


def _local_load(cfg) -> tuple[np.ndarray, np.ndarray]:
    """[S, NL, E] expert load and [S, NL, R, R] traffic computed in this process."""
    import torch

    from epreplay.demo.model import local_routing

    torch.set_num_threads(1)
    R, L = cfg.ranks, cfg.local_experts
    load = np.zeros((cfg.steps, cfg.layers, cfg.experts), np.int64)
    traffic = np.zeros((cfg.steps, cfg.layers, R, R), np.int64)
    for s, r in itertools.product(range(cfg.steps), range(R)):
        for layer, (idx, _) in enumerate(local_routing(cfg, s, r)):
            idx = idx.numpy()
            load[s, layer] += np.bincount(idx.ravel(), minlength=cfg.experts)
            for dst in range(R):  # normal dispatch: once per destination; LL: once per expert slot
                to_dst = (idx // L) == dst
                traffic[s, layer, r, dst] += to_dst.any(axis=1).sum() if cfg.is_prefill(s) else to_dst.sum()
    return load, traffic


def test_ranks_route_what_the_model_says_and_twice_the_same() -> None:
    from epreplay.demo.model import DemoConfig
    from epreplay.demo.run import run_demo

    cfg = DemoConfig(ranks=2, steps=3, layers=2, experts=16, topk=4)  # prefill, decode, decode
    first = run_demo(cfg, timeout=180)
    second = run_demo(cfg, timeout=180)
    load, traffic = _local_load(cfg)
    assert np.array_equal(first.load_SLE, load)
    assert np.array_equal(first.traffic_SLRR, traffic)
    assert [r.routing_digest for r in first.ranks] == [r.routing_digest for r in second.ranks]
    assert np.array_equal(first.load_SLE, second.load_SLE)
    for r in first.ranks:
        # rows received: a normal dispatch gets a token once per rank; LL once per local expert
        assert r.recv_SL[0].tolist() == traffic[0, :, :, r.rank].sum(axis=1).tolist()
        L = cfg.local_experts
        mine = load[1:, :, r.rank * L:(r.rank + 1) * L].sum(axis=2)
        assert r.recv_SL[1:].tolist() == mine.tolist()
        assert int(r.ll_recv_stats_L.sum()) == int(mine.sum())  # cumulative LL stats, in place
        assert np.isfinite(r.output_rms) and r.output_rms > 0
    # What `epreplay demo` prints (text and --format json) says the same as the model.
    from epreplay.demo.pipeline import PipelineResult
    from epreplay.demo.render import summary_dict, summary_lines

    doc = summary_dict(PipelineResult(out=None, demo=first))
    load_E = load.sum(axis=(0, 1))
    hot = np.argsort(-load_E, kind="stable")[:5]
    assert [h["expert"] for h in doc["hottest"]] == hot.tolist()
    recv_R = np.array([r.recv_SL.sum() for r in first.ranks])
    assert doc["most_loaded_rank"] == int(recv_R.argmax()) and doc["received_per_rank"] == recv_R.tolist()
    off_diagonal = int(traffic.sum() - np.trace(traffic, axis1=2, axis2=3).sum())
    assert doc["tokens_moved"] == off_diagonal
    text = "\n".join(summary_lines(PipelineResult(out=None, demo=first)))
    assert f"hottest experts: e{hot[0]} {load_E[hot[0]] / load_E.sum():.1%}" in text
    assert f"most loaded rank: {int(recv_R.argmax())} received {int(recv_R.max()):,} rows" in text
    assert f"rows sent between ranks: {off_diagonal:,} over" in text


def test_demo_summary_traffic_is_the_index_traffic(tmp_path) -> None:
    """The demo's headline traffic and the index's traffic table count the same rows (one
    definition: metrics.rows_sent), prefill and decode steps alike."""
    from epreplay.demo.model import DemoConfig
    from epreplay.demo.pipeline import PipelineOptions, run_pipeline
    from epreplay.index.queries import open_index

    cfg = DemoConfig(ranks=2, steps=3, layers=2, experts=16, topk=4)  # prefill, decode, decode
    out = tmp_path / "run"
    result = run_pipeline(cfg, PipelineOptions(out=out, index=True, replay=False), progress=None)
    assert result.exit_code == 0, result.steps
    with open_index(out) as idx:
        rows = idx.sql("SELECT sum(tokens) AS t FROM traffic WHERE src_rank <> dst_rank").rows
    assert int(rows[0][0]) == result.demo.tokens_moved > 0


def test_recorded_run_holds_every_call_tagged(demo_run_dir) -> None:
    from epreplay.format.records import Op
    from epreplay.format.run import RunDir
    from epreplay.format.shard import open_shard

    run = RunDir.open(demo_run_dir)
    manifest = run.read_manifest()
    assert manifest.world_size == DEMO_RUN["ranks"]
    assert manifest.extra["demo"]["experts"] == DEMO_RUN["experts"]
    shards = run.shard_paths()
    assert [run.rank_of(p) for p in shards] == list(range(DEMO_RUN["ranks"]))
    steps, layers = DEMO_RUN["steps"], DEMO_RUN["layers"]
    prefill = [s for s in range(steps) if s % 3 == 0]
    for path in shards:
        with open_shard(path) as scan:
            assert scan.complete
            calls = [(e.header.step, e.header.layer, Op(e.header.op)) for e in scan.entries]
            expected = []
            for s in range(steps):
                ops = ((Op.LAYOUT, Op.DISPATCH, Op.COMBINE) if s in prefill else
                       (Op.LL_DISPATCH, Op.LL_COMBINE))
                expected += [(s, layer, op) for layer in range(layers) for op in ops]
            assert calls == expected
            tags = [rec.arrays["token_tag_T"] for rec in scan.records(ops=[Op.DISPATCH, Op.LL_DISPATCH])]
            assert len(tags) == steps * layers and all(len(t) > 0 for t in tags)


def test_straggler_makes_the_others_wait(demo_run_factory) -> None:
    """--slow-rank: as in DeepEP, the others' dispatches absorb the straggler's delay."""
    from epreplay.format.records import Op
    from epreplay.format.run import RunDir
    from epreplay.format.shard import open_shard

    # 80 ms: well above the scheduling noise of 4 ranks sharing 2 busy cores
    run = RunDir.open(demo_run_factory(slow_rank=1, slow_ms=80.0, steps=2, layers=2))
    median_ms = {}
    for path in run.shard_paths():
        with open_shard(path) as scan:
            d = [e.header.duration_ns / 1e6 for e in scan.entries
                 if Op(e.header.op) in (Op.DISPATCH, Op.LL_DISPATCH)]
        median_ms[run.rank_of(path)] = float(np.median(d))
    others = [ms for r, ms in median_ms.items() if r != 1]
    assert min(others) >= 40.0, median_ms  # each waited ~80 ms inside the collective
    assert median_ms[1] < 0.5 * float(np.median(others)), median_ms
