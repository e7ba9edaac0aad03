"""`epreplay merge`'s work: join the node-local parts of one run into one run directory.

Each node of a multi-node job records its ranks into RUN on its own disk (capture/job.py gives
every part the same run id). A merge

    parts = [read_part(p) for p in paths]          # I/O: manifest, shard headers, rank facts
    plan = plan_merge(parts, allow_missing=False)  # pure: checks; raises UsageError (one line)
    result = write_merge(plan, out, progress=...)  # I/O: OUT built aside, renamed into place

checks that the parts are of one run and hold every rank once, then hard-links each shard into
OUT/shards (a copy when OUT is on another filesystem), copies the ranks' closing facts and writes
one manifest (manifest.json of the parts folded together, `extra["parts"]` naming where each
came from). The parts are only read: nothing in them is written, renamed or removed. OUT is
built in a hidden directory beside it and renamed into place last, so a merge that fails leaves
nothing behind.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from epreplay.errors import UsageError
from epreplay.format.records import Manifest, ShardInfo
from epreplay.format.run import DIR_MODE, RunDir, shard_name

# Copies (across filesystems) go in chunks of 8 MiB, so progress moves on a multi-GB shard.
COPY_CHUNK = 8 << 20


@dataclass(frozen=True)
class Part:
    """One node-local run directory, as read.

    Attributes:
        path: the part's directory. manifest: its manifest.json (None: there is none, e.g. its
            launcher was killed before writing it).
        shards: rank -> (shard path, its header). facts: rank -> that rank's closing facts
            (RUN/.capture/rank-NNNNN.json, else the manifest's entry).
    """

    path: Path
    manifest: Manifest | None
    shards: dict[int, tuple[Path, ShardInfo]]
    facts: dict[int, dict[str, Any]]

    @property
    def run_id(self) -> str:
        if self.manifest is not None:
            return self.manifest.run_id
        return next(iter(self.shards.values()))[1].run_id

    @property
    def nodes(self) -> list[int]:
        return sorted({info.node for _, info in self.shards.values()})


@dataclass(frozen=True)
class MergePlan:
    """What a merge will write. shards: rank -> (source shard, its header), every rank once;
    missing: ranks below world_size that no part holds (only with allow_missing)."""

    parts: tuple[Part, ...]
    run_id: str
    world_size: int
    shards: dict[int, tuple[Path, ShardInfo]]
    missing: tuple[int, ...]


@dataclass(frozen=True)
class MergeResult:
    out: Path
    shards: int
    bytes: int
    linked: int  # shards hard-linked (the others were copied)
    seconds: float


def read_part(path: str | os.PathLike[str]) -> Part:
    """Read a part's manifest, shard headers and rank facts (never writes).

    Raises:
        UsageError: not a run directory, an unreadable manifest or shard header, a shard whose
            header names another rank than its file name, or a part with no shard.
    """
    from epreplay.capture.manifest import read_rank_facts
    from epreplay.index.scan import read_info

    try:
        run = RunDir.open(path)
        manifest = run.read_manifest()
        shard_paths = run.shard_paths()
    except OSError as exc:
        raise UsageError(f"{path}: unreadable part ({exc.strerror}); check the path and its "
                         f"permissions") from None
    if not shard_paths:
        raise UsageError(f"{run.path}: a part with no shard in {run.shards_dir}; leave it out "
                         f"(or pass --allow-missing for its ranks)")
    shards: dict[int, tuple[Path, ShardInfo]] = {}
    for p in shard_paths:
        try:
            fd = os.open(p, os.O_RDONLY)
            try:
                info = read_info(str(p), fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise UsageError(f"{p}: unreadable shard ({exc.strerror}); check its permissions or "
                             f"run 'epreplay repair {run.path}' on that node") from None
        if info.rank != run.rank_of(p):
            raise UsageError(f"{p}: its header says rank {info.rank}; rename it to "
                             f"{shard_name(info.rank)} or move it out of {run.shards_dir}")
        shards[info.rank] = (p, info)
    try:
        facts = {int(r): f for r, f in read_rank_facts(run).items()}
    except UsageError:
        facts = {}
    for r, f in (manifest.ranks.items() if manifest is not None else ()):
        facts.setdefault(int(r), f)
    return Part(run.path, manifest, shards, {r: f for r, f in facts.items() if r in shards})


def plan_merge(parts: list[Part], *, allow_missing: bool = False) -> MergePlan:
    """Check that `parts` are of one run and hold each rank once (pure).

    Raises:
        UsageError, one line: a part given twice, parts of different runs, a shard of another
            run inside a part, world sizes that disagree, a rank in two parts, ranks that no
            part holds (unless allow_missing).
    """
    if not parts:
        raise UsageError("no parts to merge; give the node-local run directories: "
                         "epreplay merge PART... --out RUN")
    seen: dict[Path, Path] = {}
    for part in parts:
        real = part.path.resolve()
        if real in seen:
            raise UsageError(f"{part.path}: given twice (as {seen[real]}); give each part once")
        seen[real] = part.path
    for part in parts:
        for rank, (p, info) in sorted(part.shards.items()):
            if info.run_id != part.run_id:
                raise UsageError(f"{p}: shard of run {info.run_id}, not of its part's run "
                                 f"{part.run_id}; move it out of {p.parent}")
    ids = {part.run_id for part in parts}
    if len(ids) > 1:
        said = ", ".join(f"{part.path} (run {part.run_id})" for part in parts)
        raise UsageError(f"parts of different runs: {said}; merge the parts of one run only "
                         f"(give every node's 'epreplay record' the same --run-id)")
    worlds = {info.world_size for part in parts for _, info in part.shards.values()}
    if len(worlds) > 1:
        raise UsageError(f"the parts' shards disagree on the world size ({sorted(worlds)}); "
                         f"they are not of one job")
    world = worlds.pop()
    shards: dict[int, tuple[Path, ShardInfo]] = {}
    owner: dict[int, Path] = {}
    for part in parts:
        for rank, entry in sorted(part.shards.items()):
            if rank in shards:
                raise UsageError(f"rank {rank} is in two parts, {owner[rank]} and {part.path}; "
                                 f"keep the part of the node that ran it and leave the other out")
            if rank >= world:
                raise UsageError(f"{entry[0]}: rank {rank} of world size {world}; not of this job")
            shards[rank], owner[rank] = entry, part.path
    missing = tuple(sorted(set(range(world)) - set(shards)))
    if missing and not allow_missing:
        raise UsageError(f"rank(s) {_ranks(missing)} missing: no part holds their shard"
                         f"{_missing_nodes(parts)}; add that part, or pass --allow-missing to "
                         f"merge without them (the gap is recorded in the manifest)")
    return MergePlan(tuple(parts), ids.pop(), world, shards, missing)


def _ranks(ranks: tuple[int, ...]) -> str:
    text = ", ".join(map(str, ranks[:16]))
    return text + (f" and {len(ranks) - 16} more" if len(ranks) > 16 else "")


def _missing_nodes(parts: list[Part]) -> str:
    """' (node 1's part?)' when the parts' manifests say how many nodes the job had."""
    nnodes = max(int((p.manifest.extra.get("nnodes") if p.manifest else 0) or 0) for p in parts)
    have = {n for p in parts for n in p.nodes}
    gone = sorted(set(range(nnodes)) - have)
    return f" (the part of node {', '.join(map(str, gone))}?)" if gone else ""


def merged_manifest(plan: MergePlan, *, now: str | None = None) -> Manifest:
    """One manifest for the merged run (pure): the parts' manifests folded together — ranks'
    facts, hosts, totals — with extra["parts"] (where each part came from and which ranks it
    gave) and, with gaps, extra["missing_ranks"]."""
    from epreplay.capture.manifest import folded, nodes_of
    from epreplay.format.census import from_header

    parts = sorted(plan.parts, key=lambda p: min(p.shards))
    firsts = [p.manifest for p in parts if p.manifest is not None]
    base = firsts[0] if firsts else from_header(plan.shards[min(plan.shards)][1])
    facts: dict[str, dict[str, Any]] = {}
    for i, part in enumerate(parts):
        for rank, (p, info) in part.shards.items():
            f = {"node": info.node, "host": info.host, **part.facts.get(rank, {
                "rank": rank, "world_size": info.world_size, "shard": f"shards/{p.name}",
                "source": "shard header"})}
            if int(f.get("node", -1)) < 0:
                f["node"] = i  # recorded before nodes were: each part is one node's
            facts[str(rank)] = f
    exit_codes = {str(p.path): (p.manifest.extra.get("exit_code") if p.manifest else None) for p in parts}
    launchers = [l for m in firsts for l in (m.extra.get("launchers") or [])]
    merged = replace(base, ranks={}, world_size=plan.world_size,
                     hosts=sorted({h for m in firsts for h in m.hosts}),
                     extra={k: v for k, v in base.extra.items()
                            if k not in ("launchers", "exit_code", "missing_ranks", "ranks_found",
                                         "unclosed_ranks", "interrupted")})
    merged = folded(merged, facts, None)
    extra = dict(merged.extra)
    codes = [c for c in exit_codes.values() if c is not None]
    if codes:
        extra["exit_code"] = next((c for c in codes if c), 0)  # the first failure, else 0
    if any(m.extra.get("interrupted") for m in firsts):
        extra["interrupted"] = True
    unclosed = sorted({int(r) for m in firsts for r in (m.extra.get("unclosed_ranks") or [])})
    if unclosed:
        extra["unclosed_ranks"] = unclosed
    extra.update(launchers=launchers, nodes=nodes_of(merged.ranks), missing_ranks=list(plan.missing),
                 merged={"at": now or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "parts": len(parts)},
                 parts=[{"path": str(p.path.resolve()), "nodes": p.nodes, "ranks": sorted(p.shards),
                         "exit_code": exit_codes[str(p.path)]} for p in parts])
    return replace(merged, extra=extra)


def check_out(out: Path, parts: list[Part]) -> None:
    """UsageError when `out` exists and is not empty, or is one of the parts."""
    if any(out.resolve() == p.path.resolve() for p in parts):
        raise UsageError(f"--out {out}: is one of the parts; choose a new directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out}: exists and is not empty; choose a new directory "
                         f"(nothing is overwritten)")


def write_merge(plan: MergePlan, out: str | os.PathLike[str], *, copy: bool = False,
                progress: Callable[[int, int, int, int], None] | None = None) -> MergeResult:
    """Write the merged run to `out` (built aside, renamed into place last).

    Args:
        copy: copy every shard instead of hard-linking it (for parts about to be deleted or
            moved off a scratch disk; a link is kept only as long as both names exist).
        progress: called as progress(shards done, shards, bytes done, bytes) while shards go in.
    Raises:
        UsageError: `out` exists and is not empty, or cannot be written.
    """
    t0 = time.perf_counter()
    out = Path(out)
    check_out(out, list(plan.parts))
    total = sum(p.stat().st_size for p, _ in plan.shards.values())
    tmp = out.with_name(f".{out.name}.merge-{os.getpid()}")
    done_bytes = linked = 0
    try:
        out.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        run = RunDir.create(tmp)
        facts_dir = run.capture_dir
        facts_dir.mkdir(mode=DIR_MODE)
        for i, (rank, (src, _)) in enumerate(sorted(plan.shards.items())):
            dst = run.shard_path(rank)
            if not copy and _link(src, dst):
                linked += 1
            else:
                _copy(src, dst, lambda n: progress and progress(i, len(plan.shards), done_bytes + n, total))
            done_bytes += src.stat().st_size
            if progress:
                progress(i + 1, len(plan.shards), done_bytes, total)
        manifest = merged_manifest(plan)
        for rank_key, f in manifest.ranks.items():
            if f.get("source") != "shard header":
                path = facts_dir / f"rank-{int(rank_key):05d}.json"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as fh:
                    json.dump(f, fh, sort_keys=True)
        run.write_manifest(manifest)
        if out.exists():
            out.rmdir()  # an empty directory (check_out): the rename takes its place
        os.rename(tmp, out)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write the merged run ({exc.strerror}); "
                         f"nothing was written") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return MergeResult(out, len(plan.shards), total, linked, time.perf_counter() - t0)


def _link(src: Path, dst: Path) -> bool:
    """Hard-link src to dst; False when the filesystem cannot (another device, no links)."""
    try:
        os.link(src, dst)
        return True
    except OSError as exc:
        import errno

        if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            return False
        raise


def _copy(src: Path, dst: Path, moved: Callable[[int], Any]) -> None:
    """Copy src to dst (owner-only) in chunks, calling moved(bytes so far)."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    n = 0
    with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
        while chunk := fin.read(COPY_CHUNK):
            fout.write(chunk)
            n += len(chunk)
            moved(n)
        fout.flush()
        os.fsync(fout.fileno())


