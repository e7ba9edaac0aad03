"""One replay process (physical rank): replays its virtual ranks' calls in recorded order.

Legend: N virtual ranks, M physical ranks, B = N / M, E experts, H hidden.

The parent watches two things a worker writes as it goes, so that a hang or a crash still leaves
an answer behind: a shared progress table (an mmap'ed [M, 4] int64 array: calls started, calls
done, pid, monotonic start time of the current call) and a per-rank JSON-lines file of
divergences. A summary (calls and time per op) is written when the worker finishes.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from epreplay.index.rows import Divergence
from epreplay.replay.plan import Plan
from epreplay.replay.schedule import Call

PROGRESS_COLS = 4  # started, done, pid, start_ns of the current call (CLOCK_MONOTONIC)
MAX_DIVERGENCES_PER_RANK = 200  # details kept per process; every divergence is still counted


@dataclass(frozen=True)
class Job:
    """Everything a worker needs (pickled to each process).

    Attributes:
        run_id: the recording's run id (keys the synthetic payload).
        plan: the rank folding. calls: the schedule. shard_paths: virtual rank -> shard path.
        backend: "emulated" or "deepep". payload: "recorded" or "synthetic".
        work_dir: where progress, divergences and summaries go.
        hidden, experts: H and E of the recording.
        ll_buffers: buffer ids that issue low-latency calls (built in low-latency mode).
        ll_max_tokens: buffer id -> recorded num_max_dispatch_tokens_per_rank (M per rank).
        fault: an epreplay.emulate.faults spec to install (tests only), or None.
        elastic_buffers: buffer ids whose records are DeepEP V2's (header variant ELASTIC): they
            replay through an ElasticBuffer (replay/elastic.py).
    """

    run_id: str
    plan: Plan
    calls: list[Call]
    shard_paths: dict[int, str]
    backend: str
    payload: str
    work_dir: str
    hidden: int
    experts: int
    ll_buffers: tuple[int, ...] = ()
    ll_max_tokens: dict[int, int] = field(default_factory=dict)
    fault: Any = None
    elastic_buffers: tuple[int, ...] = ()  # buffer ids recorded from a DeepEP V2 ElasticBuffer


def progress_path(work_dir: str | Path) -> Path:
    return Path(work_dir) / "progress.bin"


def open_progress(work_dir: str | Path, physical: int, create: bool = False) -> np.memmap:
    path = progress_path(work_dir)
    if create:
        np.zeros((physical, PROGRESS_COLS), dtype=np.int64).tofile(path)
    return np.memmap(path, dtype=np.int64, mode="r+", shape=(physical, PROGRESS_COLS))


class Sink:
    """Collects a worker's divergences (file-backed) and per-op timings."""

    def __init__(self, work_dir: str, p: int) -> None:
        self.p = p
        self.div_path = Path(work_dir) / f"divergences-{p}.jsonl"
        self.summary_path = Path(work_dir) / f"summary-{p}.json"
        self.count = 0
        self.by_kind: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.backend_ns: dict[str, int] = {}
        self.total_ns: dict[str, int] = {}
        self.tokens: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        self._fh = open(self.div_path, "a", encoding="utf-8")

    def add(self, div: Divergence) -> None:
        self.count += 1
        self.by_kind[div.kind] = self.by_kind.get(div.kind, 0) + 1
        if self.count <= MAX_DIVERGENCES_PER_RANK:
            self._fh.write(json.dumps(div.to_dict()) + "\n")
            self._fh.flush()  # a hang later must not lose what was found before it

    def timed(self, op: str, backend_ns: int, total_ns: int, tokens: int, nbytes: int) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1
        self.backend_ns[op] = self.backend_ns.get(op, 0) + backend_ns
        self.total_ns[op] = self.total_ns.get(op, 0) + total_ns
        self.tokens[op] = self.tokens.get(op, 0) + tokens
        self.bytes[op] = self.bytes.get(op, 0) + nbytes

    def finish(self, done: int, stopped: str | None) -> dict:
        import resource

        self._fh.close()
        summary = {"physical": self.p, "done": done, "stopped": stopped, "divergences": self.count,
                   "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   "by_kind": self.by_kind, "calls": self.calls, "backend_ns": self.backend_ns,
                   "total_ns": self.total_ns, "tokens": self.tokens, "bytes": self.bytes}
        tmp = self.summary_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary))
        os.replace(tmp, self.summary_path)
        return summary


