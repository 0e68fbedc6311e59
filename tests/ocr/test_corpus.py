"""The real-world pdf.js corpus (../shared/corpus/pdfjs, 69 files) through the worker pool and the cpu engine.

Every file is opened and its first pages converted; each ends with an outcome (converted, or a PdfError
code) within its time budget, no other exception escapes, and the files with a known password convert when
it is given. The outcome table is printed. (The hot-folder test in tests/hotfolder does the same through
the daemon; this one pins the layer below it.)
"""

from __future__ import annotations

import asyncio
import csv
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from daemon.engines.cpu import CpuEngine
from daemon.ocr.engine import load_page_input, run_page
from daemon.ocr.errors import PdfError
from daemon.ocr.pdfworker import PdfWorkerPool

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "pdfjs"
MAX_PAGES = 2  # per file: the corpus has 600+ pages; the first pages show every failure mode it holds
OPEN_TIMEOUT_S = 20.0
PAGE_TIMEOUT_S = 20.0
# The corpus pass pins outcomes, not OCR quality (the fixtures pin that at 144 dpi): scans are OCR'd at a
# lower resolution here, which halves the OCR time of the dozen scanned pages.
OCR_DPI = 100
RESPAWN_SLACK_S = 60.0  # a file may wait for a worker replaced after another file's timeout

pytestmark = [
    pytest.mark.asyncio(loop_scope="package"),
    pytest.mark.skipif(not CORPUS.is_dir(), reason=f"the pdf.js corpus is not at {CORPUS}; nothing to run"),
]


@dataclass
class Outcome:
    row: dict[str, str]
    result: str = ""  # "ok" once the file opened, else its PdfError code; "ESCAPED" for anything else
    pages: list[str] = field(default_factory=list)  # per page: the method, or the PdfError code
    seconds: float = 0.0
    detail: str = ""

    @property
    def budget_s(self) -> float:
        # per page: reading its text layer, then the engine, each under the page timeout
        return OPEN_TIMEOUT_S + len(self.pages) * 2 * PAGE_TIMEOUT_S + RESPAWN_SLACK_S


def manifest() -> list[dict[str, str]]:
    with (CORPUS / "MANIFEST.tsv").open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


async def convert_file(pool: PdfWorkerPool, engine: CpuEngine, row: dict[str, str]) -> Outcome:
    out = Outcome(row)
    path, password = CORPUS / row["file"], row["password"] or None
    started = time.monotonic()
    try:
        info = await pool.inspect(path, password, timeout=OPEN_TIMEOUT_S)
        out.result = "ok"
        for page_no in range(min(MAX_PAGES, info.page_count)):
            try:
                page = await load_page_input(
                    pool, job_id="corpus", pdf=path, page_no=page_no, password=password, needs_image=False,
                    timeout=PAGE_TIMEOUT_S,
                )
                out.pages.append((await run_page(engine, page)).method)
            except PdfError as e:
                out.pages.append(e.code)
                out.detail = str(e)
    except PdfError as e:
        out.result, out.detail = e.code, str(e)
    except Exception as e:  # the test fails on these; recorded so the table shows them all
        out.result, out.detail = "ESCAPED", f"{type(e).__name__}: {e}"
    out.seconds = time.monotonic() - started
    return out


def table(outcomes: list[Outcome], total_s: float) -> str:
    lines = [f"{'category':<11}{'file':<33}{'manifest':<18}{'outcome':<13}{'s':>6}  pages / detail"]
    for o in outcomes:
        pages = ",".join(o.pages)
        lines.append(
            f"{o.row['category']:<11}{o.row['file']:<33}{o.row['plain_pymupdf_result']:<18}{o.result:<13}"
            f"{o.seconds:6.1f}  {pages}{'  ' + o.detail[:90] if o.detail else ''}"
        )
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.result] = counts.get(o.result, 0) + 1
    page_counts: dict[str, int] = {}
    for o in outcomes:
        for p in o.pages:
            page_counts[p] = page_counts.get(p, 0) + 1
    lines.append(f"files: {counts}  pages: {page_counts}  total {total_s:.1f} s")
    return "\n".join(lines)


async def test_every_corpus_file_gets_an_outcome_in_time_and_known_passwords_open(
    pool: PdfWorkerPool, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = manifest()
    assert len(rows) == 69
    engine = CpuEngine(pool, page_timeout_s=PAGE_TIMEOUT_S, dpi=OCR_DPI)
    gate = asyncio.Semaphore(pool.size)  # one file per worker, as the daemon's job lane would

    async def one(row: dict[str, str]) -> Outcome:
        async with gate:
            return await convert_file(pool, engine, row)

    started = time.monotonic()
    outcomes = await asyncio.gather(*(one(r) for r in rows))
    total = time.monotonic() - started
    with capsys.disabled():
        print("\n" + table(outcomes, total))

    assert [o for o in outcomes if o.result == "ESCAPED"] == []
    assert [o.row["file"] for o in outcomes if not o.result] == []
    late = [(o.row["file"], round(o.seconds), o.budget_s) for o in outcomes if o.seconds > o.budget_s]
    assert late == []
    by_file = {o.row["file"]: o for o in outcomes}
    for o in outcomes:
        expected = o.row["plain_pymupdf_result"]
        name = o.row["file"]
        if o.row["password"]:
            # saslprep-r6.pdf included: the worker applies SASLprep when the password as given fails
            assert (o.result, set(o.pages) - {"text_layer", "ocr", "fallback"}) == ("ok", set()), name
        elif expected == "password_required":
            assert o.result == "encrypted", name
        elif expected == "zero_pages":
            assert o.result == "zero_pages", name
        elif expected == "ok":
            assert o.result == "ok", name  # plain PyMuPDF opens it, so must we
        if o.row["category"] in ("normal", "cjk", "many_pages"):
            assert set(o.pages) <= {"text_layer", "ocr", "fallback", "timeout"}, name
    # MuPDF's own exceptions surface as a coded PdfError, not as a crash or an escape
    assert by_file["Pages-tree-refs.pdf"].pages[1] == "corrupt"
    assert by_file["poppler-67295-0.pdf"].result == "corrupt"
