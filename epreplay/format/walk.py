"""The file-level steps of reading a shard: its header frame, its writer's lock, and the CRC-checked
walk over record frames that open_shard (epreplay.format.reader) and the index's resume of a live
shard (epreplay.index.scan) share. File descriptors and bytes in, headers and offsets out.
"""
from __future__ import annotations

import fcntl
import os
import zlib
from pathlib import Path

from epreplay.errors import ShardError
from epreplay.format.frames import (FILE_MAGIC, FRAME, MAGIC_FOOTER, MAGIC_HEADER, MAGIC_RECORD, REC_FRAME,
                                    REC_PREFIX, U32)
from epreplay.format.records import FORMAT_VERSION, RecordHeader, ShardInfo


def wait_unlocked(path: str | os.PathLike[str], timeout: float) -> bool:
    """Wait until no live writer holds the shard (e.g. a writer process finishing the records a
    killed job had handed it). True when free within timeout seconds."""
    import time

    end = time.monotonic() + timeout
    fd = os.open(path, os.O_RDONLY)
    try:
        while writer_active(fd):
            if time.monotonic() > end:
                return False
            time.sleep(0.05)
        return True
    finally:
        os.close(fd)


def writer_active(fd: int) -> bool:
    """Whether a live ShardWriter holds this file's lock (released by the kernel when it dies).

    Filesystems without flock support answer False: such shards look unclosed while written.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def read_header(path: Path, fd: int, size: int) -> tuple[ShardInfo, int]:
    head = os.pread(fd, 64 * 1024, 0)
    not_shard = f"{path}: not an epreplay shard"
    if len(head) < FRAME.size + 8:
        raise ShardError(f"{not_shard} (only {size} bytes; a shard starts with a "
                         f"{FRAME.size + 8}+ byte header frame)")
    magic, n = FRAME.unpack_from(head)
    if magic != MAGIC_HEADER or head[8:12] != FILE_MAGIC:
        raise ShardError(f"{not_shard} (no EPRS header frame at byte 0)")
    if FRAME.size + n > len(head):
        raise ShardError(f"{not_shard} (header frame of {n} bytes is cut short or implausible)")
    (crc,) = U32.unpack_from(head, 12)
    body = head[16:FRAME.size + n]
    if zlib.crc32(body) != crc:
        raise ShardError(f"{path}: shard header damaged (crc mismatch); the file cannot be read")
    try:
        info = ShardInfo.from_bytes(body)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ShardError(f"{path}: shard header unreadable ({exc}); a newer epreplay may have "
                         f"written it (this one reads format v{FORMAT_VERSION})") from None
    if info.version > FORMAT_VERSION:
        raise ShardError(f"{path}: shard format v{info.version} is newer than this epreplay reads "
                         f"(v{FORMAT_VERSION}); upgrade epreplay")
    return info, FRAME.size + n


# Record prefixes are read through a window this large (one pread per window, not per record).
SCAN_BYTES = 4 << 20


def walk_records(fd: int, pos: int, size: int, *, check_data: bool
                 ) -> tuple[list[tuple[int, bytes]], int, str | None, bool, bool]:
    """Walk record frames from byte `pos`, CRC-checking each header (and each record's data when
    check_data), up to the first short or bad one, a footer frame, or `size`.

    Returns (records, end, why, short, at_footer): records as (offset, 56-byte header) in file
    order; end, where the walk stopped (the end of the last intact record); why, what stopped it
    (None at `size` or at a footer frame, which the caller validates); short, whether what stopped
    it are bytes a live writer may still be completing; at_footer, a footer frame starts at end.
    Shared by open_shard (a shard without a valid footer) and the index's resume of a live shard.
    """
    found: list[tuple[int, bytes]] = []
    why, short, at_footer = None, False, False
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
            at_footer = True
            break
        if magic != MAGIC_RECORD or n != REC_FRAME:
            why = f"no record frame (bytes {pre[:8].hex()})"
            break
        if len(pre) < REC_PREFIX:
            why, short = "record header cut short", True
            break
        hb = pre[FRAME.size:FRAME.size + RecordHeader.SIZE]
        try:
            if U32.unpack_from(pre, REC_PREFIX - 4)[0] != zlib.crc32(hb):
                raise ValueError
            header = RecordHeader.from_bytes(hb)
        except ValueError:
            why = "record header damaged (crc mismatch)"
            break
        data_at = pos + REC_PREFIX
        if data_at + header.comp_len > size:
            why, short = f"record cut short ({size - data_at} of {header.comp_len} data bytes)", True
            break
        if check_data:
            crc = zlib.crc32(os.pread(fd, header.comp_len, data_at))
            if crc != header.crc32:
                why = f"record data damaged (crc {crc:#010x} != {header.crc32:#010x})"
                break
        found.append((pos, hb))
        pos = data_at + header.comp_len
    return found, pos, why, short, at_footer
