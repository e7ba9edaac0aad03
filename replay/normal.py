"""Normal (prefill) ops on one physical rank: layout, dispatch, cached dispatch, combine.

Legend: see ops.py (N virtual ranks, M physical, B per block, j slot, Lv / Lp local experts,
T / Tp tokens, Np physical rows, K top-k, H hidden).

Each handler returns (nanoseconds spent inside the backend, payload bytes moved).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from epreplay.replay import inputs as I
from epreplay.replay.state import DispatchState
from epreplay.replay.verify import Rows, check_close, check_counts, check_rows

# DeepEP's own test tolerance for the weight round trip (deepep-semantics.md). The combine itself
# is compared exactly: see expert_rows.
WEIGHTS_TOL = 1e-9


def _nbytes(x: Any) -> int:
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(p) for p in x)
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


def _to(x: Any, device: str) -> Any:
    if isinstance(x, (tuple, list)):
        return tuple(p.to(device) for p in x)
    return x.to(device)


def _cpu(x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return tuple(p.cpu() for p in x)
    return x.cpu()


def _is_fp8(meta: dict) -> bool:
    return "float8" in str(I.meta_value(meta, "x_dtype", default="")) or bool(
        meta.get("_logical_dtypes", {}).get("x_TH", "").startswith("float8"))


def _routing(eng: Any, call: Any, recs: dict) -> tuple[dict, dict]:
    topk, w = {}, {}
    for v, rec in recs.items():
        t = I.tensor(rec.arrays, rec.meta, "topk_idx_TK")
        if t is None:
            raise RuntimeError(f"rank {v}: {call.op.label} record holds no topk_idx_TK (capture level "
                               f"'counts'); replay needs level 'routing' or above")
        topk[v] = t.to(torch.int64)
        wt = I.tensor(rec.arrays, rec.meta, "topk_weights_TK")
        # DeepEP needs weights with the ids; a recording without them gets deterministic ones.
        w[v] = wt.float() if wt is not None else torch.full(t.shape, 1.0 / max(1, t.shape[1]))
    return topk, w


def _sender_counts(eng: Any, call: Any, recs: dict, topk: dict, n_exp_E: torch.Tensor) -> None:
    """The block's per-expert counts from the backend against the recorded ones, blamed on the
    virtual rank whose recorded counts disagree with its own routing."""
    rec_E = [recs[v].arrays.get("num_tokens_per_expert_E") for v in eng.vs]
    if any(r is None for r in rec_E):
        return
    E = eng.job.experts
    got = n_exp_E.cpu().numpy().astype(np.int64)
    want = np.sum([r.astype(np.int64) for r in rec_E], axis=0)
    if np.array_equal(got, want):
        return
    e = int(np.flatnonzero(got != want)[0])
    blame = eng.vs[0]
    for v in eng.vs:
        t = topk[v].numpy()
        own = np.bincount(t[t >= 0].ravel(), minlength=E)
        if not np.array_equal(own, recs[v].arrays["num_tokens_per_expert_E"]):
            blame = v
            e = int(np.flatnonzero(own != recs[v].arrays["num_tokens_per_expert_E"])[0])
            break
    eng.report(call, blame, [("count", f"{int(want[e])} tokens sent to expert {e}",
                              f"{int(got[e])}", blame, -1, e,
                              "tokens per expert from the replayed routing differ from the recording")])


def layout(eng: Any, call: Any, recs: dict) -> tuple[int, int]:
    topk, _ = _routing(eng, call, recs)
    topk_p = torch.cat([topk[v] for v in eng.vs]).to(eng.device)
    buf = eng.buffer(call)
    t0 = time.perf_counter_ns()
    n_rank, _, n_exp, in_rank, _ = buf.get_dispatch_layout(topk_p, eng.job.experts)
    eng.sync()  # GPU kernels run asynchronously: time them to completion
    dt = time.perf_counter_ns() - t0
    _sender_counts(eng, call, recs, topk, n_exp)
    # Tokens per physical destination: a token counts once per physical rank it reaches.
    home = torch.where(topk_p >= 0, topk_p // eng.plan.local_experts_physical, -1).cpu()
    want = torch.stack([(home == q).any(dim=1).sum() for q in range(eng.plan.physical)])
    got = n_rank.cpu().to(torch.int64)
    if not torch.equal(want, got):
        q = int((want != got).nonzero()[0])
        eng.report(call, eng.vs[0], [("count", f"{int(want[q])} tokens to physical rank {q}",
                                      f"{int(got[q])}", -1, -1, -1, "layout's tokens per rank differ "
                                      "from a reference computed from the recorded routing")])
    return dt, 0


def dispatch(eng: Any, call: Any, recs: dict) -> tuple[int, int]:
    plan, p, vs = eng.plan, eng.p, eng.vs
    fp8 = _is_fp8(recs[vs[0]].meta)
    topk, w = _routing(eng, call, recs)
    x = {v: eng.payload(call, v, recs[v], call.tokens_N[v], fp8) for v in vs}
    fp8 = isinstance(x[vs[0]], tuple)
    x_p = _to(I.cat_rows([x[v] for v in vs]), eng.device)
    topk_p = torch.cat([topk[v] for v in vs]).to(eng.device)
    w_p = torch.cat([w[v] for v in vs]).to(eng.device)
    align = int(I.meta_value(recs[vs[0]].meta, "expert_alignment", default=1) or 1)
    buf = eng.buffer(call)
    t0 = time.perf_counter_ns()
    n_rank, n_rdma, n_exp, in_rank, _ = buf.get_dispatch_layout(topk_p, eng.job.experts)
    recv_x, recv_idx, recv_w, recv_list, handle, _ = buf.dispatch(
        x_p, num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma, is_token_in_rank=in_rank,
        num_tokens_per_expert=n_exp, topk_idx=topk_p, topk_weights=w_p, expert_alignment=align)
    eng.sync()  # GPU kernels run asynchronously: time them to completion
    dt = time.perf_counter_ns() - t0
    _sender_counts(eng, call, recs, topk, n_exp)
    q_N = ptok = None
    if isinstance(handle, tuple) and len(handle) == 6:
        col = handle[0][:, p].cpu().numpy().astype(np.int64)
        q_N = np.repeat(np.arange(plan.physical), np.diff(col, prepend=0))
        ptok = handle[3].cpu().numpy().astype(np.int64)
    verify_dispatch(eng, call, recs, handle, x, topk, w, recv_x, recv_idx, recv_w, recv_list, q_N, ptok, fp8)
    return dt, _nbytes(x_p)


def verify_dispatch(eng: Any, call: Any, recs: dict, handle: Any, x: dict, topk: dict, w: dict, recv_x: Any,
                    recv_idx: torch.Tensor, recv_w: torch.Tensor, recv_list: Any, q_N: np.ndarray | None,
                    ptok: np.ndarray | None, fp8: bool) -> None:
    """Keep the dispatch's state for its combine / cached dispatches and verify every co-hosted
    virtual rank's share. q_N, ptok: the physical source rank and token of each received row
    (None: unknown, trust positions and check fingerprints). Shared by V1 and V2 (elastic.py)."""
    vs = eng.vs
    recv_x, recv_idx, recv_w = _cpu(recv_x), recv_idx.cpu(), recv_w.cpu()
    Np = recv_idx.shape[0]
    # Physical identity of every received row: source physical rank and its token index.
    if q_N is not None:
        if len(q_N) != Np or len(ptok) != Np:
            why = (f"handle: rank_prefix_matrix says {len(q_N)} rows, recv_src_idx has "
                                  f"{len(ptok)}, recv_x has {Np}")
            for v in vs:
                eng.report(call, v, [("count", f"{len(q_N)} rows received", f"{Np} rows", -1, -1, -1,
                                      why)])
            q_N, ptok = q_N[:min(len(q_N), Np)], ptok[:Np]
            src = tok = None
        else:
            src, tok = eng.to_virtual(call, q_N, ptok)
    else:  # internode handles carry no source index: trust positions, check the fingerprints
        src = tok = None
    st = eng.states[(call.buffer, call.seq)] = DispatchState(handle, x, topk, w, recv_x)
    st.extra.update(rows={}, exp={}, recv_w_p=recv_w)
    for v in vs:  # expected rows first: their fingerprints tell swapped rows from corrupt ones
        eng.check(call, v, lambda v=v: st.extra["exp"].__setitem__(v, _expected_rows(
            eng, call, v, recs[v], fp8)) or [])
    known = frozenset(int(f) for e in st.extra["exp"].values() if e.fp_N is not None for f in e.fp_N)
    for v in vs:
        if v in st.extra["exp"]:
            eng.check(call, v, lambda v=v: _verify_dispatch(eng, call, st, v, recv_x, recv_idx, recv_w,
                                                             recv_list, src, tok, known))


def _verify_dispatch(eng: Any, call: Any, st: Any, v: int, recv_x: Any,
                     recv_idx: torch.Tensor, recv_w: torch.Tensor, recv_list: Any,
                     src: np.ndarray | None, tok: np.ndarray | None, known: frozenset) -> list[tuple]:
    """Split the physical receive down to virtual rank v and compare it with v's recording."""
    plan = eng.plan
    Lv = plan.local_experts_virtual
    j = plan.slot_of(v)
    local = recv_idx - j * Lv
    inside = (local >= 0) & (local < Lv) & (recv_idx >= 0)
    rows = torch.nonzero(inside.any(dim=1)).flatten()
    st.extra["rows"][v] = rows
    exp = st.extra["exp"][v]
    if src is None and exp.src_N is not None and len(rows) == len(exp.src_N):
        g_src, g_tok = exp.src_N, exp.tok_N
    elif src is None:
        g_src = g_tok = np.full(len(rows), -1, np.int64)
    else:
        g_src, g_tok = src[rows.numpy()], tok[rows.numpy()]
    got = Rows(g_src, g_tok, np.bincount(g_src[g_src >= 0], minlength=plan.virtual),
               np.asarray(recv_list[j * Lv:(j + 1) * Lv]) if isinstance(recv_list, list) else None,
               torch.where(inside, local, -1)[rows].numpy(),
               torch.where(inside, recv_w, 0.0)[rows].numpy(),
               I.fingerprints(I.rows_of(recv_x, rows), version=eng.fp_version(eng.record(v, call)))
               if exp.fp_N is not None else None)
    found = check_counts(exp, got, expert_base=v * Lv)
    if not found and exp.src_N is not None:
        found = check_rows(exp, got, expert_base=v * Lv, known_fps=known)
    return found


