"""`epreplay diff RUN_A RUN_B`: how routing changed between two runs, with CI thresholds.

Exit codes: 0 within every --fail-on threshold (or no threshold given: nothing judged, and the
verdict says so), 1 beyond one or a threshold whose metric could not be measured (no matched
tokens, ...), 2 unusable input (a missing run, a run with neither index nor shards, a threshold
that does not parse).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Iterator

HELP = "compare the routing of two runs (drift per layer, hot experts, token agreement); CI gate"

# Kept in step with epreplay.diff.compare.METRICS (tests/test_diff.py checks); written out here so that
# building the parser does not import numpy.
_EPILOG = """\
metrics for --fail-on (one number per diff):
  js               largest per-layer Jensen-Shannon divergence of expert load (0..1)
  js_mean          mean per-layer JS divergence
  hot_changed      experts that entered the per-layer top-N hot sets, summed over layers
  imbalance_a      largest per-layer rank imbalance (max/mean rank load, mean over steps) of A
  imbalance_b      the same for B
  imbalance_ratio  largest per-layer imbalance of B over A (>1: B less balanced)
  jaccard          mean top-k set Jaccard of matched tokens (1 = same experts)
  top1             fraction of matched tokens with the same top-1 expert
  weight_change    mean |w_A - w_B| over matched (token, expert) pairs
  matched          fraction of A's tokens matched to a token of B
verdict and exit code:
  without --fail-on nothing is judged: the report ends "no thresholds given: nothing judged"
  (exit 0); there is no default gate. With --fail-on: exit 0 within every threshold, 1 beyond
  one. A metric with nothing to compute it over (jaccard, top1 or weight_change of zero matched
  tokens) is shown as n/a and never as 1.0, and a threshold on a metric that could not be
  measured fails the gate (exit 1) with the reason: tokens match by the same step, rank and
  position (the same batches) or by tags (capture.tag_tokens(ids) before each dispatch).
  Exit 2: unusable input.
examples:
  epreplay diff runs/v1 runs/v2 --fail-on 'js>0.05' --fail-on 'top1<0.9'
  epreplay diff runs/v1 runs/v2 --layers 0-3 --steps 10:20 --format md > comment.md
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    parser.add_argument("run_a", metavar="RUN_A", help="baseline run directory")
    parser.add_argument("run_b", metavar="RUN_B", help="candidate run directory")
    parser.add_argument("--layers", action="append", metavar="LIST",
                        help="layers to compare, e.g. 0,2,5-7 (repeatable; default: all)")
    parser.add_argument("--steps", metavar="A:B",
                        help="steps A (included) to B (excluded) of each run; A:, :B or N")
    parser.add_argument("--top", type=int, default=8, metavar="N",
                        help="size of the per-layer hot-expert set (default 8)")
    parser.add_argument("--match", choices=("auto", "position", "tag", "none"), default="auto",
                        help="pair tokens by recorded tag, by (step, rank, position), or not; "
                             "auto: tag when both runs tagged tokens, else position when both "
                             "ran the same batches, else none (default)")
    parser.add_argument("--fail-on", action="append", default=[], metavar="EXPR",
                        help="fail (exit 1) when EXPR holds, e.g. 'js>0.05' or 'top1<0.9', or when "
                             "its metric could not be measured (repeatable; metrics below); "
                             "without it nothing is judged")
    parser.add_argument("--format", choices=("text", "json", "md"), default="text",
                        help="text table (default), JSON for scripts, Markdown for a PR comment")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from epreplay.diff import compare as diff
    from epreplay.diff import render as diff_render
    from epreplay.diff import runs as diff_runs

    # Parse every threshold before touching the runs: a typo fails fast with exit 2.
    thresholds = tuple(diff.parse_threshold(t) for t in args.fail_on)
    steps = diff.parse_steps(args.steps)
    layers = diff.parse_layers(args.layers)
    err = Console(stderr=True)
    show = not args.no_progress and err.is_terminal
    with _stdout_to_stderr(), _progress(err, show) as progress:
        result = diff_runs.diff_runs(args.run_a, args.run_b, layers=layers, steps=steps,
                                     top_n=args.top, match=args.match, thresholds=thresholds,
                                     progress=progress)
    if args.format == "json":
        sys.stdout.write(json.dumps(diff_render.to_dict(result), indent=2) + "\n")
    elif args.format == "md":
        sys.stdout.write(diff_render.render_markdown(result))
    else:
        out = Console(width=None if sys.stdout.isatty() else 160)
        diff_render.render_text(result, out)
    return 0 if result.passed else 1


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """While the diff computes, send file descriptor 1 to stderr: stdout carries only the report
    (a script parses the JSON). DuckDB draws its progress bar for long queries (an index build)
    straight onto fd 1, past sys.stdout, so redirecting the Python object would not do."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


class _progress:
    """A rich progress bar on stderr (only on a terminal), as a `progress(done, total, what)`."""

    def __init__(self, console: "object", show: bool) -> None:
        self.console, self.show = console, show
        self._bar = None
        self._tasks: dict[str, int] = {}

    def __enter__(self):
        if not self.show:
            return None
        from rich.progress import Progress

        self._bar = Progress(console=self.console, transient=True)
        self._bar.start()
        return self._update

    def _update(self, done: int, total: int, what: str) -> None:
        task = self._tasks.get(what)
        if task is None:
            task = self._tasks[what] = self._bar.add_task(what, total=total)
        self._bar.update(task, completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
