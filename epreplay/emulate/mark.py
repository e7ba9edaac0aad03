"""Marker kernels: one empty kernel per emulated DeepEP entry point, named like DeepEP's.

DeepEP's own kineto benches (tests/utils.py `bench_kineto` in release 1.2.1) profile CUDA
activity only and look for kernels whose names contain "dispatch" / "combine" (and "::dispatch"
per phase in the trace). The emulation's work is many small torch kernels with generic names, and
its named profiler ranges (emulate.region) are host events that a CUDA-only profile leaves out. So
on a GPU each dispatch/combine region also launches one empty kernel named after it,
`deep_ep_emulated::internode_ll::dispatch(int)`, compiled once per device and name with NVRTC
(`torch.cuda._compile_kernel`). Its duration is a marker's (a few us), not the emulation's cost:
the emulation's time is the range's. Where NVRTC is missing, marking turns off with one log line.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("epreplay.emulate")

_kernels: dict[tuple[int, str], Any] = {}
_off = False


def _source(full: str) -> str:
    """`a::b::f` -> an empty `__global__ void f(int)` inside namespaces a and b."""
    *spaces, fn = full.split("::")
    opened = "".join(f"namespace {s} {{ " for s in spaces)
    return f"{opened}__global__ void {fn}(int) {{}} {'} ' * len(spaces)}\n"


def mark(full: str) -> None:
    """Launch the marker kernel `full` on the current stream (captured too, inside a CUDA graph)."""
    global _off
    if _off:
        return
    try:
        dev = torch.cuda.current_device()
        kernel = _kernels.get((dev, full))
        if kernel is None:
            kernel = _kernels[(dev, full)] = torch.cuda._compile_kernel(_source(full), full)
        kernel(grid=(1, 1, 1), block=(1, 1, 1), args=[0])
    except Exception as exc:  # no NVRTC or driver entry: the ranges still name the calls
        _off = True
        log.warning("epreplay emulate: marker kernels off (%s); CUDA-only profiles will not name "
                    "dispatch/combine", exc)
