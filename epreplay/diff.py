"""Compare the routing behaviour of two runs (`epreplay diff`): per-layer metrics and a verdict.

Distribution level (always): from each run's expert load per (step, layer, expert) — the
index's `expert_load` table — the per-layer Jensen-Shannon divergence of the expert-load
distributions, the hot-expert sets and what entered/left them, and rank imbalance.
Token level (when tokens can be matched, see epreplay.diff_tokens): top-k Jaccard, top-1
agreement and weight change of the same tokens in both runs.

Legend: S steps, L layers, E experts, R ranks.

Threshold metrics (`--fail-on 'js>0.05'`), each one number for the whole diff:
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from epreplay import metrics
from epreplay.errors import UsageError
from epreplay.metrics import HotChange, TokenAgreement

# name -> what it means; the order is the order of the summary in every output format.
METRICS: dict[str, str] = {
    "js": "largest per-layer Jensen-Shannon divergence of the expert-load distributions (0..1)",
    "js_mean": "mean per-layer JS divergence over the compared layers (0..1)",
    "hot_changed": "experts that entered the per-layer top-N hot sets, summed over layers",
    "imbalance_a": "largest per-layer rank imbalance (max/mean rank load, mean over steps) of A",
    "imbalance_b": "largest per-layer rank imbalance of B",
    "imbalance_ratio": "largest per-layer imbalance of B over that of A (>1: B is less balanced)",
    "jaccard": "mean top-k set Jaccard of matched tokens, all layers (0..1, 1 = same experts)",
    "top1": "fraction of matched tokens whose top-1 expert is unchanged (0..1)",
    "weight_change": "mean |weight_A - weight_B| of matched (token, expert) pairs",
    "matched": "fraction of A's dispatched tokens matched to a token of B (0..1)",
}
TOKEN_METRICS = frozenset({"jaccard", "top1", "weight_change", "matched"})
__doc__ += "".join(f"\n  {k:16s} {v}" for k, v in METRICS.items()) + "\n"

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda v, x: v >= x, "<=": lambda v, x: v <= x,
    ">": lambda v, x: v > x, "<": lambda v, x: v < x,
}
_THRESHOLD_RE = re.compile(r"^\s*([A-Za-z_0-9]+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")


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


def parse_threshold(text: str) -> Threshold:
    """Parse 'js>0.05', 'top1 < 0.9', 'hot_changed>=3'. Raises UsageError naming known metrics."""
    known = ", ".join(METRICS)
    m = _THRESHOLD_RE.match(text)
    if not m:
        raise UsageError(f"--fail-on {text!r}: expected METRIC>VALUE or METRIC<VALUE "
                         f"(also >=, <=), e.g. 'js>0.05'; metrics: {known}")
    name, op, raw = m.group(1).lower(), m.group(2), m.group(3)
    if name not in METRICS:
        raise UsageError(f"--fail-on {text!r}: unknown metric {name!r}; metrics: {known}")
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"--fail-on {text!r}: {raw!r} is not a number") from None
    if not np.isfinite(value):
        raise UsageError(f"--fail-on {text!r}: the threshold must be a finite number")
    return Threshold(name, op, value)


def parse_steps(text: str | None) -> tuple[int, int] | None:
    """'A:B' -> [A, B) (either end may be omitted), 'N' -> [N, N+1); None -> all steps."""
    if text is None or text.strip() in ("", ":"):
        return None
    try:
        if ":" not in text:
            n = int(text)
            return (n, n + 1)
        lo, hi = text.split(":", 1)
        lo_i = int(lo) if lo.strip() else 0
        hi_i = int(hi) if hi.strip() else 2**31 - 1
    except ValueError:
        raise UsageError(f"--steps {text!r}: expected A:B (A included, B excluded), A:, :B or N") from None
    if lo_i < 0 or hi_i <= lo_i:
        raise UsageError(f"--steps {text!r}: the range is empty; use A:B with 0 <= A < B")
    return (lo_i, hi_i)


def parse_layers(items: Sequence[str] | None) -> frozenset[int] | None:
    """['0,2', '5-7'] -> {0, 2, 5, 6, 7}; None or empty -> all layers."""
    if not items:
        return None
    out: set[int] = set()
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if "-" in part[1:]:
                    lo, hi = part.split("-", 1)
                    out.update(range(int(lo), int(hi) + 1))
                else:
                    out.add(int(part))
            except ValueError:
                raise UsageError(f"--layers {item!r}: expected layer numbers and ranges like 0,2,5-7") from None
    if not out or min(out) < 0:
        raise UsageError(f"--layers {' '.join(items)!r}: no valid layer numbers (they start at 0)")
    return frozenset(out)


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
    of the metric fails it too (the drifted layers; empty for a metric with no per-layer value)."""

    threshold: Threshold
    measured: float
    layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class DiffResult:
    """A whole diff: per-layer rows (worst first), the summary metrics and the verdict.

    Attributes:
        match: the token matching used: "tag", "position" or "none".
        notes: human-readable facts a reader must know (distribution level only, and why; ...).
        summary: metric name (see METRICS) -> value, None where not measurable.
        failures: thresholds that failed. passed: no failures.
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

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "fail"

    def verdict_line(self) -> str:
        """One line: PASS/FAIL, what failed, and the headline numbers."""
        s = self.summary
        head = f"js max {s['js']:.4f}"
        if s.get("top1") is not None:
            head += f", top1 {s['top1']:.4f}, jaccard {s['jaccard']:.4f}"
        if self.failures:
            why = "; ".join(f"{f.threshold.metric}={f.measured:.4g} (fail-on {f.threshold})"
                            + (f" in layer(s) {','.join(map(str, f.layers))}" if f.layers else "")
                            for f in self.failures)
            return f"FAIL: {why} [{head}]"
        checked = f" within {len(self.thresholds)} threshold(s)" if self.thresholds else ""
        return f"PASS{checked}: {head}"


def compare_layers(a: RunLoads, b: RunLoads, *, top_n: int) -> list[LayerDiff]:
    """Distribution-level rows for every layer either run dispatched in (union of layers)."""
    rows = []
    for layer in sorted(set(a.layers) | set(b.layers)):
        la, lb = a.layer_load(layer), b.layer_load(layer)
        tot_a = la.sum(axis=0) if la is not None else np.zeros(a.num_experts, np.int64)
        tot_b = lb.sum(axis=0) if lb is not None else np.zeros(b.num_experts, np.int64)
        rows.append(LayerDiff(
            layer=layer, slots_a=int(tot_a.sum()), slots_b=int(tot_b.sum()),
            js=metrics.js_divergence(tot_a, tot_b), hot=metrics.hot_change(tot_a, tot_b, top_n),
            imbalance_a=a.layer_imbalance(layer), imbalance_b=b.layer_imbalance(layer),
        ))
    return rows


def _max(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def summarize(rows: Sequence[LayerDiff], *, tokens_a: int | None = None) -> dict[str, float | None]:
    """The METRICS values of a diff from its layer rows (token metrics None without matching).

    Args:
        rows: per-layer results. tokens_a: run A's dispatched tokens in the compared layers
            (matched + unmatched), for `matched`; None when tokens were not matched.
    """
    js = [r.js for r in rows]
    out: dict[str, float | None] = {
        "js": max(js) if js else 0.0,
        "js_mean": float(np.mean(js)) if js else 0.0,
        "hot_changed": float(sum(len(r.hot.entered) for r in rows)),
        "imbalance_a": _max([r.imbalance_a for r in rows]),
        "imbalance_b": _max([r.imbalance_b for r in rows]),
        "imbalance_ratio": _max([r.imbalance_ratio for r in rows]),
    }
    matched = [r.tokens for r in rows if r.tokens is not None]
    if matched and tokens_a is not None:
        total = sum(matched, TokenAgreement())
        out["jaccard"], out["top1"] = total.jaccard, total.top1
        out["weight_change"] = total.weight_change if total.weighted else None
        out["matched"] = total.tokens / tokens_a if tokens_a else 1.0
    else:
        out.update(jaccard=None, top1=None, weight_change=None, matched=None)
    return {k: out[k] for k in METRICS}


def layer_value(row: LayerDiff, metric: str) -> float | None:
    """One layer's value of a METRICS name (js and js_mean both read the layer's JS;
    hot_changed its entered experts); None where the layer has none."""
    tok = row.tokens
    if metric in ("js", "js_mean"):
        return row.js
    if metric == "hot_changed":
        return float(len(row.hot.entered))
    if metric in ("imbalance_a", "imbalance_b", "imbalance_ratio"):
        return getattr(row, metric)
    if tok is None:
        return None
    if metric == "matched":
        total = tok.tokens + row.unmatched_a
        return tok.tokens / total if total else 1.0
    if metric == "weight_change":
        return tok.weight_change if tok.weighted else None
    return getattr(tok, metric)


def judge(summary: dict[str, float | None], thresholds: Sequence[Threshold],
          rows: Sequence[LayerDiff] = ()) -> tuple[Failure, ...]:
    """The thresholds that fail, each with the layers that fail it. A threshold on a metric that
    could not be measured raises UsageError: a release gate that silently passes because tokens
    could not be matched would be worse than no gate."""
    failures = []
    for th in thresholds:
        value = summary.get(th.metric)
        if value is None:
            why = ("token-level metrics need matched tokens (and weight_change recorded "
                   "weights); see the notes, or use --match tag/position"
                   if th.metric in TOKEN_METRICS else
                   "rank imbalance needs the world size, dividing the expert count")
            raise UsageError(f"--fail-on {th}: {th.metric} was not measured ({why})")
        if th.fails(value):
            bad = []
            for row in rows:
                v = layer_value(row, th.metric)
                if v is not None and th.fails(v):
                    bad.append(row.layer)
            failures.append(Failure(th, value, tuple(sorted(bad))))
    return tuple(failures)


def worst_first(rows: Sequence[LayerDiff]) -> tuple[LayerDiff, ...]:
    """Sort layers by JS descending, then top-1 agreement ascending, then layer number."""
    return tuple(sorted(rows, key=lambda r: (-r.js, r.tokens.top1 if r.tokens else 1.0, r.layer)))

