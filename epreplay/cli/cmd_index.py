"""`epreplay index RUN [--force]`: build or update RUN/index.duckdb from the run's shards."""
from __future__ import annotations

import argparse

HELP = "build or update the run's DuckDB index (RUN/index.duckdb) from its shards"

EPILOG = """examples:
  epreplay index runs/r1             # index what is new since the last time
  epreplay index runs/r1 --force     # rebuild from scratch
  epreplay sql runs/r1 "SELECT layer, max(tokens) FROM expert_load GROUP BY layer"
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("run", metavar="RUN", help="run directory (manifest.json + shards/)")
    parser.add_argument("--force", action="store_true", help="rebuild the index from scratch")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="processes indexing shards (default: CPU count, at most 8)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import sys

    from epreplay.errors import UsageError
    from epreplay.index.build import build_index

    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers {args.workers}: need at least 1")
    res = build_index(args.run, force=args.force, progress=not args.quiet and sys.stderr.isatty(),
                      workers=args.workers)
    if res.action == "fresh":
        print(f"index up to date: {res.path}")
        return 0
    size = res.path.stat().st_size / 1e6
    rate = res.routings / res.seconds / 1e6 if res.seconds else 0.0
    print(f"{res.action} {res.path} ({size:.1f} MB): {res.shards_indexed} shard(s), "
          f"{res.records} new record(s), {res.routings} token-layer routings in {res.seconds:.2f} s "
          f"({rate:.2f} M/s)")
    for line in res.problems:
        print(f"warning: {line}")
    return 0
