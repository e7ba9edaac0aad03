"""Triton kernels for the token fingerprint, bit-for-bit equal to epreplay.format.fingerprint (the reference).

Legend: T rows, H words per row, K 64-bit lanes per row (version 2), P programs per row (grid
axis 1), L groups of X rows (low-latency receive buffers, T = L * X).

Version 2 (CURRENT): program (t, p) reads a span of row t's lanes and mixes each lane once. When
the row is whole, 8-byte aligned lanes (H * bits % 64 == 0 and aligned strides: DeepEP's shapes)
it reads them as int64 loads; otherwise (odd H, a strided or unaligned row) it loads a [lanes, p]
tile of words and packs them in registers, so no input is ever copied. One multiply-free position
update per lane (a Weyl sequence: k * PMUL advances by BLOCK * PMUL) leaves two multiplies per
8 bytes, against v1's two per word, which is what moves the kernel from compute-bound towards
memory bandwidth. When one program covers the whole row (P == 1: prefill shapes, low-latency
buffers) it also does the final mix and writes fp: one launch. For few rows (decode) a row is
split over P programs so every SM has loads in flight, and a second small kernel adds the P
partial sums (order-free) and mixes.

Valid rows: with valid_counts_L, program (t, p) loads counts[t // X] on the device; a row past
its count runs its lane loop zero times (no loads) and gets 0. No host sync.

Finite flag (with_finite=True): the same pass also returns rows_finite's [T] bool from the lanes
already in registers: a bf16/fp16/fp32 word is NaN/inf iff its exponent bits are all ones, tested
for every word of a lane at once with the has-zero-word bit trick, exact as a yes/no.

Version 1: the original per-word kernel (program (t, p) mixes BLOCK_H * ITERS words, partial sums
added by torch), kept so version-1 recordings can be re-hashed on a GPU.

`fingerprint_rows_fast(x)` uses the kernel for CUDA tensors when Triton imports (and for CPU
tensors under TRITON_INTERPRET=1, for tests), and the reference otherwise, so callers never need
to care.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

from epreplay.format import fingerprint as ref

# v1: columns per program: 1024 words x 4 iterations = 4096 words (8 KiB of bf16) per program
# keeps every SM busy at decode shapes (T=128 x H=7168 -> 256 programs) without tiny partials.
BLOCK_H = 1024
ITERS = 4
# v2: 512 lanes (4 KiB) per loop iteration: 4 warps x 32 threads x 4 lanes, two 16-byte loads
# per thread per iteration.
LANES = 512
# v2: rows are split over several programs only below this many programs in all: ~16 per SM of
# a 132-SM H100/H200, enough 4 KiB loads in flight to cover HBM latency.
TARGET_PROGRAMS = 2048
_MASK64 = (1 << 64) - 1
# Exponent bits of one word: all ones means NaN or inf.
_EXP_WORD = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00, torch.float32: 0x7F800000}

FpOut = Union[torch.Tensor, "tuple[torch.Tensor, torch.Tensor]"]


# --- version 1 host side ---------------------------------------------------------------------

def _acc_rows(x: torch.Tensor, start: int) -> torch.Tensor:
    """v1: inner sums [T] int64 (wrapping) of the words of x [T, H] at positions start..start+H-1."""
    bits, mask = ref._words(x, "x")
    bits = bits.contiguous() if bits.stride(-1) != 1 else bits
    T, H = bits.shape
    if T == 0 or H == 0:
        return torch.zeros(T, dtype=torch.int64, device=x.device)
    P = -(-H // (BLOCK_H * ITERS))
    partial_TP = torch.empty(T, P, dtype=torch.int64, device=x.device)
    from epreplay.format.fingerprint_kernels import fp1_partial

    fp1_partial[(T, P)](bits, partial_TP, H, bits.stride(0), start, mask, P, BLOCK=BLOCK_H, NITER=ITERS)
    return partial_TP.sum(dim=1, dtype=torch.int64)


def _fingerprint_v1(x: ref.RowsIn) -> torch.Tensor:
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


# --- version 2 host side ---------------------------------------------------------------------

@dataclass(frozen=True)
class _Part:
    """One tensor's rows as the v2 kernel reads them: src [.., W] (int64 lanes when per == 1,
    else words), row r of group g at element g * sg + r * sx, elements sw apart."""

    src: torch.Tensor
    W: int  # elements per row in src: K lanes (per == 1) or H words
    K: int  # lanes per row
    sg: int
    sx: int
    sw: int
    per: int  # words per src element packed into a lane (1: src already holds lanes)
    bits: int  # word width
    exp: int  # the word's exponent mask replicated per word; 0: no finite check
    lo: int
    hi: int


def _replicate(word: int, bits: int) -> int:
    return sum(word << (bits * i) for i in range(64 // bits))


def _part(x: torch.Tensor, name: str, X: int) -> _Part:
    """x [T, H] (T = groups * X) or [L, X, H] as the kernel reads it, without copying."""
    view = ref._WORD_VIEW.get(x.dtype)
    if view is None:
        known = ", ".join(str(d).replace("torch.", "") for d in ref._WORD_VIEW)
        raise ValueError(f"{name}: unsupported dtype {x.dtype}; supported: {known}")
    bits = x.view(view[0]) if x.dtype != torch.bool else x.to(torch.uint8)
    b = 8 * bits.element_size()
    per = 64 // b
    H = bits.shape[-1]
    if bits.dim() == 3:
        sg, sx, sw = bits.stride()
    else:
        st, sw = bits.stride()
        sg, sx = X * st, st
    exp = _replicate(_EXP_WORD[x.dtype], b) if x.dtype in _EXP_WORD else 0
    lo, hi = _replicate(1, b), _replicate(1 << (b - 1), b)
    K = -(-H // per)
    lanes = ref.lanes_view(bits) if H else None
    if lanes is not None:  # whole aligned lanes: int64 loads (strides of size-1 dims are unused)
        return _Part(lanes, K, K, sg // per, sx // per, 1, 1, b, exp, lo, hi)
    return _Part(bits, H, K, sg, sx, sw, per, b, exp, lo, hi)


def _groups(x: ref.RowsIn, valid_counts_L: Optional[torch.Tensor],
            rows_per_group: Optional[int]) -> tuple[list[torch.Tensor], int, int]:
    """(parts, T, X): x's tensors (x, or x and scales), the row count and rows per group (T when
    ungrouped), checked as the reference checks them."""
    parts = list(x) if isinstance(x, (tuple, list)) else [x]
    if len(parts) not in (1, 2):
        raise ValueError(f"an FP8 input is a (x_TH, scales_TS) pair, got {len(parts)} tensors")
    if valid_counts_L is None:
        if any(p.dim() != 2 for p in parts) or parts[0].shape[0] != parts[-1].shape[0]:
            shapes = " and ".join(str(tuple(p.shape)) for p in parts)
            raise ValueError(f"fingerprints take [T, H] tensors (an FP8 pair: the same T), got {shapes}")
        T = parts[0].shape[0]
        return parts, T, max(T, 1)
    L = valid_counts_L.shape[0]
    X = parts[0].shape[1] if parts[0].dim() == 3 else rows_per_group
    if X is None:
        raise ValueError(f"valid_counts_L needs x as [L, X, H] or rows_per_group=X with x [L * X, H]; "
                         f"got x {tuple(parts[0].shape)} and no rows_per_group")
    if rows_per_group is not None and rows_per_group != X:
        raise ValueError(f"rows_per_group={rows_per_group} but x is [L, X, H] with X={X}")
    for p in parts:
        rows = p.shape[0] * p.shape[1] if p.dim() == 3 else p.shape[0]
        if p.dim() not in (2, 3) or rows != L * X or (p.dim() == 3 and p.shape[1] != X):
            raise ValueError(f"{tuple(p.shape)} is not {L} groups (len(valid_counts_L)) of {X} rows "
                             f"(rows_per_group)")
    if valid_counts_L.dim() != 1 or valid_counts_L.dtype.is_floating_point:
        raise ValueError(f"valid_counts_L must be a 1-D integer tensor, got {valid_counts_L.dtype} "
                         f"{tuple(valid_counts_L.shape)}")
    if valid_counts_L.device != parts[0].device:
        raise ValueError(f"valid_counts_L is on {valid_counts_L.device}, x on {parts[0].device}: "
                         f"pass the counts where the rows are (no host sync)")
    return parts, L * X, max(X, 1)


def _fingerprint_v2(parts: list[torch.Tensor], T: int, X: int, counts: Optional[torch.Tensor],
                    with_finite: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    import triton

    from epreplay.format.fingerprint_kernels import fp2_finish, fp2_rows

    device = parts[0].device
    a = _part(parts[0], "x", X)
    b = _part(parts[1], "scales", X) if len(parts) > 1 else None
    n_words = parts[0].shape[-1] + (parts[1].shape[-1] if b is not None else 0)
    fp = torch.empty(T, dtype=torch.int64, device=device)
    if T == 0:
        return fp, torch.ones(0, dtype=torch.bool, device=device)
    P = 1 if T >= TARGET_PROGRAMS else max(1, min(triton.cdiv(a.K, LANES), triton.cdiv(TARGET_PROGRAMS, T)))
    span = triton.cdiv(triton.cdiv(max(a.K, 1), P), LANES) * LANES
    P = max(1, triton.cdiv(a.K, span))  # no program left without lanes
    out = fp if P == 1 else torch.empty(T, P, dtype=torch.int64, device=device)
    nf = torch.empty(T, P, dtype=torch.int8, device=device) if with_finite else fp
    bb = b if b is not None else a
    fp2_rows[(T, P)](out, nf, counts if counts is not None else fp, a.src, bb.src, X, P, span, n_words,
                 a.W, a.K, a.sg, a.sx, a.sw, bb.W, bb.K, bb.sg, bb.sx, bb.sw,
                 A_PER=a.per, A_BITS=a.bits, A_EXP=a.exp, A_LO=a.lo, A_HI=a.hi,
                 B_PER=bb.per, B_BITS=bb.bits, B_EXP=bb.exp, B_LO=bb.lo, B_HI=bb.hi,
                 HAS_B=b is not None and b.K > 0, MASKED=counts is not None, FINAL=P == 1,
                 CHECK=bool(with_finite), BLOCK=LANES, STEP=(LANES * ref.PMUL) & _MASK64)
    if P > 1:
        BLOCK_T = 128
        fp2_finish[(triton.cdiv(T, BLOCK_T),)](out, fp, counts if counts is not None else fp, T, P, X,
                                               n_words, MASKED=counts is not None, BLOCK_T=BLOCK_T,
                                               BLOCK_P=triton.next_power_of_2(P))
    if with_finite == "raw":  # the kernel's [T, P] non-finite counts as they are: no reduction
        return fp, nf        # launches (capture reduces them on the host, off the job's stream)
    return fp, ((nf == 0).all(dim=1) if with_finite else None)


# --- entry points ----------------------------------------------------------------------------

def triton_available() -> bool:
    """Triton imports and a CUDA device exists (the kernel path of fingerprint_rows_fast)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernel_usable(t: torch.Tensor) -> bool:
    if not (t.is_cuda or (t.device.type == "cpu" and _interpreting())):
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def fingerprint_rows_triton(x: ref.RowsIn, *, version: int = ref.CURRENT,
                            valid_counts_L: Optional[torch.Tensor] = None,
                            rows_per_group: Optional[int] = None,
                            with_finite: bool = False) -> FpOut:
    """The kernel path: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.

    Args:
        x: [T, H] or an FP8 pair (x_TH, scales_TS), as epreplay.format.fingerprint.fingerprint_rows;
            with valid_counts_L also [L, X, H] (a pair of [L, X, *]).
        version: 1 or 2 (ref.CURRENT).
        valid_counts_L: [L] int32/int64 on x's device, or None. Only rows [0, count[l]) of each
            group l of X rows are read and hashed; the others get 0.
        rows_per_group: X, when x is given flat as [L * X, H].
        with_finite: also return rows_finite's [T] bool (True for rows outside the counts);
            "raw": instead the kernel's own non-finite marks, an integer tensor whose entries are
            0 where the values are finite (version 2; other versions give the [T] bool).
    Returns:
        fp_T [T] int64 holding the 64 fingerprint bits, or (fp_T, finite_T) with with_finite.
    """
    version = ref.check_version(version)
    first = x[0] if isinstance(x, (tuple, list)) else x
    if not first.is_cuda and not _interpreting():
        raise ValueError(f"the fingerprint kernel takes CUDA tensors (got {first.device}); on CPU use "
                         f"epreplay.format.fingerprint.fingerprint_rows, or set TRITON_INTERPRET=1 to test")
    if version == 1:  # every row through the v1 kernel; counts and flags by torch ops (no sync)
        flat, X = ref._flat_groups(x, valid_counts_L, rows_per_group) if valid_counts_L is not None else (x, 0)
        fp = _fingerprint_v1(flat)
        if valid_counts_L is not None:
            fp = torch.where(ref.valid_rows(valid_counts_L, X), fp, 0)
        if not with_finite:
            return fp
        finite = ref.rows_finite(x, valid_counts_L=valid_counts_L, rows_per_group=rows_per_group)
        return fp, (~finite if with_finite == "raw" else finite)
    parts, T, X = _groups(x, valid_counts_L, rows_per_group)
    fp, finite = _fingerprint_v2(parts, T, X, valid_counts_L, with_finite)
    if with_finite == "raw" and finite is not None and finite.dtype != torch.int8:
        finite = finite == 0  # T == 0: an empty bool, which is no mark either way
    return (fp, finite) if with_finite else fp


def fingerprint_rows_fast(x: ref.RowsIn, *, version: int = ref.CURRENT,
                          valid_counts_L: Optional[torch.Tensor] = None,
                          rows_per_group: Optional[int] = None,
                          with_finite: bool = False) -> FpOut:
    """fingerprint_rows_triton where the kernel can run (a GPU with Triton; the interpreter),
    else the torch reference with the same arguments and the same bits."""
    first = x[0] if isinstance(x, (tuple, list)) else x
    kw = dict(version=version, valid_counts_L=valid_counts_L, rows_per_group=rows_per_group)
    if _kernel_usable(first):
        return fingerprint_rows_triton(x, with_finite=with_finite, **kw)
    fp = ref.fingerprint_rows(x, **kw)
    if not with_finite:
        return fp
    finite = ref.rows_finite(x, valid_counts_L=valid_counts_L, rows_per_group=rows_per_group)
    return fp, (~finite if with_finite == "raw" else finite)
