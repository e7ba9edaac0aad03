"""Index one shard: its calls, and its routing aggregated per (step, layer) with vectorised numpy.

Runs in worker processes (one shard per task); numpy + the shard reader, no duckdb, with the
aggregation in C (epreplay/index/_indexc.c) where it was built. Records are read once: a record the
index decodes is checked by zstd's content checksum as it decompresses, the others by their
CRC (reading and decoding: epreplay.index.decode). The parent (epreplay.index.build) merges
the per-shard results into the index tables.

What a shard contributes (its rank is the sending rank of every aggregate):
  load_PE  [P, E] slots (t, k) per expert, from topk_idx_TK of dispatch / ll_dispatch
           (counts level: num_tokens_per_expert_E);
  sent_PR  [P, R] rows sent per destination rank: normal dispatch counts a token once per
           destination (DeepEP's is_token_in_rank), LL once per (token, expert) slot
           (counts level: num_tokens_per_rank_R);
  bytes_PR [P, R] the same x row bytes;
  recv_PE  [P, E] receive-side slots of counts-level ll_dispatch records (recv_count_L) whose
           senders are unknown: they count in expert_load but not in expert_load_rank/traffic.
P indexes sl_P2, the distinct (step, layer) pairs of the shard's routing records, ascending.

Legend: T tokens, K top-k, E experts, R ranks, X = E / R local experts, P (step, layer) pairs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import zstandard

from epreplay.format.frames import REC_PREFIX
from epreplay.format.records import Kind, Op, ShardInfo
from epreplay.index.check import ShardStamp, stamp
from epreplay.index.decode import RecordReader, decode_some, row_bytes

try:  # the C aggregation (epreplay/index/_indexc.c), where the package was built with a compiler
    from epreplay.index import _indexc
except ImportError:
    _indexc = None

ROUTING_OPS = (int(Op.DISPATCH), int(Op.LL_DISPATCH))
CHUNK_RECORDS = 512  # records per vectorised batch: bounds memory (~2 MB of ids per 512 x 512 x 8)


@dataclass
class ShardResult:
    """What one worker found in one shard (see the module docstring for the aggregates)."""

    rank: int
    info: ShardInfo
    size: int
    complete: bool
    writer_active: bool
    truncated_at: int | None
    problem: str | None
    records: int  # intact records up to the end of what was indexed (all, not only new)
    indexed_end: int
    start: int  # first record indexed by this task
    calls: dict[str, np.ndarray] = field(default_factory=dict)  # calls table columns (new records)
    events: list[tuple[int, int, str, str]] = field(default_factory=list)  # (offset, start_ns, reason, detail)
    errors: dict[int, str] = field(default_factory=dict)  # offset -> exception text of failed calls
    dropped: int = 0
    sl_P2: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    load_PE: np.ndarray | None = None
    sent_PR: np.ndarray | None = None
    bytes_PR: np.ndarray | None = None
    recv_PE: np.ndarray | None = None
    path: str = ""
    routings: int = 0  # token-layer routings aggregated (rows of topk_idx_TK, or T at counts level)
    stamp: ShardStamp = ShardStamp(0, 0, 0)  # taken before reading (epreplay.index.check)


def index_shard(path: str, start: int = 0, *, num_experts: int = 0, world_size: int = 0,
                hidden: int = 0, expect_end: int = 0, derived_layers_per_step: int = 0) -> ShardResult:
    """Index records [start:] of the shard at `path` (a grown shard resumes where it was left).

    Args:
        num_experts / world_size / hidden: E, R, H from the manifest (0: from the shard header).
        expect_end: with start > 0, the byte where record start-1 ended when indexed last time:
            reading resumes there (epreplay.index.scan).
        derived_layers_per_step: L > 0 when the run's steps were found in its traffic
            (epreplay.format.steps): recorded layer call u is indexed as (u // L, u % L).
    Never raises for damage: a record whose CRC or body fails ends what is indexed, and the
    result carries its byte offset (truncated_at) and the reason (problem).
    """
    from epreplay.index.scan import resume
    from epreplay.format.shard import open_shard

    # stamped before anything is read: a change made while reading leaves a stamp that does not
    # match the file, so the next open re-reads it (the other order could bless unread bytes)
    before = stamp(path)
    if start:  # resume where the last indexing stopped, without re-scanning the indexed part
        r = resume(str(path), expect_end, start)
        info, new = r.info, r.headers
        res = ShardResult(info.rank, info, r.size, r.complete, r.writer_active, r.truncated_at,
                          r.problem, start + len(new), r.end, start, path=str(path))
    else:
        with open_shard(path) as scan:
            info = scan.info
            new = scan.header_array()
            # end of the last intact record, from the header array (scan.valid_end would build
            # a Python Entry per record)
            end = (int(new["offset"][-1]) + REC_PREFIX + int(new["comp_len"][-1])) if len(new) \
                else scan.data_start
            res = ShardResult(info.rank, info, scan.size, scan.complete, scan.writer_active,
                              scan.truncated_at, scan.problem, len(new), end, start, path=str(path))
    res.stamp = before
    if derived_layers_per_step:
        from epreplay.format.steps import DETECTED, StepPlan, apply

        new["step"], new["layer"] = apply(StepPlan(DETECTED, derived_layers_per_step),
                                          new["step"], new["layer"])
    E = num_experts or info.num_experts
    R = world_size or info.world_size
    fd = os.open(path, os.O_RDONLY)
    try:
        n_ok, routing = _read_records(fd, new, res, hidden or info.hidden)
    finally:
        os.close(fd)
    if n_ok < len(new):  # a damaged record: index what precedes it, flag where it is
        bad = int(new["offset"][n_ok])
        res.truncated_at = bad if res.truncated_at is None else min(bad, res.truncated_at)
        res.problem = (f"record at byte {bad}: {res.problem}; {start + n_ok} records intact, "
                       f"{res.size - bad} bytes not indexed; run 'epreplay repair {path}'")
        res.complete = False
        new = new[:n_ok]
        res.records = start + n_ok
        res.indexed_end = bad
    res.calls = _call_columns(new[new["kind"] == int(Kind.CALL)], info.rank, res.errors)
    if not E and routing:
        E = int(routing[0][4].get("num_experts") or 0)
    if routing and E and R:
        _aggregate(res, routing, E, R)
    return res


def _read_records(fd: int, new: np.ndarray, res: ShardResult, hidden: int) -> tuple[int, list]:
    """CRC-check every record; decode routing records, events and failed calls' meta.

    Returns (records intact, routing) with routing = [(step, layer, ll, arrays, meta, row_bytes)].
    On a damaged record sets res.problem to the reason and returns its position."""
    reader = RecordReader(fd)
    routing: list = []
    metas: dict = {}
    rb_cache: dict = {}
    call, event, disp, ll_disp = int(Kind.CALL), int(Kind.EVENT), int(Op.DISPATCH), int(Op.LL_DISPATCH)
    cols = [new[k].tolist() for k in ("offset", "comp_len", "crc32", "raw_len", "kind", "op",
                                       "status", "step", "layer")]
    for i, (off, clen, crc, rlen, kind, op, status, step, layer) in enumerate(zip(*cols)):
        try:
            routing_call = kind == call and (op == disp or op == ll_disp)
            wanted = routing_call or kind == event or status != 0
            raw = reader.frame(off, clen, crc, rlen, wanted)
            if routing_call:
                ll = op == ll_disp
                arrays, meta = decode_some(raw, ("topk_idx_TK", "num_tokens_per_expert_E",
                                                 "num_tokens_per_rank_R", "recv_count_L"), metas)
                key = (id(meta), ll)
                rb = rb_cache.get(key)
                if rb is None:
                    rb = rb_cache[key] = row_bytes(meta, hidden, ll)
                routing.append((step, layer, ll, arrays, meta, rb))
            elif wanted:
                _, meta = decode_some(raw, ())
                if kind == event:
                    res.events.append((off, int(new["start_ns"][i]), str(meta.get("reason", "")),
                                       str(meta.get("detail", ""))[:500]))
                    res.dropped = max(res.dropped, int(meta.get("dropped") or 0))
                else:
                    res.errors[off] = str(meta.get("error", ""))[:2000]
        except (ValueError, KeyError, TypeError, zstandard.ZstdError) as exc:
            res.problem = str(exc)
            return i, routing
    return len(new), routing


def _call_columns(h: np.ndarray, rank: int, errors: dict[int, str]) -> dict[str, np.ndarray]:
    if len(h) and int(h["seq"].max()) >= 1 << 32:
        raise ValueError(f"rank {rank}: call seq {int(h['seq'].max())} exceeds the index's UINTEGER")
    offsets = h["offset"].astype(np.uint64)
    err = np.array([errors.get(int(o)) for o in offsets], dtype=object) if errors else None
    return {
        "rank": np.full(len(h), rank, np.int16), "buffer": h["buffer"].astype(np.uint16),
        "seq": h["seq"].astype(np.uint32), "step": h["step"].astype(np.int32),
        "layer": h["layer"].astype(np.int16), "op": h["op"].astype(np.int8),
        "level": h["level"].astype(np.uint8), "tokens": h["tokens"].astype(np.uint32),
        "shard_offset": offsets, "shard_length": (h["comp_len"] + REC_PREFIX).astype(np.uint32),
        "start_ns": h["start_ns"].astype(np.int64), "duration_ns": h["duration_ns"].astype(np.int64),
        "status": h["status"].astype(np.int8),
        "error": err if err is not None else np.full(len(h), None, dtype=object),
    }


def _aggregate(res: ShardResult, routing: list, E: int, R: int) -> None:
    """Fill res.sl_P2 / load_PE / sent_PR / bytes_PR / recv_PE from the routing records."""
    X = max(E // R, 1)
    key_N = np.array([(s << 20) + (l + 1) for s, l, *_ in routing], np.int64)  # (step, layer) order
    uniq, p_N = np.unique(key_N, return_inverse=True)
    P = uniq.size
    res.sl_P2 = np.stack([uniq >> 20, (uniq & ((1 << 20) - 1)) - 1], axis=1)
    load_PE = np.zeros((P, E), np.int64)
    sent_PR = np.zeros((P, R), np.int64)
    bytes_PR = np.zeros((P, R), np.int64)
    recv_PE = None
    normal: list[tuple[int, np.ndarray, int]] = []
    ll: list[tuple[int, np.ndarray, int]] = []
    for n, (_s, _l, is_ll, arrays, _meta, rb) in enumerate(routing):
        p = int(p_N[n])
        idx = arrays.get("topk_idx_TK")
        res.routings += int(idx.shape[0]) if idx is not None and idx.ndim == 2 else 0
        if idx is not None and idx.ndim == 2:
            (ll if is_ll else normal).append((p, idx, rb))
        elif not is_ll and "num_tokens_per_expert_E" in arrays:  # counts level
            per_e = arrays["num_tokens_per_expert_E"][:E]
            load_PE[p, :per_e.size] += per_e
            per_r = arrays.get("num_tokens_per_rank_R")
            if per_r is not None:
                sent_PR[p, :per_r.size] += per_r[:R]
                bytes_PR[p, :per_r.size] += per_r[:R].astype(np.int64) * rb
        elif is_ll and "recv_count_L" in arrays:  # counts-level LL: receive side only
            if recv_PE is None:
                recv_PE = np.zeros((P, E), np.int64)
            cnt = arrays["recv_count_L"]
            lo = res.rank * X
            recv_PE[p, lo:lo + cnt.size] += cnt[:max(E - lo, 0)]
    for group, dedup in ((normal, True), (ll, False)):
        for c in range(0, len(group), CHUNK_RECORDS):
            _chunk(group[c:c + CHUNK_RECORDS], dedup, E, R, X, load_PE, sent_PR, bytes_PR)
    res.load_PE, res.sent_PR, res.bytes_PR, res.recv_PE = load_PE, sent_PR, bytes_PR, recv_PE


def _chunk(group: list[tuple[int, np.ndarray, int]], dedup: bool, E: int, R: int, X: int,
           load_PE: np.ndarray, sent_PR: np.ndarray, bytes_PR: np.ndarray) -> None:
    """Aggregate a batch of routing records into rows of load_PE / sent_PR / bytes_PR: in one C
    pass (epreplay/index/_indexc.c) where it was built, else with numpy (`_chunk_numpy`)."""
    if _indexc is None:
        _chunk_numpy(group, dedup, E, R, X, load_PE, sent_PR, bytes_PR)
        return
    K = max(idx.shape[1] for _, idx, _ in group)
    parts = [idx if idx.shape[1] == K else np.pad(idx.astype(np.int64), ((0, 0), (0, K - idx.shape[1])),
                                                  constant_values=-1) for _, idx, _ in group]
    size = max(x.dtype.itemsize for x in parts)
    want = {1: np.uint8, 2: np.int16}.get(size, np.int64)
    if any(x.dtype != want for x in parts):  # mixed widths: widen to the signed widest
        want = np.int64 if size > 2 else np.int16
        parts = [x.astype(want) for x in parts]
    idx_GK = np.ascontiguousarray(np.concatenate(parts) if len(parts) > 1 else parts[0])
    T_n = np.array([idx.shape[0] for _, idx, _ in group], np.int64)
    p_n = np.array([p for p, _, _ in group], np.int64)
    lo, hi = int(p_n.min()), int(p_n.max()) + 1
    p_G = np.repeat((p_n - lo).astype(np.int32), T_n)
    rb_G = np.repeat(np.array([rb for _, _, rb in group], np.int64), T_n)
    # the blocks are C-contiguous row ranges of the shard's tables: written in place
    _indexc.aggregate(idx_GK, idx_GK.dtype.itemsize, K, p_G, rb_G, load_PE[lo:hi], sent_PR[lo:hi],
                      bytes_PR[lo:hi], E, R, X, int(dedup))


def _chunk_numpy(group: list[tuple[int, np.ndarray, int]], dedup: bool, E: int, R: int, X: int,
                 load_PE: np.ndarray, sent_PR: np.ndarray, bytes_PR: np.ndarray) -> None:
    """Aggregate a batch of routing records at once (one bincount per table, not per record).

    Ids stay narrow (uint8 / int16) through the per-slot passes; only bincount keys are wide."""
    p_n = np.array([p for p, _, _ in group], np.int64)
    T_n = np.array([idx.shape[0] for _, idx, _ in group], np.int64)
    K = max(idx.shape[1] for _, idx, _ in group)
    wide = any(idx.dtype.itemsize > 2 or idx.shape[1] != K for _, idx, _ in group)
    parts = [idx.astype(np.int64) if wide else idx for _, idx, _ in group]
    if wide:
        parts = [np.pad(x, ((0, 0), (0, K - x.shape[1])), constant_values=-1) for x in parts]
    idx_GK = np.concatenate(parts) if len(parts) > 1 else parts[0]
    if idx_GK.dtype == np.uint8 and E > 255:
        pass  # every id valid
    lo, hi = int(p_n.min()), int(p_n.max()) + 1
    n = hi - lo
    p_G = np.repeat((p_n - lo).astype(np.int32), T_n)
    lo_id = int(idx_GK.min(initial=0))
    hi_id = int(idx_GK.max(initial=0))
    valid = None
    if lo_id < 0 or hi_id >= E:
        valid = (idx_GK >= 0) & (idx_GK < E)
        idx_GK = np.where(valid, idx_GK, 0)
    key = (p_G * E)[:, None] + idx_GK
    load_PE[lo:hi] += np.bincount((key if valid is None else key[valid]).ravel(),
                                  minlength=n * E).reshape(n, E)
    # destination rank of each slot, as a small lookup (E entries) instead of a division
    if X & (X - 1) == 0 and idx_GK.dtype == np.uint8:  # X a power of two: a shift, 40x a gather
        dst_KG = np.ascontiguousarray(idx_GK.T) >> (X.bit_length() - 1)
    else:
        dst_of = (np.arange(E) // X).astype(np.uint8 if R <= 255 else np.int32)
        dst_KG = dst_of[idx_GK.T]  # [K, G]: each slot column contiguous for the comparisons below
    if valid is not None and dedup:
        # a slot with no expert (-1, read as expert 0 above) must not hide a real slot for rank 0
        # from the duplicate test: give it a destination no real slot has
        dst_KG = np.where(valid.T, dst_KG, R).astype(np.int32 if R >= 255 else dst_KG.dtype)
    if dedup:  # a token goes once to each destination rank, however many of its experts live there
        keep_KG = np.ones(dst_KG.shape, bool)
        for k in range(1, K):
            dup = dst_KG[k] == dst_KG[0]
            for j in range(1, k):
                dup |= dst_KG[k] == dst_KG[j]
            keep_KG[k] = ~dup
    else:
        keep_KG = None
    if valid is not None:
        keep_KG = valid.T if keep_KG is None else keep_KG & valid.T
    skey = (p_G * R)[None, :] + dst_KG
    sent = np.bincount((skey if keep_KG is None else skey[keep_KG]).ravel(),
                       minlength=n * R).reshape(n, R)
    sent_PR[lo:hi] += sent
    rb_n = np.array([rb for _, _, rb in group], np.int64)
    if (rb_n == rb_n[0]).all():
        bytes_PR[lo:hi] += sent * rb_n[0]
    else:
        rb_KG = np.broadcast_to(np.repeat(rb_n, T_n)[None, :], dst_KG.shape)
        w = np.bincount((skey if keep_KG is None else skey[keep_KG]).ravel(),
                        weights=(rb_KG if keep_KG is None else rb_KG[keep_KG]).ravel(), minlength=n * R)
        bytes_PR[lo:hi] += np.rint(w).astype(np.int64).reshape(n, R)
