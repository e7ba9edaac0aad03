"""Staging: get a hooked call's tensors to the writer thread without a host sync on the hot path.

Legend: T tokens, H hidden.

A `Staging` belongs to one call. The hook registers tensors on it at call entry (inputs) and when
the result is ready (outputs); the writer thread later turns them into numpy arrays.

  keep(t)      a tensor nobody mutates later (handle fields, counts): on CPU a reference; on GPU
               an async copy into pinned memory on a side stream.
  snapshot(t)  a tensor the caller or a later kernel may overwrite (topk_idx in a CUDA-graph static
               buffer, send_head that combine rewrites, x that the next layer reuses): on CPU a
               clone now, on GPU the same side-stream copy, which is ordered before later kernels.
  rows_fp(x)   per-row fingerprints of x [T, H] (or an FP8 pair) as it is now, plus a "has
               non-finite values" flag: on CPU a clone, fingerprinted by the writer (the hot path
               pays a memcpy, not the hash); on GPU the hash runs on the side stream (Triton
               kernel) and only its [T] result is copied back.

GPU ordering: the GPU work of a call phase is issued together by `seal()`, in one side-stream
context: the side stream first waits on the job's current stream (an event wait, no host sync),
so every copy sees the values as of the call; snapshot copies come first and the job's stream
waits for them (device-side), so a kernel that later rewrites such a tensor cannot overtake its
copy; the hashes and other copies overlap the job's next kernels (DeepEP's comm kernels leave most
SMs idle). One event after the copies is what the writer side waits on, never the job. Source
tensors are `record_stream`-ed on the side stream so the caching allocator does not reuse them
before the copies finish.
"""
from __future__ import annotations

import threading
import time
import weakref
from typing import Any

import numpy as np
import torch

from epreplay.capture.packed import all_finite, tagged
from epreplay.format.fingerprint import fingerprint_rows
from epreplay.format.fingerprint_cpu import rows_cpu
from epreplay.format.fingerprint_gpu import fingerprint_rows_fast

_FLOAT_KINDS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
# Recent CPU snapshots: id -> (weakref to the source, its _version then, the copy). 8 covers the
# tensors one MoE layer passes twice; ids are checked against the weakref, never trusted alone.
_SNAPSHOT_CACHE = 8
_snapshots: dict[int, tuple[Any, int, torch.Tensor]] = {}


def _rows_finite(x: Any) -> torch.Tensor:
    """0-d bool: every value of x (and of an FP8 pair's scales) is finite; FP8 codes are not
    checked (e4m3fn saturates; a NaN there comes from a NaN scale or input, checked elsewhere)."""
    parts = list(x) if isinstance(x, (tuple, list)) else [x]
    ok = torch.ones((), dtype=torch.bool, device=parts[0].device)
    for p in parts:
        if p.dtype in _FLOAT_KINDS and p.numel():
            ok = ok & torch.isfinite(p).all()
    return ok


def _clone(x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return tuple(p.detach().clone() for p in x)
    return x.detach().clone()


def _nbytes(x: Any) -> int:
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(p) for p in x)
    return x.numel() * x.element_size()


class PinnedPool:
    """Pinned host buffers for device->host copies, kept by size class and reused.

    torch's pinned allocator costs 25-55 us per `empty(pin_memory=True)` on an H200 host (it polls
    the events of every block in use), ~11 times per prefill step: most of capture's hot-path
    time. Buffers come back here once their record has left the process (Recorder, writer
    "process"); until then nothing else writes them. At most `max_bytes` are kept.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.kept = 0
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()  # take: the job's thread; give: the courier

    def take(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a pinned tensor of like's shape and dtype, the buffer to give back later)."""
        n = like.numel() * like.element_size()
        size = max(512, 1 << max(0, (n - 1).bit_length()))
        with self._lock:
            free = self._free.get(size)
            buf = free.pop() if free else None
            if buf is not None:
                self.kept -= size
        if buf is None:
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        return buf[:n].view(like.dtype).reshape(like.shape), buf

    def give(self, bufs: list[torch.Tensor]) -> None:
        with self._lock:
            for buf in bufs:
                size = buf.numel()
                if self.kept + size <= self.max_bytes:
                    self._free.setdefault(size, []).append(buf)
                    self.kept += size


