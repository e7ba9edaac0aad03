"""The compiled hook's plans: learned from the Python hook, run by _hookx.cpp.

A *plan* says, for one call-site key (method, Buffer, calling convention, the arguments' types,
dtypes, shapes and plain values), everything a call's frame needs that does not change from call
to call: the op, level, meta and argument descriptions, and where each staged array and value
comes from — an argument slot or a result element (`Src` = (root, i, j): root 0 argument slot i,
root 1 result element i, root 2 the token tags the call took; j >= 0 its tuple element j). With
it the compiled hook writes a FAST frame (ring_frames.py) per call without running Python; the
writer joins the frame with the plan (ring_frames.read_fast) into the CALL frame the Python hook
would have written.

A low-latency call with a recv hook (RECV_HOOK_AT) has a plan in two parts: its inputs, written
at return as a BEGIN frame, and its outputs (every source in the result), written by the hook's
wrapper as an END frame; the first part is learned at return (learn_begin), the whole plan once
the hook ran (learn_end).

Learning: the first call of a key goes through the Python hook. When its CALL frame is written,
`learn` finds every staged tensor among the call's arguments and results by identity; when all
are found (host tensors only, no derived tensors but the token tags, no error), the plan goes to the
ring's plan area (the writer reads it there) and to the session (`Session.learn`); when a key can
never be planned (CUDA tensors, a derived tensor) the session remembers that instead.

    load()                       the compiled module, or None (not built, or built for another torch)
    FastSession(rec, ring)       the session the hooks use while a recorder captures into `ring`
    learn(fs, call, args, result, staging, meta)   from ring_path.call_frame
"""
from __future__ import annotations

import array
import marshal
import os
from typing import Any

import torch

from epreplay.format.records import Op

NONE = -(1 << 63)  # None in the shared int64 arrays (recorder._attr)
# A Src naming the token tags a dispatch took (capture.tag_tokens): its key says it takes them
# (_hookx.cpp kTaggedKey), so tagged and untagged calls of a site have a plan each.
TAGS = (2, -1, -1)
_module: Any = False  # not looked up yet


def env_off(name: str) -> bool:
    """An on-by-default switch set to 0/false/no/off."""
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")


def load() -> Any:
    """epreplay.capture._hookx when it is built for this torch, else None. EPREPLAY_CAPTURE_COMPILED=0
    turns it off (the Python hook then runs: same records, slower)."""
    global _module
    if _module is False:
        _module = None
        if not env_off("EPREPLAY_CAPTURE_COMPILED"):
            try:
                import torch

                from epreplay.capture import _hookx

                if _hookx.torch_version == torch.__version__:
                    _module = _hookx
            except ImportError:  # not built (no compiler), or built against another torch
                pass
    return _module


class FastSession:
    """One recorder's compiled-hook session over its ring: made and activated at the session's
    first hooked call (host tensors, ring path, below `payload`), deactivated at close."""

    def __init__(self, rec: Any, rp: Any, hookx: Any) -> None:
        from epreplay import marks

        self.rp = rp  # ring_path.RingPath: its ring, and on a GPU its device stage
        ring = self.ring = rp.ring
        self.hookx = hookx
        self.stats = array.array("q", [0, 0, 0, 0])  # hot ns, calls, dropped, frames
        self.session = hookx.Session(rec, ring.state, ring.base, ring.words_addr, ring.capacity, rec._attr,
                                     self.stats, int(rec.config.layers_per_step), marks._local)
        hookx.activate(self.session)
        self.gather_tried = False  # the raw gather launch (gather_kernel.py), tried once
        self.raw_launch = False  # it is there (async_finish outputs need it: on the side stream)
        self.hash_launch = False  # it fingerprints rows too (level fingerprints on a GPU)
        # host rows fingerprinted by the hook (AVX-512 here); EPREPLAY_CAPTURE_HOST_HASH=0: copied
        # into the frame for the writer to hash, as before
        self.host_hash = bool(hookx.host_hash_fast()) and not env_off("EPREPLAY_CAPTURE_HOST_HASH")

    def gather_info(self) -> tuple[int, int, bool, int]:
        """(raw gather launches, at::cat_out launches, raw path on, ns spent launching) so far."""
        return tuple(self.session.gather_info())

    def close(self) -> None:
        self.hookx.activate(None)
        self.session.disable()


