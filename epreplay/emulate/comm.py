"""Transport of the emulated DeepEP Buffer: one validation word per call, then one byte exchange.

Legend: R ranks of the group, W words in a header (HEAD + R), B bytes per packed row.

Every collective entry point of the emulated Buffer runs in two steps:
  1. `agree()`: every rank all-gathers a small int64 header (op, call number, shapes, flags, its
     own verdict on its arguments, and R per-destination counts). Every rank then sees every
     other rank's header, so a misuse detected on any rank (or a disagreement between ranks:
     different M, different op, different handle) is raised on *every* rank at the same point,
     instead of one rank raising and the others hanging in the next collective.
  2. `exchange_rows()`: one `all_to_all_single` of packed uint8 rows with per-rank split sizes.
Both wait with a timeout (DeepEP's CPU timeout is 100 s): a rank that never arrives makes the
others raise an error whose text contains "timeout", as DeepEP's "CPU recv timeout" does.
gloo on CPU, NCCL on GPU; a group of one rank skips the collectives.
"""
from __future__ import annotations

import datetime
import math
import time
import os
from typing import Any, Sequence

import torch
import torch.distributed as dist

ENV_TIMEOUT = "EPREPLAY_EMULATE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 100.0  # DeepEP's LEGACY_NUM_CPU_TIMEOUT_SECS

# Header word positions (int64 each); HEAD words, then R per-destination counts.
MAGIC, OP, SEQ, ERR, HID, FP8, TOPK, NEXP, MAXTOK, LINEAGE, WORST, NTOK, FLAGS, BUF = range(14)
HEAD = 16
MAGIC_VALUE = 0x45505245  # "EPRE": a header from something else is caught, not misread

OP_NAMES = {1: "get_dispatch_layout", 2: "dispatch", 3: "dispatch (cached)", 4: "combine",
            5: "low_latency_dispatch", 6: "low_latency_combine"}


class EmulatedDeepEPError(RuntimeError):
    """A misuse or failure of the emulated Buffer; raised on every rank of the group."""


class EmulatedTimeout(EmulatedDeepEPError):
    """A peer rank did not arrive within the timeout (DeepEP: "CPU recv timeout")."""


def timeout_from_env(value: float | None) -> float:
    """The timeout in seconds: the constructor value, else EPREPLAY_EMULATE_TIMEOUT_S, else 100."""
    if value is not None:
        return float(value)
    raw = os.environ.get(ENV_TIMEOUT)
    if raw:
        try:
            return float(raw)
        except ValueError:
            raise EmulatedDeepEPError(f"{ENV_TIMEOUT}={raw!r}: expected seconds, e.g. 30") from None
    return DEFAULT_TIMEOUT_S


