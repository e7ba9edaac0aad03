"""The Triton fingerprint kernel equals the torch reference bit for bit.

On a GPU machine the kernel runs on CUDA tensors at DeepSeek-V3 shapes. Without a GPU the same
kernel runs under Triton's interpreter (TRITON_INTERPRET=1) when Triton is installed, so the
definition is checked on CPU too; with neither, the tests skip with the reason.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from epreplay.fingerprint import fingerprint_rows

triton = pytest.importorskip("triton", reason="Triton is not installed (GPU images have it)")

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn]


def _rows(T: int, H: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(T * 31 + H)
    x = torch.randn(T, H, generator=g) * 3
    return x.to(dtype).to(device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", [(128, 7168), (4096, 7168), (3, 5000), (0, 7168), (7, 1)])
def test_kernel_matches_reference_on_gpu(dtype, T, H):
    from epreplay.fingerprint_gpu import fingerprint_rows_triton

    x = _rows(T, H, dtype, "cuda")
    assert torch.equal(fingerprint_rows_triton(x).cpu(), fingerprint_rows(x.cpu()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_matches_reference_fp8_pair_and_strided():
    from epreplay.fingerprint_gpu import fingerprint_rows_triton

    x = _rows(256, 7168, torch.float8_e4m3fn, "cuda")
    scales = torch.rand(256, 56, device="cuda")
    assert torch.equal(fingerprint_rows_triton((x, scales)).cpu(),
                       fingerprint_rows((x.cpu(), scales.cpu())))
    wide = _rows(64, 2 * 7168, torch.bfloat16, "cuda")[:, ::2]  # non-contiguous rows
    assert torch.equal(fingerprint_rows_triton(wide).cpu(), fingerprint_rows(wide.cpu()))


def test_kernel_matches_reference_in_interpreter():
    """The same kernel source under TRITON_INTERPRET=1 (a child process: the flag is read at import)."""
    code = textwrap.dedent("""
        import torch
        from epreplay.fingerprint import fingerprint_rows
        from epreplay.fingerprint_gpu import fingerprint_rows_triton
        g = torch.Generator().manual_seed(0)
        for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn):
            x = (torch.randn(4, 4100, generator=g) * 3).to(dt)
            assert torch.equal(fingerprint_rows_triton(x), fingerprint_rows(x)), dt
        x = (torch.randn(3, 256, generator=g)).to(torch.float8_e4m3fn)
        s = torch.rand(3, 2, generator=g)
        assert torch.equal(fingerprint_rows_triton((x, s)), fingerprint_rows((x, s)))
        y = x.clone().view(torch.uint8); y[1, 7] ^= 1
        assert not torch.equal(fingerprint_rows_triton(y.view(torch.float8_e4m3fn))[1], fingerprint_rows(x)[1])
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
