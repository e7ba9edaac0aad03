"""Replay inputs: recorded arrays as torch tensors, synthetic payloads, the synthetic experts.

Legend: T tokens of a virtual rank, K top-k, H hidden, S = H / 128 FP8 scale groups,
N rows received, E experts.

Synthetic payload: when a recording holds no payload, row t of virtual rank v at a call is
generated from (run, step, layer, dispatch seq, v, t) alone by a counter-based hash, so ANY
process can produce ANY source's row: a receiver recomputes what it should have received
without talking to the sender, and the expected fingerprints follow.

Synthetic experts: expert e multiplies its rows by `expert_scale(e)`, a power of two, so
`bf16(row * scale)` is exact and a combine's reference output is computable on the source side
from its own tokens, routing and weights.
"""
from __future__ import annotations

import zlib
from typing import Any, Mapping

import numpy as np
import torch

from epreplay.format.codec import LOGICAL_KEY

_MASK64 = (1 << 64) - 1


def _s64(c: int) -> int:
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


_M1, _M2 = _s64(0xBF58476D1CE4E5B9), _s64(0x94D049BB133111EB)
_GOLD = _s64(0x9E3779B97F4A7C15)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finalizer on int64 tensors (multiplication wraps modulo 2**64)."""
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def call_key(run_id: str, step: int, layer: int, seq: int) -> int:
    """A 63-bit key naming one dispatch's synthetic payload."""
    return zlib.crc32(f"{run_id}/{step}/{layer}/{seq}".encode()) * 0x10001 & ((1 << 62) - 1)


def synth_rows(key: int, src_N: torch.Tensor, tok_N: torch.Tensor, hidden: int) -> torch.Tensor:
    """Synthetic payload rows for (source virtual rank, source token) pairs.

    Args:
        key: call_key(...) of the dispatch.
        src_N: [N] int64 source virtual rank of each row. tok_N: [N] int64 source token index.
        hidden: H.
    Returns:
        [N, H] bf16, values in [-2, 2) on a 1/64 grid (exact in bf16, never NaN/inf).
    """
    row = _mix((src_N.to(torch.int64) << 40) ^ (tok_N.to(torch.int64) << 8) ^ key)  # [N], well mixed
    # One multiply per element (a Weyl sequence per row, top byte of the product): a full mix per
    # element cost more than the rest of the replay's verification. Rows differ through `row`.
    pos = torch.arange(1, hidden + 1, dtype=torch.int64) * _GOLD  # [H]
    z = (row[:, None] + pos[None, :]) * _M2  # [N, H]
    return ((_shr(z, 56) - 128).to(torch.float32) / 64.0).to(torch.bfloat16)


def synth_source(key: int, v: int, tokens: int, hidden: int) -> torch.Tensor:
    """Virtual rank v's synthetic x [T, H] bf16 for the dispatch named by `key`."""
    t = torch.arange(tokens, dtype=torch.int64)
    return synth_rows(key, torch.full_like(t, v), t, hidden)


def expert_scale(experts_E: torch.Tensor) -> torch.Tensor:
    """The synthetic expert function's factor per global expert id: 2**((e % 5) - 2), i.e.
    0.25 .. 4, exact in bf16 multiplication. [*] int64 -> [*] float32."""
    return torch.pow(2.0, (experts_E % 5).to(torch.float32) - 2.0)


def to_fp8(x_TH: torch.Tensor, *, round_scale: bool = False, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepEP's per-128-value FP8 cast of a bf16 [T, H] (epreplay.format.fp8, bit-exact with the LL
    kernel's): (e4m3 [T, H], float32 scales [T, H/128]), or with ue8m0 the scales' exponent
    bytes packed into int32 [T, H/512]."""
    from epreplay.format import fp8

    q, s = fp8.cast_fp8(x_TH, round_scale=round_scale or ue8m0)
    return (q, fp8.ue8m0_pack(s)) if ue8m0 else (q, s)


def dequant(x: Any) -> torch.Tensor:
    """bf16/fp32 rows as float32, or an FP8 pair (e4m3 [T, H], scales [T, S]) dequantised."""
    if isinstance(x, (tuple, list)):
        q, s = x
        if s.dtype == torch.int32:  # UE8M0: exponent bytes packed four per int32
            from epreplay.format import fp8

            s = fp8.ue8m0_unpack(s)
        T, H = q.shape
        return (q.float().view(T, H // 128, 128) * s.float().unsqueeze(2)).view(T, H)
    return x.float()


def rows_of(x: Any, idx: torch.Tensor) -> Any:
    """Select rows of a tensor or an FP8 pair."""
    if isinstance(x, (tuple, list)):
        return tuple(p[idx] for p in x)
    return x[idx]


def cat_rows(parts: list[Any]) -> Any:
    """Concatenate rows of tensors (or of FP8 pairs, element-wise)."""
    if parts and isinstance(parts[0], (tuple, list)):
        return tuple(torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))
    return torch.cat(parts)


def tensor(record_arrays: Mapping[str, Any], meta: Mapping[str, Any], name: str) -> torch.Tensor | None:
    """A recorded array as a torch tensor, restoring bf16/fp8 from the codec's logical tag."""
    a = record_arrays.get(name)
    if a is None:
        return None
    logical = (meta.get(LOGICAL_KEY) or {}).get(name)
    t = torch.from_numpy(np.ascontiguousarray(a))
    if logical:
        t = t.view(getattr(torch, logical))
    return t


def recorded_x(arrays: Mapping[str, Any], meta: Mapping[str, Any]) -> Any:
    """The recorded dispatch payload: bf16 [T, H], or the FP8 pair when scales were recorded."""
    x = tensor(arrays, meta, "x_TH")
    if x is None:
        return None
    s = tensor(arrays, meta, "x_scales_TS")
    return (x, s.float()) if s is not None else x


def meta_value(meta: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    """The first of several spellings present in meta or meta['args'] (capture may nest
    the bound arguments under 'args', each either a plain value or {'value': ...})."""
    args = meta.get("args") if isinstance(meta.get("args"), Mapping) else {}
    for source in (meta, args):
        for n in names:
            if n in source:
                v = source[n]
                if isinstance(v, Mapping) and "value" in v:
                    v = v["value"]
                if v is not None:
                    return v
    return default


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepEP's test metric: 1 - 2*sum((x+1)(y+1)) / sum((x+1)^2 + (y+1)^2), in fp64.
    0 for equal tensors; ~ relative squared error otherwise."""
    x, y = x.double() + 1, y.double() + 1
    denom = (x * x + y * y).sum()
    if float(denom) == 0.0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denom)


def fingerprints(x: Any, *, version: int) -> np.ndarray:
    """Per-row fingerprints as uint64 numpy (the records' representation), by fingerprint
    definition `version` (Engine.fp_version says which: the recording's, when compared with it)."""
    from epreplay.format.fingerprint import fingerprint_rows

    if isinstance(x, (tuple, list)):
        x = tuple(p.contiguous() for p in x)
        if x[0].shape[0] == 0:
            return np.zeros(0, dtype=np.uint64)
    elif x.shape[0] == 0:
        return np.zeros(0, dtype=np.uint64)
    return fingerprint_rows(x, version=version).cpu().numpy().view(np.uint64)
