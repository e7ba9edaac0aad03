"""Normal combine of the emulated Buffer: rows go back to their source and are summed there.

Legend: T tokens on this (source) rank, N rows this rank received in the dispatch, H hidden,
K top-k, R ranks, C channels.

Numerics (deepep-semantics.md): intranode, fp32 accumulation starting from bias0 + bias1, then
ranks in ascending order, one bf16 cast at the end. Above 8 ranks (internode) each node's ranks
are first summed in fp32 and cast to bf16, then bf16(bias + sum over nodes ascending).
combined_topk_weights is the fp32 rank-sum of the weight rows (no bias).
DeepEP's combine also rewrites send_head in place; the emulation does the same.
"""
from __future__ import annotations

from typing import Any

import torch

from epreplay.emulate import check as chk
from epreplay.emulate import comm as W
from epreplay.emulate import layout as lay
from epreplay.emulate import faults
from epreplay.emulate.check import ArgError, need
from epreplay.emulate.event import make_event
from epreplay.emulate.normal import OP_COMBINE, _config, _nvl_bound


def combine(buf: Any, x: Any, handle: Any, topk_weights: Any, bias: Any, config: Any, previous_event: Any,
            async_finish: bool) -> tuple:
    seq, index = buf._begin("combine")
    R, me = buf.group_size, buf.rank
    node = lay.node_size()
    internode = R > node
    what = f"combine (call {seq} on Buffer #{buf.buffer_id})"
    hdr = chk.header(OP_COMBINE, seq, R)
    err, p = None, {}
    try:
        p = _check(buf, x, handle, topk_weights, bias, config, internode)
        hdr[W.HID], hdr[W.TOPK], hdr[W.NTOK], hdr[W.LINEAGE] = p["H"], p["K"], p["T"], p["lineage"]
        hdr[W.HEAD:W.HEAD + R] = p["send_R"]
        hdr[W.HEAD + R:] = p["in_rank"].sum(0).cpu()
    except ArgError as exc:
        err = str(exc)
    except Exception as exc:  # noqa: BLE001 - any local failure must reach the other ranks too
        err = f"{type(exc).__name__}: {exc}"
    words = buf._agree(hdr, err, what, compare=(W.HID, W.TOPK, W.LINEAGE))
    counts_RR = words[:, W.HEAD:W.HEAD + R]
    x_NH, w_NK, in_rank, K = p["x"], topk_weights, p["in_rank"], p["K"]
    n_valid = int(counts_RR[me].sum())
    parts, specs = [x_NH[:n_valid]], [(x_NH.dtype, x_NH.shape[1])]
    if K:
        parts.append(w_NK[:n_valid]), specs.append((torch.float32, K))
    rows = buf._comm.exchange_rows(W.pack_rows(parts), counts_RR[me].tolist(), counts_RR[:, me].tolist(), what)
    rows = faults.mutate_rows(buf, "combine", index, rows, x_NH.shape[1] * x_NH.element_size(), drop_zeroes=True)
    got = W.unpack_rows(rows, specs)
    T, H = in_rank.shape[0], x_NH.shape[1]
    dev = x_NH.device
    r_S, t_S = in_rank.t().nonzero().unbind(1)  # arrival order: rank ascending, token ascending
    from_R = counts_RR[:, me].tolist()
    starts = [0]
    for c in from_R:
        starts.append(starts[-1] + c)
    acc = torch.zeros(T, H, dtype=torch.float32, device=dev)
    for b in p["bias"]:
        acc += b.float()
    rows_x = got[0].float()
    if internode:
        for n in range(-(-R // node)):
            part = torch.zeros(T, H, dtype=torch.float32, device=dev)
            for r in range(n * node, min(R, (n + 1) * node)):
                part.index_add_(0, t_S[starts[r]:starts[r + 1]], rows_x[starts[r]:starts[r + 1]])
            acc += part.to(torch.bfloat16).float()
    else:
        for r in range(R):  # one index_add per rank: ascending rank order, each token once per rank
            acc.index_add_(0, t_S[starts[r]:starts[r + 1]], rows_x[starts[r]:starts[r + 1]])
    combined = acc.to(torch.bfloat16)
    combined_w = None
    if K:
        wacc = torch.zeros(T, K, dtype=torch.float32, device=dev)
        for r in range(R):
            wacc.index_add_(0, t_S[starts[r]:starts[r + 1]], got[1][starts[r]:starts[r + 1]])
        combined_w = wacc
    if not internode:
        lay.mark_send_head_after_combine(handle[5], p["cfg"].num_sms // 2)
    return combined, combined_w, make_event(async_finish, previous_event)


def _check(buf: Any, x: Any, handle: Any, topk_weights: Any, bias: Any, config: Any, internode: bool) -> dict:
    R, me = buf.group_size, buf.rank
    cfg = _config(buf, config, combine=True)
    need(handle is not None, "argument handle: combine needs the handle returned by dispatch")
    n = 10 if internode else 6
    info = chk.handle_lineage("handle", handle, 7 if internode else 3, (n,), buf.buffer_id)
    if internode:
        in_rank = chk.tensor("handle is_token_in_rank", handle[0], dtype=torch.bool, shape=(None, R))
        prefix = chk.tensor("handle recv_gbl_rank_prefix_sum", handle[6], dtype=torch.int32, shape=(R,))
        send_R = torch.diff(prefix.cpu().to(torch.int64), prepend=torch.zeros(1, dtype=torch.int64, device="cpu"))
        rows = handle[7].shape[0]
    else:
        rpm = chk.tensor("handle rank_prefix_matrix", handle[0], dtype=torch.int32, shape=(R, R))
        in_rank = chk.tensor("handle is_token_in_rank", handle[4], dtype=torch.bool, shape=(None, R))
        chk.tensor("handle send_head", handle[5], dtype=torch.int32, shape=(in_rank.shape[0], R))
        send_R = torch.diff(rpm[:, me].cpu().to(torch.int64), prepend=torch.zeros(1, dtype=torch.int64, device="cpu"))
        rows = chk.tensor("handle recv_src_idx", handle[3], dtype=torch.int32, shape=(None,)).shape[0]
    chk.tensor("x", x, dtype=torch.bfloat16, shape=(rows, None))
    need(int(send_R.sum()) <= rows, f"handle: {int(send_R.sum())} received rows but only {rows} in recv_src_idx")
    T, H = in_rank.shape[0], x.shape[1]
    K = 0
    if topk_weights is not None:
        chk.tensor("topk_weights", topk_weights, dtype=torch.float32, shape=(rows, None))
        K = topk_weights.shape[1]
    biases = []
    if bias is not None:
        items = list(bias) if isinstance(bias, (tuple, list)) else [bias]
        need(len(items) in (1, 2), f"argument bias: a tensor or a pair of tensors, got {len(items)} items")
        for i, b in enumerate(items):
            if b is not None:
                biases.append(chk.tensor(f"bias[{i}]" if len(items) > 1 else "bias", b, dtype=torch.bfloat16,
                                         shape=(T, H)))
    _nvl_bound(buf, cfg, H * 2, K, 0, True)
    return {"x": x, "H": H, "K": K, "T": T, "in_rank": in_rank, "send_R": send_R, "bias": biases, "cfg": cfg,
            "lineage": info.dispatch_seq if info is not None else -1}
