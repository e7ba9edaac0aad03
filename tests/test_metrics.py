"""epreplay.diff.metrics against hand-computed values, including empty layers and zero-load experts."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from epreplay.diff import metrics as m


# ----------------------------------------------------------------------------- JS divergence

def test_js_identical_is_zero_and_scale_free():
    assert m.js_divergence([3, 1, 0, 4], [3, 1, 0, 4]) == 0.0
    # Same shape of distribution, 10x the tokens: still no drift.
    assert m.js_divergence([3, 1, 0, 4], [30, 10, 0, 40]) == pytest.approx(0.0, abs=1e-15)


def test_js_disjoint_support_is_one():
    assert m.js_divergence([5, 0], [0, 7]) == 1.0


def test_js_hand_computed_half_overlap():
    # p = (1/2, 1/2), q = (1, 0), m = (3/4, 1/4):
    # JS = H(m) - (H(p) + H(q)) / 2 = (2 - 3/4 log2 3) - 1/2 = 3/2 - 3/4 log2 3 = 0.311278...
    want = 1.5 - 0.75 * math.log2(3)
    assert m.js_divergence([1, 1], [1, 0]) == pytest.approx(want, rel=1e-12)
    assert m.js_divergence([1, 0], [1, 1]) == pytest.approx(want, rel=1e-12)  # symmetric


def test_js_zero_load_experts_add_nothing():
    # Experts 1 and 3 are never used in either run: the answer equals the 2-expert case.
    want = 1.5 - 0.75 * math.log2(3)
    assert m.js_divergence([1, 0, 1, 0], [2, 0, 0, 0]) == pytest.approx(want, rel=1e-12)


def test_js_empty_layers():
    assert m.js_divergence([0, 0, 0], [0, 0, 0]) == 0.0  # both empty: nothing differs
    assert m.js_divergence([0, 0, 0], [1, 2, 3]) == 1.0  # one empty: all mass moved
    assert m.js_divergence([4, 0, 0], [0, 0, 0]) == 1.0
    assert m.js_divergence([], []) == 0.0


def test_js_pads_different_expert_counts():
    assert m.js_divergence([1, 1], [1, 1, 0, 0]) == 0.0
    assert m.js_divergence([1, 1], [0, 0, 1, 1]) == 1.0


def test_js_bounded_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b = rng.integers(0, 5, size=(2, 16))
        js = m.js_divergence(a, b)
        assert 0.0 <= js <= 1.0


def test_layer_js_rows():
    got = m.layer_js(np.array([[1, 1], [0, 0], [2, 0]]), np.array([[1, 1], [0, 0], [0, 2]]))
    assert got.tolist() == [0.0, 0.0, 1.0]


def test_load_distribution_rejects_negative_and_handles_empty():
    assert m.load_distribution([1, 3]).tolist() == [0.25, 0.75]
    assert m.load_distribution([0, 0]).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="non-negative"):
        m.load_distribution([1, -1])


# ----------------------------------------------------------------------------- hot experts

def test_hot_experts_order_and_tie_break():
    load = np.array([5, 9, 5, 0, 9, 1])
    assert m.hot_experts(load, 3) == (1, 4, 0)  # 9, 9 (ids 1 < 4), then 5 (id 0 < 2)
    assert m.hot_experts(load, 0) == ()


def test_hot_experts_never_zero_load():
    assert m.hot_experts([0, 3, 0, 0], 3) == (1,)
    assert m.hot_experts([0, 0], 2) == ()


def test_hot_change_entered_left():
    hc = m.hot_change([9, 8, 1, 0], [1, 8, 9, 0], 2)
    assert hc.hot_a == (0, 1) and hc.hot_b == (2, 1)
    assert hc.entered == (2,) and hc.left == (0,) and hc.changed == 1
    same = m.hot_change([1, 2, 3], [10, 20, 30], 2)
    assert same.entered == () and same.left == () and same.changed == 0


# ----------------------------------------------------------------------------- imbalance

def test_rank_load_contiguous_placement():
    # 8 experts on 4 ranks: rank r hosts experts 2r, 2r+1.
    assert m.rank_load(np.arange(8), 4).tolist() == [1, 5, 9, 13]
    with pytest.raises(ValueError, match="does not divide"):
        m.rank_load(np.arange(6), 4)


def test_imbalance_max_over_mean():
    assert m.imbalance([1, 5, 9, 13]) == pytest.approx(13 / 7)
    assert m.imbalance([4, 4, 4]) == 1.0
    assert m.imbalance([0, 0, 6]) == pytest.approx(3.0)


def test_imbalance_rows_equals_imbalance_per_row():
    rows = np.array([[1, 5, 9, 13], [4, 4, 4, 4], [0, 0, 0, 0], [0, 0, 6, 0]])
    assert m.imbalance_rows(rows).tolist() == [m.imbalance(r) for r in rows]
    assert m.imbalance_rows(np.zeros((2, 0))).tolist() == [1.0, 1.0]


def test_imbalance_all_zero_layer_is_balanced():
    assert m.imbalance([0, 0, 0, 0]) == 1.0
    assert m.imbalance([]) == 1.0


# ----------------------------------------------------------------------------- token matching

def test_top1_expert_by_weight_and_by_column():
    idx = np.array([[3, 1], [-1, 2], [-1, -1]])
    w = np.array([[0.2, 0.8], [0.0, 0.5], [0.0, 0.0]], dtype=np.float32)
    assert m.top1_expert(idx, w).tolist() == [1, 2, -1]
    assert m.top1_expert(idx).tolist() == [3, 2, -1]  # no weights: first valid column
    tie = np.array([[4, 7]]), np.array([[0.5, 0.5]])
    assert m.top1_expert(*tie).tolist() == [4]  # tie: lowest column


def test_token_agreement_identical():
    idx = np.array([[0, 1], [2, 3], [1, -1]])
    w = np.array([[0.6, 0.4], [0.5, 0.5], [1.0, 0.0]])
    ag = m.token_agreement(idx, idx, w, w)
    assert (ag.tokens, ag.jaccard, ag.top1, ag.weight_change) == (3, 1.0, 1.0, 0.0)
    assert ag.pairs == 5 and ag.weighted == 3  # -1 slots are not pairs


def test_token_agreement_hand_computed():
    idx_a = np.array([[0, 1], [2, 3], [4, 5], [-1, -1]])
    w_a = np.array([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5], [0.0, 0.0]])
    # token 0: same set, reordered -> J = 1, top1 A=0 (0.7) B=0 (0.9) same; pairs |.7-.9|, |.3-.1|
    # token 1: {2,3} vs {3,6} -> J = 1/3, top1 A=2, B=6 differ; pair expert 3: |.4-.2|
    # token 2: {4,5} vs {6,7} -> J = 0, top1 differs, no pairs
    # token 3: both empty -> J = 1, top1 both -1 (same)
    idx_b = np.array([[1, 0], [3, 6], [6, 7], [-1, -1]])
    w_b = np.array([[0.1, 0.9], [0.2, 0.8], [0.5, 0.5], [0.0, 0.0]])
    ag = m.token_agreement(idx_a, idx_b, w_a, w_b)
    assert ag.tokens == 4
    assert ag.jaccard == pytest.approx((1 + 1 / 3 + 0 + 1) / 4)
    assert ag.top1 == pytest.approx(2 / 4)
    assert ag.pairs == 3
    assert ag.weight_change == pytest.approx((0.2 + 0.2 + 0.2) / 3)


def test_identical_agreement_equals_comparing():
    idx = np.array([[0, 1], [2, -1], [-1, -1]])
    w = np.array([[0.6, 0.4], [1.0, 0.0], [0.0, 0.0]])
    assert m.identical_agreement(idx, w) == m.token_agreement(idx, idx, w, w)
    assert m.identical_agreement(idx) == m.token_agreement(idx, idx)


def test_token_agreement_without_weights_and_empty():
    idx = np.array([[0, 1]])
    ag = m.token_agreement(idx, np.array([[1, 2]]))
    assert ag.jaccard == pytest.approx(1 / 3) and ag.pairs == 0 and ag.weight_change == 0.0
    assert ag.weighted == 0  # no weights: weight_change is unmeasured, not "unchanged"
    empty = m.token_agreement(np.zeros((0, 2), np.int64), np.zeros((0, 2), np.int64))
    assert (empty.tokens, empty.jaccard, empty.top1, empty.weight_change) == (0, 1.0, 1.0, 0.0)


def test_token_agreement_adds_up_across_calls():
    a1, b1 = np.array([[0, 1]]), np.array([[0, 1]])
    a2, b2 = np.array([[2, 3], [4, 5]]), np.array([[2, 9], [8, 9]])
    total = m.token_agreement(a1, b1) + m.token_agreement(a2, b2)
    whole = m.token_agreement(np.vstack([a1, a2]), np.vstack([b1, b2]))
    assert total == whole
    assert total.jaccard == pytest.approx((1 + 1 / 3 + 0) / 3)


def test_token_agreement_rejects_misaligned():
    with pytest.raises(ValueError, match="same T"):
        m.token_agreement(np.zeros((2, 2)), np.zeros((3, 2)))


def test_metrics_imports_no_torch_or_duckdb():
    code = ("import sys, epreplay.diff.metrics; "
            "bad = [x for x in ('torch', 'duckdb', 'textual') if x in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _naive(idx_a, idx_b, w_a, w_b):
    """Per-token Python sets: the definition, written the obvious way."""
    jac, top1, pairs, wsum = 0.0, 0, 0, 0.0
    for t in range(idx_a.shape[0]):
        sa = {int(e): float(w) for e, w in zip(idx_a[t], w_a[t]) if e >= 0}
        sb = {int(e): float(w) for e, w in zip(idx_b[t], w_b[t]) if e >= 0}
        union = set(sa) | set(sb)
        jac += len(set(sa) & set(sb)) / len(union) if union else 1.0
        best_a = max(sa, key=lambda e: (sa[e], -list(idx_a[t]).index(e))) if sa else -1
        best_b = max(sb, key=lambda e: (sb[e], -list(idx_b[t]).index(e))) if sb else -1
        top1 += best_a == best_b
        for e in set(sa) & set(sb):
            pairs += 1
            wsum += abs(sa[e] - sb[e])
    return jac, top1, pairs, wsum


@pytest.mark.parametrize("num_experts", [8, 300, 1 << 20])  # 1<<20: the lookup table is chunked
def test_token_agreement_matches_the_naive_definition(num_experts):
    rng = np.random.default_rng(num_experts)
    T, K = 50, 4
    idx_a = np.stack([rng.choice(num_experts, K, replace=False) for _ in range(T)])
    idx_b = idx_a.copy()
    swap = rng.random((T, K)) < 0.3  # move some slots to other experts, drop a few
    idx_b[swap] = rng.choice(num_experts, swap.sum())
    idx_b = np.stack([np.where(np.isin(np.arange(K), np.unique(r, return_index=True)[1]), r, -1)
                      for r in idx_b])  # keep ids distinct within a row
    idx_b[rng.random((T, K)) < 0.1] = -1
    w_a, w_b = rng.random((T, K)), rng.random((T, K))
    got = m.token_agreement(idx_a, idx_b, w_a, w_b)
    jac, top1, pairs, wsum = _naive(idx_a, idx_b, w_a, w_b)
    assert got.tokens == T and got.top1_agree == top1 and got.pairs == pairs
    assert got.jaccard_sum == pytest.approx(jac) and got.weight_abs_sum == pytest.approx(wsum)


def test_rows_sent_counts_normal_once_per_rank_and_low_latency_once_per_expert():
    """The one definition of traffic (index, demo, stats): 4 experts on 2 ranks (2 each)."""
    idx_TK = np.array([[0, 1],    # both experts on rank 0: normal 1 row to rank 0, LL 2
                       [1, 2],    # one each: 1 + 1 either way
                       [3, -1]])  # -1 is no expert
    np.testing.assert_array_equal(m.rows_sent(idx_TK, 4, 2, per_destination=True), [2, 2])
    np.testing.assert_array_equal(m.rows_sent(idx_TK, 4, 2, per_destination=False), [3, 2])
    assert m.rows_sent(np.zeros((0, 2), np.int64), 4, 2, per_destination=True).tolist() == [0, 0]