def _expected_rows(eng: Any, call: Any, u: int, rec: Any, fp8: bool, key: int | None = None) -> Rows:
    """What virtual rank u's recording says it received."""
    plan = eng.plan
    a = rec.arrays
    per_rank = a.get("recv_tokens_per_rank_R")
    if per_rank is None and a.get("rank_prefix_matrix_RR") is not None:
        per_rank = np.diff(a["rank_prefix_matrix_RR"][:, u].astype(np.int64), prepend=0)
    dispatch = call.op.label == "dispatch"
    routing = eng.all_routing(call) if dispatch else None
    src_idx = a.get("recv_src_idx_N")
    if src_idx is None and per_rank is not None and routing is not None:
        src_idx = _derived_src_idx(plan, u, routing, np.asarray(per_rank, np.int64))
    per_expert = a.get("recv_tokens_per_expert_L")
    if per_rank is None or src_idx is None:
        n = np.zeros(0, np.int64)
        return Rows(n, n, np.asarray(per_rank if per_rank is not None else [], np.int64), per_expert)
    src = np.repeat(np.arange(plan.virtual), np.asarray(per_rank, np.int64))
    tok = src_idx.astype(np.int64)
    idx = wts = None
    if routing is not None and len(tok) == len(src) and (tok < routing.tokens_N[src]).all() and (tok >= 0).all():
        # every received row's recorded top-k, seen from u: local ids where u holds the expert
        flat = routing.base_N[src] + tok
        g = routing.idx_GK[flat]
        local = g - u * plan.local_experts_virtual
        ok = (g >= 0) & (local >= 0) & (local < plan.local_experts_virtual)
        idx = np.where(ok, local, -1)
        if routing.w_GK is not None:
            wts = np.where(ok, routing.w_GK[flat], 0.0).astype(np.float32)
    fp = eng.expected_fp(call, rec, "recv_x_fp_N", src, tok, I.to_fp8 if fp8 else None, key)
    return Rows(src, tok, np.asarray(per_rank, np.int64), per_expert, idx, wts, fp)


