"""The `deep_ep` stand-in: unmodified DeepEP client code runs on CPU through the emulation.

The client below is written the way SGLang's / Megatron's DeepEP dispatchers call DeepEP
(torchrun-style env:// init, a normal Buffer with get_dispatch_layout/dispatch/combine, a
low-latency Buffer with FP8 dispatch, a cast back, and a weighted combine). It knows nothing of
epreplay. Two real subprocesses form the group: rank 0 started with `python -m epreplay.standin`,
rank 1 with EPREPLAY_EMULATE_DEEP_EP=1 and a sitecustomize.py that imports epreplay.standin.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

from epreplay.launch import free_port

CLIENT = textwrap.dedent('''
    import os
    import torch
    import torch.distributed as dist
    import deep_ep

    def per_token_cast_back(x_fp8, x_scales):
        x = x_fp8.float().view(x_fp8.size(0), -1, 128)
        return (x * x_scales.view(x_fp8.size(0), -1, 1)).view(x_fp8.size(0), -1)

    dist.init_process_group(backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    num_experts, hidden, num_tokens, topk = 4 * world, 512, 16, 3
    torch.manual_seed(rank)
    scores = torch.randn(num_tokens, num_experts).abs()
    topk_idx = torch.topk(scores, topk, dim=-1).indices.to(deep_ep.topk_idx_t)
    topk_weights = torch.softmax(torch.gather(scores, 1, topk_idx), dim=-1).float()
    x = torch.randn(num_tokens, hidden).to(torch.bfloat16)

    # normal mode (prefill): SGLang's DeepEPNormalDispatcher
    deep_ep.Buffer.set_num_sms(24)
    buffer = deep_ep.Buffer(group, int(1e9), 0, low_latency_mode=False, num_qps_per_rank=1)
    config = deep_ep.Buffer.get_dispatch_config(group.size())
    previous_event = deep_ep.Buffer.capture()
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event = \\
        buffer.get_dispatch_layout(topk_idx, num_experts, previous_event=previous_event, async_finish=True,
                                   allocate_on_comm_stream=True)
    recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, previous_event=event, async_finish=True,
        allocate_on_comm_stream=True, expert_alignment=128, config=config)
    event.current_stream_wait()
    assert len(handle) == 6 and len(num_recv_tokens_per_expert_list) == num_experts // world
    # experts: each local expert scales its tokens by 2; the rank reduces its experts' weighted rows
    expert_out = torch.zeros(recv_x.shape, dtype=torch.float32)
    for k in range(topk):
        sel = recv_topk_idx[:, k] >= 0
        expert_out[sel] += recv_x[sel].float() * 2 * recv_topk_weights[sel, k:k + 1]
    combined_x, _, event = buffer.combine(expert_out.to(torch.bfloat16), handle, async_finish=True,
                                          previous_event=deep_ep.Buffer.capture(),
                                          config=deep_ep.Buffer.get_combine_config(group.size()))
    with event:
        pass
    ref = x.float() * 2
    diff = (combined_x.float() - ref).abs().max().item()
    assert diff < 0.1, diff

    # low-latency mode (decode): SGLang's DeepEPLLDispatcher
    num_max = 32
    ll = deep_ep.Buffer(group, 0, deep_ep.Buffer.get_low_latency_rdma_size_hint(num_max, hidden, world, num_experts),
                        low_latency_mode=True, num_qps_per_rank=num_experts // world)
    ll.clean_low_latency_buffer(num_max, hidden, num_experts)
    packed_recv_hidden, packed_recv_count, ll_handle, event, hook = ll.low_latency_dispatch(
        x, topk_idx, num_max, num_experts, use_fp8=True, async_finish=False, return_recv_hook=True)
    hook()
    fp8_x, scales = packed_recv_hidden
    num_local = num_experts // world
    expert_out = torch.stack([per_token_cast_back(fp8_x[e], scales[e]) * 2 for e in range(num_local)])
    combined, event, hook = ll.low_latency_combine(expert_out.to(torch.bfloat16), topk_idx, topk_weights, ll_handle,
                                                  return_recv_hook=True)
    hook()
    diff = (combined.float() - x.float() * 2).abs().max().item()
    assert diff < 0.08 * (x.float() * 2).abs().max().item(), diff  # FP8: ~3 significant bits
    print(f"CLIENT OK rank={rank} deep_ep={deep_ep.__version__} recv={recv_x.shape[0]} "
          f"ll={int(packed_recv_count.sum())}", flush=True)
    dist.destroy_process_group()
''')


def test_standin_finder_only_when_real_package_absent() -> None:
    from epreplay import standin

    assert importlib.util.find_spec("deep_ep") is None, "this test assumes no real deep_ep is installed"
    try:
        assert standin.install() is True
        import deep_ep
        from epreplay.emulate import Buffer

        assert deep_ep.Buffer is Buffer and deep_ep.EMULATED and str(deep_ep.topk_idx_t) == "torch.int64"
        import deep_ep.buffers.legacy as legacy

        assert legacy.Buffer is Buffer
    finally:
        standin.uninstall()
    assert importlib.util.find_spec("deep_ep") is None


def test_unmodified_client_runs_through_standin(tmp_path) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import epreplay.standin\n")
    port = free_port()
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    cmds = [
        ([sys.executable, "-m", "epreplay.standin", str(script)], dict(base, RANK="0")),
        ([sys.executable, str(script)], dict(base, RANK="1", EPREPLAY_EMULATE_DEEP_EP="1",
                                              PYTHONPATH=os.pathsep.join([str(site), base.get("PYTHONPATH", "")]))),
    ]
    procs = [subprocess.Popen(c, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c, e in cmds]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-3000:]}"
        assert f"CLIENT OK rank={rank} deep_ep=1.2.1+epreplay.emulated" in out, out[-2000:]


# A DeepEP-style client that starts its ranks the way DeepEP's own tests do
# (torch.multiprocessing.spawn, one `import deep_ep` per rank). It knows nothing of epreplay.
SPAWN_CLIENT = textwrap.dedent('''
    import os
    import sys

    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp


    def worker(rank, world, port):
        import deep_ep  # in the spawned child: a fresh interpreter

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        group = dist.new_group(list(range(world)))
        num_experts, hidden, num_tokens, topk = 2 * world, 64, 8, 2
        torch.manual_seed(rank)
        topk_idx = torch.topk(torch.rand(num_tokens, num_experts), topk, dim=-1).indices.to(deep_ep.topk_idx_t)
        topk_weights = torch.full((num_tokens, topk), 1.0 / topk)
        x = torch.randn(num_tokens, hidden).to(torch.bfloat16)
        buffer = deep_ep.Buffer(group, int(1e8), 0)
        per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
        recv_x, recv_idx, recv_w, recv_counts, handle, _ = buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        to_rank_R = in_rank.sum(dim=0).to(torch.int64)  # this rank's tokens bound for each rank
        dist.all_reduce(to_rank_R, group=group)
        assert recv_x.shape[0] == int(to_rank_R[rank]), (recv_x.shape, to_rank_R)
        combined, _, _ = buffer.combine(recv_x, handle)  # sums each token's copies: one per rank it went to
        want = x.float() * in_rank.sum(dim=1, keepdim=True).float()
        diff = (combined.float() - want).abs().max().item()
        assert diff < 0.1, diff
        print(f"SPAWN OK rank={rank} emulated={deep_ep.EMULATED} recv={recv_x.shape[0]}", flush=True)
        dist.destroy_process_group()


    def main():
        world, port = int(sys.argv[1]), int(sys.argv[2])
        mp.spawn(worker, args=(world, port), nprocs=world, join=True)


    if __name__ == "__main__":
        main()
''')


def _clean_env(**extra: str) -> dict[str, str]:
    """os.environ without PYTHONPATH or any EPREPLAY_* (no record, no sitecustomize of ours)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("EPREPLAY_")}
    return dict(env, OMP_NUM_THREADS="1", **extra)


