"""Typed messages the thread workers post when a fetch finishes (Harlequin's pattern).

A worker never touches a widget: it runs a query in its thread, wraps the small aggregate it got
in one of these messages and posts it; the pane's handler (on the UI thread) renders it. Tests
watch these messages through `app.run_test(message_hook=...)`.
"""
from __future__ import annotations

from textual.message import Message

from epreplay.index.rows import LoadMatrix, Traffic
from epreplay.tui import data


class Loaded(Message):
    """Base: `payload` is the frozen aggregate from epreplay.tui.data; `key` what was asked."""

    def __init__(self, payload: object, key: tuple = ()) -> None:
        super().__init__()
        self.payload = payload
        self.key = key


class OverviewLoaded(Loaded):
    payload: data.OverviewData


class HeatLoaded(Loaded):
    payload: LoadMatrix


class ExpertLoaded(Loaded):
    payload: data.ExpertDrill


class TrafficLoaded(Loaded):
    payload: Traffic


class TimelineLoaded(Loaded):
    payload: data.TimelineData


class DivergencesLoaded(Loaded):
    payload: data.DivergenceData


class DiffLoaded(Loaded):
    payload: data.DiffData


class FetchFailed(Message):
    """A worker's query raised: `what` was being fetched, `error` the one-line reason."""

    def __init__(self, what: str, error: str) -> None:
        super().__init__()
        self.what = what
        self.error = error


class Reloaded(Message):
    """The index was brought up to date (new shard records, new replay reports) and reopened."""

    def __init__(self, index: object) -> None:
        super().__init__()
        self.index = index  # epreplay.index.queries.RunIndex
