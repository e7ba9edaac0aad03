"""`replay_run`: plan, schedule, launch M workers, watch them, collect the report.

The parent never blocks on a collective: workers run under epreplay.launch.run_ranks in a
background thread while the parent polls their progress table. A call that stays unfinished
longer than `call_timeout` on any rank is a hang: the parent kills the workers (run_ranks then
reaps every child), and the report names the call that hung.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from epreplay.errors import UsageError
from epreplay.records import Level, Op
from epreplay.replay import schedule as S
from epreplay.replay.plan import Plan
from epreplay.replay.report import OpStats, ReplayReport, first_of
from epreplay.replay.verify import Divergence
from epreplay.replay.worker import Job, open_progress, replay_rank
from epreplay.run import RunDir, new_run_id

# After one rank stops with an error, peers blocked in the same collective can never finish;
# give them this long to report on their own before they are killed.
ERROR_GRACE_S = 2.0


def _load_shards(run: RunDir) -> tuple[dict[int, Any], int]:
    paths = run.shard_paths()
    if not paths:
        raise UsageError(f"{run.path}: no shards in {run.shards_dir}; nothing to replay")
    scans = S.open_run_shards({run.rank_of(p): p for p in paths})
    manifest = run.read_manifest()
    world = manifest.world_size if manifest else max(s.info.world_size for s in scans.values())
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


def replay_run(run_dir: str | os.PathLike[str], ranks: int | None = None, *, backend: str = "emulated",
               device: str = "cpu", steps: str | None = None, layers: str | None = None,
               ops: str | None = None, payload: str | None = None, call_timeout: float = 60.0,
               fault: Any = None, on_progress: Callable[[int, int], None] | None = None,
               on_plan: Callable[[Plan, S.Schedule], None] | None = None,
               write: bool = True, index: bool = True) -> ReplayReport:
    """Replay a recorded run on `ranks` processes and verify every call against the recording.

    Args:
        run_dir: the run directory (manifest.json, shards/).
        ranks: M physical processes (default: the recorded world size N); must divide N.
        backend: "emulated" (epreplay.emulate.Buffer), "deepep" (real deep_ep.Buffer), or
            "module:Class" naming any class with DeepEP's V1 Buffer API.
        device: "cpu" or "cuda". steps/layers/ops: the CLI's filters ("A:B", "0,2-3", "dispatch,combine").
        payload: "recorded" or "synthetic"; default recorded when the recording has payloads.
        call_timeout: seconds one call may take before it is reported as a hang.
        fault: an epreplay.faults fault (tests) installed in every worker.
        on_progress: called with (calls done by the slowest rank, calls scheduled).
        on_plan: called once with the plan and schedule before the workers start.
        write: write RUN/replays/<id>.json. index: load the report into RUN/index.duckdb.
    Returns:
        The ReplayReport (exit_code 0 / 1).
    Raises:
        UsageError: unusable input (no run, bad --ranks, nothing to replay, payload missing).
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
        info0 = scans[0].info
        manifest = run.read_manifest()
        run_id = manifest.run_id if manifest else info0.run_id
        experts = (manifest.num_experts if manifest and manifest.num_experts else info0.num_experts)
        hidden = (manifest.hidden if manifest and manifest.hidden else info0.hidden)
        plan = Plan.make(world, ranks, experts)
        level = min(s.info.level for s in scans.values())
        if payload is None:
            payload = "recorded" if level >= Level.PAYLOAD else "synthetic"
        elif payload == "recorded" and level < Level.PAYLOAD:
            raise UsageError(f"--payload recorded: {run.path} was captured at level "
                             f"'{Level(level).label}', which holds no payload; use --payload synthetic")
        elif payload not in ("recorded", "synthetic"):
            raise UsageError(f"--payload {payload!r}: choose recorded or synthetic")
        sched = S.build(scans, world, steps=S.parse_steps(steps), layers=S.parse_int_set(layers, "--layers"),
                        ops=S.parse_ops(ops))
        if not sched.calls:
            why = (f"{len(sched.skipped)} recorded call(s) skipped (first: {sched.skipped[0].reason})"
                   if sched.skipped else "no calls recorded" if not sched.filtered
                   else f"all {sched.filtered} calls filtered out by --steps/--layers/--ops")
            raise UsageError(f"{run.path}: nothing to replay: {why}")
        if not experts:
            raise UsageError(f"{run.path}: the recording does not say how many experts it has "
                             f"(manifest num_experts and shard headers are 0); re-record with epreplay >= 0.1")
        ll_max = _ll_max_tokens(scans, sched)
    finally:
        for s in scans.values():
            s.close()
    if on_plan is not None:
        on_plan(plan, sched)
    work = tempfile.mkdtemp(prefix="epreplay-replay-")
    try:
        job = Job(run_id, plan, sched.calls, {r: str(run.shard_path(r)) for r in range(world)}, backend,
                  payload, work, hidden, experts, tuple(sorted({c.buffer for c in sched.calls
                                                                if c.op in (Op.LL_DISPATCH, Op.LL_COMBINE)})),
                  ll_max, fault)
        pids: list[int] = []
        if joined_from_torchrun():
            hang, died, is_writer = _run_torchrun(job, device, call_timeout)
            write = write and is_writer
        else:
            hang, died = _launch(job, device, call_timeout, on_progress, pids)
        report = _collect(job, run, sched, hang, died, backend, device, time.monotonic() - t_start, pids)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if write:
        report.write(run.replays_dir)
        if index:
            _index(run, report)
    return report


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


