"""Run the demo workload on N processes through a DeepEP-API Buffer; collect what it routed.

Legend: R ranks, S steps, NL layers, E experts, K top-k, H hidden, L = E / R local experts,
T tokens on a rank, N rows a normal dispatch received, M = num_max_dispatch_tokens_per_rank.

Each rank is a "card": it builds its token batches (demo.model.rank_batch), and per layer
  prefill step: get_dispatch_layout -> dispatch -> local SwiGLU experts (weights applied on the
                expert side) -> combine                          (DeepEP's normal mode)
  decode step:  low_latency_dispatch -> local experts -> low_latency_combine (weights applied by
                the combine; each call's receive in its recv hook)  (DeepEP's low-latency mode)
inside `marks.step(s)` / `marks.layer(l)`, with `marks.tag_tokens(tags)` before every dispatch,
so a recorder attributes every call and can match tokens across runs.

Recording is the caller's business: `run_demo(..., rank_hooks=RankHooks(...), env=...)` lets the
caller (cmd_demo) start capture in each rank without this core module importing capture.
"""
from __future__ import annotations

import hashlib
import importlib
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from epreplay.diff import metrics

from epreplay import marks
from epreplay.demo.model import (DemoConfig, rms_norm, route_layer, rank_batch, swiglu,
                                 swiglu_weights)
from epreplay.format.fp8 import cast_fp8

# DeepEP's intranode test allocates 2 GB of NVLink buffer for its normal-mode Buffer; an emulator
# only checks sizes against it, so the same figure costs nothing on CPU.
NVL_BYTES = int(2e9)


@dataclass(frozen=True)
class RankHooks:
    """'module:function' names each rank calls before creating its Buffers and after its last
    call (e.g. "epreplay.capture:install" and "epreplay.capture:stop")."""

    start: str = ""
    stop: str = ""


@dataclass(frozen=True)
class RankResult:
    """What one rank routed and moved.

    Attributes:
        rank: the rank.
        tokens_S: [S] int64 tokens this rank processed per step.
        load_SLE: [S, NL, E] int64 (token, slot) pairs this rank routed to each expert.
        send_SLR: [S, NL, R] int64 rows this rank sent to each rank (metrics.rows_sent: a token
            once per destination rank in prefill's normal dispatch, once per expert slot in decode's
            low-latency dispatch — what the index's traffic table counts).
        recv_SL: [S, NL] int64 rows this rank received (N normal, sum(recv_count) low-latency).
        ll_recv_stats_L: [L] int64 cumulative_local_expert_recv_stats after the run.
        routing_digest: sha256 of every topk_idx/topk_weights in call order (determinism checks).
        output_rms: RMS of the final output stream over the last step (finite = no NaN).
        seconds: wall time of the rank's loop.
    """

    rank: int
    tokens_S: np.ndarray
    load_SLE: np.ndarray
    send_SLR: np.ndarray
    recv_SL: np.ndarray
    ll_recv_stats_L: np.ndarray
    routing_digest: str
    output_rms: float
    seconds: float


def _call_hook(name: str) -> None:
    if name:
        module, _, fn = name.partition(":")
        getattr(importlib.import_module(module), fn)()


def _buffer_class(backend: str) -> Any:
    if backend == "deepep":
        import deep_ep

        return deep_ep.Buffer
    if ":" in backend:  # "module:Class": any class with DeepEP's V1 Buffer API
        module, _, name = backend.partition(":")
        return getattr(importlib.import_module(module), name)
    from epreplay import emulate

    return emulate.Buffer


