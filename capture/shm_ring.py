"""A shared-memory byte ring between a capturing job (one producer) and its writer process.

Why: the job's process must do no per-record Python beyond the hook itself. The hook copies a
call's staged bytes straight into this ring (one memmove per array) and publishes them with one
8-byte store; the writer process reads the same pages, builds, compresses and writes the
records. Nothing in the job waits on the writer: a frame that does not fit is dropped and
counted. The memory is a memfd (anonymous shared memory, not bounded by /dev/shm's mount), so
what was published survives a kill -9 of the job (the writer keeps its mapping) and of the
writer (the job keeps it, and a new writer resumes from the words below).

Layout (little-endian, x86-64 and arm64 alike; every word is 8-byte aligned):
  word 0  MAGIC             word 1  capacity C (bytes of the data area, a multiple of 8)
  word 8  head              bytes ever published by the producer (frames before it are complete)
  word 16 tail              bytes the consumer no longer needs (the producer may overwrite them)
  word 24 committed         frames before it reached the shard (or are held by the writer)
  word 32 dropped           frames the producer could not fit (informational; the job counts too)
  word 2  device capacity D (0: none)   word 40 device tail (bytes of the device area released)
  word 3  plan capacity P               word 48 plan bytes used (published plans end there)
  data    at HEADER, C bytes; absolute position p lives at HEADER + p % C
  device  at HEADER + C, D bytes: the host mirror of the job's device staging ring
          (device_stage.py), filled in bulk by device->host copies, read by the writer
  plans   at HEADER + C + D, P bytes: the compiled hook's plans (fast_plan.py), append-only
          records u32 length (padded to 8), u32 plan id, marshal blob; a writer that starts
          on this ring (a restart) reads them all, whatever frames it missed
Frames (8-byte aligned): u32 length (header included, padded to 8), u16 kind, u16 spare, body.
A frame never wraps: when the rest of the area is too short the producer writes a PAD frame
there and starts the next frame at the area's beginning.

Ordering: the producer writes a frame's bytes, then stores head (one aligned 8-byte store, which
x86-64's total store order keeps behind the data; the writer runs on the same host). The consumer
reads head, then the frames before it, then stores tail.
"""
from __future__ import annotations

import array
import ctypes
import mmap
import os
import struct

import numpy as np

MAGIC = 0x3147_4E49_5252_5045  # b"EPRRING1" little-endian
HEADER = 4096  # one page of control words, so the data area is page-aligned
W_MAGIC, W_CAP, W_HEAD, W_TAIL, W_COMMITTED, W_DROPPED = 0, 1, 8, 16, 24, 32  # uint64 word index
W_DCAP, W_DTAIL = 2, 40
W_PCAP, W_PUSED = 3, 48
PLAN_BYTES = 1 << 20  # ~400 plans of a few KiB: far more call sites than a model has
PLAN_HEAD = struct.Struct("<II")  # record length, plan id
FRAME = struct.Struct("<IHH")  # length, kind, spare
PAD = 0
ALIGN = 8


def aligned(n: int) -> int:
    return (n + 7) & ~7


