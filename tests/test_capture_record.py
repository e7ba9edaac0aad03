"""`epreplay record -- CMD` on an unmodified DeepEP-style client, and a rank killed with -9."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from epreplay.format.records import Kind, Op
from epreplay.format.run import RunDir
from epreplay.format.shard import open_shard
from epreplay.format.walk import wait_unlocked
from epreplay.launch import RankFailed, run_ranks

# A client written for DeepEP: it imports deep_ep and knows nothing of epreplay's capture.
CLIENT = textwrap.dedent('''
    import sys
    import torch
    from epreplay.launch import run_ranks

    def rank_fn(ctx, steps):
        import deep_ep
        import torch.distributed as dist
        buffer = deep_ep.Buffer(dist.group.WORLD, int(1e8), 0)
        g = torch.Generator().manual_seed(ctx.rank)
        total = 0.0
        for step in range(steps):
            x = torch.randn(32, 64, generator=g).to(torch.bfloat16)
            topk_idx = torch.topk(torch.rand(32, 8, generator=g), 2, dim=1).indices
            topk_weights = torch.rand(32, 2, generator=g)
            n_rank, n_rdma, n_exp, in_rank, _ = buffer.get_dispatch_layout(topk_idx, 8)
            recv_x, _, recv_w, _, handle, _ = buffer.dispatch(
                x, num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma,
                is_token_in_rank=in_rank, num_tokens_per_expert=n_exp,
                topk_idx=topk_idx, topk_weights=topk_weights)
            y, _, _ = buffer.combine(recv_x, handle)
            total += float(y.float().sum())
        return total

    if __name__ == "__main__":
        out = run_ranks(rank_fn, int(sys.argv[1]), int(sys.argv[2]), timeout=120)
        print("client ok", len(out))
        sys.exit(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
''')


def _epreplay(*args: str, env: dict[str, str] | None = None, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epreplay", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_record_captures_unmodified_client_on_four_ranks(tmp_path):
    client = tmp_path / "client.py"
    client.write_text(CLIENT)
    run = tmp_path / "run"
    res = _epreplay("record", "--out", str(run), "--layers-per-step", "1", "--",
                    sys.executable, str(client), "4", "3", "5",
                    env={"EPREPLAY_EMULATE_DEEP_EP": "1"})
    assert res.returncode == 5, res.stderr  # the command's own exit code
    assert "client ok 4" in res.stdout
    shards = RunDir.open(run).shard_paths()
    assert [p.name for p in shards] == [f"rank-{r:05d}.eprs" for r in range(4)]
    for path in shards:
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        with open_shard(path) as scan:
            ops = [e.header.op for e in scan.entries if e.header.kind == Kind.CALL]
            assert ops == [Op.LAYOUT, Op.DISPATCH, Op.COMBINE] * 3
            assert [e.header.step for e in scan.entries] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert oct(run.stat().st_mode & 0o777) == "0o700"
    inspect = _epreplay("inspect", str(run))
    assert inspect.returncode == 0, inspect.stdout + inspect.stderr
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["world_size"] == 4 and sorted(manifest["ranks"]) == ["0", "1", "2", "3"]
    assert {f["writer"] for f in manifest["ranks"].values()} == {"process"}  # the default writer
    assert manifest["num_experts"] == 8 and manifest["topk"] == 2 and manifest["hidden"] == 64
    assert manifest["extra"]["exit_code"] == 5 and manifest["command"][-3:] == ["4", "3", "5"]


def test_record_usage_errors(tmp_path):
    res = _epreplay("record", "--out", str(tmp_path / "r"))
    assert res.returncode == 2 and "put it after '--'" in res.stderr
    res = _epreplay("record", "--out", str(tmp_path / "r2"), "--level", "everything", "--", "true")
    assert res.returncode == 2 and "everything" in res.stderr and "routing" in res.stderr
    (tmp_path / "r3" / "shards").mkdir(parents=True)
    res = _epreplay("record", "--out", str(tmp_path / "r3"), "--", "true")
    assert res.returncode == 2 and "already holds a run" in res.stderr


def _rank_killed(ctx, run_dir: str, victim: int, kill_at: int, steps: int):
    import signal

    import torch
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.emulate import Buffer

    capture.start(run_dir, level="routing", layers_per_step=1)
    buffer = Buffer(dist.group.WORLD)
    done = 0
    try:
        for step in range(steps):
            g = torch.Generator().manual_seed(step * 10 + ctx.rank)
            x = torch.randn(16, 32, generator=g).to(torch.bfloat16)
            idx = torch.topk(torch.rand(16, 12, generator=g), 2, dim=1).indices
            if ctx.rank == victim and step == kill_at:
                # everything recorded so far has left this process for its writer: a kill from
                # here on must lose nothing of it (a real crash may come before the hand-over)
                assert capture.flush(30)
                os.kill(os.getpid(), signal.SIGKILL)
            n_rank, n_rdma, n_exp, in_rank, _ = buffer.get_dispatch_layout(idx, 12)
            recv_x, _, _, _, handle, _ = buffer.dispatch(
                x, num_tokens_per_rank=n_rank, is_token_in_rank=in_rank, num_tokens_per_expert=n_exp,
                topk_idx=idx, topk_weights=torch.rand(16, 2, generator=g))
            buffer.combine(recv_x, handle)
            done += 1
    except Exception:  # noqa: BLE001 - the peer died: this rank stops, as a real job's would
        pass
    capture.stop()
    return done


@pytest.mark.slow
def test_kill_9_loses_only_the_killed_ranks_tail(tmp_path):
    run_dir = str(tmp_path / "run")
    with pytest.raises(RankFailed) as info:
        run_ranks(_rank_killed, 4, run_dir, 1, 4, 8, timeout=90, pg_timeout_s=10, wait_all=True)
    assert set(info.value.errors) == {1}
    shards = {p.name: p for p in RunDir.open(run_dir).shard_paths()}
    assert len(shards) == 4
    for rank in (0, 2, 3):
        with open_shard(shards[f"rank-{rank:05d}.eprs"]) as scan:
            assert scan.complete and not scan.verify()
            calls = [e for e in scan.entries if e.header.kind == Kind.CALL]
            # every call the rank made: 4 whole steps, then the dispatch that failed on the dead peer
            assert len(calls) >= 4 * 3
    # The killed rank's writer process outlives it and writes what it was handed, then exits.
    assert wait_unlocked(shards["rank-00001.eprs"], 30)
    with open_shard(shards["rank-00001.eprs"]) as scan:
        assert not scan.complete and scan.truncated_at is None  # killed between records
        recs = list(scan.records())
        assert [r.header.op for r in recs] == [Op.LAYOUT, Op.DISPATCH, Op.COMBINE] * 4
        assert all(r.arrays["topk_idx_TK"].shape == (16, 2) for r in recs if r.header.op != Op.COMBINE)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert sorted(manifest["ranks"]) == ["0", "2", "3"]  # the killed rank never wrote its facts
    assert np.all([manifest["ranks"][r]["disabled"] is None for r in ("0", "2", "3")])


def _unclosed_shard(run: RunDir, run_id: str, rank: int, world: int, records: int) -> None:
    """A shard as a rank stopped mid-run leaves it: intact records, no footer."""
    from epreplay.format.records import Level, RecordHeader, ShardInfo, Status
    from epreplay.format.shard import ShardWriter

    path = run.shard_path(rank)
    with ShardWriter(path, ShardInfo(run_id, rank, world, 16, 2, 32, Level.ROUTING)) as writer:
        for seq in range(records):
            writer.append(RecordHeader(Kind.CALL, Op.LAYOUT, Level.ROUTING, Status.OK, 0, seq, seq, 0, 4),
                          {"topk_idx_TK": np.zeros((4, 2), np.int64)})
    with open_shard(path) as scan:
        end = scan.entries[-1].end
    os.truncate(path, end)


def test_finish_describes_ranks_that_never_closed_from_their_shards(tmp_path):
    from epreplay.capture.config import CaptureConfig
    from epreplay.capture.manifest import finish, merge, prepare_run, write_rank_facts

    # as `epreplay record` and the demo start a run: the launcher's manifest, world size 0
    config = prepare_run(CaptureConfig.make(tmp_path / "run"), command=["python", "job.py"], fresh=True)
    run = RunDir.open(tmp_path / "run")
    assert run.read_manifest().world_size == 0
    for rank in (0, 1, 2):  # rank 3 of 4 was stopped before it opened its shard
        _unclosed_shard(run, config.run_id, rank, 4, records=5)
    manifest = finish(run, exit_code=130, interrupted=True, wait_s=0)
    assert run.read_manifest() == manifest
    assert manifest.world_size == 4 and (manifest.num_experts, manifest.topk, manifest.hidden) == (16, 2, 32)
    assert manifest.command == ["python", "job.py"]  # the launcher's facts stay
    extra = manifest.extra
    assert extra["interrupted"] is True and extra["exit_code"] == 130
    assert extra["ranks_found"] == [0, 1, 2] and extra["missing_ranks"] == [3]
    assert extra["unclosed_ranks"] == [0, 1, 2]
    assert manifest.ranks["2"]["records"] == 5 and manifest.ranks["2"]["closed"] is False
    # a rank that closes after all: its closing facts replace what its header said
    write_rank_facts(run, 1, {"rank": 1, "world_size": 4, "records": 5, "host": "late"})
    manifest = merge(run)
    assert manifest.ranks["1"] == {"rank": 1, "world_size": 4, "records": 5, "host": "late"}
    assert manifest.world_size == 4 and manifest.ranks["0"]["source"] == "shard header"


def test_record_summary_lists_no_empty_ranks_and_explains_flight_mode(tmp_path):
    res = _epreplay("record", "--out", str(tmp_path / "plain"), "--", sys.executable, "-c", "pass")
    assert res.returncode == 0, res.stderr
    assert "epreplay record: 0 shard(s)" in res.stderr
    assert "capture off on ranks" not in res.stderr and "flight mode" not in res.stderr
    res = _epreplay("record", "--out", str(tmp_path / "flight"), "--flight", "3", "--",
                    sys.executable, "-c", "pass")
    assert res.returncode == 0, res.stderr
    assert "capture off on ranks" not in res.stderr
    # 0 records after a normal exit is what flight mode does: the summary says so
    assert "flight mode (--flight 3) writes records only on a trigger" in res.stderr, res.stderr
    for trigger in ("exception", "hang", "SIGUSR1", "non-finite", str(tmp_path / "flight" / "DUMP")):
        assert trigger in res.stderr
    assert "0 dump(s) happened" in res.stderr
