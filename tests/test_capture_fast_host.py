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


# --- rows fingerprinted by the hook (capture/_hosthash.h) ---------------------------------------------
def _rank_hashed(ctx, root: str) -> dict:
    """Dispatches at `fingerprints` whose rows are hashed in the hook (AVX-512) or copied for the
    writer (EPREPLAY_CAPTURE_HOST_HASH=0): widths with 8-lane tails, bf16 rows with NaN and
    inf, an FP8 pair (fp32 scales); the low-latency buffers' valid rows come with them."""
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.demo.epbench import per_token_cast_to_fp8
    from epreplay.emulate import Buffer

    facts = {}
    for path in ("copied", "hashed"):
        os.environ["EPREPLAY_CAPTURE_HOST_HASH"] = "0" if path == "copied" else "1"
        capture.start(os.path.join(root, path), level="fingerprints", hot_path="compiled")
        buf = Buffer(dist.group.WORLD)
        ll = Buffer(dist.group.WORLD, low_latency_mode=True)
        g = torch.Generator().manual_seed(3)
        for H, dtype in ((40, torch.bfloat16), (264, torch.bfloat16), (136, torch.bfloat16), (384, torch.bfloat16)):
            for rep in range(3):  # the second call of a site is the compiled hook's
                x, idx, w = inputs(ctx.rank, rep)
                x = torch.randn(x.shape[0], H, generator=g).to(dtype)
                x[1, H // 2], x[2, 0] = float("nan"), float("inf")
                n_rank, n_rdma, n_exp, in_rank, _ = buf.get_dispatch_layout(idx, E)
                xs = per_token_cast_to_fp8(x.float().nan_to_num(0.0)) if H == 384 else x
                buf.dispatch(xs, num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma,
                             is_token_in_rank=in_rank, num_tokens_per_expert=n_exp, topk_idx=idx, topk_weights=w)
                if H % 128 == 0:  # low-latency: FP8 received rows at H=384
                    fp8 = H == 384
                    recv, _, h, _, _ = ll.low_latency_dispatch(x, idx, x.shape[0], E, use_fp8=fp8)
                    z = torch.zeros(recv[0].shape, dtype=torch.bfloat16) if fp8 else recv
                    ll.low_latency_combine(z, idx, w, h)
        facts[path] = capture.stop()
    os.environ.pop("EPREPLAY_CAPTURE_HOST_HASH", None)
    return facts


def test_rows_hashed_in_the_hook_equal_rows_hashed_by_the_writer(tmp_path):
    from epreplay.capture import _hookx

    if not _hookx.host_hash_fast():
        pytest.skip("this CPU has no AVX-512DQ: the hook copies rows for the writer (the other path)")
    (facts,) = run_ranks(_rank_hashed, 1, str(tmp_path), timeout=180)
    assert facts["hashed"]["compiled_frames"] >= 10 and facts["hashed"]["dropped"] == 0, facts["hashed"]
    runs = {p: records(tmp_path / p)[0] for p in ("copied", "hashed")}
    assert len(runs["hashed"]) == len(runs["copied"]) == 4 * 3 * 2 + 3 * 2  # layouts, dispatches; LL at H=384
    assert_same_records(runs["hashed"], runs["copied"])
    flagged = [r for r in runs["hashed"] if r.meta.get("nonfinite")]
    assert flagged, "the NaN/inf rows are reported"


# --- token tags taken by the compiled hook (take_tags) --------------------------------------------------
# every form but the last is taken by the compiled hook (widened to int64 as torch.as_tensor does)
TAG_FORMS = ("torch int64", "numpy int64", "list", "numpy int32", "torch int32", "numpy uint32", "tuple")


def _tagged_calls(buf, x, idx, w) -> None:
    """Dispatches tagged in every form marks.tag_tokens accepts, untagged ones between them, and a
    layout and a cached dispatch with tags pending (tags apply to the next dispatch that is not
    cached: those two leave them)."""
    import numpy as np

    from epreplay import marks

    T = idx.shape[0]
    n_rank, _, n_exp, in_rank, _ = buf.get_dispatch_layout(idx, E)
    kw = dict(num_tokens_per_rank=n_rank, is_token_in_rank=in_rank, num_tokens_per_expert=n_exp,
              topk_idx=idx, topk_weights=w)
    handle = buf.dispatch(x, **kw)[4]
    for rep in range(3):
        for k, form in enumerate(TAG_FORMS):
            ids = [1000 * k + 10 * rep + t for t in range(T)]
            tags = {"torch int64": torch.tensor(ids), "numpy int64": np.array(ids, dtype=np.int64),
                    "list": ids, "numpy int32": np.array(ids, dtype=np.int32),
                    "torch int32": torch.tensor(ids, dtype=torch.int32),
                    "numpy uint32": np.array(ids, dtype=np.uint32), "tuple": tuple(ids)}[form]
            marks.tag_tokens(tags)
            buf.get_dispatch_layout(idx, E)  # not a dispatch: the tags wait
            buf.dispatch(x, handle=handle)  # a cached dispatch: the tags wait
            buf.dispatch(x, **kw)  # takes them
            handle = buf.dispatch(x, **kw)[4]  # untagged
    assert marks.take_tags() is None  # every tag set was taken by its dispatch


def _rank_tags(ctx, root: str) -> dict:
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.emulate import Buffer

    out = {}
    x, idx, w = inputs(ctx.rank, 0)
    for path in ("ring", "compiled"):
        capture.start(os.path.join(root, path), level="routing", hot_path=path)
        _tagged_calls(Buffer(dist.group.WORLD), x, idx, w)
        out[path] = capture.stop()
    return out


def test_token_tags_taken_by_the_compiled_hook_equal_the_python_hooks(tmp_path):
    """A tagged dispatch has its own plan: the hook takes 1-D integer tags (a tensor, a numpy
    array, a list) itself, widened to int64, and hands other forms to the Python hook, which
    converts them; records equal."""
    import numpy as np

    from epreplay.format.records import Op

    (out,) = run_ranks(_rank_tags, 1, str(tmp_path), timeout=180)
    c = out["compiled"]
    runs = {p: records(tmp_path / p)[0] for p in ("ring", "compiled")}
    assert len(runs["compiled"]) == 2 + 3 * len(TAG_FORMS) * 4
    assert_same_records(runs["compiled"], runs["ring"])
    dispatches = [r for r in runs["compiled"] if r.header.op == Op.DISPATCH][1:]
    tagged = dispatches[0::2]
    assert all("token_tag_T" not in r.arrays for r in dispatches[1::2])
    assert all("token_tag_T" not in r.arrays for r in runs["compiled"] if r.header.op != Op.DISPATCH)
    T = inputs(0, 0)[1].shape[0]
    for i, r in enumerate(tagged):
        rep, k = divmod(i, len(TAG_FORMS))
        assert np.array_equal(r.arrays["token_tag_T"], 1000 * k + 10 * rep + np.arange(T)), (rep, k)
    # compiled: the 3n layouts and 3n untagged dispatches but the first of each (they taught), and
    # the tagged ones but the first (it taught) and the tuple-tagged (Python's); cached dispatches
    # with tags pending are Python's
    n = len(TAG_FORMS)
    assert c["hot_path"] == "compiled" and c["dropped"] == 0, c
    assert c["compiled_frames"] >= (3 * n - 1) + (3 * n - 1) + (3 * (n - 1) - 1), c


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
def test_the_hooks_row_hash_is_the_fingerprint_and_flags_exactly_the_nonfinite_rows(dtype):
    """The hook's AVX-512 row hash (_hosthash.h) against format/fingerprint.py version 2, over
    widths with every tail length, and its non-finite marks against torch.isfinite (the checked
    dtypes; FP8 codes are not checked, as on the GPU)."""
    from epreplay.capture import _hookx
    from epreplay.format.fingerprint import fingerprint_rows

    if _hookx.host_hash_rows(torch.zeros(1, 8, dtype=torch.bfloat16)) is None:
        pytest.skip("this CPU has no AVX-512DQ/BW: the hook copies rows for the writer")
    g = torch.Generator().manual_seed(5)
    per_lane = 8 // torch.empty(0, dtype=dtype).element_size()
    for lanes in list(range(1, 34)) + [128, 131]:
        H = lanes * per_lane
        x = torch.randn(12, H, generator=g)
        bad_rows = {2: float("nan"), 5: float("inf"), 7: float("-inf"), 11: float("nan")}
        for r, v in bad_rows.items():  # at the row's start, middle and last word (the tail)
            x[r, (0, H // 2, H - 1)[r % 3]] = v
        x = x.to(dtype) if dtype != torch.float8_e4m3fn else x.nan_to_num(0.0, 0.0, 0.0).to(dtype)
        fp, marks = _hookx.host_hash_rows(x)
        assert torch.equal(fp, fingerprint_rows(x, version=2)), (dtype, H)
        checked = dtype != torch.float8_e4m3fn
        want = (~torch.isfinite(x.float())).any(dim=1) if checked else torch.zeros(12, dtype=torch.bool)
        assert torch.equal(marks.bool(), want), (dtype, H, marks)
        assert not checked or marks.sum() == len(bad_rows)
