"""Reading a shard's record data for the index: checked data frames from a reusable read window
(RecordReader), and decoding just the arrays the index aggregates (decode_some), with the array
table parsed once per record layout. Used by epreplay.index.shard in the worker processes.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import zlib

import numpy as np
import zstandard

from epreplay.format import codec
from epreplay.format.frames import REC_PREFIX, RECORD_FRAME_HEAD

READ_BYTES = 8 << 20  # read the shard in ~8 MiB slices
_U32 = struct.Struct("<I")


# The codec writes each array spec with this key order (epreplay.format.codec.encode); parsing the table
# with one regex instead of json.loads is ~5x faster, and a table that does not match falls back.
_SPEC = re.compile(rb'\{"name":"([^"\\]*)","dtype":"[^"]*","shape":\[([0-9,]*)\],"stored":"([^"]*)",'
                   rb'"offset":(-?[0-9]+),"shuffle":(true|false),"logical":[^,]*,"nbytes":([0-9]+)\}')
_ARRAYS_KEY = b',"arrays":['
_WANT: dict[tuple[str, ...], frozenset[bytes]] = {}


def decode_some(raw: bytes, names: tuple[str, ...], meta_cache: dict | None = None
                ) -> tuple[dict[str, np.ndarray], dict]:
    """Decode only the named arrays of a codec blob (and its meta): the index needs 1-4 of a
    dispatch record's ~8 arrays. Expert ids come back in their narrow stored form where that is
    lossless (see `_ids`), other arrays as codec.decode returns them.

    meta_cache: reused across records, {meta JSON bytes: dict} and {(names, table bytes): plan}:
    metas and whole array tables repeat call after call, so a record whose table was seen
    before is decoded without parsing it again. Metas are shared: callers must not change them.
    """
    buf = memoryview(raw)
    if bytes(buf[:4]) != codec.MAGIC:
        raise codec.CodecError("record body does not start with the codec magic")
    head_len = int.from_bytes(buf[4:8], "little")
    head = bytes(buf[8:8 + head_len])
    plan = meta_cache.get((names, head)) if meta_cache is not None else None
    if plan is None:
        plan = _plan(head, head_len, names, meta_cache)
        if plan is None:
            table = json.loads(head)  # an unexpected layout: the slow, general path
            return _decode_json(buf, head_len, table, names), table["meta"]
        if meta_cache is not None and len(meta_cache) < 8192:
            meta_cache[(names, head)] = plan
    meta, items = plan
    out = {}
    for name, pos, shape, stored, offset, shuffle, nbytes, dtype in items:
        if pos + nbytes > len(buf):
            raise codec.CodecError(f"array {name} runs past the record body")
        out[name] = _ids(buf, pos, shape, stored, offset, shuffle, nbytes) if dtype is None else \
            codec._decode_one({"dtype": dtype, "stored": stored.decode(), "shape": list(shape),
                               "offset": offset, "shuffle": shuffle, "nbytes": nbytes}, buf, pos)
    return out, meta


def _plan(head: bytes, head_len: int, names: tuple[str, ...], meta_cache: dict | None
          ) -> tuple[dict, list[tuple]] | None:
    """(meta, [(name, body position, shape, stored, offset, shuffle, nbytes, dtype)]) of the
    wanted arrays of a codec table, in body order (dtype None: expert ids, read by `_ids`);
    None for a table not in the codec's usual layout."""
    cut = head.find(_ARRAYS_KEY)
    specs = _SPEC.findall(head, cut) if cut > 0 else []
    if cut <= 0 or len(specs) != head.count(b'{"name":', cut):
        return None
    meta_b = head[8:cut]
    meta = meta_cache.get(meta_b) if meta_cache is not None else None
    if meta is None:
        meta = json.loads(meta_b)
        if meta_cache is not None and len(meta_cache) < 8192:
            meta_cache[meta_b] = meta
    pos = 8 + head_len + (-(8 + head_len)) % 8
    if "topk_idx_TK" in names and b'{"name":"topk_idx_TK"' in head:
        names = ("topk_idx_TK",)  # routing level: the counts arrays are derived from it anyway
    want = _WANT.get(names)
    if want is None:
        want = _WANT[names] = frozenset(n.encode() for n in names)
    items = []
    for name_b, shape_b, stored, offset, shuffle, nbytes_b in specs:
        nbytes = int(nbytes_b)
        if name_b in want:
            name = name_b.decode()
            shape = tuple(int(x) for x in shape_b.split(b",")) if shape_b else ()
            items.append((name, pos, shape, stored, int(offset), shuffle == b"true", nbytes,
                          None if name == "topk_idx_TK" else _dtype_of(head, name_b)))
        pos += nbytes + (-nbytes) % 8
    return meta, items


def _dtype_of(head: bytes, name_b: bytes) -> str:
    i = head.find(b'{"name":"' + name_b + b'","dtype":"')
    j = i + len(name_b) + 21
    return head[j:head.find(b'"', j)].decode()


