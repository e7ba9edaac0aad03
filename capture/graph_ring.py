"""CUDA-graph-safe capture: hooked calls inside a captured graph stage into a device ring.

Legend: S ring slots, T tokens, K top-k, L local experts, R ranks, M max dispatch tokens.

In decode, SGLang and vLLM capture low_latency_dispatch/combine inside CUDA graphs: the Python
hook runs once, at capture time, and never again on `graph.replay()`. So at capture time the hook
records *device ops* into the graph instead of Python work: each hooked call site gets a
preallocated device ring `[S, ...]` per captured tensor and a device counter; the staged ops are

    slot = counter % S            (device integer op, no host sync)
    ring[slot] = tensor           (index_copy_, a device copy)
    counter += 1

and they replay with the graph, once per replay. A host thread drains the rings: it reads the
counter on a side stream (never the job's stream, so no host sync is added to it), copies the new
slots to pinned host memory, re-reads the counter and discards slots that the graph may have
overwritten meanwhile (a seqlock: counted as drops). Each drained slot becomes one CALL record,
so N graph replays give N recorded calls per site.

Records from graph replays live in their own sequence space, `GRAPH_SEQ_BASE + replay * sites +
site`, so (buffer, seq) still names one collective on every rank (every rank replays the same
graph the same number of times) and a replayer orders them dispatch-before-combine.
"""
from __future__ import annotations

import array
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from epreplay.capture.config import DEFAULT_GRAPH_RING_BYTES
from epreplay.capture.graph_arena import Arena, keep
from epreplay.format.records import Kind, Level, Op, RecordHeader, Status

GRAPH_SEQ_BASE = 1 << 40
# The rings' memory (graph_arena.py): a site gets 8-256 slots (256 decode steps of a small graph
# between drains: at ~100 us per replay ~25 ms, far longer than the drain's 5 ms period).
# Hooked calls one Buffer may make inside captured graphs: 61 layers x (dispatch + combine) x 4
# batch-size graphs fits; calls beyond it are counted in graph_skipped, never harm the job.
MAX_SITES = 512


# While any CUDA graph is being captured in "global" mode (torch.cuda.graph's default), a CUDA
# call from *another* thread that may synchronise (event/stream sync, host allocation, event
# query) invalidates that capture: the job's graph would fail because of us. So the recorder's
# threads make their CUDA calls under QUIET, and CUDAGraph.capture_begin/capture_end are wrapped
# to hold QUIET for the whole capture: our threads wait (records queue up or are dropped and
# counted), the job's capture never sees them. Patched once per process, on the first CUDA call.
# A _drainc.Lock where built (the same interface): the native device drain thread takes it too.
def _quiet_lock() -> Any:
    try:
        from epreplay.capture._drainc import Lock

        return Lock()
    except ImportError:
        return threading.Lock()


QUIET = _quiet_lock()


def _quiet_after_fork() -> None:
    """A forked child starts with QUIET free: a parent's drain thread may have held it at the
    fork, and that thread is not in the child to let it go."""
    global QUIET
    QUIET = _quiet_lock()


os.register_at_fork(after_in_child=_quiet_after_fork)
CAPTURING = array.array("q", [0])  # graphs being captured now (read by the compiled hook, _hookx.cpp)
_patched_graph = False
_ARENAS: "weakref.WeakSet[Arena]" = weakref.WeakSet()  # reserved before each capture begins


def _reserve_arenas() -> None:
    """Outside the capture about to begin: room for its sites' rings (graph_arena.py)."""
    for arena in list(_ARENAS):
        try:
            arena.reserve()
        except Exception:  # noqa: BLE001 - out of memory: the capture's sites are skipped, counted
            pass


