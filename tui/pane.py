"""Pane: the base of the six views (overview, hot experts, traffic, timeline, divergences, diff).

A pane is shown by the app's ContentSwitcher. It fetches only while visible: the app calls
`activate()` on a switch, and a selection change marks every pane stale so the visible one
re-fetches at once and the others when next shown. Fetches run in `@work(thread=True,
exclusive=True)` workers defined by each pane, which post a typed message (epreplay.tui.messages)
that the pane renders on the UI thread.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, ClassVar

from textual.containers import Vertical
from textual.message import Message
from textual.worker import get_current_worker
from textual.widgets import DataTable, Static

from epreplay.index.rows import Selection
from epreplay.tui.data import Session
from epreplay.tui.messages import FetchFailed

if TYPE_CHECKING:
    from epreplay.tui.app import EpReplayApp


class Pane(Vertical):
    """One view; subclasses set TITLE/KEY and implement `fetch()` (which starts a worker)."""

    TITLE: ClassVar[str] = ""
    KEY: ClassVar[str] = ""
    DEFAULT_CSS = """
    Pane { height: 1fr; display: none; }  /* the ContentSwitcher shows the current one */
    Pane .pane-title { height: 1; text-style: bold; color: $text-accent; }
    Pane .status { height: auto; max-height: 3; color: $text-muted; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.stale = True
        self.loaded = False
        self.loaded_at = 0.0  # time.perf_counter() when data was last rendered (bench, tests)

    @property
    def epapp(self) -> "EpReplayApp":
        return self.app  # type: ignore[return-value]

    @property
    def session(self) -> Session:
        return self.epapp.session

    @property
    def selection(self) -> Selection:
        return self.epapp.selection

    def activate(self) -> None:
        """Shown: fetch when the selection changed since the last fetch."""
        if self.stale:
            self.stale = False
            self.fetch()

    def fetch(self) -> None:
        raise NotImplementedError

    def mark_loaded(self) -> None:
        """Called by a pane's message handler once the fetched data is on screen."""
        self.loaded = True
        self.loaded_at = time.perf_counter()

    def answer(self, message: Message) -> None:
        """From a worker thread: post the fetched data unless a newer fetch replaced this one.

        `exclusive=True` only marks the older thread worker cancelled (a thread cannot be
        stopped); without this check, pressing `]` three times fast could leave the screen
        showing whichever query finished last instead of the step selected last."""
        if not get_current_worker().is_cancelled:
            self.post_message(message)

    def failed(self, what: str, exc: BaseException) -> None:
        """From a worker thread: report a failed query as a message (never raise into Textual)."""
        text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if type(exc).__name__ in ("BinderException", "CatalogException"):
            # A table or column the queries expect is missing: an index built by another version.
            text += f"; the index looks out of date: rebuild it with 'epreplay index {self.session.path} --force'"
        self.post_message(FetchFailed(what, text))

    def focus_main(self) -> None:
        """Give the keyboard to the pane's main widget (a table or heatmap)."""


def title(text: str) -> Static:
    return Static(text, classes="pane-title")


def fill_table(table: DataTable, labels: tuple[str, ...], rows: list[tuple[str, tuple]]) -> None:
    """Replace a table's columns and rows, with column widths fixed from the data up front.

    DataTable measures auto widths on a later idle pass, and a header line rendered in between
    stays cached at the old widths; fixed widths (the same the auto pass would find) avoid that.
    """
    widths = [max([len(label)] + [len(cells[i]) for _, cells in rows]) for i, label in enumerate(labels)]
    table.clear(columns=True)
    for label, width in zip(labels, widths):
        table.add_column(label, width=width)
    for key, cells in rows:
        table.add_row(*cells, key=key)
