"""Step, layer and token-tag annotations a framework (or the demo) puts around its MoE calls.

DeepEP calls carry neither step nor layer. Code that knows them says so here; the recorder in
epreplay.capture reads the current values when a hooked call starts. This module lives in the
core and imports nothing, so models and the demo can annotate without importing capture
(dependency direction: capture -> core). With no recorder running every call is a cheap no-op.

    from epreplay import marks
    with marks.step(7):
        for i, block in enumerate(blocks):
            with marks.layer(i):
                block(x)
    marks.tag_tokens(request_ids_T)   # tags the rows of this rank's next dispatch
    marks.mark_step()                 # frameworks that have no natural `with` scope

When nothing is annotated the recorder falls back to counting (see capture's --layers-per-step).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Iterator


@dataclass
class _State:
    step: int | None = None  # explicit step, or None to let the recorder count
    layer: int | None = None
    steps_marked: int = 0  # mark_step() calls so far
    pending_tags: Any = None  # [T] int64 tensor/array for the next dispatch on this thread


_local = threading.local()


def _state() -> _State:
    st = getattr(_local, "state", None)
    if st is None:
        st = _local.state = _State()
    return st


@contextlib.contextmanager
def step(index: int | None = None) -> Iterator[int]:
    """Attribute the calls inside to model step `index` (default: the next step number)."""
    st = _state()
    prev = st.step
    entered = st.steps_marked if index is None else int(index)
    st.step = entered
    try:
        yield entered
    finally:
        st.step = prev
        st.steps_marked = entered + 1  # an unnumbered step() that follows gets the next number


@contextlib.contextmanager
def layer(index: int) -> Iterator[int]:
    """Attribute the calls inside to MoE layer `index`."""
    st = _state()
    prev = st.layer
    st.layer = int(index)
    try:
        yield st.layer
    finally:
        st.layer = prev


def mark_step() -> int:
    """Close the current step: later calls belong to the next one. Returns the new step number."""
    st = _state()
    st.steps_marked += 1
    st.step = st.steps_marked
    st.layer = None
    return st.step


def tag_tokens(ids: Any) -> None:
    """Tag the T rows of this thread's next dispatch (normal or low-latency) with ids.

    Args:
        ids: [T] integer tensor or array: a stable id per token (request id << 20 | position, ...),
            so that `epreplay diff --match tag` can pair the same token across two runs whose
            batches differ in order.
    """
    _state().pending_tags = ids


def current() -> tuple[int | None, int | None]:
    """(step, layer) as annotated now; None where the framework said nothing."""
    st = _state()
    return st.step, st.layer


def take_tags() -> Any:
    """The pending token tags (consumed: they apply to one dispatch only), or None."""
    st = _state()
    tags, st.pending_tags = st.pending_tags, None
    return tags
