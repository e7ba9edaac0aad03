"""The emulated DeepEP V2 ElasticBuffer against the invariants of DeepEP's tests/elastic/test_ep.py.

Every rank regenerates every rank's routing and payload from seeds and computes what it must
receive and what combine must return with plain loops here (the reference of V2's refs.dispatch /
refs.combine, written anew): sorted source ids, per-expert counts and prefix sums, expanded slots,
bitwise data, bitwise combine in V2's reduction order. One process group per rank count runs
every case (BF16 and FP8, expand and non-expand, alignment 1 and 4, bias 0/1/2, CPU sync on and
off, deterministic on).
"""
from __future__ import annotations

import pytest
import torch

import emulate_ref as ref
from epreplay.launch import run_ranks

H, K, LPR = 128, 4, 3  # hidden, top-k, local experts per rank

CASES = [  # fp8, expert_alignment, num_bias, do_cpu_sync, do_handle_copy
    (False, 1, 0, True, True),
    (True, 4, 1, True, False),
    (False, 4, 2, False, True),
    (True, 1, 2, False, True),
]


def _tokens(rank: int) -> int:
    return 17 + 5 * rank


def fp8_cast(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-128-column FP8 cast: (e4m3 [T, H], fp32 scales [T, H / 128])."""
    T = x.shape[0]
    xf = x.float().view(T, -1, 128)
    scale = xf.abs().amax(-1).clamp_min(1e-4) / 448.0
    return (xf / scale.unsqueeze(-1)).view(T, -1).to(torch.float8_e4m3fn), scale


def pre_combine(g: int, k: int) -> torch.Tensor:
    """Expert output of global token g's k-th slot: [H] bf16, distinct per (g, k). Slots 0 and 2
    carry +-2^24, which swallows a small addend in fp32: the sum depends on the order and grouping
    of the reduction, so only V2's exact order passes (a test that can fail)."""
    big = (2.0 ** 24, 0.0, -(2.0 ** 24), 0.0)[k % 4]
    return (torch.sin((g * K + k) * 0.731 + torch.arange(H) * 0.0137) + big).to(torch.bfloat16)


def ref_combine(idx: torch.Tensor, me: int, M: int, L: int, bias: list, per_rank: bool) -> torch.Tensor:
    """V2's combine for this rank's tokens: fp32 from bias0 + bias1; per_rank: each rank's slots
    summed in fp32 (k ascending) and cast to bf16, ranks ordered by their last slot; else every
    slot on its own in k order. One bf16 cast at the end."""
    T = idx.shape[0]
    out = torch.zeros(T, H, dtype=torch.bfloat16)
    for t in range(T):
        acc = bias[0][t].float() + bias[1][t].float() if len(bias) == 2 else (
            bias[0][t].float().clone() if bias else torch.zeros(H))
        ks = [k for k in range(K) if idx[t, k] >= 0]
        if per_rank:
            last: dict[int, int] = {}
            for k in ks:
                last[int(idx[t, k]) // L] = k
            for r in sorted(last, key=last.get):
                part = torch.zeros(H)
                for k in ks:
                    if int(idx[t, k]) // L == r:
                        part += pre_combine(me * M + t, k).float()
                acc += part.to(torch.bfloat16).float()
        else:
            for k in ks:
                acc += pre_combine(me * M + t, k).float()
        out[t] = acc.to(torch.bfloat16)
    return out


def _case(buf, me: int, R: int, seed: int, case: tuple, fails: list[str]) -> None:
    use_fp8, al, n_bias, cpu_sync, copy = case
    name = f"fp8={int(use_fp8)} align={al} bias={n_bias} cpu_sync={int(cpu_sync)} copy={int(copy)}"
    E, L, M = LPR * R, LPR, _tokens(R - 1)
    idxs = [ref.routing(seed, r, _tokens(r), E, K, L=L) for r in range(R)]
    ws = [torch.where(i >= 0, torch.rand(i.shape, generator=torch.Generator().manual_seed(seed + r)), 0.0)
          for r, i in enumerate(idxs)]
    xs = [ref.payload(seed, r, _tokens(r), H) for r in range(R)]
    idx, w, T = idxs[me], ws[me], _tokens(me)
    x = fp8_cast(xs[me]) if use_fp8 else xs[me]

    def check(cond: bool, what: str) -> None:
        if not cond:
            fails.append(f"[{name}] rank {me}: {what}")

    # the reference receive: (source, token) pairs holding an expert here, sorted by global id
    rows = [(s, t) for s in range(R) for t in range(_tokens(s))
            if any(me * L <= int(e) < (me + 1) * L for e in idxs[s][t])]
    N = len(rows)
    ref_count = [sum(int(e) == me * L + i for s, t in rows for e in idxs[s][t]) for i in range(L)]
    args = dict(topk_idx=idx, topk_weights=w, num_max_tokens_per_rank=M, num_experts=E, expert_alignment=al,
                do_handle_copy=copy, do_cpu_sync=cpu_sync)
    rx, rti, rtw, h, _ = buf.dispatch(x, **args)
    ex, eti, etw, eh, _ = buf.dispatch(x, **args, do_expand=True, use_tma_aligned_col_major_sf=True)
    cx, cti, ctw, ch, _ = buf.dispatch(x, handle=h)
    zx, _, ztw, _, _ = buf.dispatch(x, topk_weights=w, handle=eh, do_expand=True, do_zero_padding=True)
    n = int(h.psum_num_recv_tokens_per_scaleup_rank[-1])
    check(n == N and int(eh.psum_num_recv_tokens_per_scaleup_rank[-1]) == N, f"received {n} rows, reference {N}")
    g_ref = [s * M + t for s, t in rows]
    check(h.recv_src_metadata[:N, 0].tolist() == g_ref, "recv_src_metadata[:, 0] != sorted source ids")
    check(sorted(eh.recv_src_metadata[:N, 0].tolist()) == g_ref, "expanded source ids differ")
    check((idx.data_ptr() != h.topk_idx.data_ptr()) == copy, "do_handle_copy not honoured")
    check(ch is h and ch.topk_idx.data_ptr() == h.topk_idx.data_ptr(), "cached dispatch must return its handle")
    rows_alloc = N if cpu_sync else R * M
    check((rx[0] if use_fp8 else rx).shape[0] == rows_alloc, f"recv_x rows != {rows_alloc}")
    check(h.recv_src_metadata.shape == (rows_alloc, K + 2), "recv_src_metadata shape")
    # counts, alignment and prefix sums
    aligned = [(c + al - 1) // al * al for c in ref_count]
    check(h.num_recv_tokens_per_expert_list == (aligned if cpu_sync else []), "num_recv_tokens_per_expert_list")
    psum = [0] + h.psum_num_recv_tokens_per_expert.tolist()
    epsum = [0] + eh.psum_num_recv_tokens_per_expert.tolist()
    for i in range(L):
        check(psum[i + 1] - psum[i] == aligned[i], f"non-expand psum of expert {i}")
        check(epsum[i + 1] - (epsum[i] + al - 1) // al * al == ref_count[i], f"expand psum of expert {i}")
    per_src = [sum(1 for s, _ in rows if s == r) for r in range(R)]
    check(torch.diff(h.psum_num_recv_tokens_per_scaleup_rank, prepend=torch.zeros(1, dtype=torch.int32)).tolist()
          == per_src, "psum_num_recv_tokens_per_scaleup_rank != rows per source")
    check(eh.num_unaligned_recv_tokens_per_expert.tolist() == ref_count, "num_unaligned_recv_tokens_per_expert")
    # data: bitwise, row by row
    vx = rx[0] if use_fp8 else rx
    for j, (s, t) in enumerate(rows):
        src = fp8_cast(xs[s])[0][t] if use_fp8 else xs[s][t]
        if not torch.equal(vx[j].view(torch.uint8), src.view(torch.uint8)):
            check(False, f"row {j} != source {s} token {t}")
            break
        if use_fp8 and not torch.equal(rx[1][j], fp8_cast(xs[s])[1][t]):
            check(False, f"scales of row {j} differ")
            break
        want_i = [int(e) - me * L if me * L <= int(e) < (me + 1) * L else -1 for e in idxs[s][t]]
        if rti[j].tolist() != want_i or not torch.equal(rtw[j], ws[s][t]):
            check(False, f"top-k ids/weights of row {j}")
            break
    # expanded: every valid slot holds its row; cached expanded with zero padding agrees there
    slots = eh.recv_src_metadata[:N, 2:]
    check(eti is None, "expanded recv_topk_idx must be None")
    vex, vzx = (ex[0], zx[0]) if use_fp8 else (ex, zx)
    for j, (s, t) in enumerate(rows):
        for k in range(K):
            e = int(idxs[s][t, k])
            sl = int(slots[j, k])
            if (me * L <= e < (me + 1) * L) != (sl >= 0):
                check(False, f"slot of row {j} k {k}")
                continue
            if sl >= 0 and not (torch.equal(vex[sl].view(torch.uint8), vx[j].view(torch.uint8))
                                and float(etw[sl]) == float(ws[s][t, k]) and torch.equal(
                                    vzx[sl].view(torch.uint8), vex[sl].view(torch.uint8))
                                and float(ztw[sl]) == float(etw[sl])):
                check(False, f"expanded slot {sl} (row {j}, k {k}) holds another row")
    for i in range(L):
        a, b = epsum[i + 1], (epsum[i + 1] + al - 1) // al * al
        check(bool((vzx[a:b].float() == 0).all()) and bool((ztw[a:b] == 0).all()), f"padding of expert {i} not 0")
    # cached == first dispatch
    check(torch.equal((cx[0] if use_fp8 else cx).view(torch.uint8), vx.view(torch.uint8)) and
          torch.equal(cti, rti), "cached dispatch differs from its dispatch")
    # dst_buffer_slot_idx: where each (token, k) landed on its destination rank
    for t in range(T):
        for k in range(K):
            e = int(idx[t, k])
            if e < 0:
                ok = int(h.dst_buffer_slot_idx[t, k]) == -1
            else:
                d = e // L
                dest = [s2 * M + t2 for s2 in range(R) for t2 in range(_tokens(s2))
                        if any(d * L <= int(f) < (d + 1) * L for f in idxs[s2][t2])]
                ok = int(h.dst_buffer_slot_idx[t, k]) == dest.index(me * M + t)
            if not ok:
                check(False, f"dst_buffer_slot_idx[{t}, {k}]")
                break
    # deterministic mode: a second dispatch is bitwise equal
    rx2, rti2, rtw2, h2, _ = buf.dispatch(x, **args)
    check(torch.equal((rx2[0] if use_fp8 else rx2)[:N].view(torch.uint8), vx[:N].view(torch.uint8))
          and torch.equal(rti2[:N], rti[:N]) and torch.equal(h2.recv_src_metadata[:N, :1], h.recv_src_metadata[:N, :1]),
          "deterministic: second dispatch differs")
    stats = torch.zeros(L, dtype=torch.int32)
    buf.dispatch(x, **args, cumulative_local_expert_recv_stats=stats)
    check(stats.tolist() == ref_count, f"cumulative stats {stats.tolist()} != {ref_count}")
    # combine: non-expanded (rank-reduced rows) and expanded (one row per slot)
    gen = torch.Generator().manual_seed(seed * 31 + me)
    bias = [torch.randn(T, H, generator=gen).to(torch.bfloat16) for _ in range(n_bias)]
    y = torch.zeros(rows_alloc, H, dtype=torch.bfloat16)
    ey = torch.zeros(vex.shape[0], H, dtype=torch.bfloat16)
    for j, (s, t) in enumerate(rows):
        acc = torch.zeros(H)
        for k in range(K):
            if me * L <= int(idxs[s][t, k]) < (me + 1) * L:
                acc += pre_combine(s * M + t, k).float()
                ey[int(slots[j, k])] = pre_combine(s * M + t, k)
        y[j] = acc.to(torch.bfloat16)
    b = None if not bias else bias[0] if n_bias == 1 else tuple(bias)
    out, out_w, _ = buf.combine(y, h, topk_weights=rtw, bias=b)
    check(torch.equal(out, ref_combine(idx, me, M, L, bias, True)), "combine not bitwise equal to the reference")
    check(torch.equal(out_w, w), "combined_topk_weights != topk_weights")
    eout, eout_w, _ = buf.combine(ey, eh, topk_weights=etw, bias=b)
    check(torch.equal(eout, ref_combine(idx, me, M, L, bias, True)), "expanded combine not bitwise equal")
    check(torch.equal(eout_w, w), "expanded combined_topk_weights != topk_weights")


def _v2_rank(ctx, seed: int, cases: list) -> list[str]:
    import torch.distributed as dist

    from epreplay.emulate.v2 import ElasticBuffer

    buf = ElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=64, hidden=H, deterministic=True,
                        explicitly_destroy=True, timeout_s=60)
    fails: list[str] = []
    for i, case in enumerate(cases):
        _case(buf, ctx.rank, ctx.world_size, seed + i, tuple(case), fails)
    # allow_multiple_reduction=False: an expanded combine adds every slot on its own
    one = ElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=64, allow_multiple_reduction=False, timeout_s=60)
    R, me = ctx.world_size, ctx.rank
    E, L, M = LPR * R, LPR, _tokens(R - 1)
    idx = ref.routing(seed, me, _tokens(me), E, K, L=L)
    _, _, _, eh, _ = one.dispatch(ref.payload(seed, me, _tokens(me), H), topk_idx=idx, num_experts=E,
                                  num_max_tokens_per_rank=M, do_expand=True)
    N = int(eh.psum_num_recv_tokens_per_scaleup_rank[-1])
    ey = torch.zeros(int(eh.psum_num_recv_tokens_per_expert[-1]) + 1, H, dtype=torch.bfloat16)
    for j in range(N):
        g = int(eh.recv_src_metadata[j, 0])
        for k in range(K):
            if int(eh.recv_src_metadata[j, 2 + k]) >= 0:
                ey[int(eh.recv_src_metadata[j, 2 + k])] = pre_combine(g, k)
    out, out_w, _ = one.combine(ey, eh)
    if not torch.equal(out, ref_combine(idx, me, M, L, [], False)) or out_w is not None:
        fails.append(f"rank {me}: allow_multiple_reduction=False expanded combine not bitwise equal")
    buf.destroy()
    return fails


@pytest.mark.parametrize("ranks", [2, 4])
def test_v2_invariants(ranks: int) -> None:
    out = run_ranks(_v2_rank, ranks, 40 + ranks, CASES, timeout=240)
    fails = [f for per_rank in out for f in per_rank]
    assert not fails, "\n".join(fails[:20])


def test_v2_invariants_8_ranks() -> None:
    out = run_ranks(_v2_rank, 8, 48, CASES[:2], timeout=300)
    fails = [f for per_rank in out for f in per_rank]
    assert not fails, "\n".join(fails[:20])


def _misuse_rank(ctx) -> list[str]:
    """Each misuse must raise on every rank (ElasticMisuse, an AssertionError as V2's asserts)."""
    import torch.distributed as dist

    from epreplay import standin

    assert standin.install()
    import deep_ep  # the stand-in: V2's names resolve to the emulation
    from epreplay.emulate.v2 import ElasticMisuse

    R, me = ctx.world_size, ctx.rank
    buf = deep_ep.ElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=32, timeout_s=30)
    other = deep_ep.ElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=32, timeout_s=30)
    E = 2 * R
    idx = ref.routing(3, me, 8, E, 2, L=2)
    x = ref.payload(3, me, 8, H)
    _, _, _, h, _ = buf.dispatch(x, topk_idx=idx, num_experts=E)
    _, _, _, h_other, _ = other.dispatch(x, topk_idx=idx, num_experts=E)
    misuses = {
        "handle with topk_idx": lambda: buf.dispatch(x, topk_idx=idx, handle=h),
        "cpu sync with handle": lambda: buf.dispatch(x, handle=h, do_cpu_sync=True),
        "zero padding without expand": lambda: buf.dispatch(x, topk_idx=idx, num_experts=E, do_zero_padding=True),
        "more tokens than M": lambda: buf.dispatch(ref.payload(3, me, 40, H), topk_idx=ref.routing(3, me, 40, E, 2),
                                                   num_experts=E),
        "foreign handle": lambda: buf.combine(torch.zeros(h_other.recv_src_metadata.shape[0], H,
                                                          dtype=torch.bfloat16), h_other),
        "E differs across ranks": lambda: buf.dispatch(x, topk_idx=idx, num_experts=E if me else 4 * R),
        "fp32 x": lambda: buf.dispatch(x.float(), topk_idx=idx, num_experts=E),
        "combine rows": lambda: buf.combine(torch.zeros(1, H, dtype=torch.bfloat16), h),
    }
    found = []
    for name, fn in misuses.items():
        try:
            fn()
            found.append(f"{name}: no error")
        except ElasticMisuse as exc:
            if not isinstance(exc, AssertionError):
                found.append(f"{name}: not an AssertionError")
    if not isinstance(deep_ep.EPHandle, type) or not isinstance(h, deep_ep.EPHandle):
        found.append("deep_ep.EPHandle is not the handle's class")
    return found


def test_v2_misuse_raises_on_every_rank_through_standin() -> None:
    out = run_ranks(_misuse_rank, 2, timeout=120)
    assert out == [[], []], out
