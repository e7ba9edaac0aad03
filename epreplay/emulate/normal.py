"""Normal (high-throughput) dispatch and combine of the emulated Buffer.

Legend: T tokens on this rank, K top-k, E experts, R ranks, L = E / R, H hidden, S scale columns,
N rows received, C channels (Config.num_sms / 2), NR nodes of 8 ranks, B bytes of a packed row.

Dispatch sends token t to every rank r with is_token_in_rank[t, r], once, in (rank, token) order;
the all_to_all delivers rows grouped by source rank ascending and, inside a source, by token
ascending, which is exactly DeepEP's receive order. Combine sends each row back to its source,
which sums the rows of a token over ranks in ascending order in fp32 (from bias0 + bias1) and
casts to bf16 once (intranode); above 8 ranks it first forms bf16 partial sums per node.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from epreplay.emulate import check as chk
from epreplay.emulate import comm as W
from epreplay.emulate import layout as lay
from epreplay.emulate import faults
from epreplay.emulate.check import ArgError, need
from epreplay.emulate.comm import EmulatedDeepEPError
from epreplay.emulate.event import make_event

OP_DISPATCH, OP_CACHED, OP_COMBINE = 2, 3, 4


def layout(buf: Any, topk_idx: Any, num_experts: int, previous_event: Any, async_finish: bool) -> tuple:
    """get_dispatch_layout: local, so a bad argument raises on this rank only (no peer waits)."""
    buf._begin("layout", collective=False)
    R = buf.group_size
    try:
        need(isinstance(num_experts, int) and num_experts > 0 and num_experts % R == 0,
             f"argument num_experts={num_experts}: must be a positive multiple of the {R} ranks")
        chk.topk_ids("topk_idx", topk_idx, None, num_experts)
    except ArgError as exc:
        raise EmulatedDeepEPError(f"DeepEP emulation: get_dispatch_layout: rank {buf.rank}: {exc}") from None
    per_rank, per_rdma, per_expert, in_rank = lay.dispatch_layout(topk_idx, num_experts, R)
    return per_rank, per_rdma, per_expert, in_rank, make_event(async_finish, previous_event)


def _split_x(x: Any, T: Optional[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """x: bf16 [T, H] or (fp8 e4m3 [T, H], scales fp32/int32 [T, S] or [T]) -> (values, scales)."""
    if isinstance(x, (tuple, list)):
        need(len(x) == 2, f"argument x: a tuple must be (fp8 [T, H], scales [T, H/128]), got {len(x)} items")
        v, s = x
        chk.tensor("x[0]", v, dtype=torch.float8_e4m3fn, shape=(T, None))
        chk.tensor("x[1] (scales)", s, dtype=(torch.float32, torch.int32))
        need(s.dim() in (1, 2) and s.shape[0] == v.shape[0],
             f"argument x[1] (scales): shape {list(s.shape)}, expected [{v.shape[0]}, S] or [{v.shape[0]}]")
        return v, s
    chk.tensor("x", x, dtype=torch.bfloat16, shape=(T, None))
    need(x.shape[1] * 2 % 16 == 0, f"argument x: hidden {x.shape[1]} must fill whole 16-byte units (H % 8 == 0)")
    return x, None


def _config(buf: Any, config: Any, combine: bool) -> Any:
    cfg = config if config is not None else (
        buf.get_combine_config(buf.group_size) if combine else buf.get_dispatch_config(buf.group_size))
    need(hasattr(cfg, "num_sms") and cfg.num_sms % 2 == 0 and cfg.num_sms > 0,
         f"argument config: num_sms must be even and positive, got {getattr(cfg, 'num_sms', cfg)!r}")
    return cfg


def _nvl_bound(buf: Any, cfg: Any, row_bytes: int, K: int, S: int, combine: bool) -> None:
    """DeepEP's assertion that the NVLink queues fit in num_nvl_bytes (0: unbounded emulator default)."""
    if buf.num_nvl_bytes <= 0:
        return
    R, c, chunk = min(buf.group_size, lay.NVL_PEERS), cfg.num_sms // 2, cfg.num_max_nvl_chunked_recv_tokens
    if combine:
        need_bytes = c * R * 8 + c * R * chunk * (row_bytes + 4 + K * 4)
    else:
        need_bytes = R * R * 4 + c * R * 16 + c * R * chunk * (row_bytes + 4 + K * 12 + S * 4)
    need(need_bytes <= buf.num_nvl_bytes,
         f"num_nvl_bytes={buf.num_nvl_bytes} is too small: DeepEP's queues need {need_bytes} bytes for "
         f"{row_bytes}-byte rows, top-{K}, {c} channels x {R} ranks x {chunk} tokens "
         f"(Assertion ... <= num_nvl_bytes); allocate more, e.g. Config.get_nvl_buffer_size_hint")


