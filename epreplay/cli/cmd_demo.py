"""`epreplay demo`: run a small DeepSeek-V3-style MoE on N processes, record it, index it, replay it.

    epreplay demo [--ranks N] [--steps S] [--layers L] [--experts E] [--topk K] [--hidden H]
                  [--out DIR] [--seed N] [--release R] [--device cpu|cuda] ...

The defaults (4 ranks, 6 steps, 4 layers, top-4 of 32 experts, H=128) finish in seconds on two
CPU cores. Without --out the run goes to a new runs/demo-<UTC time> directory; an existing run
is never overwritten.
"""
from __future__ import annotations

import argparse

HELP = "run, record, index and replay a small DeepSeek-V3-style MoE demo on N local processes"


EPILOG = """examples:
  epreplay demo                                   # 4 ranks: run, record, index, replay on 2, summary
  epreplay demo --out runs/a && epreplay demo --out runs/b --release b
  epreplay diff runs/a runs/b                     # release b changed the routers of layers 1 and 3
  epreplay demo --ranks 8 --experts 256 --topk 8 --groups 8 --topk-groups 4 --hidden 256
                                                  # DeepSeek-V3's gate shape (top-8 of 256, 8 groups)
  epreplay demo --slow-rank 2 --slow-ms 50        # a straggler for the timeline view
  epreplay demo --device cuda --backend deepep --ranks 2 --hidden 2048   # real DeepEP on 2 GPUs
  epreplay demo --deepep v2                        # the same workload on DeepEP V2's ElasticBuffer
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--ranks", type=int, default=4, metavar="N", help="processes (cards), default 4")
    parser.add_argument("--steps", type=int, default=6, metavar="S",
                        help="model steps, default 6 (every 3rd is prefill, the others decode)")
    parser.add_argument("--prefill-every", type=int, default=3, metavar="N",
                        help="step s is prefill (normal mode) when s %% N == 0, else decode (low-latency); "
                             "default 3, 1 = prefill only")
    parser.add_argument("--layers", type=int, default=4, metavar="L", help="MoE layers, default 4")
    parser.add_argument("--experts", type=int, default=32, metavar="E", help="routed experts, default 32")
    parser.add_argument("--topk", type=int, default=4, metavar="K", help="experts per token, default 4")
    parser.add_argument("--hidden", type=int, default=128, metavar="H", help="hidden size, default 128")
    parser.add_argument("--tokens", type=int, default=64, metavar="T",
                        help="tokens per rank in prefill steps, default 64")
    parser.add_argument("--decode-tokens", type=int, default=32, metavar="M",
                        help="max tokens per rank in decode steps (low-latency M), default 32")
    parser.add_argument("--groups", type=int, default=None, metavar="G",
                        help="expert groups of the gate (default 4, or 1 when E is not a multiple of 4)")
    parser.add_argument("--topk-groups", type=int, default=None, metavar="TG",
                        help="groups kept per token (default half the groups)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every weight and token, default 0")
    parser.add_argument("--release", default="",
                        help="router change for diff tests: a (base), b (odd layers), c (even), d (all), "
                             "or a layer bit mask such as 10 (layers 1 and 3)")
    parser.add_argument("--shuffle-batches", action="store_true",
                        help="same tokens, permuted across ranks and rows (diff matches them by tag)")
    parser.add_argument("--slow-rank", type=int, default=-1, metavar="R",
                        help="make rank R a straggler (extra compute before each dispatch), default none")
    parser.add_argument("--slow-ms", type=float, default=20.0, metavar="MS",
                        help="the straggler's extra milliseconds per layer, default 20")
    parser.add_argument("--no-fp8", action="store_true", help="dispatch in BF16 instead of DeepEP FP8")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (gloo) or cuda (NCCL), default cpu")
    parser.add_argument("--backend", choices=("emulated", "deepep"), default="emulated",
                        help="Buffer: epreplay's emulation (default) or the real deep_ep")
    parser.add_argument("--deepep", choices=("v1", "v2"), default="v1",
                        help="DeepEP API of the workload: v1 Buffer (normal + low-latency, default) or "
                             "v2 ElasticBuffer (one dispatch/combine for prefill and decode)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="run directory to create (default: runs/demo-<UTC time>)")
    parser.add_argument("--level", default="routing",
                        help="capture level: counts | routing (default) | fingerprints | payload")
    parser.add_argument("--no-record", action="store_true", help="only run the workload")
    parser.add_argument("--no-replay", action="store_true", help="record and index, skip the replay")
    parser.add_argument("--replay-ranks", type=int, default=None, metavar="M",
                        help="processes for the replay (default: half of --ranks)")
    parser.add_argument("--format", choices=("text", "json"), default="text",
                        help="summary as text (default) or one JSON object on stdout")
    parser.add_argument("--timeout", type=float, default=300.0, metavar="S",
                        help="seconds before a stuck run is stopped, default 300")


def build_config(args: argparse.Namespace):
    """DemoConfig from the parsed flags (UsageError for bad values)."""
    from epreplay.demo.config import DemoConfig
    from epreplay.errors import UsageError

    groups = args.groups if args.groups is not None else (4 if args.experts % 4 == 0 else 1)
    if groups < 1:
        raise UsageError(f"--groups {groups}: must be at least 1")
    topk_groups = args.topk_groups if args.topk_groups is not None else max(1, groups // 2)
    if args.topk_groups is None and groups > 1 and args.experts >= 1:
        # keep the default gate feasible: enough kept experts for K picks
        per_group = max(1, args.experts // groups)
        while topk_groups < groups and topk_groups * per_group < args.topk:
            topk_groups += 1
    return DemoConfig(ranks=args.ranks, steps=args.steps, layers=args.layers, experts=args.experts,
                      topk=args.topk, hidden=args.hidden, prefill_tokens=args.tokens,
                      decode_tokens=args.decode_tokens, prefill_every=args.prefill_every, n_groups=groups, topk_groups=topk_groups,
                      fp8=not args.no_fp8, seed=args.seed, release=args.release,
                      shuffle_batches=args.shuffle_batches, device=args.device,
                      slow_rank=args.slow_rank, slow_ms=args.slow_ms if args.slow_rank >= 0 else 0.0)


def _default_out():
    import time
    from pathlib import Path

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = Path("runs") / f"demo-{stamp}"
    n = 1
    while out.exists():  # two demos in one second: never reuse a directory
        n += 1
        out = Path("runs") / f"demo-{stamp}-{n}"
    return out


def _warm_up() -> None:
    """Start run_ranks' forkserver (it imports torch) on a daemon thread, so it loads while this
    process imports its own torch; the ranks then start at once. Nothing here imports torch."""
    import multiprocessing.forkserver as forkserver
    import threading

    from epreplay.launch import _context

    _context()  # the forkserver's preload list, exactly as run_ranks sets it
    threading.Thread(target=forkserver.ensure_running, daemon=True, name="forkserver-warm-up").start()


def _recorded(out) -> str:
    """Where a stopped demo's recording is, and what its manifest says it holds."""
    from epreplay.errors import UsageError
    from epreplay.format.run import RunDir

    try:
        manifest = RunDir(out).read_manifest()
    except UsageError:
        manifest = None
    held = ""
    if manifest is not None:
        records = sum(int(f.get("records", 0)) for f in manifest.ranks.values())
        held = f" ({len(manifest.ranks)} of {manifest.world_size} ranks, {records} records)"
    return f"what was recorded is in {out}{held}: epreplay inspect {out}"


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from epreplay.errors import UsageError
    from epreplay.format.records import Level
    from epreplay.format.run import RunDir

    cfg = build_config(args)
    if args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout}: must be a positive number of seconds")
    if args.replay_ranks is not None and (args.replay_ranks < 1 or cfg.ranks % args.replay_ranks):
        raise UsageError(f"--replay-ranks {args.replay_ranks}: must divide --ranks {cfg.ranks}")
    try:
        Level.parse(args.level)
    except ValueError as exc:
        raise UsageError(f"--level: {exc}") from None
    if args.backend == "deepep" and args.deepep == "v2" and cfg.device != "cuda":
        raise UsageError("--backend deepep needs --device cuda (DeepEP runs on GPUs only)")
    if args.backend == "deepep" and args.deepep == "v1":
        from epreplay.demo.config import DEEPEP_LL_HIDDEN

        if cfg.device != "cuda":
            raise UsageError("--backend deepep needs --device cuda (DeepEP runs on GPUs only)")
        if cfg.has_decode and cfg.hidden not in DEEPEP_LL_HIDDEN:
            raise UsageError(f"--hidden {cfg.hidden}: DeepEP's low-latency kernels are built for hidden in "
                             f"{list(DEEPEP_LL_HIDDEN)}; use e.g. --hidden 2048 (or --prefill-every 1)")
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device here; use --device cpu")
    out = Path(args.out) if args.out else _default_out()
    record = not args.no_record
    if record and out.exists() and (not out.is_dir() or RunDir(out).manifest_path.exists()
                                    or RunDir(out).shards_dir.exists()):
        raise UsageError(f"{out}: already holds a run; choose another --out (nothing is overwritten)")
    # Everything above is validation without torch, so bad input answers at once. Now start the
    # ranks' forkserver (a torch import) on a thread while this process imports its own torch.
    _warm_up()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from epreplay.demo.pipeline import PipelineOptions, run_pipeline
    from epreplay.demo.render import print_summary, summary_dict

    err = Console(stderr=True)
    console = Console()
    opts = PipelineOptions(out=out if record else None, level=args.level, record=record,
                           replay=not args.no_replay, replay_ranks=args.replay_ranks,
                           backend=args.backend, timeout=args.timeout, deepep=args.deepep)
    bar = Progress(TextColumn("{task.description:>7}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=err, transient=True)
    tasks: dict[str, int] = {}

    def progress(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            label = {"run": "layers", "replay": "calls"}.get(phase, phase)
            tasks[phase] = bar.add_task(f"{phase}", total=total, unit=label)
        bar.update(tasks[phase], completed=done, total=total)

    from epreplay.launch import RankFailed

    with bar:
        try:
            result = run_pipeline(cfg, opts, progress=progress)
        except RankFailed as exc:
            from rich.markup import escape

            err.print(escape(f"epreplay demo: the workload failed: {str(exc).splitlines()[0]}"),
                      soft_wrap=True, highlight=False)
            for rank, text in sorted(exc.errors.items()):
                last = text.strip().splitlines()[-1] if text.strip() else "?"
                err.print(escape(f"  rank {rank}: {last}"), soft_wrap=True, highlight=False)
            if opts.out is not None and RunDir(out).shards_dir.is_dir():
                err.print(escape(_recorded(out)), soft_wrap=True, highlight=False)
            return 1
        except KeyboardInterrupt:  # the ranks stopped and closed what they had; say where it is
            from rich.markup import escape

            err.print("epreplay demo: interrupted", highlight=False)
            if opts.out is not None and RunDir(out).shards_dir.is_dir():
                err.print(escape(_recorded(out)), soft_wrap=True, highlight=False)
            return 130
    if args.format == "json":
        import json
        import sys

        json.dump(summary_dict(result), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print_summary(console, result)
    return result.exit_code
