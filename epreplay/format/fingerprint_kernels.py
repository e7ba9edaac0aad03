"""The Triton kernels of the token fingerprint (imported only by epreplay.format.fingerprint_gpu, and only
where Triton is installed: this module imports it at the top, as @triton.jit helpers must be
module globals for the kernels that call them).

Legend: T rows, K 64-bit lanes per row, P programs per row, X rows per group.

Constants are epreplay.format.fingerprint's: SEED 0x9E3779B97F4A7C15, SEED2 0xD1B54A32D192ED03,
PMUL 0xC2B2AE3D27D4EB4F and mix's multipliers (literals: a kernel cannot read Python globals).
The host side, with the launch geometry and the why, is epreplay/format/fingerprint_gpu.py.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fp1_partial(x_ptr, out_ptr, H, stride_t, start, mask_bits, P,
                BLOCK: tl.constexpr, NITER: tl.constexpr):
    """Version 1: the partial sum [T, P] of BLOCK * NITER words of row t from column block p."""
    t = tl.program_id(0)
    p = tl.program_id(1)
    acc = tl.zeros([BLOCK], dtype=tl.uint64)
    base = p * BLOCK * NITER
    for i in tl.static_range(NITER):
        cols = base + i * BLOCK + tl.arange(0, BLOCK)
        valid = cols < H
        w = tl.load(x_ptr + t.to(tl.int64) * stride_t + cols, mask=valid, other=0)
        w64 = w.to(tl.int64) & mask_bits  # zero-extend the signed view
        j = (cols + start).to(tl.int64)
        z = ((j << 32) | w64).to(tl.uint64, bitcast=True)
        z = z ^ 0x9E3779B97F4A7C15
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        z = z ^ (z >> 31)
        acc += tl.where(valid, z, 0)
    tl.store(out_ptr + t.to(tl.int64) * P + p, tl.sum(acc, axis=0))


@triton.jit
def _mix(z):
    """splitmix64's finalizer on uint64."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _lanes(ptr, row, k, W, sw, PER: tl.constexpr, BITS: tl.constexpr):
    """[BLOCK] uint64: lanes k of the row starting at element `row` (0 past its end)."""
    if PER == 1:  # ptr is an int64 view: W lanes, contiguous
        lane = tl.load(ptr + row + k, mask=k < W, other=0).to(tl.uint64, bitcast=True)
    else:  # ptr holds W words of BITS bits, sw apart, PER to a lane: pack them little-endian
        i = tl.arange(0, PER)
        col = k[:, None] * PER + i[None, :]
        w = tl.load(ptr + row + col.to(tl.int64) * sw, mask=col < W, other=0)
        w = (w.to(tl.int64) & ((1 << BITS) - 1)).to(tl.uint64, bitcast=True)  # zero-extend
        lane = tl.sum(w << (i[None, :] * BITS).to(tl.uint64), axis=1)  # disjoint bits: sum = or
    return lane


@triton.jit
def _nonfinite(lane, EXP: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr):
    """Nonzero iff some word of the lane has all its exponent bits set (NaN/inf). EXP, LO, HI:
    the word's exponent mask, 1 and its top bit, replicated over the lane's words."""
    e = (lane & EXP) ^ EXP  # a word of e is 0 iff its exponent is all ones
    # has-zero-word, (e - LO) & ~e & HI, with ~e & HI spelled (e ^ HI) & HI: nonzero iff some
    # word of e is 0, exactly
    return (e - LO) & (e ^ HI) & HI


