"""The index's fast paths give the slow paths' answers: the C routing aggregation
(epreplay/index/_indexc.c) equals the numpy one count for count on every id width, and a decoded
record checked by zstd's content checksum instead of a CRC pass is still refused when any byte
of its data is damaged, in the same words (real shards)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from epreplay.demo.synth import make_synthetic_run
from epreplay.format.records import Op
from epreplay.format.run import RunDir
from epreplay.format.shard import open_shard
from epreplay.index import shard as B


def _group(rng: np.random.Generator, dtype, E: int, K: int, records: int) -> list:
    """Routing records [(pair, idx [T, K], row bytes)]: pairs repeat and skip, T varies, ids
    include -1 (no expert) and, for wide ids, values >= E (ignored by both paths)."""
    out = []
    for n in range(records):
        T = int(rng.integers(0, 40))
        hi = E + 3 if np.dtype(dtype).itemsize > 1 else E
        idx = rng.integers(-1 if np.dtype(dtype).kind == "i" else 0, hi, (T, K))
        out.append((int(rng.integers(0, 6)) * 2, idx.astype(dtype), int(rng.choice([256, 14336, 7296]))))
    return out


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64])
@pytest.mark.parametrize("dedup", [True, False])
@pytest.mark.parametrize("E,R", [(256, 64), (48, 16), (12, 12)])
def test_c_aggregation_equals_numpy(dtype, dedup: bool, E: int, R: int) -> None:
    if B._indexc is None:
        pytest.skip("epreplay.index._indexc not built here (no C compiler when installed): numpy path only")
    if np.dtype(dtype) == np.uint8 and E > 256:
        pytest.skip("uint8 ids hold E <= 256")
    rng = np.random.default_rng([E, R, int(dedup), np.dtype(dtype).itemsize])
    K, X, P = 8 if E >= 16 else 4, E // R, 12
    group = _group(rng, dtype, E, K, 50)
    outs = []
    for accel in (B._indexc, None):
        load, sent, nbytes = np.zeros((P, E), np.int64), np.zeros((P, R), np.int64), np.zeros((P, R), np.int64)
        saved, B._indexc = B._indexc, accel
        try:
            B._chunk(group, dedup, E, R, X, load, sent, nbytes)
        finally:
            B._indexc = saved
        outs.append((load, sent, nbytes))
    (lc, sc, bc), (ln, sn, bn) = outs
    assert lc.sum() > 0 and sc.sum() > 0
    np.testing.assert_array_equal(lc, ln)
    np.testing.assert_array_equal(sc, sn)
    np.testing.assert_array_equal(bc, bn)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("accel") / "run"
    make_synthetic_run(run, ranks=4, steps=3, layers=2, tokens=64, experts=16, topk=4, workers=1)
    return run


@pytest.mark.parametrize("where", ["start", "middle", "checksum"])
def test_damaged_decoded_record_is_refused_by_crc(small_run: Path, tmp_path: Path, where: str) -> None:
    path = tmp_path / "rank-00002.eprs"
    path.write_bytes(RunDir(small_run).shard_path(2).read_bytes())
    with open_shard(path) as scan:
        entry = [e for e in scan.entries if e.header.op == Op.DISPATCH][2]  # decoded by the index
    clen = entry.header.comp_len
    at = {"start": 6, "middle": clen // 2, "checksum": clen - 2}[where]
    data = bytearray(path.read_bytes())
    data[entry.data_offset + at] ^= 0x04
    path.write_bytes(bytes(data))
    clean = B.index_shard(str(RunDir(small_run).shard_path(2)))
    res = B.index_shard(str(path))
    assert res.truncated_at == entry.offset and not res.complete
    assert f"record at byte {entry.offset}: record data damaged (crc" in res.problem
    n_ok = [e.offset for e in open_shard(path).entries].index(entry.offset)
    assert res.records == n_ok and len(res.calls["rank"]) == n_ok < len(clean.calls["rank"])


def test_decode_some_through_one_cache_equals_codec_decode() -> None:
    """decode_some keeps each array table it parsed (keyed by the table's bytes) and reuses it
    for later records: records of different layouts (id widths, offsets, shapes, a counts-level
    record without ids) decoded in turn through one cache each give codec.decode's values."""
    from epreplay.format import codec

    rng = np.random.default_rng(5)
    names = ("topk_idx_TK", "num_tokens_per_expert_E", "num_tokens_per_rank_R", "recv_count_L")
    cache: dict = {}
    layouts = [(8, 4, 0, 200), (8, 4, -1, 200), (8, 4, 0, 60000), (5, 2, 0, 200), (0, 4, 0, 1),
               (8, 4, -1, 30000), None]
    for rnd in range(3):  # the second and third rounds decode through the cached tables
        for layout in layouts:
            arrays = {"num_tokens_per_rank_R": rng.integers(0, 9, 4).astype(np.int32),
                      "num_tokens_per_expert_E": rng.integers(0, 300, 16).astype(np.int32)}
            if layout is not None:
                T, K, lo, hi = layout
                arrays["topk_idx_TK"] = rng.integers(lo, hi, (T, K))
                arrays["topk_weights_TK"] = rng.random((T, K), np.float32)
            blob = codec.encode(arrays, {"hidden": 64, "round": rnd % 2})
            got, meta = B.decode_some(blob, names, cache)
            want, want_meta = codec.decode(blob)
            assert meta == want_meta
            expect = ["topk_idx_TK"] if layout is not None else ["num_tokens_per_expert_E",
                                                                   "num_tokens_per_rank_R"]
            assert sorted(got) == expect
            for name in expect:
                np.testing.assert_array_equal(got[name].astype(np.int64), want[name].astype(np.int64))
                assert got[name].shape == want[name].shape
    assert any(isinstance(k, tuple) for k in cache)  # tables were cached and reused
