"""The `.eprs` shard format: one append-only file per rank, a valid zstd stream.

Layout (see ../shared/DESIGN.md "Shard format"); all integers little-endian. A zstd skippable
frame is `u32 magic, u32 size, size bytes` and `zstd -dc` skips it.
  file header  skippable frame 0x184D2A50: b"EPRS" u32 crc32(json) ShardInfo JSON
  record       skippable frame 0x184D2A51 (60 bytes): RecordHeader.to_bytes() (56) u32 crc32(those 56)
               + one zstd data frame (content size + checksum) holding codec.encode(arrays, meta);
               RecordHeader.crc32 is the CRC32 of that compressed frame, comp_len its length
  footer       skippable frame 0x184D2A52: b"EPRF", per record (u64 offset, 56-byte header),
               then u64 data_end (the footer's own offset), u32 count, u32 crc32 of everything
               before it in the footer, b"EPRS.END" (the file's last 8 bytes); clean close only
So every byte of a record is covered by a CRC: a bad record is never returned as data.

API (the contract other modules code against):

  ShardWriter(path, info: ShardInfo, *, zstd_level=3, fsync_every=0)
      .append(header: RecordHeader, arrays: Mapping[str, np.ndarray], meta: Mapping | None) -> int
          encodes, compresses, writes and flushes one record; returns its byte offset.
          The header's comp_len/raw_len/crc32 are filled in here. Arrays follow codec's rules
          (bf16/fp8 as (uint view, "bfloat16"|"float8_e4m3fn") tuples, see epreplay.codec).
      .close() writes the footer.  Context manager.  Never overwrites: creating over an existing
          file raises FileExistsError. Files are created owner-only (0o600).
      .records, .bytes_written
  open_shard(path) -> ShardScan     (never raises for damage: reports it; raises ShardError only
                                     when the file is not a shard at all)
      .info: ShardInfo, .entries: list[Entry(offset, header)], .complete (valid footer),
      .truncated_at: int | None (byte offset of the first short/bad record), .lost_bytes,
      .problem: str | None (what went wrong, human readable), .size
      .read(entry) -> Record   (verifies CRC; raises ShardError naming the offset if bad)
      .records(ops=None, kinds=(Kind.CALL,)) -> Iterator[Record]
      .verify() -> list[(offset, problem)]  CRC-checks every record (reads the whole file)
      .close() / context manager (the scan keeps one read-only descriptor open)
  repair(path) -> RepairReport  keeps PATH.bak, truncates to the valid prefix, writes a footer.
"""
from __future__ import annotations

import os
import shutil
import stat
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import zstandard

from epreplay import codec
from epreplay.errors import ShardError
from epreplay.records import Kind, Op, Record, RecordHeader, ShardInfo

MAGIC_HEADER = 0x184D2A50
MAGIC_RECORD = 0x184D2A51
MAGIC_FOOTER = 0x184D2A52
FILE_MAGIC = b"EPRS"
FOOTER_MAGIC = b"EPRF"
END_MAGIC = b"EPRS.END"

_FRAME = struct.Struct("<II")  # skippable frame: magic, size
_U32 = struct.Struct("<I")
_ENTRY = struct.Struct(f"<Q{RecordHeader.SIZE}s")
_TAIL = struct.Struct("<QII8s")  # data_end, count, crc32, end magic
REC_FRAME = RecordHeader.SIZE + 4  # header bytes + their CRC32
REC_PREFIX = _FRAME.size + REC_FRAME  # bytes ahead of a record's data frame
_RECORD_FRAME_HEAD = _FRAME.pack(MAGIC_RECORD, REC_FRAME)

# Level 3 (zstd's default): on narrowed+shuffled DeepSeek-V3 routing it stores 28.1 B per
# token-layer against level 1's 29.1 (prefill T=4096) while still encoding ~500 MB/s of raw
# int64+fp32 on one writer thread, far above a rank's capture rate; higher levels cannot beat the
# fp32 mantissas' entropy. Writers that fall behind can pass zstd_level=1 (~2x faster encode).
# Figures: bench/shard_bench.py.
DEFAULT_LEVEL = 3

_local = threading.local()  # one ZstdCompressor per (thread, level) and one decompressor per thread


