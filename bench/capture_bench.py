"""Capture overhead on CPU: time per MoE step with capture off and at each level, 4 gloo ranks.

    python bench/capture_bench.py [--ranks 4] [--steps 20] [--tokens 256] [--hidden 512]
                                  [--experts 16] [--topk 4] [--layers 4]

Legend: T tokens per rank, H hidden, E experts, K top-k, R ranks, L = E / R local experts.

Each rank runs a DeepSeek-style MoE step per layer — router (sigmoid scores + top-k), layout,
dispatch through the emulated Buffer, a two-matmul expert on the received rows, combine — with
capture off, at counts / routing / fingerprints / payload, and off again (the lower "off" is the
baseline, so a warming machine does not flatter capture). One process group serves every mode:
capture.start()/stop() switch between them. Prints, in one table: ms per step (rank 0, after a
barrier), ratio to off, the time including the writer's drain at stop(), drops, and bytes written
per token-layer (all shards / (R * T * layers * steps)).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from epreplay.launch import run_ranks

MODES = ["off", "counts", "routing", "fingerprints", "payload", "off2"]


def _rank(ctx, args: dict, root: str) -> dict:
    import torch
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.emulate import Buffer

    T, H, E, K, layers = args["tokens"], args["hidden"], args["experts"], args["topk"], args["layers"]
    R = ctx.world_size
    L = E // R
    g = torch.Generator().manual_seed(ctx.rank)
    gate_HE = torch.randn(H, E, generator=g) / H ** 0.5
    bias_E = torch.zeros(E)
    bias_E[: max(1, E // 8)] = 0.3  # a few hot experts, as trained routers have
    w1 = [torch.randn(H, H, generator=g).to(torch.bfloat16) / H ** 0.5 for _ in range(L)]
    xs = [torch.randn(T, H, generator=g).to(torch.bfloat16) for _ in range(4)]
    buf = Buffer(dist.group.WORLD)

    def step(s: int) -> None:
        x = xs[s % len(xs)]
        for layer in range(layers):
            scores_TE = torch.sigmoid(x.float() @ gate_HE) + bias_E
            w_TK, idx_TK = torch.topk(scores_TE, K, dim=1)
            n_rank, n_rdma, n_exp, in_rank, _ = buf.get_dispatch_layout(idx_TK, E)
            recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
                x, num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma,
                is_token_in_rank=in_rank, num_tokens_per_expert=n_exp, topk_idx=idx_TK,
                topk_weights=w_TK)
            out = torch.zeros(recv_x.shape[0], H)
            for e in range(L):
                mask = (recv_idx == e)
                rows = mask.any(dim=1)
                if rows.any():
                    y = torch.relu(recv_x[rows] @ w1[e]).float()
                    out[rows] += y * (recv_w * mask).sum(dim=1, keepdim=True)[rows]
            x, _, _ = buf.combine(out.to(torch.bfloat16), handle)

    result: dict[str, dict[str, float]] = {}
    for mode in MODES:
        run_dir = os.path.join(root, mode)
        if not mode.startswith("off"):
            capture.start(run_dir, level=mode, layers_per_step=layers, payload_every=1)
        step(0)  # warm-up (allocations, first gloo connections) outside the timing
        dist.barrier()
        t0 = time.perf_counter()
        for s in range(args["steps"]):
            step(s)
        dist.barrier()
        t1 = time.perf_counter()
        facts = capture.stop() if not mode.startswith("off") else None
        dist.barrier()
        t2 = time.perf_counter()
        result[mode] = {"step_s": (t1 - t0) / args["steps"], "drain_s": (t2 - t0) / args["steps"],
                        "dropped": float((facts or {}).get("dropped", 0)),
                        "bytes": float((facts or {}).get("bytes", 0))}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    a = p.parse_args(argv)
    args = vars(a)
    with tempfile.TemporaryDirectory(prefix="capture-bench-") as root:
        per_rank = run_ranks(_rank, a.ranks, args, root, timeout=600)
    r0 = per_rank[0]
    off = min(r0["off"]["step_s"], r0["off2"]["step_s"])
    token_layers = a.ranks * a.tokens * a.layers * (a.steps + 1)  # +1: the warm-up step is recorded too
    print(f"capture overhead: {a.ranks} CPU ranks (gloo), T={a.tokens} H={a.hidden} E={a.experts} "
          f"K={a.topk}, {a.layers} MoE layers/step, {a.steps} steps; command: "
          f"python bench/capture_bench.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"{'mode':<13}{'ms/step':>9}{'ratio':>8}{'incl. drain':>13}{'dropped':>9}{'B/token-layer':>15}")
    for mode in MODES:
        m = r0[mode]
        nbytes = sum(r[mode]["bytes"] for r in per_rank)
        dropped = sum(r[mode]["dropped"] for r in per_rank)
        per_tl = f"{nbytes / token_layers:.1f}" if not mode.startswith("off") else "-"
        print(f"{mode:<13}{m['step_s'] * 1e3:>9.2f}{m['step_s'] / off:>8.3f}"
              f"{m['drain_s'] / off:>13.3f}{int(dropped):>9}{per_tl:>15}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
