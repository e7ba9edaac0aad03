"""`epreplay demo` as a user runs it: a real subprocess, real ranks, real files."""
from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import missing_parts


def demo(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epreplay", "demo", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,needle", [
    (["--experts", "30"], "--experts 30 is not divisible by --ranks 4"),
    (["--topk", "64"], "--topk 64 exceeds --experts 32"),
    (["--hidden", "100"], "--hidden 100"),
    (["--release", "zz"], "--release 'zz'"),
    (["--ranks", "4", "--replay-ranks", "3"], "--replay-ranks 3: must divide --ranks 4"),
    (["--level", "everything"], "--level"),
    (["--slow-rank", "9"], "--slow-rank 9"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], needle: str, tmp_path: Path) -> None:
    proc = demo(*args, "--out", str(tmp_path / "never"), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "never").exists()


def test_existing_run_is_never_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "shards").mkdir(parents=True)
    (out / "manifest.json").write_text("{}")
    proc = demo("--out", str(out), timeout=120)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert (out / "manifest.json").read_text() == "{}"


@pytest.mark.slow
@pytest.mark.skipif(missing_parts("epreplay.emulate") is not None, reason="the emulated Buffer is not built yet")
def test_summary_names_what_the_model_routes() -> None:
    """Unrecorded run, JSON summary: hottest experts, rows per rank and tokens equal the ones computed
    here from the model alone (independently of the processes and the Buffer)."""
    import torch

    from epreplay.demo_model import DemoConfig, local_routing

    proc = demo("--ranks", "2", "--steps", "2", "--layers", "2", "--experts", "16", "--no-record",
                "--format", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["run"] is None and [s["status"] for s in doc["steps"]] == ["ok", "skipped", "skipped"]
    torch.set_num_threads(1)
    cfg = DemoConfig(ranks=2, steps=2, layers=2, experts=16)
    load = np.zeros(16, np.int64)
    recv = np.zeros(2, np.int64)
    for s, r in itertools.product(range(2), range(2)):
        for idx, _ in local_routing(cfg, s, r):
            idx = idx.numpy()
            load += np.bincount(idx.ravel(), minlength=16)
            owner = idx // cfg.local_experts
            if cfg.is_prefill(s):  # a token arrives once per rank
                recv += [(owner == d).any(axis=1).sum() for d in range(2)]
            else:  # low-latency: once per (token, expert)
                recv += np.bincount(owner.ravel(), minlength=2)
    order = np.argsort(-load, kind="stable")[:5]
    assert [h["expert"] for h in doc["hottest"]] == order.tolist()
    assert doc["hottest"][0]["share"] == pytest.approx(load[order[0]] / load.sum())
    assert doc["received_per_rank"] == recv.tolist() and doc["most_loaded_rank"] == int(recv.argmax())
    assert doc["tokens"] == sum(cfg.tokens_on(s, r) for s in range(2) for r in range(2))


@pytest.mark.slow
@pytest.mark.skipif(missing_parts("epreplay.emulate", "epreplay.capture") is not None,
                    reason="the emulated Buffer or capture is not built yet")
def test_demo_records_replays_and_points_at_the_tui(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = demo("--ranks", "2", "--steps", "3", "--layers", "2", "--experts", "16", "--out", str(out))
    text = proc.stdout
    for label in ("tokens moved:", "hottest experts: e", "most loaded rank:"):
        assert label in text, text
    assert "run: ok" in text and f"recorded at level routing into {out}" in text, text + proc.stderr
    assert len(list((out / "shards").glob("rank-*.eprs"))) == 2
    assert (out / "manifest.json").exists()
    assert f"next: epreplay tui {out}" in text
    if missing_parts("epreplay.replay.driver") is None:
        assert re.search(r"replay: (ok|diverged) .*(no divergence|DIVERGED)", text), text
        assert list((out / "replays").glob("*.json")), "the replay report was not written"
    if missing_parts("epreplay.cmd_index") is None:
        assert "index: ok" in text and (out / "index.duckdb").exists(), text
    assert proc.returncode == (0 if "diverged" not in text else 1)
