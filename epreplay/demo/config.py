"""The demo workload's configuration and release mapping (no torch: the CLI validates with it).

See epreplay.demo.model for what the fields mean to the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from epreplay.errors import UsageError

# Hidden sizes DeepEP's low-latency kernels are compiled for (SWITCH_HIDDEN in DeepEP's
# csrc/kernels/launch.cuh); any other makes the real kernel assert "Unsupported hidden".
DEEPEP_LL_HIDDEN = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)

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
        slow_rank, slow_ms: a straggler for timeline/stragglers views: rank `slow_rank` spends
            `slow_ms` extra milliseconds of "compute" before each of its dispatches (-1: none).
            As on real clusters, the *other* ranks' dispatch calls get slower (they wait inside
            the collective for it), while the straggler's own calls look fast.
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
    slow_rank: int = -1
    slow_ms: float = 0.0

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
             f"--groups {self.n_groups} does not divide --experts {self.experts}; "
             f"pick E a multiple of it or another --groups")
        need(1 <= self.topk_groups <= self.n_groups,
             f"--topk-groups {self.topk_groups}: must be between 1 and --groups {self.n_groups}")
        need(self.topk_groups * (self.experts // self.n_groups) >= self.topk,
             f"--topk {self.topk}: the {self.topk_groups} kept groups of {self.experts // self.n_groups} "
             f"experts hold fewer experts; lower --topk or use more experts")
        need(not self.has_decode or self.hidden % 128 == 0,
             f"--hidden {self.hidden}: DeepEP's low-latency (decode) kernels need a multiple of 128; "
             f"use e.g. --hidden {max(128, self.hidden // 128 * 128)} or --prefill-every 1 (prefill only)")
        need(not self.fp8 or self.hidden % 128 == 0,
             f"--hidden {self.hidden}: FP8 dispatch casts per 128 values; use a multiple of 128 or --no-fp8")
        need(self.device in ("cpu", "cuda"), f"--device {self.device!r}: use cpu or cuda")
        need(self.release_strength >= 0, f"release_strength={self.release_strength}: must be >= 0")
        need(-1 <= self.slow_rank < self.ranks,
             f"--slow-rank {self.slow_rank}: must be a rank below --ranks {self.ranks} (or -1 for none)")
        need(self.slow_ms >= 0, f"--slow-ms {self.slow_ms}: must be >= 0")
        release_layers(self.release, self.layers)  # validates the release text

    @property
    def local_experts(self) -> int:
        return self.experts // self.ranks

    @property
    def router_spec(self) -> Any:
        """The gate's demo.router.RouterSpec (imported here: that module needs torch)."""
        from epreplay.demo.router import RouterSpec

        return RouterSpec(self.experts, self.topk, self.n_groups, self.topk_groups, self.routed_scaling)

    @property
    def has_decode(self) -> bool:
        """Whether any step runs the low-latency (decode) path."""
        return any(not self.is_prefill(s) for s in range(self.steps))

    def is_prefill(self, step: int) -> bool:
        return step % self.prefill_every == 0

    def tokens_on(self, step: int, rank: int) -> int:
        """T of `rank` (as home rank, and as the rank that processes them) at `step`."""
        if self.is_prefill(step):
            return self.prefill_tokens
        return max(1, self.decode_tokens - rank % 4)
