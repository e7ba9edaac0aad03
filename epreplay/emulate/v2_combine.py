"""Combine of the emulated V2 ElasticBuffer: each received token's rows go back to its source.

Legend: T tokens of this (source) rank, K top-k, H hidden, R ranks, N rows this rank received in
the dispatch, X expanded rows, S rows sent back in total.

Numerics (V2's reference, deep_ep/utils/refs.py combine, bitwise): a receiving rank first reduces
its own top-k slots of a token (non-expanded: the caller already did, one row per token; expanded:
fp32 sum over k ascending, one bf16 cast). The source then accumulates in fp32, starting from
bias0 + bias1, each rank's partial in the order of that rank's last top-k position for the token,
and casts to bf16 once. With allow_multiple_reduction=False an expanded combine skips the
per-rank step: every slot is added on its own, in top-k order.
combined_topk_weights[t, k] is the weight the rank holding expert topk_idx[t, k] sent back
(0 where topk_idx is -1).
"""
from __future__ import annotations

from typing import Any

import torch

from epreplay.emulate import check as chk
from epreplay.emulate import comm as W
from epreplay.emulate import faults
from epreplay.emulate.check import ArgError, need
from epreplay.emulate.v2 import EPHandle, event_for
from epreplay.emulate.v2_ops import OP_COMBINE


def combine(buf: Any, x: Any, handle: Any, topk_weights: Any, bias: Any, num_qps: int, previous_event: Any,
            async_: bool, on_comm: bool) -> tuple:
    seq, index = buf._begin("combine")
    R, me = buf.num_ranks, buf.rank_idx
    what = f"ElasticBuffer.combine (call {seq} on ElasticBuffer #{buf.buffer_id})"
    hdr = chk.header(OP_COMBINE, seq, R)
    err, p = None, {}
    try:
        p = _check(buf, x, handle, topk_weights, bias, num_qps, previous_event, on_comm)
        hdr[W.HID], hdr[W.TOPK], hdr[W.NTOK], hdr[W.LINEAGE] = p["H"], p["K"], p["T"], handle._dispatch_seq
        hdr[W.HEAD:W.HEAD + R] = torch.bincount(p["src_S"], minlength=R)[:R]
        hdr[W.HEAD + R:] = p["in_rank"].sum(0).cpu()
    except ArgError as exc:
        err = str(exc)
    except Exception as exc:  # noqa: BLE001 - any local failure must reach the other ranks too
        err = f"{type(exc).__name__}: {exc}"
    words = buf._agree(hdr, err, what, compare=(W.HID, W.TOPK, W.LINEAGE))
    counts_RR = words[:, W.HEAD:W.HEAD + R]
    K, H, dev = p["K"], p["H"], x.device
    local = p["local_SK"].to(dev)  # [S, K] local expert or -1, rows sorted by source rank
    last_S = torch.where(local >= 0, torch.arange(K, device=dev), -1).amax(dim=1).to(torch.int32)
    per_slot = handle.do_expand and not buf.allow_multiple_reduction
    if handle.do_expand:
        slots, own_SK = torch.where(local >= 0, p["slots_SK"].to(dev), 0), local >= 0
        if per_slot:  # every slot travels on its own: [S, K * H], zeros where not local
            part = torch.where(own_SK.unsqueeze(-1), x[slots], 0).reshape(-1, K * H)
        else:  # fp32 sum over k ascending (an ordered loop, as the reference does), one cast
            acc = torch.zeros(local.shape[0], H, dtype=torch.float32, device=dev)
            for k in range(K):
                sel = own_SK[:, k].nonzero().flatten()
                acc.index_add_(0, sel, x[slots[sel, k]].float())
            part = acc.to(torch.bfloat16)
        w_SK = None if topk_weights is None else torch.where(own_SK, topk_weights[slots], 0.0)
    else:
        part = x[p["row_S"]]
        w_SK = None if topk_weights is None else torch.where(local >= 0, topk_weights[p["row_S"]], 0.0)
    parts = [part, p["tok_S"].to(torch.int32).view(-1, 1).to(dev), last_S.view(-1, 1), (local >= 0).to(torch.int8)]
    specs = [(torch.bfloat16, part.shape[1]), (torch.int32, 1), (torch.int32, 1), (torch.int8, K)]
    if w_SK is not None:
        parts.append(w_SK.float()), specs.append((torch.float32, K))
    rows = buf._comm.exchange_rows(W.pack_rows(parts), counts_RR[me].tolist(), counts_RR[:, me].tolist(), what)
    rows = faults.mutate_rows(buf, "combine", index, rows, part.shape[1] * 2, drop_zeroes=True)
    got = W.unpack_rows(rows, specs)
    T = p["T"]
    tok, last, own = got[1].reshape(-1).long(), got[2].reshape(-1).long(), got[3].bool()
    bias_f = [b.float() for b in p["bias"]]
    acc = (bias_f[0] + bias_f[1] if len(bias_f) == 2 else bias_f[0].clone() if bias_f
           else torch.zeros(T, H, dtype=torch.float32, device=dev))
    vals = got[0].float()
    for k in range(K):  # at most one contribution per (token, k): the order is the reference's
        if per_slot:
            sel = own[:, k]
            acc.index_add_(0, tok[sel], vals[sel, k * H:(k + 1) * H])
        else:
            sel = last == k
            acc.index_add_(0, tok[sel], vals[sel])
    combined_w = None
    if w_SK is not None:
        combined_w = torch.zeros(T, K, dtype=torch.float32, device=dev).index_add_(0, tok, got[4])
    return acc.to(torch.bfloat16), combined_w, event_for(async_, previous_event)


