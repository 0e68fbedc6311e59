"""Turn OCR text boxes into Markdown in reading order: columns, lines, paragraphs, headings, pipe tables.

rapidocr returns one box per detected text run, in detection order, with no structure. This rebuilds what a
reader sees, with cheap geometry only:

- a vertical gutter with prose on both sides splits the page into columns (read left, then right);
- boxes whose vertical extents overlap form a line, read left to right;
- a vertical gap between lines starts a paragraph;
- two or more consecutive lines with the same number (≥ 2) of boxes, column by column overlapping
  horizontally, become a pipe table (first row as header) — that is how table cells come out of the detector;
- a short standalone line clearly taller than body text becomes a heading.

Pure Python on plain tuples so it can be tested without a model.
"""

from __future__ import annotations

import itertools
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


def boxes_from_ocr(quads: Sequence[Quad], texts: Sequence[str]) -> list[Box]:
    out = []
    for quad, text in zip(quads, texts, strict=False):
        text = " ".join(text.split())
        if not text:
            continue
        xs = [float(p[0]) for p in quad]
        ys = [float(p[1]) for p in quad]
        out.append(Box(min(xs), min(ys), max(xs), max(ys), text))
    return out


def to_markdown(boxes: Sequence[Box]) -> str:
    """The page's Markdown; empty string for no boxes."""
    if not boxes:
        return ""
    body_h = statistics.median(b.height for b in boxes) or 1.0
    blocks: list[str] = []
    for region in _regions(list(boxes), body_h):
        blocks.extend(_region_blocks(region, body_h))
    return "\n\n".join(blocks) + "\n"


# -- columns -------------------------------------------------------------------------------------------------


def _regions(boxes: list[Box], body_h: float) -> list[list[Box]]:
    """The page split into regions read one after another: [above, left column, right column, below]."""
    x_lo = min(b.x0 for b in boxes)
    x_hi = max(b.x1 for b in boxes)
    span = x_hi - x_lo
    if span <= 0:
        return [boxes]
    gutter = _find_gutter(boxes, x_lo + span / 3, x_hi - span / 3, min_width=1.5 * body_h)
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


def _table(rows: list[list[Box]]) -> str:
    def cell(b: Box) -> str:
        return b.text.replace("|", "\\|")

    head = "|" + "|".join(cell(b) for b in rows[0]) + "|"
    rule = "|" + "|".join("---" for _ in rows[0]) + "|"
    body = ["|" + "|".join(cell(b) for b in row) + "|" for row in rows[1:]]
    return "\n".join([head, rule, *body])


def _region_blocks(boxes: list[Box], body_h: float) -> list[str]:
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
            blocks.append(_table(lines[i:j]))
            i = j
            continue
        line = lines[i]
        level = _heading_level(line, body_h) if _standalone(lines, i, body_h) else 0
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


def _heading_level(line: list[Box], body_h: float) -> int:
    text = _join(line)
    if len(text) > HEADING_MAX_CHARS:
        return 0
    h = statistics.median(b.height for b in line)
    if h >= H1_RATIO * body_h:
        return 1
    if h >= H2_RATIO * body_h:
        return 2
    return 0
