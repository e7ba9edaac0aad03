"""plan_compile._hashed_source: which fingerprinted rows a GPU plan hands to the gather launch
(capture/gather_kernel.py ep_hash) and which stay with the Python hook. Pure: the tensors are on
the CPU here, only their shapes, dtypes and identities matter."""
from __future__ import annotations

import torch

from epreplay.capture.extract import ValidRows
from epreplay.capture.plan_compile import _hashed_source, finder as _finder


def _find(args: dict, result=None):
    return _finder(args, {name: i for i, name in enumerate(args)}, result)


def test_rows_of_whole_lanes_are_hashed_by_the_launch():
    x = torch.zeros(16, 128, dtype=torch.bfloat16)
    got = _hashed_source(x, _find({"x": x}))
    assert got == ((0, 0, -1), torch.bfloat16, 2, 0, None, 1, None)


def test_an_fp8_pair_names_its_scales_and_valid_rows_their_counts():
    x8 = torch.zeros(4, 8, 128, dtype=torch.float8_e4m3fn)
    s = torch.zeros(4, 8, 1)
    count = torch.zeros(4, dtype=torch.int32)
    result = ((x8, s), count)
    got = _hashed_source(ValidRows((x8, s), count, 1), _find({"x": None}, result))
    assert got == ((1, 0, 0), torch.float8_e4m3fn, 3, 1, (1, 1, -1), 1, (1, 0, 1))
    lr = torch.zeros(4, 2, dtype=torch.int64)
    y = torch.zeros(4, 8, 64, dtype=torch.bfloat16)
    got = _hashed_source(ValidRows(y, lr, 2), _find({"x": y, "handle": (None, lr)}))
    assert got == ((0, 0, -1), torch.bfloat16, 3, 2, (0, 1, 1), 1, None)


def test_rows_the_kernel_cannot_read_stay_with_the_python_hook():
    odd = torch.zeros(16, 3, dtype=torch.bfloat16)  # 6 bytes a row: not whole 64-bit lanes
    assert _hashed_source(odd, _find({"x": odd})) is None
    x = torch.zeros(16, 128, dtype=torch.bfloat16)
    assert _hashed_source(x.clone(), _find({"x": x})) is None  # not among the call's tensors
    y = torch.zeros(4, 8, 64, dtype=torch.bfloat16)
    count = torch.zeros(4, dtype=torch.int32)
    assert _hashed_source(ValidRows(y, count.clone(), 1), _find({"x": y, "c": count})) is None
    x8 = torch.zeros(4, 8, 128, dtype=torch.float8_e4m3fn)
    s_t = torch.zeros(4, 2, 8).transpose(1, 2)  # DeepEP's low-latency FP8 scales: [L, S, X] viewed [L, X, S]
    assert _hashed_source(ValidRows((x8, s_t), count, 1), _find({"x": None}, ((x8, s_t), count))) is None
