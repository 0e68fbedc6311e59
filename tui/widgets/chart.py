"""A braille line chart: several series overlaid, axis labels, no dependencies beyond Textual.

Drawn by hand rather than with plotext: a redraw is a few milliseconds at 160×48 (the chart redraws live
while a run trains), it renders the same on every terminal that has Unicode, and snapshots stay stable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip
from textual.widget import Widget

# braille dot bit for (column, row) inside one 2×4 cell
_DOTS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))
Y_LABEL_WIDTH = 9


@dataclass(frozen=True)
class Series:
    points: Sequence[tuple[float, float]]
    color: str
    dim: bool = False
    markers: bool = False  # a blob per point (eval loss), not joined
    dots: bool = False  # one dot per point, not joined (raw loss under its smoothed line)


def fmt_num(v: float) -> str:
    """A short number for an axis: 3 significant digits, scientific when tiny or huge (learning rates)."""
    if v == 0:
        return "0"
    a = abs(v)
    if a < 1e-2 or a >= 1e5:
        return f"{v:.1e}"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def _decimate(points: Sequence[tuple[float, float]], to_px: Callable[[float], int]) -> list[tuple[float, float]]:
    """Keep first, min, max and last of the points falling in each pixel column (shape-preserving)."""
    out: list[tuple[float, float]] = []
    bucket: list[tuple[float, float]] = []
    col = None
    for p in points:
        c = to_px(p[0])
        if c != col and bucket:
            out.extend(_bucket_keep(bucket))
            bucket = []
        col = c
        bucket.append(p)
    if bucket:
        out.extend(_bucket_keep(bucket))
    return out


def _bucket_keep(b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(b) <= 4:
        return b
    lo = min(b, key=lambda p: p[1])
    hi = max(b, key=lambda p: p[1])
    mid = sorted({lo, hi}, key=lambda p: p[0])
    return [b[0], *mid, b[-1]]


class LineChart(Widget):
    DEFAULT_CSS = """
    LineChart { height: 1fr; min-height: 4; }
    """

    def __init__(self, *, empty: str = "no data yet", id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.empty = empty
        self.series: list[Series] = []
        self.x_fmt: Callable[[float], str] = fmt_num
        self.y_fmt: Callable[[float], str] = fmt_num
        self.y_floor: float | None = None
        self._rows: list[Strip] = []
        self._rows_for: tuple[int, int] | None = None

    def set_series(self, series: list[Series], x_fmt: Callable[[float], str] = fmt_num,
                   y_fmt: Callable[[float], str] = fmt_num, empty: str | None = None,
                   y_floor: float | None = None) -> None:
        """Replace what is drawn; ``y_floor`` keeps the axis from going below a value (counts ≥ 0)."""
        self.series = series
        self.y_floor = y_floor
        self.x_fmt = x_fmt
        self.y_fmt = y_fmt
        if empty is not None:
            self.empty = empty
        self._rows_for = None
        self.refresh()

    def render_line(self, y: int) -> Strip:
        size = (self.size.width, self.size.height)
        if self._rows_for != size:
            self._rows = self._draw(*size)
            self._rows_for = size
        return self._rows[y] if 0 <= y < len(self._rows) else Strip.blank(self.size.width)

    # ----------------------------------------------------------------------------------- drawing

    def _draw(self, width: int, height: int) -> list[Strip]:
        base = self.rich_style
        axis = base + Style(dim=True)
        pts = [p for s in self.series for p in s.points if math.isfinite(p[0]) and math.isfinite(p[1])]
        pw, ph = width - Y_LABEL_WIDTH, height - 1
        if not pts or pw < 4 or ph < 2:
            msg = self.empty[:width]
            rows = [Strip.blank(width, base) for _ in range(height)]
            if height:
                lpad = max(0, (width - len(msg)) // 2)
                rows[height // 2] = Strip([Segment(" " * lpad + msg.ljust(width - lpad), axis)], width)
            return rows
        xmin = float(min(p[0] for p in pts))
        xmax = float(max(p[0] for p in pts))
        ymin = float(min(p[1] for p in pts))
        ymax = float(max(p[1] for p in pts))
        if xmax == xmin:
            xmax = xmin + 1
        if ymax == ymin:
            ymin, ymax = ymin - 0.5 * (abs(ymin) or 1), ymax + 0.5 * (abs(ymax) or 1)
        pad = (ymax - ymin) * 0.04
        ymin, ymax = ymin - pad, ymax + pad
        if self.y_floor is not None:
            ymin = max(ymin, self.y_floor)
        gw, gh = pw * 2, ph * 4

        def to_px(x: float) -> int:
            return round((x - xmin) / (xmax - xmin) * (gw - 1))

        def to_py(yv: float) -> int:
            return round((ymax - yv) / (ymax - ymin) * (gh - 1))

        bits = [[0] * pw for _ in range(ph)]
        owner = [[-1] * pw for _ in range(ph)]

        def dot(x: int, yy: int, idx: int) -> None:
            if 0 <= x < gw and 0 <= yy < gh:
                cy, cx = yy >> 2, x >> 1
                bits[cy][cx] |= _DOTS[x & 1][yy & 3]
                owner[cy][cx] = idx

        for idx, s in enumerate(self.series):
            ok = [p for p in s.points if math.isfinite(p[0]) and math.isfinite(p[1])]
            if s.markers:
                for x, yv in ok:
                    px, py = to_px(x), to_py(yv)
                    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1), (-1, 0), (0, -1)):
                        dot(px + dx, py + dy, idx)
                continue
            if s.dots:
                for x, yv in ok:
                    dot(to_px(x), to_py(yv), idx)
                continue
            prev: tuple[int, int] | None = None

            def plot(a: int, b: int, i: int = idx) -> None:
                dot(a, b, i)

            for x, yv in _decimate(ok, to_px):
                cur = (to_px(x), to_py(yv))
                if prev is None:
                    dot(*cur, idx)
                else:
                    _line(prev, cur, plot)
                prev = cur
        styles = [base + Style(color=s.color, dim=s.dim) for s in self.series]
        out: list[Strip] = []
        labels = {0: self.y_fmt(ymax), ph // 2: self.y_fmt((ymax + ymin) / 2), ph - 1: self.y_fmt(ymin)}
        for cy in range(ph):
            lab = labels.get(cy)
            segs = [Segment((lab or "").rjust(Y_LABEL_WIDTH - 2)[: Y_LABEL_WIDTH - 2] + (" ┤" if lab else " │"),
                            axis)]
            run_style: Style | None = None
            run: list[str] = []
            for cx in range(pw):
                b = bits[cy][cx]
                style = styles[owner[cy][cx]] if b else base
                ch = chr(0x2800 + b) if b else " "
                if style is not run_style and run:
                    segs.append(Segment("".join(run), run_style))
                    run = []
                run_style = style
                run.append(ch)
            if run:
                segs.append(Segment("".join(run), run_style))
            out.append(Strip(segs, width))
        left, mid, right = self.x_fmt(xmin), self.x_fmt((xmin + xmax) / 2), self.x_fmt(xmax)
        line = [" "] * pw
        for text, at in ((left, 0), (mid, max(0, pw // 2 - len(mid) // 2)), (right, max(0, pw - len(right)))):
            for i, ch in enumerate(text):
                if at + i < pw:
                    line[at + i] = ch
        out.append(Strip([Segment(" " * (Y_LABEL_WIDTH - 1) + "└", axis), Segment("".join(line), axis)], width))
        return out


def _line(a: tuple[int, int], b: tuple[int, int], plot: Callable[[int, int], None]) -> None:
    """Bresenham's line from a to b."""
    x0, y0 = a
    x1, y1 = b
    dx, dy = abs(x1 - x0), -abs(y1 - y0)
    sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
    err = dx + dy
    while True:
        plot(x0, y0)
        if x0 == x1 and y0 == y1:
            return
        e2 = 2 * err
        if e2 >= dy:
            err += dy
            x0 += sx
        if e2 <= dx:
            err += dx
            y0 += sy


def ema(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average with debiasing, so the start is not pulled
    toward zero."""
    out: list[float] = []
    last = 0.0
    for n, v in enumerate(values, 1):
        last = last * weight + (1 - weight) * v
        debias = 1 - weight**n if weight > 0 else 1.0
        out.append(last / debias)
    return out
