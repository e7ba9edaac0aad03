"""Token fingerprints: the documented definitions (v1 and v2), determinism, single-bit and order
sensitivity, valid-rows-only hashing of grouped buffers."""
from __future__ import annotations

import pytest
import torch

from epreplay.format import fingerprint as fpmod
from epreplay.format.fingerprint import CURRENT, fingerprint_rows, rows_finite

MASK = (1 << 64) - 1
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2]
WIDTH = {torch.bfloat16: 16, torch.float16: 16, torch.float32: 32, torch.float8_e4m3fn: 8,
         torch.float8_e5m2: 8, torch.int8: 8, torch.bool: 8, torch.int32: 32, torch.int16: 16}
VIEW = {16: torch.int16, 32: torch.int32, 8: torch.uint8}


def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def reference_v1(words: list[int]) -> int:
    """The module docstring's version 1, transcribed with Python integers."""
    acc = 0
    for j, w in enumerate(words):
        acc = (acc + _mix(((j << 32) | w) ^ 0x9E3779B97F4A7C15)) & MASK
    return _mix(acc ^ len(words) ^ 0xD1B54A32D192ED03)


def reference_v2(*parts: tuple[list[int], int]) -> int:
    """The module docstring's version 2 for (words, word width) parts (x, then an FP8 pair's
    scales), transcribed with Python integers."""
    acc = k = n = 0
    for words, b in parts:
        p = 64 // b
        for i in range(0, len(words), p):
            lane = sum(w << (b * j) for j, w in enumerate(words[i:i + p]))
            acc = (acc + _mix(lane ^ ((k * 0xC2B2AE3D27D4EB4F) & MASK) ^ 0x9E3779B97F4A7C15)) & MASK
            k += 1
        n += len(words)
    return _mix(acc ^ n ^ 0xD1B54A32D192ED03)


def reference(version: int, *parts: tuple[list[int], int]) -> int:
    if version == 1:
        return reference_v1([w for words, _ in parts for w in words])
    return reference_v2(*parts)


def words_of(row: torch.Tensor) -> tuple[list[int], int]:
    width = WIDTH[row.dtype]
    bits = row.to(torch.uint8) if row.dtype == torch.bool else row.view(VIEW[width])
    return [int(v) & ((1 << width) - 1) for v in bits.tolist()], width


def rand(dtype: torch.dtype, T: int, H: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(T, H, generator=g) > 0.5
    if dtype in (torch.int8, torch.int16, torch.int32):
        return torch.randint(-100, 100, (T, H), generator=g).to(dtype)
    return (torch.randn(T, H, generator=g) * 4).to(dtype)


def u64(fp: torch.Tensor) -> list[int]:
    return [int(v) & MASK for v in fp.tolist()]


def test_current_version_is_two() -> None:
    x = rand(torch.bfloat16, 3, 16)
    assert CURRENT == 2
    assert torch.equal(fingerprint_rows(x), fingerprint_rows(x, version=2))
    assert not torch.equal(fingerprint_rows(x, version=1), fingerprint_rows(x, version=2))
    with pytest.raises(ValueError, match="unknown fingerprint version 3"):
        fingerprint_rows(x, version=3)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES + [torch.int8, torch.bool, torch.int32, torch.int16])
@pytest.mark.parametrize("H", [19, 32])  # 19: a zero-padded last lane (and a copy) in v2
def test_matches_the_documented_definition(version: int, dtype: torch.dtype, H: int) -> None:
    x = rand(dtype, 4, H)
    want = [reference(version, words_of(x[t])) for t in range(4)]
    assert u64(fingerprint_rows(x, version=version)) == want


@pytest.mark.parametrize("version", [1, 2])
def test_fp8_pair_is_the_concatenation_of_value_and_scale_bits(version: int) -> None:
    x = rand(torch.float8_e4m3fn, 3, 256)
    scales = torch.rand(3, 3) + 0.5  # 3 scales: the scales' last lane is padded in v2
    fp = fingerprint_rows((x, scales), version=version)
    want = [reference(version, words_of(x[t]), words_of(scales[t])) for t in range(3)]
    assert u64(fp) == want
    assert fp.tolist() != fingerprint_rows(x, version=version).tolist()
    scales2 = scales.clone()
    scales2[1, 1] = torch.nextafter(scales2[1, 1], torch.tensor(2.0))
    changed = fingerprint_rows((x, scales2), version=version)
    assert (changed != fp).tolist() == [False, True, False]


