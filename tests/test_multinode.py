"""Multi-node recording without a shared filesystem: two `epreplay record` launchers play the two
nodes of one 8-rank torchrun job (ranks 0-3 and 4-7) on this machine, each writing its own local
directory with its own clock offset (EPREPLAY_CLOCK_OFFSET_NS, capture/sink.py), then `epreplay
merge` joins them. The same job recorded by two launchers into one directory (a shared
filesystem) is the reference the merged run must equal.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from epreplay.capture.job import Job, check_run_id, job_of
from epreplay.format.clock import estimate
from epreplay.format.records import Op
from epreplay.launch import free_port

# Injected clock offsets of the two "nodes" (ns): node 1's clock reads 350 ms ahead of node 0's.
OFFSETS = (-40_000_000, 310_000_000)
# Stated tolerance of the estimated skew: 20 ms. The estimate's noise is how unevenly 16
# processes on 2 cores leave one collective (a few ms measured); the offset is 17x larger.
SKEW_TOL_NS = 20_000_000
STEPS, LAYERS = 4, 2

# A DeepEP client that knows nothing of epreplay: run by torchrun, one process per rank.
CLIENT = textwrap.dedent('''
    import sys
    import torch
    import torch.distributed as dist

    def main(steps, layers):
        import deep_ep
        dist.init_process_group("gloo")
        torch.set_num_threads(1)
        rank = dist.get_rank()
        buffer = deep_ep.Buffer(dist.group.WORLD, int(1e8), 0)
        for step in range(steps):
            for layer in range(layers):
                g = torch.Generator().manual_seed(1000 * rank + 10 * step + layer)
                x = torch.randn(24, 32, generator=g).to(torch.bfloat16)
                idx = torch.topk(torch.rand(24, 16, generator=g), 2, dim=1).indices
                n_rank, n_rdma, n_exp, in_rank, _ = buffer.get_dispatch_layout(idx, 16)
                recv_x, _, _, _, handle, _ = buffer.dispatch(
                    x, num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma,
                    is_token_in_rank=in_rank, num_tokens_per_expert=n_exp,
                    topk_idx=idx, topk_weights=torch.rand(24, 2, generator=g))
                buffer.combine(recv_x, handle)
        dist.destroy_process_group()

    main(int(sys.argv[1]), int(sys.argv[2]))
''')


def _epreplay(*args: str, env: dict[str, str] | None = None, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epreplay", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _record_two_nodes(client: Path, outs: tuple[Path, Path]) -> list[str]:
    """Launch node 0 and node 1 of one job (two real `epreplay record` launchers); their stderr."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    port = str(free_port())
    procs = []
    for node, out in enumerate(outs):
        cmd = [sys.executable, "-m", "epreplay", "record", "--out", str(out),
               "--layers-per-step", str(LAYERS), "--", torchrun, "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "4", "--master-addr", "127.0.0.1", "--master-port", port,
               str(client), str(STEPS), str(LAYERS)]
        env = {**os.environ, "EPREPLAY_EMULATE_DEEP_EP": "1", "OMP_NUM_THREADS": "1",
               "EPREPLAY_CLOCK_OFFSET_NS": str(OFFSETS[node])}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errs = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=180)
            assert p.returncode == 0, err
            errs.append(err)
    finally:  # one launcher failing leaves the other's torchrun waiting for its peer node
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return errs


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """{"parts": (node-0 dir, node-1 dir), "shared": one dir both launchers wrote, "stderr"}."""
    base = tmp_path_factory.mktemp("multinode")
    client = base / "client.py"
    client.write_text(CLIENT)
    parts = (base / "node0" / "run", base / "node1" / "run")
    errs = _record_two_nodes(client, parts)
    shared = base / "shared" / "run"
    _record_two_nodes(client, (shared, shared))
    return {"parts": parts, "shared": shared, "stderr": errs, "base": base}