class ShmRing:
    """One ring over a shared-memory file descriptor (see the module docstring).

    `ShmRing.create(capacity)` makes a new one (the job's side); `ShmRing(fd)` maps an existing
    one (the writer's side, from the fd it inherited).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        size = os.fstat(fd).st_size
        self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.words = np.frombuffer(self.mm, dtype=np.uint64, count=HEADER // 8)
        if int(self.words[W_MAGIC]) != MAGIC:
            raise ValueError(f"fd {fd}: not an epreplay capture ring (magic {int(self.words[W_MAGIC]):#x})")
        self.capacity = int(self.words[W_CAP])
        self.dev_capacity = int(self.words[W_DCAP])
        # The hot path's words as ctypes scalars: an aligned 8-byte load/store each, ~5x cheaper
        # than numpy scalar indexing.
        self._w_head = ctypes.c_uint64.from_buffer(self.mm, W_HEAD * 8)
        self._w_tail = ctypes.c_uint64.from_buffer(self.mm, W_TAIL * 8)
        # The producer's own state (not shared): [head reserved, tail as last read (re-read only
        # when the ring looks full), deferred, busy (a Python writer is between reserve and
        # publish: the compiled hook hands its frame to Python then), frames written (a deferred
        # ring's head of whole frames: what the native device drain publishes)]; a buffer, so
        # the C frame writers and the drain thread use it too.
        self.state = array.array("Q", [0, 0, 0, 0, 0])
        # The data area's address, for ctypes.memmove from a tensor's data pointer (the hot path)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.mm)) + HEADER
        self.view = memoryview(self.mm)
        self.dev_view = self.view[HEADER + self.capacity:HEADER + self.capacity + self.dev_capacity]
        self.plan_capacity = int(self.words[W_PCAP])
        self.plan_at = HEADER + self.capacity + self.dev_capacity
        self.state[0] = self.state[4] = int(self.words[W_HEAD])
        self.state[1] = int(self.words[W_TAIL])
        self.words_addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))

    @property
    def _head(self) -> int:
        """The producer's head: bytes reserved so far (published or not)."""
        return self.state[0]

    @property
    def deferred(self) -> bool:
        """GPU sessions: frames are published by the drain once their device bytes are here
        (device_stage.py), not by each write."""
        return bool(self.state[2])

    @deferred.setter
    def deferred(self, value: bool) -> None:
        self.state[2] = int(value)

    @classmethod
    def create(cls, capacity: int, dev_capacity: int = 0, plan_capacity: int = PLAN_BYTES) -> "ShmRing":
        """A new ring of `capacity` data bytes (rounded up to 8) in a fresh memfd, plus a device
        mirror area of dev_capacity bytes (GPU sessions) and the compiled hook's plan area."""
        capacity = aligned(max(capacity, 4096))
        dev_capacity = aligned(dev_capacity)
        try:
            fd = os.memfd_create("epreplay-capture-ring", os.MFD_CLOEXEC)
        except (AttributeError, OSError):  # no memfd: an unlinked file in the temp dir
            import tempfile

            fh = tempfile.TemporaryFile(prefix="epreplay-ring-")
            fd = os.dup(fh.fileno())
            fh.close()
        plan_capacity = aligned(plan_capacity)
        os.ftruncate(fd, HEADER + capacity + dev_capacity + plan_capacity)
        with mmap.mmap(fd, HEADER, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            struct.pack_into("<QQQQ", mm, 0, MAGIC, capacity, dev_capacity, plan_capacity)
        ring = cls(fd)
        ring.populate()
        return ring

    def populate(self) -> None:
        """Back every page of the ring with memory now. A frame written to a page never touched
        before costs the hook a page fault per 4 KiB (measured: a 20 KiB frame 30 us instead of
        5), so the ring's bound is paid once, at the session's first call, not on the hot path."""
        try:
            self.mm.madvise(23)  # MADV_POPULATE_WRITE (Linux 5.14+): one syscall
            return
        except (OSError, ValueError, AttributeError):
            pass
        pages = np.frombuffer(self.mm, dtype=np.uint8)
        pages[HEADER::mmap.PAGESIZE] = 0  # one write per page faults it in

    def close(self) -> None:
        """Unmap (the caller owns the fd)."""
        self.words = self._w_head = self._w_tail = None  # type: ignore[assignment]
        self.dev_view.release()
        self.view.release()
        try:
            self.mm.close()
        except BufferError:  # a ctypes export of the mapping is still alive: the GC frees it
            pass

    # --- producer (the job's hook; one thread at a time: the recorder's lock) ---------------------
    def reserve(self, nbytes: int) -> int:
        """Room for one frame of nbytes (aligned to 8 here): its absolute data-area offset in
        [0, C), or -1 when it does not fit now (the caller drops and counts). Not yet visible to
        the consumer: `publish()` makes every reserved frame visible."""
        n = (nbytes + 7) & ~7
        cap = self.capacity
        state = self.state
        head = state[0]
        off = head % cap
        pad = cap - off if off + n > cap else 0
        if head + pad + n - state[1] > cap:
            state[1] = self._w_tail.value
            if head + pad + n - state[1] > cap:
                self.words[W_DROPPED] += 1
                return -1
        if pad:
            FRAME.pack_into(self.mm, HEADER + off, pad, PAD, 0)
            off = 0
        state[0] = head + pad + n
        return off

    def publish(self) -> None:
        """Make every frame reserved so far visible to the consumer (one 8-byte store); in a
        deferred ring (GPU session) the device drain does it (publish_upto) once their device
        bytes are here: the frames are only marked written (state[4])."""
        if not self.state[2]:
            self._w_head.value = self.state[0]
        else:
            self.state[4] = self.state[0]

    def publish_upto(self, head: int) -> None:
        self._w_head.value = head

    def count_drop(self) -> None:
        """A frame dropped for another reason (the device ring full): the writer reports it."""
        self.words[W_DROPPED] += 1

    def append_plan(self, blob: bytes) -> int:
        """Publish one plan (before any frame that uses it): its id, unique in this ring; -1 when
        the plan area is full (the call site then stays on the Python path)."""
        used = int(self.words[W_PUSED])
        n = aligned(PLAN_HEAD.size + len(blob))
        if used + n > self.plan_capacity:
            return -1
        plan_id = used // 8 + 1
        at = self.plan_at + used
        PLAN_HEAD.pack_into(self.mm, at, n, plan_id)
        self.mm[at + PLAN_HEAD.size:at + PLAN_HEAD.size + len(blob)] = blob
        self.words[W_PUSED] = used + n  # after the bytes (x86-64 store order)
        return plan_id

    def plans_from(self, start: int) -> tuple[list[tuple[int, bytes]], int]:
        """Plans published after byte `start` of the plan area: ([(plan id, blob)], new start)."""
        used = int(self.words[W_PUSED])
        out = []
        while start < used:
            n, plan_id = PLAN_HEAD.unpack_from(self.mm, self.plan_at + start)
            if n < PLAN_HEAD.size or start + n > used:
                raise ValueError(f"capture ring: bad plan record at plan byte {start} (length {n})")
            out.append((plan_id, bytes(self.mm[self.plan_at + start + PLAN_HEAD.size:self.plan_at + start + n])))
            start += n
        return out, start

    # --- consumer (the writer) ------------------------------------------------------------------
    def frames(self, start: int, limit: int = 1 << 62) -> "list[tuple[int, int, int, memoryview]]":
        """Published frames from absolute position `start`: [(pos, end, kind, body)], at most
        `limit` bytes' worth (whole frames), PAD frames included (kind PAD: skip them). body
        views the shared memory: copy what must outlive release()."""
        head = int(self.words[W_HEAD])
        cap = self.capacity
        out = []
        pos = start
        while pos < head and pos - start < limit:
            off = pos % cap
            length, kind, _ = FRAME.unpack_from(self.mm, HEADER + off)
            if length < FRAME.size or length % ALIGN or off + length > cap or pos + length > head:
                raise ValueError(f"capture ring: bad frame at position {pos} (length {length})")
            out.append((pos, pos + length, kind,
                        self.view[HEADER + off + FRAME.size:HEADER + off + length]))
            pos += length
        return out

    def release(self, upto: int) -> None:
        """The consumer no longer needs bytes before absolute position `upto`."""
        self.words[W_TAIL] = upto

    def word(self, index: int) -> int:
        return int(self.words[index])

    def set_word(self, index: int, value: int) -> None:
        self.words[index] = value
