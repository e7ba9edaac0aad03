"""The replay report: what was replayed, every divergence found, the first one, throughput.

Written as RUN/replays/<id>.json (never overwritten) and loaded into the run's index; printed
with rich or as JSON. Exit codes (EXIT_*):
    0  OK: every recorded call replayed, no divergence; or, with --allow-partial, no divergence
       in the calls that were replayed (the verdict then says PARTIAL and how many were skipped)
    1  DIVERGED: at least one divergence (whatever else)
    2  unusable input, shard damage included (raised as UsageError before a report exists)
    3  INCOMPLETE: no divergence, but recorded calls were skipped (missing, damaged or failed
       in the recording) or not replayed; a replay that did not replay everything is no OK
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from epreplay.index.rows import KINDS
from epreplay.replay.plan import processes

EXIT_OK, EXIT_DIVERGED, EXIT_USAGE, EXIT_INCOMPLETE = 0, 1, 2, 3


@dataclass(frozen=True)
class OpStats:
    """Per-op replay throughput next to the recording.

    Attributes:
        calls: calls replayed (counted once per physical rank-call, max over ranks).
        tokens: tokens sent, summed over physical ranks. bytes: payload bytes sent.
        backend_s: seconds inside the backend, slowest physical rank. total_s: seconds including
            the replay driver (reading records, splitting, verifying), slowest physical rank.
        recorded_mean_us: mean recorded call duration (max over ranks per call), -1 unknown.
    """

    calls: int
    tokens: int
    bytes: int
    backend_s: float
    total_s: float
    recorded_mean_us: float = -1.0

    @property
    def replay_mean_us(self) -> float:
        return 1e6 * self.backend_s / self.calls if self.calls else 0.0

    @property
    def driver_mean_us(self) -> float:
        return 1e6 * self.total_s / self.calls if self.calls else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(replay_mean_us=round(self.replay_mean_us, 1), driver_mean_us=round(self.driver_mean_us, 1),
                 tokens_per_s=round(self.tokens / self.total_s, 1) if self.total_s else 0.0,
                 backend_GBps=round(self.bytes / self.backend_s / 1e9, 4) if self.backend_s else 0.0)
        return d


@dataclass(frozen=True)
class ReplayReport:
    """Everything one replay found (see the module docstring)."""

    id: str
    run: str
    run_id: str
    created: str
    plan: dict
    backend: str
    device: str
    payload: str
    calls: int  # collectives replayed to completion
    scheduled: int
    calls_by_op: dict[str, int]
    divergences: int
    by_kind: dict[str, int]
    first_divergence: dict | None
    divergence_list: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    filtered: int = 0
    ops: dict[str, dict] = field(default_factory=dict)
    stopped: str | None = None
    wall_s: float = 0.0
    shard_problems: dict[str, str] = field(default_factory=dict)
    worker_pids: list[int] = field(default_factory=list)  # the replay processes (all ended)
    allow_partial: bool = False  # the user accepted skipped calls (--allow-partial)
    hidden: int = 0  # H of the replayed payload rows (the recorded one unless --hidden)
    peak_rss_mb: list[float] = field(default_factory=list)  # per replay process (-1: no summary)

    @property
    def incomplete(self) -> bool:
        """Recorded calls were skipped, or scheduled calls not replayed."""
        return bool(self.skipped) or self.calls < self.scheduled

    @property
    def skipped_by_rank(self) -> dict[int, int]:
        """Recorded rank -> skipped calls it is named in (Skipped.ranks)."""
        out: dict[int, int] = {}
        for s in self.skipped:
            for r in s.get("ranks", ()):
                out[int(r)] = out.get(int(r), 0) + 1
        return dict(sorted(out.items()))

    @property
    def exit_code(self) -> int:
        if self.divergences:
            return EXIT_DIVERGED
        # --allow-partial accepts skipped recorded calls, not a replay that stopped early
        if self.incomplete and not (self.allow_partial and self.calls == self.scheduled):
            return EXIT_INCOMPLETE
        return EXIT_OK

    @property
    def verdict(self) -> str:
        where = f"on {processes(self.plan.get('physical_ranks', 0))}"
        skipped = ""
        if self.skipped:
            ranks = ", ".join(f"rank {r}: {n}" for r, n in self.skipped_by_rank.items())
            skipped = f"{len(self.skipped)} recorded call(s) skipped" + (f" ({ranks})" if ranks else "")
        if self.divergences:
            f = self.first_divergence or {}
            return (f"DIVERGED: {self.divergences} divergence(s); first: {f.get('kind')} at step "
                    f"{f.get('step')} layer {f.get('layer')} {f.get('op')} rank {f.get('rank')}"
                    + (f"; {skipped}" if skipped else ""))
        code = self.exit_code
        if code == EXIT_INCOMPLETE:
            parts = [f"{self.calls} calls replayed {where}"]
            if self.calls < self.scheduled:
                parts.append(f"{self.scheduled - self.calls} scheduled call(s) not replayed")
            if skipped:
                parts.append(skipped)
            return (f"INCOMPLETE: {', '.join(parts)}; no divergence in what was replayed "
                    f"(exit {EXIT_INCOMPLETE}; --allow-partial accepts skipped calls)")
        if self.skipped:
            return (f"PARTIAL (--allow-partial): {self.calls} calls replayed {where}, {skipped}; "
                    f"no divergence in what was replayed")
        return f"OK: {self.calls} calls replayed {where}, no divergence"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exit_code"] = self.exit_code
        d["verdict"] = self.verdict
        d["incomplete"] = self.incomplete
        d["skipped_by_rank"] = {str(r): n for r, n in self.skipped_by_rank.items()}
        return d

    def write(self, replays_dir: Path) -> Path:
        """RUN/replays/<id>.json, created exclusively (an existing report is never overwritten)."""
        replays_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = replays_dir / f"{self.id}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)
        return path


# Error texts that are consequences of another rank's failure (its process died or left the
# collective), not causes: at one call, a rank with its own error is named first.
_ECHOES = ("Connection closed by peer", "remote worker", "Connection reset by peer")


def first_of(divs: list[dict]) -> dict | None:
    """The first divergence: earliest call in replay order, then an error of its own before one
    echoed from a peer's failure, then lowest virtual rank, then kind."""
    if not divs:
        return None
    rank_kind = {k: i for i, k in enumerate(KINDS)}

    def echo(d: dict) -> int:
        return int(d["kind"] == "error" and any(e in str(d.get("got", "")) for e in _ECHOES))

    return min(divs, key=lambda d: (d["call"], echo(d), d["rank"], rank_kind.get(d["kind"], 99)))


