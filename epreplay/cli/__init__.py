"""epreplay.cli: the `epreplay` console script (main) and the shells of its subcommands (cmd_*).

Each cmd_* module exposes HELP, add_arguments(parser) and run(args) -> int and imports heavy
things (torch, duckdb, textual) inside run, so `epreplay --help` stays instant. The record,
replay and tui commands live with their packages (capture.cmd_record, replay.cmd_replay,
tui.cmd_tui).
May import: anything in epreplay. Nothing in epreplay imports it.
"""
from __future__ import annotations

from epreplay.cli.main import build_parser, main

__all__ = ["main", "build_parser"]
