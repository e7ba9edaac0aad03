"""Render a DiffResult: a JSON-able dict, a rich table for the terminal, Markdown for a PR.

Rendering only: every number comes from epreplay.diff.compare / epreplay.diff.metrics.
"""
from __future__ import annotations

from typing import Any

from epreplay.diff.compare import layer_value
from epreplay.diff.result import DiffResult, LayerDiff, RunLoads

# Bump when a key of to_dict() changes meaning. 2: verdict "unjudged" without thresholds; a
# failed threshold may have "measured": null with "why"; "unmeasured" gives the reason of every
# null in "summary"; agreement over zero matched tokens is null (1.0 in version 1).
JSON_VERSION = 2


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
        "jaccard": layer_value(row, "jaccard"),
        "top1": layer_value(row, "top1"),
        "weight_change": layer_value(row, "weight_change"),
        "unmatched_a": row.unmatched_a, "unmatched_b": row.unmatched_b,
    }


def to_dict(res: DiffResult) -> dict[str, Any]:
    """Everything a script needs; layers are worst first (as in the table)."""
    return {
        "version": JSON_VERSION,
        "run_a": _run_dict(res.run_a), "run_b": _run_dict(res.run_b),
        "match": res.match, "top_n": res.top_n, "notes": list(res.notes),
        "summary": dict(res.summary), "unmeasured": dict(res.unmeasured),
        "thresholds": [str(t) for t in res.thresholds],
        "failed": [{"threshold": str(f.threshold), "metric": f.threshold.metric,
                    "op": f.threshold.op, "value": f.threshold.value, "measured": f.measured,
                    "layers": list(f.layers), "why": f.why}
                   for f in res.failures],
        "verdict": res.verdict,
        "verdict_line": res.verdict_line(),
        "layers": [_layer_dict(r) for r in res.layers],
    }


def _f(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


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
        _f(layer_value(row, "jaccard")), _f(layer_value(row, "top1")),
        _f(layer_value(row, "weight_change")), str(tok.tokens) if tok else "-",
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
    summary = "  ".join(f"{k}={res.value_text(k)}" for k in res.summary)
    console.print(f"summary: {summary}", highlight=False, markup=False)
    for note in res.notes:
        console.print(f"note: {note}", highlight=False, markup=False)
    for f in res.failures:
        if f.why:
            console.print(f"fail-on {f.threshold}: {f.why}", style="red", highlight=False, markup=False)
    colour = {"pass": "green", "fail": "bold red"}.get(res.verdict, "yellow")
    console.print(res.verdict_line(), style=colour, highlight=False, markup=False)


def render_markdown(res: DiffResult) -> str:
    """A pull-request comment: verdict first, then the summary and the per-layer table."""
    a, b = _title(res)
    icon = {"pass": "✅", "fail": "❌"}.get(res.verdict, "➖")
    lines = [f"### {icon} epreplay diff: {res.verdict_line()}", "",
             f"A: `{a}`  B: `{b}`  match: **{res.match}**, hot top-{res.top_n}", ""]
    if res.failures:
        lines += ["| failed threshold | measured | layers |", "|---|---:|---|"]
        lines += [f"| `{f.threshold}` | {'n/a' if f.measured is None else f'{f.measured:.4g}'} | "
                  f"{_ids(f.layers, 16)} |" for f in res.failures]
        lines.append("")
        lines += [f"**`{f.threshold}`**: {f.why}  " for f in res.failures if f.why]
        if any(f.why for f in res.failures):
            lines.append("")
    lines += ["| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {res.value_text(k)} |" for k in res.summary]
    lines.append("")
    lines += ["| " + " | ".join(HEADERS) + " |",
              "|" + "|".join("---" if h.startswith("hot") else "---:" for h in HEADERS) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in res.layers]
    if res.notes:
        lines.append("")
        lines += [f"> {n}" for n in res.notes]
    return "\n".join(lines) + "\n"
