"""The emulated Buffer under a client's default device and dtype, and its fixed-shape LL path.

DeepEP's own tests call torch.set_default_device('cuda') and torch.set_default_dtype(bfloat16)
before using the Buffer; every tensor the emulation makes must follow its inputs' device, never
the default. Here the calls run with the default device set to 'meta' (a leaked default-device
tensor cannot be mixed with CPU ones, nor read) and the default dtype set to float64 or bfloat16,
and must return exactly what they return without. The fixed-shape low-latency path (the one a
CUDA graph capture takes, forced here with EPREPLAY_LL_STATIC=1) must return exactly what the
dynamic path returns with ll_order_seed=-1. Real processes, gloo.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

import emulate_ref as ref
from epreplay.launch import run_ranks

H, K, LPR, M = 512, 4, 3, 16
LL_CASES = [  # low_latency_dispatch keyword arguments
    {"use_fp8": False},
    {"use_fp8": True},
    {"use_fp8": True, "round_scale": True, "use_ue8m0": True},
    {"use_fp8": False, "return_recv_hook": True},
]


@contextlib.contextmanager
def foreign_defaults(dtype: torch.dtype):
    """Default device 'meta' and default dtype `dtype` inside the block (as a client may set them)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def static_path(on: bool):
    old = os.environ.pop("EPREPLAY_LL_STATIC", None)
    if on:
        os.environ["EPREPLAY_LL_STATIC"] = "1"
    try:
        yield
    finally:
        os.environ.pop("EPREPLAY_LL_STATIC", None)
        if old is not None:
            os.environ["EPREPLAY_LL_STATIC"] = old


def _valid_rows(t: torch.Tensor, count: torch.Tensor) -> list[torch.Tensor]:
    """Rows past recv_count are unspecified (as DeepEP's): compare only the first count[e] per expert."""
    t = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
    return [t[e, :int(n)].contiguous() for e, n in enumerate(count.tolist())]


def _ll_results(buf, x, idx, w, E: int, dkw: dict, ctx) -> list[torch.Tensor]:
    """ctx: a callable giving a fresh context manager to run the Buffer calls in."""
    stats = torch.zeros(E // buf.group_size, dtype=torch.int32)
    with ctx():
        recv, count, handle, _, hook = buf.low_latency_dispatch(x, idx, M, E, cumulative_local_expert_recv_stats=stats,
                                                                **dkw)
        if hook is not None:
            hook()
    values = recv[0] if dkw["use_fp8"] else recv
    y_in = values.float().nan_to_num().to(torch.bfloat16) if dkw["use_fp8"] else values
    with ctx():
        y, _, hook = buf.low_latency_combine(y_in, idx, w, handle, return_recv_hook=bool(hook))
        if hook is not None:
            hook()
    out = [count, stats, handle[1], y, *_valid_rows(values, count), *_valid_rows(handle[0], count)]
    if dkw["use_fp8"]:
        out += _valid_rows(recv[1], count)
    return out


def _normal_results(buf, x, idx, w, E: int, ctx) -> list[torch.Tensor]:
    with ctx():
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, E)
        out: list[torch.Tensor] = [per_rank, per_expert, in_rank]
        for fp8 in (False, True):
            xin = (x.to(torch.float8_e4m3fn), torch.ones(x.shape[0], H // 128, dtype=torch.float32,
                                                         device="cpu")) if fp8 else x
            rx, rti, rtw, counts, handle, _ = buf.dispatch(xin, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                           num_tokens_per_expert=per_expert, topk_idx=idx,
                                                           topk_weights=w)
            rx0 = rx[0].view(torch.uint8) if fp8 else rx
            out += [rx0, rti, rtw, torch.tensor(counts, device="cpu"), *handle]
            cached, _, _, _, _, _ = buf.dispatch(xin, handle=handle)
            out.append(cached[0].view(torch.uint8) if fp8 else cached)
            y, yw, _ = buf.combine(rx if not fp8 else rx0.view(torch.float8_e4m3fn).float().to(torch.bfloat16),
                                   handle, topk_weights=rtw)
            out += [y, yw, handle[5]]
    return out


