"""Resume reading a shard from a byte offset: what incremental indexing of a live shard needs.

`open_shard` scans an unclosed shard from its first record on every open (CRC-checking each);
a capture that is still writing would make every `epreplay stats` re-read everything recorded so
far. The index remembers where it stopped (shards.indexed_end) and reads record headers from
there on; record data CRCs are checked by the indexer as it reads them. Layout: epreplay.shard.
"""
from __future__ import annotations

import fcntl
import os
import zlib
from dataclasses import dataclass

import numpy as np

from epreplay.errors import ShardError
from epreplay.records import RecordHeader, ShardInfo
from epreplay.shard_frames import (END_MAGIC, ENTRY, FILE_MAGIC, FRAME, MAGIC_FOOTER, MAGIC_HEADER,
                                   MAGIC_RECORD, REC_FRAME, REC_PREFIX, TAIL, U32)
from epreplay.shard_reader import HEADER_DTYPE

SCAN_BYTES = 4 << 20  # headers are read through a 4 MiB window


@dataclass
class Resumed:
    """Records found from the resume offset on (see `resume`)."""

    info: ShardInfo
    size: int
    headers: np.ndarray  # [n] HEADER_DTYPE of the new records
    complete: bool  # a valid footer closes the shard right after them
    writer_active: bool
    truncated_at: int | None
    problem: str | None
    end: int  # end of the last intact record


def read_info(path: str, fd: int) -> ShardInfo:
    head = os.pread(fd, 64 * 1024, 0)
    if len(head) < FRAME.size + 8:
        raise ShardError(f"{path}: not an epreplay shard (too short)")
    magic, n = FRAME.unpack_from(head)
    if magic != MAGIC_HEADER or head[8:12] != FILE_MAGIC or FRAME.size + n > len(head):
        raise ShardError(f"{path}: not an epreplay shard (no EPRS header frame)")
    body = head[16:FRAME.size + n]
    if zlib.crc32(body) != U32.unpack_from(head, 12)[0]:
        raise ShardError(f"{path}: shard header damaged (crc mismatch)")
    return ShardInfo.from_bytes(body)


def writer_active(fd: int) -> bool:
    """A live ShardWriter holds an exclusive flock on its file (see epreplay.shard)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def resume(path: str, pos: int, indexed: int) -> Resumed:
    """Record headers from byte `pos` (where `indexed` records ended) to the first short or bad
    record, or to a valid footer (whose record count must be `indexed` + what was found)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        info = read_info(path, fd)
        active = writer_active(fd)
        size = os.fstat(fd).st_size
        rows: list[bytes] = []
        why, short, complete = None, False, False
        lo, buf = pos, b""
        while pos < size:
            if pos + REC_PREFIX > lo + len(buf):
                lo, buf = pos, os.pread(fd, SCAN_BYTES, pos)
            pre = buf[pos - lo:pos - lo + REC_PREFIX]
            if len(pre) < FRAME.size:
                why, short = f"{len(pre)} stray bytes", True
                break
            magic, n = FRAME.unpack_from(pre)
            if magic == MAGIC_FOOTER:
                tail = os.pread(fd, TAIL.size, size - TAIL.size)
                data_end, count, _crc, end = TAIL.unpack(tail)
                if end == END_MAGIC and data_end == pos and count == indexed + len(rows):
                    complete = True
                else:
                    why = "footer damaged or not matching the records"
                break
            if magic != MAGIC_RECORD or n != REC_FRAME:
                why = f"no record frame (bytes {pre[:8].hex()})"
                break
            if len(pre) < REC_PREFIX:
                why, short = "record header cut short", True
                break
            hb = pre[FRAME.size:FRAME.size + RecordHeader.SIZE]
            if U32.unpack_from(pre, REC_PREFIX - 4)[0] != zlib.crc32(hb):
                why = "record header damaged (crc mismatch)"
                break
            comp_len = int.from_bytes(hb[28:32], "little")  # RecordHeader's comp_len field
            if pos + REC_PREFIX + comp_len > size:
                why, short = "record cut short", True
                break
            rows.append(ENTRY.pack(pos, hb))
            pos += REC_PREFIX + comp_len
    finally:
        os.close(fd)
    headers = np.frombuffer(b"".join(rows), HEADER_DTYPE).copy() if rows else np.zeros(0, HEADER_DTYPE)
    truncated, problem = None, None
    if active and (why is None or short):
        problem = f"being written by a live process: {indexed + len(rows)} records so far"
    elif why is not None:
        truncated = pos
        problem = f"truncated at byte {pos}: {why}; run 'epreplay repair {path}'"
    elif not complete:
        problem = f"no footer (the writer did not close cleanly); all {indexed + len(rows)} records intact"
    return Resumed(info, size, headers, complete, active, truncated, problem, pos)