def _listing(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under path -> (size, mtime_ns): what a merge must leave as it was."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


def _totals(run: Path) -> dict:
    import duckdb

    con = duckdb.connect(str(run / "index.duckdb"), read_only=True)
    try:
        q = lambda sql: con.execute(sql).fetchall()  # noqa: E731
        return {"calls": q("SELECT op::VARCHAR, count(*), sum(tokens) FROM calls GROUP BY ALL ORDER BY ALL"),
                "load": q("SELECT step, layer, expert, tokens FROM expert_load ORDER BY ALL"),
                "traffic": q("SELECT step, layer, src_rank, dst_rank, tokens, bytes FROM traffic ORDER BY ALL"),
                "rank_load": q("SELECT * FROM rank_load ORDER BY ALL"),
                "runs": q("SELECT world_size, num_experts, topk, hidden, shards, missing_ranks FROM runs")}
    finally:
        con.close()


@pytest.mark.slow
def test_two_nodes_merge_into_one_run(recorded, tmp_path):
    parts = recorded["parts"]
    manifests = [json.loads((p / "manifest.json").read_text()) for p in parts]
    run_id = manifests[0]["run_id"]
    assert manifests[1]["run_id"] == run_id  # agreed without a process group
    assert all(f"run {run_id} (derived from torchrun" in e for e in recorded["stderr"])
    assert sorted(manifests[0]["ranks"]) == ["0", "1", "2", "3"]
    assert sorted(manifests[1]["ranks"]) == ["4", "5", "6", "7"]
    assert {f["node"] for f in manifests[1]["ranks"].values()} == {1}
    from epreplay.format.shard import open_shard

    with open_shard(parts[1] / "shards" / "rank-00006.eprs") as scan:
        assert (scan.info.run_id, scan.info.rank, scan.info.node, scan.info.world_size) == (run_id, 6, 1, 8)
    before = [_listing(p) for p in parts]

    merged = tmp_path / "merged"
    res = _epreplay("merge", str(parts[0]), str(parts[1]), "--out", str(merged))
    assert res.returncode == 0, res.stderr
    assert f"run {run_id}: 8 shard(s) of 2 part(s)" in res.stdout and "hard-linked" in res.stdout
    assert [_listing(p) for p in parts] == before  # the parts are only read
    shards = sorted((merged / "shards").iterdir())
    assert [p.name for p in shards] == [f"rank-{r:05d}.eprs" for r in range(8)]
    assert os.path.samefile(shards[5], parts[1] / "shards" / "rank-00005.eprs")  # linked, not copied
    m = json.loads((merged / "manifest.json").read_text())
    assert m["run_id"] == run_id and m["world_size"] == 8 and sorted(m["ranks"], key=int) == list(map(str, range(8)))
    assert m["extra"]["nodes"]["1"]["ranks"] == [4, 5, 6, 7] and m["extra"]["missing_ranks"] == []
    assert [p["ranks"] for p in m["extra"]["parts"]] == [[0, 1, 2, 3], [4, 5, 6, 7]]

    # the clock: node 1 reads (310 - -40) ms ahead, estimated from the collectives alone
    injected = OFFSETS[1] - OFFSETS[0]
    line = next(l for l in res.stdout.splitlines() if l.strip().startswith("node 1"))
    assert abs(float(line.split(":")[1].split("ms")[0]) * 1e6 - injected) < SKEW_TOL_NS, res.stdout

    # the merged run is a run like any other, with the figures of the shared-directory recording
    shared = recorded["shared"]
    for run in (merged, shared):
        res = _epreplay("index", str(run))
        assert res.returncode == 0, res.stderr
    got, want = _totals(merged), _totals(shared)
    assert got == want and got["runs"] == [(8, 16, 2, 32, 8, "")]
    assert got["calls"] == [("combine", 8 * STEPS * LAYERS, 8 * 24 * STEPS * LAYERS),
                            ("dispatch", 8 * STEPS * LAYERS, 8 * 24 * STEPS * LAYERS),
                            ("layout", 8 * STEPS * LAYERS, 8 * 24 * STEPS * LAYERS)]
    res = _epreplay("stats", str(merged), "--format", "json")
    assert res.returncode == 0, res.stderr
    stats = json.loads(res.stdout)
    node1 = stats["clock"]["nodes"][1]
    assert node1["ranks"] == [4, 5, 6, 7] and abs(node1["offset_ns"] - injected) < SKEW_TOL_NS
    # stragglers read aligned times: unaligned, every node-1 rank would arrive 350 ms "late" in
    # every call. Ranks may really be late on average (16 processes share 2 cores here: a
    # descheduled rank, or a node whose processes started seconds later under load, late in the
    # first collectives only, is a true straggler; seen once: three node-1 ranks ~190 ms late on
    # average), but not all four of node 1, and not by the offset.
    late_ns = {s["rank"]: s["late_us"] * 1e3 for s in stats["stragglers"]}
    node1_late = [late_ns.get(r, 0.0) for r in range(4, 8)]
    assert min(node1_late) < injected / 2 and sum(node1_late) / 4 < 0.75 * injected, stats["stragglers"]
    res = _epreplay("inspect", str(merged))
    assert res.returncode == 0 and "world 8" in res.stdout, res.stdout + res.stderr
    res = _epreplay("replay", str(merged), timeout=240)
    assert res.returncode == 0 and "no divergence" in res.stdout, res.stdout + res.stderr


@pytest.mark.slow
def test_shared_directory_is_one_run(recorded):
    """Both launchers wrote one directory (a shared filesystem): they joined one run."""
    shared = recorded["shared"]
    m = json.loads((shared / "manifest.json").read_text())
    assert sorted(m["ranks"], key=int) == list(map(str, range(8))) and m["world_size"] == 8
    assert sorted(l["node"] for l in m["extra"]["launchers"]) == [0, 1]
    assert len(list((shared / "shards").iterdir())) == 8


def _refused(res: subprocess.CompletedProcess, out: Path, *words: str) -> None:
    """One line on stderr naming the problem, exit 2, nothing written."""
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.merge-*"))


@pytest.mark.slow
def test_merge_errors(recorded, tmp_path):
    node0, node1 = recorded["parts"]
    out = tmp_path / "out"
    # parts of different runs
    _refused(_epreplay("merge", str(node0), str(recorded["shared"]), "--out", str(out)), out,
             "parts of different runs", str(node0), "--run-id")
    # a rank twice: node 0's part given twice under two names
    twin = tmp_path / "twin"
    shutil.copytree(node0, twin)
    _refused(_epreplay("merge", str(node0), str(twin), str(node1), "--out", str(out)), out,
             "rank 0 is in two parts", str(twin))
    # a missing rank, named (node 1's part left out)
    _refused(_epreplay("merge", str(node0), "--out", str(out)), out,
             "rank(s) 4, 5, 6, 7 missing", "node 1", "--allow-missing")
    # an unreadable part: a damaged manifest, a damaged shard header, no such directory
    broken = tmp_path / "broken"
    shutil.copytree(node1, broken)
    (broken / "manifest.json").write_text("{not json")
    _refused(_epreplay("merge", str(node0), str(broken), "--out", str(out)), out, "manifest.json", "unreadable")
    shutil.copytree(node1, broken, dirs_exist_ok=True)
    (broken / "manifest.json").write_bytes((node1 / "manifest.json").read_bytes())
    (broken / "shards" / "rank-00005.eprs").write_bytes(b"\0" * 64)
    _refused(_epreplay("merge", str(node0), str(broken), "--out", str(out)), out, "rank-00005.eprs")
    _refused(_epreplay("merge", str(node0), str(tmp_path / "nowhere"), "--out", str(out)), out,
             "nowhere", "no such run directory")
    # --out that holds something is never written into
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    res = _epreplay("merge", str(node0), str(node1), "--out", str(tmp_path / "full"))
    assert res.returncode == 2 and "not empty" in res.stderr
    assert os.listdir(tmp_path / "full") == ["keep.txt"]

    # --allow-missing merges what there is and records the gap
    res = _epreplay("merge", str(node0), "--out", str(out), "--allow-missing")
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "manifest.json").read_text())["extra"]["missing_ranks"] == [4, 5, 6, 7]
    assert _epreplay("index", str(out)).returncode == 0
    assert _totals(out)["runs"][0][5] == "4,5,6,7"


