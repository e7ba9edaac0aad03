"""Shard damage found before a replay starts: a truncated shard, a record whose CRC fails.

A replay of a damaged recording used to start anyway: a damaged record then surfaced as a
ShardError inside one worker, its peers saw gloo's "Connection closed by peer", and the whole
thing read as a divergence. Damage is the recording's fault, not the replay's, so it is found
here, from the shard reader's own checks (open_shard's scan and ShardScan.verify), and reported
as damage: the rank, the byte offset and the repair command, before any process starts.

With --allow-partial the damage is accepted instead: the damaged records are dropped from the
schedule (schedule.build's `damaged`), so the calls they belong to are skipped with a reason,
and a truncated shard's lost tail is skipped like any call a rank did not record.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from epreplay.errors import ShardError


@dataclass(frozen=True)
class Damage:
    """One damaged place in one rank's shard.

    Attributes:
        rank: the recorded (virtual) rank whose shard it is.
        path: the shard file.
        offset: byte offset of the damaged record, or where a truncated shard stops being intact.
        what: what is wrong, in the reader's words ("crc 0x... != 0x...", "truncated: ...").
        truncated: True for a cut-short tail (everything from `offset` on is lost), False for one
            damaged record among intact ones.
    """

    rank: int
    path: Path
    offset: int
    what: str
    truncated: bool

    def describe(self) -> str:
        if self.truncated:
            return f"rank {self.rank} ({self.path.name}) truncated at byte {self.offset}: {self.what}"
        return f"rank {self.rank} ({self.path.name}) record at byte {self.offset}: {self.what}"


def find_damage(scans: dict[int, object]) -> list[Damage]:
    """Every damaged place in the shards, in rank order.

    Args:
        scans: rank -> ShardScan (epreplay.format.shard.open_shard), still open.
    Returns:
        [] for intact shards. A shard without a footer was already CRC-checked record by record
        by open_shard (it stops at the first bad record: that is its truncation); a shard with a
        footer has every listed record CRC-checked here (one read of the file, no decode).
    """
    found: list[Damage] = []
    for rank in sorted(scans):
        scan = scans[rank]
        if scan.truncated_at is not None:
            # problem reads "truncated at byte N: why; K records intact, L bytes lost; run ..."
            why = (scan.problem or "").partition(": ")[2].partition(";")[0] or "cut short"
            found.append(Damage(rank, Path(scan.path), int(scan.truncated_at), why, True))
        # Only a footer's records are unchecked: a scan without one CRC'd each as it walked.
        for offset, why in (scan.verify() if scan.complete else []):
            found.append(Damage(rank, Path(scan.path), int(offset), why, False))
    return found


def damaged_offsets(damage: list[Damage]) -> dict[int, dict[int, str]]:
    """rank -> {record offset: what is wrong} for the damaged records the footer still lists
    (what schedule.build must not replay). A truncation lists no record past its cut."""
    out: dict[int, dict[int, str]] = {}
    for d in damage:
        if not d.truncated:
            out.setdefault(d.rank, {})[d.offset] = f"record at byte {d.offset} damaged: {d.what}"
    return out


def damage_error(run_path: Path, damage: list[Damage]) -> ShardError:
    """The one-line refusal: which ranks, where, and the two ways on."""
    shown = "; ".join(d.describe() for d in damage[:3])
    more = f"; and {len(damage) - 3} more" if len(damage) > 3 else ""
    ranks = sorted({d.rank for d in damage})
    return ShardError(f"{run_path}: shard damage on rank(s) {ranks}, nothing replayed: {shown}{more}; "
                      f"run 'epreplay repair {run_path}' to cut damaged shards to their intact "
                      f"prefix, or pass --allow-partial to replay only the calls every rank "
                      f"holds intact")
