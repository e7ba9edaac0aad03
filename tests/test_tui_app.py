"""Pilot tests of `epreplay tui`: walk every pane by keyboard on a production-shaped synthetic run
and a recorded demo run, and check what is shown against values computed from the shards.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("textual")

from test_tui_support import (DIVERGENCES, FIRST, STRAGGLER, SYNTH, add_replay, copy_run,  # noqa: E402
                              make_synth, screen_text, settle, shard_truth, sync)

from epreplay.tui import messages as M  # noqa: E402


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = make_synth(tmp_path_factory.mktemp("tui") / "synth")
    add_replay(run)
    return run


@pytest.fixture(scope="module")
def synth_truth(synth_run: Path):
    return shard_truth(synth_run)


def _app(run: Path, run_b: Path | None = None):
    from epreplay.tui.app import EpReplayApp
    from epreplay.tui.data import open_session

    return EpReplayApp(open_session(run, run_b))


def _last(msgs: list, kind: type):
    found = [m for m in msgs if isinstance(m, kind)]
    failed = sorted({f"{m.what}: {m.error}" for m in msgs if isinstance(m, M.FetchFailed)})
    assert found, f"no {kind.__name__} was posted (failed fetches: {failed})"
    return found[-1]


@sync
async def test_walk_every_pane_of_a_synthetic_run(synth_run: Path, synth_truth) -> None:
    from textual.widgets import DataTable, Static

    from epreplay.tui.heatmap import Heatmap
    from epreplay.tui.matrix import RankMatrix
    from epreplay.tui.screens_modal import HelpScreen

    truth = synth_truth
    hottest = truth.hottest()
    msgs: list = []
    app = _app(synth_run)
    async with app.run_test(size=(100, 30), message_hook=msgs.append) as pilot:
        await settle(pilot, app)
        # Overview: the hottest expert heads the table; the facts name the run's shape.
        ov = _last(msgs, M.OverviewLoaded).payload
        assert int(ov.hot.expert_N[0]) == hottest
        table = app.query_one("#hot-table", DataTable)
        assert table.get_row_at(0)[0] == str(hottest)
        assert int(table.get_row_at(0)[1]) == int(truth.total_E()[hottest])
        text = screen_text(app)
        assert f"ranks    {SYNTH['ranks']}   experts {SYNTH['experts']}" in text
        assert "0 truncated" in text and "dropped    0" in text

        # Hot experts: the heatmap is the layers x experts load of the shards, hottest column first.
        await pilot.press("2")
        await settle(pilot, app)
        heat = _last(msgs, M.HeatLoaded).payload
        hm = app.query_one("#hot-map", Heatmap)
        for row, layer in enumerate(heat.layer_L):
            assert hm.values_RC[row].astype(np.int64).tolist() == truth.total_E(int(layer)).tolist()
        assert int(hm.col_order[0]) == hottest
        assert f"hottest expert {hottest}:" in str(app.query_one("#hot-status", Static).render())

        # Drill into the cell under the cursor (first layer, hottest expert): load per step, senders.
        await pilot.press("enter")
        await settle(pilot, app)
        drill = _last(msgs, M.ExpertLoaded).payload
        layer0 = int(heat.layer_L[0])
        assert (drill.expert, drill.layer) == (hottest, layer0)
        want = truth.series(hottest, layer0)
        assert dict(zip(drill.series.step_S.tolist(), drill.series.tokens_S.tolist())) == want
        assert int(drill.senders.tokens_N.sum()) == sum(want.values())
        assert f"expert {hottest} (layer {layer0})" in screen_text(app)

        # `/` jumps to another expert (all layers).
        await pilot.press("slash", *"e7", "enter")
        await settle(pilot, app)
        drill = _last(msgs, M.ExpertLoaded).payload
        assert drill.expert == 7 and drill.layer is None
        assert dict(zip(drill.series.step_S.tolist(), drill.series.tokens_S.tolist())) == truth.series(7)

        # Traffic for step 0 (]) and layer 1 (} twice: all -> 0 -> 1): the shards' rows sent.
        await pilot.press("3", "right_square_bracket", "right_curly_bracket", "right_curly_bracket")
        await settle(pilot, app)
        tr = _last(msgs, M.TrafficLoaded).payload
        assert tr.selection.steps == (0, 1) and tr.selection.layer == 1
        want_RR = truth.sent[(0, 1)]
        m = app.query_one("#traffic-map", RankMatrix)
        assert m.values_RC.astype(np.int64).tolist() == want_RR.tolist()
        busiest = int(np.argmax(want_RR.sum(axis=0)))
        assert m.summary.busiest_receiver == busiest
        assert f"busiest receiver r{busiest}:" in screen_text(app)
        assert "step 0, layer 1" in str(app.query_one("#statusbar", Static).render())
        # Three fast steps forward: the matrix ends on step 3, whatever order the queries finish in.
        await pilot.press("right_square_bracket", "right_square_bracket", "right_square_bracket")
        await settle(pilot, app)
        assert m.values_RC.astype(np.int64).tolist() == truth.sent[(3, 1)].tolist()
        await pilot.press("left_square_bracket", "left_square_bracket", "left_square_bracket")
        await settle(pilot, app)

        # Timeline: the planted straggler (it arrives late; its peers wait inside the call) is
        # named and marked in every step.
        await pilot.press("4")
        await settle(pilot, app)
        tl = _last(msgs, M.TimelineLoaded).payload
        assert truth.straggler() == STRAGGLER
        assert int(tl.stragglers.rank_N[0]) == STRAGGLER
        assert int(tl.stragglers.last_N[0]) == int(truth.last_R[STRAGGLER])
        assert f"straggler: rank {STRAGGLER} " in screen_text(app)
        marks = app.query_one("#tl-map", Heatmap).marks_RC
        assert marks[:, STRAGGLER].all() and marks.sum() == marks.shape[0]

        # Divergences: the replay is selected and its first divergence is shown.
        await pilot.press("5")
        await settle(pilot, app)
        dv = _last(msgs, M.DivergencesLoaded).payload
        assert len(dv.divergences) == len(DIVERGENCES)
        pane = app.query_one("#divergences")
        cur = pane.current
        assert (cur.call, cur.rank, cur.kind) == (FIRST[0], FIRST[6], FIRST[8])
        text = screen_text(app)
        assert f"expected  {FIRST[12]}" in text and f"got       {FIRST[13]}" in text
        # moving down shows the next one
        await pilot.press("down")
        await pilot.pause()
        assert pane.current is not None and (pane.current.call, pane.current.rank) != (FIRST[0], FIRST[6])
        # Enter on the first one opens the traffic of its step and layer.
        await pilot.press("up", "enter")
        await settle(pilot, app)
        assert app.current == "traffic"
        assert _last(msgs, M.TrafficLoaded).payload.selection.steps == (FIRST[3], FIRST[3] + 1)
        assert _last(msgs, M.TrafficLoaded).payload.selection.layer == FIRST[4]

        # Diff with one run: says how to get one.
        await pilot.press("6")
        await settle(pilot, app)
        assert _last(msgs, M.DiffLoaded).payload.result is None
        assert "RUN_A RUN_B" in screen_text(app)

        # Letters switch panes too; help opens and closes; q quits.
        await pilot.press("h")
        await pilot.pause()
        assert app.current == "hot"
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape", "q")
        await pilot.pause()
    assert not [m for m in msgs if isinstance(m, M.FetchFailed)]


@sync
async def test_heatmap_scroll_zoom_click_jump_and_palette_at_80x24(synth_run: Path, synth_truth) -> None:
    from epreplay.tui.heatmap import Heatmap

    msgs: list = []
    app = _app(synth_run)
    async with app.run_test(size=(80, 24), message_hook=msgs.append) as pilot:
        await settle(pilot, app)
        # `/rank 5` from the overview opens the traffic with the cursor on rank 5 once it loads;
        # the letters typed do not trigger the app's single-letter keys.
        await pilot.press("slash", *"rank 5", "enter")
        await settle(pilot, app)
        assert app.current == "traffic" and app.query_one("#traffic-map").cursor == (5, 5)
        await pilot.press("slash", *"l2", "enter")
        await settle(pilot, app)
        assert app.selection.layer == 2 and app.current == "traffic"
        # A step window: ] selects step 0, + + widens it to steps 0..2, ] moves it, - narrows it.
        await pilot.press("a", "right_square_bracket", "plus", "plus")
        assert app.selection.steps == (0, 3)
        await pilot.press("right_square_bracket", "minus")
        assert app.selection.steps == (1, 3)
        await settle(pilot, app)
        tr = _last(msgs, M.TrafficLoaded).payload
        assert tr.selection.steps == (1, 3)
        want = sum(synth_truth.sent[(s, l)] for s in (1, 2) for l in range(SYNTH["layers"]))
        assert tr.tokens_RR.tolist() == want.tolist()
        await pilot.press("a", "2")
        await settle(pilot, app)
        hm = app.query_one("#hot-map", Heatmap)
        await pilot.press("s")  # natural expert order
        await pilot.press("end")
        await pilot.pause()
        assert hm.data_cursor[1] == SYNTH["experts"] - 1
        assert hm.scroll_offset.x > 0  # the last column is on screen
        await pilot.press("z", "z")  # colour-only cells: everything fits
        await pilot.pause()
        assert hm.cell_w == 1 and hm.virtual_size.width < 80
        await pilot.press("slash", *"e999", "enter")
        await pilot.pause()
        assert any("expert 999" in n.message for n in app._notifications)

        # A click on a cell drills into it: here the third column of the second layer row.
        await pilot.press("s", "z")  # back to load order, number cells
        await pilot.pause()
        msgs.clear()
        await pilot.click("#hot-map", offset=(hm._gutter + 2 * hm.cell_w + 1, 2))
        await settle(pilot, app)
        drill = _last(msgs, M.ExpertLoaded).payload
        assert drill.expert == int(hm.col_order[2]) and drill.layer == int(app.pane("hot").heat.layer_L[1])

        # The command palette switches panes.
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"Show Traffic")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await settle(pilot, app)
        assert app.current == "traffic"


@sync
async def test_diff_pane_compares_two_runs(synth_run: Path, tmp_path: Path) -> None:
    from textual.widgets import DataTable

    from epreplay.diff import metrics

    run_b = make_synth(tmp_path / "b", run_id="tui-synth-b", seed=11, release="b")
    ta, tb = shard_truth(synth_run), shard_truth(run_b)
    msgs: list = []
    app = _app(synth_run, run_b)
    async with app.run_test(size=(100, 30), message_hook=msgs.append) as pilot:
        await settle(pilot, app)
        await pilot.press("6")
        await settle(pilot, app)
        res = _last(msgs, M.DiffLoaded).payload.result
        assert res is not None
        table = app.query_one("#diff-table", DataTable)
        assert table.row_count == SYNTH["layers"]
        worst_layer = int(table.get_row_at(0)[0])
        js = {l: metrics.js_divergence(ta.total_E(l), tb.total_E(l)) for l in range(SYNTH["layers"])}
        assert worst_layer == max(js, key=lambda l: (js[l], -l))
        assert float(table.get_row_at(0)[1]) == pytest.approx(js[worst_layer], abs=1e-4)
        keys = [m.key for m in msgs if isinstance(m, M.DiffLoaded)]  # distribution level, then tokens
        assert keys[0] == ("none",) and keys[-1] == ("auto",)
        assert table.get_row_at(0)[5] != "-"  # top-1 agreement of matched tokens
        assert "vs  B tui-synth-b" in screen_text(app)


@pytest.mark.slow
@sync
async def test_walk_a_recorded_demo_run(demo_run_dir: Path, tmp_path: Path) -> None:
    from textual.widgets import DataTable

    from epreplay.index import build as index_mod
    from epreplay.tui.matrix import RankMatrix

    run = copy_run(demo_run_dir, tmp_path / "demo")
    index_mod.ensure_index(run, progress=False)
    truth = shard_truth(run)
    msgs: list = []
    app = _app(run)
    async with app.run_test(size=(100, 30), message_hook=msgs.append) as pilot:
        await settle(pilot, app)
        assert app.query_one("#hot-table", DataTable).get_row_at(0)[0] == str(truth.hottest())
        await pilot.press("2", "enter")
        await settle(pilot, app)
        drill = _last(msgs, M.ExpertLoaded).payload
        assert drill.expert == truth.hottest()
        await pilot.press("3", "right_square_bracket", "right_curly_bracket")  # step 0, first layer
        await settle(pilot, app)
        sel = _last(msgs, M.TrafficLoaded).payload.selection
        want = truth.sent[(sel.steps[0], sel.layer)]
        assert app.query_one("#traffic-map", RankMatrix).values_RC.astype(np.int64).tolist() == want.tolist()
        await pilot.press("4")
        await settle(pilot, app)
        tl = _last(msgs, M.TimelineLoaded).payload
        if tl.captured:
            # No straggler is planted in the demo run, so several ranks may tie for "arrived last
            # most often": the one shown must be among them (the shards break no tie).
            assert int(tl.stragglers.rank_N[0]) in np.flatnonzero(truth.last_R == truth.last_R.max())
            assert int(tl.stragglers.last_N[0]) == int(truth.last_R.max())
        for key in ("5", "6", "1"):
            await pilot.press(key)
            await settle(pilot, app)
    assert not [m for m in msgs if isinstance(m, M.FetchFailed)]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "epreplay", "tui", *args], capture_output=True,
                          text=True, timeout=60)


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, synth_run: Path) -> None:
    out = _cli(str(tmp_path / "nope"))
    assert out.returncode == 2 and "no such run directory" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "file").write_text("x")
    out = _cli(str(tmp_path / "file"))
    assert out.returncode == 2 and "not a run directory" in out.stderr
    out = _cli(str(synth_run), str(tmp_path / "nope-b"))
    assert out.returncode == 2 and "nope-b" in out.stderr
    (tmp_path / "empty" / "shards").mkdir(parents=True)
    out = _cli(str(tmp_path / "empty"))
    assert out.returncode == 2 and "no shards" in out.stderr and "Traceback" not in out.stderr


def test_the_index_is_built_before_the_app_when_missing(synth_run: Path, tmp_path: Path) -> None:
    from epreplay.tui.cmd_tui import prepare

    run = copy_run(synth_run, tmp_path / "noindex")
    (run / "index.duckdb").unlink()
    prepare(str(run))
    assert (run / "index.duckdb").exists()


def test_an_index_of_another_format_is_refused_with_the_fix(synth_run: Path, tmp_path: Path) -> None:
    import duckdb

    run = copy_run(synth_run, tmp_path / "old")
    con = duckdb.connect(str(run / "index.duckdb"))
    con.execute("UPDATE runs SET index_version = 0")
    con.close()
    out = _cli(str(run), "--no-build")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "index format 0" in out.stderr and f"epreplay index {run} --force" in out.stderr


@sync
async def test_matrix_renders_only_the_visible_cells_of_144_ranks() -> None:
    from textual.app import App

    from epreplay.tui.matrix import RankMatrix

    ranks = 144
    rng = np.random.default_rng(0)
    traffic = rng.integers(0, 1000, (ranks, ranks))
    traffic[:, 97] += 5000  # the busiest receiver

    class One(App):
        def compose(self):
            yield RankMatrix(id="m")

    app = One()
    async with app.run_test(size=(80, 24)) as pilot:
        m = app.query_one(RankMatrix)
        summary = m.set_traffic(traffic)
        m.focus()
        await pilot.pause()
        assert summary.busiest_receiver == 97
        visible = (80 - m._gutter) // m.cell_w + 2
        line = m.render_line(1)
        cells = [s for s in line if s.style is not None and s.style.bgcolor is not None]
        assert 0 < len(cells) <= visible  # only what fits on screen was built
        assert line.text.split()[0] == "r0"
        # jump to the far corner: the view scrolls, the last rank's row and column show
        m.move_to(row=ranks - 1, col=ranks - 1)
        await pilot.pause()
        assert m.scroll_offset.y > 0 and m.scroll_offset.x > 0
        rows = [m.render_line(y).text for y in range(m.size.height)]
        assert any(r.lstrip().startswith(f"r{ranks - 1} ") for r in rows)
        assert str(ranks - 1) in rows[0]
        # the busiest receiver's column label carries the highlight style
        m.move_to(col=97)
        m.action_move(0, -1)  # the cursor's own label style would cover it
        await pilot.pause()
        header = m.render_line(0)
        hl = m.get_component_rich_style("heatmap--highlight")
        assert "".join(seg.text for seg in header if seg.style == hl).strip() == "97"


REAL_RUN = Path(__file__).parent / "data" / "deepep-demo-h200x2"


@pytest.mark.skipif(not REAL_RUN.is_dir(), reason="no recorded DeepEP run in tests/data")
@sync
async def test_walk_a_run_recorded_with_real_deepep(tmp_path: Path) -> None:
    """A run recorded on 2 x H200 with DeepEP itself (CUDA-event durations) opens like any other."""
    from textual.widgets import DataTable

    from epreplay.index import build as index_mod
    from epreplay.tui.matrix import RankMatrix

    run = copy_run(REAL_RUN, tmp_path / "real")
    index_mod.ensure_index(run, progress=False)
    truth = shard_truth(run)
    msgs: list = []
    app = _app(run)
    async with app.run_test(size=(100, 30), message_hook=msgs.append) as pilot:
        await settle(pilot, app)
        assert app.query_one("#hot-table", DataTable).get_row_at(0)[0] == str(truth.hottest())
        await pilot.press("3", "right_square_bracket", "right_curly_bracket")
        await settle(pilot, app)
        sel = _last(msgs, M.TrafficLoaded).payload.selection
        want = truth.sent[(sel.steps[0], sel.layer)]  # step 0 is a prefill (normal dispatch)
        assert app.query_one("#traffic-map", RankMatrix).values_RC.astype(np.int64).tolist() == want.tolist()
        await pilot.press("4")
        await settle(pilot, app)
        tl = _last(msgs, M.TimelineLoaded).payload
        assert tl.captured
        assert int(tl.stragglers.rank_N[0]) in np.flatnonzero(truth.last_R == truth.last_R.max())
        assert int(tl.stragglers.last_N[0]) == int(truth.last_R.max())
    assert not [m for m in msgs if isinstance(m, M.FetchFailed)]


@sync
async def test_a_query_failing_on_an_older_index_layout_is_a_notice_not_a_crash(synth_run: Path,
                                                                               tmp_path: Path) -> None:
    import duckdb

    run = copy_run(synth_run, tmp_path / "older")
    con = duckdb.connect(str(run / "index.duckdb"))
    con.execute("DROP TABLE expert_load_rank")  # as if built before the table existed
    con.close()
    msgs: list = []
    app = _app(run)
    async with app.run_test(size=(100, 30), message_hook=msgs.append) as pilot:
        await settle(pilot, app)
        await pilot.press("2", "enter")
        await settle(pilot, app)
        failed = [m for m in msgs if isinstance(m, M.FetchFailed)]
        assert failed and f"epreplay index {run} --force" in failed[0].error
        assert any("--force" in n.message for n in app._notifications)
        await pilot.press("3")  # the app keeps working
        await settle(pilot, app)
        assert _last(msgs, M.TrafficLoaded)


@sync
async def test_reload_picks_up_a_new_replay_report(synth_run: Path, tmp_path: Path) -> None:
    import json

    run = copy_run(synth_run, tmp_path / "live")
    msgs: list = []
    app = _app(run)
    async with app.run_test(size=(100, 30), message_hook=msgs.append) as pilot:
        await settle(pilot, app)
        await pilot.press("5")
        await settle(pilot, app)
        assert [r.replay for r in _last(msgs, M.DivergencesLoaded).payload.replays] == ["rp-0001"]
        # `epreplay replay` writes its report while the TUI is open; `r` brings it in.
        div = dict(call=2, buffer=0, seq=2, step=0, layer=1, op="dispatch", rank=4, physical=1,
                   kind="count", token=-1, src_rank=-1, expert=9, expected="5", got="6",
                   detail="tokens per expert")
        report = dict(id="rp-0002", run_id="tui-synth-run", created="2026-01-02T00:00:00",
                      backend="emulated", device="cpu", payload="synthetic",
                      plan={"virtual_ranks": 16, "physical_ranks": 2}, calls=64, scheduled=64,
                      divergences=1, divergence_list=[div], verdict="DIVERGED")
        (run / "replays").mkdir(exist_ok=True)
        (run / "replays" / "rp-0002.json").write_text(json.dumps(report))
        await pilot.press("r")
        await settle(pilot, app)
        assert _last(msgs, M.Reloaded)
        d = _last(msgs, M.DivergencesLoaded).payload
        assert {r.replay for r in d.replays} == {"rp-0001", "rp-0002"}
        assert d.replay == "rp-0002"  # the newest diverged replay is opened
        cur = app.query_one("#divergences").current
        assert (cur.kind, cur.rank, cur.expert, cur.expected, cur.got) == ("count", 4, 9, "5", "6")


@sync
async def test_overview_reports_a_truncated_shard(synth_run: Path, tmp_path: Path) -> None:
    from textual.widgets import Static

    from epreplay.index import build as index_mod
    from epreplay.format.shard import open_shard

    run = copy_run(synth_run, tmp_path / "cut")
    shard = run / "shards" / "rank-00003.eprs"
    with open(shard, "r+b") as fh:  # a crash mid-write: no footer, half a record
        fh.truncate(shard.stat().st_size - 3000)
    with open_shard(shard) as scan:
        cut_at = scan.truncated_at
    assert cut_at is not None
    index_mod.ensure_index(run, progress=False)
    msgs: list = []
    app = _app(run)
    async with app.run_test(size=(100, 30), message_hook=msgs.append) as pilot:
        await settle(pilot, app)
        health = str(app.query_one("#health", Static).render())
        assert "1 truncated" in health and f"rank 3: truncated at byte {cut_at}" in health
        assert app.query_one("#health").has_class("bad")
