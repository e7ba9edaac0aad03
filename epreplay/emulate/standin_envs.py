"""`deep_ep.utils.envs` of the stand-in: the process-group set-up DeepEP's V1 tests call.

DeepEP's tests (tests/legacy/*.py at its head) do `rank, num_ranks, group = init_dist(local_rank,
num_local_ranks)` in each spawned rank and rely on: the MASTER_ADDR / MASTER_PORT / WORLD_SIZE
(nodes) / RANK (node) variables, a process group over every rank, the default dtype bfloat16, the
default device 'cuda' with this rank's GPU current, and the seeds set from (seed + rank).
Written for epreplay (not DeepEP's code); what needs DeepEP's C++ (_C) is left out.
On a machine without CUDA the group is gloo and the default device stays the CPU; there, with
EPREPLAY_STANDIN_CUDA_AS_CPU=1 (a test aid, never the default), tensors a client asks for on
'cuda' are made on the CPU instead, so DeepEP's tests, which name device='cuda' everywhere, run
their checks on a CPU-only machine.
"""
from __future__ import annotations

import inspect
import os
import random
from typing import Optional

import torch
import torch.distributed as dist

from torch.overrides import TorchFunctionMode

ENV_CUDA_AS_CPU = "EPREPLAY_STANDIN_CUDA_AS_CPU"
_state = {"local_rank": None, "local_seed": 0, "global_seed": 0}


def _is_cuda(v: object) -> bool:
    return (isinstance(v, str) and v.split(":")[0] == "cuda") or (isinstance(v, torch.device) and v.type == "cuda")


class CudaAsCpu(TorchFunctionMode):
    """Every 'cuda' device argument of a torch call (factories, .to, .cuda) becomes the CPU.

    Also gives gloo NCCL's stacked all_gather_into_tensor form (output [R, *input.shape]), which
    DeepEP's tests use and gloo rejects (it takes only the concatenated [R * N, ...] form).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.Tensor.cuda:
            return args[0]
        args = tuple("cpu" if _is_cuda(a) else a for a in args)
        kwargs = {k: ("cpu" if _is_cuda(v) else v) for k, v in (kwargs or {}).items()}
        if getattr(func, "__name__", "") in ("all_gather_into_tensor", "all_gather_single") and len(args) >= 2:
            out, inp = args[0], args[1]
            if isinstance(out, torch.Tensor) and isinstance(inp, torch.Tensor) and out.dim() == inp.dim() + 1:
                args = (out.view(-1, *inp.shape[1:]) if inp.dim() else out.view(-1), *args[1:])
        return func(*args, **kwargs)


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
    elif os.environ.get(ENV_CUDA_AS_CPU, "").strip().lower() in ("1", "true", "yes", "on"):
        CudaAsCpu().__enter__()  # for the rest of this process, as set_default_device is
    init_seed(seed)
    world = dist.get_world_size()
    return dist.get_rank(), world, dist.new_group(list(range(world)))
