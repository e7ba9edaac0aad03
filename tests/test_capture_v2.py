"""A DeepEP V2 (ElasticBuffer) client, unmodified, recorded with `epreplay record`, indexed and
replayed 4 -> 2 -> 1 ranks through the emulation; a planted fault is found; V1 shards still read."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from epreplay.format.records import VARIANT_ELASTIC, Kind, Op
from epreplay.format.run import RunDir
from epreplay.format.shard import open_shard

# Written for DeepEP V2: imports deep_ep, knows nothing of epreplay. Step 1 uses the expanded
# layout with alignment, step 2 no CPU sync; every step dispatches, re-dispatches with the
# cached handle and combines. It writes its own per-expert token counts for the test.
CLIENT = textwrap.dedent('''
    import json, sys
    import torch
    from epreplay.launch import run_ranks

    def rank_fn(ctx, steps):
        import deep_ep
        import torch.distributed as dist
        E, K, H = 8, 2, 64
        buf = deep_ep.ElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=48, hidden=H, num_topk=K,
                                    deterministic=True, explicitly_destroy=True)
        g = torch.Generator().manual_seed(ctx.rank)
        counts, sent = [0] * E, [0] * ctx.world_size
        for step in range(steps):
            T = 32 + ctx.rank
            x = torch.randn(T, H, generator=g).to(torch.bfloat16)
            idx = torch.topk(torch.rand(T, E, generator=g), K, dim=1).indices
            w = torch.rand(T, K, generator=g)
            for e in idx.flatten().tolist():
                counts[e] += 1
            for row in idx.tolist():  # a token goes once to each rank holding one of its experts
                for r in {e // (E // ctx.world_size) for e in row}:
                    sent[r] += 1
            expand = step == 1
            recv_x, recv_idx, recv_w, handle, _ = buf.dispatch(
                x, topk_idx=idx, topk_weights=w, num_experts=E, expert_alignment=4 if expand else 1,
                do_expand=expand, do_cpu_sync=step != 2)
            buf.dispatch(x, handle=handle)
            if expand:
                y, _, _ = buf.combine(torch.nan_to_num(recv_x), handle)
            else:
                y, _, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
        buf.destroy()
        return counts, sent

    if __name__ == "__main__":
        out = run_ranks(rank_fn, int(sys.argv[1]), int(sys.argv[2]), timeout=120)
        json.dump(out, open(sys.argv[3], "w"))
        print("client ok", len(out))
''')


def _epreplay(*args: str, env: dict[str, str] | None = None, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epreplay", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def v2_run(tmp_path_factory) -> tuple[Path, list]:
    """(the run, each rank's (tokens per expert, tokens sent per destination rank))."""
    tmp = tmp_path_factory.mktemp("v2")
    client, counts, run = tmp / "client.py", tmp / "counts.json", tmp / "run"
    client.write_text(CLIENT)
    res = _epreplay("record", "--out", str(run), "--layers-per-step", "1", "--level", "fingerprints", "--",
                    sys.executable, str(client), "4", "3", str(counts), env={"EPREPLAY_EMULATE_DEEP_EP": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    return run, json.loads(counts.read_text())


def test_v2_calls_recorded_with_variant_and_v1_arrays(v2_run) -> None:
    run, _ = v2_run
    for path in RunDir.open(run).shard_paths():
        with open_shard(path) as scan:
            assert scan.info.version == 2
            calls = [e for e in scan.entries if e.header.kind == Kind.CALL]
            assert [e.header.op for e in calls] == [Op.DISPATCH, Op.CACHED_DISPATCH, Op.COMBINE] * 3
            assert {e.header.variant for e in calls} == {VARIANT_ELASTIC}
            recs = [scan.read_at(e.offset) for e in calls]
            for d in recs[0::3]:
                a = d.arrays
                assert d.meta["api"] == "elastic" and a["recv_tokens_per_rank_R"].sum() == len(a["recv_src_idx_N"])
                assert len(a["recv_x_fp_N"]) == len(a["recv_src_idx_N"])
                assert a["num_tokens_per_expert_E"].sum() == (a["topk_idx_TK"] >= 0).sum()
            assert [r.meta["do_expand"] for r in recs[0::3]] == [False, True, False]
            assert recs[3].arrays["recv_tokens_per_expert_L"].tolist() == [  # aligned to 4 in step 1
                -(-int(c) // 4) * 4 for c in recs[3].arrays["recv_tokens_per_expert_L"]]
    assert len(RunDir.open(run).shard_paths()) == 4


def test_v2_index_expert_load_and_traffic_equal_client_counts(v2_run) -> None:
    import duckdb

    run, out = v2_run
    res = _epreplay("index", str(run))
    assert res.returncode == 0, res.stderr
    con = duckdb.connect(str(RunDir.open(run).index_path), read_only=True)
    load = con.execute("SELECT expert, sum(tokens)::BIGINT FROM expert_load GROUP BY expert ORDER BY expert").fetchall()
    traffic = con.execute("SELECT src_rank, dst_rank, sum(tokens)::BIGINT FROM traffic GROUP BY ALL "
                          "ORDER BY src_rank, dst_rank").fetchall()
    con.close()
    assert [int(t) for _, t in load] == np.sum(np.asarray([c for c, _ in out]), axis=0).tolist()
    assert [[int(t) for s, _, t in traffic if s == r] for r in range(4)] == [sent for _, sent in out]
    stats = _epreplay("stats", str(run))
    assert stats.returncode == 0 and "expert" in stats.stdout.lower(), stats.stdout + stats.stderr


@pytest.mark.parametrize("ranks", [4, 2, 1])
def test_v2_replay_zero_divergences(v2_run, ranks: int) -> None:
    from epreplay.replay import replay_run

    report = replay_run(v2_run[0], ranks, call_timeout=60, index=False, write=False)
    assert report.exit_code == 0 and not report.divergence_list, report.divergence_list[:3]
    assert report.calls == 9


def test_v2_replay_finds_planted_fault(v2_run) -> None:
    from epreplay.emulate.faults import Fault
    from epreplay.replay import replay_run

    report = replay_run(v2_run[0], 2, call_timeout=60, index=False, write=False,
                        fault=Fault(kind="swap_rows", rank=0, op="dispatch", call=1, row=0, row2=1))
    assert report.exit_code == 1
    first = report.first_divergence
    assert first["kind"] == "order" and (first["step"], first["op"]) == (1, "dispatch"), report.divergence_list[:3]
