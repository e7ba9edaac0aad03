"""The run directory side of capture: the run id, manifest.json, and each rank's closing facts.

No process group is needed (capture must work when the group is the thing that broke):
  * the launcher (`epreplay record`, `env_for`) or, in library mode, the first process to take
    RUN/.capture/lock creates manifest.json with the run id; every rank reads the id from there;
  * on close each rank writes RUN/.capture/rank-NNNNN.json (its closing facts) and then merges
    every rank file present into manifest.json under the same lock; the launcher (`epreplay
    record`, the demo) merges once more after the job ends (`finish`), so the manifest ends
    complete whatever order ranks closed in, and describes from the shard headers the ranks
    that never closed (a Ctrl-C, a kill) instead of keeping world size 0.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from epreplay.capture.config import CaptureConfig
from epreplay.format.records import Manifest
from epreplay.format.run import DIR_MODE, RunDir, new_run_id

CAPTURE_DIR = ".capture"  # RUN/.capture: lock, per-rank facts, the sitecustomize for children
MARKER = "DUMP"  # RUN/DUMP: flight-mode dump request that every rank's watchdog polls


def capture_dir(run: RunDir) -> Path:
    return run.capture_dir  # refuses a .capture symlink leaving the run


@contextlib.contextmanager
def locked(run: RunDir) -> Iterator[None]:
    d = capture_dir(run)
    d.mkdir(mode=DIR_MODE, exist_ok=True)
    fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for dist in ("epreplay", "torch", "deep_ep", "numpy", "zstandard"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def prepare_run(config: CaptureConfig, *, command: list[str] | None = None,
                world_size: int = 0, fresh: bool = False, nnodes: int = 1,
                job: str = "") -> CaptureConfig:
    """Create (or join) the run directory and its manifest; returns the config with the run id.

    Args:
        fresh: the caller starts a new run (`epreplay record`): refuse a directory that already
            holds one — unless it holds the run `config.run_id` names (an id every node of a
            multi-node job agreed on, capture.job) and no launcher of `config.node` yet: the
            launchers of the other nodes share this directory (a shared filesystem) and join.
            Otherwise ranks join whatever run the directory holds.
        nnodes / job: the job's node count and, in words, where its run id came from (manifest).
    """
    # With an agreed run id, launchers of several nodes may share the directory (a shared
    # filesystem): whether it holds our run is decided under the lock, or two launchers
    # starting together would both find it empty, or each refuse the other's.
    agreed = fresh and bool(config.run_id)
    run = RunDir.create(config.run_dir, exist_ok=not fresh or agreed)
    with locked(run):
        manifest = run.read_manifest()
        if agreed and manifest is None and any(run.shards_dir.iterdir()):
            manifest = Manifest(run_id="", created="", world_size=0)  # shards of an unknown run
        if agreed and manifest is not None and manifest.run_id != config.run_id:
            from epreplay.errors import UsageError

            raise UsageError(f"{run.path}: already holds a run; choose another --out (nothing is overwritten)")
        if manifest is None:
            manifest = Manifest(
                run_id=config.run_id or new_run_id(),
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                world_size=world_size, level=config.level.label, release=config.release,
                command=list(command or []), versions=versions(), hosts=[socket.gethostname()],
                flight_steps=config.flight_steps, payload_every=config.payload_every,
                extra={"layers_per_step": config.layers_per_step, "hang_timeout": config.hang_timeout},
            )
        if fresh:
            manifest = _launched(run, manifest, config, nnodes=nnodes, job=job)
            run.write_manifest(manifest)
        elif not run.manifest_path.exists():
            run.write_manifest(manifest)
    return config.with_run_id(manifest.run_id)


def _launched(run: RunDir, manifest: Manifest, config: CaptureConfig, *, nnodes: int, job: str) -> Manifest:
    """`manifest` with this launcher (node, host, pid) in extra["launchers"]; refuses a second
    launcher of the same node (a re-run into the same directory would mix two jobs)."""
    from epreplay.errors import UsageError

    launchers = list(manifest.extra.get("launchers") or [])
    if config.node >= 0 and any(int(l.get("node", -1)) == config.node for l in launchers):
        raise UsageError(f"{run.path}: already holds node {config.node} of run {manifest.run_id}; "
                         f"choose another --out (nothing is overwritten)")
    launchers.append({"node": config.node, "host": socket.gethostname(), "pid": os.getpid(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    extra = {**manifest.extra, "launchers": launchers, "nnodes": max(nnodes, int(manifest.extra.get("nnodes") or 1))}
    if job:
        extra["job"] = job
    hosts = sorted(set(manifest.hosts) | {socket.gethostname()})
    return replace(manifest, extra=extra, hosts=hosts)


def write_rank_facts(run: RunDir, rank: int, facts: dict[str, Any]) -> None:
    d = capture_dir(run)
    d.mkdir(mode=DIR_MODE, exist_ok=True)
    path = d / f"rank-{rank:05d}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(facts, fh, sort_keys=True)
    os.replace(tmp, path)


def read_rank_facts(run: RunDir) -> dict[str, dict[str, Any]]:
    d = capture_dir(run)
    out: dict[str, dict[str, Any]] = {}
    if not d.is_dir():
        return out
    for p in sorted(d.glob("rank-*.json")):
        try:
            facts = json.loads(p.read_text())
            out[str(int(facts["rank"]))] = facts
        except (ValueError, KeyError, OSError):
            continue  # a rank killed mid-write leaves no usable file; its shard still speaks
    return out


def merge(run: RunDir, *, exit_code: int | None = None) -> Manifest | None:
    """Fold every rank's facts into manifest.json (under the lock). Returns the new manifest."""
    with locked(run):
        manifest = run.read_manifest()
        if manifest is None:
            return None
        manifest = folded(manifest, read_rank_facts(run), exit_code)
        run.write_manifest(manifest)
        return manifest


