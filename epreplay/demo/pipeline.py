"""`epreplay demo` as a pipeline: run (and record) -> index -> replay on half the ranks -> next steps.

Each step is skipped with a one-line note when the part it needs is not installed (capture,
index, replay, tui are built in parallel and are optional at run time), so the demo always does
as much of the main job as exists. Capture, index and replay are reached by module name, lazily,
from this command-level module: the workload itself (demo_model, demo_run) imports none of them.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from epreplay.demo.model import DemoConfig, release_layers
from epreplay.demo.run import DemoResult, RankHooks, run_demo


def available(module: str) -> bool:
    """Whether `module` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@dataclass
class StepOutcome:
    """One pipeline step: name, status ("ok", "skipped", "failed", "diverged", "incomplete": the
    replay skipped recorded calls), a short note."""

    name: str
    status: str
    note: str = ""
    seconds: float = 0.0


@dataclass
class PipelineResult:
    """What the demo did. `demo` is None when the workload itself did not run."""

    out: Path | None
    steps: list[StepOutcome] = field(default_factory=list)
    demo: DemoResult | None = None
    replay: Any = None  # epreplay.replay's ReplayReport when the replay ran

    @property
    def exit_code(self) -> int:
        if any(s.status == "failed" for s in self.steps):
            return 1
        if any(s.status == "diverged" for s in self.steps):
            return 1
        return 3 if any(s.status == "incomplete" for s in self.steps) else 0  # replay's exit 3


@dataclass(frozen=True)
class PipelineOptions:
    """How far the demo goes.

    Attributes:
        out: run directory to create (None: no recording).
        level: capture level (counts | routing | fingerprints | payload).
        record / index / replay: run those steps when their part exists.
        replay_ranks: processes for the replay (default: half the ranks, at least 1).
        backend: Buffer backend of the workload ("emulated" or "deepep").
        deepep: the DeepEP API the workload uses, "v1" (Buffer) or "v2" (ElasticBuffer).
        timeout: seconds for the workload's process group.
    """

    out: Path | None
    level: str = "routing"
    record: bool = True
    index: bool = True
    replay: bool = True
    replay_ranks: int | None = None
    backend: str = "emulated"
    timeout: float = 300.0
    deepep: str = "v1"  # DeepEP API of the workload: "v1" (Buffer) or "v2" (ElasticBuffer)


Progress = Callable[[str, int, int], None]  # (phase, done, total)


def _record_env(cfg: DemoConfig, opts: PipelineOptions) -> tuple[dict[str, str], RankHooks]:
    capture = importlib.import_module("epreplay.capture")
    # `python -m epreplay` leaves .../__main__.py in argv[0]; the command a person reruns is epreplay.
    prog = os.path.basename(sys.argv[0])
    command = ["epreplay" if prog in ("", "__main__.py", "-c") else prog, *sys.argv[1:]]
    env = capture.env_for(opts.out, level=opts.level, release=str(cfg.release), fresh=True,
                          layers_per_step=cfg.layers, command=command)
    return env, RankHooks(start="epreplay.capture:install", stop="epreplay.capture:stop")


def _close_recording(out: Path, cfg: DemoConfig, backend: str, *, interrupted: bool = False,
                     deepep: str = "v1") -> str:
    """The run's last merge (capture's `finish`: every rank's closing facts, and what the shard
    headers say of ranks that never closed, e.g. after a Ctrl-C), then the workload's parameters
    in manifest.extra["demo"] (diff and tui show them). Returns capture's health in a few words
    (records, drops, ranks whose capture went off)."""
    from epreplay.format.run import RunDir

    finish = importlib.import_module("epreplay.capture.manifest").finish
    run = RunDir.open(out)
    manifest = finish(run, interrupted=interrupted)
    if manifest is None:
        return "no manifest was written"
    extra = dict(manifest.extra)
    extra["demo"] = {**asdict(cfg), "release_layers": sorted(release_layers(cfg.release, cfg.layers)),
                     "backend": backend, "deepep": deepep}
    run.write_manifest(replace(manifest, extra=extra))
    records = sum(int(f.get("records", 0)) for f in manifest.ranks.values())
    health = f"{records} records from {len(manifest.ranks)} ranks, {extra.get('dropped', 0)} dropped"
    off = extra.get("disabled_ranks") or []
    return health + (f", capture off on ranks {off}" if off else "")