def _derived_src_idx(plan: Any, u: int, routing: Any, per_rank_R: np.ndarray) -> np.ndarray | None:
    """[N] source token index of each row virtual rank u received, derived from the senders'
    recorded routing, for recordings whose handle carries none (DeepEP's internode 10-tuple,
    above 8 ranks). DeepEP orders received rows by source rank, then source token, and sends a
    token once to every rank holding one of its experts, so the rows from source v are v's
    tokens with an expert in u's range, ascending: the flat (source, token) order of the
    concatenated routing. None when it disagrees with the recorded counts (then only counts
    are compared)."""
    Lv = plan.local_experts_virtual
    g = routing.idx_GK
    flat = np.flatnonzero(((g >= u * Lv) & (g < (u + 1) * Lv)).any(axis=1))
    src = np.searchsorted(routing.base_N, flat, side="right") - 1
    if not np.array_equal(np.bincount(src, minlength=plan.virtual), per_rank_R):
        return None
    return (flat - routing.base_N[src]).astype(np.int32)


def cached(eng: Any, call: Any, recs: dict) -> tuple[int, int]:
    st = eng.parent(call, recs)
    vs = eng.vs
    fp8 = _is_fp8(recs[vs[0]].meta)
    x = {v: eng.payload(call, v, recs[v], call.tokens_N[v], fp8) for v in vs}
    fp8 = isinstance(x[vs[0]], tuple)
    x_p = _to(I.cat_rows([x[v] for v in vs]), eng.device)
    buf = eng.buffer(call)
    t0 = time.perf_counter_ns()
    recv_x = buf.dispatch(x_p, handle=st.handle)[0]
    eng.sync()  # GPU kernels run asynchronously: time them to completion
    dt = time.perf_counter_ns() - t0
    recv_x = _cpu(recv_x)
    first = recv_x[0] if isinstance(recv_x, tuple) else recv_x
    prev = st.recv_x[0] if isinstance(st.recv_x, tuple) else st.recv_x
    if first.shape[0] == prev.shape[0]:  # a later combine answers the latest payload
        st.x_V, st.recv_x = x, recv_x
    else:
        for v in vs:
            eng.report(call, v, [("count", f"{prev.shape[0]} rows (as its dispatch)", f"{first.shape[0]} rows",
                                  -1, -1, -1, "cached dispatch received another number of rows than "
                                  "the dispatch whose handle it reuses")])
    want = {}
    for v in vs:
        exp_d = st.extra["exp"].get(v)
        if exp_d is not None and exp_d.src_N is not None:
            eng.check(call, v, lambda v=v, e=exp_d: want.__setitem__(v, eng.expected_fp(
                call, recs[v], "recv_x_fp_N", e.src_N, e.tok_N, I.to_fp8 if fp8 else None)) or [])
    known = frozenset(int(f) for fp in want.values() if fp is not None for f in fp)
    for v in vs:
        eng.check(call, v, lambda v=v: _verify_cached(eng, st, v, recs[v], recv_x, want.get(v), known))
    return dt, _nbytes(x_p)


