"""64-bit token fingerprints: one per row of a [T, H] tensor, from the row's raw bits.

Legend: T tokens (rows), H hidden (words per row), S scale words per row (FP8 only, H / 128),
K 64-bit lanes per row (version 2), L groups (local experts) of X rows each (low-latency buffers).

This is the reference implementation (torch integer ops only, CPU or GPU). A faster kernel
(epreplay.format.fingerprint_gpu) must match it bit for bit. Two versions exist; a recording says which
one made its fingerprints in its record meta ("fp_version", absent = 1), and a replay recomputes
with that version. New recordings use CURRENT = 2. The definitions, with every constant:

  Words (both versions). Each element is read as its raw bits, zero-extended to an unsigned
  integer w < 2**b, b the word width:
    bfloat16, float16, int16, uint16  -> b = 16       float32, int32  -> b = 32
    float8_e4m3fn, float8_e5m2, int8, uint8, bool -> b = 8
  A row is the word sequence w_0 .. w_{n-1}, n = H. For an FP8 pair (x_TH, scales_TS) a row is
  x's H words followed by the S words of the scales' bits: n = H + S.

  All arithmetic is on unsigned 64-bit integers modulo 2**64 (int64 with wrap-around in torch;
  `>>` below is a logical shift).
    SEED  = 0x9E3779B97F4A7C15        SEED2 = 0xD1B54A32D192ED03
    mix(z):                                   # splitmix64's finalizer, a bijection on 64 bits
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        return z ^ (z >> 31)

  Version 1 (one term per word; scale s of an FP8 pair sits at word position H + s):
    h_j   = mix(((j << 32) | w_j) ^ SEED)     # word j at position j
    acc   = sum_j h_j  (mod 2**64)
    fp    = mix(acc ^ n ^ SEED2)

  Version 2 (one term per 64-bit lane: 4x fewer multiplies than v1 for 16-bit words, 8x for FP8):
    PMUL  = 0xC2B2AE3D27D4EB4F                # odd, so k -> k * PMUL is injective mod 2**64
    Lanes. p = 64 / b words per lane (4 for 16-bit, 8 for 8-bit, 2 for 32-bit words). Lane k of
    a word sequence packs words kp .. kp + p - 1 little-endian,
        lane_k = sum_{i < p} w_{kp+i} << (b * i),
    words past the end being 0 (the last lane is zero-padded); K = ceil(H / p) lanes.
    For an FP8 pair, x's words and the scales' words are packed separately: x's ceil(H / 8)
    lanes are lanes 0 .. Kx - 1, and the scales' ceil(S / 2) lanes follow at Kx, Kx + 1, ...
    (a scale lane never holds an x byte).
    h_k   = mix(lane_k ^ ((k * PMUL) ^ SEED))  # lane k at position k
    acc   = sum_k h_k  (mod 2**64)
    fp    = mix(acc ^ n ^ SEED2)               # n = H (+ S): the word count, not the lane count

  Returned as torch.int64 holding those 64 bits (`.numpy().view(numpy.uint64)` for the records'
  uint64 columns).

Why this shape: the term of a word (v1) or lane (v2) is mix applied to its value XOR a constant
that depends only on its position, a bijection of the value, so changing any bit of any word
changes exactly one term and therefore acc and fp: single-bit (indeed single-word and
single-lane) sensitivity is guaranteed, not probable. Position enters every term (the position
constants are distinct: v1's j << 32 and v2's k * PMUL are injective), so reordering words along
H changes fp (with probability 1 - 2**-64; v2 reorderings within one lane change the lane's
value). Padding cannot alias a longer row: n enters fp. A sum is order-free, so any reduction
order, chunking, device or thread count gives the same bits: the property that lets a CPU replay
check a GPU recording.

Valid rows only (low-latency receive buffers): with `valid_counts_L` the input is L groups of X
rows ([L, X, H], or [L * X, H] with rows_per_group=X) of which rows [0, count[l]) of group l
hold data; those get their fingerprint, the others 0 (never read by the kernel). `rows_finite`
gives the matching "no NaN/inf" flag per row.
"""
from __future__ import annotations

import sys
from typing import Optional, Union

import torch

from epreplay.format.records import FINGERPRINT_VERSION

CURRENT = FINGERPRINT_VERSION  # the version new recordings use (2)
VERSIONS = (1, 2)


# Signed int64 spellings of the unsigned constants in the docstring.
def _s64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


