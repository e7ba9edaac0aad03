"""The short summary `epreplay demo` prints: what moved, which experts are hot, which rank is
loaded, what each pipeline step did, and where to look next."""
from __future__ import annotations

from typing import Any

from epreplay.demo.model import release_layers
from epreplay.demo.pipeline import PipelineResult, available

_STATUS_STYLE = {"ok": "green", "skipped": "yellow", "failed": "bold red", "diverged": "bold red",
                 "incomplete": "yellow"}


def summary_lines(result: PipelineResult) -> list[str]:
    """Plain-text summary (tests read it; print_summary adds colour)."""
    demo = result.demo
    lines: list[str] = []
    if demo is not None:
        cfg = demo.config
        prefill = sum(cfg.is_prefill(s) for s in range(cfg.steps))
        rel = sorted(release_layers(cfg.release, cfg.layers))
        lines.append(
            f"demo: {cfg.ranks} ranks x {cfg.steps} steps ({prefill} prefill, {cfg.steps - prefill} decode) "
            f"x {cfg.layers} layers, top-{cfg.topk} of {cfg.experts} experts, H={cfg.hidden}, "
            f"seed {cfg.seed}" + (f", release {cfg.release!r} (layers {rel})" if cfg.release else "")
            + f", {demo.seconds:.1f} s")
        total_slots = int(demo.load_SLE.sum())
        lines.append(f"rows sent between ranks: {demo.tokens_moved:,} over {cfg.steps} steps x {cfg.layers} "
                     f"layers (a token once per destination rank in normal dispatch, once per expert in "
                     f"low-latency; the index's traffic table; {demo.tokens:,} tokens per layer, "
                     f"{total_slots:,} token-expert assignments)")
        hot = ", ".join(f"e{e} {share:.1%}" for e, share in demo.hottest(5))
        lines.append(f"hottest experts: {hot} (uniform: {1 / cfg.experts:.1%} each)")
        recv = demo.received_R
        top = int(recv.argmax())
        mean = float(recv.mean()) or 1.0
        lines.append(f"most loaded rank: {top} received {int(recv[top]):,} rows, "
                     f"{recv[top] / mean:.2f}x the mean of {mean:,.0f}")
    for step in result.steps:
        secs = f" ({step.seconds:.1f} s)" if step.seconds else ""
        lines.append(f"{step.name}: {step.status}{secs} {step.note}".rstrip())
    if result.out is not None:
        if available("epreplay.tui.cmd_tui"):
            lines.append(f"next: epreplay tui {result.out}")
        else:
            lines.append(f"next: epreplay tui {result.out}   (the TUI is not installed yet; "
                         f"meanwhile: epreplay inspect {result.out})")
    return lines


def summary_dict(result: PipelineResult) -> dict[str, Any]:
    """The summary as JSON-ready data (`epreplay demo --format json`)."""
    from dataclasses import asdict

    doc: dict[str, Any] = {"run": str(result.out) if result.out else None, "exit_code": result.exit_code,
                           "steps": [asdict(s) for s in result.steps]}
    demo = result.demo
    if demo is not None:
        recv = demo.received_R
        doc.update(config=asdict(demo.config), seconds=demo.seconds, tokens=demo.tokens,
                   tokens_moved=demo.tokens_moved,
                   hottest=[{"expert": e, "share": share} for e, share in demo.hottest(5)],
                   received_per_rank=recv.tolist(), most_loaded_rank=int(recv.argmax()),
                   routing_digests=[r.routing_digest for r in demo.ranks])
    rep = result.replay
    if rep is not None:
        doc["replay"] = {"calls": rep.calls, "divergences": rep.divergences, "by_kind": rep.by_kind,
                         "first_divergence": rep.first_divergence, "verdict": rep.verdict}
    if result.out is not None:
        doc["next"] = f"epreplay tui {result.out}"
    return doc


def print_summary(console: Any, result: PipelineResult) -> None:
    """Print summary_lines with the step statuses coloured."""
    from rich.markup import escape

    for line in summary_lines(result):
        head, sep, rest = line.partition(": ")
        if sep and rest.split(" ", 1)[0] in _STATUS_STYLE:
            status, _, tail = rest.partition(" ")
            style = _STATUS_STYLE[status]
            console.print(f"[bold]{escape(head)}[/]: [{style}]{status}[/] {escape(tail)}", highlight=False, soft_wrap=True)
        elif sep:
            console.print(f"[bold]{escape(head)}[/]: {escape(rest)}", highlight=False, soft_wrap=True)
        else:
            console.print(escape(line), highlight=False, soft_wrap=True)
