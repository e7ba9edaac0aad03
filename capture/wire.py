"""The writer process's pipe framing, both sides (writer_proc.py says what travels).

A message is a marshal of plain values plus its arrays' raw bytes for a call, anything else a
pickle whose arrays travel as out-of-band buffers, so nothing is copied into the head:
  <u32 n> <u64 len>*n <tag byte, head: len[0] bytes> <buffer i: len[i] bytes>...
  tag: C/H a "call"/"hung" PackedCall (packed.PackedCall.to_wire), P a pickle
"""
from __future__ import annotations

import os
import pickle
import struct
from typing import Any, BinaryIO

_N = struct.Struct("<I")
# The pipe's kernel buffer: 1 MiB lets a prefill step's records go out in one go (the default
# 64 KiB made the courier block and wake ~20 times per T=4096 dispatch record).
PIPE_BYTES = 1 << 20


def send(fd: int, obj: Any) -> None:
    """Write obj as one message (see the module docstring). Blocks while the pipe is full."""
    send_many(fd, [obj])


def send_many(fd: int, msgs: list[Any]) -> None:
    """Write messages in one writev per ~1000 parts: each syscall releases the job's GIL and must
    take it back, so fewer of them is less waiting for the job's thread. ("call"/"hung",
    PackedCall) goes as marshal plus raw buffers (packed.PackedCall.to_wire), the rest pickled."""
    parts: list[Any] = []
    for msg in msgs:
        head, raws = None, []
        if msg[0] in ("call", "hung") and hasattr(msg[1], "to_wire"):
            try:
                head, raws = msg[1].to_wire()
                head = (b"C" if msg[0] == "call" else b"H") + head
            except ValueError:  # meta marshal cannot carry: pickle this one
                head = None
        if head is None:
            bufs: list[pickle.PickleBuffer] = []
            head = b"P" + pickle.dumps(msg, protocol=5, buffer_callback=bufs.append)
            raws = [b.raw() for b in bufs]
        lens = [len(head), *(memoryview(r).nbytes for r in raws)]
        parts += [_N.pack(len(lens)) + struct.pack(f"<{len(lens)}Q", *lens), head, *raws]
    views = [memoryview(p).cast("B") for p in parts if len(memoryview(p).cast("B"))]
    while views:
        n = os.writev(fd, views[:1000])
        while n:  # drop what went out; keep the rest of a part cut short
            if n >= len(views[0]):
                n -= len(views.pop(0))
            else:
                views[0], n = views[0][n:], 0


def recv(fh: BinaryIO) -> Any:
    """Read one message; EOFError at a clean end of stream (or a cut-off message)."""
    n = _N.unpack(_read_exact(fh, _N.size))[0]
    lens = struct.unpack(f"<{n}Q", _read_exact(fh, 8 * n))
    head = _read_exact(fh, lens[0])
    bufs = [_read_exact(fh, k) for k in lens[1:]]
    tag, body = head[:1], memoryview(head)[1:]
    if tag in (b"C", b"H"):
        from epreplay.capture.packed import PackedCall

        return ("call" if tag == b"C" else "hung", PackedCall.from_wire(bytes(body), bufs))
    return pickle.loads(body, buffers=bufs)


def _read_exact(fh: BinaryIO, n: int) -> bytearray:
    out = bytearray(n)
    view, got = memoryview(out), 0
    while got < n:
        k = fh.readinto(view[got:])
        if not k:
            raise EOFError("message cut off" if got else "end of stream")
        got += k
    return out


def _grow_pipe(fd: int) -> None:
    try:
        import fcntl

        fcntl.fcntl(fd, 1031, PIPE_BYTES)  # F_SETPIPE_SZ (Linux); others keep their default
    except (OSError, ImportError, AttributeError):
        pass
