"""The floor under the compiled hook's GPU host time: what one raw launch of its gather kernels costs
on this host, with nothing else in the call.

    python bench/launch_floor.py [--launches N] [--rounds R]

prints, for each kernel (capture/gather_kernel.py: the copies; the copies with fingerprinted rows)
and grid (1 and 264 blocks), the host time of one `cuLaunchKernel` from a ctypes loop (minimum
over rounds), and the cost of a trivial driver call through the same ctypes path, to subtract.
The kernels are launched with no segments and no rows (they return at once): the figure is the
driver's and the launch queue's, the part of a hooked call no code of ours can remove. Beside it,
one torch op that launches one kernel (`x.add_(1)`) and `torch.cuda.current_stream()`: this host's
own yardsticks for a launch.
"""
from __future__ import annotations

import argparse
import ctypes
import sys
import time


def _per_call_us(op, n: int, rounds: int, *, sync: bool = True) -> float:
    """op()'s host time per call (us), n calls a round, the minimum over rounds; sync: the GPU
    idle at each round's start (so no round waits behind the last one's launches)."""
    import torch

    best = float("inf")
    for _ in range(rounds):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter_ns()
        for _ in range(n):
            op()
        best = min(best, (time.perf_counter_ns() - t0) / n / 1e3)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 500: well inside the launch queue (~1024 entries), so the host's cost is timed, not the
    # GPU's: an empty kernel runs in ~2 us, a full queue would make the loop wait for it
    p.add_argument("--launches", type=int, default=500, help="launches per round")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("launch_floor: needs CUDA", file=sys.stderr)
        return 2
    from epreplay.capture import gather_kernel as gk

    dev = torch.device("cuda", torch.cuda.current_device())
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    proto = ctypes.CFUNCTYPE(ctypes.c_int, *([ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3))
    stream = torch.cuda.current_stream().cuda_stream
    for name, size in ((gk.GATHER, 408), (gk.GATHER_HASH, 960)):  # the parameter blocks' sizes
        got = gk.load(dev, name)
        if got is None:
            print(f"launch_floor: {name} does not compile here (NVRTC missing?)", file=sys.stderr)
            return 1
        func, launch = got
        block = (ctypes.c_char * size)()  # zeros: no segments, no rows
        params = (ctypes.c_void_p * 1)(ctypes.cast(block, ctypes.c_void_p))
        fn = proto(launch)
        for blocks in (1, 264):
            best = _per_call_us(lambda: fn(func, blocks, 1, 1, 256, 1, 1, 0, stream, params, None),  # noqa: B023
                                a.launches, a.rounds)
            print(f"{name:<22} {blocks:>4} blocks: {best:6.2f} us per cuLaunchKernel through ctypes")
    # The same launch with an 8-byte parameter (a pointer) instead of the 408/960-byte blocks:
    # whether the parameter block's size is part of the launch's cost on this host.
    small = torch.cuda._compile_kernel(
        'extern "C" __global__ void ep_empty8(unsigned long long p) { if (p == 1) __trap(); }', "ep_empty8")
    sfunc = small.func.value if isinstance(small.func, ctypes.c_void_p) else int(small.func)
    word = ctypes.c_uint64(0)
    sparams = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.byref(word), ctypes.c_void_p))
    best = _per_call_us(lambda: fn(sfunc, 1, 1, 1, 256, 1, 1, 0, stream, sparams, None), a.launches, a.rounds)
    print(f"{'8-byte parameter':<22} {1:>4} blocks: {best:6.2f} us per cuLaunchKernel through ctypes")
    # The host's own yardstick: one torch op that launches one kernel, through the dispatcher.
    x = torch.zeros(1, device=dev)
    for label, op in (("torch x.add_(1) (1 kernel)", lambda: x.add_(1)),
                      ("torch.cuda.current_stream()", torch.cuda.current_stream)):
        best = _per_call_us(op, a.launches, a.rounds)
        print(f"{label:<28}: {best:6.2f} us per call")
    lib = ctypes.CDLL("libcuda.so.1")
    dev_out = ctypes.c_int()
    best = _per_call_us(lambda: lib.cuCtxGetDevice(ctypes.byref(dev_out)), a.launches, a.rounds, sync=False)
    print(f"{'ctypes + cuCtxGetDevice':<28}: {best:6.2f} us (the loop's own cost, to subtract)")
    # After one torch.profiler session: CUPTI's callbacks stay on the driver's API, and every
    # later driver call pays for them (bench/capture_hotpath.py profiles after its timings).
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]):
        for _ in range(10):
            x.add_(1)
        torch.cuda.synchronize()
    gfunc, _ = gk.load(dev, gk.GATHER)
    block = (ctypes.c_char * 408)()
    params = (ctypes.c_void_p * 1)(ctypes.cast(block, ctypes.c_void_p))
    for label, op in (("after a profiler: launch", lambda: fn(gfunc, 1, 1, 1, 256, 1, 1, 0, stream, params, None)),
                      ("after a profiler: x.add_(1)", lambda: x.add_(1))):
        best = _per_call_us(op, a.launches, a.rounds)
        print(f"{label:<28}: {best:6.2f} us per call")
    # The hook reads the clock ~7 times a GPU call (its start, the call's duration, its own
    # time): a vDSO read is ~20 ns, but where the clocksource makes it a system call (some
    # virtual machines) each costs ~0.5 us. The loop's Python is part of the figure.
    try:
        with open("/sys/devices/system/clocksource/clocksource0/current_clocksource") as f:
            source = f.read().strip()
    except OSError:
        source = "?"
    for label, clock in (("time.perf_counter_ns()", time.perf_counter_ns), ("time.time_ns()", time.time_ns),
                         ("time.monotonic_ns()", time.monotonic_ns)):
        best = _per_call_us(clock, a.launches * 10, a.rounds, sync=False) * 1e3
        print(f"{label:<28}: {best:6.1f} ns per read (clocksource {source})")
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
