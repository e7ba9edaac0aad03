"""Capture through the library API on real gloo ranks: the routing a shard holds is the routing
that was sent, on every rank; levels, lineage, attribution, exceptions and wrap/uninstall."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from epreplay.format.records import Kind, Level, Op, Status
from epreplay.format.run import RunDir
from epreplay.format.shard import open_shard
from epreplay.launch import run_ranks

E, K, H, T = 8, 3, 128, 24


def _inputs(rank: int, step: int, layer: int):
    g = torch.Generator().manual_seed(1000 * rank + 10 * step + layer)
    scores = torch.rand(T, E, generator=g)
    scores[:, rank % E] += 0.5  # some skew: each rank prefers one expert
    idx = torch.topk(scores, K, dim=1).indices
    idx[torch.rand(T, K, generator=g) < 0.1] = -1  # some empty slots, as DeepEP allows
    w = torch.rand(T, K, generator=g)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    return x, idx.to(torch.int64), w


def moe_steps(buf, rank: int, *, steps: int, layers: int, ll_buf=None) -> list[torch.Tensor]:
    """A DeepEP-style client loop: layout -> dispatch -> expert (x2) -> combine per layer (prefill),
    or low_latency_dispatch -> low_latency_combine on `ll_buf` when given (decode)."""
    outs = []
    for s in range(steps):
        for layer in range(layers):
            x, idx, w = _inputs(rank, s, layer)
            if ll_buf is not None:  # decode: the low-latency kernels
                recv, count, h, _, _ = ll_buf.low_latency_dispatch(x, idx, T, E, use_fp8=False)
                z, _, _ = ll_buf.low_latency_combine(recv, idx, w, h)
                outs.append(z)
                continue
            n_rank, n_rdma, n_exp, in_rank, _ = buf.get_dispatch_layout(idx, E)
            recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
                x, num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma,
                is_token_in_rank=in_rank, num_tokens_per_expert=n_exp, topk_idx=idx, topk_weights=w)
            y, _, _ = buf.combine((recv_x.float() * 2).to(torch.bfloat16), handle)
            outs.append(y)
    return outs


def _rank_routing(ctx, run_dir: str):
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.emulate import Buffer

    capture.start(run_dir, level="routing", layers_per_step=2)
    buf = Buffer(dist.group.WORLD)
    ll = Buffer(dist.group.WORLD, low_latency_mode=True)
    moe_steps(buf, ctx.rank, steps=2, layers=2)  # prefill: steps 0-1
    moe_steps(buf, ctx.rank, steps=2, layers=2, ll_buf=ll)  # decode: steps 2-3
    return capture.stop()


def _load(run_dir) -> dict[int, list]:
    run = RunDir.open(run_dir)
    out = {}
    for path in run.shard_paths():
        with open_shard(path) as scan:
            assert scan.complete, scan.problem
            out[scan.info.rank] = list(scan.records(kinds=(Kind.CALL, Kind.EVENT)))
    return out


@pytest.mark.slow
def test_recorded_routing_reproduces_counts_on_every_rank(tmp_path):
    R = 4
    L = E // R
    facts = run_ranks(_rank_routing, R, str(tmp_path / "run"), timeout=120)
    assert all(f["dropped"] == 0 and f["disabled"] is None for f in facts)
    recs = _load(tmp_path / "run")
    assert sorted(recs) == list(range(R))
    calls = {r: {(rec.header.buffer, rec.header.seq): rec for rec in recs[r] if rec.header.kind == Kind.CALL}
             for r in recs}
    keys = set(calls[0])
    assert all(set(calls[r]) == keys for r in calls)  # (buffer, seq) joins one call across ranks
    dispatches = sorted(k for k, rec in calls[0].items() if rec.header.op == Op.DISPATCH)
    assert len(dispatches) == 4
    for key in dispatches:
        sent_R, per_exp_E = {}, {}
        for r in range(R):
            rec = calls[r][key]
            idx = rec.arrays["topk_idx_TK"]
            assert idx.shape == (T, K) and rec.header.tokens == T
            owner = np.where(idx >= 0, idx // L, -1)
            sent_R[r] = np.array([(owner == d).any(axis=1).sum() for d in range(R)])
            per_exp_E[r] = np.bincount(idx[idx >= 0], minlength=E)
            np.testing.assert_array_equal(rec.arrays["num_tokens_per_rank_R"], sent_R[r])
            np.testing.assert_array_equal(rec.arrays["num_tokens_per_expert_E"], per_exp_E[r])
            layout = calls[r][(key[0], key[1] - 1)]  # the layout call just before
            assert layout.header.op == Op.LAYOUT
            np.testing.assert_array_equal(layout.arrays["num_tokens_per_rank_R"], sent_R[r])
            np.testing.assert_array_equal(layout.arrays["topk_idx_TK"], idx)
        for me in range(R):
            rec = calls[me][key]
            want_R = np.array([sent_R[s][me] for s in range(R)])
            np.testing.assert_array_equal(rec.arrays["recv_tokens_per_rank_R"], want_R)
            want_L = sum(per_exp_E[s] for s in range(R))[me * L:(me + 1) * L]
            np.testing.assert_array_equal(rec.arrays["recv_tokens_per_expert_L"], want_L)
            assert rec.arrays["recv_src_idx_N"].shape == (want_R.sum(),)
    # low-latency: recv_count per local expert == slots routed there from every rank
    ll_keys = sorted(k for k, rec in calls[0].items() if rec.header.op == Op.LL_DISPATCH)
    assert len(ll_keys) == 4
    for key in ll_keys:
        idx_all = np.concatenate([calls[r][key].arrays["topk_idx_TK"] for r in range(R)])
        for me in range(R):
            rec = calls[me][key]
            want = np.array([(idx_all == me * L + e).sum() for e in range(L)])
            np.testing.assert_array_equal(rec.arrays["recv_count_L"], want)
            assert rec.arrays["src_info_V"].shape == (want.sum(),)
            np.testing.assert_array_equal((rec.arrays["layout_range_LR"] & 0xFFFFFFFF).sum(axis=1), want)
    # lineage and attribution
    for r in range(R):
        ordered = sorted(calls[r].values(), key=lambda rec: (rec.header.buffer, rec.header.seq))
        last_dispatch = {}
        for rec in ordered:
            h = rec.header
            if h.op in (Op.DISPATCH, Op.LL_DISPATCH):
                last_dispatch[h.buffer] = h.seq
            if h.op in (Op.COMBINE, Op.LL_COMBINE):
                assert rec.meta["dispatch_seq"] == last_dispatch[h.buffer]
        for buffer, first in ((0, 0), (1, 2)):
            steps_layers = sorted({(rec.header.step, rec.header.layer) for rec in ordered
                                   if rec.header.buffer == buffer})
            assert steps_layers == [(first, 0), (first, 1), (first + 1, 0), (first + 1, 1)]


def _rank_levels(ctx, run_dir: str, level: str):
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.emulate import Buffer
    from epreplay.format.fingerprint import fingerprint_rows

    planted = RuntimeError("DeepEP error: timeout (dispatch CPU)")

    class Failing(Buffer):
        fail = False

        def dispatch(self, *args, **kwargs):
            if self.fail:
                raise planted
            return super().dispatch(*args, **kwargs)

    capture.start(run_dir, level=level, payload_every=2, layers_per_step=1)
    capture.install(Failing)
    buf = Failing(dist.group.WORLD)
    moe_steps(buf, ctx.rank, steps=3, layers=1)
    # a planted exception inside dispatch: the caller sees the very same exception object
    x, idx, w = _inputs(ctx.rank, 0, 0)
    buf.fail = True
    try:
        buf.dispatch(x, topk_idx=idx, topk_weights=w)
        caught = None
    except RuntimeError as exc:
        caught = exc
    # low-latency at fingerprints+: hashes of the valid rows only, expert-major
    ll = Buffer(dist.group.WORLD, low_latency_mode=True)
    recv, count, handle, _, _ = ll.low_latency_dispatch(x, idx, T, E, use_fp8=False)
    valid = torch.cat([recv[e, :c] for e, c in enumerate(count.tolist())])
    ll.low_latency_combine(recv, idx, w, handle)
    facts = capture.stop()
    fps = [fingerprint_rows(_inputs(ctx.rank, s, 0)[0]).numpy().view(np.uint64) for s in range(3)]
    fps.append(fingerprint_rows(valid).numpy().view(np.uint64))
    return facts, caught is planted and str(caught), fps


@pytest.mark.slow
def test_levels_payload_every_and_exceptions(tmp_path):
    for level in ("counts", "payload"):
        run_dir = tmp_path / level
        (facts, raised, fps), = run_ranks(_rank_levels, 1, str(run_dir), level, timeout=90)
        recs = [r for r in _load(run_dir)[0] if r.header.kind == Kind.CALL]
        dispatch = [r for r in recs if r.header.op == Op.DISPATCH and r.header.status == Status.OK]
        assert [r.header.step for r in dispatch] == [0, 1, 2]
        if level == "counts":
            assert all("topk_idx_TK" not in r.arrays for r in recs)
            assert "recv_tokens_per_expert_L" in dispatch[0].arrays
        else:
            assert [("x_TH" in r.arrays) for r in dispatch] == [True, False, True]
            assert [r.header.level for r in dispatch] == [Level.PAYLOAD, Level.FINGERPRINTS, Level.PAYLOAD]
            for s, r in enumerate(dispatch):
                np.testing.assert_array_equal(r.arrays["x_fp_T"], fps[s])
            ll_d, ll_c = [next(r for r in recs if r.header.op == op) for op in (Op.LL_DISPATCH, Op.LL_COMBINE)]
            np.testing.assert_array_equal(ll_d.arrays["recv_x_fp_V"], fps[3])
            np.testing.assert_array_equal(ll_c.arrays["x_fp_V"], fps[3])  # combine got those rows back
            assert ll_c.arrays["x_VH"].shape == (len(fps[3]), H)
        assert raised == "DeepEP error: timeout (dispatch CPU)"
        err = [r for r in recs if r.header.status == Status.ERROR]
        assert len(err) == 1 and err[0].meta["error"] == "RuntimeError: " + raised
        assert err[0].header.op == Op.DISPATCH and err[0].header.duration_ns >= 0


def test_wrap_and_uninstall_restore_the_class():
    from epreplay.capture import hooks
    from epreplay.emulate import Buffer

    before = {name: getattr(Buffer, name) for name in hooks.OPS}
    hooks.install(Buffer)
    assert all(hooks.is_hooked(getattr(Buffer, name)) for name in hooks.OPS)
    hooks.install(Buffer)  # idempotent: one layer of hooks
    assert all(not hooks.is_hooked(getattr(getattr(Buffer, n), "__epreplay_orig__")) for n in hooks.OPS)
    hooks.uninstall()
    assert {name: getattr(Buffer, name) for name in hooks.OPS} == before


def test_snapshots_are_shared_until_the_caller_writes():
    """The copy a layout takes of topk_idx serves its dispatch too, unless the caller wrote to it
    in between (then the dispatch gets its own copy, with the new values)."""
    from epreplay.capture.stage import Staging

    idx = torch.arange(12).view(6, 2)
    layout, dispatch = Staging(), Staging()
    layout.snapshot("topk_idx_TK", idx)
    dispatch.snapshot("topk_idx_TK", idx)
    assert dispatch.items["topk_idx_TK"] is layout.items["topk_idx_TK"] and dispatch.nbytes == 0
    idx[0, 0] = 99  # the caller reuses its buffer
    again = Staging()
    again.snapshot("topk_idx_TK", idx)
    assert int(again.array("topk_idx_TK")[0, 0]) == 99
    assert int(layout.array("topk_idx_TK")[0, 0]) == 0  # what the earlier call really got


@pytest.mark.parametrize("fp8", [False, True])
def test_low_latency_buffer_fingerprints_cover_valid_rows_only(fp8: bool):
    """The GPU staging of a low-latency receive buffer [L, X, H] hashes rows [0, count[e]) of
    each expert only (counts read on the device) and the record holds those rows' fingerprints,
    expert-major; the garbage past the counts (NaN here) is neither hashed nor flagged."""
    from epreplay.capture.build import build
    from epreplay.capture.extract import Call, _valid_rows_fp
    from epreplay.capture.stage import Staging, Timer
    from epreplay.format.fingerprint import fingerprint_rows
    from epreplay.format.records import FINGERPRINT_VERSION

    L, X = 3, 8
    g = torch.Generator().manual_seed(5)
    recv = torch.randn(L, X, H, generator=g)
    counts = torch.tensor([5, 0, 8], dtype=torch.int32)
    recv[0, 5:] = float("nan")
    if fp8:
        from epreplay.format.fp8 import cast_fp8

        q, s = cast_fp8(recv.view(L * X, H).nan_to_num(0.0))
        s = s.clone()
        s.view(L, X, -1)[0, 5:] = float("nan")
        recv_x = (q.view(L, X, H), s.view(L, X, -1).transpose(1, 2).contiguous().transpose(1, 2))
    else:
        recv_x = recv.to(torch.bfloat16)
    valid = [(p[0, :5], p[2]) for p in (recv_x if fp8 else (recv_x,))]
    valid = tuple(torch.cat(v) for v in valid) if fp8 else torch.cat(valid[0])
    for bad in (False, True):
        st = Staging()
        if bad:  # a NaN inside a valid row is reported
            recv_x = (recv_x[0], recv_x[1].clone()) if fp8 else recv_x.clone()
            (recv_x[1] if fp8 else recv_x)[2, 7, 0] = float("nan")
        st.keep("recv_count_L", counts)
        _valid_rows_fp(st, "_recv_x_fp_LX", recv_x, counts, 1)
        call = Call(op=Op.LL_DISPATCH, buffer=0, seq=0, step=0, layer=0, start_ns=0,
                    level=Level.FINGERPRINTS, args={}, staging=st, timer=Timer(None), t_mono=0.0)
        _, arrays, meta = build(call)
        if not bad:
            np.testing.assert_array_equal(arrays["recv_x_fp_V"], fingerprint_rows(valid).numpy().view(np.uint64))
        assert len(arrays["recv_x_fp_V"]) == 13 and meta["fp_version"] == FINGERPRINT_VERSION
        assert meta.get("nonfinite") == (["recv_x_fp_V"] if bad else None)


def _rank_wrap(ctx, run_dir: str):
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.capture import hooks
    from epreplay.emulate import Buffer

    capture.start(run_dir, level="routing", install=False)
    plain = Buffer(dist.group.WORLD)
    wrapped = capture.wrap(Buffer(dist.group.WORLD))
    moe_steps(plain, ctx.rank, steps=1, layers=1)  # not recorded
    moe_steps(wrapped, ctx.rank, steps=1, layers=2)
    hooked_before = hooks.is_hooked(wrapped.dispatch)
    capture.uninstall()
    facts = capture.stop()
    return facts, hooked_before, hooks.is_hooked(wrapped.dispatch), hooks.is_hooked(Buffer.dispatch)


def test_wrap_captures_one_instance(tmp_path):
    (facts, before, after, cls_hooked), = run_ranks(_rank_wrap, 1, str(tmp_path / "run"), timeout=90)
    assert before and not after and not cls_hooked
    recs = [r for r in _load(tmp_path / "run")[0] if r.header.kind == Kind.CALL]
    assert [(r.header.buffer, r.header.seq, r.header.op) for r in recs] == [
        (0, 0, Op.LAYOUT), (0, 1, Op.DISPATCH), (0, 2, Op.COMBINE),
        (0, 3, Op.LAYOUT), (0, 4, Op.DISPATCH), (0, 5, Op.COMBINE)]
    assert facts["buffers"] == [dict(facts["buffers"][0], id=0)] and len(facts["buffers"]) == 1


def _rank_writer(ctx, run_dir: str, writer: str):
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.emulate import Buffer

    capture.start(run_dir, level="payload", layers_per_step=2, writer=writer)
    buf = Buffer(dist.group.WORLD)
    ll = Buffer(dist.group.WORLD, low_latency_mode=True)
    moe_steps(buf, ctx.rank, steps=2, layers=2)
    moe_steps(buf, ctx.rank, steps=1, layers=2, ll_buf=ll)
    return capture.stop()


@pytest.mark.slow
def test_writer_process_and_writer_thread_write_the_same_records(tmp_path):
    """The default writer (a helper process fed through a pipe) and the in-process one build
    the same records bit for bit: every array (payloads, CPU fingerprints) and every meta key."""
    got = {}
    for writer in ("process", "thread"):
        facts = run_ranks(_rank_writer, 2, str(tmp_path / writer), writer, timeout=120)
        assert [f["writer"] for f in facts] == [writer] * 2
        assert all(f["records"] > 0 and f["disabled"] is None for f in facts)
        got[writer] = _load(tmp_path / writer)
    for rank in (0, 1):
        proc, thread = got["process"][rank], got["thread"][rank]
        assert [r.header.op for r in proc] == [r.header.op for r in thread] and len(proc) >= 12
        for a, b in zip(proc, thread):
            assert (a.header.seq, a.header.step, a.header.layer, a.header.tokens) == \
                   (b.header.seq, b.header.step, b.header.layer, b.header.tokens)
            assert sorted(a.arrays) == sorted(b.arrays)
            assert any(k.endswith("_fp_T") for k in a.arrays) or a.header.op == Op.LAYOUT
            for k in a.arrays:
                np.testing.assert_array_equal(a.arrays[k], b.arrays[k], err_msg=f"{k} of {a.header}")
            assert a.meta == b.meta


def test_packed_call_wire_round_trip_keeps_every_item():
    """What a GPU call hands the writer process: int64 fingerprints, 0-d finite flags, bf16 words
    with their logical dtype, an FP8 pair of CPU rows to hash, plain values, and meta."""
    from epreplay.capture.packed import Duration, PackedCall, PackedStaging
    from epreplay.format.records import Level, Status

    items = {
        "x_fp_T": np.arange(5, dtype=np.int64) * -7,
        "x_fp_T:finite": np.array(True),
        "x_TH": (np.arange(12, dtype=np.uint16).reshape(3, 4), "bfloat16"),
        "rows_fp": ("fp", [(np.arange(6, dtype=np.uint8).reshape(2, 3), "float8_e4m3fn"),
                           np.ones((2, 1), np.float32)]),
        "_num_recv_list": [3, 0, 5],
        "empty_TK": np.zeros((0, 8), np.int64),
    }
    call = PackedCall(op=Op.DISPATCH, buffer=1, seq=7, step=2, layer=3, start_ns=123, level=Level.PAYLOAD,
                      staging=PackedStaging(items), timer=Duration(456), args_text={"x": "bfloat16[3,4]"},
                      meta={"E": 8, "config": "Config(1)", "nested": {"a": [1, 2]}}, tokens=3,
                      status=Status.ERROR, done=True)
    head, bufs = call.to_wire()
    back = PackedCall.from_wire(head, [bytearray(memoryview(b).cast("B")) for b in bufs])
    for f in ("op", "buffer", "seq", "step", "layer", "start_ns", "level", "tokens", "status", "done",
              "meta", "args_text"):
        assert getattr(back, f) == getattr(call, f), f
    assert back.timer.duration_ns() == 456
    got = back.staging.items
    np.testing.assert_array_equal(got["x_fp_T"], items["x_fp_T"])
    assert got["x_fp_T:finite"].shape == () and bool(got["x_fp_T:finite"])
    assert got["x_TH"][1] == "bfloat16" and np.array_equal(got["x_TH"][0], items["x_TH"][0])
    (q, dt), s = got["rows_fp"][1]
    assert got["rows_fp"][0] == "fp" and dt == "float8_e4m3fn" and np.array_equal(q, items["rows_fp"][1][0][0])
    np.testing.assert_array_equal(s, items["rows_fp"][1][1])
    assert got["_num_recv_list"] == [3, 0, 5] and got["empty_TK"].shape == (0, 8)
