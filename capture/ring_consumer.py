"""The writer's side of the capture ring: frames -> built records -> the sink.

Runs in the writer process (writer_proc.py, the default) or in a thread of the job (writer
"thread"). It reads published frames (ring_frames.py), joins each call's BEGIN and END frames by
call id into a packed.PackedCall (the form build.build takes), builds the records of a batch
together (one CPU fingerprint pass per row format) and hands them to the Sink in ring order.

Control messages (events, dumps) travel in the ring too, as CTL frames, so a dump holds exactly
the calls made before its trigger. Only when the ring is full does one come over the writer's
pipe instead, tagged with the ring position the job had published, and is applied once every
frame before that position is done. "close" always comes over the pipe.

Ring words the consumer keeps (shm_ring.py): tail (the oldest byte still needed: a call whose
END has not come holds its BEGIN frame, until it is half a ring behind or the session ends: then
it goes out with its inputs only, meta "outputs_lost") and committed (every frame before it is in the sink,
which `capture.flush()` waits for). A writer started on a ring another writer left (killed)
resumes from tail: it skips END frames and events before `committed`, which its predecessor
wrote, and re-reads the BEGIN frames of calls still open.
"""
from __future__ import annotations

import marshal
import pickle
from typing import Any

from epreplay.capture.packed import Duration, PackedCall, PackedStaging
from epreplay.capture.ring_frames import (BEGIN, CALL, CTL, END, FAST, FAST_BEGIN, FAST_CALL, HUNG, read_call,
                                          read_fast)
from epreplay.capture.shm_ring import PAD, W_COMMITTED, W_DROPPED, W_DTAIL, W_HEAD, W_TAIL, ShmRing
from epreplay.format.records import Level, Op, Status

# Bytes of frames read at once before building: bounds the writer's memory, and a batch's CPU
# fingerprints are hashed in one pass per row format.
READ_BYTES = 16 << 20
# An open call (BEGIN read, END not yet) more than capacity / STALE_PART behind the read position
# goes out without its outputs: a recv hook is called within a few calls of its dispatch.
STALE_PART = 2


