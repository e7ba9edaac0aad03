"""Record types of a run: ops, capture levels, the per-record header, the run manifest.

This module is the contract between capture (writes), index, replay, diff and tui (read).
It imports neither torch, duckdb nor textual.

Legend for shapes below: T tokens on the calling rank, K top-k, E experts, R ranks (world size),
L = E / R local experts, H hidden, M = num_max_dispatch_tokens_per_rank, N rows received by a
normal dispatch, V = sum(recv_count) valid rows received by a low-latency dispatch.

Named arrays a CALL record holds, by op and capture level (a level holds everything of the levels
below it). Expert ids keep -1 for "no expert". Every array is optional for a reader: a record
from a dropped/failed capture may miss some.

  op               level         name                      shape / dtype
  ---------------  ------------  ------------------------  ---------------------------------------
  layout           counts        num_tokens_per_rank_R     [R] int32
                   counts        num_tokens_per_expert_E   [E] int32
                   routing       topk_idx_TK               [T, K] int64
  dispatch         counts        num_tokens_per_rank_R     [R] int32   tokens this rank sends per rank
                   counts        num_tokens_per_expert_E   [E] int32   (t, k) slots per expert
                   counts        recv_tokens_per_rank_R    [R] int32   rows received from each source
                   counts        recv_tokens_per_expert_L  [L] int64   num_recv_tokens_per_expert_list
                   routing       topk_idx_TK               [T, K] int64
                   routing       topk_weights_TK           [T, K] float32
                   routing       recv_src_idx_N            [N] int32   source token index of each row
                   routing       rank_prefix_matrix_RR     [R, R] int32 (intranode handle)
                   routing       send_head_TR              [T, R] int32 intranode handle's send_head
                                                                 as of dispatch (combine rewrites it)
                   fingerprints  x_fp_T                    [T] uint64  fingerprint of each sent row
                   fingerprints  recv_x_fp_N               [N] uint64
                   payload       x_TH                      [T, H] bf16/fp8 payload as given
                   payload       x_scales_TS               [T, H/128] float32 (fp8 input only)
                   any           token_tag_T               [T] int64 tags from capture.tag_tokens()
  cached_dispatch  counts        recv_tokens_per_rank_R    [R] int32
                   fingerprints  x_fp_T, recv_x_fp_N
                   payload       x_TH, x_scales_TS
  combine          fingerprints  x_fp_N                    [N] uint64 (combine input rows)
                   fingerprints  combined_fp_T             [T] uint64
                   payload       x_NH                      [N, H] bf16
                   routing       topk_weights_NK           [N, K] float32 when passed
  ll_dispatch      counts        recv_count_L              [L] int32
                   routing       topk_idx_TK               [T, K] int64
                   routing       layout_range_LR           [L, R] int64 ((begin << 32) | count)
                   routing       src_info_V                [V] int32 valid rows of src_info,
                                                                 expert-major, row order as received
                   fingerprints  x_fp_T                    [T] uint64
                   fingerprints  recv_x_fp_V               [V] uint64 (valid rows, same order)
                   payload       x_TH                      [T, H] bf16
                   any           token_tag_T
  ll_combine       routing       topk_idx_TK, topk_weights_TK  this rank's original tensors
                   fingerprints  x_fp_V                    [V] uint64 valid input rows
                   fingerprints  combined_fp_T             [T] uint64
                   payload       x_VH                      [V, H] bf16 valid input rows

The record's `meta` (a small JSON object) holds what is not an array: the bound arguments'
shapes/dtypes/flags ("args"), Config, M and E, "hidden", "x_dtype", "use_fp8", the seq of the
dispatch a combine/cached dispatch belongs to ("dispatch_seq"), the LL buffer parity, and for a
failed call "error" (the exception text). Exact keys are documented in epreplay.capture.

DeepEP V2 (`ElasticBuffer`, format version 2): its dispatch/cached dispatch/combine are recorded
as the ops dispatch/cached_dispatch/combine with header.variant = VARIANT_ELASTIC and meta "api":
"elastic", and hold the same arrays with V1's meaning, so index, stats, diff and the TUI read them
alike: num_tokens_per_rank_R and num_tokens_per_expert_E are counted from topk_idx (V2 takes no
layout tensors), recv_tokens_per_rank_R and recv_src_idx_N come from the EPHandle's
recv_src_metadata, recv_tokens_per_expert_L are the aligned per-expert counts, and received rows
(recv_src_idx_N, recv_x_fp_N) are in (source rank, token) order whatever V2's receive order was;
an expanded receive is folded to one row per token. V2-only: meta "do_expand", "do_cpu_sync",
"M" (num_max_tokens_per_rank), "E"; an expanded combine's x_fp_X [X] uint64, x_XH [X, H] bf16 and
topk_weights_X [X] float32 (one row per expanded slot).

Fingerprints (every *_fp_* array above) are epreplay.format.fingerprint's 64-bit row hashes; the record
meta key "fp_version" (int) names the definition that made them: 2 (FINGERPRINT_VERSION) for
records written now, absent for recordings made before versions existed, which are version 1
(`fp_version(meta)` reads it so). A replay that compares recorded fingerprints recomputes its own
with that version. Readers ignore meta keys they do not know.
"""
from __future__ import annotations

