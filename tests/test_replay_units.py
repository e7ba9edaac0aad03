"""Replay's pure parts: the schedule (joining ranks' calls, skips, filters), the comparisons and the
choice of the first divergence, the synthetic payload. Real shards, no processes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from epreplay.errors import UsageError
from epreplay.format.records import Kind, Level, Op, RecordHeader, ShardInfo, Status
from epreplay.format.shard import ShardWriter, open_shard
from epreplay.replay import schedule as S
from epreplay.replay.inputs import synth_rows, synth_source
from epreplay.replay.report import first_of
from epreplay.replay.verify import Rows, check_counts, check_ll, check_rows

OPS = [Op.LAYOUT, Op.DISPATCH, Op.COMBINE, Op.LL_DISPATCH, Op.LL_COMBINE]


def _shards(tmp: Path, calls_by_rank: dict[int, list[tuple[int, Op, Status]]]) -> dict[int, object]:
    scans = {}
    for r, calls in calls_by_rank.items():
        path = tmp / f"rank-{r:05d}.eprs"
        with ShardWriter(path, ShardInfo("run", r, len(calls_by_rank), 16, 2, 128, Level.ROUTING)) as w:
            for seq, op, status in calls:
                w.append(RecordHeader(Kind.CALL, int(op), Level.ROUTING, status, 0, seq, seq // 5, seq % 5 // 3,
                                      4, start_ns=seq), {"n": np.arange(3)})
        scans[r] = open_shard(path)
    return scans


def test_schedule_joins_by_seq_and_says_why_calls_are_skipped(tmp_path: Path) -> None:
    full = [(seq, OPS[seq % 5], Status.OK) for seq in range(10)]
    errored = [(s, op, Status.ERROR if s == 1 else st) for s, op, st in full]
    scans = _shards(tmp_path, {0: full, 1: errored, 2: full[:7]})
    sched = S.build(scans, 3)
    reasons = {s.seq: s.reason for s in sched.skipped}
    assert reasons[1] == "recorded as error on rank 1"
    assert reasons[2] == "its dispatch (seq 1) was skipped"  # a combine needs its dispatch's handle
    assert reasons[7] == reasons[8] == reasons[9] == "missing on rank 2 (not recorded)"
    assert [c.seq for c in sched.calls] == [0, 3, 4, 5, 6]
    assert [c.index for c in sched.calls] == list(range(5))
    assert sched.calls[2].parent_seq == 3  # ll_combine -> its ll_dispatch
    ranks = {s.seq: s.ranks for s in sched.skipped}
    assert ranks[1] == ranks[2] == (1,) and ranks[7] == (2,)  # a combine names its dispatch's rank


def test_damaged_record_is_found_and_only_its_calls_are_skipped(tmp_path: Path) -> None:
    from epreplay.replay.damage import damaged_offsets, find_damage
    from epreplay.format.frames import REC_PREFIX

    full = [(seq, OPS[seq % 5], Status.OK) for seq in range(10)]
    scans = _shards(tmp_path, {0: full, 1: full})
    assert find_damage(scans) == []
    off = scans[1].entries[1].offset  # seq 1, a dispatch: its combine (seq 2) goes with it
    path = scans[1].path
    scans[1].close()
    with open(path, "r+b") as fh:
        fh.seek(off + REC_PREFIX)
        b = fh.read(1)
        fh.seek(off + REC_PREFIX)
        fh.write(bytes([b[0] ^ 1]))
    scans[1] = open_shard(path)
    (d,) = find_damage(scans)
    assert (d.rank, d.offset, d.truncated) == (1, off, False) and d.what.startswith("crc ")
    sched = S.build(scans, 2, damaged=damaged_offsets([d]))
    skipped = {s.seq: s for s in sched.skipped}
    assert sorted(skipped) == [1, 2] and skipped[1].ranks == skipped[2].ranks == (1,)
    assert skipped[1].reason.startswith(f"missing or damaged on rank 1 (record at byte {off} damaged: crc")
    assert [c.seq for c in sched.calls] == [0, 3, 4, 5, 6, 7, 8, 9]


def test_exit_code_is_incomplete_when_calls_were_skipped() -> None:
    from epreplay.replay.report import EXIT_DIVERGED, EXIT_INCOMPLETE, EXIT_OK, ReplayReport

    skip = [{"buffer": 0, "seq": 9, "op": "combine", "step": 1, "layer": 0, "ranks": [3],
             "reason": "missing on rank 3 (not recorded)"}]

    def report(**kw) -> ReplayReport:
        base = dict(id="r", run="run", run_id="id", created="", plan={"physical_ranks": 2},
                    backend="emulated", device="cpu", payload="synthetic", calls=8, scheduled=8,
                    calls_by_op={}, divergences=0, by_kind={}, first_divergence=None)
        return ReplayReport(**{**base, **kw})

    assert report().exit_code == EXIT_OK and report().verdict.startswith("OK: 8 calls")
    r = report(skipped=skip)
    assert r.exit_code == EXIT_INCOMPLETE == 3 and r.verdict.startswith("INCOMPLETE: 8 calls replayed")
    assert "1 recorded call(s) skipped (rank 3: 1)" in r.verdict and r.to_dict()["skipped_by_rank"] == {"3": 1}
    r = report(skipped=skip, allow_partial=True)
    assert r.exit_code == EXIT_OK and r.verdict.startswith("PARTIAL (--allow-partial): 8 calls")
    # --allow-partial accepts skipped recorded calls, not a replay that stopped short
    assert report(calls=5, allow_partial=True).exit_code == EXIT_INCOMPLETE
    r = report(skipped=skip, divergences=1, first_divergence={"kind": "count"})
    assert r.exit_code == EXIT_DIVERGED and r.verdict.endswith("; 1 recorded call(s) skipped (rank 3: 1)")


def test_filters_pull_in_the_dispatch_a_combine_needs(tmp_path: Path) -> None:
    scans = _shards(tmp_path, {0: [(s, OPS[s % 5], Status.OK) for s in range(10)],
                               1: [(s, OPS[s % 5], Status.OK) for s in range(10)]})
    sched = S.build(scans, 2, ops={Op.COMBINE})
    assert [(c.seq, c.op) for c in sched.calls] == [(1, Op.DISPATCH), (2, Op.COMBINE),
                                                    (6, Op.DISPATCH), (7, Op.COMBINE)]
    assert sched.filtered == 6
    sched = S.build(scans, 2, steps=S.parse_steps("1:"), layers=S.parse_int_set("0", "--layers"))
    assert [c.seq for c in sched.calls] == [5, 6, 7]


def test_filter_parsing_errors_name_the_value() -> None:
    assert S.parse_steps("2:5") == (2, 5) and S.parse_steps("3") == (3, 4) and S.parse_steps(":4") == (None, 4)
    assert S.parse_int_set("0,2,5-7", "--layers") == {0, 2, 5, 6, 7}
    with pytest.raises(UsageError, match="--steps 'a:b'"):
        S.parse_steps("a:b")
    with pytest.raises(UsageError, match="known ops: layout"):
        S.parse_ops("dispatch,nope")


def _rows(src, tok, fp=None, idx=None) -> Rows:
    src, tok = np.asarray(src), np.asarray(tok)
    return Rows(src, tok, np.bincount(src, minlength=3), None, idx, None,
                None if fp is None else np.asarray(fp, np.uint64))


def test_row_checks_tell_missing_reordered_swapped_and_corrupt_rows() -> None:
    exp = _rows([0, 0, 1, 2], [1, 4, 0, 3], fp=[10, 11, 12, 13])
    lost = _rows([0, 1, 2], [1, 0, 3], fp=[10, 12, 13])
    (kind, *_, src, tok, _, detail), = check_counts(exp, lost, expert_base=0)
    assert kind == "count" and (src, tok) == (0, 4) and "token 4 of rank 0 missing" in detail
    reordered = _rows([0, 0, 1, 2], [4, 1, 0, 3], fp=[11, 10, 12, 13])
    assert [f[0] for f in check_rows(exp, reordered, expert_base=0)] == ["order"]
    swapped = _rows([0, 0, 1, 2], [1, 4, 0, 3], fp=[10, 12, 11, 13])  # labels right, payloads swapped
    found = check_rows(exp, swapped, expert_base=0)
    assert [f[0] for f in found] == ["order"] and found[0][4] == 4  # names the first wrong row's token
    corrupt = _rows([0, 0, 1, 2], [1, 4, 0, 3], fp=[10, 11, 99, 13])
    assert [(f[0], f[3], f[4]) for f in check_rows(exp, corrupt, expert_base=0)] == [("payload", 1, 0)]
    # a row that carries another co-hosted rank's expected bits was swapped, not corrupted
    stray = _rows([0, 0, 1, 2], [1, 4, 0, 3], fp=[10, 11, 77, 13])
    assert check_rows(exp, stray, expert_base=0, known_fps=frozenset({77}))[0][0] == "order"
    assert check_rows(exp, exp, expert_base=0) == [] and check_counts(exp, exp, expert_base=0) == []


def test_ll_sets_ignore_order_but_not_membership() -> None:
    exp = {"counts": np.array([2, 1]), 0: {(0, 1): 5, (1, 2): 6}, 1: {(1, 0): 7}}
    shuffled = {"counts": np.array([2, 1]), 0: {(1, 2): 6, (0, 1): 5}, 1: {(1, 0): 7}}
    assert check_ll(exp, shuffled, expert_base=4) == []
    moved = {"counts": np.array([2, 1]), 0: {(0, 1): 5, (1, 3): 6}, 1: {(1, 0): 7}}
    (kind, _, _, src, tok, expert, _), = check_ll(exp, moved, expert_base=4)
    assert (kind, src, tok, expert) == ("layout", 1, 2, 4)
    bad = {"counts": np.array([2, 1]), 0: {(0, 1): 5, (1, 2): 6}, 1: {(1, 0): 8}}
    assert check_ll(exp, bad, expert_base=4)[0][0] == "payload"
    assert check_ll(exp, {"counts": np.array([1, 1]), 0: {}, 1: {}}, expert_base=4)[0][0] == "count"


def test_first_divergence_is_earliest_call_then_own_error_then_rank() -> None:
    d = dict(step=0, layer=0, op="combine", physical=0, expected="", detail="")
    divs = [dict(d, call=3, rank=0, kind="payload", got=""),
            dict(d, call=2, rank=0, kind="error", got="RuntimeError: Connection closed by peer [127.0.0.1]"),
            dict(d, call=2, rank=5, kind="error", got="IndexError: index 9 is out of bounds")]
    assert first_of(divs)["rank"] == 5
    assert first_of([]) is None


def test_synthetic_payload_is_a_function_of_source_and_token_only() -> None:
    key = 12345
    whole = synth_source(key, 3, 10, 256)
    picked = synth_rows(key, torch.tensor([3, 3]), torch.tensor([7, 2]), 256)
    assert torch.equal(picked, whole[[7, 2]]) and whole.dtype == torch.bfloat16
    assert not torch.equal(synth_source(key, 4, 10, 256), whole)  # other source, other rows
    assert not torch.equal(synth_source(key + 1, 3, 10, 256), whole)  # other call, other rows
    assert torch.isfinite(whole.float()).all() and whole.float().abs().max() <= 2