class RingConsumer:
    """Frames of one ring into one Sink (see the module docstring)."""

    def __init__(self, ring: ShmRing, sink: Any, *, resume: bool = False) -> None:
        self.ring, self.sink = ring, sink
        self.pos = ring.word(W_TAIL)  # next frame to read
        # Frames before this were handled by a writer before us (resume) or before this session.
        self.skip_before = ring.word(W_COMMITTED) if resume else self.pos
        self.open: dict[int, tuple[int, tuple, dict[str, Any]]] = {}  # call id -> (pos, head, items)
        self.dropped_seen = 0  # the job zeroes the word at a session's start (RingPath)
        self.records = 0
        self.dev_tail = ring.word(W_DTAIL)
        # (kind, buffer, seq, status) of the record a killed predecessor wrote last, if any
        self.last = sink.last_record() if resume else None
        self.plans: dict[int, tuple] = {}  # the compiled hook's plans (FAST frames), by id
        self._plan_pos = 0  # plan-area bytes read so far

    def drain(self, upto: int | None = None) -> int:
        """Handle every published frame (before `upto` when given); returns frames handled."""
        ring = self.ring
        done = 0
        while True:
            limit = ring.word(W_HEAD) if upto is None else min(upto, ring.word(W_HEAD))
            if self.pos >= limit:
                break
            calls: list[tuple[int, PackedCall]] = []
            for pos, end, kind, body in ring.frames(self.pos, READ_BYTES):
                if pos >= limit:
                    break
                if kind == CTL:  # in ring order: the calls before it go out first
                    self._emit(calls)
                    calls = []
                    if pos >= self.skip_before:
                        self._apply(pickle.loads(bytes(body)))
                    self.pos = end
                    continue
                self._frame(pos, end, kind, body, calls)
                self.pos = end
                done += 1
            self._give_up(calls, self.pos - self.ring.capacity // STALE_PART)
            self._emit(calls)
            self._advance(self.pos)
        self._report_drops()
        return done

    def _frame(self, pos: int, end: int, kind: int, body: Any,
               calls: list[tuple[int, PackedCall]]) -> None:
        if kind == PAD:
            return
        if kind == FAST:
            call_id, part, head, items = self._fast(body)
            if part == FAST_CALL:
                if pos >= self.skip_before:  # else written by the writer before us (resume)
                    calls.append((end, _packed(head[:10], items, head[10], {})))
                return
            kind = BEGIN if part == FAST_BEGIN else END  # a recv hook's call: joined as Python's
        else:
            call_id, head, items, dev_end = read_call(body, self.ring.dev_view)
            if dev_end > self.dev_tail:  # copied out: the device mirror may take new bytes there
                self.dev_tail = dev_end
        if kind == BEGIN:
            self.open[call_id] = (pos, head, items)
            return
        if pos < self.skip_before:  # written by the writer before us (resume)
            self.open.pop(call_id, None)
            return
        if kind == CALL:
            calls.append((end, _packed(head[:10], items, head[10], {})))
        elif kind == HUNG:
            call = _packed(head, items, None, {})
            call.status = Status.HUNG
            calls.append((end, call))
        elif kind == END:
            begun = self.open.pop(call_id, None)
            if begun is not None:
                calls.append((end, _packed(begun[1], begun[2], head, items)))
        else:
            raise ValueError(f"capture ring: unknown frame kind {kind} at position {pos}")

    def finish(self) -> None:
        """The session ends (closed, or the job died): every published frame is handled, and the
        calls still open (their recv hook had not run) go out with their inputs only."""
        self.drain()
        calls: list[tuple[int, PackedCall]] = []
        self._give_up(calls, self.pos + 1)
        self._emit(calls)
        self._advance(self.pos)

    def _give_up(self, calls: list[tuple[int, PackedCall]], before: int) -> None:
        """Open calls whose BEGIN is before `before` go out with their inputs only (duration -1,
        meta "outputs_lost"): their hook never ran, or their END was dropped (the ring was full).
        An open BEGIN holds the ring's tail; one that never closed would leave the job no room."""
        for call_id in [c for c, (p, _, _) in self.open.items() if p < before]:
            _, head, items = self.open.pop(call_id)
            head = head[:8] + (dict(head[8], outputs_lost=True),) + head[9:]
            calls.append((self.pos, _packed(head, items, None, {})))

    def _fast(self, body: Any) -> tuple:
        """A FAST frame as (call id, part, head, items); its plan was published to the ring's plan
        area before the frame (a writer started later reads them all there)."""
        try:
            call_id, part, head, items, dev_end = read_fast(body, self.plans, self.ring.dev_view)
        except KeyError:
            new, self._plan_pos = self.ring.plans_from(self._plan_pos)
            for plan_id, blob in new:
                self.plans[plan_id] = marshal.loads(blob)
            call_id, part, head, items, dev_end = read_fast(body, self.plans, self.ring.dev_view)
        if dev_end > self.dev_tail:  # copied out: the device mirror may take new bytes there
            self.dev_tail = dev_end
        return call_id, part, head, items

    def _emit(self, calls: list[tuple[int, PackedCall]]) -> None:
        if not calls:
            return
        from epreplay.capture.build import build_calls

        for (end, _), built in zip(calls, build_calls([c for _, c in calls])):
            if self.last is not None:  # resume: the record our predecessor wrote last may be
                last, self.last = self.last, None  # the first we read again (killed in between)
                h = built[0]
                if (h.kind, h.buffer, h.seq, h.status) == last:
                    continue
            self.sink.call(built)
            self.records += 1
            # committed moves per record (a writer killed now loses nothing and repeats at most
            # this one, which `last` catches), and not while the sink holds records back
            if not self.sink.held:
                self.ring.set_word(W_COMMITTED, end)

    def _advance(self, pos: int) -> None:
        """Publish committed (all read frames are in the sink) and tail (the oldest byte still
        needed: open calls' BEGIN frames, and frames whose records the sink holds back)."""
        if not self.sink.held:
            self.ring.set_word(W_COMMITTED, max(pos, self.skip_before))
        self.ring.set_word(W_DTAIL, self.dev_tail)
        oldest = min((p for p, _, _ in self.open.values()), default=pos)
        keep = self.ring.word(W_COMMITTED) if self.sink.held else pos
        self.ring.release(min(oldest, keep, pos))

    def _report_drops(self) -> None:
        dropped = self.ring.word(W_DROPPED)
        if dropped > self.dropped_seen:
            self.dropped_seen = dropped
            import time

            self.sink.event({"reason": "dropped", "dropped": dropped}, time.time_ns())

    # --- control messages (from the pipe, in order) -------------------------------------------
    def control(self, at: int, msg: tuple) -> None:
        """Apply one control message that came over the pipe (the ring was full) once the frames
        published before it are handled."""
        self.drain(at)
        self._apply(msg)

    def _apply(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "event":
            self.sink.event(*msg[1:])
        elif kind == "dump":
            self.sink.dump(*msg[1:])
        elif kind == "graph":
            self.sink.graph(msg[1])


def _packed(begin: tuple, items: dict[str, Any], end: tuple | None, out: dict[str, Any]) -> PackedCall:
    """A BEGIN head and items (+ the END's) as the PackedCall build.build takes."""
    op, buffer, seq, step, layer, start_ns, level, tokens, meta, args_text = begin
    if isinstance(args_text, bytes):  # the job's cached marshal of the descriptions
        args_text = marshal.loads(args_text)
    merged = dict(items)
    status, done, duration = Status.OK, False, -1
    if end is not None:
        status, end_tokens, duration, added, done = end
        merged.update(out)
        if end_tokens >= 0:
            tokens = end_tokens
        if added:
            meta = dict(meta, **added)
        status = Status(status)
    return PackedCall(op=Op(op), buffer=buffer, seq=seq, step=step, layer=layer, start_ns=start_ns,
                      level=Level(level), staging=PackedStaging(merged), timer=Duration(duration),
                      args_text=args_text, meta=meta, tokens=tokens, status=status, done=done)