def _slots(binder: Any, nargs: int, kwnames: Any) -> dict[str, int] | None:
    """{argument name: slot} for this calling convention; None where the binder cannot say."""
    if not getattr(binder, "simple", False) or nargs > len(binder.names):
        return None
    slots = {name: i for i, name in enumerate(binder.names[:nargs])}
    for k, name in enumerate(kwnames or ()):
        slots[name] = nargs + k
    return slots


def _finder(args: dict[str, Any], slots: dict[str, int], result: Any) -> Any:
    def find(obj: Any) -> tuple[int, int, int] | None:
        for name, v in args.items():
            i = slots.get(name)
            if i is None:
                continue
            if v is obj:
                return (0, i, -1)
            if type(v) is tuple:
                for j, p in enumerate(v):
                    if p is obj:
                        return (0, i, j)
        if type(result) is tuple:
            for i, v in enumerate(result):
                if v is obj:
                    return (1, i, -1)
                if type(v) is tuple:
                    for j, p in enumerate(v):
                        if p is obj:
                            return (1, i, j)
        return None
    return find


TENSOR = "\0T"  # an argument template's tensor leaf: (TENSOR, dtype name, device suffix, dims at, ndim)


def args_template(args: dict[str, Any], slots: dict[str, int]) -> tuple[dict[str, Any], int] | None:
    """extract.describe of the bound arguments with each tensor's dims left open: the frame
    carries the dims of every argument tensor, in _hookx.cpp's order (slots in order, tuple
    elements two levels deep), and ring_frames.render_args fills them in. (template, dims) or None."""
    from epreplay.capture.extract import describe

    order = sorted((i, name) for name, i in slots.items())
    at = 0

    def walk(v: Any, depth: int) -> Any:
        nonlocal at
        if isinstance(v, torch.Tensor):
            leaf = (TENSOR, str(v.dtype).replace("torch.", ""),
                    "" if v.device.type == "cpu" else f"@{v.device.type}", at, v.dim())
            at += v.dim()
            return leaf
        if type(v) is tuple and depth < 2:
            return [walk(p, depth + 1) for p in v]
        if isinstance(v, tuple) and any(isinstance(p, torch.Tensor) for p in v):
            raise LookupError  # a tuple subclass, or deeper than the hook looks
        return describe(v)

    try:
        by_slot = {name: walk(args[name], 0) for _, name in order}
    except LookupError:
        return None
    return {name: by_slot[name] if name in by_slot else describe(v) for name, v in args.items()}, at


def _rows_source(call: Any, args: dict[str, Any], result: Any) -> Any:
    """The tensor whose rows are the call's tokens (extract.py's rule per op), or None."""
    if call.op in (Op.LAYOUT, Op.LL_COMBINE):
        t = args.get("topk_idx")
    elif call.op == Op.COMBINE:
        t = result[0] if type(result) is tuple and result else None
    else:
        t = args.get("x")
        t = t[0] if isinstance(t, (tuple, list)) else t
    return t if isinstance(t, torch.Tensor) and t.dim() else None


def _valid_rows_source(call: Any, name: str, tag: str, t: Any, args: dict[str, Any], result: Any,
                       find: Any) -> tuple | None:
    """(source of the [L, X, H] buffer, mode, source of its counts) of the valid rows extract.py
    gathered into `t` on a CPU (recv_x_fp_V of a low-latency dispatch: counts recv_count, mode 1;
    x_fp_V of a low-latency combine: counts from the handle's layout_range, mode 2), checked by
    gathering them again; None for anything else."""
    from epreplay.capture.extract import _gather_valid

    part = {"fp0": 0, "fp1": 1}.get(tag)
    if call.op == Op.LL_DISPATCH and name == "recv_x_fp_V" and type(result) is tuple and len(result) > 1:
        base, c, mode = result[0], result[1], 1
        counts = c.tolist() if isinstance(c, torch.Tensor) else None
    elif call.op == Op.LL_COMBINE and name == "x_fp_V" and type(args.get("handle")) is tuple:
        base, c, mode = args.get("x"), args["handle"][1], 2
        counts = (c & 0xFFFFFFFF).sum(dim=1).tolist() if isinstance(c, torch.Tensor) else None
    else:
        return None
    if isinstance(base, (tuple, list)):
        base = base[part] if part is not None else None
    if not isinstance(base, torch.Tensor) or base.dim() != 3 or counts is None:
        return None
    src, counts_src = find(base), find(c)
    if src is None or counts_src is None or not torch.equal(_gather_valid(base, counts), t):
        return None
    return src, mode, counts_src


