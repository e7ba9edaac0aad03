"""Overview: run facts, capture health, the hottest experts and the worst layers by imbalance."""
from __future__ import annotations

import numpy as np
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Grid, Vertical
from textual.widgets import DataTable, Static

from epreplay.tui import render
from epreplay.tui.data import OverviewData
from epreplay.tui.messages import OverviewLoaded
from epreplay.tui.pane import Pane, fill_table, title


def facts_text(d: OverviewData) -> str:
    """The run-facts panel as plain lines (markup-free: run ids and paths are user text)."""
    i = d.info
    steps = f"{i.first_step}..{i.last_step} ({i.steps})" if i.steps else "none recorded"
    layers = (f"{i.layers[0]}..{i.layers[-1]} ({len(i.layers)})" if i.layers else "none")
    return "\n".join([
        f"run      {i.run_id}",
        f"release  {i.release or '-'}",
        f"ranks    {i.world_size}   experts {i.num_experts}   top-k {i.topk}",
        f"level    {i.level}   hidden {i.hidden}",
        f"steps    {steps}",
        f"layers   {layers}",
        f"replays  {d.replays}",
    ])


def health_text(d: OverviewData) -> tuple[str, bool]:
    """The capture-health panel and whether everything is healthy."""
    h = d.health
    calls = sum(n for _, _, n in h.calls_by_op)
    errors = sum(n for _, status, n in h.calls_by_op if status != "ok")
    complete = sum(s.complete for s in h.shards)
    lines = [
        f"shards     {len(h.shards)} ({complete} closed, {len(h.damaged)} truncated)",
        f"missing    {', '.join(map(str, h.missing_ranks)) or 'none'}",
        f"dropped    {h.dropped} records",
        f"calls      {calls} ({errors} failed or hung)",
    ]
    events = sum(s.events for s in h.shards)
    if events:
        lines.append(f"events     {events} (flight dumps, drops, capture off)")
    for s in h.damaged[:2]:
        lines.append(f"  rank {s.rank}: truncated at byte {s.truncated_at}, {s.lost_bytes} B lost")
    for rank, err in d.errors[:2]:
        lines.append(f"  rank {rank} error: {err[:60]}")
    ok = h.ok and errors == 0
    return "\n".join(lines), ok


class OverviewPane(Pane):
    TITLE = "Overview"
    KEY = "o"
    DEFAULT_CSS = """
    OverviewPane Grid { grid-size: 2 2; grid-columns: 1fr 1fr; grid-rows: auto 1fr; height: 1fr; }
    OverviewPane .box { border: round $primary-muted; height: auto; padding: 0 1; }
    OverviewPane .box.bad { border: round $error; }
    OverviewPane DataTable { height: 1fr; }
    """

    data: OverviewData | None = None

    def compose(self) -> ComposeResult:
        yield title("Overview")
        with Grid():
            yield Static("loading…", id="facts", classes="box")
            yield Static("", id="health", classes="box")
            with Vertical():
                yield Static("Hot experts (all layers)", classes="pane-title")
                yield DataTable(id="hot-table", cursor_type="row", zebra_stripes=True)
            with Vertical():
                yield Static("Worst layers (rows received max/mean)", classes="pane-title")
                yield DataTable(id="imb-table", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        fill_table(self.query_one("#hot-table", DataTable), HOT_COLUMNS, [])
        fill_table(self.query_one("#imb-table", DataTable), IMBALANCE_COLUMNS, [])
        self.query_one("#facts").border_title = "run"
        self.query_one("#health").border_title = "capture health"

    def fetch(self) -> None:
        self._load()

    @work(thread=True, exclusive=True, group="overview")
    def _load(self) -> None:
        try:
            self.answer(OverviewLoaded(self.session.overview()))
        except Exception as exc:  # noqa: BLE001 - shown to the user, never crashes the app
            self.failed("overview", exc)

    @on(OverviewLoaded)
    def _show(self, msg: OverviewLoaded) -> None:
        d: OverviewData = msg.payload
        self.data = d
        self.query_one("#facts", Static).update(facts_text(d))
        text, ok = health_text(d)
        health = self.query_one("#health", Static)
        health.update(text)
        health.set_class(not ok, "bad")
        shares = d.hot.share_N
        top = float(shares.max()) if shares.size else 1.0
        fill_table(self.query_one("#hot-table", DataTable), HOT_COLUMNS, [
            (f"e{int(e)}", (str(int(e)), str(int(t)), f"{100 * s:5.1f}%", render.bar(s / top if top else 0, 10)))
            for e, t, s in zip(d.hot.expert_N, d.hot.tokens_N, shares)])
        im = d.imbalance
        fill_table(self.query_one("#imb-table", DataTable), IMBALANCE_COLUMNS, [
            (f"l{int(im.layer_L[i])}", (str(int(im.layer_L[i])), f"{im.imbalance_L[i]:.2f}",
                                        str(int(im.max_rank_L[i])), str(int(im.worst_step_L[i]))))
            for i in np.lexsort((im.layer_L, -im.imbalance_L))[:10]])
        self.mark_loaded()

    @on(DataTable.RowSelected, "#hot-table")
    def _drill(self, event: DataTable.RowSelected) -> None:
        """Enter on a hot expert opens it in the Hot experts pane."""
        expert = int(str(event.row_key.value)[1:])
        self.epapp.jump_expert(expert)

    @on(DataTable.RowSelected, "#imb-table")
    def _layer(self, event: DataTable.RowSelected) -> None:
        """Enter on a layer selects it and opens its traffic."""
        self.epapp.select(layer=int(str(event.row_key.value)[1:]))
        self.epapp.show("traffic")

    def focus_main(self) -> None:
        self.query_one("#hot-table", DataTable).focus()


HOT_COLUMNS = ("expert", "slots", "share", "")
IMBALANCE_COLUMNS = ("layer", "max/mean", "rank", "worst step")
