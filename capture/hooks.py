"""Hooks on the DeepEP Buffer entry points: V1 `Buffer` and V2 `ElasticBuffer`, real and emulated.

    install()        patch the Buffer class(es) in place: every instance, old or new, is captured
    wrap(buffer)     capture one instance only (instance attributes shadow the class methods)
    uninstall()      restore everything install()/wrap() changed

Where the compiled hook is built (fast_plan.load(), capture/_hookx.cpp), each entry point is a
`_hookx.Hook` around the Python hook below: a call whose call site has a learned plan is written
by C++ alone; every other call runs the Python hook, which is the reference.

Arguments are bound by name with the wrapped method's own `inspect.signature`, so any V1 version
(1.0.0's shorter signatures, later keyword additions) works; handles stay opaque tuples. The
original method's result is returned as is — the single exception is low_latency_dispatch with
return_recv_hook=True, whose hook callable is wrapped so the outputs are captured when they are
valid. Exceptions propagate unchanged (recorded first). A hook never raises on its own account:
a capture failure turns capture off for the process and the call goes straight through.
"""
from __future__ import annotations

import functools
import inspect
import sys
import threading
import types
import weakref
from time import perf_counter_ns
from typing import Any, Callable

from epreplay.capture import fast_plan
from epreplay.format.records import Op

# Buffer method -> op. `dispatch` with a handle is a cached dispatch (decided per call).
OPS: dict[str, Op] = {
    "get_dispatch_layout": Op.LAYOUT,
    "dispatch": Op.DISPATCH,
    "combine": Op.COMBINE,
    "low_latency_dispatch": Op.LL_DISPATCH,
    "low_latency_combine": Op.LL_COMBINE,
}
_ORIG = "__epreplay_orig__"

_tls = threading.local()  # depth > 0 while inside a hooked call: nested calls pass through
_patched: dict[type, dict[str, tuple[Any, bool]]] = {}  # class -> name -> (original, was own)
_wrapped: "weakref.WeakSet[Any]" = weakref.WeakSet()


