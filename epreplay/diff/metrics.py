"""Routing metrics for comparing two runs: pure numpy in, numbers and frozen dataclasses out.

No I/O, no torch, no duckdb: `epreplay.diff.compare` feeds these from the index and the shards, the TUI
from its queries, and tests/test_metrics.py checks them against hand-computed values.

Legend: T tokens, K top-k, E experts, R ranks, L layers. Expert ids use -1 for "no expert"
(DeepEP's convention for masked top-k slots); every function here ignores -1 slots.

Defined edge cases (so a diff never divides by zero or prints NaN):
  * JS divergence: two empty layers (no tokens in either run) -> 0.0 (nothing differs);
    one empty and one not -> 1.0 (the maximum: all mass moved); zero-load experts add 0
    (the 0 * log 0 = 0 convention).
  * Rank imbalance max/mean: an all-zero (or zero-length) load -> 1.0, "perfectly balanced".
  * Hot experts: only experts with load > 0 can be hot, so a layer with fewer than N loaded
    experts has fewer than N hot ones; ties are broken by the lower expert id.
  * Token agreement over zero tokens: jaccard = top1 = 1.0, weight_change = 0.0, with
    `tokens == 0` saying that nothing was compared; epreplay.diff.compare reports such agreement as
    not measured (None), never as these values.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# ----------------------------------------------------------------------------- distributions

def load_distribution(load_E: np.ndarray) -> np.ndarray:
    """Normalise an expert load to a probability distribution.

    Args:
        load_E: [E] non-negative counts ((t, k) slots routed to each expert), any numeric dtype.

    Returns:
        [E] float64 summing to 1, or all zeros when the layer saw no tokens.
    """
    load_E = np.asarray(load_E, dtype=np.float64)
    if load_E.ndim != 1:
        raise ValueError(f"load_E must be 1-D [E], got shape {load_E.shape}")
    if (load_E < 0).any():
        raise ValueError(f"load_E must be non-negative, got min {load_E.min()}")
    total = load_E.sum()
    return load_E / total if total > 0 else np.zeros_like(load_E)


def _entropy_terms(p_E: np.ndarray, m_E: np.ndarray) -> float:
    """sum p log2(p/m) over p > 0 (0 log 0 = 0; m > 0 wherever p > 0 by construction of m)."""
    mask = p_E > 0
    return float(np.sum(p_E[mask] * np.log2(p_E[mask] / m_E[mask])))


def js_divergence(load_a_E: np.ndarray, load_b_E: np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) between two expert-load distributions.

    Args:
        load_a_E, load_b_E: [E] non-negative loads of the same layer in run A and run B (raw
            counts: each is normalised here). Different lengths are padded with zero-load
            experts (a run with more experts simply has experts the other never used).

    Returns:
        0.0 for identical distributions and for two empty layers, 1.0 for disjoint supports
        and when exactly one layer is empty.
    """
    a = np.asarray(load_a_E, dtype=np.float64)
    b = np.asarray(load_b_E, dtype=np.float64)
    if a.shape != b.shape:
        n = max(a.size, b.size)
        a = np.pad(a, (0, n - a.size))
        b = np.pad(b, (0, n - b.size))
    p, q = load_distribution(a), load_distribution(b)
    p_empty, q_empty = not p.any(), not q.any()
    if p_empty and q_empty:
        return 0.0
    if p_empty or q_empty:
        return 1.0
    m = 0.5 * (p + q)
    js = 0.5 * _entropy_terms(p, m) + 0.5 * _entropy_terms(q, m)
    # Float rounding can leave -1e-17 or 1 + 1e-16; the bound is part of the contract.
    return float(min(max(js, 0.0), 1.0))


def layer_js(load_a_LE: np.ndarray, load_b_LE: np.ndarray) -> np.ndarray:
    """JS divergence per layer: [L] float64 for two [L, E] loads (rows aligned by layer)."""
    a, b = np.asarray(load_a_LE), np.asarray(load_b_LE)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"need two [L, E] loads with the same L, got {a.shape} and {b.shape}")
    return np.array([js_divergence(a[i], b[i]) for i in range(a.shape[0])], dtype=np.float64)


# ----------------------------------------------------------------------------- hot experts

