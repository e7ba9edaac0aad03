"""The demo workload on DeepEP V2 (`epreplay demo --deepep v2`): recorded, replayed, and routed
exactly as the V1 run of the same seed (`epreplay diff` finds no routing difference)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import DEMO_RUN


def _epreplay(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epreplay", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def test_demo_v2_routes_as_v1(demo_run_dir, demo_run_factory, tmp_path) -> None:
    from epreplay.demo.model import DemoConfig
    from epreplay.demo.pipeline import PipelineOptions, run_pipeline

    v2 = tmp_path / "v2"
    result = run_pipeline(DemoConfig(**DEMO_RUN), PipelineOptions(out=v2, deepep="v2", index=False), progress=None)
    assert result.exit_code == 0, result.steps
    replay = [s for s in result.steps if s.name == "replay"][0]
    assert replay.status == "ok" and "no divergence" in replay.note, replay
    assert json.loads((v2 / "manifest.json").read_text())["extra"]["demo"]["deepep"] == "v2"
    res = _epreplay("diff", str(demo_run_dir), str(v2), "--fail-on", "js>0", "--fail-on", "jaccard<1",
                    "--fail-on", "top1<1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "jaccard=1.0000" in res.stdout and "top1=1.0000" in res.stdout
    # the same check fails where the routing changed (a V1 run with release b's router)
    res = _epreplay("diff", str(demo_run_factory(release="b")), str(v2), "--fail-on", "js>0")
    assert res.returncode == 1, res.stdout + res.stderr


def test_demo_deepep_flag_usage_error() -> None:
    res = _epreplay("demo", "--deepep", "v3")
    assert res.returncode == 2 and "v3" in res.stderr
