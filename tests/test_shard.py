"""The .eprs shard: round trips of every op, damage at every byte, repair, zstd -dc, raw bytes."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epreplay.errors import ShardError
from epreplay.format.records import Kind, Level, Op, RecordHeader, ShardInfo, Status
from epreplay.format.shard import ShardWriter, open_shard, repair

R, E, K, H = 4, 16, 4, 8
L = E // R
INFO = ShardInfo(run_id="run-test", rank=1, world_size=R, num_experts=E, topk=K, hidden=H,
                 level=Level.PAYLOAD, created_ns=123)


def _bf16_bits(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 2**16, shape, dtype=np.uint16)


def op_arrays(op: Op, T: int, rng: np.random.Generator) -> dict:
    """The named arrays records.py lists for each op, with realistic dtypes (-1 ids included)."""
    idx = rng.integers(-1, E, (T, K))
    w = rng.random((T, K), dtype=np.float32)
    fp = rng.integers(0, 2**63, T).astype(np.uint64) * np.uint64(2)
    counts = dict(num_tokens_per_rank_R=rng.integers(0, T + 1, R).astype(np.int32),
                  num_tokens_per_expert_E=rng.integers(0, T + 1, E).astype(np.int32))
    if op == Op.LAYOUT:
        return {**counts, "topk_idx_TK": idx}
    if op == Op.DISPATCH:
        N = 2 * T
        return {**counts, "recv_tokens_per_rank_R": rng.integers(0, T, R).astype(np.int32),
                "recv_tokens_per_expert_L": rng.integers(0, T, L), "topk_idx_TK": idx,
                "topk_weights_TK": w, "recv_src_idx_N": rng.integers(0, T, N).astype(np.int32),
                "rank_prefix_matrix_RR": rng.integers(0, T, (R, R)).astype(np.int32),
                "x_fp_T": fp, "recv_x_fp_N": np.concatenate([fp, fp]),
                "x_TH": (rng.integers(0, 256, (T, H), dtype=np.uint8), "float8_e4m3fn"),
                "x_scales_TS": rng.random((T, 1), dtype=np.float32),
                "token_tag_T": np.arange(T, dtype=np.int64) * 1000}
    if op == Op.CACHED_DISPATCH:
        return {"recv_tokens_per_rank_R": rng.integers(0, T, R).astype(np.int32), "x_fp_T": fp,
                "recv_x_fp_N": fp[:0], "x_TH": (_bf16_bits((T, H), rng), "bfloat16")}
    if op == Op.COMBINE:
        return {"x_fp_N": fp, "combined_fp_T": fp[::-1].copy(),
                "x_NH": (_bf16_bits((T, H), rng), "bfloat16"), "topk_weights_NK": w}
    if op == Op.LL_DISPATCH:
        return {"recv_count_L": rng.integers(0, T, L).astype(np.int32), "topk_idx_TK": idx,
                "layout_range_LR": (rng.integers(0, 64, (L, R)) << 32) | rng.integers(0, 8, (L, R)),
                "src_info_V": rng.integers(0, T, 3).astype(np.int32), "x_fp_T": fp,
                "recv_x_fp_V": fp[:3], "x_TH": (_bf16_bits((T, H), rng), "bfloat16")}
    return {"topk_idx_TK": idx, "topk_weights_TK": w, "x_fp_V": fp[:0], "combined_fp_T": fp,
            "x_VH": (_bf16_bits((0, H), rng), "bfloat16")}


def header(op: Op, seq: int, T: int, *, kind: Kind = Kind.CALL) -> RecordHeader:
    return RecordHeader(kind, int(op) if kind == Kind.CALL else 0, Level.PAYLOAD, Status.OK,
                        0, seq, seq // 6, seq % 6, T, start_ns=10**18 + seq, duration_ns=5000)


def write_shard(path: Path, ops: list[Op], T: int = 3, *, close: bool = True, seed: int = 0):
    """Write one record per op; returns [(header, arrays, meta)] as given to the writer."""
    rng = np.random.default_rng(seed)
    given_ = []
    w = ShardWriter(path, INFO)
    for seq, op in enumerate(ops):
        arrays, meta = op_arrays(op, T, rng), {"op": op.label, "hidden": H}
        w.append(header(op, seq, T), arrays, meta)
        given_.append((header(op, seq, T), arrays, meta))
    if close:
        w.close()
    return given_


def assert_record_equals(rec, given) -> None:
    hdr, arrays, meta = given
    assert (rec.header.op, rec.header.seq, rec.header.step, rec.header.layer, rec.header.tokens,
            rec.header.start_ns, rec.header.duration_ns) == (hdr.op, hdr.seq, hdr.step, hdr.layer,
                                                             hdr.tokens, hdr.start_ns, hdr.duration_ns)
    assert set(rec.arrays) == set(arrays)
    logical = rec.meta.get("_logical_dtypes", {})
    for name, want in arrays.items():
        if isinstance(want, tuple):
            want, dt = want
            assert logical[name] == dt
        got = rec.arrays[name]
        assert got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes(), name
    assert {k: v for k, v in rec.meta.items() if k != "_logical_dtypes"} == meta


ALL_OPS = list(Op)


def test_round_trip_every_op_bit_exact(tmp_path: Path) -> None:
    path = tmp_path / "rank-00001.eprs"
    given_ = write_shard(path, ALL_OPS * 2, T=17)
    with open_shard(path) as scan:
        assert scan.complete and scan.problem is None and scan.truncated_at is None
        assert scan.info == INFO and scan.lost_bytes == 0
        recs = list(scan.records())
        assert len(recs) == len(given_)
        for rec, g in zip(recs, given_):
            assert_record_equals(rec, g)
        assert [r.header.seq for r in scan.records(ops=[Op.COMBINE])] == [3, 9]
        some = scan.read_at(scan.entries[1].offset, names=["topk_idx_TK"])
        assert list(some.arrays) == ["topk_idx_TK"] and some.arrays["topk_idx_TK"].tobytes() == \
            given_[1][1]["topk_idx_TK"].tobytes()
        assert scan.verify() == []
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_writer_never_overwrites_and_events_are_separate(tmp_path: Path) -> None:
    path = tmp_path / "s.eprs"
    with ShardWriter(path, INFO, fsync_every=1) as w:
        w.append(header(Op.LAYOUT, 0, 0), {"topk_idx_TK": np.zeros((0, K), np.int64)})
        w.append(header(Op.LAYOUT, 1, 0, kind=Kind.EVENT), {}, {"reason": "flight dump"})
        assert w.records == 2 and w.bytes_written == path.stat().st_size
    with pytest.raises(FileExistsError):
        ShardWriter(path, INFO)
    with open_shard(path) as scan:
        assert [r.header.seq for r in scan.records()] == [0]
        events = list(scan.records(kinds=[Kind.EVENT]))
        assert events[0].meta == {"reason": "flight dump"} and events[0].arrays == {}


def test_concurrent_appends_all_land_intact(tmp_path: Path) -> None:
    path = tmp_path / "s.eprs"
    with ShardWriter(path, INFO) as w:
        def work(tid: int) -> None:
            for i in range(20):
                w.append(header(Op.DISPATCH, tid * 100 + i, 5), {"v": np.full(50, tid * 100 + i)})
        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    with open_shard(path) as scan:
        recs = list(scan.records())
    assert sorted(r.header.seq for r in recs) == sorted(t * 100 + i for t in range(4) for i in range(20))
    assert all((r.arrays["v"] == r.header.seq).all() for r in recs)


def test_crashed_writer_loses_nothing_written(tmp_path: Path) -> None:
    """A real process that dies without close(): no footer, every appended record readable."""
    path = tmp_path / "rank-00000.eprs"
    code = (
        "import os, numpy as np\n"
        "from epreplay.format.records import *\nfrom epreplay.format.shard import ShardWriter\n"
        f"w = ShardWriter({str(path)!r}, ShardInfo('r', 0, 1))\n"
        "for i in range(5):\n"
        "    w.append(RecordHeader(Kind.CALL, 2, Level.ROUTING, Status.OK, 0, i, 0, i, 1), {'a': np.arange(i)})\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    with open_shard(path) as scan:
        assert not scan.complete and scan.truncated_at is None and scan.lost_bytes == 0
        assert "no footer" in scan.problem and "all 5 records intact" in scan.problem
        assert [list(r.arrays["a"]) for r in scan.records()] == [list(range(i)) for i in range(5)]


def _small_shard(tmp_path: Path) -> tuple[bytes, list]:
    path = tmp_path / "small.eprs"
    given_ = write_shard(path, [Op.LAYOUT, Op.COMBINE], T=1)  # ~1 KB: narrowed ids, bf16, uint64
    return path.read_bytes(), given_


def test_truncation_at_every_byte_recovers_exactly_the_complete_records(tmp_path: Path) -> None:
    data, given_ = _small_shard(tmp_path)
    with open_shard(tmp_path / "small.eprs") as full:
        entries, data_start, footer = full.entries, full.data_start, full.footer_offset
    ends = [e.end for e in entries]
    cut_path = tmp_path / "cut.eprs"
    cut_path.write_bytes(data)
    for cut in range(len(data), -1, -1):  # shrinking one file in place is far cheaper than rewriting
        os.truncate(cut_path, cut)
        if cut < data_start:
            with pytest.raises(ShardError):
                open_shard(cut_path)
            continue
        with open_shard(cut_path) as scan:
            n = sum(end <= cut for end in ends)
            assert len(scan.entries) == n, cut
            assert scan.complete == (cut == len(data))
            boundary = ends[n - 1] if n else data_start
            if cut == len(data):
                assert scan.truncated_at is None
            elif cut == boundary:
                assert scan.truncated_at is None and "no footer" in scan.problem
            else:
                assert scan.truncated_at == boundary and scan.lost_bytes == cut - boundary
                assert f"truncated at byte {boundary}" in scan.problem
            for rec, g in zip(scan.records(), given_):
                assert_record_equals(rec, g)
    assert footer == ends[-1]


@pytest.mark.slow
@pytest.mark.parametrize("with_footer", [True, False])
def test_every_single_bit_flip_is_detected_never_returned(tmp_path: Path, with_footer: bool) -> None:
    data, given_ = _small_shard(tmp_path)
    with open_shard(tmp_path / "small.eprs") as full:
        entries, data_start, footer = full.entries, full.data_start, full.footer_offset
    if not with_footer:
        data = data[:footer]
    flip_path = tmp_path / "flip.eprs"
    flip_path.write_bytes(data)
    fd = os.open(flip_path, os.O_RDWR)  # flip in place and back: no file rewrites per bit
    for pos in range(len(data)):
        for bit in range(8):
            os.pwrite(fd, bytes([data[pos] ^ (1 << bit)]), pos)
            try:
                _check_flip(flip_path, pos, bit, data_start, entries, given_)
            finally:
                os.pwrite(fd, data[pos:pos + 1], pos)
    os.close(fd)


def _check_flip(flip_path: Path, pos: int, bit: int, data_start: int, entries: list, given_: list) -> None:
    """One flipped bit: the header refuses to open, or the hit record alone fails to read."""
    if pos < data_start:
        with pytest.raises(ShardError):
            open_shard(flip_path)
        return
    with open_shard(flip_path) as scan:
        hit = [i for i, e in enumerate(entries) if e.offset <= pos < e.end]
        if not hit:  # footer damage: the scan recovers every record
            assert not scan.complete and len(scan.entries) == len(entries)
            for rec, g in zip(scan.records(), given_):
                assert_record_equals(rec, g)
            return
        h = hit[0]
        if scan.complete:  # the footer still lists it: reading it must fail, never return data
            with pytest.raises(ShardError, match=f"record at byte {entries[h].offset}"):
                scan.read(scan.entries[h])
            if (pos + bit) % 4 == 0:  # a quarter of the flips (each re-reads the whole file):
                # verify() agrees, and the other records still read back exactly
                assert [off for off, _ in scan.verify()] == [entries[h].offset]
                for i, entry in enumerate(scan.entries):
                    if i != h:
                        assert_record_equals(scan.read(entry), given_[i])
        else:  # no footer: the scan stops at the damaged record and keeps those before it
            assert scan.truncated_at == entries[h].offset and len(scan.entries) == h
            for rec, g in zip(scan.records(), given_):
                assert_record_equals(rec, g)


def test_repair_truncated_then_healthy_and_backup_never_overwritten(tmp_path: Path) -> None:
    data, given_ = _small_shard(tmp_path)
    path = tmp_path / "rank-00003.eprs"
    cut = len(data) - 100  # inside the footer: every record intact, the footer cut short
    path.write_bytes(data[:cut])
    with open_shard(path) as before:
        kept = len(before.entries)
        truncated_at = before.truncated_at
    report = repair(path)
    assert report.action == "repaired" and report.records == kept and report.backup.read_bytes() == data[:cut]
    assert report.lost_bytes == cut - truncated_at and report.size_after == path.stat().st_size
    with open_shard(path) as after:
        assert after.complete and after.problem is None and len(after.entries) == kept
        for rec, g in zip(after.records(), given_):
            assert_record_equals(rec, g)
    healthy = path.read_bytes()
    assert repair(path).action == "healthy" and path.read_bytes() == healthy
    path.write_bytes(data[:cut])
    with pytest.raises(ShardError, match=r"rank-00003\.eprs\.bak already exists"):
        repair(path)
    assert path.read_bytes() == data[:cut] and report.backup.read_bytes() == data[:cut]


def test_repair_cuts_before_a_corrupt_record_behind_a_valid_footer(tmp_path: Path) -> None:
    data, given_ = _small_shard(tmp_path)
    path = tmp_path / "s.eprs"
    with open_shard(tmp_path / "small.eprs") as full:
        second = full.entries[1]
    damaged = bytearray(data)
    damaged[second.data_offset + 5] ^= 0x10
    path.write_bytes(damaged)
    with open_shard(path) as scan:
        assert scan.complete and [off for off, _ in scan.verify()] == [second.offset]
        with pytest.raises(ShardError, match=f"record at byte {second.offset}: crc"):
            scan.read(scan.entries[1])
    report = repair(path)
    assert report.records == 1 and "first at byte" in report.problem
    with open_shard(path) as after:
        assert after.complete and len(after.entries) == 1 and after.verify() == []


def test_not_a_shard_is_one_clean_error(tmp_path: Path) -> None:
    (tmp_path / "junk.eprs").write_bytes(b"hello world, not a shard at all")
    (tmp_path / "empty.eprs").write_bytes(b"")
    for p, why in [(tmp_path / "junk.eprs", "not an epreplay shard"), (tmp_path / "empty.eprs", "not an"),
                   (tmp_path / "missing.eprs", "no such shard"), (tmp_path, "directory")]:
        with pytest.raises(ShardError, match=why):
            open_shard(p)


@pytest.mark.skipif(not shutil.which("zstd"), reason="zstd command-line tool not installed")
def test_zstd_cli_decodes_a_shard(tmp_path: Path) -> None:
    path = tmp_path / "rank-00000.eprs"
    write_shard(path, ALL_OPS, T=9)
    out = subprocess.run([shutil.which("zstd"), "-dc", str(path)], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    with open_shard(path) as scan:
        dec = zstandard.ZstdDecompressor()
        bodies = b"".join(dec.decompress(path.read_bytes()[e.data_offset:e.end]) for e in scan.entries)
        assert out.stdout == bodies and len(bodies) == sum(e.header.raw_len for e in scan.entries)
        assert out.stdout.count(b"EPA1") >= len(ALL_OPS)


def _read_all_or_report(path: Path) -> None:
    """The reader's whole contract on hostile bytes: ShardError, or a scan + ShardError per record."""
    try:
        scan = open_shard(path)
    except ShardError:
        return
    with scan:
        assert (scan.truncated_at is None) or (0 <= scan.truncated_at <= scan.size)
        for entry in scan.entries:
            try:
                scan.read(entry)
            except ShardError:
                pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=600))
