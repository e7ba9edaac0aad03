"""SVG snapshots of the main panes at 100x30 on a fixed synthetic run (pytest-textual-snapshot).

Regenerate after an intended change with:
    .venv/bin/python -m pytest tests/test_tui_snapshots.py --snapshot-update
The run is generated from a fixed seed and run id, so nothing on screen depends on the machine
(no paths, no timestamps).
"""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("pytest_textual_snapshot")

from test_tui_support import add_replay, make_synth, settle  # noqa: E402

SIZE = (100, 30)


@pytest.fixture(scope="module")
def snap_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = make_synth(tmp_path_factory.mktemp("tui-snap") / "synth", run_id="snapshot-run")
    add_replay(run)
    return run


def _app(run: Path):
    from epreplay.tui.app import EpReplayApp
    from epreplay.tui.data import open_session

    return EpReplayApp(open_session(run))


def _keys(*keys: str, theme: str | None = None):
    async def run_before(pilot) -> None:
        if theme is not None:
            pilot.app.theme = theme
        await settle(pilot, pilot.app)
        for key in keys:
            await pilot.press(key)
            await settle(pilot, pilot.app)
        # A DataTable recomputes its column widths on a later idle pass: give the header one
        # more frame so the screenshot never catches it mid-update (seen as header padding flakes).
        await pilot.pause(0.1)
        await pilot.pause()

    return run_before


@pytest.mark.parametrize("keys", [
    pytest.param((), id="overview"),
    pytest.param(("2", "enter"), id="hot_experts_drill"),
    pytest.param(("3", "right_square_bracket", "right_curly_bracket", "right_curly_bracket"),
                 id="traffic_step0_layer1"),
    pytest.param(("4",), id="timeline"),
    pytest.param(("5",), id="divergences"),
])
def test_pane_snapshot(snap_compare, snap_run: Path, keys: tuple[str, ...]) -> None:
    assert snap_compare(_app(snap_run), terminal_size=SIZE, run_before=_keys(*keys))


def test_light_theme_snapshot(snap_compare, snap_run: Path) -> None:
    """The heatmap and the traffic totals on a light theme (cells carry their own colours)."""
    keys = ("3", "right_square_bracket")
    assert snap_compare(_app(snap_run), terminal_size=SIZE, run_before=_keys(*keys, theme="textual-light"))
