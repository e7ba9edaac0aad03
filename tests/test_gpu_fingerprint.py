"""The Triton fingerprint kernels equal the torch reference bit for bit (versions 1 and 2).

On a GPU machine the kernels run on CUDA tensors at DeepSeek-V3 shapes. Without a GPU the same
kernels run under Triton's interpreter (TRITON_INTERPRET=1) when Triton is installed, so the
definitions are checked on CPU too; with neither, the tests skip with the reason.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from epreplay.format.fingerprint import fingerprint_rows, rows_finite

triton = pytest.importorskip("triton", reason="Triton is not installed (GPU images have it)")

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _rows(T: int, H: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(T * 31 + H)
    x = torch.randn(T, H, generator=g) * 3
    return x.to(dtype).to(device)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", [(128, 7168), (4096, 7168), (3, 5000), (0, 7168), (7, 1)])
def test_kernel_matches_reference_on_gpu(version, dtype, T, H):
    from epreplay.format.fingerprint_gpu import fingerprint_rows_triton

    x = _rows(T, H, dtype, "cuda")
    assert torch.equal(fingerprint_rows_triton(x, version=version).cpu(),
                       fingerprint_rows(x.cpu(), version=version))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("version", [1, 2])
def test_kernel_matches_reference_fp8_pair_and_strided(version):
    from epreplay.format.fingerprint_gpu import fingerprint_rows_triton

    x = _rows(256, 7168, torch.float8_e4m3fn, "cuda")
    scales = torch.rand(256, 56, device="cuda")
    assert torch.equal(fingerprint_rows_triton((x, scales), version=version).cpu(),
                       fingerprint_rows((x.cpu(), scales.cpu()), version=version))
    wide = _rows(64, 2 * 7168, torch.bfloat16, "cuda")[:, ::2]  # non-contiguous rows
    assert torch.equal(fingerprint_rows_triton(wide, version=version).cpu(),
                       fingerprint_rows(wide.cpu(), version=version))


@pytest.mark.gpu
@cuda
def test_kernel_valid_rows_of_a_low_latency_buffer():
    """DeepEP's LL receive layout: x [L, X, H] e4m3, scales [L, X, S] with X-strided columns."""
    from epreplay.format.fingerprint_gpu import fingerprint_rows_triton

    L, X, H = 8, 2 * 128, 7168
    q = _rows(L * X, H, torch.float8_e4m3fn, "cuda").view(L, X, H)
    s = torch.rand(L, H // 128, X, device="cuda").transpose(1, 2)
    s[1, 200:] = float("nan")  # garbage past the count: neither hashed nor flagged
    counts = torch.tensor([0, 200, 256, 1, 17, 128, 3, 90], dtype=torch.int32, device="cuda")
    fp, finite = fingerprint_rows_triton((q, s), valid_counts_L=counts, with_finite=True)
    want = fingerprint_rows((q.cpu(), s.cpu()), valid_counts_L=counts.cpu())
    assert torch.equal(fp.cpu(), want) and bool(finite.all())
    x = _rows(L * X, H, torch.bfloat16, "cuda")
    fp, finite = fingerprint_rows_triton(x, valid_counts_L=counts.long(), rows_per_group=X, with_finite=True)
    assert torch.equal(fp.cpu(), fingerprint_rows(x.cpu(), valid_counts_L=counts.cpu(), rows_per_group=X))
    assert torch.equal(finite.cpu(), rows_finite(x.cpu(), valid_counts_L=counts.cpu(), rows_per_group=X))


# Run in a child under TRITON_INTERPRET=1 (the flag is read when Triton is imported): every path
# of the v2 kernel (int64 lanes, packed words, split rows P > 1, FP8 pairs with X-strided scales,
# valid rows, the finite flag) and the v1 kernel, against the reference.
_INTERPRETED = """
import torch
from epreplay.format import fingerprint_gpu as G
from epreplay.format.fingerprint import fingerprint_rows as ref, rows_finite
from epreplay.format.fingerprint_gpu import fingerprint_rows_fast, fingerprint_rows_triton as K

g = torch.Generator().manual_seed(0)

def rows(T, H, dt=torch.bfloat16):
    if dt == torch.bool:
        return torch.rand(T, H, generator=g) > 0.5
    if dt == torch.int8:
        return torch.randint(-128, 128, (T, H), generator=g).to(dt)
    return (torch.randn(T, H, generator=g) * 3).to(dt)

DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.int8, torch.bool)
for dt in DTYPES:
    for T, H in ((4, 1100), (3, 7), (5, 64), (0, 64), (2, 1), (3, 0)):
        x = rows(T, H, dt)
        for v in (1, 2):
            assert torch.equal(K(x, version=v), ref(x, version=v)), (dt, T, H, v)
x = rows(4, 4100)  # 1025 lanes: split over 3 programs and finished by the second kernel
for v in (1, 2):
    assert torch.equal(K(x, version=v), ref(x, version=v))
for H, S in ((5000, 40), (5001, 41), (256, 2)):
    q, s = rows(3, H, torch.float8_e4m3fn), torch.rand(3, S, generator=g)
    for v in (1, 2):
        assert torch.equal(K((q, s), version=v), ref((q, s), version=v)), (H, S, v)
y = q.clone().view(torch.uint8); y[1, 7] ^= 1
assert (K((y.view(torch.float8_e4m3fn), s)) != K((q, s))).tolist() == [False, True, False]
wide = rows(6, 2 * 700)
for view in (wide[:, ::2], wide[:, 3:703], wide[::2, 4:704], rows(9, 33).t().contiguous().t()):
    assert torch.equal(K(view), ref(view))

L, X, H = 3, 7, 256
q = rows(L * X, H, torch.float8_e4m3fn).view(L, X, H)
s = torch.rand(L, H // 128, X, generator=g).transpose(1, 2)  # [L, X, S], DeepEP's LL layout
counts = torch.tensor([2, 0, 7], dtype=torch.int32)
s[0, 5, 1] = float("nan")  # past group 0's count: not read
s[2, 3, 0] = float("inf")
fp, fin = K((q, s), valid_counts_L=counts, with_finite=True)
assert torch.equal(fp, ref((q, s), valid_counts_L=counts))
assert torch.equal(fin, rows_finite((q, s), valid_counts_L=counts)) and fin.tolist().count(False) == 1
x = rows(L * X, 3000)
x[4, 7], x[9, 0], x[1, 2999] = float("nan"), float("-inf"), float("inf")
c = torch.tensor([3, 7, 0])
for programs in (2048, 4):  # one program per row, and rows split over several
    G.TARGET_PROGRAMS = programs
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        y = x.to(dt)
        for v in (1, 2):
            fp, fin = K(y, version=v, valid_counts_L=c, rows_per_group=X, with_finite=True)
            assert torch.equal(fp, ref(y, version=v, valid_counts_L=c, rows_per_group=X)), (dt, v)
            assert torch.equal(fin, rows_finite(y, valid_counts_L=c, rows_per_group=X)), (dt, v)
            fp, fin = K(y, version=v, with_finite=True)
            assert torch.equal(fp, ref(y, version=v)) and torch.equal(fin, rows_finite(y)), (dt, v)
G.TARGET_PROGRAMS = 2048
assert torch.equal(fingerprint_rows_fast(x, valid_counts_L=c, rows_per_group=X),
                   ref(x, valid_counts_L=c, rows_per_group=X))
assert K(rows(0, 64), valid_counts_L=torch.zeros(0, dtype=torch.int32), rows_per_group=5).shape == (0,)
print("ok")
"""


def _triton_version() -> tuple[int, ...]:
    import triton

    return tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())


def test_kernels_match_reference_in_interpreter():
    # Triton 3.6's interpreter cannot take a 0-d array where the compiled kernel takes a scalar
    # (seen on the H200 image; the compiled kernels pass the GPU tests in this file there).
    if _triton_version() < (3, 8):
        pytest.skip(f"triton {'.'.join(map(str, _triton_version()))}: the interpreter path needs "
                    f"triton >= 3.8 (the compiled kernels are tested on the GPU)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(_INTERPRETED)], env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_kernel_refuses_cpu_tensors_outside_the_interpreter():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("running under the interpreter")
    from epreplay.format.fingerprint_gpu import fingerprint_rows_fast, fingerprint_rows_triton

    x = _rows(2, 64, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fingerprint_rows_triton(x)
    assert torch.equal(fingerprint_rows_fast(x), fingerprint_rows(x))  # the reference on CPU
