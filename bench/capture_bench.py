"""Capture overhead on CPU: time per demo step with capture off and at each level, 4 gloo ranks.

    python bench/capture_bench.py [--ranks 4] [--rounds 3] [--tokens 64] [--hidden 128]
                                  [--layers 4] [--experts 32] [--decode-tokens 32]

Legend: T tokens per rank (prefill), H hidden, E experts, R ranks.

Each rank runs the `epreplay demo` workload (epreplay.demo_*: DeepSeek-V3-style group-limited
router, FP8 prefill dispatch through the normal kernels every 3rd step, low-latency decode steps,
SwiGLU experts and a shared expert) through the emulated Buffer. One process group serves every
mode: capture.start()/stop() switch between off, counts, routing, fingerprints and payload, and the
modes are interleaved over several rounds (the median round counts), so the load of a shared
machine drifting during the run hits every mode alike. Every session's first step (step 0) runs
before the timed steps: what it costs above the same step with capture off is the session's
start-up ("start ms": the ring, the writer process, the compiled hook learning its plans), paid
once per session; the timed steps are the steady state a long recording runs in. Prints one
table: ms per step (rank 0, between barriers), ratio to off, the ratio including the writer's drain
at stop(), the start-up, the hooks' own time per call in the timed steps (every rank; wall time,
so a rank preempted inside a hook on a loaded machine counts the wait: bench/capture_hotpath.py is
the per-call figure), the writer processes' CPU per record (their start-up included), calls dropped, and bytes written per token-layer (all shards / (tokens
routed x layers)).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from epreplay.launch import run_ranks

MODES = ["off", "counts", "routing", "fingerprints", "payload"]


def _rank(ctx, args: dict, root: str) -> dict:
    import torch
    import torch.distributed as dist

    from epreplay import capture, marks
    from epreplay.demo.config import DemoConfig
    from epreplay.demo.model import rank_batch, rms_norm, route_layer, swiglu
    from epreplay.demo.run import _Card
    from epreplay.emulate import Buffer

    if args["switch_interval"]:
        sys.setswitchinterval(args["switch_interval"])  # every mode alike, "off" included
    cfg = DemoConfig(ranks=ctx.world_size, steps=args["steps"], layers=args["layers"],
                     experts=args["experts"], hidden=args["hidden"], prefill_tokens=args["tokens"],
                     decode_tokens=args["decode_tokens"])
    card = _Card(cfg, ctx.rank, ctx.world_size, ctx.device, Buffer)
    stats_L = torch.zeros(card.L, dtype=torch.int32)
    batches = [rank_batch(cfg, s, ctx.rank) for s in range(cfg.steps)]
    tokens = sum(len(tags) for _, tags in batches)

    def demo_step(s: int) -> None:  # the body of epreplay.demo.run.rank_main, one step
        x0, tags = batches[s]
        h_TH = torch.from_numpy(x0)
        with marks.step(s):
            for layer in range(cfg.layers):
                with marks.layer(layer):
                    u_TH = rms_norm(h_TH)
                    idx_TK, w_TK = route_layer(cfg, layer, h_TH)
                    if cfg.is_prefill(s):
                        routed, _ = card.moe_normal(layer, u_TH, idx_TK, w_TK, tags)
                    else:
                        routed, _ = card.moe_ll(layer, u_TH, idx_TK, w_TK, tags, stats_L)
                    h_TH = h_TH + swiglu(u_TH, card.expert(layer, -1)) + cfg.routed_feedback * routed

    for s in range(cfg.steps):
        demo_step(s)  # warm-up: expert weights, gloo connections
    modes = MODES + (["counts-hot", "routing-hot"] if args["diagnose"] else []) \
        + (["routing-thread", "fingerprints-thread"] if args["compare_writers"] else []) \
        + (["routing-ring", "fingerprints-ring", "routing-courier", "fingerprints-courier"]
           if args["compare_paths"] else [])
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    firsts: dict[str, list[float]] = {m: [] for m in modes}
    hooks: dict[str, list[tuple[int, int]]] = {m: [] for m in modes}  # (hook ns, calls) of the timed steps
    facts_by_mode: dict[str, list[dict]] = {m: [] for m in modes}
    for rnd in range(args["rounds"]):
        for mode in modes:
            if mode != "off":
                level = mode.split("-")[0]
                writer = "thread" if mode.endswith("-thread") else "process"
                hot_path = "courier" if mode.endswith(("-courier", "-hot")) else \
                    "ring" if mode.endswith("-ring") else "auto"
                capture.start(os.path.join(root, f"{mode}-{rnd}"), level=level, writer=writer,
                              hot_path=hot_path)
                if mode.endswith("-hot"):  # diagnostic: stage every call, hand nothing to the writer
                    from epreplay.capture import session

                    rec = session.recorder(card.normal)
                    rec._enqueue = lambda call, force=False: None
            dist.barrier()
            t0 = time.perf_counter()
            demo_step(0)  # the session's start-up: not timed with the steady steps
            dist.barrier()
            firsts[mode].append(time.perf_counter() - t0)
            if mode != "off":
                from epreplay.capture import session

                hot0 = session.recorder(card.normal).hook_totals()
            t0 = time.perf_counter()
            for s in range(cfg.steps):
                demo_step(s)
            dist.barrier()
            t1 = time.perf_counter()
            if mode != "off":
                hot1 = session.recorder(card.normal).hook_totals()
                hooks[mode].append((hot1[0] - hot0[0], hot1[1] - hot0[1]))
            facts = capture.stop() if mode != "off" else None
            dist.barrier()
            t2 = time.perf_counter()
            times[mode].append(((t1 - t0) / cfg.steps, (t2 - t0) / cfg.steps))
            if facts:
                facts_by_mode[mode].append(facts)
    card.destroy()
    return {"times": times, "firsts": firsts, "hooks": hooks, "facts": facts_by_mode,
            "tokens": tokens + len(batches[0][1])}  # the start-up step's tokens are recorded too


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every mode")
    p.add_argument("--steps", type=int, default=6, help="demo steps per round (every 3rd is prefill)")
    p.add_argument("--tokens", type=int, default=64, help="prefill tokens per rank")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--compare-paths", action="store_true",
                   help="also routing/fingerprints through the Python hook into the ring (LEVEL-ring) "
                        "and through the courier thread (LEVEL-courier), the hot paths the compiled "
                        "hook and the ring replaced: before and after in one run")
    p.add_argument("--compare-writers", action="store_true",
                   help="also routing/fingerprints with the in-process writer thread (LEVEL-thread)")
    p.add_argument("--diagnose", action="store_true",
                   help="also time counts-hot / routing-hot: the hot path alone (no writer work)")
    p.add_argument("--switch-interval", type=float, default=0.0,
                   help="sys.setswitchinterval in the ranks (0: Python's default 5 ms)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="capture-bench-") as root:
        per_rank = run_ranks(_rank, a.ranks, vars(a), root, timeout=1200)
    r0 = per_rank[0]["times"]
    off = statistics.median(t for t, _ in r0["off"])
    token_layers = sum(r["tokens"] for r in per_rank) * a.layers
    print(f"capture overhead: {a.ranks} CPU ranks (gloo), epreplay demo workload: T={a.tokens} prefill / "
          f"M={a.decode_tokens} decode tokens per rank, H={a.hidden}, E={a.experts}, {a.layers} MoE layers, "
          f"{a.steps} steps x {a.rounds} interleaved rounds (median)")
    print(f"command: python bench/capture_bench.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    first_off = statistics.median(per_rank[0]["firsts"]["off"])
    print(f"{'mode':<20}{'ms/step':>9}{'ratio':>8}{'incl. drain':>13}{'start ms':>10}{'hook us/call':>14}"
          f"{'writer us/rec':>15}{'dropped':>9}{'B/token-layer':>15}")
    for mode in MODES + (["counts-hot", "routing-hot"] if a.diagnose else []) \
            + (["routing-thread", "fingerprints-thread"] if a.compare_writers else []) \
            + (["routing-ring", "fingerprints-ring", "routing-courier", "fingerprints-courier"]
               if a.compare_paths else []):
        step = statistics.median(t for t, _ in r0[mode])
        drain = statistics.median(d for _, d in r0[mode])
        facts = [f for r in per_rank for f in r["facts"][mode]]
        nbytes = sum(f.get("bytes", 0) for f in facts) / max(1, a.rounds)
        dropped = sum(f.get("dropped", 0) for f in facts)
        per_tl = f"{nbytes / token_layers:.1f}" if mode != "off" else "-"
        start = f"{(statistics.median(per_rank[0]['firsts'][mode]) - first_off) * 1e3:.1f}" if mode != "off" else "-"
        # the hooks' own time per call in the timed steps, every rank and round (the session's
        # first step, where the compiled hook learns its plans through the Python hook, apart)
        spent = [h for r in per_rank for h in r["hooks"][mode]]
        hook = f"{sum(ns for ns, _ in spent) / 1e3 / max(1, sum(n for _, n in spent)):.1f}" if mode != "off" else "-"
        # the writer processes' CPU per record, start-up (imports, shard set-up) included
        writer = f"{sum(f.get('writer_cpu_s', 0) for f in facts) * 1e6 / max(1, sum(f.get('records', 0) for f in facts)):.0f}" \
            if mode != "off" else "-"
        print(f"{mode:<20}{step * 1e3:>9.2f}{step / off:>8.3f}{drain / off:>13.3f}{start:>10}{hook:>14}"
              f"{writer:>15}{dropped:>9}{per_tl:>15}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
