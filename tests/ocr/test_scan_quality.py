"""OCR quality of the cpu engine against known truth (tests/ocrtruth.py), scored by daemon/ocr/scoring.py.

Real PDF workers, real pymupdf4llm and rapidocr, the engine's own convert path. Born-digital pages go through
the text layer; scans are the same pages rasterised at 100/144/200 dpi and stored as image-only pages, which
the engine renders at its own 144 dpi and OCRs. The scanned set is the pages that garbled before issue 14's fix
(see SCAN_PAGES): about a dozen OCR'd pages, so the whole module stays within tens of seconds.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from daemon.engines.cpu import CpuEngine
from daemon.ocr.engine import PageResult, load_page_input, run_page
from daemon.ocr.pdfworker import PdfWorkerPool
from daemon.ocr.scoring import DocScore, aggregate, score_page, split_pages
from tests import ocrtruth

BORN_CER = 0.02
CLEAN_SCAN_CER = 0.03
# Noisy scans (skew ±0.8°, blur, sensor noise σ 14 grey levels, JPEG) measured 0.0–0.3 % CER per dpi over the
# whole corpus after the fixes (bench/ocr_quality.py), at most 0.5 % on a page; the worst dpi is 100, tested
# here. One garbled or misplaced line on these pages costs 3–5 % of their characters, so 2 % catches a line
# lost while leaving room for rapidocr's float differences between CPUs.
NOISY_SCAN_CER = 0.02
NOISY_DPI = 100
# The pages that garbled before issue 14's fixes: full-width lines of unrelated words in small type with a
# table, two columns (read as a table on noisy scans), and Chinese.
SCAN_PAGES = (("dense", 1), ("columns", 1), ("cjk", 1))  # (document, 1-based page)
async_test = pytest.mark.asyncio(loop_scope="package")


@pytest.fixture(scope="module")
def born(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("born")
    for doc in ocrtruth.DOCS:
        ocrtruth.write_born_digital(doc, folder)
    return folder


async def convert(pool: PdfWorkerPool, pdf: Path, page_no: int) -> PageResult:
    engine = CpuEngine(pool)
    page = await load_page_input(pool, job_id="t", pdf=pdf, page_no=page_no, password=None,
                                 needs_image=engine.needs_image)
    return await run_page(engine, page)


async def score(pool: PdfWorkerPool, pages: list[tuple[Path, int]], method: str) -> DocScore:
    """Convert (pdf, 1-based page) pairs concurrently (the pool has two workers) and score them."""
    results = await asyncio.gather(*(convert(pool, pdf, n - 1) for pdf, n in pages))
    scores = {}
    for i, ((pdf, n), result) in enumerate(zip(pages, results, strict=True)):
        assert result.method == method, (pdf, n, result.method, result.detail)
        truth = split_pages(pdf.with_suffix(".md").read_text(encoding="utf-8"))[n]
        scores[i] = score_page(truth, result.text)
    return aggregate(scores)


def scans(born: Path, folder: Path, dpi: int, noisy: bool) -> list[tuple[Path, int]]:
    folder.mkdir()
    pages = []
    for name, n in SCAN_PAGES:
        seed = [d.name for d in ocrtruth.DOCS].index(name)  # as build_corpus seeds it: the bench's pages
        pdf = ocrtruth.scan_pdf(born / f"{name}.pdf", folder / f"{name}.pdf", dpi, noisy=noisy, seed=seed)
        (folder / f"{name}.md").write_text((born / f"{name}.md").read_text(encoding="utf-8"), encoding="utf-8")
        pages.append((pdf, n))
    return pages


@async_test
async def test_born_digital_pages_convert_almost_exactly_with_their_tables(pool: PdfWorkerPool, born: Path) -> None:
    pages = [(pdf, n) for pdf in ocrtruth.truth_pages(born).values()
             for n in split_pages(pdf.with_suffix(".md").read_text(encoding="utf-8"))]
    d = await score(pool, pages, "text_layer")
    assert d.cer < BORN_CER, d
    assert d.table_f1 is not None and d.table_f1 > 0.9, d
    assert d.heading_recall == 1.0, d


@async_test
@pytest.mark.parametrize("dpi", ocrtruth.SCAN_DPIS)
async def test_clean_scans_read_within_three_percent_cer_at_each_dpi(
    pool: PdfWorkerPool, born: Path, tmp_path: Path, dpi: int
) -> None:
    d = await score(pool, scans(born, tmp_path / f"scan{dpi}", dpi, noisy=False), "ocr")
    assert d.cer < CLEAN_SCAN_CER, {n: p.cer for n, p in d.pages.items()}
    assert d.reading_order == 1.0, d
    # Every page, not just the total: the bug garbled single lines on single pages.
    assert max(p.cer for p in d.pages.values()) < CLEAN_SCAN_CER, {n: p.cer for n, p in d.pages.items()}
    assert d.table_f1 is not None and d.table_f1 > 0.9, d


@async_test
async def test_noisy_skewed_scan_stays_within_its_measured_bound(
    pool: PdfWorkerPool, born: Path, tmp_path: Path
) -> None:
    d = await score(pool, scans(born, tmp_path / f"noisy{NOISY_DPI}", NOISY_DPI, noisy=True), "ocr")
    assert d.cer < NOISY_SCAN_CER, {n: p.cer for n, p in d.pages.items()}


def test_a_table_row_with_empty_cells_stays_in_the_table_but_the_paragraph_below_does_not() -> None:
    from daemon.ocr.reading_order import Box, to_markdown

    rows = [["Item", "Qty", "Price", "Amount"], ["Oak", "40", "12.50", "500.00"], ["Glue", "6", "7.20", "43.20"]]
    boxes = [Box(100 + 150 * c, 100 + 50 * r, 200 + 150 * c, 140 + 50 * r, text)
             for r, row in enumerate(rows) for c, text in enumerate(row)]
    total = [Box(100, 250, 190, 290, "Total"), Box(560, 250, 650, 290, "543.20")]  # columns 1 and 4 only
    after = Box(100, 340, 700, 380, "Payment is due within thirty days.")
    md = to_markdown([*boxes, *total, after])
    assert "|Total|||543.20|" in md.splitlines(), md
    assert md.endswith("\n\nPayment is due within thirty days.\n"), md


def test_lines_of_a_skewed_scan_stay_apart_and_in_order() -> None:
    import math

    from daemon.ocr.reading_order import boxes_from_ocr, page_skew, to_markdown

    # Full-width lines 25 px apart, boxes 30 px tall, the page turned by 1.2°: each line drifts 21 px across
    # the page, so the upright bounds of neighbouring lines overlap by more than half their height.
    width, tilt = 1000.0, math.tan(math.radians(1.2))
    quads = [[[100, y], [100 + width, y + width * tilt], [100 + width, y + width * tilt + 30], [100, y + 30]]
             for y in (100 + 25 * i for i in range(6))]
    texts = [f"line {i} of a paragraph that runs across the whole page" for i in range(6)]
    assert math.degrees(page_skew(quads)) == pytest.approx(1.2, abs=0.01)
    assert to_markdown(boxes_from_ocr(quads, texts)) == "\n".join(texts) + "\n"


def test_a_short_line_in_wider_type_is_a_heading_though_its_box_is_no_taller() -> None:
    from daemon.ocr.reading_order import Box, to_markdown

    body = [Box(100, 100 + 32 * i, 1000, 130 + 32 * i, "x" * 90) for i in range(4)]  # pitch ~10 px a character
    heading = Box(100, 260, 100 + 14 * 13 + 18, 290, "Results today")  # 14 px a character, same box height
    plain = Box(100, 340, 100 + 10 * 13 + 18, 370, "Signed: Anna.")
    md = to_markdown([*body, heading, plain])
    assert "\n\n## Results today\n\n" in md and "\n\nSigned: Anna.\n" in md, md
