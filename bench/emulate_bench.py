"""Throughput of the emulated DeepEP Buffer on CPU processes (gloo): dispatch and combine.

    python bench/emulate_bench.py [--ranks 4 8] [--iters 5] [--prefill-tokens 512] [--hidden 7168] [--deepep v2]

Shapes: decode = T=128 tokens per rank, H=7168, top-8 of 256 experts (DeepSeek-V3), low-latency
(FP8 dispatch, bf16 combine, M=128) and normal (bf16); prefill = normal mode with
--prefill-tokens per rank (DeepEP's own prefill benchmark uses 4096; on a 2-core CPU that takes
minutes per call, so the default is 512 and the output says so).
Figures, per call (median over iterations, slowest rank): tokens/s = tokens dispatched by all
ranks / time; GB/s = DeepEP's per-rank measure, bytes received by a rank / time, averaged over
ranks (dispatch: received rows x row bytes; combine: the bf16 rows sent back).
--deepep v2 times the emulated V2 ElasticBuffer instead (bf16 dispatch with weights, non-expanded
and expanded layouts, combine with weights; no CPU-sync-free variant).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from epreplay.launch import run_ranks


def _bench_rank(ctx, T: int, H: int, K: int, E: int, mode: str, iters: int) -> dict:
    import torch.distributed as dist

    from epreplay.emulate import Buffer

    g = torch.Generator().manual_seed(ctx.rank)
    scores = torch.rand(T, E, generator=g)
    idx = scores.topk(K, dim=1).indices
    w = torch.rand(T, K, generator=g)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    R = ctx.world_size
    times: dict[str, list[float]] = {"dispatch": [], "combine": []}
    recv_bytes = {"dispatch": 0, "combine": 0}
    if mode in ("v2", "v2-expand"):
        from epreplay.emulate.v2 import ElasticBuffer

        buf = ElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=T, hidden=H, deterministic=True, timeout_s=600)
    elif mode == "ll":
        buf = Buffer(dist.group.WORLD, 0, Buffer.get_low_latency_rdma_size_hint(T, H, R, E), low_latency_mode=True,
                     num_qps_per_rank=E // R, timeout_s=600)
    else:
        buf = Buffer(dist.group.WORLD, int(2e9), 0, timeout_s=600)
    for it in range(iters + 1):  # the first iteration warms up allocators and gloo connections
        dist.barrier()
        t0 = time.perf_counter()
        if mode == "ll":
            (q, s), count, handle, _, _ = buf.low_latency_dispatch(x, idx, T, E, use_fp8=True)
            t1 = time.perf_counter()
            y_in = torch.empty(q.shape, dtype=torch.bfloat16)  # expert outputs (values do not matter here)
            dist.barrier()
            t2 = time.perf_counter()
            buf.low_latency_combine(y_in, idx, w, handle)
            t3 = time.perf_counter()
            n_rows = int(count.sum())
            rb_d, rb_c = n_rows * (H + H // 128 * 4), n_rows * H * 2
            del q, s, y_in, handle  # free the [L, R*M, H] tensors outside the timed regions
        elif mode in ("v2", "v2-expand"):  # DeepEP V2 ElasticBuffer (epreplay.emulate.v2)
            rx, _, rw, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E,
                                                do_expand=mode == "v2-expand")
            t1 = time.perf_counter()
            y_in = torch.zeros(rx.shape, dtype=torch.bfloat16)  # expert outputs (values do not matter here)
            dist.barrier()
            t2 = time.perf_counter()
            buf.combine(y_in, handle, topk_weights=rw)
            t3 = time.perf_counter()
            n_rows = int(handle.psum_num_recv_tokens_per_scaleup_rank[-1])
            rb_d, rb_c = rx.shape[0] * H * 2, n_rows * H * 2
            del rx, y_in, handle
        else:
            n_rank, _, n_exp, in_rank, _ = buf.get_dispatch_layout(idx, E)
            rx, _, rw, _, handle, _ = buf.dispatch(x, num_tokens_per_rank=n_rank, is_token_in_rank=in_rank,
                                                   num_tokens_per_expert=n_exp, topk_idx=idx, topk_weights=w)
            t1 = time.perf_counter()
            dist.barrier()
            t2 = time.perf_counter()
            buf.combine(rx, handle)
            t3 = time.perf_counter()
            n_rows = rx.shape[0]
            rb_d, rb_c = n_rows * H * 2, int(in_rank.sum()) * H * 2
            del rx, handle
        if it:
            times["dispatch"].append(t1 - t0)
            times["combine"].append(t3 - t2)
            recv_bytes = {"dispatch": rb_d, "combine": rb_c}
    return {"times": times, "bytes": recv_bytes}


def run(R: int, T: int, H: int, K: int, E: int, mode: str, iters: int) -> list[tuple]:
    out = run_ranks(_bench_rank, R, T, H, K, E, mode, iters, timeout=1800, pg_timeout_s=900)
    rows = []
    for op in ("dispatch", "combine"):
        per_iter = [max(o["times"][op][i] for o in out) for i in range(iters)]
        t = statistics.median(per_iter)
        gbps = statistics.mean(o["bytes"][op] for o in out) / t / 1e9
        rows.append((op, t, R * T / t, gbps))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--deepep", choices=("v1", "v2"), default="v1",
                    help="v1: the Buffer (LL and normal); v2: the ElasticBuffer (non-expanded and expanded)")
    args = ap.parse_args()
    H, K, E = args.hidden, 8, 256
    print(f"emulated DeepEP {'ElasticBuffer (V2)' if args.deepep == 'v2' else 'Buffer'} on CPU (gloo), torch {torch.__version__}, {torch.get_num_threads()} threads here, "
          f"1 thread per rank; H={H}, top-{K} of {E} experts")
    print(f"prefill uses T={args.prefill_tokens} tokens per rank (DeepEP's benchmark uses 4096: too slow on "
          f"this CPU)" if args.prefill_tokens != 4096 else "prefill T=4096")
    print(f"{'ranks':>5} {'shape':<22} {'op':<9} {'ms/call':>9} {'tokens/s':>10} {'GB/s/rank':>10}")
    for R in args.ranks:
        shapes = (("decode T=128 LL fp8", 128, "ll"), ("decode T=128 normal", 128, "normal"),
                  (f"prefill T={args.prefill_tokens} normal", args.prefill_tokens, "normal"))
        if args.deepep == "v2":
            shapes = (("decode T=128 v2", 128, "v2"), ("decode T=128 v2 expand", 128, "v2-expand"),
                      (f"prefill T={args.prefill_tokens} v2", args.prefill_tokens, "v2"))
        for label, T, mode in shapes:
            for op, t, tps, gbps in run(R, T, H, K, E, mode, args.iters):
                print(f"{R:>5} {label:<22} {op:<9} {t * 1e3:>9.1f} {tps:>10.0f} {gbps:>10.3f}", flush=True)


if __name__ == "__main__":
    main()