def joined_from_torchrun() -> bool:
    """Started by torchrun (or any launcher that sets the env:// rendezvous variables) rather than
    as a single command that spawns its own processes."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")) and \
        "EPREPLAY_REPLAY_LOCAL" not in os.environ


def _run_torchrun(job: Job, device: str, call_timeout: float) -> tuple[dict | None, dict[int, str], bool]:
    """This process is one physical rank of a multi-node replay: join the env:// group, replay,
    then share every rank's findings so rank 0 writes the report. A per-call watchdog thread ends
    a hung process (exit code 1) after writing what it knows."""
    import datetime

    import torch
    import torch.distributed as dist

    from epreplay.launch import RankContext

    world = int(os.environ["WORLD_SIZE"])
    if world != job.plan.physical:
        raise UsageError(f"torchrun started {world} processes but --ranks is {job.plan.physical}; "
                         f"pass --ranks {world} or start {job.plan.physical} processes")
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=max(60.0, 4 * call_timeout)))
    rank = dist.get_rank()
    open_progress(job.work_dir, world, create=True)
    dev = f"cuda:{torch.cuda.current_device()}" if device == "cuda" else "cpu"
    stop = threading.Event()

    def watchdog() -> None:
        table = open_progress(job.work_dir, world)
        while not stop.wait(0.2):
            busy = table[rank, 0] > table[rank, 1]
            if busy and time.monotonic_ns() - table[rank, 3] > call_timeout * 1e9:
                c = job.calls[int(table[rank, 0]) - 1]
                print(f"epreplay replay: rank {rank}: call {c.index} ({c.op.label} seq {c.seq}, step "
                      f"{c.step}, layer {c.layer}) did not return within {call_timeout:g}s: hang", flush=True)
                os._exit(1)

    threading.Thread(target=watchdog, daemon=True, name="epreplay-replay-watchdog").start()
    try:
        replay_rank(RankContext(rank, world, backend, dev), job)
    finally:
        stop.set()
    work = Path(job.work_dir)
    mine = {n: (work / n).read_text() for n in (f"divergences-{rank}.jsonl", f"summary-{rank}.json")
            if (work / n).exists()}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    for files in gathered:
        for name, text in (files or {}).items():
            (work / name).write_text(text)
    return None, {}, rank == 0


def _launch(job: Job, device: str, call_timeout: float,
            on_progress: Callable[[int, int], None] | None, job_pids: list[int]) -> tuple[dict | None, dict[int, str]]:
    """Run the workers; returns (hang info or None, physical rank -> failure text). The workers'
    pids are appended to job_pids (all of them are gone when this returns)."""
    from epreplay.launch import RankFailed, run_ranks

    M, total = job.plan.physical, len(job.calls)
    progress = open_progress(job.work_dir, M, create=True)
    failure: dict[str, Any] = {}

    def target() -> None:
        try:
            # Hangs are ours to detect (per call); run_ranks' own timeout is only a backstop.
            run_ranks(replay_rank, M, job, device=device, timeout=120 + call_timeout * (total + 2),
                      pg_timeout_s=max(60.0, call_timeout * 4),
                      # the emulation's own peer timeout: later than ours, so ours names the hang
                      env={"EPREPLAY_EMULATE_TIMEOUT_S": str(call_timeout * 2 + 5),
                           "EPREPLAY_REPLAY_LOCAL": "1"})
        except RankFailed as exc:
            failure["errors"] = exc.errors
            failure["message"] = str(exc)
        except BaseException as exc:  # noqa: BLE001 - surfaced in the report
            failure["message"] = f"{type(exc).__name__}: {exc}"

    th = threading.Thread(target=target, name="epreplay-replay-launch", daemon=True)
    th.start()
    hang = None
    error_seen_at = None
    last_done = -1
    while th.is_alive():
        th.join(0.05)
        table = np.array(progress)  # snapshot
        done = int(table[:, 1].min())
        if on_progress is not None and done != last_done:
            on_progress(done, total)
            last_done = done
        now = time.monotonic_ns()
        busy = [p for p in range(M) if table[p, 0] > table[p, 1] and table[p, 2] > 0]
        stuck = [p for p in busy if now - table[p, 3] > call_timeout * 1e9]
        if busy and error_seen_at is None and _any_stopped(job.work_dir, M):
            error_seen_at = time.monotonic()
        if stuck and hang is None:
            call = int(min(table[p, 0] for p in stuck)) - 1
            hang = {"call": call, "physical": sorted(p for p in stuck if table[p, 0] - 1 == call),
                    "seconds": call_timeout}
        if hang is not None or (error_seen_at is not None and time.monotonic() - error_seen_at > ERROR_GRACE_S):
            _kill([int(table[p, 2]) for p in busy])
            th.join(30)
            break
    th.join()
    final = np.array(progress)
    if on_progress is not None:
        on_progress(int(final[:, 1].min()), total)
    job_pids.extend(int(x) for x in final[:, 2] if x > 0)
    del progress
    died = {}
    for r, text in (failure.get("errors") or {}).items():
        died[int(r)] = text
    if not died and failure.get("message"):
        died[-1] = failure["message"]
    return hang, died


def _any_stopped(work_dir: str, M: int) -> bool:
    """A worker ended early because its call raised (its summary says so)."""
    for p in range(M):
        f = Path(work_dir) / f"summary-{p}.json"
        if f.exists():
            try:
                if json.loads(f.read_text()).get("stopped"):
                    return True
            except ValueError:
                pass
    return False


def _kill(pids: list[int]) -> None:
    for pid in pids:
        if pid > 0:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _collect(job: Job, run: RunDir, sched: S.Schedule, hang: dict | None, died: dict[int, str],
             backend: str, device: str, wall_s: float, pids: list[int]) -> ReplayReport:
    work = Path(job.work_dir)
    plan = job.plan
    divs: list[dict] = []
    count, by_kind = 0, {}
    summaries = {}
    for p in range(plan.physical):
        f = work / f"divergences-{p}.jsonl"
        if f.exists():
            divs += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        sf = work / f"summary-{p}.json"
        if sf.exists():
            summaries[p] = json.loads(sf.read_text())
    for p, s in summaries.items():
        count += s["divergences"]
        for k, n in s["by_kind"].items():
            by_kind[k] = by_kind.get(k, 0) + n
    for p in range(plan.physical):  # workers that never wrote a summary: count what they flushed
        if p not in summaries:
            mine = [d for d in divs if d["physical"] == p]
            count += len(mine)
            for d in mine:
                by_kind[d["kind"]] = by_kind.get(d["kind"], 0) + 1
    stopped = next((s["stopped"] for s in summaries.values() if s.get("stopped")), None)
    extra: list[Divergence] = []
    if hang is not None:
        c = job.calls[hang["call"]]
        for p in hang["physical"]:
            v = plan.virtual_of(p)[0]
            extra.append(Divergence(c.index, c.buffer, c.seq, c.step, c.layer, c.op.label, v, p, "hang",
                                    f"completes within {hang['seconds']:g}s",
                                    f"still running after {hang['seconds']:g}s on physical ranks "
                                    f"{hang['physical']}", detail="the call did not return; workers killed"))
        stopped = stopped or f"call {c.index} ({c.op.label} seq {c.seq}) hung; replay ended"
    elif died and not stopped:
        p, text = min(died.items())
        tail = text.strip().splitlines()[-1] if text.strip() else "process died"
        done = [s["done"] for s in summaries.values()]
        idx = min(done) if done else 0
        c = job.calls[min(idx, len(job.calls) - 1)]
        v = plan.virtual_of(max(p, 0))[0]
        extra.append(Divergence(c.index, c.buffer, c.seq, c.step, c.layer, c.op.label, v, max(p, 0), "error",
                                "the replay process completes", tail[:500], detail="a replay process failed"))
        stopped = f"physical rank {p} failed: {tail[:200]}"
    for d in extra:
        divs.append(d.to_dict())
        count += 1
        by_kind[d.kind] = by_kind.get(d.kind, 0) + 1
    divs.sort(key=lambda d: (d["call"], d["rank"]))
    done = min((s["done"] for s in summaries.values()), default=0) if len(summaries) == plan.physical else (
        hang["call"] if hang else min((s["done"] for s in summaries.values()), default=0))
    ops = _op_stats(job, summaries, sched)
    calls_by_op: dict[str, int] = {}
    for c in job.calls[:done]:
        calls_by_op[c.op.label] = calls_by_op.get(c.op.label, 0) + 1
    return ReplayReport(
        id=new_run_id(), run=str(run.path), run_id=job.run_id,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), plan=plan.to_dict(),
        backend=backend, device=device, payload=job.payload, calls=done, scheduled=len(job.calls),
        calls_by_op=calls_by_op, divergences=count, by_kind=by_kind, first_divergence=first_of(divs),
        divergence_list=divs[:1000], skipped=[s.__dict__ for s in sched.skipped], filtered=sched.filtered,
        ops=ops, stopped=stopped, wall_s=round(wall_s, 3), worker_pids=pids,
        shard_problems={str(k): v for k, v in sched.shard_problems.items()})


def _op_stats(job: Job, summaries: dict[int, dict], sched: S.Schedule) -> dict[str, dict]:
    out = {}
    recorded: dict[str, list[int]] = {}
    for c in job.calls:
        if c.duration_ns >= 0:
            recorded.setdefault(c.op.label, []).append(c.duration_ns)
    ops = set().union(*(s["calls"].keys() for s in summaries.values())) if summaries else set()
    for op in sorted(ops):
        vals = [s for s in summaries.values() if op in s["calls"]]
        rec = recorded.get(op)
        out[op] = OpStats(
            calls=max(s["calls"][op] for s in vals), tokens=sum(s["tokens"][op] for s in vals),
            bytes=sum(s["bytes"][op] for s in vals),
            backend_s=max(s["backend_ns"][op] for s in vals) / 1e9,
            total_s=max(s["total_ns"][op] for s in vals) / 1e9,
            recorded_mean_us=(sum(rec) / len(rec) / 1e3) if rec else -1.0).to_dict()
    return out


def _index(run: RunDir, report: ReplayReport) -> None:
    """Load the report into RUN/index.duckdb through INDEX's API when it exists."""
    try:
        from epreplay import index as idx
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
