"""The job's side of the capture ring: what a hooked call costs the job, and the writer it feeds.

Per hooked call the job's thread does only this (Recorder.begin/end on host tensors):
bind the arguments, count (buffer, seq, step, layer), let extract.stage_inputs/stage_outputs
name what the op records (into a `RingStaging`, which only collects references), and write one
frame per phase into the shared ring (ring_frames.write_call: one memmove per array, one 8-byte
store to publish). No queue, no courier thread, no per-record Python anywhere else in the job:
the writer (a process by default, writer_proc.py; else a thread, ring_thread.py) reads the
frames, joins and builds the records, hashes rows on its own CPU, compresses and writes. A frame
that does not fit is dropped and counted; the hook never waits.

`RingPath` owns the ring and the writer for one capture session: control messages (events,
dumps, hang reports) go to the writer over its pipe tagged with the ring position, `flush`
waits on the ring's committed word, `close` ends the session and returns the writer's facts.
A monitor thread (wakes every MONITOR_S, no per-record work) restarts a writer process that
died (kill -9, OOM): the new one resumes from the ring, so no published frame is lost.
"""
from __future__ import annotations

import ctypes
import marshal
import sys
import threading
import time
from typing import Any

from epreplay.capture import fast_plan
from epreplay.capture.extract import ValidRows, describe, stage_inputs, stage_outputs
from epreplay.capture.recorder_meta import ll_parity
from epreplay.capture.ring_staging import RingStaging
from epreplay.capture.ring_frames import BEGIN, CALL, END, HUNG, write_call, write_control
from epreplay.capture.ring_thread import IDLE_RINGS, ThreadWriter, idle_ring, ring_sizes
from epreplay.capture.shm_ring import W_COMMITTED, W_DROPPED, W_HEAD, ShmRing

# How often the monitor looks at the writer process: a dead writer costs at most this much
# ring space before a new one drains it (and the ring holds seconds of traffic).
MONITOR_S = 0.05
# Writer restarts per session before capture turns off: a writer that keeps dying is broken.
MAX_RESTARTS = 3
memmove = ctypes.memmove


class RingCall:
    """A hooked call between entry and its frame (what Recorder.begin returns on the ring path)."""

    __slots__ = ("id", "op", "bs", "buffer", "seq", "step", "layer", "level", "payload", "args",
                 "meta", "meta_n", "tokens", "staging", "status", "done", "error", "start_ns", "t0",
                 "t_mono", "hung_reported", "tags", "args_blob", "learn", "parity")

    def __init__(self, call_id: int, op: Any, bs: Any, seq: int, step: int, layer: int, level: Any,
                 payload: bool) -> None:
        self.id, self.op, self.bs, self.buffer, self.seq = call_id, op, bs, bs.id, seq
        self.step, self.layer, self.level, self.payload = step, layer, level, payload
        self.tags: Any = None  # capture.tag_tokens() ids for this dispatch
        self.args: Any = None  # the bound arguments (references), for a HUNG frame
        self.meta_n = 0
        self.meta: Any = None  # made once, by the first frame (RingPath._meta)
        self.args_blob = b""  # marshal of the argument descriptions (RingPath._meta)
        self.learn: Any = None  # a recv hook's call: the first step of its plan (fast_plan.RecvLearn)
        self.parity = -1  # a compiled-hook call's ll_parity, counted by the hook (-1: count it here)
        self.tokens = 0
        self.status = 0
        self.done = False
        self.error: str | None = None
        self.hung_reported = False
        self.start_ns = time.time_ns()
        self.t0 = time.perf_counter_ns()  # at return: the call's duration in ns
        self.t_mono = time.monotonic()


# What a call site records that does not change from call to call — the argument descriptions
# (record meta "args") and the op's meta keys (E, M, hidden, dtypes, config...) — made once per
# key of the arguments' types, dtypes, shapes and plain values: describing 14 arguments and the
# meta costs ~20 us a call, the key ~3-8 us. Only "ll_parity" and "dispatch_seq" are per call.
# Bounded: a job whose shapes never repeat stops caching (and describes each call).
SITES_MAX = 4096
_SITES: dict[Any, tuple[dict[str, Any], bytes]] = {}


