"""Low-latency (decode) ops on one physical rank: LL dispatch and LL combine.

Legend: see ops.py; X = M * Mll * B receive slots per physical local expert (M physical ranks,
each sending up to B * Mll tokens), V valid rows.

LL receive order is non-deterministic in DeepEP, so a virtual rank's receive is compared as a
set per local expert keyed by (source virtual rank, source token), each with its fingerprint.
"""
from __future__ import annotations

import time
from functools import partial
from typing import Any

import numpy as np
import torch

from epreplay.replay import inputs as I
from epreplay.replay.state import DispatchState
from epreplay.replay.verify import check_close, check_ll

# DeepEP's LL test tolerances (deepep-semantics.md): bf16 / fp8 dispatch.
COMBINE_TOL_BF16 = 1e-5
COMBINE_TOL_FP8 = 9e-4


def _nbytes(x: Any) -> int:
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(p) for p in x)
    return x.numel() * x.element_size()


def _flag(meta: dict, name: str, default: bool) -> bool:
    v = I.meta_value(meta, name, default=default)
    return bool(v) if isinstance(v, (bool, int)) else default


def _recv_rows_fp(recv_x: Any, e_R: np.ndarray, rows_R: np.ndarray, version: int) -> np.ndarray:
    """Fingerprints (definition `version`) of receive rows (local expert e_R[i], row rows_R[i])
    in one pass."""
    e, r = torch.from_numpy(e_R), torch.from_numpy(rows_R)
    if isinstance(recv_x, (tuple, list)):
        return I.fingerprints((recv_x[0][e, r], recv_x[1][e, r].contiguous()), version=version)
    return I.fingerprints(recv_x[e, r], version=version)


def dispatch(eng: Any, call: Any, recs: dict) -> tuple[int, int]:
    plan, vs = eng.plan, eng.vs
    meta = recs[vs[0]].meta
    mll = int(I.meta_value(meta, "M", "num_max_dispatch_tokens_per_rank",
                           default=eng.job.ll_max_tokens.get(call.buffer, 0)) or 0)
    if mll <= 0:
        mll = max(call.tokens_N)
    use_fp8 = _flag(meta, "use_fp8", True)
    kwargs = {"use_fp8": use_fp8}
    for name in ("round_scale", "use_ue8m0"):
        if _flag(meta, name, False):
            kwargs[name] = True
    cast = (partial(I.to_fp8, round_scale=bool(kwargs.get("round_scale")), ue8m0=bool(kwargs.get("use_ue8m0")))
            if use_fp8 else None)
    topk = {}
    for v in vs:
        t = I.tensor(recs[v].arrays, recs[v].meta, "topk_idx_TK")
        if t is None:
            raise RuntimeError(f"rank {v}: ll_dispatch record holds no topk_idx_TK (capture level "
                               f"'counts'); replay needs level 'routing' or above")
        topk[v] = t.to(torch.int64)
    x = {}
    for v in vs:  # LL input is always bf16; FP8 happens inside the kernel
        x[v] = eng.payload(call, v, recs[v], call.tokens_N[v], fp8=False)
        if isinstance(x[v], tuple):
            x[v] = I.dequant(x[v]).to(torch.bfloat16)
    x_p = torch.cat([x[v] for v in vs]).to(eng.device)
    topk_p = torch.cat([topk[v] for v in vs]).to(eng.device)
    buf = eng.buffer(call)
    t0 = time.perf_counter_ns()
    out = buf.low_latency_dispatch(x_p, topk_p, mll * plan.per_process, eng.job.experts, **kwargs)
    eng.sync()  # GPU kernels run asynchronously: time them to completion
    dt = time.perf_counter_ns() - t0
    recv_x, recv_count, handle = out[0], out[1].cpu(), out[2]
    recv_x = tuple(t.cpu() for t in recv_x) if isinstance(recv_x, tuple) else recv_x.cpu()
    src_info = handle[0].cpu().numpy().astype(np.int64)
    lrange = handle[1].cpu().numpy().astype(np.int64)
    st = eng.states[(call.buffer, call.seq)] = DispatchState(handle, x, topk, {}, recv_x)
    st.extra.update(use_fp8=use_fp8, recv_count=recv_count, cast=cast)
    exp: dict = {}
    for v in vs:  # expected sets first: their fingerprints tell swapped rows from corrupt ones
        eng.check(call, v, lambda v=v: exp.__setitem__(v, _expected(eng, call, v, recs[v], cast)) or [])
    known = frozenset(f for e in exp.values() if e for i, rows in e.items() if i != "counts" and rows
                      for f in rows.values() if f is not None)
    for v in vs:
        if exp.get(v) is not None:
            eng.check(call, v, lambda v=v: _verify_dispatch(eng, call, v, exp[v], recv_x, recv_count,
                                                             src_info, lrange, known))
    return dt, _nbytes(x_p)


