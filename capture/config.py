"""Capture options: one frozen dataclass, validated once, carried to child processes by env vars.

`epreplay record` and `env_for()` turn a CaptureConfig into environment variables; every Python
process that later creates a Buffer rebuilds the same CaptureConfig from its environment
(`CaptureConfig.from_env`). Nothing here imports torch.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Mapping

from epreplay.errors import UsageError
from epreplay.format.records import Level

ENV_PREFIX = "EPREPLAY_CAPTURE_"
ENV_DIR = ENV_PREFIX + "DIR"  # the run directory; its presence turns autostart on
ENV_RUN_ID = ENV_PREFIX + "RUN_ID"

# Queue bound: 4096 calls is ~40 steps of a 61-layer model x (layout, dispatch, combine) — the
# writer is seconds behind before anything drops. The byte bound is the capture ring's size
# (ring_path.py), memory the ring holds for the whole session (pages populated at its start, and
# on a GPU as much device memory for the staging ring): 64 MiB holds ~1 s of decode routing
# (20-60 KiB a call at ~3500 calls/s) or a third of a 4096-token prefill step, while the writer
# process drains ~600 MB/s; it is populated in ~20 ms once per writer process.
DEFAULT_QUEUE_RECORDS = 4096
DEFAULT_QUEUE_BYTES = 64 << 20
# Flight ring: 512 MiB holds 10 steps of routing for a large prefill batch on every layer.
DEFAULT_RING_BYTES = 512 << 20
# CUDA-graph rings (graph_arena.py), device memory reserved as graphs are captured and kept for
# the process: 512 MiB holds the sites of ~8 DeepSeek-V3 decode graphs (61 layers) at 144 ranks.
DEFAULT_GRAPH_RING_BYTES = 512 << 20
# DeepEP's own CPU spin gives up after 100 s; a watchdog at 120 s still sees the calls that hang
# on the GPU without ever raising. Tests and users set it lower.
DEFAULT_HANG_TIMEOUT = 120.0


@dataclass(frozen=True)
class CaptureConfig:
    """What to capture and where.

    Attributes:
        run_dir: the run directory (RUN/); shards go to RUN/shards/rank-NNNNN.eprs.
        level: counts < routing (default) < fingerprints < payload (records.py lists the arrays).
        flight_steps: 0 streams every record to the shard; N > 0 keeps only the last N steps per
            rank in memory and writes them on a trigger (flight mode).
        hang_timeout: seconds a hooked call may run before the watchdog calls it hung (0: off).
        layers_per_step: MoE layers per model step, for step counting when the framework does
            not mark steps (0: the step stays 0 unless marked; layers count up).
        payload_every: at `payload` level, keep the payload of every k-th step only (others are
            recorded at `fingerprints`).
        queue_records / queue_bytes: bounds of the writer queue; beyond them calls are dropped
            and counted, never waited for.
        ring_bytes: bound of the flight ring.
        graph_ring_bytes: bound of the device memory for calls captured in CUDA graphs (their
            rings); sites beyond it are skipped and counted (facts "graph_skipped").
        run_id: the run's id (shard headers carry it); empty: read from the manifest.
        release: free-form release tag for the manifest.
        writer: "process" (default) or "thread": where records are hashed, encoded and written.
        hot_path: "auto" (default), "compiled", "ring" or "courier": how a hooked call reaches the
            writer (auto: the compiled hook where it is built and the calls are on the host).
        node: the node this process runs on (capture.job.node_of; -1 unknown): the launcher's
            node rank, replaced by the rank's own GROUP_RANK when torchrun gives one.
    """

    run_dir: str
    level: Level = Level.ROUTING
    flight_steps: int = 0
    hang_timeout: float = DEFAULT_HANG_TIMEOUT
    layers_per_step: int = 0
    payload_every: int = 1
    queue_records: int = DEFAULT_QUEUE_RECORDS
    queue_bytes: int = DEFAULT_QUEUE_BYTES
    ring_bytes: int = DEFAULT_RING_BYTES
    graph_ring_bytes: int = DEFAULT_GRAPH_RING_BYTES
    run_id: str = ""
    release: str = ""
    # "process": hashing, encoding and writes run in a helper process (writer_proc.py), so they
    # never hold the job's GIL; "thread": in the job's process (one fewer process, more overhead).
    writer: str = "process"
    # "auto": host tensors go through the shared capture ring (ring_path.py: no per-record Python
    # in the job), CUDA tensors through side-stream staging and a courier thread; "ring" or
    # "courier" forces one (the courier path is the reference the ring path is tested against);
    # "compiled" (what "auto" picks for host calls where capture/_hookx.cpp is built): the ring,
    # written by the compiled hook for every call site it learned (fast_plan.py); "ring": the
    # Python hook only.
    hot_path: str = "auto"
    node: int = -1

    def __post_init__(self) -> None:
        if self.hot_path not in ("auto", "compiled", "ring", "courier"):
            raise UsageError(f"hot_path={self.hot_path!r}: must be 'auto', 'compiled', 'ring' or 'courier'")
        if self.writer not in ("process", "thread"):
            raise UsageError(f"writer={self.writer!r}: must be 'process' or 'thread'")
        if not self.run_dir:
            raise UsageError("capture needs a run directory; pass --out RUN")
        if self.flight_steps < 0:
            raise UsageError(f"--flight {self.flight_steps}: must be >= 0 (0 streams everything)")
        if self.hang_timeout < 0:
            raise UsageError(f"--hang-timeout {self.hang_timeout}: must be >= 0 seconds (0 turns the watchdog off)")
        if self.layers_per_step < 0:
            raise UsageError(f"--layers-per-step {self.layers_per_step}: must be >= 0")
        if self.payload_every < 1:
            raise UsageError(f"--payload-every {self.payload_every}: must be >= 1 (1 keeps every step)")
        if min(self.queue_records, self.queue_bytes, self.ring_bytes, self.graph_ring_bytes) < 1:
            raise UsageError(f"capture bounds must be positive (queue_records={self.queue_records}, "
                             f"queue_bytes={self.queue_bytes}, ring_bytes={self.ring_bytes}, "
                             f"graph_ring_bytes={self.graph_ring_bytes})")

    @classmethod
    def make(cls, run_dir: str | os.PathLike[str], *, level: str | Level = Level.ROUTING,
             **options: object) -> "CaptureConfig":
        """Build from user-facing values (level by name), raising UsageError for bad ones."""
        if isinstance(level, str):
            try:
                level = Level.parse(level)
            except ValueError as exc:
                raise UsageError(f"--level: {exc}") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UsageError(f"unknown capture option(s) {unknown}; known: {sorted(known - {'run_dir'})}")
        return cls(run_dir=str(Path(run_dir).absolute()), level=Level(level), **options)  # type: ignore[arg-type]

    @property
    def flight(self) -> bool:
        return self.flight_steps > 0

    def with_run_id(self, run_id: str) -> "CaptureConfig":
        return replace(self, run_id=run_id)

    def to_env(self) -> dict[str, str]:
        """The environment variables that carry this config to child processes."""
        env = {ENV_DIR: self.run_dir, ENV_RUN_ID: self.run_id}
        body = asdict(self)
        body.pop("run_dir")
        body.pop("run_id")
        body["level"] = self.level.label
        env[ENV_PREFIX + "OPTIONS"] = json.dumps(body, sort_keys=True)
        return env

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "CaptureConfig | None":
        """The config in the environment, or None when capture is not requested there."""
        environ = os.environ if environ is None else environ
        run_dir = environ.get(ENV_DIR)
        if not run_dir:
            return None
        options = json.loads(environ.get(ENV_PREFIX + "OPTIONS") or "{}")
        level = options.pop("level", "routing")
        return cls.make(run_dir, level=level, run_id=environ.get(ENV_RUN_ID, ""), **options)
