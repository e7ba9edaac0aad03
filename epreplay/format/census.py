"""What a run's shards say about the run, for when manifest.json does not.

manifest.json learns the world size and each rank's closing facts when the ranks close. A run
stopped before that (Ctrl-C, a killed job) keeps the launcher's first manifest (world size 0, no
ranks) while its shards are fine: a shard's file header (ShardInfo) is written when the shard
opens and names the run, the rank, the world size, the level and (usually) E, K and H. Used by
the launchers' last merge (capture.manifest.finish), `epreplay repair` and `epreplay inspect`.

    found, problems = read_shards(run)                  # I/O: a ShardFacts per readable shard
    why = disagreement(manifest, [f.info for f in found])   # pure: how the manifest errs, or None
    manifest = described(manifest, found)               # pure: completed from the shards
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Iterable

from epreplay.errors import ShardError
from epreplay.format.reader import open_shard
from epreplay.format.records import Manifest, ShardInfo
from epreplay.format.run import SHARDS, RunDir
from epreplay.format.walk import wait_unlocked

STATIC = ("num_experts", "topk", "hidden")  # shapes a manifest and a shard header both carry
FROM_HEADER = "shard header"  # ranks[r]["source"] of an entry made here, not a rank's closing facts


@dataclass(frozen=True)
class ShardFacts:
    """One readable shard.

    Attributes:
        path: relative to the run ("shards/rank-00003.eprs").
        info: its file header. records: intact records (footer, or the CRC-checked scan).
        closed: it has a valid footer (its writer closed it); False for a rank stopped mid-run.
        writing: a live process still holds it (capture running, or a writer finishing).
    """

    path: str
    info: ShardInfo
    records: int
    closed: bool
    writing: bool = False

    @property
    def rank(self) -> int:
        return self.info.rank


def read_shards(run: RunDir, *, wait_s: float = 0.0) -> tuple[list[ShardFacts], list[str]]:
    """Facts of the run's readable shards, and one line per shard that could not be read.

    Args:
        wait_s: seconds, in all, to wait for writers still finishing a shard (a writer process
            writes out what its killed rank had handed over); 0 reads them as they are.
    """
    deadline = time.monotonic() + wait_s
    found: list[ShardFacts] = []
    problems: list[str] = []
    for path in run.shard_paths():
        try:
            if wait_s > 0:
                wait_unlocked(path, max(0.0, deadline - time.monotonic()))
            with open_shard(path) as scan:
                found.append(ShardFacts(f"{SHARDS}/{path.name}", scan.info,
                                        len(scan.header_array()), scan.complete,
                                        scan.writer_active))
        except (ShardError, OSError) as exc:  # one bad file must not hide the others
            problems.append(str(exc))
    return found, problems


def _own(manifest: Manifest, found: list[ShardFacts]) -> list[ShardFacts]:
    """The shards of the manifest's run (a stray shard of another run is the replay's to name)."""
    return [f for f in found if f.info.run_id == manifest.run_id]


def disagreement(manifest: Manifest, headers: Iterable[ShardInfo]) -> str | None:
    """How `manifest` misdescribes the shards whose `headers` are given (ShardFacts.info), in a
    few words; None when it does not (or there are no shards to compare with)."""
    headers = list(headers)
    if not headers:
        return None
    own = [h for h in headers if h.run_id == manifest.run_id]
    if not own:
        ids = sorted({h.run_id for h in headers})
        return f"run id {manifest.run_id}, but the shards belong to run {', '.join(ids)}"
    world = max(h.world_size for h in own)
    if manifest.world_size != world:
        return f"world size {manifest.world_size}, but the shards say {world}"
    unlisted = sorted(h.rank for h in own if str(h.rank) not in manifest.ranks)
    if unlisted:
        return f"no entry for rank(s) {unlisted[:8]}, which left a shard"
    return None


def from_header(info: ShardInfo) -> Manifest:
    """A bare manifest for the run a shard header names (when there is no usable manifest)."""
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.created_ns / 1e9))
    return Manifest(run_id=info.run_id, created=created, world_size=0, level=info.level.label)


def described(manifest: Manifest | None, found: list[ShardFacts]) -> Manifest:
    """`manifest` completed with what the shards say: the world size of their headers, E/K/H
    where it has none, an entry for every rank that left a shard but no closing facts, and in
    extra the ranks found, missing and unclosed. Closing facts already there are kept (they say
    more than a header). With no manifest, or one of another run, it starts from the header of
    the lowest rank's shard.

    Raises:
        ValueError: `found` is empty (nothing to describe the run from).
    """
    if not found:
        raise ValueError("no readable shard to describe the run from")
    if manifest is None or not _own(manifest, found):
        manifest = from_header(min(found, key=lambda f: f.rank).info)
    own = sorted(_own(manifest, found), key=lambda f: f.rank)
    world = max(f.info.world_size for f in own)
    ranks = dict(manifest.ranks)
    for f in own:
        entry = ranks.get(str(f.rank))
        if entry is None or entry.get("source") == FROM_HEADER:
            # what a rank stopped before its close can still tell ("closed" False: no footer);
            # an entry made so earlier is renewed, the shard may have grown since
            ranks[str(f.rank)] = {"rank": f.rank, "world_size": f.info.world_size, "records": f.records,
                                  "shard": f.path, "closed": f.closed, "source": FROM_HEADER,
                                  "node": f.info.node, "host": f.info.host}
    static = {k: getattr(manifest, k) or next((getattr(f.info, k) for f in own if getattr(f.info, k)), 0)
              for k in STATIC}
    present = [f.rank for f in own]
    extra = dict(manifest.extra)
    extra.update(ranks_found=present, missing_ranks=sorted(set(range(world)) - set(present)),
                 unclosed_ranks=[f.rank for f in own if not f.closed])
    return replace(manifest, world_size=world, ranks=ranks, extra=extra, **static)
