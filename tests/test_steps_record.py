"""`epreplay record` of a client that never marks steps: the steps are found in its traffic."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import duckdb
import pytest

# A serving-style client written for DeepEP, knowing nothing of epreplay: each step (a forward
# pass) runs LAYERS MoE layers on its batch, and each step's batch has its own size per rank.
CLIENT = textwrap.dedent('''
    import sys
    import torch
    from epreplay.launch import run_ranks

    def rank_fn(ctx, steps, layers):
        import deep_ep
        import torch.distributed as dist
        buffer = deep_ep.Buffer(dist.group.WORLD, int(1e8), 0)
        g = torch.Generator().manual_seed(ctx.rank)
        for step in range(steps):
            T = 8 + 4 * ((step + ctx.rank) % 3)  # this rank's batch in this step
            x = torch.randn(T, 32, generator=g).to(torch.bfloat16)
            for layer in range(layers):
                topk_idx = torch.topk(torch.rand(T, 8, generator=g), 2, dim=1).indices
                topk_weights = torch.rand(T, 2, generator=g)
                n_rank, n_rdma, n_exp, in_rank, _ = buffer.get_dispatch_layout(topk_idx, 8)
                recv_x, _, recv_w, _, handle, _ = buffer.dispatch(
                    x, num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma,
                    is_token_in_rank=in_rank, num_tokens_per_expert=n_exp,
                    topk_idx=topk_idx, topk_weights=topk_weights)
                x, _, _ = buffer.combine(recv_x, handle)
        return 0

    if __name__ == "__main__":
        run_ranks(rank_fn, int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), timeout=120)
        print("client ok")
''')


def _epreplay(*args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epreplay", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "EPREPLAY_EMULATE_DEEP_EP": "1"})


@pytest.mark.slow
def test_unmarked_client_gets_its_steps_from_the_traffic(tmp_path):
    client = tmp_path / "client.py"
    client.write_text(CLIENT)
    run = tmp_path / "run"
    steps, layers = 3, 4
    res = _epreplay("record", "--out", str(run), "--", sys.executable, str(client), "2", str(steps), str(layers))
    assert res.returncode == 0, res.stderr
    assert "steps: detected, 4 layer(s) per step" in res.stderr, res.stderr
    assert _epreplay("index", str(run)).returncode == 0
    # the recorded data are untouched: step 0, layer calls 0..11
    from epreplay.format.shard import open_shard

    with open_shard(run / "shards" / "rank-00000.eprs") as scan:
        h = scan.header_array()
        assert set(h["step"].tolist()) == {0} and h["layer"].max() == steps * layers - 1
    con = duckdb.connect(str(run / "index.duckdb"), read_only=True)
    try:
        got = con.execute("SELECT count(DISTINCT step), count(DISTINCT layer), max(step), max(layer) "
                          "FROM calls").fetchone()
        assert got == (steps, layers, steps - 1, layers - 1)
        # every aggregate table moved with the calls
        for table in ("expert_load", "traffic", "rank_load"):
            assert con.execute(f"SELECT count(DISTINCT (step, layer)) FROM {table}").fetchone()[0] \
                == steps * layers, table
        assert con.execute("SELECT method, layers_per_step FROM steps").fetchone() == ("detected", layers)
    finally:
        con.close()
    stats = _epreplay("stats", str(run))
    assert stats.returncode == 0 and "steps: detected, 4 layer(s) per step" in stats.stdout, stats.stdout
    inspect = _epreplay("inspect", str(run), "--format", "json")
    assert inspect.returncode == 0, inspect.stderr
    doc = json.loads(inspect.stdout)["run"]
    assert doc["steps"]["method"] == "detected" and doc["steps"]["layers_per_step"] == layers
    # the run diffed with itself pairs the same layers on both sides (token metrics per layer)
    diff = _epreplay("diff", str(run), str(run), "--format", "json")
    assert diff.returncode == 0, diff.stderr
    rows = json.loads(diff.stdout)["layers"]
    assert [r["layer"] for r in rows] == list(range(layers))
    tokens = sum(8 + 4 * ((s + r) % 3) for s in range(steps) for r in range(2))  # the client's batches
    assert [r["matched_tokens"] for r in rows] == [tokens] * layers
    # replay selects by the steps found: one step is `layers` layout+dispatch+combine calls
    replay = _epreplay("replay", str(run), "--ranks", "2", "--steps", "1:2")
    assert replay.returncode == 0 and f"OK: {3 * layers} calls replayed" in replay.stdout, replay.stdout
