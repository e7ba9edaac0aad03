"""The call workload the capture-path tests share (test_capture_ring.py, test_capture_fast.py):
every call shape capture knows, and record-by-record comparison of two recordings."""
from __future__ import annotations

import re

import numpy as np
import torch

from epreplay.format.records import Kind
from epreplay.format.run import RunDir
from epreplay.format.shard import open_shard

E, K, H, T = 8, 3, 128, 24


def inputs(rank: int, step: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(100 * rank + step)
    idx = torch.topk(torch.rand(T, E, generator=g), K, dim=1).indices.to(torch.int64)
    idx[torch.rand(T, K, generator=g) < 0.1] = -1
    x, w = torch.randn(T, H, generator=g).to(torch.bfloat16), torch.rand(T, K, generator=g)
    return x.to(device), idx.to(device), w.to(device)


def workload(buf, ll, rank: int, device: str = "cpu", *, steps: int = 2, tag_steps=None,
             hook_steps=(1,)) -> None:
    """Steps alternating two call shapes: normal BF16 dispatch / FP8 with async_finish, cached
    dispatch, combine, low-latency dispatch BF16 / FP8 and combine (with their recv hooks at
    `hook_steps`); token tags at `tag_steps` (None: every step); then a dispatch that raises."""
    from epreplay import capture
    from epreplay.demo.epbench import per_token_cast_to_fp8

    for step in range(steps):
        odd = step % 2
        with capture.step(step):
            x, idx, w = inputs(rank, step, device)
            n_rank, n_rdma, n_exp, in_rank, _ = buf.get_dispatch_layout(idx, E)
            if tag_steps is None or step in tag_steps:
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
            hook = step in hook_steps
            recv, count, h, _, got_hook = ll.low_latency_dispatch(x, idx, T, E, use_fp8=bool(odd),
                                                                  return_recv_hook=hook)
            if hook:
                got_hook()
            z = recv if not isinstance(recv, tuple) else torch.zeros(recv[0].shape, dtype=torch.bfloat16,
                                                                     device=device)
            _, _, got_hook = ll.low_latency_combine(z, idx, w, h, return_recv_hook=hook)
            if hook:
                got_hook()
    try:
        buf.dispatch(x, topk_idx=idx[:, :1].contiguous(), topk_weights=w)  # wrong shapes: raises
    except Exception:  # noqa: BLE001
        pass


def records(run_dir) -> dict[int, list]:
    """{rank: the run's CALL records}, every shard complete."""
    out = {}
    for path in RunDir.open(run_dir).shard_paths():
        with open_shard(path) as scan:
            assert scan.complete, scan.problem
            out[scan.info.rank] = list(scan.records(kinds=(Kind.CALL,)))
    return out


def assert_same_records(a: list, b: list) -> None:
    """Two recordings of the same calls hold the same records: headers (times aside), meta and
    arrays bit for bit."""
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