def _compressor(level: int) -> zstandard.ZstdCompressor:
    comps = getattr(_local, "comps", None)
    if comps is None:
        comps = _local.comps = {}
    comp = comps.get(level)
    if comp is None:
        # content size + checksum: `zstd -dc` and any zstd tool can verify a frame on its own.
        comp = comps[level] = zstandard.ZstdCompressor(level=level, write_content_size=True,
                                                       write_checksum=True)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "dec", None)
    if dec is None:
        dec = _local.dec = zstandard.ZstdDecompressor()
    return dec


def _skippable(magic: int, body: bytes) -> bytes:
    return _FRAME.pack(magic, len(body)) + body


def header_frame(info: ShardInfo) -> bytes:
    body = info.to_bytes()
    return _skippable(MAGIC_HEADER, FILE_MAGIC + _U32.pack(zlib.crc32(body)) + body)


def footer_frame(entries: Iterable[tuple[int, bytes]], data_end: int) -> bytes:
    """The footer for records [(offset, header bytes)] whose last byte ends at `data_end`."""
    entries = list(entries)
    body = FOOTER_MAGIC + b"".join(_ENTRY.pack(off, hb) for off, hb in entries)
    body += struct.pack("<QI", data_end, len(entries))
    return _skippable(MAGIC_FOOTER, body + struct.pack("<I", zlib.crc32(body)) + END_MAGIC)


@dataclass(frozen=True)
class Entry:
    """One record's place in a shard: `offset` of its header frame and its decoded header."""

    offset: int
    header: RecordHeader

    @property
    def data_offset(self) -> int:
        return self.offset + REC_PREFIX

    @property
    def end(self) -> int:
        return self.data_offset + self.header.comp_len


class ShardWriter:
    """Append records to a new shard; see the module docstring. Thread-safe appends."""

    def __init__(self, path: str | os.PathLike[str], info: ShardInfo, *,
                 zstd_level: int = DEFAULT_LEVEL, fsync_every: int = 0) -> None:
        self.path = Path(path)
        self.info = info
        self.zstd_level = zstd_level
        self.fsync_every = fsync_every  # 0: never (the page cache survives a process crash)
        # O_EXCL: never overwrite a recording; 0o600: payloads may hold user data.
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._lock = threading.Lock()
        self._index: list[tuple[int, bytes]] = []
        self.bytes_written = 0
        self._write(header_frame(info))

    @property
    def records(self) -> int:
        return len(self._index)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # os.write may write less than asked (signals, pipes); finish the record
            n = os.write(self._fd, view)
            view = view[n:]
        self.bytes_written += len(data)

    def append(self, header: RecordHeader, arrays: Mapping[str, codec.ArrayIn],
               meta: Mapping[str, object] | None = None) -> int:
        """Encode, compress and write one record (one write call, so a crash loses at most it).

        Returns: the record's byte offset. Raises ValueError for arrays/meta the codec refuses.
        """
        raw = codec.encode(arrays, meta)
        comp = _compressor(self.zstd_level).compress(raw)
        if len(comp) >= 1 << 32 or len(raw) >= 1 << 32:
            raise ValueError(f"record of {len(raw)} raw bytes is too large for one shard record "
                             f"(limit 4 GiB); capture payloads every k-th step or split the call")
        hb = header.with_data(comp_len=len(comp), raw_len=len(raw), crc32=zlib.crc32(comp)).to_bytes()
        frame = _RECORD_FRAME_HEAD + hb + _U32.pack(zlib.crc32(hb))
        with self._lock:
            if self._fd is None:
                raise ValueError(f"{self.path}: shard writer is closed")
            offset = self.bytes_written
            self._write(frame + comp)
            self._index.append((offset, hb))
            if self.fsync_every and len(self._index) % self.fsync_every == 0:
                os.fsync(self._fd)
        return offset

    def close(self) -> None:
        """Write the footer (marks the shard complete), fsync and close. Idempotent."""
        with self._lock:
            if self._fd is None:
                return
            try:
                self._write(footer_frame(self._index, self.bytes_written))
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ShardScan:
    """What a reader found in a shard; see the module docstring. Build with `open_shard`."""

    def __init__(self, path: Path, fd: int, size: int, info: ShardInfo, data_start: int) -> None:
        self.path, self.size, self.info = path, size, info
        self.data_start = data_start  # first byte after the file header
        self.entries: list[Entry] = []
        self.complete = False
        self.truncated_at: int | None = None
        self.problem: str | None = None
        self.footer_offset: int | None = None
        self._fd: int | None = fd

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

    def _check(self, entry: Entry) -> tuple[bytes | None, str | None]:
        """(compressed frame, None) when the record is intact, else (None, what is wrong)."""
        blob = self._pread(REC_PREFIX + entry.header.comp_len, entry.offset)
        if len(blob) < REC_PREFIX + entry.header.comp_len:
            return None, "short record"
        hb = blob[_FRAME.size:_FRAME.size + RecordHeader.SIZE]
        if (blob[:_FRAME.size] != _RECORD_FRAME_HEAD or hb != entry.header.to_bytes()
                or _U32.unpack_from(blob, REC_PREFIX - 4)[0] != zlib.crc32(hb)):
            return None, "record header damaged"
        comp = blob[REC_PREFIX:]
        crc = zlib.crc32(comp)
        if crc != entry.header.crc32:
            return None, f"crc {crc:#010x} != {entry.header.crc32:#010x}"
        return comp, None

    def read(self, entry: Entry) -> Record:
        """Decode one record. Raises ShardError naming the offset when it is damaged."""
        comp, why = self._check(entry)
        if comp is None:
            raise ShardError(f"{self.path}: record at byte {entry.offset}: {why}; "
                             f"run 'epreplay repair {self.path}'")
        try:
            raw = _decompressor().decompress(comp, max_output_size=entry.header.raw_len)
            if len(raw) != entry.header.raw_len:
                raise ValueError(f"{len(raw)} bytes decoded, header says {entry.header.raw_len}")
            arrays, meta = codec.decode(raw)
        except (zstandard.ZstdError, ValueError) as exc:
            raise ShardError(f"{self.path}: record at byte {entry.offset}: undecodable ({exc})") from None
        return Record(entry.header, arrays, meta, entry.offset)

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
        """CRC-check every listed record: [(offset, problem)] of the damaged ones."""
        bad = []
        for entry in self.entries:
            _, why = self._check(entry)
            if why is not None:
                bad.append((entry.offset, why))
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
        info, data_start = _read_header(path, fd, size)
    except BaseException:
        os.close(fd)
        raise
    scan = ShardScan(path, fd, size, info, data_start)
    if not _load_footer(scan, fd):
        _scan(scan, fd)
    return scan


