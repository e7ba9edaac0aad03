"""The DuckDB index of a run: aggregates against an independent recomputation from the decoded
shards, incremental indexing, damaged shards, replay reports. Real shards, real DuckDB."""
from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path

import duckdb
import numpy as np
import pytest

from epreplay.demo.synth import SynthSpec, SynthWriter, create_run, make_synthetic_run
from epreplay.format.records import Op
from epreplay.format.run import RunDir
from epreplay.format.shard import open_shard
from epreplay.index.build import build_index, ensure_index
from epreplay.index.queries import open_index
from epreplay.index.replays import load_replay_report

SHAPE = dict(ranks=8, steps=4, layers=3, tokens=64, experts=32, topk=4, seed=7)


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("idx") / "run"
    make_synthetic_run(path, **SHAPE, straggler_rank=2, decode_steps=2, decode_tokens=16, workers=1)
    build_index(path)
    return path


def recompute(run: Path) -> tuple[dict, dict]:
    """expert_load {(step, layer, expert): slots} and traffic {(step, layer, src, dst): rows}
    straight from the decoded records, one token at a time (the definition, not the index's code)."""
    rundir = RunDir(run)
    load: dict = defaultdict(int)
    traffic: dict = defaultdict(int)
    manifest = rundir.read_manifest()
    X = manifest.num_experts // manifest.world_size
    for p in rundir.shard_paths():
        with open_shard(p) as scan:
            for rec in scan.records(ops=(Op.DISPATCH, Op.LL_DISPATCH)):
                h = rec.header
                idx = rec.arrays["topk_idx_TK"]
                for row in idx.tolist():
                    experts = [e for e in row if e >= 0]
                    for e in experts:
                        load[(h.step, h.layer, e)] += 1
                    dsts = [e // X for e in experts]
                    for d in (set(dsts) if h.op == Op.DISPATCH else dsts):
                        traffic[(h.step, h.layer, scan.info.rank, d)] += 1
    return dict(load), dict(traffic)


def table(run: Path, sql: str) -> dict:
    con = duckdb.connect(str(RunDir(run).index_path), read_only=True)
    try:
        return {tuple(r[:-1]): r[-1] for r in con.execute(sql).fetchall()}
    finally:
        con.close()


def test_aggregates_equal_recomputation_from_shards(synth_run: Path) -> None:
    load, traffic = recompute(synth_run)
    got_load = table(synth_run, "SELECT step, layer, expert, tokens FROM expert_load")
    got_traffic = table(synth_run, "SELECT step, layer, src_rank, dst_rank, tokens FROM traffic")
    assert got_load == load
    assert got_traffic == traffic
    # every (step, layer) of both phases is there: 4 prefill + 2 decode steps x 3 layers
    assert {(s, l) for s, l, _ in load} == {(s, l) for s in range(6) for l in range(3)}


def test_recorded_demo_run_equals_recomputation(request, tmp_path: Path) -> None:
    """The same check on a run recorded through the capture hooks (DEMO's fixture), when present."""
    try:
        demo = Path(request.getfixturevalue("demo_run_dir"))
    except pytest.FixtureLookupError:
        pytest.skip("tests/conftest.py provides no demo_run_dir fixture yet")
    run = tmp_path / "demo"
    shutil.copytree(demo, run, ignore=shutil.ignore_patterns("index.duckdb*"))
    build_index(run)
    load, traffic = recompute(run)
    assert load, "the demo run recorded no routing"
    assert table(run, "SELECT step, layer, expert, tokens FROM expert_load") == load
    assert table(run, "SELECT step, layer, src_rank, dst_rank, tokens FROM traffic") == traffic


def test_traffic_matches_what_dispatch_recorded(synth_run: Path) -> None:
    """DeepEP's own num_tokens_per_rank_R (in each normal dispatch record) equals the index's rows."""
    got = table(synth_run, "SELECT step, layer, src_rank, dst_rank, tokens FROM traffic WHERE step < 4")
    for p in RunDir(synth_run).shard_paths():
        with open_shard(p) as scan:
            for rec in scan.records(ops=(Op.DISPATCH,)):
                h = rec.header
                for dst, n in enumerate(rec.arrays["num_tokens_per_rank_R"].tolist()):
                    assert got.get((h.step, h.layer, scan.info.rank, dst), 0) == n


def test_senders_rank_load_and_queries(synth_run: Path) -> None:
    load, traffic = recompute(synth_run)
    with open_index(synth_run) as ix:
        hot = ix.hot_experts(3)
        per_e = defaultdict(int)
        for (_, _, e), n in load.items():
            per_e[e] += n
        want = sorted(per_e.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        assert [(int(e), int(n)) for e, n in zip(hot.expert_N, hot.tokens_N)] == want
        assert hot.total == sum(per_e.values())
        # senders of the hottest expert sum to its load
        senders = ix.expert_senders(want[0][0])
        assert int(senders.tokens_N.sum()) == want[0][1]
        rl = ix.rank_load(layer=1, steps=(0, 2))
        recv = np.zeros(8, np.int64)
        for (s, l, _src, d), n in traffic.items():
            if l == 1 and s < 2:
                recv[d] += n
        assert recv.tolist() == rl.recv_R.tolist()
        imb = ix.imbalance(steps=(0, 2))
        assert imb.imbalance_L[1] == pytest.approx(recv.max() / recv.mean())
        tr = ix.traffic(step=3, layer=2)
        for (s, l, src, d), n in traffic.items():
            if (s, l) == (3, 2):
                assert tr.tokens_RR[src, d] == n
        assert tr.bytes_RR.sum() == tr.tokens_RR.sum() * 2 * 7168  # bf16 rows of hidden 7168
        strag = ix.stragglers(3)
        assert strag.rank_N[0] == 2 and strag.last_N[0] == strag.calls_N[0]  # the planted one
        assert strag.slowest_N[0] == 0  # ... whose peers wait for it inside each call
        tl = ix.timeline()
        assert tl.duration_SR.shape == (6, 8) and (tl.duration_SR[:, 2] < tl.duration_SR[:, 3]).all()
        assert ix.expert_load_over_time(want[0][0]).tokens_S.sum() == want[0][1]
        lm = ix.load_matrix()
        assert lm.load_LE.sum() == sum(per_e.values()) and lm.load_LE.shape == (3, 32)
        assert ix.health().ok
        assert ix.info.steps == 6 and ix.info.layers == (0, 1, 2)


def test_counts_level_run_uses_recorded_counts(tmp_path: Path) -> None:
    run = tmp_path / "counts"
    make_synthetic_run(run, **{**SHAPE, "steps": 2}, level="counts", workers=1)
    build_index(run)
    want: dict = defaultdict(int)
    sent: dict = {}
    for p in RunDir(run).shard_paths():
        with open_shard(p) as scan:
            for rec in scan.records(ops=(Op.DISPATCH,)):
                h = rec.header
                assert "topk_idx_TK" not in rec.arrays
                for e, n in enumerate(rec.arrays["num_tokens_per_expert_E"].tolist()):
                    if n:
                        want[(h.step, h.layer, e)] += n
                for d, n in enumerate(rec.arrays["num_tokens_per_rank_R"].tolist()):
                    if n:
                        sent[(h.step, h.layer, scan.info.rank, d)] = n
    assert table(run, "SELECT step, layer, expert, tokens FROM expert_load") == dict(want)
    assert table(run, "SELECT step, layer, src_rank, dst_rank, tokens FROM traffic") == sent


def _dump(run: Path) -> dict[str, list]:
    con = duckdb.connect(str(RunDir(run).index_path), read_only=True)
    try:
        out = {}
        for t, key in (("calls", "rank, buffer, seq"), ("expert_load", "step, layer, expert"),
                       ("expert_load_rank", "step, layer, src_rank"),
                       ("traffic", "step, layer, src_rank, dst_rank"), ("rank_load", "step, layer, rank")):
            rows = con.execute(f"SELECT * FROM {t} ORDER BY {key}").fetchall()
            out[t] = [tuple(tuple(v) if isinstance(v, list) else v for v in r) for r in rows]
        return out
    finally:
        con.close()


@pytest.mark.slow
def test_incremental_adds_exactly_the_new_rows_and_is_faster(tmp_path: Path) -> None:
    spec = SynthSpec(ranks=8, steps=24, layers=4, tokens=256, experts=64, topk=8, seed=3)
    rundir, spec = create_run(tmp_path / "live", spec)
    run = rundir.path
    low, high = SynthWriter(run, spec, range(0, 4)), SynthWriter(run, spec, range(4, 8))
    try:
        low.write_steps(0, 21)
        high.write_steps(0, 21)
        assert build_index(run).action == "built"
        with open_index(run, ensure=False) as ix:
            assert all(s.writer_active and s.truncated_at is None for s in ix.health().shards)
        before = _dump(run)
        low.write_steps(21, 22)  # step 21 on half the ranks only: its rows are partial for now
        first = build_index(run)
        assert first.action == "updated" and first.shards_indexed == 4
        high.write_steps(21, 24)  # completes step 21 (rows merged) and adds 22, 23
        low.write_steps(22, 24)
        second = build_index(run)
        assert second.action == "updated" and second.shards_indexed == 8
    finally:
        low.close()
        high.close()
    assert build_index(run).action == "updated"  # the footers: no new records
    assert build_index(run).action == "fresh"
    after = _dump(run)
    ref = tmp_path / "ref"
    shutil.copytree(run, ref)
    full = build_index(ref, force=True)
    assert after == _dump(ref)  # incremental == full rebuild, row for row (no duplicates)
    for t, rows in before.items():
        assert set(rows) <= set(after[t])
        new_rows = [r for r in after[t] if (r[3] if t == "calls" else r[0]) >= 21]
        assert len(after[t]) - len(rows) == len(new_rows), t
    # Faster because it reads only what is new: 3 of 24 steps. The whole call also pays fixed
    # costs (copying the index, opening DuckDB) that on a run this small are as large as a full
    # build, so the comparison is on the records read and on the phase that reads them.
    assert second.records * 4 < full.records, (second.records, full.records)
    assert second.phases["shards"] < full.phases["shards"], (second.phases, full.phases)


def test_truncated_and_corrupted_shards_are_indexed_and_flagged(tmp_path: Path, synth_run: Path) -> None:
    run = tmp_path / "damaged"
    shutil.copytree(synth_run, run)
    (run / "index.duckdb").unlink()
    rd = RunDir(run)
    with open_shard(rd.shard_path(1)) as scan:
        cut_entry = scan.entries[10]
    with open_shard(rd.shard_path(5)) as scan:
        bad_entry = scan.entries[7]
    cut_at = cut_entry.offset + 30  # inside record 10's header frame
    with open(rd.shard_path(1), "r+b") as fh:
        fh.truncate(cut_at)
    with open(rd.shard_path(5), "r+b") as fh:  # one flipped bit in record 7's compressed data
        fh.seek(bad_entry.data_offset + 5)
        byte = fh.read(1)[0]
        fh.seek(bad_entry.data_offset + 5)
        fh.write(bytes([byte ^ 0x10]))
    res = build_index(run)
    assert len(res.problems) == 2
    rows = table(run, "SELECT rank, truncated_at, records, calls, complete, problem FROM shards "
                      "WHERE truncated_at IS NOT NULL")
    assert set(rows) == {(1, cut_entry.offset, 10, 10, False), (5, bad_entry.offset, 7, 7, False)}
    assert f"byte {bad_entry.offset}" in rows[(5, bad_entry.offset, 7, 7, False)]
    counts = table(run, "SELECT rank, count(*) FROM calls GROUP BY rank")
    assert counts[(1,)] == 10 and counts[(5,)] == 7 and counts[(0,)] == 36
    with open_index(run) as ix:
        health = ix.health()
        assert not health.ok and {s.rank for s in health.damaged} == {1, 5}


def test_replay_reports_load_once(tmp_path: Path, synth_run: Path) -> None:
    run = tmp_path / "replayed"
    shutil.copytree(synth_run, run)
    div = {"call": 3, "buffer": 0, "seq": 6, "step": 1, "layer": 0, "op": "dispatch", "rank": 5,
           "physical": 1, "kind": "count", "expected": "12 rows", "got": "11 rows", "token": -1,
           "src_rank": 2, "expert": 7, "detail": "one row lost"}
    report = {"id": "20260101T000000Z-aaaa", "run": str(run), "run_id": "x", "created": "2026-01-01T00:00:00",
              "plan": {"virtual_ranks": 8, "physical_ranks": 2}, "backend": "emulated", "device": "cpu",
              "payload": "synthetic", "calls": 10, "scheduled": 10, "calls_by_op": {}, "divergences": 1,
              "by_kind": {"count": 1}, "first_divergence": div, "divergence_list": [div],
              "exit_code": 1, "verdict": "DIVERGED: 1 divergence(s)"}
    assert load_replay_report(run, report) is True
    assert load_replay_report(run, report) is False  # already there: no duplicate
    (run / "replays").mkdir()
    (run / "replays" / "20260101T000001Z-bbbb.json").write_text(
        __import__("json").dumps({**report, "id": "20260101T000001Z-bbbb", "divergences": 0,
                                  "divergence_list": [], "exit_code": 0, "verdict": "OK"}))
    assert ensure_index(run, progress=False).action == "updated"
    with open_index(run) as ix:
        reps = ix.replays()
        assert [(r.replay, r.divergences, r.physical_ranks) for r in reps] == [
            ("20260101T000000Z-aaaa", 1, 2), ("20260101T000001Z-bbbb", 0, 2)]
        (d,) = ix.divergences()
        assert (d.replay, d.step, d.op, d.rank, d.phys_rank, d.kind, d.expert, d.got) == (
            "20260101T000000Z-aaaa", 1, "dispatch", 5, 1, "count", 7, "11 rows")
