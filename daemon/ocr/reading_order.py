"""Turn OCR text boxes into Markdown in reading order: columns, lines, paragraphs, headings, pipe tables.

rapidocr returns one box per detected text run, in detection order, with no structure. This rebuilds what a
reader sees, with cheap geometry only:

- a vertical gutter with prose on both sides splits the page into columns (read left, then right);
- boxes whose vertical extents overlap form a line, read left to right;
- a vertical gap between lines starts a paragraph;
- two or more consecutive lines with the same number (≥ 2) of boxes, column by column overlapping
  horizontally, become a pipe table (first row as header) — that is how table cells come out of the detector;
  a row below it with empty cells joins it when each of its boxes sits inside a column of its own;
- a short standalone line set in clearly larger type than body text (wider character pitch, or a taller box
  where the page has too little body text to measure the pitch) becomes a heading.

Pure Python on plain tuples so it can be tested without a model.
"""

from __future__ import annotations

import itertools
import math
import statistics
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

Quad = Sequence[Sequence[float]]  # four (x, y) corner points, as rapidocr gives them

# Detector boxes are padded: lines of one paragraph overlap by ~0.2 box heights, while paragraphs set one
# line apart leave a gap of ~0.5 (measured on 11–14 pt text rendered at 144 dpi).
PARAGRAPH_GAP = 0.25  # vertical gap, in median box heights, that starts a new paragraph
# The padding also flattens size differences: 22 pt over 14 pt text gives boxes only ~1.2x taller.
H1_RATIO = 1.45  # a standalone line this many times taller than body text is a level-1 heading
H2_RATIO = 1.18
HEADING_MAX_CHARS = 80
# The narrowest column gutter, in median box heights. Box padding eats into it: the 24 pt gutter of the
# generated two-column page measured 1.55-1.67 box heights on the clean scans but 1.37-1.41 on the blurred,
# noisy ones (the detector pads blurry text more); with 1.5 the noisy 100 dpi page read as a table. Table
# columns that leave such a gap between prose-wide boxes on both sides are rare; _is_prose guards the rest.
GUTTER_MIN = 1.0
# Box heights depend on ascenders, descenders and the box's length as much as on the font size: on the
# generated pages (tests/ocrtruth.py, 144 dpi) 14 pt headings came out 0.97-1.26x the median box and table
# cells up to 1.3x. Character pitch (box width per character) tracks the size: 20 pt titles 1.9-2.2x the
# body's pitch, 14 pt headings 1.3-1.45x, body lines at most 1.18x. Used when the page has a line long
# enough to measure the body's pitch; box height otherwise.
PITCH_H1 = 1.6
PITCH_H2 = 1.25
PITCH_MIN_CELLS = 20  # boxes at least this many character cells long measure the body pitch
PADDING = 0.6  # detector padding on each text line's width, in box heights


@dataclass(frozen=True)
class Box:
    x0: float
    y0: float
    x1: float
    y1: float
    text: str

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def cy(self) -> float:
        return (self.y0 + self.y1) / 2


def page_skew(quads: Sequence[Quad]) -> float:
    """The page's skew in radians: the median slope of the top edges of long boxes (0 with none)."""
    angles = []
    for q in quads:
        (x0, y0), (x1, y1) = q[0][:2], q[1][:2]
        dx, dy = float(x1) - float(x0), float(y1) - float(y0)
        height = abs(float(q[3][1]) - float(y0))
        if dx > 3 * max(height, 1.0):
            angles.append(math.atan2(dy, dx))
    return statistics.median(angles) if angles else 0.0


def boxes_from_ocr(quads: Sequence[Quad], texts: Sequence[str]) -> list[Box]:
    """Axis-aligned boxes of rapidocr's quads, turned back by the page's skew first.

    A scan skewed by 0.8° makes a full-width line's upright bounding box ~1.5 times as tall as the line: upright
    boxes of neighbouring lines then overlap and the lines merge or swap (CER 13 % on such a page). Rotating the
    quads by the median slope of the lines before taking their bounds gives the boxes of an unskewed page.
    """
    skew = page_skew(quads)
    cos, sin = math.cos(-skew), math.sin(-skew)
    out = []
    for quad, text in zip(quads, texts, strict=False):
        text = " ".join(text.split())
        if not text:
            continue
        pts = [(float(p[0]), float(p[1])) for p in quad]
        if skew:
            pts = [(x * cos - y * sin, x * sin + y * cos) for x, y in pts]
        xs = [x for x, _ in pts]
        ys = [y for _, y in pts]
        out.append(Box(min(xs), min(ys), max(xs), max(ys), text))
    return out


