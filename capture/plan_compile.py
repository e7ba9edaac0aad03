"""A call's plan, compiled from what the Python hook staged for it (the pure part of fast_plan.py).

Each staged tensor is found among the call's arguments and results by identity and named by its
source `Src` = (root, i, j[, field]): root 0 argument slot i, root 1 result element i, root 2 the
token tags the call took; j >= 0 its tuple element j; field: that object's attribute (a DeepEP V2
EPHandle keeps the receive bookkeeping in its fields). Where one cannot be found (a derived tensor other
than the valid rows of a low-latency buffer, CUDA and host arrays mixed, tokens the plan cannot
reproduce) there is no plan and the call site stays with the Python hook.

    finder(args, slots, result)                      Src of an object, by identity
    find_list(args, slots, result, v)                Src of an int list, by equality
    args_template(args, slots)                       the argument descriptions with dims left open
    arrays_plan(call, args, slots, result, staging, find, host_hash)   the staged arrays and values
    compile_plan(call, args, result, staging, meta, slots, host_hash)   (session spec, writer plan)
"""
from __future__ import annotations

from typing import Any

import torch

from epreplay.format.records import Op

# A Src naming the token tags a dispatch took (capture.tag_tokens): its key says it takes them
# (_hookx.cpp kTaggedKey), so tagged and untagged calls of a site have a plan each.
TAGS = (2, -1, -1)


def _places(args: dict[str, Any], slots: dict[str, int], result: Any):
    """(Src, object) of every argument, result element and their tuple elements, in search order."""
    for name, v in args.items():
        i = slots.get(name)
        if i is None:
            continue
        yield (0, i, -1), v
        if type(v) is tuple:
            for j, p in enumerate(v):
                yield (0, i, j), p
    if type(result) is tuple:
        for i, v in enumerate(result):
            yield (1, i, -1), v
            if type(v) is tuple:
                for j, p in enumerate(v):
                    yield (1, i, j), p


def _fields(obj: Any) -> dict[str, Any]:
    """A DeepEP V2 EPHandle's fields (an object with recv_src_metadata), else {}: their tensors and
    lists are staged too (extract_v2.py), a Src names them by attribute."""
    if not hasattr(obj, "recv_src_metadata"):
        return {}
    if hasattr(obj, "__dict__"):
        return dict(vars(obj))
    return {n: getattr(obj, n, None) for n in getattr(obj, "__slots__", ())}


def finder(args: dict[str, Any], slots: dict[str, int], result: Any) -> Any:
    """find(obj): the Src of obj among the call's arguments and results by identity (root 0
    argument slot i, root 1 result element i; j >= 0 its tuple element j), or an EPHandle's field
    (a 4th element: the attribute's name); None when it is not there."""
    def find(obj: Any) -> tuple | None:
        handles = []
        for src, v in _places(args, slots, result):
            if v is obj:
                return src
            if hasattr(v, "recv_src_metadata"):
                handles.append((src, v))
        for src, h in handles:
            for name, f in _fields(h).items():
                if f is obj:
                    return (*src, name)
        return None
    return find


def find_list(args: dict[str, Any], slots: dict[str, int], result: Any, v: list) -> tuple | None:
    """The Src of an int list equal to v: a result element, or an EPHandle's list field."""
    for src, r in _places(args, slots, result):
        if type(r) is list and src[0] == 1 and src[2] < 0 and r == v:
            return src
    for src, h in _places(args, slots, result):
        for name, f in _fields(h).items():
            if type(f) is list and f == v:
                return (*src, name)
    return None


