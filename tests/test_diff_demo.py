"""`epreplay diff` on recorded demo runs (real processes, real capture, real index).

Three runs of the demo workload (tests/conftest.py's shape) with one seed: the base release,
release "b" (the demo perturbs the routers of the odd layers, see
epreplay.demo.model.release_layers) and the base release with its batches shuffled across ranks
and rows (same tokens, other positions).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from epreplay.diff import compare as diff
from epreplay.diff import runs as diff_runs
from epreplay.format.run import RunDir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_runs(demo_run_dir, demo_run_factory, tmp_path_factory) -> dict[str, Path]:
    """The session's shared demo runs (tests/conftest.py), copied: the diff writes their index."""
    base = tmp_path_factory.mktemp("diffdemo")
    sources = {"a": demo_run_dir, "b": demo_run_factory(release="b"),
               "shuffled": demo_run_factory(shuffle_batches=True),
               # other tokens: the tags hash the seed, so no token of seed 1 matches one of seed 0
               "seed1": demo_run_factory(seed=1, steps=2)}
    return {name: Path(shutil.copytree(src, base / name)) for name, src in sources.items()}


def test_demo_run_against_itself(demo_runs) -> None:
    strictest = ["js>0", "js_mean>0", "hot_changed>0", "imbalance_ratio>1", "jaccard<1", "top1<1",
                 "weight_change>0", "matched<1"]  # anything but "identical" fails these
    res = diff_runs.diff_runs(demo_runs["a"], demo_runs["a"],
                              thresholds=[diff.parse_threshold(t) for t in strictest])
    assert res.passed and res.match == "tag"
    assert res.summary["js"] == 0.0 and res.summary["top1"] == 1.0 and res.summary["jaccard"] == 1.0
    assert res.summary["weight_change"] == 0.0  # measured: LL weights come from the combines


def test_demo_release_drifts_exactly_its_layers(demo_runs) -> None:
    manifest = RunDir.open(demo_runs["b"]).read_manifest()
    touched = set(manifest.extra["demo"]["release_layers"])
    assert touched == {1, 3}
    res = diff_runs.diff_runs(demo_runs["a"], demo_runs["b"])
    drifted = {r.layer for r in res.layers if r.js > 0 or r.tokens.top1 < 1.0 or r.tokens.jaccard < 1.0}
    assert drifted == touched
    assert {r.layer for r in res.layers[:len(touched)]} == touched  # worst first


def test_demo_shuffled_batches_match_by_tag(demo_runs) -> None:
    res = diff_runs.diff_runs(demo_runs["a"], demo_runs["shuffled"])
    assert res.match == "tag"
    assert res.summary["matched"] == 1.0
    assert res.summary["top1"] == 1.0 and res.summary["jaccard"] == 1.0
    assert res.summary["weight_change"] == pytest.approx(0.0, abs=1e-6)
    # Matched by position instead, the same runs look different: proof the tags did the work.
    pos = diff_runs.diff_runs(demo_runs["a"], demo_runs["shuffled"], match="position")
    assert pos.summary["top1"] < 1.0


def test_demo_cli_gate_exit_codes(demo_runs) -> None:
    a, b = str(demo_runs["a"]), str(demo_runs["b"])
    gate = ["--fail-on", "js>0.001", "--fail-on", "top1<0.99"]
    ok = subprocess.run([sys.executable, "-m", "epreplay", "diff", a, str(demo_runs["shuffled"]), *gate],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = subprocess.run([sys.executable, "-m", "epreplay", "diff", a, b, *gate, "--format", "json"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    doc = json.loads(bad.stdout)
    assert doc["verdict"] == "fail" and {f["metric"] for f in doc["failed"]} <= {"js", "top1"}
    assert all(f["layers"] == [1, 3] for f in doc["failed"])  # the release's layers, named
    assert {l["layer"] for l in doc["layers"][:2]} == {1, 3}


def test_demo_other_seed_matches_no_token_and_fails_the_gate(demo_runs) -> None:
    """Issue 20: seed 0 against seed 1 printed matched=0.0000 but jaccard=1.0000 top1=1.0000 and
    passed --fail-on 'top1<0.9' (exit 0). Agreement over no token is not measured; the gate fails."""
    a, other = str(demo_runs["a"]), str(demo_runs["seed1"])
    proc = subprocess.run([sys.executable, "-m", "epreplay", "diff", a, other, "--steps", "0:2",
                           "--fail-on", "top1<0.9", "--format", "json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["match"] == "tag" and doc["summary"]["matched"] == 0.0
    assert doc["summary"]["top1"] is None and doc["summary"]["jaccard"] is None
    assert doc["verdict"] == "fail" and doc["failed"][0]["measured"] is None
    assert "no tokens matched" in doc["failed"][0]["why"]
