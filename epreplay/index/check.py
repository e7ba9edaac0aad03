"""Is an indexed shard still the bytes that were indexed? A stamp taken when a shard is indexed,
compared on every open of the index (`epreplay index`, `stats`, `sql`, `tui` via ensure_index).

A stamp is the shard's size, its mtime_ns, and a CRC32 of its first HEAD_BYTES and last
TAIL_BYTES (the file header frame, and the footer the indexer read its record headers from).

What a mismatch catches:
  - any change of size (a shard cut, repaired, or grown by a live capture);
  - any write through the filesystem, wherever in the file: it moves mtime (a byte flipped in the
    middle of a record's data with `dd conv=notrunc`, an editor, a copy over it);
  - an in-place change whose mtime was put back (`os.utime`, `touch -d`, `cp -p`, rsync -t) inside
    the header or the last TAIL_BYTES: the shard header, a closed shard's footer (whole for shards
    up to ~16k records) and always the footer's record count, CRC and end magic.
What it does not catch: an mtime-preserving edit of record data (or of a very large footer) outside
those two windows. Re-reading every byte on each `stats` would cost what indexing costs; the
indexer CRC-checks every record it reads, and `epreplay inspect RUN` (without --quick) re-verifies
all of them.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

# The header frame is a few hundred bytes of ShardInfo JSON: 64 KiB is the reader's own bound.
HEAD_BYTES = 64 << 10
# A footer holds 64 bytes per record: 1 MiB covers a closed shard's whole footer up to ~16k
# records and costs ~1 ms per shard to read and CRC on every `stats`.
TAIL_BYTES = 1 << 20


@dataclass(frozen=True)
class ShardStamp:
    """size: bytes; mtime_ns: st_mtime_ns; crc: CRC32 of the head and tail windows."""

    size: int
    mtime_ns: int
    crc: int


def stamp(path: str | os.PathLike[str]) -> ShardStamp:
    """The shard's stamp now (one open, one fstat, two preads)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        head = os.pread(fd, min(HEAD_BYTES, st.st_size), 0)
        lo = max(min(HEAD_BYTES, st.st_size), st.st_size - TAIL_BYTES)  # windows never overlap
        tail = os.pread(fd, st.st_size - lo, lo)
    finally:
        os.close(fd)
    return ShardStamp(st.st_size, st.st_mtime_ns, zlib.crc32(tail, zlib.crc32(head)))


def changed(path: Path, row: dict) -> str | None:
    """How the shard at `path` differs from its index row (the shards table: bytes, mtime_ns,
    stamp_crc), in words; None when it is still what was indexed."""
    now = stamp(path)
    if now.size != row["bytes"]:
        return f"{path.name} changed size ({row['bytes']} -> {now.size} bytes) since it was indexed"
    if now.mtime_ns != row["mtime_ns"]:
        return f"{path.name} was modified since it was indexed (same size, new modification time)"
    if now.crc != row["stamp_crc"]:
        return (f"{path.name}: its header or footer bytes changed since it was indexed "
                f"(modification time kept)")
    return None
