"""The demo workload's maths, in one process: the gate against an independent reference, skew
that is real (by layer and over steps), determinism, releases, token tags and batch shuffling."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from epreplay.demo.model import (DemoConfig, home_batch, local_routing, rank_batch, release_layers,
                                 token_tag)
from epreplay.demo.router import RouterSpec, group_limited_topk
from epreplay.errors import UsageError

# Matrices here are tiny: torch's intra-op threads only fight the other test processes for the
# two cores (10x slower under load), as the demo's ranks would (launch.py sets 1 there too).
torch.set_num_threads(1)


# --- the gate against a reference written from DeepSeek-V3's description, with plain loops ----
def reference_topk(scores: np.ndarray, bias: np.ndarray, E: int, K: int, G: int, TG: int,
                   scale: float) -> tuple[list[list[int]], list[list[float]]]:
    idx_out, w_out = [], []
    per = E // G
    for row in scores:
        choice = [row[e] + bias[e] for e in range(E)]
        group_score = []
        for g in range(G):
            members = sorted((choice[e] for e in range(g * per, (g + 1) * per)), reverse=True)
            group_score.append(sum(members[:2]))
        kept = sorted(range(G), key=lambda g: -group_score[g])[:TG]
        candidates = [e for e in range(E) if e // per in kept]
        picks = sorted(candidates, key=lambda e: -choice[e])[:K]
        total = sum(row[e] for e in picks)
        idx_out.append(picks)
        w_out.append([row[e] / total * scale for e in picks])
    return idx_out, w_out


def test_gate_excludes_a_high_scoring_expert_of_a_losing_group() -> None:
    # 8 experts in 4 groups of 2; keep 2 groups, pick 2 experts.
    # Group sums: g0 = .90+.10 = 1.0, g1 = .80+.75 = 1.55, g2 = .70+.70 = 1.4, g3 = .05+.02.
    # Expert 0 (.90) is the single best expert, but its group loses: picks are 2 (.80) and 3 (.75).
    scores = torch.tensor([[0.90, 0.10, 0.80, 0.75, 0.70, 0.70, 0.05, 0.02]])
    spec = RouterSpec(experts=8, topk=2, n_groups=4, topk_groups=2, routed_scaling=1.0)
    idx, w = group_limited_topk(scores, torch.zeros(8), spec)
    assert idx.tolist() == [[2, 3]]
    assert w[0].tolist() == pytest.approx([0.80 / 1.55, 0.75 / 1.55])


def test_bias_steers_selection_but_not_weights() -> None:
    scores = torch.tensor([[0.6, 0.5, 0.4, 0.3]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.5])  # expert 3 wins the pick through its bias alone
    spec = RouterSpec(experts=4, topk=2, n_groups=1, topk_groups=1, routed_scaling=2.5)
    idx, w = group_limited_topk(scores, bias, spec)
    assert idx.tolist() == [[3, 0]]
    assert w[0].tolist() == pytest.approx([0.3 / 0.9 * 2.5, 0.6 / 0.9 * 2.5])  # un-biased scores


@pytest.mark.parametrize("E,K,G,TG", [(8, 2, 4, 2), (16, 4, 4, 2), (32, 8, 8, 4), (12, 3, 3, 1), (6, 6, 2, 2)])
def test_gate_matches_reference_on_random_scores(E: int, K: int, G: int, TG: int) -> None:
    rng = np.random.default_rng(E * 100 + K)
    scores = 1 / (1 + np.exp(-rng.standard_normal((64, E))))
    bias = rng.standard_normal(E) * 0.1
    spec = RouterSpec(E, K, G, TG, routed_scaling=2.5)
    idx, w = group_limited_topk(torch.tensor(scores, dtype=torch.float32),
                                torch.tensor(bias, dtype=torch.float32), spec)
    ref_idx, ref_w = reference_topk(scores.astype(np.float32).astype(np.float64),
                                    bias.astype(np.float32).astype(np.float64), E, K, G, TG, 2.5)
    assert idx.tolist() == ref_idx
    np.testing.assert_allclose(w.numpy(), np.array(ref_w), rtol=1e-5)
    assert idx.dtype == torch.int64 and w.dtype == torch.float32


# --- the workload ----------------------------------------------------------------------------
SMALL = DemoConfig(ranks=4, steps=6, layers=4, experts=32, topk=4, hidden=128)


def expert_load(cfg: DemoConfig) -> np.ndarray:
    """[S, NL, E] global expert load of the whole run, computed locally."""
    load = np.zeros((cfg.steps, cfg.layers, cfg.experts))
    for s, r in itertools.product(range(cfg.steps), range(cfg.ranks)):
        for layer, (idx, _) in enumerate(local_routing(cfg, s, r)):
            load[s, layer] += np.bincount(idx.numpy().ravel(), minlength=cfg.experts)
    return load


def js(p: np.ndarray, q: np.ndarray) -> float:
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / b[nz])))

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@pytest.fixture(scope="module")
def load() -> np.ndarray:
    return expert_load(SMALL)


def test_hot_experts_take_far_more_than_a_uniform_share(load: np.ndarray) -> None:
    E = SMALL.experts
    top = max(1, int(np.ceil(0.05 * E)))  # the top 5% of experts
    for layer in range(SMALL.layers):
        per_expert = np.sort(load[:, layer].sum(0))[::-1]
        share = per_expert[:top].sum() / per_expert.sum()
        assert share > 2.5 * top / E, (layer, share)  # > 2.5x what uniform routing gives
        assert per_expert[0] / per_expert.mean() > 2.0


def test_skew_differs_by_layer(load: np.ndarray) -> None:
    per_layer = load.sum(0)  # [NL, E]
    hot_sets = [set(np.argsort(-row)[:3]) for row in per_layer]
    assert len({frozenset(h) for h in hot_sets}) == SMALL.layers  # each layer its own hot set
    for a, b in itertools.combinations(range(SMALL.layers), 2):
        assert js(per_layer[a], per_layer[b]) > 0.05, (a, b)


def test_skew_drifts_over_steps() -> None:
    still = DemoConfig(ranks=4, steps=6, layers=4, drift=0.0)
    moving = expert_load(SMALL)
    quiet = expert_load(still)
    half = SMALL.steps // 2
    for layer in range(SMALL.layers):
        # first half vs second half of the run: drift must exceed what sampling noise gives
        d_moving = js(moving[:half, layer].sum(0), moving[half:, layer].sum(0))
        d_quiet = js(quiet[:half, layer].sum(0), quiet[half:, layer].sum(0))
        assert d_moving > 2.5 * d_quiet, (layer, d_moving, d_quiet)


def test_same_seed_same_routing_other_seed_other_routing() -> None:
    a = local_routing(SMALL, 1, 2)
    b = local_routing(DemoConfig(ranks=4, steps=6, layers=4, experts=32, topk=4, hidden=128), 1, 2)
    c = local_routing(DemoConfig(ranks=4, steps=6, layers=4, seed=1), 1, 2)
    for (ia, wa), (ib, wb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(wa, wb)
    assert any(not torch.equal(ia, ic) for (ia, _), (ic, _) in zip(a, c))


def test_release_mapping() -> None:
    assert release_layers("", 4) == release_layers("a", 4) == release_layers(0, 4) == frozenset()
    assert release_layers("b", 4) == {1, 3}
    assert release_layers("c", 5) == {0, 2, 4}
    assert release_layers("d", 3) == {0, 1, 2}
    assert release_layers(10, 4) == release_layers("10", 4) == {1, 3}
    assert release_layers(1 << 7, 4) == frozenset()  # bits beyond the layers are ignored
    with pytest.raises(UsageError, match="--release 'x'"):
        release_layers("x", 4)


@pytest.mark.parametrize("release", ["b", "5"])
def test_release_changes_exactly_its_layers(release: str) -> None:
    base = DemoConfig(ranks=2, steps=3, layers=4)
    new = DemoConfig(ranks=2, steps=3, layers=4, release=release)
    touched = release_layers(release, 4)
    changed_share = np.zeros(4)
    tokens = 0
    for s, r in itertools.product(range(3), range(2)):
        for layer, ((ia, wa), (ib, wb)) in enumerate(zip(local_routing(base, s, r), local_routing(new, s, r))):
            sa = np.sort(ia.numpy(), axis=1)
            sb = np.sort(ib.numpy(), axis=1)
            changed_share[layer] += (sa != sb).any(axis=1).sum()
            if layer not in touched:
                assert torch.equal(ia, ib) and torch.equal(wa, wb), (s, r, layer)
        tokens += len(ia)
    for layer in touched:
        assert changed_share[layer] / tokens > 0.05, (layer, changed_share / tokens)


def test_tags_unique_per_run_and_stable_under_shuffle() -> None:
    cfg = DemoConfig(ranks=4, steps=4, layers=2)
    shuffled = DemoConfig(ranks=4, steps=4, layers=2, shuffle_batches=True)
    seen: list[np.ndarray] = []
    for s in range(cfg.steps):
        plain = {int(t): x for r in range(4) for x, t in zip(*rank_batch(cfg, s, r))}
        moved = {int(t): x for r in range(4) for x, t in zip(*rank_batch(shuffled, s, r))}
        assert plain.keys() == moved.keys()
        assert all(np.array_equal(plain[t], moved[t]) for t in plain)  # same token, same state
        assert [home_batch(cfg, s, r)[1].tolist() for r in range(4)] != \
               [rank_batch(shuffled, s, r)[1].tolist() for r in range(4)]  # but placed elsewhere
        seen.extend(plain.keys())
    assert len(seen) == len(set(seen)) and min(seen) >= 0


def test_shuffled_tokens_route_the_same() -> None:
    cfg = DemoConfig(ranks=2, steps=2, layers=3)
    shuffled = DemoConfig(ranks=2, steps=2, layers=3, shuffle_batches=True)
    for s in range(2):
        by_tag = {}
        for r in range(2):
            tags = rank_batch(cfg, s, r)[1]
            for layer, (idx, _) in enumerate(local_routing(cfg, s, r)):
                by_tag.update({(layer, int(t)): row for t, row in zip(tags, idx.tolist())})
        for r in range(2):
            tags = rank_batch(shuffled, s, r)[1]
            for layer, (idx, _) in enumerate(local_routing(shuffled, s, r)):
                assert all(by_tag[(layer, int(t))] == row for t, row in zip(tags, idx.tolist()))


def test_token_tag_is_a_documented_hash() -> None:
    a = token_tag(0, 1, np.array([5, 5]), np.array([0, 1]))
    assert a.dtype == np.int64 and a[0] != a[1]
    assert np.array_equal(a, token_tag(0, 1, np.array([5, 5]), np.array([0, 1])))
    assert not np.array_equal(a, token_tag(1, 1, np.array([5, 5]), np.array([0, 1])))  # seed matters


@pytest.mark.parametrize("kwargs,needle", [
    (dict(experts=30, ranks=4), "--experts 30 is not divisible by --ranks 4"),
    (dict(topk=40, experts=32), "--topk 40 exceeds --experts 32"),
    (dict(hidden=100), "--hidden 100"),
    (dict(hidden=64, fp8=False), "--hidden 64: DeepEP's low-latency"),
    (dict(slow_rank=4, ranks=4), "--slow-rank 4"),
    (dict(ranks=0), "--ranks 0"),
    (dict(n_groups=4, topk_groups=1, topk=16), "--topk 16"),
    (dict(release="zz"), "--release 'zz'"),
])
def test_bad_config_names_the_value(kwargs: dict, needle: str) -> None:
    with pytest.raises(UsageError) as info:
        DemoConfig(**kwargs)
    assert needle in str(info.value)


def test_prefill_only_runs_accept_any_hidden() -> None:
    assert DemoConfig(hidden=64, fp8=False, prefill_every=1).hidden == 64
