"""Pure functions of routing for the emulated Buffer: layout, DeepEP's channel matrices, size hints.

Legend: T tokens on this rank, K top-k, E experts, R ranks, L = E / R local experts per rank,
C channels = Config.num_sms / 2, NR = ceil(R / 8) "RDMA ranks" (nodes of 8), N received rows.

DeepEP splits a rank's T tokens into C contiguous channels of ceil(T / C) tokens each
(`get_channel_task_range`); every matrix below follows that split, so the values equal the ones
the CUDA kernels write. No communication happens here.
"""
from __future__ import annotations

import os

import torch

NVL_PEERS = 8  # DeepEP's LEGACY_NUM_MAX_NVL_PEERS: ranks per node; above this the internode path
ENV_NODE = "EPREPLAY_EMULATE_NODE_SIZE"
SOURCE_META_BYTES = 8  # sizeof(internode::SourceMeta): int src_rdma_rank + int nvl-rank bitmask
NO_HEAD = 1 << 25  # combine's "no later head in this channel" sentinel (cached_notify_combine)
ALIGN = 128  # LEGACY_NUM_BUFFER_ALIGNMENT_BYTES


class Config:
    """DeepEP's performance Config: changes speed and hang risk on GPUs, never results.

    Args:
        num_sms: SMs of the normal kernels (even; channels C = num_sms / 2).
        num_max_nvl_chunked_send_tokens / num_max_nvl_chunked_recv_tokens: NVLink queue chunks.
        num_max_rdma_chunked_send_tokens / num_max_rdma_chunked_recv_tokens: RDMA queue chunks.
    """

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256, num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 256) -> None:
        if num_sms < 0 or num_max_nvl_chunked_send_tokens <= 0 or num_max_rdma_chunked_send_tokens <= 0:
            raise ValueError(f"Config({num_sms}, {num_max_nvl_chunked_send_tokens}, ...): sizes must be positive")
        if num_max_nvl_chunked_send_tokens >= num_max_nvl_chunked_recv_tokens:
            raise ValueError(f"Config: nvl send chunk {num_max_nvl_chunked_send_tokens} must be below "
                             f"the recv chunk {num_max_nvl_chunked_recv_tokens} (as DeepEP asserts)")
        s = num_max_rdma_chunked_send_tokens
        recv = -(-num_max_rdma_chunked_recv_tokens // s) * s  # DeepEP aligns it up to the send chunk
        if s > recv // 2:
            raise ValueError(f"Config: rdma send chunk {s} must be at most half the recv chunk {recv}")
        self.num_sms = int(num_sms)
        self.num_max_nvl_chunked_send_tokens = int(num_max_nvl_chunked_send_tokens)
        self.num_max_nvl_chunked_recv_tokens = int(num_max_nvl_chunked_recv_tokens)
        self.num_max_rdma_chunked_send_tokens = int(s)
        self.num_max_rdma_chunked_recv_tokens = int(recv)

    def __repr__(self) -> str:
        return (f"Config({self.num_sms}, {self.num_max_nvl_chunked_send_tokens}, "
                f"{self.num_max_nvl_chunked_recv_tokens}, {self.num_max_rdma_chunked_send_tokens}, "
                f"{self.num_max_rdma_chunked_recv_tokens})")

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of NVLink buffer the normal kernels need (DeepEP's formula, max top-k/scales 128)."""
        nr, nn, c = max(num_ranks // NVL_PEERS, 1), min(num_ranks, NVL_PEERS), self.num_sms // 2
        per_token = hidden_bytes + SOURCE_META_BYTES + 128 * 8 + 128 * 4 + 128 * 4
        n = c * nn * (2 * nr + 3) * 4 + c * nn * self.num_max_nvl_chunked_recv_tokens * per_token
        return -(-n // 128) * 128

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of RDMA buffer the internode kernels need; 0 at 8 ranks or fewer."""
        if num_ranks <= NVL_PEERS:
            return 0
        nr, c, chunk = num_ranks // NVL_PEERS, self.num_sms // 2, self.num_max_rdma_chunked_recv_tokens
        per_token = (hidden_bytes + SOURCE_META_BYTES + 128 * 8 + 128 * 4 + 128 * 4 + 16) * 2
        n = c * nr * (NVL_PEERS * 2 + 2) * 2 * 4 + c * nr * chunk * per_token
        return -(-n // 128) * 128


# DeepEP's get_dispatch_config / get_combine_config tables: ranks -> (nvl send, nvl recv,
# rdma send, rdma recv) chunk sizes.
_DISPATCH = {2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128), 16: (36, 288, 20, 128),
             24: (32, 288, 8, 128), 32: (32, 288, 8, 128), 48: (32, 288, 8, 128), 64: (32, 288, 8, 128),
             96: (20, 480, 12, 128), 128: (20, 560, 12, 128), 144: (32, 720, 12, 128), 160: (28, 720, 12, 128)}
_COMBINE = {2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128), 16: (4, 288, 12, 128),
            24: (1, 288, 8, 128), 32: (1, 288, 8, 128), 48: (1, 288, 8, 128), 64: (1, 288, 8, 128),
            96: (1, 480, 8, 128), 128: (1, 560, 8, 128), 144: (2, 720, 8, 128), 160: (2, 720, 8, 128)}


def tuned_config(num_ranks: int, num_sms: int, *, combine: bool) -> Config:
    """DeepEP's tuned Config for `num_ranks`; counts DeepEP does not list take the next listed one."""
    assert num_ranks >= 1, f'Unsupported number of EP ranks: {num_ranks}'
    table = _COMBINE if combine else _DISPATCH
    listed = min((n for n in table if n >= num_ranks), default=max(table))
    return Config(num_sms, *table[listed])


def low_latency_rdma_size_hint(M: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """DeepEP's get_low_latency_rdma_size_hint: two send, two receive and two signal buffers."""
    scales = hidden // 128
    dispatch_msg = 16 + max(hidden * 2, hidden + scales * 4)
    combine_msg = scales * 4 + hidden * 2
    send = max(M * dispatch_msg, num_experts * M * combine_msg)
    recv = max(num_experts * M * dispatch_msg, num_experts * M * combine_msg)
    signal = -(-(num_experts * 4) // 128) * 128
    total = send * 2 + recv * 2 + signal * 2
    return (total + ALIGN) // ALIGN * ALIGN


def node_size() -> int:
    """Ranks per node: DeepEP's 8. EPREPLAY_EMULATE_NODE_SIZE (tests only) lowers it so that the
    internode path (10-tuple handles, per-node combine numerics) runs on a few CPU processes."""
    raw = os.environ.get(ENV_NODE)
    return max(1, min(int(raw), NVL_PEERS)) if raw else NVL_PEERS


def dispatch_layout(topk_idx_TK: torch.Tensor, num_experts: int, num_ranks: int
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """get_dispatch_layout's four tensors, pure functions of topk_idx (-1 = no expert).

    Returns:
        num_tokens_per_rank [R] int32 (a token counts once per rank owning any of its experts),
        num_tokens_per_rdma_rank [NR] int32 or None when R <= 8, num_tokens_per_expert [E] int32
        (every (t, k) slot), is_token_in_rank [T, R] bool.
    """
    T = topk_idx_TK.shape[0]
    dev = topk_idx_TK.device
    L = num_experts // num_ranks
    valid_TK = topk_idx_TK >= 0
    per_expert_E = torch.bincount(topk_idx_TK[valid_TK], minlength=num_experts).to(torch.int32)
    # column 0 collects the -1 slots and is dropped
    rank_TK = torch.where(valid_TK, topk_idx_TK // L + 1, torch.zeros_like(topk_idx_TK))
    in_rank = torch.zeros(T, num_ranks + 1, dtype=torch.bool, device=dev)
    in_rank.scatter_(1, rank_TK, True)
    in_rank_TR = in_rank[:, 1:].contiguous()
    per_rank_R = in_rank_TR.sum(0).to(torch.int32)
    per_rdma = None
    if num_ranks > node_size():
        per_rdma = node_mask(in_rank_TR).sum(0).to(torch.int32)
    return per_rank_R, per_rdma, per_expert_E, in_rank_TR


def node_mask(in_rank_TR: torch.Tensor) -> torch.Tensor:
    """[T, R] bool -> [T, NR] bool: does the token go to any rank of node n (ranks n*8 .. n*8+7)."""
    T, R = in_rank_TR.shape
    n = node_size()
    nr = -(-R // n)
    padded = torch.zeros(T, nr * n, dtype=torch.bool, device=in_rank_TR.device)
    padded[:, :R] = in_rank_TR
    return padded.view(T, nr, n).any(-1)


def channel_of(num_tokens: int, num_channels: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[T] int64: the channel of each token (channels are contiguous runs of ceil(T / C) tokens)."""
    per = -(-num_tokens // num_channels) if num_tokens else 1
    return torch.arange(num_tokens, device=device) // per


def channel_prefix(mask_TX: torch.Tensor, num_channels: int) -> torch.Tensor:
    """[T, X] bool -> [X, C] int32: inclusive prefix over channels of tokens sent to each x."""
    T, X = mask_TX.shape
    ch_T = channel_of(T, num_channels, mask_TX.device)
    counts = torch.zeros(num_channels, X, dtype=torch.int64, device=mask_TX.device)
    counts.index_add_(0, ch_T, mask_TX.to(torch.int64))
    return counts.cumsum(0).t().contiguous().to(torch.int32)


def send_head(mask_TX: torch.Tensor, num_channels: int) -> torch.Tensor:
    """[T, X] bool -> [T, X] int32: a sent token's slot in its channel's queue, -1 if not sent."""
    T, X = mask_TX.shape
    m = mask_TX.to(torch.int64)
    run = m.cumsum(0) - m  # tokens before t going to x, counted from token 0
    ch_T = channel_of(T, num_channels, mask_TX.device)
    per = -(-T // num_channels) if T else 1
    first_T = (ch_T * per).clamp_max(max(T - 1, 0))
    start_TX = run[first_T] if T else run  # count before each channel's first token
    return torch.where(mask_TX, run - start_TX, torch.full_like(run, -1)).to(torch.int32)


def recv_channel_prefix(src_rank_N: torch.Tensor, src_idx_N: torch.Tensor, src_tokens_R: list[int],
                        num_channels: int) -> torch.Tensor:
    """[R, C] int32 on the receiver: for source s and channel c, the rows from s in channels < c.

    This is DeepEP's recv_channel_prefix_matrix (the sender's exclusive channel prefix toward
    this rank), computed from the received rows' source token indices and each source's T.
    """
    R = len(src_tokens_R)
    host = torch.device("cpu")  # every tensor here explicitly on the host: a client's default device must not leak in
    src = src_rank_N.to(host, torch.int64)
    idx = src_idx_N.to(host, torch.int64)
    per_R = torch.tensor([-(-t // num_channels) if t else 1 for t in src_tokens_R], dtype=torch.int64, device=host)
    ch = idx // per_R[src] if src.numel() else src
    counts = torch.zeros(R * num_channels, dtype=torch.int64, device=host)
    counts.index_add_(0, src * num_channels + ch, torch.ones_like(src))
    out = counts.view(R, num_channels).cumsum(1) - counts.view(R, num_channels)
    return out.to(torch.int32)


def mark_send_head_after_combine(send_head_TR: torch.Tensor, num_channels: int) -> None:
    """DeepEP's combine rewrites send_head in place: a -1 (or negative) entry becomes
    -(the next non-negative head in the same channel) - 1, or -(1 << 25) - 1 if none follows."""
    T, R = send_head_TR.shape
    if T == 0:
        return
    head = send_head_TR.to(torch.int64)
    ch_T = channel_of(T, num_channels, head.device)
    big = torch.iinfo(torch.int64).max
    pos = torch.where(head >= 0, torch.arange(T, device=head.device).unsqueeze(1).expand(T, R),
                      torch.full_like(head, big))
    nxt = torch.full_like(head, big)
    for c in torch.unique(ch_T).tolist():  # channels are contiguous runs: reverse cummin per run
        sel = (ch_T == c).nonzero().flatten()
        lo, hi = int(sel[0]), int(sel[-1]) + 1
        nxt[lo:hi] = pos[lo:hi].flip(0).cummin(0).values.flip(0)
    later = torch.where(nxt == big, torch.full_like(head, NO_HEAD),
                        head.gather(0, nxt.clamp_max(T - 1)))
    fixed = torch.where(head < 0, -later - 1, head)
    send_head_TR.copy_(fixed.to(send_head_TR.dtype))
