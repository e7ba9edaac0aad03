"""GPU figures: capture overhead on DeepEP's own benchmark shapes, and the fingerprint kernel.

    python bench/gpu_bench.py [--ranks 2] [--backend deepep|emulated] [--iters 30]
                              [--shapes normal-bf16,...] [--modes off,routing,fingerprints,off2]

Prints, in one run and per shape (normal BF16 and FP8: T=4096, H=7168, top-8 of 256; low-latency:
T=128, H=7168, top-8 of 256, eager and CUDA-graph replays), the time per step with capture off
and at the `routing` and `fingerprints` levels, as ratios to off (targets: routing <= 1.01
normal, <= 1.03 low-latency; fingerprints <= 1.05), with where the time goes: the hooks' own
time per call, the courier thread's CPU per record, and the writer process's CPU. "off" is measured before and after the captured runs and the lower is
used, so a warming GPU does not flatter capture. Then the Triton fingerprint kernels' read
bandwidth (versions 1 and 2) next to the device's copy bandwidth and the torch reference, and
version 2 on a decode x, an FP8 pair and a low-latency buffer hashed by its valid rows only.

Needs CUDA; `--backend deepep` needs `deep_ep` importable (build DeepEP from source yourself).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from epreplay.launch import run_ranks

SHAPES = {
    "normal-bf16": dict(tokens=4096, hidden=7168, experts=256, topk=8, fp8=False, ll=False),
    "normal-fp8": dict(tokens=4096, hidden=7168, experts=256, topk=8, fp8=True, ll=False),
    "ll-bf16": dict(tokens=128, hidden=7168, experts=256, topk=8, fp8=False, ll=True),
    # The same low-latency step captured in a CUDA graph and replayed, as SGLang/vLLM decode runs:
    # capture's ops are inside the graph (graph_ring.py), its Python runs once, at graph capture.
    "ll-graph": dict(tokens=128, hidden=7168, experts=256, topk=8, fp8=False, ll=True),
}
MODES = ["off", "routing", "fingerprints", "off2"]


def _graph_step(step, sync):
    """`step` captured into a CUDA graph (after one eager call: warm-up, and the recorder's rings
    are made on a Buffer's first eager call); returns the graph's replay."""
    import torch

    step()
    sync()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _rank(ctx, backend: str, iters: int, shape_names: list[str], root: str, modes: list[str],
          profile: bool) -> dict:
    import torch
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.demo import epbench

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
        for mode in modes:
            # "routing-thread": the in-process writer; "routing-drop": a queue of one record, so
            # nearly every call is dropped before staging (the hooks' bare cost)
            level, _, variant = mode.partition("-")
            writer = "thread" if variant == "thread" else ""
            if level.startswith("off"):
                capture.uninstall()
            else:
                extra = {"queue_records": 1} if variant == "drop" else {}
                capture.start(os.path.join(root, f"{name}-{mode}"), level=level, layers_per_step=1,
                              writer=writer or "process", **extra)
            dist.barrier(group)
            torch.cuda.synchronize()
            run = _graph_step(step, torch.cuda.synchronize) if name == "ll-graph" else step
            n = iters * 10 if ll else iters  # a ~0.1 ms step: more of them for a stable mean
            if profile and level == "routing" and not variant:
                import cProfile
                import io
                import pstats

                # every rank runs the same calls (they are collectives); rank 0 is profiled
                epbench.time_calls(run, iters=5, warmup=5)  # first-call costs are not the profile's
                prof = cProfile.Profile()
                if ctx.rank == 0:
                    prof.enable()
                epbench.time_calls(run, iters=n, warmup=0)
                prof.disable()
                if ctx.rank == 0:
                    text = io.StringIO()
                    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
                    times[mode + "_profile"] = text.getvalue()
            times[mode] = epbench.time_calls(run, iters=n, warmup=5)
            torch.cuda.synchronize()
            if not level.startswith("off"):
                facts = capture.stop() or {}
                times[mode + "_dropped"] = float(facts.get("dropped", 0) or 0)
                # where the time goes: the hooks' own time per call, the courier thread's CPU
                # per record (the job process's share of the writing) and the writer process's
                times[mode + "_hot_us_per_call"] = facts.get("hot_us", 0) / max(1, facts.get("calls", 0))
                times[mode + "_courier_us_per_record"] = facts.get("courier_cpu_us", 0) / max(1, facts.get("records", 0))
                times[mode + "_records"] = float(facts.get("records", 0))
                times[mode + "_writer_cpu_s"] = float(facts.get("writer_cpu_s", 0))
            del run
        try:
            buffer.destroy()
        except Exception:
            pass
        results[name] = times
    if ctx.rank == 0:
        results["fingerprint"] = _fingerprint_figures()
    return results


def _fingerprint_figures() -> dict[str, float]:
    """The fingerprint kernels (versions 1 and 2) against the device's copy bandwidth, on
    [4096, 7168] bf16 (a prefill dispatch's x), plus version 2 on the shapes capture hashes: a
    decode x [128, 7168], an FP8 pair, and a low-latency receive buffer [L, X, 7168] of which
    only ~3% of the rows are valid (the rest skipped on the device)."""
    import torch

    from epreplay.demo.epbench import time_calls
    from epreplay.format.fingerprint import fingerprint_rows
    from epreplay.format.fingerprint_gpu import fingerprint_rows_triton

    x = torch.randn(4096, 7168, device="cuda").to(torch.bfloat16)
    y = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    out: dict[str, float] = {"bytes": nbytes}
    t_copy = time_calls(lambda: y.copy_(x), iters=50)
    out["copy_GBps_read_plus_write"] = 2 * nbytes / t_copy / 1e9
    out["copy_us"] = t_copy * 1e6
    x_cpu = x.cpu()
    for v in (1, 2):
        t_kernel = time_calls(lambda: fingerprint_rows_triton(x, version=v), iters=50)
        t_ref = time_calls(lambda: fingerprint_rows(x, version=v), iters=3, warmup=1)
        assert torch.equal(fingerprint_rows_triton(x, version=v).cpu(), fingerprint_rows(x_cpu, version=v)), v
        out[f"v{v}_kernel_GBps_read"] = nbytes / t_kernel / 1e9
        out[f"v{v}_kernel_us"] = t_kernel * 1e6
        out[f"v{v}_reference_GBps_read"] = nbytes / t_ref / 1e9
    t = time_calls(lambda: fingerprint_rows_triton(x, with_finite=True), iters=50)
    out["v2_with_finite_GBps_read"] = nbytes / t / 1e9  # hash and NaN/inf flag in one pass
    decode = x[:128]
    out["v2_decode_T128_us"] = time_calls(lambda: fingerprint_rows_triton(decode), iters=200) * 1e6
    q = x.to(torch.float8_e4m3fn)
    scales = torch.rand(4096, 56, device="cuda")
    t = time_calls(lambda: fingerprint_rows_triton((q, scales)), iters=50)
    out["v2_fp8_pair_GBps_read"] = (q.numel() + scales.numel() * 4) / t / 1e9
    # ll-bf16's receive buffer on 2 ranks: 128 local experts x (2 ranks x 128 tokens) slots,
    # ~8 valid rows per expert (128 tokens x top-8 x 2 ranks / 256 experts)
    L, X = 128, 2 * 128
    buf = torch.randn(L, X, 7168, device="cuda").to(torch.bfloat16)
    counts = torch.randint(0, 17, (L,), device="cuda", dtype=torch.int32)
    out["ll_buffer_valid_fraction"] = float(counts.sum()) / (L * X)
    out["v2_ll_valid_rows_us"] = time_calls(
        lambda: fingerprint_rows_triton(buf, valid_counts_L=counts, with_finite=True), iters=50) * 1e6
    out["v2_ll_every_row_us"] = time_calls(
        lambda: fingerprint_rows_triton(buf.view(L * X, 7168)), iters=10) * 1e6
    got = fingerprint_rows_triton(buf, valid_counts_L=counts).cpu()
    want = fingerprint_rows(buf.cpu(), valid_counts_L=counts.cpu())
    assert torch.equal(got, want)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--backend", choices=["deepep", "emulated"], default="deepep")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--modes", default=",".join(MODES),
                    help="comma-separated, in order: off, counts, routing, fingerprints, payload, off2; "
                         "LEVEL-thread for the in-process writer (e.g. routing-thread), LEVEL-drop "
                         "to drop nearly every call before staging (the hooks' bare cost)")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile rank 0 at routing level (the top 25 functions by own time, per shape)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_bench: needs CUDA", file=sys.stderr)
        return 2
    names = [s for s in args.shapes.split(",") if s]
    with tempfile.TemporaryDirectory() as root:
        modes = [m for m in args.modes.split(",") if m]
        if "off" not in modes:
            modes.insert(0, "off")
        per_rank = run_ranks(_rank, args.ranks, args.backend, args.iters, names, root, modes,
                             args.profile, device="cuda", timeout=900)
    print(f"capture overhead, {args.ranks} ranks, backend {args.backend}, {args.iters} iters "
          f"(time per step; ratio to off; max over ranks)")
    out = {}
    for name in names:
        rows = [r[name] for r in per_rank]
        off = max(min(r[m] for m in modes if m.startswith("off")) for r in rows)
        line = {"off_us": off * 1e6}
        print(f"  {name:12s} off {off * 1e6:9.1f} us")
        for mode in modes:
            if mode.startswith("off"):
                continue
            t = max(r[mode] for r in rows)
            line[mode] = {k[len(mode) + 1:]: max(r[k] for r in rows) for k in rows[0]
                          if k.startswith(mode + "_") and not k.endswith("_profile")}
            line[mode].update(us=t * 1e6, ratio=t / off)
            m = line[mode]
            print(f"  {'':12s} {mode:18s} {m['us']:9.1f} us x{m['ratio']:.3f} | dropped {m['dropped']:.0f} "
                  f"| hooks {m['hot_us_per_call']:.1f} us/call, courier {m['courier_us_per_record']:.1f} "
                  f"us/record, writer process {m['writer_cpu_s']:.2f} s CPU for {m['records']:.0f} records")
        if rows[0].get("routing_profile"):
            print(rows[0]["routing_profile"])
        out[name] = line
    fp = per_rank[0]["fingerprint"]
    out["fingerprint"] = fp
    print(f"fingerprint kernels, [4096, 7168] bf16 ({fp['bytes'] / 1e6:.1f} MB): "
          f"device copy {fp['copy_GBps_read_plus_write']:.0f} GB/s read+write ({fp['copy_us']:.1f} us)")
    for v in (1, 2):
        print(f"  v{v}: kernel {fp[f'v{v}_kernel_GBps_read']:.0f} GB/s read ({fp[f'v{v}_kernel_us']:.1f} us); "
              f"torch reference {fp[f'v{v}_reference_GBps_read']:.1f} GB/s")
    print(f"  v2 with the finite flag {fp['v2_with_finite_GBps_read']:.0f} GB/s; FP8 pair "
          f"{fp['v2_fp8_pair_GBps_read']:.0f} GB/s; decode T=128 {fp['v2_decode_T128_us']:.1f} us; "
          f"LL buffer [128, 256, 7168] valid rows only ({100 * fp['ll_buffer_valid_fraction']:.1f}%) "
          f"{fp['v2_ll_valid_rows_us']:.1f} us vs every row {fp['v2_ll_every_row_us']:.1f} us")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
