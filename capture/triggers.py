"""Flight-mode triggers and the hang watchdog: one daemon thread per capturing process.

Every PERIOD_S the watchdog
  * looks at the calls in flight: one running longer than hang_timeout is written as a HUNG
    record with the inputs staged at its entry (in flight mode it also triggers a dump);
  * turns a SIGUSR1 (the handler only sets a flag: no I/O in a signal handler) into a dump;
  * polls RUN/DUMP, the marker file a triggering rank writes, so every rank dumps without
    needing a healthy process group (a hang is exactly when collectives cannot be trusted).
The marker holds JSON {reason, detail, rank, time_ns}; it is replaced atomically on each trigger
(a new inode), and each rank dumps once per marker version it sees.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from epreplay.capture.manifest import MARKER, write_marker
from epreplay.capture.recorder import Recorder

# 0.2 s: a dump reaches every rank well within "hang timeout + a few seconds", and a stat()
# five times a second costs nothing next to a training step.
PERIOD_S = 0.2


class Watchdog:
    """Hang detection, SIGUSR1 and the DUMP marker for one Recorder."""

    def __init__(self, rec: Recorder, *, period_s: float = PERIOD_S) -> None:
        self.rec = rec
        self.period_s = period_s
        self.marker = Path(rec.config.run_dir) / MARKER
        self._lock = threading.Lock()
        self._seen = self._identity()  # a marker from before this process started is old news
        self._signalled = False
        self._prev_handler: Any = None
        self._stop = threading.Event()
        rec.on_trigger = self.propagate
        self._install_signal()
        self._thread = threading.Thread(target=self._loop, name=f"epreplay-watchdog-{rec.rank}",
                                        daemon=True)
        self._thread.start()

    def _identity(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.marker)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _install_signal(self) -> None:
        if not self.rec.config.flight or threading.current_thread() is not threading.main_thread():
            return
        try:
            current = signal.getsignal(signal.SIGUSR1)
            if current in (signal.SIG_DFL, None):  # never take SIGUSR1 from an application
                self._prev_handler = current
                signal.signal(signal.SIGUSR1, self._on_signal)
        except (ValueError, OSError):
            pass

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signalled = True

    def propagate(self, reason: str, detail: str) -> None:
        """Tell every rank to dump: atomically replace RUN/DUMP (this rank has already queued its own)."""
        with self._lock:
            try:
                write_marker(self.rec.config.run_dir, reason, detail, self.rec.rank)
                self._seen = self._identity()
            except OSError:
                pass  # a full disk cannot stop this rank's own dump, only the others' signal

    def _check_marker(self) -> None:
        with self._lock:
            ident = self._identity()
            if ident is None or ident == self._seen:
                return
            self._seen = ident
            try:
                body = json.loads(self.marker.read_text())
            except (OSError, ValueError):
                body = {}
        self.rec.trigger(str(body.get("reason", "marker")),
                         f"DUMP marker from rank {body.get('rank', '?')}: {body.get('detail', '')}",
                         origin=int(body.get("rank", -1)), propagate=False)

    def _loop(self) -> None:
        rec, timeout = self.rec, self.rec.config.hang_timeout
        while not self._stop.wait(self.period_s):
            try:
                if timeout > 0:
                    now = time.monotonic()
                    try:
                        calls = tuple(rec.inflight.values())
                    except RuntimeError:  # changed while copying; look again next period
                        calls = ()
                    for call in calls:
                        if not call.hung_reported and now - call.t_mono > timeout:
                            rec.report_hung(call)
                    for call in rec.fast_hung(timeout):  # the compiled hook's calls
                        rec.report_hung(call)
                if self._signalled:
                    self._signalled = False
                    rec.trigger("sigusr1", "SIGUSR1 received")
                if rec.config.flight:
                    self._check_marker()
            except Exception as exc:  # noqa: BLE001 - the watchdog must not die silently
                rec.disable(f"watchdog: {type(exc).__name__}: {exc}")
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        if self._prev_handler is not None and threading.current_thread() is threading.main_thread():
            try:
                signal.signal(signal.SIGUSR1, self._prev_handler)
            except (ValueError, OSError):
                pass