def _run_spawn_client(tmp_path, argv: list[str], env: dict[str, str], world: int = 2) -> None:
    (tmp_path / "client.py").write_text(SPAWN_CLIENT)
    port = free_port()
    cmd = [sys.executable, *[a.format(world=world, port=port) for a in argv]]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=120)
    assert p.returncode == 0, f"{cmd} failed (rc {p.returncode}):\n{p.stdout[-3000:]}"
    for rank in range(world):
        assert f"SPAWN OK rank={rank} emulated=True" in p.stdout, p.stdout[-2000:]


def test_env_var_alone_reaches_spawned_ranks(tmp_path) -> None:
    """EPREPLAY_EMULATE_DEEP_EP=1 python client.py: the .pth gives every spawn child the stand-in."""
    _run_spawn_client(tmp_path, ["client.py", "{world}", "{port}"], _clean_env(EPREPLAY_EMULATE_DEEP_EP="1"))


def test_standin_runner_script_form_reaches_spawned_ranks(tmp_path) -> None:
    _run_spawn_client(tmp_path, ["-m", "epreplay.standin", "client.py", "{world}", "{port}"], _clean_env())


def test_standin_runner_module_and_code_forms(tmp_path) -> None:
    _run_spawn_client(tmp_path, ["-m", "epreplay.standin", "-m", "client", "{world}", "{port}"], _clean_env())
    _run_spawn_client(tmp_path, ["-m", "epreplay.standin", "-c", "import client; client.main()", "{world}",
                                 "{port}"], _clean_env())


