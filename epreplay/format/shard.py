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

  ShardWriter(path, info: ShardInfo, *, zstd_level=3, large_level=1, fsync_every=0)
      (records over 1 MiB raw, i.e. payloads, use large_level: as small, twice as fast;
       fsync_every=N: fsync after every N records, 0 = only at close — flushing each record to
       the OS already survives a process crash, fsync is for host crashes)
      .append(header: RecordHeader, arrays: Mapping[str, np.ndarray], meta: Mapping | None) -> int
          encodes, compresses, writes and flushes one record; returns its byte offset.
          The header's comp_len/raw_len/crc32 are filled in here. Arrays follow codec's rules
          (bf16/fp8 as (uint view, "bfloat16"|"float8_e4m3fn") tuples, see epreplay.format.codec).
      .append_encoded(rec: EncodedRecord) -> int   writes a record made earlier by
          encode_record(header, arrays, meta, zstd_level=3) -> EncodedRecord (no I/O, any thread;
          .header with lengths/CRC filled, .data = exact on-disk bytes, .nbytes) — for flight rings.
      .close() writes the footer.  Context manager.  Never overwrites: creating over an existing
          file raises FileExistsError. Files are created owner-only (0o600).
      .records, .bytes_written
  open_shard(path) -> ShardScan     (never raises for damage: reports it; raises ShardError only
                                     when the file is not a shard at all)
      .info: ShardInfo, .entries: list[Entry(offset, header)], .complete (valid footer),
      .truncated_at: int | None (byte offset of the first short/bad record), .lost_bytes,
      .problem: str | None (what went wrong, human readable), .size
      .writer_active: a live ShardWriter holds the file (flock): no footer and a short tail are
          normal then (truncated_at stays None); repair refuses such a file
      .read(entry, names=None) -> Record   (verifies CRC; raises ShardError naming the offset
          if bad; names: decode only those arrays — codec.decode(blob, names) likewise)
      .records(ops=None, kinds=(Kind.CALL,)) -> Iterator[Record]
      .entry_at(offset) -> Entry, .read_at(offset, names=None) -> Record   by byte offset (the
          index stores it); ShardError when no intact record starts there
      .header_array() -> np.ndarray [n] of format.reader.HEADER_DTYPE (offset + every header
          field, straight from the footer: 300k records in ~0.2 s) — for bulk loads into DuckDB;
          .entries is built lazily (Python objects: ~13 us per record)
      .verify() -> list[(offset, problem)]  CRC-checks every record (reads the whole file)
      .close() / context manager (the scan keeps one read-only descriptor open)
  repair(path) -> RepairReport  keeps PATH.bak, truncates to the valid prefix, writes a footer.
      RepairReport(path, action "healthy"|"repaired", records kept, size_before, size_after,
      backup, problem, lost_bytes). ShardError when PATH.bak exists or a writer is alive.
"""
from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path
from typing import Mapping

from epreplay.format import codec
from epreplay.format.frames import (DEFAULT_LEVEL, LARGE_LEVEL, EncodedRecord, Entry, encode_record,
                                    footer_frame, header_frame)
from epreplay.format.reader import ShardScan, open_shard
from epreplay.format.records import RecordHeader, ShardInfo
from epreplay.format.repair import RepairReport, repair


class ShardWriter:
    """Append records to a new shard; see the module docstring. Thread-safe appends."""

    def __init__(self, path: str | os.PathLike[str], info: ShardInfo, *,
                 zstd_level: int = DEFAULT_LEVEL, large_level: int = LARGE_LEVEL,
                 fsync_every: int = 0) -> None:
        self.path = Path(path)
        self.info = info
        self.zstd_level = zstd_level
        self.large_level = large_level  # for records over 1 MiB raw (payloads); see shard_frames
        self.fsync_every = fsync_every  # 0: never (the page cache survives a process crash)
        # O_EXCL: never overwrite a recording; 0o600: payloads may hold user data.
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._lock = threading.Lock()
        self._index: list[tuple[int, bytes]] = []
        self.bytes_written = 0
        try:
            # Held until close or death (the kernel drops it): readers tell a shard being
            # written from a crashed one, and repair refuses to cut a live file.
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass  # filesystems without flock: the shard just looks unclosed while written
        try:
            self._write(header_frame(info))
        except OSError:
            os.close(self._fd)
            raise

    @classmethod
    def resume(cls, path: str | os.PathLike[str], **options: int) -> "ShardWriter":
        """Go on appending to an unclosed shard whose writer died: the file is cut back to its
        last whole record (what a crash mid-append leaves after it is lost anyway) and later
        records follow it. Only capture's writer restart uses this; `repair` is for users."""
        self = cls.__new__(cls)
        self.path = Path(path)
        self.zstd_level = options.get("zstd_level", DEFAULT_LEVEL)
        self.large_level = options.get("large_level", LARGE_LEVEL)
        self.fsync_every = options.get("fsync_every", 0)
        self._lock = threading.Lock()
        with open_shard(self.path) as scan:
            self.info = scan.info
            end = scan.valid_end
            self._index = [(e.offset, e.header.to_bytes()) for e in scan.entries]
        self._fd = os.open(self.path, os.O_WRONLY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass
        os.ftruncate(self._fd, end)
        os.lseek(self._fd, end, os.SEEK_SET)
        self.bytes_written = end
        return self

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
        return self.append_encoded(encode_record(header, arrays, meta, zstd_level=self.zstd_level,
                                                 large_level=self.large_level))

    def append_encoded(self, record: EncodedRecord) -> int:
        """Write a record made by `encode_record` (e.g. from a flight ring); returns its offset."""
        with self._lock:
            if self._fd is None:
                raise ValueError(f"{self.path}: shard writer is closed")
            offset = self.bytes_written
            try:
                self._write(record.data)
            except OSError:
                # A partial record (disk full, I/O error) ends the shard: later offsets would be
                # wrong. Close without a footer; readers recover every record before this one.
                os.close(self._fd)
                self._fd = None
                raise
            self._index.append((offset, record.header.to_bytes()))
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


__all__ = ["ShardWriter", "ShardScan", "Entry", "RepairReport", "EncodedRecord", "open_shard",
           "repair", "encode_record", "DEFAULT_LEVEL"]
