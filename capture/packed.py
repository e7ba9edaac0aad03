"""A staged call made portable: what crosses from the job's process to the writer process.

`pack(call)` runs on the job's courier thread once the call's copies are done: it waits on the
call's event (the GIL is released while waiting), views every staged host tensor as numpy (no
copy: pinned or CPU memory), describes the bound arguments and reads the duration. The result,
a `PackedCall`, has a Call's attribute names, so build.build takes it in place of a Call, and it
pickles with its arrays as out-of-band buffers (wire.send): the job's process pays the
waits and views, the writer process pays the hashing, encoding, compression and writes.

Item values of a PackedStaging (by staged name):
  ndarray                     a host tensor's values (GPU fingerprints arrive as int64 here)
  (ndarray, "bfloat16"|...)   bf16/fp8 as raw unsigned words (stage.to_numpy's convention)
  ("fp", rows)                CPU rows to fingerprint in the writer (rows: one such array or an
                              FP8 pair of them); as torch tensors once `rows_to_torch` ran
  ("fpdone", fp_T, finite)    after stage.batch_fingerprints
  anything else               plain values (lists, ints), as staged
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from epreplay.format.fingerprint_cpu import rows_numpy
from epreplay.format.records import Level, Op, Status


def tagged(v: Any, tag: str) -> bool:
    """v is a staged ("fp", rows) / ("fpdone", fp, finite) entry with that tag (not a tensor, and
    not a (words, dtype name) pair, whose first item is an array)."""
    return isinstance(v, tuple) and len(v) >= 2 and isinstance(v[0], str) and v[0] == tag


def all_finite(items: dict[str, Any], name: str) -> bool:
    """Whether the rows hashed under `name` were all finite: its ":finite" flags (0-d or per
    row, True = finite) or the GPU kernel's ":nonfinite" marks (nonzero = not finite)."""
    finite = items.get(name + ":finite")
    if finite is not None:
        return bool(np.all(np.asarray(finite)))
    marks = items.get(name + ":nonfinite")
    return marks is None or not np.any(np.asarray(marks))


class Duration:
    """A measured duration standing in for stage.Timer."""

    __slots__ = ("ns",)

    def __init__(self, ns: int) -> None:
        self.ns = ns

    def duration_ns(self) -> int:
        return self.ns


class PackedStaging:
    """Staging's reading side over plain values (see the module docstring)."""

    cuda = False  # nothing left to wait for: batch_fingerprints may hash its "fp" rows

    def __init__(self, items: dict[str, Any]) -> None:
        self.items = items

    def wait(self) -> None:
        pass

    def array(self, name: str) -> Any:
        v = self.items.get(name)
        if v is None or isinstance(v, (np.ndarray, tuple)):
            return v
        from epreplay.capture.stage import to_numpy

        return to_numpy(v)  # a torch tensor (thread mode packs nothing) or a plain value

    def fingerprints(self, name: str) -> tuple[np.ndarray, bool] | None:
        v = self.items.get(name)
        if v is None:
            return None
        if tagged(v, "fpdone"):
            return v[1], v[2]
        if tagged(v, "fp"):
            fast = rows_numpy(v[1])  # None for torch rows (thread mode) and rows the C pass refuses
            if fast is not None:
                return fast[0], bool(fast[1].all())
            self.rows_to_torch()
            from epreplay.capture.stage import _rows_finite
            from epreplay.format.fingerprint import fingerprint_rows
            from epreplay.format.fingerprint_cpu import rows_cpu

            x = self.items[name][1]
            fast = rows_cpu(x)
            if fast is not None:
                return fast[0], bool(fast[1].all())
            return fingerprint_rows(x).numpy().view(np.uint64), bool(_rows_finite(x))
        return np.asarray(v).view(np.uint64), all_finite(self.items, name)

    def fingerprint_numpy(self) -> bool:
        """Every pending ("fp", rows) entry hashed by the C pass from numpy, without importing
        torch (a writer process then never loads it); whether none is left for
        stage.batch_fingerprints (rows the C pass does not take, or it is not built)."""
        left = False
        for name, v in self.items.items():
            if tagged(v, "fp"):
                got = rows_numpy(v[1])
                if got is None:
                    left = True
                else:
                    self.items[name] = ("fpdone", got[0], bool(got[1].all()))
        return not left

    def rows_to_torch(self) -> None:
        """("fp", numpy rows) -> ("fp", torch rows), for stage.batch_fingerprints (imports torch:
        only writers of CPU fingerprints pay for it)."""
        for name, v in self.items.items():
            if tagged(v, "fp") and not _is_torch(v[1]):
                rows = v[1]
                if isinstance(rows, list):  # an FP8 pair
                    self.items[name] = ("fp", tuple(_to_torch(p) for p in rows))
                else:
                    self.items[name] = ("fp", _to_torch(rows))