def test_env_var_reaches_forkserver_children_and_subprocesses(tmp_path) -> None:
    """Without torch: the finder that answers for deep_ep in each child is ours (the .pth's work)."""
    code = textwrap.dedent('''
        import importlib.util, multiprocessing, subprocess, sys

        def which():
            return type(importlib.util.find_spec("deep_ep").loader).__module__

        if __name__ == "__main__":
            with multiprocessing.get_context("forkserver").Pool(1) as pool:
                print("forkserver", pool.apply(which))
            child = "import importlib.util as u; print(type(u.find_spec('deep_ep').loader).__module__)"
            out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True).stdout
            print("subprocess", out.strip())
    ''')
    (tmp_path / "kids.py").write_text(code)
    p = subprocess.run([sys.executable, "kids.py"], cwd=tmp_path, env=_clean_env(EPREPLAY_EMULATE_DEEP_EP="1"),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "forkserver epreplay.standin" in p.stdout and "subprocess epreplay.standin" in p.stdout, p.stdout


def test_standin_runner_names_a_missing_script(tmp_path) -> None:
    p = subprocess.run([sys.executable, "-m", "epreplay.standin", "nope.py"], cwd=tmp_path, env=_clean_env(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "nope.py: no such script" in p.stderr, p.stderr


def test_without_env_var_deep_ep_stays_missing() -> None:
    """The .pth does nothing (imports nothing of ours) when the variable is unset or 0."""
    code = textwrap.dedent('''
        import sys
        assert not [m for m in sys.modules if m.startswith("epreplay.")], sorted(sys.modules)
        try:
            import deep_ep
        except ModuleNotFoundError as e:
            print("MISSING", e.name)
    ''')
    for value in (None, "0"):
        env = _clean_env() if value is None else _clean_env(EPREPLAY_EMULATE_DEEP_EP=value)
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and "MISSING deep_ep" in p.stdout, (value, p.stdout, p.stderr)


def test_pth_is_installed_in_site_packages() -> None:
    """pip (editable or not) put epreplay_standin.pth where `site` reads it."""
    import site

    from epreplay import standin

    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    assert any(os.path.isfile(os.path.join(d, standin.PTH_NAME)) for d in dirs), (
        f"{standin.PTH_NAME} is in none of {dirs}; reinstall with 'pip install -e .' or run "
        f"'python -m epreplay.standin --install-pth'")
