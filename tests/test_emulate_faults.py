"""Test-only fault injection in the emulated Buffer: off by default, each kind does what it says."""
from __future__ import annotations

import json
import time

import torch

from epreplay.launch import run_ranks

E, H, K, T = 8, 256, 2, 10


def _fault_rank(ctx) -> dict:
    import os

    import torch.distributed as dist

    from epreplay.emulate import faults
    from epreplay.emulate import Buffer

    me = ctx.rank
    # the environment alone must do nothing
    os.environ[faults.ENV] = json.dumps({"kind": "swap_rows", "rank": 1, "op": "dispatch", "call": 6})
    buf = Buffer(dist.group.WORLD, timeout_s=30)
    ll = Buffer(dist.group.WORLD, low_latency_mode=True, timeout_s=30, ll_order_seed=-1)
    g = torch.Generator().manual_seed(me)
    idx = torch.rand(T, E, generator=g).topk(K, dim=1).indices
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    n_rank, _, n_exp, in_rank, _ = buf.get_dispatch_layout(idx, E)

    def dispatch():
        return buf.dispatch(x, num_tokens_per_rank=n_rank, is_token_in_rank=in_rank, num_tokens_per_expert=n_exp,
                            topk_idx=idx, topk_weights=torch.ones(T, K))

    base = dispatch()  # call 0
    faults.install([faults.Fault("drop_token", rank=1, op="dispatch", call=1, row=2),
                    faults.Fault("swap_rows", rank=1, op="dispatch", call=2, row=0, row2=3),
                    faults.Fault("flip_bit", rank=1, op="dispatch", call=3, row=1, bit=9),
                    faults.Fault("delay", rank=1, op="dispatch", call=4, delay_s=1.0),
                    faults.Fault("drop_token", rank=1, op="ll_dispatch", call=1)])
    dropped, swapped, flipped = dispatch(), dispatch(), dispatch()
    t0 = time.monotonic()
    dispatch()
    delay_wait = time.monotonic() - t0
    unarmed = dispatch()  # call 5
    armed = faults.arm()
    after_arm = dispatch()  # call 6: the env fault fires now
    ll_base = ll.low_latency_dispatch(x, idx, 16, E, use_fp8=False)
    ll_drop = ll.low_latency_dispatch(x, idx, 16, E, use_fp8=False)
    rx = base[0]
    return {
        "drop_rows": (rx.shape[0], dropped[0].shape[0]),
        "drop_same_rest": bool(torch.equal(torch.cat([rx[:2], rx[3:]]), dropped[0])) if me == 1 else None,
        "swap": bool(torch.equal(swapped[0][0], rx[3]) and torch.equal(swapped[0][3], rx[0])
                     and torch.equal(swapped[4][3], base[4][3])),  # recv_src_idx unchanged
        "flip_bits": int((flipped[0].view(torch.int16) ^ rx.view(torch.int16)).ne(0).sum()),
        "flip_where": (flipped[0].view(torch.int16) ^ rx.view(torch.int16))[1, 0].item(),
        "delay_wait": delay_wait,
        "unarmed_same": bool(torch.equal(unarmed[0], rx)),
        "armed": len(armed),
        "after_arm_same": bool(torch.equal(after_arm[0], rx)),
        "ll_counts": (int(ll_base[1].sum()), int(ll_drop[1].sum())),
        "fired": [(f["kind"], f["op"], f["call"]) for f in faults.fired()],
    }


def test_faults_fire_where_asked_and_only_there() -> None:
    r0, r1 = run_ranks(_fault_rank, 2, timeout=120)
    assert r0["fired"] == [] and r0["drop_rows"][0] == r0["drop_rows"][1] and r0["unarmed_same"]
    assert r0["delay_wait"] >= 0.9, "rank 0 waits for the delayed rank 1 inside the collective"
    assert r1["drop_rows"][1] == r1["drop_rows"][0] - 1 and r1["drop_same_rest"]
    assert r1["swap"] and not r0["swap"]
    assert r1["flip_bits"] == 1 and r1["flip_where"] == 1 << 9 and r0["flip_bits"] == 0
    assert r1["unarmed_same"], "EPREPLAY_FAULTS alone must not enable anything"
    assert r1["armed"] == 1 and not r1["after_arm_same"] and r0["after_arm_same"]
    assert r1["ll_counts"][1] == r1["ll_counts"][0] - 1 and r0["ll_counts"][0] == r0["ll_counts"][1]
    assert [k for k, _, _ in r1["fired"]] == ["drop_token", "swap_rows", "flip_bit", "delay", "swap_rows", "drop_token"]
