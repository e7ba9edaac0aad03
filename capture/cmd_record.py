"""`epreplay record`: run any command with capture installed in every Python process it starts.

    epreplay record [--out RUN] [--run-id ID] [--level L] [--flight N] [--hang-timeout S]
                    [--layers-per-step N] [--payload-every K] -- CMD ARGS...

The run directory and its manifest are created first (owner-only), then CMD runs with the
environment of `epreplay.capture.env_for` (a sitecustomize.py first on PYTHONPATH plus
EPREPLAY_CAPTURE_* variables), so torchrun workers and multiprocessing children capture too,
with no change to the user's code. The exit code is CMD's (128 + signal if it was killed).
SIGTERM is passed on to CMD. SIGINT is passed on only when CMD left our process group: a
terminal's Ctrl-C (or `kill -INT -PGID`) reaches every process of the group, CMD included, and
a second copy from us would read as a second Ctrl-C (Python's KeyboardInterrupt inside the
job's own clean-up, torchrun's hard stop). SIGUSR1 to `epreplay record` makes every flight-mode
rank dump (through the RUN/DUMP marker). However CMD ended, the manifest is completed last from the
ranks' facts and, for ranks that never closed, their shard headers (capture.manifest.finish).

Across nodes (capture/job.py): run on every node of a `torchrun --nnodes N --node-rank i` job,
each launcher derives the same run id from torchrun's rendezvous (or takes --run-id) and writes
its node's part to RUN on its own disk; `epreplay merge PART... --out RUN` joins the parts.
"""
from __future__ import annotations

import argparse

HELP = "run a command with DeepEP capture installed in every Python process it starts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="RUN", help="run directory to create (default: runs/<run id>)")
    parser.add_argument("--run-id", default=None, metavar="ID",
                        help="the run's id; give every node of a multi-node job the same one "
                             "(default: derived from torchrun's rendezvous, alike on every node, "
                             "or a new one for a one-node job)")
    parser.add_argument("--level", default="routing",
                        help="counts | routing (default) | fingerprints | payload")
    parser.add_argument("--flight", type=int, default=0, metavar="N",
                        help="flight mode: keep the last N steps per rank in memory, write them on a trigger")
    parser.add_argument("--hang-timeout", type=float, default=None, metavar="S",
                        help="seconds before a hooked call counts as hung (default 120; 0: off)")
    parser.add_argument("--layers-per-step", type=int, default=0, metavar="N",
                        help="MoE layers per step, to count steps when the code does not mark them")
    parser.add_argument("--payload-every", type=int, default=1, metavar="K",
                        help="at --level payload, keep the payload of every K-th step only")
    parser.add_argument("--release", default="", help="release tag stored in the manifest")
    parser.add_argument("--writer", choices=("process", "thread"), default="process",
                        help="where records are hashed, encoded and written: a helper process per "
                             "rank (default; keeps that work off the job's interpreter lock) or a "
                             "thread inside each rank (one process fewer)")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...",
                        help="the command to run")