class Staging:
    """The staged tensors of one call (see the module docstring)."""

    __slots__ = ("items", "nbytes", "cuda", "_event", "_side", "_after", "_pending", "_pool", "bufs")

    def __init__(self, cuda_side: "torch.cuda.Stream | None" = None, pool: PinnedPool | None = None) -> None:
        self.items: dict[str, Any] = {}
        self._pool = pool
        self.bufs: list[torch.Tensor] = []  # pinned buffers taken from the pool
        self.nbytes = 0
        self._side = cuda_side
        self.cuda = cuda_side is not None
        self._event: Any = None
        self._after: Any = None  # an EventOverlap the outputs' copies must also wait for
        # GPU work of the current phase, issued together by seal(): (kind, name, tensor(s)) with
        # kind "snap" (a copy the job's stream must not overtake), "keep" or "fp".
        self._pending: list[tuple[str, str, Any]] = []

    # --- hot path -------------------------------------------------------------------------
    def keep(self, name: str, t: torch.Tensor | None) -> None:
        if t is None:
            return
        if t.is_cuda:
            self._to_host("keep", name, t)
        else:
            self.items[name] = t

    def snapshot(self, name: str, t: torch.Tensor | None) -> None:
        if t is None:
            return
        if t.is_cuda:
            self._to_host("snap", name, t)
            return
        # A layout and its dispatch (an LL dispatch and its combine) pass the same topk_idx:
        # one copy serves both while the tensor's version counter says nobody wrote to it.
        key = id(t)
        hit = _snapshots.get(key)
        if hit is not None and hit[0]() is t and hit[1] == t._version:
            self.items[name] = hit[2]
            return
        copy = t.detach().clone()
        if len(_snapshots) >= _SNAPSHOT_CACHE:
            _snapshots.pop(next(iter(_snapshots)))
        _snapshots[key] = (weakref.ref(t), t._version, copy)
        self.items[name] = copy
        self.nbytes += t.numel() * t.element_size()

    def rows_fp(self, name: str, x: Any) -> None:
        """Fingerprint rows of x later (CPU: clone now) or on the device at seal() (GPU)."""
        if x is None:
            return
        first = x[0] if isinstance(x, (tuple, list)) else x
        if first.is_cuda and self._side is not None:
            self._pending.append(("fp", name, x))
            self.nbytes += 9 * first.shape[0]
        elif first.is_cuda:
            self.items[name] = fingerprint_rows_fast(x).cpu()
            self.items[name + ":finite"] = _rows_finite(x).cpu()
        else:
            self.items[name] = ("fp", _clone(x))
            self.nbytes += _nbytes(x)

    def after(self, event: Any) -> None:
        """The outputs come from DeepEP's comm stream (async_finish=True): order the side
        stream's copies after `event` (an EventOverlap) too, not only after the job's stream."""
        if self.cuda and event is not None and hasattr(event, "current_stream_wait"):
            self._after = event

    def value(self, name: str, v: Any) -> None:
        """A plain Python value (ints, lists): stored as is."""
        self.items[name] = v

    def _to_host(self, kind: str, name: str, t: torch.Tensor) -> None:
        if self._side is None:  # a CUDA tensor reached a CPU-configured staging: copy synchronously
            self.items[name] = t.detach().cpu()
            return
        self._pending.append((kind, name, t))
        self.nbytes += t.numel() * t.element_size()

    def seal(self) -> None:
        """End of a call phase (inputs, or outputs): issue its GPU work in one go on the side
        stream, after everything the job's stream has queued so far, and record the one event the
        writer side waits on. Snapshots go first, and the job's stream waits for them (a device
        wait, no host sync), so a later kernel rewriting such a tensor cannot overtake the copy;
        fingerprints and other copies overlap the job's next kernels."""
        pending, self._pending = self._pending, []
        if not pending or self._side is None:
            return
        side = self._side
        first = pending[0][2]
        job = current_stream((first[0] if isinstance(first, (tuple, list)) else first).device)
        side.wait_stream(job)
        snaps = [p for p in pending if p[0] == "snap"]
        rest = [p for p in pending if p[0] != "snap"]
        torch.cuda.set_stream(side)  # torch.cuda.stream(side)'s effect, without its lookups
        try:
            if self._after is not None:  # async_finish: outputs are done when DeepEP's event is
                self._after.current_stream_wait()
            for _, name, t in snaps:
                self._copy(name, t)
                t.record_stream(side)
            if snaps:
                job.wait_stream(side)
            for kind, name, t in rest:
                if kind == "fp":
                    self._copy(name, fingerprint_rows_fast(t))
                    self._copy(name + ":finite", _rows_finite(t))
                    for part in (t if isinstance(t, (tuple, list)) else (t,)):
                        part.record_stream(side)
                else:
                    self._copy(name, t)
                    t.record_stream(side)
            ev = torch.cuda.Event()
            ev.record(side)
        finally:
            torch.cuda.set_stream(job)
        self._event = ev
        self._after = None

    def _copy(self, name: str, t: torch.Tensor) -> None:
        """An async device->host copy into pinned memory (on the side stream: seal's context)."""
        if self._pool is not None:
            host, buf = self._pool.take(t)
            self.bufs.append(buf)
        else:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t.detach(), non_blocking=True)
        self.items[name] = host

    # --- writer thread ----------------------------------------------------------------------
    def wait(self) -> None:
        ev = self._event
        if ev is not None:
            ev.synchronize()

    def array(self, name: str) -> np.ndarray | None:
        """The staged tensor as numpy (bf16 and fp8 as raw unsigned views; see to_numpy)."""
        v = self.items.get(name)
        if v is None:
            return None
        return to_numpy(v)

    def fingerprints(self, name: str) -> tuple[np.ndarray, bool] | None:
        """(fp_T uint64, all finite) for a rows_fp() entry, or None."""
        v = self.items.get(name)
        if v is None:
            return None
        if tagged(v, "fpdone"):  # batch_fingerprints did it
            return v[1], v[2]
        if tagged(v, "fp"):
            x = v[1]
            fast = rows_cpu(x)
            if fast is not None:
                return fast[0], bool(fast[1].all())
            fp = fingerprint_rows(x).numpy().view(np.uint64)
            return fp, bool(_rows_finite(x))
        marks = {k: t.numpy() for k in (name + ":finite", name + ":nonfinite")
                 if (t := self.items.get(k)) is not None}
        return v.numpy().view(np.uint64), all_finite(marks, name)


