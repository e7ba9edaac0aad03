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

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from epreplay.records import Kind, Level, Op, RecordHeader, Status

GRAPH_SEQ_BASE = 1 << 40
# 256 slots hold 256 decode steps between drains: at ~100 us per step that is ~25 ms of graph
# replays, far longer than the drain thread's 5 ms period, while costing only S x (T*K*8 bytes).
DEFAULT_SLOTS = 256


def capturing() -> bool:
    """True while the current CUDA stream is being captured into a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@dataclass
class Site:
    """One hooked call inside a captured graph: its rings and its device counter."""

    index: int
    op: Op
    layer: int
    tokens: int
    meta: dict[str, Any]
    rings: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [S, *shape]
    counter: torch.Tensor | None = None  # [1] int64 on the device: replays so far
    drained: int = 0  # host-side: slots already turned into records

    def stage(self, tensors: dict[str, torch.Tensor]) -> None:
        """Record (into the graph being captured) copies of `tensors` into this site's ring."""
        first = next(iter(tensors.values()))
        if self.counter is None:
            self.counter = torch.zeros(1, dtype=torch.int64, device=first.device)
        slots = None
        for name, t in tensors.items():
            ring = self.rings.get(name)
            if ring is None:
                # Allocated at capture time, from the graph's private pool: stable addresses.
                ring = self.rings[name] = torch.zeros((_slots(self),) + tuple(t.shape), dtype=t.dtype,
                                                      device=t.device)
            slots = ring.shape[0]
            slot = torch.remainder(self.counter, slots)
            ring.index_copy_(0, slot, t.detach().reshape((1,) + tuple(t.shape)))
        self.counter.add_(1)


def _slots(site: Site) -> int:
    return int(site.meta.get("ring_slots", DEFAULT_SLOTS))


class GraphRing:
    """The graph capture path of one Buffer: its sites and the host-side drain."""

    def __init__(self, *, buffer_id: int, level: Level, slots: int = DEFAULT_SLOTS):
        self.buffer_id = buffer_id
        self.level = level
        self.slots = slots
        self.sites: list[Site] = []
        self.dropped = 0
        self._lock = threading.Lock()
        self._side: torch.cuda.Stream | None = None

    def site(self, op: Op, *, layer: int, tokens: int, meta: dict[str, Any]) -> Site:
        """A new call site (called by a hook while capturing)."""
        with self._lock:
            s = Site(len(self.sites), op, layer, tokens, dict(meta, ring_slots=self.slots))
            self.sites.append(s)
            return s

    def drain(self) -> list[tuple[RecordHeader, dict[str, np.ndarray], dict[str, Any]]]:
        """Turn every slot staged since the last drain into (header, arrays, meta).

        Runs on the recorder's thread. All copies go through a private side stream; the job's
        streams are never synchronised.
        """
        out: list[tuple[RecordHeader, dict[str, np.ndarray], dict[str, Any]]] = []
        with self._lock:
            sites = [s for s in self.sites if s.counter is not None]
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
        idx = torch.arange(first, before, device=s.counter.device) % S
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
            records.append((header, arrays, dict(s.meta, graph_replay=i, graph_site=s.index)))
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
    if "x_fp_T" in row:
        row["x_fp_T"] = row["x_fp_T"].view(np.uint64)
    if "combined_fp_T" in row:
        row["combined_fp_T"] = row["combined_fp_T"].view(np.uint64)
    return row
