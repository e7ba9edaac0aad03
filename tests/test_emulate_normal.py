"""Normal dispatch/combine of the emulated Buffer against DeepEP's own test invariants.

Every rank regenerates every rank's routing and payload from seeds, so the expected receive side
(row order, handle matrices, values) is computed independently, with loops, in tests/emulate_ref.py.
One spawned group runs many scenarios (processes are the expensive part on 2 cores).
"""
from __future__ import annotations

import pytest
import torch

import emulate_ref as ref
from epreplay.launch import run_ranks

H, K, LPR = 256, 3, 4  # hidden, top-k, local experts per rank

SCENARIOS = [  # name, routing kwargs, payload kwargs, dispatch kwargs, fp8
    ("random", {}, {}, {}, False),
    ("x=rank", {}, {"const": True}, {}, False),
    ("fp8", {}, {}, {}, True),
    ("nowhere", {"nowhere": 5}, {}, {}, False),
    ("zero-recv-rank", {"skip_rank": "last"}, {"const": True}, {}, False),
    ("one-expert", {"one_expert": True}, {}, {}, False),
    ("alignment", {}, {}, {"expert_alignment": 4}, False),
    ("worst", {}, {}, {"num_worst_tokens": "max"}, False),
]


def _tokens(rank: int) -> int:
    return 23 + 6 * rank