class Comm:
    """The group a Buffer talks over, with DeepEP-like timeouts on every wait."""

    def __init__(self, group: Any, timeout_s: float, comm_device: torch.device):
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.timeout_s = timeout_s
        # NCCL needs device tensors for the small headers too; gloo takes CPU tensors.
        self.device = comm_device

    def _wait(self, work: Any, what: str) -> None:
        t0 = time.monotonic()
        try:
            ok = work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as exc:
            text = str(exc)
            if "timed out" in text.lower() or "timeout" in text.lower():
                # the process group's own (shorter) timeout may fire first: say what really happened
                raise EmulatedTimeout(
                    f"DeepEP error: CPU recv timeout (emulated {what}): rank {self.rank} waited "
                    f"{time.monotonic() - t0:.1f} s (limit {self.timeout_s:g} s) for its {self.size - 1} "
                    f"peers; a rank is late, hung, or skipped this call (limit: Buffer(timeout_s=...) or "
                    f"{ENV_TIMEOUT}, and the process group's own timeout)") from exc
            raise EmulatedDeepEPError(f"emulated {what}: rank {self.rank}: the collective failed: "
                                      f"{text.splitlines()[0] if text else type(exc).__name__}") from exc
        if ok is False:  # NCCL-style wait returns False on timeout
            raise EmulatedTimeout(f"DeepEP error: CPU recv timeout (emulated {what}): rank {self.rank} "
                                  f"waited {self.timeout_s:g} s for its peers")

    def gather_words(self, words_W: torch.Tensor, what: str) -> torch.Tensor:
        """All-gather one int64 header per rank: [W] -> [R, W] (on the CPU)."""
        if self.size == 1:
            return words_W.view(1, -1).clone()
        src = words_W.to(self.device)
        out = torch.empty(self.size * src.numel(), dtype=torch.int64, device=self.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._wait(gather(out, src, group=self.group, async_op=True), what)
        return out.view(self.size, -1).cpu()

    def gather_messages(self, message: str) -> list[str]:
        """All-gather one string per rank (only on the error path: every rank is known present)."""
        if self.size == 1:
            return [message]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, message, group=self.group)
        return [str(m or "") for m in out]

    def exchange_rows(self, send_SB: torch.Tensor, send_counts: Sequence[int],
                      recv_counts: Sequence[int], what: str) -> torch.Tensor:
        """all_to_all of packed uint8 rows: send_SB rows grouped by destination rank ascending.

        Returns the received rows [sum(recv_counts), B], grouped by source rank ascending, each
        source's rows in the order that source sent them.
        """
        B = send_SB.shape[1]
        if self.size == 1:
            return send_SB.clone()
        recv = torch.empty(int(sum(recv_counts)), B, dtype=torch.uint8, device=send_SB.device)
        if B == 0:
            return recv
        work = dist.all_to_all_single(recv.view(-1), send_SB.contiguous().view(-1),
                                      [int(c) * B for c in recv_counts], [int(c) * B for c in send_counts],
                                      group=self.group, async_op=True)
        self._wait(work, what)
        return recv

    def exchange_fixed(self, send_XB: torch.Tensor, what: str) -> torch.Tensor:
        """all_to_all of equal blocks: send_XB holds R blocks of X / R rows, block r for rank r.

        Returns the same shape, block s from rank s. No split sizes, no host sync: inside a CUDA
        graph capture the collective is issued synchronously on the capturing stream (NCCL
        supports that) instead of being waited for with a host-side timeout.
        """
        if self.size == 1:
            return send_XB
        recv = torch.empty_like(send_XB)
        if send_XB.numel() == 0:
            return recv
        capturing = send_XB.is_cuda and torch.cuda.is_current_stream_capturing()
        if capturing:
            dist.all_to_all_single(recv, send_XB.contiguous(), group=self.group)
        else:
            self._wait(dist.all_to_all_single(recv, send_XB.contiguous(), group=self.group, async_op=True), what)
        return recv

    def exchange_counts(self, counts_RX: torch.Tensor, what: str) -> torch.Tensor:
        """all_to_all of a fixed number X of int64 per destination: [R, X] -> [R (source), X]."""
        if self.size == 1:
            return counts_RX.clone()
        src = counts_RX.to(self.device).contiguous()
        out = torch.empty_like(src)
        self._wait(dist.all_to_all_single(out.view(-1), src.view(-1), group=self.group, async_op=True), what)
        return out.cpu()


def new_header(op: int, seq: int, size: int) -> torch.Tensor:
    """A header [HEAD + R] int64 with every optional word at -1 and the counts at 0."""
    h = torch.full((HEAD + size,), -1, dtype=torch.int64, device="cpu")  # host-side, whatever the default device
    h[MAGIC], h[OP], h[SEQ], h[ERR] = MAGIC_VALUE, op, seq, 0
    h[HEAD:] = 0
    return h


def pack_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Row-wise byte concatenation of 2-D tensors with equal row counts -> uint8 [S, B]."""
    cols = [p.contiguous().view(torch.uint8).reshape(p.shape[0], math.prod(p.shape[1:]) * p.element_size())
            for p in parts]
    return torch.cat(cols, dim=1) if len(cols) > 1 else cols[0].contiguous()


def unpack_rows(rows_SB: torch.Tensor, specs: Sequence[tuple[torch.dtype, int]]) -> list[torch.Tensor]:
    """Inverse of pack_rows: specs are (dtype, columns) per part -> list of [S, columns] tensors.

    A part whose byte offset and row width suit its dtype is a strided view of `rows_SB` (no copy);
    the others are copied. Callers that hand a part to the user make it contiguous first.
    """
    out, off = [], 0
    S, B = rows_SB.shape
    rows_SB = rows_SB.contiguous()
    for dtype, n in specs:
        size = dtype.itemsize
        width = n * size
        if S and B % size == 0 and off % size == 0 and rows_SB.data_ptr() % size == 0:
            out.append(rows_SB.view(dtype)[:, off // size:off // size + n])
        else:
            part = rows_SB[:, off:off + width].clone(memory_format=torch.contiguous_format)  # aligned copy
            out.append(part.view(dtype).view(S, n))
        off += width
    return out