# Seconds finish() waits for writer processes still writing out what their killed rank had
# handed over: a ring holds seconds of traffic and drains in well under one; 10 covers a busy
# machine, and a writer still busy after that is described as it is (its shard unclosed).
WRITER_WAIT_S = 10.0


def finish(run: RunDir, *, exit_code: int | None = None, interrupted: bool = False,
           wait_s: float = WRITER_WAIT_S, node: int | None = None) -> Manifest | None:
    """The launcher's last merge (`epreplay record`, the demo), once the job has ended however
    it ended: every rank's facts as merge() folds them, then what the shard headers say for the
    ranks that left a shard but no facts (interrupted or killed before their close), so that
    manifest.json describes what is on disk (world size, ranks found, missing and unclosed).

    Args:
        interrupted: the job was stopped by a signal (Ctrl-C): extra["interrupted"] says so.
        wait_s: seconds to wait for writers finishing those ranks' shards (see WRITER_WAIT_S).
        node: this launcher's node when several share the directory (a shared filesystem): the
            shards of other nodes' ranks, still being written, are theirs to describe.

    Returns the new manifest; None when the run has none (nothing was ever started).
    """
    from epreplay.format.census import described, read_shards

    facts = read_rank_facts(run)
    unclosed = [p for p in run.shard_paths() if str(run.rank_of(p)) not in facts]
    if node is not None:
        unclosed = [p for p in unclosed if _node_of_shard(p) in (node, -1)]
    found = []
    if interrupted or unclosed:  # a clean end reads no shard: their footers can be large
        # outside the lock: an unclosed shard is scanned whole, and ranks closing late need it
        found, _ = read_shards(run, wait_s=wait_s)
    with locked(run):
        manifest = run.read_manifest()
        if manifest is None:
            return None
        manifest = folded(manifest, read_rank_facts(run), exit_code)
        if found:
            manifest = described(manifest, found)
        if interrupted:
            manifest = replace(manifest, extra={**manifest.extra, "interrupted": True})
        run.write_manifest(manifest)
        return manifest


def _node_of_shard(path: Path) -> int:
    """The node a shard's header names (-1: unknown or unreadable)."""
    from epreplay.index.scan import read_info

    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            return read_info(str(path), fd).node
        finally:
            os.close(fd)
    except Exception:  # noqa: BLE001 - a damaged header is described by read_shards
        return -1


def folded(manifest: Manifest, facts: dict[str, dict[str, Any]], exit_code: int | None) -> Manifest:
    """`manifest` with the ranks' closing facts folded in (world size, shapes, hosts, totals)."""
    ranks = dict(manifest.ranks)
    ranks.update(facts)
    world = max([manifest.world_size] + [int(f.get("world_size", 0)) for f in ranks.values()])
    static = {k: getattr(manifest, k) for k in ("num_experts", "topk", "hidden")}
    for f in sorted(ranks.values(), key=lambda f: int(f.get("rank", 0))):
        for k in static:
            if not static[k] and f.get(k):
                static[k] = int(f[k])
    x_dtype = next((f["x_dtype"] for f in ranks.values() if f.get("x_dtype")), manifest.x_dtype)
    hosts = sorted(set(manifest.hosts) | {f["host"] for f in ranks.values() if f.get("host")})
    extra = dict(manifest.extra)
    extra["dropped"] = sum(int(f.get("dropped", 0)) for f in ranks.values())
    extra["disabled_ranks"] = sorted(int(r) for r, f in ranks.items() if f.get("disabled"))
    extra["dumps"] = sum(len(f.get("dumps") or []) for f in ranks.values())
    extra["nodes"] = nodes_of(ranks)
    for key in ("unclosed_ranks", "missing_ranks"):  # another launcher may have described them
        if extra.get(key):
            extra[key] = [r for r in extra[key] if str(r) not in facts]
    if exit_code is not None:
        extra["exit_code"] = exit_code
    return replace(manifest, ranks=ranks, world_size=world, hosts=hosts, x_dtype=x_dtype,
                   extra=extra, **static)


def nodes_of(ranks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{node: {"ranks": [...], "hosts": [...]}} from a manifest's ranks entries ("-1": unknown)."""
    out: dict[str, dict[str, Any]] = {}
    for key in sorted(ranks, key=int):
        f = ranks[key]
        node = out.setdefault(str(int(f.get("node", -1))), {"ranks": [], "hosts": []})
        node["ranks"].append(int(key))
        if f.get("host") and f["host"] not in node["hosts"]:
            node["hosts"].append(f["host"])
    return out


def write_marker(run_dir: str | os.PathLike[str], reason: str, detail: str, rank: int) -> Path:
    """Ask every flight-mode rank of the run to dump: atomically replace RUN/DUMP (a new inode
    each time, so each request is seen once). Raises OSError when the disk refuses."""
    marker = Path(run_dir) / MARKER
    body = json.dumps({"reason": reason, "detail": detail, "rank": rank, "time_ns": time.time_ns()})
    tmp = marker.with_name(f".{MARKER}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(body)
    os.replace(tmp, marker)
    return marker
