"""The local multi-process launcher: results by rank, failures end the group, nothing left behind."""
from __future__ import annotations

import pytest

from epreplay.launch import RankFailed, run_ranks


def _sum_ranks(ctx):
    import torch
    import torch.distributed as dist

    t = torch.tensor([ctx.rank + 1])
    dist.all_reduce(t)
    return (ctx.rank, int(t))


def _rank1_raises(ctx):
    if ctx.rank == 1:
        raise ValueError("planted failure on rank 1")
    import torch.distributed as dist

    dist.barrier()  # rank 0 blocks here forever without the launcher's clean-up


def test_results_by_rank():
    assert run_ranks(_sum_ranks, 3) == [(0, 6), (1, 6), (2, 6)]


def test_one_failure_ends_group_with_its_traceback():
    with pytest.raises(RankFailed) as info:
        run_ranks(_rank1_raises, 2, timeout=60)
    assert "planted failure on rank 1" in str(info.value)
    assert 1 in info.value.errors
