"""DeepSeek-V3-style router of the demo workload: sigmoid scores, a bias, group-limited top-k.

Legend: T tokens, H hidden, E experts, K top-k, G expert groups (E / G experts each),
TG groups kept per token.

DeepSeek-V3's gate, as its inference code and the paper describe it:
  1. scores = sigmoid(u @ W^T)                                  [T, E] in (0, 1)
  2. choice = scores + bias                                     the bias (auxiliary-loss-free
     load balancing) steers *which* experts are picked, never the weights
  3. group score = sum of the top-2 `choice` values of each group of E / G experts   [T, G]
  4. keep the TG groups with the largest group scores; experts of other groups are excluded
  5. topk_idx = the K largest `choice` values among the kept experts
  6. weights = scores[topk_idx] / sum(scores[topk_idx]) * routed_scaling_factor (the un-biased
     sigmoid scores, normalised over the K picks)

Excluded experts are masked with -inf (DeepSeek's reference fills 0.0, which can pick an
excluded expert when biased scores go negative; -inf cannot). Ties are broken by torch.topk,
which picks the lower index first on CPU for exact ties; the demo's float scores make exact ties
vanishingly rare.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RouterSpec:
    """Static shape of the gate.

    Attributes:
        experts: E, number of routed experts.
        topk: K experts per token.
        n_groups: G groups of E / G consecutive experts (DeepSeek-V3: 8 groups of 32).
        topk_groups: TG groups kept per token (DeepSeek-V3: 4); must allow K picks: TG * E / G >= K.
        routed_scaling: factor on the normalised weights (DeepSeek-V3: 2.5).
    """

    experts: int
    topk: int
    n_groups: int = 1
    topk_groups: int = 1
    routed_scaling: float = 2.5

    def __post_init__(self) -> None:
        if self.experts < 1 or self.topk < 1 or self.topk > self.experts:
            raise ValueError(f"topk={self.topk} with experts={self.experts}: need 1 <= topk <= experts")
        if self.n_groups < 1 or self.experts % self.n_groups:
            raise ValueError(f"n_groups={self.n_groups} must divide experts={self.experts}")
        if not 1 <= self.topk_groups <= self.n_groups:
            raise ValueError(f"topk_groups={self.topk_groups}: need 1 <= topk_groups <= n_groups={self.n_groups}")
        per_group = self.experts // self.n_groups
        if self.topk_groups * per_group < self.topk:
            raise ValueError(f"topk_groups={self.topk_groups} groups of {per_group} experts hold fewer "
                             f"than topk={self.topk} experts; raise topk_groups or lower topk")


def group_limited_topk(scores_TE: torch.Tensor, bias_E: torch.Tensor, spec: RouterSpec
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick K experts per token the DeepSeek-V3 way (see the module docstring).

    Args:
        scores_TE: [T, E] float32 sigmoid scores in (0, 1).
        bias_E: [E] float32 load-balancing bias added to the scores for selection only.
        spec: the gate's shape.

    Returns:
        topk_idx_TK: [T, K] int64 global expert ids, in descending order of biased score.
        topk_weights_TK: [T, K] float32, normalised un-biased scores times routed_scaling.
    """
    T, E = scores_TE.shape
    if E != spec.experts:
        raise ValueError(f"scores have {E} experts, spec says {spec.experts}")
    G = spec.n_groups
    choice_TE = scores_TE + bias_E.to(scores_TE.dtype)
    if G > 1:
        per_group = E // G
        top2 = min(2, per_group)  # a group of one expert scores by that expert alone
        group_TG = choice_TE.view(T, G, per_group).topk(top2, dim=-1).values.sum(dim=-1)
        keep_groups = group_TG.topk(spec.topk_groups, dim=-1).indices  # [T, TG]
        group_mask_TG = torch.zeros(T, G, dtype=torch.bool, device=scores_TE.device)
        group_mask_TG.scatter_(1, keep_groups, True)
        expert_mask_TE = group_mask_TG.repeat_interleave(per_group, dim=1)
        choice_TE = choice_TE.masked_fill(~expert_mask_TE, float("-inf"))
    topk_idx_TK = choice_TE.topk(spec.topk, dim=-1).indices
    picked_TK = scores_TE.gather(1, topk_idx_TK)
    # 1e-20 as in DeepSeek's gate: sigmoid scores are > 0, so it only guards underflow.
    weights_TK = picked_TK / (picked_TK.sum(dim=-1, keepdim=True) + 1e-20) * spec.routed_scaling
    return topk_idx_TK.to(torch.int64), weights_TK.to(torch.float32)


def route(u_TH: torch.Tensor, router_EH: torch.Tensor, bias_E: torch.Tensor, spec: RouterSpec
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate a batch: sigmoid(u @ W^T) then group-limited top-k.

    Args:
        u_TH: [T, H] float32 normalised token states (the router's input).
        router_EH: [E, H] float32 gate weights.
        bias_E: [E] float32 selection bias.

    Returns:
        (topk_idx_TK [T, K] int64, topk_weights_TK [T, K] float32), as group_limited_topk.
    """
    scores_TE = torch.sigmoid(u_TH @ router_EH.t())
    return group_limited_topk(scores_TE, bias_E, spec)
