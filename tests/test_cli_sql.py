"""`epreplay sql RUN "..."` is one read-only query, not a file-system shell (real subprocesses,
a real index): every way out to files, other databases, extensions or several statements is
refused with one line and exit code 2, and leaves nothing on disk, unless --allow-external."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from epreplay.demo.synth import make_synthetic_run
from epreplay.index.build import build_index

SECRET = "s3cr3t-line"


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epreplay", "sql", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def one_line_exit_2(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert SECRET not in proc.stdout + proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sql") / "run"
    make_synthetic_run(path, ranks=2, steps=1, layers=1, tokens=8, experts=4, topk=2, hidden=64,
                       workers=1)
    build_index(path)
    return path


@pytest.fixture()
def outside(tmp_path: Path) -> Path:
    """A directory outside the run, holding one file a query must not read."""
    (tmp_path / "secret.csv").write_text(f"a,b\n{SECRET},1\n")
    return tmp_path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# (id, SQL with {d} = the outside directory, needle in the error line)
ESCAPES = [
    ("copy_to", "COPY (SELECT 42) TO '{d}/out.csv'", "refused COPY"),
    ("export_database", "EXPORT DATABASE '{d}/export'", "refused EXPORT"),
    ("read_csv", "SELECT * FROM read_csv('{d}/secret.csv')", "refused: Permission Error"),
    ("read_text", "SELECT * FROM read_text('{d}/secret.csv')", "refused: Permission Error"),
    ("read_blob", "SELECT * FROM read_blob('{d}/secret.csv')", "refused: Permission Error"),
    ("glob", "SELECT * FROM glob('{d}/*')", "refused: Permission Error"),
    ("copy_in_explain", "EXPLAIN ANALYZE COPY (SELECT 42) TO '{d}/out.csv'", "refused: Permission Error"),
    ("attach", "ATTACH '{d}/new.duckdb' AS other", "refused ATTACH"),
    ("two_statements", "SELECT 1; COPY (SELECT 42) TO '{d}/out.csv'", "refused 2 statements"),
    ("install", "INSTALL httpfs", "refused INSTALL"),
    ("load", "LOAD httpfs", "refused LOAD"),
    ("set_access_back_on", "SET enable_external_access = true", "refused SET"),
    ("delete", "DELETE FROM calls", "read-only"),
]


@pytest.mark.parametrize("sql,needle", [e[1:] for e in ESCAPES], ids=[e[0] for e in ESCAPES])
def test_escape_is_refused_in_one_line_and_writes_nothing(run: Path, outside: Path, sql: str,
                                                          needle: str) -> None:
    before = _digest(run / "index.duckdb")
    line = one_line_exit_2(cli(run, sql.format(d=outside)), needle)
    if "refused" in needle and needle != "refused 2 statements" and "read-only" not in line:
        assert "--allow-external" in line  # the fix is named
    assert sorted(p.name for p in outside.iterdir()) == ["secret.csv"]  # nothing written
    assert _digest(run / "index.duckdb") == before


@pytest.mark.parametrize("sql", ["", ";", "-- x", "  ;; /* nothing */ "])
def test_empty_or_comment_only_sql_is_one_line_exit_2(run: Path, sql: str) -> None:
    one_line_exit_2(cli(run, sql), "no SQL statement", "give one query")


def test_a_select_still_works(run: Path) -> None:
    table = cli(run, "SELECT count(*) AS n FROM calls")
    assert table.returncode == 0, table.stderr
    assert "1 row(s)" in table.stdout
    csv = cli(run, "WITH x AS (SELECT layer FROM expert_load) SELECT DISTINCT layer FROM x;",
              "--format", "csv")
    assert csv.returncode == 0 and csv.stdout.splitlines() == ["layer", "0"], csv.stderr
    raw = subprocess.run([sys.executable, "-m", "epreplay", "sql", str(run), "SELECT 1 AS a", "--format", "csv"],
                         capture_output=True, timeout=60)
    assert raw.stdout == b"a\n1\n", raw.stdout  # \n line ends, as DuckDB's own CLI (not csv's \r\n)


def test_allow_external_reads_and_writes_files_as_the_user(run: Path, outside: Path) -> None:
    helped = subprocess.run([sys.executable, "-m", "epreplay", "sql", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert "this query may read and write files as you" in " ".join(helped.stdout.split())
    got = cli(run, f"SELECT a FROM read_csv('{outside}/secret.csv')", "--allow-external",
              "--format", "csv")
    assert got.returncode == 0 and got.stdout.splitlines() == ["a", SECRET], got.stderr
    wrote = cli(run, f"COPY (SELECT 42 AS x) TO '{outside}/out.csv'", "--allow-external")
    assert wrote.returncode == 0 and (outside / "out.csv").read_text().split() == ["x", "42"]
    # still one statement, still read-only
    one_line_exit_2(cli(run, "SELECT 1; SELECT 2", "--allow-external"), "refused 2 statements")
    one_line_exit_2(cli(run, "DELETE FROM calls", "--allow-external"), "read-only")
