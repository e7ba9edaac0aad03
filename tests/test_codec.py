"""Record body codec: bit-exact round trips, narrowing that actually narrows, clean refusals."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from epreplay.format import codec

rng = np.random.default_rng(0)


def _table(blob: bytes) -> dict:
    (n,) = struct.unpack_from("<I", blob, 4)
    return {a["name"]: a for a in json.loads(blob[8:8 + n])["arrays"]}


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-exact: dtype (incl. byte order), shape and bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


CASES = {
    "topk_idx_TK": rng.integers(-1, 256, (64, 8)),  # int64 with -1 = no expert
    "topk_idx_big_TK": rng.integers(-1, 300, (16, 8)),
    "topk_weights_TK": rng.random((64, 8), dtype=np.float32),
    "num_tokens_per_rank_R": rng.integers(0, 5000, 8).astype(np.int32),
    "recv_tokens_per_expert_L": rng.integers(0, 70000, 32),
    "x_fp_T": rng.integers(0, 2**63, 64, dtype=np.uint64) * np.uint64(2) + np.uint64(1),
    "empty_TK": np.zeros((0, 8), np.int64),
    "empty_f": np.zeros((3, 0), np.float32),
    "scalar": np.array(-7, np.int64),
    "scalar_f": np.array(1.5, np.float64),
    "flags": rng.random(10) > 0.5,
    "half": rng.random((4, 4)).astype(np.float16),
    "be": np.arange(5, dtype=">i4"),
    "cplx": np.array([1 + 2j, -3j], np.complex64),
    "int_extremes": np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max]),
    "u64_top": np.array([2**64 - 1, 2**64 - 2], np.uint64),
    "i8": np.array([-128, 127], np.int8),
    "strided": np.arange(40, dtype=np.int64).reshape(5, 8)[:, ::3],
}


@pytest.mark.parametrize("narrow,shuffle", [(True, True), (False, False), (True, False), (False, True)])
def test_round_trip_every_dtype_bit_exact(narrow: bool, shuffle: bool) -> None:
    arrays, meta = codec.decode(codec.encode(CASES, {"args": {"k": 8}}, narrow=narrow, shuffle=shuffle))
    assert set(arrays) == set(CASES)
    for name, want in CASES.items():
        assert _same(arrays[name], want), name
    assert meta == {"args": {"k": 8}}


def test_bf16_and_fp8_views_keep_their_logical_dtype() -> None:
    torch = pytest.importorskip("torch")
    x = torch.randn(6, 16).to(torch.bfloat16)
    x8 = torch.randn(6, 16).to(torch.float8_e4m3fn)
    blob = codec.encode({"x_TH": (x.view(torch.uint16).numpy(), "bfloat16"),
                         "x8_TH": (x8.view(torch.uint8).numpy(), "float8_e4m3fn")})
    arrays, meta = codec.decode(blob)
    assert codec.logical_dtype(meta, "x_TH") == "bfloat16"
    assert codec.logical_dtype(meta, "x8_TH") == "float8_e4m3fn"
    back = torch.from_numpy(arrays["x_TH"]).view(getattr(torch, meta[codec.LOGICAL_KEY]["x_TH"]))
    back8 = torch.from_numpy(arrays["x8_TH"]).view(torch.float8_e4m3fn)
    assert back.dtype == torch.bfloat16 and torch.equal(back.view(torch.int16), x.view(torch.int16))
    assert torch.equal(back8.view(torch.uint8), x8.view(torch.uint8))
    assert codec.logical_dtype(meta, "missing") is None


def test_narrowing_picks_the_narrowest_lossless_type() -> None:
    t = _table(codec.encode({
        "ids_0_255": np.arange(256, dtype=np.int64),
        "ids_m1_254": np.arange(-1, 255, dtype=np.int64),
        "ids_m1_255": np.arange(-1, 256, dtype=np.int64),
        "counts": np.array([0, 70000], np.int32),
        "fp": np.array([1, 2**64 - 1], np.uint64),
        "w": np.ones(3, np.float32),
    }))
    assert t["ids_0_255"]["stored"] == "|u1"
    assert (t["ids_m1_254"]["stored"], t["ids_m1_254"]["offset"]) == ("|u1", -1)
    assert t["ids_m1_255"]["stored"] == "<u2"  # 257 distinct values need 9 bits
    assert t["counts"]["stored"] == "<i4"  # needs 17 bits: nothing narrower than its own 32
    assert t["fp"]["stored"] == "<u8"
    assert t["w"]["stored"] == "<f4" and t["w"]["shuffle"]


def test_narrowed_ids_compress_smaller_than_raw() -> None:
    ids = rng.integers(-1, 256, (4096, 8))
    assert len(codec.encode({"i": ids})) < len(codec.encode({"i": ids}, narrow=False)) / 3


@pytest.mark.parametrize("bad, fix", [
    ({"x": np.array(["a"])}, "unsupported dtype"),
    ({"x": np.array([object()])}, "unsupported dtype"),
    ({"x": [1, 2]}, "expected a numpy array"),
    ({"x": (np.zeros(2, np.int16), "bfloat16")}, r"uint16 view \(tensor.view\(torch.uint16\)"),
    ({"x": (np.zeros(2, np.uint16), "bfloat17")}, "unknown logical dtype"),
])
def test_refuses_unsupported_input_naming_it(bad: dict, fix: str) -> None:
    with pytest.raises(ValueError, match=fix):
        codec.encode(bad)


def test_reserved_and_unjsonable_meta_refused() -> None:
    with pytest.raises(ValueError, match="reserved"):
        codec.encode({}, {codec.LOGICAL_KEY: 1})
    with pytest.raises(ValueError, match="JSON"):
        codec.encode({}, {"x": object()})
    _, meta = codec.decode(codec.encode({}, {"n": np.int64(3), "f": np.float32(0.5)}))
    assert meta == {"n": 3, "f": 0.5} and type(meta["n"]) is int


def test_decode_rejects_damaged_bodies_cleanly() -> None:
    blob = codec.encode(CASES)
    with pytest.raises(codec.CodecError):
        codec.decode(b"nope")
    with pytest.raises(codec.CodecError):
        codec.decode(blob[:-9])  # cut inside the bodies
    with pytest.raises(codec.CodecError):
        codec.decode(blob + b"\0" * 8)
    with pytest.raises(codec.CodecError):
        codec.decode(blob[:8] + b"[" + blob[9:])  # table not JSON


_dtypes = st.sampled_from(["<i8", "<i4", "<i2", "|i1", "<u8", "<u4", "<u2", "|u1", "<f4", "<f8",
                           "<f2", "|b1", ">i8", ">f4"])


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_round_trip_property(data: st.DataObject) -> None:
    dtype = np.dtype(data.draw(_dtypes))
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6))
    a = data.draw(hnp.arrays(dtype, shape))
    arrays, _ = codec.decode(codec.encode({"a": a}))
    assert _same(arrays["a"], a)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_decode_of_mutated_bodies_raises_only_codec_error(data: st.DataObject) -> None:
    """Defence in depth behind the CRC: a damaged body or table is a CodecError, never a crash."""
    blob = bytearray(codec.encode({"ids": np.arange(-1, 9).reshape(2, 5),
                                   "w": np.ones(3, np.float32), "e": np.zeros(0, np.int8)}, {"m": 1}))
    (n,) = struct.unpack_from("<I", blob, 4)
    table = blob[8:8 + n].decode()
    if data.draw(st.booleans()):  # semantic damage: swap one JSON token for another
        old = data.draw(st.sampled_from(['"<i8"', '"|u1"', "[2,5]", "true", "false", '"<f4"', "10", "-1"]))
        new = data.draw(st.sampled_from(['"O"', '"V3"', '"<M8[s]"', "[-1]", "[99999999999,99999999999]",
                                         '"x"', "null", "1e400", '"<U2"', "[]", "{}", '"|b1"']))
        table = table.replace(old, new, 1)
        blob = bytearray(codec.MAGIC + struct.pack("<I", len(table.encode())) + table.encode()
                         + blob[8 + n:])
    else:  # byte-level damage anywhere
        for _ in range(data.draw(st.integers(1, 3))):
            pos = data.draw(st.integers(0, len(blob) - 1))
            blob[pos] = data.draw(st.integers(0, 255))
    try:
        codec.decode(bytes(blob))
    except codec.CodecError:
        pass


def test_decode_only_named_arrays() -> None:
    blob = codec.encode(CASES, {"k": 1})
    arrays, meta = codec.decode(blob, names=["topk_idx_TK", "be", "absent"])
    assert set(arrays) == {"topk_idx_TK", "be"} and meta == {"k": 1}
    assert _same(arrays["topk_idx_TK"], CASES["topk_idx_TK"]) and _same(arrays["be"], CASES["be"])
    assert codec.decode(blob, names=[])[0] == {}
