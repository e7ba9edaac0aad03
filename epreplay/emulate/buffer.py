"""An emulated DeepEP V1 `Buffer` on torch.distributed (gloo on CPU, NCCL on GPU), any world size.

    from epreplay.emulate import Buffer, Config, EventOverlap, topk_idx_t

It reproduces the user-visible semantics of DeepEP's V1 Buffer (shared/deepep-semantics.md):
get_dispatch_layout, normal dispatch (bf16 and (fp8, scales), topk, expert_alignment,
num_worst_tokens, cached handles) and combine (bias, weights round trip, fp32-then-one-bf16-cast
numerics; above 8 ranks the internode numerics and 10-tuple handle), low_latency_dispatch (bf16,
FP8 with DeepEP's per-128 cast, round_scale, use_ue8m0, cumulative stats, return_recv_hook,
[L, R*M, H] layout with src_info/layout_range) and low_latency_combine (weights applied, fp32
accumulate, out=). Method names and signatures are DeepEP's, so `inspect.signature` binding and
capture hooks work unchanged. Handles have DeepEP's tuple lengths, shapes, dtypes and (intranode)
values; the NVL/RDMA byte sizes bound what may be sent when they are non-zero (0, the default,
means "unbounded": an emulator convenience, DeepEP itself would refuse).

Emulator-only keyword arguments of the constructor:
    timeout_s      seconds a call waits for its peers before raising DeepEP-like "timeout" text
                   (default env EPREPLAY_EMULATE_TIMEOUT_S, else 100 s as DeepEP's CPU timeout)
    ll_order_seed  seed of the low-latency receive order (default env EPREPLAY_LL_ORDER_SEED,
                   else 0). DeepEP's order comes from atomics; the emulator shuffles source blocks
                   and rows within blocks pseudo-randomly per call and rank so that consumers
                   cannot depend on it. -1 turns the shuffle off (sources ascending, tokens ascending).
    _faults        test-only fault injection for this Buffer (see epreplay.emulate.faults).
Misuse (mismatched M, T > M, topk without weights, a foreign handle, bad dtypes/shapes) raises
EmulatedDeepEPError naming the argument and rank on *every* rank (see epreplay.emulate.comm).
`is_emulated(obj)` tells capture code that a buffer (or class) is this emulation.
"""
from __future__ import annotations

import contextlib
import itertools
import os
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from epreplay.emulate import check as chk
from epreplay.emulate import comm as comm_mod
from epreplay.emulate.comm import EmulatedDeepEPError, EmulatedTimeout
from epreplay.emulate.event import EventHandle, EventOverlap
from epreplay.emulate.layout import Config, low_latency_rdma_size_hint, tuned_config

topk_idx_t = torch.int64
ENV_LL_ORDER_SEED = "EPREPLAY_LL_ORDER_SEED"
EMULATED = True  # module marker: `deep_ep.EMULATED` is True when the stand-in is in use

__all__ = ["Buffer", "Config", "EventOverlap", "EventHandle", "topk_idx_t", "EmulatedDeepEPError",
           "EmulatedTimeout", "is_emulated"]

_buffer_ids = itertools.count()
# Profiler range names: DeepEP's kernels are deep_ep::<kind>::dispatch<...> / ::combine<...>, and
# DeepEP's kineto benches look for lines containing "dispatch" / "combine" and, per phase, for
# "::dispatch" / "::combine" in the trace. The emulation's ranges carry that shape (and say what
# they are), one name per entry point, the recv hook reusing its call's name (a second phase).
REGION_PREFIX = "deep_ep_emulated::"
LL_DISPATCH, LL_COMBINE = "internode_ll::dispatch", "internode_ll::combine"


def region(name: str) -> Any:
    """A profiler range REGION_PREFIX + name (torch.profiler and, on a GPU, NVTX for nsys)."""
    full = REGION_PREFIX + name
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return torch.profiler.record_function(full)
    stack = contextlib.ExitStack()
    stack.enter_context(torch.profiler.record_function(full))
    stack.enter_context(torch.cuda.nvtx.range(full))
    if name.endswith(("::dispatch", "::combine")):  # CUDA-only profiles see kernels, not ranges
        from epreplay.emulate.mark import mark

        mark(full)
    return stack


def named_hook(hook: Optional[Callable[[], Any]], name: str) -> Optional[Callable[[], Any]]:
    """The receive hook, run inside a range of its call's name (DeepEP: the same kernel, recv phase)."""
    if hook is None:
        return None

    def recv_hook() -> Any:
        with region(name):
            return hook()

    return recv_hook

