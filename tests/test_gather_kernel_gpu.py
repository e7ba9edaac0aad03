"""The compiled hook's gather launch with fingerprinted rows (capture/gather_kernel.py,
epreplay_gather_hash), launched here as _hookx.cpp launches it: the copies land byte for byte
and every row's fingerprint and non-finite mark equal the reference's (epreplay.format.fingerprint),
for the shapes capture hashes: [T, H] rows, FP8 pairs (scales as whole lanes and padded), and
low-latency buffers [L, X, H] with counts from recv_count (int32, int64) or layout_range."""
from __future__ import annotations

import ctypes

import pytest
import torch

from epreplay.format import fingerprint as ref

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SEGS, JOBS = 24, 4


class Gather(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64 * SEGS),
                ("off", ctypes.c_uint64 * (SEGS + 1)), ("n", ctypes.c_int32), ("per_seg", ctypes.c_int32)]


class Hash(ctypes.Structure):
    _fields_ = [(f, ctypes.c_uint64) for f in ("a", "b", "counts", "fp", "nf", "a_exp", "a_lo", "a_hi",
                                               "b_exp", "b_lo", "b_hi", "n_words")] + \
               [(f, ctypes.c_int32) for f in ("a_K", "b_W", "b_bits", "L", "X", "cmode", "R",
                                              "per_group", "block0")]


class GatherHash(ctypes.Structure):
    _fields_ = [("g", Gather), ("h", Hash * JOBS), ("nh", ctypes.c_int32), ("copy_blocks", ctypes.c_int32)]


