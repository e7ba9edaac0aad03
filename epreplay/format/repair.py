"""`repair`: cut a damaged shard back to its intact records and close it with a footer.

Re-exported by epreplay.format.shard (the API contract). Nothing is lost: the original is kept as
PATH.bak, which is never overwritten, and a healthy shard is not touched.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from epreplay.errors import ShardError
from epreplay.format.frames import footer_frame
from epreplay.format.reader import open_shard


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
        if scan.writer_active:
            raise ShardError(f"{path}: a running process is still writing this shard (it holds the "
                             f"file's lock); stop the capture or let it close, then repair")
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
    if os.stat(path).st_nlink > 1:
        # hard-linked elsewhere (`epreplay merge` links the parts' shards): cut a copy of our own,
        # never the file another run directory still reads
        own = path.with_name(f".{path.name}.repair-{os.getpid()}")
        shutil.copyfile(backup, own)
        os.chmod(own, 0o600)
        os.replace(own, path)
    with open(path, "r+b") as fh:
        fh.truncate(end)
        fh.seek(end)
        fh.write(footer)
        fh.flush()
        os.fsync(fh.fileno())
    return RepairReport(path, "repaired", len(keep), size, end + len(footer), backup, problem,
                        size - end)