def _read_header(path: Path, fd: int, size: int) -> tuple[ShardInfo, int]:
    head = os.pread(fd, 64 * 1024, 0)
    not_shard = f"{path}: not an epreplay shard"
    if len(head) < _FRAME.size + 8:
        raise ShardError(f"{not_shard} (only {size} bytes; a shard starts with a "
                         f"{_FRAME.size + 8}+ byte header frame)")
    magic, n = _FRAME.unpack_from(head)
    if magic != MAGIC_HEADER or head[8:12] != FILE_MAGIC:
        raise ShardError(f"{not_shard} (first bytes {head[:12].hex()} are no EPRS header frame)")
    if _FRAME.size + n > len(head):
        raise ShardError(f"{not_shard} (header frame of {n} bytes is cut short or implausible)")
    (crc,) = _U32.unpack_from(head, 12)
    body = head[16:_FRAME.size + n]
    if zlib.crc32(body) != crc:
        raise ShardError(f"{path}: shard header damaged (crc mismatch); the file cannot be read")
    try:
        info = ShardInfo.from_bytes(body)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ShardError(f"{path}: shard header unreadable ({exc})") from None
    return info, _FRAME.size + n


def _load_footer(scan: ShardScan, fd: int) -> bool:
    """Fill `scan` from a valid footer; False (scan untouched) when there is none or it is bad."""
    size = scan.size
    if size - scan.data_start < _FRAME.size + 4 + _TAIL.size:
        return False
    tail = os.pread(fd, _TAIL.size, size - _TAIL.size)
    data_end, count, crc, end = _TAIL.unpack(tail)
    if end != END_MAGIC or data_end < scan.data_start or data_end > size - _FRAME.size:
        return False
    body_len = 4 + count * _ENTRY.size + 12
    if data_end + _FRAME.size + body_len + 12 != size:
        return False
    frame = os.pread(fd, size - data_end, data_end)
    magic, n = _FRAME.unpack_from(frame)
    body = frame[_FRAME.size:_FRAME.size + body_len]
    if magic != MAGIC_FOOTER or n != body_len + 12 or body[:4] != FOOTER_MAGIC or zlib.crc32(body) != crc:
        return False
    entries, expect = [], scan.data_start
    try:
        for i in range(count):
            off, hb = _ENTRY.unpack_from(body, 4 + i * _ENTRY.size)
            entry = Entry(off, RecordHeader.from_bytes(hb))
            if off != expect:
                return False  # records are contiguous; anything else is not a footer we wrote
            expect = entry.end
            entries.append(entry)
    except ValueError:
        return False
    if expect != data_end:
        return False
    scan.entries, scan.complete, scan.footer_offset = entries, True, data_end
    return True


