"""The `epreplay` command line: a thin shell over the subcommand modules.

Each subcommand lives in its own module exposing `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int`. Those modules import only argparse-level things at the top, so building the
parser stays instant; torch, duckdb, textual and deep_ep are imported inside `run`.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from epreplay import __version__
from epreplay.errors import UsageError

# subcommand -> module; order is the order of `epreplay --help`.
COMMANDS: dict[str, str] = {
    "demo": "epreplay.cli.cmd_demo",
    "record": "epreplay.capture.cmd_record",
    "merge": "epreplay.cli.cmd_merge",
    "inspect": "epreplay.cli.cmd_inspect",
    "repair": "epreplay.cli.cmd_repair",
    "index": "epreplay.cli.cmd_index",
    "stats": "epreplay.cli.cmd_stats",
    "sql": "epreplay.cli.cmd_sql",
    "replay": "epreplay.replay.cmd_replay",
    "diff": "epreplay.cli.cmd_diff",
    "tui": "epreplay.tui.cmd_tui",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as one line and exit code 2 (its own default code)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"epreplay: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="epreplay",
        description="Record, index, replay and inspect the DeepEP traffic of expert-parallel MoE runs.",
    )
    parser.add_argument("--version", action="version", version=f"epreplay {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # a subcommand not built yet is simply absent
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        cmd.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show tracebacks for errors")
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        rc = int(args._run(args) or 0)
        sys.stdout.flush()  # a reader that left (`| head`) shows up here, handled below
        return rc
    except UsageError as exc:
        if args.debug:
            raise
        print(f"epreplay {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("epreplay: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # before `Exception`, which it is
        # `epreplay stats RUN | head`: the reader left; say nothing more (stdout is gone).
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # noqa: BLE001 - only a damaged index file is ours to explain
        if args.debug or not _damaged_index(exc):
            raise
        run = getattr(args, "run", None) or "RUN"
        print(f"epreplay {args.command}: {run}/index.duckdb is damaged ({str(exc).splitlines()[0][:160]}); "
              f"it is derived from the shards: rebuild it with 'epreplay index {run} --force'",
              file=sys.stderr)
        return 2


def _damaged_index(exc: BaseException) -> bool:
    """A DuckDB error that says its database file is corrupt (a flipped or cut index.duckdb)."""
    kind = type(exc)
    return kind.__module__.split(".")[0].lstrip("_") == "duckdb" and any(
        word in str(exc) for word in ("Corrupt", "corrupt", "checksum", "not a valid DuckDB"))


if __name__ == "__main__":
    raise SystemExit(main())
