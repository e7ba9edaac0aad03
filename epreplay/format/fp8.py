"""DeepEP's FP8 cast for low-latency dispatch (per 128 values of a row), and its inverse.

Legend: T tokens (rows), H hidden, S = H / 128 scale groups per row.

DeepEP's low-latency kernel casts each group of 128 bf16 values of a row on its own:
    amax  = max(1e-4, max |x|)                       (1e-4 keeps all-zero groups finite)
    scale = 448 / amax ; stored scale_inv = amax * (1/448)   (448 = largest finite e4m3 value)
    value = saturate_to_e4m3(x * scale)
With `round_scale` the scale is a power of two: scale_inv = 2^ceil(log2(amax * (1/448))),
computed on the float32 bits exactly as DeepEP's `fast_log2_ceil` does. With `use_ue8m0`
(only with round_scale) the stored scale is its 8-bit exponent, four of them packed per int32.
All arithmetic is float32, as on the GPU, so the emulation gives the same bytes.
"""
from __future__ import annotations

import torch

GROUP = 128  # values per scale; DeepEP's `kNumPerChannels`
E4M3_MAX = 448.0  # largest finite float8_e4m3fn value (kFinfoAmaxE4M3)
FP8_MARGIN = 1e-4  # DeepEP's kFP8Margin: the amax floor


def _ceil_log2_bits(v: torch.Tensor) -> torch.Tensor:
    """ceil(log2(v)) for positive normal float32 `v`, from its bits (DeepEP's fast_log2_ceil)."""
    bits = v.contiguous().view(torch.int32)
    exp = (bits >> 23) & 0xFF
    mantissa = bits & ((1 << 23) - 1)
    return exp - 127 + (mantissa != 0).to(torch.int32)


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e as float32 for int32 `e` in [-126, 127], built from the exponent bits (fast_pow2)."""
    return ((e + 127) << 23).to(torch.int32).view(torch.float32)


def cast_fp8(x_TH: torch.Tensor, *, round_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast bf16 rows to (e4m3 values, float32 scale_inv) the way DeepEP's LL dispatch does.

    Args:
        x_TH: [T, H] bf16 (any float dtype is read as float32), H a multiple of 128.
        round_scale: power-of-two scales (DeepEP's `round_scale=True`).

    Returns:
        (x_fp8 [T, H] float8_e4m3fn, scale_inv_TS [T, S] float32); x ~= x_fp8 * scale_inv per group.
    """
    T, H = x_TH.shape
    if H % GROUP:
        raise ValueError(f"hidden={H}: the FP8 cast needs a multiple of {GROUP}")
    xf = x_TH.float().view(T, H // GROUP, GROUP)
    amax_TS = xf.abs().amax(dim=-1).clamp_min(FP8_MARGIN)
    # a fill, not torch.tensor(): no host-to-device copy, so the cast can run inside a CUDA graph capture
    inv448 = torch.full((), 1.0 / E4M3_MAX, dtype=torch.float32, device=x_TH.device)
    if round_scale:
        e_TS = _ceil_log2_bits(amax_TS * inv448)
        scale_TS, scale_inv_TS = _pow2(-e_TS), _pow2(e_TS)
    else:
        scale_inv_TS = amax_TS * inv448
        # A true float32 division, as the kernel's `kFinfoAmaxE4M3 / amax`: torch evaluates
        # `scalar / tensor` as `tensor.reciprocal() * scalar`, which differs in the last bit for
        # ~1/4 of the values and so changes some e4m3 codes (seen against real DeepEP on H200).
        scale_TS = torch.full_like(amax_TS, E4M3_MAX) / amax_TS
    # SATFINITE: clamp before the cast (torch turns out-of-range values into NaN instead)
    y = (xf * scale_TS.unsqueeze(-1)).clamp_(-E4M3_MAX, E4M3_MAX)
    return y.view(T, H).to(torch.float8_e4m3fn), scale_inv_TS.contiguous()


def ue8m0_pack(scale_inv_TS: torch.Tensor) -> torch.Tensor:
    """Power-of-two float32 scales [T, S] -> their exponent bytes packed 4 per int32 [T, S/4].

    Byte j of int32 i holds the exponent of group 4*i + j (little-endian, as DeepEP stores it).
    """
    T, S = scale_inv_TS.shape
    if S % 4:
        raise ValueError(f"{S} scale groups: UE8M0 packing needs a multiple of 4 (hidden % 512 == 0)")
    exp_TS = ((scale_inv_TS.contiguous().view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
    return exp_TS.view(T, S // 4, 4).contiguous().view(torch.int32).view(T, S // 4)


def ue8m0_unpack(packed_TQ: torch.Tensor) -> torch.Tensor:
    """Inverse of `ue8m0_pack`: int32 [T, S/4] -> float32 power-of-two scales [T, S]."""
    T, Q = packed_TQ.shape
    exp_TS = packed_TQ.contiguous().view(torch.uint8).view(T, Q * 4).to(torch.int32)
    return (exp_TS << 23).view(torch.float32)


def dequant_fp8(x_fp8_TH: torch.Tensor, scale_inv_TS: torch.Tensor) -> torch.Tensor:
    """(e4m3 values [T, H], float32 scales [T, S]) -> float32 [T, H]; DeepEP tests' cast-back."""
    T, H = x_fp8_TH.shape
    xf = x_fp8_TH.float().view(T, H // GROUP, GROUP)
    return (xf * scale_inv_TS.float().unsqueeze(-1)).view(T, H)