def hot_experts(load_E: np.ndarray, n: int) -> tuple[int, ...]:
    """The N most loaded experts, most loaded first; ties go to the lower expert id.

    Args:
        load_E: [E] non-negative loads. n: how many (>= 0).

    Returns:
        Expert ids with load > 0 (so possibly fewer than n), ordered by load descending.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    load_E = np.asarray(load_E)
    # lexsort sorts by the last key first: load descending, then expert id ascending.
    order = np.lexsort((np.arange(load_E.size), -load_E.astype(np.float64)))
    return tuple(int(e) for e in order[:n] if load_E[e] > 0)


@dataclass(frozen=True)
class HotChange:
    """Hot-expert sets of one layer in runs A and B and what changed.

    Attributes:
        hot_a, hot_b: top-N expert ids of each run, most loaded first.
        entered: ids hot in B but not in A (ascending). left: hot in A but not in B (ascending).
    """

    hot_a: tuple[int, ...]
    hot_b: tuple[int, ...]
    entered: tuple[int, ...]
    left: tuple[int, ...]

    @property
    def changed(self) -> int:
        """How many experts entered the hot set (== how many left when both sets are full)."""
        return max(len(self.entered), len(self.left))


def hot_change(load_a_E: np.ndarray, load_b_E: np.ndarray, n: int) -> HotChange:
    """Compare the top-N hot experts of one layer in two runs (see `hot_experts`)."""
    hot_a, hot_b = hot_experts(load_a_E, n), hot_experts(load_b_E, n)
    entered = tuple(sorted(set(hot_b) - set(hot_a)))
    left = tuple(sorted(set(hot_a) - set(hot_b)))
    return HotChange(hot_a, hot_b, entered, left)


# ----------------------------------------------------------------------------- rank imbalance

def rank_load(load_E: np.ndarray, world_size: int) -> np.ndarray:
    """Per-rank load from per-expert load with DeepEP's contiguous placement.

    Rank r hosts experts [r * E/R, (r + 1) * E/R); its load is the (t, k) slots routed to them.

    Args:
        load_E: [E] loads. world_size: R, which must divide E (DeepEP requires it).

    Returns:
        [R] int64 (float64 if load_E is float).
    """
    load_E = np.asarray(load_E)
    if world_size <= 0 or load_E.size % world_size:
        raise ValueError(f"world size {world_size} does not divide {load_E.size} experts")
    return load_E.reshape(world_size, -1).sum(axis=1)


def rows_sent(topk_idx_TK: np.ndarray, num_experts: int, world_size: int, *,
              per_destination: bool) -> np.ndarray:
    """[R] int64: the rows one rank's dispatch sends to each rank — epreplay's one definition of
    traffic (the index's `traffic` table, the demo's summary and stats all count this).

    Args:
        topk_idx_TK: [T, K] expert ids of the sending rank's tokens; -1 (or out of range): none.
        num_experts: E; rank r owns experts [r * E/R, (r+1) * E/R).
        world_size: R.
        per_destination: True for normal dispatch (DeepEP sends a token once to each rank holding
            any of its experts: is_token_in_rank); False for low-latency dispatch (one row per
            (token, expert) slot, as its receive buffers are per expert).
    """
    E, R = int(num_experts), int(world_size)
    X = max(E // max(R, 1), 1)
    idx = np.asarray(topk_idx_TK)
    valid = (idx >= 0) & (idx < E)
    dst_TK = np.where(valid, idx // X, -1)
    if per_destination:
        hit_TR = np.zeros((idx.shape[0], R + 1), bool)
        hit_TR[np.arange(idx.shape[0])[:, None], np.where(valid, dst_TK, R)] = True
        return hit_TR[:, :R].sum(axis=0).astype(np.int64)
    return np.bincount(dst_TK[valid].ravel(), minlength=R)[:R].astype(np.int64)


def imbalance(load_R: np.ndarray) -> float:
    """Load imbalance max/mean (>= 1.0; the straggler rank's load over the average).

    Args:
        load_R: [R] non-negative per-rank loads.

    Returns:
        max(load) / mean(load); 1.0 for an all-zero or empty load (nothing to be imbalanced).
    """
    load_R = np.asarray(load_R, dtype=np.float64)
    if load_R.size == 0:
        return 1.0
    mean = load_R.mean()
    return float(load_R.max() / mean) if mean > 0 else 1.0


def imbalance_rows(load_NR: np.ndarray) -> np.ndarray:
    """`imbalance` of each row of [N, R] loads at once: [N] float64 (1.0 for all-zero rows)."""
    load_NR = np.asarray(load_NR, dtype=np.float64)
    if load_NR.ndim != 2:
        raise ValueError(f"load_NR must be 2-D [N, R], got shape {load_NR.shape}")
    if load_NR.shape[1] == 0:
        return np.ones(load_NR.shape[0])
    mean_N = load_NR.mean(axis=1)
    safe_N = np.where(mean_N > 0, mean_N, 1.0)
    return np.where(mean_N > 0, load_NR.max(axis=1) / safe_N, 1.0)


# ----------------------------------------------------------------------------- token matching

def top1_expert(topk_idx_TK: np.ndarray, topk_weights_TK: np.ndarray | None = None) -> np.ndarray:
    """Each token's top-1 expert.

    Args:
        topk_idx_TK: [T, K] int expert ids, -1 for an empty slot.
        topk_weights_TK: [T, K] float weights or None. With weights, the top-1 is the valid slot
            of the largest weight (lowest column on ties), so unsorted top-k works too; without,
            the first valid column (torch.topk's sorted order).

    Returns:
        [T] int64 expert ids, -1 for a token with no valid slot.
    """
    idx = np.asarray(topk_idx_TK).astype(np.int64, copy=False)
    T, K = idx.shape
    if K == 0:
        return np.full(T, -1, dtype=np.int64)
    valid = idx >= 0
    if topk_weights_TK is None:
        score = np.where(valid, -np.arange(K, dtype=np.float32)[None, :], -np.inf)
    else:
        # float32 keeps recorded weights exact (they are float32) at half float64's traffic.
        w = np.asarray(topk_weights_TK)
        score = np.where(valid, w if w.dtype == np.float64 else w.astype(np.float32), -np.inf)
    col_T1 = np.argmax(score, axis=1)[:, None]  # argmax returns the first maximum: the lowest column
    top = np.take_along_axis(idx, col_T1, axis=1)[:, 0]
    # The chosen slot is valid whenever the row has one (valid slots score above -inf).
    return np.where(np.take_along_axis(valid, col_T1, axis=1)[:, 0], top, -1)


@dataclass(frozen=True)
class TokenAgreement:
    """How the same tokens were routed in runs A and B; sums, so results add up across calls.

    Attributes:
        tokens: matched tokens compared.
        jaccard_sum: sum over tokens of |S_a & S_b| / |S_a | S_b|, S = the token's set of valid
            expert ids (a token with two empty sets counts 1.0).
        top1_agree: tokens whose top-1 expert is the same (both -1 counts as the same).
        pairs: matched (token, expert) pairs, i.e. an expert in both sets of the token, counted
            only when both runs' weights were given (else 0).
        weight_abs_sum: sum over those pairs of |w_a(t, e) - w_b(t, e)|.
        weighted: tokens whose weights were given on both sides (0: weight_change unmeasured).
    """

    tokens: int = 0
    jaccard_sum: float = 0.0
    top1_agree: int = 0
    pairs: int = 0
    weight_abs_sum: float = 0.0
    weighted: int = 0

    def __add__(self, other: "TokenAgreement") -> "TokenAgreement":
        return TokenAgreement(self.tokens + other.tokens, self.jaccard_sum + other.jaccard_sum,
                              self.top1_agree + other.top1_agree, self.pairs + other.pairs,
                              self.weight_abs_sum + other.weight_abs_sum,
                              self.weighted + other.weighted)

    @property
    def jaccard(self) -> float:
        """Mean top-k set Jaccard over tokens (1.0 when no token was compared)."""
        return self.jaccard_sum / self.tokens if self.tokens else 1.0

    @property
    def top1(self) -> float:
        """Fraction of tokens with the same top-1 expert (1.0 when no token was compared)."""
        return self.top1_agree / self.tokens if self.tokens else 1.0

    @property
    def weight_change(self) -> float:
        """Mean |w_a - w_b| over matched (token, expert) pairs (0.0 when there are none; see
        `weighted` to tell "no change" from "no weights recorded")."""
        return self.weight_abs_sum / self.pairs if self.pairs else 0.0


def identical_agreement(topk_idx_TK: np.ndarray,
                        topk_weights_TK: np.ndarray | None = None) -> TokenAgreement:
    """What `token_agreement(idx, idx, w, w)` returns, without comparing: for a call whose
    routing is byte-identical in both runs (the diff checks that on the compressed records).

    Args:
        topk_idx_TK: [T, K] int expert ids (-1 empty), distinct per row.
        topk_weights_TK: [T, K] float weights, or None when not recorded.
    """
    idx = np.asarray(topk_idx_TK)
    T = idx.shape[0]
    with_w = topk_weights_TK is not None
    pairs = int((idx >= 0).sum()) if with_w else 0
    return TokenAgreement(T, float(T), T, pairs, 0.0, T if with_w else 0)


def token_agreement(topk_idx_a_TK: np.ndarray, topk_idx_b_TK: np.ndarray,
                    topk_weights_a_TK: np.ndarray | None = None,
                    topk_weights_b_TK: np.ndarray | None = None) -> TokenAgreement:
    """Compare the routing of T matched tokens (row t of A is the same token as row t of B).

    Args:
        topk_idx_a_TK, topk_idx_b_TK: [T, K_a] and [T, K_b] int expert ids, -1 = empty slot.
            K may differ (the sets are compared), but the caller should only compare runs with
            the same expert numbering. Expert ids within a row are assumed distinct (top-k).
        topk_weights_a_TK, topk_weights_b_TK: [T, K] float weights aligned with the ids, or
            None (then weight_change is 0 and top-1 is the first valid column).

    Returns:
        TokenAgreement sums (see its docstring for the exact definitions).
    """
    a = np.asarray(topk_idx_a_TK)
    b = np.asarray(topk_idx_b_TK)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"need two [T, K] id arrays with the same T, got {a.shape} and {b.shape}")
    T = a.shape[0]
    if T == 0:
        return TokenAgreement()
    with_w = topk_weights_a_TK is not None and topk_weights_b_TK is not None
    wa = np.asarray(topk_weights_a_TK) if with_w else None
    wb = np.asarray(topk_weights_b_TK) if with_w else None
    top1_same = int((top1_expert(a, wa) == top1_expert(b, wb)).sum())
    E = int(max(a.max(initial=-1), b.max(initial=-1))) + 1
    # Bound the [rows, E + 2] lookup table _agreement builds to 2^24 cells (32 MiB of int16).
    rows = max(1, (1 << 24) // (E + 2))
    total = TokenAgreement(top1_agree=top1_same)
    for lo in range(0, T, rows):
        sl = slice(lo, lo + rows)
        total = total + _agreement(a[sl], b[sl], wa[sl] if with_w else None,
                                   wb[sl] if with_w else None, E)
    return total


def _agreement(a: np.ndarray, b: np.ndarray, wa: np.ndarray | None, wb: np.ndarray | None,
               E: int) -> TokenAgreement:
    """Jaccard and weight sums of one chunk, top-1 left at 0 (token_agreement adds it).

    A dense lookup table pos[t, e] = B's slot holding expert e for token t (-1: not in B's set)
    turns set intersection into one scatter and one gather over [T, K] — several times faster
    than comparing all K x K slot pairs. Column E stands for B's empty slots and column E + 1
    for A's, so an empty slot never matches anything.
    """
    T, Kb = b.shape
    W = E + 2
    base_T1 = (np.arange(T, dtype=np.int64) * W)[:, None]
    flat_b = (base_T1 + np.where(b >= 0, b, E)).ravel()
    flat_a = (base_T1 + np.where(a >= 0, a, E + 1)).ravel()
    pos = np.full(T * W, -1, dtype=np.int16)  # K <= 2^15 slots: DeepEP's top-k is far smaller
    pos[flat_b] = np.tile(np.arange(Kb, dtype=np.int16), T)
    got_TK = pos[flat_a].reshape(a.shape)  # B's slot of A's expert, -1 when B lacks it
    present_TK = got_TK >= 0
    inter_T = np.count_nonzero(present_TK, axis=1)
    union_T = np.count_nonzero(a >= 0, axis=1) + np.count_nonzero(b >= 0, axis=1) - inter_T
    jac_T = np.where(union_T > 0, inter_T / np.maximum(union_T, 1), 1.0)
    pairs, wsum = 0, 0.0
    if wa is not None and wb is not None:
        pairs = int(inter_T.sum())
        slot_TK = (np.arange(T, dtype=np.int64) * Kb)[:, None] + np.maximum(got_TK, 0)
        wb_TK = wb.reshape(-1)[slot_TK].astype(np.float64)
        wsum = float(np.abs(wa.astype(np.float64) - wb_TK)[present_TK].sum())
    return TokenAgreement(T, float(jac_T.sum()), 0, pairs, wsum, T if wa is not None else 0)
