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
import itertools
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from epreplay import marks
from epreplay.capture import fast_plan
from epreplay.capture.config import CaptureConfig
from epreplay.capture.courier import Courier, Mailbox
from epreplay.capture.extract import Call, stage_inputs, stage_outputs
from epreplay.capture.recorder_control import Control
from epreplay.capture.recorder_meta import BufferState, CallMeta
from epreplay.capture.ring_path import RingCall
from epreplay.capture.stage import PinnedPool, Staging, Timer, current_stream
from epreplay.format.records import Level, Op, Status
from epreplay.format.run import RunDir

_OPENS_LAYER = (Op.LAYOUT, Op.DISPATCH, Op.LL_DISPATCH)


class Recorder(CallMeta, Control, Courier):
    """Capture for one process (one rank). Create through epreplay.capture.session.

    The hot path is here; the courier thread (courier.py), call metadata and handle lineage
    (recorder_meta.py), and triggers, flush, close and facts (recorder_control.py) are its parts.
    """

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

        self._graph_rings[buffer_id] = GraphRing(buffer_id=buffer_id, level=self.level, device=device,
                                                 ring_bytes=self.config.graph_ring_bytes)

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


    def end(self, call: Call, args: dict[str, Any], result: Any) -> Any:
        """The call returned: stage outputs (now, or when the LL recv hook runs) and enqueue."""
        ring = isinstance(call, RingCall)  # (a GraphCall is neither: staged into its graph)
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
        at = fast_plan.RECV_HOOK_AT.get(call.op)
        hook = result[at] if at is not None and isinstance(result, tuple) and len(result) > at else None
        if callable(hook) and args.get("return_recv_hook"):
            # the outputs are valid once the hook ran: the inputs go out now (BEGIN), the
            # outputs when the job calls the hook (END)
            if ring:
                self._rp.begin_frame(self, call, args, result)
            return result[:at] + (self._wrap_recv_hook(call, args, result, hook),) + result[at + 1:]
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
                    if isinstance(call, RingCall):  # ring path
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
        if isinstance(call, RingCall) and self._rp is not None:  # ring path
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
        """A compiled-hook call as the RingCall (and bound arguments) the Python path would have made. ident:
        (call id, op, BufferState, seq, step, layer, start_ns, duration_ns, hook, tags or None, ll_parity or -1)."""
        call = self._ring_call(ident)
        call.args = bound = ident[8].binder.bind(args[1:], kwargs)
        return call, bound

    def _ring_call(self, ident: tuple) -> RingCall:
        """The RingCall of a compiled-hook call's identity (see _fast_call), its t0 set for end()
        or raised() to turn into the duration."""
        call_id, op, bs, seq, step, layer, start_ns, duration, _, tags, parity = ident
        call = RingCall(call_id, Op(op), bs, seq, step, layer, self.level, False)
        # (parity: the hook counted the Buffer's low-latency calls)
        call.tags, call.parity, call.start_ns = tags, parity, start_ns
        if duration >= 0:  # end()/raised() turn t0 into the duration
            call.t0 = time.perf_counter_ns() - duration
        else:  # still running (the watchdog): from its start on the monotonic clock
            call.t_mono = time.monotonic() - (time.time_ns() - start_ns) / 1e9
        return call

    def _fast_mismatch(self, ident: tuple, args: tuple, kwargs: dict[str, Any], result: Any) -> Any:
        """The call's outputs were not shaped as its plan learned: the Python path writes it.
        Returns the result to hand back (a recv hook's call: with the hook wrapped)."""
        call, bound = self._fast_call(ident, args, kwargs)
        try:
            return self.end(call, bound, result)
        except Exception as exc:  # noqa: BLE001 - capture never breaks the job
            self.disable(f"compiled hook outputs: {type(exc).__name__}: {exc}")
            return result

    def _fast_end(self, ident: tuple, result: Any) -> None:
        """A compiled call's recv hook ran, and its outputs were not shaped as its plan learned:
        the Python path writes its END frame (the BEGIN went at return)."""
        call = self._ring_call(ident)  # (end_frame writes t0 as the duration; tokens -1: the BEGIN's)
        call.meta, call.t0, call.tokens = {}, ident[7], -1
        try:
            self._rp.end_frame(self, call, {}, result)
        except Exception as exc:  # noqa: BLE001 - capture never breaks the job
            self.disable(f"compiled hook recv outputs: {type(exc).__name__}: {exc}")

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