def _verify_cached(eng: Any, st: Any, v: int, rec: Any, recv_x: Any, want_fp: np.ndarray | None,
                   known: frozenset) -> list[tuple]:
    """A cached dispatch reuses its dispatch's layout: same rows, new payload."""
    exp_d, rows = st.extra["exp"][v], st.extra["rows"][v]
    want_rank = rec.arrays.get("recv_tokens_per_rank_R")
    if want_rank is not None and not np.array_equal(np.asarray(want_rank, np.int64), exp_d.per_rank_R):
        s = int(np.flatnonzero(np.asarray(want_rank) != exp_d.per_rank_R)[0])
        return [("count", f"{int(want_rank[s])} rows from rank {s}", f"{int(exp_d.per_rank_R[s])}",
                 s, -1, -1, "cached dispatch received other counts than its dispatch")]
    if exp_d.src_N is None or len(exp_d.src_N) != len(rows):
        return []
    if want_fp is None:
        return []
    exp = Rows(exp_d.src_N, exp_d.tok_N, exp_d.per_rank_R, None, fp_N=want_fp)
    got = Rows(exp_d.src_N, exp_d.tok_N, exp_d.per_rank_R, None,
               fp_N=I.fingerprints(I.rows_of(recv_x, rows), version=eng.fp_version(rec)))
    return check_rows(exp, got, expert_base=v * eng.plan.local_experts_virtual, known_fps=known)


