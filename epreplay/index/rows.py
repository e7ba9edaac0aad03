"""What the index's queries answer (epreplay.index.queries.RunIndex): frozen dataclasses of numpy arrays.

These are the row types the TUI, diff, stats and the replay report share, one per concept.
Legend: E experts, R ranks, L layers, S steps, N rows of a result.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

Steps = tuple[int, int] | None  # [lo, hi) as epreplay.diff.compare.parse_steps returns; None: all steps


@dataclass(frozen=True)
class Selection:
    """A step range and layer a result covers, and what the TUI has selected (shared by every pane).

    Attributes:
        steps: step range [lo, hi) or None for every step.
        layer: one MoE layer or None for all layers summed.
    """

    steps: Steps = None
    layer: int | None = None

    def label(self) -> str:
        if self.steps is None:
            s = "all steps"
        elif self.steps[1] - self.steps[0] == 1:
            s = f"step {self.steps[0]}"
        else:
            s = f"steps {self.steps[0]}..{self.steps[1] - 1}"
        return f"{s}, " + ("all layers" if self.layer is None else f"layer {self.layer}")

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
    selection: Selection = field(default_factory=Selection)  # the steps asked for (the TUI: its selection)


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
    selection: Selection = field(default_factory=Selection)  # the steps and layer asked for


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


# Divergence kinds: see epreplay.replay.verify (what a person should look at first)
KINDS = ("count", "order", "layout", "routing", "payload", "combine", "hang", "error")


@dataclass(frozen=True)
class Divergence:
    """One divergence of one virtual rank at one call: the replay report's entry (replay/verify.py
    finds them), the index's `divergences` row and the TUI's Divergences pane row.

    Attributes:
        call: index in the replay schedule. buffer, seq, step, layer, op: the call.
        rank: virtual (recorded) rank; physical: the replay process hosting it.
        kind: one of KINDS. expected / got: short human-readable values.
        token: source token index where known (-1 unknown); src_rank: its virtual source
            rank (-1 unknown); expert: global expert id (-1 unknown). detail: one sentence.
    """

    call: int
    buffer: int
    seq: int
    step: int
    layer: int
    op: str
    rank: int
    physical: int
    kind: str
    expected: str
    got: str
    token: int = -1
    src_rank: int = -1
    expert: int = -1
    detail: str = ""
    replay: str = ""  # the replay's id once stored in the index ("" in the replay's own report)

    @property
    def phys_rank(self) -> int:
        """`physical` under the index's column name (divergences.phys_rank)."""
        return self.physical

    def to_dict(self) -> dict:
        """The report's JSON entry (without `replay`: the report itself is the replay)."""
        out = asdict(self)
        del out["replay"]
        return out

    def sort_key(self) -> tuple:
        return (self.call, self.rank, KINDS.index(self.kind) if self.kind in KINDS else 99)


@dataclass(frozen=True)
class SqlResult:
    columns: tuple[str, ...]
    rows: list[tuple]
