"""Heatmap: a line-API widget that draws a matrix as coloured cells and renders only what shows.

It holds the matrix and the colour levels computed by `render.levels`; `render_line(y)` builds
one terminal line from the visible columns only, so a 61 x 288 (layers x experts) or 144 x 144
(ranks x ranks) matrix scrolls at the cost of the screen, not of the matrix. The row labels
(left gutter) and the column header (top line) stay fixed while the body scrolls.

Legend: R rows, C columns of the displayed matrix.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from epreplay.tui import render

# Cell widths the zoom key cycles through: numbers (5: four digits and a gap), colour only.
ZOOMS = (5, 2, 1)
_SCALE_STYLES = tuple(Style(bgcolor=bg, color=fg) for bg, fg in zip(render.SCALE, render.SCALE_TEXT))
_BOLD = Style(bold=True)
_DIM = Style(dim=True)


class Heatmap(ScrollView, can_focus=True):
    """A matrix of coloured cells with a cursor; posts Highlighted on moves, Selected on Enter/click."""

    BINDINGS = [
        Binding("up", "move(-1, 0)", "up", show=False),
        Binding("down", "move(1, 0)", "down", show=False),
        Binding("left", "move(0, -1)", "left", show=False),
        Binding("right", "move(0, 1)", "right", show=False),
        Binding("pageup", "move(-10, 0)", show=False),
        Binding("pagedown", "move(10, 0)", show=False),
        Binding("home", "move(0, -100000)", show=False),
        Binding("end", "move(0, 100000)", show=False),
        Binding("enter", "select", "drill in"),
        Binding("z", "zoom", "zoom"),
    ]
    COMPONENT_CLASSES = {"heatmap--label", "heatmap--header", "heatmap--highlight", "heatmap--total",
                         "heatmap--cursor"}
    DEFAULT_CSS = """
    Heatmap { height: 1fr; }
    Heatmap > .heatmap--label { color: $text-muted; }
    Heatmap > .heatmap--header { color: $text-muted; }
    Heatmap > .heatmap--highlight { color: $text-warning; background: $warning-muted; text-style: bold; }
    Heatmap > .heatmap--total { color: $text; text-style: bold; }
    Heatmap > .heatmap--cursor { color: $text-accent; text-style: bold; }
    """

    cursor = reactive((0, 0), always_update=True)

    class Highlighted(Message):
        """The cursor moved onto (row, col): data indices (after display ordering)."""

        def __init__(self, heatmap: "Heatmap", row: int, col: int) -> None:
            super().__init__()
            self.heatmap, self.row, self.col = heatmap, row, col

        @property
        def control(self) -> "Heatmap":
            return self.heatmap

    class Selected(Highlighted):
        """Enter or a click on (row, col): data indices."""

    def __init__(self, *, name: str | None = None, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.values_RC = np.zeros((0, 0))
        self.levels_RC = np.zeros((0, 0), np.int16)
        self.row_labels: list[str] = []
        self.col_labels: list[str] = []
        self.col_order = np.zeros(0, np.int64)
        self.marks_RC: np.ndarray | None = None
        self.highlight_cols: frozenset[int] = frozenset()
        self.highlight_rows: frozenset[int] = frozenset()
        self.row_totals: np.ndarray | None = None
        self.col_totals: np.ndarray | None = None
        self.vmax = 0.0
        self.cell_w = ZOOMS[0]
        self._gutter = 0
        self._header = ""
        self._pending: tuple[int | None, int | None] | None = None  # a move_to before any data

    # ----- data -------------------------------------------------------------------------------
    def set_data(self, values_RC: np.ndarray, *, row_labels: Sequence[str],
                 col_labels: Sequence[str], col_order: np.ndarray | None = None,
                 marks_RC: np.ndarray | None = None, vmax: float | None = None,
                 highlight_cols: Sequence[int] = (), highlight_rows: Sequence[int] = (),
                 row_totals: np.ndarray | None = None, col_totals: np.ndarray | None = None,
                 keep_cursor: bool = True) -> None:
        """Show a new matrix.

        Args:
            values_RC: [R, C] values (NaN: not captured).
            row_labels: R labels for the left gutter. col_labels: C labels for the header.
            col_order: [C] display order of the columns (data indices); default natural.
            marks_RC: [R, C] bool cells to mark (stragglers), drawn with a leading "!".
            vmax: value of the top colour level; default the matrix maximum.
            highlight_cols / highlight_rows: data indices whose labels are highlighted.
            row_totals: [R] shown in a totals column; col_totals: [C] in a totals row.
        """
        self.values_RC = np.asarray(values_RC, dtype=np.float64)
        rows, cols = self.values_RC.shape
        self.vmax = float(np.nanmax(self.values_RC)) if vmax is None and self.values_RC.size \
            and np.isfinite(self.values_RC).any() else float(vmax or 0.0)
        self.levels_RC = render.levels(self.values_RC, vmax=self.vmax)
        self.row_labels = list(row_labels)
        self.col_labels = list(col_labels)
        self.col_order = np.arange(cols) if col_order is None else np.asarray(col_order)
        self.marks_RC = marks_RC
        self.highlight_cols = frozenset(int(c) for c in highlight_cols)
        self.highlight_rows = frozenset(int(r) for r in highlight_rows)
        self.row_totals, self.col_totals = row_totals, col_totals
        self._layout()
        r, c = self.cursor if keep_cursor else (0, 0)
        self.cursor = (min(r, max(rows - 1, 0)), min(c, max(cols - 1, 0)))
        if self._pending is not None and self.values_RC.size:
            pending, self._pending = self._pending, None
            self.move_to(row=pending[0], col=pending[1])
        self.refresh()

    def _layout(self) -> None:
        rows, cols = self.values_RC.shape
        extra = ["Σ"] if self.col_totals is not None else []
        self._gutter = max([len(s) for s in self.row_labels + extra] + [1]) + 1
        self._header = self._build_header()
        width = self._gutter + cols * self.cell_w + (7 if self.row_totals is not None else 0)
        height = 1 + rows + (1 if self.col_totals is not None else 0)
        self.virtual_size = Size(width, height)

    def _build_header(self) -> str:
        """Column labels laid out once; a label too wide for its cell is shown where it fits."""
        cells = len(self.col_order) * self.cell_w
        chars = [" "] * cells
        free = 0
        for pos, col in enumerate(self.col_order):
            label = self.col_labels[col] if col < len(self.col_labels) else ""
            x0 = pos * self.cell_w
            if self.cell_w > len(label):
                x0 += self.cell_w - len(label)  # right-aligned over the numbers
            if x0 >= free and x0 + len(label) <= cells:
                chars[x0:x0 + len(label)] = list(label)
                free = x0 + len(label) + 1
        return "".join(chars)

    # ----- geometry ---------------------------------------------------------------------------
    @property
    def data_cursor(self) -> tuple[int, int]:
        """The cursor as (row, column) data indices."""
        r, c = self.cursor
        col = int(self.col_order[c]) if len(self.col_order) else 0
        return r, col

    def _body_width(self) -> int:
        return max(self.scrollable_content_region.width - self._gutter, 1)

    def _cell_at(self, x: int, y: int) -> tuple[int, int] | None:
        sx, sy = self.scroll_offset
        if x < self._gutter or y < 1:
            return None
        pos = (x - self._gutter + sx) // self.cell_w
        row = y - 1 + sy
        if 0 <= row < self.values_RC.shape[0] and 0 <= pos < self.values_RC.shape[1]:
            return row, pos
        return None

    # ----- actions ----------------------------------------------------------------------------
    def action_move(self, d_row: int, d_col: int) -> None:
        rows, cols = self.values_RC.shape
        if not rows or not cols:
            return
        r, c = self.cursor
        self.cursor = (min(max(r + d_row, 0), rows - 1), min(max(c + d_col, 0), cols - 1))

    def action_select(self) -> None:
        if self.values_RC.size:
            self.post_message(self.Selected(self, *self.data_cursor))

    def action_zoom(self) -> None:
        self.cell_w = ZOOMS[(ZOOMS.index(self.cell_w) + 1) % len(ZOOMS)]
        self._layout()
        self._scroll_to_cursor()
        self.refresh()

    def move_to(self, *, row: int | None = None, col: int | None = None) -> None:
        """Put the cursor on a data row and/or data column (a jump from `/`); before the first
        data arrives, the move waits for it."""
        if not self.values_RC.size:
            self._pending = (row, col)
            return
        r, c = self.cursor
        if row is not None:
            r = min(max(row, 0), max(self.values_RC.shape[0] - 1, 0))
        if col is not None:
            where = np.flatnonzero(self.col_order == col)
            c = int(where[0]) if where.size else c
        self.cursor = (r, c)

    def watch_cursor(self, old: tuple[int, int], new: tuple[int, int]) -> None:
        if self.values_RC.size:
            self._scroll_to_cursor()
            self.refresh()
            self.post_message(self.Highlighted(self, *self.data_cursor))

    def _scroll_to_cursor(self) -> None:
        r, c = self.cursor
        sx, sy = self.scroll_offset
        body_h = max(self.scrollable_content_region.height - 1, 1)
        body_w = self._body_width()
        x0, x1 = c * self.cell_w, (c + 1) * self.cell_w
        nx = x0 if x0 < sx else (x1 - body_w if x1 > sx + body_w else sx)
        ny = r if r < sy else (r - body_h + 1 if r >= sy + body_h else sy)
        if (nx, ny) != (sx, sy):
            self.scroll_to(max(nx, 0), max(ny, 0), animate=False, immediate=True)

    async def _on_click(self, event: events.Click) -> None:
        hit = self._cell_at(event.x, event.y)
        if hit is not None:
            self.cursor = hit
            self.post_message(self.Selected(self, *self.data_cursor))

    # ----- drawing ----------------------------------------------------------------------------
    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        sx, sy = self.scroll_offset
        base = self.rich_style
        label_style = self.get_component_rich_style("heatmap--label")
        rows = self.values_RC.shape[0]
        if y == 0:
            return self._header_line(width, sx, base)
        row = y - 1 + sy
        if row < rows:
            if row in self.highlight_rows:
                style = self.get_component_rich_style("heatmap--highlight")
            elif row == self.cursor[0]:  # the cursor's row and column labels stand out
                style = self.get_component_rich_style("heatmap--cursor")
            else:
                style = label_style
            gutter = Segment(self.row_labels[row].rjust(self._gutter - 1) + " ", style)
            body = self._row_segments(row)
            total = None
            if self.row_totals is not None:
                total = Segment(" " + render.compact(float(self.row_totals[row]), 6),
                                self.get_component_rich_style("heatmap--total"))
        elif row == rows and self.col_totals is not None:
            gutter = Segment("Σ".rjust(self._gutter - 1) + " ", label_style)
            tstyle = self.get_component_rich_style("heatmap--total")
            hstyle = self.get_component_rich_style("heatmap--highlight")
            body = [Segment(" " + render.compact(float(self.col_totals[c]), self.cell_w - 1)
                            if self.cell_w >= 4 else " " * self.cell_w,
                            hstyle if c in self.highlight_cols else tstyle)
                    for c in self.col_order]
            total = Segment(" " + render.compact(float(np.sum(self.col_totals)), 6), tstyle)
        else:
            return Strip.blank(width, base)
        strip = Strip(body).crop(sx, sx + max(width - self._gutter, 0))
        segs = [gutter, *strip]
        if total is not None and sx + width - self._gutter >= len(self.col_order) * self.cell_w:
            segs.append(total)
        return Strip(segs).adjust_cell_length(width, base)

    def _header_line(self, width: int, sx: int, base: Style) -> Strip:
        hstyle = self.get_component_rich_style("heatmap--header")
        text = self._header[sx:sx + max(width - self._gutter, 0)]
        segs = [Segment(" " * self._gutter, hstyle), Segment(text, hstyle)]
        if self.values_RC.size and self.cell_w >= 2:
            # Re-draw highlighted labels (the most loaded receiver) and the cursor's column label.
            hl = self.get_component_rich_style("heatmap--highlight")
            chars = list(text)
            styles = [hstyle] * len(chars)
            cur = self.get_component_rich_style("heatmap--cursor")
            marked = [(pos, hl) for pos, col in enumerate(self.col_order) if int(col) in self.highlight_cols]
            marked.append((self.cursor[1], cur))  # the cursor's column label (drawn last: on top)
            for pos, style in marked:
                for x in range(pos * self.cell_w - sx, (pos + 1) * self.cell_w - sx):
                    if 0 <= x < len(chars):
                        styles[x] = style
            segs = [Segment(" " * self._gutter, hstyle)] + [Segment(ch, st) for ch, st in zip(chars, styles)]
        return Strip(segs).adjust_cell_length(width, base)

    def _row_segments(self, row: int) -> list[Segment]:
        """One row's cells, built only for the visible columns (the rest are blank strings)."""
        width = self.scrollable_content_region.width
        sx = self.scroll_offset.x
        first = sx // self.cell_w
        last = min(len(self.col_order), (sx + width) // self.cell_w + 1)
        base = self.rich_style
        cur_r, cur_c = self.cursor
        # One Style per colour level, built once per line (not per cell): rendering a 144-wide
        # row costs a few hundred Segment objects and nothing else.
        scale = [base + _DIM] + list(_SCALE_STYLES)
        segs: list[Segment] = [Segment(" " * (first * self.cell_w))] if first else []
        values, lv = self.values_RC[row], self.levels_RC[row]
        marks = self.marks_RC[row] if self.marks_RC is not None else None
        for pos in range(first, last):
            col = int(self.col_order[pos])
            level = int(lv[col])
            marked = marks is not None and bool(marks[col])
            if self.cell_w >= 4:
                text = render.compact(values[col], self.cell_w - 1)
                text = ("!" if marked else " ") + text
            else:
                text = ("!" if marked else " ").ljust(self.cell_w)
            style = scale[level] if not marked else scale[level] + _BOLD
            if row == cur_r and pos == cur_c and self.has_focus:
                style = style + Style(reverse=True, bold=True)
            elif row == cur_r and pos == cur_c:
                style = style + Style(underline=True, bold=True)
            segs.append(Segment(text, style))
        rest = len(self.col_order) - last
        if rest > 0:
            segs.append(Segment(" " * (rest * self.cell_w)))
        return segs

    def _on_focus(self, event: events.Focus) -> None:
        self.refresh()

    def _on_blur(self, event: events.Blur) -> None:
        self.refresh()
