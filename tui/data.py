"""What the TUI fetches: small frozen aggregates built from the run's index (epreplay.index.queries).

Every function here runs inside a thread worker (never on the UI thread) and returns a frozen
dataclass of a few numpy arrays; nothing here imports textual. `Session` holds the read-only
index of run A (and B for a diff); RunIndex takes a cursor per call, so workers share it.

Legend: L layers, E experts, R ranks, S steps.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from epreplay.index import queries
from epreplay.index.queries import RunIndex
from epreplay.index.rows import (Divergence, ExpertSeries, Health, HotExperts, Imbalance, LoadMatrix, ReplayRow,
                                 RunInfo, Selection, Senders, Stragglers, Traffic)


@dataclass(frozen=True)
class OverviewData:
    """Run facts, capture health, hottest experts (all layers) and layers by imbalance."""

    path: str
    info: RunInfo
    health: Health
    hot: HotExperts
    imbalance: Imbalance
    errors: tuple[tuple[int, str], ...]  # (rank, error text) of failed calls, first few
    replays: int


@dataclass(frozen=True)
class ExpertDrill:
    """One expert: its load per step (series) and the ranks sending to it (senders)."""

    expert: int
    layer: int | None
    series: ExpertSeries
    senders: Senders


@dataclass(frozen=True)
class TimelineData:
    """Per step x rank: summed call durations (ns, 0 where nothing was timed), mean lateness
    (start minus the call's earliest start, ns) and calls at which the rank arrived last;
    and the index's straggler ranking (by last arrivals, then lateness).

    captured: False when no call of the run has a duration (counts recorded without timing).
    """

    step_S: np.ndarray
    duration_SR: np.ndarray
    late_SR: np.ndarray
    last_SR: np.ndarray
    stragglers: Stragglers
    captured: bool


@dataclass(frozen=True)
class DivergenceData:
    replays: tuple[ReplayRow, ...]
    divergences: tuple[Divergence, ...]  # of the selected replay, in replay order
    replay: str | None  # the selected replay


@dataclass(frozen=True)
class DiffData:
    """A diff of run A against run B (epreplay.diff.runs), or why there is none."""

    result: object | None  # epreplay.diff.compare.DiffResult
    reason: str = ""


ERRORS_SQL = """SELECT rank, error FROM calls WHERE status <> 'ok' ORDER BY step, layer, rank LIMIT 5"""

# Per (step, rank): mean lateness at the step's calls and how often the rank arrived last — the
# arrival order that STRAGGLERS (epreplay.index.queries) ranks by, resolved per step for the timeline
# (at_ns: times on the reference node's clock, so another node's clock does not read as lateness).
LATENESS_SQL = """
WITH c AS (
  SELECT step, rank, at_ns - min(at_ns) OVER w AS late_ns,
         row_number() OVER (PARTITION BY buffer, seq ORDER BY at_ns DESC, rank) AS arrival
  FROM aligned_calls WHERE duration_ns >= 0 AND ($op = '' OR op::VARCHAR = $op)
  WINDOW w AS (PARTITION BY buffer, seq))
SELECT step, rank, avg(late_ns) AS late_ns, count(*) FILTER (WHERE arrival = 1) AS last
FROM c GROUP BY step, rank"""


@dataclass
class Session:
    """The open run(s). `index` is run A's read-only index; `path_b` run B for the Diff pane."""

    path: Path
    index: RunIndex
    path_b: Path | None = None
    _diffs: dict[str, DiffData] = field(default_factory=dict, repr=False)
    # Held by every fetch that uses `index` (worker threads) and by `reopen`; the UI thread
    # never takes it. Fetches barely overlap (one pane is visible), so little is serialized.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def info(self) -> RunInfo:
        return self.index.info

    def close(self) -> None:
        self.index.close()

    def reopen(self) -> None:
        """Swap in the index file now on disk (after ensure_index replaced it).

        DuckDB shares one database instance per path inside a process, so a second connection
        would still read the replaced file: the old connection is closed first, under the lock
        every index fetch holds, so no fetch in flight loses its connection."""
        with self._lock:
            self.index.close()
            self.index = queries.open_index(self.path, ensure=False)
            self._diffs.clear()

    # ----- fetches (thread workers call these) --------------------------------------------------
    def overview(self, *, top: int = 10) -> OverviewData:
        with self._lock:
            return self._overview(top)

    def _overview(self, top: int) -> OverviewData:
        health = self.index.health()
        errors = tuple((int(r), str(e)) for r, e in self.index.sql(ERRORS_SQL).rows)
        return OverviewData(str(self.path), self.info, health, self.index.hot_experts(top),
                            self.index.imbalance(), errors, len(self.index.replays()))

    def heat(self, sel: Selection) -> LoadMatrix:
        """Layers x experts load over sel.steps (every layer: the heatmap), labelled with `sel`."""
        with self._lock:
            m = self.index.load_matrix(steps=sel.steps)
        return replace(m, selection=sel)

    def expert(self, expert: int, sel: Selection) -> ExpertDrill:
        with self._lock:
            series = self.index.expert_load_over_time(expert, layer=sel.layer)
            senders = self.index.expert_senders(expert, layer=sel.layer, steps=sel.steps)
        return ExpertDrill(expert, sel.layer, series, senders)

    def traffic(self, sel: Selection) -> Traffic:
        with self._lock:
            return self.index.traffic(layer=sel.layer, steps=sel.steps)

    def timeline(self, *, op: str | None = None) -> TimelineData:
        with self._lock:
            t = self.index.timeline(op=op)
            strag = self.index.stragglers(top=self.info.world_size or 1, op=op)
            late = self.index._q(LATENESS_SQL, op=op or "")
        late_SR = np.zeros(t.duration_SR.shape, np.float64)
        last_SR = np.zeros(t.duration_SR.shape, np.int64)
        if t.step_S.size and late["step"].size:
            s_N = np.searchsorted(t.step_S, np.asarray(late["step"], np.int64))
            r_N = np.asarray(late["rank"], np.int64)
            ok = (s_N < t.step_S.size) & (r_N < late_SR.shape[1])
            late_SR[s_N[ok], r_N[ok]] = np.asarray(late["late_ns"], np.float64)[ok]
            last_SR[s_N[ok], r_N[ok]] = np.asarray(late["last"], np.int64)[ok]
        captured = bool(t.duration_SR.size and (t.duration_SR > 0).any())
        return TimelineData(t.step_S, t.duration_SR, late_SR, last_SR, strag, captured)

    def divergences(self, replay: str | None = None) -> DivergenceData:
        with self._lock:
            return self._divergences(replay)

    def _divergences(self, replay: str | None) -> DivergenceData:
        replays = tuple(self.index.replays())
        if replay is None:
            # The newest replay that diverged, else the newest one: what a user opens first.
            diverged = [r for r in replays if r.divergences]
            pick = (diverged or list(replays))[-1:] if replays else []
            replay = pick[0].replay if pick else None
        divs = tuple(self.index.divergences(replay)) if replay else ()
        return DivergenceData(replays, divs, replay)

    def diff(self, *, match: str = "auto") -> DiffData:
        """Run A against run B (epreplay.diff.runs). match="none": distribution level only (from
        the loads, fast); "auto": tokens matched too (reads every dispatch record of both runs,
        the slowest fetch of the app; cached)."""
        if self.path_b is None:
            return DiffData(None, "one run open: start 'epreplay tui RUN_A RUN_B' to compare two runs")
        cached = self._diffs.get(match)
        if cached is None:
            from epreplay.diff.runs import diff_runs

            cached = self._diffs[match] = DiffData(diff_runs(self.path, self.path_b, match=match))
        return cached


def open_session(path: str | Path, path_b: str | Path | None = None, *,
                 ensure: bool = False) -> Session:
    """Open run A's index read-only (building it first with `ensure`); run B is opened lazily."""
    index = queries.open_index(path, ensure=ensure)
    return Session(Path(path), index, Path(path_b) if path_b is not None else None)


def durations_us(duration_SR: np.ndarray) -> np.ndarray:
    """[S, R] ns -> µs as float, NaN where nothing was timed (0 in the index)."""
    d = np.asarray(duration_SR, dtype=np.float64)
    return np.where(d > 0, d / 1e3, np.nan)
