"""Resume reading a shard from a byte offset: what incremental indexing of a live shard needs.

`open_shard` scans an unclosed shard from its first record on every open (CRC-checking each);
a capture that is still writing would make every `epreplay stats` re-read everything recorded so
far. The index remembers where it stopped (shards.indexed_end) and reads record headers from
there on (epreplay.format.walk.walk_records, the walk open_shard uses, without its data CRC pass);
record data CRCs are checked by the indexer as it reads them. Layout: epreplay.format.shard.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from epreplay.format.frames import END_MAGIC, ENTRY, TAIL
from epreplay.format.reader import HEADER_DTYPE
from epreplay.format.records import ShardInfo
from epreplay.format.walk import read_header, walk_records, writer_active


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
    """The shard's header (epreplay.format.walk.read_header's checks and messages)."""
    return read_header(Path(path), fd, os.fstat(fd).st_size)[0]


def resume(path: str, pos: int, indexed: int) -> Resumed:
    """Record headers from byte `pos` (where `indexed` records ended) to the first short or bad
    record, or to a valid footer (whose record count must be `indexed` + what was found)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        info = read_info(path, fd)
        active = writer_active(fd)
        size = os.fstat(fd).st_size
        found, pos, why, short, at_footer = walk_records(fd, pos, size, check_data=False)
        complete = False
        if at_footer:
            tail = os.pread(fd, TAIL.size, size - TAIL.size)
            data_end, count, _crc, end = TAIL.unpack(tail)
            if end == END_MAGIC and data_end == pos and count == indexed + len(found):
                complete = True
            else:
                why = "footer damaged or not matching the records"
    finally:
        os.close(fd)
    rows = [ENTRY.pack(off, hb) for off, hb in found]
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
