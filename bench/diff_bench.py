"""How long `epreplay diff` takes on two production-shaped runs (the index benchmark's size).

    .venv/bin/python bench/diff_bench.py                      # 64 ranks x 200 steps x 8 layers x 512 tok, top-8 of 256
    .venv/bin/python bench/diff_bench.py --ranks 8 --steps 20 # a quick look

Two synthetic runs (epreplay.demo.synth, seeds 0 and 1: every layer's routing differs) are generated
once into --dir (kept for the next invocation; generation is the slow part) and indexed. Then:
  * distribution level: diff_runs(A, B, match="none") with both indexes present — loads per
    (step, layer, expert) and per (step, layer, rank) from DuckDB, JS / hot sets / imbalance;
    also the whole CLI (`epreplay diff A B --match none --format json`, a fresh process);
  * token-matched level: diff_runs(A, B, match="position") — every dispatch record of both runs
    read from the shards and compared token by token (one pass, thread pool over records); and
    A against itself, where every record is byte-identical and decoded once;
  * token-matched by tag: a second pair of runs with token tags (written here: synth has none),
    B with every step's batch shuffled across ranks and rows and layers 1 and 5 perturbed
    (--tag-steps steps, default 50).
Target (issue 7): distribution level < 2 s.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epreplay.diff import runs as diff_runs  # noqa: E402
from epreplay.format.run import RunDir  # noqa: E402



def _f(v: float | None) -> str:
    """A token-level metric: 'n/a' when no token matched (diff reports it as not measured)."""
    return "n/a" if v is None else f"{v:.4f}"

def _make(path: Path, seed: int, args: argparse.Namespace) -> float:
    """Generate one run unless a complete one is already there; seconds spent."""
    from epreplay.demo.synth import make_synthetic_run

    if (path / "manifest.json").exists() and len(RunDir.open(path).shard_paths()) == args.ranks:
        return 0.0
    t0 = time.perf_counter()
    make_synthetic_run(path, ranks=args.ranks, steps=args.steps, layers=args.layers,
                       tokens=args.tokens, experts=args.experts, topk=args.topk, seed=seed,
                       workers=args.workers)
    return time.perf_counter() - t0


def _index(path: Path) -> float:
    """Build the run's index when missing (the diff would do it; timed apart here)."""
    t0 = time.perf_counter()
    try:
        from epreplay.index import build as index_mod
    except ImportError:
        return float("nan")
    index_mod.ensure_index(path, progress=False)
    return time.perf_counter() - t0


def _make_tagged(path: Path, *, ranks: int, steps: int, layers: int, tokens: int, experts: int,
                 topk: int, shuffle: bool, perturb: frozenset[int]) -> float:
    """A run of tagged dispatch records (epreplay.demo.synth writes no tags): token g of step s gets
    tag g and, in layer l, a top-k row of a per-layer pool picked by hash(g, l) (the next row in
    `perturb` layers); `shuffle` permutes each step's tokens across ranks and rows."""
    import numpy as np

    from epreplay.format.records import Kind, Level, Manifest, Op, RecordHeader, ShardInfo, Status
    from epreplay.format.shard import ShardWriter

    if (path / "manifest.json").exists():
        return 0.0
    t0 = time.perf_counter()
    pool_rows = 8192
    rng = np.random.default_rng(7)
    pools = []
    for _ in range(layers):  # Gumbel top-k over a skewed popularity: distinct experts per row
        g = rng.normal(0, 0.8, experts)[None, :] + rng.gumbel(size=(pool_rows, experts))
        idx = np.argsort(-g, axis=1)[:, :topk]
        w = np.exp(np.take_along_axis(g, idx, 1) - g.max(axis=1, keepdims=True))
        pools.append((idx.astype(np.int64), (w / w.sum(1, keepdims=True)).astype(np.float32)))
    run = RunDir.create(path)
    run.write_manifest(Manifest(run_id=path.name, created="bench", world_size=ranks,
                                num_experts=experts, topk=topk, release=path.name))
    writers = [ShardWriter(run.shard_path(r), ShardInfo(path.name, r, ranks, experts, topk, 0,
                                                       Level.ROUTING)) for r in range(ranks)]
    per_step = ranks * tokens
    for step in range(steps):
        tok_N = np.arange(step * per_step, (step + 1) * per_step, dtype=np.int64)
        if shuffle:
            tok_N = np.random.default_rng([11, step]).permutation(tok_N)
        for layer in range(layers):
            h_N = (tok_N.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
                   + np.uint64((layer * 0x632BE59BD9B4E019) % 2**64)) >> np.uint64(40)
            row_N = (h_N % np.uint64(pool_rows)).astype(np.int64)
            if layer in perturb:
                row_N = (row_N + 1) % pool_rows
            idx_pool, w_pool = pools[layer]
            for r in range(ranks):
                sl = slice(r * tokens, (r + 1) * tokens)
                head = RecordHeader(Kind.CALL, Op.DISPATCH, Level.ROUTING, Status.OK, 0,
                                    step * layers + layer, step, layer, tokens)
                writers[r].append(head, {"topk_idx_TK": idx_pool[row_N[sl]],
                                         "topk_weights_TK": w_pool[row_N[sl]],
                                         "token_tag_T": tok_N[sl]})
    for w in writers:
        w.close()
    return time.perf_counter() - t0


