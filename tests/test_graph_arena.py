"""The CUDA-graph rings' memory (capture/graph_arena.py), on CPU tensors: what a site is given.

The GPU side (rings that keep a replay's slot until the drain) is
tests/test_emulate_graph_gpu.py::test_calls_captured_in_a_cuda_graph_are_recorded_at_each_replay.
"""
from __future__ import annotations

import torch

from epreplay.capture import graph_arena
from epreplay.capture.graph_arena import ALIGN, CHUNK_BYTES, MAX_SLOTS, MIN_SLOTS, Arena, slots_for


def test_a_small_site_gets_every_slot_a_large_one_fewer_and_none_past_the_room() -> None:
    assert slots_for(3072, CHUNK_BYTES) == MAX_SLOTS  # a T=48 topk row: 256 slots in 768 KiB
    big = 160 << 10  # a DeepSeek-V3 dispatch slot at 144 ranks (src_info [2, 18432] int32)
    assert slots_for(big, CHUNK_BYTES) == 12  # 2 MiB a site
    assert slots_for(big, 9 * big) == 9 and slots_for(big, MIN_SLOTS * big) == MIN_SLOTS  # what fits, >= MIN_SLOTS
    assert slots_for(big, MIN_SLOTS * big - 1) == 0


def test_rings_are_contiguous_aligned_disjoint_views_of_one_chunk_kept_for_the_process() -> None:
    arena = Arena(torch.device("cpu"), budget=3 * CHUNK_BYTES)
    assert arena.rings({"a": ((4,), torch.int64)}) == {}  # nothing reserved yet: skipped
    arena.reserve()
    chunk = arena.chunk
    assert chunk is not None and any(t is chunk for t in graph_arena._KEEP)
    rings = arena.rings({"topk_idx_TK": ((48, 8), torch.int64), "recv_count_L": ((3,), torch.int32),
                         "marks_T": ((5,), torch.bool)})
    assert {n: tuple(r.shape) for n, r in rings.items()} == {
        "topk_idx_TK": (MAX_SLOTS, 48, 8), "recv_count_L": (MAX_SLOTS, 3), "marks_T": (MAX_SLOTS, 5)}
    spans = []
    for r in rings.values():
        assert r.is_contiguous() and r.untyped_storage().data_ptr() == chunk.untyped_storage().data_ptr()
        start = r.data_ptr() - chunk.data_ptr()
        assert start % ALIGN == 0
        spans.append((start, start + r.numel() * r.element_size()))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] <= arena.used
    # writing one ring's last slot leaves the others as they were
    before = {n: r.clone() for n, r in rings.items()}
    rings["recv_count_L"][-1] = 7
    assert torch.equal(rings["topk_idx_TK"], before["topk_idx_TK"]) and torch.equal(rings["marks_T"], before["marks_T"])


def test_a_new_chunk_only_when_the_last_is_mostly_used_and_never_past_the_budget() -> None:
    arena = Arena(torch.device("cpu"), budget=CHUNK_BYTES + CHUNK_BYTES // 2)
    arena.reserve()
    first = arena.chunk
    arena.reserve()
    assert arena.chunk is first  # still empty: no second chunk
    site = ((1024, 256), torch.float32)  # 1 MiB a slot: MIN_SLOTS of them
    while arena.rings({"x": site}):
        pass
    assert arena.used > CHUNK_BYTES * 3 // 4
    arena.reserve()
    assert arena.chunk is not first and arena.chunk.numel() == CHUNK_BYTES // 2  # what the budget left
    assert arena.reserved == arena.budget
    while arena.rings({"x": site}):
        pass
    full = arena.chunk
    arena.reserve()
    assert arena.chunk is full  # budget spent: sites are skipped from now on
    assert arena.rings({"x": site}) == {}


def test_sites_stage_into_the_arena_until_it_is_spent() -> None:
    """graph_ring's sites (run eagerly on CPU here: the same ops a capture records) write slot
    counter % S of their rings, and a site the arena has no room for reports it (stage_end counts it)."""
    from epreplay.capture.graph_ring import GraphRing
    from epreplay.format.records import Level, Op

    ring = GraphRing(buffer_id=0, level=Level.ROUTING, device=torch.device("cpu"), ring_bytes=CHUNK_BYTES)
    ring.arena.reserve()
    topk = torch.arange(48 * 8).reshape(48, 8)
    site = ring.site(Op.LL_COMBINE, layer=0, tokens=48, meta={})
    for r in range(MAX_SLOTS + 3):  # wraps: slot r % S
        assert site.stage({"topk_idx_TK": topk + r})
    S = site.rings["topk_idx_TK"].shape[0]
    assert S == MAX_SLOTS and int(site.counter) == MAX_SLOTS + 3
    assert torch.equal(site.rings["topk_idx_TK"][2], topk + MAX_SLOTS + 2)
    assert torch.equal(site.rings["topk_idx_TK"][3], topk + 3)
    big = {"src_info_LX": torch.zeros(64, 8192, dtype=torch.int32)}  # 2 MiB a slot: MIN_SLOTS fit ~3 times
    staged = [ring.site(Op.LL_DISPATCH, layer=i, tokens=48, meta={}).stage(big) for i in range(6)]
    assert staged[:3] == [True] * 3 and staged[-1] is False, staged
