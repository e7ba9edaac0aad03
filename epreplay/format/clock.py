"""Clock alignment across nodes: how far each node's wall clock is from the reference node's,
estimated from the recorded calls alone.

A record's start_ns is time.time_ns() of the host that ran the call; hosts' clocks disagree (NTP
keeps them within ~0.1-10 ms, a misconfigured one by seconds), so "rank 9 arrived 3 ms late" may
be a clock, not a straggler. The calls themselves tell the offsets: a dispatch or combine is a
collective — it returns on every rank within its kernel's tail of the same instant (the last
rank's arrival, plus the exchange) — so for one call (buffer, seq) the *end* times
start_ns + duration_ns of all ranks are one instant read on different clocks. (Start times are
not: a straggler starts late.) Layout is local to a rank and tells nothing.

Legend: N records, R ranks, C calls (collectives), G clock groups (nodes).

    est = estimate(rank_N, buffer_N, seq_N, op_N, start_N, duration_N, node_of={r: node})
    est.offset_R      # [R] ns to subtract from rank r's times to read them on the reference clock
    est.nodes         # per node: offset, spread, ranks

Estimator: E[r, c] = end of call c on rank r = T_c + d_r + noise. Per call the consensus m_c is
the median over ranks of E[r, c] - d_r, and d_r the median over calls of E[r, c] - m_c (two
rounds from d = 0: the medians shrug off a rank's odd call and a call's odd rank). Ranks of one
node share its clock, so the node's offset is the median of its ranks' — and a one-node run gets
offset 0 everywhere, leaving today's figures as they were. The reference is the node of the
lowest rank. Assumes a constant offset over the run (drift of a disciplined clock is ~us/s).
Pure numpy: no I/O, no duckdb.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from epreplay.format.records import Op

# Ops whose calls are collectives (every rank of the buffer takes part), by Op value.
SYNC_OPS = (int(Op.DISPATCH), int(Op.CACHED_DISPATCH), int(Op.COMBINE), int(Op.LL_DISPATCH),
            int(Op.LL_COMBINE))
# Calls used at most: the medians settle within a few hundred calls; beyond 20k the [R, C] matrix
# (64 ranks x 20k x 8 B = 10 MB) only costs memory. Evenly spaced over the run.
MAX_CALLS = 20_000
ROUNDS = 2  # consensus / offset refinements (a third changes nothing measurable)


@dataclass(frozen=True)
class NodeSkew:
    """One node's clock against the reference node's.

    Attributes:
        node: node id (-1: ranks whose node is unknown, taken as one clock).
        ranks: its ranks. offset_ns: its clock minus the reference clock (median of its ranks').
        spread_ns: max - min of its ranks' own estimates: the estimate's noise (one clock).
        calls: collectives the estimate used (median over its ranks).
    """

    node: int
    ranks: tuple[int, ...]
    offset_ns: int
    spread_ns: int
    calls: int


@dataclass(frozen=True)
class ClockEstimate:
    """Arrays by rank position: rank_R [R] int, node_R [R] int, rank_offset_R [R] int64 (each
    rank's own estimate), offset_R [R] int64 (its node's: what is applied), calls_R [R] int
    (collectives it took part in, as used)."""

    rank_R: np.ndarray
    node_R: np.ndarray
    rank_offset_R: np.ndarray
    offset_R: np.ndarray
    calls_R: np.ndarray
    nodes: tuple[NodeSkew, ...]

    @property
    def skew_ns(self) -> int:
        """Largest disagreement between two nodes' clocks (0 for one node)."""
        offs = [n.offset_ns for n in self.nodes]
        return int(max(offs) - min(offs)) if offs else 0


def end_matrix(rank_N: np.ndarray, key_N: np.ndarray, end_N: np.ndarray, *,
               max_calls: int = MAX_CALLS) -> tuple[np.ndarray, np.ndarray]:
    """Ends of the calls two or more ranks took part in, as (rank_R, E_RC).

    Args:
        rank_N [N] int: rank of each record. key_N [N] int64: the call's id (buffer << 40 | seq).
        end_N [N] int64: start_ns + duration_ns (records with unknown duration left out).
        max_calls: at most this many calls, evenly spaced.
    Returns:
        rank_R [R] sorted ranks; E_RC [R, C] float64 ends relative to the call's first end
        (NaN where the rank has no such call), so float64 keeps ns precision.
    """
    rank_R, r_idx = np.unique(rank_N, return_inverse=True)
    keys, c_idx, per_call = np.unique(key_N, return_inverse=True, return_counts=True)
    keep_C = per_call >= 2
    if keep_C.sum() > max_calls:
        chosen = np.flatnonzero(keep_C)[np.linspace(0, keep_C.sum() - 1, max_calls).astype(np.int64)]
        keep_C = np.zeros_like(keep_C)
        keep_C[chosen] = True
    col_C = np.cumsum(keep_C) - 1
    sel = keep_C[c_idx]
    base_C = np.full(len(keys), np.iinfo(np.int64).max, np.int64)
    np.minimum.at(base_C, c_idx[sel], end_N[sel])
    E_RC = np.full((len(rank_R), int(keep_C.sum())), np.nan)
    E_RC[r_idx[sel], col_C[c_idx[sel]]] = (end_N[sel] - base_C[c_idx[sel]]).astype(np.float64)
    return rank_R, E_RC


def rank_offsets(E_RC: np.ndarray, *, rounds: int = ROUNDS) -> tuple[np.ndarray, np.ndarray]:
    """(d_R [R] float64 ns, calls_R [R] int) from end_matrix's E_RC (module docstring); d is
    relative to the ranks' median, NaN for a rank that shares no call with another."""
    R = E_RC.shape[0]
    d_R = np.zeros(R)
    calls_R = np.sum(~np.isnan(E_RC), axis=1)
    if E_RC.shape[1] == 0:
        return np.full(R, np.nan), calls_R
    with np.errstate(all="ignore"), _quiet():
        for _ in range(rounds):
            m_C = np.nanmedian(E_RC - d_R[:, None], axis=0)
            d_R = np.nanmedian(E_RC - m_C[None, :], axis=1)
        d_R = d_R - np.nanmedian(d_R)
    return d_R, calls_R


def estimate(rank_N: np.ndarray, buffer_N: np.ndarray, seq_N: np.ndarray, op_N: np.ndarray,
             start_N: np.ndarray, duration_N: np.ndarray, *, node_of: dict[int, int]) -> ClockEstimate:
    """Each rank's and node's clock offset from the calls' records.

    Args:
        rank_N, buffer_N, seq_N, op_N [N] ints: the records' rank, Buffer, seq and Op value.
        start_N [N] int64 ns, duration_N [N] int64 ns (-1 unknown): as recorded.
        node_of: rank -> node (-1 unknown); ranks missing here are node -1.
    Returns:
        a ClockEstimate over the ranks present in rank_N.
    """
    rank_N = np.asarray(rank_N, np.int64)
    ok = np.isin(np.asarray(op_N), SYNC_OPS) & (np.asarray(duration_N) >= 0)
    key_N = (np.asarray(buffer_N, np.int64) << 40) | np.asarray(seq_N, np.int64)
    end_N = np.asarray(start_N, np.int64) + np.asarray(duration_N, np.int64)
    ranks_all = np.unique(rank_N)
    rank_R, E_RC = end_matrix(rank_N[ok], key_N[ok], end_N[ok])
    d_R, calls_R = rank_offsets(E_RC)
    d_all = np.full(len(ranks_all), np.nan)
    calls_all = np.zeros(len(ranks_all), np.int64)
    pos = np.searchsorted(ranks_all, rank_R)
    d_all[pos], calls_all[pos] = d_R, calls_R
    node_R = np.array([int(node_of.get(int(r), -1)) for r in ranks_all], np.int64)
    return _by_node(ranks_all, node_R, d_all, calls_all)


def _by_node(rank_R: np.ndarray, node_R: np.ndarray, d_R: np.ndarray, calls_R: np.ndarray) -> ClockEstimate:
    """Pool rank estimates per node (one clock each) and put the reference node at 0."""
    groups = sorted(set(node_R.tolist()), key=lambda n: int(rank_R[node_R == n].min()))
    raw: dict[int, float] = {}
    for n in groups:
        vals = d_R[(node_R == n) & ~np.isnan(d_R)]
        raw[n] = float(np.median(vals)) if vals.size else 0.0
    ref = raw[groups[0]] if groups else 0.0
    offset_R = np.array([round(raw[int(n)] - ref) for n in node_R], np.int64)
    rank_offset_R = np.where(np.isnan(d_R), offset_R, np.round(np.nan_to_num(d_R) - ref)).astype(np.int64)
    nodes = []
    for n in groups:
        m = node_R == n
        own = d_R[m & ~np.isnan(d_R)]
        nodes.append(NodeSkew(int(n), tuple(int(r) for r in rank_R[m]), int(round(raw[n] - ref)),
                              int(round(own.max() - own.min())) if own.size else 0,
                              int(np.median(calls_R[m])) if m.any() else 0))
    return ClockEstimate(rank_R, node_R, rank_offset_R, offset_R, calls_R.astype(np.int64), tuple(nodes))


class _quiet:
    """Silence numpy's "All-NaN slice" warnings (a rank or call with no shared data is NaN)."""

    def __enter__(self) -> None:
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc: object) -> None:
        self._w.__exit__(*exc)
