"""The compiled hook (capture/_hookx.cpp, fast_plan.py): the records it writes equal the Python
hook's and the courier path's for the same calls, at every level, and the calls it hands back to
Python (token tags, an exception, a hang, a payload step) are recorded the same way too."""
from __future__ import annotations

import os
import re
import time

import numpy as np
import pytest
import torch

from epreplay.launch import run_ranks
from epreplay.records import Kind, Op, Status
from epreplay.run import RunDir
from epreplay.shard import open_shard

E, K, H, T = 8, 3, 128, 24
STEPS = 6

fast_plan = pytest.importorskip("epreplay.capture.fast_plan")
pytestmark = pytest.mark.skipif(fast_plan.load() is None,
                                reason="the compiled hook is not built (python -m epreplay.capture.hookx_build)")


def _inputs(rank: int, step: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(100 * rank + step)
    idx = torch.topk(torch.rand(T, E, generator=g), K, dim=1).indices.to(torch.int64)
    idx[torch.rand(T, K, generator=g) < 0.1] = -1
    x, w = torch.randn(T, H, generator=g).to(torch.bfloat16), torch.rand(T, K, generator=g)
    return x.to(device), idx.to(device), w.to(device)


def _workload(buf, ll, rank: int, device: str = "cpu") -> None:
    """STEPS steps alternating two call shapes (BF16 / FP8 with async_finish, LL BF16 / FP8,
    the last with the recv hook), so every call site recurs and runs compiled from its second call;
    token tags on one dispatch of a learned site; a dispatch that raises."""
    from epreplay import capture
    from epreplay.epbench import per_token_cast_to_fp8

    for step in range(STEPS):
        odd = step % 2
        with capture.step(step):
            x, idx, w = _inputs(rank, step, device)
            n_rank, n_rdma, n_exp, in_rank, _ = buf.get_dispatch_layout(idx, E)
            if step == 4:  # a learned site: this one call goes through Python (tags)
                capture.tag_tokens(torch.arange(T) + 1000 * rank)
            xs = per_token_cast_to_fp8(x) if odd else x
            recv_x, _, recv_w, _, handle, event = buf.dispatch(
                xs, num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma, is_token_in_rank=in_rank,
                num_tokens_per_expert=n_exp, topk_idx=idx, topk_weights=w, async_finish=bool(odd))
            if odd:
                event.current_stream_wait()
            buf.dispatch(xs, handle=handle)  # cached
            y = recv_x if not isinstance(recv_x, tuple) else x[:0].new_zeros(recv_x[0].shape)
            buf.combine(y, handle, topk_weights=recv_w)
            hook = step == 5  # FP8 without the hook at steps 1 and 3: compiled at 3
            recv, count, h, _, got_hook = ll.low_latency_dispatch(x, idx, T, E, use_fp8=bool(odd),
                                                                  return_recv_hook=hook)
            if hook:
                got_hook()
            z = recv if not isinstance(recv, tuple) else torch.zeros(recv[0].shape, dtype=torch.bfloat16,
                                                                     device=device)
            ll.low_latency_combine(z, idx, w, h)
    try:
        buf.dispatch(x, topk_idx=idx[:, :1].contiguous(), topk_weights=w)  # wrong shapes: raises
    except Exception:  # noqa: BLE001
        pass


def _rank_paths(ctx, root: str, level: str) -> dict:
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.emulate import Buffer

    facts = {}
    for path in ("courier", "ring", "compiled"):
        capture.start(os.path.join(root, path), level=level, hot_path=path)
        buf = Buffer(dist.group.WORLD)
        ll = Buffer(dist.group.WORLD, low_latency_mode=True)
        _workload(buf, ll, ctx.rank, ctx.device)
        facts[path] = capture.stop()
    return facts


def _records(run_dir) -> dict[int, list]:
    out = {}
    for path in RunDir.open(run_dir).shard_paths():
        with open_shard(path) as scan:
            assert scan.complete, scan.problem
            out[scan.info.rank] = list(scan.records(kinds=(Kind.CALL,)))
    return out


def _assert_same_records(a: list, b: list) -> None:
    assert [r.header.op for r in a] == [r.header.op for r in b]
    for x, y in zip(a, b):
        hx, hy = x.header, y.header
        assert (hx.kind, hx.op, hx.level, hx.status, hx.buffer, hx.seq, hx.step, hx.layer, hx.tokens) == \
               (hy.kind, hy.op, hy.level, hy.status, hy.buffer, hy.seq, hy.step, hy.layer, hy.tokens)
        if "error" in x.meta:  # the emulation names its Buffer by creation in the process
            x.meta["error"], y.meta["error"] = (re.sub(r"Buffer #\d+", "Buffer", m.meta["error"]) for m in (x, y))
        assert list(x.meta) == list(y.meta) and x.meta == y.meta, hx
        assert sorted(x.arrays) == sorted(y.arrays), hx
        for name in x.arrays:
            u, v = x.arrays[name], y.arrays[name]
            assert u.dtype == v.dtype and u.shape == v.shape, name
            np.testing.assert_array_equal(u, v, err_msg=f"{name} of {hx}")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


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
        elif device == "cuda":  # async_finish outputs and hashed rows are Python's on a GPU
            assert c["hot_path"] == "compiled"
            assert c["compiled_frames"] >= (1 if level == "fingerprints" else 10), c
        else:
            # 6 steps x 6 calls + 1: from its second appearance every plain site is compiled
            # (the LL sites with a recv hook, the tagged dispatch and the error are Python's;
            # at fingerprints the LL buffers' valid rows are gathered by the compiled hook too)
            assert c["hot_path"] == "compiled" and c["compiled_frames"] >= 20, c
            assert c["calls"] == f["ring"]["calls"] == STEPS * 6 + 1
    runs = {p: _records(tmp_path / p) for p in ("courier", "ring", "compiled")}
    for rank in range(ranks):
        assert len(runs["compiled"][rank]) == STEPS * 6 + 1
        assert any(r.header.op == Op.CACHED_DISPATCH for r in runs["compiled"][rank])
        assert runs["compiled"][rank][-1].header.status == Status.ERROR
        assert "token_tag_T" in runs["compiled"][rank][4 * 6 + 1].arrays  # step 4's dispatch
        _assert_same_records(runs["compiled"][rank], runs["ring"][rank])
        _assert_same_records(runs["compiled"][rank], runs["courier"][rank])


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
    x, idx, w = _inputs(ctx.rank, 0)
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
    recs = _records(tmp_path / "run")[0]
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
