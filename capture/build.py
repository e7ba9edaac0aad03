"""Building records: a staged call (extract.Call, or packed.PackedCall) -> (header, arrays, meta).

Legend as in extract.py: T tokens, K top-k, L local experts, X = R * M receive slots per local
expert, V valid rows of a low-latency receive buffer.

Runs where records are written: the writer process (no torch unless it must hash CPU rows) or
the job's courier thread (writer "thread"). Reads a staging only through wait(), array(),
fingerprints() and items, so both kinds of call build the same way.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from epreplay.capture import build_v2
from epreplay.capture.packed import PackedStaging, tagged
from epreplay.format.records import FINGERPRINT_VERSION, VARIANT_BUFFER, VARIANT_ELASTIC, Kind, Level, Op, RecordHeader

Built = tuple[RecordHeader, dict[str, Any], dict[str, Any]]


def _valid_rows(rows_LX: np.ndarray, counts_L: np.ndarray) -> np.ndarray:
    """Rows [0, count[e]) of each local expert e, expert-major (records.py's V order)."""
    L = len(counts_L)
    X = rows_LX.shape[0] // max(L, 1) if L else 0
    rows = rows_LX.reshape((L, X) + rows_LX.shape[1:])
    parts = [rows[e, : int(counts_L[e])] for e in range(L)]
    return np.concatenate(parts) if parts else rows_LX[:0]


def _fp(st: Any, name: str, arrays: dict[str, Any], nonfinite: list[str],
        out_name: str | None = None) -> None:
    got = st.fingerprints(name)
    if got is None:
        return
    fp, finite = got
    arrays[out_name or name] = fp
    if not finite:
        nonfinite.append(out_name or name)


def build(call: Any) -> tuple[RecordHeader, dict[str, Any], dict[str, Any]]:
    """The record of a staged call: header, named arrays and meta (see the module docstring)."""
    st, op, lvl = call.staging, call.op, call.level
    st.wait()
    arrays: dict[str, Any] = {}
    nonfinite: list[str] = []
    meta = dict(call.meta)
    meta["args"] = call.described_args()
    me = int(meta.get("ep_rank", 0))
    for name in list(st.items):
        if name.startswith("_") or name.endswith((":finite", ":nonfinite")):
            continue
        v = st.items[name]
        if tagged(v, "fp") or tagged(v, "fpdone"):
            _fp(st, name, arrays, nonfinite)
        elif name.endswith(("_fp_T", "_fp_N", "_fp_V", "_fp_X")):  # hashed by the compiled hook
            _fp(st, name, arrays, nonfinite)
        else:
            arrays[name] = st.array(name)
    if meta.get("api") == "elastic":  # DeepEP V2 ElasticBuffer: build_v2.py
        build_v2.arrays_of(call, st, arrays, meta, nonfinite)
    elif op in (Op.DISPATCH, Op.CACHED_DISPATCH):
        rpm = st.array("_rank_prefix_matrix_RR")
        if rpm is not None:
            col = rpm[:, me].astype(np.int64)
            arrays["recv_tokens_per_rank_R"] = np.diff(col, prepend=0).astype(np.int32)
            if lvl >= Level.ROUTING and op == Op.DISPATCH:
                arrays["rank_prefix_matrix_RR"] = rpm
        gbl = st.array("_recv_gbl_rank_prefix_sum_R")
        if gbl is not None:
            arrays["recv_tokens_per_rank_R"] = np.diff(gbl.astype(np.int64), prepend=0).astype(np.int32)
        lst = st.items.get("_num_recv_list")
        if lst is not None:
            arrays["recv_tokens_per_expert_L"] = np.asarray(lst, dtype=np.int64)
    elif op == Op.LL_DISPATCH:
        counts = arrays.get("recv_count_L")
        src = st.array("_src_info_LX")
        if src is not None and counts is not None:
            arrays["src_info_V"] = _valid_rows(src.reshape(-1), counts).astype(np.int32)
        if "_recv_x_fp_LX" in st.items and counts is not None:
            _fp(st, "_recv_x_fp_LX", arrays, nonfinite, "recv_x_fp_V")
            arrays["recv_x_fp_V"] = _valid_rows(arrays["recv_x_fp_V"], counts)
    elif op == Op.LL_COMBINE:
        lr = st.array("_layout_range_LR")
        counts = (lr & 0xFFFFFFFF).sum(axis=1) if lr is not None else None
        if "_x_fp_LX" in st.items and counts is not None:
            _fp(st, "_x_fp_LX", arrays, nonfinite, "x_fp_V")
            arrays["x_fp_V"] = _valid_rows(arrays["x_fp_V"], counts)
        bits = st.array("_x_LXH")
        if bits is not None and counts is not None:
            if isinstance(bits, tuple):
                arrays["x_VH"] = (_valid_rows(bits[0].reshape(-1, bits[0].shape[-1]), counts), bits[1])
    if nonfinite:
        meta["nonfinite"] = nonfinite
    if any("_fp_" in name for name in arrays):  # hashed by stage.py/packed.py's default version
        meta["fp_version"] = FINGERPRINT_VERSION
    header = RecordHeader(kind=Kind.CALL, op=int(op), level=lvl, status=call.status,
                          buffer=call.buffer, seq=call.seq, step=call.step, layer=call.layer,
                          tokens=call.tokens, start_ns=call.start_ns,
                          duration_ns=call.timer.duration_ns() if call.done else -1,
                          variant=VARIANT_ELASTIC if meta.get("api") == "elastic" else VARIANT_BUFFER)
    return header, {k: v for k, v in arrays.items() if v is not None}, meta


def build_calls(calls: list[Any]) -> list[tuple[RecordHeader, dict[str, Any], dict[str, Any]]]:
    """build() for several calls (Calls or packed.PackedCalls) in order, their pending CPU
    fingerprints hashed in one pass per row format first (stage.batch_fingerprints)."""
    cpu = [c.staging for c in calls if not c.staging.cuda
           and any(tagged(v, "fp") for v in c.staging.items.values())]
    # a writer process's rows first without torch (importing it there: ~1.2 s of CPU and ~220 MB)
    cpu = [st for st in cpu if not (isinstance(st, PackedStaging) and st.fingerprint_numpy())]
    if cpu:  # torch is imported here only: rows the C pass does not take (or it is not built)
        from epreplay.capture.stage import batch_fingerprints

        for st in cpu:
            if hasattr(st, "rows_to_torch"):
                st.rows_to_torch()
        batch_fingerprints(cpu)
    return [build(c) for c in calls]
