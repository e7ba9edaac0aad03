"""`epreplay index`, `stats` and `sql` as a user runs them (real subprocesses), including every
kind of bad input: exit code 2, one line on stderr, nothing overwritten."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from epreplay.demo.synth import SynthSpec, SynthWriter, create_run, make_synthetic_run
from epreplay.format.records import Manifest
from epreplay.format.run import RunDir
from epreplay.index.build import build_index
from epreplay.index.lock import WriterLock

SHAPE = dict(ranks=4, steps=3, layers=2, tokens=32, experts=16, topk=4)


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epreplay", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("stats")
    a, b = base / "a", base / "b"
    make_synthetic_run(a, **SHAPE, seed=1, straggler_rank=3, workers=1)
    make_synthetic_run(b, **SHAPE, seed=2, workers=1)
    return {"a": a, "b": b, "base": base}


def one_line_exit_2(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow
def test_index_stats_sql(runs) -> None:
    run = runs["a"]
    first = cli("index", run)
    assert first.returncode == 0 and "built" in first.stdout and "token-layer routings" in first.stdout
    assert "up to date" in cli("index", run).stdout
    text = cli("stats", run, "--top", "3")
    assert text.returncode == 0, text.stderr
    for title in ("hottest experts", "most loaded ranks", "imbalance per layer", "stragglers",
                  "capture health"):
        assert title in text.stdout
    d = json.loads(cli("stats", run, "--format", "json", "--layer", "1", "--steps", "0:2").stdout)
    assert d["stragglers"][0]["rank"] == 3  # the planted straggler
    assert len(d["hot_experts"]) == 10 and [x["layer"] for x in d["imbalance"]] == [1]
    total = sum(x["tokens"] for x in d["hot_experts"])
    assert total <= d["total_slots"] == 2 * 4 * 32 * 4  # 2 steps x 4 ranks x 32 tokens x top-4
    csv = cli("sql", run, "SELECT layer, sum(tokens) AS t FROM expert_load GROUP BY layer ORDER BY layer",
              "--format", "csv")
    assert csv.returncode == 0 and csv.stdout.splitlines() == ["layer,t", "0,1536", "1,1536"]  # 3 steps x 4 ranks x 32 x top-4
    table = cli("sql", run, "SELECT count(*) AS n FROM calls")
    assert table.returncode == 0 and "48" in table.stdout  # 4 ranks x 3 steps x 2 layers x 2 ops
    before = digest(run / "index.duckdb")
    one_line_exit_2(cli("sql", run, "DELETE FROM calls"), "read-only")
    one_line_exit_2(cli("sql", run, "SELECT nope FROM calls"), "SQL failed")
    assert digest(run / "index.duckdb") == before


@pytest.mark.slow
def test_bad_input_one_line_exit_2_nothing_overwritten(runs, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    for cmd in ("index", "stats", "sql"):
        extra = ["SELECT 1"] if cmd == "sql" else []
        one_line_exit_2(cli(cmd, plain, *extra), "not a run directory")
        one_line_exit_2(cli(cmd, tmp_path / "missing", *extra), "no such run directory")
    empty = tmp_path / "empty"
    RunDir.create(empty)
    one_line_exit_2(cli("index", empty), "no shards")
    one_line_exit_2(cli("stats", empty), "no shards")

    # a shard of another run mixed in (same rank, other run id); the old index, which no longer
    # describes the shards, is removed rather than left answering as if current (issue 19, #3)
    mixed = tmp_path / "mixed"
    shutil.copytree(runs["a"], mixed)
    build_index(mixed)
    shutil.copy(runs["b"] / "shards" / "rank-00002.eprs", mixed / "shards" / "rank-00002.eprs")
    one_line_exit_2(cli("index", mixed, "--force"), "rank-00002.eprs", "not of this run",
                    "old index was removed")
    one_line_exit_2(cli("stats", mixed), "not of this run")
    assert not (mixed / "index.duckdb").exists()

    # a manifest that does not match its shards
    wrong = tmp_path / "wrong"
    shutil.copytree(runs["a"], wrong)
    rd = RunDir(wrong)
    m = rd.read_manifest()
    rd.write_manifest(Manifest(**{**m.__dict__, "world_size": 2}))
    one_line_exit_2(cli("index", wrong), "world size 2")
    assert not (wrong / "index.duckdb").exists() or digest(wrong / "index.duckdb") == digest(runs["a"] / "index.duckdb")
    rd.write_manifest(Manifest(**{**m.__dict__, "world_size": 8}))
    one_line_exit_2(cli("index", wrong), "world size 8", "does not match")


def test_locked_index(runs, tmp_path: Path) -> None:
    run = tmp_path / "locked"
    shutil.copytree(runs["a"], run)
    build_index(run)
    before = digest(run / "index.duckdb")
    (run / "replays").mkdir()  # a new replay report makes the index stale
    (run / "replays" / "r1.json").write_text(json.dumps({"id": "r1", "divergences": 0}))
    with WriterLock(RunDir(run)):
        one_line_exit_2(cli("index", run, "--force"), "locked by another writer")
        # stats still answers from what is there, and says why it did not update
        proc = cli("stats", run, "--format", "json")
        assert proc.returncode == 0, proc.stderr
        assert "another process is updating" in json.loads(proc.stdout)["note"]
    assert digest(run / "index.duckdb") == before


@pytest.mark.slow
def test_stats_while_a_capture_is_writing(tmp_path: Path) -> None:
    spec = SynthSpec(**SHAPE, seed=5)
    rundir, spec = create_run(tmp_path / "live", spec)
    writer = SynthWriter(rundir.path, spec)
    try:
        writer.write_steps(0, 2)
        d = json.loads(cli("stats", rundir.path, "--format", "json").stdout)
        assert d["run"]["steps"] == 2 and "still writing" in d["note"]
        assert all(s["writer_active"] and s["truncated_at"] is None for s in d["health"]["shards"])
        writer.write_steps(2, 3)
        d = json.loads(cli("stats", rundir.path, "--format", "json").stdout)
        assert d["run"]["steps"] == 3 and d["total_slots"] == 3 * 2 * 4 * 32 * 4
    finally:
        writer.close()
    d = json.loads(cli("stats", rundir.path, "--format", "json").stdout)
    assert d["note"] is None and d["health"]["ok"]


def test_steps_outside_the_run_exit_2(runs) -> None:
    """Issue 20: '--steps 7:9' beyond the run printed empty tables with exit 0."""
    one_line_exit_2(cli("stats", runs["a"], "--steps", "7:9"), "--steps 7:9", "steps 0..2", "0:3")
    one_line_exit_2(cli("stats", runs["a"], "--steps", "5"), "--steps 5", "steps 0..2")
    # a range that overlaps the run is fine: its steps in the range are shown
    part = cli("stats", runs["a"], "--steps", "2:9", "--format", "json")
    assert part.returncode == 0, part.stderr
    assert json.loads(part.stdout)["total_slots"] == 4 * 32 * 4 * 2  # 1 step x 4 ranks x 32 x top-4 x 2 layers


@pytest.mark.slow
def test_stats_and_diff_say_one_imbalance(runs) -> None:
    """`stats`' 'slots per step' and `diff`'s per-layer imbalance are one quantity (expert slots
    per rank, max/mean per step, averaged over steps): the same run gives the same numbers."""
    run = runs["b"]
    d = json.loads(cli("stats", run, "--format", "json").stdout)
    stats_L = {x["layer"]: x["slots_mean_step"] for x in d["imbalance"]}
    diff = cli("diff", run, run, "--format", "json")
    assert diff.returncode == 0, diff.stderr
    layers = json.loads(diff.stdout)["layers"]
    got = {x["layer"]: x["imbalance_a"] for x in layers}
    assert set(got) == set(stats_L) and len(got) == SHAPE["layers"]
    for layer, value in got.items():
        assert value == pytest.approx(stats_L[layer], abs=1e-4), (layer, value, stats_L[layer])