import enum
import json
import struct
from dataclasses import asdict, dataclass, field, replace

# 1: DeepEP V1 Buffer records only. 2: records may come from a V2 ElasticBuffer: header.variant
# (the old pad word) is VARIANT_ELASTIC and meta "api" is "elastic" (see the V2 note above).
# Readers take any version up to this one; a v1 shard reads as before (variant 0).
FORMAT_VERSION = 2
VARIANT_BUFFER = 0  # DeepEP V1 `Buffer` (and every record of a v1 shard)
VARIANT_ELASTIC = 2  # DeepEP V2 `ElasticBuffer`
# The token fingerprint definition new records use (epreplay.format.fingerprint.CURRENT; here so that
# torch-free writers and readers know it). Version 1 records carry no "fp_version" meta key.
FINGERPRINT_VERSION = 2


def fp_version(meta: "dict | None") -> int:
    """The fingerprint version of a record's *_fp_* arrays: meta["fp_version"], 1 when absent."""
    v = (meta or {}).get("fp_version")
    return 1 if v is None else int(v)


class Op(enum.IntEnum):
    """A hooked Buffer entry point."""

    LAYOUT = 1
    DISPATCH = 2
    CACHED_DISPATCH = 3
    COMBINE = 4
    LL_DISPATCH = 5
    LL_COMBINE = 6

    @property
    def label(self) -> str:
        """The lower-case name used on the command line, in the index and in reports."""
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> "Op":
        try:
            return cls[text.strip().upper()]
        except KeyError:
            known = ", ".join(op.label for op in cls)
            raise ValueError(f"unknown op {text!r}; known ops: {known}") from None


class Level(enum.IntEnum):
    """Capture level; each level records everything of the levels below it."""

    COUNTS = 1
    ROUTING = 2
    FINGERPRINTS = 3
    PAYLOAD = 4

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> "Level":
        try:
            return cls[text.strip().upper()]
        except KeyError:
            known = " < ".join(level.label for level in cls)
            raise ValueError(f"unknown capture level {text!r}; levels: {known}") from None


class Kind(enum.IntEnum):
    """What a record is."""

    CALL = 1  # one hooked call on one rank
    EVENT = 2  # a recorder event: flight dump (meta["reason"]), drops, capture disabled


class Status(enum.IntEnum):
    OK = 0
    ERROR = 1  # the hooked call raised; meta["error"] holds the text
    HUNG = 2  # staged at entry, dumped by the watchdog before the call returned


# Record header, little-endian, fixed size (64 bytes). It travels inside a zstd skippable frame
# ahead of the record's data frame, so an index can list calls without decompressing anything.
#   kind u8, op u8, level u8, status u8, buffer u16, variant u16, seq u64, step i32, layer i32,
#   tokens u32, comp_len u32, raw_len u32, crc32 u32, start_ns i64, duration_ns i64
_HEADER = struct.Struct("<BBBBHHQiiIIIIqq")
assert _HEADER.size == 56


