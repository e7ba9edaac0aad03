"""The capture ring (shared memory between the job and its writer): the ring itself, records
equal to the courier path's for the same calls, drop-and-count when full, and kill -9 of the job
or of the writer losing no frame that reached the ring."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from epreplay.format.records import Kind, Op, Status
from epreplay.format.run import RunDir
from epreplay.format.shard import open_shard
from epreplay.launch import run_ranks

from capture_workload import E, T, assert_same_records, inputs, records, workload


# --- the ring alone ------------------------------------------------------------------------------
def test_ring_frames_wrap_with_padding_and_a_full_ring_refuses():
    from epreplay.capture.shm_ring import FRAME, HEADER, PAD, W_DROPPED, ShmRing

    ring = ShmRing.create(4096)
    other = ShmRing(os.dup(ring.fd))  # the writer's mapping of the same memory
    sizes = [1000, 1500, 1200]
    got = []
    for n in sizes:
        off = ring.reserve(n)
        assert off >= 0
        FRAME.pack_into(ring.mm, HEADER + off, (n + 7) & ~7, 5, 0)
        ring.mm[HEADER + off + 8:HEADER + off + 16] = n.to_bytes(8, "little")
    assert other.frames(0) == []  # nothing published yet
    ring.publish()
    frames = other.frames(0)
    assert [(k, int.from_bytes(b[:8], "little")) for _, _, k, b in frames] == [(5, n) for n in sizes]
    assert ring.reserve(1000) == -1 and ring.word(W_DROPPED) == 1  # 3712 used of 4096: full
    other.release(frames[1][1])  # the writer is done with the first two
    off = ring.reserve(1000)  # does not fit before the end: a PAD frame, then from 0
    assert off == 0
    FRAME.pack_into(ring.mm, HEADER, 1000, 6, 0)
    ring.publish()
    kinds = [k for _, _, k, _ in other.frames(frames[1][1])]
    assert kinds == [5, PAD, 6]
    got = other.frames(frames[-1][1])
    assert got[-1][0] == 4096 and got[-1][0] % ring.capacity == 0
    other.close()
    ring.close()


def test_call_frames_round_trip_every_dtype_and_pair():
    import ctypes

    from epreplay.capture.ring_frames import CALL, read_call, write_call
    from epreplay.capture.shm_ring import ShmRing

    ring = ShmRing.create(1 << 16)
    q = torch.randint(-100, 100, (4, 128)).to(torch.float8_e4m3fn)
    s = torch.rand(4, 1)
    arrays = [("a_TK", torch.arange(12).view(3, 4), "a"),
              ("w_TK", torch.rand(3, 4)[:, :2], "a"),  # not contiguous: copied contiguous
              ("x_TH", torch.randn(3, 128).to(torch.bfloat16), "fp"),
              ("p", q, "fp0"), ("p", s, "fp1"), ("empty", torch.zeros(0, 8, dtype=torch.int32), "a"),
              ("flag", torch.tensor(True), "a")]
    head = (1, 2, 3, 4, 5, 6, 7, 8, {"E": 8, "nested": {"a": [1]}}, {"x": "bfloat16[3,128]"})
    assert write_call(ring, CALL, 42, head, arrays, [("_num_recv_list", [3, 0])], ctypes.memmove)
    (pos, end, kind, body), = ring.frames(0)
    call_id, got_head, items, dev_end = read_call(body)
    assert dev_end == -1
    assert (kind, call_id, got_head) == (CALL, 42, head)
    np.testing.assert_array_equal(items["a_TK"], np.arange(12).reshape(3, 4))
    np.testing.assert_array_equal(items["w_TK"], arrays[1][1].numpy())
    tag, (words, name) = items["x_TH"]
    assert tag == "fp" and name == "bfloat16"
    np.testing.assert_array_equal(words, arrays[2][1].view(torch.uint16).numpy())
    tag, (qp, sp) = items["p"]
    assert qp[1] == "float8_e4m3fn" and np.array_equal(qp[0], q.view(torch.uint8).numpy())
    np.testing.assert_array_equal(sp, s.numpy())
    assert items["empty"].shape == (0, 8) and items["flag"].shape == () and bool(items["flag"])
    assert items["_num_recv_list"] == [3, 0]
    ring.close()


def test_c_frame_writer_writes_the_python_frames():
    """capture/_ringc.c (built by `pip install -e .` where a compiler exists) and the Python
    writer make frames that read back the same, and agree on a full ring."""
    import ctypes

    from epreplay.capture import ring_frames
    from epreplay.capture.ring_frames import CALL, read_call, write_call_py, words_of
    from epreplay.capture.shm_ring import W_DROPPED, ShmRing

    if ring_frames._ringc is None:
        pytest.skip("the C frame writer was not built (no C compiler at install)")
    t = torch.arange(24).view(4, 6)
    arrays = [("a", t, "a"), ("t", t.t(), "a"), ("b", torch.randn(3, 128).to(torch.bfloat16), "fp"),
              ("e", torch.zeros(0, 3, dtype=torch.int32), "a"), ("z", torch.tensor(False), "a")]
    for _, x, _ in arrays:
        words_of(x.dtype)  # the C writer knows dtypes Python has seen
    head = (1, 2, 3, 4, 5, 6, 7, 8, {"E": 8}, b"\x00args")
    got = []
    for write in ("c", "py"):
        ring = ShmRing.create(4096)
        fn = (lambda *a: ring_frames._ringc.write(ring.state, ring.base, ring.words_addr, ring.capacity,
                                                  *a[:5], None, ring_frames._DTYPES)) if write == "c" else \
             (lambda *a: write_call_py(ring, *a, ctypes.memmove))
        results = [fn(CALL, i, head, arrays, [("v", [1, 2])]) for i in range(4)]
        frames = [read_call(b)[:3] for _, _, k, b in ring.frames(0) if k == CALL]
        got.append((results, frames, ring.word(W_DROPPED), ring._head))
        ring.close()
    from epreplay.capture import ring_path

    class Config:  # described by its repr: keyed by the object
        pass

    values = [None, 3, 2.5, "x", True, t, (t[:1], 7), [1, 2], Config(), object()]
    assert ring_path._keys(values) == ring_path._keys_py(values)  # the C site key is Python's
    (rc, fc, dc, hc), (rp, fp, dp, hp) = got
    assert rc == rp and dc == dp and hc == hp and True in rc and False in rc  # the 4 KiB ring fills
    for (ic, hdc, itc), (ip, hdp, itp) in zip(fc, fp):
        assert ic == ip and hdc == hdp and sorted(itc) == sorted(itp)
        for name in itc:
            a, b = itc[name], itp[name]
            if isinstance(a, tuple):
                assert a[0] == b[0] and np.array_equal(a[1][0], b[1][0]) and a[1][1] == b[1][1]
            elif isinstance(a, np.ndarray):
                assert a.dtype == b.dtype and np.array_equal(a, b)
            else:
                assert a == b


# --- the same records as the courier path ---------------------------------------------------------
def _rank_paths(ctx, root: str, level: str) -> dict:
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.emulate import Buffer

    facts = {}
    for path in ("courier", "ring"):
        capture.start(os.path.join(root, path), level=level, hot_path=path)
        buf = Buffer(dist.group.WORLD)
        ll = Buffer(dist.group.WORLD, low_latency_mode=True)
        workload(buf, ll, ctx.rank, ctx.device)
        facts[path] = capture.stop()
    return facts


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
@pytest.mark.parametrize("level", ["counts", "routing", "fingerprints", "payload"])
def test_ring_records_equal_the_courier_path_at_every_level(tmp_path, level, device):
    """On a GPU: the ring's one-launch gather and bulk drain against the courier path's
    side-stream copies (GPU fingerprints on both), CUDA tensors through NCCL on one rank."""
    ranks = 2 if device == "cpu" else 1
    facts = run_ranks(_rank_paths, ranks, str(tmp_path), level, device=device, timeout=300)
    for f in facts:
        assert f["ring"]["hot_path"] == "ring" and f["courier"]["hot_path"] == "courier"
        assert f["ring"]["dropped"] == 0 and f["ring"]["disabled"] is None, f["ring"]
    ring, courier = records(tmp_path / "ring"), records(tmp_path / "courier")
    for rank in range(ranks):
        a, b = ring[rank], courier[rank]
        ops = [r.header.op for r in a]
        assert ops == [r.header.op for r in b] and len(a) == 2 * 6 + 1
        assert Op.CACHED_DISPATCH in ops and a[-1].header.status == Status.ERROR
        assert_same_records(a, b)


# --- a full ring: drop and count, never block -----------------------------------------------------
def _rank_full(ctx, run_dir: str) -> dict:
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.capture import session
    from epreplay.emulate import Buffer

    capture.start(run_dir, level="routing", queue_bytes=64 << 10)  # a 64 KiB ring
    buf = Buffer(dist.group.WORLD)
    x, idx, w = inputs(0, 0)
    buf.get_dispatch_layout(idx, E)  # the first call starts the writer
    rec = session.recorder()
    os.kill(rec._rp.proc.proc.pid, signal.SIGSTOP)  # a writer that has stopped reading
    t0 = time.perf_counter()
    for _ in range(300):
        buf.get_dispatch_layout(idx, E)
    busy = time.perf_counter() - t0
    dropped = rec.dropped_total()
    os.kill(rec._rp.proc.proc.pid, signal.SIGCONT)
    facts = capture.stop()
    return {"facts": facts, "dropped_while_stopped": dropped, "busy_s": busy}


@pytest.mark.slow
def test_a_full_ring_drops_and_counts_and_the_job_never_waits(tmp_path):
    (out,) = run_ranks(_rank_full, 1, str(tmp_path / "run"), timeout=120)
    facts = out["facts"]
    # a layout frame at T=24 is ~1 KiB: a 64 KiB ring holds a few dozen, the rest are dropped
    assert 200 < out["dropped_while_stopped"] < 300 and facts["dropped"] == out["dropped_while_stopped"]
    assert out["busy_s"] < 10  # 300 calls never waited for the stopped writer
    recs = records(tmp_path / "run")[0]
    assert len(recs) == facts["calls"] - facts["dropped"]
    seqs = [r.header.seq for r in recs]
    assert seqs == sorted(seqs) and seqs[0] == 0  # what was kept is in order
    with open_shard(RunDir.open(tmp_path / "run").shard_paths()[0]) as scan:
        events = [r.meta for r in scan.records(kinds=(Kind.EVENT,))]
    assert any(e.get("reason") == "dropped" and e["dropped"] == facts["dropped"] for e in events), (events, facts)
    assert facts["records"] == len(recs) + len(events)


# --- kill -9 of the writer: a new one resumes, nothing lost or repeated ---------------------------
def _rank_kill_writer(ctx, run_dir: str, seed: int) -> dict:
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.capture import session
    from epreplay.emulate import Buffer

    rng = random.Random(seed)
    capture.start(run_dir, level="routing")
    buf = Buffer(dist.group.WORLD)
    ll = Buffer(dist.group.WORLD, low_latency_mode=True)
    calls = 0
    kills = sorted(rng.sample(range(5, 120), 2))
    for i in range(120):
        x, idx, w = inputs(0, i % 4)
        buf.get_dispatch_layout(idx, E)
        calls += 1
        # a low-latency dispatch with its recv hook: inputs at return, outputs from the hook (the
        # compiled hook's FAST_BEGIN / FAST_END); a kill may fall between the two
        hook = ll.low_latency_dispatch(x, idx, T, E, use_fp8=False, return_recv_hook=True)[4]
        if i in kills:  # at a random moment: between frames, or while the writer builds one
            if i == kills[0]:  # or once the writer read that dispatch's BEGIN (its successor must
                assert capture.flush(10.0)  # read it again: the END comes after)
            time.sleep(rng.random() * 0.01)
            rec = session.recorder()
            pid = rec._rp.proc.proc.pid
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while rec._rp.proc.proc.pid == pid and time.monotonic() < deadline:
                time.sleep(0.01)  # the monitor starts the next writer (frames wait in the ring)
        hook()
    return {"facts": capture.stop(), "calls": calls}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_kill9_of_the_writer_loses_and_repeats_no_record(tmp_path, seed):
    (out,) = run_ranks(_rank_kill_writer, 1, str(tmp_path / "run"), seed, timeout=120)
    facts = out["facts"]
    assert facts["writer_restarts"] == 2 and facts["disabled"] is None and facts["dropped"] == 0
    from epreplay.capture import fast_plan

    # the compiled hook's frames too: a restarted writer reads their plans from the ring
    assert fast_plan.load() is None or facts["compiled_frames"] > 100, facts
    recs = records(tmp_path / "run")[0]
    for buffer in (0, 1):  # the layouts, the low-latency dispatches
        mine = [r for r in recs if r.header.buffer == buffer]
        assert [r.header.seq for r in mine] == list(range(out["calls"]))
        for r in mine:
            x, idx, w = inputs(0, r.header.seq % 4)
            np.testing.assert_array_equal(r.arrays["topk_idx_TK"], idx.numpy())
            assert buffer == 0 or ("recv_count_L" in r.arrays and r.header.duration_ns >= 0), r.meta


# --- kill -9 of the job: its writer still writes every published frame ----------------------------
JOB = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from epreplay import capture
    from epreplay.emulate import Buffer
    dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:%d" % int(sys.argv[2]))
    capture.start(sys.argv[1], level="routing")
    buf = Buffer(dist.group.WORLD)
    g = torch.Generator().manual_seed(0)
    idx = torch.topk(torch.rand(64, 8, generator=g), 3, dim=1).indices
    out = os.fdopen(1, "w", buffering=1)
    for i in range(100000):
        buf.get_dispatch_layout(idx, 8)
        print(i, flush=True)  # call i returned: its frame is published
""")


@pytest.mark.slow
def test_kill9_of_the_job_keeps_every_published_call(tmp_path):
    from epreplay.launch import free_port
    from epreplay.format.walk import wait_unlocked

    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", JOB, str(run_dir), str(free_port())],
                            stdout=subprocess.PIPE, text=True)
    target = random.Random(7).randrange(200, 600)
    last = -1
    for line in proc.stdout:
        last = int(line)
        if last >= target:
            break
    proc.kill()  # SIGKILL, mid-loop
    proc.wait()
    shard = RunDir(run_dir).shard_path(0)
    deadline = time.monotonic() + 30
    while not shard.exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # the orphaned writer may still be starting up; it drains the ring then
    assert wait_unlocked(shard, 30), "the writer process did not finish"
    with open_shard(shard) as scan:
        assert not scan.complete and scan.truncated_at is None  # unclosed, nothing damaged
        seqs = [r.header.seq for r in scan.records(kinds=(Kind.CALL,))]
    # every call that returned before the kill is there (the job may have made more by then: the
    # parent reads its lines later), with no gap
    assert seqs == list(range(len(seqs))) and len(seqs) >= last + 1, (last, len(seqs), seqs[-3:])