def run(args: argparse.Namespace) -> int:
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from epreplay.capture.job import check_run_id, job_of
    from epreplay.capture.manifest import finish, write_marker
    from epreplay.capture.session import env_for
    from epreplay.errors import UsageError
    from epreplay.format.run import RunDir, new_run_id

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("no command to record; put it after '--': "
                         "epreplay record --out RUN -- python train.py")
    job = job_of(cmd, os.environ)
    try:
        run_id = check_run_id(args.run_id) if args.run_id is not None else job.run_id()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    out = Path(args.out or os.path.join("runs", run_id or new_run_id()))
    # a one-node job is node 0; a multi-node one is the node torchrun names (or, elastic, the
    # one its rendezvous assigns: each rank reads GROUP_RANK)
    node = job.node_rank if job.multi_node else 0
    env = env_for(out, level=args.level, flight=args.flight, hang_timeout=args.hang_timeout,
                  layers_per_step=args.layers_per_step, payload_every=args.payload_every,
                  release=args.release, writer=args.writer, command=cmd, fresh=True,
                  run_id=run_id or "", node=node, nnodes=job.nnodes,
                  job=("--run-id" if args.run_id is not None else job.source if run_id else ""))
    if job.multi_node:
        where = f"node {node}" if node >= 0 else "the node the rendezvous assigns"
        said = "given by --run-id" if args.run_id is not None else (
            f"derived from {job.source}, alike on every node" if run_id else
            "NOT shared: no rendezvous id or endpoint to derive one from; pass --run-id")
        print(f"epreplay record: run {env['EPREPLAY_CAPTURE_RUN_ID']} ({said}), {where} of "
              f"{job.nnodes}", file=sys.stderr, flush=True)
    print(f"epreplay record: capturing into {out}", file=sys.stderr, flush=True)
    try:
        proc = subprocess.Popen(cmd, env={**os.environ, **env})
    except (FileNotFoundError, PermissionError) as exc:
        raise UsageError(f"cannot run {cmd[0]!r}: {exc.strerror}; check the command after '--'") from None

    stopped_by: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        stopped_by.append(signum)
        if signum == signal.SIGINT and _in_our_group(proc.pid):
            return  # it reached the command too (module docstring): one Ctrl-C is one SIGINT
        proc.send_signal(signum)  # the command decides how to stop; we wait for it

    def dump_all(_signum: int, _frame: object) -> None:
        # SIGUSR1 to `epreplay record` itself: every flight-mode rank dumps (the command's own
        # processes may not handle SIGUSR1, so it is not forwarded).
        try:
            write_marker(out, "sigusr1", "SIGUSR1 to epreplay record", -1)
        except OSError as exc:
            print(f"epreplay record: cannot request a dump: {exc}", file=sys.stderr)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    old[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, dump_all)
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    interrupted = bool(stopped_by) or rc in (-signal.SIGINT, -signal.SIGTERM)
    run_dir = RunDir(out)
    manifest = finish(run_dir, exit_code=rc, interrupted=interrupted,
                      node=node if job.multi_node and node >= 0 else None)
    if manifest is not None:
        print(summary(manifest, out, shards=len(run_dir.shard_paths()), flight=args.flight,
                      steps=_steps_line(run_dir)), file=sys.stderr)
    return rc if rc >= 0 else 128 - rc


def _in_our_group(pid: int) -> bool:
    """Whether process `pid` is in our process group (so a group's signal reached it too)."""
    import os

    try:
        return os.getpgid(pid) == os.getpgrp()
    except ProcessLookupError:
        return True  # it has gone: nothing to pass on


def _steps_line(run_dir) -> str:
    """How the run's steps were found (epreplay.format.steps), for the summary; '' when unreadable."""
    from epreplay.errors import UsageError
    from epreplay.format.steps import plan_of_run

    try:
        return plan_of_run(run_dir).describe() if run_dir.shard_paths() else ""
    except (UsageError, OSError, ValueError):
        return ""  # the summary's other lines still say what is there


def summary(manifest, out, *, shards: int, flight: int, steps: str = "") -> str:
    """`epreplay record`'s last line(s): what the run holds, how its steps were found, and why
    it may hold little."""
    from pathlib import Path

    from epreplay.capture.manifest import MARKER

    extra = manifest.extra
    records = sum(int(f.get("records", 0)) for f in manifest.ranks.values())
    text = (f"epreplay record: {shards} shard(s) in {out}/shards, {records} records, "
            f"{extra.get('dropped', 0)} dropped")
    if extra.get("disabled_ranks"):
        text += f", capture off on ranks {extra['disabled_ranks']}"
    if extra.get("interrupted"):
        text += (f"; interrupted (world size {manifest.world_size}, shards of ranks "
                 f"{extra.get('ranks_found', [])})")
    if steps:
        text += f"\n{steps}"
    if flight:
        # a normal exit writes nothing in flight mode: say so, or 0 records reads as a failure
        text += (f"\nflight mode (--flight {flight}) writes records only on a trigger: an exception, "
                 f"a hang, SIGUSR1 to epreplay record, non-finite values, or a marker file "
                 f"{Path(out) / MARKER}; "
                 f"{extra.get('dumps', 0)} dump(s) happened")
    return text