def _fp_key(x: Any) -> tuple:
    parts = x if isinstance(x, tuple) else (x,)
    return tuple((p.dtype, p.shape[1]) for p in parts)


def _row_finite(x: Any) -> torch.Tensor:
    """[T] bool: row t of x (and of an FP8 pair's scales) holds only finite values."""
    parts = list(x) if isinstance(x, tuple) else [x]
    ok = torch.ones(parts[0].shape[0], dtype=torch.bool)
    for p in parts:
        if p.dtype in _FLOAT_KINDS and p.numel():
            ok &= torch.isfinite(p).all(dim=1)
    return ok


def batch_fingerprints(stagings: list[Staging]) -> None:
    """Fingerprint the pending CPU rows of many calls: one C pass per call where epreplay.format._fpc is
    built (fingerprint_cpu.rows_cpu), else one fingerprint_rows call per row format (dtype and
    width): a fingerprint depends on its row alone, so hashing the rows of several calls together
    and splitting the result gives the same bits, while the per-call overhead of the torch
    reference (dominant for decode-sized calls) is paid once per batch."""
    groups: dict[tuple, list[tuple[Staging, str, Any]]] = {}
    for st in stagings:
        for name, v in st.items.items():
            if not tagged(v, "fp"):
                continue
            fast = rows_cpu(v[1])
            if fast is not None:
                st.items[name] = ("fpdone", fast[0], bool(fast[1].all()))
            else:
                groups.setdefault(_fp_key(v[1]), []).append((st, name, v[1]))
    for entries in groups.values():
        xs = [x for _, _, x in entries]
        if isinstance(xs[0], tuple):
            cat: Any = tuple(torch.cat([x[i] for x in xs]) for i in range(len(xs[0])))
            rows = [x[0].shape[0] for x in xs]
        else:
            cat = torch.cat(xs) if len(xs) > 1 else xs[0]
            rows = [x.shape[0] for x in xs]
        fp = fingerprint_rows(cat).numpy().view(np.uint64)
        finite = _row_finite(cat).numpy()
        start = 0
        for (st, name, _), n in zip(entries, rows):
            st.items[name] = ("fpdone", fp[start:start + n], bool(finite[start:start + n].all()))
            start += n