def is_emulated(obj: Any) -> bool:
    """True for epreplay's emulated Buffer class or any instance of it (or of a subclass)."""
    cls = obj if isinstance(obj, type) else type(obj)
    return isinstance(cls, type) and issubclass(cls, Buffer)


class Buffer:
    """Emulated DeepEP V1 communication buffer over a torch.distributed process group.

    Attributes (as DeepEP's): num_sms, rank, group_size, group, num_nvl_bytes, num_rdma_bytes,
    low_latency_mode, explicitly_destroy, enable_shrink; plus buffer_id (creation order in this
    process), timeout_s and ll_order_seed.
    """

    num_sms: int = 20

    def __init__(self, group: Optional[dist.ProcessGroup], num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 use_fabric: bool = False, explicitly_destroy: bool = False, enable_shrink: bool = False,
                 comm: Optional[Any] = None, *, timeout_s: Optional[float] = None,
                 ll_order_seed: Optional[int] = None, _faults: Any = None) -> None:
        if group is None:
            if comm is not None:
                raise EmulatedDeepEPError("Buffer(comm=...): the emulation needs a torch.distributed group; "
                                          "pass group=dist.group.WORLD (mpi4py communicators are not emulated)")
            raise ValueError("Either 'group' or 'comm' must be provided.")
        for name, v in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            if int(v) < 0 or int(v) % 128:
                raise EmulatedDeepEPError(f"Buffer({name}={v}): must be a non-negative multiple of 128 "
                                          f"(DeepEP's buffer alignment)")
        self.group = group
        self.rank = group.rank()
        self.group_size = group.size()
        self.num_nvl_bytes = int(num_nvl_bytes)
        self.num_rdma_bytes = int(num_rdma_bytes)
        self.low_latency_mode = bool(low_latency_mode)
        self.num_qps_per_rank = int(num_qps_per_rank)
        self.allow_nvlink_for_low_latency_mode = bool(allow_nvlink_for_low_latency_mode)
        self.allow_mnnvl = bool(allow_mnnvl)
        self.use_fabric = bool(use_fabric)
        self.explicitly_destroy = bool(explicitly_destroy)
        self.enable_shrink = bool(enable_shrink)
        self.comm = comm
        self.buffer_id = next(_buffer_ids)
        self.timeout_s = comm_mod.timeout_from_env(timeout_s)
        seed = ll_order_seed if ll_order_seed is not None else os.environ.get(ENV_LL_ORDER_SEED, "0")
        try:
            self.ll_order_seed = int(seed)
        except ValueError:
            raise EmulatedDeepEPError(f"{ENV_LL_ORDER_SEED}={seed!r}: expected an integer (-1: no shuffle)") from None
        backend = str(dist.get_backend(group)).lower()
        device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        self._comm = comm_mod.Comm(group, self.timeout_s, device)
        self._faults = _faults
        self._seq = 0  # every entry-point call (layout included), DeepEP-call order on this rank
        self._coll_seq = 0  # collective calls only: what every rank must agree on
        self._op_calls: dict[str, int] = {}
        self.low_latency_buffer_idx = 0  # DeepEP alternates two LL buffers; parity of the next call
        self._ll_calls = 0  # low-latency calls so far (a hook is stale once its buffer is reused)
        # enable_shrink's rank mask; host-side (explicit: a client's default device must not move it)
        self._ll_mask = torch.zeros(self.group_size, dtype=torch.int32, device="cpu")
        self.destroyed = False

    # ---- static helpers (DeepEP's) -------------------------------------------------------------
    @staticmethod
    def is_sm90_compiled() -> bool:
        """DeepEP: were its kernels built for SM90 (its FP8 paths)? The emulation has no kernels, so
        it answers what the machine allows: True on a GPU of CUDA capability >= 9.0 (H100/H200),
        False elsewhere (CPU included), so clients take the FP8 paths exactly where DeepEP could.
        The stand-in's CPU test aid (EPREPLAY_STANDIN_CUDA_AS_CPU=1, CPU playing an H200) says True."""
        if os.environ.get("EPREPLAY_STANDIN_CUDA_AS_CPU", "").strip().lower() in ("1", "true", "yes", "on"):
            return True
        return bool(torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0))

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set the SMs of the normal kernels (even); channels C = num_sms / 2."""
        assert new_num_sms % 2 == 0, 'The SM count must be even'
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """An EventOverlap on the current stream (a no-op event on CPU)."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        return low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """DeepEP's tuned dispatch Config per rank count. DeepEP only knows 2, 4, 8, 16, ... 160
        ranks; the emulation runs any count and takes the next listed one (1 and 3 ranks: 2 and 4).

        Deliberately not DeepEP's refusal: DeepEP asserts here (v1.2.1 deep_ep/buffer.py:244,
        head deep_ep/buffers/legacy.py:259: `assert num_ranks in config_map, 'Unsupported number
        of EP ranks'`) and its intranode kernels exist only for 2/4/8 ranks (v1.2.1
        csrc/kernels/launch.cuh:54-60, SWITCH_RANKS), so real normal mode refuses 1 rank. The
        emulation keeps 1 (and 3, 5, ...) ranks because replaying a recording on fewer ranks
        (4 -> 2 -> 1) is what it is for; the results are DeepEP's semantics at that size."""
        return tuned_config(num_ranks, Buffer.num_sms, combine=False)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return tuned_config(num_ranks, Buffer.num_sms, combine=True)

    def get_comm_stream(self) -> Any:
        return torch.cuda.current_stream() if self._comm.device.type == "cuda" else None

    def destroy(self) -> None:
        """Release the buffer (DeepEP requires explicitly_destroy=True for this call)."""
        assert self.explicitly_destroy, '`explicitly_destroy` flag must be set'
        self.destroyed = True

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """DeepEP zeroes its LL signal buffers here; the emulation keeps no state between calls."""
        assert self.low_latency_mode, 'clean_low_latency_buffer needs low_latency_mode=True'

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: Optional[torch.Size] = None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        """A view of this rank's raw buffer (emulated: a lazily allocated host/device byte array)."""
        nbytes = self.num_rdma_bytes if use_rdma_buffer else self.num_nvl_bytes
        key = "_raw_rdma" if use_rdma_buffer else "_raw_nvl"
        if getattr(self, key, None) is None:
            setattr(self, key, torch.zeros(nbytes, dtype=torch.uint8, device=self._comm.device))
        tensor = getattr(self, key).view(dtype)[offset:]
        if size is None:
            return tensor
        assert tensor.numel() >= size.numel()
        return tensor[:size.numel()].view(size)

    def internode_dispatch(self, x: Any, handle: Optional[Tuple] = None, num_tokens_per_rank: Any = None,
                           num_tokens_per_rdma_rank: Any = None, is_token_in_rank: Any = None,
                           num_tokens_per_expert: Any = None, topk_idx: Any = None, topk_weights: Any = None,
                           expert_alignment: int = 1, config: Optional[Config] = None,
                           previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                           allocate_on_comm_stream: bool = False) -> tuple:
        """DeepEP's internode implementation entry (normally reached through dispatch)."""
        return self.dispatch(x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                             num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, 0, config,
                             previous_event, async_finish, allocate_on_comm_stream)

    def internode_combine(self, x: torch.Tensor, handle: Union[tuple, list], topk_weights: Any = None,
                          bias: Any = None, config: Optional[Config] = None,
                          previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                          allocate_on_comm_stream: bool = False) -> tuple:
        """DeepEP's internode implementation entry (normally reached through combine)."""
        return self.combine(x, tuple(handle), topk_weights, bias, config, previous_event, async_finish,
                            allocate_on_comm_stream)

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Mask (or unmask) a rank for low-latency calls: no rows are sent to or taken from it."""
        assert self.enable_shrink, 'the mask buffer needs Buffer(..., enable_shrink=True)'
        self._ll_mask[int(rank_to_mask)] = int(bool(mask))

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Copy the mask ([R] int32, 1 = masked) into `mask_status`."""
        assert self.enable_shrink, 'the mask buffer needs Buffer(..., enable_shrink=True)'
        mask_status.copy_(self._ll_mask.to(mask_status.device))

    def low_latency_clean_mask_buffer(self) -> None:
        assert self.enable_shrink, 'the mask buffer needs Buffer(..., enable_shrink=True)'
        self._ll_mask.zero_()

    def get_next_low_latency_combine_buffer(self, handle: object) -> torch.Tensor:
        """A fresh [L, R*M, H] bf16 tensor (zero_copy combines read x as given anyway)."""
        _, _, M, H, E = handle
        return torch.zeros(E // self.group_size, self.group_size * M, H, dtype=torch.bfloat16,
                           device=handle[0].device)

    # ---- entry points ----------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                            allocate_on_comm_stream: bool = False) -> \
            Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, EventOverlap]:
        """Layout of topk_idx [T, K] int64 (-1 = none): (num_tokens_per_rank [R] int32,
        num_tokens_per_rdma_rank [NR] int32 or None at <= 8 ranks, num_tokens_per_expert [E] int32,
        is_token_in_rank [T, R] bool, event). Local: no communication."""
        from epreplay.emulate import normal as emulate_normal
        with region("layout::get_dispatch_layout"):
            return emulate_normal.layout(self, topk_idx, num_experts, previous_event, async_finish)

    def dispatch(self, x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
                 handle: Optional[Tuple] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False) -> \
            Tuple[Union[Tuple[torch.Tensor, torch.Tensor], torch.Tensor], Optional[torch.Tensor],
                  Optional[torch.Tensor], List[int], Tuple, EventOverlap]:
        """Normal dispatch; see deepep-semantics.md. Returns (recv_x, recv_topk_idx,
        recv_topk_weights, num_recv_tokens_per_expert_list, handle, event)."""
        from epreplay.emulate import normal as emulate_normal
        with region(self._normal_kind() + "::dispatch"):
            return emulate_normal.dispatch(self, x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank,
                                           is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
                                           expert_alignment, num_worst_tokens, config, previous_event, async_finish)

    def combine(self, x: torch.Tensor, handle: Tuple, topk_weights: Optional[torch.Tensor] = None,
                bias: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]] = None,
                config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False) -> \
            Tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        """Normal combine (plain sum over ranks, no weights). Returns (combined_x [T, H] bf16,
        combined_topk_weights [T, K] fp32 or None, event)."""
        from epreplay.emulate import combine as emulate_combine
        with region(self._normal_kind() + "::combine"):
            return emulate_combine.combine(self, x, handle, topk_weights, bias, config, previous_event, async_finish)

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor,
                             num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None,
                             use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False) -> \
            Tuple[Union[Tuple[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor, Tuple,
                  EventOverlap, Callable]:
        """Low-latency dispatch. Returns (recv_x [L, R*M, H] bf16 or (fp8, scales), recv_count [L]
        int32, handle (src_info, layout_range, M, H, E), event, hook)."""
        from epreplay.emulate import ll as emulate_ll
        with region(LL_DISPATCH):
            out = emulate_ll.dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                                      cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats,
                                      use_fp8, round_scale, use_ue8m0, async_finish, return_recv_hook)
        return (*out[:4], named_hook(out[4], LL_DISPATCH))

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: tuple, use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False,
                            out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None) -> \
            Tuple[torch.Tensor, EventOverlap, Callable]:
        """Low-latency combine with weights. Returns (combined_x [T, H] bf16, event, hook)."""
        from epreplay.emulate import ll as emulate_ll
        with region(LL_COMBINE):
            res = emulate_ll.combine(self, x, topk_idx, topk_weights, handle, use_logfmt, zero_copy,
                                     async_finish, return_recv_hook, out, combine_wait_recv_cost_stats)
        return (*res[:2], named_hook(res[2], LL_COMBINE))

    # ---- shared machinery for emulate_normal / emulate_ll ------------------------------------------
    def _normal_kind(self) -> str:
        from epreplay.emulate.layout import node_size
        return "internode" if self.group_size > node_size() else "intranode"

    def _begin(self, op: str, collective: bool = True) -> tuple[int, int]:
        """Count the call; run pre-call faults (delay, hang). Returns (collective seq, op call index)."""
        if self.destroyed:
            raise EmulatedDeepEPError(f"{op}: this Buffer was destroyed")
        self._seq += 1
        index = self._op_calls.get(op, 0)
        self._op_calls[op] = index + 1
        seq = self._coll_seq
        if collective:
            self._coll_seq += 1
        from epreplay.emulate import faults
        faults.before_call(self, op, index)
        return seq, index

    def _agree(self, header: torch.Tensor, local_error: Optional[str], what: str,
               compare: tuple = ()) -> torch.Tensor:
        """Exchange validation words; raise the same error on every rank if anything is wrong."""
        if local_error:
            header[comm_mod.ERR] = 1
        header[comm_mod.BUF] = self.buffer_id
        words = self._comm.gather_words(header, what)
        bad = (words[:, comm_mod.ERR] != 0).nonzero().flatten().tolist()
        if bad:
            msgs = self._comm.gather_messages(local_error or "")
            text = "; ".join(f"rank {r}: {msgs[r]}" for r in bad)
            raise EmulatedDeepEPError(f"DeepEP emulation: {what}: {text} (raised on every rank)")
        problem = chk.verdict(words, what, compare=compare)
        if problem:
            raise EmulatedDeepEPError(f"DeepEP emulation: {problem} (raised on every rank)")
        return words

