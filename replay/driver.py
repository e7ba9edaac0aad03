"""`replay_run`: open the run, refuse shard damage (damage.py), plan, schedule, launch M workers
(launcher.py), build the report (collect.py), write it to RUN/replays/<id>.json and load it into
the index."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any, Callable

from epreplay.errors import UsageError
from epreplay.format.records import Level, Op
from epreplay.format.run import RunDir
from epreplay.format.steps import plan_for
from epreplay.launch import check_device
from epreplay.replay import schedule as S
from epreplay.replay.collect import build_report
from epreplay.replay.damage import damage_error, damaged_offsets, find_damage
from epreplay.replay.launcher import joined_from_torchrun, launch_local, run_torchrun
from epreplay.replay.plan import Plan
from epreplay.replay.report import ReplayReport
from epreplay.replay.worker import Job


def _load_shards(run: RunDir) -> tuple[dict[int, Any], int]:
    paths = run.shard_paths()
    if not paths:
        raise UsageError(f"{run.path}: no shards in {run.shards_dir}; nothing to replay")
    scans = S.open_run_shards({run.rank_of(p): p for p in paths})
    manifest = run.read_manifest()
    world = manifest.world_size if manifest else max(s.info.world_size for s in scans.values())
    run_ids = {s.info.run_id for s in scans.values()}
    if len(run_ids) > 1:
        for s in scans.values():
            s.close()
        odd = sorted(r for r, s in scans.items() if s.info.run_id != scans[min(scans)].info.run_id)
        raise UsageError(f"{run.path}: shards of different runs ({', '.join(sorted(run_ids))}); the "
                         f"shards of rank(s) {odd[:8]} do not belong here — move them out")
    missing = [r for r in range(world) if r not in scans]
    if missing:
        for s in scans.values():
            s.close()
        raise UsageError(f"{run.path}: the run has {world} ranks but no shard for rank(s) "
                         f"{missing[:8]}; a replay needs every rank's shard")
    return scans, world


def _ll_max_tokens(scans: dict[int, Any], sched: S.Schedule) -> dict[int, int]:
    """Recorded num_max_dispatch_tokens_per_rank per LL buffer (one record read per buffer)."""
    from epreplay.replay.inputs import meta_value

    out: dict[int, int] = {}
    for c in sched.calls:
        if c.op == Op.LL_DISPATCH and c.buffer not in out:
            meta = scans[0].read_at(c.offsets_N[0]).meta
            out[c.buffer] = int(meta_value(meta, "M", "num_max_dispatch_tokens_per_rank",
                                           default=max(c.tokens_N)) or max(c.tokens_N))
    return out


def _elastic_buffers(scans: dict[int, Any], sched: S.Schedule) -> tuple[int, ...]:
    """Buffers recorded from a DeepEP V2 ElasticBuffer (header variant; one record per buffer)."""
    from epreplay.format.records import VARIANT_ELASTIC

    seen: dict[int, bool] = {}
    for c in sched.calls:
        if c.buffer not in seen:
            seen[c.buffer] = scans[0].read_at(c.offsets_N[0]).header.variant == VARIANT_ELASTIC
    return tuple(sorted(b for b, v2 in seen.items() if v2))


def replay_run(run_dir: str | os.PathLike[str], ranks: int | None = None, *, backend: str = "emulated",
               device: str = "cpu", steps: str | None = None, layers: str | None = None,
               ops: str | None = None, payload: str | None = None, call_timeout: float = 60.0,
               fault: Any = None, on_progress: Callable[[int, int], None] | None = None,
               on_plan: Callable[[Plan, S.Schedule], None] | None = None,
               write: bool = True, index: bool = True, allow_partial: bool = False,
               hidden: int | None = None) -> ReplayReport:
    """Replay a recorded run on `ranks` processes and verify every call against the recording.

    Args:
        run_dir: the run directory (manifest.json, shards/).
        ranks: M physical processes (default: the recorded world size N); must divide N.
        backend: "emulated" (epreplay.emulate.Buffer), "deepep" (real deep_ep.Buffer), or
            "module:Class" naming any class with DeepEP's V1 Buffer API.
        device: "cpu" or "cuda". steps/layers/ops: the CLI's filters ("A:B", "0,2-3", "dispatch,combine").
        payload: "recorded" or "synthetic"; default recorded when the recording has payloads.
        call_timeout: seconds one call may take before it is reported as a hang.
        fault: an epreplay.emulate.faults fault (tests) installed in every worker.
        on_progress: called with (calls done by the slowest rank, calls scheduled).
        on_plan: called once with the plan and schedule before the workers start.
        write: write RUN/replays/<id>.json. index: load the report into RUN/index.duckdb.
        allow_partial: accept shard damage and skipped calls: replay what every rank holds
            intact (for a truncated shard, the prefix before the cut) and exit 0 when that has
            no divergence. Without it, damage is refused up front and skipped calls give exit 3.
        hidden: width H of the synthetic payload rows instead of the recorded hidden (a multiple
            of 128, DeepEP's FP8 scale group): routing, counts and row identities are replayed
            exactly, rows are narrower. What lets a production recording (H=7168, 100+ ranks)
            replay on a few CPU processes, whose folded low-latency receive buffers are
            E x (N/M) x Mll x H per process. Synthetic payloads only.
    Returns:
        The ReplayReport (exit_code 0 / 1 / 3; see epreplay.replay.report).
    Raises:
        UsageError: unusable input (no run, bad --ranks, nothing to replay, payload missing, a
            counts-level recording, --device cuda without CUDA), raised before any process
            starts and before anything is written; ShardError (a UsageError): shard damage
            without allow_partial, likewise.
    """
    if backend not in ("emulated", "deepep") and ":" not in backend:
        raise UsageError(f"--backend {backend!r}: choose emulated or deepep")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r}: choose cpu or cuda")
    if backend == "deepep" and device != "cuda":
        raise UsageError("--backend deepep needs --device cuda (DeepEP runs on GPUs only)")
    _check_backend(backend)
    run = RunDir.open(run_dir)
    t_start = time.monotonic()
    scans, world = _load_shards(run)
    try:
        _check_level(run, scans)
        if write:
            run.replays_dir  # noqa: B018 - refuses a replays/ that leads outside the run, up front
        damage = find_damage(scans)
        if damage and not allow_partial:
            raise damage_error(run.path, damage)
        info0 = scans[0].info
        manifest = run.read_manifest()
        run_id = manifest.run_id if manifest else info0.run_id
        experts = (manifest.num_experts if manifest and manifest.num_experts else info0.num_experts)
        hidden_rec = (manifest.hidden if manifest and manifest.hidden else info0.hidden)
        plan = Plan.make(world, ranks, experts)
        level = min(s.info.level for s in scans.values())
        if payload is None:
            payload = "recorded" if level >= Level.PAYLOAD else "synthetic"
        elif payload == "recorded" and level < Level.PAYLOAD:
            raise UsageError(f"--payload recorded: {run.path} was captured at level "
                             f"'{Level(level).label}', which holds no payload; use --payload synthetic")
        elif payload not in ("recorded", "synthetic"):
            raise UsageError(f"--payload {payload!r}: choose recorded or synthetic")
        if hidden is not None:
            if hidden < 128 or hidden % 128:
                raise UsageError(f"--hidden {hidden}: must be a positive multiple of 128 (DeepEP's "
                                 f"FP8 scale group), e.g. 256")
            if payload == "recorded":
                raise UsageError(f"--hidden {hidden}: recorded payloads have the recorded hidden "
                                 f"({hidden_rec}); use --payload synthetic to replay narrower rows")
        sched = S.build(scans, world, steps=S.parse_steps(steps), layers=S.parse_int_set(layers, "--layers"),
                        ops=S.parse_ops(ops), damaged=damaged_offsets(damage),
                        step_plan=plan_for(manifest, [s.header_array() for s in scans.values()]))
        if not sched.calls:
            why = (f"{len(sched.skipped)} recorded call(s) skipped (first: {sched.skipped[0].reason})"
                   if sched.skipped else "no calls recorded" if not sched.filtered
                   else f"all {sched.filtered} calls filtered out by --steps/--layers/--ops")
            raise UsageError(f"{run.path}: nothing to replay: {why}")
        if not experts:
            raise UsageError(f"{run.path}: the recording does not say how many experts it has "
                             f"(manifest num_experts and shard headers are 0); re-record with epreplay >= 0.1")
        ll_max = _ll_max_tokens(scans, sched)
        elastic = _elastic_buffers(scans, sched)
    finally:
        for s in scans.values():
            s.close()
    # A machine without CUDA is a setup error, not a divergence: refuse it before any process
    # starts, so nothing is stored (after the run checks: those name the run's own problems).
    check_device(device, option="--device")
    if on_plan is not None:
        on_plan(plan, sched)
    work = tempfile.mkdtemp(prefix="epreplay-replay-")
    try:
        job = Job(run_id, plan, sched.calls, {r: str(run.shard_path(r)) for r in range(world)}, backend,
                  payload, work, hidden or hidden_rec, experts, tuple(sorted({c.buffer for c in sched.calls
                                                                if c.op in (Op.LL_DISPATCH, Op.LL_COMBINE)})),
                  ll_max, fault, elastic_buffers=elastic)
        pids: list[int] = []
        if joined_from_torchrun():
            hang, died, is_writer = run_torchrun(job, device, call_timeout)
            write = write and is_writer
        else:
            hang, died = launch_local(job, device, call_timeout, on_progress, pids)
        report = build_report(job, run, sched, hang, died, backend, device, time.monotonic() - t_start, pids,
                              allow_partial=allow_partial)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if write:
        report.write(run.replays_dir)
        if index:
            _index(run, report)
    return report


def _check_level(run: RunDir, scans: dict[int, Any]) -> None:
    """A recording without token routing (capture level 'counts') cannot be replayed: every
    dispatch needs its topk_idx_TK. Refused up front (exit 2) rather than reported as one
    divergence per call."""
    low = sorted(r for r, s in scans.items() if s.info.level < Level.ROUTING)
    if low:
        label = Level(scans[low[0]].info.level).label
        ranks = "every rank" if len(low) == len(scans) else f"rank(s) {', '.join(map(str, low[:8]))}"
        raise UsageError(f"{run.path}: {ranks} recorded at capture level '{label}', which holds no "
                         f"token routing; replay needs level 'routing' or above: record again with "
                         f"--level routing (epreplay record) or capture.start(RUN, level='routing')")


def _check_backend(backend: str) -> None:
    """Unusable backend -> one clear line (exit 2) before any process starts."""
    import importlib.util

    module = {"emulated": "epreplay.emulate", "deepep": "deep_ep"}.get(backend, backend.partition(":")[0])
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        fix = ("build and install DeepEP (https://github.com/deepseek-ai/DeepEP) or use --backend emulated"
               if backend == "deepep" else "check the installation of epreplay")
        raise UsageError(f"--backend {backend}: module {module!r} is not importable; {fix}")


def _index(run: RunDir, report: ReplayReport) -> None:
    """Load the report into RUN/index.duckdb through INDEX's API when it exists."""
    try:
        from epreplay.index import replays as idx
    except ImportError:
        return
    loader = getattr(idx, "load_replay_report", None) or getattr(idx, "load_replay", None)
    if loader is None:
        return
    try:
        loader(run.path, report.to_dict())
    except Exception as exc:  # noqa: BLE001 - the JSON report is written; `epreplay index` loads it later
        import sys

        print(f"epreplay replay: report not loaded into {run.index_path} ({type(exc).__name__}: {exc}); "
              f"'epreplay index {run.path}' loads it from {run.replays_dir}", file=sys.stderr)
