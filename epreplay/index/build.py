"""Build and update RUN/index.duckdb from a run's shards.

    build_index(run, force=False)   index what is new (or everything with force); one writer at a time
    ensure_index(run)               build/update when missing or stale; never fails on a busy writer
    load_replay_report(run, report) put a replay report (dict or RUN/replays/<id>.json) in the index
                                    (epreplay.index.replays)

Schema: epreplay/index/schema.sql; queries: epreplay.index.queries. Shards are indexed in worker
processes (epreplay.index.shard, resuming live shards with epreplay.index.scan), results merged
with numpy and inserted through Arrow (epreplay.index.store).

Writes never touch the live file: the writer builds (or copies and updates) a temporary database
next to it, CHECKPOINTs, closes and renames it over RUN/index.duckdb. Readers holding the old file
open (a TUI, `epreplay stats`) keep reading it. A build that fails on its input (a damaged shard,
a shard of another run) removes the old index instead of leaving it answering as if current.
One writer at a time: RUN/index.duckdb.lock (epreplay.index.lock).

Trust: `shards` keeps a stamp of each shard (size, mtime, CRC of its header and footer windows;
epreplay.index.check); a shard that no longer matches its stamp is re-read, so no command shows
figures of bytes that are gone. A build that fails removes the index it could not bring up to date
(`_discard`): the next command rebuilds it, or fails with the same message naming the shard.

Incremental: `shards` keeps each shard's size and intact record count. A shard that grew is
indexed from its first unindexed record; its new aggregate rows are added, and rows of a
(step, layer) that already had rows (a live capture indexed mid-step) are merged, so every table
stays one row per key. A shard that shrank or changed otherwise (repair) triggers a full rebuild.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from epreplay.errors import UsageError
from epreplay.format import steps
from epreplay.format.run import RunDir
from epreplay.index import clock
from epreplay.index.check import changed
from epreplay.index.lock import IndexLocked, WriterLock, connect
from epreplay.index.store import INDEX_VERSION, _ingest, _load_report, _loaded_replays
from epreplay.index.workers import run_workers, worker_count


@dataclass(frozen=True)
class IndexResult:
    """What build_index / ensure_index did.

    action: "built" (from scratch), "updated" (incremental), "fresh" (nothing to do) or "locked"
    (another writer holds the index; nothing done). routings: token-layer routings (rows of
    topk_idx_TK) aggregated by this call. problems: one line per damaged shard."""

    path: Path
    action: str
    shards_indexed: int = 0
    records: int = 0
    routings: int = 0
    seconds: float = 0.0
    problems: tuple[str, ...] = ()
    message: str = ""
    rows_added: dict[str, int] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)  # seconds: plan, shards, tables, checkpoint
    workers: int = 0  # processes that indexed the shards (1: in this process)


def _schema_sql() -> str:
    return (Path(__file__).with_name("schema.sql")).read_text()


def _shard_paths(run: RunDir) -> list[Path]:
    shards = run.shard_paths()
    if not shards:
        raise UsageError(f"{run.path}: no shards in {run.shards_dir} (nothing recorded yet?); "
                         f"record with 'epreplay record --out {run.path} -- CMD'")
    return shards


def _existing(run: RunDir) -> dict | None:
    """What the current index says: {"run_id", "shards": {rank: row dict}, "replays": set}, or
    None when there is no usable index."""
    import duckdb

    if not run.index_path.exists():
        return None
    try:
        con = connect(run.index_path, read_only=True)
    except duckdb.Error:
        return None
    try:
        ver = con.execute("SELECT run_id, index_version, world_size, num_experts FROM runs").fetchall()
        if not ver or ver[0][1] != INDEX_VERSION:
            return None
        res = con.execute("SELECT * FROM shards")
        cols = [d[0] for d in res.description]
        shards = {int(r[0]): dict(zip(cols, r)) for r in res.fetchall()}
        replays = {r[0] for r in con.execute("SELECT replay FROM replays").fetchall()}
        plan = con.execute("SELECT method, layers_per_step, detail FROM steps").fetchall()
        return {"run_id": ver[0][0], "world_size": ver[0][2], "num_experts": ver[0][3],
                "shards": shards, "replays": replays, "steps": plan[0] if plan else None}
    except duckdb.Error:
        return None
    finally:
        con.close()


def stale_reason(run: str | os.PathLike[str] | RunDir) -> str | None:
    """Why RUN's index needs (re)building, or None when it is up to date."""
    run = run if isinstance(run, RunDir) else RunDir.open(run)
    state = _existing(run)
    if state is None:
        return "no index" if not run.index_path.exists() else "index unreadable or of another version"
    manifest = run.read_manifest()
    if manifest is not None and (manifest.run_id, manifest.world_size) != (state["run_id"], state["world_size"]):
        return "manifest.json changed"
    on_disk = {run.rank_of(p): p for p in run.shard_paths()}
    if set(on_disk) != set(state["shards"]):
        return "shards added or removed"
    for rank, p in on_disk.items():
        row = state["shards"][rank]
        why = changed(p, row)
        if why is not None:
            return why
        if row["writer_active"] and not _live(p):
            return f"{p.name}: its writer has gone"
    if _report_ids(run) - state["replays"]:
        return "new replay reports"
    return None


