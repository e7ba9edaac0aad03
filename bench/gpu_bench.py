"""GPU figures: capture overhead on DeepEP's own benchmark shapes, and the fingerprint kernel.

    python bench/gpu_bench.py [--ranks 2] [--backend deepep|emulated] [--iters 30]

Prints, in one run and per shape (normal BF16 and FP8: T=4096, H=7168, top-8 of 256; low-latency:
T=128, H=7168, top-8 of 256), the time per step with capture off and at the `routing` and
`fingerprints` levels, as ratios to off (targets: routing <= 1.01 normal, <= 1.03 low-latency;
fingerprints <= 1.05). "off" is measured before and after the captured runs and the lower is
used, so a warming GPU does not flatter capture. Then the Triton fingerprint kernel's read
bandwidth next to the device's copy bandwidth and the torch reference.

Needs CUDA; `--backend deepep` needs `deep_ep` importable (build DeepEP from source yourself).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from epreplay.launch import run_ranks

SHAPES = {
    "normal-bf16": dict(tokens=4096, hidden=7168, experts=256, topk=8, fp8=False, ll=False),
    "normal-fp8": dict(tokens=4096, hidden=7168, experts=256, topk=8, fp8=True, ll=False),
    "ll-bf16": dict(tokens=128, hidden=7168, experts=256, topk=8, fp8=False, ll=True),
}
MODES = ["off", "routing", "fingerprints", "off2"]


def _rank(ctx, backend: str, iters: int, shape_names: list[str], root: str) -> dict:
    import torch
    import torch.distributed as dist

    from epreplay import capture, epbench

    module = __import__("deep_ep") if backend == "deepep" else __import__("epreplay.emulate", fromlist=["Buffer"])
    group = dist.new_group(list(range(ctx.world_size)))
    results: dict[str, dict[str, float]] = {}
    for name in shape_names:
        spec = dict(SHAPES[name])
        ll = spec.pop("ll")
        shape = epbench.Shape(**spec)
        buffer = epbench.make_buffer(module, group, shape, low_latency=ll)
        inp = epbench.make_inputs(shape, rank=ctx.rank, step=0, device=ctx.device)
        if ll:
            step = lambda: epbench.ll_step(buffer, inp, shape.experts, shape.tokens)  # noqa: E731
        else:
            step = lambda: epbench.normal_step(buffer, inp, shape.experts)  # noqa: E731
        times = {}
        for mode in MODES:
            if mode.startswith("off"):
                capture.uninstall()
            else:
                capture.start(os.path.join(root, f"{name}-{mode}"), level=mode, layers_per_step=1)
            dist.barrier(group)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            times[mode] = epbench.time_calls(step, iters=iters, warmup=5)
            torch.cuda.synchronize()
            if not mode.startswith("off"):
                facts = capture.stop() or {}
                times[mode + "_dropped"] = float(facts.get("dropped", 0) or 0)
        try:
            buffer.destroy()
        except Exception:
            pass
        results[name] = times
    if ctx.rank == 0:
        results["fingerprint"] = _fingerprint_figures()
    return results


def _fingerprint_figures() -> dict[str, float]:
    import torch

    from epreplay.epbench import time_calls
    from epreplay.fingerprint import fingerprint_rows
    from epreplay.fingerprint_gpu import fingerprint_rows_triton

    x = torch.randn(4096, 7168, device="cuda").to(torch.bfloat16)
    y = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    t_copy = time_calls(lambda: y.copy_(x), iters=50)
    t_kernel = time_calls(lambda: fingerprint_rows_triton(x), iters=50)
    t_ref = time_calls(lambda: fingerprint_rows(x), iters=5, warmup=1)
    assert torch.equal(fingerprint_rows_triton(x).cpu(), fingerprint_rows(x.cpu()))
    return {
        "bytes": nbytes,
        "copy_GBps_read_plus_write": 2 * nbytes / t_copy / 1e9,
        "kernel_GBps_read": nbytes / t_kernel / 1e9,
        "reference_GBps_read": nbytes / t_ref / 1e9,
        "kernel_us": t_kernel * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--backend", choices=["deepep", "emulated"], default="deepep")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_bench: needs CUDA", file=sys.stderr)
        return 2
    names = [s for s in args.shapes.split(",") if s]
    with tempfile.TemporaryDirectory() as root:
        per_rank = run_ranks(_rank, args.ranks, args.backend, args.iters, names, root,
                             device="cuda", timeout=900)
    print(f"capture overhead, {args.ranks} ranks, backend {args.backend}, {args.iters} iters "
          f"(time per step; ratio to off; max over ranks)")
    out = {}
    for name in names:
        rows = [r[name] for r in per_rank]
        off = max(min(r["off"], r["off2"]) for r in rows)
        line = {"off_us": off * 1e6}
        for mode in ("routing", "fingerprints"):
            t = max(r[mode] for r in rows)
            line[f"{mode}_us"] = t * 1e6
            line[f"{mode}_ratio"] = t / off
            line[f"{mode}_dropped"] = sum(r.get(mode + "_dropped", 0) for r in rows)
        out[name] = line
        print(f"  {name:12s} off {line['off_us']:9.1f} us | routing {line['routing_us']:9.1f} us "
              f"x{line['routing_ratio']:.3f} | fingerprints {line['fingerprints_us']:9.1f} us "
              f"x{line['fingerprints_ratio']:.3f} | dropped {line['routing_dropped']:.0f}/"
              f"{line['fingerprints_dropped']:.0f}")
    fp = per_rank[0]["fingerprint"]
    out["fingerprint"] = fp
    print(f"fingerprint kernel, [4096, 7168] bf16 ({fp['bytes'] / 1e6:.1f} MB): "
          f"{fp['kernel_GBps_read']:.0f} GB/s read ({fp['kernel_us']:.1f} us); "
          f"device copy {fp['copy_GBps_read_plus_write']:.0f} GB/s read+write; "
          f"torch reference {fp['reference_GBps_read']:.1f} GB/s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
