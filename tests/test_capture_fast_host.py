"""The compiled hook's host shortcuts (capture/_hookx.cpp) keep its records equal to the Python
hook's: marks read through the thread's cached threading.local dict (a thread that never marked,
marks entered and left, a second thread), non-contiguous arrays (copied, not borrowed), and the
borrowed arrays leave every tensor's reference count as it was."""
from __future__ import annotations

import os
import sys
import threading

import pytest
import torch

from epreplay.launch import run_ranks

from capture_workload import E, assert_same_records, inputs, records

fast_plan = pytest.importorskip("epreplay.capture.fast_plan")
pytestmark = pytest.mark.skipif(fast_plan.load() is None,
                                reason="the compiled hook is not built (python -m epreplay.capture.hookx_build)")


def _calls(buf, idx: torch.Tensor) -> list[int]:
    """Layouts in a thread that never marked, under marks, after them, in a second marked thread
    and on a non-contiguous topk_idx; returns idx's reference counts around 5 compiled calls."""
    from epreplay import marks

    def unmarked():
        for _ in range(3):
            buf.get_dispatch_layout(idx, E)

    t = threading.Thread(target=unmarked)
    t.start()
    t.join()
    for _ in range(3):
        buf.get_dispatch_layout(idx, E)
    with marks.step(5), marks.layer(2):
        for _ in range(3):
            buf.get_dispatch_layout(idx, E)
        with marks.layer(3):
            buf.get_dispatch_layout(idx, E)
    buf.get_dispatch_layout(idx, E)

    def marked():
        with marks.step(11):
            for _ in range(2):
                buf.get_dispatch_layout(idx, E)

    t = threading.Thread(target=marked)
    t.start()
    t.join()
    strided = idx.t().contiguous().t()  # the same values, column-major
    assert not strided.is_contiguous()
    for _ in range(3):
        buf.get_dispatch_layout(strided, E)
    before = sys.getrefcount(idx)
    for _ in range(5):
        buf.get_dispatch_layout(idx, E)
    return [before, sys.getrefcount(idx)]


def _rank(ctx, root: str) -> dict:
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.emulate import Buffer

    out = {}
    _, idx, _ = inputs(ctx.rank, 0)
    for path in ("ring", "compiled"):
        capture.start(os.path.join(root, path), level="routing", hot_path=path)
        buf = Buffer(dist.group.WORLD)
        refs = _calls(buf, idx)
        out[path] = {"facts": capture.stop(), "refs": refs}
    return out


def test_compiled_marks_strides_and_references_match_the_python_hook(tmp_path):
    (out,) = run_ranks(_rank, 1, str(tmp_path), timeout=120)
    c = out["compiled"]["facts"]
    assert c["hot_path"] == "compiled" and c["compiled_frames"] >= 12 and c["dropped"] == 0, c
    assert out["compiled"]["refs"][0] == out["compiled"]["refs"][1], out["compiled"]["refs"]
    runs = {p: records(tmp_path / p)[0] for p in ("ring", "compiled")}
    assert len(runs["compiled"]) == 3 + 3 + 4 + 1 + 2 + 3 + 5
    assert_same_records(runs["compiled"], runs["ring"])
    marked = [(r.header.step, r.header.layer) for r in runs["compiled"][6:13]]
    assert marked[:4] == [(5, 2)] * 3 + [(5, 3)], marked
    assert [st for st, _ in marked[5:]] == [11, 11], marked  # layers: auto, per layout