def _key(v: Any) -> Any:
    if v is None or v.__class__ in (bool, int, float, str):
        return v
    if v.__class__ is tuple:
        return tuple(_key(p) for p in v)
    if hasattr(v, "data_ptr"):  # a tensor
        return (v.dtype, v.shape, v.is_cuda)
    if v.__class__ is list:
        return ("list", len(v))
    if v.__class__.__name__ == "Config":
        return (v.__class__, id(v))  # described by its repr: taken once per object
    return v.__class__  # described by its type name (an EventOverlap: a new one each call)


def _keys_py(values: Any) -> tuple:
    return tuple(map(_key, values))


try:  # the C version of the same key (capture/_ringc.c), where it was built
    from epreplay.capture._ringc import key as _key_c

    import torch as _torch

    def _keys(values: Any) -> tuple:
        return _key_c(values, _torch.Tensor)
except ImportError:
    _keys = _keys_py


def args_text(args: dict[str, Any]) -> bytes:
    """marshal.dumps({name: extract.describe(value)}) for the bound arguments: what the frame
    carries as "args" (the writer unmarshals it into the record's meta)."""
    return marshal.dumps({k: describe(v) for k, v in args.items()})


class RingPath:
    """One capture session's ring and writer (see the module docstring)."""

    def __init__(self, config: Any, *, rank: int, world_size: int, cuda: bool = False) -> None:
        self.config, self.rank, self.world_size = config, rank, world_size
        self.proc: Any = None
        self.dev: Any = None  # device_stage.DeviceStage, made at the first CUDA call
        self.setup_ns = 0  # one-off set-up inside a hook (the device ring), reported apart
        self.thread: Any = None
        self.restarts = 0
        self.off_reason: str | None = None  # set when the writer failed for good
        self.on_off: Any = None  # Recorder.disable, set by the recorder
        self.fast: Any = None  # fast_plan.FastSession: calls of a learned plan skip this class
        self._ctl_lock = threading.Lock()
        # Frames are written by the job's thread(s) and, for HUNG, the watchdog: one at a time
        # (an uncontended lock: ~0.1 us).
        self._write_lock = threading.Lock()
        self._closing = False
        if config.writer == "process":
            from epreplay.capture.writer_proc import acquire_ring

            self.proc = acquire_ring(config, rank=rank, world_size=world_size, cuda=cuda)
            self.ring: ShmRing = self.proc.ring
            self.ring.set_word(W_DROPPED, 0)  # drops are counted per session (before any frame)
        else:
            from epreplay.capture.ring_consumer import RingConsumer
            from epreplay.capture.sink import Sink

            self.ring = idle_ring(*ring_sizes(config, cuda))
            self.sink = Sink(config, rank=rank, world_size=world_size)
            self.thread = ThreadWriter(RingConsumer(self.ring, self.sink), self)
        self.ring.deferred = cuda  # GPU frames are published by the device drain
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name=f"epreplay-ring-monitor-{rank}",
                                         daemon=True)
        self._monitor.start()

    # --- frames (the job's thread; the watchdog's for HUNG) -------------------------------------
    def _meta(self, rec: Any, call: RingCall, args: dict[str, Any]) -> dict[str, Any]:
        """The call's meta (made once per call: a copy of its site's, the per-call keys set)."""
        if call.meta is not None:
            return call.meta
        bs = call.bs
        call.args = args
        key = (call.op, bs.ep_rank, bs.ep_size, tuple(args), _keys(args.values()))
        site = _SITES.get(key)
        if site is None:
            meta = call.meta = {"ep_rank": bs.ep_rank, "ep_size": bs.ep_size}
            rec._op_meta(call, bs, args)
            site = (dict(meta), args_text(args))
            if len(_SITES) < SITES_MAX:
                _SITES[key] = site
        else:
            meta = call.meta = dict(site[0])
            if "ll_parity" in meta:  # a low-latency dispatch: which of the two receive buffers
                meta["ll_parity"] = ll_parity(call, bs)
            if "dispatch_seq" in meta:  # the dispatch whose handle this call used
                meta["dispatch_seq"] = rec._lineage_of(args.get("handle"))
        call.args_blob = site[1]
        return meta

    @staticmethod
    def _inputs(call: RingCall, args: dict[str, Any], st: RingStaging) -> None:
        call.staging = st
        if call.tags is not None:
            import torch

            st.snapshot("token_tag_T", torch.as_tensor(call.tags, dtype=torch.int64))
        stage_inputs(call, args, call.payload)

    def _write(self, rec: Any, kind: int, call: RingCall, head: tuple, st: RingStaging) -> bool:
        with self._write_lock:
            specs = None
            if st.dev:
                # busy from the reservation in D to the frame: a compiled hook on another thread
                # hands its call to this path (and waits for the lock) instead of reserving too
                self.ring.state[3] += 1
                try:
                    specs = self._gather(st)
                finally:
                    self.ring.state[3] -= 1
                if specs is None:  # the device ring is full: drop and count
                    self.ring.count_drop()
                    rec.dropped += 1
                    return False
            ok = write_call(self.ring, kind, call.id, head, st.arrays, st.values, memmove, specs)
        if not ok:
            rec.dropped += 1
        return ok

    def _gather(self, st: RingStaging) -> Any:
        from epreplay.capture.stage import current_stream

        first = st.dev[0][1]
        first = first.x if isinstance(first, ValidRows) else first
        device = (first[0] if isinstance(first, tuple) else first).device
        if self.dev is None:
            from epreplay.capture.device_stage import DeviceStage

            if not self.ring.dev_capacity:
                raise RuntimeError("a CUDA tensor reached a host-only capture session "
                                   "(its first hooked call was on the CPU)")
            t0 = time.perf_counter_ns()
            self.dev = DeviceStage(self.ring, device, self._write_lock, self._fast_streams)
            self.setup_ns += time.perf_counter_ns() - t0  # once a session: not the hooks' cost
        if self.dev.failed:
            raise RuntimeError(self.dev.failed)
        return self.dev.gather(st.dev, current_stream(device), st.after_ev)

    def _fast_streams(self) -> list:
        """The streams the compiled hook gathered on since the drain last asked."""
        return self.fast.session.take_streams() if self.fast is not None else []

    @staticmethod
    def _begin_head(call: RingCall, meta: dict[str, Any]) -> tuple:
        return (int(call.op), call.buffer, call.seq, call.step, call.layer, call.start_ns,
                int(call.level), call.tokens, meta, call.args_blob)

    def call_frame(self, rec: Any, call: RingCall, args: dict[str, Any], result: Any) -> None:
        """The call returned (or raised: result None): its one CALL frame, inputs and outputs."""
        meta = self._meta(rec, call, args)
        st = call.staging = RingStaging()
        self._inputs(call, args, st)
        if result is not None:
            stage_outputs(call, args, result)
        if call.error is not None:
            meta["error"] = call.error
        head = self._begin_head(call, meta)
        if self._write(rec, CALL, call, head + ((int(call.status), call.tokens, call.t0, None, True),), st) \
                and self.fast is not None:
            fast_plan.learn(self.fast, call, args, result, st, meta)  # the next such call: compiled

    def begin_frame(self, rec: Any, call: RingCall, args: dict[str, Any], result: Any) -> None:
        """A low-latency call whose outputs come with its recv hook: the inputs now."""
        meta = self._meta(rec, call, args)
        st = call.staging = RingStaging()
        self._inputs(call, args, st)
        call.meta_n = len(meta)
        if self._write(rec, BEGIN, call, self._begin_head(call, dict(meta)), st):
            # the inputs' part of the call's plan; the outputs' part comes with the hook
            call.learn = fast_plan.learn_begin(self.fast, call, args, result, st, meta)

    def end_frame(self, rec: Any, call: RingCall, args: dict[str, Any], result: Any) -> None:
        """The recv hook ran: the outputs (END, joined to the BEGIN by call id)."""
        st = call.staging = RingStaging()
        stage_outputs(call, args, result)
        call.done = True
        meta = call.meta
        added = dict(list(meta.items())[call.meta_n:]) if len(meta) > call.meta_n else None
        if self._write(rec, END, call, (int(call.status), call.tokens, call.t0, added, True), st):
            fast_plan.learn_end(self.fast, call.learn, call, args, result, st, added)
        call.learn = None

    def hung_frame(self, rec: Any, call: RingCall) -> None:
        """The watchdog's report of a call running past the hang timeout: its inputs as of now,
        status HUNG (the call's own frame follows if it ever returns)."""
        args = call.args
        if args is None:
            return
        meta = dict(self._meta(rec, call, args))
        st = RingStaging()
        self._inputs(call, args, st)
        self._write(rec, HUNG, call, self._begin_head(call, meta), st)

    # --- control -----------------------------------------------------------------------------
    def control(self, msg: tuple) -> None:
        """A control message, ordered after every frame published so far: a CTL frame in the
        ring, or over the pipe (tagged with the ring position) when the ring is full."""
        if msg[0] != "wake":
            with self._write_lock:
                if write_control(self.ring, msg):
                    return
        at = self.ring.word(W_HEAD)
        with self._ctl_lock:
            if self.thread is not None:
                self.thread.put(at, msg)
                return
            try:
                self.proc.send_many([("ctl", at, msg)])
            except OSError:
                pass  # the monitor restarts the writer; this message is lost with it

    def flush(self, timeout: float) -> bool:
        """Wait until every frame published so far is in the sink (shard or flight ring)."""
        target = self.ring._head  # written so far (a GPU session's drain publishes them shortly)
        self.control(("wake",))
        end = time.monotonic() + timeout
        while self.ring.word(W_COMMITTED) < target:
            if time.monotonic() > end or self.off_reason is not None:
                return False
            time.sleep(0.001)
        return True

    def close(self, timeout: float) -> dict[str, Any]:
        """Drain the ring, write the footer; the writer's facts. Raises RuntimeError with the
        reason when the writer failed."""
        self._closing = True
        if self.dev is not None:
            self.dev.stop()  # the last device bytes and frames reach the ring
            if self.dev.failed:
                self._off(self.dev.failed)
        self._stop.set()
        self._monitor.join(2.0)
        if self.off_reason is not None:
            raise RuntimeError(self.off_reason)
        if self.thread is not None:
            facts = self.thread.close(timeout)
            IDLE_RINGS.append(self.ring)  # the next session of this process reuses it
            return facts
        return self.proc.close(timeout)

    def kill(self) -> None:
        self._closing = True
        self._stop.set()
        if self.proc is not None:
            self.proc.kill()

    # --- monitor -------------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(MONITOR_S):
            if self.proc is None or self._closing or self.proc.proc.poll() is None:
                continue
            why = self.proc.why_off(0.0)
            if "exit code" not in why or self.restarts >= MAX_RESTARTS:  # the writer said why
                self._off(why)
                return
            try:
                from epreplay.capture.writer_proc import WriterProcess

                with self._ctl_lock:
                    self.proc = WriterProcess(ring=self.ring)
                    self.proc.begin(self.config, rank=self.rank, world_size=self.world_size,
                                    resume=True)
                self.restarts += 1
                print(f"epreplay capture: rank {self.rank}: writer process ended ({why}); restarted, "
                      f"resuming at ring position {self.ring.word(W_COMMITTED)}", file=sys.stderr,
                      flush=True)
            except OSError as exc:
                self._off(f"writer process ended ({why}) and could not restart: {exc}")
                return

    def _off(self, reason: str) -> None:
        self.off_reason = reason
        if self.on_off is not None:
            self.on_off(reason)

