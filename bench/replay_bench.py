"""Replay throughput per op against the emulation's raw throughput at the same shapes.

    .venv/bin/python bench/replay_bench.py [--tokens 64] [--hidden 512] [--experts 32] [--topk 4]
                                           [--steps 6] [--ranks 8,2] [--out DIR]

1. Records an 8-rank run (epreplay.capture around epreplay.emulate.Buffer, level `routing`): every
   step one normal layer (layout, dispatch, combine) and one low-latency layer, with the routing
   epreplay.epbench generates (DeepEP's test distribution, a few hot experts).
2. Replays it on 8 and on 2 processes (synthetic payloads, full verification).
3. Runs the same calls straight through the emulated Buffer on the same number of processes with
   the replay's physical shapes (on 2 processes each sends 4 x tokens) — the raw throughput.
Prints per op and M: raw us/call, replay backend us/call (inside the Buffer, as driven by the
replayer), replay us/call (including reading records, splitting, verification) and the ratio
replay / raw (the replay driver's overhead). CPU: gloo, 1 thread per rank.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from epreplay.epbench import Shape, make_inputs
from epreplay.launch import run_ranks


def _record(ctx, run_dir: str, shape: Shape, steps: int) -> None:
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.emulate import Buffer

    capture.start(run_dir, level="routing", install=False)
    buf = capture.wrap(Buffer(dist.group.WORLD, low_latency_mode=True))
    for s in range(steps):
        inp = make_inputs(shape, rank=ctx.rank, step=s, device="cpu")
        with capture.step(s):
            with capture.layer(0):
                n_rank, n_rdma, n_exp, in_rank, _ = buf.get_dispatch_layout(inp.topk_idx_TK, shape.experts)
                recv_x, _, recv_w, _, h, _ = buf.dispatch(
                    inp.x_TH, num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma,
                    is_token_in_rank=in_rank, num_tokens_per_expert=n_exp, topk_idx=inp.topk_idx_TK,
                    topk_weights=inp.topk_weights_TK)
                buf.combine(recv_x, h, topk_weights=recv_w)
            with capture.layer(1):
                rx, _, h, _, _ = buf.low_latency_dispatch(inp.x_TH, inp.topk_idx_TK, shape.tokens,
                                                          shape.experts, use_fp8=False)
                buf.low_latency_combine(rx, inp.topk_idx_TK, inp.topk_weights_TK, h)
    capture.stop()


def _raw(ctx, shape: Shape, steps: int, block: int) -> dict[str, float]:
    """The same calls with the replay's physical shapes, timed per op (seconds per call)."""
    import torch.distributed as dist

    from epreplay.emulate import Buffer

    buf = Buffer(dist.group.WORLD, low_latency_mode=True)
    phys = Shape(shape.tokens * block, shape.hidden, shape.experts, shape.topk)
    t = {"layout": 0.0, "dispatch": 0.0, "combine": 0.0, "ll_dispatch": 0.0, "ll_combine": 0.0}
    for s in range(steps):
        inp = make_inputs(phys, rank=ctx.rank, step=s, device="cpu")
        t0 = time.perf_counter()
        n_rank, n_rdma, n_exp, in_rank, _ = buf.get_dispatch_layout(inp.topk_idx_TK, shape.experts)
        t1 = time.perf_counter()
        recv_x, _, recv_w, _, h, _ = buf.dispatch(
            inp.x_TH, num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma, is_token_in_rank=in_rank,
            num_tokens_per_expert=n_exp, topk_idx=inp.topk_idx_TK, topk_weights=inp.topk_weights_TK)
        t2 = time.perf_counter()
        buf.combine(recv_x, h, topk_weights=recv_w)
        t3 = time.perf_counter()
        rx, _, h, _, _ = buf.low_latency_dispatch(inp.x_TH, inp.topk_idx_TK, phys.tokens, shape.experts,
                                                  use_fp8=False)
        t4 = time.perf_counter()
        buf.low_latency_combine(rx, inp.topk_idx_TK, inp.topk_weights_TK, h)
        t5 = time.perf_counter()
        if s == 0:
            continue  # warm-up
        # the replay also runs the layout inside each dispatch: count it there too
        t["layout"] += t1 - t0
        t["dispatch"] += t2 - t0
        t["combine"] += t3 - t2
        t["ll_dispatch"] += t4 - t3
        t["ll_combine"] += t5 - t4
    return {k: v / max(1, steps - 1) for k, v in t.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--ranks", default="8,2")
    ap.add_argument("--out", default=None, help="keep the recording here (default: a temp dir)")
    args = ap.parse_args()
    shape = Shape(args.tokens, args.hidden, args.experts, args.topk)
    world = 8
    base = Path(args.out or tempfile.mkdtemp(prefix="replay-bench-"))
    run = base / "run"
    t0 = time.perf_counter()
    run_ranks(_record, world, str(run), shape, args.steps, timeout=600)
    print(f"recorded {world} ranks x {args.steps} steps (T={shape.tokens} H={shape.hidden} E={shape.experts} "
          f"K={shape.topk}) in {time.perf_counter() - t0:.1f} s: {run}")
    from epreplay.replay import replay_run

    rows = []
    for m in [int(x) for x in args.ranks.split(",")]:
        t0 = time.perf_counter()
        rep = replay_run(run, m, call_timeout=300, index=False)
        wall = time.perf_counter() - t0
        raw = run_ranks(_raw, m, shape, args.steps, world // m, timeout=600)
        raw_op = {k: max(r[k] for r in raw) for k in raw[0]}  # slowest rank, as the replay reports
        print(f"replay {world}->{m}: {rep.calls} calls, {rep.divergences} divergences, {wall:.1f} s wall")
        for op, s in sorted(rep.ops.items()):
            if op not in raw_op:
                continue
            r_us = raw_op[op] * 1e6
            rows.append((f"{world}->{m}", op, r_us, s["replay_mean_us"], s["driver_mean_us"],
                         s["driver_mean_us"] / r_us if r_us else float("nan"),
                         s.get("recorded_mean_us", -1)))
    print(f"\n{'plan':6} {'op':12} {'raw us':>10} {'backend us':>11} {'replay us':>10} {'replay/raw':>10} "
          f"{'recorded us':>11}")
    for plan, op, raw_us, be_us, rp_us, ratio, rec in rows:
        print(f"{plan:6} {op:12} {raw_us:10.0f} {be_us:11.0f} {rp_us:10.0f} {ratio:10.2f} {rec:11.0f}")


if __name__ == "__main__":
    main()
