"""GPU staging for the capture ring: one gather launch per hooked call, drained in bulk.

Legend: D the device staging ring's bytes (= the ring's device mirror area), T tokens.

Per hooked call with CUDA tensors the job's thread launches ONE kernel on the stream the call
ran on: `torch.cat` of the call's staged tensors (each viewed as bytes) into the next free
bytes of a device ring `D` (reserved on the host: shapes are host facts, so no device counter
and no host sync), and writes the call's frame, which names each array's place in D, into the
shared ring without publishing it. No event, no allocation, no side stream per call. Fingerprints
(level `fingerprints`) are computed by their Triton kernel on the same stream before the gather.

The drain thread, every DRAIN_S: under the ring's write lock it takes the frames and D bytes
written so far, records one event per stream the calls used (the same event object each time),
makes its side stream wait on them, copies D's new bytes into the ring's device mirror area
(host memory registered with CUDA, so the copy is one async DMA, two where it wraps), waits for
that copy, then publishes the frames. One copy and one event per batch. The events, copies and
the wait are one C call holding no GIL (_ringc.drain, driver calls): through torch they held the
job's GIL ~100+ us a batch. The drain itself is a native thread where _drainc is built
(_drainc.c): its bookkeeping in Python took the job's GIL 46-80 us a batch on an H200 host; in C
it takes none. The writer process reads the bytes from the mirror; D and the mirror share offsets, so
the writer's release of mirror bytes (word W_DTAIL) frees D's bytes too.

A call whose outputs come from DeepEP's comm stream (async_finish=True) is gathered on the side
stream after its EventOverlap, not on the job's stream (two event waits: the one exception).
CUDA-graph captures keep their own device rings (graph_ring.py); the drain never touches CUDA
while a graph is being captured (graph_ring.QUIET).
"""
from __future__ import annotations

import array
import ctypes
import threading
import time
from typing import Any

import torch

from epreplay.capture.device_driver import context_of, drain_mode, drain_period
from epreplay.capture.ring_frames import words_of
from epreplay.capture.shm_ring import HEADER, W_DTAIL, ShmRing

