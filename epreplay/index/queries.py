"""Named SQL over a run's index (RUN/index.duckdb) and the small typed API the TUI, diff and stats use.

Every query is a constant of epreplay.index.sql with `$parameters`; `RunIndex` runs them on a
read-only connection and returns the frozen dataclasses of epreplay.index.rows (never loose dicts).
Each call takes its own cursor, so a RunIndex may be shared by thread workers (Textual
`@work(thread=True)`).

Conventions of every method:
  steps: (A, B) = steps A (included) to B (excluded), as epreplay.diff.compare.parse_steps returns; None = all.
  layer: one MoE layer, None = all layers summed.
  tokens are exact integer counts (int64 arrays); "slots" are (token, k) routing slots.

Legend: E experts, R ranks, L layers, S steps, N rows of a result.
Schema: epreplay/index/schema.sql.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from epreplay.errors import UsageError
from epreplay.index.rows import (Divergence, ExpertSeries, Health, HotExperts, Imbalance, LoadMatrix,
                                 NodeClock, RankLoad, ReplayRow, RunInfo, Selection, Senders, ShardHealth,
                                 SlowCall, SqlResult, Stragglers, Timeline, Traffic)
from epreplay.index.sql import (ALL, CALL_COUNTS, CLOCK, DIVERGENCES, EXPERT_OVER_TIME, EXPERT_SENDERS, HI,
                                HOT_EXPERTS, HOT_EXPERTS_BY_LAYER, IMBALANCE_PER_LAYER, LO, LOAD_MATRIX,
                                RANK_LOAD, REPLAYS, RUN_INFO, SHARDS, SLOWEST_CALLS, STEP_LAYER_RANGE,
                                STRAGGLERS, TIMELINE, TRAFFIC)


def _steps(steps: tuple[int, int] | None) -> tuple[int, int]:
    if steps is None:
        return LO, HI
    lo, hi = steps
    return (LO if lo is None else int(lo)), (HI if hi is None else int(hi))


def _layer(layer: int | None) -> int:
    return ALL if layer is None else int(layer)


def _ints(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


class RunIndex:
    """Read-only queries on RUN/index.duckdb. Build with `open_index`. Thread-safe (cursor per call)."""

    def __init__(self, path: Path) -> None:
        import duckdb

        from epreplay.index.lock import connect as index_connect

        self.path = path
        try:
            self._con = index_connect(path, read_only=True)
        except duckdb.Error as exc:
            raise UsageError(f"{path}: cannot open the index read-only ({str(exc).splitlines()[0]}); "
                             f"rebuild it with 'epreplay index {path.parent} --force'") from None
        self.info = self._run_info()

    # -- plumbing
    def _q(self, sql: str, **params: object) -> dict[str, np.ndarray]:
        cur = self._con.cursor()
        try:
            return cur.execute(sql, params or None).fetchnumpy()
        finally:
            cur.close()

    def _rows(self, sql: str, **params: object) -> tuple[list[str], list[tuple]]:
        cur = self._con.cursor()
        try:
            res = cur.execute(sql, params or None)
            return [d[0] for d in res.description], res.fetchall()
        finally:
            cur.close()

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "RunIndex":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run_info(self) -> RunInfo:
        cols, rows = self._rows(RUN_INFO)
        if not rows:
            raise UsageError(f"{self.path}: the index holds no run; rebuild it with "
                             f"'epreplay index {self.path.parent} --force'")
        r = dict(zip(cols, rows[0]))
        _, srows = self._rows(STEP_LAYER_RANGE)
        lo, hi, n, layers = srows[0]
        missing = tuple(int(x) for x in (r["missing_ranks"] or "").split(",") if x)
        return RunInfo(r["run_id"], r["release"] or "", int(r["world_size"]), int(r["num_experts"]),
                       int(r["topk"]), int(r["hidden"]), r["level"], int(r["shards"]), missing,
                       int(r["dropped"] or 0), -1 if lo is None else int(lo), -1 if hi is None else int(hi),
                       int(n or 0), tuple(int(x) for x in (layers or [])))

    # -- experts
    def hot_experts(self, top: int = 10, *, layer: int | None = None,
                    steps: tuple[int, int] | None = None) -> HotExperts:
        """The `top` experts by routed slots over `steps` in `layer` (None: all layers summed)."""
        lo, hi = _steps(steps)
        d = self._q(HOT_EXPERTS, lo=lo, hi=hi, layer=_layer(layer), top=int(top))
        total = int(d["total"][0]) if len(d["total"]) else 0
        return HotExperts(_ints(d["expert"]), _ints(d["tokens"]), total, layer)

    def hot_experts_by_layer(self, top: int = 5, *,
                             steps: tuple[int, int] | None = None) -> list[HotExperts]:
        """Per layer (ascending), its `top` experts."""
        lo, hi = _steps(steps)
        d = self._q(HOT_EXPERTS_BY_LAYER, lo=lo, hi=hi, top=int(top))
        out = []
        layer_N = _ints(d["layer"])
        for layer in np.unique(layer_N):
            m = layer_N == layer
            out.append(HotExperts(_ints(d["expert"][m]), _ints(d["tokens"][m]),
                                  int(d["total"][m][0]), int(layer)))
        return out

    def expert_load_over_time(self, expert: int, *, layer: int | None = None,
                              steps: tuple[int, int] | None = None) -> ExpertSeries:
        """Slots routed to `expert` per step (every step of the selection, zeros included)."""
        lo, hi = _steps(steps)
        d = self._q(EXPERT_OVER_TIME, lo=lo, hi=hi, layer=_layer(layer), expert=int(expert))
        return ExpertSeries(int(expert), _ints(d["step"]), _ints(d["tokens"]), _ints(d["total"]))

    def load_matrix(self, *, steps: tuple[int, int] | None = None) -> LoadMatrix:
        """Layers x experts slots over `steps`: load_LE [L, E] (E = the run's num_experts)."""
        lo, hi = _steps(steps)
        d = self._q(LOAD_MATRIX, lo=lo, hi=hi)
        layer_N, expert_N = _ints(d["layer"]), _ints(d["expert"])
        layer_L = np.unique(layer_N)
        E = max(self.info.num_experts, int(expert_N.max()) + 1 if expert_N.size else 0)
        load_LE = np.zeros((layer_L.size, E), np.int64)
        load_LE[np.searchsorted(layer_L, layer_N), expert_N] = _ints(d["tokens"])
        return LoadMatrix(layer_L, load_LE, Selection(steps))

    def expert_senders(self, expert: int, *, layer: int | None = None,
                       steps: tuple[int, int] | None = None) -> Senders:
        """Which ranks route slots to `expert` (largest first)."""
        lo, hi = _steps(steps)
        d = self._q(EXPERT_SENDERS, lo=lo, hi=hi, layer=_layer(layer), expert=int(expert))
        return Senders(int(expert), _ints(d["src_rank"]), _ints(d["tokens"]))

    # -- ranks and traffic
    def rank_load(self, *, layer: int | None = None,
                  steps: tuple[int, int] | None = None) -> RankLoad:
        """Per rank (all R, zeros included): rows sent/received, slots, bytes received."""
        lo, hi = _steps(steps)
        d = self._q(RANK_LOAD, lo=lo, hi=hi, layer=_layer(layer))
        R = self.info.world_size
        cols = []
        for name in ("sent", "recv", "slots", "recv_bytes"):
            a = np.zeros(R, np.int64)
            a[_ints(d["rank"])] = _ints(d[name])
            cols.append(a)
        return RankLoad(*cols)

    def imbalance(self, *, steps: tuple[int, int] | None = None) -> Imbalance:
        """Per layer: max/mean of received rows over ranks (see Imbalance)."""
        lo, hi = _steps(steps)
        d = self._q(IMBALANCE_PER_LAYER, lo=lo, hi=hi)
        f = lambda k: np.asarray(d[k], dtype=np.float64)  # noqa: E731
        mean_recv, mean_slots = f("mean_recv"), f("mean_slots")
        with np.errstate(divide="ignore", invalid="ignore"):
            imb = np.where(mean_recv > 0, f("max_recv") / mean_recv, 0.0)
            simb = np.where(mean_slots > 0, f("max_slots") / mean_slots, 0.0)
        return Imbalance(_ints(d["layer"]), _ints(d["max_recv"]), mean_recv, _ints(d["max_rank"]),
                         imb, simb, _ints(d["max_slots_rank"]), np.nan_to_num(f("mean_step_imb")),
                         np.nan_to_num(f("worst_imb")), _ints(d["worst_step"]),
                         np.nan_to_num(f("mean_step_slots_imb"), nan=1.0))

    def traffic(self, *, step: int | None = None, layer: int | None = None,
                steps: tuple[int, int] | None = None) -> Traffic:
        """Rank x rank rows/bytes for one `step` (or the `steps` range) and `layer` (None: summed)."""
        lo, hi = (int(step), int(step) + 1) if step is not None else _steps(steps)
        d = self._q(TRAFFIC, lo=lo, hi=hi, layer=_layer(layer))
        R = self.info.world_size
        tokens_RR = np.zeros((R, R), np.int64)
        bytes_RR = np.zeros((R, R), np.int64)
        src, dst = _ints(d["src_rank"]), _ints(d["dst_rank"])
        tokens_RR[src, dst] = _ints(d["tokens"])
        bytes_RR[src, dst] = _ints(d["bytes"])
        return Traffic(tokens_RR, bytes_RR, Selection((lo, hi) if step is not None else steps, layer))

    # -- time
    def stragglers(self, top: int = 5, *, layer: int | None = None, op: str | None = None,
                   steps: tuple[int, int] | None = None) -> Stragglers:
        """Ranks most often last to arrive at a call (calls with a recorded duration only)."""
        lo, hi = _steps(steps)
        d = self._q(STRAGGLERS, lo=lo, hi=hi, layer=_layer(layer), op=op or "", top=int(top))
        f = lambda k: np.asarray(d[k], dtype=np.float64)  # noqa: E731
        return Stragglers(_ints(d["rank"]), _ints(d["last"]), _ints(d["slowest"]), _ints(d["calls"]), f("mean_ns"),
                          _ints(d["max_ns"]), f("mean_excess_ns"), f("mean_late_ns"))

    def slowest_calls(self, top: int = 10, *, layer: int | None = None, op: str | None = None,
                      steps: tuple[int, int] | None = None) -> list[SlowCall]:
        """Calls (buffer, seq) with the longest duration on any rank, and that rank."""
        lo, hi = _steps(steps)
        _, rows = self._rows(SLOWEST_CALLS, lo=lo, hi=hi, layer=_layer(layer), op=op or "", top=int(top))
        return [SlowCall(int(b), int(s), int(st), int(la), o, int(r), int(mx), float(md))
                for b, s, st, la, o, r, mx, md in rows]

    def timeline(self, *, op: str | None = None, layer: int | None = None,
                 steps: tuple[int, int] | None = None) -> Timeline:
        """Summed durations per step x rank."""
        lo, hi = _steps(steps)
        d = self._q(TIMELINE, lo=lo, hi=hi, layer=_layer(layer), op=op or "")
        step_N, rank_N = _ints(d["step"]), _ints(d["rank"])
        step_S = np.unique(step_N)
        out = np.zeros((step_S.size, self.info.world_size), np.int64)
        out[np.searchsorted(step_S, step_N), rank_N] = _ints(d["duration_ns"])
        return Timeline(step_S, out)

    # -- health, replays, free SQL
    def clock(self) -> tuple[NodeClock, ...]:
        """Per node (in order of their lowest rank): its clock offset against the first's."""
        d = self._q(CLOCK)
        out: dict[int, list[int]] = {}
        for i, n in enumerate(_ints(d["node"])):
            out.setdefault(int(n), []).append(i)
        rows = []
        for n, idx in sorted(out.items(), key=lambda kv: int(d["rank"][kv[1][0]])):
            own = _ints(d["rank_offset_ns"])[idx]
            rows.append(NodeClock(n, tuple(int(r) for r in _ints(d["rank"])[idx]),
                                  tuple(sorted({str(d["host"][i]) for i in idx if d["host"][i]})),
                                  int(_ints(d["offset_ns"])[idx[0]]), int(own.max() - own.min()),
                                  int(np.median(_ints(d["calls"])[idx]))))
        return tuple(rows)

    def step_plan(self):
        """How the run's steps were found (epreplay.format.steps.StepPlan; the `steps` table)."""
        import duckdb

        from epreplay.format.steps import NONE, StepPlan

        try:
            _, rows = self._rows("SELECT method, layers_per_step, detail FROM steps")
        except duckdb.CatalogException:  # an index of an older epreplay, kept while being rebuilt
            rows = []
        if not rows:
            return StepPlan(NONE, 0, "not recorded in this index")
        method, lps, detail = rows[0]
        calls = self.info.steps * max(len(self.info.layers), 1) if method == "detected" else 0
        return StepPlan(method, int(lps or 0), detail or "", calls)

    def health(self) -> Health:
        cols, rows = self._rows(SHARDS)
        shards = []
        for row in rows:
            r = dict(zip(cols, row))
            shards.append(ShardHealth(int(r["rank"]), r["path"], int(r["bytes"]), int(r["records"]),
                                      int(r["calls"]), int(r["events"]), bool(r["complete"]),
                                      bool(r["writer_active"]),
                                      None if r["truncated_at"] is None else int(r["truncated_at"]),
                                      int(r["lost_bytes"] or 0), int(r["dropped"] or 0), r["problem"]))
        _, counts = self._rows(CALL_COUNTS)
        return Health(tuple(shards), self.info.missing_ranks, self.info.dropped,
                      tuple((o, s, int(n)) for o, s, n in counts))

    def replays(self) -> list[ReplayRow]:
        cols, rows = self._rows(REPLAYS)
        out = []
        for row in rows:
            r = dict(zip(cols, row))
            out.append(ReplayRow(r["replay"], r["created"], r["backend"], r["device"],
                                 int(r["virtual_ranks"]), int(r["physical_ranks"]), int(r["calls"]),
                                 int(r["divergences"]), int(r["exit_code"]), r["verdict"], r["path"]))
        return out

    def divergences(self, replay: str | None = None, *, limit: int = 1000) -> list[Divergence]:
        """Divergences of one replay (None: all), in replay order."""
        cols, rows = self._rows(DIVERGENCES, replay=replay or "", limit=int(limit))
        names = ["physical" if c == "phys_rank" else c for c in cols]  # the column's name for the field
        return [Divergence(**dict(zip(names, row))) for row in rows]

    def sql(self, text: str) -> SqlResult:
        """Run epreplay's own read-only SQL; UsageError with DuckDB's message when it fails.
        Text from a user goes through `user_sql` instead."""
        import duckdb

        try:
            cols, rows = self._rows(text)
        except duckdb.Error as exc:
            raise UsageError(f"SQL failed: {str(exc).splitlines()[0]}") from None
        return SqlResult(tuple(cols), rows)

    def user_sql(self, text: str, *, allow_external: bool = False) -> SqlResult:
        """Run one user query (see epreplay.index.user_sql): one statement, read-only, and unless
        `allow_external`, no file or network access. This index's connection keeps external
        access off afterwards (DuckDB's setting is per database and locked).

        Raises:
            UsageError: empty SQL, several statements, a refused statement or file access, or
                DuckDB's error (first line).
        """
        import duckdb

        from epreplay.index import user_sql

        one = user_sql.check_statement(self._con, text, allow_external=allow_external)
        if not allow_external:
            user_sql.shut_external_access(self._con)
        try:
            cols, rows = self._rows(one)
        except duckdb.Error as exc:
            raise (user_sql.refused_access(exc)
                   or UsageError(f"SQL failed: {str(exc).splitlines()[0]}")) from None
        return SqlResult(tuple(cols), rows)


def open_index(run: str | os.PathLike[str], *, ensure: bool = True, progress: bool = False) -> RunIndex:
    """Open RUN/index.duckdb read-only; with `ensure`, build or update it first when it is
    missing or stale (unless another writer holds it: then what is there is read).

    Raises:
        UsageError: not a run directory, no shards, or no index and it cannot be built.
    """
    from epreplay.index import build as index_mod
    from epreplay.format.run import RunDir

    rundir = RunDir.open(run)
    if ensure:
        index_mod.ensure_index(rundir.path, progress=progress)
    if not rundir.index_path.exists():
        raise UsageError(f"{rundir.path}: no index yet; build it with 'epreplay index {rundir.path}'")
    return RunIndex(rundir.index_path)
