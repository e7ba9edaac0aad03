"""Start and watch the replay processes: locally (epreplay.launch.run_ranks) or joined from torchrun.

Local: the parent never blocks on a collective. Workers run under run_ranks in a background
thread while the parent polls their progress table (see worker.py). A call that stays unfinished
longer than `call_timeout` on any rank is a hang: the parent kills the workers (run_ranks then
reaps every child) and returns which call hung. After one worker stops on an error, peers blocked
in the same collective are killed after a short grace.

torchrun (multi-node): this process is one physical rank; a watchdog thread ends it on a hang.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from epreplay.errors import UsageError
from epreplay.replay.worker import Job, open_progress, replay_rank

# After one rank stops with an error, peers blocked in the same collective can never finish;
# give them this long to report on their own before they are killed.
ERROR_GRACE_S = 2.0


def joined_from_torchrun() -> bool:
    """Started by torchrun (or any launcher that sets the env:// rendezvous variables) rather than
    as a single command that spawns its own processes."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")) and \
        "EPREPLAY_REPLAY_LOCAL" not in os.environ


def run_torchrun(job: Job, device: str, call_timeout: float) -> tuple[dict | None, dict[int, str], bool]:
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


def launch_local(job: Job, device: str, call_timeout: float,
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


