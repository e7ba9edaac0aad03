"""`epreplay stats RUN`: the headline answers about a run — hottest experts, most loaded ranks,
imbalance per layer, stragglers, drops and truncation — as rich tables or JSON.

Reads the index read-only; updates it first when stale (a capture still writing shards is indexed
as far as it got), unless another process is writing it: then it reads what is there and says so.
"""
from __future__ import annotations

import argparse

HELP = "headline statistics of a run: hot experts, loaded ranks, imbalance, stragglers, health"

EPILOG = """examples:
  epreplay stats runs/r1
  epreplay stats runs/r1 --layer 3 --steps 100:200 --top 5
  epreplay stats runs/r1 --format json | jq '.imbalance'
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("run", metavar="RUN", help="run directory")
    parser.add_argument("--top", type=int, default=10, metavar="N", help="rows per table (default 10)")
    parser.add_argument("--layer", type=int, default=None, metavar="L", help="one MoE layer only")
    parser.add_argument("--steps", default=None, metavar="A:B",
                        help="steps A (included) to B (excluded); A:, :B or N")
    parser.add_argument("--format", choices=("text", "json"), default="text")


def parse_steps(text: str | None) -> tuple[int, int] | None:
    """'A:B' -> (A, B) half-open, 'N' -> (N, N+1), None -> all steps."""
    from epreplay.errors import UsageError

    if text is None or text.strip() in ("", ":"):
        return None
    try:
        if ":" not in text:
            return int(text), int(text) + 1
        lo, hi = text.split(":", 1)
        lo_i = int(lo) if lo.strip() else -(2**31)
        hi_i = int(hi) if hi.strip() else 2**31 - 1
    except ValueError:
        raise UsageError(f"--steps {text!r}: expected A:B (A included, B excluded), A:, :B or N") from None
    if hi_i <= lo_i:
        raise UsageError(f"--steps {text!r}: the range is empty; use A:B with A < B")
    return lo_i, hi_i


def check_steps(text: str | None, steps: tuple[int, int] | None, first: int, last: int) -> None:
    """UsageError when --steps selects no step of the run (steps first..last; first -1: the run
    has no stepped call yet): empty tables with exit 0 would read as "nothing happened there"."""
    from epreplay.errors import UsageError

    if steps is None or first < 0:
        return
    lo, hi = steps
    if hi <= first or lo > last:
        raise UsageError(f"--steps {text}: outside the run, which recorded steps {first}..{last}; "
                         f"choose a range that overlaps {first}:{last + 1}")


def gather(ix, *, top: int, layer: int | None, steps: tuple[int, int] | None) -> dict:
    """Everything stats shows, as one JSON-able dict (also what --format json prints)."""
    info = ix.info
    if layer is not None and info.layers and layer not in info.layers:
        from epreplay.errors import UsageError

        raise UsageError(f"--layer {layer}: the run has layers {', '.join(map(str, info.layers))}")
    hot = ix.hot_experts(top, layer=layer, steps=steps)
    ranks = ix.rank_load(layer=layer, steps=steps)
    order = ranks.recv_R.argsort()[::-1][:top]
    mean_recv = float(ranks.recv_R.mean()) if ranks.recv_R.size else 0.0
    imb = ix.imbalance(steps=steps)
    strag = ix.stragglers(top, layer=layer, steps=steps)
    health = ix.health()
    clock = ix.clock()
    pick = imb.layer_L == layer if layer is not None else slice(None)
    plan = ix.step_plan()
    return {
        "run": {"run_id": info.run_id, "release": info.release, "world_size": info.world_size,
                "num_experts": info.num_experts, "topk": info.topk, "level": info.level,
                "steps": info.steps, "first_step": info.first_step, "last_step": info.last_step,
                "layers": list(info.layers),
                "steps_found": {"method": plan.method, "layers_per_step": plan.layers_per_step,
                                "detail": plan.detail, "text": plan.describe()}},
        "selection": {"layer": layer, "steps": list(steps) if steps else None, "top": top},
        "hot_experts": [{"expert": int(e), "tokens": int(t), "share": round(float(s), 5),
                         "rank": int(e) // max(info.num_experts // max(info.world_size, 1), 1)}
                        for e, t, s in zip(hot.expert_N, hot.tokens_N, hot.share_N)],
        "total_slots": hot.total,
        "loaded_ranks": [{"rank": int(r), "recv_tokens": int(ranks.recv_R[r]),
                          "vs_mean": round(float(ranks.recv_R[r]) / mean_recv, 4) if mean_recv else 0.0,
                          "recv_slots": int(ranks.slots_R[r]), "sent_tokens": int(ranks.sent_R[r]),
                          "recv_bytes": int(ranks.recv_bytes_R[r])} for r in order],
        "imbalance": [{"layer": int(l), "imbalance": round(float(i), 4),
                       "slots_imbalance": round(float(si), 4), "max_rank": int(mr),
                       "mean_step": round(float(ms), 4), "worst": round(float(w), 4), "worst_step": int(ws),
                       "slots_mean_step": round(float(ss), 4)}
                      for l, i, si, mr, ms, w, ws, ss in zip(
                          imb.layer_L[pick], imb.imbalance_L[pick], imb.slots_imbalance_L[pick],
                          imb.max_rank_L[pick], imb.mean_step_L[pick], imb.worst_L[pick],
                          imb.worst_step_L[pick], imb.mean_step_slots_L[pick])],
        "stragglers": [{"rank": int(r), "last_arrivals": int(la), "late_us": round(float(lt) / 1e3, 1),
                        "slowest_calls": int(s), "calls": int(c),
                        "mean_us": round(float(m) / 1e3, 1), "max_us": round(float(x) / 1e3, 1),
                        "excess_us": round(float(e) / 1e3, 1)}
                       for r, la, lt, s, c, m, x, e in zip(
                           strag.rank_N, strag.last_N, strag.late_ns_N, strag.slowest_N, strag.calls_N,
                           strag.mean_ns_N, strag.max_ns_N, strag.excess_ns_N)],
        "clock": {"skew_ns": (max(n.offset_ns for n in clock) - min(n.offset_ns for n in clock)) if clock else 0,
                  "nodes": [{"node": n.node, "ranks": list(n.ranks), "hosts": list(n.hosts),
                             "offset_ns": n.offset_ns, "spread_ns": n.spread_ns, "calls": n.calls}
                            for n in clock]},
        "health": {"ok": health.ok, "missing_ranks": list(health.missing_ranks), "dropped": health.dropped,
                   "shards": [{"rank": s.rank, "bytes": s.bytes, "records": s.records,
                               "complete": s.complete, "writer_active": s.writer_active,
                               "truncated_at": s.truncated_at, "lost_bytes": s.lost_bytes,
                               "dropped": s.dropped, "problem": s.problem}
                              for s in health.shards if s.problem or s.dropped or not s.complete],
                   "calls": [{"op": o, "status": st, "count": n} for o, st, n in health.calls_by_op]},
    }


def render(d: dict, note: str | None) -> None:
    from rich.console import Console

    from epreplay.cli.cmd_inspect import no_shard
    from rich.table import Table

    con = Console()
    r, sel = d["run"], d["selection"]
    scope = []
    if sel["layer"] is not None:
        scope.append(f"layer {sel['layer']}")
    if sel["steps"]:
        scope.append(f"steps {sel['steps'][0]}:{sel['steps'][1]}")
    con.print(f"[bold]run[/bold] {r['run_id']} {r['release']}: {r['world_size']} ranks, "
              f"{r['num_experts']} experts top-{r['topk']}, {r['steps']} steps "
              f"({r['first_step']}..{r['last_step']}), {len(r['layers'])} layers, level {r['level']}"
              + (f" — {', '.join(scope)}" if scope else ""))
    con.print(r["steps_found"]["text"], markup=False, highlight=False)
    if note:
        con.print(f"[yellow]note:[/yellow] {note}")
    t = Table(title="hottest experts", title_justify="left")
    for c in ("expert", "on rank", "slots", "share"):
        t.add_column(c, justify="right")
    for h in d["hot_experts"]:
        t.add_row(str(h["expert"]), str(h["rank"]), f"{h['tokens']:,}", f"{100 * h['share']:.2f}%")
    con.print(t)
    t = Table(title="most loaded ranks (rows received)", title_justify="left")
    for c in ("rank", "received", "x mean", "slots", "sent", "MB received"):
        t.add_column(c, justify="right")
    for x in d["loaded_ranks"]:
        t.add_row(str(x["rank"]), f"{x['recv_tokens']:,}", f"{x['vs_mean']:.2f}", f"{x['recv_slots']:,}",
                  f"{x['sent_tokens']:,}", f"{x['recv_bytes'] / 1e6:,.1f}")
    con.print(t)
    t = Table(title="imbalance per layer (max/mean over ranks; rows received, or expert slots; "
                    "'slots per step' is what `epreplay diff` calls imbalance)", title_justify="left")
    for c in ("layer", "rows", "slots", "most loaded", "rows per step", "worst step", "at step",
              "slots per step"):
        t.add_column(c, justify="right")
    for x in d["imbalance"]:
        t.add_row(str(x["layer"]), f"{x['imbalance']:.3f}", f"{x['slots_imbalance']:.3f}", str(x["max_rank"]),
                  f"{x['mean_step']:.3f}", f"{x['worst']:.3f}", str(x["worst_step"]),
                  f"{x['slots_mean_step']:.3f}")
    con.print(t)
    if d["stragglers"]:
        t = Table(title="stragglers (last to arrive at a call; the others wait inside it)",
                  title_justify="left")
        for c in ("rank", "last in", "of calls", "late us", "slowest in", "mean us", "max us", "excess us"):
            t.add_column(c, justify="right")
        for x in d["stragglers"]:
            t.add_row(str(x["rank"]), str(x["last_arrivals"]), str(x["calls"]), f"{x['late_us']:,.0f}",
                      str(x["slowest_calls"]), f"{x['mean_us']:,.0f}", f"{x['max_us']:,.0f}",
                      f"{x['excess_us']:,.0f}")
        con.print(t)
    else:
        con.print("stragglers: no call durations recorded")
    c = d["clock"]
    if len(c["nodes"]) > 1:  # one node: one clock, nothing to say
        con.print(f"[bold]clock skew across nodes[/bold]: {c['skew_ns'] / 1e6:,.3f} ms; arrival "
                  f"times above are aligned to node {c['nodes'][0]['node']}'s clock")
        for n in c["nodes"]:
            con.print(f"  node {n['node']} ({', '.join(n['hosts']) or 'host unknown'}, ranks "
                      f"{span(n['ranks'])}): {n['offset_ns'] / 1e6:+,.3f} ms (ranks agree within "
                      f"{n['spread_ns'] / 1e6:,.3f} ms over {n['calls']} calls)", markup=False, highlight=False)
    h = d["health"]
    if h["ok"] and not h["shards"]:
        con.print("[green]capture health: every shard complete, nothing dropped or truncated[/green]")
        return
    con.print(f"[bold]capture health[/bold]: dropped {h['dropped']} record(s)"
              + (f"; {no_shard(h['missing_ranks'])}" if h["missing_ranks"] else ""))
    for s in h["shards"]:
        state = ("being written" if s["writer_active"] else
                 f"truncated at byte {s['truncated_at']} ({s['lost_bytes']} bytes lost)"
                 if s["truncated_at"] is not None else "no footer")
        con.print(f"  rank {s['rank']}: {state}; {s['records']} records indexed"
                  + (f"; {s['dropped']} dropped" if s["dropped"] else "")
                  + (f" — {s['problem']}" if s["problem"] else ""), markup=False, highlight=False)


def span(ranks: list[int]) -> str:
    """[0, 1, 2, 3, 8] -> '0-3, 8'."""
    out: list[str] = []
    for r in sorted(ranks):
        if out and r == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{r}"
        else:
            out.append(str(r))
    return ", ".join(out)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from epreplay.errors import UsageError
    from epreplay.index.build import ensure_index
    from epreplay.index.queries import RunIndex
    from epreplay.format.run import RunDir

    if args.top < 1:
        raise UsageError(f"--top {args.top}: need N >= 1")
    steps = parse_steps(args.steps)
    rundir = RunDir.open(args.run)
    res = ensure_index(rundir.path, progress=args.format == "text" and sys.stderr.isatty())
    note = None
    if res.action == "locked":
        if not rundir.index_path.exists():
            raise UsageError(f"{rundir.index_path}: being built by another process and not there yet; "
                             f"retry when 'epreplay index' finishes")
        note = "another process is updating the index; showing what was indexed before it started"
    with RunIndex(rundir.index_path) as ix:
        check_steps(args.steps, steps, ix.info.first_step, ix.info.last_step)
        d = gather(ix, top=args.top, layer=args.layer, steps=steps)
    if any(s["writer_active"] for s in d["health"]["shards"]):
        note = (note + "; " if note else "") + "a capture is still writing shards: these are the steps recorded so far"
    if args.format == "json":  # a broken pipe (`| head`) is handled once, in epreplay.cli
        d["note"] = note
        json.dump(d, sys.stdout, indent=1)
        print()
    else:
        render(d, note)
    return 0
