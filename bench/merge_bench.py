"""Merge benchmark: the time `epreplay merge` takes to join the node-local parts of a run.

A production-shaped synthetic run (epreplay.demo.synth) is split into --nodes parts of equal rank
blocks, each a run directory of its own as a node's `epreplay record` leaves it (its manifest,
its ranks' shards); then the parts are merged with hard links (the default, parts and output on
one filesystem) and with --copy (what a merge across filesystems does), and the merge command's
clock-skew estimate (every shard's record headers) is timed on its own.

    .venv/bin/python bench/merge_bench.py                          # 64 ranks / 8 nodes x 20 steps x 8 layers
    .venv/bin/python bench/merge_bench.py --ranks 144 --nodes 18 --steps 4

The generated run is kept in --cache and reused when its shape matches.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def split(run: Path, parts_dir: Path, nodes: int, ranks: int) -> list[Path]:
    """Node-local parts of `run`: part i holds ranks [i*R/n, (i+1)*R/n) (hard links of the
    generated shards, so splitting costs no disk) and the manifest."""
    shutil.rmtree(parts_dir, ignore_errors=True)
    per = ranks // nodes
    parts = []
    for node in range(nodes):
        part = parts_dir / f"node{node}"
        (part / "shards").mkdir(parents=True, mode=0o700)
        shutil.copyfile(run / "manifest.json", part / "manifest.json")
        for r in range(node * per, (node + 1) * per if node < nodes - 1 else ranks):
            name = f"rank-{r:05d}.eprs"
            os.link(run / "shards" / name, part / "shards" / name)
        parts.append(part)
    return parts


def merge_s(parts: list[Path], out: Path, *extra: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "epreplay", "merge", *map(str, parts), "--out", str(out), *extra],
                         capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        sys.exit(f"merge failed: {res.stderr}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=64)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--cache", default="/tmp/epreplay-merge-bench")
    args = ap.parse_args()

    from epreplay.merge import clock_of, plan_merge, read_part, write_merge
    from epreplay.demo.synth import make_synthetic_run

    cache = Path(args.cache)
    run = cache / "run"
    shape = {k: getattr(args, k) for k in ("ranks", "steps", "layers", "tokens", "experts", "topk")}
    stamp = cache / "shape.json"
    if not (stamp.exists() and json.loads(stamp.read_text()) == shape):
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        t = time.perf_counter()
        make_synthetic_run(run, **shape)
        stamp.write_text(json.dumps(shape))
        print(f"generated {run} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    parts = split(run, cache / "parts", args.nodes, args.ranks)
    size = sum(p.stat().st_size for p in (run / "shards").iterdir())
    print(f"run: {args.ranks} ranks on {args.nodes} nodes, {args.steps} steps x {args.layers} layers x "
          f"{args.tokens} tokens, {size / 1e6:,.1f} MB of shards")

    link = min(merge_s(parts, cache / "merged") for _ in range(3))
    copy = merge_s(parts, cache / "merged", "--copy")
    t = time.perf_counter()
    plan = plan_merge([read_part(p) for p in parts])
    t_plan = time.perf_counter() - t
    shutil.rmtree(cache / "merged", ignore_errors=True)
    t = time.perf_counter()
    write_merge(plan, cache / "merged")
    t_write = time.perf_counter() - t
    t = time.perf_counter()
    clock_of(plan)
    t_clock = time.perf_counter() - t
    print(f"epreplay merge, hard links (best of 3, whole command): {link:.2f} s")
    print(f"epreplay merge --copy (whole command):               {copy:.2f} s ({size / 1e6 / copy:,.0f} MB/s)")
    print(f"  of which in-process: read + check parts {t_plan * 1e3:.0f} ms, link + manifest "
          f"{t_write * 1e3:.0f} ms, clock estimate (all record headers) {t_clock * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