def _rank(ctx) -> list[str]:
    import torch.distributed as dist

    from epreplay.emulate import Buffer

    R, me = ctx.world_size, ctx.rank
    group = dist.new_group(list(range(R)))
    E = LPR * R
    T = 9 + 3 * me
    idx = ref.routing(5, me, T, E, K, L=LPR)
    x = ref.payload(5, me, T, H)
    w = torch.rand(T, K, generator=torch.Generator().manual_seed(me))
    fails = []

    def compare(name: str, a: list, b: list) -> None:
        if len(a) != len(b) or not all(torch.equal(p, q) for p, q in zip(a, b)):
            bad = [i for i, (p, q) in enumerate(zip(a, b)) if not torch.equal(p, q)]
            fails.append(f"rank {me}: {name}: outputs {bad} differ")

    plain = contextlib.nullcontext
    for dtype in (torch.float64, torch.bfloat16):
        a, b = Buffer(group, low_latency_mode=True), Buffer(group, low_latency_mode=True)
        for dkw in LL_CASES:  # the seeded shuffle path: host generator, explicit dtype
            compare(f"ll {dkw} default dtype {dtype}", _ll_results(a, x, idx, w, E, dkw, plain),
                    _ll_results(b, x, idx, w, E, dkw, lambda: foreign_defaults(dtype)))
        compare(f"normal, default dtype {dtype}", _normal_results(Buffer(group), x, idx, w, E, plain),
                _normal_results(Buffer(group), x, idx, w, E, lambda: foreign_defaults(dtype)))
    dyn = Buffer(group, low_latency_mode=True, ll_order_seed=-1)
    fixed, fixed_foreign = Buffer(group, low_latency_mode=True), Buffer(group, low_latency_mode=True)
    for dkw in LL_CASES:
        want = _ll_results(dyn, x, idx, w, E, dkw, plain)
        compare(f"fixed-shape ll {dkw}", want, _ll_results(fixed, x, idx, w, E, dkw, lambda: static_path(True)))
        with static_path(True):
            got = _ll_results(fixed_foreign, x, idx, w, E, dkw, lambda: foreign_defaults(torch.bfloat16))
        compare(f"fixed-shape ll {dkw} under foreign defaults", want, got)
    return fails


@pytest.mark.parametrize("world", [1, 2])
def test_foreign_default_device_and_dtype_change_nothing(world: int) -> None:
    fails = [f for r in run_ranks(_rank, world, timeout=180) for f in r]
    assert not fails, "\n".join(fails)


def _misuse_rank(ctx) -> str:
    import torch.distributed as dist

    from epreplay.emulate import Buffer, EmulatedDeepEPError

    group = dist.new_group([0])
    buf = Buffer(group, low_latency_mode=True)
    x = torch.zeros(4, H, dtype=torch.bfloat16)
    idx = torch.zeros(4, K, dtype=torch.int64)
    _, _, handle, _, _ = buf.low_latency_dispatch(x, idx, M, LPR, use_fp8=False)  # dynamic path's handle
    with static_path(True):
        try:
            buf.low_latency_combine(torch.zeros(LPR, M, H, dtype=torch.bfloat16), idx,
                                    torch.ones(4, K, dtype=torch.float32), handle)
        except EmulatedDeepEPError as exc:
            return str(exc)
    return "no error"


def test_fixed_shape_combine_names_a_dynamic_handle() -> None:
    msg = run_ranks(_misuse_rank, 1)[0]
    assert "capture the low_latency_dispatch in the graph too" in msg, msg


def _meta_rank(ctx) -> str:
    """The fixed-shape path on meta tensors: any read-back (.item(), .tolist(), bool(), nonzero,
    bincount's size) fails on meta, as a host sync fails inside a CUDA graph capture."""
    import torch.distributed as dist

    from epreplay.emulate import Buffer

    buf = Buffer(dist.new_group([0]), low_latency_mode=True)
    T, E = 12, 2 * LPR
    x = torch.empty(T, H, dtype=torch.bfloat16, device="meta")
    idx = torch.empty(T, K, dtype=torch.int64, device="meta")
    w = torch.empty(T, K, dtype=torch.float32, device="meta")
    stats = torch.empty(E, dtype=torch.int32, device="meta")
    with static_path(True):
        for dkw in LL_CASES:
            recv, count, handle, _, hook = buf.low_latency_dispatch(
                x, idx, M, E, cumulative_local_expert_recv_stats=stats,
                **{"return_recv_hook": True, **dkw})
            hook()
            y_in = recv[0].to(torch.bfloat16) if dkw["use_fp8"] else recv
            y, _, hook = buf.low_latency_combine(y_in, idx, w, handle, return_recv_hook=True)
            hook()
            assert y.shape == (T, H) and count.shape == (E,) and y.device.type == "meta"
    return "ok"


def test_fixed_shape_path_reads_nothing_back_to_the_host() -> None:
    assert run_ranks(_meta_rank, 1) == ["ok"]
