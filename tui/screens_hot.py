"""Hot experts: layers x experts heatmap over the selected steps, sortable, with an expert drill-down.

Enter (or a click) on a cell drills into that expert: its load over every step as a sparkline
(in the cell's layer) and the ranks that send to it. `s` toggles the column order between expert
id and load; `[` `]` move the selected step, `a` goes back to all steps (app-wide keys).
"""
from __future__ import annotations

import numpy as np
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Static

from epreplay.index.rows import LoadMatrix, Selection
from epreplay.tui import render
from epreplay.tui.data import ExpertDrill
from epreplay.tui.heatmap import Heatmap
from epreplay.tui.messages import ExpertLoaded, HeatLoaded
from epreplay.tui.pane import Pane, title


def legend_text(vmax: float, unit: str) -> Text:
    """A colour legend: one swatch per level with the level's upper bound under the scale."""
    text = Text("scale ")
    text.append("  ", style="dim")
    text.append("0 ")
    for entry in render.legend(vmax):
        text.append("  ", style=f"on {entry.colour}")
    text.append(f" {render.compact(vmax, 6).strip()} {unit}")
    return text


def drill_text(d: ExpertDrill, width: int = 60) -> str:
    """The drill-down panel: sparkline of the expert's load per step and its top senders."""
    s = d.series
    where = "all layers" if d.layer is None else f"layer {d.layer}"
    lines = [f"expert {d.expert} ({where})"]
    if s.tokens_S.size:
        peak = int(np.argmax(s.tokens_S))
        share = s.tokens_S.sum() / max(int(s.total_S.sum()), 1)
        lines.append(f"load/step {render.sparkline(s.tokens_S, width)}")
        lines.append(f"steps {int(s.step_S[0])}..{int(s.step_S[-1])}, peak {int(s.tokens_S[peak])} slots "
                     f"at step {int(s.step_S[peak])}, {100 * share:.1f}% of all slots")
    else:
        lines.append("no load recorded")
    total = int(d.senders.tokens_N.sum())
    if total:
        parts = [f"r{int(r)} {100 * t / total:.0f}%" for r, t in zip(d.senders.src_N[:8], d.senders.tokens_N[:8])]
        more = f" +{d.senders.src_N.size - 8} ranks" if d.senders.src_N.size > 8 else ""
        lines.append("senders " + "  ".join(parts) + more)
    return "\n".join(lines)


class HotPane(Pane):
    TITLE = "Hot experts"
    KEY = "h"
    BINDINGS = [Binding("s", "sort", "sort")]
    DEFAULT_CSS = """
    HotPane #hot-drill { height: auto; min-height: 3; border-top: solid $primary-muted; }
    HotPane #hot-legend { height: 1; }
    HotPane #hot-cell { height: 1; color: $text-muted; }
    """

    order_by = "load"
    heat: LoadMatrix | None = None
    drill: ExpertDrill | None = None

    def compose(self) -> ComposeResult:
        yield title("Hot experts: layers x experts (routed slots)")
        yield Static("loading…", id="hot-status", classes="status")
        yield Heatmap(id="hot-map")
        yield Static("", id="hot-legend")
        yield Static("", id="hot-cell")
        yield Static("Enter on a cell: the expert's load over time and its senders", id="hot-drill")

    def fetch(self) -> None:
        self._load(self.selection)

    @work(thread=True, exclusive=True, group="heat")
    def _load(self, sel: Selection) -> None:
        try:
            self.answer(HeatLoaded(self.session.heat(sel), key=(sel,)))
        except Exception as exc:  # noqa: BLE001
            self.failed("hot experts", exc)

    @work(thread=True, exclusive=True, group="expert")
    def _load_expert(self, expert: int, sel: Selection) -> None:
        try:
            self.answer(ExpertLoaded(self.session.expert(expert, sel), key=(expert, sel)))
        except Exception as exc:  # noqa: BLE001
            self.failed(f"expert {expert}", exc)

    @on(HeatLoaded)
    def _show(self, msg: HeatLoaded) -> None:
        self.heat = msg.payload
        self._draw()
        self._apply_pending()
        self.mark_loaded()

    def _draw(self) -> None:
        h = self.heat
        if h is None:
            return
        hm = self.query_one("#hot-map", Heatmap)
        cols = render.order(h.load_LE, by=self.order_by) if h.load_LE.size else None
        hm.set_data(h.load_LE, row_labels=[f"L{int(l)}" for l in h.layer_L],
                    col_labels=[str(e) for e in range(h.load_LE.shape[1])], col_order=cols)
        total = h.load_LE.sum(axis=0)
        status = f"{h.selection.label()} · {h.load_LE.shape[0]} layers x {h.load_LE.shape[1]} experts · " \
                 f"sorted by {self.order_by} (s)"
        if total.size and total.max() > 0:
            e = int(np.argmax(total))
            status += f" · hottest expert {e}: {int(total[e])} slots ({100 * total[e] / total.sum():.1f}%)"
        self.query_one("#hot-status", Static).update(status)
        self.query_one("#hot-legend", Static).update(legend_text(hm.vmax, "slots per cell"))

    def action_sort(self) -> None:
        self.order_by = "id" if self.order_by == "load" else "load"
        self._draw()

    @on(Heatmap.Highlighted, "#hot-map")
    def _cell(self, event: Heatmap.Highlighted) -> None:
        h = self.heat
        if h is None or event.row >= h.load_LE.shape[0]:
            return
        layer_total = int(h.load_LE[event.row].sum())
        value = int(h.load_LE[event.row, event.col])
        self.query_one("#hot-cell", Static).update(
            f"layer {int(h.layer_L[event.row])}, expert {event.col}: {value} slots "
            f"({100 * value / max(layer_total, 1):.1f}% of the layer) · Enter: drill in")

    @on(Heatmap.Selected, "#hot-map")
    def _selected(self, event: Heatmap.Selected) -> None:
        if self.heat is None:
            return
        layer = int(self.heat.layer_L[event.row])
        self.open_expert(event.col, layer)

    def open_expert(self, expert: int, layer: int | None) -> None:
        """Drill into `expert` in `layer` (None: all layers) over the selected steps."""
        sel = Selection(self.selection.steps, layer)
        self.query_one("#hot-drill", Static).update(f"expert {expert}: loading…")
        self._load_expert(expert, sel)

    @on(ExpertLoaded)
    def _show_expert(self, msg: ExpertLoaded) -> None:
        self.drill = msg.payload
        width = max(self.size.width - 12, 10)
        self.query_one("#hot-drill", Static).update(drill_text(msg.payload, width))

    def jump(self, expert: int) -> None:
        """`/` jump: put the cursor on the expert's column (hottest layer row) and drill in."""
        self._pending = expert
        self._apply_pending()
        self.query_one("#hot-map", Heatmap).focus()
        self.open_expert(expert, None)

    _pending: int | None = None

    def _apply_pending(self) -> None:
        """Move the cursor to a jumped-to expert once the heatmap holds data."""
        expert = self._pending
        if expert is None or self.heat is None:
            return
        self._pending = None
        hm = self.query_one("#hot-map", Heatmap)
        row = None
        if self.heat is not None and self.heat.load_LE.size and expert < self.heat.load_LE.shape[1]:
            row = int(np.argmax(self.heat.load_LE[:, expert]))
        hm.move_to(row=row, col=expert)

    def focus_main(self) -> None:
        self.query_one("#hot-map", Heatmap).focus()
