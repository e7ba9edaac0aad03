"""The demo workload's model: a small DeepSeek-V3-style MoE stack with realistically skewed routing.

Legend: R ranks, S steps, NL layers, E experts, K top-k, H hidden, F expert hidden, T tokens on a
rank, P topics (token clusters), L = E / R local experts.

What makes the routing look like a production router's (not uniform):
  * tokens are drawn from P topic clusters; each topic prefers a few experts per layer, chosen
    with Zipf-like expert popularity, so some experts are hot;
  * the topic mix is Zipf-like too, differs by home rank and *drifts* linearly over the steps;
  * every layer has its own gate gain, popularity exponent and selection bias (with a few
    boosted experts), so the skew differs by layer.

Every weight and every token is a pure function of (seed, what it is), drawn from numpy's
SeedSequence, so any process can rebuild any part without communication: ranks agree, and two
runs with one seed route identically.

Router input and releases: the router of layer l reads the residual stream h, which gets the
shared expert's output at every layer; the routed experts' (combined) output goes to the output
stream y, and only `routed_feedback` x of it back into h. With the default 0 a router change in
layer l changes the routing of layer l only, which is what lets diff tests check that exactly a
release's layers drift (release_layers below). Set routed_feedback > 0 for the realistic coupling.

Token tags (for `epreplay diff --match tag`): token_tag() hashes (seed, home rank, sequence id,
position) with splitmix64 into a non-negative int64; a token keeps its tag when
`shuffle_batches` moves it to another rank or batch row. Sequence ids: a prefill step s holds
prompts s * 4096 + q (q = row // prompt_len, position = row % prompt_len); a decode step s holds
sequences DECODE_SEQ_BASE + row at position s. So tags are unique per run and layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from epreplay.demo.config import DECODE_SEQ_BASE, DemoConfig, release_layers
from epreplay.demo.router import route

__all__ = ["DECODE_SEQ_BASE", "DemoConfig", "release_layers", "home_batch", "rank_batch",
           "layer_weights", "local_routing", "route_layer", "swiglu", "swiglu_weights", "rms_norm",
           "token_tag", "topic_centroids", "topic_mix"]

def _rng(cfg: DemoConfig, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([cfg.seed & 0xFFFFFFFF, *key]))


# Keys of the things drawn from the seed (first entry of each SeedSequence key).
_TOPICS, _MIX, _ROUTER, _RELEASE, _EXPERT, _SHARED, _BATCH, _SHUFFLE = range(1, 9)


@dataclass(frozen=True)
class LayerWeights:
    """One layer's gate: router_EH [E, H] float32, bias_E [E] float32 (selection only)."""

    router_EH: torch.Tensor
    bias_E: torch.Tensor


@lru_cache(maxsize=8)
def topic_centroids(cfg: DemoConfig) -> np.ndarray:
    """[P, H] float32 unit-norm topic directions."""
    c = _rng(cfg, _TOPICS).standard_normal((cfg.topics, cfg.hidden))
    return (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)


def topic_mix(cfg: DemoConfig, step: int, home_rank: int) -> np.ndarray:
    """[P] float64 topic probabilities of `home_rank`'s tokens at `step` (Zipf-like, drifting)."""
    g = _rng(cfg, _MIX)
    base = -0.7 * g.permutation(cfg.topics).astype(np.float64)  # Zipf-like popularity ranks
    direction = g.standard_normal(cfg.topics)
    per_rank = _rng(cfg, _MIX, home_rank).standard_normal(cfg.topics) * 0.5
    frac = step / max(1, cfg.steps - 1)
    logits = base + per_rank + cfg.drift * frac * direction
    p = np.exp(logits - logits.max())
    return p / p.sum()