def test_v2_scale_lanes_follow_the_value_lanes() -> None:
    """x with H = 12 FP8 words (2 lanes, the second half padding) then 2 scale words (lane 2):
    the documented positions, written out by hand."""
    x = torch.arange(1, 25, dtype=torch.uint8).reshape(2, 12).view(torch.float8_e4m3fn)
    s = torch.tensor([[1.5, -2.0], [0.25, 8.0]])
    for t in range(2):
        w = [int(v) for v in x[t].view(torch.uint8).tolist()]
        sw = [int(v) & MASK for v in s[t].view(torch.int32).tolist()]
        lanes = [sum(b << (8 * i) for i, b in enumerate(w[:8])), sum(b << (8 * i) for i, b in enumerate(w[8:])),
                 (sw[0] & 0xFFFFFFFF) | ((sw[1] & 0xFFFFFFFF) << 32)]
        acc = sum(_mix(lane ^ ((k * 0xC2B2AE3D27D4EB4F) & MASK) ^ 0x9E3779B97F4A7C15)
                  for k, lane in enumerate(lanes)) & MASK
        assert u64(fingerprint_rows((x, s), version=2))[t] == _mix(acc ^ 14 ^ 0xD1B54A32D192ED03)


def test_known_answer_pins_the_definition() -> None:
    """Fixed vectors: any change to a definition (constants, order) breaks recorded runs."""
    x = torch.arange(8, dtype=torch.float32).reshape(2, 4).to(torch.bfloat16)
    assert u64(fingerprint_rows(x, version=1)) == KNOWN_V1
    assert u64(fingerprint_rows(x, version=2)) == KNOWN_V2
    assert KNOWN_V2 == [reference_v2(words_of(x[t])) for t in range(2)]


KNOWN_V1 = [0x3CE7209841BEF36D, 0xC9B2681626936752]  # bf16 rows [0, 1, 2, 3] and [4, 5, 6, 7]
KNOWN_V2 = [0x995C9D98D19F8C89, 0x097CF8FC1F8558F6]  # the same rows, version 2


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_single_bit_flip_changes_only_its_row(version: int, dtype: torch.dtype) -> None:
    x = rand(dtype, 3, 12, seed=1)
    base = fingerprint_rows(x, version=version)
    width = WIDTH[dtype]
    bits = x.view(VIEW[width])
    for h in range(12):
        for b in range(width):
            y = bits.clone()
            y[1, h] ^= torch.tensor(1 << b if b < width - 1 or width == 8 else -(1 << b), dtype=y.dtype)
            got = fingerprint_rows(y.view(dtype), version=version)
            assert got[1] != base[1], (h, b)
            assert got[0] == base[0] and got[2] == base[2]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_order_along_hidden_matters(version: int, dtype: torch.dtype) -> None:
    x = rand(dtype, 64, 32, seed=2)
    bits = x.view(VIEW[WIDTH[dtype]])  # reorder the bits (fp8 has no CPU flip/roll/indexing)
    base = fingerprint_rows(x, version=version)
    again = lambda y: fingerprint_rows(y.view(dtype), version=version)  # noqa: E731
    assert (again(bits.flip(1)) != base).all()
    assert (again(bits.roll(1, dims=1)) != base).all()
    assert (again(bits.roll(8, dims=1)) != base).all()  # whole lanes move (v2: 8 fp8 words)
    swapped = bits.clone()
    swapped[:, [3, 7]] = swapped[:, [7, 3]]  # within one v2 lane for 8-bit words, across for others
    differs = swapped[:, 3] != bits[:, 3]
    assert differs.any()
    assert ((again(swapped) != base) == differs).all()


@pytest.mark.parametrize("version", [1, 2])
def test_deterministic_across_calls_layouts_and_chunking(version: int, monkeypatch: pytest.MonkeyPatch) -> None:
    x = rand(torch.bfloat16, 300, 70, seed=3)
    base = fingerprint_rows(x, version=version)
    assert torch.equal(base, fingerprint_rows(x.clone(), version=version))
    assert torch.equal(base, fingerprint_rows(x.t().contiguous().t(), version=version))  # column-major
    wide = torch.zeros(300, 75, dtype=torch.bfloat16)
    wide[:, 1:71] = x
    assert torch.equal(base, fingerprint_rows(wide[:, 1:71], version=version))  # unaligned start
    monkeypatch.setattr(fpmod, "_CHUNK_ELEMS", 7 * 70)  # 7-row chunks (v2: 39): same bits
    assert torch.equal(base, fingerprint_rows(x, version=version))
    assert base.dtype == torch.int64 and base.shape == (300,)
    assert len(set(base.tolist())) == 300  # distinct rows, distinct fingerprints


def test_v2_lane_view_and_padded_copy_agree() -> None:
    """H * 16 % 64 == 0 takes the zero-copy int64 view; the same rows inside a wider buffer
    (an unaligned or odd row stride) take the padded copy: same bits."""
    x = rand(torch.bfloat16, 50, 64, seed=5)
    assert fpmod.lanes_view(x.view(torch.int16)) is not None
    base = fingerprint_rows(x)
    for pad in (1, 2, 4):
        buf = torch.zeros(50, 64 + pad, dtype=torch.bfloat16)
        buf[:, pad:] = x
        assert torch.equal(fingerprint_rows(buf[:, pad:]), base), pad


