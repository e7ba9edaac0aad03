"""A Ctrl-C to `epreplay record`'s process group reaches the recorded job once, not twice."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

# A DeepEP client that records 2 steps on 2 gloo ranks, then waits for Ctrl-C in its main
# process, counting every SIGINT it gets, and writes the count when no other came for a while.
CLIENT = textwrap.dedent('''
    import signal, sys, time
    import torch
    from epreplay.launch import run_ranks

    def rank_fn(ctx):
        import deep_ep
        import torch.distributed as dist
        buffer = deep_ep.Buffer(dist.group.WORLD, int(1e8), 0)
        g = torch.Generator().manual_seed(ctx.rank)
        for step in range(2):
            x = torch.randn(8, 32, generator=g).to(torch.bfloat16)
            topk_idx = torch.topk(torch.rand(8, 8, generator=g), 2, dim=1).indices
            n_rank, n_rdma, n_exp, in_rank, _ = buffer.get_dispatch_layout(topk_idx, 8)
            recv_x, _, _, _, handle, _ = buffer.dispatch(
                x, num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma,
                is_token_in_rank=in_rank, num_tokens_per_expert=n_exp,
                topk_idx=topk_idx, topk_weights=torch.rand(8, 2, generator=g))
            buffer.combine(recv_x, handle)
        return 0

    if __name__ == "__main__":
        out, ready = sys.argv[1], sys.argv[2]
        run_ranks(rank_fn, 2, timeout=120)
        got = []
        signal.signal(signal.SIGINT, lambda *_: got.append(time.monotonic()))
        open(ready, "w").close()
        deadline = time.monotonic() + 60
        # after the first SIGINT, wait 2 s for a second one (a forwarded copy comes within ms)
        while time.monotonic() < deadline and not (got and time.monotonic() - got[0] > 2.0):
            time.sleep(0.05)
        open(out, "w").write(str(len(got)))
        sys.exit(130 if got else 1)
''')


@pytest.mark.slow
def test_ctrl_c_to_the_group_reaches_the_job_once_and_the_run_stays_usable(tmp_path):
    client, count, ready, run = (tmp_path / n for n in ("client.py", "count", "ready", "run"))
    client.write_text(CLIENT)
    # a session of its own: killpg below is what a terminal's Ctrl-C does to its foreground group
    proc = subprocess.Popen([sys.executable, "-m", "epreplay", "record", "--out", str(run), "--",
                             sys.executable, str(client), str(count), str(ready)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "EPREPLAY_EMULATE_DEEP_EP": "1"})
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), proc.communicate(timeout=10)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert count.read_text() == "1", err  # 2 when record passes on the copy its group already got
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    inspect = subprocess.run([sys.executable, "-m", "epreplay", "inspect", str(run), "--format", "json"],
                             capture_output=True, text=True, timeout=60)
    assert inspect.returncode == 0, inspect.stdout + inspect.stderr
    doc = json.loads(inspect.stdout)
    assert doc["healthy"] and doc["run"]["world_size"] == 2 and doc["run"]["interrupted"]
    assert [s["health"] for s in doc["shards"]] == ["complete", "complete"]
    assert doc["run"]["records"] == 2 * 2 * 3  # 2 ranks x 2 steps x layout, dispatch, combine


def test_sigint_to_record_alone_reaches_a_job_in_another_group(tmp_path):
    """A job that left record's process group (its own session) gets record's SIGINT."""
    flag = tmp_path / "got"
    job = textwrap.dedent(f'''
        import os, signal, sys, time
        os.setsid()
        signal.signal(signal.SIGINT, lambda *_: (open({str(flag)!r}, "a").write("x"), sys.exit(0)))
        open({str(flag) + ".ready"!r}, "w").close()
        time.sleep(60)
    ''')
    proc = subprocess.Popen([sys.executable, "-m", "epreplay", "record", "--out", str(tmp_path / "run"), "--",
                             sys.executable, "-c", job], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "got.ready").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # to record only: the job is not in its group
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert flag.read_text() == "x", err
    assert proc.returncode == 0, err
