"""Low-latency dispatch/combine with fixed shapes and device-side work only: CUDA-graph capturable.

Legend: T tokens on this rank (T <= M), K top-k, J = T*K slots of this rank (slot j = t*K + k),
MJ = M*K slots any rank may send (fixed), E experts, R ranks, L = E / R, M, H hidden,
N = R*MJ slots received, D = L*R*M receive rows (recv_x is [L, R*M, H] = [D, H]).

The dynamic path (emulate_ll) sizes its exchange from the counts every rank sends, which needs
host syncs (`.tolist()`, `nonzero()`, `bincount`) and a validation exchange: none of that may run
while a CUDA stream is capturing a graph. This path is used instead when the stream is capturing
(`torch.cuda.graph(...)`), or everywhere with EPREPLAY_LL_STATIC=1 (so the CPU tests run it):
  * every rank sends R blocks of MJ packed rows (slot j of block r holds slot j if its expert
    lives on rank r, else a row flagged empty): one equal-split all_to_all, no split sizes;
  * the receiver sorts the flagged rows by (local expert, source, slot) on the device and scatters
    them into recv_x; rows that are not received go to one spare row past the end (no masking);
  * results equal the dynamic path's with ll_order_seed=-1 (sources ascending, tokens ascending):
    a replayed graph cannot draw a new shuffle per call, so the order is the ascending one;
  * argument checks are the ones that need no data (shapes, dtypes, flags); the cross-rank
    validation word is skipped (it would sync), so a misuse on one rank is not raised on all.
Tensors are allocated per call from the caching allocator (inside a capture, from the graph's
pool), as torch.cuda.graph expects; nothing is read back to the host.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

from epreplay.emulate import check as chk
from epreplay.emulate import comm as W
from epreplay.emulate.check import ArgError, need
from epreplay.emulate.comm import EmulatedDeepEPError
from epreplay.emulate.event import make_event
from epreplay.format import fp8

ENV_STATIC = "EPREPLAY_LL_STATIC"
TRUE = ("1", "true", "yes", "on")
SLOT_KEY = "static_slot_D"  # HandleInfo.extra: received slot n (= source * MJ + j) per receive row, -1 none


def wanted(x: Any) -> bool:
    """Use this path: the current CUDA stream is capturing a graph, or EPREPLAY_LL_STATIC=1."""
    if isinstance(x, torch.Tensor) and x.is_cuda and torch.cuda.is_current_stream_capturing():
        return True
    return os.environ.get(ENV_STATIC, "").strip().lower() in TRUE


def _fail(what: str, me: int, exc: Exception) -> EmulatedDeepEPError:
    return EmulatedDeepEPError(f"DeepEP emulation: {what}: rank {me}: {exc} (fixed-shape path: checked "
                               f"on this rank only)")


def dispatch(buf: Any, x: Any, topk_idx: Any, M: Any, E: Any, cum_stats: Any, use_fp8: bool, round_scale: bool,
             use_ue8m0: bool, async_finish: bool, return_recv_hook: bool) -> tuple:
    from epreplay.emulate.ll import _check_fresh, _check_options, _common, _next_ll_call

    seq, _ = buf._begin("ll_dispatch")
    R, me = buf.group_size, buf.rank
    what = f"low_latency_dispatch (call {seq} on Buffer #{buf.buffer_id})"
    try:
        _common(buf, x, topk_idx, M, E, async_finish, return_recv_hook, (None, None))
        T, H = x.shape
        need(T <= M, f"argument x: {T} tokens > num_max_dispatch_tokens_per_rank={M} (DeepEP: T <= M)")
        need(H % 128 == 0, f"argument x: hidden {H} must be a multiple of 128")
        chk.tensor("topk_idx", topk_idx, dtype=torch.int64, shape=(T, None))
        need(topk_idx.device == x.device, f"argument topk_idx: on {topk_idx.device}, x on {x.device}")
        L = E // R
        _check_options(buf, M, H, E, cum_stats, None, use_fp8, round_scale, use_ue8m0)
        need(not bool(buf._ll_mask.any()), "enable_shrink masked ranks are not supported by the fixed-shape "
                                           "(CUDA graph) path; unmask them or run outside a graph")
    except ArgError as exc:
        raise _fail(what, me, exc) from None
    K, dev = topk_idx.shape[1], x.device
    MJ, RM, D = M * K, R * M, L * R * M
    # ---- send: slot j of block r carries slot j when its expert lives on rank r ----
    j_J = torch.arange(T * K, device=dev)
    g_J = topk_idx.reshape(-1)
    ok_J = g_J >= 0
    t_J = j_J // K
    if use_fp8:
        xq, xs = fp8.cast_fp8(x, round_scale=round_scale)
        parts, specs = [xq[t_J], xs[t_J]], [(torch.float8_e4m3fn, H), (torch.float32, H // 128)]
    else:
        parts, specs = [x[t_J]], [(torch.bfloat16, H)]
    meta_J = torch.stack([t_J, torch.where(ok_J, g_J % L, 0), ok_J.to(torch.int64)], dim=1).to(torch.int32)
    parts.append(meta_J), specs.append((torch.int32, 3))
    packed_JB = W.pack_rows(parts)
    send_NB = torch.zeros(R * MJ, packed_JB.shape[1], dtype=torch.uint8, device=dev)
    send_NB[torch.where(ok_J, g_J // L, 0) * MJ + j_J] = packed_JB  # an empty slot: flag 0 in block 0
    got = W.unpack_rows(buf._comm.exchange_fixed(send_NB, what), specs)
    # ---- receive: order rows by (local expert, source, slot); slots ascend with tokens ----
    t_N, e_N, ok_N = (c.to(torch.int64) for c in got[-1].unbind(1))
    ok_N = ok_N != 0
    n_N = torch.arange(R * MJ, device=dev)
    key_N = torch.where(ok_N, e_N * (R * MJ) + n_N, L * R * MJ)  # empty slots sort last
    order_N = torch.sort(key_N).indices
    blk_N = torch.where(ok_N, e_N * R + n_N // MJ, L * R)  # block (expert, source); L*R: empty
    count_LR = torch.zeros(L * R + 1, dtype=torch.int64, device=dev).index_add_(
        0, blk_N, torch.ones_like(blk_N))[:L * R].view(L, R)
    count_L = count_LR.sum(1)
    before_L = count_L.cumsum(0) - count_L
    begin_LR = count_LR.cumsum(1) - count_LR  # sources ascending inside each expert
    e_P, ok_P = e_N[order_N], ok_N[order_N]  # P: sorted positions 0..N-1 (the values of n_N)
    pos_P = n_N - before_L[e_P]  # place inside the expert's rows
    dest_P = torch.where(ok_P & (pos_P < RM), e_P * RM + pos_P, D)  # D: the spare row
    # outputs carry one spare row past the end; the user sees views of the first D rows
    values_ext = torch.empty(D + 1, H, dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16, device=dev)
    src_ext = torch.full((D + 1,), -1, dtype=torch.int32, device=dev)
    slot_ext = torch.full((D + 1,), -1, dtype=torch.int64, device=dev)
    slot_ext[dest_P] = order_N
    layout_range = torch.zeros(L, R, dtype=torch.int64, device=dev)
    recv_count = torch.zeros(L, dtype=torch.int32, device=dev)
    scales_ext = scales = None
    if use_fp8:
        width = H // 512 if use_ue8m0 else H // 128
        scales_ext = torch.empty(L + 1, width, RM, dtype=torch.int32 if use_ue8m0 else torch.float32, device=dev)
        scales = scales_ext[:L].transpose(1, 2)  # DeepEP's column-major scales: a transposed view
    values = values_ext[:D].view(L, RM, H)
    recv = (values, scales) if use_fp8 else values
    src_info = src_ext[:D].view(L, RM)
    issued = _next_ll_call(buf)
    handle = (src_info, layout_range, M, H, E)
    chk.remember(src_info, chk.HandleInfo(buf.buffer_id, seq, {"M": M, "K": K, SLOT_KEY: slot_ext[:D]}))

    def fill() -> None:  # DeepEP's receive phase: the hook when return_recv_hook, else now
        _check_fresh(buf, issued, what)
        values_ext[dest_P] = got[0][order_N]
        if use_fp8:
            sc = got[1][order_N]
            scales_ext[dest_P // RM, :, dest_P % RM] = fp8.ue8m0_pack(sc) if use_ue8m0 else sc
        src_ext[dest_P] = t_N[order_N].to(torch.int32)
        layout_range.copy_((begin_LR << 32) | count_LR)
        recv_count.copy_(count_L)
        if cum_stats is not None:
            cum_stats.add_(count_L.to(cum_stats.device, torch.int32))

    if not return_recv_hook:
        fill()
        event = make_event(async_finish, None, (x, topk_idx, *(recv if use_fp8 else (recv,)), recv_count))
        return recv, recv_count, handle, event, None
    return recv, recv_count, handle, make_event(False), fill


def combine(buf: Any, x: Any, topk_idx: Any, topk_weights: Any, handle: Any, async_finish: bool,
            return_recv_hook: bool, out: Optional[torch.Tensor]) -> tuple:
    """Each receive row goes back to its (source, slot); the source sums slots k ascending in fp32."""
    from epreplay.emulate.ll import _common, finish_combine

    seq, _ = buf._begin("ll_combine")
    R, me = buf.group_size, buf.rank
    what = f"low_latency_combine (call {seq} on Buffer #{buf.buffer_id})"
    try:
        info = chk.handle_lineage("handle", handle, 0, (5,), buf.buffer_id)
        need(info is not None and SLOT_KEY in info.extra,
             "argument handle: the fixed-shape (CUDA graph) combine needs the handle of a dispatch made on the "
             "same path: capture the low_latency_dispatch in the graph too (or set EPREPLAY_LL_STATIC=1)")
        M, H0, E = handle[2], handle[3], handle[4]
        _common(buf, x, topk_idx, M, E, async_finish, return_recv_hook, (E // R, R * M, H0))
        chk.tensor("topk_idx", topk_idx, dtype=torch.int64, shape=(None, info.extra["K"]))
        T, K = topk_idx.shape
        need(T <= M, f"argument topk_idx: {T} tokens > num_max_dispatch_tokens_per_rank={M}")
        chk.tensor("topk_weights", topk_weights, dtype=torch.float32, shape=(T, K))
        if out is not None:
            chk.tensor("out", out, dtype=torch.bfloat16, shape=(T, H0))
    except ArgError as exc:
        raise _fail(what, me, exc) from None
    L, H, dev = E // R, H0, x.device
    MJ, D = M * K, L * R * M
    slot_D = info.extra[SLOT_KEY]
    back_ext = torch.zeros(R * MJ + 1, H, dtype=torch.bfloat16, device=dev)  # last row: spare
    back_ext[torch.where(slot_D >= 0, slot_D, R * MJ)] = x.reshape(D, H)
    got_NH = buf._comm.exchange_fixed(back_ext[:R * MJ], what)  # block r: what rank r sends back
    ok_TK = topk_idx >= 0
    row_TK = torch.where(ok_TK, topk_idx // L, 0) * MJ + torch.arange(T * K, device=dev).view(T, K)
    acc = torch.zeros(T, H, dtype=torch.float32, device=dev)
    for k in range(K):  # k ascending, fp32, as DeepEP's kernel (and the dynamic path) accumulate
        term = got_NH[row_TK[:, k]].float() * topk_weights[:, k].unsqueeze(1)
        acc += torch.where(ok_TK[:, k].unsqueeze(1), term, 0.0)
    return finish_combine(buf, acc, out, return_recv_hook, async_finish, (x, topk_idx, topk_weights), what)
