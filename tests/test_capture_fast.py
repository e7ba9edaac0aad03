"""The compiled hook (capture/_hookx.cpp, fast_plan.py): the records it writes equal the Python
hook's and the courier path's for the same calls, at every level, and the calls it hands back to
Python (an exception, a hang, a payload step) are recorded the same way too."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from epreplay.format.records import Op, Status
from epreplay.launch import run_ranks

from capture_workload import E, assert_same_records, inputs, records, workload

STEPS = 6  # alternating two call shapes, so every call site recurs (capture_workload.workload)

fast_plan = pytest.importorskip("epreplay.capture.fast_plan")
pytestmark = pytest.mark.skipif(fast_plan.load() is None,
                                reason="the compiled hook is not built (python -m epreplay.capture.hookx_build)")


def _rank_paths(ctx, root: str, level: str) -> dict:
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.emulate import Buffer

    facts = {}
    for path in ("courier", "ring", "compiled"):
        capture.start(os.path.join(root, path), level=level, hot_path=path)
        buf = Buffer(dist.group.WORLD)
        ll = Buffer(dist.group.WORLD, low_latency_mode=True)
        workload(buf, ll, ctx.rank, ctx.device, steps=STEPS, tag_steps=(2, 4), hook_steps=(1, 3, 5))
        facts[path] = capture.stop()
    return facts


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def gather_kernel_builds() -> bool:
    """NVRTC and the driver are here: the compiled hook's GPU gather is its raw launch."""
    from epreplay.capture import gather_kernel

    return gather_kernel.load(torch.device("cuda", 0)) is not None


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
@pytest.mark.parametrize("level", ["counts", "routing", "fingerprints", "payload"])
def test_compiled_records_equal_the_python_hook_and_the_courier_path(tmp_path, level, device):
    """On a GPU (one rank, NCCL): CUDA arrays gathered by the compiled hook's one launch into
    the device ring, against the Python hook's gather and the courier's side-stream copies."""
    ranks = 2 if device == "cpu" else 1
    facts = run_ranks(_rank_paths, ranks, str(tmp_path), level, device=device, timeout=300)
    for f in facts:
        assert f["ring"]["hot_path"] == "ring" and f["courier"]["hot_path"] == "courier"
        c = f["compiled"]
        assert c["dropped"] == 0 and c["disabled"] is None, c
        if level == "payload":  # payload steps are Python's: no compiled session
            assert c["hot_path"] == "ring" and c["compiled_frames"] == 0
        elif device == "cuda":
            assert c["hot_path"] == "compiled"
            if gather_kernel_builds():  # one raw launch a call, not at::cat_out; rows hashed by it;
                # async_finish outputs too (on the side stream, after DeepEP's event): as on the host
                assert c["compiled_frames"] >= 20, c
                assert c["gathers"][1] == 0 and (level == "counts" or c["gathers"][0] >= 10), c
            else:  # at::cat_out: fingerprinted rows stay with the Python hook
                assert c["compiled_frames"] >= (1 if level == "fingerprints" else 10), c
        else:
            # 6 steps x 6 calls + 1: from its second appearance every plain site is compiled
            # (the first tagged dispatch and the error are Python's; the LL sites with recv hooks
            # are compiled from step 3: their inputs at return, their outputs from the hook;
            # at fingerprints the LL buffers' valid rows are gathered by the compiled hook too)
            assert c["hot_path"] == "compiled" and c["compiled_frames"] >= 20, c
            assert c["calls"] == f["ring"]["calls"] == STEPS * 6 + 1
    runs = {p: records(tmp_path / p) for p in ("courier", "ring", "compiled")}
    for rank in range(ranks):
        assert len(runs["compiled"][rank]) == STEPS * 6 + 1
        assert any(r.header.op == Op.CACHED_DISPATCH for r in runs["compiled"][rank])
        assert runs["compiled"][rank][-1].header.status == Status.ERROR
        # steps 2 and 4 tag their dispatch (the same key: the second one is compiled)
        assert all("token_tag_T" in runs["compiled"][rank][s * 6 + 1].arrays for s in (2, 4))
        assert_same_records(runs["compiled"][rank], runs["ring"][rank])
        assert_same_records(runs["compiled"][rank], runs["courier"][rank])