def test_reader_on_arbitrary_bytes_only_clean_errors(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "fuzz.eprs"
    path.write_bytes(blob)
    _read_all_or_report(path)


@pytest.fixture(scope="module")
def valid_shard_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("valid") / "valid.eprs"
    write_shard(path, ALL_OPS, T=2)
    return path.read_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_reader_on_mutated_shards_only_clean_errors(tmp_path: Path, valid_shard_bytes: bytes,
                                                    data: st.DataObject) -> None:
    blob = bytearray(valid_shard_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob)))
        action = data.draw(st.sampled_from(["splice", "delete", "overwrite"]))
        chunk = data.draw(st.binary(min_size=1, max_size=16))
        if action == "splice":
            blob[pos:pos] = chunk
        elif action == "delete":
            del blob[pos:pos + len(chunk)]
        else:
            blob[pos:pos + len(chunk)] = chunk
    path = tmp_path / "mut.eprs"
    path.write_bytes(bytes(blob))
    _read_all_or_report(path)
    # repair: refuses a non-shard cleanly, else leaves a complete shard whose records all verify
    fixed = tmp_path / f"fix-{uuid.uuid4().hex}.eprs"
    fixed.write_bytes(bytes(blob))
    try:
        report = repair(fixed)
    except ShardError:
        return
    with open_shard(fixed) as scan:
        assert scan.complete and scan.verify() == [] and len(scan.entries) == report.records
        for entry in scan.entries:
            scan.read(entry)


