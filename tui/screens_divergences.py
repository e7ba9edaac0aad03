"""Divergences: the replays of the run, the divergences of one, and the detail of the selected one.

On open the newest replay that diverged is selected and its first divergence (earliest call in
replay order, as the replay report defines "first") is highlighted with its detail shown:
where (step, layer, op, rank, token, expert) and expected vs got. Enter on a divergence opens the
traffic of its step and layer.
"""
from __future__ import annotations

from textual import on, work
from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from epreplay.index.rows import Divergence
from epreplay.tui.data import DivergenceData
from epreplay.tui.messages import DivergencesLoaded
from epreplay.tui.pane import Pane, fill_table, title


def detail_text(d: Divergence) -> str:
    """Where a divergence happened and what differed (plain text: values are user data)."""
    where = [f"step {d.step}", f"layer {d.layer}", f"{d.op} (buffer {d.buffer} seq {d.seq})",
             f"rank {d.rank}"]
    if d.physical >= 0:
        where.append(f"process {d.physical}")
    if d.token >= 0:
        where.append(f"token {d.token}" + (f" of rank {d.src_rank}" if d.src_rank >= 0 else ""))
    if d.expert >= 0:
        where.append(f"expert {d.expert}")
    return "\n".join([f"{d.kind} at " + ", ".join(where),
                      f"expected  {d.expected}", f"got       {d.got}", d.detail or ""])


class DivergencesPane(Pane):
    TITLE = "Divergences"
    KEY = "d"
    DEFAULT_CSS = """
    DivergencesPane #div-replays { height: auto; max-height: 6; }
    DivergencesPane #div-table { height: 1fr; }
    DivergencesPane #div-detail { height: auto; min-height: 4; border-top: solid $error-muted; }
    """

    data: DivergenceData | None = None
    current: Divergence | None = None

    def compose(self) -> ComposeResult:
        yield title("Divergences: replays of this run")
        yield DataTable(id="div-replays", cursor_type="row")
        yield Static("", id="div-status", classes="status")
        yield DataTable(id="div-table", cursor_type="row", zebra_stripes=True)
        yield Static("", id="div-detail")

    def on_mount(self) -> None:
        fill_table(self.query_one("#div-replays", DataTable), REPLAY_COLUMNS, [])
        fill_table(self.query_one("#div-table", DataTable), DIVERGENCE_COLUMNS, [])

    def fetch(self, replay: str | None = None) -> None:
        self._load(replay)

    @work(thread=True, exclusive=True, group="divergences")
    def _load(self, replay: str | None) -> None:
        try:
            self.answer(DivergencesLoaded(self.session.divergences(replay), key=(replay,)))
        except Exception as exc:  # noqa: BLE001
            self.failed("divergences", exc)

    @on(DivergencesLoaded)
    def _show(self, msg: DivergencesLoaded) -> None:
        self.data = d = msg.payload
        reps = self.query_one("#div-replays", DataTable)
        fill_table(reps, REPLAY_COLUMNS, [
            (r.replay, (r.replay, f"{r.backend}/{r.device}", f"{r.virtual_ranks}->{r.physical_ranks}",
                        str(r.calls), str(r.divergences), r.verdict[:60])) for r in d.replays])
        if d.replay is not None:
            reps.move_cursor(row=reps.get_row_index(d.replay))
        fill_table(self.query_one("#div-table", DataTable), DIVERGENCE_COLUMNS, [
            (str(n), (str(n), v.kind, str(v.step), str(v.layer), v.op, str(v.rank),
                      str(v.token) if v.token >= 0 else "-", str(v.expert) if v.expert >= 0 else "-"))
            for n, v in enumerate(d.divergences)])
        if not d.replays:
            status = "no replay loaded; run 'epreplay replay RUN --ranks M' (reports load into the index)"
        elif not d.divergences:
            status = f"replay {d.replay}: no divergence"
        else:
            status = f"replay {d.replay}: {len(d.divergences)} divergence(s), first selected"
        self.query_one("#div-status", Static).update(status)
        self.show_detail(0 if d.divergences else None)
        self.mark_loaded()

    def show_detail(self, n: int | None) -> None:
        detail = self.query_one("#div-detail", Static)
        if n is None or self.data is None or n >= len(self.data.divergences):
            self.current = None
            detail.update("")
            return
        self.current = self.data.divergences[n]
        detail.update(detail_text(self.current))

    @on(DataTable.RowHighlighted, "#div-table")
    def _highlight(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is not None and event.row_key.value is not None:
            self.show_detail(int(event.row_key.value))

    @on(DataTable.RowSelected, "#div-table")
    def _open(self, event: DataTable.RowSelected) -> None:
        """Enter on a divergence: the traffic of its step and layer."""
        self.show_detail(int(event.row_key.value))
        d = self.current
        if d is not None and d.step >= 0:
            self.epapp.select(steps=(d.step, d.step + 1), layer=d.layer if d.layer >= 0 else None)
            self.epapp.show("traffic")

    @on(DataTable.RowSelected, "#div-replays")
    def _replay(self, event: DataTable.RowSelected) -> None:
        if self.data is not None and event.row_key.value != self.data.replay:
            self.fetch(str(event.row_key.value))

    def focus_main(self) -> None:
        self.query_one("#div-table", DataTable).focus()


REPLAY_COLUMNS = ("replay", "backend", "ranks", "calls", "divergences", "verdict")
DIVERGENCE_COLUMNS = ("#", "kind", "step", "layer", "op", "rank", "token", "expert")
