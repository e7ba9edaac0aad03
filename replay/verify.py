"""Compare one virtual rank's replayed call against its recording; pure numpy.

Legend: N rows received by a normal dispatch, K top-k, R recorded ranks, L local experts of a
virtual rank, V valid rows of a low-latency receive.

Divergence kinds (what a person should look at first):
  count    rows per source rank or per expert differ (a token lost or misrouted)
  order    the same rows arrived in another order / rows swapped relative to their labels
  layout   LL: the set of (source rank, source token) pairs of an expert differs
  routing  received top-k ids or weights differ
  payload  a received row's bits differ (fingerprint)
  combine  combine output differs from the reference beyond DeepEP's tolerance
  hang     the call did not complete within --call-timeout
  error    the call raised
Each check returns at most one Divergence (epreplay.index.rows, with KINDS) per kind: the first
offending row or expert.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Rows:
    """The received rows of a normal dispatch as seen by one virtual rank.

    src_N / tok_N: [N] int64 source virtual rank and source token index of each row.
    per_rank_R: [R] rows from each source. per_expert_L: [L] the returned per-expert counts.
    topk_idx_NK: [N, K] local ids (-1 elsewhere) or None. topk_w_NK: [N, K] float32 or None.
    fp_N: [N] uint64 fingerprints or None.
    """

    src_N: np.ndarray
    tok_N: np.ndarray
    per_rank_R: np.ndarray
    per_expert_L: np.ndarray | None
    topk_idx_NK: np.ndarray | None = None
    topk_w_NK: np.ndarray | None = None
    fp_N: np.ndarray | None = None


def _first(mask: np.ndarray) -> int:
    nz = np.flatnonzero(mask)
    return int(nz[0]) if nz.size else -1


def check_counts(exp: Rows, got: Rows, *, expert_base: int) -> list[tuple]:
    """Per-source-rank and per-expert counts. Returns [(kind, expected, got, src, tok, expert, detail)]."""
    out = []
    er, gr = np.asarray(exp.per_rank_R, np.int64), np.asarray(got.per_rank_R, np.int64)
    if er.shape != gr.shape or not np.array_equal(er, gr):
        s = _first(er != gr) if er.shape == gr.shape else 0
        e_set = set(zip(exp.src_N.tolist(), exp.tok_N.tolist()))
        g_set = set(zip(got.src_N.tolist(), got.tok_N.tolist()))
        lost = sorted(e_set - g_set)
        extra = sorted(g_set - e_set)
        tok = lost[0] if lost else (extra[0] if extra else (s, -1))
        what = (f"token {tok[1]} of rank {tok[0]} missing" if lost
                else f"unexpected token {tok[1]} of rank {tok[0]}" if extra else "")
        out.append(("count", f"{int(er[s])} rows from rank {s}", f"{int(gr[s])} rows", int(tok[0]),
                    int(tok[1]), -1, f"rows per source rank differ; {what}".rstrip("; ")))
    if exp.per_expert_L is not None and got.per_expert_L is not None:
        ee, ge = np.asarray(exp.per_expert_L, np.int64), np.asarray(got.per_expert_L, np.int64)
        if ee.shape != ge.shape or not np.array_equal(ee, ge):
            i = _first(ee != ge) if ee.shape == ge.shape else 0
            out.append(("count", f"{int(ee[i])} tokens for expert {expert_base + i}",
                        f"{int(ge[i]) if i < len(ge) else 'none'}", -1, -1, expert_base + i,
                        "received tokens per local expert differ"))
    return out


def check_rows(exp: Rows, got: Rows, *, expert_base: int, known_fps: frozenset = frozenset()) -> list[tuple]:
    """Row order (source rank, then source token), recv top-k and fingerprints, position by
    position. Call only when the counts agree.

    known_fps: fingerprints of every row the physical rank should have received this call (all
    co-hosted virtual ranks): a wrong row whose bits belong to another expected row is an
    `order` divergence (rows swapped), anything else is `payload`."""
    out = []
    same_ids = np.array_equal(exp.src_N, got.src_N) and np.array_equal(exp.tok_N, got.tok_N)
    if not same_ids:
        n = _first((exp.src_N != got.src_N) | (exp.tok_N != got.tok_N))
        out.append(("order", f"row {n} = token {exp.tok_N[n]} of rank {exp.src_N[n]}",
                    f"token {got.tok_N[n]} of rank {got.src_N[n]}", int(exp.src_N[n]),
                    int(exp.tok_N[n]), -1, "received rows are not in (source rank, source token) order"))
    if exp.topk_idx_NK is not None and got.topk_idx_NK is not None:
        bad = np.any(exp.topk_idx_NK != got.topk_idx_NK, axis=1)
        if exp.topk_w_NK is not None and got.topk_w_NK is not None:
            bad_w = np.any(exp.topk_w_NK.astype(np.float32).view(np.uint32)
                           != got.topk_w_NK.astype(np.float32).view(np.uint32), axis=1)
        else:
            bad_w = np.zeros_like(bad)
        if bad.any() or bad_w.any():
            n = _first(bad | bad_w)
            which = "ids" if bad[n] else "weights"
            ev = exp.topk_idx_NK[n] if bad[n] else exp.topk_w_NK[n]
            gv = got.topk_idx_NK[n] if bad[n] else got.topk_w_NK[n]
            out.append(("routing", f"{which} {ev.tolist()}", f"{gv.tolist()}", int(exp.src_N[n]),
                        int(exp.tok_N[n]), -1, f"received top-k {which} differ at row {n}"))
    if exp.fp_N is not None and got.fp_N is not None and same_ids:
        bad = exp.fp_N != got.fp_N
        if bad.any():
            n = _first(bad)
            swapped = (np.array_equal(np.sort(exp.fp_N), np.sort(got.fp_N))
                       or int(got.fp_N[n]) in known_fps)
            kind = "order" if swapped else "payload"
            detail = ("rows swapped: the received multiset of rows is right, their positions are not"
                      if swapped else f"received row {n} differs from the sent row")
            out.append((kind, f"fingerprint {int(exp.fp_N[n]):#018x}", f"{int(got.fp_N[n]):#018x}",
                        int(exp.src_N[n]), int(exp.tok_N[n]), -1, detail))
    return out


def check_ll(exp: dict, got: dict, *, expert_base: int, known_fps: frozenset = frozenset()) -> list[tuple]:
    """Low-latency receive, compared as sets keyed by (source rank, source token) per expert.

    Args:
        exp, got: local expert i -> {(src, tok): fingerprint or None}; plus key "counts" ->
            [L] recv_count.
        known_fps: as in check_rows (rows swapped -> `order`).
    """
    out = []
    ec, gc = np.asarray(exp["counts"]), np.asarray(got["counts"])
    if not np.array_equal(ec, gc):
        i = _first(ec != gc)
        lost = sorted(set(exp[i]) - set(got[i])) if i in exp and i in got else []
        tok = lost[0] if lost else (-1, -1)
        out.append(("count", f"{int(ec[i])} rows for expert {expert_base + i}", f"{int(gc[i])} rows",
                    int(tok[0]), int(tok[1]), expert_base + i, "recv_count differs"
                    + (f"; token {tok[1]} of rank {tok[0]} missing" if lost else "")))
        return out
    L = len(ec)
    if any(exp.get(i) is None for i in range(L)):
        return out  # counts-level recording: nothing more to compare
    for i in range(L):
        if set(exp[i]) != set(got[i]):
            lost = sorted(set(exp[i]) - set(got[i]))
            extra = sorted(set(got[i]) - set(exp[i]))
            k = lost[0] if lost else extra[0]
            out.append(("layout", f"token {k[1]} of rank {k[0]} at expert {expert_base + i}"
                        if lost else "absent", "absent" if lost else f"token {k[1]} of rank {k[0]}",
                        int(k[0]), int(k[1]), expert_base + i,
                        "the set of (source rank, source token) an expert received differs"))
            return out
    for i in range(L):
        e_fp, g_fp = exp[i], got[i]
        bad = [k for k in sorted(e_fp) if e_fp[k] is not None and g_fp[k] is not None and e_fp[k] != g_fp[k]]
        if bad:
            k = bad[0]
            swapped = g_fp[k] in known_fps
            out.append(("order" if swapped else "payload", f"fingerprint {e_fp[k]:#018x}",
                        f"{g_fp[k]:#018x}", int(k[0]), int(k[1]), expert_base + i,
                        "rows swapped relative to their src_info labels" if swapped
                        else "received row differs from the sent row"))
            return out
    return out


def check_close(ref_TH: np.ndarray, got_TH: np.ndarray, tol: float, *, what: str) -> list[tuple]:
    """calc_diff (DeepEP's test metric) of two float arrays against `tol`; the worst token named."""
    from epreplay.replay.inputs import calc_diff
    import torch

    r, g = torch.from_numpy(ref_TH), torch.from_numpy(got_TH)
    if r.shape != g.shape:
        return [("combine", f"shape {tuple(r.shape)}", f"shape {tuple(g.shape)}", -1, -1, -1,
                 f"{what} output shape differs")]
    if r.numel() == 0:
        return []
    nan = ~torch.isfinite(g)
    d = calc_diff(r, g) if not nan.any() else float("inf")
    if tol == 0.0:  # exact comparison: name the first token that differs
        bad_T = (r != g).any(dim=1)
        if not bad_T.any():
            return []
        t = int(bad_T.nonzero()[0])
        j = int((r[t] != g[t]).nonzero()[0])
        return [("combine", f"token {t}: value {float(r[t, j]):g} at column {j} (exact)",
                 f"{float(g[t, j]):g} (calc_diff {d:.3g})", -1, t, -1,
                 f"{what} output differs from the exactly computable reference")]
    if d <= tol:
        return []
    err_T = (r.double() - g.double()).abs().nan_to_num(float("inf")).amax(dim=1)
    t = int(err_T.argmax())
    return [("combine", f"calc_diff <= {tol:g}", f"{d:.3g} (token {t}: max |err| {float(err_T[t]):.3g})",
             -1, t, -1, f"{what} output differs from the reference beyond DeepEP's tolerance")]
