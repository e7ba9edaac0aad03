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

from epreplay.demo_router import RouterSpec, route
from epreplay.errors import UsageError

DECODE_SEQ_BASE = 1 << 40  # decode sequence ids live above every prefill prompt id
NAMED_RELEASES = {"b": "odd layers", "c": "even layers", "d": "all layers"}


def release_layers(release: str | int | None, layers: int) -> frozenset[int]:
    """The layers whose router weights a release perturbs.

    "", None, 0, "0", "a": the base release, nothing perturbed. "b": odd layers {1, 3, ...};
    "c": even layers {0, 2, ...}; "d": every layer; an int n > 0 (or its decimal string): the
    layers whose bit is set in n (10 = 0b1010 -> {1, 3}). Bits beyond `layers` are ignored.
    """
    text = "" if release is None else str(release).strip().lower()
    if text in ("", "0", "a"):
        return frozenset()
    if text == "b":
        return frozenset(range(1, layers, 2))
    if text == "c":
        return frozenset(range(0, layers, 2))
    if text == "d":
        return frozenset(range(layers))
    if text.isdigit():
        n = int(text)
        return frozenset(i for i in range(layers) if n >> i & 1)
    raise UsageError(f"--release {release!r}: use a (base), b (odd layers), c (even layers), "
                     f"d (all layers) or a layer bit mask such as 10 (layers 1 and 3)")


@dataclass(frozen=True)
class DemoConfig:
    """The demo workload. Defaults finish in seconds on 2 CPU cores with 4 ranks.

    Attributes:
        ranks: R processes ("cards"); experts must divide evenly over them.
        steps: S model steps; step s is prefill (normal dispatch/combine) when
            s % prefill_every == 0, else decode (low-latency dispatch/combine).
        layers: NL MoE layers per step.
        experts, topk, hidden: E, K, H.
        prefill_tokens: T per rank in prefill steps (prompts of prompt_len tokens).
        decode_tokens: M = num_max_dispatch_tokens_per_rank; rank r decodes M - (r % 4) tokens
            (ragged, T <= M, as real decode batches are), at least 1.
        n_groups, topk_groups, routed_scaling: the group-limited gate (demo_router).
        expert_hidden: F of every SwiGLU expert (the shared expert has 2F).
        topics: P token clusters. drift: how far the topic mix moves from first to last step.
        routed_feedback: share of the routed output fed back into the router's input stream.
        fp8: send dispatch payloads as DeepEP FP8 (e4m3 + per-128 scales); needs H % 128 == 0.
        seed: every weight and token derives from it.
        release: a router change for diff tests; see release_layers(). release_strength: the
            perturbation's size in logit units (the gate's own noise is 1.0).
        shuffle_batches: same tokens, but each step's tokens are permuted across ranks and rows.
        device: "cpu" (gloo) or "cuda" (NCCL).
    """

    ranks: int = 4
    steps: int = 6
    layers: int = 4
    experts: int = 32
    topk: int = 4
    hidden: int = 128
    prefill_tokens: int = 64
    decode_tokens: int = 32
    prefill_every: int = 3
    prompt_len: int = 16
    n_groups: int = 4
    topk_groups: int = 2
    routed_scaling: float = 2.5
    expert_hidden: int = 32
    topics: int = 8
    drift: float = 2.0
    routed_feedback: float = 0.0
    fp8: bool = True
    seed: int = 0
    release: str = ""
    release_strength: float = 0.5
    shuffle_batches: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UsageError(message)

        for name in ("ranks", "steps", "layers", "experts", "topk", "hidden", "prefill_tokens",
                     "decode_tokens", "prefill_every", "prompt_len", "expert_hidden", "topics"):
            value = getattr(self, name)
            need(value >= 1, f"--{name.replace('_', '-')} {value}: must be at least 1")
        need(self.experts % self.ranks == 0,
             f"--experts {self.experts} is not divisible by --ranks {self.ranks}; "
             f"use a multiple of {self.ranks} (e.g. {self.ranks * max(1, self.experts // self.ranks)})")
        need(self.topk <= self.experts, f"--topk {self.topk} exceeds --experts {self.experts}; pick K <= E")
        need(self.experts % self.n_groups == 0,
             f"n_groups={self.n_groups} does not divide --experts {self.experts}; pick E a multiple of it")
        need(1 <= self.topk_groups <= self.n_groups,
             f"topk_groups={self.topk_groups}: must be between 1 and n_groups={self.n_groups}")
        need(self.topk_groups * (self.experts // self.n_groups) >= self.topk,
             f"--topk {self.topk}: the {self.topk_groups} kept groups of {self.experts // self.n_groups} "
             f"experts hold fewer experts; lower --topk or use more experts")
        need(not self.fp8 or self.hidden % 128 == 0,
             f"--hidden {self.hidden}: FP8 dispatch casts per 128 values; use a multiple of 128 or --no-fp8")
        need(self.device in ("cpu", "cuda"), f"--device {self.device!r}: use cpu or cuda")
        need(self.release_strength >= 0, f"release_strength={self.release_strength}: must be >= 0")
        release_layers(self.release, self.layers)  # validates the release text

    @property
    def local_experts(self) -> int:
        return self.experts // self.ranks

    @property
    def router_spec(self) -> RouterSpec:
        return RouterSpec(self.experts, self.topk, self.n_groups, self.topk_groups, self.routed_scaling)

    def is_prefill(self, step: int) -> bool:
        return step % self.prefill_every == 0

    def tokens_on(self, step: int, rank: int) -> int:
        """T of `rank` (as home rank, and as the rank that processes them) at `step`."""
        if self.is_prefill(step):
            return self.prefill_tokens
        return max(1, self.decode_tokens - rank % 4)


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
