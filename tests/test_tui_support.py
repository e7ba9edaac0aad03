"""Helpers for the TUI tests (no tests here): small synthetic runs, a replay with divergences put
into the index, and the values the TUI must show computed independently, straight from the shards.

Legend: R ranks, E experts, S steps.
"""
from __future__ import annotations

import io
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from epreplay.format.records import Op

# Small but production-shaped: several nodes' worth of ranks, a planted straggler, a decode phase.
SYNTH = dict(ranks=16, steps=6, layers=4, tokens=48, experts=64, topk=4, seed=3,
             straggler_rank=5, decode_steps=2)
STRAGGLER = 5

# The replay put into the index: rows deliberately out of order; the first is call 4, rank 1.
DIVERGENCES = [
    # call, buffer, seq, step, layer, op, rank, phys, kind, token, src, expert, expected, got, detail
    (9, 0, 9, 1, 0, "combine", 2, 1, "fingerprint", 3, 2, -1, "0x1111", "0x2222", "combined row differs"),
    (4, 0, 4, 0, 2, "dispatch", 3, 1, "count", -1, -1, 12, "17", "16", "tokens per expert"),
    (4, 0, 4, 0, 2, "dispatch", 1, 0, "order", 7, 0, -1, "row 7 from rank 0", "row 8 from rank 0",
     "normal dispatch row order"),
]
FIRST = min(DIVERGENCES, key=lambda d: (d[0], d[6]))


def make_synth(path: Path, *, run_id: str = "tui-synth-run", seed: int = 3, release: str = "synthetic",
               **over: int) -> Path:
    """Write a synthetic run with a fixed run id (snapshots show it) and build its index."""
    from epreplay.index import build as index_mod
    from epreplay.demo.synth import SynthSpec, SynthWriter, create_run

    shape = {**SYNTH, "seed": seed, **over}
    spec = SynthSpec(**shape, release=release, run_id=run_id)
    _, spec = create_run(path, spec)
    writer = SynthWriter(path, spec)
    try:
        writer.write_steps(0, spec.steps + spec.decode_steps)
    finally:
        writer.close()
    index_mod.ensure_index(path)
    return path


def add_replay(run: Path, replay: str = "rp-0001") -> None:
    """Put a diverged replay and its divergences into the run's index (INDEX's schema)."""
    import duckdb

    con = duckdb.connect(str(run / "index.duckdb"))
    try:
        run_id = con.execute("SELECT run_id FROM runs").fetchone()[0]
        con.execute("INSERT INTO replays VALUES (?, ?, '2026-01-01T00:00:00', 'emulated', 'cpu', "
                    "'synthetic', 16, 4, 96, 96, ?, NULL, 1.5, 1, 'DIVERGED', ?)",
                    [replay, run_id, len(DIVERGENCES), f"replays/{replay}.json"])
        for d in DIVERGENCES:
            con.execute("INSERT INTO divergences VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [replay, *d[:11], d[11], d[12], d[13], d[14]])
        con.execute("CHECKPOINT")
    finally:
        con.close()


def copy_run(src: Path, dst: Path) -> Path:
    """A writable copy of a shared (session) run: the index is written into the run directory."""
    shutil.copytree(src, dst)
    return dst


@dataclass(frozen=True)
class ShardTruth:
    """What the shards say, computed without the index.

    load_SLE: {(step, layer): [E] slots} from every dispatch/ll_dispatch topk_idx;
    sent: {(step, layer): [R, R] rows src -> dst of normal dispatches (num_tokens_per_rank_R)};
    last_R: [R] timed calls (buffer, seq) at which each rank arrived last (latest start; ties: lowest rank).
    """

    num_experts: int
    ranks: int
    load: dict
    sent: dict
    last_R: np.ndarray

    def total_E(self, layer: int | None = None) -> np.ndarray:
        out = np.zeros(self.num_experts, np.int64)
        for (s, l), v in self.load.items():
            if layer is None or l == layer:
                out += v
        return out

    def hottest(self) -> int:
        t = self.total_E()
        return int(np.lexsort((np.arange(t.size), -t))[0])

    def series(self, expert: int, layer: int | None = None) -> dict[int, int]:
        out: dict[int, int] = defaultdict(int)
        for (s, l), v in self.load.items():
            if layer is None or l == layer:
                out[s] += int(v[expert])
        return dict(sorted(out.items()))

    def straggler(self) -> int:
        return int(np.argmax(self.last_R))


def shard_truth(run: Path) -> ShardTruth:
    from epreplay.format.run import RunDir
    from epreplay.format.shard import open_shard

    rd = RunDir.open(run)
    load: dict = {}
    sent: dict = {}
    starts: dict = defaultdict(list)
    E = R = 0
    for path in rd.shard_paths():
        rank = rd.rank_of(path)
        with open_shard(path) as scan:
            E = max(E, scan.info.num_experts)
            R = max(R, scan.info.world_size)
            for e in scan.entries:
                h = e.header
                if h.duration_ns >= 0:
                    starts[(h.buffer, h.seq)].append((h.start_ns, rank))
            for rec in scan.records(ops=(Op.DISPATCH, Op.LL_DISPATCH)):
                h = rec.header
                idx = np.asarray(rec.arrays["topk_idx_TK"]).ravel()
                idx = idx[idx >= 0]
                key = (h.step, h.layer)
                load[key] = load.get(key, 0) + np.bincount(idx, minlength=E).astype(np.int64)
                if h.op == Op.DISPATCH:
                    m = sent.setdefault(key, np.zeros((R, R), np.int64))
                    m[rank] = np.asarray(rec.arrays["num_tokens_per_rank_R"])
    last = np.zeros(R, np.int64)
    for calls in starts.values():
        last[min(calls, key=lambda sr: (-sr[0], sr[1]))[1]] += 1
    return ShardTruth(E, R, load, sent, last)


def screen_text(app) -> str:
    """What the terminal shows, as plain text (the compositor's frame, like a screenshot)."""
    from rich.console import Console

    w, h = app.size
    console = Console(width=w, height=h, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor", record=True, legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


async def settle(pilot, app) -> None:
    """Let every fetch finish and its message be rendered."""
    await pilot.pause()
    for _ in range(20):  # a handled message may start another fetch: until none is left
        await app.workers.wait_for_complete()
        await pilot.pause()
        if all(w.is_finished for w in app.workers):
            break


def sync(fn):
    """Run an async test body with asyncio.run (no pytest-asyncio here); fixtures still inject."""
    import asyncio
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper
