"""Token-level side of `epreplay diff`: find the dispatch records of a run and pair tokens.

Token routing (topk_idx_TK, topk_weights_TK, token_tag_T) stays in the shards; the index only
has aggregates. This module lists a run's dispatch records from the shard footers (no
decompression), then reads the records it needs one layer at a time and hands aligned [T, K]
arrays to `epreplay.diff.metrics.token_agreement`.

Legend: T tokens of one call on one rank, K top-k, S steps, L layers.

Two ways to pair a token of run A with a token of run B:
  * position: same (step, layer, rank, n-th dispatch of that rank in that step and layer) and
    the same row. Valid when both runs processed the same batches in the same order.
  * tag: the same token_tag_T value (from `epreplay.marks.tag_tokens`) in the same layer,
    wherever (step, rank, row) it was processed. A tag seen twice in one run's layer (a
    re-processed token) is matched at its first occurrence in (step, rank, row) order and the
    repeats are counted as unmatched.

Weights: a normal dispatch record holds topk_weights_TK; a low-latency dispatch does not
(DeepEP's low_latency_dispatch takes none), so its weights come from the ll_combine that follows
it on the same rank (same ids row for row, checked). Position pairs whose records are
byte-identical (same compressed frames) are decoded once and counted as full agreement.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from epreplay.diff.metrics import TokenAgreement, identical_agreement, token_agreement
from epreplay.format.records import Kind, Level, Op, RecordHeader, Status
from epreplay.format.shard import Entry, ShardScan, open_shard
from epreplay.format.steps import StepPlan
from epreplay.format.steps import apply as apply_plan

# Records that hold the routing a token got. Layout calls also hold topk_idx_TK, but every layout
# is followed by the dispatch of the same tokens; counting both would count each token twice.
ROUTING_OPS = (int(Op.DISPATCH), int(Op.LL_DISPATCH))

# The arrays token matching decodes (a dispatch record holds more: receive layout, counts).
ROUTING_ARRAYS = ("topk_idx_TK", "topk_weights_TK", "token_tag_T")

Key = tuple[int, int, int, int]  # (step, layer, rank, occurrence)


@dataclass(frozen=True)
class DispatchRef:
    """Where one dispatch call of one rank sits: its shard scan and its entry (offset + header)."""

    key: Key
    tokens: int
    scan: ShardScan
    entry: Entry
    combine: Entry | None = None  # an ll_dispatch's ll_combine: it holds the gate weights
    fd: int = -1  # a read-only descriptor of the shard (the Catalog's) for raw frame reads

    def frames(self) -> tuple[bytes, ...]:
        """The compressed data frames of the dispatch (and its combine): equal frames mean
        byte-identical records (CRCs are checked whenever a record is decoded)."""
        fd = self.fd
        out = [os.pread(fd, self.entry.header.comp_len, self.entry.data_offset)]
        if self.combine is not None:
            out.append(os.pread(fd, self.combine.header.comp_len, self.combine.data_offset))
        return tuple(out)


class Catalog:
    """The OK dispatch records of a run, keyed by (step, layer, rank, occurrence).

    Built from shard footers only (see epreplay.format.shard), so listing a production run's 10^5
    records costs a fraction of a second. Keeps two read-only descriptors per shard open until
    `close` (the scan's, and one for raw frame comparisons).
    """

    def __init__(self, shard_paths: Iterable[Path], *, steps: tuple[int, int] | None = None,
                 layers: frozenset[int] | None = None, plan: StepPlan | None = None) -> None:
        self.scans: list[ShardScan] = []
        self.fds: list[int] = []
        self.refs: dict[Key, DispatchRef] = {}
        self._first: frozenset[str] | None = None
        for path in shard_paths:
            scan = open_shard(path)
            self.scans.append(scan)
            self.fds.append(os.open(path, os.O_RDONLY))
            self._add_shard(scan, self.fds[-1], steps, layers, plan)

    def _add_shard(self, scan: ShardScan, fd: int, steps: tuple[int, int] | None,
                   layers: frozenset[int] | None, plan: StepPlan | None) -> None:
        # Filter the footer's headers with numpy and build Python objects only for the records
        # kept: a production shard lists thousands of records (building all: seconds per run).
        h = scan.header_array()
        # steps found in the traffic (epreplay.format.steps): keyed as the index reads them; the
        # entries keep the recorded header (a record is checked against it when read)
        step_N, layer_N = apply_plan(plan, h["step"], h["layer"]) if plan is not None \
            else (h["step"], h["layer"])
        keep = ((h["kind"] == int(Kind.CALL)) & (h["status"] == int(Status.OK))
                & np.isin(h["op"], (*ROUTING_OPS, int(Op.LL_COMBINE))))
        if steps is not None:
            keep &= (step_N >= steps[0]) & (step_N < steps[1])
        if layers is not None:
            keep &= np.isin(layer_N, sorted(layers))
        rank = scan.info.rank
        seen: dict[tuple[int, int], int] = {}
        # Low-latency dispatch records carry no weights (DeepEP's low_latency_dispatch takes
        # none); the matching ll_combine does. Pair the n-th of each per (step, layer).
        ll_seen: dict[tuple[int, int], int] = {}
        combines: dict[tuple[int, int], list[Entry]] = {}
        ll_keys: list[tuple[tuple[int, int], int, Key]] = []
        for entry, step, layer in zip(_entries(h[keep]), step_N[keep].tolist(), layer_N[keep].tolist()):
            hd = entry.header
            sl = (step, layer)
            if hd.op == int(Op.LL_COMBINE):
                combines.setdefault(sl, []).append(entry)
                continue
            n = seen.get(sl, 0)
            seen[sl] = n + 1
            key = (step, layer, rank, n)
            self.refs[key] = DispatchRef(key, hd.tokens, scan, entry, fd=fd)
            if hd.op == int(Op.LL_DISPATCH):
                ll_keys.append((sl, ll_seen.get(sl, 0), key))
                ll_seen[sl] = ll_seen.get(sl, 0) + 1
        for sl, n, key in ll_keys:
            if n < len(combines.get(sl, ())):
                self.refs[key] = replace(self.refs[key], combine=combines[sl][n])

    def layers(self) -> list[int]:
        return sorted({k[1] for k in self.refs})

    def of_layer(self, layer: int) -> list[DispatchRef]:
        """This layer's dispatches in (step, rank, occurrence) order."""
        return [self.refs[k] for k in sorted(k for k in self.refs if k[1] == layer)]

    def first_arrays(self) -> frozenset[str]:
        """Names of the arrays in the run's first dispatch record (what the capture level gave)."""
        if self._first is None:
            if not self.refs:
                self._first = frozenset()
            else:
                first = self.refs[min(self.refs)]
                self._first = frozenset(first.scan.read(first.entry).arrays)
        return self._first

    def has_routing(self) -> bool:
        """Whether dispatch records hold topk_idx_TK (capture level routing or above)."""
        return "topk_idx_TK" in self.first_arrays()

    def has_tags(self) -> bool:
        """Whether the run tagged its tokens (judged on its first dispatch record)."""
        return "token_tag_T" in self.first_arrays()

    def close(self) -> None:
        for scan in self.scans:
            scan.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_KIND = {int(v): v for v in Kind}
_LEVEL = {int(v): v for v in Level}
_STATUS = {int(v): v for v in Status}
_FIELDS = ("offset", "kind", "op", "level", "status", "buffer", "seq", "step", "layer", "tokens",
           "comp_len", "raw_len", "crc32", "start_ns", "duration_ns", "variant")


def _entries(rows: np.ndarray) -> list[Entry]:
    """Entries from rows of epreplay.format.reader.HEADER_DTYPE (enum members by table lookup:
    calling the enum classes costs more than the rest of a header)."""
    cols = [rows[name].tolist() for name in _FIELDS]
    return [Entry(off, RecordHeader(_KIND[k], op, _LEVEL[lv], _STATUS[st], buf, seq, step, layer,
                                    tok, cl, rl, crc, t0, dur, var))
            for off, k, op, lv, st, buf, seq, step, layer, tok, cl, rl, crc, t0, dur, var in zip(*cols)]


def _routing(ref: DispatchRef) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(topk_idx_TK, topk_weights_TK or None, token_tag_T or None) of one dispatch record."""
    arrays = ref.scan.read(ref.entry, ROUTING_ARRAYS).arrays
    idx = arrays.get("topk_idx_TK")
    if idx is None:  # a counts-level capture: no token routing at all
        idx = np.zeros((0, 0), dtype=np.int64)
    weights = arrays.get("topk_weights_TK")
    if weights is None and ref.combine is not None:
        comb = ref.scan.read(ref.combine, ("topk_idx_TK", "topk_weights_TK")).arrays
        # Only when the combine is provably this dispatch's: the same ids, row for row.
        if comb.get("topk_weights_TK") is not None and np.array_equal(comb.get("topk_idx_TK"), idx):
            weights = comb["topk_weights_TK"]
    return idx, weights, arrays.get("token_tag_T")


@dataclass(frozen=True)
class LayerMatch:
    """Token agreement of one layer and how many tokens found no partner on each side."""

    layer: int
    agreement: TokenAgreement
    unmatched_a: int
    unmatched_b: int


def same_shapes(cat_a: Catalog, cat_b: Catalog) -> str | None:
    """None when both runs have the same dispatch calls with the same token counts, else why not."""
    keys_a, keys_b = set(cat_a.refs), set(cat_b.refs)
    if keys_a != keys_b:
        only_a, only_b = len(keys_a - keys_b), len(keys_b - keys_a)
        return f"the runs' dispatch calls differ ({only_a} only in A, {only_b} only in B)"
    diff = sum(cat_a.refs[k].tokens != cat_b.refs[k].tokens for k in keys_a)
    if diff:
        return f"{diff} dispatch calls have different token counts"
    return None


def _pool_map(fn, items: list) -> list:
    """map() over a thread pool: zstd decompression and numpy release the GIL, so reading
    many records scales with cores. Results keep the input order (sums stay deterministic)."""
    workers = min(8, os.cpu_count() or 1)
    if workers <= 1 or len(items) < 8:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def _same_record(ref_a: DispatchRef, ref_b: DispatchRef) -> bool:
    ha, hb = ref_a.entry.header, ref_b.entry.header
    if (ha.crc32, ha.comp_len, ha.raw_len) != (hb.crc32, hb.comp_len, hb.raw_len):
        return False  # the cheap test first: most differing records differ here
    if (ref_a.combine is None) != (ref_b.combine is None):
        return False
    return ref_a.frames() == ref_b.frames()


def _pair_agreement(pair: tuple[DispatchRef, DispatchRef]) -> TokenAgreement | None:
    """Agreement of two dispatches of the same position; None when their rows do not line up.
    Byte-identical records (a layer a release did not touch) are decoded once, not compared."""
    idx_a, w_a, _ = _routing(pair[0])
    if _same_record(*pair):
        return identical_agreement(idx_a, w_a) if idx_a.size else None
    idx_b, w_b, _ = _routing(pair[1])
    if idx_a.shape[0] != idx_b.shape[0] or idx_a.size == 0 or idx_b.size == 0:
        return None
    if w_a is None or w_b is None:
        w_a = w_b = None
    return token_agreement(idx_a, idx_b, w_a, w_b)


def match_by_position(cat_a: Catalog, cat_b: Catalog, layer: int) -> LayerMatch:
    """Pair row t of each (step, layer, rank, occurrence) dispatch present in both runs."""
    refs_a, refs_b = cat_a.of_layer(layer), cat_b.of_layer(layer)
    keys_a = {r.key for r in refs_a}
    pairs = [(r, cat_b.refs[r.key]) for r in refs_a if r.key in cat_b.refs]
    un_a = sum(r.tokens for r in refs_a if r.key not in cat_b.refs)
    un_b = sum(r.tokens for r in refs_b if r.key not in keys_a)
    total = TokenAgreement()
    for pair, agreement in zip(pairs, _pool_map(_pair_agreement, pairs)):
        if agreement is None:
            un_a += pair[0].tokens
            un_b += pair[1].tokens
        else:
            total = total + agreement
    return LayerMatch(layer, total, un_a, un_b)


def _narrow(ref: DispatchRef) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(token_tag_T int64, topk_idx_TK int16, topk_weights_TK float32, NaN where not recorded)
    of one record, narrowed in the worker thread so a production layer never sits in memory at
    int64/float64 width."""
    idx, w, tag = _routing(ref)
    if tag is None or tag.shape[0] != idx.shape[0]:
        return None, idx[:0].astype(np.int16), np.zeros((0, idx.shape[1]), np.float32)
    if w is None or w.shape != idx.shape:
        w = np.full(idx.shape, np.nan, np.float32)
    return tag.astype(np.int64, copy=False), idx.astype(np.int16), w.astype(np.float32, copy=False)


def _gather(refs: list[DispatchRef]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """All tagged tokens of one layer of a run, first occurrence of each tag kept.

    Returns:
        tags [N] int64 sorted unique, idx [N, K] int16 (expert ids fit: DeepEP caps E far below
        2^15; int16 quarters the memory of a production layer), weights [N, K] float32 (rows of
        NaN where the run recorded none), and how many tokens were dropped (untagged or
        repeated tags).
    """
    tags, idxs, ws = [], [], []
    dropped = 0
    for ref, (tag, idx, w) in zip(refs, _pool_map(_narrow, refs)):
        if tag is None:
            dropped += ref.tokens
            continue
        tags.append(tag)
        idxs.append(idx)
        ws.append(w)
    if not tags:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.int16), np.zeros((0, 0), np.float32), dropped
    tag_N = np.concatenate(tags)
    del tags
    idx_NK = np.concatenate(idxs)
    del idxs
    w_NK = np.concatenate(ws)
    del ws
    uniq, first = np.unique(tag_N, return_index=True)  # return_index: the first occurrence
    dropped += tag_N.size - uniq.size
    return uniq, idx_NK[first], w_NK[first], dropped


def match_by_tag(cat_a: Catalog, cat_b: Catalog, layer: int, *, chunk: int = 65536) -> LayerMatch:
    """Pair tokens of one layer that carry the same token tag in both runs."""
    tag_a, idx_a, w_a, drop_a = _gather(cat_a.of_layer(layer))
    tag_b, idx_b, w_b, drop_b = _gather(cat_b.of_layer(layer))
    _, ia, ib = np.intersect1d(tag_a, tag_b, assume_unique=True, return_indices=True)
    total = TokenAgreement()
    # Chunks bound the temporaries of token_agreement; rows with weights on both sides are
    # compared with them, the others (a low-latency call without its combine) without.
    for lo in range(0, ia.size, chunk):
        sa, sb = ia[lo:lo + chunk], ib[lo:lo + chunk]
        weighted = ~(np.isnan(w_a[sa]).any(axis=1) | np.isnan(w_b[sb]).any(axis=1))
        for rows, with_w in ((weighted, True), (~weighted, False)):
            if rows.any():
                ra, rb = sa[rows], sb[rows]
                total = total + token_agreement(idx_a[ra], idx_b[rb], w_a[ra] if with_w else None,
                                                w_b[rb] if with_w else None)
    return LayerMatch(layer, total, drop_a + tag_a.size - ia.size, drop_b + tag_b.size - ib.size)


def iter_loads(cat: Catalog, num_experts: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(step, layer, load_E) per dispatch record: (t, k) slots per expert, from the record's
    num_tokens_per_expert_E when recorded, else counted from topk_idx_TK (-1 slots ignored)."""
    for key in sorted(cat.refs):
        ref = cat.refs[key]
        arrays = ref.scan.read(ref.entry, ("num_tokens_per_expert_E", "topk_idx_TK")).arrays
        load = arrays.get("num_tokens_per_expert_E")
        if load is None:
            idx = arrays.get("topk_idx_TK")
            if idx is None:
                continue
            flat = idx.reshape(-1)
            load = np.bincount(flat[flat >= 0], minlength=num_experts)
        yield key[0], key[1], np.asarray(load, dtype=np.int64)
