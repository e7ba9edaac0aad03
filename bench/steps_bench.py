"""How long finding the steps of an unmarked run takes (epreplay.format.steps), on header arrays alone.

    .venv/bin/python bench/steps_bench.py                            # 64 ranks x 1000 steps x 61 layers
    .venv/bin/python bench/steps_bench.py --ranks 8 --steps 100      # a quick look

Each rank's records are made as the recorder writes them without marks (step 0, layer call u,
layout + dispatch + combine per layer call, a batch size per step and rank), then timed:
  * layer_calls: one rank's header array -> call-pattern hashes and token counts per layer call
    (what plan_of_run does per shard after reading its footer);
  * detect: the period from every rank's layer calls (token changes, KMP period of the pattern);
  * apply: (step, layer) of one rank's records as the index reads them.
Prints the figures and the plan found (it must be the layers given).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epreplay.format import steps  # noqa: E402
from epreplay.format.reader import HEADER_DTYPE  # noqa: E402
from epreplay.format.records import Kind, Op  # noqa: E402


def rank_headers(rank: int, n_steps: int, layers: int, rng: np.random.Generator) -> np.ndarray:
    """[n_steps * layers * 3] records of one rank: layout, dispatch, combine per layer call."""
    U = n_steps * layers
    h = np.zeros(U * 3, HEADER_DTYPE)
    h["kind"] = int(Kind.CALL)
    h["op"] = np.tile([int(Op.LAYOUT), int(Op.DISPATCH), int(Op.COMBINE)], U)
    h["seq"] = np.arange(U * 3)
    h["layer"] = np.repeat(np.arange(U), 3)
    T_S = rng.integers(1, 512, n_steps)  # this rank's batch per step
    h["tokens"] = np.repeat(T_S, layers * 3)
    return h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--layers", type=int, default=61)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    headers = [rank_headers(r, args.steps, args.layers, rng) for r in range(args.ranks)]
    n = sum(len(h) for h in headers)
    t0 = time.perf_counter()
    found = [steps.layer_calls(h) for h in headers]
    t1 = time.perf_counter()
    plan = steps.detect([f[0] for f in found], [f[1] for f in found])
    t2 = time.perf_counter()
    steps.apply(plan, headers[0]["step"], headers[0]["layer"])
    t3 = time.perf_counter()
    print(f"{args.ranks} ranks x {args.steps} steps x {args.layers} layers: {n:,} records")
    print(f"  layer_calls  {t1 - t0:7.3f} s  ({(t1 - t0) / args.ranks * 1e3:.1f} ms per rank, "
          f"{n / (t1 - t0) / 1e6:.1f} M records/s)")
    print(f"  detect       {t2 - t1:7.3f} s")
    print(f"  apply        {(t3 - t2) * 1e3:7.1f} ms per rank")
    print(f"  {plan.describe()}")
    if plan.layers_per_step != args.layers:
        raise SystemExit(f"found {plan.layers_per_step} layers per step, not {args.layers}")


if __name__ == "__main__":
    main()
