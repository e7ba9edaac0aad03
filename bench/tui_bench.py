"""How fast `epreplay tui` shows a production-shaped run once its index exists.

    .venv/bin/python bench/tui_bench.py                    # 144 ranks, 288 experts, top-8 (EP144 decode shape)
    .venv/bin/python bench/tui_bench.py --run RUN          # any run (its index is built first if missing)
    .venv/bin/python bench/tui_bench.py --ranks 16 --experts 64 --steps 10   # a quick look

A synthetic run (epreplay.demo.synth) is generated once into --dir and indexed (kept for the next
invocation; generation and indexing are not what is measured). Then, headless (Textual's
run_test, a 160x50 terminal), in this process:
  * import: importing epreplay.tui.app (textual included), a fresh interpreter;
  * first paint: from opening the index to the overview rendered with its data (the target: < 1 s);
  * switch: per pane, from the key press to the pane rendered with its data (first visit: a
    fetch in a worker), and a second visit (no fetch);
  * scroll: one full-screen repaint of the traffic matrix (R x R) and of the heatmap (L x E)
    after PageDown / End (line API: only visible cells are built).
Medians of --repeat runs; next to each wall time, the CPU time the process spent (all threads):
on a shared, overloaded machine the wall time mostly measures waiting for a core.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PANE_KEYS = (("2", "hot"), ("3", "traffic"), ("4", "timeline"), ("5", "divergences"), ("1", "overview"))


def _make(args: argparse.Namespace) -> Path:
    from epreplay.index import build as index_mod
    from epreplay.format.run import RunDir
    from epreplay.demo.synth import make_synthetic_run

    if args.run:
        path = Path(args.run)
    else:
        shape = f"r{args.ranks}-s{args.steps}-l{args.layers}-t{args.tokens}-e{args.experts}-k{args.topk}"
        path = Path(args.dir) / shape
        if not ((path / "manifest.json").exists() and len(RunDir.open(path).shard_paths()) == args.ranks):
            t0 = time.perf_counter()
            make_synthetic_run(path, ranks=args.ranks, steps=args.steps, layers=args.layers,
                               tokens=args.tokens, experts=args.experts, topk=args.topk, seed=0,
                               straggler_rank=args.ranks // 3, decode_steps=args.decode_steps,
                               decode_tokens=64)
            print(f"generated {path} in {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    index_mod.ensure_index(path, progress=False)
    print(f"index ready in {time.perf_counter() - t0:.1f} s ({(path / 'index.duckdb').stat().st_size / 1e6:.1f} MB)",
          flush=True)
    return path


def _frame(app) -> None:
    """Compose one full frame of the screen (what a terminal repaint costs the app)."""
    app.screen._compositor.render_update(full=True, screen_stack=app._background_screens)


CPU: dict[str, float] = {}  # name -> process CPU seconds (all threads) of the last measurement


async def _until_loaded(app, pane, since: float, cpu_since: float, name: str) -> float:
    """Seconds from `since` until `pane` rendered data it fetched after `since`, and a frame."""
    while pane.loaded_at < since:
        await asyncio.sleep(0.001)
    _frame(app)
    CPU[name] = time.process_time() - cpu_since
    return time.perf_counter() - since


async def _once(path: Path) -> dict[str, float]:
    from epreplay.tui.app import EpReplayApp
    from epreplay.tui.data import open_session

    out: dict[str, float] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    app = EpReplayApp(open_session(path))
    async with app.run_test(size=(160, 50)) as pilot:
        out["first paint (overview)"] = await _until_loaded(app, app.pane("overview"), t0, c0,
                                                            "first paint (overview)")
        cpu = {"first paint (overview)": CPU["first paint (overview)"]}
        while len(app.query("Pane")) < 6:  # the other panes mount (lazily) after the first frame
            await pilot.pause()
        for _key, pid in PANE_KEYS:
            pane = app.pane(pid)
            t, c = time.perf_counter(), time.process_time()
            if pane.stale:  # first visit: the key's action starts a fetch in a worker
                app.show(pid)
                out[f"switch to {pid}"] = await _until_loaded(app, pane, t, c, f"switch to {pid}")
                cpu[f"switch to {pid}"] = CPU[f"switch to {pid}"]
            else:
                app.show(pid)
                _frame(app)
                out[f"switch to {pid} (again, no fetch)"] = time.perf_counter() - t
            await pilot.pause()
        t = time.perf_counter()
        app.show("hot")
        _frame(app)
        out["switch to hot (again, no fetch)"] = time.perf_counter() - t
        for pid, wid in (("traffic", "#traffic-map"), ("hot", "#hot-map")):
            app.show(pid)
            await pilot.pause()
            hm = app.query_one(wid)
            hm.focus()
            t = time.perf_counter()
            for move in ((10, 0), (0, 100000), (100000, 0), (-100000, -100000)):
                hm.action_move(*move)
                hm._scroll_to_cursor()
                _frame(app)
            out[f"scroll {pid} (per repaint)"] = (time.perf_counter() - t) / 4
        heat = app.pane("hot").heat
        tr = app.pane("traffic").traffic
        out["_cpu"] = cpu  # type: ignore[assignment]
        out["_shape"] = (heat.load_LE.shape if heat else (0, 0), tr.tokens_RR.shape if tr else (0, 0))  # type: ignore[assignment]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="benchmark this run instead of a synthetic one")
    p.add_argument("--dir", default="/tmp/epreplay-tui-bench")
    p.add_argument("--ranks", type=int, default=144)
    p.add_argument("--experts", type=int, default=288)  # 256 routed + 32 redundant, 2 per rank
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    path = _make(args)

    code = "import time; t=time.perf_counter(); import epreplay.tui.app; print(time.perf_counter()-t)"
    imports = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout) for _ in range(args.repeat)]
    runs = [asyncio.run(_once(path)) for _ in range(args.repeat)]
    shapes = runs[0]["_shape"]
    cpus = [r.pop("_cpu") for r in runs]
    for r in runs:
        r.pop("_shape")
    print(f"run {path}: heatmap {shapes[0][0]} layers x {shapes[0][1]} experts, "
          f"traffic {shapes[1][0]} x {shapes[1][1]} ranks; medians of {args.repeat}")
    print(f"  {'import epreplay.tui.app (fresh process)':40s} {statistics.median(imports) * 1e3:8.1f} ms")
    for name in runs[0]:
        vals = [r[name] for r in runs]
        cpu = [c[name] for c in cpus if name in c]
        extra = f"   (CPU {statistics.median(cpu) * 1e3:7.1f} ms)" if cpu else ""
        print(f"  {name:40s} {statistics.median(vals) * 1e3:8.1f} ms{extra}")
    first = statistics.median(r["first paint (overview)"] for r in runs)
    first_cpu = statistics.median(c["first paint (overview)"] for c in cpus)
    load = os.getloadavg()[0]
    print(f"target first paint < 1 s: {'met' if first < 1.0 else 'NOT met'} ({first:.3f} s wall, "
          f"{first_cpu:.3f} s CPU of this process; load average {load:.1f} on {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