def _scan(scan: ShardScan, fd: int) -> None:
    """No valid footer: walk the records, CRC-checking each, up to the first short or bad one."""
    pos, size, why = scan.data_start, scan.size, None
    entries: list[Entry] = []
    while pos < size:
        pre = os.pread(fd, REC_PREFIX, pos)
        if len(pre) < _FRAME.size:
            why = f"{len(pre)} stray bytes"
            break
        magic, n = _FRAME.unpack_from(pre)
        if magic == MAGIC_FOOTER:
            why = "footer damaged, cut short or followed by stray bytes"
            break
        if magic != MAGIC_RECORD or n != REC_FRAME:
            why = f"no record frame (bytes {pre[:8].hex()})"
            break
        if len(pre) < REC_PREFIX:
            why = "record header cut short"
            break
        hb = pre[_FRAME.size:_FRAME.size + RecordHeader.SIZE]
        try:
            if _U32.unpack_from(pre, REC_PREFIX - 4)[0] != zlib.crc32(hb):
                raise ValueError
            entry = Entry(pos, RecordHeader.from_bytes(hb))
        except ValueError:
            why = "record header damaged (crc mismatch)"
            break
        if entry.end > size:
            why = f"record cut short ({size - entry.data_offset} of {entry.header.comp_len} data bytes)"
            break
        crc = zlib.crc32(os.pread(fd, entry.header.comp_len, entry.data_offset))
        if crc != entry.header.crc32:
            why = f"record data damaged (crc {crc:#010x} != {entry.header.crc32:#010x})"
            break
        entries.append(entry)
        pos = entry.end
    scan.entries = entries
    if why is None:
        scan.problem = (f"no footer (the writer did not close cleanly); all {len(entries)} "
                        f"records intact")
    else:
        scan.truncated_at = pos
        scan.problem = (f"truncated at byte {pos}: {why}; {len(entries)} records intact, "
                        f"{size - pos} bytes lost; run 'epreplay repair {scan.path}'")


@dataclass(frozen=True)
class RepairReport:
    """What `repair` did. action: "healthy" (nothing changed) or "repaired"."""

    path: Path
    action: str
    records: int  # intact records kept
    size_before: int
    size_after: int
    backup: Path | None = None
    problem: str | None = None
    lost_bytes: int = 0  # bytes of the original file not kept (damaged or cut-short records)


def repair(path: str | os.PathLike[str]) -> RepairReport:
    """Truncate a damaged shard to its intact prefix and write a footer; keep PATH.bak first.

    A healthy shard (valid footer, every record CRC-intact) is left untouched.
    Raises:
        ShardError: not a shard; or PATH.bak exists (it is never overwritten).
    """
    path = Path(path)
    with open_shard(path) as scan:
        keep, problem = scan.entries, scan.problem
        if scan.complete:
            bad = scan.verify()
            if not bad:
                return RepairReport(path, "healthy", len(keep), scan.size, scan.size)
            first = bad[0][0]
            keep = [e for e in keep if e.offset < first]
            problem = (f"{len(bad)} damaged record(s), first at byte {first} ({bad[0][1]}); "
                       f"kept the {len(keep)} records before it")
        end = keep[-1].end if keep else scan.data_start
        size = scan.size
    backup = path.with_name(path.name + ".bak")
    try:
        # "x": a backup is never overwritten, even by a concurrent repair
        with open(path, "rb") as src, open(backup, "xb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
    except FileExistsError:
        raise ShardError(f"{path}: backup {backup} already exists and is never overwritten; "
                         f"move it away, then run 'epreplay repair {path}' again") from None
    os.chmod(backup, 0o600)
    footer = footer_frame(((e.offset, e.header.to_bytes()) for e in keep), end)
    with open(path, "r+b") as fh:
        fh.truncate(end)
        fh.seek(end)
        fh.write(footer)
        fh.flush()
        os.fsync(fh.fileno())
    return RepairReport(path, "repaired", len(keep), size, end + len(footer), backup, problem,
                        size - end)


__all__ = ["ShardWriter", "ShardScan", "Entry", "RepairReport", "open_shard", "repair",
           "DEFAULT_LEVEL"]
