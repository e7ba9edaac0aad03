"""`epreplay inspect` and `epreplay repair` as a user runs them: real files, real subprocesses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from epreplay.format.records import Kind, Level, Op, RecordHeader, ShardInfo, Status
from epreplay.format.run import RunDir
from epreplay.format.shard import ShardWriter, open_shard

OPS = [Op.LAYOUT, Op.DISPATCH, Op.COMBINE]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epreplay", *args], capture_output=True, text=True,
                          timeout=120)


def write(path: Path, rank: int, n: int = 6) -> None:
    rng = np.random.default_rng(rank)
    with ShardWriter(path, ShardInfo("run-cli", rank, 2, 32, 4, 16, Level.ROUTING)) as w:
        for seq in range(n):
            op = OPS[seq % 3]
            w.append(RecordHeader(Kind.CALL, op, Level.ROUTING, Status.OK, 0, seq, seq // 3, seq % 3, 5),
                     {"topk_idx_TK": rng.integers(-1, 32, (5, 4)),
                      "topk_weights_TK": rng.random((5, 4), dtype=np.float32)})
        w.append(RecordHeader(Kind.EVENT, 0, Level.ROUTING, Status.OK, 0, n, -1, -1, 0), {},
                 {"reason": "dropped", "dropped": 3})


@pytest.fixture()
def run_dir(tmp_path: Path) -> tuple[RunDir, int]:
    """A run with rank 0 complete and rank 1 cut inside its fourth record; returns the cut offset."""
    run = RunDir.create(tmp_path / "RUN")
    write(run.shard_path(0), 0)
    write(run.shard_path(1), 1)
    with open_shard(run.shard_path(1)) as scan:
        fourth = scan.entries[3]
    os.truncate(run.shard_path(1), fourth.data_offset + 7)
    return run, fourth.offset


def assert_one_clean_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr


def test_inspect_run_shows_header_counts_and_truncation(run_dir) -> None:
    run, cut_at = run_dir
    proc = cli("inspect", str(run.path))
    assert proc.returncode == 1, proc.stderr  # a damaged shard: non-zero, but a report not an error
    out = proc.stdout
    assert "run-cli" in out and "rank 0/2" in out and "rank 1/2" in out
    assert "layout 2  dispatch 2  combine 2" in out  # rank 0: 6 calls, event counted apart
    assert "6 calls, 1 events" in out and "dropped 1  (capture dropped 3 calls)" in out
    assert f"TRUNCATED at byte {cut_at}" in out and "3 records intact" in out
    assert "health: 1 complete, 1 truncated" in out


def test_inspect_json_and_corrupt_record(tmp_path: Path) -> None:
    path = tmp_path / "rank-00000.eprs"
    write(path, 0)
    proc = cli("inspect", str(path), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout)
    shard = body["shards"][0]
    assert body["healthy"] and shard["health"] == "complete" and shard["verified"]
    assert shard["ops"]["dispatch"] == 2 and shard["events"] == 1 and shard["info"]["rank"] == 0
    assert shard["event_reasons"] == {"dropped": 1} and shard["dropped"] == 3
    with open_shard(path) as scan:
        second = scan.entries[1]
    proc = cli("inspect", str(path), "--list", "--limit", "2")
    assert proc.returncode == 0 and f"{second.offset:>10} call  dispatch" in proc.stdout
    assert "... 5 more (--limit 0 lists all)" in proc.stdout
    proc = cli("inspect", str(path), "--record", str(second.offset), "--format", "json")
    dump = json.loads(proc.stdout)
    assert dump["header"]["op"] == "dispatch" and dump["arrays"]["topk_idx_TK"]["shape"] == [5, 4]
    assert dump["arrays"]["topk_idx_TK"]["dtype"] == "int64" and dump["arrays"]["topk_idx_TK"]["min"] >= -1
    assert_one_clean_line(cli("inspect", str(path), "--record", str(second.offset + 1)),
                          f"no intact record starts at byte {second.offset + 1}")
    data = bytearray(path.read_bytes())
    data[second.data_offset + 3] ^= 0x01
    path.write_bytes(bytes(data))
    proc = cli("inspect", str(path), "--format", "json")
    shard = json.loads(proc.stdout)["shards"][0]
    assert proc.returncode == 1 and shard["health"] == "corrupt"
    assert shard["corrupt"][0]["offset"] == second.offset


def test_repair_keeps_backup_fixes_and_then_leaves_alone(run_dir) -> None:
    run, cut_at = run_dir
    damaged = run.shard_path(1).read_bytes()
    proc = cli("repair", str(run.path))
    assert proc.returncode == 0, proc.stderr
    assert "rank-00000.eprs: healthy, nothing changed" in proc.stdout
    assert "rank-00001.eprs: repaired: kept 3 intact records" in proc.stdout
    assert "manifest.json: was missing; rebuilt" in proc.stdout
    bak = run.shard_path(1).with_name("rank-00001.eprs.bak")
    assert bak.read_bytes() == damaged
    with open_shard(run.shard_path(1)) as scan:
        assert scan.complete and len(scan.entries) == 3 and scan.verify() == []
    assert run.read_manifest().run_id == "run-cli"
    assert cli("inspect", str(run.path)).returncode == 0
    repaired = run.shard_path(1).read_bytes()
    proc = cli("repair", str(run.shard_path(1)))
    assert proc.returncode == 0 and "healthy, nothing changed" in proc.stdout
    assert run.shard_path(1).read_bytes() == repaired
    run.shard_path(1).write_bytes(damaged)  # damaged again while a .bak exists: refuse, touch nothing
    proc = cli("repair", str(run.shard_path(1)))
    assert_one_clean_line(proc, "rank-00001.eprs.bak already exists", "move it away")
    assert run.shard_path(1).read_bytes() == damaged and bak.read_bytes() == damaged


@pytest.mark.parametrize("command", ["inspect", "repair"])
def test_bad_input_is_one_line_exit_2(tmp_path: Path, command: str) -> None:
    (tmp_path / "junk.eprs").write_bytes(b"definitely not a shard\n" * 3)
    (tmp_path / "plain").mkdir()
    assert_one_clean_line(cli(command, str(tmp_path / "missing")), "no such file or directory")
    assert_one_clean_line(cli(command, str(tmp_path / "junk.eprs")), "not an epreplay shard")
    assert_one_clean_line(cli(command, str(tmp_path / "plain")), "not a run directory")


def test_live_shard_reads_as_writing_and_repair_refuses(tmp_path: Path) -> None:
    path = tmp_path / "rank-00000.eprs"
    with ShardWriter(path, ShardInfo("run-cli", 0, 1)) as w:
        w.append(RecordHeader(Kind.CALL, Op.LAYOUT, Level.ROUTING, Status.OK, 0, 0, 0, 0, 1),
                 {"topk_idx_TK": np.zeros((1, 4), np.int64)})
        proc = cli("inspect", str(path))
        assert proc.returncode == 0 and "being written by a live process (1 records so far)" in proc.stdout
        assert_one_clean_line(cli("repair", str(path)), "still writing this shard")
    assert "complete" in cli("inspect", str(path)).stdout


def test_repair_rebuilds_a_world_size_0_manifest_and_keeps_the_old_one(run_dir) -> None:
    from epreplay.format.records import Manifest

    run, _ = run_dir  # rank 1's shard cut mid-record, as an interrupted capture leaves it
    # what a capture stopped before any rank closed leaves: the launcher's manifest, world size 0
    old = Manifest(run_id="run-cli", created="2026-01-01T00:00:00Z", world_size=0,
                   command=["python", "train.py"], extra={"layers_per_step": 3})
    run.write_manifest(old)
    stale = run.manifest_path.read_bytes()
    assert ("manifest.json says world size 0, but the shards say 2; 'epreplay repair "
            f"{run.path}' rebuilds it") in cli("inspect", str(run.path)).stdout
    proc = cli("repair", str(run.path))
    assert proc.returncode == 0, proc.stderr
    bak = run.manifest_path.with_name("manifest.json.bak")
    assert (f"manifest.json: said world size 0, but the shards say 2; rebuilt from 2 shard "
            f"header(s); the old one kept as {bak}") in proc.stdout
    assert bak.read_bytes() == stale
    manifest = run.read_manifest()
    assert manifest.world_size == 2 and (manifest.num_experts, manifest.topk, manifest.hidden) == (32, 4, 16)
    assert manifest.ranks["0"]["records"] == 7 and manifest.ranks["1"]["records"] == 3
    assert manifest.command == ["python", "train.py"] and manifest.extra["layers_per_step"] == 3
    assert manifest.extra["ranks_found"] == [0, 1] and manifest.extra["missing_ranks"] == []
    inspect = cli("inspect", str(run.path)).stdout
    assert "world 2" in inspect and "manifest.json says" not in inspect
    # a manifest that agrees with its shards is left alone
    rebuilt = run.manifest_path.read_bytes()
    proc = cli("repair", str(run.path))
    assert proc.returncode == 0 and "manifest.json" not in proc.stdout
    assert run.manifest_path.read_bytes() == rebuilt
    # wrong again while a backup exists: refuse, naming it; nothing is overwritten
    run.write_manifest(old)
    assert_one_clean_line(cli("repair", str(run.path)), "manifest.json.bak already exists", "move it away")
    assert bak.read_bytes() == stale and run.manifest_path.read_bytes() == stale


def test_a_reader_that_left_is_no_traceback(run_dir) -> None:
    """`epreplay inspect RUN | head -1`: the pipe's reader is gone before the output is flushed."""
    run, _ = run_dir
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write fails with EPIPE, as after `head` exits
    try:
        proc = subprocess.run([sys.executable, "-m", "epreplay", "inspect", str(run.path), "--list"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