def _check(buf: Any, x: Any, handle: Any, w: Any, bias: Any, num_qps: int, previous_event: Any,
           on_comm: bool) -> dict:
    need(isinstance(handle, EPHandle), f"argument handle: expected the EPHandle returned by dispatch, got "
                                       f"{type(handle).__name__}")
    need(handle._buffer_id in (-1, buf.buffer_id), f"argument handle: returned by another ElasticBuffer "
                                                   f"(#{handle._buffer_id}), not this one (#{buf.buffer_id})")
    need(getattr(handle, "_recv_local_NK", None) is not None,
         "argument handle: not made by the emulated ElasticBuffer's dispatch")
    need(num_qps <= buf.num_allocated_qps,
         f"argument num_qps={num_qps}: Allocated QPs are not enough ({buf.num_allocated_qps})")
    need(previous_event is None or on_comm, "argument previous_event: needs allocate_on_comm_stream=True as well")
    meta = handle.recv_src_metadata
    chk.tensor("x", x, dtype=torch.bfloat16, shape=(None, None))
    H = x.shape[1]
    need(H * 2 % 16 == 0, f"argument x: hidden {H} x 2 bytes is not a multiple of 16 bytes")
    N, M, K = handle._valid, handle.num_max_tokens_per_rank, handle.topk_idx.shape[1]
    if handle.do_expand:
        slots = meta[:N, 2:].long()
        top = int(slots.max()) if slots.numel() else -1
        need(x.shape[0] > top, f"argument x: {x.shape[0]} rows, but the expanded layout uses slot {top}")
        if w is not None:
            need(buf.allow_multiple_reduction, "argument topk_weights: an expanded combine carries weights only "
                                               "with ElasticBuffer(allow_multiple_reduction=True)")
            chk.tensor("topk_weights", w, dtype=torch.float32, shape=(x.shape[0],))
    else:
        need(x.shape[0] == meta.shape[0], f"argument x: {x.shape[0]} rows, the handle's dispatch received "
                                          f"{meta.shape[0]} (recv_src_metadata rows)")
        if w is not None:
            chk.tensor("topk_weights", w, dtype=torch.float32, shape=(x.shape[0], K))
    T = handle.topk_idx.shape[0]
    biases = []
    if bias is not None:
        items = list(bias) if isinstance(bias, (tuple, list)) else [bias]
        need(len(items) in (1, 2), f"argument bias: a tensor or a pair of tensors, got {len(items)} items")
        for i, b in enumerate(items):
            biases.append(chk.tensor(f"bias[{i}]" if len(items) > 1 else "bias", b, dtype=torch.bfloat16,
                                     shape=(T, H)))
    g = meta[:N, 0].long().cpu()
    order = torch.sort(g // M, stable=True).indices  # grouped by source rank for the exchange
    topk = handle.topk_idx
    L = handle.num_experts // buf.num_ranks
    in_rank = torch.zeros(T, buf.num_ranks, dtype=torch.bool)
    ok = (topk >= 0).cpu()
    rows = torch.arange(T).unsqueeze(1).expand(T, K)
    in_rank[rows[ok], topk.cpu()[ok] // L] = True
    return {"H": H, "K": K, "T": T, "bias": biases, "in_rank": in_rank, "src_S": (g // M)[order],
            "tok_S": (g % M)[order], "row_S": order.to(x.device), "local_SK": handle._recv_local_NK[order.to(
                handle._recv_local_NK.device)], "slots_SK": meta[:N, 2:].long()[order.to(meta.device)]}