def to_numpy(t: Any) -> Any:
    """A host tensor as a codec array: numpy, or (uint view, logical name) for bf16/fp8.
    Values already in that form pass through."""
    if isinstance(t, tuple) and len(t) == 2 and isinstance(t[1], str):
        return t
    if isinstance(t, torch.Tensor):
        t = t.detach()
        if t.is_cuda:
            t = t.cpu()
        if t.dtype == torch.bfloat16:
            return (t.contiguous().view(torch.uint16).numpy(), "bfloat16")
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return (t.contiguous().view(torch.uint8).numpy(), str(t.dtype).replace("torch.", ""))
        return t.contiguous().numpy()
    return np.asarray(t)


_STREAMS: dict[tuple, "torch.cuda.Stream"] = {}  # (stream id, device index, type) -> Stream


def current_stream(device: torch.device) -> "torch.cuda.Stream":
    """torch.cuda.current_stream(device) without its Python device-index resolution (~20-30 us
    a call on an H200 host, several times per hooked call); same result. The Stream objects are
    kept per stream id (a job uses a handful), so none is made per call."""
    try:
        key = torch._C._cuda_getCurrentStream(device.index if device.index is not None
                                              else torch.cuda.current_device())
        got = _STREAMS.get(key)
        if got is None:
            sid, index, dtype = key
            got = _STREAMS[key] = torch.cuda.Stream(stream_id=sid, device_index=index, device_type=dtype)
        return got
    except (AttributeError, TypeError):  # a torch without that binding
        return torch.cuda.current_stream(device)


class Timer:
    """Call duration: perf_counter on CPU; CUDA events on the job's stream on GPU (read by the
    writer side)."""

    __slots__ = ("t0", "t1", "ev0", "ev1", "stream")

    def __init__(self, stream: "torch.cuda.Stream | None" = None) -> None:
        self.t1 = 0
        self.ev0 = self.ev1 = None
        self.stream = stream
        if stream is not None:
            self.ev0 = torch.cuda.Event(enable_timing=True)
            self.ev1 = torch.cuda.Event(enable_timing=True)
            self.ev0.record(stream)
        self.t0 = time.perf_counter_ns()

    def stop(self) -> None:
        self.t1 = time.perf_counter_ns()
        if self.ev1 is not None:
            self.ev1.record(self.stream)

    def duration_ns(self) -> int:
        if self.ev1 is not None:
            self.ev1.synchronize()
            return int(self.ev0.elapsed_time(self.ev1) * 1e6)
        return self.t1 - self.t0 if self.t1 else -1