class Binder:
    """Arguments -> {name: value} by the wrapped function's signature (defaults filled in).

    The fast path (no *args/**kwargs in the signature) is a dict copy and two updates; anything
    unusual falls back to inspect.Signature.bind.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        try:
            self.sig: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):  # a builtin without a signature: keep positions
            self.sig = None
            self.simple, self.names, self.defaults = False, [], {}
            return
        params = list(self.sig.parameters.values())[1:]  # drop self
        P = inspect.Parameter
        self.simple = all(p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY) for p in params)
        self.names = [p.name for p in params if p.kind == P.POSITIONAL_OR_KEYWORD]
        self.defaults = {p.name: p.default for p in params if p.default is not P.empty}

    def bind(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        if self.simple and len(args) <= len(self.names):
            bound = dict(self.defaults)
            bound.update(zip(self.names, args))
            bound.update(kwargs)
            return bound
        if self.sig is None:
            bound = {f"arg{i}": v for i, v in enumerate(args)}
            bound.update(kwargs)
            return bound
        b = self.sig.bind(None, *args, **kwargs)
        b.apply_defaults()
        out = dict(b.arguments)
        out.pop(next(iter(self.sig.parameters)), None)
        for p in self.sig.parameters.values():  # **kwargs: its names are the arguments' names
            if p.kind == inspect.Parameter.VAR_KEYWORD and isinstance(out.get(p.name), dict):
                out.update(out.pop(p.name))
        return out


def signature_source(cls: type, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """The function whose signature names `fn`'s arguments: fn itself, or — when fn is a
    `(self, *args, **kwargs)` pass-through in a subclass — the same method further up the MRO."""
    if Binder(fn).simple:
        return fn
    for base in cls.__mro__[1:]:
        candidate = base.__dict__.get(name)
        if candidate is not None:
            candidate = getattr(candidate, _ORIG, candidate)
            if callable(candidate) and Binder(candidate).simple:
                return candidate
    return fn


def _make_hook(name: str, op: Op, orig: Callable[..., Any], cls: type | None = None) -> Callable[..., Any]:
    from epreplay.capture import session

    binder = Binder(signature_source(cls, name, orig) if cls is not None else orig)

    @functools.wraps(orig)
    def hooked(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(_tls, "depth", 0):
            return orig(self, *args, **kwargs)
        rec = session.recorder(self)
        if rec is None or not rec.enabled:
            return orig(self, *args, **kwargs)
        call = bound = None
        t0 = perf_counter_ns()
        try:
            bound = binder.bind(args, kwargs)
            this_op = Op.CACHED_DISPATCH if op is Op.DISPATCH and bound.get("handle") is not None else op
            call = rec.begin(this_op, self, bound)
        except Exception as exc:  # noqa: BLE001 - capture never breaks the job
            rec.disable(f"hook {name}: {type(exc).__name__}: {exc}")
        rec.hot_ns += perf_counter_ns() - t0  # the hook's own cost, reported in the facts
        _tls.depth = 1
        try:
            result = orig(self, *args, **kwargs)
        except BaseException as exc:
            _tls.depth = 0
            if call is not None:
                rec.raised(call, exc)
            raise
        _tls.depth = 0
        if call is None:
            return result
        t0 = perf_counter_ns()
        try:
            return rec.end(call, bound, result)
        except Exception as exc:  # noqa: BLE001
            rec.disable(f"hook {name} outputs: {type(exc).__name__}: {exc}")
            return result
        finally:
            rec.hot_ns += perf_counter_ns() - t0

    setattr(hooked, _ORIG, orig)
    hookx = fast_plan.load()
    if hookx is None:
        return hooked
    # The compiled hook (_hookx.cpp): calls of a learned plan never run `hooked`; the others
    # (first calls of a site, CUDA tensors, payload steps, recv hooks, errors) do.
    fast = hookx.Hook(orig, hooked, int(op))
    functools.update_wrapper(fast, orig)
    setattr(fast, _ORIG, orig)
    fast.binder = binder  # fast_plan maps argument names to slots with it
    return fast


def _make_init(orig: Callable[..., Any]) -> Callable[..., Any]:
    from epreplay.capture import session

    @functools.wraps(orig)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        orig(self, *args, **kwargs)
        try:
            rec = session.recorder(self)
            if rec is not None and rec.enabled:
                rec.buffer_state(self)  # ids follow creation order, not first use
        except Exception as exc:  # noqa: BLE001
            print(f"epreplay capture: capture off: Buffer init hook: {type(exc).__name__}: {exc}",
                  file=sys.stderr)

    setattr(init, _ORIG, orig)
    return init


def is_hooked(fn: Any) -> bool:
    return hasattr(fn, _ORIG)


def patch_class(cls: type) -> bool:
    """Hook every entry point of one Buffer class in place. Idempotent; True if it changed."""
    changed = False
    names = dict(OPS)
    table = _patched.setdefault(cls, {})
    for name in ["__init__", *names]:
        current = getattr(cls, name, None)
        if current is None or is_hooked(current):
            continue
        own = name in cls.__dict__
        table[name] = (cls.__dict__[name] if own else None, own)
        new = _make_init(current) if name == "__init__" else _make_hook(name, names[name], current, cls)
        setattr(cls, name, new)
        changed = True
    return changed


def default_classes() -> list[type]:
    """deep_ep.Buffer and (V2) deep_ep.ElasticBuffer when deep_ep is importable, and the
    emulated ones (epreplay.emulate.Buffer, epreplay.emulate.v2.ElasticBuffer). An ElasticBuffer
    has `dispatch` and `combine` only: OPS names them alike, and the recorder tells V2 calls by
    their arguments (capture/extract.py is_elastic_call)."""
    found: list[type] = []
    for module_name, names in (("deep_ep", ("Buffer", "ElasticBuffer")), ("epreplay.emulate", ("Buffer",)),
                               ("epreplay.emulate.v2", ("ElasticBuffer",))):
        try:
            module = __import__(module_name, fromlist=list(names))
        except ImportError:
            continue
        for name in names:
            cls = getattr(module, name, None)
            if isinstance(cls, type) and cls not in found:
                found.append(cls)
    return found


def install(*classes: type) -> list[type]:
    """Patch the given Buffer classes (default: `default_classes()`) in place; returns them."""
    targets = list(classes) or default_classes()
    for cls in targets:
        patch_class(cls)
    return targets


def wrap(buffer: Any) -> Any:
    """Capture one Buffer instance (its class stays untouched). Returns the same object."""
    from epreplay.capture import session

    cls = type(buffer)
    for name, op in OPS.items():
        current = getattr(cls, name, None)
        if current is None or is_hooked(current) or is_hooked(buffer.__dict__.get(name)):
            continue
        setattr(buffer, name, types.MethodType(_make_hook(name, op, current, cls), buffer))
    _wrapped.add(buffer)
    rec = session.recorder(buffer)
    if rec is not None and rec.enabled:
        rec.buffer_state(buffer)
    return buffer


def uninstall() -> None:
    """Restore every class install() patched and every instance wrap() wrapped."""
    for cls, table in list(_patched.items()):
        for name, (orig, own) in table.items():
            if own:
                setattr(cls, name, orig)
            elif name in cls.__dict__:
                delattr(cls, name)
    _patched.clear()
    for buffer in list(_wrapped):
        for name in OPS:
            if is_hooked(buffer.__dict__.get(name)):
                del buffer.__dict__[name]
    _wrapped.clear()
