"""Modal screens: the help screen (`?`) and the jump prompt (`/`)."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static

HELP = """\
epreplay tui — keys

 1 o  Overview       run facts, capture health, hot experts, worst layers
 2 h  Hot experts    layers x experts heatmap; Enter drills into an expert
 3 t  Traffic        rank x rank rows for the selected step/layer
 4 l  Timeline       call time per step x rank; ! marks the straggler (last to arrive)
 5 d  Divergences    replays and their divergences, first one selected
 6 f  Diff           run A vs run B (start with two runs)

 arrows / PgUp PgDn / Home End   move the cursor      Enter / click  drill in
 [ ]   move the step window      { }  previous / next layer
 + -   widen / narrow the step window (hot experts and traffic use it)
 a     all steps and layers      z    zoom the heatmap (numbers / colour)
 s     sort experts (id / load)  p    cycle the op (timeline)
 v     timeline cells: call time / lateness
 /     jump: e12 expert, r5 rank, s3 or s3:10 steps, l4 layer
 r       reload: index new records and replay reports (a live run)
 ctrl+p  command palette         ?    this help        q  quit
 tab     next widget

Colours: viridis scale, dark violet = little, yellow = most; empty = nothing.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Vertical { width: 84; max-width: 100%; height: auto; max-height: 100%;
                            border: round $accent; background: $surface; padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(HELP, id="help-text")

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss(None)


class JumpScreen(ModalScreen[str | None]):
    """One-line prompt; dismisses with the text typed (None on escape)."""

    BINDINGS = [Binding("escape", "cancel", "cancel")]
    DEFAULT_CSS = """
    JumpScreen { align: center middle; }
    JumpScreen > Vertical { width: 60; height: auto; border: round $accent; background: $surface; }
    """

    def __init__(self, hint: str) -> None:
        super().__init__()
        self.hint = hint

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(self.hint)
            yield Input(placeholder="e12  r5  s3:10  l4", id="jump-input")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)
