"""Issue 19 "Trust", findings 2, 3, 5, 6: the index never presents figures of bytes that are no
longer on disk, a failed re-index leaves nothing answering as current, a run's files stay inside
its directory, and odd entries in shards/ are named. Real runs, the real CLI in subprocesses."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from epreplay.demo.synth import make_synthetic_run
from epreplay.errors import UsageError
from epreplay.format.run import RunDir

SHAPE = dict(ranks=4, steps=2, layers=2, tokens=16, experts=8, topk=2, seed=3, workers=1)
TOTAL = "SELECT sum(tokens) AS t FROM expert_load"
HEALTHY = "every shard complete"


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epreplay", *map(str, args)], capture_output=True,
                          text=True, timeout=60)


def one_line_exit_2(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trust") / "run"
    make_synthetic_run(path, **SHAPE)
    return path


@pytest.fixture
def run(pristine: Path, tmp_path: Path) -> Path:
    """A fresh indexed copy of the run; its total slots are the figure nothing may show stale."""
    dst = tmp_path / "run"
    shutil.copytree(pristine, dst)
    assert cli("index", dst).returncode == 0
    return dst


def flip(path: Path, offset: int, *, keep_mtime: bool) -> None:
    st = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


def total(run: Path) -> str:
    proc = cli("sql", run, TOTAL, "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# -- finding 2: a shard damaged after indexing
@pytest.mark.parametrize("keep_mtime", [False, True])
def test_byte_flip_after_indexing_is_noticed(run: Path, keep_mtime: bool) -> None:
    shard = RunDir(run).shard_path(1)
    size = shard.stat().st_size
    # mtime changed: anywhere (the middle); mtime kept: inside the footer window the stamp covers
    flip(shard, size // 2 if not keep_mtime else size - 40, keep_mtime=keep_mtime)
    idx = cli("index", run)
    assert idx.returncode == 0 and "up to date" not in idx.stdout, idx.stdout
    stats = cli("stats", run)
    assert stats.returncode == 0, stats.stderr
    assert HEALTHY not in stats.stdout and "rank 1" in stats.stdout, stats.stdout


def test_stats_and_sql_reread_a_changed_shard_without_index(run: Path) -> None:
    before = total(run)
    shard = RunDir(run).shard_path(2)
    flip(shard, shard.stat().st_size // 2, keep_mtime=False)
    stats = cli("stats", run)  # no `epreplay index` in between
    assert stats.returncode == 0 and HEALTHY not in stats.stdout and "rank 2" in stats.stdout
    assert total(run) != before  # rank 2's records after the flip are no longer counted


# -- finding 3: a failed re-index
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_failed_reindex_leaves_no_healthy_old_index(run: Path, damage: str) -> None:
    before = total(run).splitlines()[1]
    shard = RunDir(run).shard_path(1)
    if damage == "flip":
        flip(shard, 20, keep_mtime=True)  # inside the header's JSON: its CRC fails
    else:
        os.truncate(shard, 10)
    one_line_exit_2(cli("index", run, "--force"), "rank-00001.eprs", "epreplay ")
    for args in (("stats", run), ("sql", run, TOTAL), ("index", run)):
        proc = cli(*args)
        one_line_exit_2(proc, "rank-00001.eprs", "epreplay ")
        assert HEALTHY not in proc.stdout and before not in proc.stdout


# -- finding 5: runs confined to their directory
def test_shard_symlink_leaving_the_run_is_refused(run: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.eprs"
    shard = RunDir(run).shard_path(1)
    shutil.copy(shard, outside)
    shard.unlink()
    shard.symlink_to(outside)
    for args in (("index", run, "--force"), ("stats", run), ("sql", run, TOTAL)):
        one_line_exit_2(cli(*args), "rank-00001.eprs", "outside the run")
    ins = cli("inspect", run)
    assert ins.returncode == 1 and "outside the run" in ins.stdout and "Traceback" not in ins.stderr


def test_shard_symlink_to_etc_passwd_prints_no_content(run: Path) -> None:
    secret = Path("/etc/passwd").read_bytes()[:12]
    shard = RunDir(run).shard_path(1)
    shard.unlink()
    shard.symlink_to("/etc/passwd")
    for args in (("inspect", run), ("inspect", shard), ("stats", run)):
        proc = cli(*args)
        assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr
        out = proc.stdout + proc.stderr
        assert secret.hex() not in out and secret[:8].hex() not in out and secret[:4].hex() not in out


def test_replays_symlink_leaving_the_run_is_refused(run: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "replays").symlink_to(elsewhere)
    with pytest.raises(UsageError, match="outside the run"):
        RunDir(run).replays_dir  # noqa: B018 -- where `epreplay replay` writes its report
    one_line_exit_2(cli("index", run, "--force"), "replays", "outside the run")
    # replay refuses before any process starts (not after replaying, when it writes the report)
    one_line_exit_2(cli("replay", run, "--ranks", "1"), "replays", "outside the run")
    assert list(elsewhere.iterdir()) == []


# -- finding 6: non-regular files in shards/, rank 0 missing
@pytest.mark.parametrize("kind", ["directory", "FIFO"])
def test_non_regular_shard_is_named(run: Path, kind: str) -> None:
    shard = RunDir(run).shard_path(1)
    shard.unlink()
    shard.mkdir() if kind == "directory" else os.mkfifo(shard)
    ins = cli("inspect", run)
    assert ins.returncode == 1 and "rank-00001.eprs" in ins.stdout and kind in ins.stdout, ins.stdout
    one_line_exit_2(cli("stats", run), "rank-00001.eprs", kind)


def test_rank_0_missing_is_counted(run: Path) -> None:
    RunDir(run).shard_path(0).unlink()
    stats = cli("stats", run)
    assert stats.returncode == 0 and "1 rank with no shard (rank 0)" in stats.stdout, stats.stdout
    ins = cli("inspect", run)
    assert ins.returncode == 1 and "1 rank with no shard (rank 0)" in ins.stdout, ins.stdout
