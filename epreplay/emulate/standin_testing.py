"""`deep_ep.utils.testing` of the stand-in: the timing helpers DeepEP's V1 tests call.

Written for epreplay to the behaviour DeepEP's tests rely on (not DeepEP's code):
  bench(fn)             -> (avg, min, max) seconds per call, the first measured call dropped;
  bench_kineto(fn, names) -> the mean duration in seconds of the profiled kernels/ranges whose
                           name contains each of `names` (per phase, a list, when
                           num_kernels_per_period > 1).
On a GPU, times come from CUDA events and the device side of the profile; on the CPU from the
host clock and the host side. The emulated Buffer names its profiled ranges like DeepEP's
kernels (deep_ep_emulated::internode_ll::dispatch, ...; see epreplay.emulate.region), which is
what bench_kineto finds here, as DeepEP's own finds its kernels.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist

L2_FLUSH_BYTES = 256e6  # larger than an H100/H200 L2 (50-60 MB): a write of this evicts it


def flush_l2_cache(enabled: bool = True) -> None:
    """Evict the GPU's L2 by zeroing a large buffer (a no-op without CUDA)."""
    if enabled and torch.cuda.is_available():
        torch.empty(int(L2_FLUSH_BYTES // 4), dtype=torch.int32, device="cuda").zero_()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench(fn: Callable[[], Any], num_warmups: int = 50, num_tests: int = 50,
          post_fn: Optional[Callable[[], Any]] = None, flush_l2: bool = True) -> tuple[float, float, float]:
    """(average, min, max) seconds of `fn()` over num_tests calls after num_warmups (first dropped)."""
    _sync()
    for _ in range(num_warmups):
        fn()
    times = []
    if torch.cuda.is_available():
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(num_tests)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(num_tests)]
        for i in range(num_tests):
            flush_l2_cache(flush_l2)
            starts[i].record()
            fn()
            ends[i].record()
            if post_fn is not None:
                post_fn()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    else:
        for _ in range(num_tests):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            if post_fn is not None:
                post_fn()
    times = times[1:] if len(times) > 1 else times
    return sum(times) / len(times), min(times), max(times)


class empty_suppress:  # noqa: N801 - DeepEP's name
    def __enter__(self) -> "empty_suppress":
        return self

    def __exit__(self, *_: Any) -> None:
        pass


class suppress_stdout_stderr:  # noqa: N801 - DeepEP's name
    """Silence stdout and stderr, at the file-descriptor level too (the profiler's C++ prints)."""

    def __enter__(self) -> "suppress_stdout_stderr":
        sys.stdout.flush(), sys.stderr.flush()
        self._null = open(os.devnull, "w")
        self._saved = [(fd, os.dup(fd)) for fd in (1, 2)]
        for fd, _ in self._saved:
            os.dup2(self._null.fileno(), fd)
        self._py = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = self._null
        return self

    def __exit__(self, *_: Any) -> None:
        sys.stdout, sys.stderr = self._py
        for fd, saved in self._saved:
            os.dup2(saved, fd)
            os.close(saved)
        self._null.close()


def _durations(events: Any, name: str) -> list[tuple[float, float]]:
    """(start us, seconds) of the profiled events whose name contains `name`: ranges before
    kernels, device-side ones when there are any, else host-side ones; one distinct name allowed."""
    from torch.autograd import DeviceType

    hits = [e for e in events if name in e.name]
    # the emulation's ranges over its marker kernels (emulate/mark.py: "...::dispatch(int)"),
    # whose few us are a marker's, not the call's
    hits = [e for e in hits if "(" not in e.name] or hits
    device = [e for e in hits if e.device_type != DeviceType.CPU]
    hits = device or hits
    names = sorted({e.name for e in hits})
    assert len(names) <= 1, f"Errors of the kernel {name} in the profiling table: several names match: {names}"
    assert hits, (f"bench_kineto: no profiled kernel or range has {name!r} in its name; an emulated Buffer "
                  f"call must run inside fn")
    return sorted((e.time_range.start, e.time_range.elapsed_us() / 1e6) for e in hits)


def bench_kineto(fn: Callable[[], Any], kernel_names: Union[str, tuple], num_tests: int = 30,
                 suppress_kineto_output: bool = False, trace_path: Optional[str] = None, flush_l2: bool = True,
                 barrier_comm_profiling: bool = False, num_kernels_per_period: int = 1,
                 barrier: Optional[Callable[[], Any]] = None) -> Any:
    """Mean duration (seconds) of each named kernel/range over num_tests calls of fn (a tuple of
    them for a tuple of names). num_kernels_per_period > 1: each is a list, one mean per phase
    (e.g. send and receive of a call with a recv hook)."""
    assert isinstance(kernel_names, (str, tuple))
    names = (kernel_names,) if isinstance(kernel_names, str) else kernel_names
    if int(os.environ.get("EP_USE_NVIDIA_TOOLS", 0)):  # profilers conflict with Nsight tools
        return (1,) * len(names) if isinstance(kernel_names, tuple) else 1
    fn()
    _sync()
    cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=1, repeat=1)
    barrier_comm_profiling &= int(os.environ.get("EP_DISABLE_BARRIER_PROFILING", 0)) == 0
    with (suppress_stdout_stderr if suppress_kineto_output else empty_suppress)():
        dummy = torch.ones(1, dtype=torch.float32, device="cuda" if cuda else "cpu")
        with torch.profiler.profile(activities=activities, schedule=schedule) as prof:
            for _ in range(2):
                for _ in range(num_tests):
                    flush_l2_cache(flush_l2)
                    if barrier_comm_profiling:  # line the ranks up so launch skew is not measured
                        if cuda:
                            torch.cuda._sleep(int(2e7))
                        barrier() if barrier is not None else (dist.all_reduce(dummy) if dist.is_initialized()
                                                                else None)
                    fn()
                _sync()
                prof.step()
    if trace_path is not None:
        prof.export_chrome_trace(trace_path)
    out: list[Any] = []
    for name in names:
        d = [s for _, s in _durations(prof.events(), name)]
        n = num_kernels_per_period
        if n > 1:
            assert len(d) % n == 0, f"{name}: {len(d)} profiled events, not a multiple of {n} per period"
            out.append([sum(d[j::n]) / (len(d) // n) for j in range(n)])
        else:
            out.append(sum(d) / len(d))
    return tuple(out) if isinstance(kernel_names, tuple) else out[0]
