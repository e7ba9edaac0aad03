"""What each hooked op stages (hot path); build.py turns that into a record (records.py).

Legend: T tokens on this rank, K top-k, E experts, R ranks, L local experts, H hidden,
M = num_max_dispatch_tokens_per_rank, X = R * M receive slots per local expert (low-latency),
N rows received by a normal dispatch, V valid rows of a low-latency receive buffer.

`stage_inputs` / `stage_outputs` run on the caller's thread and only take references or copies
(see stage.py for which); build.build runs where records are written and does all the numpy
work. The
arrays and meta keys are exactly the table in epreplay/format/records.py's docstring, plus (additive):
  dispatch  routing  send_head_TR [T, R] int32  intranode handle's send_head as of dispatch
                                                (combine rewrites it in place)
Meta keys: "args" {name: description} of every bound argument (tensors as "dtype[d0,d1]"); "ep_rank"/"ep_size" (the
Buffer's group); "E", "M", "hidden", "x_dtype", "use_fp8", "expert_alignment",
"num_worst_tokens", "config" (repr), "dispatch_seq" (combine/cached dispatch/ll_combine: seq of
the dispatch whose handle it used, -1 unknown), "ll_parity" (low-latency receive buffer, 0/1),
"handle_len", "error" (ERROR records), "nonfinite" (names of staged tensors holding NaN/inf),
"recv_hook" (LL dispatch: return_recv_hook; LL combine: true where it had one, its outputs
staged when the hook ran), "outputs_lost" (a call whose recv hook never ran, or whose outputs'
frame was dropped: its inputs only, duration -1), "payload_skipped" (payload level, not a
payload step), "fp_version" (records holding *_fp_* arrays: the fingerprint definition, see
epreplay/format/records.py; set by build.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from epreplay.capture import extract_v2
from epreplay.capture.stage import Staging, Timer
from epreplay.format.fingerprint_gpu import fingerprint_rows_fast
from epreplay.format.records import Level, Op, Status

ArraysMeta = tuple[dict[str, Any], dict[str, Any]]


@dataclass(eq=False)
class Call:
    """One hooked call in flight or queued for the writer."""

    op: Op
    buffer: int
    seq: int
    step: int
    layer: int
    start_ns: int
    level: Level  # the level this record is taken at (payload steps may fall back)
    args: dict[str, Any]  # bound arguments by name (references; only shapes/flags are read)
    staging: Staging
    timer: Timer
    t_mono: float  # time.monotonic() at entry, for the watchdog
    meta: dict[str, Any] = field(default_factory=dict)
    tokens: int = 0
    status: Status = Status.OK
    nbytes: int = 0
    done: bool = False  # outputs staged (or the call raised)
    hung_reported: bool = False

    def described_args(self) -> dict[str, Any]:
        """The bound arguments as compact JSON (record meta "args")."""
        return {k: describe(v) for k, v in self.args.items()}


def _x_rows(x: Any) -> int:
    first = x[0] if isinstance(x, (tuple, list)) else x
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 0


def _flat_rows(x: Any) -> Any:
    """[L, X, H] (or an FP8 pair [L, X, H] / [L, X, S]) as [L*X, H] rows."""
    if isinstance(x, (tuple, list)):
        return tuple(p.reshape(-1, p.shape[-1]) for p in x)
    return x.reshape(-1, x.shape[-1])


def _on_cpu(x: Any) -> bool:
    first = x[0] if isinstance(x, (tuple, list)) else x
    return isinstance(first, torch.Tensor) and not first.is_cuda


def _gather_valid(x: Any, counts: list[int]) -> Any:
    """Rows [0, counts[e]) of each local expert of x [L, X, H] (or an FP8 pair), expert-major:
    the V valid rows as [V, H]. CPU only (counts are host values there, no sync)."""
    if isinstance(x, (tuple, list)):
        return tuple(_gather_valid(p, counts) for p in x)
    return torch.cat([x[e, :c] for e, c in enumerate(counts)]) if counts else x.reshape(-1, x.shape[-1])[:0]


class ValidRows(NamedTuple):
    """Rows of a low-latency buffer x [L, X, H] (or an FP8 pair) to fingerprint where only the
    first counts of each group hold data: counts is recv_count [L] (mode 1) or a handle's
    layout_range [L, R] (mode 2: the low 32 bits, summed over R). The ring path hashes them where
    its gather runs (device_stage.py, or the compiled hook's one launch reading counts on the
    device); see _valid_rows_fp."""

    x: Any
    counts: torch.Tensor
    mode: int

    def counts_L(self) -> torch.Tensor:
        """[L] valid rows per group, on the device (torch ops on the current stream: no sync)."""
        return self.counts if self.mode == 1 else (self.counts & 0xFFFFFFFF).sum(dim=1)


def _valid_rows_fp(st: Staging, name: str, x: Any, counts: Any, mode: int, *, ready: bool = True) -> None:
    """Fingerprints of a GPU low-latency buffer x [L, X, H] (or an FP8 pair) hashing only the
    valid rows, [0, counts_L[e]) of each local expert e: [L * X] with 0 past the counts (build
    slices them off), plus the kernel's non-finite marks under `name:nonfinite` (nonzero: not
    finite). counts, mode: as ValidRows.

    The counts are read by the kernel on the device: no host sync. The ring path's staging
    takes the rows as they are (RingStaging.rows_fp_valid: hashed where its gather runs, after
    the call, on the call's stream); elsewhere the hash runs on the job's stream here, so only
    where x is `ready` on it (not for async_finish outputs, which DeepEP's comm stream is still
    writing); otherwise, or without counts, every row is hashed on staging's side stream after
    them (Staging.rows_fp), as before.
    """
    if counts is None or not isinstance(counts, torch.Tensor) or not ready:
        st.rows_fp(name, _flat_rows(x))
        return
    rows = ValidRows(x, counts, mode)
    if hasattr(st, "rows_fp_valid"):
        st.rows_fp_valid(name, rows)
        return
    fp_LX, marks = fingerprint_rows_fast(x, valid_counts_L=rows.counts_L(), with_finite="raw")
    st.keep(name, fp_LX)
    st.keep(name + ":nonfinite", marks)  # the kernel's marks, reduced by the writer: one launch


def stage_inputs(call: Call, a: dict[str, Any], payload: bool) -> None:
    """Stage what the op records from its inputs (called at entry, before the kernels run)."""
    st, lvl, op = call.staging, call.level, call.op
    routing, fps = lvl >= Level.ROUTING, lvl >= Level.FINGERPRINTS
    if call.meta.get("api") == "elastic":  # DeepEP V2 ElasticBuffer: extract_v2.py
        return extract_v2.stage_inputs(call, a, payload)
    x = a.get("x")
    if op == Op.LAYOUT:
        call.tokens = _x_rows(a.get("topk_idx"))
        if routing:
            st.snapshot("topk_idx_TK", a.get("topk_idx"))
        return
    if op in (Op.DISPATCH, Op.CACHED_DISPATCH, Op.LL_DISPATCH):
        call.tokens = _x_rows(x)
        if op == Op.DISPATCH:
            st.keep("num_tokens_per_rank_R", a.get("num_tokens_per_rank"))
            st.keep("num_tokens_per_expert_E", a.get("num_tokens_per_expert"))
        if routing and op != Op.CACHED_DISPATCH:
            st.snapshot("topk_idx_TK", a.get("topk_idx"))
            if op == Op.DISPATCH:
                st.snapshot("topk_weights_TK", a.get("topk_weights"))
        if fps:
            st.rows_fp("x_fp_T", x)
        if payload:
            if isinstance(x, (tuple, list)):
                st.snapshot("x_TH", x[0])
                st.snapshot("x_scales_TS", x[1])
            else:
                st.snapshot("x_TH", x)
        return
    if op == Op.COMBINE:
        if routing:
            st.snapshot("topk_weights_NK", a.get("topk_weights"))
        if fps:
            st.rows_fp("x_fp_N", x)
        if payload:
            st.snapshot("x_NH", x)
        return
    if op == Op.LL_COMBINE:
        call.tokens = _x_rows(a.get("topk_idx"))
        handle = a.get("handle")
        if isinstance(handle, tuple) and len(handle) >= 2:
            st.keep("_layout_range_LR", handle[1])
        if routing:
            st.snapshot("topk_idx_TK", a.get("topk_idx"))
            st.snapshot("topk_weights_TK", a.get("topk_weights"))
        layout_range = handle[1] if isinstance(handle, tuple) and len(handle) >= 2 else None
        if x is not None and layout_range is not None and _on_cpu(x) and not layout_range.is_cuda:
            # CPU: only the V valid rows are hashed and kept (the buffer is mostly padding)
            valid = _gather_valid(x, (layout_range & 0xFFFFFFFF).sum(dim=1).tolist()) if (fps or payload) else None
            if fps:
                st.rows_fp("x_fp_V", valid)
            if payload:
                st.snapshot("x_VH", valid)
            return
        if fps and x is not None:
            # valid rows per local expert: the count half of layout_range, summed over sources
            _valid_rows_fp(st, "_x_fp_LX", x, layout_range, 2, ready=True)  # an input: ready at entry
        if payload and x is not None:
            st.snapshot("_x_LXH", x)


def stage_outputs(call: Call, a: dict[str, Any], result: Any) -> None:
    """Stage what the op records from its results (called when they are ready)."""
    st, lvl, op = call.staging, call.level, call.op
    routing, fps = lvl >= Level.ROUTING, lvl >= Level.FINGERPRINTS
    if not isinstance(result, tuple):
        return
    if call.meta.get("api") == "elastic":  # DeepEP V2 ElasticBuffer: extract_v2.py
        return extract_v2.stage_outputs(call, a, result)
    if a.get("async_finish") and op not in (Op.LL_DISPATCH, Op.LL_COMBINE):
        st.after(result[-1])  # (..., event): the outputs are ready when the event is
    elif a.get("async_finish"):
        st.after(result[-2] if op == Op.LL_DISPATCH else result[1])  # (..., event, hook)
    if op == Op.LAYOUT:
        st.keep("num_tokens_per_rank_R", result[0])
        st.keep("num_tokens_per_expert_E", result[2] if len(result) > 2 else None)
        return
    if op in (Op.DISPATCH, Op.CACHED_DISPATCH):
        handle = result[4] if op == Op.DISPATCH else a.get("handle")
        if isinstance(handle, tuple):
            call.meta["handle_len"] = len(handle)
            if len(handle) == 6:  # intranode
                st.keep("_rank_prefix_matrix_RR", handle[0])
                if routing and op == Op.DISPATCH:
                    st.keep("recv_src_idx_N", handle[3])
                    st.snapshot("send_head_TR", handle[5])
            elif len(handle) == 10:  # internode: recv_gbl_rank_prefix_sum is inclusive
                st.keep("_recv_gbl_rank_prefix_sum_R", handle[6])
        if op == Op.DISPATCH and isinstance(result[3], list):
            st.value("_num_recv_list", list(result[3]))
        if fps:
            st.rows_fp("recv_x_fp_N", result[0])
        return
    if op == Op.COMBINE:
        call.tokens = _x_rows(result[0])
        if fps:
            st.rows_fp("combined_fp_T", result[0])
        return
    if op == Op.LL_DISPATCH:
        recv_x, recv_count, handle = result[0], result[1], result[2]
        st.keep("recv_count_L", recv_count)
        if routing and isinstance(handle, tuple) and len(handle) >= 2:
            st.keep("_src_info_LX", handle[0])
            st.keep("layout_range_LR", handle[1])
        if fps and recv_x is not None:
            if _on_cpu(recv_x) and isinstance(recv_count, torch.Tensor) and not recv_count.is_cuda:
                st.rows_fp("recv_x_fp_V", _gather_valid(recv_x, recv_count.tolist()))
            else:
                _valid_rows_fp(st, "_recv_x_fp_LX", recv_x, recv_count, 1, ready=not a.get("async_finish"))
        return
    if op == Op.LL_COMBINE:
        if fps:
            st.rows_fp("combined_fp_T", result[0])


# --- argument descriptions (record meta "args") ---------------------------------------------

_DTYPE_NAMES: dict[Any, str] = {}


def _tensor_text(t: torch.Tensor) -> str:
    name = _DTYPE_NAMES.get(t.dtype)
    if name is None:
        name = _DTYPE_NAMES[t.dtype] = str(t.dtype).replace("torch.", "")
    dims = ",".join(map(str, t.shape))
    return f"{name}[{dims}]" if t.device.type == "cpu" else f"{name}[{dims}]@{t.device.type}"


def describe(v: Any) -> Any:
    """A bound argument as compact JSON: a tensor as "dtype[d0,d1]" (plus "@cuda" off the CPU),
    scalars as they are, tuples (FP8 pairs, handles) as lists, lists by length, others by type."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.Tensor):
        return _tensor_text(v)
    if isinstance(v, tuple):
        return [describe(p) for p in v]
    if isinstance(v, list):
        return f"list[{len(v)}]"
    name = type(v).__name__
    return repr(v) if name == "Config" else name
