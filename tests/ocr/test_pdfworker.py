"""The PDF worker pool against real spawned workers and generated PDFs: errors, rendering, timeouts, crashes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from daemon.ocr.errors import PdfError
from daemon.ocr.pdfworker import PdfWorkerPool
from tests.fixtures import pdfs

pytestmark = pytest.mark.asyncio(loop_scope="package")


async def wait_for(condition, what: str, deadline_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_inspect_reports_pages_sizes_and_no_encryption(pool: PdfWorkerPool, pdf_dir: dict[str, Path]) -> None:
    info = await pool.inspect(pdf_dir["born_digital"], None, timeout=30)
    assert info.page_count == 2
    assert info.page_sizes == [(595.0, 842.0), (595.0, 842.0)]
    assert (info.encrypted, info.needs_password) == (False, False)
    assert (await pool.inspect(pdf_dir["numbered"], None, timeout=30)).page_count == 50


async def test_encrypted_file_without_password_says_how_to_give_one(
    pool: PdfWorkerPool, pdf_dir: dict[str, Path]
) -> None:
    with pytest.raises(PdfError) as e:
        await pool.inspect(pdf_dir["encrypted"], None, timeout=30)
    assert e.value.code == "encrypted"
    assert str(e.value).startswith("encrypted:")
    assert "encrypted.pdf.password" in str(e.value) and "--password" in str(e.value)


async def test_wrong_password_is_bad_password_and_the_right_one_opens(
    pool: PdfWorkerPool, pdf_dir: dict[str, Path]
) -> None:
    with pytest.raises(PdfError) as e:
        await pool.inspect(pdf_dir["encrypted"], "wrong", timeout=30)
    assert e.value.code == "bad_password"
    info = await pool.inspect(pdf_dir["encrypted"], pdfs.ENCRYPTED_PASSWORD, timeout=30)
    assert (info.page_count, info.encrypted, info.needs_password) == (1, True, True)
    assert "AES" in info.encryption
    page = await pool.page_text(pdf_dir["encrypted"], 0, pdfs.ENCRYPTED_PASSWORD, timeout=30)
    assert pdfs.ENCRYPTED_TEXT in " ".join(page.text.split())


@pytest.mark.parametrize(
    ("name", "code", "hint"),
    [
        ("zero_pages", "zero_pages", "no pages"),
        ("corrupt", "corrupt", "re-download"),
        ("not_pdf", "not_pdf", "not a PDF"),
    ],
)
async def test_unconvertible_files_raise_pdf_error_with_code_and_advice(
    pool: PdfWorkerPool, pdf_dir: dict[str, Path], name: str, code: str, hint: str
) -> None:
    with pytest.raises(PdfError) as e:
        await pool.inspect(pdf_dir[name], None, timeout=30)
    assert e.value.code == code
    assert pdf_dir[name].name in str(e.value) and hint in str(e.value)


async def test_a_sound_pdf_without_its_header_line_still_opens(
    pool: PdfWorkerPool, pdf_dir: dict[str, Path]
) -> None:
    assert not pdf_dir["headerless"].read_bytes()[:1024].count(b"%PDF-")
    page = await pool.page_text(pdf_dir["headerless"], 0, None, timeout=30)
    assert pdfs.HEADERLESS_TEXT in " ".join(page.text.split())


async def test_empty_and_missing_files_are_named_in_the_error(pool: PdfWorkerPool, tmp_path: Path) -> None:
    empty = tmp_path / "empty.pdf"
    empty.write_bytes(b"")
    with pytest.raises(PdfError) as e:
        await pool.inspect(empty, None, timeout=30)
    assert (e.value.code, "empty.pdf is empty" in str(e.value)) == ("not_pdf", True)
    with pytest.raises(PdfError) as e:
        await pool.inspect(tmp_path / "gone.pdf", None, timeout=30)
    assert e.value.code == "unreadable" and "gone.pdf" in str(e.value)


async def test_page_out_of_range_is_page_range(pool: PdfWorkerPool, pdf_dir: dict[str, Path]) -> None:
    with pytest.raises(PdfError) as e:
        await pool.page_text(pdf_dir["born_digital"], 2, None, timeout=30)
    assert e.value.code == "page_range" and "page 3" in str(e.value)


async def test_render_is_144_dpi_png_with_text_layer_and_usability(
    pool: PdfWorkerPool, pdf_dir: dict[str, Path]
) -> None:
    page = await pool.render_page(pdf_dir["born_digital"], 0, None, dpi=144, timeout=30)
    assert page.png.startswith(b"\x89PNG\r\n\x1a\n")
    assert (page.width, page.height, page.dpi) == (1190, 1684, 144.0)
    assert pdfs.TITLE in page.text and pdfs.CJK_TEXT in page.text
    assert page.text_usable and not page.blank
    scan = await pool.render_page(pdf_dir["scanned"], 0, None, timeout=30)
    assert scan.text == "" and not scan.text_usable and not scan.blank


async def test_render_lowers_dpi_to_stay_within_max_pixels(pool: PdfWorkerPool, pdf_dir: dict[str, Path]) -> None:
    budget = 1_003_520
    page = await pool.render_page(pdf_dir["born_digital"], 0, None, dpi=144, max_pixels=budget, timeout=30)
    assert page.width * page.height <= budget
    assert page.width * page.height > 0.98 * budget  # lowered only as far as needed
    assert page.dpi < 144


async def test_a_page_over_its_timeout_kills_and_replaces_the_worker(
    bare_pool: PdfWorkerPool, pdf_dir: dict[str, Path]
) -> None:
    await wait_for(lambda: len(bare_pool.pids()) == 1, "a live worker")
    [old_pid] = bare_pool.pids()
    replaced = bare_pool.replaced
    # The heavy page takes MuPDF seconds to render (≈ 2–3 s here); 0.2 s cannot be enough.
    with pytest.raises(PdfError) as e:
        await bare_pool.render_page(pdf_dir["heavy"], 0, None, dpi=144, timeout=0.2)
    assert e.value.code == "timeout"
    assert "page 1 of heavy.pdf" in str(e.value) and "ocr.page_timeout_s" in str(e.value)
    assert bare_pool.replaced == replaced + 1
    await wait_for(lambda: not _alive(old_pid), "the timed-out worker to be killed")
    page = await bare_pool.page_text(pdf_dir["born_digital"], 0, None, timeout=60)  # waits for the new one
    assert pdfs.TITLE in page.text
    assert bare_pool.pids() and old_pid not in bare_pool.pids()


async def test_a_worker_that_segfaults_gives_crash_and_is_replaced(
    bare_pool: PdfWorkerPool, pdf_dir: dict[str, Path]
) -> None:
    call = asyncio.create_task(bare_pool.render_page(pdf_dir["heavy"], 0, None, dpi=144, timeout=120))
    await wait_for(lambda: bare_pool.busy_pids(), "the worker to take the request")
    [pid] = bare_pool.busy_pids()
    os.kill(pid, signal.SIGSEGV)
    with pytest.raises(PdfError) as e:
        await call
    assert e.value.code == "crash"
    assert "SIGSEGV" in str(e.value) and "page 1 of heavy.pdf" in str(e.value)
    page = await bare_pool.page_text(pdf_dir["born_digital"], 1, None, timeout=60)
    assert pdfs.OUTLOOK in page.text


async def test_cancelling_a_call_stops_its_worker(bare_pool: PdfWorkerPool, pdf_dir: dict[str, Path]) -> None:
    call = asyncio.create_task(bare_pool.render_page(pdf_dir["heavy"], 0, None, dpi=144, timeout=120))
    await wait_for(lambda: bare_pool.busy_pids(), "the worker to take the request")
    [pid] = bare_pool.busy_pids()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await wait_for(lambda: not _alive(pid), "the cancelled worker to be killed")
    assert (await bare_pool.inspect(pdf_dir["mixed"], None, timeout=60)).page_count == 3


async def test_close_kills_workers_and_ends_running_waiting_and_later_calls(pdf_dir: dict[str, Path]) -> None:
    p = PdfWorkerPool(size=1, preload=())
    await p.start()
    [pid] = p.pids()
    running = asyncio.create_task(p.render_page(pdf_dir["heavy"], 0, None, timeout=120))
    await wait_for(lambda: p.busy_pids(), "the worker to take the request")
    waiting = asyncio.create_task(p.inspect(pdf_dir["born_digital"], None, timeout=30))
    await p.close()
    assert not _alive(pid)
    for call in (running, waiting, p.inspect(pdf_dir["born_digital"], None, timeout=30)):
        with pytest.raises(PdfError) as e:
            await call
        assert e.value.code == "closed" and "submit the file again" in str(e.value)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purpose.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