def to_markdown(boxes: Sequence[Box]) -> str:
    """The page's Markdown; empty string for no boxes."""
    if not boxes:
        return ""
    body_h = statistics.median(b.height for b in boxes) or 1.0
    pitch = body_pitch(boxes)
    blocks: list[str] = []
    for region in _regions(list(boxes), body_h):
        blocks.extend(_region_blocks(region, body_h, pitch))
    return "\n\n".join(blocks) + "\n"


# -- columns -------------------------------------------------------------------------------------------------


def _regions(boxes: list[Box], body_h: float) -> list[list[Box]]:
    """The page split into regions read one after another: [above, left column, right column, below]."""
    x_lo = min(b.x0 for b in boxes)
    x_hi = max(b.x1 for b in boxes)
    span = x_hi - x_lo
    if span <= 0:
        return [boxes]
    gutter = _find_gutter(boxes, x_lo + span / 3, x_hi - span / 3, min_width=GUTTER_MIN * body_h)
    if gutter is None:
        return [boxes]
    left = [b for b in boxes if b.x1 <= gutter]
    right = [b for b in boxes if b.x0 >= gutter]
    spanning = [b for b in boxes if b.x0 < gutter < b.x1]
    if not (_is_prose(left, body_h) and _is_prose(right, body_h)):
        return [boxes]  # a gutter between short cells is a table, not two columns
    top = min(min(b.y0 for b in left), min(b.y0 for b in right))
    above = [b for b in spanning if b.cy < top]
    below = [b for b in spanning if b.cy >= top]
    return [r for r in (above, left, right, below) if r]


