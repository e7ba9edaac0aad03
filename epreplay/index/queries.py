"""Named SQL over a run's index (RUN/index.duckdb) and the small typed API the TUI, diff and stats use.

Every query is a constant below with `$parameters`; `RunIndex` runs them on a read-only connection
and returns frozen dataclasses of numpy arrays (never loose dicts). Each call takes its own cursor,
so a RunIndex may be shared by thread workers (Textual `@work(thread=True)`).

Conventions of every method:
  steps: (A, B) = steps A (included) to B (excluded), as epreplay.diff.compare.parse_steps returns; None = all.
  layer: one MoE layer, None = all layers summed.
  tokens are exact integer counts (int64 arrays); "slots" are (token, k) routing slots.

Legend: E experts, R ranks, L layers, S steps, N rows of a result.
Schema: epreplay/index/schema.sql.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from epreplay.errors import UsageError

_LO, _HI = -(2**31), 2**31 - 1
ALL = -2  # $layer value meaning "every layer" (-1 is a real value: layer unknown)

_RANGE = "step >= $lo AND step < $hi AND ($layer = -2 OR layer = $layer)"

HOT_EXPERTS = f"""
SELECT expert, sum(tokens)::BIGINT AS tokens, sum(sum(tokens)) OVER () ::BIGINT AS total
FROM expert_load WHERE {_RANGE}
GROUP BY expert ORDER BY tokens DESC, expert LIMIT $top"""

HOT_EXPERTS_BY_LAYER = """
SELECT layer, expert, tokens, total FROM (
  SELECT layer, expert, sum(tokens)::BIGINT AS tokens,
         sum(sum(tokens)) OVER (PARTITION BY layer)::BIGINT AS total,
         row_number() OVER (PARTITION BY layer ORDER BY sum(tokens) DESC, expert) AS pos
  FROM expert_load WHERE step >= $lo AND step < $hi GROUP BY layer, expert)
WHERE pos <= $top ORDER BY layer, pos"""

EXPERT_OVER_TIME = f"""
WITH tot AS (SELECT step, sum(tokens)::BIGINT AS total FROM expert_load WHERE {_RANGE} GROUP BY step),
     one AS (SELECT step, sum(tokens)::BIGINT AS tokens FROM expert_load
             WHERE {_RANGE} AND expert = $expert GROUP BY step)
SELECT tot.step, coalesce(one.tokens, 0)::BIGINT AS tokens, tot.total
FROM tot LEFT JOIN one USING (step) ORDER BY tot.step"""

LOAD_MATRIX = """
SELECT layer, expert, sum(tokens)::BIGINT AS tokens FROM expert_load
WHERE step >= $lo AND step < $hi GROUP BY layer, expert"""

RANK_LOAD = f"""
SELECT rank, sum(sent_tokens)::BIGINT AS sent, sum(recv_tokens)::BIGINT AS recv,
       sum(recv_slots)::BIGINT AS slots, sum(recv_bytes)::BIGINT AS recv_bytes
FROM rank_load WHERE {_RANGE} GROUP BY rank ORDER BY rank"""

IMBALANCE_PER_LAYER = """
WITH per_rank AS (
  SELECT layer, rank, sum(recv_tokens) AS recv, sum(recv_slots) AS slots FROM rank_load
  WHERE step >= $lo AND step < $hi GROUP BY layer, rank),
agg AS (
  SELECT layer, max(recv)::BIGINT AS max_recv, avg(recv) AS mean_recv, arg_max(rank, recv) AS max_rank,
         max(slots)::BIGINT AS max_slots, avg(slots) AS mean_slots, arg_max(rank, slots) AS max_slots_rank
  FROM per_rank GROUP BY layer),
per_step AS (
  SELECT layer, step, max(recv_tokens) / nullif(avg(recv_tokens), 0) AS imb,
         max(recv_slots) / nullif(avg(recv_slots), 0) AS slots_imb FROM rank_load
  WHERE step >= $lo AND step < $hi GROUP BY layer, step),