def make_buffer(backend: str, *, low_latency: bool, max_tokens: int, hidden: int, world: int,
                experts: int, device: str) -> Any:
    """A Buffer over the whole replay group: epreplay's emulation or the real deep_ep.Buffer."""
    import torch.distributed as dist

    group = dist.group.WORLD
    if ":" in backend:  # "module:Class": any class with DeepEP's V1 Buffer API (library use)
        import importlib

        mod, _, name = backend.partition(":")
        return getattr(importlib.import_module(mod), name)(group, low_latency_mode=low_latency)
    if backend == "emulated":
        from epreplay.emulate import Buffer

        return Buffer(group, low_latency_mode=low_latency)
    import deep_ep

    # 1 GB of NVLink buffer is DeepEP's own test default for normal kernels; the low-latency
    # RDMA size comes from its hint for the folded shapes (M per physical rank is B x recorded M).
    rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(max_tokens, hidden, world, experts) if low_latency else 0
    return deep_ep.Buffer(group, int(1e9), rdma, low_latency_mode=low_latency,
                          num_qps_per_rank=max(1, experts // world) if low_latency else 1)


def replay_rank(ctx: Any, job: Job) -> dict:
    """run_ranks entry point: replay every scheduled call on this physical rank."""
    import torch

    from epreplay.replay.ops import Engine

    p = ctx.rank
    progress = open_progress(job.work_dir, job.plan.physical)
    progress[p, 2] = os.getpid()
    sink = Sink(job.work_dir, p)
    engine = Engine(job, p, ctx.device, sink)
    if job.fault is not None:
        from epreplay.emulate import faults

        job.fault.install() if hasattr(job.fault, "install") else faults.install(job.fault)
    done, stopped = 0, None
    try:
        try:
            engine.warm_up()
        except Exception as exc:  # noqa: BLE001 - e.g. the backend cannot build a Buffer here
            call = job.calls[0]
            text = f"{type(exc).__name__}: {exc}".strip()
            for v in job.plan.virtual_of(p):
                sink.add(Divergence(call.index, call.buffer, call.seq, call.step, call.layer, call.op.label,
                                    v, p, "error", "a Buffer can be created", text[:500],
                                    detail="creating the backend's Buffer failed"))
            return sink.finish(0, f"physical rank {p}: Buffer creation failed: {text[:200]}")
        for call in job.calls:
            progress[p, 3] = time.monotonic_ns()
            progress[p, 0] = call.index + 1
            try:
                engine.run(call)
            except Exception as exc:  # noqa: BLE001 - a replayed call that raises is a finding
                text = f"{type(exc).__name__}: {exc}".strip()
                # DeepEP (and the emulation) turn a peer that never arrives into a "timeout" error
                kind = "hang" if "timeout" in text.lower() else "error"
                for v in job.plan.virtual_of(p):
                    sink.add(Divergence(call.index, call.buffer, call.seq, call.step, call.layer,
                                        call.op.label, v, p, kind, "the call completes",
                                        text[:500], detail="the replayed call raised"))
                stopped = f"call {call.index} raised on physical rank {p}: {text[:200]}"
                break  # the other ranks may now be blocked in this collective: stop, parent reaps
            done = call.index + 1
            progress[p, 1] = done
        torch.cuda.synchronize() if ctx.device.startswith("cuda") else None
    finally:
        progress.flush()
        engine.close()
    return sink.finish(done, stopped)
