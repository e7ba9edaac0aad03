"""Low-latency (decode) dispatch and combine of the emulated Buffer.

Legend: T tokens on this rank (T <= M), K top-k, E experts, R ranks, L = E / R local experts,
M = num_max_dispatch_tokens_per_rank, H hidden, S = H / 128 scale groups, V valid rows received.

Dispatch sends one row per (token, k) slot with an expert (-1 slots send nothing) to the rank
owning that expert. Received rows of local expert e land in recv_x[e, :recv_count[e]], one
contiguous block per source rank. DeepEP's order of blocks and of rows inside a block comes from
GPU atomics; here it is a pseudo-random shuffle seeded by (Buffer.ll_order_seed, rank, call), so
that consumers cannot silently depend on an order (ll_order_seed=-1: sources and tokens ascending).
Combine sends each valid row back to its source, which computes
    combined[t] = bf16(sum over k ascending, topk_idx[t, k] >= 0, of float(row(t, k)) * w[t, k])
in fp32, as DeepEP's kernel does.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from epreplay.emulate import check as chk
from epreplay.emulate import comm as W
from epreplay.emulate import faults
from epreplay.emulate.check import ArgError, need
from epreplay.emulate.comm import EmulatedDeepEPError
from epreplay.emulate.event import make_event
from epreplay.emulate.layout import low_latency_rdma_size_hint
from epreplay.format import fp8

OP_LL_DISPATCH, OP_LL_COMBINE = 5, 6


def _check_options(buf: Any, M: int, H: int, E: int, cum_stats: Optional[torch.Tensor],
                   wait_stats: Optional[torch.Tensor], use_fp8: bool, round_scale: bool, use_ue8m0: bool) -> None:
    """A low-latency dispatch's stats tensors, FP8 scale options and RDMA size, as DeepEP checks
    them (the dynamic path here and the fixed-shape one in ll_static.py)."""
    R = buf.group_size
    if cum_stats is not None:
        chk.tensor("cumulative_local_expert_recv_stats", cum_stats, dtype=torch.int32, shape=(E // R,))
    if wait_stats is not None:
        chk.tensor("dispatch_wait_recv_cost_stats", wait_stats, dtype=torch.int64, shape=(R,))
    need(not use_ue8m0 or (use_fp8 and round_scale), "argument use_ue8m0=True needs use_fp8=True and round_scale=True")
    need(not use_ue8m0 or H % 512 == 0, f"argument use_ue8m0: hidden {H} must be a multiple of 512")
    hint = low_latency_rdma_size_hint(M, H, R, E)
    need(buf.num_rdma_bytes <= 0 or hint <= buf.num_rdma_bytes,
         f"num_rdma_bytes={buf.num_rdma_bytes} is too small for M={M}, hidden={H}, {R} ranks, {E} experts: "
         f"DeepEP needs {hint} (Buffer.get_low_latency_rdma_size_hint)")


def _common(buf: Any, x: Any, topk_idx: Any, M: Any, E: Any, async_finish: bool, return_recv_hook: bool,
            x_shape: tuple) -> None:
    need(buf.low_latency_mode, "this Buffer was created with low_latency_mode=False; DeepEP's low-latency "
                               "kernels need Buffer(..., low_latency_mode=True)")
    need(not (async_finish and return_recv_hook), "arguments async_finish and return_recv_hook are mutually exclusive")
    need(isinstance(M, int) and M > 0, f"argument num_max_dispatch_tokens_per_rank={M!r}: must be a positive int")
    need(isinstance(E, int) and E > 0 and E % buf.group_size == 0,
         f"argument num_experts={E!r}: must be a positive multiple of the {buf.group_size} ranks")
    chk.tensor("x", x, dtype=torch.bfloat16, shape=x_shape)


def dispatch(buf: Any, x: Any, topk_idx: Any, M: Any, E: Any, cum_stats: Any, wait_stats: Any, use_fp8: bool,
             round_scale: bool, use_ue8m0: bool, async_finish: bool, return_recv_hook: bool) -> tuple:
    from epreplay.emulate import ll_static as static

    if static.wanted(x):  # inside a CUDA graph capture (or EPREPLAY_LL_STATIC=1): no host syncs
        return static.dispatch(buf, x, topk_idx, M, E, cum_stats, use_fp8, round_scale, use_ue8m0, async_finish,
                               return_recv_hook)
    seq, index = buf._begin("ll_dispatch")
    R, me = buf.group_size, buf.rank
    what = f"low_latency_dispatch (call {seq} on Buffer #{buf.buffer_id})"
    hdr = chk.header(OP_LL_DISPATCH, seq, R)
    err = None
    try:
        _common(buf, x, topk_idx, M, E, async_finish, return_recv_hook, (None, None))
        T, H = x.shape
        need(T <= M, f"argument x: {T} tokens > num_max_dispatch_tokens_per_rank={M} (DeepEP: T <= M)")
        need(H % 128 == 0, f"argument x: hidden {H} must be a multiple of 128")
        chk.topk_ids("topk_idx", topk_idx, T, E)
        L = E // R
        _check_options(buf, M, H, E, cum_stats, wait_stats, use_fp8, round_scale, use_ue8m0)
        valid = _sendable(buf, topk_idx, L)
        hdr[W.HID], hdr[W.FP8], hdr[W.TOPK], hdr[W.NEXP] = H, int(use_fp8) + 2 * int(use_ue8m0), topk_idx.shape[1], E
        hdr[W.MAXTOK], hdr[W.NTOK] = M, T
        hdr[W.HEAD:W.HEAD + R] = torch.bincount(topk_idx[valid] // L, minlength=R).cpu()
    except ArgError as exc:
        err = str(exc)
    except Exception as exc:  # noqa: BLE001 - any local failure must reach the other ranks too
        err = f"{type(exc).__name__}: {exc}"
    words = buf._agree(hdr, err, what, compare=(W.HID, W.FP8, W.NEXP, W.MAXTOK))
    counts_RR = words[:, W.HEAD:W.HEAD + R]
    T, H = x.shape
    L, RM, dev = E // R, R * M, x.device
    t_V, k_V = _sendable(buf, topk_idx, L).nonzero().unbind(1)
    g_V = topk_idx[t_V, k_V]
    order = torch.argsort(g_V * max(T, 1) + t_V, stable=True)  # destination rank, expert, token
    t_V, g_V = t_V[order], g_V[order]
    if use_fp8:
        xq, xs = fp8.cast_fp8(x, round_scale=round_scale)
        parts, specs = [xq[t_V], xs[t_V]], [(torch.float8_e4m3fn, H), (torch.float32, H // 128)]
    else:
        parts, specs = [x[t_V]], [(torch.bfloat16, H)]
    meta = torch.stack([t_V.to(torch.int32), (g_V % L).to(torch.int32),
                        torch.full_like(t_V, me, dtype=torch.int32)], dim=1)
    parts.append(meta), specs.append((torch.int32, 3))
    rows = buf._comm.exchange_rows(W.pack_rows(parts), counts_RR[me].tolist(), counts_RR[:, me].tolist(), what)
    rows = faults.mutate_rows(buf, "ll_dispatch", index, rows, H * (1 if use_fp8 else 2))
    got = W.unpack_rows(rows, specs)
    t_N, e_N, s_N = (c.to(torch.int64) for c in got[-1].unbind(1))
    if bool(buf._ll_mask.any()):  # rows from masked ranks are not taken (enable_shrink)
        keep = buf._ll_mask.to(dev)[s_N] == 0
        got, t_N, e_N, s_N = [g[keep] for g in got], t_N[keep], e_N[keep], s_N[keep]
    dest_N, count_LR, begin_LR = _place(e_N, s_N, L, R, M, buf.ll_order_seed, me, index)
    # Outputs are allocated empty, as DeepEP's: rows past recv_count[e] are unspecified (and
    # zero-filling [L, R*M, H] would cost more than the whole exchange on a CPU).
    src_info = torch.full((L, RM), -1, dtype=torch.int32, device=dev)
    layout_range = torch.zeros(L, R, dtype=torch.int64, device=dev)
    recv_count = torch.zeros(L, dtype=torch.int32, device=dev)
    values = torch.empty(L * RM, H, dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16, device=dev)
    scales = None
    if use_fp8:
        width = H // 512 if use_ue8m0 else H // 128
        base = torch.empty(L, width, RM, dtype=torch.int32 if use_ue8m0 else torch.float32, device=dev)
        scales = base.transpose(1, 2)  # DeepEP's column-major scales: a transposed view
    recv = (values.view(L, RM, H), scales) if use_fp8 else values.view(L, RM, H)
    issued = _next_ll_call(buf)
    handle = (src_info, layout_range, M, H, E)
    chk.remember(src_info, chk.HandleInfo(buf.buffer_id, seq, {"M": M}))

    def fill() -> None:  # DeepEP's receive phase: the hook when return_recv_hook, else now
        _check_fresh(buf, issued, what)
        values[dest_N] = got[0]
        if use_fp8:
            scales[dest_N // RM, dest_N % RM] = fp8.ue8m0_pack(got[1]) if use_ue8m0 else got[1]
        src_info.view(-1)[dest_N] = t_N.to(torch.int32)
        layout_range.copy_((begin_LR << 32) | count_LR)
        recv_count.copy_(count_LR.sum(1))
        if cum_stats is not None:
            cum_stats.add_(count_LR.sum(1).to(torch.int32).to(cum_stats.device))

    if not return_recv_hook:
        fill()
        event = make_event(async_finish, None, (x, topk_idx, *(recv if use_fp8 else (recv,)), recv_count))
        return recv, recv_count, handle, event, None
    return recv, recv_count, handle, make_event(False), fill


def _sendable(buf: Any, topk_idx: torch.Tensor, L: int) -> torch.Tensor:
    """[T, K] bool: slots with an expert on a rank that is not masked (enable_shrink)."""
    valid = topk_idx >= 0
    if bool(buf._ll_mask.any()):
        valid &= buf._ll_mask.to(topk_idx.device)[topk_idx.clamp_min(0) // L] == 0
    return valid


def _next_ll_call(buf: Any) -> int:
    """Count a low-latency call; DeepEP alternates two receive buffers between them."""
    buf._ll_calls += 1
    buf.low_latency_buffer_idx ^= 1
    return buf._ll_calls


def _check_fresh(buf: Any, issued: int, what: str) -> None:
    """A recv hook run after two later LL calls reads a receive buffer DeepEP has reused."""
    later = buf._ll_calls - issued
    if later >= 2:
        raise EmulatedDeepEPError(
            f"DeepEP emulation: {what}: hook() called after {later} later low-latency calls on this Buffer; "
            f"DeepEP keeps two receive buffers, so this call's data would already be overwritten "
            f"(call each hook before issuing the call after next)")


def _place(e_N: torch.Tensor, s_N: torch.Tensor, L: int, R: int, M: int, seed: int, me: int, call: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows (local expert, source) -> flat destination e * R*M + row; also count_LR and begin_LR."""
    # On the host with a host generator, whatever the rows' device or the client's default
    # device/dtype: the shuffle is then the same bytes on CPU and GPU runs (replays compare them).
    host = torch.device("cpu")
    blk_N = (e_N * R + s_N).to(host)
    count_LR = torch.bincount(blk_N, minlength=L * R).view(L, R)
    n = blk_N.numel()
    if seed == -1:
        perm_LR = torch.arange(R, device=host).expand(L, R)
        within = torch.argsort(blk_N, stable=True)  # rows arrive token-ascending per block
    else:
        gen = torch.Generator(device=host).manual_seed((seed * 1_000_003 + me * 7919 + call * 104_729) % (2 ** 63))
        perm_LR = torch.argsort(torch.rand(L, R, generator=gen, dtype=torch.float32, device=host), dim=1)
        shuffled = torch.randperm(n, generator=gen, device=host)
        within = shuffled[torch.argsort(blk_N[shuffled], stable=True)]
    c_perm = count_LR.gather(1, perm_LR)
    begin_LR = torch.zeros(L, R, dtype=torch.int64, device=host).scatter_(1, perm_LR, c_perm.cumsum(1) - c_perm)
    blk_start = count_LR.flatten().cumsum(0) - count_LR.flatten()
    pos = torch.empty(n, dtype=torch.int64, device=host)
    sorted_blk = blk_N[within]
    pos[within] = torch.arange(n, device=host) - blk_start[sorted_blk]
    e_cpu, s_cpu = e_N.to(host), s_N.to(host)
    dest = e_cpu * (R * M) + begin_LR[e_cpu, s_cpu] + pos
    return dest.to(e_N.device), count_LR, begin_LR


