"""Compare the routing behaviour of two runs (`epreplay diff`): per-layer metrics and a verdict.

Distribution level (always): from each run's expert load per (step, layer, expert) — the
index's `expert_load` table — the per-layer Jensen-Shannon divergence of the expert-load
distributions, the hot-expert sets and what entered/left them, and rank imbalance.
Token level (when tokens can be matched, see epreplay.diff.tokens): top-k Jaccard, top-1
agreement and weight change of the same tokens in both runs.

Legend: S steps, L layers, E experts, R ranks.

Threshold metrics (`--fail-on 'js>0.05'`), each one number for the whole diff:
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from epreplay.diff import metrics
from epreplay.diff.metrics import TokenAgreement
from epreplay.diff.result import Failure, LayerDiff, RunLoads, Threshold
from epreplay.errors import UsageError

# name -> what it means; the order is the order of the summary in every output format.
METRICS: dict[str, str] = {
    "js": "largest per-layer Jensen-Shannon divergence of the expert-load distributions (0..1)",
    "js_mean": "mean per-layer JS divergence over the compared layers (0..1)",
    "hot_changed": "experts that entered the per-layer top-N hot sets, summed over layers",
    "imbalance_a": "largest per-layer rank imbalance of A: expert slots per rank, max/mean per step, "
                   "mean over steps (`epreplay stats`: 'slots per step')",
    "imbalance_b": "largest per-layer rank imbalance of B",
    "imbalance_ratio": "largest per-layer imbalance of B over that of A (>1: B is less balanced)",
    "jaccard": "mean top-k set Jaccard of matched tokens, all layers (0..1, 1 = same experts)",
    "top1": "fraction of matched tokens whose top-1 expert is unchanged (0..1)",
    "weight_change": "mean |weight_A - weight_B| of matched (token, expert) pairs",
    "matched": "fraction of A's dispatched tokens matched to a token of B (0..1)",
}
TOKEN_METRICS = frozenset({"jaccard", "top1", "weight_change", "matched"})
__doc__ += "".join(f"\n  {k:16s} {v}" for k, v in METRICS.items()) + "\n"
__doc__ += """
A metric with nothing to compute it over (agreement of zero matched tokens, weight change
without weights, imbalance without the world size) is not measured: None, never a neutral
value such as 1.0, and a threshold on it fails the diff with the reason (`judge`). A 1.0 over
zero tokens would let a release gate pass two runs that share no token at all.
"""

# Why a metric is not measured: the short reasons shown as "n/a (<reason>)" in every output.
NO_MATCHED_TOKENS = "no matched tokens"
TOKENS_NOT_MATCHED = "tokens not matched"
NO_WEIGHTS = "no weights recorded"
NO_TOKENS_IN_A = "no tokens in A"
NO_WORLD_SIZE = "world size unknown"

# How tokens of two runs get paired (see epreplay.diff.tokens), for a gate that needed them.
HOW_TO_MATCH = ("tokens are matched when both runs ran the same batches (the same step, rank and "
                "position: --match position) or tagged their tokens (capture.tag_tokens(ids) before "
                "each dispatch in both runs: --match tag)")

_THRESHOLD_RE = re.compile(r"^\s*([A-Za-z_0-9]+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")


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
    out.update(jaccard=None, top1=None, weight_change=None, matched=None)
    matched = [r.tokens for r in rows if r.tokens is not None]
    if matched and tokens_a is not None:
        total = sum(matched, TokenAgreement())
        # Agreement over zero tokens is not measured (TokenAgreement's 1.0 means "nothing
        # compared"); the fraction matched is, as 0.0, when A had tokens.
        if total.tokens:
            out["jaccard"], out["top1"] = total.jaccard, total.top1
            out["weight_change"] = total.weight_change if total.weighted else None
        out["matched"] = total.tokens / tokens_a if tokens_a else None
    return {k: out[k] for k in METRICS}


def unmeasured_reasons(summary: dict[str, float | None], rows: Sequence[LayerDiff]) -> dict[str, str]:
    """metric -> short reason (NO_MATCHED_TOKENS, ...) for every metric `summary` has no value of."""
    agreements = [r.tokens for r in rows if r.tokens is not None]
    compared = sum(a.tokens for a in agreements)
    out = {}
    for name, value in summary.items():
        if value is not None:
            continue
        if name not in TOKEN_METRICS:
            out[name] = NO_WORLD_SIZE
        elif not agreements:
            out[name] = TOKENS_NOT_MATCHED
        elif name == "matched":
            out[name] = NO_TOKENS_IN_A
        elif compared == 0:
            out[name] = NO_MATCHED_TOKENS
        else:
            out[name] = NO_WEIGHTS
    return out


def explain_unmeasured(metric: str, reason: str, rows: Sequence[LayerDiff] = ()) -> str:
    """The sentence a failed gate prints for a metric it could not measure: why, and the fix."""
    if reason == NO_MATCHED_TOKENS:
        total = sum(r.unmatched_a + (r.tokens.tokens if r.tokens else 0) for r in rows)
        detail = f"no tokens matched (0 of A's {total} tokens found a partner in B); {HOW_TO_MATCH}"
    elif reason == TOKENS_NOT_MATCHED:
        detail = f"tokens were not matched (the notes say why); {HOW_TO_MATCH}"
    elif reason == NO_WEIGHTS:
        detail = ("no weights recorded for the matched tokens (a low-latency dispatch takes none; "
                  "they come from its ll_combine, so record the combines too)")
    elif reason == NO_WORLD_SIZE:
        detail = ("rank imbalance needs the world size, dividing the expert count (the manifest's "
                  "world_size is missing or does not divide num_experts)")
    else:
        detail = reason
    return f"{metric} could not be measured: {detail}"


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
        return tok.tokens / total if total else None
    if tok.tokens == 0:  # nothing compared in this layer: no agreement to speak of
        return None
    if metric == "weight_change":
        return tok.weight_change if tok.weighted else None
    return getattr(tok, metric)


def judge(summary: dict[str, float | None], thresholds: Sequence[Threshold],
          rows: Sequence[LayerDiff] = ()) -> tuple[Failure, ...]:
    """The thresholds that fail, each with the layers that fail it. A threshold on a metric that
    could not be measured fails too, with the reason: a release gate that passes because tokens
    could not be matched would be worse than no gate."""
    reasons = unmeasured_reasons(summary, rows)
    failures = []
    for th in thresholds:
        value = summary.get(th.metric)
        if value is None:
            why = explain_unmeasured(th.metric, reasons.get(th.metric, "not measured"), rows)
            failures.append(Failure(th, None, why=why))
            continue
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
    def top1(row: LayerDiff) -> float:
        value = layer_value(row, "top1")
        return 1.0 if value is None else value  # unmeasured sorts with "no change"
    return tuple(sorted(rows, key=lambda r: (-r.js, top1(r), r.layer)))

