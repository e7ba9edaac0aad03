"""The ring's consumer as a thread of the job's process (writer="thread", or where no writer process
could start), the idle rings kept for the next session, and the ring's sizes.
"""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from epreplay.capture.shm_ring import W_HEAD, ShmRing

if TYPE_CHECKING:
    from epreplay.capture.ring_path import RingPath


class ThreadWriter(threading.Thread):
    """writer="thread": the ring consumer in a thread of the job (one fewer process; its
    building holds the job's GIL)."""

    def __init__(self, consumer: Any, path: RingPath) -> None:
        super().__init__(name=f"epreplay-ring-writer-{path.rank}", daemon=True)
        import collections

        self.consumer, self.path = consumer, path
        self._msgs: Any = collections.deque()
        self._wake = threading.Event()
        self._done = threading.Event()
        self.cpu_s = 0.0
        self.start()

    def put(self, at: int, msg: tuple) -> None:
        self._msgs.append((at, msg))
        self._wake.set()

    def run(self) -> None:
        from epreplay.capture.writer_proc import POLL_S

        try:
            while True:
                self._wake.wait(POLL_S)
                self._wake.clear()
                while self._msgs:
                    at, msg = self._msgs.popleft()
                    if msg[0] == "close":
                        self.consumer.finish()
                        self.consumer.sink.close()
                        return
                    self.consumer.control(at, msg)
                self.consumer.drain()
                self.cpu_s = time.thread_time()
        except Exception as exc:  # noqa: BLE001 - capture off, the job goes on
            self.path._off(f"writer: {type(exc).__name__}: {exc}")
        finally:
            self.cpu_s = time.thread_time()
            self._done.set()

    def close(self, timeout: float) -> dict[str, Any]:
        self.put(self.path.ring.word(W_HEAD), ("close",))
        if not self._done.wait(timeout):
            raise RuntimeError(f"writer thread did not finish within {timeout:g}s at close")
        if self.path.off_reason is not None:
            raise RuntimeError(self.path.off_reason)
        return dict(self.consumer.sink.facts(), cpu_s=self.cpu_s)


# Rings of closed writer-thread sessions: populating a ring costs ~20 ms per 64 MiB, once.
IDLE_RINGS: list[ShmRing] = []


def idle_ring(frames: int, dev: int) -> ShmRing:
    from epreplay.capture.shm_ring import aligned

    for ring in IDLE_RINGS:
        if (ring.capacity, ring.dev_capacity) == (aligned(max(frames, 4096)), aligned(dev)):
            IDLE_RINGS.remove(ring)
            return ring
    return ShmRing.create(frames, dev)


def ring_sizes(config: Any, cuda: bool) -> tuple[int, int]:
    """(frame area, device area) bytes. A GPU session's frames hold descriptors and host items
    only (the arrays are in the device area), so 32 MiB of frames go with queue_bytes of device
    bytes; a host session's frames hold everything: queue_bytes."""
    if cuda:
        return min(config.queue_bytes, 32 << 20), config.queue_bytes
    return config.queue_bytes, 0
