"""epreplay.capture: hooks at DeepEP's dispatch/combine, the async recorder, flight mode.

Zero code change: `epreplay record --out RUN [--level routing] [--flight N] -- CMD ARGS...`.

Library use (frameworks, the demo, tests):

    from epreplay import capture
    capture.start("RUN", level="routing", flight=0, hang_timeout=120, layers_per_step=0,
                  payload_every=1)      # creates RUN (owner-only) and its manifest; hooks Buffers
    ...                                  # every deep_ep / epreplay.emulate Buffer call is recorded
    capture.stop()                       # footer, per-rank facts, manifest (also runs at exit)

    env = capture.env_for("RUN", level="routing", layers_per_step=4)   # dict[str, str]
    subprocess.run(cmd, env={**os.environ, **env})   # every Python child captures, no code change
    # epreplay.launch.run_ranks(fn, n, env=env) applies env *after* the forkserver forked the
    # child, too late for the sitecustomize: there each rank calls capture.install() before
    # creating its Buffers and capture.stop() at the end (the demo's RankHooks do exactly that);
    # the recorder reads its config from the environment at the first Buffer.

    capture.install() / capture.wrap(buffer) / capture.uninstall()    # hooks only (see hooks.py)
    with capture.step(7): with capture.layer(3): ...; capture.mark_step(); capture.tag_tokens(ids_T)

What a record holds per op and level: epreplay/format/records.py (arrays) and capture/extract.py (meta).
Run directory extras: RUN/.capture/ (lock, rank-NNNNN.json closing facts, site/sitecustomize.py)
and RUN/DUMP (flight-mode dump request, see triggers.py). manifest.json's ranks[r] holds each
rank's closing facts (records, dropped, disabled reason, dumps, graph_skipped, buffers) and extra
holds dropped / disabled_ranks / dumps totals (and exit_code under `epreplay record`); after a
job that did not end cleanly, the launcher's last merge (manifest.finish) adds interrupted,
ranks_found, missing_ranks, unclosed_ranks, and a ranks[r] from the shard header (source "shard
header") for each rank that never closed.
A (buffer, seq) may appear twice in a shard: a HUNG record written by the watchdog, then the
OK/ERROR record if the call returned after all — the later one is the call's outcome.
This package imports no torch until a Buffer is hooked or capture starts.
"""
from __future__ import annotations

from typing import Any

from epreplay.marks import layer, mark_step, step, tag_tokens

__all__ = ["start", "stop", "flush", "env_for", "install", "wrap", "uninstall", "step", "layer",
           "mark_step", "tag_tokens"]


def start(run_dir: Any, **options: Any) -> Any:
    """Capture this process's Buffer calls into run_dir; see session.start for the options."""
    from epreplay.capture import session

    return session.start(run_dir, **options)


def stop() -> Any:
    """Close this process's capture; returns its closing facts (None when it was not capturing)."""
    from epreplay.capture import session

    return session.stop()


def flush(timeout: float = 30.0) -> bool:
    """Wait until every call recorded so far has left this process for its writer (so a crash
    of this process from now on cannot lose it). True when done within timeout, or not capturing."""
    from epreplay.capture import session

    return session.flush(timeout)


def env_for(run_dir: Any, **options: Any) -> dict[str, str]:
    """Environment that makes child Python processes capture into run_dir (see session.env_for)."""
    from epreplay.capture import session

    return session.env_for(run_dir, **options)


def install(*classes: type) -> list[type]:
    """Patch deep_ep.Buffer and/or epreplay.emulate.Buffer (or the given classes) in place."""
    from epreplay.capture import hooks

    return hooks.install(*classes)


def wrap(buffer: Any) -> Any:
    """Capture one Buffer instance; returns it."""
    from epreplay.capture import hooks

    return hooks.wrap(buffer)


def uninstall() -> None:
    """Undo install() and wrap()."""
    from epreplay.capture import hooks

    hooks.uninstall()
