"""DeepEP V2 (ElasticBuffer) calls through the compiled hook: their plans read the EPHandle's
fields by attribute (capture/plan_compile.py), and the records equal the Python hook's at every
level: plain and expanded layouts, with and without the CPU sync, cached dispatches, combines."""
from __future__ import annotations

import os

import pytest
import torch

from epreplay.format.records import Op
from epreplay.launch import run_ranks

from capture_workload import assert_same_records, records

fast_plan = pytest.importorskip("epreplay.capture.fast_plan")
pytestmark = pytest.mark.skipif(fast_plan.load() is None,
                                reason="the compiled hook is not built (python -m epreplay.capture.hookx_build)")
STEPS, E, K, H = 6, 8, 2, 64


def _rank(ctx, root: str, level: str) -> dict:
    import torch.distributed as dist

    from epreplay import capture
    from epreplay.emulate.v2 import ElasticBuffer

    out = {}
    for path in ("ring", "compiled"):
        capture.start(os.path.join(root, path), level=level, hot_path=path)
        buf = ElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=48, hidden=H, num_topk=K, deterministic=True)
        g = torch.Generator().manual_seed(ctx.rank)
        for step in range(STEPS):  # three call shapes, each twice: the second is compiled
            T = 32 + ctx.rank
            x = torch.randn(T, H, generator=g).to(torch.bfloat16)
            idx = torch.topk(torch.rand(T, E, generator=g), K, dim=1).indices
            w = torch.rand(T, K, generator=g)
            expand = step % 3 == 1
            recv_x, _, recv_w, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E,
                                                        expert_alignment=4 if expand else 1, do_expand=expand,
                                                        do_cpu_sync=step % 3 != 2)
            buf.dispatch(x, handle=handle)  # cached
            if expand:
                buf.combine(torch.nan_to_num(recv_x), handle)
            else:
                buf.combine(recv_x, handle, topk_weights=recv_w)
        out[path] = capture.stop()
    return out


@pytest.mark.parametrize("level", ["counts", "routing", "fingerprints"])
def test_v2_calls_are_compiled_with_the_python_hooks_records(tmp_path, level):
    facts = run_ranks(_rank, 2, str(tmp_path), level, timeout=180)
    for f in facts:
        c = f["compiled"]
        assert c["hot_path"] == "compiled" and c["dropped"] == 0 and c["disabled"] is None, c
        # 18 calls a rank, 9 sites' first calls and the session's first are Python's
        assert c["compiled_frames"] >= 8, c
        assert f["ring"]["compiled_frames"] == 0
    for rank in range(2):
        compiled, ring = records(tmp_path / "compiled")[rank], records(tmp_path / "ring")[rank]
        assert len(compiled) == 3 * STEPS
        assert_same_records(compiled, ring)
        combines = [r for r in compiled if r.header.op == Op.COMBINE]
        assert all(r.meta["dispatch_seq"] >= 0 for r in combines)  # the handle's lineage, both hooks