def _dequant(recv_x: Any) -> Any:
    """bf16 tensor, or DeepEP's (e4m3 [..., H], scales fp32 [..., H/128]) -> float32 [..., H]."""
    if not isinstance(recv_x, tuple):
        return recv_x.float()
    q, s = recv_x
    shape = q.shape
    groups = q.float().reshape(*shape[:-1], shape[-1] // 128, 128)
    return (groups * s.float().unsqueeze(-1)).reshape(shape)


class _Card:
    """One rank's model state: local expert weights (per layer) and its two Buffers."""

    def __init__(self, cfg: DemoConfig, rank: int, world: int, device: str, Buffer: Any) -> None:
        import torch.distributed as dist

        self.cfg, self.rank, self.R, self.device = cfg, rank, world, device
        self.L = cfg.experts // world
        group = dist.group.WORLD
        self.normal = Buffer(group, NVL_BYTES, 0, low_latency_mode=False, explicitly_destroy=True)
        rdma = Buffer.get_low_latency_rdma_size_hint(cfg.decode_tokens, cfg.hidden, world, cfg.experts)
        self.ll = Buffer(group, 0, rdma, low_latency_mode=True, num_qps_per_rank=self.L,
                         explicitly_destroy=True)
        self._experts: dict[tuple[int, int], tuple] = {}

    def expert(self, layer: int, local: int) -> tuple:
        key = (layer, local)
        if key not in self._experts:
            w = swiglu_weights(self.cfg, layer, self.rank * self.L + local if local >= 0 else -1)
            self._experts[key] = tuple(t.to(self.device) for t in w)
        return self._experts[key]

    def destroy(self) -> None:
        self.normal.destroy()
        self.ll.destroy()

    def moe_normal(self, layer: int, u_TH: Any, idx_TK: Any, w_TK: Any, tags_T: np.ndarray) -> tuple[Any, int]:
        """Prefill path. Returns (routed output [T, H] float32, rows received)."""
        import torch

        buf, cfg = self.normal, self.cfg
        n_rank, n_rdma, n_expert, in_rank, _ = buf.get_dispatch_layout(idx_TK, cfg.experts)
        x_bf = u_TH.to(torch.bfloat16)
        x = cast_fp8(x_bf) if cfg.fp8 else x_bf  # DeepEP's per-128 cast, as DeepSeek's prefill sends
        marks.tag_tokens(tags_T)
        recv_x, recv_idx, recv_w, _counts, handle, _ = buf.dispatch(
            x, num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma, is_token_in_rank=in_rank,
            num_tokens_per_expert=n_expert, topk_idx=idx_TK, topk_weights=w_TK)
        xr_NH = _dequant(recv_x)
        out_NH = torch.zeros_like(xr_NH)
        for e in range(self.L):
            rows, slots = (recv_idx == e).nonzero(as_tuple=True)
            if rows.numel():
                y = swiglu(xr_NH[rows], self.expert(layer, e)) * recv_w[rows, slots].unsqueeze(1)
                out_NH.index_add_(0, rows, y)
        combined_TH, _, _ = buf.combine(out_NH.to(torch.bfloat16), handle)
        return combined_TH.float(), int(xr_NH.shape[0])

    def moe_ll(self, layer: int, u_TH: Any, idx_TK: Any, w_TK: Any, tags_T: np.ndarray,
               stats_L: Any) -> tuple[Any, int]:
        """Decode path. Returns (routed output [T, H] float32, valid rows received)."""
        import torch

        cfg = self.cfg
        marks.tag_tokens(tags_T)
        # as DeepEP's overlapped decode calls them: each call returns once its sends are issued and
        # its receive runs in the recv hook, called where the rows are needed
        recv_x, recv_count, handle, _, recv = self.ll.low_latency_dispatch(
            u_TH.to(torch.bfloat16), idx_TK, cfg.decode_tokens, cfg.experts,
            cumulative_local_expert_recv_stats=stats_L, use_fp8=cfg.fp8, return_recv_hook=True)
        recv()
        xr = _dequant(recv_x)  # [L, R*M, H]
        out = torch.zeros(xr.shape, dtype=torch.bfloat16, device=xr.device)
        counts = recv_count.tolist()
        for e, n in enumerate(counts):
            if n:
                out[e, :n] = swiglu(xr[e, :n], self.expert(layer, e)).to(torch.bfloat16)
        combined_TH, _, recv = self.ll.low_latency_combine(out, idx_TK, w_TK, handle, return_recv_hook=True)
        recv()
        return combined_TH.float(), int(sum(counts))


def rank_main(ctx: Any, cfg: DemoConfig, hooks: RankHooks | None, backend: str,
              progress: Any = None, deepep: str = "v1") -> RankResult:
    """The per-rank body (module level: run_ranks pickles it). deepep: "v1" (Buffer) or "v2"
    (ElasticBuffer, demo/elastic.py)."""
    import torch

    if hooks:
        _call_hook(hooks.start)
    t0 = time.perf_counter()
    R, rank, S, NL, E = ctx.world_size, ctx.rank, cfg.steps, cfg.layers, cfg.experts
    if deepep == "v2":
        from epreplay.demo.elastic import ElasticCard, elastic_class

        card: Any = ElasticCard(cfg, rank, R, ctx.device, elastic_class(backend))
    else:
        card = _Card(cfg, rank, R, ctx.device, _buffer_class(backend))
    tokens_S = np.zeros(S, np.int64)
    load_SLE = np.zeros((S, NL, E), np.int64)
    send_SLR = np.zeros((S, NL, R), np.int64)
    recv_SL = np.zeros((S, NL), np.int64)
    stats_L = torch.zeros(card.L, dtype=torch.int32, device=ctx.device)
    digest = hashlib.sha256()
    y_TH = None
    try:
        for s in range(S):
            x0, tags = rank_batch(cfg, s, rank)
            tokens_S[s] = len(tags)
            h_TH = torch.from_numpy(x0).to(ctx.device)
            y_TH = torch.zeros_like(h_TH)
            with marks.step(s):
                for layer in range(NL):
                    with marks.layer(layer):
                        u_TH = rms_norm(h_TH)
                        idx_TK, w_TK = route_layer(cfg, layer, h_TH)
                        idx_np = idx_TK.cpu().numpy()
                        digest.update(idx_np.tobytes())
                        digest.update(w_TK.cpu().numpy().tobytes())
                        load_SLE[s, layer] = np.bincount(idx_np.ravel(), minlength=E)
                        # rows sent: the index's definition (normal dispatch once per
                        # destination rank, low-latency once per expert slot)
                        send_SLR[s, layer] = metrics.rows_sent(idx_np, E, R,
                                                               per_destination=cfg.is_prefill(s) or deepep == "v2")
                        if rank == cfg.slow_rank and cfg.slow_ms:
                            time.sleep(cfg.slow_ms / 1e3)  # the straggler's extra "compute"
                        if cfg.is_prefill(s):
                            routed, rows = card.moe_normal(layer, u_TH, idx_TK, w_TK, tags)
                        else:
                            routed, rows = card.moe_ll(layer, u_TH, idx_TK, w_TK, tags, stats_L)
                        recv_SL[s, layer] = rows
                        shared = swiglu(u_TH, card.expert(layer, -1))
                        h_TH = h_TH + shared + cfg.routed_feedback * routed
                        y_TH = y_TH + routed
                    if progress is not None and rank == 0:
                        progress.put((s, layer))
    finally:
        card.destroy()
        if hooks:
            _call_hook(hooks.stop)
    rms = float(y_TH.pow(2).mean().sqrt()) if y_TH is not None else 0.0
    return RankResult(rank, tokens_S, load_SLE, send_SLR, recv_SL,
                      stats_L.cpu().numpy().astype(np.int64), digest.hexdigest(), rms,
                      time.perf_counter() - t0)


@dataclass(frozen=True)
class DemoResult:
    """The whole run, aggregated over ranks.

    Attributes:
        config: the workload.
        ranks: per-rank results, by rank.
        load_SLE: [S, NL, E] int64 global expert load.
        traffic_SLRR: [S, NL, R, R] int64 tokens sent from rank (row) to rank (column).
        seconds: wall time of the whole group, process start included.
    """

    config: DemoConfig
    ranks: list[RankResult]
    load_SLE: np.ndarray
    traffic_SLRR: np.ndarray
    seconds: float

    @property
    def tokens(self) -> int:
        return int(sum(r.tokens_S.sum() for r in self.ranks))

    @property
    def tokens_moved(self) -> int:
        """Rows sent between different ranks (self-sends excluded), all steps and layers: the
        index's `SELECT sum(tokens) FROM traffic WHERE src_rank <> dst_rank` (metrics.rows_sent)."""
        t = self.traffic_SLRR
        return int(t.sum() - np.trace(t, axis1=2, axis2=3).sum())

    @property
    def received_R(self) -> np.ndarray:
        """[R] int64 rows each rank received over the run (its expert work)."""
        return np.array([r.recv_SL.sum() for r in self.ranks], dtype=np.int64)

    def hottest(self, n: int = 5) -> list[tuple[int, float]]:
        """The n experts with the largest share of all (token, slot) pairs: [(expert, share)]."""
        load_E = self.load_SLE.sum(axis=(0, 1))
        order = np.argsort(-load_E, kind="stable")[:n]
        total = max(1, int(load_E.sum()))
        return [(int(e), float(load_E[e]) / total) for e in order]


def run_demo(cfg: DemoConfig, *, backend: str = "emulated", rank_hooks: RankHooks | None = None,
             env: dict[str, str] | None = None, timeout: float = 300.0,
             on_progress: Callable[[int, int], None] | None = None, deepep: str = "v1") -> DemoResult:
    """Run the workload on cfg.ranks processes (gloo on CPU, NCCL with cfg.device == "cuda").

    Args:
        backend: "emulated" (epreplay.emulate.Buffer), "deepep" (the real deep_ep.Buffer) or
            "module:Class" naming any class with DeepEP's V1 Buffer API.
        rank_hooks: functions each rank calls around its work (capture start/stop).
        env: extra environment for the ranks (capture's env_for()).
        timeout: seconds for the whole group before every rank is stopped.
        on_progress: called in this process with (layers done, total layers) as rank 0 advances.
        deepep: "v1" (DeepEP's Buffer, normal + low-latency modes) or "v2" (ElasticBuffer for both).

    Raises:
        epreplay.launch.RankFailed: a rank raised or the group timed out.
    """
    from epreplay.launch import _context, run_ranks

    t0 = time.perf_counter()
    progress = _context().Queue() if on_progress else None
    total = cfg.steps * cfg.layers
    stop = threading.Event()

    def pump() -> None:
        import queue

        while not stop.is_set():
            try:
                s, layer = progress.get(timeout=0.1)
            except (queue.Empty, OSError, EOFError):
                continue
            on_progress(s * cfg.layers + layer + 1, total)

    thread = threading.Thread(target=pump, daemon=True) if progress is not None else None
    if thread:
        thread.start()
    try:
        results = run_ranks(rank_main, cfg.ranks, cfg, rank_hooks, backend, progress, deepep,
                            timeout=timeout, device=cfg.device, env=env)
    finally:
        stop.set()
        if thread:
            thread.join(timeout=1.0)
    if on_progress:
        on_progress(total, total)
    R = cfg.ranks
    traffic = np.zeros((cfg.steps, cfg.layers, R, R), np.int64)
    for r in results:
        traffic[:, :, r.rank, :] = r.send_SLR
    load = sum(r.load_SLE for r in results)
    return DemoResult(cfg, results, load, traffic, time.perf_counter() - t0)
