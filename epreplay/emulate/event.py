"""DeepEP's EventHandle / EventOverlap for the emulated Buffer.

The emulation runs every call synchronously on the caller's stream, so an event is already
complete when it is returned; on a GPU it is still a real CUDA event recorded on the current
stream, so `current_stream_wait()` orders streams exactly as DeepEP's does. On the CPU it is a no-op.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch


class EventHandle:
    """A CUDA event recorded on the current stream (None on CPU-only processes)."""

    def __init__(self) -> None:
        self.event = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream())

    def current_stream_wait(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)


class EventOverlap:
    """DeepEP's wrapper: `current_stream_wait()` or `with event:` to wait for the call's event.

    Args:
        event: an EventHandle, or None (a synchronous call: nothing to wait for).
        extra_tensors: tensors kept alive until the wait (DeepEP's record_stream substitute).
    """

    def __init__(self, event: Optional[EventHandle] = None,
                 extra_tensors: Optional[Tuple[torch.Tensor, ...]] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors
        self.hook_after_wait: Optional[Callable[[], Any]] = None

    def current_stream_wait(self, release_handle: bool = False) -> None:
        assert self.event is not None
        self.event.current_stream_wait()
        if self.hook_after_wait is not None:
            hook, self.hook_after_wait = self.hook_after_wait, None
            hook()
        if release_handle:
            self.event = None

    def register_hook_after_wait(self, hook_after_wait: Callable[[], Any]) -> None:
        assert self.hook_after_wait is None, "A hook is already registered on this `EventOverlap`"
        self.hook_after_wait = hook_after_wait

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        if self.event is not None:
            self.event.current_stream_wait()


def make_event(async_finish: bool, previous_event: Optional[EventOverlap] = None,
               extra: Optional[Tuple[torch.Tensor, ...]] = None) -> EventOverlap:
    """The event a call returns: a real one with async_finish, else an empty EventOverlap."""
    if previous_event is not None and getattr(previous_event, "event", None) is not None:
        previous_event.event.current_stream_wait()  # the "comm stream" waits on previous_event
    return EventOverlap(EventHandle(), extra) if async_finish else EventOverlap(None)