def _scenario(buf, me: int, R: int, seed: int, name: str, rkw: dict, pkw: dict, dkw: dict, use_fp8: bool,
              fails: list[str]) -> None:
    E, L = LPR * R, LPR
    C = buf.get_dispatch_config(R).num_sms // 2
    rkw = dict(rkw)
    if rkw.get("skip_rank") == "last":
        rkw["skip_rank"] = R - 1
    idxs = [ref.routing(seed, r, _tokens(r), E, K, L=L, **rkw) for r in range(R)]
    xs = [ref.payload(seed, r, _tokens(r), H, **pkw) for r in range(R)]
    ws = [torch.rand(_tokens(r), K, generator=torch.Generator().manual_seed(seed * 7 + r)) for r in range(R)]
    idx, x, w, T = idxs[me], xs[me], ws[me], _tokens(me)

    def check(cond: bool, what: str) -> None:
        if not cond:
            fails.append(f"[{name}] rank {me}: {what}")

    want = ref.handle_ref(idxs, E, R, me, C)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
    check(per_rank.tolist() == want["layouts"][me][0], "num_tokens_per_rank != reference")
    check(per_expert.tolist() == want["layouts"][me][1], "num_tokens_per_expert != reference")
    check(in_rank.tolist() == want["in_rank"], "is_token_in_rank != reference")
    check(per_rdma is None, "num_tokens_per_rdma_rank must be None at <= 8 ranks")
    dkw = dict(dkw)
    total = sum(_tokens(r) for r in range(R))
    if dkw.get("num_worst_tokens") == "max":
        dkw["num_worst_tokens"] = total
    send = x
    if use_fp8:
        scales = torch.rand(T, H // 128, generator=torch.Generator().manual_seed(me)) + 0.5
        send = (x.float().clamp(-400, 400).to(torch.float8_e4m3fn), scales)
    rx, rti, rtw, lst, handle, event = buf.dispatch(send, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                    num_tokens_per_expert=per_expert, topk_idx=idx,
                                                    topk_weights=w, **dkw)
    rows = want["rows"]
    N = len(rows)
    worst = dkw.get("num_worst_tokens", 0)
    rx_v = rx[0] if use_fp8 else rx
    check(rx_v.shape[0] == (worst or N), f"recv_x has {rx_v.shape[0]} rows, expected {worst or N}")
    # DeepEP test invariant: N == all_reduce(num_tokens_per_rank)[me]
    check(N == sum(want["layouts"][s][0][me] for s in range(R)), "N != sum of num_tokens_per_rank[me]")
    for n, (s, t) in enumerate(rows):
        src = xs[s][t]
        if use_fp8:
            if not torch.equal(rx[0][n].view(torch.uint8), xs[s][t].float().clamp(-400, 400).to(
                    torch.float8_e4m3fn).view(torch.uint8)):
                check(False, f"fp8 row {n} != source {s} token {t}")
                break
        elif not torch.equal(rx_v[n], src):
            check(False, f"row {n} != source rank {s} token {t} (order: source rank, then token)")
            break
        if pkw.get("const") and not bool((rx_v[n].float() == s).all()):
            check(False, f"x=rank: row {n} holds {rx_v[n][0].item()} not {s}")
            break
    raw = [sum(want["layouts"][s][1][me * L + i] for s in range(R)) for i in range(L)]
    a = dkw.get("expert_alignment", 1)
    check(lst == ([] if worst else [(v + a - 1) // a * a for v in raw]), f"per-expert list {lst} != {raw} aligned {a}")
    exp_idx = torch.full((worst or N, K), -1, dtype=torch.int64)
    for n, (s, t) in enumerate(rows):
        for k in range(K):
            e = int(idxs[s][t, k])
            if me * L <= e < (me + 1) * L:
                exp_idx[n, k] = e - me * L
    check(torch.equal(rti, exp_idx), "recv_topk_idx != local ids (-1 elsewhere, tail -1)")
    for i in range(L):
        check(int((rti == i).sum()) == raw[i], f"count(recv_topk_idx == {i}) != list entry")
    rpm, cpm, rcpm, src_idx, h_in_rank, send_head = handle
    check(len(handle) == 6, "intranode handle must be a 6-tuple")
    check(rpm.dtype == torch.int32 and rpm.tolist() == want["rank_prefix_matrix"], "rank_prefix_matrix != ref")
    check(cpm.dtype == torch.int32 and cpm.tolist() == want["channel_prefix_matrix"], "channel_prefix_matrix != ref")
    check(rcpm.tolist() == want["recv_channel_prefix_matrix"], "recv_channel_prefix_matrix != ref")
    check(src_idx.dtype == torch.int32 and src_idx[:N].tolist() == [t for _, t in rows], "recv_src_idx != ref")
    check(h_in_rank.tolist() == want["in_rank"], "handle is_token_in_rank != ref")
    check(send_head.dtype == torch.int32 and send_head.tolist() == want["send_head"], "send_head != ref")
    # cached dispatch: same layout, another payload
    again = buf.dispatch(xs[me], handle=handle)
    check(again[1:5] == (None, None, None, None) and torch.equal(again[0][:N], torch.stack(
        [xs[s][t] for s, t in rows]) if N else again[0][:0]), "cached dispatch rows differ")
    # combine: plain sum over ranks; rows scaled by (me + 1) so the rank order of the sum matters
    y_in = (rx_v.float() if not use_fp8 else torch.stack([xs[s][t] for s, t in rows] + [
        torch.zeros(H, dtype=torch.bfloat16)] * ((worst or N) - N)).float()) * (me + 1)
    y_in = y_in.to(torch.bfloat16) if N or worst else torch.zeros(0, H, dtype=torch.bfloat16)
    b0 = ref.payload(seed + 1, me, T, H)
    b1 = ref.payload(seed + 2, me, T, H)
    y, yw, _ = buf.combine(y_in, handle, topk_weights=rtw, bias=(b0, b1))
    acc = b0.float() + b1.float()
    for r in range(R):
        mask = torch.tensor([want["in_rank"][t][r] for t in range(T)], dtype=torch.bool)
        acc[mask] += (x[mask].float() * (r + 1)).to(torch.bfloat16).float()
    check(torch.equal(y, acc.to(torch.bfloat16)), "combine numerics: not bf16(fp32 bias0+bias1+ranks ascending)")
    wref = torch.where(idx >= 0, w, torch.zeros_like(w))
    check(ref.calc_diff(yw, wref) < 1e-9 and torch.equal(yw, wref), "weights round trip failed")
    check(send_head.tolist() == ref.send_head_after_combine(want["send_head"], T, C),
          "send_head not rewritten by combine as DeepEP does")
    # DeepEP invariant: combine(dispatched x) / is_token_in_rank.sum(1) reproduces x
    y2, _, _ = buf.combine(rx_v if not use_fp8 else y_in, handle)
    cnt = in_rank.sum(1, keepdim=True).clamp_min(1).float()
    if not use_fp8:
        sent = in_rank.any(1)
        check(not sent.any() or ref.calc_diff(y2.float()[sent] / cnt[sent], x.float()[sent]) < 5e-6,
              "calc_diff(combine/count, x)")
        check(bool((y2[~sent] == 0).all()), "tokens routed nowhere must come back as zero")


def _normal_rank(ctx, seed: int, names: list[str]) -> list[str]:
    import torch.distributed as dist

    from epreplay.emulate import Buffer

    buf = Buffer(dist.group.WORLD, int(1e9), 0, timeout_s=60)
    fails: list[str] = []
    for name, rkw, pkw, dkw, fp in SCENARIOS:
        if name in names:
            _scenario(buf, ctx.rank, ctx.world_size, seed, name, rkw, pkw, dkw, fp, fails)
    return fails


ALL = [s[0] for s in SCENARIOS]


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_normal_invariants(ranks: int) -> None:
    out = run_ranks(_normal_rank, ranks, 11 + ranks, ALL, timeout=120)
    fails = [f for per_rank in out for f in per_rank]
    assert not fails, "\n".join(fails[:20])


@pytest.mark.slow
def test_normal_invariants_8_ranks() -> None:
    out = run_ranks(_normal_rank, 8, 5, ["random", "x=rank", "fp8", "zero-recv-rank", "worst"], timeout=180)
    fails = [f for per_rank in out for f in per_rank]
    assert not fails, "\n".join(fails[:20])


def test_static_helpers_match_deepep() -> None:
    from epreplay.emulate import Buffer, Config, EventOverlap

    # DeepEP's LowLatencyLayout for M=128, H=7168, 8 ranks, 256 experts, worked out by hand:
    # 2 x 477102080 (send) + 2 x 477102080 (recv) + 2 x 1024 (signals), aligned up past 128
    assert Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256) == 1908410496
    cfg = Buffer.get_dispatch_config(8)
    assert (cfg.num_sms, cfg.num_max_nvl_chunked_send_tokens, cfg.num_max_nvl_chunked_recv_tokens) == (20, 6, 256)
    assert Buffer.get_combine_config(16).num_max_rdma_chunked_send_tokens == 12
    with pytest.raises(ValueError):
        Config(20, 300, 256, 6, 128)  # send chunk must be below the recv chunk, as DeepEP asserts
    old = Buffer.num_sms
    try:
        Buffer.set_num_sms(24)
        assert Buffer.get_dispatch_config(4).num_sms == 24
        with pytest.raises(AssertionError):
            Buffer.set_num_sms(7)
    finally:
        Buffer.set_num_sms(old)
    ev = Buffer.capture()
    assert isinstance(ev, EventOverlap) and ev.event is not None
    ev.current_stream_wait()
    with ev:
        pass
    with pytest.raises(AssertionError):
        EventOverlap(None).current_stream_wait()  # as DeepEP: a synchronous call has no event
