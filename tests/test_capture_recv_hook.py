"""Low-latency calls whose outputs come with their recv hook (return_recv_hook=True): the
compiled hook writes their inputs at return and their outputs from the hook's wrapper (RecvHook),
with records equal to the Python hook's; a combine's received rows are taken when they are valid
(after the hook), and a call whose hook never runs does not hold the capture ring."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from epreplay.format.records import Op
from epreplay.launch import run_ranks

from capture_workload import E, T, assert_same_records, inputs, records

fast_plan = pytest.importorskip("epreplay.capture.fast_plan")
needs_hookx = pytest.mark.skipif(fast_plan.load() is None,
                                 reason="the compiled hook is not built (python -m epreplay.capture.hookx_build)")
STEPS = 5


def _ll_steps(ll, rank: int, steps: int, odd_hook: str = "") -> tuple[list[str], list[np.ndarray]]:
    """Low-latency dispatch (tagged) + combine with recv hooks each step (the dispatch's hook called twice);
    odd_hook "none": step 3's dispatch returns no hook; "int64": step 3's recv_count is int64.
    Returns the hooks' type names and each combine's output after its hook."""
    from epreplay import capture

    kinds, combined = [], []
    for step in range(steps):
        with capture.step(step):
            x, idx, w = inputs(rank, step)
            capture.tag_tokens(torch.arange(T) + 100 * step)  # taken by the dispatch (its BEGIN)
            ll.odd = odd_hook if step == 3 else ""
            recv, _, handle, _, hook = ll.low_latency_dispatch(x, idx, T, E, use_fp8=False, return_recv_hook=True)
            kinds.append(type(hook).__name__)
            if callable(hook):
                hook()
                hook()  # twice: the outputs are recorded once
            y, _, hook2 = ll.low_latency_combine(recv, idx, w, handle, return_recv_hook=True)
            kinds.append(type(hook2).__name__)
            assert torch.isnan(y.float()).all()  # valid only after the hook (the emulation's NaN)
            hook2()
            combined.append(y.clone())
    return kinds, combined


def _rank_paths(ctx, root: str, level: str, odd_hook: str) -> dict:
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.capture import hooks
    from epreplay.emulate import Buffer

    class Odd(Buffer):
        """The emulated Buffer; its low-latency dispatch returns an unusual result when told."""

        odd = ""

        def low_latency_dispatch(self, *args, **kwargs):
            out = super().low_latency_dispatch(*args, **kwargs)
            if self.odd == "none":
                out[4]()  # the receive done here, no hook for the caller
                return out[:4] + (None,)
            if self.odd == "int64":
                return (out[0], out[1].to(torch.int64)) + out[2:]
            return out

    out = {}
    for path in ("ring", "compiled"):
        capture.start(os.path.join(root, path), level=level, hot_path=path)
        hooks.install(Odd)  # (stop uninstalls)
        ll = Odd(dist.group.WORLD, low_latency_mode=True)
        kinds, combined = _ll_steps(ll, ctx.rank, STEPS, odd_hook)
        out[path] = {"facts": capture.stop(), "kinds": kinds, "combined": [c.float().numpy() for c in combined]}
    return out


@needs_hookx
@pytest.mark.parametrize("level,odd_hook", [("routing", ""), ("fingerprints", ""), ("fingerprints", "none"),
                                            ("routing", "int64")])
def test_recv_hook_calls_are_compiled_with_the_python_hooks_records(tmp_path, level, odd_hook):
    (out,) = run_ranks(_rank_paths, 1, str(tmp_path), level, odd_hook, timeout=120)
    c, r = out["compiled"], out["ring"]
    assert c["facts"]["hot_path"] == "compiled" and c["facts"]["dropped"] == 0, c["facts"]
    assert set(r["kinds"]) == {"function"} | ({"NoneType"} if odd_hook == "none" else set())  # Python's wrapper
    # the session's first call is Python's, the second dispatch teaches: compiled from step 2 on
    # (the combine from step 1), as a BEGIN frame at return and an END frame from the hook
    kinds = c["kinds"]
    expect = {2 * s + 1 for s in range(1, STEPS)} | {2 * s for s in range(2, STEPS)}
    if odd_hook == "none":
        expect.discard(6)  # no hook to wrap: the Python path records the call whole
        assert kinds[6] == "NoneType"
    assert {i for i, k in enumerate(kinds) if k == "RecvHook"} == expect, kinds
    assert c["facts"]["compiled_frames"] >= 2 * len(expect) - 2, c["facts"]
    ring, compiled = records(tmp_path / "ring")[0], records(tmp_path / "compiled")[0]
    assert len(compiled) == 2 * STEPS
    assert all("token_tag_T" in r.arrays for r in compiled if r.header.op == Op.LL_DISPATCH)
    assert_same_records(compiled, ring)
    from epreplay.format.fingerprint import fingerprint_rows

    for rec, y in zip([x for x in compiled if x.header.op == Op.LL_COMBINE], c["combined"]):
        assert rec.meta["recv_hook"] is True and "nonfinite" not in rec.meta, rec.meta
        assert rec.header.duration_ns >= 0
        if level == "fingerprints":  # the rows as the hook left them, not the NaN before it
            want = fingerprint_rows(torch.from_numpy(y).to(torch.bfloat16))
            np.testing.assert_array_equal(rec.arrays["combined_fp_T"], np.asarray(want).view(np.uint64))
    if odd_hook == "int64":  # the END not shaped as learned: written by the Python path
        assert compiled[6].arrays["recv_count_L"].dtype == np.int64


def _rank_never_called(ctx, run_dir: str, hot_path: str) -> dict:
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.emulate import Buffer

    capture.start(run_dir, level="routing", hot_path=hot_path, queue_bytes=64 << 10)
    ll = Buffer(dist.group.WORLD, low_latency_mode=True)
    buf = Buffer(dist.group.WORLD)
    x, idx, w = inputs(ctx.rank, 0)
    for _ in range(3):  # the site is learned (compiled from the third call)
        ll.low_latency_dispatch(x, idx, T, E, use_fp8=False, return_recv_hook=True)[4]()
    _, _, _, _, lost = ll.low_latency_dispatch(x, idx, T, E, use_fp8=False, return_recv_hook=True)
    for i in range(300):  # ~300 KiB of frames through a 64 KiB ring, at the writer's pace
        buf.get_dispatch_layout(idx, E)
        if i % 10 == 9:
            assert capture.flush(30.0)
    lost()  # its outputs come after the writer gave up on them: not recorded twice
    return {"facts": capture.stop(), "kind": type(lost).__name__}


@needs_hookx
@pytest.mark.parametrize("hot_path", ["ring", "compiled"])
def test_a_recv_hook_that_never_runs_does_not_hold_the_ring(tmp_path, hot_path):
    """An open call (BEGIN written, END not) holds the ring's tail; one whose hook never runs (or
    whose END was dropped) goes out with its inputs only once it is half a ring behind, so the
    job keeps its room."""
    (out,) = run_ranks(_rank_never_called, 1, str(tmp_path / "run"), hot_path, timeout=120)
    facts = out["facts"]
    assert out["kind"] == ("RecvHook" if hot_path == "compiled" else "function")
    assert facts["dropped"] == 0, facts
    recs = records(tmp_path / "run")[0]
    assert len(recs) == 4 + 300, len(recs)
    lost = [r for r in recs if r.meta.get("outputs_lost")]
    assert len(lost) == 1 and lost[0].header.op == Op.LL_DISPATCH and lost[0].header.seq == 3
    assert lost[0].header.duration_ns == -1 and "recv_count_L" not in lost[0].arrays
    assert "topk_idx_TK" in lost[0].arrays


def _rank_hung_ll(ctx, run_dir: str) -> dict:
    import time

    import torch.distributed as dist

    from epreplay import capture
    from epreplay.capture import hooks
    from epreplay.emulate import Buffer

    class Slow(Buffer):
        stall = 0.0

        def low_latency_dispatch(self, *args, **kwargs):
            if self.stall:
                time.sleep(self.stall)
            return super().low_latency_dispatch(*args, **kwargs)

    capture.start(run_dir, level="routing", hang_timeout=0.3)
    hooks.install(Slow)
    ll = Slow(dist.group.WORLD, low_latency_mode=True)
    x, idx, w = inputs(ctx.rank, 0)
    for i in range(6):  # compiled from the third call; the fourth runs past the hang timeout
        ll.stall = 1.0 if i == 3 else 0.0
        ll.low_latency_dispatch(x, idx, T, E, use_fp8=False)
    return capture.stop()


@needs_hookx
def test_a_hung_compiled_low_latency_dispatch_keeps_the_receive_buffer_parity(tmp_path):
    """The watchdog's report of a compiled call is written by Python: it takes the call's
    ll_parity from the hook, which counted the call (counting it again shifted every later
    call's receive buffer)."""
    facts = run_ranks(_rank_hung_ll, 1, str(tmp_path / "run"), timeout=120)[0]
    assert facts["hot_path"] == "compiled", facts
    recs = records(tmp_path / "run")[0]
    from epreplay.format.records import Status

    done = [r for r in recs if r.header.status == Status.OK]
    hung = [r for r in recs if r.header.status == Status.HUNG]
    assert [r.header.seq for r in done] == list(range(6)) and [r.header.seq for r in hung] == [3]
    assert [r.meta["ll_parity"] for r in done] == [0, 1, 0, 1, 0, 1]
    assert hung[0].meta["ll_parity"] == 1


def _rank_open_at_stop(ctx, run_dir: str, hot_path: str, writer: str) -> dict:
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.emulate import Buffer

    capture.start(run_dir, level="routing", hot_path=hot_path, writer=writer)
    ll = Buffer(dist.group.WORLD, low_latency_mode=True)
    x, idx, w = inputs(ctx.rank, 0)
    for _ in range(3):
        ll.low_latency_dispatch(x, idx, T, E, use_fp8=False, return_recv_hook=True)[4]()
    pending = ll.low_latency_dispatch(x, idx, T, E, use_fp8=False, return_recv_hook=True)[4]
    facts = capture.stop()  # its hook has not run
    pending()  # after the session: nothing more is written
    return facts


@needs_hookx
@pytest.mark.parametrize("hot_path,writer", [("ring", "process"), ("compiled", "process"), ("compiled", "thread")])
def test_a_call_whose_hook_has_not_run_at_stop_keeps_its_inputs(tmp_path, hot_path, writer):
    facts = run_ranks(_rank_open_at_stop, 1, str(tmp_path / "run"), hot_path, writer, timeout=120)[0]
    assert facts["dropped"] == 0, facts
    recs = records(tmp_path / "run")[0]
    assert [r.header.seq for r in recs] == [0, 1, 2, 3]
    assert [bool(r.meta.get("outputs_lost")) for r in recs] == [False, False, False, True]
    assert "topk_idx_TK" in recs[3].arrays and "recv_count_L" not in recs[3].arrays


def _rank_two_micro_batches(ctx, run_dir: str) -> dict:
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.capture import session
    from epreplay.emulate import Buffer

    capture.start(run_dir, level="routing", hot_path="compiled")
    ll = Buffer(dist.group.WORLD, low_latency_mode=True)
    x, idx, w = inputs(ctx.rank, 0)
    ll.get_dispatch_layout(idx, E)  # the session's first call (its recorder): Python's, nothing learned
    kinds = []
    for _ in range(3):  # DeepEP's overlapped decode: both micro-batches sent before either is received
        a = ll.low_latency_dispatch(x, idx, T, E, use_fp8=False, return_recv_hook=True)
        b = ll.low_latency_dispatch(x, idx, T, E, use_fp8=False, return_recv_hook=True)
        kinds += [type(a[4]).__name__, type(b[4]).__name__]
        a[4]()
        b[4]()
    blobs, _ = session.recorder()._rp.ring.plans_from(0)
    return {"facts": capture.stop(), "kinds": kinds, "plans": len(blobs)}


@needs_hookx
def test_a_site_learned_by_two_pending_calls_adds_one_plan(tmp_path):
    """Both micro-batches' first dispatches go through the Python hook and learn when their hooks
    run: the second finds the plan learned and adds no copy of it to the ring's plan area."""
    (out,) = run_ranks(_rank_two_micro_batches, 1, str(tmp_path), timeout=120)
    assert out["facts"]["dropped"] == 0, out["facts"]
    assert out["kinds"][:2] == ["function", "function"] and set(out["kinds"][2:]) == {"RecvHook"}, out["kinds"]
    assert out["plans"] == 1, out
    assert len(records(tmp_path)[0]) == 1 + 6