def _decode_json(buf: memoryview, head_len: int, table: dict, names: tuple[str, ...]) -> dict:
    pos = 8 + head_len + (-(8 + head_len)) % 8
    out = {}
    for spec in table["arrays"]:
        if spec["name"] in names:
            out[spec["name"]] = codec._decode_one(spec, buf, pos)
        pos += spec["nbytes"] + (-spec["nbytes"]) % 8
    return out


def _ids(buf: memoryview, pos: int, shape: tuple[int, ...], stored: bytes, offset: int,
         shuffle: bool, nbytes: int) -> np.ndarray:
    """topk_idx_TK from its stored bytes without widening to int64: uint8 ids as they are
    stored (offset 0), else int16 (ids -1..32766; -1 = no expert). Always a copy: a view would
    keep the whole decoded record alive until aggregation (5x the ids' bytes, and fresh pages
    for every record: page faults cost more CPU than the copy)."""
    count = math.prod(shape)
    if stored == b"|u1" and offset == 0 and nbytes == count:
        return np.frombuffer(buf, np.uint8, count, pos).reshape(shape).copy()
    if stored in (b"|u1", b"<u2") and -1 <= offset <= 0:
        width = 1 if stored == b"|u1" else 2
        if nbytes != count * width:
            raise codec.CodecError(f"topk_idx_TK: {nbytes} bytes for {shape} {stored.decode()}")
        raw = np.frombuffer(buf, np.uint8, nbytes, pos)
        if width == 1:
            v = raw.astype(np.int16)
        elif shuffle:
            v = raw[:count].astype(np.int32) | (raw[count:].astype(np.int32) << 8)
        else:
            v = raw.view("<u2").astype(np.int32)
        if v.max(initial=0) + offset < 1 << 15:
            return (v + offset).astype(np.int16).reshape(shape)
    spec = {"dtype": "<i8", "stored": stored.decode(), "shape": list(shape), "offset": offset,
            "shuffle": shuffle, "nbytes": nbytes}
    return codec._decode_one(spec, buf, pos)


def row_bytes(meta: dict, hidden: int, ll: bool) -> int:
    """Bytes of one dispatched row: hidden x element size (+ fp32 scales per 128 values for fp8)."""
    h = int(meta.get("hidden") or hidden or 0)
    fp8 = bool(meta.get("use_fp8")) if ll else "float8" in str(meta.get("x_dtype", ""))
    return h + 4 * ((h + 127) // 128) if fp8 else 2 * h


class RecordReader:
    """Sequential reads of records' data frames, checked (CRC, or zstd's checksum when decoded),
    from a window of the file."""

    def __init__(self, fd: int) -> None:
        # one window buffer, refilled in place (os.preadv): a fresh 8 MiB bytes per window cost
        # its page faults again, ~as much CPU as the read itself
        self.fd, self.lo, self.n = fd, 0, 0
        self.buf = bytearray(0)
        self.mv = memoryview(self.buf)
        self.dec = zstandard.ZstdDecompressor()

    def frame(self, offset: int, comp_len: int, crc: int, raw_len: int, decode: bool = True) -> bytes:
        end = offset + REC_PREFIX + comp_len
        if offset < self.lo or end > self.lo + self.n:
            want = max(READ_BYTES, end - offset)
            if len(self.buf) < want:
                self.mv.release()
                self.buf = bytearray(want)
                self.mv = memoryview(self.buf)
            self.lo, self.n = offset, os.preadv(self.fd, [self.buf], offset)
        at = offset - self.lo
        if end > self.lo + self.n:
            raise ValueError("record cut short")
        if not self.buf.startswith(RECORD_FRAME_HEAD, at):
            raise ValueError("record header frame damaged")
        # the record's own header copy (the footer's is what we index by) has its CRC too: a
        # damaged one is damage, as shard_reader and `inspect` see it
        if _U32.unpack_from(self.buf, at + REC_PREFIX - 4)[0] != zlib.crc32(self.mv[at + 8:at + REC_PREFIX - 4]):
            raise ValueError("record header damaged")
        comp = self.mv[at + REC_PREFIX:end - self.lo]
        # byte 4 of a zstd frame is its descriptor; bit 2: a content checksum follows the data
        if not decode or len(comp) < 5 or not comp[4] & 4:
            got = zlib.crc32(comp)
            if got != crc:
                raise ValueError(f"record data damaged (crc {got:#010x} != {crc:#010x})")
            if not decode:
                return b""
        # A decoded record needs no CRC pass of its own: the frame carries zstd's content
        # checksum (format.frames.compressor: write_checksum), which decompress verifies over the
        # decoded bytes. Only a record that fails to decode is CRC'd, to say what is wrong in
        # the same words as a reader that checks CRCs first (shard_reader).
        try:
            raw = self.dec.decompress(comp, raw_len)
        except zstandard.ZstdError:
            raw = None
        if raw is None or len(raw) != raw_len:
            got = zlib.crc32(comp)
            if got != crc:
                raise ValueError(f"record data damaged (crc {got:#010x} != {crc:#010x})")
            if raw is None:
                raise ValueError("record data undecodable (zstd) although its CRC matches")
            raise ValueError(f"{len(raw)} bytes decoded, header says {raw_len}")
        return raw
