"""What a DeepEP V2 `ElasticBuffer` call stages (hot path); build_v2.py makes the record's arrays.

Legend: T tokens on this rank, K top-k, N rows received (allocated: more without do_cpu_sync),
X expanded rows.

V2 calls are recorded as the ops dispatch / cached_dispatch / combine (records.py: variant
ELASTIC, meta "api": "elastic") with V1's array names and meanings. V2 hands over no layout
tensors and keeps its receive bookkeeping in the EPHandle, so this stages the raw material:
  dispatch   topk_idx (routing: topk_idx_TK; counts: _topk_idx_TK, for the counts only),
             the handle's psum_num_recv_tokens_per_scaleup_rank (_v2_psum_R), per-expert
             psum (_v2_psum_L), recv_src_metadata [N, K + 2] (_v2_meta_NK), received row
             fingerprints (_v2_recv_fp, in V2's receive layout), and the plain values
             _v2 = [E, M, do_expand, expert_alignment, handle.do_expand] and _v2_list
             (num_recv_tokens_per_expert_list).
  combine    x_fp_N (x_fp_X when the handle is expanded), topk_weights_NK / topk_weights_X,
             x_NH / x_XH, combined_fp_T, and the handle's _v2_psum_R and _v2 values.
"""
from __future__ import annotations

from typing import Any

from epreplay.format.records import Level, Op


def is_elastic_call(a: dict[str, Any]) -> bool:
    """True when the bound arguments are an ElasticBuffer dispatch/combine's (V1 has no
    do_expand argument and its handles are tuples)."""
    return "do_expand" in a or hasattr(a.get("handle"), "recv_src_metadata")


def elastic_meta(m: dict[str, Any], a: dict[str, Any]) -> None:
    """The static meta keys of a V2 call (per call site)."""
    m["api"] = "elastic"
    for arg, key in (("num_experts", "E"), ("num_max_tokens_per_rank", "M"), ("expert_alignment", "expert_alignment")):
        v = a.get(arg)
        if v is not None and hasattr(v, "__index__"):
            m[key] = int(v)
    if "do_expand" in a:
        m["do_expand"] = bool(a.get("do_expand"))
        m["do_cpu_sync"] = None if a.get("do_cpu_sync") is None else bool(a.get("do_cpu_sync"))


def _rows(x: Any) -> int:
    first = x[0] if isinstance(x, (tuple, list)) else x
    return int(first.shape[0]) if hasattr(first, "shape") and len(first.shape) else 0


def stage_inputs(call: Any, a: dict[str, Any], payload: bool) -> None:
    st, lvl, op = call.staging, call.level, call.op
    routing, fps = lvl >= Level.ROUTING, lvl >= Level.FINGERPRINTS
    x, handle = a.get("x"), a.get("handle")
    if op in (Op.DISPATCH, Op.CACHED_DISPATCH):
        call.tokens = _rows(x)
        if op == Op.DISPATCH:
            st.snapshot("topk_idx_TK" if routing else "_topk_idx_TK", a.get("topk_idx"))
            if routing and a.get("topk_weights") is not None:
                st.snapshot("topk_weights_TK", a.get("topk_weights"))
    elif op == Op.COMBINE:
        call.tokens = _rows(getattr(handle, "topk_idx", None))
        w = a.get("topk_weights")
        if routing and w is not None:
            st.snapshot("topk_weights_NK" if w.dim() == 2 else "topk_weights_X", w)
    expanded = op == Op.COMBINE and bool(getattr(handle, "do_expand", False))
    if fps and x is not None:
        st.rows_fp("x_fp_T" if op != Op.COMBINE else "x_fp_X" if expanded else "x_fp_N", x)
    if payload and x is not None:
        if isinstance(x, (tuple, list)):
            st.snapshot("x_TH", x[0])
            st.snapshot("x_scales_TS", x[1])
        else:
            st.snapshot("x_TH" if op != Op.COMBINE else "x_XH" if expanded else "x_NH", x)


def stage_outputs(call: Any, a: dict[str, Any], result: tuple) -> None:
    st, op = call.staging, call.op
    fps = call.level >= Level.FINGERPRINTS
    if a.get("async_with_compute_stream"):
        st.after(result[-1])  # (..., event): the outputs are ready when the event is
    h = result[3] if op == Op.DISPATCH and len(result) > 3 else a.get("handle")
    if h is None or not hasattr(h, "recv_src_metadata"):
        return
    st.value("_v2", [int(h.num_experts), int(h.num_max_tokens_per_rank),
                     int(bool(a.get("do_expand", h.do_expand))), int(h.expert_alignment), int(bool(h.do_expand))])
    st.snapshot("_v2_psum_R", h.psum_num_recv_tokens_per_scaleup_rank)
    if op == Op.COMBINE:
        call.tokens = _rows(result[0])
        if fps:
            st.rows_fp("combined_fp_T", result[0])
        return
    st.value("_v2_list", [int(v) for v in h.num_recv_tokens_per_expert_list])
    st.snapshot("_v2_psum_L", h.psum_num_recv_tokens_per_expert)
    st.snapshot("_v2_meta_NK", h.recv_src_metadata)
    if fps:
        st.rows_fp("_v2_recv_fp", result[0])
