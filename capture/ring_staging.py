"""What a hooked call stages on the ring path: references to its tensors and values, collected
by extract.stage_inputs/stage_outputs, written by ring_frames.write_call (host tensors) or
gathered by device_stage / the compiled hook's launch (CUDA tensors, fingerprinted rows)."""
from __future__ import annotations

from typing import Any


class RingStaging:
    """extract.stage_inputs/stage_outputs' staging interface: collects (name, tensor, tag)
    references; ring_frames.write_call copies host tensors into the frame, device_stage gathers
    CUDA tensors (one launch) into the device ring."""

    __slots__ = ("arrays", "values", "dev", "after_ev")
    cuda = False

    def __init__(self) -> None:
        self.arrays: list[tuple[str, Any, str]] = []
        self.values: list[tuple[str, Any]] = []
        self.dev: list[tuple[str, Any, str]] = []  # CUDA tensors, and ("hash") rows to fingerprint
        self.after_ev: Any = None

    def keep(self, name: str, t: Any) -> None:
        if t is not None:
            (self.dev if t.is_cuda else self.arrays).append((name, t, "a"))

    snapshot = keep  # the frame (or the gather, in stream order) copies now: a snapshot

    def rows_fp(self, name: str, x: Any) -> None:
        """Rows to fingerprint: host rows' bytes go in the frame (the writer hashes them); CUDA
        rows are hashed on the device where the gather runs (device_stage.py)."""
        if x is None:
            return
        first = x[0] if isinstance(x, (tuple, list)) else x
        if first.is_cuda:
            self.dev.append((name, tuple(x) if isinstance(x, list) else x, "hash"))
            return
        if isinstance(x, (tuple, list)):
            self.arrays.append((name, x[0], "fp0"))
            self.arrays.append((name, x[1], "fp1"))
        else:
            self.arrays.append((name, x, "fp"))

    def rows_fp_valid(self, name: str, rows: Any) -> None:
        """A low-latency buffer's valid rows (extract.ValidRows) to fingerprint: on a GPU hashed
        where the gather runs (device_stage.py; the compiled hook's launch); elsewhere now."""
        first = rows.x[0] if isinstance(rows.x, (tuple, list)) else rows.x
        if first.is_cuda and rows.counts.is_cuda:
            x = tuple(rows.x) if isinstance(rows.x, list) else rows.x
            self.dev.append((name, rows._replace(x=x), "hash"))
            return
        from epreplay.format.fingerprint_gpu import fingerprint_rows_fast

        fp_LX, marks = fingerprint_rows_fast(rows.x, valid_counts_L=rows.counts_L(), with_finite="raw")
        self.keep(name, fp_LX)
        self.keep(name + ":nonfinite", marks)

    def value(self, name: str, v: Any) -> None:
        self.values.append((name, v))

    def after(self, event: Any) -> None:
        """Outputs from DeepEP's comm stream (async_finish): the gather waits for this event."""
        if event is not None and hasattr(event, "current_stream_wait"):
            self.after_ev = event

    def seal(self) -> None:
        pass