# --- pure parts ------------------------------------------------------------------------------


def test_run_id_is_agreed_from_torchrun_arguments():
    def job(node: int, *extra: str, env: dict | None = None) -> Job:
        return job_of(["torchrun", "--nnodes", "2", "--node-rank", str(node), *extra,
                       "train.py", "--nnodes", "9"], env or {})

    a, b = job(0, "--master-addr", "10.0.0.1", "--master-port", "29500"), \
        job(1, "--master-addr=10.0.0.1", "--master_port=29500")
    assert (a.nnodes, a.node_rank, b.node_rank) == (2, 0, 1)  # the script's own --nnodes is not read
    assert a.run_id() == b.run_id() and a.run_id().startswith("job-")
    assert job(0, "--master-addr", "10.0.0.1", "--master-port", "29501").run_id() != a.run_id()
    named = job(1, "--rdzv-backend", "c10d", "--rdzv-endpoint", "h:1", "--rdzv-id", "exp 7")
    assert named.node_rank == 1 and named.run_id().startswith("exp-7-")
    elastic = job_of(["python", "-m", "torch.distributed.run", "--nnodes=1:4", "--rdzv-backend=c10d",
                      "--rdzv-endpoint=h:1", "x.py"], {"SLURM_JOB_ID": "4242"})
    assert (elastic.nnodes, elastic.node_rank, elastic.name) == (4, -1, "4242")
    from_env = job_of(["torchrun", "x.py"], {"PET_NNODES": "2", "PET_NODE_RANK": "1",
                                             "MASTER_ADDR": "m", "MASTER_PORT": "5"})
    assert (from_env.node_rank, from_env.endpoint) == (1, "m:5")
    assert job_of(["torchrun", "--nproc-per-node", "8", "x.py"], {}).run_id() is None  # one node
    assert job_of(["python", "x.py"], {}) == Job()
    assert check_run_id("job-7.a_b") == "job-7.a_b"
    with pytest.raises(ValueError, match="--run-id '../x'"):
        check_run_id("../x")