def test_shard_module_imports_no_torch() -> None:
    code = "import sys, epreplay.format.shard, epreplay.format.codec; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env={**os.environ})


def test_encoded_records_from_a_ring_and_reads_by_offset(tmp_path: Path) -> None:
    """Flight mode encodes early (any thread) and writes later; the index reads by offset."""
    from epreplay.format.shard import encode_record

    rng = np.random.default_rng(5)
    ring = [encode_record(header(Op.LL_DISPATCH, seq, 4), op_arrays(Op.LL_DISPATCH, 4, rng), {"s": seq})
            for seq in range(3)]
    assert all(r.header.comp_len > 0 and r.nbytes > r.header.comp_len for r in ring)
    path = tmp_path / "s.eprs"
    with ShardWriter(path, INFO) as w:
        offsets = [w.append_encoded(r) for r in ring]
    with open_shard(path) as scan:
        assert [e.offset for e in scan.entries] == offsets
        assert scan.read_at(offsets[2]).meta["s"] == 2
        with pytest.raises(ShardError, match=f"no intact record starts at byte {offsets[1] + 1}"):
            scan.read_at(offsets[1] + 1)


def test_live_writer_is_not_damage_and_repair_refuses_it(tmp_path: Path) -> None:
    """A shard still held by a ShardWriter: short tail = record in flight; repair must not cut it."""
    path = tmp_path / "live.eprs"
    w = ShardWriter(path, INFO)
    w.append(header(Op.LAYOUT, 0, 1), {"a": np.arange(3)})
    with open(path, "ab") as fh:  # half of the next record, as a concurrent reader may see it
        fh.write(b"\x51\x2a\x4d\x18\x3c\x00")
    with open_shard(path) as scan:
        assert scan.writer_active and not scan.complete and scan.truncated_at is None
        assert len(scan.entries) == 1 and "being written by a live process" in scan.problem
    with pytest.raises(ShardError, match="still writing this shard"):
        repair(path)
    os.truncate(path, w.bytes_written)
    w.close()
    with open_shard(path) as scan:
        assert not scan.writer_active and scan.complete and len(scan.entries) == 1


