"""The per-process recorder: call bookkeeping on the hot path, and the path calls take out.

Hot path (caller's thread): `begin` binds a call to (buffer, seq, step, layer); `end` records it;
`raised` records an exception. Nothing waits: a call that does not fit is dropped and counted.

Two ways out of the job's process, chosen at a session's first hooked call (config.hot_path):
  ring (default)  the call's frame goes straight into a shared-memory ring (ring_path.py,
                  shm_ring.py): host tensors by one memmove each, CUDA tensors by one gather
                  launch into a device ring drained in bulk (device_stage.py). The writer
                  process reads the ring; no thread of the job does per-record work.
  courier         the previous design, kept as the reference the ring is tested against:
                  Staging copies (stage.py), a queue, and a courier thread that waits for each
                  call's copies and hands it to the writer (writer_proc.py) or a sink.
CUDA-graph captures stage into their own device rings on either path (graph_ring.py).
Any failure (disk full, permission, an encoding bug) turns capture off for this process with
one logged line; the job goes on.
"""
from __future__ import annotations

import array
import collections
import itertools
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from epreplay import marks
from epreplay.capture import fast_plan
from epreplay.capture.config import CaptureConfig
from epreplay.capture.extract import Call, stage_inputs, stage_outputs
from epreplay.capture.extract_v2 import elastic_meta, is_elastic_call
from epreplay.capture.ring_path import RingCall
from epreplay.capture.sink import DUMP_DEDUP_S, STATIC_FACTS
from epreplay.capture.stage import PinnedPool, Staging, Timer, current_stream
from epreplay.format.records import Level, Op, Status
from epreplay.format.run import RunDir

_STOP = object()
# Calls taken off the queue at once: their CPU fingerprints are computed in one pass per row
# format (by the writer process or the in-process sink). 64 bounds the extra latency of a record.
WRITER_BATCH = 64
_OPENS_LAYER = (Op.LAYOUT, Op.DISPATCH, Op.LL_DISPATCH)


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


class BufferState:
    """What the recorder keeps per Buffer object: its id, group, and call counters."""

    __slots__ = ("owner", "id", "ep_rank", "ep_size", "cnt")

    def __init__(self, owner: "Recorder", buffer_id: int, ep_rank: int, ep_size: int) -> None:
        self.owner = owner  # a Buffer outliving one capture session gets fresh ids in the next
        self.id, self.ep_rank, self.ep_size = buffer_id, ep_rank, ep_size
        # [seq, ll_calls]: an array, so the compiled hook (_hookx.cpp) counts in the same place
        self.cnt = array.array("q", [0, 0])

    @property
    def seq(self) -> int:
        return self.cnt[0]

    @seq.setter
    def seq(self, value: int) -> None:
        self.cnt[0] = value

    @property
    def ll_calls(self) -> int:
        return self.cnt[1]

    @ll_calls.setter
    def ll_calls(self, value: int) -> None:
        self.cnt[1] = value


