"""A demo run recorded with the *real* DeepEP on two H200 GPUs, checked on this CPU machine.

tests/data/deepep-demo-h200x2 was made on 2 x H200 (NVLink), DeepEP V1 built from source:
    epreplay demo --device cuda --backend deepep --ranks 2 --hidden 2048 --out RUN --no-replay
(manifest.json + the two shards; 130 KB). It holds layout/dispatch/combine calls of the prefill
steps 0 and 3 and low-latency FP8 dispatch/combine calls of the decode steps, as DeepEP returned
them. Here it must (1) replay on CPU through the emulated Buffer with no divergence, on the
recorded 2 processes and folded onto 1, and (2) hold the routing the demo model computes on CPU.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import missing_parts

DATA = Path(__file__).parent / "data" / "deepep-demo-h200x2"


@pytest.fixture()
def run_copy(tmp_path: Path) -> Path:
    """A private copy: replay writes RUN/replays/ and the index."""
    dst = tmp_path / "run"
    shutil.copytree(DATA, dst)
    return dst


def test_recorded_routing_is_the_models() -> None:
    import torch

    from epreplay.demo.model import DemoConfig, local_routing
    from epreplay.format.records import Op
    from epreplay.format.run import RunDir
    from epreplay.format.shard import open_shard

    torch.set_num_threads(1)
    run = RunDir.open(DATA)
    fields = {k: v for k, v in run.read_manifest().extra["demo"].items()
              if k not in ("release_layers", "backend")}
    cfg = DemoConfig(**{**fields, "device": "cpu"})
    same = total = 0
    for path in run.shard_paths():
        rank = run.rank_of(path)
        with open_shard(path) as scan:
            recorded = {(r.header.step, r.header.layer): r.arrays["topk_idx_TK"]
                        for r in scan.records(ops=[Op.DISPATCH, Op.LL_DISPATCH])}
        assert len(recorded) == cfg.steps * cfg.layers
        for step in range(cfg.steps):
            for layer, (idx, _) in enumerate(local_routing(cfg, step, rank)):
                got = np.sort(recorded[(step, layer)], axis=1)
                want = np.sort(idx.numpy(), axis=1)
                assert got.shape == want.shape
                same += int((got == want).all(axis=1).sum())
                total += len(want)
    # GPU and CPU matmuls round differently in the last bit, which may flip a near-tie.
    assert same / total > 0.995, f"{same}/{total} tokens route as the CPU model does"


@pytest.mark.slow
@pytest.mark.skipif(missing_parts("epreplay.emulate", "epreplay.replay.driver") is not None,
                    reason="the emulated Buffer or the replayer is not built yet")
@pytest.mark.parametrize("ranks", [2, 1])
def test_deepep_recording_replays_on_cpu(run_copy: Path, ranks: int) -> None:
    from epreplay.replay import replay_run

    report = replay_run(run_copy, ranks, index=False)
    assert report.exit_code == 0, report.verdict
    assert report.calls_by_op.get("ll_dispatch") and report.calls_by_op.get("dispatch")
    assert report.divergences == 0 and not report.skipped