def _masks(dtype: torch.dtype) -> tuple[int, int, int]:
    word = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00, torch.float32: 0x7F800000}.get(dtype, 0)
    bits = 8 * torch.empty((), dtype=dtype).element_size()
    if not word:
        return 0, 0, 0
    rep = lambda w: sum(w << (bits * i) for i in range(64 // bits))  # noqa: E731
    return rep(word), rep(1), rep(1 << (bits - 1))


def _launch(copies: list[torch.Tensor], jobs: list[dict], shift: int, per_seg: bool = True) -> tuple[torch.Tensor, list]:
    """Launch once: `copies` then each job's fp [n] int64 and marks [n] int8, back to back from
    byte `shift` of a fresh buffer (odd shifts: unaligned places, as in the device ring).
    per_seg: blocks of their own for each segment, as _hookx.cpp launches; else every block
    strides over every segment."""
    from epreplay.capture import gather_kernel

    func, launch = gather_kernel.load(torch.device("cuda", 0), gather_kernel.GATHER_HASH)
    a = GatherHash()
    outs, off = [], 0
    segs = [(t, None) for t in copies]
    for j in jobs:
        segs += [(None, (j, "fp")), (None, (j, "nf"))]
    for k, (t, part) in enumerate(segs):
        a.g.off[k] = off
        if t is not None:
            a.g.src[k] = t.data_ptr()
            outs.append(("copy", t, off))
            off += t.nbytes
        else:
            j, which = part
            setattr(j["h"], which, off)
            n = j["h"].L * j["h"].X
            outs.append((which, j, off))
            off += n * (8 if which == "fp" else 1)
    a.g.n, a.g.off[len(segs)] = len(segs), off
    buf = torch.full((shift + off + 16,), 0xAB, dtype=torch.uint8, device="cuda")
    a.g.dst = buf.data_ptr() + shift
    copied = sum(t.nbytes for t in copies)
    if per_seg:  # _hookx.cpp's raw_gather
        most = max((t.nbytes for t in copies), default=0)
        per = min(264, max(1, (most // 16 + 255) // 256)) if copied else 0
        if per * len(segs) > 1024:
            per = max(1, 1024 // len(segs))
        a.g.per_seg, a.copy_blocks = per, per * len(segs)
    else:
        a.copy_blocks = min(264, max(1, (copied // 16 + 255) // 256)) if copied else 0
    blocks = a.copy_blocks
    for i, j in enumerate(jobs):
        j["h"].block0 = blocks
        a.h[i] = j["h"]
        blocks += j["h"].L * j["h"].per_group
    a.nh = len(jobs)
    params = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.pointer(a), ctypes.c_void_p))
    fn = ctypes.CFUNCTYPE(ctypes.c_int, *([ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3))(launch)
    rc = fn(func, blocks, 1, 1, 256, 1, 1, 0, torch.cuda.current_stream().cuda_stream, params, None)
    assert rc == 0
    torch.cuda.synchronize()
    return buf[shift:shift + off].cpu(), outs


def _job(x, scales=None, counts=None, cmode=0, per_group=None) -> dict:
    h = Hash()
    H = x.shape[-1]
    h.a, h.a_K, h.n_words = x.data_ptr(), H * x.element_size() // 8, H
    h.a_exp, h.a_lo, h.a_hi = _masks(x.dtype)
    h.L, h.X = (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, x.shape[0])
    if scales is not None:
        h.b, h.b_W, h.b_bits = scales.data_ptr(), scales.shape[-1], 8 * scales.element_size()
        h.n_words += scales.shape[-1]
        h.b_exp, h.b_lo, h.b_hi = _masks(scales.dtype)
    if counts is not None:
        h.counts, h.cmode = counts.data_ptr(), cmode
        h.R = counts.shape[1] if cmode == 2 else 0
    h.per_group = per_group or max(1, min(-(-2048 // h.L), h.X))
    return {"h": h, "x": x, "scales": scales, "counts": counts, "cmode": cmode}


def _expected(j: dict) -> tuple[torch.Tensor, torch.Tensor]:
    x, s, c = j["x"].cpu(), j["scales"], j["counts"]
    rows = (x, s.cpu()) if s is not None else x
    if c is None:
        flat = rows if x.dim() == 2 else ((x.flatten(0, 1), s.cpu().flatten(0, 1)) if s is not None else x.flatten(0, 1))
        return ref.fingerprint_rows(flat, version=2), ~ref.rows_finite(flat)
    counts_L = c.cpu() if j["cmode"] != 2 else (c.cpu() & 0xFFFFFFFF).sum(dim=1)
    fp = ref.fingerprint_rows(rows, version=2, valid_counts_L=counts_L)
    return fp, ~ref.rows_finite(rows, valid_counts_L=counts_L)


def _check(copies, jobs, shift, per_seg=True):
    got, outs = _launch(copies, jobs, shift, per_seg)
    for kind, obj, off in outs:
        if kind == "copy":
            assert torch.equal(got[off:off + obj.nbytes], obj.reshape(-1).view(torch.uint8).cpu())
            continue
        fp, bad = _expected(obj)
        n = fp.numel()
        if kind == "fp":
            assert torch.equal(got[off:off + 8 * n].clone().view(torch.int64), fp)
        else:
            assert torch.equal(got[off:off + n].bool(), bad.reshape(-1))


@pytest.mark.parametrize("per_seg", [True, False])
@pytest.mark.parametrize("shift", [0, 3])
def test_many_copies_land_byte_for_byte(shift, per_seg):
    """A call's arrays as the hook gathers them: small ones of every alignment beside a large
    one, with blocks of their own per segment (the hook's launch) or shared."""
    g = torch.Generator(device="cuda").manual_seed(6)
    big = torch.randint(0, 256, (4096, 8), device="cuda", generator=g, dtype=torch.int64)  # 256 KiB
    small = [torch.randint(0 if dt == torch.uint8 else -9, 9, (n,), device="cuda", generator=g, dtype=dt)
             for n, dt in ((7, torch.int32), (256, torch.int64), (3, torch.uint8), (1024, torch.float32),
                           (129, torch.int16), (1, torch.int64))]
    _check([small[0], big, *small[1:]], [], shift, per_seg)


@pytest.mark.parametrize("shift", [0, 3])
def test_rows_and_copies_in_one_launch_equal_the_reference(shift):
    g = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(128, 7168, device="cuda", generator=g).to(torch.bfloat16)
    x[5, 100] = float("nan")
    x[77, 7167] = float("inf")
    big = torch.randn(300, 512, device="cuda", generator=g)  # fp32, more rows than blocks per group
    idx = torch.randint(0, 256, (128, 8), device="cuda", generator=g, dtype=torch.int64)
    odd = torch.arange(7, dtype=torch.int32, device="cuda")  # puts later places off alignment
    _check([idx, odd], [_job(x), _job(big, per_group=64)], shift)


def test_fp8_pairs_with_whole_and_padded_scale_lanes():
    g = torch.Generator(device="cuda").manual_seed(8)
    x = torch.randn(24, 7168, device="cuda", generator=g).to(torch.float8_e4m3fn)
    s56 = torch.rand(24, 56, device="cuda", generator=g)
    s56[3, 10] = float("nan")
    x128 = torch.randn(24, 128, device="cuda", generator=g).to(torch.float8_e4m3fn)
    s1 = torch.rand(24, 1, device="cuda", generator=g)
    _check([], [_job(x, s56), _job(x128, s1)], 1)


def test_low_latency_buffers_hash_only_their_valid_rows():
    g = torch.Generator(device="cuda").manual_seed(9)
    L, X, H = 16, 96, 7168
    x = torch.randn(L, X, H, device="cuda", generator=g).to(torch.bfloat16)
    x[2, 50:] = float("nan")  # past the count below: never read, no mark
    counts = torch.randint(0, X + 1, (L,), device="cuda", generator=g, dtype=torch.int32)
    counts[2], counts[3] = 50, X + 5  # a count past X hashes all X rows
    lr = torch.randint(0, 8, (L, 4), device="cuda", generator=g, dtype=torch.int64) | (123 << 32)
    x8 = x.to(torch.float8_e4m3fn)
    s = torch.rand(L, X, 56, device="cuda", generator=g)
    _check([counts], [_job(x, counts=counts, cmode=1), _job(x, counts=counts.long(), cmode=3),
                      _job(x, counts=lr, cmode=2), _job(x8, s, counts=counts, cmode=1)], 5)
