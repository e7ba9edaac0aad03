"""Device memory for the CUDA-graph rings: reserved outside any capture, kept for the process.

Legend: S slots of a site's ring, B bytes.

A graph site's rings must not come from the allocator while the graph is being captured: there
they are carved from the graph's private pool, where a block the graph's own temporaries used
earlier in the capture is handed out again. At every replay those earlier kernels write the block
first, so the slots the ring kept from the previous replay were overwritten before the drain read
them (records of bf16-like garbage). So the rings are views into chunks reserved *before* a
capture begins (graph_ring.guard_graph_capture calls `reserve`), on the job's thread, outside the
capture, from the ordinary pool.

The chunks are never freed: a captured graph keeps writing its sites' slots at every replay for as
long as the job holds it, which may outlive the recorder (capture.stop(), a new session). Freed,
that memory would go to the job's next tensors and the graph would corrupt them. The total is
bounded by `budget` (CaptureConfig.graph_ring_bytes); sites that no longer fit are skipped and
counted, never harm the job.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

# One chunk is what a capture can carve without a reservation in between: 61 layers of a
# DeepSeek-V3 decode graph at 144 ranks need ~64 MiB (a dispatch site's slot is ~160 KiB of
# src_info at S=8-13, a combine site's ~12 KiB at S=170).
CHUNK_BYTES = 64 << 20
# A site's rings get up to SITE_BYTES: 256 slots of a small graph (a replay every ~100 us, the
# drain every 5 ms) and at least MIN_SLOTS of a large one (a whole-model replay takes ms).
SITE_BYTES = 2 << 20
MIN_SLOTS = 8
MAX_SLOTS = 256
ALIGN = 256  # every ring starts on a 256-byte boundary (any dtype's view, coalesced copies)

_KEEP: list[torch.Tensor] = []  # every chunk ever reserved, for the life of the process
_KEEP_LOCK = threading.Lock()


def keep(t: torch.Tensor) -> torch.Tensor:
    """Hold `t` for the life of the process (memory a captured graph writes at every replay)."""
    with _KEEP_LOCK:
        _KEEP.append(t)
    return t


def slots_for(slot_bytes: int, free_bytes: int) -> int:
    """S for a site whose one slot is `slot_bytes` when `free_bytes` are left; 0: it does not fit."""
    want = max(MIN_SLOTS, min(MAX_SLOTS, SITE_BYTES // max(1, slot_bytes)))
    fit = min(want, max(0, free_bytes) // max(1, slot_bytes))  # fewer where the chunk is nearly used
    return fit if fit >= MIN_SLOTS else 0


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(eq=False)  # hashed by identity (graph_ring keeps a WeakSet of them)
class Arena:
    """The rings' memory of one GraphRing: chunks of CHUNK_BYTES up to `budget` bytes in all."""

    device: torch.device
    budget: int
    reserved: int = 0  # bytes of every chunk so far
    chunk: torch.Tensor | None = None  # the chunk sites carve from now, [CHUNK_BYTES] uint8
    used: int = 0  # bytes of `chunk` carved
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def reserve(self) -> None:
        """Before a capture begins (outside it): a fresh chunk when the current one is 3/4 used."""
        with self._lock:
            if self.chunk is not None and self.used <= self.chunk.numel() * 3 // 4:
                return
            size = min(CHUNK_BYTES, self.budget - self.reserved)
            if size < MIN_SLOTS * ALIGN:
                return  # the budget is spent: later sites are skipped and counted
            self.chunk = keep(torch.empty(size, dtype=torch.uint8, device=self.device))
            self.reserved += size
            self.used = 0

    def rings(self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
        """Contiguous views [S, *shape] of each named (shape, dtype), carved from the chunk; {}
        when none fit. S is the same for every name of a site (one counter indexes them all)."""
        rows = {name: _numel(shape) * _itemsize(dtype) for name, (shape, dtype) in shapes.items()}
        with self._lock:
            free = 0 if self.chunk is None else self.chunk.numel() - self.used
            S = slots_for(sum(rows.values()), free - ALIGN * len(rows))  # each ring's start padding
            if S == 0:
                return {}
            out = {}
            for name, (shape, dtype) in shapes.items():
                n = _aligned(S * rows[name])
                raw = self.chunk[self.used:self.used + S * rows[name]]
                self.used += n
                out[name] = raw.view(dtype).view((S,) + tuple(shape))
            return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _itemsize(dtype: Any) -> int:
    return torch.empty((), dtype=dtype).element_size()
