"""The courier path's thread (config.hot_path "courier"; see recorder.py's docstring): it takes
calls off the Mailbox in batches and hands them, in order, to the writer process or an in-process
Sink.
"""
from __future__ import annotations

import collections
import sys
import threading
import time
from typing import Any

from epreplay.capture.extract import Call
from epreplay.format.records import Status

STOP = object()  # the last item of the courier's queue: drain, then end the thread
# Calls taken off the queue at once: their CPU fingerprints are computed in one pass per row
# format (by the writer process or the in-process sink). 64 bounds the extra latency of a record.
WRITER_BATCH = 64

# The courier looks for new calls this often: a hooked call only appends to a deque (no futex
# wake-up of the courier per call, ~20 us on the job's thread), and calls go out in batches.
# Control items (flush, close, triggers) wake it at once.
POLL_S = 0.005


class Mailbox:
    """The courier's queue: `post` (hot path) appends without waking it, `put` wakes it."""

    def __init__(self) -> None:
        self._items: collections.deque = collections.deque()
        self._wake = threading.Event()

    def post(self, item: Any) -> None:
        self._items.append(item)

    def put(self, item: Any) -> None:
        self._items.append(item)
        self._wake.set()

    def take(self, limit: int, poll_s: float) -> list[Any]:
        """Up to `limit` items, oldest first; waits up to poll_s (or a put) when there are none."""
        if not self._items:
            self._wake.wait(poll_s)
        self._wake.clear()  # items put after this are in the deque when we read it below
        out = []
        while self._items and len(out) < limit:
            out.append(self._items.popleft())
        return out


class Courier:
    """A Recorder's courier thread (`_loop`: opens the writer, then sends what the hooks queued).

    Part of Recorder, split out by concern; runs on Recorder's attributes (set in its __init__)."""

    # --- courier thread -------------------------------------------------------------------
    def _open_sink(self) -> None:
        """The writer process (default) or, where it cannot start or the config says "thread",
        an in-process Sink. Runs on the courier thread: a slow process start never delays the job."""
        if self.config.writer == "process":
            from epreplay.capture.writer_proc import acquire

            try:
                self._proc = acquire(self.config, rank=self.rank, world_size=self.world_size)
                return
            except OSError as exc:
                print(f"epreplay capture: rank {self.rank}: no writer process ({exc}); writing from "
                      f"a thread", file=sys.stderr, flush=True)
        from epreplay.capture.sink import Sink

        self._sink = Sink(self.config, rank=self.rank, world_size=self.world_size,
                          on_trigger=lambda reason, detail: self.on_trigger and self.on_trigger(reason, detail))

    def _send(self, msgs: list[Any]) -> None:
        """Hand messages to the sink: in order, calls batched (one fingerprint pass per batch)."""
        if self._proc is not None:
            from epreplay.capture.packed import pack

            wire = []
            for msg in msgs:
                if msg[0] in ("call", "hung"):
                    with self._quiet(msg[1]):
                        wire.append((msg[0], pack(msg[1])))
                    # Hand the GIL over between calls: a job thread waiting for it (back from a
                    # torch op, each of which releases it) then waits one call's packing at most.
                    time.sleep(0)
                else:
                    wire.append(msg)
            self._proc.send_many(wire)
            if self._pool is not None:
                for msg in msgs:
                    if msg[0] == "call":
                        # the bytes are in the pipe: the pinned buffers may take the next copies
                        # (not after "hung": the call may still finish and be packed again)
                        self._pool.give(msg[1].staging.bufs)
            return
        from epreplay.capture.build import build_calls

        calls = [m[1] for m in msgs if m[0] == "call"]
        with self._quiet(*calls):
            built = iter(build_calls(calls))
        for msg in msgs:
            kind = msg[0]
            if kind == "call":
                self._sink.call(next(built))
            elif kind == "hung":
                with self._quiet(msg[1]):
                    self._sink.call(build_calls([msg[1]])[0])
            elif kind == "event":
                self._sink.event(*msg[1:])
            elif kind == "dump":
                self._sink.dump(*msg[1:])
            elif kind == "graph":
                self._sink.graph(msg[1])

    @staticmethod
    def _quiet(*calls: Any) -> Any:
        """graph_ring.QUIET around CUDA event waits (they would break a CUDA graph the job is
        capturing at the same moment); a no-op for CPU calls."""
        import contextlib

        if not any(getattr(c.staging, "cuda", False) for c in calls):
            return contextlib.nullcontext()
        from epreplay.capture.graph_ring import QUIET

        return QUIET

    def _message(self, item: Any) -> Any:
        """A queue item as a sink message, or None when it is to be skipped."""
        if isinstance(item, Call):
            with self._lock:
                self._qn -= 1
                self._qbytes -= item.nbytes
            return ("call", item) if self.enabled else None
        kind = item[0]
        if not self.enabled and kind != "event":
            return None
        if kind == "hung":
            item[1].status = Status.HUNG
        return item

    def _loop(self) -> None:
        try:
            self._open_sink()
        except Exception as exc:  # noqa: BLE001
            self.disable(f"writer: {type(exc).__name__}: {exc}")
        while True:
            batch = self._q.take(WRITER_BATCH, POLL_S)  # whatever is waiting goes out together
            if not batch:
                continue
            stop = any(item is STOP for item in batch)
            flushes = [i[1] for i in batch if isinstance(i, tuple) and i[0] == "flush"]
            msgs = [m for m in (self._message(i) for i in batch if i is not STOP and
                                not (isinstance(i, tuple) and i[0] == "flush")) if m is not None]
            if self.enabled and self.dropped > self._dropped_written:
                self._dropped_written = self.dropped
                msgs.append(("event", {"reason": "dropped", "dropped": self.dropped}, time.time_ns()))
            if msgs and (self._proc is not None or self._sink is not None):
                try:
                    self._send(msgs)
                except Exception as exc:  # noqa: BLE001 - any recorder failure: capture off, job on
                    self._fail(exc)
            self.courier_cpu_ns = time.thread_time_ns()
            for done in flushes:
                done.set()
            if stop:
                return

    def _fail(self, exc: BaseException) -> None:
        if self._proc is not None and isinstance(exc, OSError):
            self.disable(self._proc.why_off())  # the process said why it stopped reading
            self._proc.kill()
        else:
            self.disable(f"writer: {type(exc).__name__}: {exc}")
