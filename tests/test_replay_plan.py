"""Rank folding plan: placement, expert homes, traffic aggregation, bad --ranks."""
from __future__ import annotations

import numpy as np
import pytest

from epreplay.errors import UsageError
from epreplay.replay.plan import Plan, processes, valid_ranks


@pytest.mark.parametrize("n,m", [(8, 8), (8, 4), (8, 2), (8, 1), (6, 3), (1, 1)])
def test_every_expert_stays_with_its_virtual_rank(n: int, m: int) -> None:
    plan = Plan.make(n, m, experts=4 * n)
    for e in range(plan.experts):
        v = plan.expert_home_virtual(e)
        # the physical rank owning e (DeepEP's rule e // (E/M)) is the one hosting e's virtual rank
        assert plan.expert_home_physical(e) == plan.physical_of(v)
        assert e in plan.experts_of_physical(plan.physical_of(v))
    for p in range(m):
        union = [e for v in plan.virtual_of(p) for e in plan.experts_of_virtual(v)]
        assert union == list(plan.experts_of_physical(p))  # contiguous, in order, no gaps


def test_blocks_are_contiguous_and_cover_all_ranks() -> None:
    plan = Plan.make(8, 2, experts=32)
    assert list(plan.virtual_of(0)) == [0, 1, 2, 3] and list(plan.virtual_of(1)) == [4, 5, 6, 7]
    assert [plan.slot_of(v) for v in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert plan.describe()[1] == "  process 0: virtual ranks 0..3, experts 0..15"
    assert plan.to_dict()["placement"][1] == {"physical": 1, "virtual": [4, 7], "experts": [16, 31]}


def test_physical_traffic_is_block_sum_of_virtual() -> None:
    rng = np.random.default_rng(0)
    t = rng.integers(0, 100, size=(8, 8))
    plan = Plan.make(8, 2, experts=16)
    phys = plan.fold_matrix(t)
    assert phys.sum() == t.sum()
    assert phys[0, 1] == t[0:4, 4:8].sum() and phys[1, 1] == t[4:8, 4:8].sum()
    assert np.array_equal(Plan.make(8, 8, 16).fold_matrix(t), t)
    assert plan.fold_vector(np.arange(8)).tolist() == [6, 22]


def test_bad_rank_counts_name_the_valid_ones() -> None:
    assert valid_ranks(8) == [1, 2, 4, 8]
    with pytest.raises(UsageError, match=r"--ranks 3: must divide the recorded world size 8; valid values: 1, 2, 4, 8"):
        Plan.make(8, 3, experts=16)
    with pytest.raises(UsageError, match="--ranks 0"):
        Plan.make(8, 0)
    with pytest.raises(UsageError, match="multiple of the world size"):
        Plan.make(8, 4, experts=12)
    assert Plan.make(8).physical == 8


def test_one_process_is_singular() -> None:
    assert processes(1) == "1 process" and processes(2) == "2 processes"
    assert Plan.make(4, 1).describe()[0] == "plan: 4 recorded ranks on 1 process (4 per process)"
