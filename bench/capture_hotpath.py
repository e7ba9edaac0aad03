"""Capture's cost per hooked call: host time (and on a GPU, device time and launches) it adds.

    python bench/capture_hotpath.py [--device cpu|cuda] [--rounds 7] [--iters 40]
                                    [--shapes decode,decode-ll,prefill[,decode-async,decode-ll-hook,decode-v2]]
                                    [--levels counts,routing,fingerprints] [--writer process|thread]
                                    [--hot-path auto|compiled|compiled-shared|compiled-cat|compiled-pydrain|compiled-torchdrain|ring|courier]
                                    [--torch-threads N] [--cached] [--sync [stream|device]]

Legend: T tokens, H hidden, E experts, K top-k.

One rank (world size 1, gloo on CPU, NCCL on a GPU) drives the emulated Buffer through DeepEP's
call sequences (epreplay.demo.epbench): a normal step is layout + dispatch + combine (3 hooked calls),
a low-latency step is low_latency_dispatch + low_latency_combine (2), a V2 step (decode-v2) an
ElasticBuffer dispatch + combine (2). Capture off and each level
are interleaved in every round (one capture session per level and round) and the minimum over
rounds counts, so a machine whose load drifts hits every mode alike. Per level and shape it
prints:
  host us/call    (step time with capture - step time off) / hooked calls per step: what the job
                  pays, the GIL waits behind capture's other threads included
  cpu us/call     (thread CPU time of the job's thread with capture - off) / hooked calls: what
                  the job's own thread computes for capture, blind to GIL and core waits, so it
                  means something on a loaded machine (where host us/call is noisy)
  hook us/call    the hooks' own time, as the recorder measures it (facts "hot_us")
  launch us       (GPU) host time of one gather launch inside the compiled hook (part of hook us)
  drain us/call   (GPU) CPU time of the device drain thread per call (its wait for the copy
                  sleeps and is not counted)
  drain GIL us    (GPU) the part of it that holds the GIL: what the drain can take from the
                  job's thread (0 with the native drain thread, _drainc.c; compiled-pydrain: the
                  Python thread whose driver calls, one C call, release it)
  kernel us/call  (GPU) device time of the kernels in a step with capture - off, per hooked call
                  (torch.profiler over 5 steps; the "off" row gives the step's total): the job's
                  stream
  copy us/call    (GPU) the same for copies: the drain's DMA to host, on a side stream and the
                  copy engine, overlapping the job's kernels
  kernels/call    (GPU) kernels per step with capture - off, per hooked call (the gather, and at
                  fingerprints the hash kernels)
  copies/call     (GPU) copies per step with capture - off, per call (the drain's bulk copies,
                  one per batch, so a fraction)
With --cached the Buffer's calls return their first call's outputs: a step is then the hooks'
work and little else, and host us/call is capture's cost in isolation, resolved to tenths of a us
(the emulation's 2-5 ms of Python a step drifts by more than a hook costs; it also leaves the
hook's data cold in the caches, so amid it the hook's own time is higher: both are figures).
Kernels and copies are counted with torch.profiler after every shape is timed: a profiler session
leaves CUPTI's callbacks on the driver's API, which slows every later launch.
On a loaded host, --torch-threads 1 keeps the job's step on one core: torch's OpenMP workers
otherwise spin in their barriers whenever the writer (or anyone) takes the other core, and that
spinning lands in cpu us/call as if capture computed it.
Targets (issue 13): host <= 5 us/call at routing, <= 10 at fingerprints; device <= 2 us; 1 launch.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time

from epreplay.launch import run_ranks

SHAPES = {
    # DeepSeek-V3 decode on one rank of a large instance, scaled to a CPU: T=128, top-8 of 32
    "decode": dict(tokens=128, hidden=512, experts=32, topk=8, ll=False),
    "decode-ll": dict(tokens=128, hidden=512, experts=32, topk=8, ll=True),
    "prefill": dict(tokens=4096, hidden=512, experts=32, topk=8, ll=False),
    # (not in the default list) decode's calls with async_finish=True, waiting on the events
    "decode-async": dict(tokens=128, hidden=512, experts=32, topk=8, ll=False, async_finish=True),
    # (not in the default list) low-latency with the recv hook: the Python hook's, BEGIN and END
    "decode-ll-hook": dict(tokens=128, hidden=512, experts=32, topk=8, ll=True, recv_hook=True),
    # (not in the default list) DeepEP V2: ElasticBuffer dispatch + combine (2 hooked calls)
    "decode-v2": dict(tokens=128, hidden=512, experts=32, topk=8, ll=False, v2=True),
    # (not in the default list) low-latency with EP32's receive buffer on one rank: X = R * M = 4096
    # slots per local expert (M = 4096 here, R = 1), as num_max_dispatch_tokens_per_rank=128 on 32 ranks
    "decode-ll-x4096": dict(tokens=128, hidden=512, experts=32, topk=8, ll=True, max_tokens=4096),
}
DEFAULT_SHAPES = "decode,decode-ll,prefill"
GPU_SHAPES = {  # DeepEP's benchmark shapes
    "decode": dict(tokens=128, hidden=7168, experts=256, topk=8, ll=False),
    "decode-ll": dict(tokens=128, hidden=7168, experts=256, topk=8, ll=True),
    "prefill": dict(tokens=4096, hidden=7168, experts=256, topk=8, ll=False),
    "decode-async": dict(tokens=128, hidden=7168, experts=256, topk=8, ll=False, async_finish=True),
    "decode-ll-hook": dict(tokens=128, hidden=7168, experts=256, topk=8, ll=True, recv_hook=True),
    "decode-v2": dict(tokens=128, hidden=7168, experts=256, topk=8, ll=False, v2=True),
}
LEVELS = ["counts", "routing", "fingerprints"]


def _device_work(step, steps: int = 5) -> tuple[float, float, float, float]:
    """Per step of step(): (kernels, copies and memsets, device us of the kernels, of the
    copies) that the GPU ran, from torch.profiler over `steps` steps. Capture's kernels are the
    gather (one per call) and, at `fingerprints`, the hash kernels, on the job's stream; its
    copies are the drain's (one per batch) on a side stream and the copy engine."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = copies = 0
    kernel_us = copy_us = 0.0
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        name = e.name.lower()
        us = getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0) or 0.0
        if "memcpy" in name or "memset" in name:
            copies += 1
            copy_us += us
        else:
            kernels += 1
            kernel_us += us
    return kernels / steps, copies / steps, kernel_us / steps, copy_us / steps


