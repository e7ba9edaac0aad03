"""Render a DiffResult: a JSON-able dict, a rich table for the terminal, Markdown for a PR.

Rendering only: every number comes from epreplay.diff / epreplay.metrics.
"""
from __future__ import annotations

from typing import Any

from epreplay.diff import DiffResult, LayerDiff, RunLoads

JSON_VERSION = 1  # bump when a key of to_dict() changes meaning


def _run_dict(r: RunLoads) -> dict[str, Any]:
    return {
        "path": r.path, "run_id": r.run_id, "release": r.release,
        "num_experts": r.num_experts, "topk": r.topk, "world_size": r.world_size,
        "steps": {"first": r.steps[0] if r.steps else None, "last": r.steps[-1] if r.steps else None,
                  "count": len(r.steps)},
        "layers": list(r.layers),
    }


def _layer_dict(row: LayerDiff) -> dict[str, Any]:
    tok = row.tokens
    return {
        "layer": row.layer, "js": row.js, "slots_a": row.slots_a, "slots_b": row.slots_b,
        "hot_a": list(row.hot.hot_a), "hot_b": list(row.hot.hot_b),
        "hot_entered": list(row.hot.entered), "hot_left": list(row.hot.left),
        "imbalance_a": row.imbalance_a, "imbalance_b": row.imbalance_b,
        "imbalance_ratio": row.imbalance_ratio,
        "matched_tokens": tok.tokens if tok else None,
        "jaccard": tok.jaccard if tok else None,
        "top1": tok.top1 if tok else None,
        "weight_change": tok.weight_change if tok and tok.weighted else None,
        "unmatched_a": row.unmatched_a, "unmatched_b": row.unmatched_b,
    }


def to_dict(res: DiffResult) -> dict[str, Any]:
    """Everything a script needs; layers are worst first (as in the table)."""
    return {
        "version": JSON_VERSION,
        "run_a": _run_dict(res.run_a), "run_b": _run_dict(res.run_b),
        "match": res.match, "top_n": res.top_n, "notes": list(res.notes),
        "summary": dict(res.summary),
        "thresholds": [str(t) for t in res.thresholds],
        "failed": [{"threshold": str(f.threshold), "metric": f.threshold.metric,
                    "op": f.threshold.op, "value": f.threshold.value, "measured": f.measured,
                    "layers": list(f.layers)}
                   for f in res.failures],
        "verdict": res.verdict,
        "verdict_line": res.verdict_line(),
        "layers": [_layer_dict(r) for r in res.layers],
    }


def _f(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _metric(name: str, v: float | None) -> str:
    """A summary value: counts as integers, the rest with 4 decimals."""
    return str(int(v)) if name == "hot_changed" and v is not None else _f(v)


def _ids(ids: tuple[int, ...], limit: int = 6) -> str:
    if not ids:
        return "-"
    shown = ",".join(str(i) for i in ids[:limit])
    return shown + (f",+{len(ids) - limit}" if len(ids) > limit else "")


def _cells(row: LayerDiff) -> list[str]:
    tok = row.tokens
    return [
        str(row.layer), _f(row.js), str(row.slots_a), str(row.slots_b),
        _ids(row.hot.entered), _ids(row.hot.left),
        _f(row.imbalance_a, 2), _f(row.imbalance_b, 2),
        _f(tok.jaccard if tok else None), _f(tok.top1 if tok else None),
        _f(tok.weight_change if tok and tok.weighted else None), str(tok.tokens) if tok else "-",
    ]


HEADERS = ["layer", "JS", "slots A", "slots B", "hot in", "hot out", "imb A", "imb B",
           "jaccard", "top1", "Δw", "matched"]


def _title(res: DiffResult) -> tuple[str, str]:
    def name(r: RunLoads) -> str:
        return f"{r.path}" + (f" ({r.release})" if r.release else "")
    return name(res.run_a), name(res.run_b)


def render_text(res: DiffResult, console: Any) -> None:
    """Print the per-layer table (worst layers first), notes and the verdict to a rich Console."""
    from rich.table import Table

    a, b = _title(res)
    table = Table(title=f"routing diff  A: {a}  B: {b}  (match: {res.match}, hot top-{res.top_n})",
                  title_justify="left")
    for h in HEADERS:
        table.add_column(h, justify="left" if h.startswith("hot") else "right", no_wrap=True)
    failing_js = any(f.threshold.metric in ("js", "js_mean") for f in res.failures)
    for row in res.layers:
        style = "bold red" if failing_js and row.js == res.summary["js"] and row.js > 0 else None
        table.add_row(*_cells(row), style=style)
    console.print(table)
    summary = "  ".join(f"{k}={_metric(k, v)}" for k, v in res.summary.items() if v is not None)
    console.print(f"summary: {summary}", highlight=False)
    for note in res.notes:
        console.print(f"note: {note}", highlight=False)
    colour = "green" if res.passed else "bold red"
    console.print(f"[{colour}]{res.verdict_line()}[/]", highlight=False)


def render_markdown(res: DiffResult) -> str:
    """A pull-request comment: verdict first, then the summary and the per-layer table."""
    a, b = _title(res)
    icon = "✅" if res.passed else "❌"
    lines = [f"### {icon} epreplay diff: {res.verdict_line()}", "",
             f"A: `{a}`  B: `{b}`  match: **{res.match}**, hot top-{res.top_n}", ""]
    if res.failures:
        lines += ["| failed threshold | measured | layers |", "|---|---:|---|"]
        lines += [f"| `{f.threshold}` | {f.measured:.4g} | {_ids(f.layers, 16)} |" for f in res.failures]
        lines.append("")
    lines += ["| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {_metric(k, v)} |" for k, v in res.summary.items()]
    lines.append("")
    lines += ["| " + " | ".join(HEADERS) + " |",
              "|" + "|".join("---" if h.startswith("hot") else "---:" for h in HEADERS) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in res.layers]
    if res.notes:
        lines.append("")
        lines += [f"> {n}" for n in res.notes]
    return "\n".join(lines) + "\n"
