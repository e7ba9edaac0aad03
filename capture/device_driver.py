"""How the device ring's drain runs on this machine: its period, the CUDA driver entry points it
calls, which drain (a native thread, a Python thread, torch), and D's CUDA context.

May import: torch (CUDA calls only in context_of), capture's own C modules.
"""
from __future__ import annotations

import ctypes
import logging
import os

import torch

# Drain period: a batch every 2 ms keeps the frames' delay short; a batch costs the native drain
# thread ~30-90 us of CPU (driver calls, no GIL; a Python drain took ~50 us of the job's GIL a
# batch). Its CPU time is counted (DeviceStage.facts) so benches can charge it to the calls it
# drained.
# EPREPLAY_CAPTURE_DRAIN_MS overrides it (a longer period: fewer batches, later frames).
DRAIN_S = 0.002


def drain_period() -> float:
    """DRAIN_S, or EPREPLAY_CAPTURE_DRAIN_MS where it is a positive number (else one log line)."""
    text = os.environ.get("EPREPLAY_CAPTURE_DRAIN_MS")
    if text is None:
        return DRAIN_S
    try:
        ms = float(text)
        if ms > 0:
            return ms / 1e3
    except ValueError:
        pass
    logging.getLogger("epreplay.capture").warning(
        "EPREPLAY_CAPTURE_DRAIN_MS=%r is not a positive number of milliseconds; draining every %g ms",
        text, DRAIN_S * 1e3)
    return DRAIN_S


DRIVER_FNS = ("cuEventRecord", "cuStreamWaitEvent", "cuMemcpyDtoHAsync_v2", "cuEventSynchronize",
              "cuCtxSetCurrent", "cuCtxGetCurrent")


def drain_mode() -> tuple[str, tuple] | tuple[None, None]:
    """How the drain runs, and the driver functions it calls:
    ("thread", fns) a native thread (_drainc.Drainer; no GIL at all), ("call", fns) a Python thread
    whose driver calls are one C call without the GIL (_ringc.drain), (None, None) through torch,
    holding the GIL. EPREPLAY_CAPTURE_NATIVE_DRAIN=call / =0 choose the last two (comparisons);
    each falls back to the next where its module or the driver is missing."""
    from epreplay.capture.fast_plan import env_off

    choice = os.environ.get("EPREPLAY_CAPTURE_NATIVE_DRAIN", "1").strip().lower()
    if env_off("EPREPLAY_CAPTURE_NATIVE_DRAIN"):
        return None, None
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        fns = tuple(ctypes.cast(getattr(lib, n), ctypes.c_void_p).value for n in DRIVER_FNS)
    except (OSError, AttributeError):
        return None, None
    if not all(fns):
        return None, None
    try:
        if choice != "call":
            from epreplay.capture import _drainc  # noqa: F401
            from epreplay.capture.graph_ring import QUIET

            if isinstance(QUIET, _drainc.Lock):  # the thread and the graph wrapper share it
                return "thread", fns
    except ImportError:
        pass
    try:
        from epreplay.capture._ringc import drain  # noqa: F401
    except ImportError:
        return None, None
    return "call", fns


def context_of(device: torch.device, ctx_get: int) -> int:
    """device's CUcontext (torch's primary context there), through cuCtxGetCurrent."""
    ctx = ctypes.c_void_p()
    with torch.cuda.device(device):
        torch.cuda.current_stream(device).query()  # the context exists and is current here
        rc = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)(ctx_get)(ctypes.byref(ctx))
    if rc or not ctx.value:
        raise RuntimeError(f"cuCtxGetCurrent failed ({rc}): no CUDA context on {device}")
    return ctx.value