def _live(path: Path) -> bool:
    """Whether a capture still holds the shard open for writing."""
    from epreplay.index.scan import writer_active

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return writer_active(fd)
    finally:
        os.close(fd)


def _report_ids(run: RunDir) -> set[str]:
    d = run.replays_dir
    return {p.stem for p in d.glob("*.json")} if d.is_dir() else set()


def _facts(run: RunDir, shard_paths: list[Path]) -> dict:
    """Run-level facts from the manifest, completed from the first shard's header."""
    from epreplay.index.scan import read_info

    manifest = run.read_manifest()
    fd = os.open(shard_paths[0], os.O_RDONLY)
    try:
        info = read_info(str(shard_paths[0]), fd)
    finally:
        os.close(fd)
    pick = lambda name: int(getattr(manifest, name, 0) or getattr(info, name, 0) or 0)  # noqa: E731
    return {
        "manifest": manifest, "run_id": manifest.run_id if manifest else info.run_id,
        "created": manifest.created if manifest else "", "release": manifest.release if manifest else "",
        "world_size": pick("world_size"), "num_experts": pick("num_experts"), "topk": pick("topk"),
        "hidden": pick("hidden"), "level": manifest.level if manifest else info.level.label,
        "x_dtype": manifest.x_dtype if manifest else "",
    }


def _validate(run: RunDir, facts: dict, shard_paths: list[Path], results: list) -> None:
    """One clear UsageError for a shard of another run or a manifest that does not match its
    shards (checked on the shards' headers before anything is written)."""
    world = facts["world_size"]
    where = "manifest.json" if facts["manifest"] is not None else f"{shard_paths[0].name}'s header"
    if len(shard_paths) > world:
        raise UsageError(f"{run.shards_dir}: {len(shard_paths)} shards but {where} says world size "
                         f"{world}; remove the extra shards or fix the manifest")
    for res in results:
        p, info = Path(res.path), res.info
        named = run.rank_of(p)
        if info.run_id != facts["run_id"]:
            raise UsageError(f"{p}: shard of run {info.run_id}, not of this run {facts['run_id']} "
                             f"({where}); move it out of {run.shards_dir}")
        if info.rank != named:
            raise UsageError(f"{p}: its header says rank {info.rank}; rename it to "
                             f"rank-{info.rank:05d}.eprs or move it out")
        if info.world_size != world or named >= world:
            raise UsageError(f"{p}: rank {named} of world size {info.world_size}, but {where} says "
                             f"world size {world}; the manifest does not match its shards")


def _plan(run: RunDir, shard_paths: list[Path], state: dict | None
          ) -> tuple[list[tuple[Path, int, int]], bool]:
    """[(shard, first record to index, expected end of the indexed part)], full rebuild?"""
    full = [(p, 0, 0) for p in shard_paths]
    if state is None:
        return full, True
    on_disk = {run.rank_of(p): p for p in shard_paths}
    if set(state["shards"]) - set(on_disk):
        return full, True  # a shard disappeared: its rows must go
    tasks = []
    for rank, p in on_disk.items():
        row = state["shards"].get(rank)
        size = p.stat().st_size
        if row is None:
            tasks.append((p, 0, 0))
        elif size == row["bytes"] and changed(p, row) is not None:
            return full, True  # rewritten in place: rows already indexed may be wrong
        elif size == row["bytes"] and not (row["writer_active"] and not _live(p)):
            continue  # unchanged (a shard whose writer died since is re-read: its tail is damage now)
        elif size < row["bytes"] or row["truncated_at"] is not None:
            return full, True  # cut, repaired or rewritten: rows already indexed may be wrong
        else:
            tasks.append((p, int(row["records"]), int(row["indexed_end"])))
    return tasks, False


def _plan_row(plan: steps.StepPlan) -> tuple[str, int, str]:
    return plan.method, plan.layers_per_step, plan.detail


def build_index(path: str | os.PathLike[str], *, force: bool = False, progress: bool = False,
                workers: int | None = None) -> IndexResult:
    """Build RUN/index.duckdb, or bring it up to date by indexing only new/grown shards.

    Args:
        force: rebuild from scratch. progress: rich progress bar on stderr.
        workers: processes indexing shards (default: the CPU count, at most 8).
    Raises:
        UsageError: not a run, no shards, a shard of another run, a manifest that does not match
            its shards; IndexLocked when another process is writing the index (nothing touched).
            On any failure with the lock held the old index is removed (see `_discard`).
    """
    import duckdb

    t0 = time.perf_counter()
    run = RunDir.open(path)
    with WriterLock(run):
        try:
            return _build_locked(run, force, progress, workers, t0)
        except Exception as exc:
            removed = _discard(run)
            if not isinstance(exc, UsageError):
                raise
            raise type(exc)(_with_fix(str(exc), run, removed)) from None


