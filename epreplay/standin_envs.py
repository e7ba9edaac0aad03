"""`deep_ep.utils.envs` of the stand-in: the process-group set-up DeepEP's V1 tests call.

DeepEP's tests (tests/legacy/*.py at its head) do `rank, num_ranks, group = init_dist(local_rank,
num_local_ranks)` in each spawned rank and rely on: the MASTER_ADDR / MASTER_PORT / WORLD_SIZE
(nodes) / RANK (node) variables, a process group over every rank, the default dtype bfloat16, the
default device 'cuda' with this rank's GPU current, and the seeds set from (seed + rank).
Written for epreplay (not DeepEP's code); what needs DeepEP's C++ (_C) is left out.
On a machine without CUDA the group is gloo and the default device stays the CPU.
"""
from __future__ import annotations

import inspect
import os
import random
from typing import Optional

import torch
import torch.distributed as dist

_state = {"local_rank": None, "local_seed": 0, "global_seed": 0}


def init_seed(global_seed: int) -> None:
    """Seed torch and random with global_seed + this rank (DeepEP's per-rank seeding)."""
    _state["global_seed"] = int(global_seed)
    _state["local_seed"] = int(global_seed) + dist.get_rank()
    torch.manual_seed(_state["local_seed"])
    random.seed(_state["local_seed"])


def get_local_seed() -> int:
    return int(_state["local_seed"])


def get_global_seed() -> int:
    return int(_state["global_seed"])


def dist_print(s: str = "", once_in_node: bool = False) -> None:
    """Print on every rank (or local rank 0 only), then wait for every rank."""
    assert _state["local_rank"] is not None, "call init_dist first"
    if not once_in_node or _state["local_rank"] == 0:
        print(s, flush=True)
    dist.barrier()


def init_dist(local_rank: int, num_local_ranks: int, seed: int = 0,
              backend: Optional[str] = None) -> tuple[int, int, dist.ProcessGroup]:
    """Join this rank to the job and return (rank, world_size, group of every rank).

    Args:
        local_rank: this process's index on its node (the GPU it uses).
        num_local_ranks: processes per node.
        seed: global seed; torch and random get seed + rank.
        backend: default "nccl" where CUDA is available, else "gloo".
    Environment: MASTER_ADDR (127.0.0.1), MASTER_PORT (8361), WORLD_SIZE = nodes (1), RANK = node (0).
    """
    ip = os.getenv("MASTER_ADDR", "127.0.0.1")
    port = int(os.getenv("MASTER_PORT", "8361"))
    nodes, node = int(os.getenv("WORLD_SIZE", "1")), int(os.getenv("RANK", "0"))
    cuda = torch.cuda.is_available()
    _state["local_rank"] = local_rank
    params = {"backend": backend or ("nccl" if cuda else "gloo"), "init_method": f"tcp://{ip}:{port}",
              "world_size": nodes * num_local_ranks, "rank": node * num_local_ranks + local_rank}
    if cuda and "device_id" in inspect.signature(dist.init_process_group).parameters:
        params["device_id"] = torch.device("cuda", local_rank)  # binds NCCL to this rank's GPU early
    dist.init_process_group(**params)
    torch.set_default_dtype(torch.bfloat16)
    if cuda:
        torch.set_default_device("cuda")
        torch.cuda.set_device(local_rank)
    init_seed(seed)
    world = dist.get_world_size()
    return dist.get_rank(), world, dist.new_group(list(range(world)))