def dispatch(buf: Any, x: Any, handle: Any, num_tokens_per_rank: Any, num_tokens_per_rdma_rank: Any,
             is_token_in_rank: Any, num_tokens_per_expert: Any, topk_idx: Any, topk_weights: Any,
             expert_alignment: int, num_worst_tokens: int, config: Any, previous_event: Any,
             async_finish: bool) -> tuple:
    cached = handle is not None
    op = "cached_dispatch" if cached else "dispatch"
    seq, index = buf._begin(op)
    R, me = buf.group_size, buf.rank
    internode = R > lay.node_size()
    what = f"{'dispatch (cached handle)' if cached else 'dispatch'} (call {seq} on Buffer #{buf.buffer_id})"
    hdr = chk.header(OP_CACHED if cached else OP_DISPATCH, seq, R)
    err, p = None, {}
    try:
        p = _check_dispatch(buf, x, handle, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert,
                            topk_idx, topk_weights, expert_alignment, num_worst_tokens, config, internode)
        hdr[W.HID], hdr[W.FP8], hdr[W.TOPK] = p["H"], int(p["scales"] is not None), p["K"]
        hdr[W.NEXP], hdr[W.WORST], hdr[W.NTOK] = p["E"], num_worst_tokens, p["T"]
        hdr[W.LINEAGE] = p["lineage"]
        hdr[W.HEAD:W.HEAD + R] = p["in_rank"].sum(0).cpu()
        if p["expect"] is not None:
            hdr[W.HEAD + R:] = p["expect"]
    except ArgError as exc:
        err = str(exc)
    except Exception as exc:  # noqa: BLE001 - any local failure must reach the other ranks too
        err = f"{type(exc).__name__}: {exc}"
    words = buf._agree(hdr, err, what, compare=(W.HID, W.FP8, W.TOPK, W.WORST, W.LINEAGE)
                       if cached else (W.HID, W.FP8, W.TOPK, W.NEXP, W.WORST))
    counts_RR = words[:, W.HEAD:W.HEAD + R]  # [source, destination] rows
    n_R = counts_RR.sum(0)
    if num_worst_tokens > 0 and bool((n_R > num_worst_tokens).any()):
        r = int((n_R > num_worst_tokens).nonzero()[0])
        raise EmulatedDeepEPError(f"DeepEP emulation: {what}: rank {r} receives {int(n_R[r])} tokens, more than "
                                  f"num_worst_tokens={num_worst_tokens} (DeepEP would overrun its buffer; raised "
                                  f"on every rank)")
    xv, xs, in_rank, K, T = p["x"], p["scales"], p["in_rank"], p["K"], p["T"]
    dst_S, t_S = in_rank.t().nonzero().unbind(1)  # (destination, token), destination-major
    parts, specs = [xv[t_S]], [(xv.dtype, xv.shape[1])]
    if xs is not None:
        xs2 = xs.view(xs.shape[0], -1)
        parts.append(xs2[t_S]), specs.append((xs.dtype, xs2.shape[1]))
    parts.append(t_S.to(torch.int32).view(-1, 1)), specs.append((torch.int32, 1))
    if not cached and K:
        L = p["E"] // R
        idx_SK = topk_idx[t_S]
        lo = (dst_S * L).unsqueeze(1)
        local = torch.where((idx_SK >= lo) & (idx_SK < lo + L), idx_SK - lo, torch.full_like(idx_SK, -1))
        w = torch.where(local >= 0, topk_weights[t_S], torch.zeros_like(topk_weights[t_S]))
        parts += [local, w]
        specs += [(torch.int64, K), (torch.float32, K)]
    if internode:
        parts.append(_source_meta(in_rank, dst_S, t_S, me)), specs.append((torch.uint8, lay.SOURCE_META_BYTES))
    rows = buf._comm.exchange_rows(W.pack_rows(parts), counts_RR[me].tolist(), counts_RR[:, me].tolist(), what)
    rows = faults.mutate_rows(buf, op, index, rows, xv.shape[1] * xv.element_size())
    got = W.unpack_rows(rows, specs)
    N = rows.shape[0]
    n_rows = max(num_worst_tokens, N) if num_worst_tokens > 0 else N
    if cached:
        n_rows = max(n_rows, p["handle_rows"])
    recv_x = _pad(got[0], n_rows).contiguous()
    recv_scales = None
    if xs is not None:
        recv_scales = _pad(got[1], n_rows).contiguous()
        recv_scales = recv_scales.view(-1) if xs.dim() == 1 else recv_scales
    src_idx_N = got[2 if xs is not None else 1].reshape(-1)
    event = make_event(async_finish, previous_event)
    out_x = (recv_x, recv_scales) if xs is not None else recv_x
    if cached:
        return out_x, None, None, None, None, event
    recv_topk_idx = recv_topk_w = None
    if K:
        recv_topk_idx = _pad(got[-3 if internode else -2], n_rows, fill=-1).contiguous()
        recv_topk_w = _pad(got[-2 if internode else -1], n_rows).contiguous()
    L = p["E"] // R
    if num_worst_tokens > 0:
        per_expert: list[int] = []
    else:
        if K:
            valid = recv_topk_idx[recv_topk_idx >= 0]
            raw_L = torch.bincount(valid, minlength=L)[:L].cpu()
        else:  # no topk: the counts come from every source's num_tokens_per_expert
            raw_L = buf._comm.exchange_counts(p["per_expert"].view(R, L).to(torch.int64).cpu(), what).sum(0)
        a = max(int(expert_alignment), 1)
        per_expert = [(int(v) + a - 1) // a * a for v in raw_L.tolist()]
    src_rank_N = torch.repeat_interleave(torch.arange(R, device="cpu"), counts_RR[:, me])
    if src_rank_N.numel() != N:  # rows dropped by an injected fault: keep shapes consistent
        src_rank_N = src_rank_N[:N]
    c = p["cfg"].num_sms // 2
    tokens_R = words[:, W.NTOK].tolist()
    recv_cpm = lay.recv_channel_prefix(src_rank_N, src_idx_N, tokens_R, c).to(xv.device)
    recv_src_idx = _pad(src_idx_N, n_rows).contiguous()
    dev = xv.device
    rpm = counts_RR.cumsum(0).to(torch.int32).to(dev)
    if internode:
        handle = _internode_handle(in_rank, c, recv_cpm, counts_RR[:, me].to(dev), got[-1], n_rows)
        key = handle[7]
    else:
        handle = (rpm, lay.channel_prefix(in_rank, c), recv_cpm, recv_src_idx, in_rank, lay.send_head(in_rank, c))
        key = recv_src_idx
    chk.remember(key, chk.HandleInfo(buf.buffer_id, seq, {"internode": internode}))
    return out_x, recv_topk_idx, recv_topk_w, per_expert, handle, event


def _check_dispatch(buf: Any, x: Any, handle: Any, ntpr: Any, itir: Any, ntpe: Any, topk_idx: Any,
                    topk_w: Any, align: int, worst: int, config: Any, internode: bool) -> dict:
    R, me = buf.group_size, buf.rank
    cfg = _config(buf, config, combine=False)
    need(isinstance(align, int) and align >= 1, f"argument expert_alignment={align!r}: must be an int >= 1")
    need(isinstance(worst, int) and worst >= 0, f"argument num_worst_tokens={worst!r}: must be an int >= 0")
    need(worst == 0 or not internode, "argument num_worst_tokens: internode dispatch (> 8 ranks) does not "
                                      "support num_worst_tokens > 0")
    xv, xs = _split_x(x, None)
    T, H = xv.shape
    out: dict = {"x": xv, "scales": xs, "T": T, "H": H, "cfg": cfg, "expect": None, "lineage": -1}
    if handle is not None:
        need(topk_idx is None and topk_w is None,
             "arguments topk_idx/topk_weights: a cached dispatch (handle=...) takes neither")
        n = 10 if internode else 6
        info = chk.handle_lineage("handle", handle, 7 if internode else 3, (n,), buf.buffer_id)
        in_rank = chk.tensor("handle is_token_in_rank", handle[0] if internode else handle[4],
                             dtype=torch.bool, shape=(T, R))
        if internode:
            prefix = chk.tensor("handle recv_gbl_rank_prefix_sum", handle[6], dtype=torch.int32, shape=(R,))
            expect = torch.diff(prefix.cpu().to(torch.int64), prepend=torch.zeros(1, dtype=torch.int64, device="cpu"))
            out["handle_rows"] = handle[7].shape[0]
        else:
            rpm = chk.tensor("handle rank_prefix_matrix", handle[0], dtype=torch.int32, shape=(R, R))
            expect = torch.diff(rpm[:, me].cpu().to(torch.int64), prepend=torch.zeros(1, dtype=torch.int64, device="cpu"))
            out["handle_rows"] = handle[3].shape[0]
        out.update(in_rank=in_rank, K=0, E=-1, expect=expect,
                   lineage=info.dispatch_seq if info is not None else -1)
        _nvl_bound(buf, cfg, H * xv.element_size(), 0, 0 if xs is None else xs.numel() // max(T, 1), False)
        return out
    need(ntpr is not None and itir is not None and ntpe is not None,
         "arguments num_tokens_per_rank, is_token_in_rank and num_tokens_per_expert are required without a "
         "handle (use get_dispatch_layout)")
    chk.tensor("num_tokens_per_rank", ntpr, dtype=torch.int32, shape=(R,))
    chk.tensor("is_token_in_rank", itir, dtype=torch.bool, shape=(T, R))
    chk.tensor("num_tokens_per_expert", ntpe, dtype=torch.int32, shape=(None,))
    E = ntpe.shape[0]
    need(E % R == 0 and E > 0, f"argument num_tokens_per_expert: {E} experts is not a multiple of the {R} ranks")
    need(bool((itir.sum(0).to(torch.int32) == ntpr).all()),
         "argument num_tokens_per_rank does not match is_token_in_rank.sum(0) (layout tensors of different calls?)")
    need((topk_idx is None) == (topk_w is None),
         "arguments topk_idx and topk_weights must be given together (got "
         f"{'topk_idx without topk_weights' if topk_w is None else 'topk_weights without topk_idx'})")
    need(worst == 0 or topk_idx is not None, "argument num_worst_tokens > 0 needs topk_idx and topk_weights")
    K = 0
    if topk_idx is not None:
        chk.topk_ids("topk_idx", topk_idx, T, E)
        K = topk_idx.shape[1]
        chk.tensor("topk_weights", topk_w, dtype=torch.float32, shape=(T, K))
        per_rank, _, per_expert, in_rank = lay.dispatch_layout(topk_idx, E, R)
        need(bool((in_rank == itir).all()), "argument is_token_in_rank does not match topk_idx "
                                            "(pass the layout of these topk_idx)")
        need(bool((per_expert == ntpe).all()), "argument num_tokens_per_expert does not match topk_idx "
                                               "(pass the layout of these topk_idx)")
    _nvl_bound(buf, cfg, H * xv.element_size(), K, 0 if xs is None else xs.numel() // max(T, 1), False)
    out.update(in_rank=itir, K=K, E=E, per_expert=ntpe)
    return out


def _pad(t: torch.Tensor, rows: int, fill: float = 0) -> torch.Tensor:
    if t.shape[0] >= rows:
        return t
    pad = torch.full((rows - t.shape[0],) + tuple(t.shape[1:]), fill, dtype=t.dtype, device=t.device) \
        if t.dtype != torch.float8_e4m3fn else torch.zeros((rows - t.shape[0],) + tuple(t.shape[1:]),
                                                          dtype=t.dtype, device=t.device)
    return torch.cat([t, pad])


def _source_meta(in_rank: torch.Tensor, dst_S: torch.Tensor, t_S: torch.Tensor, me: int) -> torch.Tensor:
    """DeepEP's SourceMeta per sent row: int32 source node, int32 bitmask of the destination node's
    ranks that receive the token."""
    T, R = in_rank.shape
    n = lay.node_size()
    nodes = -(-R // n)
    padded = torch.zeros(T, nodes * n, dtype=torch.int32, device=in_rank.device)
    padded[:, :R] = in_rank.to(torch.int32)
    bits = (padded.view(T, nodes, n) << torch.arange(n, device=in_rank.device)).sum(-1)
    mask_S = bits[t_S, dst_S // n].to(torch.int32)
    meta = torch.stack([torch.full_like(mask_S, me // n), mask_S], dim=1)
    return meta.contiguous().view(torch.uint8).view(-1, lay.SOURCE_META_BYTES)


def _internode_handle(in_rank: torch.Tensor, c: int, recv_cpm: torch.Tensor, recv_from_R: torch.Tensor,
                      src_meta: torch.Tensor, n_rows: int) -> tuple:
    """DeepEP's 10-tuple internode handle: shapes and dtypes as DeepEP's; values ours (see README)."""
    R = in_rank.shape[1]
    n = lay.node_size()
    nr = -(-R // n)
    dev = in_rank.device
    nodes = lay.node_mask(in_rank)
    node_of = torch.arange(R, device=dev) // n
    recv_rdma_cpm = torch.zeros(nr, c, dtype=torch.int32, device=dev).index_add_(0, node_of, recv_cpm)
    per_node = torch.zeros(nr, dtype=torch.int64, device=dev).index_add_(0, node_of, recv_from_R.to(torch.int64))
    meta = _pad(src_meta, n_rows).contiguous()
    return (in_rank, lay.channel_prefix(nodes, c), lay.channel_prefix(in_rank, c), recv_rdma_cpm,
            per_node.cumsum(0).to(torch.int32), recv_cpm, recv_from_R.cumsum(0).to(torch.int32), meta,
            lay.send_head(nodes, c), torch.full((n_rows, lay.NVL_PEERS), -1, dtype=torch.int32, device=dev))