# Bench-only variants of the compiled hook on a GPU: the environment switch each one sets.
VARIANTS = {"compiled-cat": ("EPREPLAY_CAPTURE_RAW_GATHER", "0"),  # at::cat_out, not the raw launch
            # the gather kernel's copy blocks each striding over every segment (the kernel before
            # segments had blocks of their own)
            "compiled-shared": ("EPREPLAY_CAPTURE_GATHER_PER_SEG", "0"),
            # the drain a Python thread whose driver calls are one C call (the design before _drainc)
            "compiled-pydrain": ("EPREPLAY_CAPTURE_NATIVE_DRAIN", "call"),
            "compiled-torchdrain": ("EPREPLAY_CAPTURE_NATIVE_DRAIN", "0")}  # through torch (GIL held)


def _hot_path(name: str) -> str:
    """The config's hot path for a bench mode (VARIANTS: "compiled" with one switch set)."""
    for var, _ in VARIANTS.values():
        os.environ.pop(var, None)
    if name in VARIANTS:
        var, value = VARIANTS[name]
        os.environ[var] = value
        return "compiled"
    return name


def _cached_class(base: type) -> type:
    """A subclass of the Buffer class `base` whose DeepEP methods return their first call's
    outputs from then on (a recv hook in them a no-op after the first). Capture hooks it as it
    hooks `base`, so a step is the hooks' own work and little else: the emulation's 2-5 ms of
    Python a step, whose drift swamps a few us a call, is gone (--cached)."""
    import functools

    from epreplay.capture import hooks

    def memo(name: str):
        orig = getattr(base, name)
        orig = getattr(orig, hooks._ORIG, orig)

        @functools.wraps(orig)  # the same signature, so the hook binds arguments as for `base`
        def method(self, *args, **kwargs):
            cache = self.__dict__.setdefault("_bench_cache", {})
            if name in cache:
                return cache[name]
            result = orig(self, *args, **kwargs)
            later = result
            if isinstance(result, tuple) and result and callable(result[-1]):
                later = (*result[:-1], lambda: None)  # the receive happened in the first call
            cache[name] = later
            return result

        return method

    names = [n for n in hooks.OPS if hasattr(base, n)]
    return type(f"Cached{base.__name__}", (base,), {n: memo(n) for n in names})