def test_clock_estimate_recovers_node_offsets_despite_stragglers():
    rng = np.random.default_rng(0)
    R, C = 16, 200
    node_R = np.arange(R) // 4  # 4 nodes of 4 ranks
    true_G = np.array([0, 2_500_000, -700_000, 41_000_000])  # ns, node 0 the reference
    T_C = np.cumsum(rng.integers(200_000, 400_000, C))  # when each collective completes
    arrive_RC = T_C[None, :] - rng.integers(10_000, 150_000, (R, C))
    arrive_RC[3, ::3] = T_C[::3] - 1_000  # rank 3 straggles: late starts, short calls
    end_RC = T_C[None, :] + rng.integers(0, 20_000, (R, C))  # leave together, within 20 us
    start_RC = arrive_RC + true_G[node_R][:, None]
    dur_RC = end_RC - arrive_RC
    rank_N = np.repeat(np.arange(R), C)
    est = estimate(rank_N, np.zeros(R * C, np.int64), np.tile(np.arange(C), R),
                   np.full(R * C, int(Op.DISPATCH)), start_RC.ravel(), dur_RC.ravel(),
                   node_of={r: int(node_R[r]) for r in range(R)})
    got = np.array([n.offset_ns for n in est.nodes])
    assert np.abs(got - true_G).max() < 20_000, got  # within the kernels' 20 us tail
    assert est.skew_ns == pytest.approx(41_700_000, abs=40_000)
    # layout is local (no sync): layout-only records estimate nothing, offsets stay 0
    lay = estimate(rank_N, np.zeros(R * C, np.int64), np.tile(np.arange(C), R),
                   np.full(R * C, int(Op.LAYOUT)), start_RC.ravel(), dur_RC.ravel(), node_of={})
    assert not lay.offset_R.any()
    # one node: one clock, nothing applied
    one = estimate(rank_N, np.zeros(R * C, np.int64), np.tile(np.arange(C), R),
                   np.full(R * C, int(Op.COMBINE)), start_RC.ravel(), dur_RC.ravel(),
                   node_of={r: 0 for r in range(R)})
    assert not one.offset_R.any() and len(one.nodes) == 1
