"""The internode path (DeepEP: more than 8 ranks) of the emulated Buffer, on 4 CPU processes.

EPREPLAY_EMULATE_NODE_SIZE=2 (a test-only knob) makes nodes of 2 ranks, so 4 processes take the
path DeepEP takes above 8 ranks: num_tokens_per_rdma_rank, the 10-tuple handle, per-node bf16
partial sums in combine, and no num_worst_tokens.
"""
from __future__ import annotations

import pytest
import torch

import emulate_ref as ref
from epreplay.launch import run_ranks

H, K, LPR = 256, 3, 2


def _tokens(rank: int) -> int:
    return 17 + 4 * (rank % 4)


def _internode_rank(ctx, seed: int, NODE: int) -> list[str]:
    import torch.distributed as dist

    from epreplay.emulate import Buffer, EmulatedDeepEPError

    me, R = ctx.rank, ctx.world_size
    E, NR = LPR * R, R // NODE
    fails: list[str] = []

    def check(cond: bool, what: str) -> None:
        if not cond:
            fails.append(f"rank {me}: {what}")

    idxs = [ref.routing(seed, r, _tokens(r), E, K, L=LPR) for r in range(R)]
    xs = [ref.payload(seed, r, _tokens(r), H) for r in range(R)]
    idx, x, T = idxs[me], xs[me], _tokens(me)
    w = torch.rand(T, K, generator=torch.Generator().manual_seed(me))
    buf = Buffer(dist.group.WORLD, int(1e9), int(1e9), timeout_s=60)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    lay_ref = ref.layout(idx, E, R)
    want_rdma = [sum(any(lay_ref[2][t][n * NODE:(n + 1) * NODE]) for t in range(T)) for n in range(NR)]
    check(per_rdma is not None and per_rdma.dtype == torch.int32 and per_rdma.tolist() == want_rdma,
          f"num_tokens_per_rdma_rank {per_rdma} != {want_rdma}")
    rx, rti, rtw, lst, handle, _ = buf.dispatch(x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
                                                is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                                                topk_idx=idx, topk_weights=w)
    rows = [(s, t) for s in range(R) for t in range(_tokens(s)) if ref.layout(idxs[s], E, R)[2][t][me]]
    N = len(rows)
    check(rx.shape[0] == N and all(torch.equal(rx[n], xs[s][t]) for n, (s, t) in enumerate(rows)),
          "rows not in (source rank, token) order")
    C = buf.get_dispatch_config(R).num_sms // 2
    shapes = [(torch.bool, (T, R)), (torch.int32, (NR, C)), (torch.int32, (R, C)), (torch.int32, (NR, C)),
              (torch.int32, (NR,)), (torch.int32, (R, C)), (torch.int32, (R,)), (torch.uint8, (N, 8)),
              (torch.int32, (T, NR)), (torch.int32, None)]
    check(len(handle) == 10, f"internode handle must be a 10-tuple, got {len(handle)}")
    for i, (h, (dtype, shape)) in enumerate(zip(handle, shapes)):
        check(h.dtype == dtype and (shape is None or tuple(h.shape) == shape),
              f"handle[{i}] {h.dtype} {tuple(h.shape)} != {dtype} {shape}")
    check(handle[9].shape[1] == 8, "send_nvl_head must be [*, 8]")
    counts = [sum(1 for s2, _ in rows if s2 == s) for s in range(R)]
    check(handle[6].tolist() == list(torch.tensor(counts).cumsum(0)), "recv_gbl_rank_prefix_sum not inclusive")
    again = buf.dispatch(x, handle=handle)[0]
    check(torch.equal(again, rx), "cached internode dispatch differs")
    # combine numerics: bf16 partial sum per node, then bf16(bias + nodes ascending)
    y_in = (rx.float() * (me + 1)).to(torch.bfloat16)
    b = ref.payload(seed + 3, me, T, H)
    y, yw, _ = buf.combine(y_in, handle, topk_weights=rtw, bias=b)
    acc = b.float()
    for n in range(NR):
        part = torch.zeros(T, H)
        for r in range(n * NODE, (n + 1) * NODE):
            mask = torch.tensor([lay_ref[2][t][r] for t in range(T)], dtype=torch.bool)
            part[mask] += (x[mask].float() * (r + 1)).to(torch.bfloat16).float()
        acc += part.to(torch.bfloat16).float()
    check(torch.equal(y, acc.to(torch.bfloat16)), "internode combine numerics differ from per-node bf16 partials")
    check(torch.equal(yw, torch.where(idx >= 0, w, torch.zeros_like(w))), "weights round trip (internode)")
    try:
        buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                     topk_idx=idx, topk_weights=w, num_worst_tokens=64)
        check(False, "num_worst_tokens > 0 must be refused internode")
    except EmulatedDeepEPError as exc:
        check("num_worst_tokens" in str(exc), f"unclear error: {exc}")
    return fails


def test_internode_path_on_4_processes() -> None:
    out = run_ranks(_internode_rank, 4, 31, 2, timeout=120, env={"EPREPLAY_EMULATE_NODE_SIZE": "2"})
    fails = [f for per in out for f in per]
    assert not fails, "\n".join(fails[:20])


@pytest.mark.slow
def test_internode_path_at_16_ranks() -> None:
    """The real threshold: 16 processes, nodes of 8 (tiny shapes: 16 processes share 2 cores)."""
    out = run_ranks(_internode_rank, 16, 8, 8, timeout=300, pg_timeout_s=240)
    fails = [f for per in out for f in per]
    assert not fails, "\n".join(fails[:20])
