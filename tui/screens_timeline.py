"""Timeline: per step x rank call durations (summed over the step's calls), stragglers marked.

On EP a late rank makes its peers wait inside the collective, so a straggler's own calls look
short and everybody else's long: stragglers are found by arrival order. A cell marked "!" is its
step's straggler (render.late_marks: the rank that arrived last at most of the step's calls);
the table ranks ranks by how many calls they reached last (the index's STRAGGLERS query).
`v` switches the cells between call time and lateness (µs after the call's first arrival);
`p` cycles the op.
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
from epreplay.tui.pane import Pane, fill_table, title
from epreplay.tui.screens_hot import legend_text

OPS = (None, "dispatch", "combine", "ll_dispatch", "ll_combine")
VIEWS = ("time", "late")


def straggler_line(d: TimelineData) -> str:
    if not d.captured:
        return "no call durations were captured in this run"
    s = d.stragglers
    head = ""
    if s.rank_N.size and s.last_N[0] > 0:
        head = (f"straggler: rank {int(s.rank_N[0])} (arrived last at {int(s.last_N[0])} of "
                f"{int(s.calls_N[0])} calls, {s.late_ns_N[0] / 1e3:.0f} µs late on average)")
    marked = render.straggler_rank(render.late_marks(d.last_SR))
    if marked is not None:
        head += f" · marked in {marked[1]} of {d.last_SR.shape[0]} steps: rank {marked[0]}"
    return head or "no straggler"


class TimelinePane(Pane):
    TITLE = "Timeline"
    KEY = "l"
    BINDINGS = [Binding("p", "cycle_op", "op"), Binding("v", "cycle_view", "time/late")]
    DEFAULT_CSS = """
    TimelinePane Horizontal { height: 1fr; }
    TimelinePane #tl-table { width: 38; height: 1fr; }
    TimelinePane #tl-legend { height: 1; }
    TimelinePane #tl-cell { height: 1; color: $text-muted; }
    """

    op_index = 0
    view = "time"
    timeline: TimelineData | None = None

    def compose(self) -> ComposeResult:
        yield title("Timeline: per step (down) x rank (across), µs")
        yield Static("loading…", id="tl-status", classes="status")
        with Horizontal():
            yield Heatmap(id="tl-map")
            yield DataTable(id="tl-table", cursor_type="row")
        yield Static("", id="tl-legend")
        yield Static("", id="tl-cell")

    def on_mount(self) -> None:
        fill_table(self.query_one("#tl-table", DataTable), STRAGGLER_COLUMNS, [])

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
        s = d.stragglers
        fill_table(self.query_one("#tl-table", DataTable), STRAGGLER_COLUMNS, [
            (f"r{int(s.rank_N[i])}", (str(int(s.rank_N[i])), str(int(s.last_N[i])), str(int(s.calls_N[i])),
                                      f"{s.late_ns_N[i] / 1e3:.1f}", f"{s.mean_ns_N[i] / 1e3:.1f}"))
            for i in range(min(int(s.rank_N.size), 50))])
        self._draw()
        self.mark_loaded()

    def _draw(self) -> None:
        d = self.timeline
        if d is None:
            return
        values = durations_us(d.duration_SR) if self.view == "time" else d.late_SR / 1e3
        hm = self.query_one("#tl-map", Heatmap)
        hm.set_data(values, row_labels=[f"s{int(s)}" for s in d.step_S],
                    col_labels=[str(r) for r in range(values.shape[1] if values.ndim == 2 else 0)],
                    marks_RC=render.late_marks(d.last_SR) if d.last_SR.size else None)
        op = OPS[self.op_index] or "all ops"
        what = "call time" if self.view == "time" else "lateness"
        self.query_one("#tl-status", Static).update(f"{what} (v) · {op} (p) · {straggler_line(d)}")
        vmax = float(np.nanmax(values)) if values.size and np.isfinite(values).any() else 0.0
        unit = "µs per cell" if self.view == "time" else "µs late per cell"
        self.query_one("#tl-legend", Static).update(legend_text(vmax, f"{unit} · ! straggler"))

    def action_cycle_view(self) -> None:
        self.view = VIEWS[(VIEWS.index(self.view) + 1) % len(VIEWS)]
        self._draw()

    @on(Heatmap.Highlighted, "#tl-map")
    def _cell(self, event: Heatmap.Highlighted) -> None:
        d = self.timeline
        if d is None or event.row >= d.duration_SR.shape[0]:
            return
        us = d.duration_SR[event.row, event.col] / 1e3
        row = d.duration_SR[event.row]
        median = float(np.median(row[row > 0])) / 1e3 if (row > 0).any() else 0.0
        self.query_one("#tl-cell", Static).update(
            f"step {int(d.step_S[event.row])}, rank {event.col}: {us:.1f} µs in calls (step median "
            f"{median:.1f}), {d.late_SR[event.row, event.col] / 1e3:.1f} µs late, last at "
            f"{int(d.last_SR[event.row, event.col])} of {int(d.last_SR[event.row].sum())} calls")

    def action_cycle_op(self) -> None:
        self.op_index = (self.op_index + 1) % len(OPS)
        self.fetch()

    def jump(self, rank: int) -> None:
        hm = self.query_one("#tl-map", Heatmap)
        hm.move_to(col=rank)
        hm.focus()

    def focus_main(self) -> None:
        self.query_one("#tl-map", Heatmap).focus()


STRAGGLER_COLUMNS = ("rank", "last", "calls", "late µs", "call µs")
