"""Reading order of OCR boxes: pure geometry, fed with boxes shaped like rapidocr's (padded, 4 corners)."""

from __future__ import annotations

from daemon.engines.cpu import paragraphs
from daemon.ocr.reading_order import Box, boxes_from_ocr, to_markdown


def box(x0: float, y0: float, x1: float, y1: float, text: str) -> Box:
    return Box(x0, y0, x1, y1, text)


def test_boxes_are_read_top_to_bottom_then_left_to_right_whatever_their_order() -> None:
    boxes = [box(300, 100, 400, 140, "world"), box(100, 102, 280, 141, "Hello"), box(100, 130, 500, 170, "next")]
    assert to_markdown(list(reversed(boxes))) == "Hello world\nnext\n"


def test_a_vertical_gap_starts_a_new_paragraph() -> None:
    boxes = [box(100, 100, 600, 140, "first line"), box(100, 132, 600, 172, "same paragraph"),
             box(100, 200, 600, 240, "new paragraph")]
    assert to_markdown(boxes) == "first line\nsame paragraph\n\nnew paragraph\n"


def test_aligned_multi_box_rows_become_a_pipe_table_with_the_first_row_as_header() -> None:
    rows = [["Item", "Qty", "Price"], ["Apples", "12", "30"], ["Pears", "8", "2|4"]]
    boxes = [box(100 + 150 * c, 100 + 50 * r, 200 + 150 * c, 140 + 50 * r, text)
             for r, row in enumerate(rows) for c, text in enumerate(row)]
    md = to_markdown([box(100, 0, 500, 40, "Before the table."), *boxes])
    assert md == "Before the table.\n\n|Item|Qty|Price|\n|---|---|---|\n|Apples|12|30|\n|Pears|8|2\\|4|\n"


def test_two_prose_columns_are_read_left_column_first() -> None:
    left = [box(50, 100 + 40 * i, 450, 135 + 40 * i, f"left line {i} with enough words") for i in range(6)]
    right = [box(550, 100 + 40 * i, 950, 135 + 40 * i, f"right line {i} with enough words") for i in range(6)]
    title = box(300, 20, 700, 60, "Title across both columns")
    md = to_markdown([*right, title, *left])
    lines = [line for line in md.splitlines() if line]
    assert lines[0].endswith("Title across both columns")
    assert lines[1:7] == [f"left line {i} with enough words" for i in range(6)]
    assert lines[7:] == [f"right line {i} with enough words" for i in range(6)]


def test_a_standalone_tall_line_is_a_heading_but_a_body_line_is_not() -> None:
    boxes = [box(100, 50, 500, 110, "Big Title"),
             box(100, 140, 900, 180, "Body text that runs across the page."),
             box(100, 172, 900, 212, "More body text.")]
    assert to_markdown(boxes) == "# Big Title\n\nBody text that runs across the page.\nMore body text.\n"


def test_cjk_boxes_on_one_line_join_without_a_space() -> None:
    assert to_markdown([box(100, 100, 200, 140, "光学"), box(210, 100, 300, 140, "识别")]) == "光学识别\n"


def test_boxes_from_ocr_takes_quads_and_drops_empty_text() -> None:
    quads = [[[10, 20], [110, 22], [110, 60], [10, 58]], [[0, 0], [1, 0], [1, 1], [0, 1]]]
    assert boxes_from_ocr(quads, ["  some   text ", "   "]) == [Box(10, 20, 110, 60, "some text")]
    assert to_markdown([]) == ""


def test_cpu_engine_paragraph_chunks_concatenate_to_the_original() -> None:
    md = "# Title\n\nfirst para\nline two\n\n\n|a|b|\n|---|---|\n\nlast"
    chunks = paragraphs(md)
    assert "".join(chunks) == md
    assert chunks == ["# Title\n\n", "first para\nline two\n\n\n", "|a|b|\n|---|---|\n\n", "last"]