def clock_of(plan_or_run: MergePlan | RunDir):
    """The clock estimate (epreplay.format.clock) from the shards' record headers (I/O: reads each
    shard's footer, or scans a shard that has none)."""
    import numpy as np

    from epreplay.format.clock import estimate
    from epreplay.format.records import Kind
    from epreplay.format.reader import open_shard

    part_of: dict[int, int] = {}
    if isinstance(plan_or_run, MergePlan):
        sources = [(r, p) for r, (p, _) in sorted(plan_or_run.shards.items())]
        parts = sorted(plan_or_run.parts, key=lambda p: min(p.shards))
        part_of = {r: i for i, part in enumerate(parts) for r in part.shards}
    else:
        sources = [(plan_or_run.rank_of(p), p) for p in plan_or_run.shard_paths()]
    cols: dict[str, list] = {k: [] for k in ("rank", "buffer", "seq", "op", "start_ns", "duration_ns")}
    node_of: dict[int, int] = {}
    for rank, path in sources:
        with open_shard(path) as scan:
            h = scan.header_array()
            node = scan.info.node
            node_of[rank] = node if node >= 0 else part_of.get(rank, -1)
        h = h[h["kind"] == int(Kind.CALL)]
        cols["rank"].append(np.full(len(h), rank, np.int64))
        for k in ("buffer", "seq", "op", "start_ns", "duration_ns"):
            cols[k].append(h[k])
    c = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in cols.items()}
    return estimate(c["rank"], c["buffer"], c["seq"], c["op"], c["start_ns"], c["duration_ns"],
                    node_of=node_of)
