"""Test-only fault injection in the emulated DeepEP Buffer (epreplay.emulate). OFF by default.

Nothing here can switch on by accident: a fault exists only if code explicitly installs it.
    from epreplay.emulate import faults
    f = faults.Fault("swap_rows", rank=1, op="dispatch", call=2)
    faults.install(f)            # every emulated Buffer of *this process* (or f.install())
    Buffer(group, _faults=[f])   # or just one Buffer
    faults.arm()                 # or: the JSON in env EPREPLAY_FAULTS, but only when arm() is
                                 # called; the env var alone does nothing
    faults.clear()               # remove the installed faults; faults.fired() -> what fired

A Fault fires on the group rank `rank`, at the `call`-th (0-based) call of `op` on a Buffer
(any Buffer, or only the one whose `buffer_id` == `buffer`), or, when `seq` is given, at the
Buffer's seq-th entry-point call (0-based, every entry point counted, get_dispatch_layout included).
op: "layout", "dispatch", "cached_dispatch", "combine", "ll_dispatch", "ll_combine" (the labels
of epreplay.format.records.Op). Kinds:
    drop_token  the received row `row` disappears (normal dispatch: one row fewer, counts shrink;
                low-latency dispatch: one row fewer for its expert; combine: its contribution is 0)
    swap_rows   the payloads of received rows `row` and `row2` are exchanged (metadata stays)
    flip_bit    bit `bit` of received row `row`'s payload is flipped
    delay       the rank sleeps `delay_s` seconds before the call
    hang        the rank never enters the call (sleeps until killed): its peers time out
Rows are indices into the rows this rank receives, in arrival order (source rank ascending, then
the order the source sent them), taken modulo the number of rows; with no rows nothing happens.
Each firing is appended to `fired()` (in the process where it fired).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import torch

ENV = "EPREPLAY_FAULTS"
KINDS = ("drop_token", "swap_rows", "flip_bit", "delay", "hang")
OPS = ("layout", "dispatch", "cached_dispatch", "combine", "ll_dispatch", "ll_combine")


@dataclass(frozen=True)
class Fault:
    """One injected fault; see the module docstring."""

    kind: str
    rank: int
    op: str = "dispatch"
    call: int = 0
    buffer: int | None = None
    seq: int | None = None
    row: int = 0
    row2: int = 1
    bit: int = 0
    delay_s: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Fault kind {self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.op not in OPS:
            raise ValueError(f"Fault op {self.op!r}: choose one of {', '.join(OPS)}")

    def install(self) -> None:
        """Install this fault for every emulated Buffer of this process."""
        install(self)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "Fault":
        return cls(**d)


_installed: list[Fault] = []
_fired: list[dict] = []


def install(faults: Fault | Iterable[Fault]) -> None:
    """Add fault(s) for every emulated Buffer in this process (explicit: tests only)."""
    items = [faults] if isinstance(faults, Fault) else list(faults)
    for f in items:
        if not isinstance(f, Fault):
            raise TypeError(f"faults.install: expected Fault objects, got {type(f).__name__}")
    _installed.extend(items)


def arm() -> list[Fault]:
    """Install the faults described by the JSON in EPREPLAY_FAULTS (an object or a list of them)."""
    raw = os.environ.get(ENV)
    if not raw:
        return []
    data = json.loads(raw)
    items = [Fault.from_dict(d) for d in (data if isinstance(data, list) else [data])]
    install(items)
    return items


def clear() -> None:
    _installed.clear()
    _fired.clear()


def fired() -> list[dict]:
    """What fired in this process: dicts with the fault's fields plus 'detail'."""
    return list(_fired)


def _matching(buf: Any, op: str, index: int, kinds: tuple[str, ...]) -> list[Fault]:
    own = getattr(buf, "_faults", None)
    pool = _installed + ([own] if isinstance(own, Fault) else list(own or []))
    if not pool:
        return []
    seq = buf._seq - 1
    out = []
    for f in pool:
        if f.kind not in kinds or f.rank != buf.rank:
            continue
        if f.buffer is not None and f.buffer != buf.buffer_id:
            continue
        if (f.seq == seq) if f.seq is not None else (f.op == op and f.call == index):
            out.append(f)
    return out


def _note(f: Fault, detail: str) -> None:
    _fired.append(dict(asdict(f), detail=detail))


def before_call(buf: Any, op: str, index: int) -> None:
    """Delay or hang this rank before the call (called by the Buffer at every entry point)."""
    for f in _matching(buf, op, index, ("delay", "hang")):
        _note(f, f"{f.kind} before {op} call {index}")
        if f.kind == "delay":
            time.sleep(f.delay_s)
        else:
            while True:  # a hung rank: only the parent (or the test's timeout) ends it
                time.sleep(3600)


def mutate_rows(buf: Any, op: str, index: int, rows_SB: torch.Tensor, payload_bytes: int,
                drop_zeroes: bool = False) -> torch.Tensor:
    """Apply drop/swap/flip faults to the packed rows this rank received ([S, B] uint8; the first
    `payload_bytes` of a row are its payload). Returns the (possibly new) rows."""
    for f in _matching(buf, op, index, ("drop_token", "swap_rows", "flip_bit")):
        n = rows_SB.shape[0]
        if n == 0:
            _note(f, f"{op} call {index}: no rows received, nothing to do")
            continue
        i = f.row % n
        if f.kind == "drop_token":
            if drop_zeroes:
                rows_SB = rows_SB.clone()
                rows_SB[i, :payload_bytes] = 0
            else:
                rows_SB = torch.cat([rows_SB[:i], rows_SB[i + 1:]])
            _note(f, f"{op} call {index}: dropped received row {i}")
        elif f.kind == "swap_rows":
            j = f.row2 % n
            rows_SB = rows_SB.clone()
            a = rows_SB[i, :payload_bytes].clone()
            rows_SB[i, :payload_bytes] = rows_SB[j, :payload_bytes]
            rows_SB[j, :payload_bytes] = a
            _note(f, f"{op} call {index}: swapped payloads of received rows {i} and {j}")
        else:
            byte, bit = (f.bit // 8) % max(payload_bytes, 1), f.bit % 8
            rows_SB = rows_SB.clone()
            rows_SB[i, byte] ^= (1 << bit)
            _note(f, f"{op} call {index}: flipped bit {bit} of byte {byte} of received row {i}")
    return rows_SB
