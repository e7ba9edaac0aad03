"""64-bit token fingerprints: one per row of a [T, H] tensor, from the row's raw bits.

Legend: T tokens (rows), H hidden (words per row), S scale words per row (FP8 only, H / 128).

This is the reference implementation (torch integer ops only, CPU or GPU). A faster kernel must
match it bit for bit; the definition, with every constant, is:

  Words. Each element is read as its raw bits, zero-extended to an unsigned integer w < 2**32:
    bfloat16, float16, int16, uint16  -> 16-bit words      float32, int32  -> 32-bit words
    float8_e4m3fn, float8_e5m2, int8, uint8, bool -> 8-bit words
  A row is the word sequence w_0 .. w_{n-1}, n = H. For an FP8 pair (x_TH, scales_TS) a row is
  the concatenation of x's H words and the S words of the scales' bits: n = H + S, and scale s
  sits at position H + s.

  All arithmetic is on unsigned 64-bit integers modulo 2**64 (int64 with wrap-around in torch;
  `>>` below is a logical shift).
    SEED  = 0x9E3779B97F4A7C15        SEED2 = 0xD1B54A32D192ED03
    mix(z):                                   # splitmix64's finalizer, a bijection on 64 bits
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        return z ^ (z >> 31)
    h_j   = mix(((j << 32) | w_j) ^ SEED)     # word j at position j
    acc   = sum_j h_j  (mod 2**64)
    fp    = mix(acc ^ n ^ SEED2)

  Returned as torch.int64 holding those 64 bits (`.numpy().view(numpy.uint64)` for the records'
  uint64 columns).

Why this shape: ((j << 32) | w_j) is injective in (j, w_j) and mix is a bijection, so changing
any bit of any word changes exactly one h_j and therefore acc and fp — single-bit sensitivity is
guaranteed, not probable. Position enters every term, so reordering words along H changes fp
(with probability 1 - 2**-64). A sum is order-free, so any reduction order, chunking, device or
thread count gives the same bits — the property that lets a CPU replay check a GPU recording.
"""
from __future__ import annotations

from typing import Union

import torch

# Signed int64 spellings of the unsigned constants in the docstring.
def _s64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


SEED = _s64(0x9E3779B97F4A7C15)
SEED2 = _s64(0xD1B54A32D192ED03)
M1 = _s64(0xBF58476D1CE4E5B9)
M2 = _s64(0x94D049BB133111EB)

# Rows per chunk are chosen so one int64 work buffer holds ~32K elements (256 KiB): the dozen
# passes of the mix then run out of L2 cache instead of streaming 32+ MiB temporaries through
# memory, and each op stays under torch's parallel grain (32768 elements), so it runs on the
# calling thread: no OpenMP barrier per op, which on an oversubscribed host (replay ranks or
# tests sharing a few cores) made 2-thread runs 5-20x slower than 1-thread ones.
# Chunking cannot change the result: the sum is order-free.
_CHUNK_ELEMS = 1 << 15
# On a GPU the same loop is launch-bound at that size; 128x larger chunks (32 MiB buffers) cut
# the launches 128x. (epreplay.fingerprint_gpu's kernel is faster still where Triton exists.)
_CHUNK_ELEMS_GPU = 1 << 22

_WORD_VIEW: dict[torch.dtype, tuple[torch.dtype, int]] = {
    torch.bfloat16: (torch.int16, 0xFFFF),
    torch.float16: (torch.int16, 0xFFFF),
    torch.int16: (torch.int16, 0xFFFF),
    torch.uint16: (torch.int16, 0xFFFF),
    torch.float32: (torch.int32, 0xFFFFFFFF),
    torch.int32: (torch.int32, 0xFFFFFFFF),
    torch.float8_e4m3fn: (torch.uint8, 0xFF),
    torch.float8_e5m2: (torch.uint8, 0xFF),
    torch.int8: (torch.uint8, 0xFF),
    torch.uint8: (torch.uint8, 0xFF),
    torch.bool: (torch.uint8, 0xFF),
}