SEED = _s64(0x9E3779B97F4A7C15)
SEED2 = _s64(0xD1B54A32D192ED03)
M1 = _s64(0xBF58476D1CE4E5B9)
M2 = _s64(0x94D049BB133111EB)
PMUL = _s64(0xC2B2AE3D27D4EB4F)

# Rows per chunk are chosen so one int64 work buffer holds ~32K elements (256 KiB): the dozen
# passes of the mix then run out of L2 cache instead of streaming 32+ MiB temporaries through
# memory, and each op stays under torch's parallel grain (32768 elements), so it runs on the
# calling thread: no OpenMP barrier per op, which on an oversubscribed host (replay ranks or
# tests sharing a few cores) made 2-thread runs 5-20x slower than 1-thread ones.
# Chunking cannot change the result: the sum is order-free.
_CHUNK_ELEMS = 1 << 15
# On a GPU the same loop is launch-bound at that size; 128x larger chunks (32 MiB buffers) cut
# the launches 128x. (epreplay.format.fingerprint_gpu's kernel is faster still where Triton exists.)
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
# Dtypes whose values rows_finite checks (FP8 codes are not: e4m3fn saturates, and a NaN there
# comes from a NaN scale or input, checked elsewhere).
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

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


def _mix_buf_(z: torch.Tensor, t: torch.Tensor) -> None:
    """mix() in place on z, with t (same shape) as scratch: no allocation per call."""
    for shift, mult in ((30, M1), (27, M2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=t)
        t &= (1 << (64 - shift)) - 1  # logical, not arithmetic, shift
        z ^= t
        if mult is not None:
            z *= mult


def check_version(version: int) -> int:
    """version as an int, or a ValueError naming the known ones."""
    if version not in VERSIONS:
        raise ValueError(f"unknown fingerprint version {version!r}; known: {', '.join(map(str, VERSIONS))} "
                         f"(a recording newer than this epreplay? upgrade epreplay)")
    return int(version)


def _words(x: torch.Tensor, name: str) -> tuple[torch.Tensor, int]:
    if x.dim() != 2:
        raise ValueError(f"{name}: fingerprints take a [T, H] tensor, got shape {tuple(x.shape)}")
    view = _WORD_VIEW.get(x.dtype)
    if view is None:
        known = ", ".join(str(d).replace("torch.", "") for d in _WORD_VIEW)
        raise ValueError(f"{name}: unsupported dtype {x.dtype}; supported: {known}")
    return (x.view(view[0]) if x.dtype != torch.bool else x.to(torch.uint8)), view[1]


def _chunk_rows(T: int, width: int, device: torch.device) -> int:
    budget = _CHUNK_ELEMS if device.type == "cpu" else max(_CHUNK_ELEMS, _CHUNK_ELEMS_GPU)
    return min(T, max(1, budget // width))


def _row_sums(bits: torch.Tensor, mask: int, start: int) -> torch.Tensor:
    """v1: acc contribution [T] of words at positions start .. start + H - 1."""
    T, H = bits.shape
    acc_T = torch.zeros(T, dtype=torch.int64, device=bits.device)
    if H == 0 or T == 0:
        return acc_T
    pos_H = ((torch.arange(start, start + H, dtype=torch.int64, device=bits.device) << 32) ^ SEED)
    rows = _chunk_rows(T, H, bits.device)
    # Two work buffers reused for every chunk: no allocation (page faults) inside the loop.
    z_buf = torch.empty(rows, H, dtype=torch.int64, device=bits.device)
    t_buf = torch.empty_like(z_buf)
    for t0 in range(0, T, rows):
        chunk = bits[t0:t0 + rows]
        z, t = z_buf[:chunk.shape[0]], t_buf[:chunk.shape[0]]
        z.copy_(chunk)
        z &= mask  # zero-extend: the signed view sign-extended the top bit
        z ^= pos_H  # ((j << 32) | w) ^ SEED: w < 2**32 never touches the position bits
        _mix_buf_(z, t)
        torch.sum(z, dim=1, dtype=torch.int64, out=acc_T[t0:t0 + chunk.shape[0]])
    return acc_T


def lanes_view(bits: torch.Tensor) -> Optional[torch.Tensor]:
    """bits [..., H] (a word view) as its int64 lanes [..., H / p] without a copy, or None when
    the layout does not allow it (H not a multiple of p, a stride or the start not 8-byte
    aligned). Lanes are little-endian packed words: what a byte view gives on every host and
    device epreplay runs on (x86, ARM, CUDA)."""
    p = 8 // bits.element_size()
    if bits.shape[-1] % p or bits.data_ptr() % 8 or (bits.shape[-1] > 1 and bits.stride(-1) != 1):
        return None
    if any(s % p for s, n in zip(bits.stride()[:-1], bits.shape[:-1]) if n > 1):
        return None
    try:
        return bits.view(torch.int64)
    except RuntimeError:  # a layout torch's dtype view still refuses
        return None


def _lane_sums(bits: torch.Tensor, lane0: int) -> torch.Tensor:
    """v2: acc contribution [T] of the lanes of bits [T, H], at lane positions lane0, lane0 + 1..."""
    T, H = bits.shape
    p = 8 // bits.element_size()
    K = -(-H // p)
    acc_T = torch.zeros(T, dtype=torch.int64, device=bits.device)
    if K == 0 or T == 0:
        return acc_T
    lanes = lanes_view(bits)  # the fast path: contiguous rows of whole lanes, no copy
    pos_K = (torch.arange(lane0, lane0 + K, dtype=torch.int64, device=bits.device) * PMUL) ^ SEED
    rows = _chunk_rows(T, K, bits.device)
    z_buf = torch.empty(rows, K, dtype=torch.int64, device=bits.device)
    t_buf = torch.empty_like(z_buf)
    # Otherwise each chunk's words go into a zeroed [rows, K * p] buffer whose tail stays zero:
    # the last lane's padding.
    pad = torch.zeros(rows, K * p, dtype=bits.dtype, device=bits.device) if lanes is None else None
    for t0 in range(0, T, rows):
        n = min(rows, T - t0)
        z, t = z_buf[:n], t_buf[:n]
        if lanes is not None:
            z.copy_(lanes[t0:t0 + n])
        else:
            pad[:n, :H].copy_(bits[t0:t0 + n])
            z.copy_(pad[:n].view(torch.int64))
        z ^= pos_K
        _mix_buf_(z, t)
        torch.sum(z, dim=1, dtype=torch.int64, out=acc_T[t0:t0 + n])
    return acc_T


def _parts(x: RowsIn) -> list[tuple[torch.Tensor, int]]:
    """(word view [T, W], zero-extension mask) of x, or of each half of an FP8 pair."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"an FP8 input is a (x_TH, scales_TS) pair, got {len(x)} tensors")
        x_TH, scales_TS = x
        if x_TH.dim() != 2 or scales_TS.dim() != 2 or x_TH.shape[0] != scales_TS.shape[0]:
            raise ValueError(f"FP8 pair: x {tuple(x_TH.shape)} and scales {tuple(scales_TS.shape)} "
                             f"must both be [T, *] with the same T")
        return [_words(x_TH, "x"), _words(scales_TS, "scales")]
    return [_words(x, "x")]


def _fingerprint_parts(parts: list[tuple[torch.Tensor, int]], version: int) -> torch.Tensor:
    if version == 1:
        acc_T, start = None, 0
        for bits, mask in parts:
            s = _row_sums(bits, mask, start)
            acc_T = s if acc_T is None else acc_T + s
            start += bits.shape[1]
    else:
        if sys.byteorder != "little":
            raise RuntimeError("fingerprint version 2 packs lanes through a byte view: needs a "
                               "little-endian host")
        acc_T, lane0 = None, 0
        for bits, _ in parts:
            s = _lane_sums(bits, lane0)
            acc_T = s if acc_T is None else acc_T + s
            lane0 += -(-bits.shape[1] // (8 // bits.element_size()))
    n = sum(bits.shape[1] for bits, _ in parts)
    acc_T ^= n ^ SEED2
    return _mix_(acc_T)


def _flat_groups(x: RowsIn, valid_counts_L: torch.Tensor, rows_per_group: Optional[int]) -> tuple[RowsIn, int]:
    """x as [L * X, W] rows (a [L, X, W] input is reshaped) and X, checked against the counts."""
    parts = list(x) if isinstance(x, (tuple, list)) else [x]
    if parts[0].dim() == 3:
        X = parts[0].shape[1]
        if rows_per_group is not None and rows_per_group != X:
            raise ValueError(f"rows_per_group={rows_per_group} but x is [L, X, H] with X={X}")
        parts = [p.reshape(-1, p.shape[-1]) if p.dim() == 3 else p for p in parts]
    elif rows_per_group is None:
        raise ValueError(f"valid_counts_L needs x as [L, X, H] or rows_per_group=X with x [L * X, H]; "
                         f"got x {tuple(parts[0].shape)} and no rows_per_group")
    else:
        X = int(rows_per_group)
    if valid_counts_L.dim() != 1 or valid_counts_L.dtype.is_floating_point:
        raise ValueError(f"valid_counts_L must be a 1-D integer tensor, got {valid_counts_L.dtype} "
                         f"{tuple(valid_counts_L.shape)}")
    L = valid_counts_L.shape[0]
    if X < 0 or parts[0].shape[0] != L * X:
        raise ValueError(f"{parts[0].shape[0]} rows are not {L} groups (len(valid_counts_L)) of "
                         f"{X} rows (rows_per_group)")
    if valid_counts_L.device != parts[0].device:
        raise ValueError(f"valid_counts_L is on {valid_counts_L.device}, x on {parts[0].device}: "
                         f"pass the counts where the rows are (no host sync)")
    return (tuple(parts) if len(parts) > 1 else parts[0]), X


def valid_rows(valid_counts_L: torch.Tensor, rows_per_group: int) -> torch.Tensor:
    """[L * X] bool, on the counts' device: row l * X + r is valid iff r < valid_counts_L[l]."""
    L, X = valid_counts_L.shape[0], int(rows_per_group)
    r = torch.arange(X, device=valid_counts_L.device)
    return (r[None, :] < valid_counts_L.to(torch.int64)[:, None]).reshape(L * X)


def fingerprint_rows(x: RowsIn, *, version: int = CURRENT,
                     valid_counts_L: Optional[torch.Tensor] = None,
                     rows_per_group: Optional[int] = None) -> torch.Tensor:
    """Fingerprint each row of a tensor from its raw bits (definition in the module docstring).

    Args:
        x: [T, H] tensor of bfloat16, float16, float32, float8_e4m3fn/e5m2 (or 8/16/32-bit ints,
            bool), any device, any strides; or DeepEP's FP8 pair (x_TH float8_e4m3fn,
            scales_TS float32), fingerprinted as the per-row concatenation of both. With
            valid_counts_L also [L, X, H] (a pair of [L, X, *]).
        version: the definition, 1 or 2 (CURRENT); a record's meta "fp_version" says which.
        valid_counts_L: [L] int32/int64 on x's device, or None (every row). Only rows
            [0, valid_counts_L[l]) of each group l of X rows are hashed; the others read 0.
        rows_per_group: X, when x is given flat as [L * X, H].
    Returns:
        fp_T: [T] int64 on x's device (T = L * X with groups), the 64 fingerprint bits (view as
        uint64 to store).
    """
    version = check_version(version)
    if valid_counts_L is None:
        return _fingerprint_parts(_parts(x), version)
    x, X = _flat_groups(x, valid_counts_L, rows_per_group)
    parts = _parts(x)
    T = parts[0][0].shape[0]
    ok_T = valid_rows(valid_counts_L, X)
    if parts[0][0].device.type != "cpu":  # every row, then zeros: no host sync for the indices
        return torch.where(ok_T, _fingerprint_parts(parts, version), 0)
    idx = torch.nonzero(ok_T).flatten()
    out = torch.zeros(T, dtype=torch.int64)
    out[idx] = _fingerprint_parts([(bits[idx], mask) for bits, mask in parts], version)
    return out


def rows_finite(x: RowsIn, *, valid_counts_L: Optional[torch.Tensor] = None,
                rows_per_group: Optional[int] = None) -> torch.Tensor:
    """[T] bool: row t of x (and of an FP8 pair's scales) holds no NaN/inf in its bfloat16,
    float16 or float32 values; other dtypes (FP8 codes, ints) are not checked. Rows outside
    valid_counts_L (arguments as in fingerprint_rows) are True."""
    if valid_counts_L is not None:
        x, X = _flat_groups(x, valid_counts_L, rows_per_group)
    parts = list(x) if isinstance(x, (tuple, list)) else [x]
    ok = torch.ones(parts[0].shape[0], dtype=torch.bool, device=parts[0].device)
    for p in parts:
        if p.dtype in FLOAT_DTYPES and p.numel():
            ok &= torch.isfinite(p).all(dim=1)
    if valid_counts_L is not None:
        ok |= ~valid_rows(valid_counts_L, X)
    return ok
