"""Shared fixtures for the OCR tests: generated PDFs and one real worker pool for the whole package.

Starting a worker loads MuPDF, pymupdf4llm's layout model and rapidocr (seconds on 2 cores), so the tests
share one pool of two real spawned workers; tests that kill workers make their own small pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from daemon.ocr.pdfworker import PdfWorkerPool
from tests.fixtures import pdfs


@pytest.fixture(scope="package")
def pdf_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pdfs")
    return {
        "born_digital": pdfs.born_digital(d / "born digital.pdf"),  # a space in the name, as users do
        "scanned": pdfs.scanned(d / "scanned.pdf"),
        "mixed": pdfs.mixed(d / "mixed-äöü.pdf"),
        "numbered": pdfs.numbered(d / "numbered.pdf", pages=50),
        "encrypted": pdfs.encrypted(d / "encrypted.pdf"),
        "zero_pages": pdfs.zero_pages(d / "zero.pdf"),
        "corrupt": pdfs.corrupt(d / "corrupt.pdf"),
        "not_pdf": pdfs.not_pdf(d / "list.pdf"),
        "headerless": pdfs.headerless(d / "headerless.pdf"),
        "heavy": pdfs.heavy(d / "heavy.pdf"),
    }


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def pool() -> AsyncIterator[PdfWorkerPool]:
    async with PdfWorkerPool(size=2) as p:
        yield p


@pytest_asyncio.fixture(scope="package", loop_scope="package")
async def bare_pool() -> AsyncIterator[PdfWorkerPool]:
    """One worker that loads only MuPDF (quick to start): for tests that kill workers. Each such test
    leaves it working (a replacement worker starts in the background)."""
    async with PdfWorkerPool(size=1, preload=()) as p:
        yield p
