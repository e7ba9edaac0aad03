"""The stand-in's deep_ep.utils.envs / .math / .testing: what DeepEP's V1 tests import from them.

A DeepEP-test-shaped script (spawned ranks, `from deep_ep.utils.envs import init_dist`, ...)
runs through `python -m epreplay.standin` on 2 gloo ranks and checks, against values computed
here independently: init_dist's group, backend, dtype and seeds; the math helpers; and that
bench / bench_kineto time the emulated Buffer's dispatch and combine (one phase and, with the
recv hook, two phases per call), as DeepEP's kineto bench finds its kernels.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from epreplay.launch import free_port

SCRIPT = textwrap.dedent('''
    import sys
    import torch
    import torch.distributed as dist
    import deep_ep
    from deep_ep.utils.envs import init_dist, get_local_seed
    from deep_ep.utils.math import (calc_diff, inplace_unique, per_token_cast_to_fp8, per_token_cast_back,
                                    hash_tensor, align, ceil_div)
    from deep_ep.utils.testing import bench, bench_kineto


    def loop(local_rank, num_local_ranks):
        rank, world, group = init_dist(local_rank, num_local_ranks, seed=7)
        assert (rank, world) == (local_rank, num_local_ranks) and group.size() == world
        assert dist.get_backend() == "gloo" and torch.get_default_dtype() == torch.bfloat16
        assert get_local_seed() == 7 + rank
        # math helpers against plain loops
        x = torch.randn(6, 200, dtype=torch.float32).to(torch.bfloat16)
        q, s = per_token_cast_to_fp8(x)
        assert q.shape == (6, 200) and q.dtype == torch.float8_e4m3fn and s.shape == (6, 2)
        for t in range(6):
            for g in range(2):
                amax = max(float(x[t, g * 128:(g + 1) * 128].float().abs().max()), 1e-4)
                assert abs(float(s[t, g]) - amax / 448) <= 1e-6 * amax
        back = per_token_cast_back(q, s)
        assert back.dtype == torch.bfloat16 and calc_diff(back, x) < 1e-3 and calc_diff(x, x) == 0
        r = torch.tensor([[3, 1, 3, -1], [-1, -1, -1, -1], [0, 2, 1, 0]])
        inplace_unique(r, 4)
        assert r.tolist() == [[3, 1, -1, -1], [-1, -1, -1, -1], [2, 1, 0, -1]], r.tolist()
        assert hash_tensor(torch.tensor([1, 2, 3], dtype=torch.int32)) == 6 and align(130, 128) == 256
        assert ceil_div(7, 2) == 4
        # bench / bench_kineto over the emulated low-latency Buffer
        E, T, H = 4 * world, 8, 256
        buf = deep_ep.Buffer(group, low_latency_mode=True, explicitly_destroy=True)
        idx = torch.randint(0, E, (T, 2), dtype=torch.int64)
        w = torch.rand(T, 2, dtype=torch.float32)
        xb = torch.randn(T, H, dtype=torch.float32).to(torch.bfloat16)

        def call(hook):
            recv, _, handle, _, h = buf.low_latency_dispatch(xb, idx, T, E, use_fp8=False, return_recv_hook=hook)
            h() if hook else None
            _, _, h = buf.low_latency_combine(recv, idx, w, handle, return_recv_hook=hook)
            h() if hook else None

        avg, lo, hi = bench(lambda: call(False), num_warmups=2, num_tests=4)
        assert 0 < lo <= avg <= hi
        d, c = bench_kineto(lambda: call(False), ("dispatch", "combine"), num_tests=3, barrier_comm_profiling=True,
                            suppress_kineto_output=True)
        assert d > 0 and c > 0, (d, c)
        d, c = bench_kineto(lambda: call(True), ("dispatch", "combine"), num_tests=3, suppress_kineto_output=True,
                            num_kernels_per_period=2)
        assert len(d) == len(c) == 2 and min(d + c) > 0, (d, c)
        try:
            bench_kineto(lambda: call(False), "no_such_kernel", num_tests=1)
            raise SystemExit("bench_kineto must name a kernel it cannot find")
        except AssertionError as exc:
            assert "no_such_kernel" in str(exc)
        buf.destroy()
        dist.barrier()
        print(f"HELPERS OK rank={rank}", flush=True)
        dist.destroy_process_group()


    if __name__ == "__main__":
        torch.multiprocessing.spawn(loop, args=(2,), nprocs=2)
''')


def test_deepep_test_helpers_on_gloo(tmp_path) -> None:
    (tmp_path / "helpers_client.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("EPREPLAY_")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "epreplay.standin", "helpers_client.py"], cwd=tmp_path, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-4000:]
    for rank in range(2):
        assert f"HELPERS OK rank={rank}" in p.stdout, p.stdout[-3000:]