def _index(out: Path) -> str:
    """Build RUN/index.duckdb with the index module's API; returns a note."""
    index = importlib.import_module("epreplay.index.build")
    # One worker: a demo run has a few small shards; a process pool would cost more than it saves.
    res = index.build_index(out, progress=False, workers=1)
    note = f"{res.path} ({res.records} records, {res.routings} token-layer routings)"
    for problem in res.problems:
        note += f"; warning: {problem}"
    return note


def run_pipeline(cfg: DemoConfig, opts: PipelineOptions, *, progress: Progress | None = None
                 ) -> PipelineResult:
    """Run every step whose part exists; see the module docstring."""
    result = PipelineResult(out=None)
    recording = (opts.record and opts.out is not None and available("epreplay.capture"))
    env: dict[str, str] | None = None
    hooks: RankHooks | None = None
    if recording:
        env, hooks = _record_env(cfg, opts)
        result.out = opts.out
    t0 = time.perf_counter()
    on_progress = (lambda done, total: progress("run", done, total)) if progress else None
    try:
        result.demo = run_demo(cfg, backend=opts.backend, rank_hooks=hooks, env=env,
                               timeout=opts.timeout, on_progress=on_progress, deepep=opts.deepep)
    except BaseException as exc:  # Ctrl-C or a failed rank: the manifest still says what is there
        if recording:
            try:
                _close_recording(opts.out, cfg, opts.backend,
                                 interrupted=isinstance(exc, KeyboardInterrupt), deepep=opts.deepep)
            except Exception:  # noqa: BLE001 - the error to report is exc; repair can rebuild
                pass
        raise
    seconds = time.perf_counter() - t0
    if recording:
        health = _close_recording(opts.out, cfg, opts.backend, deepep=opts.deepep)
        note = f"recorded at level {opts.level} into {opts.out} ({health})"
    else:
        note = ("not recorded: epreplay.capture is not installed" if opts.record
                else "not recorded (--no-record)")
    result.steps.append(StepOutcome("run", "ok", note, seconds))
    if not recording:
        for name in ("index", "replay"):
            result.steps.append(StepOutcome(name, "skipped", "nothing recorded"))
        return result

    indexed = False
    t0 = time.perf_counter()
    if not opts.index:
        result.steps.append(StepOutcome("index", "skipped", "--no-index"))
    elif not available("epreplay.index.build"):
        result.steps.append(StepOutcome("index", "skipped", "epreplay index is not installed yet"))
    else:
        try:
            note = _index(opts.out)
            indexed = True
            result.steps.append(StepOutcome("index", "ok", note, time.perf_counter() - t0))
        except Exception as exc:  # noqa: BLE001 - a later step may still work; say what failed
            result.steps.append(StepOutcome("index", "failed", f"{type(exc).__name__}: {exc}",
                                            time.perf_counter() - t0))

    t0 = time.perf_counter()
    if not opts.replay:
        result.steps.append(StepOutcome("replay", "skipped", "--no-replay"))
    elif opts.level.strip().lower() == "counts":
        result.steps.append(StepOutcome("replay", "skipped",
                                        "level counts records no routing to replay; use --level routing"))
    elif not available("epreplay.replay.driver"):
        result.steps.append(StepOutcome("replay", "skipped", "epreplay replay is not installed yet"))
    else:
        ranks = opts.replay_ranks or max(1, cfg.ranks // 2)
        from epreplay.replay import replay_run

        on_rp = (lambda done, total: progress("replay", done, total)) if progress else None
        try:
            report = replay_run(opts.out, ranks, device=cfg.device, on_progress=on_rp,
                                index=indexed)
            result.replay = report
            status = {0: "ok", 3: "incomplete"}.get(report.exit_code, "diverged")
            result.steps.append(StepOutcome("replay", status, report.verdict, time.perf_counter() - t0))
        except Exception as exc:  # noqa: BLE001
            result.steps.append(StepOutcome("replay", "failed", f"{type(exc).__name__}: {exc}",
                                            time.perf_counter() - t0))
    return result