def guard_graph_capture() -> None:
    """Wrap torch.cuda.CUDAGraph.capture_begin/end so QUIET is held while a graph is captured."""
    global _patched_graph
    if _patched_graph:
        return
    _patched_graph = True
    cls = torch.cuda.CUDAGraph
    begin, end = cls.capture_begin, cls.capture_end

    def capture_begin(self: Any, *args: Any, **kwargs: Any) -> Any:
        QUIET.acquire()  # waits for a recorder CUDA call in flight (short), then holds
        _reserve_arenas()
        CAPTURING[0] += 1  # the compiled hook hands calls to the graph path meanwhile
        try:
            return begin(self, *args, **kwargs)
        except BaseException:
            CAPTURING[0] -= 1
            QUIET.release()
            raise

    def capture_end(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return end(self, *args, **kwargs)
        finally:
            if QUIET.locked():
                CAPTURING[0] = max(0, CAPTURING[0] - 1)
                QUIET.release()

    cls.capture_begin, cls.capture_end = capture_begin, capture_end


@dataclass
class Site:
    """One hooked call inside a captured graph: its rings and its device counter."""

    index: int
    op: Op
    layer: int
    tokens: int
    meta: dict[str, Any]
    arena: Arena
    rings: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [S, *shape]
    counter: torch.Tensor | None = None  # [1] int64 on the device: replays so far
    drained: int = 0  # host-side: slots already turned into records

    def stage(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Record (into the graph being captured) copies of `tensors` into this site's ring;
        False when the arena has no room for the rings (the site is skipped).

        The rings are views into memory reserved before the capture (graph_arena.py, never the
        graph's private pool), not filled: a slot is only read after the counter says it was
        written.
        """
        if not self.rings:
            self.rings = self.arena.rings({n: (tuple(t.shape), t.dtype) for n, t in tensors.items()})
            if not self.rings:
                return False
        S = next(iter(self.rings.values())).shape[0]
        slot = torch.remainder(self.counter, S)
        for name, t in tensors.items():
            self.rings[name].index_copy_(0, slot, t.detach().reshape((1,) + tuple(t.shape)))
        self.counter.add_(1)
        return True


class GraphRing:
    """The graph capture path of one Buffer: its sites and the host-side drain."""

    def __init__(self, *, buffer_id: int, level: Level, device: torch.device,
                 ring_bytes: int = DEFAULT_GRAPH_RING_BYTES, max_sites: int = MAX_SITES):
        self.buffer_id = buffer_id
        self.level = level
        self.arena = Arena(torch.device(device), ring_bytes)
        _ARENAS.add(self.arena)
        self.sites: list[Site] = []
        self.dropped = 0
        self.skipped = 0  # graph calls beyond max_sites (not recorded, counted)
        self._lock = threading.Lock()
        self._side: torch.cuda.Stream | None = None
        # Counters must start at zero, and zeroing is a kernel: one made inside the capture would
        # run again at every replay. So they are made here, outside any capture (the ring is
        # created when the Buffer is first seen eagerly, as every framework warms up eagerly).
        # Kept for the process, as the rings are: a graph adds to them at every replay.
        self._counters = keep(torch.zeros(max_sites, dtype=torch.int64, device=device))

    def site(self, op: Op, *, layer: int, tokens: int, meta: dict[str, Any]) -> Site | None:
        """A new call site (called by a hook while capturing); None when the pool is used up."""
        with self._lock:
            if len(self.sites) >= self._counters.shape[0]:
                self.skipped += 1
                return None
            s = Site(len(self.sites), op, layer, tokens, dict(meta), self.arena,
                     counter=self._counters[len(self.sites):len(self.sites) + 1])
            self.sites.append(s)
            return s

    def drain(self) -> list[tuple[RecordHeader, dict[str, np.ndarray], dict[str, Any]]]:
        """Turn every slot staged since the last drain into (header, arrays, meta).

        Runs on the recorder's thread. All copies go through a private side stream; the job's
        streams are never synchronised.
        """
        out: list[tuple[RecordHeader, dict[str, np.ndarray], dict[str, Any]]] = []
        with self._lock:
            sites = [s for s in self.sites if s.rings]
            if not sites:
                return out
            if self._side is None:
                self._side = torch.cuda.Stream(device=sites[0].counter.device)
            n_sites = len(self.sites)
            with torch.cuda.stream(self._side):
                for s in sites:
                    out.extend(self._drain_site(s, n_sites))
        out.sort(key=lambda rec: rec[0].seq)
        return out

    def _drain_site(self, s: Site, n_sites: int) -> list[tuple[RecordHeader, dict, dict]]:
        side = self._side
        S = next(iter(s.rings.values())).shape[0]
        before = _read(s.counter, side)
        first = max(s.drained, before - S)
        if first > s.drained:
            self.dropped += first - s.drained  # the ring wrapped before we got there
        if before <= first:
            return []
        with torch.cuda.stream(side):  # the copies on the stream synchronized below, not this
            idx = torch.arange(first, before, device=s.counter.device) % S  # thread's default one
            host = {name: ring.index_select(0, idx).to("cpu", non_blocking=True) for name, ring in s.rings.items()}
        side.synchronize()
        after = _read(s.counter, side)
        # Slots the graph may have rewritten while we copied them are not trusted.
        safe_from = max(first, after - S)
        self.dropped += safe_from - first
        records = []
        for i in range(safe_from, before):
            row = {name: t[i - first].numpy() for name, t in host.items()}
            arrays = _finish_arrays(s.op, row)
            seq = GRAPH_SEQ_BASE + i * n_sites + s.index
            header = RecordHeader(kind=Kind.CALL, op=int(s.op), level=self.level, status=Status.OK,
                                  buffer=self.buffer_id, seq=seq, step=i, layer=s.layer,
                                  tokens=s.tokens)
            meta = dict(s.meta, graph_replay=i, graph_site=s.index)
            if "dispatch_site" in meta:  # handle lineage inside the graph: same replay, that site
                meta["dispatch_seq"] = GRAPH_SEQ_BASE + i * n_sites + meta.pop("dispatch_site")
            records.append((header, arrays, meta))
        s.drained = before
        return records


def _read(counter: torch.Tensor, side: torch.cuda.Stream) -> int:
    """The counter's current value, read on the side stream (the job's stream is not waited on)."""
    with torch.cuda.stream(side):
        host = counter.to("cpu", non_blocking=True)
    side.synchronize()
    return int(host.item())


def _finish_arrays(op: Op, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Trim fixed-size graph buffers to the record contract (records.py): for ll_dispatch the
    valid rows of src_info, expert-major, `recv_count[e]` rows of expert e."""
    if op == Op.LL_DISPATCH and "src_info_LX" in row:
        src_info_LX = row.pop("src_info_LX")
        counts_L = row["recv_count_L"].astype(np.int64)
        row["src_info_V"] = np.concatenate(
            [src_info_LX[e, : counts_L[e]] for e in range(len(counts_L))]
        ).astype(np.int32) if len(counts_L) else np.zeros(0, np.int32)
    row.pop("tokens_T", None)
    if "x_fp_T" in row:
        row["x_fp_T"] = row["x_fp_T"].view(np.uint64)
    if "combined_fp_T" in row:
        row["combined_fp_T"] = row["combined_fp_T"].view(np.uint64)
    return row


# --- the recorder's side: calls made while a graph is being captured -------------------------

@dataclass
class GraphCall:
    """A hooked call made during graph capture (what Recorder.begin returns instead of a Call)."""

    op: Op
    buffer: int
    layer: int
    level: Level
    meta: dict[str, Any] = field(default_factory=dict)


def _after_recv_hook(result: tuple, at: int, meta: dict[str, Any], stage: Any) -> tuple:
    """`stage()` where the call's outputs are valid: now, or for a call with a recv hook (result
    element `at`) once the hook ran, in the graph's order; the result to hand back."""
    hook = result[at] if len(result) > at else None
    if not (meta.get("recv_hook") and callable(hook)):
        stage()
        return result

    def recv_hook(*a: Any, **kw: Any) -> Any:
        got = hook(*a, **kw)
        stage()
        return got
    return result[:at] + (recv_hook,) + tuple(result[at + 1:])


def stage_end(ring: GraphRing, call: GraphCall, args: dict[str, Any], result: Any,
              lineage: dict[int, int]) -> Any:
    """The call returned inside the capture: add a site and stage its tensors into the graph.

    Returns the result to hand back (for a low-latency dispatch with return_recv_hook the hook is
    wrapped so the outputs are staged where they become valid, at the hook's place in the graph).
    lineage maps id(handle[0]) -> dispatch site, so a combine's record names its dispatch.
    """
    from epreplay.format.fingerprint_gpu import fingerprint_rows_fast
    from epreplay.format.records import FINGERPRINT_VERSION

    level, op = call.level, call.op
    if level >= Level.FINGERPRINTS:  # every record of the site says which definition hashed it
        call.meta["fp_version"] = FINGERPRINT_VERSION
    if op == Op.LL_DISPATCH:
        x, topk = args["x"], args["topk_idx"]
        tokens = int(topk.shape[0])
        site = ring.site(op, layer=call.layer, tokens=tokens, meta=call.meta)
        if site is None:
            return result
        handle = result[2]
        lineage[id(handle[0])] = site.index
        inputs = {}
        if level >= Level.ROUTING:
            inputs["topk_idx_TK"] = topk
        if level >= Level.FINGERPRINTS:
            inputs["x_fp_T"] = fingerprint_rows_fast(x, version=FINGERPRINT_VERSION)

        def stage_outputs() -> None:
            out = dict(inputs, recv_count_L=result[1])
            if level >= Level.ROUTING:
                out["layout_range_LR"] = handle[1]
                out["src_info_LX"] = handle[0]
            if not site.stage(out):
                ring.skipped += 1  # no room left for its rings (graph_arena.py)

        return _after_recv_hook(result, 4, call.meta, stage_outputs)
    if op == Op.LL_COMBINE:
        topk = args["topk_idx"]
        meta = dict(call.meta)
        handle = args.get("handle")
        if isinstance(handle, tuple) and handle and id(handle[0]) in lineage:
            meta["dispatch_site"] = lineage[id(handle[0])]
        site = ring.site(op, layer=call.layer, tokens=int(topk.shape[0]), meta=meta)
        if site is None:
            return result
        out: dict[str, torch.Tensor] = {}
        if level >= Level.ROUTING:
            out["topk_idx_TK"] = topk
            out["topk_weights_TK"] = args["topk_weights"]

        def stage_combined() -> None:
            if level >= Level.FINGERPRINTS:
                out["combined_fp_T"] = fingerprint_rows_fast(result[0], version=FINGERPRINT_VERSION)
            if not out:
                out["tokens_T"] = torch.ones(1, dtype=torch.int32, device=topk.device)  # a replay count
            if not site.stage(out):
                ring.skipped += 1  # no room left for its rings (graph_arena.py)

        return _after_recv_hook(result, 2, call.meta, stage_combined)
    ring.skipped += 1  # normal-mode calls sync with the host: they are never graph-captured
    return result


class Drainer(threading.Thread):
    """Drains a recorder's graph rings every `period_s` into its writer queue."""

    def __init__(self, rings: dict[int, GraphRing], put: Any, period_s: float = 0.005):
        super().__init__(name="epreplay-graph-drain", daemon=True)
        self.rings, self.put, self.period_s = rings, put, period_s
        self.stopped = threading.Event()

    def drain_once(self) -> None:
        for ring in list(self.rings.values()):
            with QUIET:
                records = ring.drain()
            if records:
                self.put(("graph", records))

    def run(self) -> None:
        while not self.stopped.wait(self.period_s):
            try:
                self.drain_once()
            except Exception as exc:  # noqa: BLE001 - the writer reports; capture never harms
                self.put(("event", {"reason": "graph_drain_failed", "detail": f"{type(exc).__name__}: {exc}"}))
                return

    def stop(self) -> None:
        """Final drain after the device has finished every graph replay launched so far."""
        self.stopped.set()
        self.join(timeout=2.0)
        with QUIET:
            for ring in self.rings.values():
                if ring.sites:
                    torch.cuda.synchronize(ring._counters.device)  # at close only, not the hot path
        self.drain_once()