steps AS (SELECT layer, avg(imb) AS mean_step_imb, max(imb) AS worst_imb, arg_max(step, imb) AS worst_step,
                 avg(slots_imb) AS mean_step_slots_imb
          FROM per_step GROUP BY layer)
SELECT layer, max_recv, mean_recv, max_rank, max_slots, mean_slots, max_slots_rank,
       mean_step_imb, worst_imb, worst_step, mean_step_slots_imb
FROM agg JOIN steps USING (layer) ORDER BY layer"""

TRAFFIC = f"""
SELECT src_rank, dst_rank, sum(tokens)::BIGINT AS tokens, sum(bytes)::BIGINT AS bytes
FROM traffic WHERE {_RANGE} GROUP BY src_rank, dst_rank"""

EXPERT_SENDERS = f"""
SELECT src_rank, sum(tokens[$expert + 1])::BIGINT AS tokens FROM expert_load_rank
WHERE {_RANGE} GROUP BY src_rank HAVING sum(tokens[$expert + 1]) > 0 ORDER BY tokens DESC, src_rank"""

# A straggler reaches a collective late; the other ranks wait for it inside the call, so *their*
# durations grow while its own stays short. Ranks are therefore ranked by how often they arrived
# last (at_ns: start_ns on the reference node's clock, aligned_calls in index/schema.sql — hosts'
# clocks differ by more than a call lasts), then by lateness; the duration columns show who
# waited (and a rank slow inside the call, e.g. a bad link).
STRAGGLERS = f"""
WITH c AS (
  SELECT rank, duration_ns,
         duration_ns - median(duration_ns) OVER w AS excess_ns,
         at_ns - min(at_ns) OVER w AS late_ns,
         row_number() OVER (PARTITION BY buffer, seq ORDER BY duration_ns DESC, rank) AS pos,
         row_number() OVER (PARTITION BY buffer, seq ORDER BY at_ns DESC, rank) AS arrival
  FROM aligned_calls WHERE duration_ns >= 0 AND {_RANGE} AND ($op = '' OR op::VARCHAR = $op)
  WINDOW w AS (PARTITION BY buffer, seq))
SELECT rank, count(*) FILTER (WHERE arrival = 1) AS last, count(*) FILTER (WHERE pos = 1) AS slowest,
       count(*) AS calls, avg(duration_ns) AS mean_ns, max(duration_ns) AS max_ns,
       avg(excess_ns) AS mean_excess_ns, avg(late_ns) AS mean_late_ns
FROM c GROUP BY rank ORDER BY last DESC, mean_late_ns DESC, rank LIMIT $top"""

CLOCK = "SELECT rank, node, host, offset_ns, rank_offset_ns, calls FROM clock ORDER BY rank"

SLOWEST_CALLS = f"""
SELECT buffer, seq, min(step) AS step, min(layer) AS layer, min(op)::VARCHAR AS op,
       arg_max(rank, duration_ns) AS rank, max(duration_ns) AS max_ns, median(duration_ns) AS median_ns