def _verify_dispatch(eng: Any, call: Any, v: int, exp: dict, recv_x: Any, recv_count: torch.Tensor,
                     src_info: np.ndarray, lrange: np.ndarray, known: frozenset) -> list[tuple]:
    """Virtual rank v's rows of the physical LL receive, as sets per local expert."""
    plan = eng.plan
    Lv = plan.local_experts_virtual
    j = plan.slot_of(v)
    got: dict = {"counts": recv_count[j * Lv:(j + 1) * Lv].numpy().astype(np.int64)}
    es, rows, qs = [], [], []
    for i in range(Lv):
        e = j * Lv + i
        for q in range(plan.physical):
            begin, count = int(lrange[e, q]) >> 32, int(lrange[e, q]) & 0xFFFFFFFF
            es.append(np.full(count, e))
            rows.append(np.arange(begin, begin + count))
            qs.append(np.full(count, q))
    e_R = np.concatenate(es).astype(np.int64)
    rows_R = np.concatenate(rows).astype(np.int64)
    src, tok = eng.to_virtual(call, np.concatenate(qs).astype(np.int64), src_info[e_R, rows_R])
    want_fp = any(f is not None for i in range(Lv) for f in (exp.get(i) or {}).values())
    version = eng.fp_version(eng.record(v, call))
    fps = _recv_rows_fp(recv_x, e_R, rows_R, version).tolist() if want_fp and len(e_R) else [None] * len(e_R)
    for i in range(Lv):
        got[i] = {}
    for e, s_, t, f in zip((e_R - j * Lv).tolist(), src.tolist(), tok.tolist(), fps):
        got[e][(s_, t)] = f
    return check_ll(exp, got, expert_base=v * Lv, known_fps=known)


def _expected(eng: Any, call: Any, u: int, rec: Any, cast: Any) -> dict | None:
    """Virtual rank u's recorded LL receive as sets per local expert ({(src, tok): fingerprint});
    `cast` is the kernel's FP8 cast for recomputed synthetic fingerprints (None: bf16)."""
    a = rec.arrays
    counts = a.get("recv_count_L")
    if counts is None:
        return None
    exp: dict = {"counts": counts.astype(np.int64)}
    lr, info = a.get("layout_range_LR"), a.get("src_info_V")
    if lr is None or info is None:
        return _counts_only(exp, counts)
    base = np.concatenate([[0], np.cumsum(counts.astype(np.int64))])
    lr = lr[:len(counts)].astype(np.int64)
    # one block per (local expert, source), expert-major: rows base[i] + begin .. + count
    n_B = (lr & 0xFFFFFFFF).ravel()
    start_B = (base[:lr.shape[0], None] + (lr >> 32)).ravel()
    src = np.repeat(np.tile(np.arange(lr.shape[1], dtype=np.int64), lr.shape[0]), n_B)
    rows = np.repeat(start_B, n_B) + (np.arange(int(n_B.sum())) - np.repeat(np.cumsum(n_B) - n_B, n_B))
    tok = info[rows].astype(np.int64)
    if eng.recorded_now:
        fp_all = a.get("recv_x_fp_V")
        fp = fp_all[rows] if fp_all is not None else None
    else:
        fp = (eng.expected_fp(call, rec, "recv_x_fp_V", src, tok, cast) if len(src)
              else np.zeros(0, np.uint64))
    expert_of_row = np.searchsorted(base, rows, side="right") - 1
    for i in range(len(counts)):
        m = expert_of_row == i
        keys = zip(src[m].tolist(), tok[m].tolist())
        exp[i] = dict(zip(keys, fp[m].tolist())) if fp is not None else dict.fromkeys(keys)
    return exp


