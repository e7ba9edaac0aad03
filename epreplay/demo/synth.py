"""A production-shaped synthetic run, generated straight into shards (no model, no processes group).

For the index benchmark and for tests of index / diff / tui that need realistic routing at a scale
no CPU demo reaches (64+ ranks x 256 experts). The records hold exactly the arrays
epreplay.format.records lists for dispatch / combine / ll_dispatch / ll_combine at the chosen level, and
the receive side is consistent with the send side across ranks (what rank d receives is what
every rank sent to it), so the index's aggregates can be checked against the shards.

Routing shape: per layer, expert popularity is log-normal with a few boosted hot experts, different
per layer; it drifts linearly from a start to an end distribution over the steps. Top-k sets are
drawn (Gumbel top-k, distinct experts per token) into per-layer token pools once, and each
(step, layer) picks its tokens from the pools, so generation costs a gather per call.

Legend: R ranks, T tokens per rank, K top-k, E experts, X = E / R local experts, P pool rows,
N rows received by a normal dispatch, V valid rows of a low-latency receive.

    make_synthetic_run("/tmp/run", ranks=64, steps=200, layers=8, tokens=512, experts=256, topk=8,
                       seed=0, straggler_rank=5, decode_steps=10)
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from epreplay.errors import UsageError
from epreplay.format.records import Kind, Level, Manifest, Op, RecordHeader, ShardInfo, Status
from epreplay.format.run import RunDir, new_run_id

NVL_PEERS = 8  # DeepEP's ranks per node (epreplay.emulate.layout): above, internode handles
POOL_ROWS = 8192  # distinct top-k rows per (layer, anchor): enough variety, 0.1 s to draw
STEP_NS = 40_000_000  # a synthetic step every 40 ms
LAYER_NS = 4_000_000  # layers 4 ms apart


@dataclass(frozen=True)
class SynthSpec:
    """What to generate. steps are prefill steps (normal dispatch/combine on buffer 0);
    decode_steps follow them as low-latency ll_dispatch/ll_combine on buffer 1 with
    decode_tokens tokens per rank (<= 128, DeepEP's usual M)."""

    ranks: int
    steps: int
    layers: int
    tokens: int
    experts: int
    topk: int
    seed: int = 0
    hidden: int = 7168
    level: str = "routing"  # "counts" or "routing"
    straggler_rank: int | None = None
    straggler_factor: float = 2.5  # the straggler arrives (factor - 1) x a call's base time late
    decode_steps: int = 0
    decode_tokens: int = 128
    release: str = "synthetic"
    run_id: str = ""

    @property
    def local(self) -> int:
        return self.experts // self.ranks


def _check(spec: SynthSpec) -> None:
    if spec.ranks < 1 or spec.experts % spec.ranks:
        raise UsageError(f"experts={spec.experts} must be a multiple of ranks={spec.ranks} (DeepEP places E/R experts per rank)")
    if not 1 <= spec.topk <= min(spec.experts, 64):
        raise UsageError(f"topk={spec.topk}: need 1 <= topk <= min(experts, 64)")
    if spec.level not in ("counts", "routing"):
        raise UsageError(f"level={spec.level!r}: synthetic runs are 'counts' or 'routing'")
    if spec.straggler_rank is not None and not 0 <= spec.straggler_rank < spec.ranks:
        raise UsageError(f"straggler_rank={spec.straggler_rank} outside 0..{spec.ranks - 1}")


class Pools:
    """Per layer, two anchor pools (start and end of the run) of top-k rows: idx [P, K] int64
    (distinct experts per row) and weights [P, K] float32 (normalised gate values)."""

    def __init__(self, spec: SynthSpec) -> None:
        rng = np.random.default_rng([spec.seed, 1])
        self.idx: list[tuple[np.ndarray, np.ndarray]] = []
        self.w: list[tuple[np.ndarray, np.ndarray]] = []
        E, K = spec.experts, spec.topk
        for _layer in range(spec.layers):
            pair_i, pair_w = [], []
            base = rng.normal(0.0, 0.6, E)
            for _anchor in range(2):
                logit = base + rng.normal(0.0, 0.35, E)  # drift between the anchors
                hot = rng.choice(E, size=max(1, E // 64), replace=False)
                logit[hot] += rng.uniform(1.0, 2.2, hot.size)  # a few hot experts per layer
                g = logit[None, :] + rng.gumbel(size=(POOL_ROWS, E))  # Gumbel top-k = sampling w/o replacement
                top = np.argpartition(-g, K - 1, axis=1)[:, :K]
                score = np.take_along_axis(g, top, 1)
                order = np.argsort(-score, axis=1)
                top = np.take_along_axis(top, order, 1)
                score = np.take_along_axis(score, order, 1)
                w = np.exp(score - score[:, :1])
                pair_i.append(top.astype(np.int64))
                pair_w.append((w / w.sum(1, keepdims=True)).astype(np.float32))
            self.idx.append((pair_i[0], pair_i[1]))
            self.w.append((pair_w[0], pair_w[1]))

    def draw(self, spec: SynthSpec, step: int, layer: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """Every rank's routing of (step, layer): idx_RTK int64, w_RTK float32 (deterministic)."""
        rng = np.random.default_rng([spec.seed, 2, step, layer])
        n = spec.ranks * tokens
        total = max(spec.steps + spec.decode_steps - 1, 1)
        pick = rng.integers(0, POOL_ROWS, n)
        late = rng.random(n) < step / total  # share drawn from the end anchor grows with the step
        (a_i, b_i), (a_w, b_w) = self.idx[layer], self.w[layer]
        idx = np.where(late[:, None], b_i[pick], a_i[pick])
        w = np.where(late[:, None], b_w[pick], a_w[pick])
        shape = (spec.ranks, tokens, spec.topk)
        return idx.reshape(shape), w.reshape(shape)


@dataclass(frozen=True)
class CallFacts:
    """Cross-rank facts of one (step, layer) call, for all ranks at once.

    load_RE [R, E] int32 slots per expert sent by each rank; sent_RR [R, R] int32 rows each rank
    sends to each rank (normal dispatch: a token once per destination rank); in_rank_RTR bool."""

    idx_RTK: np.ndarray
    w_RTK: np.ndarray
    load_RE: np.ndarray
    sent_RR: np.ndarray
    in_rank_RTR: np.ndarray
    recv_src: list[np.ndarray] | None = None  # per destination rank: source token of each row


def call_facts(spec: SynthSpec, idx_RTK: np.ndarray, w_RTK: np.ndarray) -> CallFacts:
    R, T, K = idx_RTK.shape
    E, X = spec.experts, spec.local
    r_RTK = np.broadcast_to(np.arange(R)[:, None, None], idx_RTK.shape)
    load_RE = np.bincount((r_RTK * E + idx_RTK).ravel(), minlength=R * E).reshape(R, E).astype(np.int32)
    in_rank = np.zeros((R, T, R), bool)
    t_RTK = np.broadcast_to(np.arange(T)[None, :, None], idx_RTK.shape)
    in_rank[r_RTK, t_RTK, idx_RTK // X] = True
    sent_RR = in_rank.sum(1, dtype=np.int32)
    if R > NVL_PEERS:  # internode records hold no receive order (see _normal_arrays)
        return CallFacts(idx_RTK, w_RTK, load_RE, sent_RR, in_rank)
    # one nonzero over [dst, src, T] gives every destination's rows in (source rank, token) order
    d_N, _s_N, t_N = np.nonzero(in_rank.transpose(2, 0, 1))
    cuts = np.searchsorted(d_N, np.arange(R + 1))
    recv_src = [t_N[cuts[d]:cuts[d + 1]].astype(np.int32) for d in range(R)]
    return CallFacts(idx_RTK, w_RTK, load_RE, sent_RR, in_rank, recv_src)


def _normal_arrays(spec: SynthSpec, f: CallFacts, r: int) -> tuple[dict, dict]:
    """Rank r's dispatch record arrays (records.py's dispatch rows) at the spec's level."""
    X = spec.local
    arrays = {
        "num_tokens_per_rank_R": f.sent_RR[r],
        "num_tokens_per_expert_E": f.load_RE[r],
        "recv_tokens_per_rank_R": np.ascontiguousarray(f.sent_RR[:, r]),
        "recv_tokens_per_expert_L": f.load_RE[:, r * X:(r + 1) * X].sum(0, dtype=np.int64),
    }
    if spec.level == "routing":
        arrays["topk_idx_TK"] = f.idx_RTK[r]
        arrays["topk_weights_TK"] = f.w_RTK[r]
        if spec.ranks <= NVL_PEERS:  # what capture keeps of DeepEP's intranode 6-tuple handle
            # rows arrive grouped by source rank, each block in source token order
            arrays["recv_src_idx_N"] = f.recv_src[r]
            arrays["rank_prefix_matrix_RR"] = np.cumsum(f.sent_RR, axis=0, dtype=np.int32)
        # above NVL_PEERS ranks DeepEP's internode 10-tuple handle carries no source token index
        # (only per-source counts, recv_tokens_per_rank_R): a capture records none, nor do we
    meta = {"hidden": spec.hidden, "x_dtype": "bfloat16", "num_experts": spec.experts,
            "handle_len": 6 if spec.ranks <= NVL_PEERS else 10}
    return arrays, meta


def _ll_arrays(spec: SynthSpec, f: CallFacts, r: int) -> tuple[dict, dict]:
    """Rank r's ll_dispatch record arrays: per local expert, valid rows in blocks by source rank."""
    R, T, K = f.idx_RTK.shape
    X = spec.local
    arrays: dict[str, np.ndarray] = {"recv_count_L": f.load_RE[:, r * X:(r + 1) * X].sum(0, dtype=np.int32)}
    if spec.level == "routing":
        arrays["topk_idx_TK"] = f.idx_RTK[r]
        s_V, t_V, k_V = np.nonzero((f.idx_RTK >= r * X) & (f.idx_RTK < (r + 1) * X))
        e_V = f.idx_RTK[s_V, t_V, k_V] - r * X
        order = np.lexsort((t_V, s_V, e_V))  # expert-major, then source rank, then token
        arrays["src_info_V"] = t_V[order].astype(np.int32)
        count_LR = f.load_RE[:, r * X:(r + 1) * X].T.astype(np.int64)  # [X, R]
        begin_LR = np.cumsum(count_LR, axis=1) - count_LR
        arrays["layout_range_LR"] = (begin_LR << 32) | count_LR
    meta = {"hidden": spec.hidden, "use_fp8": True, "num_experts": spec.experts,
            "M": spec.decode_tokens}
    return arrays, meta


def _durations(spec: SynthSpec, rng: np.random.Generator, work_R: np.ndarray, base_ns: float,
               start_R: np.ndarray) -> np.ndarray:
    """Per-rank call durations [R] int64 ns: a base, a share proportional to the rank's received
    rows, log-normal noise. The planted straggler arrives (straggler_factor - 1) x base late
    (start_R is shifted in place) and every other rank waits for it inside the call, as in
    DeepEP, where a late rank shows up as long calls on its peers."""
    mean = max(float(work_R.mean()), 1.0)
    d = base_ns * (0.6 + 0.4 * work_R / mean) * rng.lognormal(0.0, 0.08, work_R.size)
    s = spec.straggler_rank
    if s is not None:
        start_R[s] += int(base_ns * (spec.straggler_factor - 1.0))
        # nobody finishes before the straggler arrived and did its share
        d = np.maximum(d, (start_R[s] - start_R) + 0.8 * d[s])
    return d.astype(np.int64)


class SynthWriter:
    """Writes ranks `ranks` of a synthetic run step by step into open shards (a live capture, as
    far as a reader can tell, until `close`). The run directory and manifest must exist."""

    def __init__(self, path: str | os.PathLike[str], spec: SynthSpec, ranks: range | None = None) -> None:
        from epreplay.format.shard import ShardWriter

        self.spec = spec
        self.run = RunDir(Path(path))
        self.ranks = range(spec.ranks) if ranks is None else ranks
        self.pools = Pools(spec)
        level = Level.parse(spec.level)
        self.writers = {r: ShardWriter(self.run.shard_path(r), ShardInfo(
            spec.run_id, r, spec.ranks, spec.experts, spec.topk, spec.hidden, level,
            created_ns=1_700_000_000_000_000_000), zstd_level=1) for r in self.ranks}  # level 1: generation speed
        self.level = level

    def write_steps(self, lo: int, hi: int) -> None:
        """Append every record of steps [lo, hi) (prefill then decode numbering) on our ranks."""
        spec = self.spec
        for step in range(lo, hi):
            decode = step >= spec.steps
            T = spec.decode_tokens if decode else spec.tokens
            for layer in range(spec.layers):
                idx, w = self.pools.draw(spec, step, layer, T)
                f = call_facts(spec, idx, w)
                rng = np.random.default_rng([spec.seed, 3, step, layer])
                recv_R = f.sent_RR.sum(0)
                start0 = 1_700_000_000_000_000_000 + step * STEP_NS + layer * LAYER_NS
                start_R = start0 + rng.integers(0, 20_000, spec.ranks)
                d_disp = _durations(spec, rng, recv_R, 60_000 if decode else 250_000, start_R)
                c_start_R = start_R + d_disp + 1000
                d_comb = _durations(spec, rng, recv_R, 60_000 if decode else 300_000, c_start_R)
                if decode:
                    buffer, seq = 1, 2 * ((step - spec.steps) * spec.layers + layer)
                    ops = (Op.LL_DISPATCH, Op.LL_COMBINE)
                else:
                    buffer, seq = 0, 2 * (step * spec.layers + layer)
                    ops = (Op.DISPATCH, Op.COMBINE)
                for r in self.ranks:
                    arrays, meta = (_ll_arrays if decode else _normal_arrays)(spec, f, r)
                    head = RecordHeader(Kind.CALL, int(ops[0]), self.level, Status.OK, buffer, seq,
                                        step, layer, T, start_ns=int(start_R[r]),
                                        duration_ns=int(d_disp[r]))
                    self.writers[r].append(head, arrays, meta)
                    c_arrays: dict[str, np.ndarray] = {}
                    if decode and spec.level == "routing":
                        c_arrays = {"topk_idx_TK": f.idx_RTK[r], "topk_weights_TK": f.w_RTK[r]}
                    head = RecordHeader(Kind.CALL, int(ops[1]), self.level, Status.OK, buffer, seq + 1,
                                        step, layer, T, start_ns=int(c_start_R[r]),
                                        duration_ns=int(d_comb[r]))
                    self.writers[r].append(head, c_arrays, {"dispatch_seq": seq})

    def close(self) -> None:
        for w in self.writers.values():
            w.close()


def create_run(path: str | os.PathLike[str], spec: SynthSpec) -> tuple[RunDir, SynthSpec]:
    """Create the run directory and its manifest; returns the spec with its run id filled in."""
    _check(spec)
    if not spec.run_id:
        spec = SynthSpec(**{**asdict(spec), "run_id": new_run_id()})
    run = RunDir.create(path)
    run.write_manifest(Manifest(
        run_id=spec.run_id, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        world_size=spec.ranks, num_experts=spec.experts, topk=spec.topk, hidden=spec.hidden,
        level=spec.level, release=spec.release, command=["epreplay.demo.synth"],
        versions={"epreplay": "synthetic"}, hosts=[f"synth{r // 8}" for r in range(0, spec.ranks, 8)],
        extra={"synthetic": asdict(spec)}))
    return run, spec


def _write_block(path: str, spec: SynthSpec, lo: int, hi: int) -> int:
    writer = SynthWriter(path, spec, range(lo, hi))
    try:
        writer.write_steps(0, spec.steps + spec.decode_steps)
    finally:
        writer.close()
    return hi - lo


def make_synthetic_run(path: str | os.PathLike[str], *, ranks: int, steps: int, layers: int,
                       tokens: int, experts: int, topk: int, seed: int = 0,
                       straggler_rank: int | None = None, decode_steps: int = 0,
                       decode_tokens: int = 128, level: str = "routing", hidden: int = 7168,
                       release: str = "synthetic", workers: int | None = None) -> SynthSpec:
    """Generate a complete synthetic run at `path` (a new directory) and return its spec.

    Args:
        ranks / steps / layers / tokens / experts / topk: R, prefill steps, MoE layers, T per rank,
            E (a multiple of R), K.
        seed: everything is a deterministic function of the spec (same seed -> same bytes of data).
        straggler_rank: this rank arrives late at every call and the others wait for it inside
            the call (SynthSpec.straggler_factor; None: no straggler).
        decode_steps / decode_tokens: a low-latency decode phase after the prefill steps.
        level: "routing" (topk_idx/weights, receive layout) or "counts" (counts only).
        workers: processes writing disjoint blocks of ranks (default: the CPU count, at most 8).
    Raises:
        UsageError: bad shapes, or `path` already holds a run.
    """
    spec = SynthSpec(ranks, steps, layers, tokens, experts, topk, seed, hidden, level,
                     straggler_rank, 2.5, decode_steps, decode_tokens, release)
    run, spec = create_run(path, spec)
    workers = max(1, min(workers or min(os.cpu_count() or 1, 8), ranks))
    bounds = np.linspace(0, ranks, workers + 1).astype(int)
    blocks = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if len(blocks) == 1:
        _write_block(str(run.path), spec, 0, ranks)
        return spec
    with ProcessPoolExecutor(len(blocks), mp_context=get_context("fork")) as pool:
        for fut in [pool.submit(_write_block, str(run.path), spec, a, b) for a, b in blocks]:
            fut.result()
    return spec
