"""Misuse of the emulated Buffer: a clear error naming the argument and rank, on EVERY rank, no hang.

One 2-rank group walks through every misuse in turn: because every rank raises at the same point,
the group stays in step and the next call works. A timeout case and the "no process left behind"
check use real process ids.
"""
from __future__ import annotations

import os
import re
import time

import pytest
import torch

from epreplay.launch import RankFailed, run_ranks

E, H, K, T = 8, 256, 2, 12


def _route(rank: int, experts: int = E) -> torch.Tensor:
    g = torch.Generator().manual_seed(rank)
    return torch.rand(T, experts, generator=g).topk(K, dim=1).indices


def _misuse_rank(ctx) -> list[tuple[str, str]]:
    import torch.distributed as dist

    from epreplay.emulate import Buffer, EmulatedDeepEPError

    me = ctx.rank
    buf = Buffer(dist.group.WORLD, timeout_s=30)
    other = Buffer(dist.group.WORLD, timeout_s=30)
    ll = Buffer(dist.group.WORLD, low_latency_mode=True, timeout_s=30)
    small = Buffer(dist.group.WORLD, num_nvl_bytes=128 * 1000, timeout_s=30)
    ll_small = Buffer(dist.group.WORLD, 0, 128 * 100, low_latency_mode=True, timeout_s=30)
    idx, w = _route(me), torch.rand(T, K)
    x = torch.randn(T, H).to(torch.bfloat16)
    n_rank, _, n_exp, in_rank, _ = buf.get_dispatch_layout(idx, E)
    layout = dict(num_tokens_per_rank=n_rank, is_token_in_rank=in_rank, num_tokens_per_expert=n_exp)
    _, _, rw, _, h_other, _ = other.dispatch(x, topk_idx=idx, topk_weights=w, **layout)
    rx, _, _, _, h_a, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, **layout)
    rx_b, _, _, _, h_b, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, **layout)
    cases = {
        "M differs": lambda: ll.low_latency_dispatch(x, idx, 32 if me == 0 else 16, E, use_fp8=False),
        "T > M": lambda: ll.low_latency_dispatch(x if me == 1 else x[:4], idx if me == 1 else idx[:4], 8, E),
        "topk without weights": lambda: buf.dispatch(x, topk_idx=idx, topk_weights=None if me == 0 else w, **layout),
        "foreign handle": lambda: buf.combine(rx, h_other if me == 1 else h_a),
        "handles of different dispatches": lambda: buf.combine(rx if me == 0 else rx_b, h_a if me == 0 else h_b),
        "topk_idx dtype": lambda: buf.dispatch(x, topk_idx=idx.int() if me == 1 else idx, topk_weights=w, **layout),
        "x dtype": lambda: buf.dispatch(x.float() if me == 0 else x, topk_idx=idx, topk_weights=w, **layout),
        "hidden differs": lambda: buf.dispatch(x[:, :128].contiguous() if me == 1 else x, topk_idx=idx,
                                               topk_weights=w, **layout),
        "combine rows": lambda: buf.combine(rx[1:] if me == 1 else rx, h_a),
        "ops differ": lambda: (buf.dispatch(x, topk_idx=idx, topk_weights=w, **layout) if me == 0
                               else buf.combine(rx, h_a)),
        "LL on a normal buffer": lambda: buf.low_latency_dispatch(x, idx, 32, E),
        "NVL bytes too small": lambda: small.dispatch(x, topk_idx=idx, topk_weights=w, **layout),
        "RDMA bytes too small": lambda: ll_small.low_latency_dispatch(x, idx, 16, E),
        "expert id out of range": lambda: buf.dispatch(x, topk_idx=idx + (E if me == 1 else 0), topk_weights=w, **layout),
    }
    seen = []
    for name, call in cases.items():
        try:
            call()
            seen.append((name, "NO ERROR"))
        except EmulatedDeepEPError as exc:
            seen.append((name, str(exc)))
    # still in step: a correct dispatch/combine works after all of that
    rx2, _, _, _, h2, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, **layout)
    y, _, _ = buf.combine(rx2, h2)
    seen.append(("after", "ok" if torch.allclose(y.float(), x.float() * in_rank.sum(1, keepdim=True)) else "bad"))
    return seen