def _hashed_source(rows: Any, find: Any) -> tuple | None:
    """The session's array spec of a "hash" entry (x [T, H], an FP8 pair, or extract.ValidRows
    of a low-latency buffer [L, X, H]): (x's src, dtype, ndim, counts mode, counts src, 1, the
    scales' src); None where the gather kernel cannot hash it (rows not whole 64-bit lanes, a
    tensor not among the call's arguments and results)."""
    from epreplay.capture.extract import ValidRows

    x, counts, mode = (rows.x, rows.counts, rows.mode) if isinstance(rows, ValidRows) else (rows, None, 0)
    parts = list(x) if isinstance(x, (tuple, list)) else [x]
    if len(parts) not in (1, 2) or not all(isinstance(p, torch.Tensor) for p in parts):
        return None
    a = parts[0]
    if a.dim() != (3 if counts is not None else 2) or (a.shape[-1] * a.element_size()) % 8:
        return None
    if not all(p.is_contiguous() for p in parts):  # e.g. DeepEP's low-latency FP8 scales, stored
        return None  # [L, S, X] and viewed [L, X, S]: the kernel reads packed rows only
    srcs = [find(p) for p in parts]
    counts_src = find(counts) if counts is not None else None
    if None in srcs or (counts is not None and counts_src is None):
        return None
    return (srcs[0], a.dtype, a.dim(), mode, counts_src, 1, srcs[1] if len(srcs) > 1 else None)


# Host row dtypes the hook fingerprints itself: DeepEP's activations and FP8 codes (their non-finite
# check is the GPU launch's, which float64 rows would not match).
_HOST_HASHED = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2)


def _host_source(call: Any, name: str, tag: str, t: Any, args: dict[str, Any], result: Any, find: Any,
                 device: bool) -> tuple:
    """(src, counts mode, counts src) of a staged tensor: an argument or result, or on the host the
    valid rows of a low-latency buffer gathered by staging; (None, 0, None) when not found."""
    src = find(t)
    if src is not None:
        return src, 0, None
    if device:
        return None, 0, None
    got = _valid_rows_source(call, name, tag, t, args, result, find)
    return got if got is not None else (None, 0, None)


def _arrays_plan(call: Any, args: dict[str, Any], result: Any, st: Any, find: Any,
                 host_hash: bool) -> tuple[list, list, list, list] | None:
    """The staged arrays and values of `st` as plan sources: (arrays, their frame specs, value
    sources, value names), or None where one cannot be found among the arguments and results."""
    from epreplay.capture.ring_frames import words_of

    device = bool(st.dev)
    staged = st.dev if device else st.arrays  # (on the host an async_finish event orders nothing)
    arrays, specs = [], []
    hash_outputs = []
    for name, dtype in (("", torch.int64), (":nonfinite", torch.int8)):  # fp [n], marks [n]
        words, logical = words_of(dtype)
        hash_outputs.append((name, words, logical, dtype.itemsize))
    rest = list(staged)
    while rest:
        name, t, tag = rest.pop(0)
        if tag == "hash":  # GPU rows the gather launch fingerprints (gather_kernel.py ep_hash)
            got = _hashed_source(t, find)
            if got is None:
                return None
            arrays.append(got)
            specs += [(name + suffix, "a", words, logical, size, 1) for suffix, words, logical, size in hash_outputs]
            continue
        if name == "token_tag_T" and call.tags is not None:
            src, mode, counts = TAGS, 0, None  # the tags the hook takes (_hookx.cpp take_tags)
        else:
            src, mode, counts = _host_source(call, name, tag, t, args, result, find, device)
        if src is None:
            return None
        if host_hash and tag in ("fp", "fp0") and t.dtype in _HOST_HASHED and \
                t.dim() == 2 and (t.shape[-1] * t.element_size()) % 8 == 0:
            src2 = None  # host rows hashed by the hook: the frame carries fp and marks
            if tag == "fp0":  # an FP8 pair: its scales are the next entry
                if not rest or rest[0][0] != name or rest[0][2] != "fp1":
                    return None
                _, t1, tag1 = rest.pop(0)
                src2 = _host_source(call, name, tag1, t1, args, result, find, device)[0]
                if src2 is None:
                    return None
            arrays.append((src, t.dtype, 3 if mode else t.dim(), mode, counts, 1, src2))
            specs += [(name + suffix, "a", words, logical, size, 1) for suffix, words, logical, size in hash_outputs]
            continue
        words, logical = words_of(t.dtype)
        arrays.append((src, t.dtype, 3 if mode else t.dim(), mode, counts))
        specs.append((name, tag, words, logical, t.element_size(), t.dim()))
    values, value_names = [], []
    for name, v in st.values:
        src = None
        if type(v) is list and type(result) is tuple:
            src = next(((1, i, -1) for i, r in enumerate(result) if type(r) is list and r == v), None)
        if src is None:
            return None
        values.append(src)
        value_names.append(name)
    return arrays, specs, values, value_names