def _v2_ints(call: Any, args: dict[str, Any], slots: dict[str, int], result: Any, v: list) -> tuple | None:
    """extract_v2's "_v2" value [E, M, do_expand, expert_alignment, handle.do_expand] as sources
    the hook reads each call: ("ints", [(kind, src or constant)]), kind "int" an int field of
    the handle, "bool" an argument or field taken as 0/1, "const" a default (the key fixes it);
    checked against this call's list."""
    if call.op == Op.DISPATCH:
        h = (1, 3, -1)
        handle = result[3] if type(result) is tuple and len(result) > 3 else None
    else:
        h = (0, slots["handle"], -1) if "handle" in slots else None
        handle = args.get("handle")
    if h is None or not hasattr(handle, "recv_src_metadata"):
        return None
    field = {n: (*h, n) for n in ("num_experts", "num_max_tokens_per_rank", "expert_alignment", "do_expand")}
    if "do_expand" not in args:
        expand = ("bool", field["do_expand"])
    elif "do_expand" in slots:
        expand = ("bool", (0, slots["do_expand"], -1))
    else:
        expand = ("const", int(bool(args["do_expand"])))
    elems = [("int", field["num_experts"]), ("int", field["num_max_tokens_per_rank"]), expand,
             ("int", field["expert_alignment"]), ("bool", field["do_expand"])]
    values = []
    for kind, src in elems:
        if kind == "const":
            values.append(src)
            continue
        obj = handle if src[:3] == h else args.get("do_expand")
        x = getattr(obj, src[3]) if len(src) > 3 else obj
        values.append(int(bool(x)) if kind == "bool" else x if type(x) is int else None)
    return ("ints", elems) if values == v else None


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
    dispatch = call.op == Op.LL_DISPATCH and type(result) is tuple and len(result) > 2
    if dispatch and name == "recv_x_fp_V":
        base, c, mode = result[0], result[1], 1
    elif call.op == Op.LL_COMBINE and name == "x_fp_V" and type(args.get("handle")) is tuple:
        base, c, mode = args.get("x"), args["handle"][1], 2
    else:
        return None
    counts = None
    if isinstance(c, torch.Tensor):
        counts = (c.tolist() if mode == 1 else (c & 0xFFFFFFFF).sum(dim=1).tolist())
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


def _src_info_valid(call: Any, result: Any, t: Any, find: Any) -> bool:
    """Whether t is a low-latency dispatch's handle[0] and result[1] its recv_count [L] (both found)."""
    return call.op == Op.LL_DISPATCH and type(result) is tuple and len(result) > 2 and \
        type(result[2]) is tuple and bool(result[2]) and result[2][0] is t and \
        isinstance(result[1], torch.Tensor) and result[1].dim() == 1 and \
        find(t) is not None and find(result[1]) is not None


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


def arrays_plan(call: Any, args: dict[str, Any], slots: dict[str, int], result: Any, st: Any, find: Any,
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
        elif name == "_src_info_LX" and not device and t.dim() == 2 and _src_info_valid(call, result, t, find):
            # a host low-latency dispatch's src_info [L, X]: only its V valid entries go in the frame
            # (the record's src_info_V, which build makes from the whole [L, X] for the Python
            # hook's frame): X = R * M slots are mostly padding, 128 KiB a call at EP32
            words, logical = words_of(t.dtype)
            arrays.append((find(t), t.dtype, 2, 1, find(result[1])))
            specs.append(("src_info_V", "a", words, logical, t.element_size(), 1))
            continue
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
            arrays.append((src, t.dtype, t.dim() + 1 if mode else t.dim(), mode, counts, 1, src2))
            specs += [(name + suffix, "a", words, logical, size, 1) for suffix, words, logical, size in hash_outputs]
            continue
        words, logical = words_of(t.dtype)
        arrays.append((src, t.dtype, t.dim() + 1 if mode else t.dim(), mode, counts))  # mode: [L, X(, H)]
        specs.append((name, tag, words, logical, t.element_size(), t.dim()))
    values, value_names = [], []
    for name, v in st.values:
        if type(v) is not list:
            return None
        src = _v2_ints(call, args, slots, result, v) if name == "_v2" else find_list(args, slots, result, v)
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
    find = finder(args, slots, result)
    after = None  # async_finish on a GPU: the gather waits for this event (on the hook's side stream)
    if device and st.after_ev is not None:
        after = find(st.after_ev)
        if after is None or after[0] != 1:
            return None
    got = arrays_plan(call, args, slots, result, st, find, host_hash)
    if got is None:
        return None
    arrays, specs, values, value_names = got
    lookup = remember = None
    if "dispatch_seq" in meta:
        h = args.get("handle")  # known by its first tensor (V1) or its recv_src_metadata (V2)
        lookup = find(h[0]) if type(h) is tuple and h else \
            find(h.recv_src_metadata) if hasattr(h, "recv_src_metadata") else None
        if lookup is None:
            return None
    if call.op == Op.DISPATCH and type(result) is tuple and len(result) > 4 and type(result[4]) is tuple:
        remember = (1, 4, 0)
    elif call.op == Op.DISPATCH and type(result) is tuple and len(result) > 3 and \
            hasattr(result[3], "recv_src_metadata"):
        remember = (1, 3, -1, "recv_src_metadata")
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


def roots(src: Any) -> set[int]:
    """The roots (0 argument, 1 result, 2 tags) an array or value source reads."""
    if type(src) is tuple and len(src) in (3, 4) and all(type(v) is int for v in src[:3]):
        return {src[0]}
    return set().union(*map(roots, src)) if type(src) in (tuple, list) else set()