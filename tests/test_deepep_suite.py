"""DeepEP's own V1 test files, unmodified, on the emulated Buffer through the stand-in.

Skipped unless EPREPLAY_DEEPEP_SRC names a DeepEP source tree (a checkout, or `git archive` of
one): nothing of DeepEP's is committed here. Its tests/legacy/ (DeepEP's head) or tests/ (1.2.x
releases) files run as `python -m epreplay.standin test_x.py --num-processes N ...` from their
own folder, world size 1 (one GPU), and must exit 0.

They name device='cuda' throughout, so they need a GPU. Without one, EPREPLAY_DEEPEP_CPU=1 runs
the head layout with the stand-in's CUDA-as-CPU aid (EPREPLAY_STANDIN_CUDA_AS_CPU=1, gloo);
releases' own tests/utils.py hard-codes NCCL and cannot run there. On CPU the low-latency file
takes very long (its recv-hook benchmark multiplies 8192 x 8192 float32 matrices 120 times).
Each run's output is kept in the test's tmp folder (deepep-<name>.log).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epreplay.launch import free_port

SRC = os.environ.get("EPREPLAY_DEEPEP_SRC", "")
CPU_AID = os.environ.get("EPREPLAY_DEEPEP_CPU", "") == "1"
pytestmark = [
    pytest.mark.skipif(not SRC, reason="set EPREPLAY_DEEPEP_SRC to a DeepEP source tree to run its V1 tests"),
    pytest.mark.skipif(not torch.cuda.is_available() and not CPU_AID,
                       reason="DeepEP's tests need CUDA (or EPREPLAY_DEEPEP_CPU=1: the CUDA-as-CPU aid)"),
]

# Shapes small enough for a short run, still DeepEP's kinds: hidden a multiple of 512 (UE8M0),
# experts a multiple of the ranks, 128 tokens at most for low latency (DeepEP's own default).
RUNS = {
    "low_latency": ["--num-processes", "1", "--num-tokens", "64", "--hidden", "2048", "--num-topk", "8",
                    "--num-experts", "32"],
    "intranode": ["--num-processes", "1", "--num-tokens", "256", "--hidden", "2048", "--num-topk", "8",
                  "--num-experts", "32"],
}


def _tests_dir() -> Path:
    root = Path(SRC)
    for sub in ("tests/legacy", "tests"):
        if (root / sub / "test_low_latency.py").is_file():
            return root / sub
    pytest.fail(f"EPREPLAY_DEEPEP_SRC={SRC}: no tests/legacy/test_low_latency.py or tests/test_low_latency.py "
                f"there; point it at the root of a DeepEP source tree")


@pytest.mark.parametrize("name", sorted(RUNS))
def test_deepep_v1_test_file_passes_unmodified(name: str, tmp_path) -> None:
    folder = _tests_dir()
    if not torch.cuda.is_available() and not (folder.name == "legacy"):
        pytest.skip("releases' tests/utils.py hard-codes NCCL: their files need a GPU")
    import site

    from epreplay import standin

    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    assert any(os.path.isfile(os.path.join(d, standin.PTH_NAME)) for d in dirs), (
        f"the spawned ranks need {standin.PTH_NAME} in site-packages ({dirs}): 'pip install -e .' or "
        f"'python -m epreplay.standin --install-pth'")
    # PYTHONPATH kept (it may be how epreplay is found); no EPREPLAY_* knob of the caller's leaks in
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPREPLAY_")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if not torch.cuda.is_available():
        env["EPREPLAY_STANDIN_CUDA_AS_CPU"] = "1"
    cmd = [sys.executable, "-m", "epreplay.standin", f"test_{name}.py", *RUNS[name]]
    p = subprocess.run(cmd, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=3600 if CPU_AID else 900)
    (tmp_path / f"deepep-{name}.log").write_text(p.stdout)
    assert p.returncode == 0, f"{' '.join(cmd)} (in {folder}) exited {p.returncode}:\n{p.stdout[-5000:]}"
    assert "Traceback" not in p.stdout, p.stdout[-5000:]
