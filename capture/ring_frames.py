"""Call frames in the capture ring (shm_ring.py): the job writes them, the writer reads them.

Legend: T tokens, K top-k; shapes as in extract.py.

A hooked call is one CALL frame, written when it returns: its inputs (routing, counts, rows to
fingerprint) and outputs (layouts, handles, received rows) together — a call does not change
its host inputs, so they are what they were at entry. A low-latency dispatch whose outputs come
with its recv hook is two frames, BEGIN at return (inputs) and END when the hook ran (outputs),
joined by call id. A HUNG frame is the watchdog's: the inputs of a call still running.

Frame body after shm_ring's 8-byte frame header:
  u32 desc_len, u16 desc_codec (0 marshal, 1 pickle), u16 spare, u64 call id,
  desc (desc_len bytes, padded to 8), then each array's raw bytes (each padded to 8).
desc = (head, specs, values):
  BEGIN head  (op, buffer, seq, step, layer, start_ns, level, tokens, meta, args_text); HUNG too
  END head    (status, tokens, duration_ns, meta_added, done)
  CALL head   BEGIN's ten fields + (END's head,)
  specs       [(name, tag, numpy dtype str, shape, logical dtype or None, nbytes, where)]: where
              -1 for bytes inline in the frame (in spec order), else the absolute position of
              the bytes in the ring's device mirror area (a GPU tensor, device_stage.py);
              tag "a" an array, "fp" rows to fingerprint, "fp0"/"fp1" an FP8 pair's two parts
  values      [(name, plain value)] (lists of ints: num_recv_tokens_per_expert_list)
Everything here but `write_call` is torch-free: the writer process imports it without torch.
"""
from __future__ import annotations

import marshal
import pickle
import struct
from typing import Any

import numpy as np

from epreplay.capture.shm_ring import FRAME, HEADER

BEGIN, END, CALL, HUNG, CTL, FAST = 1, 2, 3, 4, 5, 6  # CTL: a pickled control message
# FAST: a call written by the compiled hook (_hookx.cpp) against a plan (fast_plan.py):
#   u32 plan id, u32 spare, u64 call id, i64 seq, step, layer, start_ns, tokens, duration_ns,
#   ll_parity, dispatch_seq, dev_start (-1: the arrays' bytes follow in the frame; else their
#   absolute position in the device mirror area, packed without padding); the argument tensors' dims (i64: the descriptions of the record's
#   meta "args"); each array's dims (i64, ndim per the plan); each int-list value as
#   i64 count + items; then each array's raw bytes (padded to 8). The plan supplies the rest.
#   The u32 after the plan id is the frame's part: FAST_CALL a whole call; a call with a recv hook
#   (its plan has an outputs' part) is FAST_BEGIN at return (the inputs) and FAST_END when the hook
#   ran (the outputs: no argument dims; the plan's outputs' specs and values), joined by call id.
FAST_HEAD = struct.Struct("<IIQ9q")
FAST_CALL, FAST_BEGIN, FAST_END = 0, 1, 2
CALL_HEAD = struct.Struct("<IHHQ")  # desc_len, desc codec, spare, call id
BODY = FRAME.size + CALL_HEAD.size  # where desc starts in a frame

# torch dtype name -> (numpy dtype str of the stored words, logical name for bf16/fp8 or None);
# the same convention as stage.to_numpy (bf16/fp8 travel as unsigned words plus their name).
_WORDS = {
    "bfloat16": ("<u2", "bfloat16"), "float8_e4m3fn": ("|u1", "float8_e4m3fn"),
    "float8_e5m2": ("|u1", "float8_e5m2"), "float16": ("<f2", None), "float32": ("<f4", None),
    "float64": ("<f8", None), "int64": ("<i8", None), "int32": ("<i4", None), "int16": ("<i2", None),
    "int8": ("|i1", None), "uint8": ("|u1", None), "bool": ("|b1", None),
}


