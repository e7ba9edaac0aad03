"""The C row fingerprints (epreplay/format/_fpc.c via fingerprint_cpu.rows_cpu) equal the torch
reference (fingerprint.fingerprint_rows) bit for bit, with the same finite flags as the writer's
stage._row_finite."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from epreplay.capture.stage import _row_finite
from epreplay.format import fingerprint_cpu
from epreplay.format.fingerprint import fingerprint_rows

pytestmark = pytest.mark.skipif(fingerprint_cpu._fpc is None, reason="epreplay.format._fpc not built")


def _rand(dtype: torch.dtype, T: int, H: int, g: torch.Generator) -> torch.Tensor:
    bits = torch.randint(0, 256, (T, H * torch.empty(0, dtype=dtype).element_size()), generator=g,
                         dtype=torch.uint8)
    return bits.view(dtype) if dtype != torch.bool else bits.bool()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int32, torch.int16,
                                   torch.uint8, torch.int8, torch.float8_e4m3fn, torch.float8_e5m2, torch.bool])
@pytest.mark.parametrize("H", [1, 3, 7, 128, 517])
def test_rows_equal_reference(dtype: torch.dtype, H: int) -> None:
    g = torch.Generator().manual_seed(H)
    x = _rand(dtype, 9, H, g)  # random bits: NaN/inf rows among them for the float kinds
    fp, finite = fingerprint_cpu.rows_cpu(x)
    assert np.array_equal(fp, fingerprint_rows(x).numpy().view(np.uint64))
    assert np.array_equal(finite, _row_finite(x).numpy())


def test_fp8_pair_and_strided_rows() -> None:
    g = torch.Generator().manual_seed(1)
    q = _rand(torch.float8_e4m3fn, 5, 300, g)
    s = torch.rand(5, 3, generator=g)
    s[2, 1] = float("inf")
    fp, finite = fingerprint_cpu.rows_cpu((q, s))
    assert np.array_equal(fp, fingerprint_rows((q, s)).numpy().view(np.uint64))
    assert finite.tolist() == [True, True, False, True, True]
    x = _rand(torch.bfloat16, 6, 64, g)[::2]  # every other row: not contiguous
    fp, _ = fingerprint_cpu.rows_cpu(x)
    assert np.array_equal(fp, fingerprint_rows(x).numpy().view(np.uint64))
    one = x.clone()
    one[1, 5] = torch.tensor(1.0, dtype=torch.bfloat16)  # a changed word changes that row's print
    assert (fingerprint_cpu.rows_cpu(one)[0] != fp).tolist() == [False, True, False]


def test_refuses_what_it_does_not_take() -> None:
    assert fingerprint_cpu.rows_cpu(torch.zeros(3, 2, dtype=torch.float64)) is None
    assert fingerprint_cpu.rows_cpu(torch.zeros(3)) is None
    fp, finite = fingerprint_cpu.rows_cpu(torch.zeros(0, 8, dtype=torch.bfloat16))
    assert fp.shape == (0,) and finite.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_nonfinite_word_flags_its_row(dtype: torch.dtype, bad: float) -> None:
    x = torch.randn(6, 67, generator=torch.Generator().manual_seed(2)).to(dtype)
    x[3, 66] = bad  # in the last, zero-padded lane
    x[5, 0] = bad
    fp, finite = fingerprint_cpu.rows_cpu(x)
    assert finite.tolist() == [True, True, True, False, True, False]
    assert np.array_equal(finite, _row_finite(x).numpy())
    assert np.array_equal(fp, fingerprint_rows(x).numpy().view(np.uint64))


def test_a_writer_fingerprints_packed_rows_without_importing_torch() -> None:
    """The capture writer's rows (the codec's numpy forms) are hashed by the C pass in a process
    that never imports torch, with the reference's bits and finite flags."""
    import pickle
    import subprocess
    import sys

    from epreplay.capture.stage import to_numpy

    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 96, generator=g).to(torch.bfloat16)
    x[4, 3] = float("nan")
    q, s = _rand(torch.float8_e4m3fn, 5, 128, g), torch.rand(5, 2, generator=g)
    f = torch.randn(3, 33, generator=g)
    items = {"x_fp_T": ("fp", to_numpy(x)), "q_fp_T": ("fp", [to_numpy(q), to_numpy(s)]), "f_fp_T": ("fp", to_numpy(f))}
    code = (
        "import pickle, sys\n"
        "import epreplay.capture.build\n"
        "from epreplay.capture.packed import PackedStaging\n"
        "st = PackedStaging(pickle.loads(sys.stdin.buffer.read()))\n"
        "assert st.fingerprint_numpy()\n"
        "assert 'torch' not in sys.modules, 'the writer imported torch'\n"
        "sys.stdout.buffer.write(pickle.dumps({k: (v[1].tolist(), v[2]) for k, v in st.items.items()}))\n")
    done = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(items), capture_output=True, check=True)
    got = pickle.loads(done.stdout)
    for name, rows in (("x_fp_T", x), ("q_fp_T", (q, s)), ("f_fp_T", f)):
        fp = fingerprint_rows(rows).numpy().view(np.uint64).tolist()
        finite = bool(_row_finite(rows).all()) if not isinstance(rows, tuple) else True
        assert got[name] == (fp, finite), name
    assert got["x_fp_T"][1] is False  # the NaN row
