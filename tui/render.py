"""Pure rendering maths for the TUI: matrix -> colour levels and cell text, legend, sparkline, bars.

Nothing here imports textual or touches the database; every function is numpy in, plain Python
out, so it is unit-tested without an app (tests/test_tui_render.py). The widgets in heatmap.py
and matrix.py only map the levels returned here onto styles.

Legend: R rows, C columns of a displayed matrix (layers x experts, ranks x ranks, steps x ranks).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A sequential scale sampled from viridis (dark violet -> yellow). Cells carry their own
# background, so the scale reads the same on a dark and a light theme, is colour-blind safe and
# stays ordered in greyscale. Level 0 is reserved for "no data / zero" and is drawn with the
# theme's own background (an empty cell looks empty on both themes).
SCALE: tuple[str, ...] = (
    "#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c",
    "#28ae80", "#5ec962", "#addc30", "#fde725",
)


def luminance(colour: str) -> float:
    """WCAG relative luminance of a '#rrggbb' colour (0 black .. 1 white)."""
    rgb = [int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def text_colour(background: str) -> str:
    """Black or white, whichever contrasts more with `background` (WCAG contrast ratio)."""
    lum = luminance(background)
    return "#000000" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "#ffffff"


# Text drawn on each scale colour (numbers inside heatmap cells): contrast >= 4.5 on every level.
SCALE_TEXT: tuple[str, ...] = tuple(text_colour(c) for c in SCALE)

SPARK = "▁▂▃▄▅▆▇█"
EIGHTHS = " ▏▎▍▌▋▊▉█"


def levels(values_RC: np.ndarray, *, vmax: float | None = None, n: int = len(SCALE)) -> np.ndarray:
    """Quantize a non-negative matrix onto colour levels.

    Args:
        values_RC: [R, C] numbers (any numeric dtype); NaN and values <= 0 mean "nothing".
        vmax: the value mapped to the top level; default the matrix maximum.
        n: number of colour levels (len(SCALE)).

    Returns:
        [R, C] int16: 0 for nothing (zero/NaN/negative), else 1..n, linear in value/vmax with
        any positive value at least level 1 (a single token stays visible).
    """
    v = np.asarray(values_RC, dtype=np.float64)
    top = float(np.nanmax(v)) if vmax is None and v.size and np.isfinite(v).any() else (vmax or 0.0)
    out = np.zeros(v.shape, np.int16)
    if top <= 0:
        return out
    with np.errstate(invalid="ignore"):
        pos = np.isfinite(v) & (v > 0)
        lvl = np.ceil(np.clip(v / top, 0.0, 1.0) * n)
    out[pos] = np.maximum(lvl[pos], 1).astype(np.int16)
    return out


def compact(value: float, width: int = 4) -> str:
    """A number in at most `width` characters, right-aligned: 7, 512, 1.2k, 34k, 1.2M, 0.12."""
    v = float(value)
    if v != v:  # NaN: not captured
        return "-".rjust(width)
    candidates = []
    if v.is_integer():
        candidates.append(f"{v:.0f}")
    else:
        candidates += [f"{v:.2f}", f"{v:.1f}", f"{v:.0f}"]
        if abs(v) < 1:
            candidates.insert(1, f"{v:.2f}".replace("0.", ".", 1))
    for div, suffix in ((1e3, "k"), (1e6, "M"), (1e9, "G"), (1e12, "T")):
        q = v / div
        candidates += [f"{q:.1f}{suffix}", f"{q:.0f}{suffix}"]
    for text in candidates:
        if len(text) <= width:
            return text.rjust(width)
    return ("+" * width) if v > 0 else ("-" * width)


@dataclass(frozen=True)
class LegendEntry:
    """One swatch of the colour legend: the level's colour and the value range it covers."""

    level: int
    colour: str
    low: float
    high: float


def legend(vmax: float, *, n: int = len(SCALE)) -> list[LegendEntry]:
    """The value range of each colour level for a matrix whose top value is `vmax`.

    Returns:
        n entries; entry i covers (low, high] with high = vmax * (i + 1) / n.
    """
    return [LegendEntry(i + 1, SCALE[i], vmax * i / n, vmax * (i + 1) / n) for i in range(n)]


def sparkline(values_S: np.ndarray, width: int | None = None) -> str:
    """Unicode sparkline of a series, resampled (by max, so a spike survives) to `width` cells.

    Args:
        values_S: [S] numbers (NaN counts as 0).
        width: cells; default one per value.

    Returns:
        A string of `width` block characters; all-zero input gives the lowest block throughout.
    """
    v = np.nan_to_num(np.asarray(values_S, dtype=np.float64))
    if v.size == 0:
        return ""
    if width is not None and width < v.size:
        edges = np.linspace(0, v.size, width + 1).astype(int)
        v = np.array([v[a:max(b, a + 1)].max() for a, b in zip(edges[:-1], edges[1:])])
    top = v.max()
    if top <= 0:
        return SPARK[0] * v.size
    idx = np.clip(np.round(v / top * (len(SPARK) - 1)), 0, len(SPARK) - 1).astype(int)
    return "".join(SPARK[i] for i in idx)


def bar(fraction: float, width: int) -> str:
    """A horizontal bar of `width` cells filled to `fraction` (0..1) with eighth-cell precision."""
    f = min(max(float(fraction), 0.0), 1.0) if fraction == fraction else 0.0
    eighths = int(round(f * width * 8))
    full, part = divmod(eighths, 8)
    text = "█" * full + (EIGHTHS[part] if part and full < width else "")
    return text.ljust(width)


def order(values_RC: np.ndarray, *, by: str, axis: int = 1) -> np.ndarray:
    """Display order of the columns (axis=1) or rows (axis=0).

    Args:
        values_RC: [R, C] matrix.
        by: "id" (natural order) or "load" (descending total along the other axis; ties by id).

    Returns:
        [C] (or [R]) int64 permutation.
    """
    count = values_RC.shape[axis]
    if by == "id":
        return np.arange(count, dtype=np.int64)
    if by != "load":
        raise ValueError(f"unknown order {by!r}; use 'id' or 'load'")
    totals = np.asarray(values_RC, dtype=np.float64).sum(axis=1 - axis)
    return np.lexsort((np.arange(count), -totals)).astype(np.int64)


def late_marks(last_SR: np.ndarray, *, share: float = 0.5) -> np.ndarray:
    """Mark the straggler of each step: the rank that arrived last at most of the step's calls.

    On EP a late rank does not show as a long call of its own: its peers wait for it *inside*
    the collective (their calls take longer), so the straggler is found by arrival order, not by
    duration. With R ranks arriving at random each is last 1/R of the time; being last at more
    than `share` of a step's calls is not jitter.

    Args:
        last_SR: [S, R] calls of step s at which rank r arrived last (every call has one last
            arrival, so a row sums to the step's number of calls).

    Returns:
        [S, R] bool, at most one True per step.
    """
    last = np.asarray(last_SR, dtype=np.int64)
    out = np.zeros(last.shape, bool)
    for s in range(last.shape[0]):
        calls = int(last[s].sum())
        if not calls:
            continue
        r = int(np.argmax(last[s]))
        if last[s, r] > share * calls:
            out[s, r] = True
    return out


def straggler_rank(marks_SR: np.ndarray) -> tuple[int, int] | None:
    """The rank marked (late_marks) in most steps and in how many steps; None when none is."""
    per_rank = np.asarray(marks_SR).sum(axis=0)
    if per_rank.size == 0 or per_rank.max() == 0:
        return None
    rank = int(np.argmax(per_rank))
    return rank, int(per_rank[rank])