class Recorder:
    """Capture for one process (one rank). Create through epreplay.capture.session."""

    def __init__(self, config: CaptureConfig, *, rank: int, world_size: int) -> None:
        self.config = config
        self.level = config.level
        self.rank, self.world_size = rank, world_size
        self.run = RunDir(Path(config.run_dir))
        self.enabled = True
        self.disabled_reason: str | None = None
        self.dropped = 0
        self.graph_skipped = 0  # calls made while a CUDA graph was being captured (not recorded)
        self.calls = 0
        self.hot_ns = 0  # time spent in the hooks themselves (hooks.py adds to it)
        self.setup_ns = 0  # of which: one-off set-up (ring, writer process, device ring)
        self.courier_cpu_ns = 0  # CPU time of the courier thread (GIL-holding work, mostly)
        self.buffers: list[dict[str, Any]] = []
        self.inflight: dict[int, Call] = {}  # id(call) -> call, for the watchdog
        self._lock = threading.Lock()
        self._qn = 0
        self._qbytes = 0
        self._q = Mailbox()
        self._proc: Any = None  # writer_proc.WriterProcess, or
        self._sink: Any = None  # sink.Sink when writing from the courier thread itself
        self._sink_facts: dict[str, Any] | None = None
        self._dropped_written = 0
        self._lineage: dict[int, tuple[Any, int]] = {}  # id(handle[0]) -> (weakref, seq)
        # step/layer attribution (_attribute): [marked step (fast_plan.NONE: none), auto step,
        # auto layer, the op that opened the layer (-1: none)]; an array, so the compiled hook
        # attributes its calls with the same state
        self._attr = array.array("q", [fast_plan.NONE, 0, -1, -1])
        self._fast: Any = None  # fast_plan.FastSession while the compiled hook records
        self._side = None  # CUDA side stream, created on the first CUDA call
        self._pool: PinnedPool | None = None  # pinned host buffers for the side stream's copies
        # CUDA-graph path (graph_ring.py): per-Buffer device rings, made on the first eager CUDA
        # call of a Buffer (outside any capture), drained by their own thread once graphs exist.
        self._graph_rings: dict[int, Any] = {}
        self._graph_lineage: dict[int, int] = {}
        self._drainer: Any = None
        self._closed = False
        self._last_dump: dict[str, float] = {}  # reason -> time.monotonic() of its last dump
        self.on_trigger: Callable[[str, str], None] | None = None  # set by triggers.Watchdog
        # The hot path, chosen at the first hooked call: "ring" (host tensors: frames into a
        # shared ring, ring_path.py) or "courier" (CUDA tensors: side-stream staging, a courier
        # thread hands calls to the writer). config.hot_path may force one.
        self.path: str | None = None
        self._rp: Any = None  # ring_path.RingPath
        self._call_ids = itertools.count(1)  # next() is atomic: hooks on several threads
        self._thread: Any = None  # the courier thread (courier path only)

    # --- buffers and attribution (hot path) -------------------------------------------------
    def buffer_state(self, buf: Any) -> BufferState:
        state = getattr(buf, "_epreplay_capture", None)
        if state is None or not isinstance(state, BufferState) or state.owner is not self:
            group = getattr(buf, "group", None)
            ep_rank = getattr(buf, "rank", None)
            ep_size = getattr(buf, "group_size", None)
            if (ep_rank is None or ep_size is None) and group is not None:
                ep_rank, ep_size = group.rank(), group.size()
            if ep_rank is None:
                ep_rank, ep_size = self.rank, self.world_size
            state = BufferState(self, len(self.buffers), int(ep_rank), int(ep_size))
            self.buffers.append({"id": state.id, "ep_rank": state.ep_rank, "ep_size": state.ep_size,
                                 "class": f"{type(buf).__module__}.{type(buf).__qualname__}",
                                 "low_latency_mode": bool(getattr(buf, "low_latency_mode", False))})
            try:
                buf._epreplay_capture = state
            except AttributeError:
                pass
        return state

    def _attribute(self, op: Op) -> tuple[int, int]:
        """(step, layer) of a call starting now (_hookx.cpp's `attribute` is the same rules)."""
        m_step, m_layer = marks.current()
        a = self._attr  # [marked step, auto step, auto layer, opened by]
        if m_step is not None and m_step != a[0]:
            a[0] = m_step  # a new marked step restarts layer counting
            a[2], a[3] = -1, -1
        if op in _OPENS_LAYER:
            # A layout opens the next layer and its dispatch joins it; a dispatch with no
            # layout ahead of it opens the next layer itself.
            if not (op != Op.LAYOUT and a[3] == Op.LAYOUT):
                a[2] += 1
                lps = self.config.layers_per_step
                if lps and a[2] >= lps:
                    a[1], a[2] = a[1] + 1, 0
            a[3] = op
        step = m_step if m_step is not None else a[1]
        layer = m_layer if m_layer is not None else max(a[2], 0)
        return step, layer

    # --- hot path ---------------------------------------------------------------------------
    def begin(self, op: Op, buf: Any, args: dict[str, Any]) -> Call | None:
        """Start a call; None when it is dropped (queue over its bounds)."""
        bs = self.buffer_state(buf)
        seq = bs.seq
        bs.seq += 1
        self.calls += 1
        step, layer = self._attribute(op)
        if self._qn >= self.config.queue_records or self._qbytes >= self.config.queue_bytes:
            self.dropped += 1  # counted before anything is copied
            return None
        level = self.level
        payload = level >= Level.PAYLOAD and step % self.config.payload_every == 0
        if level >= Level.PAYLOAD and not payload:
            level = Level.FINGERPRINTS
        x = args.get("x")
        if x is None:  # get_dispatch_layout: its device is topk_idx's
            x = args.get("topk_idx")
        first = x[0] if isinstance(x, (tuple, list)) else x
        cuda = isinstance(first, torch.Tensor) and first.is_cuda
        if cuda and torch.cuda.is_current_stream_capturing():
            # Inside CUDA-graph capture a side-stream copy or event would break the graph: the
            # call is staged into the graph itself (graph_ring.py), or counted when it cannot be.
            return self._graph_begin(op, bs, layer, level, args)
        if cuda and bs.id not in self._graph_rings and op in (Op.LL_DISPATCH, Op.LL_COMBINE):
            self._make_graph_ring(bs.id, first.device)
        path = self.path or self._choose_path(cuda)
        if path in ("ring", "compiled"):
            return self._ring_begin(op, bs, seq, step, layer, level, payload, args)
        if cuda and self._side is None:
            from epreplay.capture.graph_ring import guard_graph_capture

            guard_graph_capture()  # from now on our threads never touch CUDA during a graph capture
            self._side = torch.cuda.Stream(device=first.device)
            if self.config.writer == "process":  # buffers come back once a record left the process
                self._pool = PinnedPool(self.config.queue_bytes)
        call = Call(op=op, buffer=bs.id, seq=seq, step=step, layer=layer, start_ns=time.time_ns(),
                    level=level, args=args, staging=Staging(self._side, self._pool) if cuda else Staging(),
                    timer=Timer(current_stream(first.device) if cuda else None),
                    t_mono=time.monotonic())
        call.meta.update(ep_rank=bs.ep_rank, ep_size=bs.ep_size)
        self._op_meta(call, bs, args)
        if op in (Op.DISPATCH, Op.LL_DISPATCH):
            tags = marks.take_tags()
            if tags is not None:
                call.staging.snapshot("token_tag_T", torch.as_tensor(tags, dtype=torch.int64))
        stage_inputs(call, args, payload)
        call.staging.seal()
        self.inflight[id(call)] = call
        return call

    def _choose_path(self, cuda: bool) -> str:
        """The session's hot path, fixed at its first hooked call (module docstring). Its set-up
        (the ring, the writer process) is counted in setup_ns, not in the hooks' time."""
        t0 = time.perf_counter_ns()
        try:
            return self._choose_path_now(cuda)
        finally:
            self.setup_ns += time.perf_counter_ns() - t0

    def _choose_path_now(self, cuda: bool) -> str:
        choice = self.config.hot_path
        compiled = choice in ("auto", "compiled")
        if choice in ("auto", "compiled"):
            choice = "ring"
        if choice == "ring":
            from epreplay.capture.ring_path import RingPath

            try:
                self._rp = RingPath(self.config, rank=self.rank, world_size=self.world_size, cuda=cuda)
                self._rp.on_off = self.disable
                hookx = fast_plan.load() if compiled and self.level < Level.PAYLOAD else None
                if hookx is not None:  # the compiled hook writes the frames of learned sites
                    self._fast = fast_plan.FastSession(self, self._rp, hookx)
                    self._rp.fast = self._fast
                    choice = "compiled"
            except OSError as exc:
                print(f"epreplay capture: rank {self.rank}: no capture ring ({exc}); staging through "
                      f"a courier thread", file=sys.stderr, flush=True)
                choice = "courier"
        if choice == "courier":
            self._thread = threading.Thread(target=self._loop, name=f"epreplay-writer-{self.rank}",
                                            daemon=True)
            self._thread.start()
        self.path = choice
        return choice

    def _ring_begin(self, op: Op, bs: BufferState, seq: int, step: int, layer: int, level: Level,
                    payload: bool, args: dict[str, Any]) -> Any:
        """Ring path: only the call's identity now; its one frame is written when it returns
        (host tensors are not changed by the call itself, so its inputs are what they were)."""
        call = RingCall(next(self._call_ids), op, bs, seq, step, layer, level, payload)
        call.args = args
        if op in (Op.DISPATCH, Op.LL_DISPATCH):
            call.tags = marks.take_tags()
        self.inflight[call.id] = call
        return call

    def _make_graph_ring(self, buffer_id: int, device: Any) -> None:
        from epreplay.capture.graph_ring import GraphRing

        self._graph_rings[buffer_id] = GraphRing(buffer_id=buffer_id, level=self.level, device=device)

    def _graph_begin(self, op: Op, bs: BufferState, layer: int, level: Level, args: dict[str, Any]) -> Any:
        from epreplay.capture.graph_ring import Drainer, GraphCall

        if bs.id not in self._graph_rings or op not in (Op.LL_DISPATCH, Op.LL_COMBINE):
            self.graph_skipped += 1  # no eager call made the ring first, or a host-synced op
            return None
        call = GraphCall(op=op, buffer=bs.id, layer=layer, level=min(level, Level.FINGERPRINTS))
        call.meta.update(ep_rank=bs.ep_rank, ep_size=bs.ep_size, graph=True)
        self._op_meta(call, bs, args)
        call.meta.pop("dispatch_seq", None)  # graph lineage is resolved per replay at drain
        if self._drainer is None:
            self._drainer = Drainer(self._graph_rings, self._post)
            self._drainer.start()
        return call

    def _op_meta(self, call: Call, bs: BufferState, a: dict[str, Any]) -> None:
        m, op = call.meta, call.op
        if op == Op.LAYOUT:
            m["E"] = int(a.get("num_experts") or 0)
        elif op in (Op.LL_DISPATCH, Op.LL_COMBINE):
            h = a.get("handle")
            if op == Op.LL_DISPATCH:
                m["M"] = int(a.get("num_max_dispatch_tokens_per_rank") or 0)
                m["E"] = int(a.get("num_experts") or 0)
                m["use_fp8"] = bool(a.get("use_fp8", True))
                m["ll_parity"] = bs.ll_calls % 2
                m["recv_hook"] = bool(a.get("return_recv_hook", False))
                bs.ll_calls += 1
            elif isinstance(h, tuple) and len(h) >= 4:
                m["M"] = h[2] if isinstance(h[2], int) else None
                m["E"] = h[-1] if isinstance(h[-1], int) else None
        else:
            for key in ("expert_alignment", "num_worst_tokens"):
                if isinstance(a.get(key), (int, float)) or hasattr(a.get(key), "__index__"):
                    m[key] = int(a[key])  # numpy/torch scalars are not JSON
            if a.get("config") is not None:
                m["config"] = repr(a["config"])
        if is_elastic_call(a):  # DeepEP V2 ElasticBuffer (records.py: variant, meta "api")
            elastic_meta(m, a)
        if op in (Op.COMBINE, Op.CACHED_DISPATCH, Op.LL_COMBINE):
            m["dispatch_seq"] = self._lineage_of(a.get("handle"))
        x = a.get("x")
        first = x[0] if isinstance(x, (tuple, list)) else x
        if isinstance(first, torch.Tensor) and first.dim() >= 1:
            m["hidden"] = int(first.shape[-1])
            m["x_dtype"] = str(first.dtype).replace("torch.", "")

    @staticmethod
    def _lineage_obj(handle: Any) -> Any:
        """What a handle is known by: a V1 handle's first tensor, a V2 EPHandle itself."""
        if isinstance(handle, tuple) and handle and isinstance(handle[0], torch.Tensor):
            return handle[0]
        return handle if hasattr(handle, "recv_src_metadata") else None

    def _lineage_of(self, handle: Any) -> int:
        obj = self._lineage_obj(handle)
        if obj is not None:
            if self._fast is not None and obj is not handle:  # V1: one store for both hooks
                return self._fast.session.lineage_get(obj)
            # V2 EPHandles: only the Python hook sees them (their sites are never planned)
            got = self._lineage.get(id(obj))
            if got is not None and got[0]() is obj:
                return got[1]
        return -1

    def _remember_handle(self, handle: Any, seq: int) -> None:
        import weakref

        obj = self._lineage_obj(handle)
        if obj is not None:
            if self._fast is not None and obj is not handle:  # V1: one store for both hooks
                self._fast.session.lineage_put(obj, seq)
                return
            key = id(obj)
            lineage = self._lineage
            # The entry goes when the handle's first tensor is freed, so ids are never stale.
            lineage[key] = (weakref.ref(obj, lambda _, k=key: lineage.pop(k, None)), seq)

    def end(self, call: Call, args: dict[str, Any], result: Any) -> Any:
        """The call returned: stage outputs (now, or when the LL recv hook runs) and enqueue."""
        ring = self._rp is not None and not isinstance(call, Call)
        if ring:
            call.t0 = time.perf_counter_ns() - call.t0  # from here on: the call's duration
            self.inflight.pop(call.id, None)
        elif not isinstance(call, Call):  # a GraphCall: staged into the graph being captured
            from epreplay.capture.graph_ring import stage_end

            return stage_end(self._graph_rings[call.buffer], call, args, result, self._graph_lineage)
        else:
            call.timer.stop()
            self.inflight.pop(id(call), None)
        if call.op == Op.DISPATCH and isinstance(result, tuple) and len(result) > 4:
            # V1: (..., handle, event); V2: (recv_x, idx, weights, EPHandle, event)
            self._remember_handle(result[3] if hasattr(result[3], "recv_src_metadata") else result[4], call.seq)
        elif call.op == Op.LL_DISPATCH and isinstance(result, tuple) and len(result) > 2:
            self._remember_handle(result[2], call.seq)
            hook = result[4] if len(result) > 4 else None
            if ring and args.get("return_recv_hook") and callable(hook):
                # the outputs are valid once the hook ran: the inputs go out now (BEGIN)
                self._rp.begin_frame(self, call, args)
                return result[:4] + (self._wrap_recv_hook(call, args, result, hook),) + result[5:]
            if not ring and call.meta.get("recv_hook") and callable(hook):
                return result[:4] + (self._wrap_recv_hook(call, args, result, hook),) + result[5:]
        if ring:
            self._rp.call_frame(self, call, args, result)
        else:
            self._ready(call, args, result)
        return result

    def _wrap_recv_hook(self, call: Call, args: dict[str, Any], result: Any, hook: Any) -> Any:
        def recv_hook(*a: Any, **kw: Any) -> Any:
            out = hook(*a, **kw)
            if not call.done and self.enabled:
                try:
                    if not isinstance(call, Call):  # ring path
                        self._rp.end_frame(self, call, args, result)
                    else:
                        self._ready(call, args, result)
                except Exception as exc:  # noqa: BLE001 - capture never breaks the job
                    self.disable(f"staging {call.op.label} outputs: {type(exc).__name__}: {exc}")
            return out
        return recv_hook

    def _ready(self, call: Call, args: dict[str, Any], result: Any) -> None:
        stage_outputs(call, args, result)
        call.staging.seal()
        call.done = True
        self._enqueue(call)

    def raised(self, call: Call, exc: BaseException) -> None:
        """The call raised: record it as ERROR with the text (the caller re-raises)."""
        if not isinstance(call, Call) and self._rp is not None:  # ring path
            try:
                self.inflight.pop(call.id, None)
                call.t0 = time.perf_counter_ns() - call.t0
                call.status = int(Status.ERROR)
                call.error = f"{type(exc).__name__}: {exc}"
                self._rp.call_frame(self, call, call.args, None)
                self.trigger("exception", f"{call.op.label} seq {call.seq}: {type(exc).__name__}: {exc}")
            except Exception as inner:  # noqa: BLE001
                self.disable(f"recording an exception: {type(inner).__name__}: {inner}")
            return
        if not isinstance(call, Call):
            return  # raised during graph capture: the capture itself fails for the caller
        try:
            call.timer.stop()
            self.inflight.pop(id(call), None)
            call.status = Status.ERROR
            call.meta["error"] = f"{type(exc).__name__}: {exc}"
            call.done = True
            self._enqueue(call, force=True)
            self.trigger("exception", f"{call.op.label} seq {call.seq}: {type(exc).__name__}: {exc}")
        except Exception as inner:  # noqa: BLE001
            self.disable(f"recording an exception: {type(inner).__name__}: {inner}")

    # --- the compiled hook's callbacks (rare: _hookx.cpp hands these calls back) -----------------
    def _fast_call(self, ident: tuple, args: tuple, kwargs: dict[str, Any]) -> tuple[RingCall, dict[str, Any]]:
        """A compiled-hook call as the RingCall (and bound arguments) the Python path would have
        made. ident: (call id, op, BufferState, seq, step, layer, start_ns, duration_ns, hook)."""
        call_id, op, bs, seq, step, layer, start_ns, duration, hook = ident
        bound = hook.binder.bind(args[1:], kwargs)
        call = RingCall(call_id, Op(op), bs, seq, step, layer, self.level, False)
        call.args = bound
        call.start_ns = start_ns
        if duration >= 0:  # end()/raised() turn t0 into the duration
            call.t0 = time.perf_counter_ns() - duration
        else:  # still running (the watchdog): from its start on the monotonic clock
            call.t_mono = time.monotonic() - (time.time_ns() - start_ns) / 1e9
        return call, bound

    def _fast_mismatch(self, ident: tuple, args: tuple, kwargs: dict[str, Any], result: Any) -> None:
        """The call's outputs were not shaped as its plan learned: the Python path writes it."""
        call, bound = self._fast_call(ident, args, kwargs)
        try:
            self.end(call, bound, result)
        except Exception as exc:  # noqa: BLE001 - capture never breaks the job
            self.disable(f"compiled hook outputs: {type(exc).__name__}: {exc}")

    def _fast_raised(self, ident: tuple, args: tuple, kwargs: dict[str, Any], exc: BaseException) -> None:
        call, _ = self._fast_call(ident, args, kwargs)
        self.raised(call, exc)

    def fast_hung(self, timeout: float) -> list[RingCall]:
        """Compiled-hook calls running longer than `timeout` s, not reported yet (the watchdog)."""
        if self._fast is None:
            return []
        hung = self._fast.session.hung(time.monotonic_ns(), int(timeout * 1e9))
        return [self._fast_call(ident, a, kw)[0] for ident, a, kw in hung]

    def _enqueue(self, call: Call, *, force: bool = False) -> None:
        call.nbytes = call.staging.nbytes
        with self._lock:
            if not force and (self._qn >= self.config.queue_records
                              or self._qbytes + call.nbytes > self.config.queue_bytes):
                self.dropped += 1
                return
            self._qn += 1
            self._qbytes += call.nbytes
        self._q.post(call)  # no wake-up: the courier looks every POLL_S

    # --- triggers and control -------------------------------------------------------------
    def trigger(self, reason: str, detail: str = "", *, origin: int | None = None,
                propagate: bool = True) -> None:
        """A flight-mode trigger: dump the ring (and let the watchdog tell the other ranks)."""
        if not self.config.flight or not self.enabled:
            return
        now = time.monotonic()
        if now - self._last_dump.get(reason, -DUMP_DEDUP_S) < DUMP_DEDUP_S:
            return  # one NaN taints many records, every rank sees the same hang: dump once
        self._last_dump[reason] = now
        self._post(("dump", reason, detail, self.rank if origin is None else origin, time.time_ns()))
        if propagate and self.on_trigger is not None:
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
            stop = any(item is _STOP for item in batch)
            flushes = [i[1] for i in batch if isinstance(i, tuple) and i[0] == "flush"]
            msgs = [m for m in (self._message(i) for i in batch if i is not _STOP and
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
            self._q.put(_STOP)
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
            "gathers": [*self._fast.gather_info()[:2], self._fast.gather_info()[3]] if self._fast is not None
            else [0, 0, 0],
            # GPU: the device drain's batches and CPU time (device_stage.py)
            "drain": [dev.batches, dev.drain_cpu_ns / 1e3] if dev is not None else [0, 0.0],
            "setup_us": (self.setup_ns + (self._rp.setup_ns if self._rp is not None else 0)) / 1e3,
            "courier_cpu_us": self.courier_cpu_ns / 1e3,
            "writer_cpu_s": sink.get("cpu_s", 0.0),
            "level": self.level.label, **static,
        }