@dataclass(eq=False)
class PackedCall:
    """A Call after pack(): the same fields build.build reads, plain data only."""

    op: Op
    buffer: int
    seq: int
    step: int
    layer: int
    start_ns: int
    level: Level
    staging: PackedStaging
    timer: Duration
    args_text: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    tokens: int = 0
    status: Status = Status.OK
    done: bool = False

    def described_args(self) -> dict[str, Any]:
        return self.args_text

    # --- wire form (writer_proc): marshal of plain values + raw array buffers ---------------
    # pickle cost 150+ us a call here (numpy's and the enums' reduce in Python) and held the GIL
    # the job's thread was waiting for; marshal of plain tuples costs a few us.
    def to_wire(self) -> tuple[bytes, list[np.ndarray]]:
        """(header, byte arrays): marshal.dumps of plain values, then each array's bytes.
        Raises ValueError where meta holds something marshal cannot carry."""
        import marshal

        bufs: list[np.ndarray] = []
        entries = []
        for name, v in self.staging.items.items():
            if tagged(v, "fp"):
                rows = v[1]
                parts = rows if isinstance(rows, list) else [rows]
                entries.append(("fp", name, [_spec(p, bufs) for p in parts], isinstance(rows, list)))
            elif isinstance(v, (np.ndarray, tuple)) and _is_array(v):
                entries.append(("a", name, [_spec(v, bufs)], False))
            else:
                entries.append(("v", name, v, False))
        head = (int(self.op), self.buffer, self.seq, self.step, self.layer, self.start_ns,
                int(self.level), int(self.status), self.tokens, self.done, self.timer.ns,
                self.meta, self.args_text, entries)
        return marshal.dumps(head), bufs

    @classmethod
    def from_wire(cls, head: bytes, bufs: list[Any]) -> "PackedCall":
        import marshal

        (op, buffer, seq, step, layer, start_ns, level, status, tokens, done, duration, meta,
         args_text, entries) = marshal.loads(head)
        it = iter(bufs)
        items: dict[str, Any] = {}
        for kind, name, spec, pair in entries:
            if kind == "v":
                items[name] = spec
                continue
            arrays = [_unspec(sp, next(it)) for sp in spec]
            if kind == "a":
                items[name] = arrays[0]
            else:
                items[name] = ("fp", arrays if pair else arrays[0])
        return cls(op=Op(op), buffer=buffer, seq=seq, step=step, layer=layer, start_ns=start_ns,
                   level=Level(level), staging=PackedStaging(items), timer=Duration(duration),
                   args_text=args_text, meta=meta, tokens=tokens, status=Status(status), done=done)


def pack(call: Any) -> PackedCall:
    """The portable form of a staged Call (waits for its copies; see the module docstring)."""
    from epreplay.capture.stage import to_numpy

    st = call.staging
    st.wait()
    items: dict[str, Any] = {}
    for name, v in st.items.items():
        if tagged(v, "fp"):
            rows = v[1]
            # a list marks an FP8 pair: a tuple would read as (words, dtype name)
            items[name] = ("fp", [to_numpy(p) for p in rows] if isinstance(rows, tuple) else to_numpy(rows))
        elif _is_torch(v):
            items[name] = to_numpy(v)
        else:
            items[name] = v
    return PackedCall(op=call.op, buffer=call.buffer, seq=call.seq, step=call.step, layer=call.layer,
                      start_ns=call.start_ns, level=call.level, staging=PackedStaging(items),
                      timer=Duration(call.timer.duration_ns() if call.done else -1),
                      args_text=call.described_args(), meta=dict(call.meta), tokens=call.tokens,
                      status=call.status, done=call.done)


def _is_array(v: Any) -> bool:
    """A numpy array, or stage.to_numpy's (words, dtype name) pair."""
    return isinstance(v, np.ndarray) or (len(v) == 2 and isinstance(v[0], np.ndarray) and isinstance(v[1], str))


def _spec(a: Any, bufs: list[np.ndarray]) -> tuple[str, tuple[int, ...], str | None]:
    words, logical = a if isinstance(a, tuple) else (a, None)
    if not words.flags.c_contiguous:  # (np.ascontiguousarray would make a 0-d array 1-d)
        words = words.copy(order="C")
    bufs.append(words.reshape(-1).view(np.uint8))
    return words.dtype.str, tuple(words.shape), logical


def _unspec(spec: Any, buf: Any) -> Any:
    dtype, shape, logical = spec
    arr = np.frombuffer(buf, dtype=np.dtype(dtype)).reshape(shape)
    return (arr, logical) if logical else arr


def _is_torch(v: Any) -> bool:
    return type(v).__module__.startswith("torch") and hasattr(v, "numel")


def _to_torch(a: Any) -> Any:
    """stage.to_numpy's output back to a CPU tensor with the original dtype."""
    import torch

    if isinstance(a, tuple):
        words, dtype = a
        return torch.from_numpy(np.ascontiguousarray(words)).view(getattr(torch, dtype))
    return torch.from_numpy(np.ascontiguousarray(a))