FROM calls WHERE duration_ns >= 0 AND {_RANGE} AND ($op = '' OR op::VARCHAR = $op)
GROUP BY buffer, seq ORDER BY max_ns DESC, buffer, seq LIMIT $top"""

TIMELINE = f"""
SELECT step, rank, sum(duration_ns)::BIGINT AS duration_ns FROM calls
WHERE duration_ns >= 0 AND {_RANGE} AND ($op = '' OR op::VARCHAR = $op)
GROUP BY step, rank"""

RUN_INFO = "SELECT * FROM runs"
SHARDS = "SELECT * FROM shards ORDER BY rank"
CALL_COUNTS = """
SELECT op::VARCHAR AS op, status::VARCHAR AS status, count(*) AS n FROM calls GROUP BY ALL ORDER BY ALL"""
STEP_LAYER_RANGE = "SELECT min(step), max(step), count(DISTINCT step), list(DISTINCT layer ORDER BY layer) FROM calls"
REPLAYS = "SELECT * FROM replays ORDER BY created, replay"
DIVERGENCES = """
SELECT * FROM divergences WHERE ($replay = '' OR replay = $replay)
ORDER BY replay, call, rank, kind LIMIT $limit"""


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class RunInfo:
    """The `runs` row: shapes and capture facts of the run."""

    run_id: str
    release: str
    world_size: int
    num_experts: int
    topk: int
    hidden: int
    level: str
    shards: int
    missing_ranks: tuple[int, ...]
    dropped: int
    first_step: int  # -1 when no call has a step
    last_step: int
    steps: int  # distinct steps
    layers: tuple[int, ...]  # distinct layers


@dataclass(frozen=True)
class HotExperts:
    """Experts by routed slots, hottest first. expert_N, tokens_N: int64; share_N: tokens / total."""

    expert_N: np.ndarray
    tokens_N: np.ndarray
    total: int  # slots over every expert in the selection
    layer: int | None = None

    @property
    def share_N(self) -> np.ndarray:
        return self.tokens_N / max(self.total, 1)


@dataclass(frozen=True)
class ExpertSeries:
    """One expert's load per step. step_S, tokens_S, total_S (all experts' slots that step): int64."""

    expert: int
    step_S: np.ndarray
    tokens_S: np.ndarray
    total_S: np.ndarray


@dataclass(frozen=True)
class LoadMatrix:
    """Slots per (layer, expert) over a step range: load_LE [L, E] int64, rows = layer_L."""

    layer_L: np.ndarray
    load_LE: np.ndarray


@dataclass(frozen=True)
class RankLoad:
    """Per rank (index = rank, all R): rows sent/received, slots on its experts, bytes received."""

    sent_R: np.ndarray
    recv_R: np.ndarray
    slots_R: np.ndarray
    recv_bytes_R: np.ndarray

    @property
    def imbalance(self) -> float:
        """max / mean of received rows (1.0 = perfectly balanced)."""
        mean = float(self.recv_R.mean()) if self.recv_R.size else 0.0
        return float(self.recv_R.max()) / mean if mean else 0.0


@dataclass(frozen=True)
class Imbalance:
    """Per layer (row = layer_L): received rows' max/mean over ranks (aggregated over the step
    range: imbalance_L; per step then averaged: mean_step_L; the worst step: worst_L at
    worst_step_L), the most loaded rank max_rank_L, and the same for expert slots (slots_imbalance_L;
    per step then averaged: mean_step_slots_L, which is diff's imbalance)."""

    layer_L: np.ndarray
    max_recv_L: np.ndarray
    mean_recv_L: np.ndarray
    max_rank_L: np.ndarray
    imbalance_L: np.ndarray
    slots_imbalance_L: np.ndarray
    max_slots_rank_L: np.ndarray
    mean_step_L: np.ndarray
    worst_L: np.ndarray
    worst_step_L: np.ndarray
    # expert slots per rank, max/mean per step, averaged over steps: the quantity `epreplay diff`
    # calls a layer's imbalance (diff.RunDistribution.layer_imbalance), so both say one number
    mean_step_slots_L: np.ndarray


@dataclass(frozen=True)
class Traffic:
    """Rank x rank rows and bytes, tokens_RR[src, dst] / bytes_RR[src, dst] int64 ([R, R])."""

    tokens_RR: np.ndarray
    bytes_RR: np.ndarray


@dataclass(frozen=True)
class Senders:
    """Which ranks route slots to one expert: src_N ranks, tokens_N slots (largest first)."""

    expert: int
    src_N: np.ndarray
    tokens_N: np.ndarray


@dataclass(frozen=True)
class Stragglers:
    """Ranks by how often they arrived last at a call (then by mean lateness); see STRAGGLERS.

    rank_N; last_N: calls the rank reached last; slowest_N: calls where it took longest (waiting
    for a straggler, or slow itself); calls_N: its calls; mean_ns_N / max_ns_N: durations;
    excess_ns_N: mean of duration - the call's median over ranks; late_ns_N: mean of start - the
    call's earliest start (clock skew between hosts adds to it)."""

    rank_N: np.ndarray
    last_N: np.ndarray
    slowest_N: np.ndarray
    calls_N: np.ndarray
    mean_ns_N: np.ndarray
    max_ns_N: np.ndarray
    excess_ns_N: np.ndarray
    late_ns_N: np.ndarray


@dataclass(frozen=True)
class SlowCall:
    buffer: int
    seq: int
    step: int
    layer: int
    op: str
    rank: int  # the slowest rank of the call
    max_ns: int
    median_ns: float


@dataclass(frozen=True)
class Timeline:
    """Summed call durations per (step, rank): duration_SR [S, R] int64 ns (0: nothing recorded)."""

    step_S: np.ndarray
    duration_SR: np.ndarray


@dataclass(frozen=True)
class ShardHealth:
    rank: int
    path: str
    bytes: int
    records: int
    calls: int
    events: int
    complete: bool
    writer_active: bool
    truncated_at: int | None
    lost_bytes: int
    dropped: int
    problem: str | None


@dataclass(frozen=True)
class Health:
    """Capture health: per shard, missing ranks, drops, and calls per (op, status)."""

    shards: tuple[ShardHealth, ...]
    missing_ranks: tuple[int, ...]
    dropped: int
    calls_by_op: tuple[tuple[str, str, int], ...]  # (op, status, count)

    @property
    def damaged(self) -> tuple[ShardHealth, ...]:
        return tuple(s for s in self.shards if s.truncated_at is not None)

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.missing_ranks and not self.dropped


@dataclass(frozen=True)
class NodeClock:
    """One node's clock against the reference node's (the index's clock table, epreplay.format.clock).

    offset_ns: subtracted from its ranks' times to align them. spread_ns: max - min of its ranks'
    own estimates (the estimate's noise: they share one clock). calls: collectives used (median)."""

    node: int
    ranks: tuple[int, ...]
    hosts: tuple[str, ...]
    offset_ns: int
    spread_ns: int
    calls: int


@dataclass(frozen=True)
class ReplayRow:
    replay: str
    created: str
    backend: str
    device: str
    virtual_ranks: int
    physical_ranks: int
    calls: int
    divergences: int
    exit_code: int
    verdict: str
    path: str


@dataclass(frozen=True)
class DivergenceRow:
    replay: str
    call: int
    buffer: int
    seq: int
    step: int
    layer: int
    op: str
    rank: int
    phys_rank: int
    kind: str
    token: int
    src_rank: int
    expert: int
    expected: str
    got: str
    detail: str


@dataclass(frozen=True)
class SqlResult:
    columns: tuple[str, ...]
    rows: list[tuple]


# ---------------------------------------------------------------------------------------------
# The API


def _steps(steps: tuple[int, int] | None) -> tuple[int, int]:
    if steps is None:
        return _LO, _HI
    lo, hi = steps
    return (_LO if lo is None else int(lo)), (_HI if hi is None else int(hi))


def _layer(layer: int | None) -> int:
    return ALL if layer is None else int(layer)


def _ints(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


class RunIndex:
    """Read-only queries on RUN/index.duckdb. Build with `open_index`. Thread-safe (cursor per call)."""

    def __init__(self, path: Path) -> None:
        import duckdb

        from epreplay.index.build import connect as index_connect

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
        return LoadMatrix(layer_L, load_LE)

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
        return Traffic(tokens_RR, bytes_RR)

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

    def divergences(self, replay: str | None = None, *, limit: int = 1000) -> list[DivergenceRow]:
        """Divergences of one replay (None: all), in replay order."""
        _, rows = self._rows(DIVERGENCES, replay=replay or "", limit=int(limit))
        return [DivergenceRow(*row) for row in rows]

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
