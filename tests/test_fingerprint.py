"""Token fingerprints: the documented definition, determinism, single-bit and order sensitivity."""
from __future__ import annotations

import pytest
import torch

from epreplay import fingerprint as fpmod
from epreplay.fingerprint import fingerprint_rows

MASK = (1 << 64) - 1
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2]
WIDTH = {torch.bfloat16: 16, torch.float16: 16, torch.float32: 32, torch.float8_e4m3fn: 8,
         torch.float8_e5m2: 8}
VIEW = {16: torch.int16, 32: torch.int32, 8: torch.uint8}


def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def reference(words: list[int]) -> int:
    """The module docstring's definition, transcribed with Python integers."""
    acc = 0
    for j, w in enumerate(words):
        acc = (acc + _mix(((j << 32) | w) ^ 0x9E3779B97F4A7C15)) & MASK
    return _mix(acc ^ len(words) ^ 0xD1B54A32D192ED03)


def words_of(row: torch.Tensor) -> list[int]:
    width = WIDTH[row.dtype]
    return [int(v) & ((1 << width) - 1) for v in row.view(VIEW[width]).tolist()]


def rand(dtype: torch.dtype, T: int, H: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, H, generator=g) * 4).to(dtype)


def u64(fp: torch.Tensor) -> list[int]:
    return [int(v) & MASK for v in fp.tolist()]


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_the_documented_definition(dtype: torch.dtype) -> None:
    x = rand(dtype, 4, 19)
    assert u64(fingerprint_rows(x)) == [reference(words_of(x[t])) for t in range(4)]


def test_fp8_pair_is_the_concatenation_of_value_and_scale_bits() -> None:
    x = rand(torch.float8_e4m3fn, 3, 256)
    scales = torch.rand(3, 2) + 0.5
    fp = fingerprint_rows((x, scales))
    want = [reference(words_of(x[t]) + words_of(scales[t])) for t in range(3)]
    assert u64(fp) == want
    assert fp.tolist() != fingerprint_rows(x).tolist()
    scales2 = scales.clone()
    scales2[1, 1] = torch.nextafter(scales2[1, 1], torch.tensor(2.0))
    changed = fingerprint_rows((x, scales2))
    assert (changed != fp).tolist() == [False, True, False]


def test_known_answer_pins_the_definition() -> None:
    """A fixed vector: any change to the definition (constants, order) breaks recorded runs."""
    x = torch.arange(8, dtype=torch.float32).reshape(2, 4).to(torch.bfloat16)
    assert u64(fingerprint_rows(x)) == [reference(words_of(x[0])), reference(words_of(x[1]))]
    assert u64(fingerprint_rows(x)) == KNOWN


KNOWN = [0x3CE7209841BEF36D, 0xC9B2681626936752]  # bf16 rows [0, 1, 2, 3] and [4, 5, 6, 7]


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_single_bit_flip_changes_only_its_row(dtype: torch.dtype) -> None:
    x = rand(dtype, 3, 12, seed=1)
    base = fingerprint_rows(x)
    width = WIDTH[dtype]
    bits = x.view(VIEW[width])
    for h in range(12):
        for b in range(width):
            y = bits.clone()
            y[1, h] ^= torch.tensor(1 << b if b < width - 1 or width == 8 else -(1 << b), dtype=y.dtype)
            got = fingerprint_rows(y.view(dtype))
            assert got[1] != base[1], (h, b)
            assert got[0] == base[0] and got[2] == base[2]


@pytest.mark.parametrize("dtype", DTYPES)
def test_order_along_hidden_matters(dtype: torch.dtype) -> None:
    x = rand(dtype, 64, 32, seed=2)
    bits = x.view(VIEW[WIDTH[dtype]])  # reorder the bits (fp8 has no CPU flip/roll/indexing)
    base = fingerprint_rows(x)
    assert (fingerprint_rows(bits.flip(1).view(dtype)) != base).all()
    assert (fingerprint_rows(bits.roll(1, dims=1).view(dtype)) != base).all()
    swapped = bits.clone()
    swapped[:, [3, 7]] = swapped[:, [7, 3]]
    differs = swapped[:, 3] != bits[:, 3]
    assert differs.any()
    assert ((fingerprint_rows(swapped.view(dtype)) != base) == differs).all()


def test_deterministic_across_calls_layouts_and_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    x = rand(torch.bfloat16, 300, 70, seed=3)
    base = fingerprint_rows(x)
    assert torch.equal(base, fingerprint_rows(x.clone()))
    assert torch.equal(base, fingerprint_rows(x.t().contiguous().t()))  # column-major strides
    monkeypatch.setattr(fpmod, "_CHUNK_ELEMS", 7 * 70)  # 7-row chunks: same bits
    assert torch.equal(base, fingerprint_rows(x))
    assert base.dtype == torch.int64 and base.shape == (300,)
    assert len(set(base.tolist())) == 300  # distinct rows, distinct fingerprints


def test_equal_rows_equal_fingerprints_and_sign_of_zero_counts() -> None:
    x = torch.zeros(3, 8, dtype=torch.bfloat16)
    x[2, 5] = -0.0
    fp = fingerprint_rows(x)
    assert fp[0] == fp[1] and fp[2] != fp[0]


def test_empty_shapes_and_bad_input() -> None:
    assert fingerprint_rows(torch.zeros(0, 16, dtype=torch.bfloat16)).shape == (0,)
    assert u64(fingerprint_rows(torch.zeros(2, 0))) == [reference([])] * 2
    with pytest.raises(ValueError, match=r"\[T, H\]"):
        fingerprint_rows(torch.zeros(4))
    with pytest.raises(ValueError, match="unsupported dtype"):
        fingerprint_rows(torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="same T"):
        fingerprint_rows((torch.zeros(2, 128, dtype=torch.float8_e4m3fn), torch.zeros(3, 1)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_cpu_bit_for_bit() -> None:
    for dtype in DTYPES:
        x = rand(dtype, 513, 7168, seed=4)
        assert torch.equal(fingerprint_rows(x), fingerprint_rows(x.cuda()).cpu())
