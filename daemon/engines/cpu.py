"""The ``cpu`` engine, the default without a GPU: the PDF's own text where it is good, offline OCR where not.

- A page with a usable text layer (see :mod:`daemon.ocr.text_quality`) → pymupdf4llm Markdown: headings,
  pipe tables, reading order (``method="text_layer"``).
- An image-only page (a scan, or text without a Unicode mapping) → rendered, then rapidocr, whose boxes are
  put back into reading order with paragraphs, headings and simple tables (``method="ocr"``). A blank page
  is not OCR'd.
- If that path fails on a page that has some text layer, the plain text layer is used
  (``method="fallback"``, ``detail`` says why); without one the page fails with the worker's PdfError.

Quality against known truth (the generated corpus of tests/ocrtruth.py, scored by bench/ocr_quality.py):
character error rate 0.5 % on born-digital pages, at most 0.1 % on clean scans at 100–200 dpi and 0.2 % on
noisy, skewed ones; table-cell F1 1.0 (tests/ocr/test_scan_quality.py holds the bounds).

All MuPDF and OCR work runs in the :class:`PdfWorkerPool` passed in (owned and closed by the caller); the
whole page, every step included, must finish within ``page_timeout_s``. Text is streamed per paragraph as a
preview: the worker returns a page at once, so deltas arrive together at the end of each page.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator

from daemon.ocr.engine import Method, PageInput, PageResult, TextDelta
from daemon.ocr.errors import PdfError
from daemon.ocr.pdfworker import TIMEOUT_SETTING, PdfWorkerPool

OCR_MODEL = "rapidocr-PP-OCRv6"

# Failures that say nothing about the page itself: no point in a fallback, the whole file is affected.
_FILE_LEVEL = frozenset({"not_pdf", "unreadable", "encrypted", "bad_password", "zero_pages", "closed"})

_PARAGRAPH_END = re.compile(r"(?<=\n\n)(?=[^\n])")


def paragraphs(markdown: str) -> list[str]:
    """``markdown`` cut after each blank line; the pieces concatenate back to it exactly."""
    return [p for p in _PARAGRAPH_END.split(markdown) if p]


class CpuEngine:
    name = "cpu"
    needs_image = False  # it renders only the pages it OCRs

    def __init__(
        self, pool: PdfWorkerPool, *, page_timeout_s: float = 120.0, dpi: float = 144, max_pixels: int | None = None
    ) -> None:
        self.pool = pool
        self.page_timeout_s = page_timeout_s
        self.dpi = dpi
        self.max_pixels = max_pixels
        self.text_model = f"pymupdf4llm-{pool.markdown_mode}"
        self.model = f"{self.text_model}+{OCR_MODEL}"
        self.concurrency = pool.size

    async def start(self) -> None:
        await self.pool.start()

    async def stop(self) -> None:
        """Nothing of its own to stop: the pool belongs to whoever created it."""

    async def convert(self, page: PageInput) -> AsyncIterator[TextDelta | PageResult]:
        started = time.monotonic()
        deadline = started + self.page_timeout_s
        where = f"page {page.page_no + 1} of {page.pdf.name}"

        def remaining() -> float:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PdfError("timeout", "no time was left for its next step")
            return left

        timings: dict[str, float] = {}
        method: Method
        detail = ""
        try:
            if page.text_layer_usable:
                t = time.monotonic()
                text = await self.pool.page_markdown(page.pdf, page.page_no, page.password, timeout=remaining())
                timings["markdown_s"] = time.monotonic() - t
                method, model = "text_layer", self.text_model
            else:
                method, model = "ocr", OCR_MODEL
                png, blank = page.png, False
                if png is None:
                    t = time.monotonic()
                    r = await self.pool.render_page(
                        page.pdf, page.page_no, page.password, dpi=self.dpi, max_pixels=self.max_pixels,
                        timeout=remaining(),
                    )
                    timings["render_s"] = time.monotonic() - t
                    png, blank = r.png, r.blank
                if blank and page.text_layer.strip():
                    text, method, model = page.text_layer, "fallback", "text-layer"
                    detail = "the page renders blank; used its text layer"
                elif blank:
                    text, detail = "", "blank page: nothing to OCR"
                else:
                    t = time.monotonic()
                    text = await self.pool.ocr_image(png, timeout=remaining(), what=f"OCR of {where}")
                    timings["ocr_s"] = time.monotonic() - t
                    if not text.strip() and page.text_layer.strip():
                        text, method, model = page.text_layer, "fallback", "text-layer"
                        detail = "OCR found no text; used the page's own (thin) text layer"
        except PdfError as e:
            if e.code == "timeout":
                # The worker's message names the step and the time it had left; say what the budget was.
                e = PdfError("timeout", f"{where} was not done within {self.page_timeout_s:g} s ({TIMEOUT_SETTING}): "
                             f"{e}")
            if e.code in _FILE_LEVEL or not page.text_layer.strip():
                raise e from None
            text, method, model = page.text_layer, "fallback", "text-layer"
            detail = f"{e.code}: {e}; used the page's plain text layer instead"
        for chunk in paragraphs(text):
            yield TextDelta(chunk)
        timings["total_s"] = time.monotonic() - started
        yield PageResult(text=text, method=method, model=model, timings=timings, tokens=None, detail=detail)
