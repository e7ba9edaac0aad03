"""A Recorder's control side: flight-mode triggers, hang reports, capture off, flush and close, and
the closing facts of the rank (the manifest's).
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Any

from epreplay.capture import fast_plan
from epreplay.capture.courier import STOP
from epreplay.capture.extract import Call
from epreplay.capture.sink import DUMP_DEDUP_S, STATIC_FACTS


class Control:
    """A Recorder's control side: triggers, hang reports, capture off, flush, close and facts.

    Part of Recorder, split out by concern; runs on Recorder's attributes (set in its __init__)."""

    # --- triggers and control -------------------------------------------------------------
    def trigger(self, reason: str, detail: str = "", *, origin: int | None = None,
                propagate: bool = True) -> None:
        """A flight-mode trigger: dump the ring (and let the watchdog tell the other ranks)."""
        if not self.config.flight or not self.enabled:
            return
        now = time.monotonic()
        # one NaN taints many records, every rank sees the same hang: the sink dumps once and
        # adds a repeat's newer records to that dump; the other ranks are told once
        repeat = now - self._last_dump.get(reason, -DUMP_DEDUP_S) < DUMP_DEDUP_S
        if not repeat:
            self._last_dump[reason] = now
        self._post(("dump", reason, detail, self.rank if origin is None else origin, time.time_ns()))
        if propagate and not repeat and self.on_trigger is not None:
            self.on_trigger(reason, detail)

    def report_hung(self, call: Call) -> None:
        """The watchdog saw `call` run past the hang timeout: write it (HUNG) with its inputs."""
        call.hung_reported = True
        if self._rp is not None:  # the inputs as they are now (the call has not returned)
            self._rp.hung_frame(self, call)
        else:
            self._q.put(("hung", call))
        self.trigger("hang", f"{call.op.label} seq {call.seq} on buffer {call.buffer} running "
                             f"> {self.config.hang_timeout:g}s")

    def disable(self, reason: str) -> None:
        """Capture off for this process, with one logged line; the host job continues."""
        if not self.enabled:
            return
        self.enabled = False
        if self._fast is not None:
            self._fast.close()
        self.disabled_reason = reason
        print(f"epreplay capture: rank {self.rank}: capture off: {reason}", file=sys.stderr, flush=True)
        self._post(("event", {"reason": "capture_off", "detail": reason}, time.time_ns()))

    def _post(self, msg: tuple) -> None:
        """A control message to the writer, after every call recorded so far."""
        if self._rp is not None:
            self._rp.control(msg)
        else:
            self._q.put(msg)

    def flush(self, timeout: float) -> bool:
        """Wait until the courier has handed over everything queued before this call (to the
        writer process: out of this process; to an in-process sink: written or ringed)."""
        if self._rp is not None:
            return self._rp.flush(timeout)
        if self._thread is None:
            return True  # nothing recorded yet
        done = threading.Event()
        self._q.put(("flush", done))
        return done.wait(timeout) or not self._thread.is_alive()

    # --- close --------------------------------------------------------------------------------
    def close(self, timeout: float = 30.0) -> dict[str, Any]:
        """Drain the queue, write the footer; returns this rank's closing facts. Idempotent."""
        if not self._closed:
            self._closed = True
            if self._drainer is not None:
                try:
                    self._drainer.stop()
                except Exception as exc:  # noqa: BLE001
                    self.disable(f"close: graph drain: {type(exc).__name__}: {exc}")
            if self.path is None:  # no call was hooked: an empty shard all the same
                self._choose_path(False)
            if self._rp is not None:
                self._close_ring(timeout)
                return self.facts()
            self._q.put(STOP)
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.disable(f"writer did not drain within {timeout:g}s at close")
            try:
                if self._proc is not None:
                    if self.enabled:
                        self._sink_facts = self._proc.close(timeout)
                    else:
                        self._proc.kill()
                elif self._sink is not None and self.enabled:
                    self._sink.close()
                    self._sink_facts = self._sink.facts()
            except Exception as exc:  # noqa: BLE001
                self.disable(f"close: {exc}" if isinstance(exc, RuntimeError) else f"close: {type(exc).__name__}: {exc}")
        return self.facts()

    def _close_ring(self, timeout: float) -> None:
        if self._fast is not None:
            self._fast.close()  # calls from now on: not captured (the Python hook sees it closed)
        try:
            if self.enabled:
                self._sink_facts = self._rp.close(timeout)
            else:
                self._rp.kill()
        except Exception as exc:  # noqa: BLE001
            self.disable(f"close: {exc}" if isinstance(exc, RuntimeError) else f"close: {type(exc).__name__}: {exc}")
            self._rp.kill()

    def dropped_total(self) -> int:
        """Calls dropped so far (a full ring or queue), both hooks together."""
        return self.dropped + (self._fast.stats[2] if self._fast is not None else 0)

    def hook_totals(self) -> tuple[int, int]:
        """(ns spent in the hooks, hooked calls) so far, both hooks together."""
        fast = self._fast.stats if self._fast is not None else (0, 0)
        return self.hot_ns + fast[0], self.calls + fast[1]

    def facts(self) -> dict[str, Any]:
        sink = self._sink_facts or (self._sink.facts() if self._sink is not None else {})
        fast = self._fast.stats if self._fast is not None else (0, 0, 0, 0)
        dev = self._rp.dev if self._rp is not None else None
        gi = self._fast.gather_info() if self._fast is not None else (0, 0, False, 0)
        static = {k: sink.get(k, v) for k, v in STATIC_FACTS.items()}
        return {
            "rank": self.rank, "world_size": self.world_size, "host": socket.gethostname(),
            "node": self.config.node,
            "pid": os.getpid(), "calls": self.calls + fast[1], "records": sink.get("records", 0),
            # whether the job marked a step (the slot keeps the last marked step, Python's and the
            # compiled hook's): epreplay.format.steps lets marks win over steps found in the traffic
            "steps_marked": int(self._attr[0] != fast_plan.NONE),
            "dropped": self.dropped + fast[2], "disabled": self.disabled_reason,
            "dumps": sink.get("dumps", []), "graph_skipped": self.graph_skipped
            + sum(r.skipped for r in self._graph_rings.values()),
            "graph_dropped": sum(r.dropped for r in self._graph_rings.values()),
            "flight_evicted": sink.get("flight_evicted", 0),
            "shard": f"shards/{self.run.shard_path(self.rank).name}",
            "bytes": sink.get("bytes", 0), "buffers": self.buffers,
            "writer": "process" if self._proc is not None or (self._rp is not None and self._rp.proc is not None) else "thread",
            "hot_path": self.path, "writer_restarts": self._rp.restarts if self._rp is not None else 0,
            "hot_us": (self.hot_ns + fast[0] - self.setup_ns - (self._rp.setup_ns if self._rp is not None else 0)) / 1e3,
            "compiled_frames": fast[3],
            # GPU: the compiled hook's gathers as raw launches / through at::cat_out (gather_kernel.py)
            # and the ns the launches took
            "gathers": [gi[0], gi[1], gi[3]],
            # GPU: the device drain's batches and CPU time (device_stage.py)
            # [batches, the drain's CPU us, of which holding the GIL]
            "drain": dev.facts() if dev is not None else [0, 0.0, 0.0],
            "setup_us": (self.setup_ns + (self._rp.setup_ns if self._rp is not None else 0)) / 1e3,
            "courier_cpu_us": self.courier_cpu_ns / 1e3,
            "writer_cpu_s": sink.get("cpu_s", 0.0),
            "level": self.level.label, **static,
        }
