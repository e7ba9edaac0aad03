"""Triton kernel for the token fingerprint, bit-for-bit equal to epreplay.fingerprint (the reference).

Legend: T rows, H words per row, P column blocks per row (grid axis 1).

The reference defines fp = mix(sum_j mix(((j << 32) | w_j) ^ SEED) ^ n ^ SEED2) with every sum
mod 2**64. The kernel computes the inner sum for a [T, H] block of words: program (t, p) reads
BLOCK_H * ITERS consecutive words of row t, mixes each and writes one uint64 partial sum. Partial
sums are added by torch (wrap-around int64 adds) and the final mix runs in torch; since the sum is
order-free the result cannot depend on the split. Only word loading and mixing is done in Triton,
where the bytes are; what is left on the host side is O(T * P) integers.

`fingerprint_rows_fast(x)` uses the kernel for CUDA tensors when Triton imports, and falls back
to the reference otherwise, so callers never need to care.
"""
from __future__ import annotations

import functools

import torch

from epreplay import fingerprint as ref

# Columns per program: 1024 words x 4 iterations = 4096 words (8 KiB of bf16) per program keeps
# every SM busy at decode shapes (T=128 x H=7168 -> 256 programs) without tiny partial outputs.
BLOCK_H = 1024
ITERS = 4


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def fp_partial(x_ptr, out_ptr, H, stride_t, start, mask_bits, P,
                   BLOCK: tl.constexpr, NITER: tl.constexpr):
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

    return fp_partial


def _acc_rows(x: torch.Tensor, start: int) -> torch.Tensor:
    """Inner sums [T] int64 (wrapping) of the words of x [T, H] at positions start..start+H-1."""
    bits, mask = ref._words(x, "x")
    bits = bits.contiguous() if bits.stride(-1) != 1 else bits
    T, H = bits.shape
    if T == 0 or H == 0:
        return torch.zeros(T, dtype=torch.int64, device=x.device)
    P = -(-H // (BLOCK_H * ITERS))
    partial_TP = torch.empty(T, P, dtype=torch.int64, device=x.device)
    _kernel()[(T, P)](bits, partial_TP, H, bits.stride(0), start, mask, P,
                      BLOCK=BLOCK_H, NITER=ITERS)
    return partial_TP.sum(dim=1, dtype=torch.int64)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def fingerprint_rows_triton(x: ref.RowsIn) -> torch.Tensor:
    """The kernel path (CUDA tensors, or any device under TRITON_INTERPRET=1). Same contract as
    epreplay.fingerprint.fingerprint_rows: x is [T, H] or an FP8 (x_TH, scales_TS) pair; returns
    fp_T [T] int64 holding the 64 fingerprint bits."""
    if isinstance(x, (tuple, list)):
        x_TH, scales_TS = x
        acc_T = _acc_rows(x_TH, 0) + _acc_rows(scales_TS, x_TH.shape[1])
        n = x_TH.shape[1] + scales_TS.shape[1]
    else:
        if x.dim() != 2:
            raise ValueError(f"x: fingerprints take a [T, H] tensor, got shape {tuple(x.shape)}")
        acc_T = _acc_rows(x, 0)
        n = x.shape[1]
    acc_T ^= n ^ ref.SEED2
    return ref._mix_(acc_T)


def fingerprint_rows_fast(x: ref.RowsIn) -> torch.Tensor:
    """fingerprint_rows, through the Triton kernel when x lives on a GPU and Triton imports."""
    first = x[0] if isinstance(x, (tuple, list)) else x
    if first.is_cuda and triton_available():
        return fingerprint_rows_triton(x)
    return ref.fingerprint_rows(x)