def _timed(fn, repeat: int) -> tuple[float, float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times), out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=64)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--workers", type=int, default=None, help="generator processes")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions of the distribution level")
    p.add_argument("--dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "epreplay-diff-bench")
    p.add_argument("--no-tokens", action="store_true", help="skip the token-matched level")
    p.add_argument("--tag-steps", type=int, default=50,
                   help="steps of the tagged pair of runs for the tag-matched figure (0: skip)")
    args = p.parse_args()

    shape = f"r{args.ranks}-s{args.steps}-l{args.layers}-t{args.tokens}-e{args.experts}-k{args.topk}"
    base = args.dir / shape
    base.mkdir(parents=True, exist_ok=True)
    run_a, run_b = base / "a", base / "b"
    gen = _make(run_a, 0, args) + _make(run_b, 1, args)
    idx = _index(run_a) + _index(run_b)
    tokens = args.ranks * args.steps * args.layers * args.tokens
    size = sum(f.stat().st_size for r in (run_a, run_b) for f in RunDir.open(r).shard_paths())
    print(f"runs: {args.ranks} ranks x {args.steps} steps x {args.layers} layers x {args.tokens} tokens, "
          f"top-{args.topk} of {args.experts}: {tokens / 1e6:.1f} M token-layers per run, "
          f"{size / 2**30:.2f} GiB of shards for both ({base})")
    print(f"  generation {gen:.1f} s (0 = reused), index build {idx:.1f} s (both runs; not part of the diff)")

    best, med, res = _timed(lambda: diff_runs.diff_runs(run_a, run_b, match="none"), args.repeat)
    print(f"distribution level (diff_runs, match=none): best {best:.3f} s, median {med:.3f} s "
          f"[target < 2 s: {'OK' if best < 2 else 'MISSED'}]  js max {res.summary['js']:.4f}, "
          f"{len(res.layers)} layers")

    cmd = [sys.executable, "-m", "epreplay", "diff", str(run_a), str(run_b), "--match", "none",
           "--format", "json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    cli_s = time.perf_counter() - t0
    print(f"distribution level, whole CLI process (`epreplay diff A B --match none --format json`): "
          f"{cli_s:.3f} s, exit {proc.returncode}")

    if not args.no_tokens:
        t0 = time.perf_counter()
        res = diff_runs.diff_runs(run_a, run_b, match="position")
        tok_s = time.perf_counter() - t0
        matched = sum(r.tokens.tokens for r in res.layers if r.tokens)
        print(f"token-matched level (diff_runs, match=position): {tok_s:.1f} s for {matched / 1e6:.1f} M "
              f"matched token-layers ({matched / tok_s / 1e6:.2f} M/s, {os.cpu_count()} CPUs); "
              f"top1 {_f(res.summary['top1'])}, jaccard {_f(res.summary['jaccard'])}")
        t0 = time.perf_counter()
        res = diff_runs.diff_runs(run_a, run_a, match="position")
        self_s = time.perf_counter() - t0
        print(f"token-matched self-diff (A vs A: byte-identical records, decoded once): {self_s:.1f} s; "
              f"top1 {_f(res.summary['top1'])}")
    if args.tag_steps:
        tbase = args.dir / f"tagged-r{args.ranks}-s{args.tag_steps}-l{args.layers}-t{args.tokens}-e{args.experts}-k{args.topk}"
        tbase.mkdir(parents=True, exist_ok=True)
        shape = dict(ranks=args.ranks, steps=args.tag_steps, layers=args.layers, tokens=args.tokens,
                     experts=args.experts, topk=args.topk)
        gen = (_make_tagged(tbase / "a", shuffle=False, perturb=frozenset(), **shape)
               + _make_tagged(tbase / "b", shuffle=True, perturb=frozenset({1, 5}), **shape))
        n = args.ranks * args.tag_steps * args.layers * args.tokens
        _index(tbase / "a")
        _index(tbase / "b")
        t0 = time.perf_counter()
        res = diff_runs.diff_runs(tbase / "a", tbase / "b", match="tag")
        tag_s = time.perf_counter() - t0
        drifted = sorted(r.layer for r in res.layers if r.tokens.top1 < 1)
        print(f"token-matched level by tag (B: batches shuffled across ranks/rows, layers 1 and 5 "
              f"perturbed; {n / 1e6:.1f} M token-layers per run, generated in {gen:.0f} s): "
              f"{tag_s:.1f} s ({n / tag_s / 1e6:.2f} M/s); matched "
              f"{res.summary['matched']:.4f}, drifted layers {drifted}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
