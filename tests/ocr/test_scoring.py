"""The OCR scorer on hand-checkable pages: every expected figure below can be counted by eye."""

from __future__ import annotations

import pytest

from daemon.ocr.scoring import plain_text, score_document, score_page, split_pages, table_cells


def test_one_wrong_letter_in_ten_is_a_cer_of_ten_percent_and_one_wrong_word() -> None:
    s = score_page("abcde fghi", "abcde fgXi")  # 10 characters, 1 substituted; 2 words, 1 wrong
    assert (s.char_edits, s.truth_chars, s.cer) == (1, 10, pytest.approx(0.1))
    assert (s.word_edits, s.truth_words, s.wer) == (1, 2, pytest.approx(0.5))


def test_markup_and_line_breaks_do_not_count_as_errors() -> None:
    truth = "# Title\n\nA paragraph on one line.\n\n- first item\n- second item\n"
    output = "## Title\n\nA paragraph\non one line.\n\n* first item\n\n1. second item"
    s = score_page(truth, output)
    assert s.cer == 0.0 and s.wer == 0.0
    assert plain_text("**bold** and [a link](http://x) `code`") == "bold and a link code"
    assert plain_text("• a bullet as OCR reads it") == "a bullet as OCR reads it"
    assert plain_text("| two<br>lines | cell |\n|---|---|") == "two lines cell"
    assert plain_text("这是一个中文\n段落") == "这是一个中文段落"  # a line break inside a Chinese sentence


def test_empty_output_is_all_deletions_and_extra_text_can_push_cer_past_one() -> None:
    assert score_page("abcd", "").cer == 1.0
    assert score_page("ab", "ab cd ef").cer == pytest.approx(3.0)  # 6 inserted characters over 2
    assert score_page("", "").cer == 0.0


def test_cjk_characters_are_words_of_their_own() -> None:
    s = score_page("東京都の天気", "東京都の天気")
    assert s.truth_words == 6 and s.wer == 0.0
    assert score_page("東京都の天気", "東京府の天気").wer == pytest.approx(1 / 6)


def test_heading_recall_counts_truth_headings_found_as_headings() -> None:
    truth = "# Annual report\n\ntext\n\n## Results\n\nmore\n\n## Outlook\n"
    output = "# Annual report\n\ntext\n\nResults\n\nmore\n\n### outlook\n"  # Results lost its mark
    s = score_page(truth, output)
    assert (s.headings_truth, s.headings_found) == (3, 2)
    assert s.heading_recall == pytest.approx(2 / 3)
    assert score_page("no headings", "# x").heading_recall is None


TABLE = "| Item | Qty |\n|---|---:|\n| Apples | 3 |\n| Pears | 12 |\n"


def test_pipe_tables_parse_to_cells_and_score_cell_f1() -> None:
    assert table_cells(TABLE) == [[["item", "qty"], ["apples", "3"], ["pears", "12"]]]
    assert score_page(TABLE, TABLE).table_f1 == 1.0
    # 6 truth cells; the output has 6 cells of which 5 match ("12" read as "17"): P = R = 5/6.
    s = score_page(TABLE, TABLE.replace("12", "17"))
    assert (s.cells_truth, s.cells_output, s.cells_matched) == (6, 6, 5)
    assert s.table_f1 == pytest.approx(5 / 6)
    # The same words as plain lines are no table at all.
    assert score_page(TABLE, "Item Qty\nApples 3\nPears 12").table_f1 == 0.0
    assert score_page("no table here", TABLE).table_f1 is None
    # Pipes and the separator row are markup: the text still compares equal.
    assert score_page(TABLE, "Item Qty\nApples 3\nPears 12").cer == 0.0


def test_reading_order_is_one_when_kept_and_zero_when_reversed() -> None:
    blocks = ["first block of text", "second block of text", "third block of text"]
    truth = "\n\n".join(blocks)
    assert score_page(truth, truth).reading_order == 1.0
    assert score_page(truth, "\n\n".join(reversed(blocks))).reading_order == 0.0
    # Swap the last two: one of three pairs discordant.
    s = score_page(truth, "\n\n".join([blocks[0], blocks[2], blocks[1]]))
    assert s.reading_order == pytest.approx(2 / 3) and s.blocks_found == 3
    assert score_page(truth, "").reading_order is None


def test_split_pages_reads_the_outbox_markers_including_failed_pages() -> None:
    md = "<!-- page 1 -->\n\none\n\n<!-- page 2: failed: engine timed out -->\n<!-- page 3 -->\n\nthree\n"
    pages = split_pages(md)
    assert sorted(pages) == [1, 2, 3]
    assert pages[1].strip() == "one" and pages[2].strip() == "" and pages[3].strip() == "three"
    assert split_pages("no markers") == {1: "no markers"}


def test_document_totals_are_weighted_by_truth_length() -> None:
    truth = "<!-- page 1 -->\n\n" + "a" * 90 + "\n\n<!-- page 2 -->\n\n" + "b" * 10 + "\n"
    # Page 1 perfect, page 2 entirely wrong: 10 edits over 100 truth characters, not the page mean 0.5.
    output = "<!-- page 1 -->\n\n" + "a" * 90 + "\n\n<!-- page 2 -->\n\n" + "c" * 10 + "\n<!-- page 3 -->\nx\n"
    d = score_document(truth, output)
    assert d.pages[1].cer == 0.0 and d.pages[2].cer == 1.0
    assert d.cer == pytest.approx(0.1) and d.truth_chars == 100
    assert d.extra_pages == [3] and d.missing_pages == []
    missing = score_document(truth, "<!-- page 1 -->\n\n" + "a" * 90)
    assert missing.missing_pages == [2] and missing.cer == pytest.approx(0.1)