def _counts_only(exp: dict, counts: np.ndarray) -> dict:
    """A counts-level recording: only the per-expert counts can be checked (sets compare equal)."""
    return {"counts": exp["counts"], **{i: None for i in range(len(counts))}}


def combine(eng: Any, call: Any, recs: dict) -> tuple[int, int]:
    """Synthetic experts: expert e's output row is bf16(row * expert_scale(e)); DeepEP weights
    and sums them over k, so each source can compute its own expected output."""
    st = eng.parent(call, recs)
    plan, p, vs = eng.plan, eng.p, eng.vs
    Lp = plan.local_experts_physical
    topk, w = {}, {}
    for v in vs:
        t = I.tensor(recs[v].arrays, recs[v].meta, "topk_idx_TK")
        topk[v] = t.to(torch.int64) if t is not None else st.topk_V[v]
        wt = I.tensor(recs[v].arrays, recs[v].meta, "topk_weights_TK")
        w[v] = wt.float() if wt is not None else torch.full(topk[v].shape, 1.0 / topk[v].shape[1])
    recv_x, counts = st.recv_x, st.extra["recv_count"]
    first = recv_x[0] if isinstance(recv_x, tuple) else recv_x
    Lx, X, H = first.shape
    # rows past recv_count are never read (DeepEP leaves them as garbage too): no zero fill,
    # which at [Lp, M * B * Mll, H] would cost more than the combine itself
    out_x = torch.empty(Lx, X, H, dtype=torch.bfloat16)
    for e in range(Lx):
        n = int(counts[e])
        if n == 0:
            continue
        rows = (recv_x[0][e, :n], recv_x[1][e, :n]) if isinstance(recv_x, tuple) else recv_x[e, :n]
        scale = float(I.expert_scale(torch.tensor(p * Lp + e)))
        out_x[e, :n] = (I.dequant(rows) * scale).to(torch.bfloat16)
    topk_p = torch.cat([topk[v] for v in vs]).to(eng.device)
    w_p = torch.cat([w[v] for v in vs]).to(eng.device)
    buf = eng.buffer(call)
    t0 = time.perf_counter_ns()
    combined = buf.low_latency_combine(out_x.to(eng.device), topk_p, w_p, st.handle)[0]
    eng.sync()  # GPU kernels run asynchronously: time them to completion
    dt = time.perf_counter_ns() - t0
    combined = combined.cpu()
    off = eng.offsets(call, p)
    tol = COMBINE_TOL_FP8 if st.extra.get("use_fp8") else COMBINE_TOL_BF16
    for i, v in enumerate(vs):
        eng.check(call, v, lambda i=i, v=v: _verify_combine(st, topk[v], w[v], v,
                                                            combined[off[i]:off[i + 1]], tol))
    return dt, _nbytes(out_x)


def _verify_combine(st: Any, t: torch.Tensor, wv: torch.Tensor, v: int, got: torch.Tensor,
                    tol: float) -> list[tuple]:
    """Source-side reference: fp32 sum over k ascending of w * bf16(expert output), as DeepEP."""
    cast = st.extra.get("cast")  # the kernel's own FP8 cast (round_scale / UE8M0 as recorded)
    x_f = I.dequant(cast(st.x_V[v])) if cast is not None else st.x_V[v].float()
    ref = torch.zeros_like(x_f)
    for k in range(t.shape[1]):
        valid = t[:, k] >= 0
        y = (x_f * I.expert_scale(t[:, k].clamp(min=0))[:, None]).to(torch.bfloat16).float()
        ref += torch.where(valid[:, None], y * wv[:, k:k + 1], 0.0)
    ref = ref.to(torch.bfloat16).float()
    return check_close(ref.numpy(), got.float().numpy(), tol, what="low-latency combine")
