"""Capture's lifecycle in a process: which recorder is active, start/stop, env_for.

A process captures when it has a CaptureConfig — from `start()` (library use) or from the
environment (`epreplay record`, `env_for()`) — and a hooked Buffer is created or called. The
recorder is created then (lazily), because only then are the rank and world size known: from
torch.distributed when it is initialised, else the Buffer's group, else RANK/WORLD_SIZE.
A forked child never inherits its parent's recorder (it gets its own, for its own rank). The
recorder closes at exit: atexit for ordinary processes, a multiprocessing finalizer for
multiprocessing children (which leave through os._exit and skip atexit).
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from epreplay.capture.config import CaptureConfig
from epreplay.format.run import RunDir

_lock = threading.RLock()
_config: CaptureConfig | None = None  # from start(); None: look in the environment
_recorder: Any = None  # the active Recorder of this process
_watchdog: Any = None
_off_pid: int | None = None  # this pid has no capture (no config, or it failed to start)
_installed_by_start = False
_exit_hooks_pid: int | None = None


def _after_fork_in_child() -> None:
    global _recorder, _watchdog, _off_pid, _exit_hooks_pid
    _recorder = _watchdog = None
    _off_pid = _exit_hooks_pid = None
    from epreplay.capture import fast_plan

    if fast_plan._module:  # the parent's compiled-hook session is not this process's
        fast_plan._module.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def recorder(buffer: Any = None) -> Any:
    """The active Recorder of this process, created on first need; None when not capturing."""
    rec = _recorder
    if rec is not None:
        return rec
    if _off_pid == os.getpid():
        return None
    return _create(buffer)


def _rank_world(buffer: Any) -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # noqa: BLE001 - a broken dist install must not stop the job
        pass
    group = getattr(buffer, "group", None)
    if group is not None:
        try:
            return int(group.rank()), int(group.size())
        except Exception:  # noqa: BLE001
            pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _create(buffer: Any) -> Any:
    global _recorder, _watchdog, _off_pid, _exit_hooks_pid
    with _lock:
        if _recorder is not None:
            return _recorder
        try:
            config = _config or CaptureConfig.from_env()
        except Exception as exc:  # noqa: BLE001 - bad env: say so once, run uncaptured
            print(f"epreplay capture: capture off: bad capture environment: {exc}", file=sys.stderr)
            config = None
        if config is None:
            _off_pid = os.getpid()
            return None
        from epreplay.capture.manifest import prepare_run
        from epreplay.capture.recorder import Recorder
        from epreplay.capture.triggers import Watchdog

        rank, world = _rank_world(buffer)
        try:
            from epreplay.capture.job import node_of

            config = replace(config, node=node_of(os.environ, config.node))
            if not config.run_id:
                config = prepare_run(config, world_size=world)
            else:
                RunDir.create(config.run_dir, exist_ok=True)
            rec = Recorder(config, rank=rank, world_size=world)
            if config.flight or config.hang_timeout > 0:
                _watchdog = Watchdog(rec)
        except Exception as exc:  # noqa: BLE001
            print(f"epreplay capture: rank {rank}: capture off: cannot start: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            _off_pid = os.getpid()
            return None
        _recorder = rec
        if _exit_hooks_pid != os.getpid():
            _exit_hooks_pid = os.getpid()
            atexit.register(_close_at_exit)
            import multiprocessing.util as mp_util

            mp_util.Finalize(None, _close_at_exit, exitpriority=100)
        return rec


def _close_at_exit() -> None:
    try:
        stop()
    except Exception as exc:  # noqa: BLE001 - never turn a clean exit into a crash
        print(f"epreplay capture: closing failed: {type(exc).__name__}: {exc}", file=sys.stderr)


def _make_config(run_dir: Any, *, level: Any = "routing", flight: int = 0,
                 hang_timeout: float | None = None, layers_per_step: int = 0,
                 payload_every: int = 1, **options: Any) -> CaptureConfig:
    if hang_timeout is not None:
        options["hang_timeout"] = float(hang_timeout)
    return CaptureConfig.make(run_dir, level=level, flight_steps=int(flight),
                              layers_per_step=int(layers_per_step), payload_every=int(payload_every),
                              **options)


def start(run_dir: Any, *, level: str = "routing", flight: int = 0, hang_timeout: float | None = None,
          layers_per_step: int = 0, payload_every: int = 1, install: bool = True,
          **options: Any) -> CaptureConfig:
    """Capture this process's Buffer calls into `run_dir` (library use; see capture/__init__)."""
    global _config, _off_pid, _installed_by_start
    config = _make_config(run_dir, level=level, flight=flight, hang_timeout=hang_timeout,
                          layers_per_step=layers_per_step, payload_every=payload_every, **options)
    from epreplay.capture.manifest import prepare_run

    config = prepare_run(config)
    with _lock:
        if _recorder is not None:
            stop()
        _config, _off_pid = config, None
    if install:
        from epreplay.capture import hooks

        hooks.install()
        _installed_by_start = True
    return config


def stop() -> dict[str, Any] | None:
    """Close this process's recorder (footer, rank facts, manifest). Returns its closing facts."""
    global _recorder, _watchdog, _config, _off_pid, _installed_by_start
    with _lock:
        rec, dog = _recorder, _watchdog
        _recorder = _watchdog = None
        _off_pid = os.getpid()  # later calls pass straight through
        _config = None
        if dog is not None:
            dog.stop()
        facts = None
        if rec is not None:
            facts = rec.close()
            from epreplay.capture.manifest import merge, write_rank_facts

            try:
                write_rank_facts(rec.run, rec.rank, facts)
                merge(rec.run)
            except Exception as exc:  # noqa: BLE001 - e.g. the disk that disabled capture
                print(f"epreplay capture: rank {rec.rank}: manifest not updated: {exc}", file=sys.stderr)
        if _installed_by_start:
            from epreplay.capture import hooks

            hooks.uninstall()
            _installed_by_start = False
        return facts


def flush(timeout: float = 30.0) -> bool:
    """See capture.flush."""
    rec = _recorder
    return rec.flush(timeout) if rec is not None else True


def env_for(run_dir: Any, *, command: list[str] | None = None, fresh: bool = False,
            nnodes: int = 1, job: str = "", **options: Any) -> dict[str, str]:
    """Environment variables that make every Python process started with them capture into run_dir.

    Creates the run directory and its manifest now (so every rank shares one run id) and a
    sitecustomize.py under RUN/.capture/site that the returned PYTHONPATH puts first.
    Options are start()'s (level, flight, hang_timeout, layers_per_step, payload_every, ...,
    run_id: an id agreed by every node of a job, node: this launcher's node rank).
    nnodes / job: for the manifest (see manifest.prepare_run).
    """
    from epreplay.capture.autostart import write_site
    from epreplay.capture.manifest import prepare_run

    config = prepare_run(_make_config(run_dir, **options), command=command, fresh=fresh,
                         nnodes=nnodes, job=job)
    site = write_site(RunDir(Path(config.run_dir)))
    env = config.to_env()
    rest = os.environ.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(site) + (os.pathsep + rest if rest else "")
    return env
