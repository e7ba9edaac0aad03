"""The TUI's pure rendering maths (epreplay.tui.render, matrix.summarize, jump parsing), no Textual app."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from epreplay.errors import UsageError
from epreplay.tui import render
from epreplay.tui.jump import Jump, parse_jump


def test_levels_are_linear_with_zero_reserved_and_small_values_visible():
    v = np.array([[0, 1, 50, 100], [np.nan, -3, 99, 12]])
    lv = render.levels(v)
    n = len(render.SCALE)
    assert lv[0].tolist() == [0, 1, int(np.ceil(0.5 * n)), n]
    assert lv[1, 0] == 0 and lv[1, 1] == 0  # NaN and negatives are "nothing"
    assert lv[1, 2] == n and 1 <= lv[1, 3] < n
    assert render.levels(np.zeros((2, 2))).max() == 0
    # an explicit vmax clips above it
    assert render.levels(np.array([[5, 20]]), vmax=10).tolist() == [[int(np.ceil(0.5 * n)), n]]


def test_levels_are_monotonic_in_value():
    v = np.arange(0, 1000).reshape(1, -1)
    lv = render.levels(v)[0]
    assert (np.diff(lv) >= 0).all() and lv[0] == 0 and lv[-1] == len(render.SCALE)


@pytest.mark.parametrize("value,text", [(0, "0"), (7, "7"), (512, "512"), (9999, "9999"),
                                        (12345, "12k"), (1.25e6, "1.2M"), (0.125, "0.12"),
                                        (float("nan"), "-")])
def test_compact_fits_its_width(value, text):
    out = render.compact(value, 4)
    assert len(out) == 4 and out.strip() == text


def test_scale_text_contrasts_with_its_background():
    def lum(hex_colour: str) -> float:
        r, g, b = (int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
        lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b)]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    for bg, fg in zip(render.SCALE, render.SCALE_TEXT):
        hi, lo = sorted((lum(bg), lum(fg)), reverse=True)
        assert (hi + 0.05) / (lo + 0.05) >= 4.5, (bg, fg)


def test_legend_covers_zero_to_vmax():
    entries = render.legend(90.0)
    assert entries[0].low == 0 and entries[-1].high == pytest.approx(90.0)
    assert [e.colour for e in entries] == list(render.SCALE)
    assert all(a.high == pytest.approx(b.low) for a, b in zip(entries, entries[1:]))


def test_sparkline_keeps_a_spike_when_resampled():
    series = np.zeros(100)
    series[37] = 5
    line = render.sparkline(series, 10)
    assert len(line) == 10 and line.count("█") == 1 and line.index("█") == 3
    assert render.sparkline(np.zeros(4)) == render.SPARK[0] * 4
    assert render.sparkline(np.array([0, 1, 2, 3, 4, 5, 6, 7])) == render.SPARK


def test_bar_fills_in_eighths():
    assert render.bar(1.0, 4) == "████"
    assert render.bar(0.0, 4) == "    "
    assert render.bar(0.5, 3) == "█▌ "
    assert len(render.bar(0.33, 7)) == 7


def test_order_by_load_is_descending_with_ties_by_id():
    m = np.array([[1, 5, 5, 0], [0, 1, 1, 9]])
    assert render.order(m, by="load").tolist() == [3, 1, 2, 0]
    assert render.order(m, by="id").tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        render.order(m, by="colour")


def test_late_marks_only_a_rank_last_at_most_calls():
    last = np.array([[0, 0, 0, 8], [2, 3, 2, 1], [0, 5, 0, 3], [0, 0, 0, 0]])
    marks = render.late_marks(last)
    assert marks[0].tolist() == [False, False, False, True]
    assert not marks[1].any()  # last 3 of 8 times: jitter, not a straggler
    assert marks[2].tolist() == [False, True, False, False]
    assert not marks[3].any()  # nothing timed that step
    assert render.straggler_rank(marks) in ((3, 1), (1, 1))
    assert render.straggler_rank(render.late_marks(np.array([[0, 0, 4, 0], [0, 1, 3, 0]]))) == (2, 2)
    assert render.straggler_rank(np.zeros((3, 4), bool)) is None


def test_traffic_summary_finds_the_busiest_receiver():
    from epreplay.tui.matrix import summarize

    t = np.array([[0, 5, 1], [2, 0, 9], [1, 1, 0]])
    s = summarize(t)
    assert s.sent_R.tolist() == [6, 11, 2] and s.received_R.tolist() == [3, 6, 10]
    assert s.busiest_receiver == 2 and s.ratio == pytest.approx(10 / (19 / 3))
    assert summarize(np.zeros((2, 2))).busiest_receiver == -1


@pytest.mark.parametrize("text,default,want", [
    ("e12", "expert", Jump("expert", 12)), ("12", "expert", Jump("expert", 12)),
    ("12", "rank", Jump("rank", 12)), ("rank 5", "expert", Jump("rank", 5)),
    ("s3", "expert", Jump("step", 3, 4)), ("s3:10", "rank", Jump("step", 3, 10)),
    ("L4", "expert", Jump("layer", 4)),
])
def test_parse_jump(text, default, want):
    assert parse_jump(text, default=default) == want


@pytest.mark.parametrize("text", ["", "x12", "e3:4", "s5:5", "twelve"])
def test_parse_jump_rejects_with_the_forms(text):
    with pytest.raises(UsageError, match="s3:10|empty|range"):
        parse_jump(text)


def test_core_capture_and_replay_do_not_import_textual():
    code = ("import sys, epreplay, epreplay.capture, epreplay.replay, epreplay.cli, epreplay.index.queries; "
            "epreplay.cli.build_parser(); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'textual'); "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