@pytest.mark.parametrize("version", [1, 2])
def test_equal_rows_equal_fingerprints_and_sign_of_zero_counts(version: int) -> None:
    x = torch.zeros(3, 8, dtype=torch.bfloat16)
    x[2, 5] = -0.0
    fp = fingerprint_rows(x, version=version)
    assert fp[0] == fp[1] and fp[2] != fp[0]


def test_v2_padding_does_not_alias_a_longer_row() -> None:
    x = rand(torch.bfloat16, 2, 3)
    longer = torch.cat([x, torch.zeros(2, 1, dtype=torch.bfloat16)], dim=1)  # same lanes
    assert (fingerprint_rows(x) != fingerprint_rows(longer)).all()


@pytest.mark.parametrize("version", [1, 2])
def test_empty_shapes_and_bad_input(version: int) -> None:
    assert fingerprint_rows(torch.zeros(0, 16, dtype=torch.bfloat16), version=version).shape == (0,)
    assert u64(fingerprint_rows(torch.zeros(2, 0), version=version)) == [reference(version, ([], 32))] * 2
    with pytest.raises(ValueError, match=r"\[T, H\]"):
        fingerprint_rows(torch.zeros(4), version=version)
    with pytest.raises(ValueError, match="unsupported dtype"):
        fingerprint_rows(torch.zeros(2, 2, dtype=torch.float64), version=version)
    with pytest.raises(ValueError, match="same T"):
        fingerprint_rows((torch.zeros(2, 128, dtype=torch.float8_e4m3fn), torch.zeros(3, 1)), version=version)


@pytest.mark.parametrize("version", [1, 2])
def test_valid_rows_only(version: int) -> None:
    """A low-latency buffer [L, X, H]: rows [0, count[l]) of each group are hashed, others 0."""
    L, X, H = 3, 5, 24
    x = rand(torch.bfloat16, L * X, H, seed=6)
    counts = torch.tensor([2, 0, 5], dtype=torch.int32)
    full = fingerprint_rows(x, version=version).view(L, X)
    want = torch.zeros(L, X, dtype=torch.int64)
    for l, c in enumerate(counts.tolist()):
        want[l, :c] = full[l, :c]
    flat = fingerprint_rows(x, version=version, valid_counts_L=counts, rows_per_group=X)
    assert torch.equal(flat, want.reshape(-1))
    grouped = fingerprint_rows(x.view(L, X, H), version=version, valid_counts_L=counts.long())
    assert torch.equal(grouped, flat)
    # an FP8 pair, each half [L, X, *]; the invalid rows may hold anything (here: NaN scales)
    q = rand(torch.float8_e4m3fn, L * X, 128, seed=7)
    s = torch.rand(L * X, 1) + 0.5
    s.view(L, X, 1)[0, 3:] = float("nan")
    pair = fingerprint_rows((q.view(L, X, 128), s.view(L, X, 1)), version=version, valid_counts_L=counts)
    full = fingerprint_rows((q, s), version=version).view(L, X)
    assert torch.equal(pair.view(L, X)[counts[:, None] > torch.arange(X)], full[counts[:, None] > torch.arange(X)])
    assert rows_finite((q, s), valid_counts_L=counts, rows_per_group=X).all()
    assert not rows_finite((q, s)).all()
    with pytest.raises(ValueError, match="groups"):
        fingerprint_rows(x, valid_counts_L=counts, rows_per_group=4)
    with pytest.raises(ValueError, match="rows_per_group"):
        fingerprint_rows(x, valid_counts_L=counts)


def test_rows_finite() -> None:
    x = rand(torch.bfloat16, 4, 8)
    x[1, 3] = float("inf")
    x[2, 0] = float("nan")
    assert rows_finite(x).tolist() == [True, False, False, True]
    assert rows_finite(x.float()).tolist() == [True, False, False, True]
    assert rows_finite(rand(torch.float8_e4m3fn, 2, 8)).all()  # FP8 codes are not checked


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_cpu_bit_for_bit() -> None:
    for version in (1, 2):
        for dtype in DTYPES:
            x = rand(dtype, 513, 7168, seed=4)
            assert torch.equal(fingerprint_rows(x, version=version),
                               fingerprint_rows(x.cuda(), version=version).cpu())
        x = rand(torch.bfloat16, 6 * 40, 7168, seed=4).cuda()
        counts = torch.tensor([3, 0, 40, 1, 7, 39], device="cuda")
        assert torch.equal(fingerprint_rows(x, version=version, valid_counts_L=counts, rows_per_group=40).cpu(),
                           fingerprint_rows(x.cpu(), version=version, valid_counts_L=counts.cpu(), rows_per_group=40))
