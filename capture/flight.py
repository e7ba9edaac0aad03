"""Flight mode's in-memory ring: the last N steps of built records per rank, bounded in bytes.

The writer thread builds every record as usual (numpy arrays, meta) but, in flight mode, adds it
here instead of writing it. A trigger (see triggers.py) drains the ring into the shard, behind an
EVENT record naming the reason. Draining empties the ring, so a record is written at most once.

Steps are the records' header steps; a change of step opens a new group (steps marked by a
framework need not be monotonic). Records evicted by either bound are counted (`evicted`).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from epreplay.format.records import RecordHeader

Built = tuple[RecordHeader, dict[str, Any], dict[str, Any]]


def built_nbytes(arrays: dict[str, Any]) -> int:
    """Host bytes a built record pins (arrays only; headers and meta are small)."""
    n = 0
    for v in arrays.values():
        a = v[0] if isinstance(v, tuple) else v
        n += int(getattr(a, "nbytes", 0))
    return n + 256


@dataclass
class _Group:
    step: int
    records: deque = field(default_factory=deque)  # (Built, nbytes)
    nbytes: int = 0


class FlightRing:
    """Last `steps` step groups of records, at most `max_bytes` of arrays in all."""

    def __init__(self, steps: int, max_bytes: int) -> None:
        if steps < 1:
            raise ValueError(f"flight ring needs >= 1 step, got {steps}")
        self.steps = steps
        self.max_bytes = max_bytes
        self._groups: deque[_Group] = deque()
        self.nbytes = 0
        self.evicted = 0

    def __len__(self) -> int:
        return sum(len(g.records) for g in self._groups)

    def add(self, rec: Built) -> None:
        n = built_nbytes(rec[1])
        step = rec[0].step
        if not self._groups or self._groups[-1].step != step:
            self._groups.append(_Group(step))
        g = self._groups[-1]
        g.records.append((rec, n))
        g.nbytes += n
        self.nbytes += n
        while len(self._groups) > self.steps:
            self._drop_group()
        # Over the byte bound, drop the oldest records first, keeping at least the newest one.
        while self.nbytes > self.max_bytes and len(self) > 1:
            oldest = self._groups[0]
            (_, m) = oldest.records.popleft()
            oldest.nbytes -= m
            self.nbytes -= m
            self.evicted += 1
            if not oldest.records:
                self._groups.popleft()

    def _drop_group(self) -> None:
        g = self._groups.popleft()
        self.nbytes -= g.nbytes
        self.evicted += len(g.records)

    def drain(self) -> list[Built]:
        """All records, oldest first; the ring is empty afterwards."""
        out = [rec for g in self._groups for (rec, _) in g.records]
        self._groups.clear()
        self.nbytes = 0
        return out

    def steps_held(self) -> list[int]:
        return [g.step for g in self._groups]