def _find_gutter(boxes: list[Box], lo: float, hi: float, min_width: float) -> float | None:
    """Middle of the widest x-interval within [lo, hi], at least min_width wide, that almost no box crosses.

    "Almost": a title or a figure caption spanning both columns must not hide the gutter.
    """
    if len(boxes) < 8:
        return None
    allowance = max(1, len(boxes) // 8)
    edges = sorted({lo, hi, *(x for b in boxes for x in (b.x0, b.x1) if lo < x < hi)})
    best: tuple[float, float] | None = None
    run_start: float | None = None
    for a, b in itertools.pairwise(edges):
        mid = (a + b) / 2
        if sum(1 for box in boxes if box.x0 < mid < box.x1) <= allowance:
            run_start = a if run_start is None else run_start
            if b - run_start >= min_width and (best is None or b - run_start > best[1] - best[0]):
                best = (run_start, b)
        else:
            run_start = None
    return None if best is None else (best[0] + best[1]) / 2


def _is_prose(boxes: list[Box], body_h: float) -> bool:
    return len(boxes) >= 4 and statistics.median(b.width for b in boxes) >= 6 * body_h


# -- lines, paragraphs, tables, headings ---------------------------------------------------------------------


def _lines(boxes: list[Box]) -> list[list[Box]]:
    lines: list[list[Box]] = []
    bounds: list[tuple[float, float]] = []
    for box in sorted(boxes, key=lambda b: b.cy):
        placed = False
        # Only the last few lines can overlap a box taken in order of its vertical centre.
        for i in range(len(lines) - 1, max(-1, len(lines) - 4), -1):
            y0, y1 = bounds[i]
            overlap = min(y1, box.y1) - max(y0, box.y0)
            if overlap >= 0.5 * min(box.height, y1 - y0):
                lines[i].append(box)
                bounds[i] = (min(y0, box.y0), max(y1, box.y1))
                placed = True
                break
        if not placed:
            lines.append([box])
            bounds.append((box.y0, box.y1))
    return [sorted(line, key=lambda b: b.x0) for line in lines]


def _is_cjk(ch: str) -> bool:
    return unicodedata.east_asian_width(ch) in ("W", "F")


def _join(boxes: list[Box]) -> str:
    out = boxes[0].text
    for box in boxes[1:]:
        sep = "" if _is_cjk(out[-1]) and _is_cjk(box.text[0]) else " "
        out += sep + box.text
    return out


def _aligned(row: list[Box], prev: list[Box]) -> bool:
    return len(row) == len(prev) >= 2 and all(
        min(a.x1, b.x1) > max(a.x0, b.x0) for a, b in zip(row, prev, strict=True)
    )


def _columns(rows: list[list[Box]]) -> list[tuple[float, float]]:
    return [(min(r[k].x0 for r in rows), max(r[k].x1 for r in rows)) for k in range(len(rows[0]))]


def _fit_row(line: list[Box], cols: list[tuple[float, float]], tol: float) -> list[Box | None] | None:
    """``line`` as a table row with empty cells, or None: each box must sit inside one column of its own."""
    cells: list[Box | None] = [None] * len(cols)
    for b in line:
        hits = [k for k, (x0, x1) in enumerate(cols) if b.x0 >= x0 - tol and b.x1 <= x1 + tol]
        if len(hits) != 1 or cells[hits[0]] is not None:
            return None
        cells[hits[0]] = b
    return cells


def _extend_table(lines: list[list[Box]], i: int, j: int, body_h: float) -> list[list[Box | None]]:
    """The full rows ``lines[i:j]`` plus the rows right below them with empty cells ("Total … 680.20").

    Such a row has fewer boxes than the table has columns, so it is not aligned box for box; it still
    belongs to the table when each box sits inside a different column and it follows at the table's row
    spacing. A paragraph below a table spans columns, or is further away, and stays out.
    """
    rows: list[list[Box | None]] = [list(line) for line in lines[i:j]]
    cols = _columns(lines[i:j])
    gap = max(_gap(a, b) for a, b in itertools.pairwise(lines[i:j])) + 0.5 * body_h
    k = j
    while k < len(lines) and _gap(lines[k - 1], lines[k]) <= gap:
        row = _fit_row(lines[k], cols, 0.5 * body_h)
        if row is None:
            break
        rows.append(row)
        k += 1
    return rows


def _table(rows: list[list[Box | None]]) -> str:
    def cell(b: Box | None) -> str:
        return "" if b is None else b.text.replace("|", "\\|")

    head = "|" + "|".join(cell(b) for b in rows[0]) + "|"
    rule = "|" + "|".join("---" for _ in rows[0]) + "|"
    body = ["|" + "|".join(cell(b) for b in row) + "|" for row in rows[1:]]
    return "\n".join([head, rule, *body])


def _region_blocks(boxes: list[Box], body_h: float, pitch: float | None = None) -> list[str]:
    lines = _lines(boxes)
    blocks: list[str] = []
    para: list[list[Box]] = []

    def flush() -> None:
        if para:
            blocks.append("\n".join(_join(line) for line in para))
            para.clear()

    i = 0
    while i < len(lines):
        # A table: the longest run of aligned multi-box rows starting here.
        j = i + 1
        while j < len(lines) and _aligned(lines[j], lines[j - 1]):
            j += 1
        if j - i >= 2:
            flush()
            rows = _extend_table(lines, i, j, body_h)
            blocks.append(_table(rows))
            i += len(rows)
            continue
        line = lines[i]
        level = _heading_level(line, body_h, pitch) if _standalone(lines, i, body_h) else 0
        if level:
            flush()
            blocks.append("#" * level + " " + _join(line))
        else:
            if para and _gap(para[-1], line) > PARAGRAPH_GAP * body_h:
                flush()
            para.append(line)
        i += 1
    flush()
    return blocks


def _gap(upper: list[Box], lower: list[Box]) -> float:
    return min(b.y0 for b in lower) - max(b.y1 for b in upper)


def _standalone(lines: list[list[Box]], i: int, body_h: float) -> bool:
    """Set apart from the lines above and below, as a heading is (a tall line inside a paragraph is not)."""
    above = i == 0 or _gap(lines[i - 1], lines[i]) > PARAGRAPH_GAP * body_h
    below = i == len(lines) - 1 or _gap(lines[i], lines[i + 1]) > PARAGRAPH_GAP * body_h
    return above and below and len(lines[i]) == 1


def _units(text: str) -> int:
    """Text width in character cells: a CJK character is as wide as two Latin ones."""
    return sum(2 if _is_cjk(ch) else 1 for ch in text)


def _pitch(box: Box) -> float:
    """Width per character cell, the detector's padding (about 0.6 box heights on a text line) taken off."""
    return max(0.0, box.width - PADDING * box.height) / max(1, _units(box.text))


def body_pitch(boxes: Sequence[Box]) -> float | None:
    """Median character pitch of the page's long boxes (body text); None with too few to tell."""
    pitches = [_pitch(b) for b in boxes if _units(b.text) >= PITCH_MIN_CELLS]
    return statistics.median(pitches) if pitches else None


def _heading_level(line: list[Box], body_h: float, pitch: float | None = None) -> int:
    text = _join(line)
    if len(text) > HEADING_MAX_CHARS:
        return 0
    if pitch and _units(text) >= 4:
        # Character pitch follows the font size; box heights hardly do (see PITCH_H1).
        r = _pitch(line[0]) / pitch
        return 1 if r >= PITCH_H1 else 2 if r >= PITCH_H2 else 0
    h = statistics.median(b.height for b in line)
    if h >= H1_RATIO * body_h:
        return 1
    if h >= H2_RATIO * body_h:
        return 2
    return 0
