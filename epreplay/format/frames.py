"""Byte layout of the `.eprs` shard: frame constants, header/record/footer frames, record entries.

Shared by the writer (epreplay.format.shard) and the reader (epreplay.format.reader); the layout itself is
documented in epreplay.format.shard's module docstring. Imports no torch.
"""
from __future__ import annotations

import struct
import threading
import zlib
from dataclasses import dataclass
from typing import Iterable, Mapping

import zstandard

from epreplay.format import codec
from epreplay.format.records import RecordHeader, ShardInfo

MAGIC_HEADER = 0x184D2A50
MAGIC_RECORD = 0x184D2A51
MAGIC_FOOTER = 0x184D2A52
FILE_MAGIC = b"EPRS"
FOOTER_MAGIC = b"EPRF"
END_MAGIC = b"EPRS.END"

FRAME = struct.Struct("<II")  # skippable frame: magic, size
U32 = struct.Struct("<I")
ENTRY = struct.Struct(f"<Q{RecordHeader.SIZE}s")
TAIL = struct.Struct("<QII8s")  # data_end, count, crc32, end magic
REC_FRAME = RecordHeader.SIZE + 4  # header bytes + their CRC32
REC_PREFIX = FRAME.size + REC_FRAME  # bytes ahead of a record's data frame
RECORD_FRAME_HEAD = FRAME.pack(MAGIC_RECORD, REC_FRAME)

# Level 3 (zstd's default): on narrowed+shuffled DeepSeek-V3 routing it stores 28.1 B per
# token-layer against level 1's 29.1 (prefill T=4096) while still encoding ~500 MB/s of raw
# int64+fp32 on one writer thread, far above a rank's capture rate; higher levels cannot beat the
# fp32 mantissas' entropy. Writers that fall behind can pass zstd_level=1 (~2x faster encode).
# Figures: bench/shard_bench.py.
DEFAULT_LEVEL = 3
# Payload records (bf16/fp8 activations, megabytes each) are byte-plane data where level 1
# compresses as well as level 3 (bf16 T=4096 x H=7168: 1.46x vs 1.41x) at about twice the speed;
# anything over LARGE_RAW_BYTES raw is compressed at LARGE_LEVEL so payload capture keeps up.
LARGE_LEVEL = 1
LARGE_RAW_BYTES = 1 << 20

_local = threading.local()  # one ZstdCompressor per (thread, level) and one decompressor per thread


def compressor(level: int) -> zstandard.ZstdCompressor:
    comps = getattr(_local, "comps", None)
    if comps is None:
        comps = _local.comps = {}
    comp = comps.get(level)
    if comp is None:
        # content size + checksum: `zstd -dc` and any zstd tool can verify a frame on its own.
        comp = comps[level] = zstandard.ZstdCompressor(level=level, write_content_size=True,
                                                       write_checksum=True)
    return comp


def decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "dec", None)
    if dec is None:
        dec = _local.dec = zstandard.ZstdDecompressor()
    return dec


def _skippable(magic: int, body: bytes) -> bytes:
    return FRAME.pack(magic, len(body)) + body


def header_frame(info: ShardInfo) -> bytes:
    body = info.to_bytes()
    return _skippable(MAGIC_HEADER, FILE_MAGIC + U32.pack(zlib.crc32(body)) + body)


def footer_frame(entries: Iterable[tuple[int, bytes]], data_end: int) -> bytes:
    """The footer for records [(offset, header bytes)] whose last byte ends at `data_end`."""
    entries = list(entries)
    body = FOOTER_MAGIC + b"".join(ENTRY.pack(off, hb) for off, hb in entries)
    body += struct.pack("<QI", data_end, len(entries))
    return _skippable(MAGIC_FOOTER, body + struct.pack("<I", zlib.crc32(body)) + END_MAGIC)


@dataclass(frozen=True)
class Entry:
    """One record's place in a shard: `offset` of its header frame and its decoded header."""

    offset: int
    header: RecordHeader

    @property
    def data_offset(self) -> int:
        return self.offset + REC_PREFIX

    @property
    def end(self) -> int:
        return self.data_offset + self.header.comp_len


@dataclass(frozen=True)
class EncodedRecord:
    """A record encoded and compressed but not yet written: `data` is its exact on-disk bytes
    (header frame + data frame). Lets a flight ring hold compressed records and dump them later
    with ShardWriter.append_encoded; `nbytes` is what it costs in memory."""

    header: RecordHeader  # comp_len / raw_len / crc32 filled in
    data: bytes

    @property
    def nbytes(self) -> int:
        return len(self.data)


def encode_record(header: RecordHeader, arrays: Mapping[str, codec.ArrayIn],
                  meta: Mapping[str, object] | None = None, *,
                  zstd_level: int = DEFAULT_LEVEL, large_level: int = LARGE_LEVEL) -> EncodedRecord:
    """Encode + compress one record (no I/O, thread-safe: one compressor per thread).

    Records over LARGE_RAW_BYTES (payloads) are compressed at `large_level` instead.
    Raises ValueError for arrays/meta the codec refuses or a record over 4 GiB.
    """
    raw = codec.encode(arrays, meta)
    comp = compressor(large_level if len(raw) > LARGE_RAW_BYTES else zstd_level).compress(raw)
    if len(comp) >= 1 << 32 or len(raw) >= 1 << 32:
        raise ValueError(f"record of {len(raw)} raw bytes is too large for one shard record "
                         f"(limit 4 GiB); capture payloads every k-th step or split the call")
    full = header.with_data(comp_len=len(comp), raw_len=len(raw), crc32=zlib.crc32(comp))
    hb = full.to_bytes()
    return EncodedRecord(full, b"".join((RECORD_FRAME_HEAD, hb, U32.pack(zlib.crc32(hb)), comp)))
