"""What fingerprinting host rows costs the compiled hook, by where the rows are: in cache, or
just written by a call (as the hook finds a dispatch's received rows).

    python bench/host_hash_bench.py [--tokens T] [--hidden H] [--iters N]

prints the median time of the hook's row hash (`_hookx.host_hash_rows`, the code the hook runs
at `fingerprints`: capture/_hosthash.h) on bf16 rows [T, H], for: x touched just before (in
cache); x after an emulated dispatch of it (one CPU rank, gloo); the dispatch's received rows
right after it returned; the same rows hashed a second time (in cache). Beside each, the rate
in GB/s and the time per 128 KiB (a decode dispatch hashes x and its received rows: 256 KiB at
T=128, H=512).
"""
from __future__ import annotations

import argparse
import sys
import time


def _rank(ctx, tokens: int, hidden: int, iters: int) -> dict:
    import torch
    import torch.distributed as dist

    from epreplay.capture import _hookx
    from epreplay.emulate import Buffer

    experts, topk = 32, 8
    buf = Buffer(dist.group.WORLD)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
    idx = torch.topk(torch.rand(tokens, experts, generator=g), topk, dim=1).indices
    w = torch.rand(tokens, topk, generator=g)
    if _hookx.host_hash_rows(x) is None:
        return {}
    times: dict[str, list[int]] = {"x in cache": [], "x after the dispatch": [], "received rows, just written": [],
                                   "received rows, in cache": []}

    def timed(name: str, t) -> None:
        t0 = time.perf_counter_ns()
        _hookx.host_hash_rows(t)
        times[name].append(time.perf_counter_ns() - t0)

    for _ in range(iters):
        x.add_(0)  # every line of x read and written: in cache
        timed("x in cache", x)
        n_rank, n_rdma, n_exp, in_rank, _ = buf.get_dispatch_layout(idx, experts)
        recv_x = buf.dispatch(x, num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma, is_token_in_rank=in_rank,
                              num_tokens_per_expert=n_exp, topk_idx=idx, topk_weights=w)[0]
        timed("received rows, just written", recv_x)
        timed("x after the dispatch", x)
        timed("received rows, in cache", recv_x)
    nbytes = {k: (recv_x if k.startswith("received") else x).nbytes for k in times}
    return {k: (sorted(v)[len(v) // 2], nbytes[k]) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--iters", type=int, default=50)
    a = p.parse_args(argv)
    from epreplay.capture import fast_plan
    from epreplay.launch import run_ranks

    if fast_plan.load() is None:
        print("host_hash_bench: the compiled hook is not built (python -m epreplay.capture.hookx_build)",
              file=sys.stderr)
        return 2
    (got,) = run_ranks(_rank, 1, a.tokens, a.hidden, a.iters, timeout=600)
    if not got:
        print("host_hash_bench: this CPU has no AVX-512DQ/BW: the hook copies rows for the writer instead",
              file=sys.stderr)
        return 2
    print(f"host row hash (the compiled hook's, capture/_hosthash.h), bf16 [{a.tokens}, {a.hidden}], "
          f"median of {a.iters}")
    print(f"{'rows':32} {'us':>8} {'GB/s':>7} {'us per 128 KiB':>15}")
    for name, (ns, nbytes) in got.items():
        print(f"{name:32} {ns / 1e3:8.2f} {nbytes / ns:7.1f} {ns / 1e3 * (128 << 10) / nbytes:15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
