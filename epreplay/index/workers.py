"""Indexing a run's shards in worker processes (epreplay.index.shard per shard), with a progress bar.

Returns the per-shard results in rank order for epreplay.index.build to merge.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _work(task: tuple[str, int, int, int, int, int, int]):
    from epreplay.index.shard import index_shard

    path, start, expect_end, E, R, H, lps = task
    res = index_shard(path, start, num_experts=E, world_size=R, hidden=H, expect_end=expect_end,
                      derived_layers_per_step=lps)
    if res.load_PE is not None:  # halve what crosses the pipe; per-rank counts fit easily
        res.load_PE = res.load_PE.astype(np.int32)
    return res


def run_workers(tasks: list[tuple[Path, int, int]], facts: dict, progress: bool,
                 workers: int | None) -> list:
    """Index the tasks' shards, in parallel processes when there is enough to do."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    args = [(str(p), s, e, facts["num_experts"], facts["world_size"], facts["hidden"],
             facts.get("layers_per_step", 0)) for p, s, e in tasks]
    sizes = [max(p.stat().st_size, 1) for p, _, _ in tasks]
    total = sum(sizes)
    n = worker_count(tasks, workers)
    bar = _Progress(progress, total, f"indexing {len(tasks)} shard(s)")
    out = []
    try:
        if n == 1:
            for a, size in zip(args, sizes):
                out.append(_work(a))
                bar.advance(size)
        else:
            order = sorted(range(len(args)), key=lambda i: -sizes[i])  # big first: even finish
            with ProcessPoolExecutor(n, mp_context=get_context("fork")) as pool:
                futs = {pool.submit(_work, args[i]): i for i in order}
                for fut in as_completed(futs):
                    out.append(fut.result())
                    bar.advance(sizes[futs[fut]])
    finally:
        bar.close()
    return sorted(out, key=lambda r: r.rank)


def worker_count(tasks: list[tuple[Path, int, int]], workers: int | None) -> int:
    """Processes `run_workers` uses for `tasks`: `workers` (default: the CPUs, at most 8), at
    most one per task, and 1 (this process) below ~16 MiB, where start-up costs more than it saves."""
    n = workers if workers is not None else min(_cpus(), 8)
    total = sum(max(p.stat().st_size, 1) for p, _, _ in tasks)
    return max(1, min(n, len(tasks))) if total > (16 << 20) else 1


def _cpus() -> int:
    """CPUs this process may run on (taskset / cgroup affinity), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class _Progress:
    """A rich progress bar on stderr (bytes of shards indexed); silent when disabled."""

    def __init__(self, enabled: bool, total: int, what: str) -> None:
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(what, total=total)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
