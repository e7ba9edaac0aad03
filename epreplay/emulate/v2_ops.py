"""Dispatch of the emulated V2 ElasticBuffer (combine: emulate_v2_combine).

Legend: T tokens on this rank, K top-k, E experts, R ranks, L = E / R local experts, H hidden,
S scale packs per token (FP8), M num_max_tokens_per_rank, N rows received (one per token that
has an expert here), X expanded rows (one slot per (token, local expert), each expert's slots
padded to expert_alignment), N_a / X_a the allocated rows (more without do_cpu_sync).

Token t of rank r goes to every rank that holds one of its experts, once, as (x, scales, top-k
ids, weights, global index r * M + t). Rows arrive grouped by source rank ascending and tokens
ascending: sorted by global index, which is V2's deterministic order. In the expanded layout the
slots of expert e start at the sum of the aligned counts of the experts before it and follow the
same order.
"""
from __future__ import annotations

from typing import Any

import torch

from epreplay.emulate import check as chk
from epreplay.emulate import comm as W
from epreplay.emulate import faults
from epreplay.emulate.check import ArgError, need
from epreplay.emulate.v2 import DEFAULT_NUM_SMS, EPHandle, align, event_for, worst_expanded

OP_DISPATCH, OP_CACHED, OP_COMBINE = 7, 8, 9
W.OP_NAMES.update({OP_DISPATCH: "ElasticBuffer.dispatch", OP_CACHED: "ElasticBuffer.dispatch (cached)",
                   OP_COMBINE: "ElasticBuffer.combine"})


def garbage(shape: tuple, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """Memory V2 leaves uninitialised: NaN for floating dtypes, -1 for integers."""
    if dtype.is_floating_point:
        if dtype == torch.float8_e4m3fn:
            return torch.full(shape, 0x7F, dtype=torch.uint8, device=device).view(dtype)
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, -1, dtype=dtype, device=device)


def dispatch(buf: Any, a: dict) -> tuple:
    cached = a["handle"] is not None
    seq, index = buf._begin("cached_dispatch" if cached else "dispatch")
    R, me = buf.num_ranks, buf.rank_idx
    what = (f"ElasticBuffer.dispatch{' (cached handle)' if cached else ''} (call {seq} on ElasticBuffer "
            f"#{buf.buffer_id})")
    hdr = chk.header(OP_CACHED if cached else OP_DISPATCH, seq, R)
    err, p = None, {}
    try:
        p = _check(buf, a)
        hdr[W.HID], hdr[W.FP8], hdr[W.TOPK] = p["H"], int(p["sf"] is not None), p["K"]
        hdr[W.NEXP], hdr[W.MAXTOK], hdr[W.NTOK] = p["E"], p["M"], p["T"]
        hdr[W.HEAD:W.HEAD + R] = p["in_rank"].sum(0).cpu()
        if cached:
            hdr[W.LINEAGE] = p["handle"]._dispatch_seq
            psum = p["handle"].psum_num_recv_tokens_per_scaleup_rank.cpu().to(torch.int64)
            hdr[W.HEAD + R:] = torch.diff(psum, prepend=torch.zeros(1, dtype=torch.int64))
    except ArgError as exc:
        err = str(exc)
    except Exception as exc:  # noqa: BLE001 - any local failure must reach the other ranks too
        err = f"{type(exc).__name__}: {exc}"
    compare = (W.HID, W.FP8, W.TOPK, W.NEXP, W.MAXTOK) + ((W.LINEAGE,) if cached else ())
    words = buf._agree(hdr, err, what, compare=compare)
    counts_RR = words[:, W.HEAD:W.HEAD + R]  # [source, destination]
    return _run(buf, a, p, counts_RR, seq, index, what)


