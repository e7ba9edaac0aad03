"""What a call's record says beside its arrays: each Buffer's ids and counters (BufferState), the
per-op metadata, and the dispatch a combine belongs to (handle lineage, shared with the compiled
hook).
"""
from __future__ import annotations

import array
from typing import TYPE_CHECKING, Any

import torch

from epreplay.capture.extract import Call
from epreplay.capture.extract_v2 import elastic_meta, is_elastic_call
from epreplay.format.records import Op

if TYPE_CHECKING:
    from epreplay.capture.recorder import Recorder


def ll_parity(call: Any, bs: "BufferState") -> int:
    """Which of the Buffer's two low-latency receive buffers this dispatch used (its low-latency
    call count % 2), counting the call; a compiled-hook call handed back to Python was counted by
    the hook already (RingCall.parity)."""
    parity = getattr(call, "parity", -1)
    if parity >= 0:
        return parity
    parity = bs.ll_calls % 2
    bs.ll_calls += 1
    return parity


class BufferState:
    """What the recorder keeps per Buffer object: its id, group, and call counters."""

    __slots__ = ("owner", "id", "ep_rank", "ep_size", "cnt")

    def __init__(self, owner: "Recorder", buffer_id: int, ep_rank: int, ep_size: int) -> None:
        self.owner = owner  # a Buffer outliving one capture session gets fresh ids in the next
        self.id, self.ep_rank, self.ep_size = buffer_id, ep_rank, ep_size
        # [seq, ll_calls]: an array, so the compiled hook (_hookx.cpp) counts in the same place
        self.cnt = array.array("q", [0, 0])

    @property
    def seq(self) -> int:
        return self.cnt[0]

    @seq.setter
    def seq(self, value: int) -> None:
        self.cnt[0] = value

    @property
    def ll_calls(self) -> int:
        return self.cnt[1]

    @ll_calls.setter
    def ll_calls(self, value: int) -> None:
        self.cnt[1] = value


class CallMeta:
    """A Recorder's per-call metadata and handle lineage (begin/end on every path use them).

    Part of Recorder, split out by concern; runs on Recorder's attributes (set in its __init__)."""

    def _op_meta(self, call: Call, bs: BufferState, a: dict[str, Any]) -> None:
        m, op = call.meta, call.op
        if op == Op.LAYOUT:
            m["E"] = int(a.get("num_experts") or 0)
        elif op in (Op.LL_DISPATCH, Op.LL_COMBINE):
            h = a.get("handle")
            if op == Op.LL_DISPATCH:
                m["M"] = int(a.get("num_max_dispatch_tokens_per_rank") or 0)
                m["E"] = int(a.get("num_experts") or 0)
                m["use_fp8"] = bool(a.get("use_fp8", True))
                m["ll_parity"] = ll_parity(call, bs)
                m["recv_hook"] = bool(a.get("return_recv_hook", False))
            else:
                if isinstance(h, tuple) and len(h) >= 4:
                    m["M"] = h[2] if isinstance(h[2], int) else None
                    m["E"] = h[-1] if isinstance(h[-1], int) else None
                if a.get("return_recv_hook"):  # its output is taken when the hook ran
                    m["recv_hook"] = True
        else:
            for key in ("expert_alignment", "num_worst_tokens"):
                if isinstance(a.get(key), (int, float)) or hasattr(a.get(key), "__index__"):
                    m[key] = int(a[key])  # numpy/torch scalars are not JSON
            if a.get("config") is not None:
                m["config"] = repr(a["config"])
        if is_elastic_call(a):  # DeepEP V2 ElasticBuffer (records.py: variant, meta "api")
            elastic_meta(m, a)
        if op in (Op.COMBINE, Op.CACHED_DISPATCH, Op.LL_COMBINE):
            m["dispatch_seq"] = self._lineage_of(a.get("handle"))
        x = a.get("x")
        first = x[0] if isinstance(x, (tuple, list)) else x
        if isinstance(first, torch.Tensor) and first.dim() >= 1:
            m["hidden"] = int(first.shape[-1])
            m["x_dtype"] = str(first.dtype).replace("torch.", "")

    @staticmethod
    def _lineage_obj(handle: Any) -> Any:
        """What a handle is known by: a V1 handle's first tensor, a V2 EPHandle's recv_src_metadata
        (a tensor too: the compiled hook keeps both in its lineage table)."""
        if isinstance(handle, tuple) and handle and isinstance(handle[0], torch.Tensor):
            return handle[0]
        obj = getattr(handle, "recv_src_metadata", None)
        return obj if isinstance(obj, torch.Tensor) else None

    def _lineage_of(self, handle: Any) -> int:
        obj = self._lineage_obj(handle)
        if obj is not None:
            if self._fast is not None:  # one store for both hooks
                return self._fast.session.lineage_get(obj)
            # no compiled-hook session: the Python hook's own table
            got = self._lineage.get(id(obj))
            if got is not None and got[0]() is obj:
                return got[1]
        return -1

    def _remember_handle(self, handle: Any, seq: int) -> None:
        import weakref

        obj = self._lineage_obj(handle)
        if obj is not None:
            if self._fast is not None:  # one store for both hooks
                self._fast.session.lineage_put(obj, seq)
                return
            key = id(obj)
            lineage = self._lineage
            # The entry goes when the handle's tensor is freed, so ids are never stale.
            lineage[key] = (weakref.ref(obj, lambda _, k=key: lineage.pop(k, None)), seq)