def compile_plan(call: Any, args: dict[str, Any], result: Any, st: Any, meta: dict[str, Any],
                 slots: dict[str, int], host_hash: bool = False) -> tuple[list, tuple] | None:
    """(the session's spec without its id, the writer's plan) for this call, or None when its
    frame cannot be expressed as a plan (see the module docstring). host_hash: host rows to
    fingerprint are hashed by the hook (_hosthash.h) instead of copied for the writer."""
    device = bool(st.dev)
    if device and (st.arrays or any(tag not in ("a", "hash") for _, _, tag in st.dev)):
        return None  # host and CUDA arrays mixed: Python's
    template = args_template(args, slots)
    if template is None:
        return None
    find = _finder(args, slots, result)
    after = None  # async_finish on a GPU: the gather waits for this event (on the hook's side stream)
    if device and st.after_ev is not None:
        after = find(st.after_ev)
        if after is None or after[0] != 1:
            return None
    got = _arrays_plan(call, args, result, st, find, host_hash)
    if got is None:
        return None
    arrays, specs, values, value_names = got
    lookup = remember = None
    if "dispatch_seq" in meta:
        h = args.get("handle")
        lookup = find(h[0]) if type(h) is tuple and h else None
        if lookup is None:
            return None
    if call.op == Op.DISPATCH and type(result) is tuple and len(result) > 4 and type(result[4]) is tuple:
        remember = (1, 4, 0)
    elif call.op == Op.LL_DISPATCH and type(result) is tuple and len(result) > 2 and type(result[2]) is tuple:
        remember = (1, 2, 0)
    parity = "ll_parity" in meta
    rows = _rows_source(call, args, result)
    tokens_src = find(rows) if rows is not None else None
    if (rows is not None and (tokens_src is None or rows.shape[0] != call.tokens)) or \
            (rows is None and call.tokens):
        return None  # tokens the plan could not reproduce
    spec = [int(call.op), parity, lookup, remember, tokens_src, 0, template[1], arrays, values, device, after]
    plan = (int(call.op), call.buffer, int(call.level), dict(meta), template, specs, value_names,
            parity, "dispatch_seq" in meta)
    return spec, plan


# Where a low-latency call's recv hook is in its result: the outputs are valid once it ran.
RECV_HOOK_AT = {Op.LL_DISPATCH: 4, Op.LL_COMBINE: 2}


def _roots(src: Any) -> set[int]:
    """The roots (0 argument, 1 result, 2 tags) an array or value source reads."""
    if src is None:
        return set()
    if type(src) is tuple and len(src) == 3 and all(type(v) is int for v in src):
        return {src[0]}
    return set().union(*map(_roots, src)) if type(src) in (tuple, list) else set()


class RecvLearn:
    """The first step of learning a call whose outputs come with its recv hook: the BEGIN part
    (the inputs' plan, made when the call returned) and the pending key it is for."""

    __slots__ = ("spec", "plan", "key", "slots")

    def __init__(self, spec: list, plan: tuple, key: bytes, slots: dict[str, int]) -> None:
        self.spec, self.plan, self.key, self.slots = spec, plan, key, slots


def learn_begin(fs: FastSession | None, call: Any, args: dict[str, Any], result: Any, st: Any,
                meta: dict[str, Any]) -> RecvLearn | None:
    """A call with a recv hook returned and its BEGIN frame is written: the inputs' plan, kept
    until the hook ran (learn_end). None where the key cannot be planned (the session then
    remembers that) or nothing was asked."""
    if fs is None:
        return None
    pending = fs.hookx.pending()
    if pending is None:
        return None
    hook, nargs, kwnames, tagged, key = pending
    slots = _slots(getattr(hook, "binder", None), nargs, kwnames)
    got = None
    if call.error is None and not call.status and tagged == (call.tags is not None) and slots is not None:
        got = compile_plan(call, args, result, st, meta, slots, fs.host_hash)
    if got is None or got[0][10] is not None:  # (async_finish excludes a recv hook)
        fs.session.learn(None)
        return None
    return RecvLearn(got[0], got[1], key, slots)


