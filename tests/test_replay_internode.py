"""Replay of a recording made above 8 ranks, where DeepEP uses its internode path: a 16-rank
(2-node) job of real gloo processes around the emulated Buffer, whose dispatch handles are
DeepEP's 10-tuple internode handles. Such a handle carries no source token index, so the records
hold none (no recv_src_idx_N, no rank_prefix_matrix_RR); replay derives every received row's
(source rank, source token) from the senders' recorded routing and checks it row by row, on 8,
4, 2 and 1 processes (all intranode on the replay side)."""
from __future__ import annotations

from pathlib import Path

import pytest

from epreplay.format.records import Op
from epreplay.format.run import RunDir
from epreplay.replay import replay_run

WORLD = 16


@pytest.fixture(scope="module")
def recorded16(tmp_path_factory) -> Path:
    from epreplay.launch import run_ranks
    from test_replay import _workload  # the every-op workload: payload on step 0, none on step 1

    run = tmp_path_factory.mktemp("internode") / "run16"
    run_ranks(_workload, WORLD, str(run), timeout=300, pg_timeout_s=240)
    return run


@pytest.mark.slow
def test_records_above_8_ranks_carry_internode_handles(recorded16: Path) -> None:
    from epreplay.format.shard import open_shard

    with open_shard(RunDir(recorded16).shard_path(3)) as scan:
        disp = list(scan.records([Op.DISPATCH]))
    assert disp and all(r.meta.get("handle_len") == 10 for r in disp)
    for r in disp:
        assert "recv_src_idx_N" not in r.arrays and "rank_prefix_matrix_RR" not in r.arrays
        assert r.arrays["recv_tokens_per_rank_R"].shape == (WORLD,)
        assert int(r.arrays["recv_tokens_per_rank_R"].sum()) == len(r.arrays["recv_x_fp_N"])


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [8, 4, 2, 1])
def test_16_rank_recording_replays_on_fewer_processes(recorded16: Path, ranks: int) -> None:
    report = replay_run(recorded16, ranks, call_timeout=120, index=False, write=False)
    assert report.divergences == 0, report.divergence_list[:3]
    assert report.exit_code == 0 and not report.skipped
    assert report.calls_by_op == {"layout": 2, "dispatch": 2, "cached_dispatch": 2, "combine": 2,
                                  "ll_dispatch": 2, "ll_combine": 2}
    assert report.plan["virtual_per_physical"] == WORLD // ranks


@pytest.mark.slow
def test_derived_rows_are_checked_row_by_row(recorded16: Path) -> None:
    """Two received rows swapped on physical rank 1 (virtual ranks 2, 3 on 8 processes): the
    derived row identities catch it as an order divergence at that dispatch."""
    from epreplay.emulate.faults import Fault

    report = replay_run(recorded16, 8, call_timeout=120, index=False, write=False,
                        fault=Fault(kind="swap_rows", rank=1, op="dispatch", call=0, row=0, row2=1))
    first = report.first_divergence
    assert report.exit_code == 1 and first is not None, report.divergence_list[:3]
    assert (first["kind"], first["op"], first["step"], first["physical"]) == ("order", "dispatch", 0, 1)
    assert first["rank"] in (2, 3)


@pytest.mark.slow
def test_synthetic_internode_run_replays_with_narrow_payload(tmp_path: Path) -> None:
    """A 32-rank synthetic recording (epreplay.demo.synth: internode-shaped dispatch records, H=7168)
    replayed on 4 processes with 128-wide synthetic rows (--hidden): routing, counts and row
    identities exactly, at a fraction of the memory."""
    from epreplay.demo.synth import make_synthetic_run

    run = tmp_path / "synth32"
    make_synthetic_run(run, ranks=32, steps=1, layers=1, tokens=24, experts=64, topk=4,
                       decode_steps=1, decode_tokens=24, workers=1)
    from epreplay.format.shard import open_shard

    with open_shard(RunDir(run).shard_path(9)) as scan:
        rec = next(scan.records([Op.DISPATCH]))
    assert rec.meta["handle_len"] == 10 and "recv_src_idx_N" not in rec.arrays
    report = replay_run(run, 4, call_timeout=120, index=False, write=False, hidden=128)
    assert report.divergences == 0, report.divergence_list[:3]
    assert report.calls_by_op == {"dispatch": 1, "combine": 1, "ll_dispatch": 1, "ll_combine": 1}
    assert report.hidden == 128 and len(report.peak_rss_mb) == 4 and min(report.peak_rss_mb) > 0


def test_hidden_option_refuses_what_it_cannot_do(recorded16: Path) -> None:
    from epreplay.errors import UsageError

    with pytest.raises(UsageError, match="--hidden 100: must be a positive multiple of 128"):
        replay_run(recorded16, 8, index=False, write=False, hidden=100)
    with pytest.raises(UsageError, match="--hidden 256: recorded payloads have the recorded hidden"):
        replay_run(recorded16, 8, index=False, write=False, hidden=256, payload="recorded")
