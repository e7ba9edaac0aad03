"""Independent references for the emulated-Buffer tests (plain loops over small shapes).

Nothing here imports epreplay's emulation: these are DeepEP's semantics written out directly
(deepep-semantics.md and DeepEP's csrc/kernels/legacy/intranode.cu), to compare against.
Legend: T tokens, K top-k, E experts, R ranks, L = E / R, H hidden, C channels.
"""
from __future__ import annotations

import torch


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepEP's tests' similarity: 0 for identical tensors (fp64)."""
    x, y = x.double() + 1, y.double() + 1
    denom = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denom)


def routing(seed: int, rank: int, T: int, E: int, K: int, *, nowhere: int = 0, skip_rank: int | None = None,
            one_expert: bool = False, L: int = 1) -> torch.Tensor:
    """Deterministic topk_idx [T, K] of `rank`: random distinct experts, some -1 slots, the first
    `nowhere` tokens routed nowhere, optionally avoiding rank `skip_rank`'s experts or all on expert 0."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    scores = torch.rand(T, E, generator=g)
    if skip_rank is not None:
        scores[:, skip_rank * L:(skip_rank + 1) * L] = -1
    idx = scores.topk(min(K, E), dim=1).indices
    if K > E:  # fewer experts than slots: the extra slots select nothing
        idx = torch.cat([idx, torch.full((T, K - E), -1, dtype=idx.dtype)], dim=1)
    drop = torch.rand(T, K, generator=g) < 0.15
    idx[drop] = -1
    if skip_rank is not None:
        idx[(idx >= skip_rank * L) & (idx < (skip_rank + 1) * L)] = -1
    idx[:nowhere] = -1
    if one_expert:
        idx[:] = -1
        idx[:, 0] = 0
    return idx


def payload(seed: int, rank: int, T: int, H: int, *, const: bool = False) -> torch.Tensor:
    if const:
        return torch.full((T, H), float(rank), dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed * 1000 + rank + 7)
    return torch.randn(T, H, generator=g).to(torch.bfloat16)


def layout(idx: torch.Tensor, E: int, R: int) -> tuple[list[int], list[int], list[list[bool]]]:
    L = E // R
    T, K = idx.shape
    per_rank, per_expert = [0] * R, [0] * E
    in_rank = [[False] * R for _ in range(T)]
    for t in range(T):
        for k in range(K):
            e = int(idx[t, k])
            if e >= 0:
                per_expert[e] += 1
                in_rank[t][e // L] = True
        for r in range(R):
            per_rank[r] += in_rank[t][r]
    return per_rank, per_expert, in_rank


def channel_ranges(T: int, C: int) -> list[range]:
    per = -(-T // C) if T else 0
    return [range(min(per * c, T), min(per * c + per, T)) for c in range(C)]


def handle_ref(idxs: list[torch.Tensor], E: int, R: int, me: int, C: int) -> dict:
    """Intranode handle contents of rank `me` from every rank's topk_idx."""
    lays = [layout(i, E, R) for i in idxs]
    rpm = [[0] * R for _ in range(R)]
    for i in range(R):
        for j in range(R):
            rpm[i][j] = lays[i][0][j] + (rpm[i - 1][j] if i else 0)

    def cpm_of(s: int) -> list[list[int]]:
        in_rank, T = lays[s][2], idxs[s].shape[0]
        out = [[0] * C for _ in range(R)]
        for r in range(R):
            run = 0
            for c, rng in enumerate(channel_ranges(T, C)):
                run += sum(in_rank[t][r] for t in rng)
                out[r][c] = run
        return out

    recv_cpm = [[0 if c == 0 else cpm_of(s)[me][c - 1] for c in range(C)] for s in range(R)]
    in_rank, T = lays[me][2], idxs[me].shape[0]
    send_head = [[-1] * R for _ in range(T)]
    for r in range(R):
        for rng in channel_ranges(T, C):
            n = 0
            for t in rng:
                if in_rank[t][r]:
                    send_head[t][r] = n
                    n += 1
    rows = [(s, t) for s in range(R) for t in range(idxs[s].shape[0]) if lays[s][2][t][me]]
    return {"rank_prefix_matrix": rpm, "channel_prefix_matrix": cpm_of(me), "recv_channel_prefix_matrix": recv_cpm,
            "send_head": send_head, "rows": rows, "in_rank": in_rank, "layouts": lays}


def send_head_after_combine(send_head: list[list[int]], T: int, C: int) -> list[list[int]]:
    """DeepEP's cached_notify_combine: negative heads become -(next non-negative head) - 1."""
    out = [row[:] for row in send_head]
    R = len(send_head[0]) if send_head else 0
    for r in range(R):
        for rng in channel_ranges(T, C):
            last = 1 << 25
            for t in reversed(rng):
                if out[t][r] < 0:
                    out[t][r] = -last - 1
                else:
                    last = out[t][r]
    return out


def fp8_cast(x: torch.Tensor, round_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepEP's per-128 LL cast written with math (log2/ceil) rather than bit tricks."""
    T, H = x.shape
    xf = x.float().view(T, H // 128, 128)
    amax = xf.abs().amax(-1).clamp_min(1e-4)
    if round_scale:
        inv = torch.pow(2.0, torch.ceil(torch.log2(amax * torch.tensor(1 / 448.0))))
        scale = 1.0 / inv
    else:
        inv = amax * torch.tensor(1 / 448.0)
        scale = torch.full_like(amax, 448.0) / amax  # the kernel divides (torch: scalar/t = reciprocal*scalar)
    q = (xf * scale.unsqueeze(-1)).clamp(-448, 448).view(T, H).to(torch.float8_e4m3fn)
    return q, inv
