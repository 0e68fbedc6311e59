"""The cpu engine end to end on generated PDFs: real workers, real pymupdf4llm, real rapidocr."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from daemon.engines.cpu import CpuEngine
from daemon.ocr.engine import PageInput, PageResult, TextDelta, load_page_input, run_page
from daemon.ocr.pdfworker import PdfWorkerPool
from tests.fixtures import pdfs

pytestmark = pytest.mark.asyncio(loop_scope="package")


async def convert(
    pool: PdfWorkerPool, pdf: Path, page_no: int, password: str | None = None, page_timeout_s: float = 120.0
) -> tuple[PageResult, list[TextDelta]]:
    engine = CpuEngine(pool, page_timeout_s=page_timeout_s)
    page = await load_page_input(
        pool, job_id="t", pdf=pdf, page_no=page_no, password=password, needs_image=engine.needs_image
    )
    deltas: list[TextDelta] = []
    result = await run_page(engine, page, deltas.append)
    return result, deltas


def words(text: str) -> str:
    """Text with Markdown emphasis and extra spaces removed, for matching sentences."""
    return " ".join(text.replace("*", "").replace("_", "").split())


async def test_born_digital_page_gives_headings_pipe_table_and_cjk(
    pool: PdfWorkerPool, pdf_dir: dict[str, Path]
) -> None:
    result, deltas = await convert(pool, pdf_dir["born_digital"], 0)
    md = result.text
    assert result.method == "text_layer" and result.model == "pymupdf4llm-layout"
    assert re.search(rf"^#+ .*{pdfs.TITLE}", md, re.M), md
    assert re.search(rf"^#+ .*{pdfs.SECTION_SALES}", md, re.M), md
    assert pdfs.INTRO in words(md)
    rows = [[c.strip().strip("*") for c in line.strip("|").split("|")] for line in md.splitlines()
            if line.startswith("|")]
    assert rows[0] == pdfs.TABLE[0]
    assert set(rows[1]) <= {"---", ":---", "---:", ":---:"}
    assert rows[2:] == pdfs.TABLE[1:]
    assert pdfs.CJK_TEXT in md
    assert "".join(d.text for d in deltas) == md  # the preview adds up to the result
    assert len(deltas) > 3  # streamed per paragraph, not as one lump
    assert set(result.timings) == {"markdown_s", "total_s"} and result.tokens is None


async def test_image_only_page_text_comes_back_through_ocr(pool: PdfWorkerPool, pdf_dir: dict[str, Path]) -> None:
    result, _ = await convert(pool, pdf_dir["scanned"], 0)
    assert result.method == "ocr" and result.model.startswith("rapidocr")
    text = words(result.text)
    assert pdfs.SCAN_TITLE in text
    for line in pdfs.SCAN_LINES:
        assert line in text
    assert pdfs.SCAN_CJK in text
    for row in pdfs.SCAN_TABLE:
        assert "|" + "|".join(row) + "|" in result.text  # the scanned table comes back as a pipe table
    assert {"render_s", "ocr_s", "total_s"} <= set(result.timings)


async def test_mixed_document_uses_text_layer_and_ocr_page_by_page(
    pool: PdfWorkerPool, pdf_dir: dict[str, Path]
) -> None:
    results = [(await convert(pool, pdf_dir["mixed"], i))[0] for i in range(3)]
    assert [r.method for r in results] == ["text_layer", "ocr", "text_layer"]
    for r, word in zip(results, pdfs.MIXED_WORDS, strict=True):
        assert word in r.text


@pytest.mark.parametrize("page_no", [0, 24, 49])
async def test_numbered_document_page_carries_its_own_word(
    pool: PdfWorkerPool, pdf_dir: dict[str, Path], page_no: int
) -> None:
    result, _ = await convert(pool, pdf_dir["numbered"], page_no)
    assert pdfs.page_word(page_no + 1) in result.text
    assert f"Page {page_no + 1} of 50" in words(result.text)


async def test_encrypted_document_converts_with_its_password(pool: PdfWorkerPool, pdf_dir: dict[str, Path]) -> None:
    result, _ = await convert(pool, pdf_dir["encrypted"], 0, pdfs.ENCRYPTED_PASSWORD)
    assert pdfs.ENCRYPTED_TEXT in words(result.text)


async def test_markdown_over_the_page_timeout_falls_back_to_the_text_layer(
    bare_pool: PdfWorkerPool, pdf_dir: dict[str, Path]
) -> None:
    # The bare worker must first import pymupdf4llm and its layout model: far more than 50 ms.
    result, _ = await convert(bare_pool, pdf_dir["born_digital"], 1, page_timeout_s=0.05)
    assert result.method == "fallback" and result.model == "text-layer"
    assert result.detail.startswith("timeout:") and "ocr.page_timeout_s" in result.detail
    assert pdfs.OUTLOOK_TEXT in words(result.text)


async def test_blank_page_is_not_ocrd(pool: PdfWorkerPool, tmp_path: Path) -> None:
    import pymupdf

    doc = pymupdf.open()
    doc.new_page()
    doc.save(tmp_path / "blank.pdf")
    result, deltas = await convert(pool, tmp_path / "blank.pdf", 0)
    assert (result.method, result.text, deltas) == ("ocr", "", [])
    assert "ocr_s" not in result.timings and "blank" in result.detail


async def test_engine_given_a_rendered_page_ocrs_it_without_rendering_again(
    pool: PdfWorkerPool, pdf_dir: dict[str, Path]
) -> None:
    rendered = await pool.render_page(pdf_dir["mixed"], 1, None, dpi=96, timeout=60)  # 18 pt text: plenty
    page = PageInput(
        job_id="t", page_no=1, pdf=pdf_dir["mixed"], password=None, png=rendered.png, width=rendered.width,
        height=rendered.height, text_layer="", text_layer_usable=False,
    )
    result = await run_page(CpuEngine(pool), page)
    assert "BRAVO" in result.text and "render_s" not in result.timings

