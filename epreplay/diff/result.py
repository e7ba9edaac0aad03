"""What a diff is made of: one run's expert load (RunLoads), one layer's comparison (LayerDiff), a
`--fail-on` threshold and its failure, and the whole result (DiffResult) that render and the TUI read.

Legend: S steps, L layers, E experts, R ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from epreplay.diff import metrics
from epreplay.diff.metrics import HotChange, TokenAgreement

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda v, x: v >= x, "<=": lambda v, x: v <= x,
    ">": lambda v, x: v > x, "<": lambda v, x: v < x,
}


@dataclass(frozen=True)
class Threshold:
    """One `--fail-on` condition: the diff fails when `metric op value` holds."""

    metric: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"

    def fails(self, measured: float) -> bool:
        return _OPS[self.op](measured, self.value)


@dataclass(frozen=True, eq=False)
class RunLoads:
    """Expert load of one run over the selected steps and layers (from its index).

    Attributes:
        path: the run directory as given. run_id / release: from the manifest.
        num_experts: E. topk: K. world_size: R (0 / unknown where the run did not say).
        steps: [S] step numbers. layers: [L] layer numbers.
        load_SLE: [S, L, E] int64 (t, k) slots routed to each expert, summed over ranks.
        rank_SLR: [S, L, R] int64 slots landing on each rank's experts (the index's
            rank_load.recv_slots), or None to derive it from load_SLE with DeepEP's contiguous
            placement of E / R experts per rank.
    """

    path: str
    run_id: str
    release: str
    num_experts: int
    topk: int
    world_size: int
    steps: tuple[int, ...]
    layers: tuple[int, ...]
    load_SLE: np.ndarray
    rank_SLR: np.ndarray | None = None

    def layer_load(self, layer: int) -> np.ndarray | None:
        """[S, E] load of one layer, or None when the run never dispatched in it."""
        if layer not in self.layers:
            return None
        return self.load_SLE[:, self.layers.index(layer), :]

    def layer_imbalance(self, layer: int) -> float | None:
        """Mean over the steps with load of max/mean rank load in `layer`; 1.0 for a layer the
        run never dispatched in; None when ranks are unknown or do not divide the experts."""
        if layer not in self.layers:
            return 1.0
        li = self.layers.index(layer)
        if self.rank_SLR is not None:
            rank_SR = self.rank_SLR[:, li, :]
        elif self.world_size > 0 and self.num_experts % self.world_size == 0:
            rank_SR = self.load_SLE[:, li, :].reshape(len(self.steps), self.world_size, -1).sum(axis=2)
        else:
            return None
        loaded_S = rank_SR.any(axis=1)  # steps in which the layer saw no token do not count
        return float(metrics.imbalance_rows(rank_SR[loaded_S]).mean()) if loaded_S.any() else 1.0


@dataclass(frozen=True)
class LayerDiff:
    """Everything the diff says about one layer. `tokens` is None without token matching."""

    layer: int
    slots_a: int
    slots_b: int
    js: float
    hot: HotChange
    imbalance_a: float | None
    imbalance_b: float | None
    tokens: TokenAgreement | None = None
    unmatched_a: int = 0
    unmatched_b: int = 0

    @property
    def imbalance_ratio(self) -> float | None:
        if self.imbalance_a is None or self.imbalance_b is None:
            return None
        return self.imbalance_b / self.imbalance_a


@dataclass(frozen=True)
class Failure:
    """A threshold that failed, the diff's value of its metric, and the layers whose own value
    of the metric fails it too (the drifted layers; empty for a metric with no per-layer value).
    `measured` None: the metric could not be measured, and `why` says why and what to do."""

    threshold: Threshold
    measured: float | None
    layers: tuple[int, ...] = ()
    why: str = ""

    def describe(self) -> str:
        """'top1=0.83 (fail-on top1<0.9) in layer(s) 1,3' or 'top1 could not be measured (...)'."""
        th = self.threshold
        if self.measured is None:
            return f"{th.metric} could not be measured (fail-on {th})"
        where = f" in layer(s) {','.join(map(str, self.layers))}" if self.layers else ""
        return f"{th.metric}={self.measured:.4g} (fail-on {th}){where}"


@dataclass(frozen=True)
class DiffResult:
    """A whole diff: per-layer rows (worst first), the summary metrics and the verdict.

    Attributes:
        match: the token matching used: "tag", "position" or "none".
        notes: human-readable facts a reader must know (distribution level only, and why; ...).
        summary: metric name (see METRICS) -> value, None where not measurable.
        failures: thresholds that failed. passed: no failures (also true with no thresholds:
            `verdict` then says "unjudged").
        unmeasured: metric name -> short reason, for every None in `summary`.
    """

    run_a: RunLoads
    run_b: RunLoads
    layers: tuple[LayerDiff, ...]
    match: str
    top_n: int
    notes: tuple[str, ...]
    summary: dict[str, float | None]
    thresholds: tuple[Threshold, ...] = ()
    failures: tuple[Failure, ...] = field(default=())
    unmeasured: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def verdict(self) -> str:
        """"fail", "pass" (within every threshold), or "unjudged" (no threshold given)."""
        if self.failures:
            return "fail"
        return "pass" if self.thresholds else "unjudged"

    def value_text(self, metric: str) -> str:
        """A summary value for people: 4 decimals (counts as integers), or 'n/a (<reason>)'."""
        v = self.summary.get(metric)
        if v is None:
            return f"n/a ({self.unmeasured.get(metric, 'not measured')})"
        return str(int(v)) if metric == "hot_changed" else f"{v:.4f}"

    def verdict_line(self) -> str:
        """One line: FAIL / PASS / nothing judged, what failed, and the headline numbers."""
        s = self.summary
        head = f"js max {s['js']:.4f}"
        if self.match != "none":
            head += f", top1 {self.value_text('top1')}, jaccard {self.value_text('jaccard')}"
        if self.failures:
            return f"FAIL: {'; '.join(f.describe() for f in self.failures)} [{head}]"
        if not self.thresholds:
            # Without a gate nothing was judged; "PASS" here would read as a verdict in CI logs.
            return (f"no thresholds given: nothing judged (pass --fail-on, e.g. --fail-on 'js>0.05' "
                    f"--fail-on 'top1<0.9') [{head}]")
        return f"PASS within {len(self.thresholds)} threshold(s): {head}"
