"""`epreplay merge PART... --out RUN`: join the node-local parts of one multi-node run.

Each node's `epreplay record` wrote its ranks to RUN on its own disk (capture/job.py); copy the
parts to one machine (or mount them) and merge. The parts are only read. Shards are hard-linked
into RUN (copied when RUN is on another filesystem, or with --copy), so a merge on the parts'
filesystem takes no extra space: 64 ranks in 8 parts merge in 0.5 s (bench/merge_bench.py). Then `inspect`, `index`, `stats`,
`replay`, `diff` and `tui` work on RUN as on a one-node run; the summary says how far each
node's clock is from node 0's (epreplay.format.clock; the index applies the same alignment).
"""
from __future__ import annotations

import argparse

HELP = "join the node-local parts of a multi-node run into one run directory"

EPILOG = """examples:
  epreplay merge node0/runs/r1 node1/runs/r1 --out runs/r1
  epreplay merge parts/* --out runs/r1 --allow-missing     # a node's part is lost: record the gap
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("parts", nargs="+", metavar="PART", help="node-local run directories of one run")
    parser.add_argument("--out", required=True, metavar="RUN", help="the merged run directory (new, or empty)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="merge even when ranks have no shard in any part; the manifest lists them")
    parser.add_argument("--copy", action="store_true",
                        help="copy the shards instead of hard-linking them (default: link, copy "
                             "only across filesystems)")


class _Progress:
    """One stderr line per second at most while shards go in (a merge that copies can be long)."""

    def __init__(self, enabled: bool) -> None:
        import time

        self.enabled, self.clock, self.last = enabled, time.monotonic, 0.0

    def __call__(self, done: int, total: int, done_bytes: int, total_bytes: int) -> None:
        import sys

        now = self.clock()
        if not self.enabled or (now - self.last < 1.0 and done < total):
            return
        self.last = now
        print(f"epreplay merge: {done}/{total} shards, {done_bytes / 1e6:,.1f} of "
              f"{total_bytes / 1e6:,.1f} MB", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from epreplay.merge import check_out, clock_of, plan_merge, read_part, write_merge

    out = Path(args.out)
    parts = [read_part(p) for p in args.parts]
    check_out(out, parts)
    plan = plan_merge(parts, allow_missing=args.allow_missing)
    result = write_merge(plan, out, copy=args.copy, progress=_Progress(len(plan.shards) > 1))
    how = ("hard-linked" if result.linked == result.shards else "copied" if args.copy else
           f"{result.linked} hard-linked, {result.shards - result.linked} copied (another filesystem)")
    print(f"epreplay merge: run {plan.run_id}: {result.shards} shard(s) of {len(parts)} part(s) "
          f"into {out} ({how}, {result.bytes / 1e6:,.1f} MB, {result.seconds:.2f} s)")
    if plan.missing:
        print(f"epreplay merge: ranks {', '.join(map(str, plan.missing))} have no shard "
              f"(--allow-missing); the manifest lists them as missing_ranks")
    try:
        est = clock_of(plan)
    except Exception as exc:  # noqa: BLE001 - the merge is done; the estimate is extra
        print(f"epreplay merge: clock skew not estimated: {exc}", file=sys.stderr)
        return 0
    print(skew_lines(est))
    return 0


def skew_lines(est) -> str:
    """The per-node clock offsets, as the merge summary and `epreplay stats` print them."""
    if len(est.nodes) < 2:
        return "clock: one node, no skew to align"
    lines = [f"clock skew across nodes: {est.skew_ns / 1e6:,.3f} ms (offsets against node "
             f"{est.nodes[0].node}'s clock; applied by the index to stragglers and the timeline)"]
    from epreplay.cli.cmd_stats import span

    for n in est.nodes:
        lines.append(f"  node {n.node} (ranks {span(list(n.ranks))}): {n.offset_ns / 1e6:+,.3f} ms"
                     f" (ranks agree within {n.spread_ns / 1e6:,.3f} ms over {n.calls} calls)")
    return "\n".join(lines)