def combine(buf: Any, x: Any, topk_idx: Any, topk_weights: Any, handle: Any, use_logfmt: bool, zero_copy: bool,
            async_finish: bool, return_recv_hook: bool, out: Optional[torch.Tensor], wait_stats: Any) -> tuple:
    from epreplay.emulate import ll_static as static

    if static.wanted(x):
        return static.combine(buf, x, topk_idx, topk_weights, handle, async_finish, return_recv_hook, out)
    seq, index = buf._begin("ll_combine")
    R, me = buf.group_size, buf.rank
    what = f"low_latency_combine (call {seq} on Buffer #{buf.buffer_id})"
    hdr = chk.header(OP_LL_COMBINE, seq, R)
    err = None
    try:
        info = chk.handle_lineage("handle", handle, 0, (5, 4), buf.buffer_id)
        src_info, layout_range, M = handle[0], handle[1], handle[2]
        E = handle[-1]
        _common(buf, x, topk_idx, M, E, async_finish, return_recv_hook, (E // R, R * M, None))
        L, H = E // R, x.shape[2]
        need(len(handle) == 4 or handle[3] == H, f"argument x: hidden {H} but the handle's dispatch had {handle[3]}")
        chk.tensor("handle src_info", src_info, dtype=torch.int32, shape=(L, R * M))
        chk.tensor("handle layout_range", layout_range, dtype=torch.int64, shape=(L, R))
        chk.topk_ids("topk_idx", topk_idx, None, E)
        T, K = topk_idx.shape
        need(T <= M, f"argument topk_idx: {T} tokens > num_max_dispatch_tokens_per_rank={M}")
        chk.tensor("topk_weights", topk_weights, dtype=torch.float32, shape=(T, K))
        if out is not None:
            chk.tensor("out", out, dtype=torch.bfloat16, shape=(T, H))
        lr = layout_range.cpu()
        hdr[W.HID], hdr[W.NEXP], hdr[W.MAXTOK], hdr[W.NTOK] = H, E, M, T
        hdr[W.LINEAGE] = info.dispatch_seq if info is not None else -1
        hdr[W.HEAD:W.HEAD + R] = (lr & 0xFFFFFFFF).sum(0)
        if not bool(buf._ll_mask.any()):  # with a mask, peers may drop rows this rank cannot predict
            hdr[W.HEAD + R:] = torch.bincount(topk_idx[_sendable(buf, topk_idx, L)] // L, minlength=R).cpu()
    except ArgError as exc:
        err = str(exc)
    except Exception as exc:  # noqa: BLE001 - any local failure must reach the other ranks too
        err = f"{type(exc).__name__}: {exc}"
    words = buf._agree(hdr, err, what, compare=(W.HID, W.NEXP, W.MAXTOK, W.LINEAGE))
    counts_RR = words[:, W.HEAD:W.HEAD + R]
    RM, dev = R * M, x.device
    begin_LR, cnt_LR = (lr >> 32), (lr & 0xFFFFFFFF)
    cnt_B, beg_B = cnt_LR.t().flatten(), begin_LR.t().flatten()  # blocks in (source, expert) order
    e_B = torch.arange(L, device=lr.device).repeat(R)
    total = int(cnt_B.sum())
    starts = torch.repeat_interleave(cnt_B.cumsum(0) - cnt_B, cnt_B)
    row = torch.repeat_interleave(e_B * RM + beg_B, cnt_B) + (torch.arange(total, device=lr.device) - starts)
    row = row.to(dev)
    tok = src_info.reshape(-1)[row]
    g = torch.repeat_interleave(e_B + me * L, cnt_B).to(dev)
    meta = torch.stack([tok, g.to(torch.int32)], dim=1)
    send = W.pack_rows([x.reshape(L * RM, H)[row], meta])
    rows = buf._comm.exchange_rows(send, counts_RR[me].tolist(), counts_RR[:, me].tolist(), what)
    rows = faults.mutate_rows(buf, "ll_combine", index, rows, H * 2, drop_zeroes=True)
    got_x, got_meta = W.unpack_rows(rows, [(torch.bfloat16, H), (torch.int32, 2)])
    key_N = got_meta[:, 1].to(torch.int64) * max(T, 1) + got_meta[:, 0].to(torch.int64)
    key_sorted, key_order = torch.sort(key_N)
    acc = torch.zeros(T, H, dtype=torch.float32, device=dev)
    for k in range(K):
        ids = topk_idx[:, k]
        slot_key = ids * max(T, 1) + torch.arange(T, device=dev)
        at = torch.searchsorted(key_sorted, slot_key).clamp_max(max(key_sorted.numel() - 1, 0))
        found = (ids >= 0) & (key_sorted.numel() > 0)
        if key_sorted.numel():
            found &= key_sorted[at] == slot_key
        t_sel = found.nonzero().flatten()
        if t_sel.numel():
            src_rows = got_x[key_order[at[t_sel]]].float()
            acc.index_add_(0, t_sel, src_rows * topk_weights[t_sel, k].unsqueeze(1))
    return finish_combine(buf, acc, out, return_recv_hook, async_finish, (x, topk_idx, topk_weights), what)


def finish_combine(buf: Any, acc_TH: torch.Tensor, out: Any, return_recv_hook: bool, async_finish: bool,
                   inputs: tuple, what: str) -> tuple:
    """A low-latency combine's outputs from its fp32 sums acc_TH [T, H]: (combined_x bf16, event,
    hook). With return_recv_hook the result is valid only after hook() (NaN until then unless the
    caller gave `out`), and a hook called after the Buffer's next low-latency call raises, as in
    DeepEP."""
    T, H = acc_TH.shape
    result = out if out is not None else torch.empty(T, H, dtype=torch.bfloat16, device=acc_TH.device)
    issued = _next_ll_call(buf)
    if not return_recv_hook:
        result.copy_(acc_TH.to(torch.bfloat16))
        return result, make_event(async_finish, None, (*inputs, result)), None
    if out is None:
        result.fill_(float("nan"))  # valid only after hook(), as in DeepEP

    def hook() -> None:
        _check_fresh(buf, issued, what)
        result.copy_(acc_TH.to(torch.bfloat16))

    return result, make_event(False), hook
