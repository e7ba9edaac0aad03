"""Flight mode and the recorder's failure handling on real gloo ranks: a planted hang, SIGUSR1,
non-finite payloads, exceptions inside dispatch, and a full disk."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from epreplay.format.records import Kind, Op, Status
from epreplay.format.run import RunDir
from epreplay.format.shard import open_shard
from epreplay.launch import run_ranks

HANG_TIMEOUT = 1.0
SLEEP_S = 5.0


def _step(buffer, rank: int, step: int, *, nan: bool = False):
    import torch

    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(16, 32, generator=g).to(torch.bfloat16)
    if nan:
        x[3, 5] = float("nan")
    idx = torch.topk(torch.rand(16, 12, generator=g), 2, dim=1).indices
    w = torch.rand(16, 2, generator=g)
    n_rank, n_rdma, n_exp, in_rank, _ = buffer.get_dispatch_layout(idx, 12)
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma, is_token_in_rank=in_rank,
        num_tokens_per_expert=n_exp, topk_idx=idx, topk_weights=w)
    y, _, _ = buffer.combine(recv_x, handle)
    return idx, y


def _raising_buffer_class(raise_call: int):
    """An emulated Buffer whose `raise_call`-th dispatch raises *inside* the hooked call."""
    from epreplay.emulate import Buffer

    class Raising(Buffer):
        calls = 0

        def dispatch(self, *args, **kwargs):
            n = Raising.calls
            Raising.calls += 1
            if n == raise_call:
                raise RuntimeError("DeepEP error: timeout (dispatch CPU)")
            return super().dispatch(*args, **kwargs)

    return Raising


def _rank_hang(ctx, run_dir: str):
    import torch.distributed as dist

    from epreplay import capture

    from epreplay.emulate import faults
    from epreplay.emulate import Buffer

    capture.start(run_dir, level="routing", flight=2, hang_timeout=HANG_TIMEOUT, layers_per_step=1)
    # rank 1 sleeps inside its 4th dispatch; its peers wait for it inside theirs
    faults.install(faults.Fault("delay", rank=1, op="dispatch", call=3, delay_s=SLEEP_S))
    buffer = Buffer(dist.group.WORLD)
    idx_by_step = [_step(buffer, ctx.rank, s)[0].numpy() for s in range(5)]
    capture.stop()
    return idx_by_step


@pytest.mark.slow
def test_planted_hang_dumps_every_rank_with_the_hung_routing(tmp_path):
    run_dir = tmp_path / "run"
    idx = run_ranks(_rank_hang, 4, str(run_dir), timeout=90)
    for path in RunDir.open(run_dir).shard_paths():
        rank = RunDir(run_dir).rank_of(path)
        with open_shard(path) as scan:
            assert scan.complete
            recs = list(scan.records(kinds=(Kind.CALL, Kind.EVENT)))
        events = [r for r in recs if r.header.kind == Kind.EVENT and r.meta.get("dump")]
        assert events and events[0].meta["reason"] == "hang", [e.meta for e in events]
        hung = [r for r in recs if r.header.status == Status.HUNG]
        assert len(hung) == 1 and hung[0].header.op == Op.DISPATCH and hung[0].header.step == 3
        np.testing.assert_array_equal(hung[0].arrays["topk_idx_TK"], idx[rank][3])
        waited = (events[0].header.start_ns - hung[0].header.start_ns) / 1e9
        assert HANG_TIMEOUT <= waited < HANG_TIMEOUT + 3.0
        # the ring held the previous 2 steps: they are in the dump, before the hang
        steps = sorted({r.header.step for r in recs if r.header.kind == Kind.CALL})
        assert steps[0] >= 1 and 3 in steps
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert all(f["dumps"] and f["dumps"][0]["reason"] == "hang" for f in manifest["ranks"].values())


def _rank_triggers(ctx, run_dir: str):
    import signal

    import torch.distributed as dist

    from epreplay import capture

    capture.start(run_dir, level="fingerprints", flight=3, hang_timeout=0, layers_per_step=1)
    cls = _raising_buffer_class(raise_call=8)
    capture.install(cls)
    buffer = cls(dist.group.WORLD)
    seen = None
    for s in range(9):
        if s == 2 and ctx.rank == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
        if s in (3, 6):
            time.sleep(0.8)  # let every watchdog see the marker before the next trigger
            dist.barrier()
        try:
            _step(buffer, ctx.rank, s, nan=(s == 5 and ctx.rank == 1))
        except RuntimeError as exc:
            seen = str(exc)
    time.sleep(0.8)
    capture.stop()
    return seen


@pytest.mark.slow
def test_sigusr1_nonfinite_and_exception_dump_all_ranks(tmp_path):
    run_dir = tmp_path / "run"
    seen = run_ranks(_rank_triggers, 2, str(run_dir), timeout=90)
    assert seen == ["DeepEP error: timeout (dispatch CPU)"] * 2  # the caller's own exception
    for path in RunDir.open(run_dir).shard_paths():
        with open_shard(path) as scan:
            recs = list(scan.records(kinds=(Kind.CALL, Kind.EVENT)))
        reasons = [r.meta["reason"] for r in recs if r.header.kind == Kind.EVENT and r.meta.get("dump")]
        assert reasons == ["sigusr1", "nonfinite", "exception"], reasons
        errors = [r for r in recs if r.header.status == Status.ERROR]
        assert len(errors) == 1 and "timeout (dispatch CPU)" in errors[0].meta["error"]
        assert errors[0].header.op == Op.DISPATCH and "topk_idx_TK" in errors[0].arrays
        nonfinite = [r for r in recs if r.meta.get("nonfinite")]
        assert scan.info.rank != 1 or any("x_fp_T" in r.meta["nonfinite"] for r in nonfinite)


def _rank_told_first(ctx, run_dir: str, writer: str):
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.capture import session

    capture.start(run_dir, level="routing", flight=2, hang_timeout=0, layers_per_step=1, writer=writer)
    cls = _raising_buffer_class(raise_call=4)
    capture.install(cls)
    buffer = cls(dist.group.WORLD)
    for s in range(4):
        _step(buffer, ctx.rank, s)
    # another rank's exception reached this one first (its watchdog read the other's marker) ...
    session.recorder().trigger("exception", "rank 1: dispatch seq 4", origin=1, propagate=False)
    try:  # ... and this rank's own exception comes a moment later, in the same incident
        _step(buffer, ctx.rank, 4)
    except RuntimeError:
        pass
    capture.stop()


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_an_exception_just_after_another_ranks_dump_keeps_its_record(tmp_path, writer):
    """One incident, one dump EVENT: the rank's own ERROR record, which reached the flight ring
    after the other rank's trigger dumped it, still goes to the shard (it was lost)."""
    run_dir = tmp_path / "run"
    run_ranks(_rank_told_first, 1, str(run_dir), writer, timeout=60)
    (path,) = RunDir.open(run_dir).shard_paths()
    with open_shard(path) as scan:
        recs = list(scan.records(kinds=(Kind.CALL, Kind.EVENT)))
    events = [r for r in recs if r.header.kind == Kind.EVENT and r.meta.get("dump")]
    assert [(e.meta["reason"], e.meta["origin_rank"]) for e in events] == [("exception", 1)]
    errors = [r for r in recs if r.header.status == Status.ERROR]
    assert len(errors) == 1 and "timeout (dispatch CPU)" in errors[0].meta["error"], [r.header for r in recs]
    assert recs.index(errors[0]) > recs.index(events[0])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    (dump,) = manifest["ranks"]["0"]["dumps"]
    assert dump["records"] == sum(r.header.kind == Kind.CALL for r in recs)


def _rank_full_disk(ctx, run_dir: str, limit: int):
    import resource
    import signal

    import torch
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.emulate import Buffer

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death, like ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    capture.start(run_dir, level="payload", layers_per_step=1)
    buffer = Buffer(dist.group.WORLD)
    captured = [_step(buffer, ctx.rank, s)[1] for s in range(12)]
    facts = capture.stop()
    plain = [_step(buffer, ctx.rank, s)[1] for s in range(12)]
    return facts, all(torch.equal(a, b) for a, b in zip(captured, plain))


@pytest.mark.slow
def test_full_disk_turns_capture_off_and_the_job_finishes(tmp_path):
    run_dir = tmp_path / "run"
    out = run_ranks(_rank_full_disk, 2, str(run_dir), 12_000, timeout=90)
    for facts, same in out:
        assert same  # the host job's results are untouched
        assert facts["disabled"] and "too large" in facts["disabled"].lower()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["extra"]["disabled_ranks"] == [0, 1]
    for path in RunDir.open(run_dir).shard_paths():
        with open_shard(path) as scan:
            assert scan.entries  # readable up to the last record that fit
