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
`learn` finds every staged tensor among the call's arguments and results by identity
(plan_compile.py); when all
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

from epreplay.capture.plan_compile import RECV_HOOK_AT, arrays_plan, compile_plan, finder, roots

NONE = -(1 << 63)  # None in the shared int64 arrays (recorder._attr)
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


class RecvLearn:
    """The first step of learning a call whose outputs come with its recv hook: the BEGIN part
    (the inputs' plan, made when the call returned) and the pending key it is for."""

    __slots__ = ("spec", "plan", "key")

    def __init__(self, spec: list, plan: tuple, key: bytes) -> None:
        self.spec, self.plan, self.key = spec, plan, key


def _pending_plan(fs: FastSession, call: Any, args: dict[str, Any], result: Any, st: Any,
                  meta: dict[str, Any]) -> tuple[tuple | None, bytes] | None:
    """(compile_plan's answer for the call the compiled hook asked a plan for, or None where its
    key can never be planned; the key), or None where nothing was asked or this one call is
    unusual (an error: the next call may teach)."""
    pending = fs.hookx.pending()
    if pending is None or call.error is not None or call.status:
        return None
    hook, nargs, kwnames, tagged, key = pending
    if tagged != (call.tags is not None):  # tags pending at a call that leaves them (a cached
        return None, key                    # dispatch): that key stays Python's, which leaves them
    slots = _slots(getattr(hook, "binder", None), nargs, kwnames)
    got = compile_plan(call, args, result, st, meta, slots, fs.host_hash) if slots is not None else None
    return got, key


def learn_begin(fs: FastSession | None, call: Any, args: dict[str, Any], result: Any, st: Any,
                meta: dict[str, Any]) -> RecvLearn | None:
    """A call with a recv hook returned and its BEGIN frame is written: the inputs' plan, kept
    until the hook ran (learn_end). None where the key cannot be planned (the session then
    remembers that) or nothing was asked."""
    asked = _pending_plan(fs, call, args, result, st, meta) if fs is not None else None
    if asked is None:
        return None
    got, key = asked
    if got is None or got[0][10] is not None:  # (async_finish excludes a recv hook)
        fs.session.learn(None)
        return None
    return RecvLearn(got[0], got[1], key)


def learn_end(fs: FastSession | None, pend: RecvLearn | None, call: Any, args: dict[str, Any],
              result: Any, st: Any, added: Any) -> None:
    """The recv hook ran and the END frame is written: with the outputs' part, the call's plan
    (its compiled calls write a BEGIN frame at return and an END frame from the hook's wrapper,
    which holds the result only: every output must come from it)."""
    if fs is None or pend is None:
        return
    find = finder({}, {}, result)
    got = arrays_plan(call, {}, {}, result, st, find, fs.host_hash)
    hook_at = RECV_HOOK_AT.get(call.op)
    device = bool(st.dev)
    if got is None or added or hook_at is None or st.after_ev is not None or \
            (device and st.arrays) or not (roots(got[0]) | roots(got[2])) <= {1}:
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
    asked = _pending_plan(fs, call, args, result, st, meta)
    if asked is None:
        return
    got = asked[0]
    if got is None:
        fs.session.learn(None)
        return
    _learn(fs, *got)


def _learn(fs: FastSession, spec: list, plan: tuple, key: bytes | None = None) -> None:
    """Hand a compiled plan to the session (and to the writer, through the ring's plan area) for
    the pending key, or for `key` (a recv hook's call, learned after its key stopped pending)."""
    rest = (key,) if key is not None else ()
    if key is not None and fs.session.knows(key):
        return  # another call of the site learned it first: one copy in the plan area
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