RowsIn = Union[torch.Tensor, "tuple[torch.Tensor, torch.Tensor]"]


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> on int64 is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix_(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finalizer, in place on an int64 tensor."""
    z ^= _shr(z, 30)
    z *= M1
    z ^= _shr(z, 27)
    z *= M2
    z ^= _shr(z, 31)
    return z


def _words(x: torch.Tensor, name: str) -> tuple[torch.Tensor, int]:
    if x.dim() != 2:
        raise ValueError(f"{name}: fingerprints take a [T, H] tensor, got shape {tuple(x.shape)}")
    view = _WORD_VIEW.get(x.dtype)
    if view is None:
        known = ", ".join(str(d).replace("torch.", "") for d in _WORD_VIEW)
        raise ValueError(f"{name}: unsupported dtype {x.dtype}; supported: {known}")
    return (x.view(view[0]) if x.dtype != torch.bool else x.to(torch.uint8)), view[1]


def _row_sums(bits: torch.Tensor, mask: int, start: int) -> torch.Tensor:
    """acc contribution [T] of words at positions start .. start + H - 1."""
    T, H = bits.shape
    acc_T = torch.zeros(T, dtype=torch.int64, device=bits.device)
    if H == 0 or T == 0:
        return acc_T
    pos_H = ((torch.arange(start, start + H, dtype=torch.int64, device=bits.device) << 32) ^ SEED)
    budget = _CHUNK_ELEMS if bits.device.type == "cpu" else max(_CHUNK_ELEMS, _CHUNK_ELEMS_GPU)
    rows = min(T, max(1, budget // H))
    # Two work buffers reused for every chunk: no allocation (page faults) inside the loop.
    z_buf = torch.empty(rows, H, dtype=torch.int64, device=bits.device)
    t_buf = torch.empty_like(z_buf)
    for t0 in range(0, T, rows):
        chunk = bits[t0:t0 + rows]
        z, t = z_buf[:chunk.shape[0]], t_buf[:chunk.shape[0]]
        z.copy_(chunk)
        z &= mask  # zero-extend: the signed view sign-extended the top bit
        z ^= pos_H  # ((j << 32) | w) ^ SEED: w < 2**32 never touches the position bits
        for shift, mult in ((30, M1), (27, M2), (31, None)):  # mix(), in place
            torch.bitwise_right_shift(z, shift, out=t)
            t &= (1 << (64 - shift)) - 1  # logical, not arithmetic, shift
            z ^= t
            if mult is not None:
                z *= mult
        torch.sum(z, dim=1, dtype=torch.int64, out=acc_T[t0:t0 + chunk.shape[0]])
    return acc_T


def fingerprint_rows(x: RowsIn) -> torch.Tensor:
    """Fingerprint each row of a tensor from its raw bits (definition in the module docstring).

    Args:
        x: [T, H] tensor of bfloat16, float16, float32, float8_e4m3fn/e5m2 (or 8/16/32-bit ints,
            bool), any device, any strides; or DeepEP's FP8 pair (x_TH float8_e4m3fn,
            scales_TS float32), fingerprinted as the per-row concatenation of both.
    Returns:
        fp_T: [T] int64 on x's device, the 64 fingerprint bits (view as uint64 to store).
    """
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"an FP8 input is a (x_TH, scales_TS) pair, got {len(x)} tensors")
        x_TH, scales_TS = x
        if x_TH.dim() != 2 or scales_TS.dim() != 2 or x_TH.shape[0] != scales_TS.shape[0]:
            raise ValueError(f"FP8 pair: x {tuple(x_TH.shape)} and scales {tuple(scales_TS.shape)} "
                             f"must both be [T, *] with the same T")
        bits, mask = _words(x_TH, "x")
        sbits, smask = _words(scales_TS, "scales")
        H, S = bits.shape[1], sbits.shape[1]
        acc_T = _row_sums(bits, mask, 0) + _row_sums(sbits, smask, H)
        n = H + S
    else:
        bits, mask = _words(x, "x")
        acc_T = _row_sums(bits, mask, 0)
        n = bits.shape[1]
    acc_T ^= n ^ SEED2
    return _mix_(acc_T)
