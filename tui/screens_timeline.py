"""Timeline: per step x rank call durations (summed over the step's calls), stragglers marked.

A cell marked "!" is its step's straggler (render.stragglers: the slowest rank, at least 1.5x the
step median). The table ranks ranks by how many calls they were the slowest of (the index's
STRAGGLERS query). `p` cycles the op whose durations are shown.
"""
from __future__ import annotations

import numpy as np
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import DataTable, Static

from epreplay.tui import render
from epreplay.tui.data import TimelineData, durations_us
from epreplay.tui.heatmap import Heatmap
from epreplay.tui.messages import TimelineLoaded
from epreplay.tui.pane import Pane, title
from epreplay.tui.screens_hot import legend_text

OPS = (None, "dispatch", "combine", "ll_dispatch", "ll_combine")


def straggler_line(d: TimelineData) -> str:
    if not d.captured:
        return "no call durations were captured in this run"
    us = durations_us(d.duration_SR)
    marked = render.straggler_rank(us)
    s = d.stragglers
    head = ""
    if s.rank_N.size:
        head = (f"straggler: rank {int(s.rank_N[0])} (slowest in {int(s.slowest_N[0])} of "
                f"{int(s.calls_N[0])} calls, mean {s.mean_ns_N[0] / 1e3:.0f} µs)")
    if marked is not None:
        head += f" · marked in {marked[1]} of {us.shape[0]} steps: rank {marked[0]}"
    return head or "no straggler"


class TimelinePane(Pane):
    TITLE = "Timeline"
    KEY = "l"
    BINDINGS = [Binding("p", "cycle_op", "op")]
    DEFAULT_CSS = """
    TimelinePane Horizontal { height: 1fr; }
    TimelinePane #tl-table { width: 38; height: 1fr; }
    TimelinePane #tl-legend { height: 1; }
    TimelinePane #tl-cell { height: 1; color: $text-muted; }
    """

    op_index = 0
    timeline: TimelineData | None = None

    def compose(self) -> ComposeResult:
        yield title("Timeline: call time per step (down) x rank (across), µs")
        yield Static("loading…", id="tl-status", classes="status")
        with Horizontal():
            yield Heatmap(id="tl-map")
            yield DataTable(id="tl-table", cursor_type="row")
        yield Static("", id="tl-legend")
        yield Static("", id="tl-cell")

    def on_mount(self) -> None:
        self.query_one("#tl-table", DataTable).add_columns("rank", "slowest", "calls", "mean µs")

    def fetch(self) -> None:
        self._load(OPS[self.op_index])

    @work(thread=True, exclusive=True, group="timeline")
    def _load(self, op: str | None) -> None:
        try:
            self.answer(TimelineLoaded(self.session.timeline(op=op), key=(op,)))
        except Exception as exc:  # noqa: BLE001
            self.failed("timeline", exc)

    @on(TimelineLoaded)
    def _show(self, msg: TimelineLoaded) -> None:
        self.timeline = d = msg.payload
        us = durations_us(d.duration_SR)
        hm = self.query_one("#tl-map", Heatmap)
        hm.set_data(us, row_labels=[f"s{int(s)}" for s in d.step_S],
                    col_labels=[str(r) for r in range(us.shape[1] if us.ndim == 2 else 0)],
                    marks_RC=render.stragglers(us) if us.size else None)
        op = OPS[self.op_index] or "all ops"
        self.query_one("#tl-status", Static).update(f"{op} (p) · {straggler_line(d)}")
        table = self.query_one("#tl-table", DataTable)
        table.clear()
        s = d.stragglers
        for i in range(min(int(s.rank_N.size), 50)):
            table.add_row(str(int(s.rank_N[i])), str(int(s.slowest_N[i])), str(int(s.calls_N[i])),
                          f"{s.mean_ns_N[i] / 1e3:.1f}", key=f"r{int(s.rank_N[i])}")
        vmax = float(np.nanmax(us)) if us.size and np.isfinite(us).any() else 0.0
        self.query_one("#tl-legend", Static).update(legend_text(vmax, "µs per cell · ! straggler"))
        self.mark_loaded()

    @on(Heatmap.Highlighted, "#tl-map")
    def _cell(self, event: Heatmap.Highlighted) -> None:
        d = self.timeline
        if d is None or event.row >= d.duration_SR.shape[0]:
            return
        us = d.duration_SR[event.row, event.col] / 1e3
        row = d.duration_SR[event.row]
        median = float(np.median(row[row > 0])) / 1e3 if (row > 0).any() else 0.0
        self.query_one("#tl-cell", Static).update(
            f"step {int(d.step_S[event.row])}, rank {event.col}: {us:.1f} µs (step median {median:.1f} µs)")

    def action_cycle_op(self) -> None:
        self.op_index = (self.op_index + 1) % len(OPS)
        self.fetch()

    def jump(self, rank: int) -> None:
        hm = self.query_one("#tl-map", Heatmap)
        hm.move_to(col=rank)
        hm.focus()

    def focus_main(self) -> None:
        self.query_one("#tl-map", Heatmap).focus()
