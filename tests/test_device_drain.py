"""The device ring's native drain thread (capture/_drainc.c) over a real shared-memory ring.

No GPU here: the five CUDA driver entry points it calls are host functions (a "device" address
is host memory, a copy is a memmove, an event record or wait is logged). What is checked is the
drain's own logic: bytes are copied only after an event on every stream they were written on,
frames are published only once their bytes are in the ring, a wrapped ring is two copies, the
quiet lock (graph_ring.QUIET) keeps it from the driver, a driver error ends it with its code, and
stop() drains what is left. On a GPU the same thread runs under tests/test_capture_fast.py.
"""
from __future__ import annotations

import ctypes
import threading
import time

import pytest

from epreplay.capture.ring_frames import write_control
from epreplay.capture.shm_ring import HEADER, W_HEAD, ShmRing

_drainc = pytest.importorskip("epreplay.capture._drainc")

SIDE, DONE, EV, CTX = 0x51DE, 0xD0E, 0xE7, 0xC7C


class HostDriver:
    """cuEventRecord, cuStreamWaitEvent, cuMemcpyDtoHAsync_v2, cuEventSynchronize, cuCtxSetCurrent
    over host memory, logging each call; `fail` makes event records return that CUresult."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.fail = 0
        self.lock = threading.Lock()
        self.threads: set[int] = set()
        i, vp, u64 = ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64
        self._fns = [
            ctypes.CFUNCTYPE(i, vp, vp)(self._record),
            ctypes.CFUNCTYPE(i, vp, vp, ctypes.c_uint)(self._wait),
            ctypes.CFUNCTYPE(i, vp, u64, ctypes.c_size_t, vp)(self._copy),
            ctypes.CFUNCTYPE(i, vp)(self._sync),
            ctypes.CFUNCTYPE(i, vp)(self._ctx),
        ]

    @property
    def fns(self) -> tuple[int, ...]:
        return tuple(ctypes.cast(f, ctypes.c_void_p).value for f in self._fns)

    def _log(self, *call: object) -> int:
        with self.lock:
            self.calls.append(call)
            self.threads.add(threading.get_ident())
        return 0

    def _record(self, ev: int, stream: int) -> int:
        self._log("record", ev, stream)
        return self.fail

    def _wait(self, side: int, ev: int, flags: int) -> int:
        return self._log("wait", side, ev)

    def _copy(self, dst: int, src: int, n: int, stream: int) -> int:
        ctypes.memmove(dst, src, n)
        return self._log("copy", dst, src, n, stream)

    def _sync(self, ev: int) -> int:
        return self._log("sync", ev)

    def _ctx(self, ctx: int) -> int:
        return self._log("ctx", ctx)


class Stage:
    """A deferred ring, a host "device" area D and its producer state, as device_stage keeps them."""

    def __init__(self, dev_cap: int = 4096, period: float = 0.001) -> None:
        import array

        self.ring = ShmRing.create(1 << 16, dev_capacity=dev_cap)
        self.ring.deferred = True
        self.cap = dev_cap
        self.D = (ctypes.c_char * dev_cap)()
        self.dstate = array.array("q", [0, 0])
        self.quiet = _drainc.Lock()
        self.driver = HostDriver()
        self.drainer = _drainc.Drainer(self.driver.fns, CTX, SIDE, DONE, EV, self.ring.mm,
                                       HEADER + self.ring.capacity, ctypes.addressof(self.D), dev_cap,
                                       self.ring.state, self.dstate, self.quiet, period)

    def gather(self, stream: int, data: bytes) -> int:
        """A call: its bytes into D (a launch on `stream`), then its frame; where they start."""
        head = self.dstate[0]
        off = head % self.cap
        start = head + (self.cap - off if off + len(data) > self.cap else 0)
        o = start % self.cap
        ctypes.memmove(ctypes.addressof(self.D) + o, data, len(data))
        self.drainer.advance(stream, start + len(data))
        assert write_control(self.ring, ("call", start, len(data)))
        return start

    def mirror(self, start: int, n: int) -> bytes:
        at = HEADER + self.ring.capacity + start % self.cap
        return bytes(self.ring.mm[at:at + n])

    def published(self) -> int:
        return int(self.ring.words[W_HEAD])

    def wait_batches(self, n: int, timeout: float = 5.0) -> None:
        end = time.monotonic() + timeout
        while self.drainer.info()[0] < n:
            assert time.monotonic() < end, f"the drain made {self.drainer.info()[0]} batches, not {n}"
            time.sleep(0.001)


@pytest.fixture
def stage():
    st = Stage()
    yield st
    st.drainer.stop()
    st.ring.close()


def test_bytes_are_copied_after_their_streams_events_and_frames_published_after_them(stage: Stage) -> None:
    a = stage.gather(0xA, b"a" * 100)
    b = stage.gather(0xB, b"b" * 60)
    stage.wait_batches(1)
    assert stage.mirror(a, 100) == b"a" * 100 and stage.mirror(b, 60) == b"b" * 60
    assert stage.published() == stage.ring.state[4] == stage.ring.state[0]
    calls = stage.driver.calls
    assert calls[0] == ("ctx", CTX)  # D's context, set on the drain's own thread
    assert threading.get_ident() not in stage.driver.threads
    first_copy = next(i for i, c in enumerate(calls) if c[0] == "copy")
    recorded = {c[2] for c in calls[:first_copy] if c[0] == "record"}
    assert recorded == {0xA, 0xB}  # an event on each stream the bytes were written on, first
    assert calls[first_copy][2:] == (ctypes.addressof(stage.D) + a % stage.cap, 160, SIDE)
    assert [c[0] for c in calls[first_copy + 1:first_copy + 3]] == ["record", "sync"]  # waited for
    n = len(calls)
    time.sleep(0.02)  # nothing new: no driver call at all
    assert len(stage.driver.calls) == n
    stage.gather(0xA, b"c" * 8)
    stage.wait_batches(2)
    new = stage.driver.calls[n:]
    assert [c[2] for c in new if c[0] == "record" and c[1] == EV] == [0xA]  # only this batch's


def test_a_wrapped_ring_is_copied_in_two_and_frames_wait_for_the_quiet_lock(stage: Stage) -> None:
    stage.gather(0xA, bytes(range(256)) * 15)  # 3840 of 4096 bytes
    stage.wait_batches(1)
    published = stage.published()
    assert stage.quiet.acquire(timeout=2)  # a graph capture begins: no driver call meanwhile
    try:
        n = len(stage.driver.calls)
        start = stage.gather(0xB, b"w" * 512)  # does not fit before the end: starts at 4096
        assert start == 4096
        time.sleep(0.03)
        assert len(stage.driver.calls) == n and stage.published() == published
    finally:
        stage.quiet.release()
    stage.wait_batches(2)
    copies = [c for c in stage.driver.calls[n:] if c[0] == "copy"]
    base = ctypes.addressof(stage.D)
    # the bytes left at the end of D (256, never written by a call: the pad) and the new ones
    assert [(c[2] - base, c[3]) for c in copies] == [(3840, 256), (0, 512)]
    assert stage.mirror(start, 512) == b"w" * 512
    assert stage.published() == stage.ring.state[0]


def test_a_driver_error_ends_the_thread_with_its_code_and_publishes_nothing_more(stage: Stage) -> None:
    stage.gather(0xA, b"x" * 16)
    stage.wait_batches(1)
    published = stage.published()
    stage.driver.fail = 700  # CUDA_ERROR_ILLEGAL_ADDRESS
    stage.gather(0xA, b"y" * 16)
    end = time.monotonic() + 5
    while stage.drainer.info()[3]:
        assert time.monotonic() < end
        time.sleep(0.001)
    assert stage.drainer.info()[2] == 700
    assert stage.published() == published  # the frame whose bytes were not copied stays unseen
    assert stage.drainer.stop() == 700


def test_stop_drains_what_is_left_and_many_calls_from_a_racing_producer_all_arrive() -> None:
    st = Stage(dev_cap=1 << 16, period=0.0005)
    try:
        chunks = []
        for k in range(400):  # races the thread: every batch sees some prefix of these
            data = bytes([k % 251]) * (8 + (k * 37) % 120)
            chunks.append((st.gather(0xA + k % 3, data), data))
        assert st.drainer.stop() == 0  # the final batch
        assert all(st.mirror(s, len(d)) == d for s, d in chunks)
        assert st.published() == st.ring.state[0]
        batches, cpu_ns, rc, alive = st.drainer.info()
        assert batches >= 1 and cpu_ns > 0 and rc == 0 and not alive
        assert st.drainer.stop() == 0  # again: nothing to do
    finally:
        st.ring.close()


def test_the_quiet_lock_is_a_lock() -> None:
    lock = _drainc.Lock()
    assert lock.acquire() and lock.locked()
    assert not lock.acquire(False) and not lock.acquire(timeout=0.01)
    got = []
    t = threading.Thread(target=lambda: got.append(lock.acquire(timeout=5)))
    t.start()
    time.sleep(0.01)
    lock.release()  # another thread waits without the GIL and gets it
    t.join(5)
    assert got == [True] and lock.locked()
    lock.release()
    with pytest.raises(RuntimeError):
        lock.release()
    with lock:
        assert lock.locked()
    assert not lock.locked()
    with pytest.raises(TypeError):
        _drainc.Drainer((0, 0, 0, 0, 0), 0, 0, 0, 0, b"", 0, 0, 1, b"", b"", threading.Lock(), 1.0)


def test_a_forked_child_neither_waits_for_the_parents_drain_nor_inherits_a_held_quiet_lock(stage: Stage) -> None:
    import os

    from epreplay.capture import graph_ring

    stage.gather(0xA, b"f" * 32)
    assert graph_ring.QUIET.acquire(timeout=2)  # as a drain batch or a graph capture would hold it
    try:
        pid = os.fork()
        if pid == 0:  # the child: no drain thread here; stopping or freeing must not wait for one
            code = 0
            try:
                code |= 1 if stage.drainer.stop() != 0 else 0
                stage.drainer = None  # dealloc: no join of a thread this process does not have
                code |= 2 if graph_ring.QUIET.locked() else 0
            except BaseException:  # noqa: BLE001
                code |= 4
            os._exit(code)
        deadline = time.monotonic() + 10
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                pytest.fail("the forked child hung stopping its parent's drain")
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        graph_ring.QUIET.release()
    stage.wait_batches(1)  # the parent's thread goes on
    assert stage.published() == stage.ring.state[0]
