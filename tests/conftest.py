"""Shared fixtures: recorded demo runs (real processes, the emulated Buffer, real capture).

    def test_something(demo_run_dir):            # Path of a recorded run, session-wide, read-only
        run = RunDir.open(demo_run_dir)

    def test_other(demo_run_factory):            # other configurations, cached per arguments
        b = demo_run_factory(release="b")        # DemoConfig fields as keywords, plus level=...
        fp = demo_run_factory(level="fingerprints", steps=2)

The default run: 4 ranks, 4 steps (prefill at steps 0 and 3 through get_dispatch_layout /
dispatch / combine, decode at steps 1 and 2 through low_latency_dispatch / low_latency_combine),
4 MoE layers, top-4 of 32 experts, H=128, FP8 dispatch, seed 0, capture level `routing`,
tokens tagged. It holds manifest.json (extra["demo"] = the DemoConfig fields and
"release_layers") and shards/rank-0000{0..3}.eprs; no index and no replay (build those in the
test that needs them, into a copy if the test writes: these runs are shared by the session).
Fixtures skip (not fail) while the emulated Buffer or capture is missing.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable

import pytest

# The fixture run's shape (DemoConfig keywords); tests may rely on these values.
DEMO_RUN = dict(ranks=4, steps=4, layers=4, experts=32, topk=4, hidden=128, seed=0)


def missing_parts(*modules: str) -> str | None:
    """The first of `modules` that cannot be imported, or None."""
    for module in modules:
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except ImportError:
            return module
    return None


@pytest.fixture(scope="session")
def demo_run_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """factory(level="routing", **DemoConfig overrides) -> Path of a recorded demo run (cached)."""
    cache: dict[tuple, Path] = {}

    def make(*, level: str = "routing", **overrides: Any) -> Path:
        lacking = missing_parts("epreplay.emulate", "epreplay.capture", "epreplay.demo.pipeline")
        if lacking:
            pytest.skip(f"recorded demo runs need {lacking}, not built yet")
        key = (level, tuple(sorted(overrides.items())))
        if key not in cache:
            from epreplay.demo.model import DemoConfig
            from epreplay.demo.pipeline import PipelineOptions, run_pipeline

            out = tmp_path_factory.mktemp("demo-run") / "run"
            cfg = DemoConfig(**{**DEMO_RUN, **overrides})
            result = run_pipeline(cfg, PipelineOptions(out=out, level=level, index=False, replay=False),
                                  progress=None)
            assert result.out == out and result.exit_code == 0, result.steps
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def demo_run_dir(demo_run_factory: Callable[..., Path]) -> Path:
    """The default recorded demo run (see the module docstring). Treat it as read-only."""
    return demo_run_factory()
