"""`epreplay tui RUN [RUN_B]`: open the interactive terminal UI on a run (and diff it against RUN_B).

The run's index is built first when it is missing or stale (with a progress bar, before the app
takes the terminal); bad input (no such run, an unreadable run, an index written by another
index format) is one clear line and exit code 2, raised as UsageError before the app starts.
"""
from __future__ import annotations

import argparse

from epreplay.errors import UsageError

HELP = "interactive terminal UI: overview, hot experts, traffic, timeline, divergences, diff"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run directory (index built first if missing)")
    parser.add_argument("run_b", metavar="RUN_B", nargs="?", default=None,
                        help="a second run to compare against (enables the Diff pane)")
    parser.add_argument("--no-build", action="store_true",
                        help="do not build or update the index; fail if there is none")


def prepare(path: str, *, build: bool = True) -> None:
    """Make sure RUN has a readable index of the current format (UsageError otherwise)."""
    from epreplay.format.run import RunDir

    run = RunDir.open(path)
    if build:
        from epreplay.index import build as index_mod

        index_mod.ensure_index(run.path, progress=True)
    if not run.index_path.exists():
        raise UsageError(f"{run.path}: no index; build it with 'epreplay index {run.path}'")
    check_index_version(run.index_path)


def check_index_version(index_path) -> None:
    """Refuse an index written by another index format with the command that rebuilds it."""
    import duckdb

    try:
        from epreplay.index.build import INDEX_VERSION  # type: ignore[attr-defined]
    except ImportError:  # the builder names no version: nothing to compare against
        return
    try:
        con = duckdb.connect(str(index_path), read_only=True)
    except duckdb.Error as exc:
        raise UsageError(f"{index_path}: unreadable index ({str(exc).splitlines()[0]}); rebuild it with "
                         f"'epreplay index {index_path.parent} --force'") from None
    try:
        row = con.execute("SELECT index_version FROM runs LIMIT 1").fetchone()
    except duckdb.Error:
        row = None
    finally:
        con.close()
    found = row[0] if row else None
    if found != INDEX_VERSION:
        raise UsageError(f"{index_path}: index format {found if found is not None else 'unknown'}, this epreplay "
                         f"reads format {INDEX_VERSION}; rebuild it with 'epreplay index {index_path.parent} --force'")


def run(args: argparse.Namespace) -> int:
    from epreplay.format.run import RunDir

    prepare(args.run, build=not args.no_build)
    if args.run_b is not None:
        RunDir.open(args.run_b)  # fail before the app starts; the diff reads its shards lazily
    from epreplay.tui.app import run_app

    return run_app(args.run, args.run_b)