def test_repair_at_many_cuts_yields_complete_shards_of_the_intact_records(tmp_path: Path) -> None:
    data, given_ = _small_shard(tmp_path)
    with open_shard(tmp_path / "small.eprs") as full:
        ends, data_start = [e.end for e in full.entries], full.data_start
    zstd = shutil.which("zstd")
    for i, cut in enumerate(range(data_start, len(data), 23)):
        path = tmp_path / f"cut{i}.eprs"
        path.write_bytes(data[:cut])
        report = repair(path)
        n = sum(end <= cut for end in ends)
        assert report.records == n and report.backup.read_bytes() == data[:cut]
        with open_shard(path) as scan:
            assert scan.complete and len(scan.entries) == n and scan.verify() == []
            for rec, g in zip(scan.records(), given_):
                assert_record_equals(rec, g)
        if zstd and i % 10 == 0:  # a repaired shard is still one valid zstd stream
            assert subprocess.run([zstd, "-dc", str(path)], capture_output=True, timeout=60).returncode == 0


def test_newer_format_version_is_refused_with_the_fix(tmp_path: Path) -> None:
    from dataclasses import replace

    path = tmp_path / "v99.eprs"
    ShardWriter(path, replace(INFO, version=99)).close()
    with pytest.raises(ShardError, match="format v99 is newer.*upgrade epreplay"):
        open_shard(path)


def test_header_array_matches_entries_with_and_without_footer(tmp_path: Path) -> None:
    from epreplay.format.reader import HEADER_DTYPE

    path = tmp_path / "s.eprs"
    write_shard(path, ALL_OPS * 2, T=3)
    size = path.stat().st_size
    with open_shard(path) as scan:
        heads = scan.header_array()
        footer = scan.footer_offset
        want = [(e.offset, e.header.op, e.header.seq, e.header.step, e.header.layer, e.header.tokens,
                 e.header.comp_len, e.header.start_ns) for e in scan.entries]
    assert heads.dtype == HEADER_DTYPE and len(heads) == len(ALL_OPS) * 2
    got = [tuple(int(r[f]) for f in ("offset", "op", "seq", "step", "layer", "tokens", "comp_len", "start_ns"))
           for r in heads]
    assert got == want
    os.truncate(path, footer)  # same shard without its footer: the scan path
    with open_shard(path) as scan:
        assert not scan.complete and (scan.header_array() == heads).all()
    assert size > footer