class DeviceStage:
    """The device ring D of one capture session and its drain (module docstring)."""

    def __init__(self, ring: ShmRing, device: torch.device, lock: threading.Lock,
                 more_streams: Any = None) -> None:
        from epreplay.capture.graph_ring import guard_graph_capture

        guard_graph_capture()  # from now on our threads never touch CUDA during a graph capture
        self.ring, self.lock = ring, lock
        self.capacity = ring.dev_capacity
        self.D = torch.empty(self.capacity, dtype=torch.uint8, device=device)
        # Absolute positions go on from the ring's last session (a reused ring: its writer's
        # release word, W_DTAIL, is where the mirror is free from).
        # [bytes of D reserved (absolute), the writer's release as last read]: an array, so the
        # compiled hook (_hookx.cpp `gather`) reserves in D by the same numbers
        self.dstate = array.array("q", [ring.word(W_DTAIL), ring.word(W_DTAIL)])
        self.drained = self.head  # bytes of D copied to the mirror
        # the streams the compiled hook gathered on since the last drain: [(id, index, type)]
        self.more_streams = more_streams
        self.streams: dict[int, Any] = {}  # streams gathered on since the last drain
        self.side = torch.cuda.Stream(device=device)
        self.ev = torch.cuda.Event()
        # blocking: the drain's wait for its copy sleeps instead of spinning a core of the host
        self.done = torch.cuda.Event(blocking=True)
        self.mirror = self._mirror()
        self._w_dtail = ctypes.c_uint64.from_buffer(ring.mm, W_DTAIL * 8)
        self._failed: str | None = None
        self.batches = 0  # drains that copied something
        self.drain_cpu_ns = 0  # the drain thread's CPU time
        self.drain_free_ns = 0  # ... of which in _ringc.drain, holding no GIL
        self.period = drain_period()
        self.mode, fns = drain_mode()
        self._fns = fns
        self._after_ev: Any = None  # the compiled hook's event for async_finish gathers (side_spec)
        self._native = None
        self.drainer: Any = None  # _drainc.Drainer (mode "thread")
        # (D's CUcontext, cuCtxGetCurrent's address): the compiled hook's device check; (0, 0): none
        self.context = (0, 0)
        if self.mode is not None:  # raw handles for the driver calls (torch makes events lazily)
            self.ev.record(self.side)
            self.done.record(self.side)
            self._side_h, self._ev_h = self.side.cuda_stream, self.ev.cuda_event
            self._done_h = self.done.cuda_event
            self._mirror_ptr, self._d_ptr = self.mirror.data_ptr(), self.D.data_ptr()
            self.context = (context_of(device, fns[5]), fns[5])
        if self.mode == "thread":
            self.drainer = self._start_drainer(fns)
            return
        if self.mode == "call":
            from epreplay.capture._ringc import drain

            self._native = (drain, fns[:4])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="epreplay-device-drain", daemon=True)
        self._thread.start()

    def _start_drainer(self, fns: tuple) -> Any:
        """The native drain thread (_drainc.c) over this ring, in D's context."""
        from epreplay.capture._drainc import Drainer
        from epreplay.capture.graph_ring import QUIET

        return Drainer(fns[:5], self.context[0], self._side_h, self._done_h, self._ev_h, self.ring.mm,
                       HEADER + self.ring.capacity, self._d_ptr, self.capacity, self.ring.state,
                       self.dstate, QUIET, self.period)

    def side_spec(self) -> tuple | None:
        """The side stream as the compiled hook gathers async_finish outputs on it (_hookx.cpp
        wait_after): (stream id, device index, device type, cudaStream_t, an event of the hook's
        own, cuEventRecord, cuStreamWaitEvent); None without the native drain."""
        if self.drainer is None:
            return None
        if self._after_ev is None:
            self._after_ev = torch.cuda.Event()
            self._after_ev.record(self.side)  # torch makes the CUevent lazily
        side = self.side
        return (side.stream_id, side.device_index, side.device_type, self._side_h,
                self._after_ev.cuda_event, self._fns[0], self._fns[1])

    @property
    def failed(self) -> str | None:
        """Why the drain stopped (capture is then turned off), or None."""
        if self._failed is None and self.drainer is not None:
            rc = self.drainer.info()[2]
            if rc:
                self._failed = f"device drain: CUDA driver error {rc}"
        return self._failed

    @failed.setter
    def failed(self, value: str | None) -> None:
        self._failed = value

    def facts(self) -> list:
        """[batches, drain CPU us, of it holding the GIL us] (recorder_control's "drain")."""
        if self.drainer is not None:
            batches, cpu_ns, _, _ = self.drainer.info()
            return [batches, cpu_ns / 1e3, 0.0]  # a native thread never holds the GIL
        return [self.batches, self.drain_cpu_ns / 1e3, (self.drain_cpu_ns - self.drain_free_ns) / 1e3]

    @property
    def head(self) -> int:
        return self.dstate[0]

    @head.setter
    def head(self, value: int) -> None:
        self.dstate[0] = value

    @property
    def _dtail_seen(self) -> int:
        return self.dstate[1]

    @_dtail_seen.setter
    def _dtail_seen(self, value: int) -> None:
        self.dstate[1] = value

    def _mirror(self) -> torch.Tensor:
        """The ring's device mirror area as a CPU tensor over the shared pages, registered with
        CUDA so device->host copies into it are DMA (no staging buffer, no extra host copy)."""
        mm = self.ring.mm
        host = torch.frombuffer(mm, dtype=torch.uint8, count=self.capacity,
                                offset=HEADER + self.ring.capacity)
        rc = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), self.capacity, 0)
        if int(rc) != 0:
            raise OSError(f"cudaHostRegister of the capture ring's device area failed ({rc})")
        self._registered = host.data_ptr()
        return host

    # --- the job's thread, under the ring's write lock ----------------------------------------
    def gather(self, tensors: list[tuple[str, torch.Tensor, str]], stream: Any, after: Any = None
               ) -> list[tuple] | None:
        """One launch: copy every tensor's bytes into D; returns their frame specs, or None when
        D is full (the call is dropped). after: an EventOverlap the copies must wait for."""
        specs, pieces, total = [], [], 0
        for name, t, tag in self._hashed(tensors, stream, after):
            if not t.is_contiguous():
                t = t.contiguous()
            words, logical = words_of(t.dtype)
            nb = t.nbytes
            specs.append([name, tag, words, tuple(t.shape), logical, nb, total])
            pieces.append(t.reshape(-1).view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8))
            total += nb
        if not total:
            return [tuple(s) for s in specs]
        cap, head = self.capacity, self.head
        off = head % cap
        pad = cap - off if off + total > cap else 0  # never wrap inside one call's bytes
        if total > cap or head + pad + total - self._dtail_seen > cap:
            self._dtail_seen = self._w_dtail.value  # re-read the writer's release only when full
            if total > cap or head + pad + total - self._dtail_seen > cap:
                return None
        handle = (self._side_h if after is not None else stream.cuda_stream) if self.drainer else 0
        if self.drainer is not None and not self.drainer.room(handle):
            return None  # 32 streams since the last batch: dropped, counted
        start = head + pad
        o = start % cap
        dst = self.D[o:o + total]
        if after is None:
            torch.cat(pieces, out=dst)  # on the current stream: the one the call ran on
        else:  # async_finish outputs: on the side stream, after DeepEP's event (see _hashed)
            torch.cuda.set_stream(self.side)  # torch.cuda.stream()'s effect without its lookups
            try:
                torch.cat(pieces, out=dst)
            finally:
                torch.cuda.set_stream(stream)
            for p in pieces:
                p.record_stream(self.side)
            stream = self.side
        if self.drainer is not None:  # after the launch: the native drain may copy up to it now
            self.drainer.advance(handle, start + total)
        else:
            self.head = start + total
            self.streams[id(stream)] = stream
        for s in specs:
            s[6] += start
        return [tuple(s) for s in specs]

    def _hashed(self, tensors: list[tuple[str, Any, str]], stream: Any, after: Any) -> list:
        """("hash" entries -> their fingerprints and per-row finite flags, computed on the stream
        the gather runs on; for async_finish outputs that is the side stream, made to wait for
        the job's stream and DeepEP's event first."""
        from epreplay.capture.extract import ValidRows
        from epreplay.format.fingerprint_gpu import fingerprint_rows_fast

        if after is not None:
            self.side.wait_stream(stream)
            torch.cuda.set_stream(self.side)
            try:
                after.current_stream_wait()
            finally:
                torch.cuda.set_stream(stream)
        if not any(tag == "hash" for _, _, tag in tensors):
            return tensors
        out = []
        if after is not None:
            torch.cuda.set_stream(self.side)
        try:
            for name, x, tag in tensors:
                if tag != "hash":
                    out.append((name, x, tag))
                    continue
                # the kernel's own non-finite marks, reduced by the writer: no extra launches;
                # a low-latency buffer's valid rows (extract.ValidRows): counts read on the device
                if isinstance(x, ValidRows):
                    fp_T, marks = fingerprint_rows_fast(x.x, valid_counts_L=x.counts_L(), with_finite="raw")
                else:
                    fp_T, marks = fingerprint_rows_fast(x, with_finite="raw")
                out.append((name, fp_T, "a"))
                out.append((name + ":nonfinite", marks, "a"))
        finally:
            if after is not None:
                torch.cuda.set_stream(stream)
        return out

    # --- the drain thread ---------------------------------------------------------------------
    def drain_once(self) -> None:
        from epreplay.capture.graph_ring import QUIET

        with QUIET:
            with self.lock:
                frames_head = self.ring._head
                dev_head = self.head
                streams = list(self.streams.values())
                self.streams.clear()
                if self.more_streams is not None:  # after dev_head: see _hookx.cpp `gather`
                    streams += [h or torch.cuda.Stream(stream_id=i, device_index=d, device_type=t)
                                for i, d, t, h in self.more_streams()]
            if dev_head > self.drained:
                cap = self.capacity
                spans, a, b = [], self.drained, dev_head
                while a < b:  # one copy, two where the new bytes wrap around D's end
                    off = a % cap
                    n = min(b - a, cap - off)
                    spans.append((off, n))
                    a += n
                if self._native is not None:
                    self._drain_native(streams, spans)
                else:
                    self._drain_torch(streams, spans)
                self.drained = dev_head
                self.batches += 1
        self.ring.publish_upto(frames_head)

    def _drain_native(self, streams: list, spans: list[tuple[int, int]]) -> None:
        """The batch's event waits, copies and the wait for them in one C call (_ringc.drain)
        that holds no GIL: the job's thread keeps running Python meanwhile."""
        handles = tuple(s if isinstance(s, int) else s.cuda_stream for s in streams)
        copies = tuple((self._mirror_ptr + off, self._d_ptr + off, n) for off, n in spans)
        t0 = time.thread_time_ns()
        rc = self._native[0](self._native[1], self._side_h, self._done_h, self._ev_h, handles, copies)
        self.drain_free_ns += time.thread_time_ns() - t0
        if rc:
            raise RuntimeError(f"CUDA driver error {rc} in the device ring's drain")

    def _drain_torch(self, streams: list, spans: list[tuple[int, int]]) -> None:
        """_drain_native's work through torch (no _ringc, or EPREPLAY_CAPTURE_NATIVE_DRAIN=0)."""
        for s in streams:
            if isinstance(s, int):
                s = torch.cuda.ExternalStream(s)
            self.ev.record(s)
            self.side.wait_event(self.ev)
        with torch.cuda.stream(self.side):
            for off, n in spans:
                self.mirror[off:off + n].copy_(self.D[off:off + n], non_blocking=True)
        self.done.record(self.side)
        self.done.synchronize()

    def _run(self) -> None:
        torch.cuda.set_device(self.D.device)  # the driver calls of _drain_native need its context
        while not self._stop.wait(self.period):
            try:
                t0 = time.thread_time_ns()
                self.drain_once()
                self.drain_cpu_ns += time.thread_time_ns() - t0
            except Exception as exc:  # noqa: BLE001 - capture off, the job goes on
                self.failed = f"device drain: {type(exc).__name__}: {exc}"
                return

    def stop(self) -> None:
        """Final drain (everything gathered so far reaches the ring), then unregister."""
        if self.drainer is not None:
            rc = self.drainer.stop()  # its last batch, then it ends
            if rc and self._failed is None:
                self._failed = f"device drain: CUDA driver error {rc}"
        else:
            self._stop.set()
            self._thread.join(5.0)
            if self.failed is None:
                self.drain_once()
        try:
            torch.cuda.cudart().cudaHostUnregister(ctypes.c_void_p(self._registered).value)
        except Exception:  # noqa: BLE001
            pass