def render(report: ReplayReport, console: Any = None) -> None:
    """Print the report with rich: plan, verdict, per-op table, divergences by kind, first one."""
    from rich.console import Console
    from rich.markup import escape as E
    from rich.table import Table

    console = console or Console()
    pl = report.plan
    console.print(f"[bold]replay[/bold] {E(report.run)} (run {E(report.run_id)}) -> report {report.id}")
    console.print(f"plan: {pl.get('virtual_ranks')} recorded ranks on {processes(pl.get('physical_ranks', 0))} "
                  f"({pl.get('virtual_per_physical')} per process), backend {E(report.backend)} "
                  f"on {report.device}, payload {report.payload}")
    for row in pl.get("placement", []):
        v0, v1 = row["virtual"]
        ex = f", experts {row['experts'][0]}..{row['experts'][1]}" if "experts" in row else ""
        console.print(f"  process {row['physical']}: virtual ranks {v0}..{v1}{ex}")
    t = Table(title="calls per op")
    for col in ("op", "calls", "recorded us/call", "backend us/call", "replay us/call", "tokens/s"):
        t.add_column(col, justify="right" if col != "op" else "left")
    for op, s in sorted(report.ops.items()):
        rec = s.get("recorded_mean_us", -1)
        t.add_row(op, str(s["calls"]), f"{rec:.1f}" if rec >= 0 else "-", f"{s['replay_mean_us']:.1f}",
                  f"{s['driver_mean_us']:.1f}", f"{s['tokens_per_s']:.0f}")
    console.print(t)
    rss = [m for m in report.peak_rss_mb if m >= 0]
    if rss:
        console.print(f"payload rows H={report.hidden}; {report.wall_s:.1f} s wall; peak RSS per process "
                      f"max {max(rss):.0f} MB, all processes {sum(rss):.0f} MB")
    if report.skipped:
        console.print(f"[yellow]{len(report.skipped)} recorded call(s) skipped[/yellow] "
                      f"(a call is replayed only when every rank recorded it intact and successful):")
        for s in report.skipped[:10]:
            console.print(f"  buffer {s['buffer']} seq {s['seq']} {s['op']} step {s['step']} "
                          f"layer {s['layer']}: {E(s['reason'])}")
        if len(report.skipped) > 10:
            console.print(f"  ... and {len(report.skipped) - 10} more (see the JSON report)")
    if report.filtered:
        console.print(f"{report.filtered} call(s) not selected by --steps/--layers/--ops")
    if report.stopped:
        console.print(f"[red]stopped:[/red] {E(report.stopped)}")
    if report.divergences:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(report.by_kind.items()))
        console.print(f"[red]{report.divergences} divergence(s)[/red]: {kinds}")
        f = report.first_divergence or {}
        where = [f"step {f.get('step')}", f"layer {f.get('layer')}", f"{f.get('op')} (seq {f.get('seq')})",
                 f"virtual rank {f.get('rank')}", f"physical rank {f.get('physical')}"]
        if f.get("src_rank", -1) >= 0 or f.get("token", -1) >= 0:
            where.append(f"token {f.get('token')} of rank {f.get('src_rank')}")
        if f.get("expert", -1) >= 0:
            where.append(f"expert {f.get('expert')}")
        console.print(f"[bold red]first divergence[/bold red]: {f.get('kind')} at " + ", ".join(where))
        console.print(f"  expected: {E(str(f.get('expected')))}\n  got:      {E(str(f.get('got')))}\n"
                      f"  {E(str(f.get('detail')))}")
    style = {EXIT_OK: "green", EXIT_INCOMPLETE: "yellow"}.get(report.exit_code, "red")
    console.print(f"[bold {style}]{E(report.verdict)}[/bold {style}]")
