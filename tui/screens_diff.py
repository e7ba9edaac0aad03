"""Diff (two runs open): per-layer Jensen-Shannon bars, hot-expert changes, token agreement.

The numbers come from epreplay.diff.runs (the same as `epreplay diff`), computed in a worker:
the distribution level first, then again with tokens matched (agreement columns filled in).
"""
from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from epreplay.diff.compare import layer_value
from epreplay.tui import render
from epreplay.tui.data import DiffData
from epreplay.tui.messages import DiffLoaded
from epreplay.tui.pane import Pane, fill_table, title


def _ids(ids: tuple[int, ...], limit: int = 4) -> str:
    text = ",".join(str(i) for i in ids[:limit])
    return text + ("…" if len(ids) > limit else "") if ids else "-"


def _agree(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"  # None: no tokens matched in the layer


def summary_text(d: DiffData) -> str:
    res = d.result
    if res is None:
        return d.reason
    s = res.summary
    lines = [f"A {res.run_a.run_id} ({res.run_a.release or '-'})  vs  B {res.run_b.run_id} "
             f"({res.run_b.release or '-'})", res.verdict_line()]
    agree = [f"{k} {s[k]:.3f}" if s.get(k) is not None else f"{k} n/a ({res.unmeasured.get(k, '-')})"
             for k in ("top1", "jaccard", "weight_change", "matched")] if res.match != "none" else []
    lines.append(f"token match: {res.match}" + (" · " + " · ".join(agree) if agree else ""))
    lines.extend(res.notes[:2])
    return "\n".join(lines)


class DiffPane(Pane):
    TITLE = "Diff"
    KEY = "f"
    DEFAULT_CSS = """
    DiffPane #diff-summary { height: auto; border-bottom: solid $primary-muted; }
    DiffPane #diff-table { height: 1fr; }
    """

    data: DiffData | None = None

    def compose(self) -> ComposeResult:
        yield title("Diff: routing of run A vs run B, worst layers first")
        yield Static("loading…", id="diff-summary")
        yield DataTable(id="diff-table", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        fill_table(self.query_one("#diff-table", DataTable), DIFF_COLUMNS, [])

    def fetch(self) -> None:
        self._load()

    @work(thread=True, exclusive=True, group="diff")
    def _load(self) -> None:
        try:
            # Distribution level first (seconds), then token agreement (reads both runs' shards).
            first = self.session.diff(match="none")
            self.answer(DiffLoaded(first, key=("none",)))
            if first.result is not None:
                self.answer(DiffLoaded(self.session.diff(match="auto"), key=("auto",)))
        except Exception as exc:  # noqa: BLE001
            self.failed("diff", exc)

    @on(DiffLoaded)
    def _show(self, msg: DiffLoaded) -> None:
        self.data = d = msg.payload
        summary = summary_text(d)
        if msg.key == ("none",) and d.result is not None:
            summary += "\nmatching tokens for top-1/Jaccard agreement…"
        self.query_one("#diff-summary", Static).update(summary)
        rows = d.result.layers if d.result is not None else []
        top = max((r.js for r in rows), default=0.0) or 1.0
        fill_table(self.query_one("#diff-table", DataTable), DIFF_COLUMNS, [
            (str(r.layer), (str(r.layer), f"{r.js:.4f}", render.bar(r.js / top, 16), _ids(r.hot.entered),
                            _ids(r.hot.left), _agree(layer_value(r, "top1")),
                            _agree(layer_value(r, "jaccard"))))
            for r in rows])
        self.mark_loaded()

    def focus_main(self) -> None:
        self.query_one("#diff-table", DataTable).focus()


DIFF_COLUMNS = ("layer", "JS", "", "entered hot", "left hot", "top1", "jaccard")