def _discard(run: RunDir) -> bool:
    """Remove RUN/index.duckdb after a failed build (under the writer lock): it describes shards
    that are no longer there as they were, and must not go on answering as if current. The next
    command rebuilds it, or fails naming the shard. Readers holding it open keep their copy."""
    try:
        run.index_path.unlink()
    except FileNotFoundError:
        return False
    return True


def _with_fix(msg: str, run: RunDir, removed: bool) -> str:
    """A build error completed with what to do, and with the removal of the old index."""
    if "'epreplay " not in msg and "move it out" not in msg:
        msg += (f"; repair or move the shard ('epreplay repair {run.path}'), then "
                f"'epreplay index {run.path}'")
    if removed:
        msg += f" (the old index was removed: its figures no longer match {run.shards_dir})"
    return msg


def _build_locked(run: RunDir, force: bool, progress: bool, workers: int | None, t0: float) -> IndexResult:
    """build_index's work, with the writer lock held."""
    shard_paths = _shard_paths(run)
    facts = _facts(run, shard_paths)
    state = None if force else _existing(run)
    if state is not None and (state["run_id"], state["world_size"], state["num_experts"]) != (
            facts["run_id"], facts["world_size"], facts["num_experts"]):
        state = None  # another run's index, or the manifest changed: rebuild (and re-validate)
    tasks, full = _plan(run, shard_paths, state)
    plan = steps.plan_of_run(run, shard_paths) if tasks else None
    if plan is not None and not full and tuple(state["steps"] or ()) != _plan_row(plan):
        tasks, full = [(p, 0, 0) for p in shard_paths], True  # steps found anew: every row moves
    facts["layers_per_step"] = plan.layers_per_step if plan is not None and plan.derived else 0
    new_reports = _report_ids(run) - (state["replays"] if state else set())
    if not full and not tasks and not new_reports:
        return IndexResult(run.index_path, "fresh", seconds=time.perf_counter() - t0)
    t1 = time.perf_counter()
    results = run_workers(tasks, facts, progress, workers)
    if any(r.records < 0 for r in results):  # a shard changed under its indexed part
        tasks, full = [(p, 0, 0) for p in shard_paths], True
        results = run_workers(tasks, facts, progress, workers)
    _validate(run, facts, shard_paths, results)
    t2 = time.perf_counter()
    tmp = run.inside(f".index.duckdb.tmp-{os.getpid()}")
    try:
        if not full:
            shutil.copyfile(run.index_path, tmp)
        con = connect(tmp)
        try:
            # one transaction: DuckDB compresses and writes the tables' row groups once at
            # COMMIT, not once per autocommitted insert (~20% of the table phase's CPU)
            con.execute("BEGIN TRANSACTION")
            if full:
                con.execute(_schema_sql())
            added = _ingest(con, run, facts, results, shard_paths, merge=not full)
            clock.refresh(con, facts["manifest"])
            if plan is not None:
                con.execute("DELETE FROM steps")
                con.execute("INSERT INTO steps VALUES (?, ?, ?)", list(_plan_row(plan)))
            for rid in sorted(_report_ids(run) - _loaded_replays(con)):
                _load_report(con, run, run.replays_dir / f"{rid}.json")
            con.execute("COMMIT")
            t3 = time.perf_counter()
            con.execute("CHECKPOINT")
        finally:
            con.close()
        os.chmod(tmp, 0o600)
        os.replace(tmp, run.index_path)
        t4 = time.perf_counter()
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
            if leftover.exists():
                leftover.unlink()
    problems = tuple(f"rank {r.rank}: {r.problem}" for r in results if r.truncated_at is not None)
    routings = sum(r.routings for r in results)
    return IndexResult(run.index_path, "built" if full else "updated", len(results),
                       sum(r.records - r.start for r in results), routings,
                       time.perf_counter() - t0, problems, rows_added=added,
                       phases={"plan": t1 - t0, "shards": t2 - t1, "tables": t3 - t2, "checkpoint": t4 - t3},
                       workers=worker_count(tasks, workers))


def ensure_index(run: str | os.PathLike[str], *, progress: bool = True) -> IndexResult:
    """Build or update RUN's index when missing or stale. When another process holds the writer
    lock, nothing is done and the result says so (action "locked"); readers then use what is
    there. Raises UsageError for bad input (see build_index)."""
    rundir = RunDir.open(run)
    reason = stale_reason(rundir)
    if reason is None:
        return IndexResult(rundir.index_path, "fresh")
    try:
        res = build_index(rundir.path, progress=progress)
    except IndexLocked as exc:
        return IndexResult(rundir.index_path, "locked", message=str(exc))
    return res
