"""An emulated DeepEP V2 `ElasticBuffer` and `EPHandle` on torch.distributed (gloo on CPU, NCCL on GPU).

    from epreplay.emulate.v2 import ElasticBuffer, EPHandle

V2's contract is docs/deepep-v2.md. The emulation covers the expert-parallel part: dispatch
(bf16 or (fp8, scales), top-k weights optional, expert_alignment, expand layout with optional zero
padding, cached handles, do_cpu_sync on/off, cumulative stats) and combine (bias 0/1/2, top-k
weights round trip, expand-mode reduction, allow_multiple_reduction), with V2's output shapes,
EPHandle fields and reduction order (bitwise equal to DeepEP's reference refs.combine).
Engram, PP and AGRS are not emulated (their methods raise).

Emulator choices, all within V2's contract:
  * one scale-up domain of R ranks: get_logical_domain_size() is (1, R), no hybrid mode; so
    psum_num_recv_tokens_per_scaleup_rank counts rows per source rank.
  * the receive order is always the deterministic one (source rank, then token ascending; expanded
    slots of an expert likewise), which is what `deterministic=True` guarantees on V2.
  * memory V2 leaves uninitialised (the rows past the count without do_cpu_sync, alignment padding
    without do_zero_padding) holds NaN (floats) or -1 (ids), so code that reads it is caught.
Misuse raises ElasticMisuse (an EmulatedDeepEPError and an AssertionError, as V2's asserts) on every
rank of the group, naming the argument and the rank. Transport and cross-rank checks are the V1
emulation's (emulate_comm, emulate_check); the collective work is in emulate_v2_ops.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Optional, Tuple, Union

import torch
import torch.distributed as dist

from epreplay.emulate import comm as comm_mod
from epreplay.emulate import Buffer
from epreplay.emulate.comm import EmulatedDeepEPError
from epreplay.emulate.event import EventHandle, EventOverlap

BUFFER_ALIGNMENT = 2 << 20  # V2 aligns buffer sizes to 2 MiB
DEFAULT_NUM_SMS = 20  # what get_theoretical_num_sms answers without a GPU model

__all__ = ["ElasticBuffer", "EPHandle", "ElasticMisuse", "is_elastic"]

_ids = itertools.count()


class ElasticMisuse(EmulatedDeepEPError, AssertionError):
    """A misuse of the emulated ElasticBuffer (V2 asserts; the emulation raises on every rank)."""


def is_elastic(obj: Any) -> bool:
    """True for an ElasticBuffer class or instance, real or emulated (by class name, as capture does)."""
    cls = obj if isinstance(obj, type) else type(obj)
    return isinstance(cls, type) and any(c.__name__ == "ElasticBuffer" for c in cls.__mro__)


class EPHandle:
    """V2's dispatch handle (fields as deep_ep.EPHandle; see docs/deepep-v2.md).

    Shapes: T tokens the dispatching rank sent, K top-k, L local experts, N rows received
    (allocated: R * M without do_cpu_sync), S scale-up ranks (= R here).
        topk_idx [T, K] int64; psum_num_recv_tokens_per_scaleup_rank [S] int32 (inclusive);
        psum_num_recv_tokens_per_expert [L] int32; num_unaligned_recv_tokens_per_expert [L] int32;
        recv_src_metadata [N, K + 2] int32 (src_rank * M + token, src_rank * K + first local k,
        expanded slot per k or -1); dst_buffer_slot_idx [T, K] int32; num_recv_tokens_per_expert_list
        (aligned counts; [] without do_cpu_sync).
    """

    def __init__(self, do_expand: bool, num_experts: int, expert_alignment: int, num_max_tokens_per_rank: int,
                 num_sms: int, topk_idx: torch.Tensor, num_recv_tokens: int, num_expanded_tokens: int,
                 num_recv_tokens_per_expert_list: list, psum_num_recv_tokens_per_scaleup_rank: torch.Tensor,
                 psum_num_recv_tokens_per_expert: torch.Tensor,
                 num_unaligned_recv_tokens_per_expert: torch.Tensor, recv_src_metadata: torch.Tensor,
                 dst_buffer_slot_idx: torch.Tensor, token_metadata_at_forward: Optional[torch.Tensor],
                 channel_linked_list: Optional[torch.Tensor]) -> None:
        assert topk_idx is not None
        self.do_expand = do_expand
        self.num_experts = num_experts
        self.expert_alignment = expert_alignment
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.num_sms = num_sms
        self.topk_idx = topk_idx
        self.psum_num_recv_tokens_per_scaleup_rank = psum_num_recv_tokens_per_scaleup_rank
        self.psum_num_recv_tokens_per_expert = psum_num_recv_tokens_per_expert
        self.num_unaligned_recv_tokens_per_expert = num_unaligned_recv_tokens_per_expert
        self.num_recv_tokens_per_expert_list = num_recv_tokens_per_expert_list
        self.recv_src_metadata = recv_src_metadata
        self.dst_buffer_slot_idx = dst_buffer_slot_idx
        self.token_metadata_at_forward = token_metadata_at_forward
        self.channel_linked_list = channel_linked_list
        self.num_recv_tokens = num_recv_tokens
        self.num_expanded_tokens = num_expanded_tokens
        self.cached_recv_src_metadata_before_sort = None
        self._buffer_id = -1  # emulator: which ElasticBuffer made it, and at which call
        self._dispatch_seq = -1


class ElasticBuffer:
    """Emulated V2 buffer. Constructor arguments are V2's; emulator-only keywords: timeout_s
    (seconds a call waits for its peers, as V1's emulation) and _faults (epreplay.emulate.faults)."""

    def __init__(self, group: dist.ProcessGroup, num_bytes: Optional[int] = None, num_cpu_bytes: int = 0,
                 num_max_tokens_per_rank: int = 0, hidden: int = 0, num_topk: int = 0,
                 use_fp8_dispatch: bool = False, deterministic: bool = False, allow_hybrid_mode: bool = True,
                 allow_multiple_reduction: bool = True, prefer_overlap_with_compute: bool = True,
                 sl_idx: int = 3, num_allocated_qps: int = 0, num_cpu_timeout_secs: int = 300,
                 num_gpu_timeout_secs: int = 100, explicitly_destroy: bool = False, *,
                 timeout_s: Optional[float] = None, _faults: Any = None) -> None:
        if group is None:
            raise ElasticMisuse("ElasticBuffer(group=None): the emulation needs a torch.distributed group")
        for name, v in (("num_bytes", num_bytes), ("num_cpu_bytes", num_cpu_bytes)):
            if v is not None and (int(v) < 0 or int(v) % BUFFER_ALIGNMENT):
                raise ElasticMisuse(f"ElasticBuffer({name}={v}): must be a non-negative multiple of 2 MiB "
                                    f"(get_elastic_buffer_alignment())")
        if num_cpu_bytes and num_bytes is None:
            raise ElasticMisuse("ElasticBuffer(num_cpu_bytes=...): needs num_bytes too")
        self.group = group
        self.rank_idx = group.rank()
        self.num_ranks = group.size()
        self.rank, self.group_size = self.rank_idx, self.num_ranks  # capture reads these names
        self.allow_hybrid_mode = bool(allow_hybrid_mode)
        self.allow_multiple_reduction = bool(allow_multiple_reduction)
        self.prefer_overlap_with_compute = bool(prefer_overlap_with_compute)
        self.deterministic = bool(deterministic)
        self.num_max_tokens_per_rank = int(num_max_tokens_per_rank)
        self.num_bytes = int(num_bytes) if num_bytes is not None else self.get_buffer_size_hint(
            group, num_max_tokens_per_rank, hidden, num_topk, use_fp8_dispatch)
        self.num_allocated_qps = int(num_allocated_qps) or (65 if self.allow_hybrid_mode else 17)
        self.sl_idx = sl_idx
        self.num_cpu_timeout_secs, self.num_gpu_timeout_secs = num_cpu_timeout_secs, num_gpu_timeout_secs
        self.explicitly_destroy = bool(explicitly_destroy)
        self.num_scaleout_ranks, self.num_scaleup_ranks = 1, self.num_ranks
        self.scaleout_rank_idx, self.scaleup_rank_idx = 0, self.rank_idx
        self.num_rdma_ranks, self.num_nvlink_ranks = 1, self.num_ranks
        self.buffer_id = next(_ids) + 1_000_000  # apart from V1 Buffer ids in the lineage checks
        self.timeout_s = comm_mod.timeout_from_env(timeout_s)
        backend = str(dist.get_backend(group)).lower()
        device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        self._comm = comm_mod.Comm(group, self.timeout_s, device)
        self._faults = _faults
        self._seq = self._coll_seq = 0
        self._op_calls: dict[str, int] = {}
        self.runtime: Any = self  # V2 sets None after destroy()
        self.destroyed = False

    # ---- V2's static helpers ---------------------------------------------------------------------
    @staticmethod
    def get_buffer_size_hint(group: Any, num_max_tokens_per_rank: int, hidden: int, num_topk: int = 0,
                             use_fp8_dispatch: bool = False, allow_hybrid_mode: bool = True,
                             allow_multiple_reduction: bool = True) -> int:
        """A 2 MiB-aligned size for these settings (the emulation's own estimate: R * M rows of
        hidden bytes plus top-k metadata, for dispatch and combine)."""
        R = group.size() if group is not None else 1
        row = hidden * (1 if use_fp8_dispatch else 2) + hidden // 128 * 4 + num_topk * 12 + 16
        need = 2 * R * max(num_max_tokens_per_rank, 1) * max(row, hidden * 2 + num_topk * 4)
        return max(BUFFER_ALIGNMENT, -(-need // BUFFER_ALIGNMENT) * BUFFER_ALIGNMENT)

    @staticmethod
    def capture() -> EventHandle:
        """An event on the current stream (a no-op event on CPU)."""
        return EventHandle()

    def destroy(self) -> None:
        assert self.explicitly_destroy, "destroy() needs ElasticBuffer(..., explicitly_destroy=True)"
        self.destroyed, self.runtime = True, None

    def barrier(self, use_comm_stream: bool = True, with_cpu_sync: bool = False, sequential: bool = True) -> None:
        if self.num_ranks > 1:
            self._comm._wait(dist.barrier(group=self.group, async_op=True), "barrier")

    def get_comm_stream(self) -> Any:
        return torch.cuda.current_stream() if self._comm.device.type == "cuda" else None

    def get_physical_domain_size(self) -> Tuple[int, int]:
        return self.num_rdma_ranks, self.num_nvlink_ranks

    def get_logical_domain_size(self) -> Tuple[int, int]:
        return self.num_scaleout_ranks, self.num_scaleup_ranks

    def get_theoretical_num_sms(self, num_experts: int, num_topk: int, *args: Any, **kwargs: Any) -> int:
        """V2 models bandwidth per GPU; the emulation has no GPU model and answers a fixed count."""
        return DEFAULT_NUM_SMS

    def get_theoretical_num_qps(self, num_sms: int) -> int:
        return min(num_sms * 16 + 1 if self.allow_hybrid_mode else min(num_sms, 9), self.num_allocated_qps)

    def _unsupported(self, name: str) -> Callable[..., Any]:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise ElasticMisuse(f"ElasticBuffer.{name}: not emulated (epreplay emulates dispatch/combine only)")
        return refuse

    def __getattr__(self, name: str) -> Any:
        if name.startswith(("engram_", "pp_", "agrs_")) or name in ("all_gather", "create_agrs_session",
                                                                     "destroy_agrs_session"):
            return self._unsupported(name)
        raise AttributeError(name)

    # ---- entry points --------------------------------------------------------------------------
    def dispatch(self, x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                 num_experts: Optional[int] = None, num_max_tokens_per_rank: Optional[int] = None,
                 expert_alignment: Optional[int] = None, num_sms: int = 0, num_qps: int = 0,
                 previous_event: Optional[EventHandle] = None,
                 previous_event_before_epilogue: Optional[EventHandle] = None,
                 async_with_compute_stream: bool = False, allocate_on_comm_stream: bool = False,
                 handle: Optional[EPHandle] = None, do_handle_copy: bool = True,
                 do_cpu_sync: Optional[bool] = None, do_expand: bool = False, do_zero_padding: bool = False,
                 use_tma_aligned_col_major_sf: bool = False) -> \
            Tuple[Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], Optional[torch.Tensor],
                  Optional[torch.Tensor], EPHandle, EventOverlap]:
        """Returns (recv_x, recv_topk_idx (None when expanded), recv_topk_weights, handle, event)."""
        from epreplay.emulate import v2_ops as emulate_v2_ops
        return emulate_v2_ops.dispatch(self, dict(
            x=x, topk_idx=topk_idx, topk_weights=topk_weights, stats=cumulative_local_expert_recv_stats,
            num_experts=num_experts, M=num_max_tokens_per_rank, align=expert_alignment, num_sms=num_sms,
            num_qps=num_qps, previous_event=previous_event, async_=async_with_compute_stream,
            on_comm=allocate_on_comm_stream, handle=handle, copy=do_handle_copy, cpu_sync=do_cpu_sync,
            expand=do_expand, zero_pad=do_zero_padding, col_major_sf=use_tma_aligned_col_major_sf))

    def combine(self, x: torch.Tensor, handle: EPHandle, topk_weights: Optional[torch.Tensor] = None,
                bias: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]] = None, num_sms: int = 0,
                num_qps: int = 0, previous_event: EventHandle = None,
                previous_event_before_epilogue: Optional[EventHandle] = None,
                async_with_compute_stream: bool = False, allocate_on_comm_stream: bool = False) -> \
            Tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        """Returns (combined_x [T, H] bf16, combined_topk_weights [T, K] fp32 or None, event)."""
        from epreplay.emulate import v2_combine as emulate_v2_combine
        return emulate_v2_combine.combine(self, x, handle, topk_weights, bias, num_qps, previous_event,
                                          async_with_compute_stream, allocate_on_comm_stream)

    # ---- shared machinery (the V1 emulation's) ---------------------------------------------------
    _begin = Buffer._begin

    def _agree(self, header: torch.Tensor, local_error: Optional[str], what: str,
               compare: tuple = ()) -> torch.Tensor:
        try:
            return Buffer._agree(self, header, local_error, what, compare)
        except EmulatedDeepEPError as exc:
            if isinstance(exc, (ElasticMisuse, comm_mod.EmulatedTimeout)):
                raise
            raise ElasticMisuse(str(exc).replace("DeepEP emulation:", "DeepEP V2 emulation:")) from None


def event_for(async_: bool, previous_event: Any) -> EventOverlap:
    """The EventOverlap a V2 call returns (a real event only with async_with_compute_stream)."""
    if previous_event is not None and hasattr(previous_event, "current_stream_wait"):
        previous_event.current_stream_wait()
    return EventOverlap(EventHandle()) if async_ else EventOverlap(None)


def align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def worst_expanded(R: int, M: int, K: int, L: int, a: int) -> int:
    """V2's allocation of expanded rows without CPU sync."""
    return align(R * M * min(K, L) + (a - 1) * L, a)

