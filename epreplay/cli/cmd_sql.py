"""`epreplay sql RUN "SELECT ..."`: one read-only query on the run's index, as a table, CSV or JSON.

The query touches no file and no network unless --allow-external (see epreplay.index.user_sql)."""
from __future__ import annotations

import argparse

HELP = "run read-only SQL on the run's index (tables: runs, shards, calls, expert_load, traffic, ...)"

EPILOG = """tables (see epreplay/index/schema.sql): runs, shards, calls, events, expert_load,
expert_load_rank, traffic, rank_load, replays, divergences.
examples:
  epreplay sql runs/r1 "SELECT expert, sum(tokens) t FROM expert_load GROUP BY expert ORDER BY t DESC LIMIT 5"
  epreplay sql runs/r1 "SELECT * FROM shards WHERE problem IS NOT NULL" --format csv
one statement per call, read-only; files (COPY, EXPORT, ATTACH, read_csv, glob, ...) and
extensions (INSTALL, LOAD) are refused unless --allow-external.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("run", metavar="RUN", help="run directory")
    parser.add_argument("query", metavar="SQL", help="one SQL statement (read-only)")
    parser.add_argument("--allow-external", action="store_true",
                        help="let the query use files, other databases and extensions (COPY, "
                             "EXPORT, ATTACH, read_csv, glob, INSTALL, ...): this query may read "
                             "and write files as you")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    parser.add_argument("--limit", type=int, default=1000, metavar="N",
                        help="print at most N rows in table format (default 1000)")


def run(args: argparse.Namespace) -> int:
    import sys

    from epreplay.index.queries import open_index

    with open_index(args.run, progress=sys.stderr.isatty()) as ix:
        res = ix.user_sql(args.query, allow_external=args.allow_external)
    _print(res, args)  # a broken pipe (`| head`) is handled once, in epreplay.cli
    return 0


def _print(res, args: argparse.Namespace) -> None:
    import csv
    import json
    import sys

    if args.format == "csv":
        out = csv.writer(sys.stdout, lineterminator="\n")  # as DuckDB's CLI (csv's default is \r\n)
        out.writerow(res.columns)
        out.writerows(res.rows)
    elif args.format == "json":
        json.dump([dict(zip(res.columns, row)) for row in res.rows], sys.stdout, default=str)
        print()
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(*res.columns, show_lines=False)
        for row in res.rows[:args.limit]:
            table.add_row(*("NULL" if v is None else str(v) for v in row))
        console = Console()
        console.print(table)
        more = f" (first {args.limit} shown)" if len(res.rows) > args.limit else ""
        console.print(f"{len(res.rows)} row(s){more}")