def learn_end(fs: FastSession | None, pend: RecvLearn | None, call: Any, args: dict[str, Any],
              result: Any, st: Any, added: Any) -> None:
    """The recv hook ran and the END frame is written: with the outputs' part, the call's plan
    (its compiled calls write a BEGIN frame at return and an END frame from the hook's wrapper,
    which holds the result only: every output must come from it)."""
    if fs is None or pend is None:
        return
    find = _finder({}, {}, result)
    got = _arrays_plan(call, args, result, st, find, fs.host_hash)
    hook_at = RECV_HOOK_AT.get(call.op)
    device = bool(st.dev)
    if got is None or added or hook_at is None or st.after_ev is not None or \
            (device and st.arrays) or not (_roots(got[0]) | _roots(got[2])) <= {1}:
        fs.session.learn(None, pend.key)
        return
    arrays, specs, values, value_names = got
    spec = list(pend.spec)
    spec.append((hook_at, arrays, values, device))
    plan = pend.plan + ((specs, value_names),)
    _learn(fs, spec, plan, pend.key)


def learn(fs: FastSession, call: Any, args: dict[str, Any], result: Any, st: Any, meta: dict[str, Any]) -> None:
    """After the Python hook wrote `call`'s CALL frame: a plan for its key, if the compiled hook
    asked for one (the session remembers "never" where none can be made)."""
    pending = fs.hookx.pending()
    if pending is None or call.error is not None or call.status:
        return  # not asked, or this one call is unusual (an error): the next may teach
    hook, nargs, kwnames, tagged, _ = pending
    if tagged != (call.tags is not None):  # tags pending at a call that leaves them (a cached
        fs.session.learn(None)              # dispatch): that key stays Python's, which leaves them
        return
    slots = _slots(getattr(hook, "binder", None), nargs, kwnames)
    got = compile_plan(call, args, result, st, meta, slots, fs.host_hash) if slots is not None else None
    if got is None:
        fs.session.learn(None)
        return
    _learn(fs, *got)


def _learn(fs: FastSession, spec: list, plan: tuple, key: bytes | None = None) -> None:
    """Hand a compiled plan to the session (and to the writer, through the ring's plan area) for
    the pending key, or for `key` (a recv hook's call, learned after its key stopped pending)."""
    rest = (key,) if key is not None else ()
    end = spec[11] if len(spec) > 11 else None
    if spec[9] or (end is not None and end[3]):  # CUDA arrays: gathered into the session's device ring
        dev = fs.rp.dev
        if dev is None:
            fs.session.learn(None, *rest)
            return
        from epreplay.capture.gather_kernel import current_stream_handle
        from epreplay.capture.graph_ring import CAPTURING

        fs.session.set_device(dev.D, dev.dstate, CAPTURING, dev.drainer, current_stream_handle, *dev.context,
                              dev.side_spec())
        if not fs.gather_tried:
            fs.gather_tried = True
            fs.raw_launch, fs.hash_launch = _raw_gather(fs, dev.D.device)
        hashed = list(spec[7]) + (list(end[1]) if end is not None else [])
        if any(len(a) > 5 and a[5] for a in hashed) and not fs.hash_launch:
            fs.session.learn(None, *rest)  # fingerprinted rows need the raw launch: Python's
            return
        if spec[10] is not None and not (fs.raw_launch and dev.drainer is not None):
            fs.session.learn(None, *rest)  # async_finish: the raw launch on the side stream, the native drain
            return
    try:
        blob = marshal.dumps(plan)
    except ValueError:  # a meta value marshal cannot carry: the Python path keeps this site
        fs.session.learn(None, *rest)
        return
    plan_id = fs.ring.append_plan(blob)
    if plan_id < 0:
        return  # the plan area is full: this key stays on the Python path
    fs.session.learn((plan_id, *spec), *rest)


def _raw_gather(fs: FastSession, device: Any) -> tuple[bool, bool]:
    """Give the session the raw gather launches (one cuLaunchKernel a call instead of at::cat_out's
    ~15 us of host time; with fingerprinted rows, the same launch hashes them); whether they are
    there (the copies, the one with hashing). EPREPLAY_CAPTURE_RAW_GATHER=0 keeps at::cat_out
    (for comparisons: fingerprinted rows and async_finish outputs then stay with the Python hook)."""
    if env_off("EPREPLAY_CAPTURE_RAW_GATHER"):
        return False, False
    from epreplay.capture import gather_kernel

    got = gather_kernel.load(device)
    if got is None:
        return False, False
    hashing = gather_kernel.load(device, gather_kernel.GATHER_HASH)
    fs.session.set_gather(*got, gather_kernel.current_stream_handle, hashing[0] if hashing else 0)
    return True, hashing is not None