@triton.jit(do_not_specialize=["n_words"])
def fp2_rows(out_ptr, nf_ptr, counts_ptr, a_ptr, b_ptr, X, P, span, n_words,
             a_W, a_K, a_sg, a_sx, a_sw, b_W, b_K, b_sg, b_sx, b_sw,
             A_PER: tl.constexpr, A_BITS: tl.constexpr, A_EXP: tl.constexpr,
             A_LO: tl.constexpr, A_HI: tl.constexpr,
             B_PER: tl.constexpr, B_BITS: tl.constexpr, B_EXP: tl.constexpr,
             B_LO: tl.constexpr, B_HI: tl.constexpr,
             HAS_B: tl.constexpr, MASKED: tl.constexpr, FINAL: tl.constexpr,
             CHECK: tl.constexpr, BLOCK: tl.constexpr, STEP: tl.constexpr):
    """Version 2, program (t, p): row t = (group t // X, row t % X); lanes [p * span, (p + 1) *
    span) of part a (x), and in program 0 every lane of part b (an FP8 pair's scales, at lane
    positions a_K, a_K + 1, ...). FINAL (P == 1): writes fp [T]; else the partial sum [T, P].
    MASKED: a row at or past counts[group] loads nothing and gets 0. CHECK: nf [T, P] int8, 1
    where a bf16/fp16/fp32 word of the span is NaN/inf. STEP = BLOCK * PMUL mod 2**64."""
    t = tl.program_id(0)
    p = tl.program_id(1)
    g = t // X
    r = t - g * X
    if MASKED:
        live = r < tl.load(counts_ptr + g)
    else:
        live = t >= 0
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.uint64)
    bad = tl.zeros([BLOCK], dtype=tl.uint64)
    row = g.to(tl.int64) * a_sg + r.to(tl.int64) * a_sx
    k_lo = p * span
    k_hi = tl.where(live, tl.minimum(k_lo + span, a_K), k_lo)  # a dead row: zero iterations
    pos = (k_lo + offs).to(tl.uint64) * 0xC2B2AE3D27D4EB4F  # k * PMUL, then a Weyl step per block
    for k0 in range(k_lo, k_hi, BLOCK):
        k = k0 + offs
        lane = _lanes(a_ptr, row, k, a_W, a_sw, A_PER, A_BITS)
        acc += tl.where(k < a_K, _mix(lane ^ pos ^ 0x9E3779B97F4A7C15), 0)
        if CHECK and A_EXP != 0:
            bad |= _nonfinite(lane, A_EXP, A_LO, A_HI)
        pos += STEP
    if HAS_B:
        row = g.to(tl.int64) * b_sg + r.to(tl.int64) * b_sx
        kb_hi = tl.where(live & (p == 0), b_K, 0)
        pos = (a_K + offs).to(tl.uint64) * 0xC2B2AE3D27D4EB4F
        for k0 in range(0, kb_hi, BLOCK):
            k = k0 + offs
            lane = _lanes(b_ptr, row, k, b_W, b_sw, B_PER, B_BITS)
            acc += tl.where(k < b_K, _mix(lane ^ pos ^ 0x9E3779B97F4A7C15), 0)
            if CHECK and B_EXP != 0:
                bad |= _nonfinite(lane, B_EXP, B_LO, B_HI)
            pos += STEP
    total = tl.sum(acc, axis=0)
    if FINAL:
        fp = _mix(total ^ n_words.to(tl.uint64) ^ 0xD1B54A32D192ED03)
        fp = tl.where(live, fp, 0)
        tl.store(out_ptr + t, fp.to(tl.int64, bitcast=True))
    else:
        tl.store(out_ptr + t.to(tl.int64) * P + p, total.to(tl.int64, bitcast=True))
    if CHECK:
        tl.store(nf_ptr + t.to(tl.int64) * P + p, (tl.max(bad, axis=0) != 0).to(tl.int8))


@triton.jit(do_not_specialize=["n_words"])
def fp2_finish(part_ptr, out_ptr, counts_ptr, T, P, X, n_words, MASKED: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    """Version 2 with P > 1: fp [T] from the partial sums [T, P] (0 for rows past their count)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.arange(0, BLOCK_P)
    part = tl.load(part_ptr + t[:, None].to(tl.int64) * P + c[None, :],
                   mask=(t[:, None] < T) & (c[None, :] < P), other=0)
    total = tl.sum(part.to(tl.uint64, bitcast=True), axis=1)
    fp = _mix(total ^ n_words.to(tl.uint64) ^ 0xD1B54A32D192ED03)
    if MASKED:
        g = t // X
        live = (t - g * X) < tl.load(counts_ptr + g, mask=t < T, other=0)
        fp = tl.where(live, fp, 0)
    tl.store(out_ptr + t, fp.to(tl.int64, bitcast=True), mask=t < T)
