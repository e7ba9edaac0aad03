"""EpReplayApp: tabs over six panes, app-wide keys, the selection, help, jump and the command palette.

The app owns the `Selection` (step range and layer) shared by the panes; changing it marks the
panes that use it stale and re-fetches the visible one. Panes fetch in thread workers and render
what their typed messages carry (see epreplay.tui.pane), so no key press waits on the database.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

from textual import on, work
from textual.app import App, ComposeResult, ScreenStackError
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.css.query import NoMatches
from textual.lazy import Lazy
from textual.widgets import ContentSwitcher, Footer, Static, Tab, Tabs

from epreplay.errors import UsageError
from epreplay.index.rows import Selection
from epreplay.tui.data import Session
from epreplay.tui.jump import parse_jump
from epreplay.tui.messages import FetchFailed, Reloaded
from epreplay.tui.pane import Pane
from epreplay.tui.screens_diff import DiffPane
from epreplay.tui.screens_divergences import DivergencesPane
from epreplay.tui.screens_hot import HotPane
from epreplay.tui.screens_modal import HelpScreen, JumpScreen
from epreplay.tui.screens_overview import OverviewPane
from epreplay.tui.screens_timeline import TimelinePane
from epreplay.tui.screens_traffic import TrafficPane

# pane id -> class; the order is the tab order and the digit keys 1..6.
PANES: dict[str, type[Pane]] = {
    "overview": OverviewPane, "hot": HotPane, "traffic": TrafficPane,
    "timeline": TimelinePane, "divergences": DivergencesPane, "diff": DiffPane,
}
# Panes whose content depends on the step/layer selection.
USES_SELECTION = frozenset({"hot", "traffic"})


class EpCommands(Provider):
    """Command palette entries: switch panes, selection resets, help."""

    def _commands(self) -> list[tuple[str, object, str]]:
        app: EpReplayApp = self.app  # type: ignore[assignment]
        cmds = [(f"Show {cls.TITLE}", partial(app.show, pid), f"switch to the {cls.TITLE} pane ({cls.KEY})")
                for pid, cls in PANES.items()]
        cmds += [
            ("All steps and layers", app.action_all, "clear the step and layer selection (a)"),
            ("Next step", partial(app.action_step, 1), "select the next step (])"),
            ("Next layer", partial(app.action_layer, 1), "select the next layer (})"),
            ("Jump to expert, rank, step or layer", app.action_jump, "/"),
            ("Reload the index", app.action_reload, "index new records and replay reports (r)"),
            ("Keys", app.action_help, "the help screen (?)"),
        ]
        return cmds

    async def discover(self) -> Hits:
        for name, cb, help_text in self._commands():
            yield DiscoveryHit(name, cb, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, cb, help_text in self._commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), cb, help=help_text)


class EpReplayApp(App[int]):
    """`epreplay tui RUN [RUN_B]`: interactive investigation of one run (and a diff against another)."""

    TITLE = "epreplay"
    CSS_PATH = "epreplay.tcss"
    COMMANDS = App.COMMANDS | {EpCommands}
    BINDINGS = [
        *[Binding(str(n + 1), f"show('{pid}')", cls.TITLE, show=False) for n, (pid, cls) in enumerate(PANES.items())],
        *[Binding(cls.KEY, f"show('{pid}')", cls.TITLE, show=False) for pid, cls in PANES.items()],
        Binding("question_mark", "help", "help"),
        Binding("slash", "jump", "jump"),
        Binding("left_square_bracket", "step(-1)", "step-", show=False),
        Binding("right_square_bracket", "step(1)", "step+"),
        Binding("left_curly_bracket", "layer(-1)", "layer-", show=False),
        Binding("right_curly_bracket", "layer(1)", "layer+"),
        Binding("plus,equals_sign", "widen(1)", "steps+", show=False),
        Binding("minus", "widen(-1)", "steps-", show=False),
        Binding("a", "all", "all", show=False),
        Binding("r", "reload", "reload", show=False),
        Binding("q", "quit", "quit"),
    ]

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session
        self.selection = Selection()
        self.current = "overview"

    def compose(self) -> ComposeResult:
        yield Tabs(*[Tab(f"{n + 1} {cls.TITLE}", id=f"tab-{pid}") for n, (pid, cls) in enumerate(PANES.items())],
                   id="tabs")
        with ContentSwitcher(initial="overview", id="panes"):
            for pid, cls in PANES.items():
                # Only the overview is built before the first paint; the other panes mount
                # right after it (Lazy), so the first screen with data comes sooner.
                yield cls(id=pid) if pid == "overview" else Lazy(cls(id=pid))
        yield Static("", id="statusbar")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"{self.session.info.run_id}" + (f" vs {self.session.path_b.name}"
                                                         if self.session.path_b else "")
        self.pane("overview").activate()
        self._status()

    def on_unmount(self) -> None:
        self.session.close()

    # ----- reload (a live capture, a new replay report) ---------------------------------------
    def action_reload(self) -> None:
        self.notify("updating the index…", timeout=2)
        self._reload()

    @work(thread=True, exclusive=True, group="reload")
    def _reload(self) -> None:
        """Index what is new in the run (ensure_index writes a new file and renames it over the
        old one), then reopen it (Session.reopen)."""
        try:
            from epreplay.index import build as index_mod

            index_mod.ensure_index(self.session.path, progress=False)
            self.session.reopen()
            self.post_message(Reloaded(self.session.index))
        except Exception as exc:  # noqa: BLE001 - shown, never raised into the app
            self.post_message(FetchFailed("reload", f"{type(exc).__name__}: {exc}"))

    @on(Reloaded)
    def _reloaded(self, msg: Reloaded) -> None:
        for pane in self.query(Pane):
            pane.stale = True
        self.pane(self.current).activate()
        self._status()
        self.notify("index reloaded", timeout=2)

    # ----- panes ------------------------------------------------------------------------------
    def pane(self, pid: str) -> Pane:
        return self.query_one(f"#{pid}", Pane)

    def show(self, pid: str) -> None:
        """Switch to pane `pid`, fetching its data if the selection changed since it last did."""
        if pid not in PANES:
            return
        if not self.query(f"#{pid}"):  # a lazy pane not mounted yet (only before the first frame)
            self.call_after_refresh(self.show, pid)
            return
        self.current = pid
        self.query_one("#panes", ContentSwitcher).current = pid
        tabs = self.query_one("#tabs", Tabs)
        if tabs.active != f"tab-{pid}":
            tabs.active = f"tab-{pid}"
        pane = self.pane(pid)
        pane.activate()
        pane.focus_main()
        self._status()

    def action_show(self, pid: str) -> None:
        self.show(pid)

    @on(Tabs.TabActivated, "#tabs")
    def _tab(self, event: Tabs.TabActivated) -> None:
        pid = event.tab.id.removeprefix("tab-") if event.tab and event.tab.id else ""
        # A click or tab key. Ignore a late message from an earlier programmatic switch (its tab
        # is no longer the active one) and one arriving while the app shuts down.
        if not pid or pid == self.current or event.tabs.active != event.tab.id:
            return
        try:
            self.show(pid)
        except (NoMatches, ScreenStackError):
            pass

    # ----- selection --------------------------------------------------------------------------
    def select(self, *, steps: tuple[int, int] | None | str = "keep", layer: int | None | str = "keep") -> None:
        """Change the step range and/or layer ("keep" leaves one as it is) and re-fetch."""
        new = Selection(self.selection.steps if steps == "keep" else steps,  # type: ignore[arg-type]
                        self.selection.layer if layer == "keep" else layer)  # type: ignore[arg-type]
        if new == self.selection:
            return
        self.selection = new
        for pane in self.query(Pane):  # (a lazy pane not mounted yet starts stale anyway)
            if pane.id in USES_SELECTION:
                pane.stale = True
        if self.current in USES_SELECTION:
            self.pane(self.current).activate()
        self._status()

    def action_step(self, delta: int) -> None:
        info = self.session.info
        if info.steps == 0:
            return
        lo_all, hi_all = info.first_step, info.last_step
        cur = self.selection.steps
        if cur is None:
            lo = lo_all if delta > 0 else hi_all
            width = 1
        else:
            width = cur[1] - cur[0]
            lo = min(max(cur[0] + delta, lo_all), max(hi_all - width + 1, lo_all))
        self.select(steps=(lo, lo + width))

    def action_widen(self, delta: int) -> None:
        """Grow (+) or shrink (-) the step window by one step at its end (from one step)."""
        info = self.session.info
        if info.steps == 0:
            return
        lo, hi = self.selection.steps or (info.first_step, info.first_step + 1)
        hi = min(max(hi + delta, lo + 1), info.last_step + 1)
        self.select(steps=(lo, hi))

    def action_layer(self, delta: int) -> None:
        layers = list(self.session.info.layers)
        if not layers:
            return
        cycle: list[int | None] = [None, *layers]
        pos = cycle.index(self.selection.layer) if self.selection.layer in cycle else 0
        self.select(layer=cycle[(pos + delta) % len(cycle)])

    def action_all(self) -> None:
        self.select(steps=None, layer=None)

    def _status(self) -> None:
        run = self.session.info.run_id
        self.query_one("#statusbar", Static).update(
            f"{run} · {self.selection.label()} · ? help · / jump · ctrl+p commands")

    # ----- jump, help -------------------------------------------------------------------------
    def action_jump(self) -> None:
        default = "rank" if self.current in ("traffic", "timeline") else "expert"
        self.push_screen(JumpScreen(f"jump to (a bare number is a{'n' if default == 'expert' else ''} {default}):"),
                         partial(self._jumped, default))

    def _jumped(self, default: str, text: str | None) -> None:
        if not text:
            return
        try:
            self.jump(text, default=default)
        except UsageError as exc:
            self.notify(str(exc), severity="warning")

    def jump(self, text: str, *, default: str = "expert") -> None:
        """Apply a `/` target (see epreplay.tui.jump); UsageError when it is not valid for this run."""
        j = parse_jump(text, default=default)
        info = self.session.info
        if j.kind == "expert":
            if not 0 <= j.value < max(info.num_experts, 1):
                raise UsageError(f"expert {j.value}: this run has experts 0..{info.num_experts - 1}")
            self.jump_expert(j.value)
        elif j.kind == "rank":
            if not 0 <= j.value < info.world_size:
                raise UsageError(f"rank {j.value}: this run has ranks 0..{info.world_size - 1}")
            pid = self.current if self.current in ("traffic", "timeline") else "traffic"
            self.show(pid)
            self.pane(pid).jump(j.value)  # type: ignore[attr-defined]
        elif j.kind == "layer":
            if j.value not in info.layers:
                raise UsageError(f"layer {j.value}: this run has layers {', '.join(map(str, info.layers))}")
            self.select(layer=j.value)
        else:
            self.select(steps=(j.value, j.end))

    def jump_expert(self, expert: int) -> None:
        self.show("hot")
        self.pane("hot").jump(expert)  # type: ignore[attr-defined]

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    @on(FetchFailed)
    def _failed(self, msg: FetchFailed) -> None:
        self.notify(f"{msg.what}: {msg.error}", severity="error", timeout=8)


def run_app(path: str | Path, path_b: str | Path | None = None) -> int:
    """Open the run's index (already built) and run the app until the user quits."""
    from epreplay.tui.data import open_session

    session = open_session(path, path_b)
    EpReplayApp(session).run()
    return 0
