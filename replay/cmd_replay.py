"""`epreplay replay RUN`: re-run a recorded run's dispatch/combine traffic and verify every call.

Exit codes: 0 OK, 1 divergence, 2 unusable input or shard damage, 3 incomplete (recorded calls
skipped; --allow-partial accepts that). See epreplay.replay.report."""
from __future__ import annotations

import argparse
import json
import sys

HELP = "replay a recorded run on the same or fewer ranks and report every divergence"

EPILOG = """exit codes:
  0  every recorded call replayed, no divergence (with --allow-partial: none in what was replayed)
  1  divergence(s)
  2  unusable input, or shard damage (a truncated shard, a record whose CRC fails): nothing is
     replayed; 'epreplay repair RUN' cuts shards to their intact prefix
  3  incomplete: no divergence, but recorded calls were skipped (the summary and the JSON
     report's `skipped` / `skipped_by_rank` say which and why)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("run", metavar="RUN", help="run directory (manifest.json, shards/)")
    parser.add_argument("--ranks", type=int, default=None, metavar="M",
                        help="replay processes; must divide the recorded world size (default: the same)")
    parser.add_argument("--backend", choices=("emulated", "deepep"), default="emulated",
                        help="emulated (torch.distributed, CPU or GPU) or the real deep_ep.Buffer")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", default=None, metavar="A:B", help="replay steps A..B-1 only")
    parser.add_argument("--layers", default=None, metavar="LIST", help="layers, e.g. 0,2,5-7")
    parser.add_argument("--ops", default=None, metavar="LIST",
                        help="ops, e.g. dispatch,combine (a combine pulls in its dispatch)")
    parser.add_argument("--payload", choices=("recorded", "synthetic"), default=None,
                        help="payload source (default: recorded when the run captured payloads)")
    parser.add_argument("--hidden", type=int, default=None, metavar="H",
                        help="synthetic payload rows of width H (a multiple of 128) instead of the "
                             "recorded hidden: replays a large recording's routing on a few CPU processes")
    parser.add_argument("--call-timeout", type=float, default=60.0, metavar="S",
                        help="seconds a call may take before it is reported as a hang (default 60)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--no-index", action="store_true", help="do not load the report into the index")
    parser.add_argument("--allow-partial", action="store_true",
                        help="accept shard damage and skipped calls: replay only the calls every "
                             "rank holds intact (a truncated shard: the prefix before the cut); "
                             "exit 0 when that has no divergence, and say PARTIAL")


def run(args: argparse.Namespace) -> int:
    import os

    from epreplay.errors import UsageError
    from epreplay.replay.driver import replay_run
    from epreplay.replay.report import render

    if args.call_timeout <= 0:
        raise UsageError(f"--call-timeout {args.call_timeout}: must be a positive number of seconds")
    text = args.format == "text"
    from rich.console import Console

    err = Console(stderr=True)
    bar = {}

    def on_plan(plan, sched) -> None:
        if text and os.environ.get("RANK", "0") == "0":
            for line in plan.describe():
                err.print(line)
            if sched.skipped:
                err.print(f"{len(sched.skipped)} recorded call(s) will be skipped "
                          f"(first: {sched.skipped[0].reason})")

    def on_progress(done: int, total: int) -> None:
        if "p" not in bar:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

            bar["p"] = Progress("replaying", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                console=err, transient=True, disable=not text)
            bar["p"].start()
            bar["t"] = bar["p"].add_task("calls", total=total)
        bar["p"].update(bar["t"], completed=done)

    try:
        report = replay_run(args.run, args.ranks, backend=args.backend, device=args.device,
                            steps=args.steps, layers=args.layers, ops=args.ops, payload=args.payload,
                            call_timeout=args.call_timeout, on_progress=on_progress, on_plan=on_plan,
                            index=not args.no_index, allow_partial=args.allow_partial,
                            hidden=args.hidden)
    finally:
        if "p" in bar:
            bar["p"].stop()
    from epreplay.replay.launcher import joined_from_torchrun

    if joined_from_torchrun() and os.environ.get("RANK", "0") != "0":
        return report.exit_code  # under torchrun, rank 0 speaks for the replay (and wrote the report)
    if text:
        render(report)
    else:
        json.dump(report.to_dict(), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    return report.exit_code