EXPECT = {  # case -> (rank named, words the message must contain)
    "M differs": (None, ["num_max_dispatch_tokens_per_rank", "rank 0: 32", "rank 1: 16"]),
    "T > M": (1, ["argument x", "12 tokens > num_max_dispatch_tokens_per_rank=8"]),
    "topk without weights": (0, ["topk_idx and topk_weights"]),
    "foreign handle": (1, ["argument handle", "another Buffer"]),
    "handles of different dispatches": (None, ["handle", "differs"]),
    "topk_idx dtype": (1, ["argument topk_idx", "torch.int32"]),
    "x dtype": (0, ["argument x", "torch.float32"]),
    "hidden differs": (None, ["hidden", "rank 0: 256", "rank 1: 128"]),
    "combine rows": (1, ["argument x", "shape"]),
    "ops differ": (None, ["operation differs", "dispatch", "combine"]),
    "LL on a normal buffer": (0, ["low_latency_mode=False"]),
    "expert id out of range": (1, ["argument topk_idx", "expert ids"]),
    "NVL bytes too small": (None, ["num_nvl_bytes=128000 is too small", "rank 0:", "rank 1:"]),
    "RDMA bytes too small": (None, ["num_rdma_bytes=12800 is too small", "get_low_latency_rdma_size_hint"]),
}


def test_every_misuse_raises_on_every_rank() -> None:
    out = run_ranks(_misuse_rank, 2, timeout=120)
    for rank, seen in enumerate(out):
        got = dict(seen)
        assert got.pop("after") == "ok", f"rank {rank}: the group is out of step after the misuse calls"
        for name, (named, words) in EXPECT.items():
            text = got[name]
            assert text != "NO ERROR", f"rank {rank}: {name}: no error raised"
            if named is not None:
                assert f"rank {named}:" in text, f"rank {rank}: {name}: does not name rank {named}: {text}"
            for word in words:
                assert word in text, f"rank {rank}: {name}: {word!r} missing from: {text}"


def _raise_rank(ctx, pid_dir: str) -> None:
    import torch.distributed as dist

    from epreplay.emulate import Buffer

    open(os.path.join(pid_dir, str(os.getpid())), "w").close()
    buf = Buffer(dist.group.WORLD, timeout_s=30)
    idx = _route(ctx.rank, 12)
    n_rank, _, n_exp, in_rank, _ = buf.get_dispatch_layout(idx, 12)
    buf.dispatch(torch.zeros(T, H, dtype=torch.bfloat16), num_tokens_per_rank=n_rank, is_token_in_rank=in_rank,
                 num_tokens_per_expert=n_exp, topk_idx=idx, topk_weights=None if ctx.rank == 2 else torch.rand(T, K))


def _gone(pid_dir: str) -> list[int]:
    alive = []
    for name in os.listdir(pid_dir):
        try:
            os.kill(int(name), 0)
            alive.append(int(name))
        except ProcessLookupError:
            pass
    return alive


def test_error_reaches_all_ranks_and_no_process_remains(tmp_path) -> None:
    with pytest.raises(RankFailed) as info:
        run_ranks(_raise_rank, 3, str(tmp_path), timeout=60, wait_all=True)
    assert sorted(info.value.errors) == [0, 1, 2]
    for rank, text in info.value.errors.items():
        assert "rank 2: arguments topk_idx and topk_weights" in text, f"rank {rank}: {text[-400:]}"
    assert len(os.listdir(tmp_path)) == 3 and not _gone(str(tmp_path))


def _late_rank(ctx, pid_dir: str) -> float:
    import torch.distributed as dist

    from epreplay.emulate import faults
    from epreplay.emulate import Buffer

    open(os.path.join(pid_dir, str(os.getpid())), "w").close()
    faults.install(faults.Fault("hang", rank=1, op="combine", call=0))
    buf = Buffer(dist.group.WORLD)  # the 3 s limit comes from EPREPLAY_EMULATE_TIMEOUT_S
    idx = _route(ctx.rank)
    n_rank, _, n_exp, in_rank, _ = buf.get_dispatch_layout(idx, E)
    rx, _, _, _, h, _ = buf.dispatch(torch.zeros(T, H, dtype=torch.bfloat16), num_tokens_per_rank=n_rank,
                                     is_token_in_rank=in_rank, num_tokens_per_expert=n_exp)
    t0 = time.monotonic()
    try:
        buf.combine(rx, h)  # rank 1 never arrives
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"after {time.monotonic() - t0:.1f}s: {type(exc).__name__}: {exc}") from None
    return time.monotonic() - t0


def test_missing_rank_times_out_with_deepep_text(tmp_path) -> None:
    t0 = time.monotonic()
    with pytest.raises(RankFailed) as info:
        run_ranks(_late_rank, 2, str(tmp_path), timeout=60, env={"EPREPLAY_EMULATE_TIMEOUT_S": "3"})
    text = info.value.errors[0]
    assert "timeout" in text and "EmulatedTimeout" in text and "limit 3 s" in text, text[-600:]
    waited = float(re.search(r"RuntimeError: after ([0-9.]+)s:", text).group(1))
    assert 2.5 <= waited <= 15, f"rank 0 waited {waited}s with timeout_s=3"
    assert time.monotonic() - t0 < 50
    assert not _gone(str(tmp_path)), "a hung rank was left behind"