@lru_cache(maxsize=64)
def layer_weights(cfg: DemoConfig, layer: int) -> LayerWeights:
    """Gate weights of `layer`, including the release's perturbation when it covers the layer."""
    E, H, P = cfg.experts, cfg.hidden, cfg.topics
    g = _rng(cfg, _ROUTER, layer)
    gain = g.uniform(1.5, 4.0)  # per-layer sharpness: how strongly topics pick their experts
    zipf = g.uniform(0.6, 1.4)  # per-layer popularity exponent: how concentrated the hot set is
    popularity = 1.0 / np.arange(1, E + 1) ** zipf
    popularity = popularity[g.permutation(E)]
    popularity /= popularity.sum()
    prefer = min(E, 2 * cfg.topk)
    affinity_PE = np.zeros((P, E))
    for t in range(P):
        picks = g.choice(E, size=prefer, replace=False, p=popularity)
        affinity_PE[t, picks] = g.uniform(0.5, 1.0, size=prefer)
    centroids = topic_centroids(cfg).astype(np.float64)
    # A token of topic t has u . centroid_t ~ sqrt(H) * signal, so dividing by sqrt(H) makes the
    # topic's logit for a preferred expert ~ gain * affinity, against unit gate noise.
    router = gain * (affinity_PE.T @ centroids) + g.standard_normal((E, H))
    router /= np.sqrt(H)
    bias = g.standard_normal(E) * 0.05
    hot = g.choice(E, size=max(1, E // 16), replace=False)
    bias[hot] += g.uniform(0.05, 0.25)  # the few experts a balancing bias has not tamed yet
    if layer in release_layers(cfg.release, cfg.layers):
        tag = sum(ord(ch) << (8 * i) for i, ch in enumerate(str(cfg.release)[:6]))
        delta = _rng(cfg, _RELEASE, layer, tag).standard_normal((E, H))
        router = router + cfg.release_strength * delta / np.sqrt(H)
    return LayerWeights(torch.from_numpy(router.astype(np.float32)),
                        torch.from_numpy(bias.astype(np.float32)))


@lru_cache(maxsize=256)
def swiglu_weights(cfg: DemoConfig, layer: int, expert: int) -> tuple[torch.Tensor, ...]:
    """(w1 [H, F], w3 [H, F], w2 [F, H]) float32 of one routed expert; expert -1 is the shared
    expert (F doubled). Scaled so an expert's output is ~0.3 of its input's RMS."""
    F = cfg.expert_hidden * (2 if expert < 0 else 1)
    H = cfg.hidden
    g = _rng(cfg, _SHARED if expert < 0 else _EXPERT, layer, max(expert, 0))
    w1 = g.standard_normal((H, F)) / np.sqrt(H)
    w3 = g.standard_normal((H, F)) / np.sqrt(H)
    w2 = g.standard_normal((F, H)) * (0.6 / np.sqrt(F))
    return tuple(torch.from_numpy(w.astype(np.float32)) for w in (w1, w3, w2))


def swiglu(x_TH: torch.Tensor, w: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """SwiGLU expert: (silu(x w1) * (x w3)) w2; x_TH [T, H] float32 -> [T, H] float32."""
    w1, w3, w2 = w
    return (torch.nn.functional.silu(x_TH @ w1) * (x_TH @ w3)) @ w2


def rms_norm(h_TH: torch.Tensor) -> torch.Tensor:
    """[T, H] -> [T, H] with unit RMS per row (no learned scale: the gate carries it)."""
    return h_TH * torch.rsqrt(h_TH.pow(2).mean(dim=-1, keepdim=True) + 1e-6)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def token_tag(seed: int, home_rank: np.ndarray | int, seq: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """[T] int64 >= 0: splitmix64 chain over (seed, home rank, sequence id, position)."""
    with np.errstate(over="ignore"):
        h = _splitmix64(np.full(np.shape(seq), seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64))
        for part in (home_rank, seq, pos):
            h = _splitmix64(h ^ np.asarray(part).astype(np.uint64))
    return (h >> np.uint64(1)).astype(np.int64)


def home_batch(cfg: DemoConfig, step: int, home_rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The tokens `home_rank` owns at `step` before any shuffle.

    Returns:
        x0_TH: [T, H] float32 token states (topic centroid + noise, RMS ~1).
        tags_T: [T] int64 token tags (see the module docstring).
    """
    T, H = cfg.tokens_on(step, home_rank), cfg.hidden
    g = _rng(cfg, _BATCH, step, home_rank)
    mix = topic_mix(cfg, step, home_rank)
    rows = np.arange(T)
    if cfg.is_prefill(step):
        prompts = rows // cfg.prompt_len
        topic_of_prompt = g.choice(cfg.topics, size=int(prompts[-1]) + 1, p=mix)
        topic_T = topic_of_prompt[prompts]
        seq, pos = step * 4096 + prompts, rows % cfg.prompt_len
    else:
        topic_T = g.choice(cfg.topics, size=T, p=mix)
        seq, pos = DECODE_SEQ_BASE + rows, np.full(T, step)
    signal = topic_centroids(cfg)[topic_T] * np.sqrt(H)
    x0 = 0.8 * signal + 0.6 * g.standard_normal((T, H))
    return x0.astype(np.float32), token_tag(cfg.seed, home_rank, seq, pos)


def rank_batch(cfg: DemoConfig, step: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The tokens `rank` processes at `step`: its home batch, or with shuffle_batches a slice of
    all ranks' tokens permuted by (seed, step). Same shapes either way."""
    if not cfg.shuffle_batches:
        return home_batch(cfg, step, rank)
    parts = [home_batch(cfg, step, r) for r in range(cfg.ranks)]
    x_all = np.concatenate([p[0] for p in parts])
    tag_all = np.concatenate([p[1] for p in parts])
    perm = _rng(cfg, _SHUFFLE, step).permutation(len(tag_all))
    start = sum(cfg.tokens_on(step, r) for r in range(rank))
    take = perm[start:start + cfg.tokens_on(step, rank)]
    return x_all[take], tag_all[take]


def route_layer(cfg: DemoConfig, layer: int, h_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate the residual stream of one layer: (topk_idx_TK int64, topk_weights_TK float32)."""
    w = layer_weights(cfg, layer)
    return route(rms_norm(h_TH.float()), w.router_EH.to(h_TH.device), w.bias_E.to(h_TH.device),
                 cfg.router_spec)


def local_routing(cfg: DemoConfig, step: int, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's routing of one rank's batch, computed without any communication.

    Exact whenever routed_feedback == 0 (then routing never depends on other ranks' experts):
    tests and tools use it to know what the demo routes without running it.
    """
    if cfg.routed_feedback:
        raise ValueError("local_routing needs routed_feedback == 0 (routing then depends on the exchange)")
    x0, _ = rank_batch(cfg, step, rank)
    h = torch.from_numpy(x0)
    out = []
    for layer in range(cfg.layers):
        out.append(route_layer(cfg, layer, h))
        h = h + swiglu(rms_norm(h), swiglu_weights(cfg, layer, -1))
    return out
