"""Run a function on N local processes joined by torch.distributed (gloo on CPU, NCCL on GPU).

Used by the demo, the replayer, the benchmarks and the tests. Children come from a forkserver
that has imported torch once, so starting 8 ranks costs a fork each rather than 8 torch imports,
and no child inherits the parent's threads (forking a process that already ran torch ops can
deadlock in its thread pools).

Every failure ends the whole group: the first child that raises, or the timeout, terminates the
others, so a test or a replay never leaves processes behind.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

# Seconds a rank that returned its result may take to exit (capture's close runs in its exit path).
EXIT_GRACE_S = 60.0


class RankFailed(RuntimeError):
    """One or more ranks raised, or the group timed out. `errors` maps rank -> traceback text."""

    def __init__(self, message: str, errors: dict[int, str]):
        super().__init__(message)
        self.errors = errors


@dataclass(frozen=True)
class RankContext:
    """What a rank function gets as its first argument."""

    rank: int
    world_size: int
    backend: str
    device: str  # "cpu" or "cuda:<local rank>"


def check_device(device: str, *, option: str | None = None) -> None:
    """Raise UsageError, in the parent and before any process starts, when `device` cannot be
    used here: otherwise every child fails on its own (torch.cuda.device_count() is 0 without
    CUDA, so picking GPU `rank % count` divides by zero) and the caller sees N tracebacks.

    Args:
        device: "cpu" or "cuda". option: the command-line option that gave it ("--device"),
            named in the message instead of the keyword argument.
    """
    from epreplay.errors import UsageError

    def name(value: str) -> str:
        return f"{option} {value}" if option else f"device={value!r}"

    if device == "cpu":
        return
    if device != "cuda":
        raise UsageError(f"{name(device)}: choose {name('cpu')} or {name('cuda')}")
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise UsageError(f"{name('cuda')}: torch {torch.__version__} ({build}) sees no CUDA device "
                         f"on this machine; use {name('cpu')}, or run on a GPU machine")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context() -> mp.context.BaseContext:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed"])
    return ctx


def _child(fn: Callable[..., Any], rank: int, world_size: int, port: int, backend: str,
           device: str, pg_timeout_s: float, args: tuple, env: dict[str, str], results: Any) -> None:
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks share 2 cores; intra-op threads only add contention
    dev = device
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        dev = f"cuda:{torch.cuda.current_device()}"
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        out = fn(RankContext(rank, world_size, backend, dev), *args)
        results.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - reported to the parent, which re-raises
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
              backend: str | None = None, device: str = "cpu", pg_timeout_s: float = 60.0,
              env: dict[str, str] | None = None, wait_all: bool = False) -> list[Any]:
    """Run `fn(RankContext, *args)` on `world_size` processes; return the results by rank.

    Args:
        fn: a module-level (picklable) function.
        world_size: number of processes, >= 1.
        timeout: seconds for the whole group; past it every child is killed and RankFailed raised.
        backend: torch.distributed backend; default gloo on CPU, nccl on CUDA.
        device: "cpu" or "cuda" (rank r uses GPU r % device_count); checked before any process
            starts (see check_device).
        pg_timeout_s: the process group's own collective timeout.
        env: extra environment variables for the children.
        wait_all: keep waiting for every rank after one fails (to check that an error is raised
            on every rank); by default the first failure ends the group.

    Raises:
        RankFailed: a rank raised (its traceback is in the message) or the group timed out.
        UsageError: `device` cannot be used on this machine (CUDA asked for, none available).
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: need at least one rank")
    check_device(device)
    backend = backend or ("nccl" if device == "cuda" else "gloo")
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, daemon=True, args=(fn, r, world_size, port, backend, device,
                                                           pg_timeout_s, args, env or {}, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if wait_all and errors:
                    break
                missing = sorted(set(range(world_size)) - outputs.keys() - errors.keys())
                raise RankFailed(f"ranks {missing} did not finish within {timeout:.0f}s", errors)
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if not p.is_alive() and r not in outputs and r not in errors]
                # A child that died without reporting (killed, segfault) cannot answer any more.
                for r in dead:
                    if procs[r].exitcode not in (0, None):
                        errors[r] = f"rank {r} died with exit code {procs[r].exitcode}"
                if errors and dead and not wait_all:
                    break
                continue
            if ok:
                outputs[rank] = payload
            else:
                errors[rank] = payload
                if not wait_all:
                    break  # one failure fails the group; the others may be blocked on it
        if errors:
            first = min(errors)
            raise RankFailed(f"rank {first} failed:\n{errors[first]}", errors)
        return [outputs[r] for r in range(world_size)]
    finally:
        # Ranks that all answered are only exiting (closing a capture can take seconds): give
        # them time; after a failure the others may be stuck on the dead one, so end them soon.
        _reap(procs, grace_s=EXIT_GRACE_S if len(outputs) == world_size else 3.0)


def _reap(procs: Sequence[mp.process.BaseProcess], grace_s: float = 3.0) -> None:
    """Join children; terminate, then kill, whatever is still running."""
    end = time.monotonic() + grace_s
    for p in procs:
        p.join(timeout=max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=1.0)
        if p.is_alive():
            p.kill()
            p.join(timeout=1.0)
