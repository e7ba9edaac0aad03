"""The arrays of a DeepEP V2 record (staged by extract_v2.py), with V1's names and meanings.

Legend: T tokens, K top-k, E experts, R ranks, L = E / R, M num_max_tokens_per_rank, N rows
received (the valid ones: psum_num_recv_tokens_per_scaleup_rank[-1]), X expanded rows.

Received rows go to (source rank, token) order (V1's order; V2's own order may vary between
runs), and an expanded receive is folded to one row per token (its first slot), so a V2
recording compares with a V1 one row for row.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from epreplay.format.records import Level, Op


def _aligned(n: np.ndarray, a: int) -> np.ndarray:
    return (n + a - 1) // a * a


def arrays_of(call: Any, st: Any, arrays: dict[str, Any], meta: dict[str, Any], nonfinite: list[str]) -> None:
    """Add the V1-named arrays and the handle's facts (E, M, do_expand) to a V2 record."""
    op = call.op
    v = st.items.get("_v2")
    if v is None:
        return
    E, M, expand, align, handle_expand = (int(p) for p in v)
    meta.update(E=E, M=M, do_expand=bool(expand), expert_alignment=align)
    R = max(int(meta.get("ep_size") or 1), 1)
    L = max(E // R, 1)
    psum_R = st.array("_v2_psum_R")
    N = int(psum_R[-1]) if psum_R is not None and len(psum_R) else 0
    if op == Op.COMBINE:
        for name in ("x_fp_N", "topk_weights_NK", "x_NH"):  # rows past N are unused (no CPU sync)
            if name in arrays:
                arrays[name] = arrays[name][:N]
        return
    topk = arrays.get("topk_idx_TK")
    if topk is None:
        topk = st.array("_topk_idx_TK")
    if op == Op.DISPATCH and topk is not None:
        topk = np.asarray(topk).astype(np.int64)
        valid = topk >= 0
        dest = np.where(valid, topk // L, -1)
        arrays["num_tokens_per_rank_R"] = np.array([(dest == r).any(axis=1).sum() for r in range(R)], np.int32)
        arrays["num_tokens_per_expert_E"] = np.bincount(topk[valid], minlength=E)[:E].astype(np.int32)
    lst = st.items.get("_v2_list")
    if lst:
        arrays["recv_tokens_per_expert_L"] = np.asarray(lst, np.int64)
    else:
        psum_L = st.array("_v2_psum_L")
        if psum_L is not None:
            p = psum_L.astype(np.int64)
            if handle_expand:  # psum[i] = aligned start of expert i + its count
                starts = np.concatenate([[0], _aligned(p[:-1], align)])
                arrays["recv_tokens_per_expert_L"] = _aligned(p - starts, align)
            else:
                arrays["recv_tokens_per_expert_L"] = np.diff(p, prepend=0)
    meta_NK = st.array("_v2_meta_NK")
    if meta_NK is None:
        return
    g = meta_NK[:N, 0].astype(np.int64)
    order = np.argsort(g, kind="stable")
    arrays["recv_tokens_per_rank_R"] = np.bincount(g // M, minlength=R)[:R].astype(np.int32)
    if call.level >= Level.ROUTING and op == Op.DISPATCH:
        arrays["recv_src_idx_N"] = (g % M)[order].astype(np.int32)
    got = st.fingerprints("_v2_recv_fp")
    if got is not None:
        fp = got[0]  # its finiteness is not reported: V2 leaves padding rows uninitialised
        if expand:
            slots = meta_NK[:N, 2:]
            first = np.argmax(slots >= 0, axis=1)
            rows = slots[np.arange(N), first].astype(np.int64)
        else:
            rows = np.arange(N)
        arrays["recv_x_fp_N"] = np.asarray(fp)[rows][order]