def _run(buf: Any, a: dict, p: dict, counts_RR: torch.Tensor, seq: int, index: int, what: str) -> tuple:
    R, me = buf.num_ranks, buf.rank_idx
    xv, sf, topk, w, in_rank = p["x"], p["sf"], p["topk"], p["w"], p["in_rank"]
    T, H, K, E, M, al = p["T"], p["H"], p["K"], p["E"], p["M"], p["align"]
    L, dev, handle = E // R, xv.device, p["handle"]
    dst_S, t_S = in_rank.t().nonzero().unbind(1)  # destination-major, tokens ascending
    parts, specs = [xv[t_S]], [(xv.dtype, H)]
    if sf is not None:
        parts.append(sf[t_S]), specs.append((sf.dtype, sf.shape[1]))
    parts.append(topk[t_S]), specs.append((torch.int64, K))
    if w is not None:
        parts.append(w[t_S]), specs.append((torch.float32, K))
    parts.append((me * M + t_S).to(torch.int32).view(-1, 1)), specs.append((torch.int32, 1))
    rows = buf._comm.exchange_rows(W.pack_rows(parts), counts_RR[me].tolist(), counts_RR[:, me].tolist(), what)
    rows = faults.mutate_rows(buf, "cached_dispatch" if handle is not None else "dispatch", index, rows,
                              H * xv.element_size())
    got = W.unpack_rows(rows, specs)
    N = rows.shape[0]
    g_N = got[-1].reshape(-1).to(torch.int64)
    ids_NK = got[2 if sf is not None else 1].to(dev)
    local_NK = torch.where((ids_NK >= me * L) & (ids_NK < (me + 1) * L), ids_NK - me * L, -1)
    count_L = torch.bincount(local_NK[local_NK >= 0], minlength=L)[:L].cpu()
    aligned = [align(int(c), al) for c in count_L.tolist()]
    start_L = torch.tensor([0] + aligned[:-1], dtype=torch.int64).cumsum(0)
    slots_NK = _slots(local_NK, count_L, start_L)
    expand, cpu_sync = p["expand"], p["cpu_sync"]
    if handle is not None:
        n_alloc, x_alloc = handle.recv_src_metadata.shape[0], handle.num_expanded_tokens
    elif cpu_sync:
        n_alloc, x_alloc = N, sum(aligned)
    else:
        n_alloc, x_alloc = R * M, worst_expanded(R, M, K, L, al)
    rows_out = x_alloc if expand else n_alloc
    fill = torch.zeros if (expand and p["zero_pad"]) else garbage
    recv_x = fill((rows_out, H), dtype=xv.dtype, device=dev)
    recv_sf = None
    if sf is not None:
        recv_sf = fill((rows_out, sf.shape[1]), dtype=sf.dtype, device=dev)
        if p["col_major_sf"]:  # TMA-aligned: tokens contiguous per scale pack
            recv_sf = recv_sf.t().contiguous().t()
    recv_w = None
    if w is not None:
        recv_w = fill((rows_out,) if expand else (rows_out, K), dtype=torch.float32, device=dev)
    recv_idx = None
    if expand:
        i_V, k_V = (slots_NK >= 0).nonzero().unbind(1)
        s_V = slots_NK[i_V, k_V]
        recv_x[s_V] = got[0][i_V].to(dev)
        if recv_sf is not None:
            recv_sf[s_V] = got[1][i_V].to(dev)
        if recv_w is not None:
            recv_w[s_V] = got[-2][i_V, k_V].to(dev)
    else:
        recv_x[:N] = got[0]
        if recv_sf is not None:
            recv_sf[:N] = got[1]
        if recv_w is not None:
            recv_w[:N] = got[-2]
        recv_idx = torch.full((n_alloc, K), -1, dtype=torch.int64, device=dev)
        recv_idx[:N] = local_NK
    if p["stats"] is not None:
        p["stats"] += count_L.to(p["stats"].device, torch.int32)
    event = event_for(p["async"], a["previous_event"])
    out_x = (recv_x, recv_sf) if sf is not None else recv_x
    if handle is not None:
        return out_x, recv_idx, recv_w, handle, event
    src_R = torch.bincount(g_N // M, minlength=R)[:R]
    meta = garbage((n_alloc, K + 2), torch.int32, dev)
    first_k = (local_NK >= 0).to(torch.int8).argmax(dim=1)
    meta[:N, 0] = g_N.to(torch.int32)
    meta[:N, 1] = ((g_N // M) * K + first_k).to(torch.int32)
    meta[:N, 2:] = slots_NK.to(torch.int32) if expand else -1
    psum_e = (start_L + count_L) if expand else torch.tensor(aligned, dtype=torch.int64).cumsum(0)
    h = EPHandle(expand, E, al, M, p["num_sms"], topk.clone() if a["copy"] else topk, n_alloc, x_alloc,
                 aligned if cpu_sync else [], src_R.cumsum(0).to(torch.int32).to(dev),
                 psum_e.to(torch.int32).to(dev), count_L.to(torch.int32).to(dev), meta,
                 _dst_slots(topk, in_rank, counts_RR, me, L), None, None)
    h._buffer_id, h._dispatch_seq, h._recv_local_NK, h._valid = buf.buffer_id, seq, local_NK, N
    chk.remember(meta, chk.HandleInfo(buf.buffer_id, seq, {"elastic": True}))
    return out_x, recv_idx, recv_w, h, event


def _slots(local_NK: torch.Tensor, count_L: torch.Tensor, start_L: torch.Tensor) -> torch.Tensor:
    """[N, K] expanded slot of each (row, k) whose expert is local (-1 otherwise): an expert's
    rows keep the receive order, starting at start_L[e]."""
    flat = local_NK.reshape(-1)
    pos = (flat >= 0).nonzero().flatten()
    e_V = flat[pos]
    order = torch.sort(e_V, stable=True).indices
    first = torch.cat([torch.zeros(1, dtype=torch.int64), count_L.cumsum(0)[:-1]]).to(e_V.device)
    rank_V = torch.empty_like(order)
    rank_V[order] = torch.arange(order.numel(), device=e_V.device) - first[e_V[order]]
    out = torch.full_like(flat, -1)
    out[pos] = start_L.to(e_V.device)[e_V] + rank_V
    return out.view_as(local_NK)


def _dst_slots(topk: torch.Tensor, in_rank: torch.Tensor, counts_RR: torch.Tensor, me: int, L: int) -> torch.Tensor:
    """[T, K] int32: the row each (token, k) lands in on its destination rank (-1: no expert)."""
    T, R = in_rank.shape
    dst_S, t_S = in_rank.t().nonzero().unbind(1)
    base_R = counts_RR[:me].sum(0).to(t_S.device) if me else torch.zeros(R, dtype=torch.int64, device=t_S.device)
    first_R = torch.cat([torch.zeros(1, dtype=torch.int64), in_rank.sum(0).cumsum(0)[:-1].cpu()]).to(t_S.device)
    table = torch.full((T, R), -1, dtype=torch.int64, device=t_S.device)
    table[t_S, dst_S] = base_R[dst_S] + torch.arange(t_S.numel(), device=t_S.device) - first_R[dst_S]
    dst = torch.where(topk >= 0, topk // L, 0)
    return torch.where(topk >= 0, table.gather(1, dst), -1).to(torch.int32)


def _check(buf: Any, a: dict) -> dict:
    R = buf.num_ranks
    handle, topk, w = a["handle"], a["topk_idx"], a["topk_weights"]
    need(a["num_qps"] <= buf.num_allocated_qps,
         f"argument num_qps={a['num_qps']}: Allocated QPs are not enough ({buf.num_allocated_qps})")
    need(a["previous_event"] is None or a["on_comm"],
         "argument previous_event: needs allocate_on_comm_stream=True as well")
    need(not a["zero_pad"] or a["expand"], "argument do_zero_padding=True: only valid with do_expand=True")
    E, M, al, cpu_sync = a["num_experts"], a["M"], a["align"], a["cpu_sync"]
    if handle is not None:
        need(isinstance(handle, EPHandle), f"argument handle: expected the EPHandle returned by dispatch, got "
                                           f"{type(handle).__name__}")
        need(topk is None, "argument topk_idx: must be None with a cached handle (the handle's is reused)")
        need(not cpu_sync, "argument do_cpu_sync=True: Cannot do CPU sync with cached handle")
        need(handle._buffer_id in (-1, buf.buffer_id), f"argument handle: returned by another ElasticBuffer "
                                                       f"(#{handle._buffer_id}), not this one (#{buf.buffer_id})")
        mine = (E if E is not None else handle.num_experts, al if al is not None else handle.expert_alignment,
                M if M is not None else handle.num_max_tokens_per_rank)
        need(mine == (handle.num_experts, handle.expert_alignment, handle.num_max_tokens_per_rank),
             f"arguments (num_experts, expert_alignment, num_max_tokens_per_rank)={mine} differ from the handle's "
             f"{(handle.num_experts, handle.expert_alignment, handle.num_max_tokens_per_rank)}")
        need(not a["expand"] or handle.do_expand,
             "argument do_expand=True: the handle comes from a non-expanded dispatch (its slots are unset)")
        topk, (E, al, M), cpu_sync = handle.topk_idx, mine, False
    else:
        need(topk is not None, "argument topk_idx: required without a cached handle")
        need(isinstance(E, int) and E > 0 and E % R == 0,
             f"argument num_experts={E!r}: must be a positive multiple of the {R} ranks")
        M = buf.num_max_tokens_per_rank if M is None else M
        al = 1 if al is None else al
        cpu_sync = True if cpu_sync is None else bool(cpu_sync)
    need(isinstance(al, int) and al >= 1, f"argument expert_alignment={al!r}: must be an int >= 1")
    need(isinstance(M, int) and M > 0, f"num_max_tokens_per_rank={M!r}: must be > 0 (pass it to dispatch or "
                                       f"to ElasticBuffer(num_max_tokens_per_rank=...))")
    x = a["x"]
    if isinstance(x, (tuple, list)):
        need(len(x) == 2, f"argument x: a tuple must be (fp8 [T, H], scale factors [T, S]), got {len(x)} items")
        xv, sf = x
        chk.tensor("x[0]", xv, dtype=torch.float8_e4m3fn, shape=(None, None))
        chk.tensor("x[1] (scale factors)", sf, dtype=(torch.float32, torch.int32), shape=(xv.shape[0], None))
    else:
        xv, sf = chk.tensor("x", x, dtype=torch.bfloat16, shape=(None, None)), None
    T, H = xv.shape
    need(H * xv.element_size() % 16 == 0, f"argument x: hidden {H} x {xv.element_size()} bytes is not a multiple "
                                          f"of 16 bytes")
    need(T <= M, f"argument x: {T} tokens > num_max_tokens_per_rank={M}")
    chk.topk_ids("topk_idx" if handle is None else "handle.topk_idx", topk, T, E)
    K = topk.shape[1]
    if w is not None:
        chk.tensor("topk_weights", w, dtype=torch.float32, shape=(T, K))
    L = E // R
    if a["stats"] is not None:
        chk.tensor("cumulative_local_expert_recv_stats", a["stats"], dtype=torch.int32, shape=(L,))
    in_rank = torch.zeros(T, R, dtype=torch.bool, device=topk.device)
    ok = topk >= 0
    rows = torch.arange(T, device=topk.device).unsqueeze(1).expand_as(topk)
    in_rank[rows[ok], topk[ok] // L] = True
    return {"x": xv, "sf": sf, "topk": topk, "w": w, "in_rank": in_rank, "T": T, "H": H, "K": K, "E": E, "M": M,
            "align": al, "cpu_sync": cpu_sync, "expand": bool(a["expand"]), "zero_pad": bool(a["zero_pad"]),
            "col_major_sf": bool(a["col_major_sf"]), "handle": handle, "stats": a["stats"],
            "async": bool(a["async_"]), "num_sms": int(a["num_sms"]) or DEFAULT_NUM_SMS}