def read_call(body: memoryview, dev: Any = None) -> tuple[int, Any, dict[str, Any], int]:
    """One call frame's body (after the 8-byte frame header) -> call id, head, items:
    {name: array | (words, logical) | ("fp", rows) | value}, copied out of the ring, and the end
    of its bytes in the device mirror area (-1: none there).
    dev: the ring's device mirror area (ShmRing.dev_view), where GPU arrays' bytes are."""
    desc_len, codec, _, call_id = CALL_HEAD.unpack_from(body, 0)
    start = CALL_HEAD.size
    raw = bytes(body[start:start + desc_len])
    head, specs, values = marshal.loads(raw) if codec == 0 else pickle.loads(raw)
    pos = start + ((desc_len + 7) & ~7)
    items: dict[str, Any] = {}
    pairs: dict[str, list[Any]] = {}
    dev_end = -1
    for name, tag, dtype, shape, logical, nbytes, where in specs:
        if where < 0:
            src = body[pos:pos + nbytes]
            pos += (nbytes + 7) & ~7
        else:
            at = where % len(dev)
            src = dev[at:at + nbytes]
            dev_end = max(dev_end, where + nbytes)
        arr = np.frombuffer(src, dtype=np.dtype(dtype)).reshape(shape).copy()
        a = (arr, logical) if logical else arr
        if tag == "a":
            items[name] = a
        elif tag == "fp":
            items[name] = ("fp", a)
        else:  # an FP8 pair's parts: a list marks a pair (packed.py's convention)
            pairs.setdefault(name, [None, None])[tag == "fp1"] = a
            items[name] = ("fp", pairs[name])
    for name, v in values:
        items[name] = v
    return call_id, head, items, dev_end


def read_fast(body: memoryview, plans: dict[int, tuple], dev: Any = None) -> tuple[int, int, tuple, dict[str, Any], int]:
    """One FAST frame's body -> call id, part, head and items, as read_call gives for the frame
    the Python hook would have written (part FAST_CALL: a CALL head; FAST_BEGIN: a BEGIN head;
    FAST_END: an END head), and the end of its bytes in the device mirror area (-1: none there).
    plans: {plan id: the plan tuple fast_plan.compile_plan made}; a KeyError means the plan is
    not read yet (the caller reads the ring's plan area)."""
    (pid, part, call_id, seq, step, layer, start_ns, tokens, duration, parity, dseq,
     dev_start) = FAST_HEAD.unpack_from(body, 0)
    plan = plans[pid]
    op, buffer, level, meta, template, specs, value_names, has_parity, has_dseq = plan[:9]
    pos = FAST_HEAD.size
    args: dict[str, Any] = {}
    if part == FAST_END:  # the outputs' part of a recv hook's plan; the BEGIN frame had the arguments
        specs, value_names = plan[9]
    else:
        n_arg = template[1]
        arg_dims = struct.unpack_from(f"<{n_arg}q", body, pos)
        pos += 8 * n_arg
        args = {name: render_arg(t, arg_dims) for name, t in template[0].items()}
    dims = []
    for spec in specs:
        nd = spec[5]
        dims.append(struct.unpack_from(f"<{nd}q", body, pos))
        pos += 8 * nd
    items: dict[str, Any] = {}
    for name in value_names:
        (n,) = struct.unpack_from("<q", body, pos)
        items[name] = list(struct.unpack_from(f"<{n}q", body, pos + 8))
        pos += 8 + 8 * n
    pairs: dict[str, list[Any]] = {}
    dev_end = -1
    if dev_start >= 0:
        src_buf, pos = dev, dev_start % len(dev)  # one call's bytes never wrap there
    else:
        src_buf = body
    for (name, tag, dtype, logical, itemsize, _), shape in zip(specs, dims):
        nbytes = itemsize
        for d in shape:
            nbytes *= d
        arr = np.frombuffer(src_buf[pos:pos + nbytes], dtype=np.dtype(dtype)).reshape(shape).copy()
        pos += nbytes if dev_start >= 0 else (nbytes + 7) & ~7
        if dev_start >= 0:
            dev_end = dev_start + pos - dev_start % len(dev)
        a = (arr, logical) if logical else arr
        if tag == "a":
            items[name] = a
        elif tag == "fp":
            items[name] = ("fp", a)
        else:
            pairs.setdefault(name, [None, None])[tag == "fp1"] = a
            items[name] = ("fp", pairs[name])
    end = (0, tokens, duration, None, True)
    if part == FAST_END:
        return call_id, part, end, items, dev_end
    if has_parity or has_dseq:
        meta = dict(meta)
        if has_parity:
            meta["ll_parity"] = parity
        if has_dseq:
            meta["dispatch_seq"] = dseq
    head = (op, buffer, seq, step, layer, start_ns, level, tokens, meta, args)
    return call_id, part, head if part == FAST_BEGIN else head + (end,), items, dev_end


def render_arg(t: Any, dims: tuple) -> Any:
    """An argument template (fast_plan.args_template) with its tensors' dims filled in: what
    extract.describe gave for the call."""
    if type(t) is tuple:  # (TENSOR, dtype name, device suffix, dims at, ndim)
        _, name, suffix, at, nd = t
        return f"{name}[{','.join(map(str, dims[at:at + nd]))}]{suffix}"
    if type(t) is list:
        return [render_arg(p, dims) for p in t]
    return t