@dataclass(frozen=True)
class RecordHeader:
    """Fixed-size header of one record.

    Attributes:
        kind: CALL or EVENT.
        op: the hooked entry point (meaningless for EVENT records; 0 there).
        level: capture level the record was taken at.
        status: OK, ERROR (the call raised) or HUNG (dumped while still inside the call).
        buffer: creation order of the Buffer in its process (0 for the first).
        seq: per-buffer call sequence number; (buffer, seq) names one collective on every rank.
        step: model step (-1 unknown). layer: MoE layer index (-1 unknown).
        tokens: T, the calling rank's token count for this call.
        comp_len / raw_len: compressed and raw size of the data frame that follows.
        crc32: CRC32 of the compressed data frame bytes.
        start_ns: wall-clock start (time.time_ns) on the calling host.
        duration_ns: call duration (CUDA events on GPU), -1 when unknown.
        variant: which DeepEP API made the call: VARIANT_BUFFER (V1) or VARIANT_ELASTIC (V2);
            0 in every v1 shard (the word was padding there).
    """

    kind: Kind
    op: int
    level: Level
    status: Status
    buffer: int
    seq: int
    step: int
    layer: int
    tokens: int
    comp_len: int = 0
    raw_len: int = 0
    crc32: int = 0
    start_ns: int = 0
    duration_ns: int = -1
    variant: int = VARIANT_BUFFER

    SIZE = _HEADER.size

    def to_bytes(self) -> bytes:
        return _HEADER.pack(
            int(self.kind), int(self.op), int(self.level), int(self.status), self.buffer, self.variant,
            self.seq, self.step, self.layer, self.tokens, self.comp_len, self.raw_len,
            self.crc32, self.start_ns, self.duration_ns,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> "RecordHeader":
        (kind, op, level, status, buffer, variant, seq, step, layer, tokens, comp_len, raw_len,
         crc, start_ns, duration_ns) = _HEADER.unpack(data)
        return cls(Kind(kind), op, Level(level), Status(status), buffer, seq, step, layer,
                   tokens, comp_len, raw_len, crc, start_ns, duration_ns, variant)

    @property
    def op_enum(self) -> Op:
        return Op(self.op)

    def with_data(self, *, comp_len: int, raw_len: int, crc32: int) -> "RecordHeader":
        return replace(self, comp_len=comp_len, raw_len=raw_len, crc32=crc32)


@dataclass(frozen=True)
class ShardInfo:
    """What a shard's file header says: which run and rank it belongs to, and static shapes.

    Attributes:
        run_id: the run's id (manifest.json's run_id); a shard of another run is rejected.
        rank: global rank of the process that wrote it. world_size: R.
        num_experts: E (0 when unknown at open time). topk: K (0 unknown). hidden: H (0 unknown).
        level: capture level. created_ns: time.time_ns() at open.
        node: the node (torchrun's node rank) of the process that wrote it, -1 unknown (shards
            written before nodes were recorded). host: its host name, "" unknown.
    """

    run_id: str
    rank: int
    world_size: int
    num_experts: int = 0
    topk: int = 0
    hidden: int = 0
    level: Level = Level.ROUTING
    created_ns: int = 0
    version: int = FORMAT_VERSION
    node: int = -1
    host: str = ""

    def to_bytes(self) -> bytes:
        body = asdict(self)
        body["level"] = int(self.level)
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ShardInfo":
        body = json.loads(data.decode())
        body["level"] = Level(body["level"])
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in body.items() if k in known})  # a newer writer's keys: ignored


@dataclass(frozen=True)
class Manifest:
    """RUN/manifest.json: what the run is, written by rank 0 and completed on close.

    `ranks` holds each rank's closing facts (host, records, dropped, disabled reason, dumps).
    """

    run_id: str
    created: str
    world_size: int
    num_experts: int = 0
    topk: int = 0
    hidden: int = 0
    x_dtype: str = "bfloat16"
    level: str = "routing"
    release: str = ""
    command: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    hosts: list[str] = field(default_factory=list)
    flight_steps: int = 0
    payload_every: int = 1
    ranks: dict[str, dict] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        body = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in body.items() if k in known})


@dataclass(frozen=True)
class Record:
    """One decoded record: its header, its named arrays (numpy, original dtypes) and its meta."""

    header: RecordHeader
    arrays: dict[str, "object"]  # name -> numpy.ndarray (kept untyped so this module needs no numpy)
    meta: dict[str, object]
    offset: int = -1  # byte offset of the record's header frame in its shard
