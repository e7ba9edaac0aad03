"""Argument checks and the cross-rank verdict of the emulated Buffer.

Legend: R ranks, W header words (see emulate_comm).

A check never raises on its own rank before the validation word is exchanged: it returns a
message, which goes into the header's error flag, so every rank learns that *some* rank's
arguments are wrong and every rank raises the same error (naming the argument and the rank).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from epreplay.emulate import comm as C


class ArgError(Exception):
    """A bad argument on this rank; the message names the argument and says what was expected."""


def need(cond: bool, message: str) -> None:
    if not cond:
        raise ArgError(message)


def shape_of(t: Any) -> str:
    return f"{type(t).__name__}" if not isinstance(t, torch.Tensor) else f"{t.dtype} {list(t.shape)}"


def tensor(name: str, t: Any, *, dtype: torch.dtype | Sequence[torch.dtype] | None = None,
           shape: Sequence[int | None] | None = None) -> torch.Tensor:
    """Check a tensor argument's type, dtype and shape (None in `shape` = any size)."""
    need(isinstance(t, torch.Tensor), f"argument {name}: expected a torch.Tensor, got {shape_of(t)}")
    if dtype is not None:
        ok = (t.dtype in dtype) if isinstance(dtype, (list, tuple)) else t.dtype == dtype
        need(ok, f"argument {name}: dtype {t.dtype}, expected {dtype}")
    if shape is not None:
        good = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        need(good, f"argument {name}: shape {list(t.shape)}, expected {want}")
    return t


def topk_ids(name: str, t: Any, num_tokens: int | None, num_experts: int) -> torch.Tensor:
    """topk_idx: int64 [T, K] with values in {-1} or [0, E)."""
    tensor(name, t, dtype=torch.int64, shape=(num_tokens, None))
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        need(lo >= -1 and hi < num_experts,
             f"argument {name}: expert ids must be -1 or in [0, {num_experts}), found [{lo}, {hi}]")
    return t


@dataclass
class HandleInfo:
    """What a Buffer remembers about a handle it returned (keyed weakly by one of its tensors)."""

    buffer_id: int
    dispatch_seq: int  # the collective call number of the dispatch that produced it
    extra: dict


# id(tensor) -> (weak reference, info). Not a WeakKeyDictionary: it compares keys with ==,
# which for tensors is elementwise.
_HANDLES: dict[int, tuple["weakref.ref[torch.Tensor]", HandleInfo]] = {}


def remember(key: torch.Tensor, info: HandleInfo) -> None:
    k = id(key)
    _HANDLES[k] = (weakref.ref(key, lambda _ref, k=k: _HANDLES.pop(k, None)), info)


def recall(key: Any) -> HandleInfo | None:
    if not isinstance(key, torch.Tensor):
        return None
    entry = _HANDLES.get(id(key))
    if entry is None or entry[0]() is not key:
        return None
    return entry[1]


def handle_lineage(name: str, handle: Any, key_pos: int, lengths: Sequence[int], buffer_id: int
                   ) -> HandleInfo | None:
    """Check a handle's form; return what this Buffer knows of it (None: built elsewhere)."""
    need(isinstance(handle, (tuple, list)),
         f"argument {name}: expected the handle tuple returned by dispatch, got {shape_of(handle)}")
    need(len(handle) in lengths, f"argument {name}: a {len(handle)}-tuple; this Buffer's handles "
                                 f"are {' or '.join(map(str, lengths))}-tuples")
    info = recall(handle[key_pos])
    if info is not None:
        need(info.buffer_id == buffer_id,
             f"argument {name}: this handle was returned by another Buffer (#{info.buffer_id}, "
             f"dispatch call {info.dispatch_seq}), not by this one (#{buffer_id})")
    return info


FIELDS = ((C.OP, "the operation"), (C.SEQ, "the call number on this Buffer"),
          (C.HID, "hidden size (x.size(1))"), (C.FP8, "the x format (0 = bf16, 1 = fp8)"),
          (C.TOPK, "top-k (topk_idx.size(1); 0 = no topk)"), (C.NEXP, "num_experts"),
          (C.MAXTOK, "num_max_dispatch_tokens_per_rank"), (C.WORST, "num_worst_tokens"),
          (C.LINEAGE, "the handle (the dispatch call it came from)"))


def verdict(words_RW: torch.Tensor, what: str, *, compare: Sequence[int]) -> str | None:
    """The cross-rank problem every rank sees identically in the gathered headers, or None."""
    R = words_RW.shape[0]
    if bool((words_RW[:, C.MAGIC] != C.MAGIC_VALUE).any()):
        return f"{what}: a peer sent a header that is not an emulated-DeepEP header (mixed backends?)"
    for pos, label in FIELDS:
        if pos not in compare and pos not in (C.OP, C.SEQ):
            continue
        col = words_RW[:, pos]
        if pos == C.LINEAGE:
            col = col[col >= 0]  # a handle built outside this process has no lineage
        if col.numel() and bool((col != col[0]).any()):
            per = ", ".join(f"rank {r}: {_show(pos, int(words_RW[r, pos]))}" for r in range(R))
            hint = {C.MAXTOK: " — DeepEP requires the same M on every rank (it would hang)",
                    C.OP: " — every rank must issue a Buffer's calls in the same order",
                    C.SEQ: " — a rank skipped or repeated a call on this Buffer"}.get(pos, "")
            return f"{what}: {label} differs across ranks ({per}){hint}"
    # what r sends to s must be what s expects from r, where s knows it (-1: unknown)
    send_RR = words_RW[:, C.HEAD:C.HEAD + R]
    expect_RR = words_RW[:, C.HEAD + R:C.HEAD + 2 * R].t()  # [sender, receiver]
    known = expect_RR >= 0
    bad = (known & (send_RR != expect_RR)).nonzero()
    if bad.numel():
        r, s = (int(v) for v in bad[0])
        return (f"{what}: rank {r} sends {int(send_RR[r, s])} rows to rank {s}, whose handle expects "
                f"{int(expect_RR[r, s])} — the handle does not belong to these routing tensors")
    return None


def _show(pos: int, v: int) -> str:
    return C.OP_NAMES.get(v, str(v)) if pos == C.OP else str(v)


def header(op: int, seq: int, R: int) -> torch.Tensor:
    """A [HEAD + 2R] header: R counts sent to each rank, then R counts expected (-1 = unknown)."""
    h = C.new_header(op, seq, 2 * R)
    h[C.HEAD + R:] = -1
    return h
