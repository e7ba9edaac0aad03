"""Reading `.eprs` shards: footer when valid, else a CRC-checked scan.

The public names are re-exported by epreplay.format.shard (the API contract); see its docstring.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import stat
import zlib
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import zstandard

from epreplay.errors import ShardError
from epreplay.format import codec
from epreplay.format.frames import (END_MAGIC, ENTRY, FOOTER_MAGIC, FRAME, MAGIC_FOOTER, REC_PREFIX,
                                    RECORD_FRAME_HEAD, TAIL, U32, Entry, decompressor)
from epreplay.format.records import Kind, Level, Op, Record, RecordHeader, ShardInfo, Status
from epreplay.format.walk import read_header, walk_records, writer_active

# One footer entry: u64 offset + the 56-byte RecordHeader (records.py's struct "<BBBBHHQiiIIIIqq").
HEADER_DTYPE = np.dtype([
    ("offset", "<u8"), ("kind", "u1"), ("op", "u1"), ("level", "u1"), ("status", "u1"),
    ("buffer", "<u2"), ("variant", "<u2"), ("seq", "<u8"), ("step", "<i4"), ("layer", "<i4"),
    ("tokens", "<u4"), ("comp_len", "<u4"), ("raw_len", "<u4"), ("crc32", "<u4"),
    ("start_ns", "<i8"), ("duration_ns", "<i8"),
])
assert HEADER_DTYPE.itemsize == ENTRY.size


class ShardScan:
    """What a reader found in a shard; see the module docstring. Build with `open_shard`."""

    def __init__(self, path: Path, fd: int, size: int, info: ShardInfo, data_start: int) -> None:
        self.path, self.size, self.info = path, size, info
        self.data_start = data_start  # first byte after the file header
        self._entries: list[Entry] | None = []
        self._footer_body: bytes | None = None  # valid footer: entries are built on first use
        self._count = 0
        self.complete = False
        self.truncated_at: int | None = None
        self.problem: str | None = None
        self.footer_offset: int | None = None
        self._by_offset: dict[int, Entry] | None = None
        # a ShardWriter still holds the file: a short tail is a record in flight, not damage
        self.writer_active = False
        self._fd: int | None = fd

    @property
    def entries(self) -> list[Entry]:
        """Intact records in file order (built lazily from a valid footer)."""
        if self._entries is None:
            body = self._footer_body
            self._entries = [Entry(off, RecordHeader.from_bytes(hb))
                             for off, hb in ENTRY.iter_unpack(body[4:4 + self._count * ENTRY.size])]
        return self._entries

    @entries.setter
    def entries(self, value: list[Entry]) -> None:
        self._entries, self._footer_body = value, None

    def header_array(self) -> np.ndarray:
        """Every intact record's offset and header as one structured array [n] of HEADER_DTYPE,
        without building Python objects (for bulk loads into the index)."""
        if self._entries is None:
            return np.frombuffer(self._footer_body, HEADER_DTYPE, self._count, offset=4).copy()
        out = np.empty(len(self._entries), HEADER_DTYPE)
        raw = out.view(np.uint8).reshape(len(self._entries), HEADER_DTYPE.itemsize)
        for i, e in enumerate(self._entries):
            raw[i] = np.frombuffer(ENTRY.pack(e.offset, e.header.to_bytes()), np.uint8)
        return out

    @property
    def lost_bytes(self) -> int:
        return 0 if self.truncated_at is None else self.size - self.truncated_at

    @property
    def valid_end(self) -> int:
        """End of the last intact record (where repair truncates)."""
        return self.entries[-1].end if self.entries else self.data_start

    def _pread(self, n: int, offset: int) -> bytes:
        if self._fd is None:
            raise ValueError(f"{self.path}: shard scan is closed")
        return os.pread(self._fd, n, offset)

    def _check(self, entry: Entry) -> tuple[memoryview | None, str | None]:
        """(compressed frame, None) when the record is intact, else (None, what is wrong)."""
        blob = self._pread(REC_PREFIX + entry.header.comp_len, entry.offset)
        if len(blob) < REC_PREFIX + entry.header.comp_len:
            return None, "short record"
        hb = blob[FRAME.size:FRAME.size + RecordHeader.SIZE]
        if (blob[:FRAME.size] != RECORD_FRAME_HEAD or hb != entry.header.to_bytes()
                or U32.unpack_from(blob, REC_PREFIX - 4)[0] != zlib.crc32(hb)):
            return None, "record header damaged"
        comp = memoryview(blob)[REC_PREFIX:]  # no copy of a (possibly payload-sized) frame
        crc = zlib.crc32(comp)
        if crc != entry.header.crc32:
            return None, f"crc {crc:#010x} != {entry.header.crc32:#010x}"
        return comp, None

    def read(self, entry: Entry, names: Iterable[str] | None = None) -> Record:
        """Decode one record (only the arrays in `names` when given; the CRC always covers the
        whole record). Raises ShardError naming the offset when it is damaged."""
        comp, why = self._check(entry)
        if comp is None:
            raise ShardError(f"{self.path}: record at byte {entry.offset}: {why}; "
                             f"run 'epreplay repair {self.path}'")
        try:
            raw = decompressor().decompress(comp, max_output_size=entry.header.raw_len)
            if len(raw) != entry.header.raw_len:
                raise ValueError(f"{len(raw)} bytes decoded, header says {entry.header.raw_len}")
            arrays, meta = codec.decode(raw, names)
        except (zstandard.ZstdError, ValueError) as exc:
            raise ShardError(f"{self.path}: record at byte {entry.offset}: undecodable ({exc})") from None
        return Record(entry.header, arrays, meta, entry.offset)

    def entry_at(self, offset: int) -> Entry:
        """The entry of the record whose header frame starts at byte `offset`."""
        if self._by_offset is None:
            self._by_offset = {e.offset: e for e in self.entries}
        entry = self._by_offset.get(offset)
        if entry is None:
            raise ShardError(f"{self.path}: no intact record starts at byte {offset} "
                             f"({len(self.entries)} records; re-index the run if the shard changed)")
        return entry

    def read_at(self, offset: int, names: Iterable[str] | None = None) -> Record:
        """Decode the record at byte `offset` (as stored by the index)."""
        return self.read(self.entry_at(offset), names)

    def records(self, ops: Iterable[Op | int] | None = None,
                kinds: Iterable[Kind] = (Kind.CALL,)) -> Iterator[Record]:
        """Decoded records in file order, filtered by op and kind."""
        op_set = None if ops is None else {int(op) for op in ops}
        kind_set = {int(k) for k in kinds}
        for entry in self.entries:
            h = entry.header
            if int(h.kind) in kind_set and (op_set is None or h.op in op_set):
                yield self.read(entry)

    def verify(self) -> list[tuple[int, str]]:
        """CRC-check every listed record: [(offset, problem)] of the damaged ones.

        Same checks as `read` (frame magic, header bytes and CRC, data CRC) over a memory map,
        without building an Entry per record.
        """
        heads = self.header_array()
        if not len(heads):
            return []
        if self._fd is None:
            raise ValueError(f"{self.path}: shard scan is closed")
        rows = heads.view(np.uint8).reshape(len(heads), HEADER_DTYPE.itemsize)
        bad = []
        # Small shards: one read is cheaper than setting up a map (this runs per inspect call).
        small = self.size <= 64 << 20
        with (contextlib.nullcontext(os.pread(self._fd, self.size, 0)) if small
              else mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)) as mm:
            for i, (off, clen, want) in enumerate(zip(heads["offset"].tolist(),
                                                      heads["comp_len"].tolist(),
                                                      heads["crc32"].tolist())):
                data = off + REC_PREFIX
                if data + clen > len(mm):
                    bad.append((off, "short record"))
                    continue
                prefix = mm[off:data]  # 68 bytes: frame head, header, header CRC
                hb = prefix[FRAME.size:FRAME.size + RecordHeader.SIZE]
                if (prefix[:FRAME.size] != RECORD_FRAME_HEAD or hb != rows[i, 8:].tobytes()
                        or U32.unpack_from(prefix, REC_PREFIX - 4)[0] != zlib.crc32(hb)):
                    bad.append((off, "record header damaged"))
                    continue
                with memoryview(mm) as mv:  # CRC the frame in place, no copy
                    crc = zlib.crc32(mv[data:data + clen])
                if crc != want:
                    bad.append((off, f"crc {crc:#010x} != {want:#010x}"))
        return bad

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "ShardScan":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def open_shard(path: str | os.PathLike[str]) -> ShardScan:
    """Open a shard for reading: footer when valid, else a CRC-checked scan (see module doc).

    Raises:
        ShardError: `path` is missing, not a file, or not a shard (bad or short file header).
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ShardError(f"{path}: no such shard file") from None
    except IsADirectoryError:
        raise ShardError(f"{path}: is a directory, not a shard (.eprs) file") from None
    except OSError as exc:
        raise ShardError(f"{path}: cannot open ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ShardError(f"{path}: is a directory or special file, not a shard (.eprs) file")
        size = st.st_size
        info, data_start = read_header(path, fd, size)
    except BaseException:
        os.close(fd)
        raise
    scan = ShardScan(path, fd, size, info, data_start)
    scan.writer_active = writer_active(fd)
    if not _load_footer(scan, fd):
        _scan(scan, fd)
    return scan


def _load_footer(scan: ShardScan, fd: int) -> bool:
    """Fill `scan` from a valid footer; False (scan untouched) when there is none or it is bad."""
    size = scan.size
    if size - scan.data_start < FRAME.size + 4 + TAIL.size:
        return False
    tail = os.pread(fd, TAIL.size, size - TAIL.size)
    data_end, count, crc, end = TAIL.unpack(tail)
    if end != END_MAGIC or data_end < scan.data_start or data_end > size - FRAME.size:
        return False
    body_len = 4 + count * ENTRY.size + 12
    if data_end + FRAME.size + body_len + 12 != size:
        return False
    frame = os.pread(fd, size - data_end, data_end)
    magic, n = FRAME.unpack_from(frame)
    body = frame[FRAME.size:FRAME.size + body_len]
    if magic != MAGIC_FOOTER or n != body_len + 12 or body[:4] != FOOTER_MAGIC or zlib.crc32(body) != crc:
        return False
    heads = np.frombuffer(body, HEADER_DTYPE, count, offset=4)
    starts = heads["offset"].astype(np.int64)
    ends = starts + REC_PREFIX + heads["comp_len"].astype(np.int64)
    # Records are contiguous from the file header to the footer, and every enum is one we know;
    # anything else is not a footer we wrote: scan instead.
    if count and (starts[0] != scan.data_start or (starts[1:] != ends[:-1]).any()
                  or ends[-1] != data_end or not _known_enums(heads)):
        return False
    if not count and data_end != scan.data_start:
        return False
    scan._entries, scan._footer_body, scan._count = None, body, count
    scan.complete, scan.footer_offset = True, data_end
    return True


def _known_enums(heads: np.ndarray) -> bool:
    """Every kind/level/status value is a member (each enum is a contiguous range of codes)."""
    for field, enum in (("kind", Kind), ("level", Level), ("status", Status)):
        codes = [int(m) for m in enum]
        col = heads[field]
        if col.min() < min(codes) or col.max() > max(codes):
            return False
    return True


def _scan(scan: ShardScan, fd: int) -> None:
    """No valid footer: walk the records, CRC-checking each, up to the first short or bad one."""
    size = scan.size
    found, pos, why, short, at_footer = walk_records(fd, scan.data_start, size, check_data=True)
    if at_footer:
        why = "footer damaged, cut short or followed by stray bytes"
    entries = [Entry(off, RecordHeader.from_bytes(hb)) for off, hb in found]
    scan.entries = entries
    if scan.writer_active and (why is None or short):
        scan.problem = (f"being written by a live process: {len(entries)} records so far"
                        + (f", {size - pos} bytes of the next in flight" if why else ""))
    elif why is None:
        scan.problem = (f"no footer (the writer did not close cleanly); all {len(entries)} "
                        f"records intact")
    else:
        scan.truncated_at = pos
        scan.problem = (f"truncated at byte {pos}: {why}; {len(entries)} records intact, "
                        f"{size - pos} bytes lost; run 'epreplay repair {scan.path}'")
