"""`epreplay demo` as a user runs it: a real subprocess, real ranks, real files."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
    (["--backend", "deepep"], "--backend deepep needs --device cuda"),
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