def _then_wait(step, device: bool) -> None:
    """step(), then wait for the job's stream (device: for the whole GPU)."""
    import torch

    step()
    torch.cuda.synchronize() if device else torch.cuda.current_stream().synchronize()


def _rank(ctx, args: dict, root: str) -> dict:
    import torch
    import torch.distributed as dist

    from epreplay import capture, emulate
    from epreplay.demo import epbench
    from epreplay.capture import session

    cuda = ctx.device.startswith("cuda")
    if args["torch_threads"]:
        torch.set_num_threads(args["torch_threads"])
    group = dist.new_group([0])
    out: dict = {}
    later = []  # (shape, step, buffer, modes): profiled once all are timed
    shapes = GPU_SHAPES if cuda else SHAPES
    for name in args["shapes"]:
        spec = dict(shapes[name])
        ll = spec.pop("ll")
        async_finish = spec.pop("async_finish", False)
        recv_hook = spec.pop("recv_hook", False)
        v2 = spec.pop("v2", False)
        max_tokens = spec.pop("max_tokens", spec["tokens"])
        shape = epbench.Shape(**spec)
        if v2:
            from epreplay.emulate import v2 as emulate_v2

            module = emulate_v2
            if args["cached"]:
                module = type(sys)("cached_v2")
                module.ElasticBuffer = _cached_class(emulate_v2.ElasticBuffer)
            buffer = epbench.make_elastic_buffer(module, group, shape)
        else:
            module = emulate
            if args["cached"]:
                module = type(sys)("cached")
                module.Buffer = _cached_class(emulate.Buffer)
            buffer = epbench.make_buffer(module, group, shape, low_latency=ll, max_tokens=max_tokens)
        inp = epbench.make_inputs(shape, rank=ctx.rank, step=0, device=ctx.device)
        calls = 2 if ll or v2 else 3
        # (partial, not lambdas: the steps are called again after the loop, for the profile)
        if v2:
            step = functools.partial(epbench.elastic_step, buffer, inp, shape.experts)
        elif ll:
            step = functools.partial(epbench.ll_step, buffer, inp, shape.experts, max_tokens, recv_hook=recv_hook)
        else:
            step = functools.partial(epbench.normal_step, buffer, inp, shape.experts, async_finish=async_finish)
        if cuda and args["sync"]:  # an idle GPU at every step: no launch queue to wait behind
            # the job's stream only (what a job's .item() waits for): a device-wide sync would
            # also wait for the drain's copies on its side stream, which no job waits for
            step = functools.partial(_then_wait, step, args["sync"] == "device")
        iters = args["iters"] if shape.tokens <= 512 else max(3, args["iters"] // 8)
        # (level, hot path) pairs, interleaved with "off" in every round
        modes = ["off", *[(lv, hp) for hp in args["hot_paths"] for lv in args["levels"]]]
        host = {m: float("inf") for m in modes}
        cpu = {m: float("inf") for m in modes}
        dev = {m: float("inf") for m in modes}
        hook = {m: float("inf") for m in modes}
        dropped = {m: 0 for m in modes}
        drain = {m: float("inf") for m in modes}
        drain_gil = {m: float("inf") for m in modes}
        launch = {m: float("inf") for m in modes}
        for _ in range(3):
            step()  # warm-up: allocator, gloo/NCCL connections
        prof0 = _hook_profile()
        for rnd in range(args["rounds"]):
            for mode in modes:
                if mode != "off":
                    capture.start(os.path.join(root, f"{name}-{mode[0]}-{mode[1]}-{rnd}"), level=mode[0],
                                  writer=args["writer"], hot_path=_hot_path(mode[1]), layers_per_step=1)
                    if args["cached"]:
                        capture.install(type(buffer))  # stop() takes every class's hooks off
                    for _ in range(2):  # a session's first call makes its recorder and ring, the
                        step()          # second teaches the compiled hook its plans
                    rec = session.recorder()
                    hot0, calls0 = rec.hook_totals()
                if cuda:
                    torch.cuda.synchronize()
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                c0 = time.thread_time_ns()
                t0 = time.perf_counter()
                for _ in range(iters):
                    step()
                t1 = time.perf_counter()
                c1 = time.thread_time_ns()
                cpu[mode] = min(cpu[mode], (c1 - c0) / 1e3 / iters)
                if cuda:
                    e1.record()
                    e1.synchronize()
                    dev[mode] = min(dev[mode], e0.elapsed_time(e1) * 1e3 / iters)
                host[mode] = min(host[mode], (t1 - t0) * 1e6 / iters)
                if mode != "off":
                    hot1, calls1 = rec.hook_totals()
                    hook[mode] = min(hook[mode], (hot1 - hot0) / 1e3 / max(1, calls1 - calls0))
                    facts = capture.stop() or {}
                    dropped[mode] += int(facts.get("dropped", 0))
                    # the device drain's CPU (its share of the GIL), over the session's calls
                    d = facts.get("drain", [0, 0.0, 0.0])
                    drain[mode] = min(drain[mode], d[1] / max(1, facts.get("calls", 1)))
                    drain_gil[mode] = min(drain_gil[mode], d[2] / max(1, facts.get("calls", 1)))
                    g = facts.get("gathers", [0, 0, 0])
                    launch[mode] = min(launch[mode], g[2] / 1e3 / max(1, g[0] + g[1]))
        prof1 = _hook_profile()
        row = {"calls": calls, "iters": iters, "host_us": host, "cpu_us": cpu, "hook_us": hook, "dropped": dropped,
               "drain_us": drain, "drain_gil_us": drain_gil, "launch_us": launch}
        if prof1:  # a -DHOOKX_PROFILE build: every compiled call of the shape's sessions
            n = max(1, prof1.pop("calls") - prof0.pop("calls"))
            row["profile"] = {k: (v - prof0.get(k, 0)) / 1e3 / n for k, v in prof1.items()}
        if cuda:
            row["device_us"] = dev
        out[name] = row
        later.append((name, step, buffer, modes))
    # Kernels and copies per call, from torch.profiler, once every shape is timed: a profiler
    # session leaves CUPTI's callbacks on the driver's API, and every later driver call (the
    # hook's launch among them) pays for them.
    for name, step, buffer, modes in later:
        if cuda:
            work = {"off": _device_work(step)}
            for mode in modes[1:]:
                capture.start(os.path.join(root, f"{name}-{mode[0]}-{mode[1]}-prof"), level=mode[0],
                              writer=args["writer"], hot_path=_hot_path(mode[1]), layers_per_step=1)
                if args["cached"]:
                    capture.install(type(buffer))
                step()
                step()
                work[mode] = _device_work(step)
                capture.stop()
            out[name]["work"] = work
        try:
            buffer.destroy()
        except Exception:  # noqa: BLE001
            pass
    return out


def _hook_profile() -> dict | None:
    """The compiled hook's time by segment so far (this thread), where built with -DHOOKX_PROFILE."""
    from epreplay.capture import fast_plan

    hookx = fast_plan.load()
    return hookx.profile() if hookx is not None and hasattr(hookx, "profile") else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (the minimum counts)")
    p.add_argument("--iters", type=int, default=40, help="steps per round and mode (decode shapes; "
                                                         "prefill runs 1/8 of them)")
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated: " + ", ".join(SHAPES))
    p.add_argument("--levels", default=",".join(LEVELS), help="comma-separated capture levels")
    p.add_argument("--writer", choices=["process", "thread"], default="process")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch intra-op threads of the job (default: torch's own choice)")
    p.add_argument("--sync", nargs="?", const="stream", choices=["stream", "device"],
                   help="(GPU) synchronize after every step, so a hook's launch never waits behind "
                        "a full launch queue: the hooks' own host cost, without backpressure; "
                        "'stream' (the default) waits for the job's stream, 'device' for the whole "
                        "GPU, the drain's copies on its side stream included")
    p.add_argument("--cached", action="store_true",
                   help="the Buffer's calls return their first call's outputs (a subclass, hooked "
                        "alike): a step is capture's work and little else, so host us/call is "
                        "resolved to tenths of a us (the emulation's drift is gone); capture's "
                        "cost in isolation, caches warm")
    p.add_argument("--hot-path", default="auto",
                   help="comma-separated, measured side by side: auto (the compiled hook where built, "
                        "host calls), compiled, ring (the Python hook into the ring), courier (the "
                        "previous design, kept as the reference), compiled-shared (GPU: the gather's "
                        "copy blocks shared by all segments, the kernel before), compiled-cat (GPU: the compiled "
                        "hook gathering through at::cat_out instead of its raw kernel launch), "
                        "compiled-pydrain (GPU: the device ring drained by a Python thread, its driver "
                        "calls one C call), compiled-torchdrain (GPU: drained through torch, holding the GIL)")
    a = p.parse_args(argv)
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("capture_hotpath: --device cuda needs CUDA", file=sys.stderr)
            return 2
    args = dict(shapes=[s for s in a.shapes.split(",") if s], levels=[s for s in a.levels.split(",") if s],
                rounds=a.rounds, iters=a.iters, writer=a.writer, sync=a.sync, torch_threads=a.torch_threads,
                cached=a.cached,
                hot_paths=[s for s in a.hot_path.split(",") if s])
    bad = [h for h in args["hot_paths"] if h not in ("auto", "compiled", "ring", "courier", *VARIANTS)]
    if bad:
        print(f"capture_hotpath: --hot-path {bad[0]!r}: must be auto, compiled, ring, courier, " + ", ".join(VARIANTS), file=sys.stderr)
        return 2
    unknown = [s for s in args["shapes"] if s not in SHAPES]
    if unknown:
        print(f"capture_hotpath: unknown shape(s) {unknown}; known: {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="capture-hotpath-") as root:
        res = run_ranks(_rank, 1, args, root, device=a.device, timeout=1800)[0]
    shapes = GPU_SHAPES if a.device == "cuda" else SHAPES
    print(f"capture hot path, 1 rank, emulated Buffer{' (cached outputs)' if a.cached else ''} on {a.device}, writer {a.writer}, hot paths "
          f"{a.hot_path}, min of {a.rounds} interleaved rounds")
    print("load average (1, 5, 15 min) at the end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"command: python bench/capture_hotpath.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    head = f"{'shape':<34}{'level/hot path':<24}{'step us':>10}{'host us/call':>14}{'cpu us/call':>13}{'hook us/call':>14}"
    if a.device == "cuda":
        head += (f"{'launch us':>11}{'drain us/call':>15}{'drain GIL us':>14}{'kernel us/call':>16}{'copy us/call':>14}"
                 f"{'kernels/call':>14}{'copies/call':>13}")
    print(head + f"{'dropped':>9}")
    for name, row in res.items():
        s = shapes[name]
        label = f"{name} T={s['tokens']} H={s['hidden']} E={s['experts']}"
        off = row["host_us"]["off"]
        line = f"{label:<34}{'off':<24}{off:>10.1f}{'-':>14}{'-':>13}{'-':>14}"
        if a.device == "cuda":
            k, c, kus, cus = row["work"]["off"]
            line += f"{'-':>11}{'-':>15}{'-':>14}{kus:>16.1f}{cus:>14.1f}{k:>14.1f}{c:>13.1f}"
        print(line)
        for hp in args["hot_paths"]:
            for level in args["levels"]:
                mode = (level, hp)
                added = (row["host_us"][mode] - off) / row["calls"]
                cpu_added = (row["cpu_us"][mode] - row["cpu_us"]["off"]) / row["calls"]
                line = (f"{'':<34}{level + '/' + hp:<24}{row['host_us'][mode]:>10.1f}{added:>14.2f}{cpu_added:>13.2f}"
                        f"{row['hook_us'][mode]:>14.2f}")
                if a.device == "cuda":
                    (k0, c0, ku0, cu0), (k1, c1, ku1, cu1) = row["work"]["off"], row["work"][mode]
                    n = row["calls"]
                    line += (f"{row['launch_us'][mode]:>11.2f}{row['drain_us'][mode]:>15.2f}"
                             f"{row['drain_gil_us'][mode]:>14.2f}"
                             f"{(ku1 - ku0) / n:>16.2f}{(cu1 - cu0) / n:>14.2f}{(k1 - k0) / n:>14.2f}"
                             f"{(c1 - c0) / n:>13.2f}")
                print(line + f"{row['dropped'][mode]:>9d}")
        if row.get("profile"):
            print(f"{'':<34}compiled hook by segment, us per call (-DHOOKX_PROFILE build, every mode): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in row["profile"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