# --- the calls a plan hands back to Python ----------------------------------------------------------
def _rank_handed_back(ctx, run_dir: str) -> dict:
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.capture import hooks
    from epreplay.emulate import Buffer

    class Flaky(Buffer):
        """The emulated Buffer, with a layout that raises or stalls when told (same shapes)."""

        fail = stall = 0.0

        def get_dispatch_layout(self, topk_idx, num_experts, *args, **kwargs):
            if self.fail:
                raise RuntimeError("injected layout failure")
            if self.stall:
                time.sleep(self.stall)
            return super().get_dispatch_layout(topk_idx, num_experts, *args, **kwargs)

    capture.start(run_dir, level="routing", hang_timeout=0.3)
    hooks.install(Flaky)
    buf = Flaky(dist.group.WORLD)
    x, idx, w = inputs(ctx.rank, 0)
    for _ in range(3):  # the site is learned: compiled from the second call
        buf.get_dispatch_layout(idx, E)
    buf.fail = 1
    try:
        buf.get_dispatch_layout(idx, E)
        raised = False
    except RuntimeError as exc:
        raised = str(exc) == "injected layout failure"  # the job sees its own exception
    buf.fail, buf.stall = 0, 1.0
    buf.get_dispatch_layout(idx, E)  # runs past the hang timeout: the watchdog reports it
    buf.stall = 0
    buf.get_dispatch_layout(idx, E)
    facts = capture.stop()
    hooks.uninstall()
    return {"facts": facts, "raised": raised, "idx": idx.numpy()}


@pytest.mark.slow
def test_an_exception_and_a_hang_on_a_compiled_site_are_recorded(tmp_path):
    (out,) = run_ranks(_rank_handed_back, 1, str(tmp_path / "run"), timeout=120)
    facts = out["facts"]
    assert out["raised"] and facts["hot_path"] == "compiled" and facts["compiled_frames"] >= 3, facts
    recs = records(tmp_path / "run")[0]
    statuses = [r.header.status for r in recs]
    assert statuses == [Status.OK] * 3 + [Status.ERROR, Status.HUNG, Status.OK, Status.OK], statuses
    seqs = [r.header.seq for r in recs]
    assert seqs == [0, 1, 2, 3, 4, 4, 5]  # the hung call's own record follows its HUNG report
    assert "injected layout failure" in recs[3].meta["error"]
    for r in recs:
        np.testing.assert_array_equal(r.arrays["topk_idx_TK"], out["idx"])
    assert recs[5].header.duration_ns >= 0.9e9  # the stalled call, timed by the compiled hook


def test_the_compiled_hook_passes_nested_calls_and_keeps_the_signature():
    """A hooked method is a descriptor that binds like a function, keeps the original's name,
    docstring and signature, and is unwrapped by uninstall."""
    import inspect

    from epreplay.capture import hooks
    from epreplay.emulate import Buffer

    orig = Buffer.__dict__["dispatch"]
    hooks.install(Buffer)
    try:
        hooked = Buffer.__dict__["dispatch"]
        assert type(hooked).__name__ == "Hook" and hooks.is_hooked(hooked)
        assert hooked.__name__ == "dispatch" and hooked.__doc__ == orig.__doc__
        assert inspect.signature(Buffer.dispatch) == inspect.signature(orig)
        assert list(inspect.signature(Buffer.__new__(Buffer).dispatch).parameters)[0] == "x"
    finally:
        hooks.uninstall()
    assert Buffer.__dict__["dispatch"] is orig