def expert_rows(x_f: torch.Tensor) -> torch.Tensor:
    """The synthetic experts of a normal combine: each virtual rank answers a received row x with
    round(clamp(x, -1, 1)), values in {-1, 0, 1}. Sums of up to 256 such rows are exact in bf16
    and fp32 in any order or grouping, so folding co-hosted ranks (summed before the physical
    combine) and DeepEP's own reduction order cannot change a bit: the expected output is exact.
    [*, H] float32 -> [*, H] float32."""
    return x_f.clamp(-1.0, 1.0).round()


def combine(eng: Any, call: Any, recs: dict) -> tuple[int, int]:
    """Every virtual rank that received token t returns expert_rows(x_t); DeepEP sums them, so
    the source expects reached(t) * expert_rows(x_t) — DeepEP's own test invariant (combine of
    dispatched rows = x * is_token_in_rank.sum(1)) with exact arithmetic."""
    st = eng.parent(call, recs)
    vs = eng.vs
    recv_f = expert_rows(I.dequant(st.recv_x))
    acc = torch.zeros_like(recv_f)
    for v in vs:  # co-hosted virtual ranks that share a physical row add their answers
        rows = st.extra["rows"][v]
        acc[rows] += recv_f[rows]
    x_in = acc.to(torch.bfloat16).to(eng.device)
    with_w = any(recs[v].arrays.get("topk_weights_NK") is not None for v in vs)
    wts = st.extra.get("recv_w_p")
    buf = eng.buffer(call)
    t0 = time.perf_counter_ns()
    out = buf.combine(x_in, st.handle, topk_weights=wts.to(eng.device) if (with_w and wts is not None) else None)
    eng.sync()  # GPU kernels run asynchronously: time them to completion
    dt = time.perf_counter_ns() - t0
    combined, comb_w = out[0].cpu(), (out[1].cpu() if out[1] is not None else None)
    off = eng.offsets(call, eng.p)
    for i, v in enumerate(vs):
        eng.check(call, v, lambda i=i, v=v: _verify_combine(eng, st, v, combined[off[i]:off[i + 1]],
                                                            comb_w[off[i]:off[i + 1]] if comb_w is not None else None))
    return dt, _nbytes(x_in)


def _verify_combine(eng: Any, st: Any, v: int, got: torch.Tensor, got_w: torch.Tensor | None) -> list[tuple]:
    Lv = eng.plan.local_experts_virtual
    topk = st.topk_V[v]
    home = torch.where(topk >= 0, topk // Lv, -1).sort(dim=1).values
    # virtual ranks a token reached: its distinct non-negative homes
    first = torch.ones(home.shape[0], 1, dtype=torch.bool)
    reached = ((home >= 0) & torch.cat([first, home[:, 1:] != home[:, :-1]], dim=1)).sum(dim=1).float()
    ref = expert_rows(I.dequant(st.x_V[v])) * reached[:, None]
    g = got.float()
    if g.shape != ref.shape or not torch.equal(g, ref):
        found = check_close(ref.numpy(), g.numpy(), 0.0, what="combine")
        if found:
            return found
    if got_w is not None:
        # a slot with no expert (-1) is sent nowhere: its weight comes back as 0
        want_w = torch.where(topk >= 0, st.w_V[v], 0.0)
        return check_close(want_w.numpy().astype(np.float64), got_w.double().numpy(), WEIGHTS_TOL,
                           what="combined top-k weights")
    return []