# --- the job's side (torch tensors) ----------------------------------------------------------
_DTYPES: dict[Any, tuple[str, str | None]] = {}  # torch dtype -> words_of(dtype), as seen
try:  # the C frame writer (optional: setup.py builds it where a C compiler is found)
    from epreplay.capture import _ringc
except ImportError:
    _ringc = None


def words_of(dtype: Any) -> tuple[str, str | None]:
    got = _DTYPES.get(dtype)
    if got is None:
        name = str(dtype).replace("torch.", "")
        if name not in _WORDS:
            raise TypeError(f"capture ring: no wire form for dtype {name}")
        got = _DTYPES[dtype] = _WORDS[name]
    return got


def write_control(ring: Any, msg: tuple) -> bool:
    """A control message (event, dump) as a CTL frame, published; False when it did not fit."""
    raw = pickle.dumps(msg, protocol=5)
    ring.state[3] += 1  # busy: see ShmRing.state
    try:
        off = ring.reserve(FRAME.size + len(raw))
        if off < 0:
            return False
        at = HEADER + off
        FRAME.pack_into(ring.mm, at, (FRAME.size + len(raw) + 7) & ~7, CTL, 0)
        ring.mm[at + FRAME.size:at + FRAME.size + len(raw)] = raw
        ring.publish()
        return True
    finally:
        ring.state[3] -= 1


def write_call(ring: Any, kind: int, call_id: int, head: tuple, arrays: list[tuple[str, Any, str]],
               values: list[tuple[str, Any]], memmove: Any, dev_specs: list | None = None) -> bool:
    """Write one call frame into the ring and publish it; False when it did not fit (dropped).

    arrays: [(name, CPU tensor, tag)]; each is copied (a memmove from its data pointer) now, so
    the frame is a snapshot as of this moment whatever the caller does with the tensor later.
    dev_specs: specs of GPU arrays already gathered into the device ring (device_stage.py).
    The C accelerator (_ringc.c, built with the package where a compiler is found) writes the
    same frame; what it does not handle (a dtype not seen yet, meta marshal cannot carry) comes
    back None and is written here.
    """
    if _ringc is not None:
        got = _ringc.write(ring.state, ring.base, ring.words_addr, ring.capacity, kind, call_id, head,
                           arrays, values, dev_specs, _DTYPES)
        if got is not None:
            return got
    return write_call_py(ring, kind, call_id, head, arrays, values, memmove, dev_specs)


def write_call_py(ring: Any, kind: int, call_id: int, head: tuple, arrays: list[tuple[str, Any, str]],
                  values: list[tuple[str, Any]], memmove: Any, dev_specs: list | None = None) -> bool:
    """write_call in Python (the reference for _ringc.c, and its fallback)."""
    ring.state[3] += 1  # busy: see ShmRing.state
    try:
        return _write_call_py(ring, kind, call_id, head, arrays, values, memmove, dev_specs)
    finally:
        ring.state[3] -= 1


def _write_call_py(ring: Any, kind: int, call_id: int, head: tuple, arrays: list[tuple[str, Any, str]],
                   values: list[tuple[str, Any]], memmove: Any, dev_specs: list | None) -> bool:
    specs = list(dev_specs) if dev_specs else []
    srcs = []
    total = 0
    for name, t, tag in arrays:
        if not t.is_contiguous():
            t = t.contiguous()
        words, logical = words_of(t.dtype)
        nb = t.nbytes
        specs.append((name, tag, words, tuple(t.shape), logical, nb, -1))
        srcs.append((t, nb))
        total += (nb + 7) & ~7
    desc = (head, specs, values)
    try:
        raw, codec = marshal.dumps(desc), 0
    except ValueError:  # a meta value marshal cannot carry (rare): pickle this one
        raw, codec = pickle.dumps(desc, protocol=5), 1
    dl = len(raw)
    size = BODY + ((dl + 7) & ~7) + total
    off = ring.reserve(size)
    if off < 0:
        return False
    size = (size + 7) & ~7
    at = HEADER + off
    mm = ring.mm
    FRAME.pack_into(mm, at, size, kind, 0)
    CALL_HEAD.pack_into(mm, at + FRAME.size, dl, codec, 0, call_id)
    at += BODY
    mm[at:at + dl] = raw
    dst = ring.base + off + BODY + ((dl + 7) & ~7)
    for t, nb in srcs:
        if nb:
            memmove(dst, t.data_ptr(), nb)
        dst += (nb + 7) & ~7
    ring.publish()
    return True
