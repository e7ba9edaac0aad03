"""Traffic: the rank x rank matrix (rows sent src -> dst) for the selected step/layer or aggregated.

Row totals are what each rank sends, column totals what it receives; the most loaded receiver is
highlighted (its header label and its total). `[` `]` step, `{` `}` layer, `a` all steps/layers.
"""
from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.widgets import Static

from epreplay.index.rows import Selection, Traffic
from epreplay.tui import render
from epreplay.tui.heatmap import Heatmap
from epreplay.tui.matrix import RankMatrix, TrafficSummary
from epreplay.tui.messages import TrafficLoaded
from epreplay.tui.pane import Pane, title
from epreplay.tui.screens_hot import legend_text


def traffic_status(d: Traffic, s: TrafficSummary) -> str:
    total = int(d.tokens_RR.sum())
    head = f"{d.selection.label()} · {total} rows, {render.compact(float(d.bytes_RR.sum()), 6).strip()}B"
    if s.busiest_receiver < 0:
        return head + " · no traffic"
    local = int(d.tokens_RR.trace())
    return (head + f" · busiest receiver r{s.busiest_receiver}: {int(s.received_R[s.busiest_receiver])} rows "
            f"({s.ratio:.2f}x mean) · {100 * local / max(total, 1):.0f}% stays on its rank")


class TrafficPane(Pane):
    TITLE = "Traffic"
    KEY = "t"
    DEFAULT_CSS = """
    TrafficPane #traffic-legend { height: 1; }
    TrafficPane #traffic-cell { height: 1; color: $text-muted; }
    """

    traffic: Traffic | None = None
    summary: TrafficSummary | None = None

    def compose(self) -> ComposeResult:
        yield title("Traffic: rows sent, rank (down) -> rank (across)")
        yield Static("loading…", id="traffic-status", classes="status")
        yield RankMatrix(id="traffic-map")
        yield Static("", id="traffic-legend")
        yield Static("", id="traffic-cell")

    def fetch(self) -> None:
        self._load(self.selection)

    @work(thread=True, exclusive=True, group="traffic")
    def _load(self, sel: Selection) -> None:
        try:
            self.answer(TrafficLoaded(self.session.traffic(sel), key=(sel,)))
        except Exception as exc:  # noqa: BLE001
            self.failed("traffic", exc)

    @on(TrafficLoaded)
    def _show(self, msg: TrafficLoaded) -> None:
        self.traffic = d = msg.payload
        m = self.query_one("#traffic-map", RankMatrix)
        self.summary = s = m.set_traffic(d.tokens_RR)
        self.query_one("#traffic-status", Static).update(traffic_status(d, s))
        self.query_one("#traffic-legend", Static).update(legend_text(m.vmax, "rows per cell"))
        self.mark_loaded()

    @on(Heatmap.Highlighted, "#traffic-map")
    def _cell(self, event: Heatmap.Highlighted) -> None:
        if self.traffic is None or event.row >= self.traffic.tokens_RR.shape[0]:
            return
        t = self.traffic
        self.query_one("#traffic-cell", Static).update(
            f"r{event.row} -> r{event.col}: {int(t.tokens_RR[event.row, event.col])} rows, "
            f"{render.compact(float(t.bytes_RR[event.row, event.col]), 6).strip()}B")

    def jump(self, rank: int) -> None:
        """`/` jump: cursor to the rank's row (what it sends) and column (what it receives)."""
        m = self.query_one("#traffic-map", RankMatrix)
        m.move_to(row=rank, col=rank)
        m.focus()

    def focus_main(self) -> None:
        self.query_one("#traffic-map", RankMatrix).focus()
