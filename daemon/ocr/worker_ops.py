"""What a PDF worker process does: every MuPDF, pymupdf4llm and rapidocr call on an untrusted file.

Runs only inside a worker spawned by :mod:`daemon.ocr.pdfworker`; the daemon never imports this module, so
the daemon never loads MuPDF (and can never fork with MuPDF loaded). Each request is answered with
``("ok", result)`` or ``("err", code, message)``; every expected failure becomes a code and a line a person
can act on, and every string leaving the process is made UTF-8 safe first.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pymupdf

from daemon.ocr import reading_order
from daemon.ocr.errors import PdfError
from daemon.ocr.pdfworker import PdfInfo, RenderedPage, WorkerConfig, WorkerReady
from daemon.ocr.saslprep import saslprep
from daemon.ocr.text_quality import clean_text, text_layer_usable

HEADER_WINDOW = 1024  # the PDF header may start anywhere in the first KiB (ISO 32000-2, 7.5.2)
PIXEL_CEILING = 25_000_000  # no render larger than this, whatever the caller asks: 4000-pt pages exist
HEADER_SAMPLE_PAGES = 50  # legacy mode: font-size statistics for headings from this many pages
MAX_WARNINGS_CHARS = 2000


def cap_onnx_threads(threads: int) -> None:
    """Make every onnxruntime session created from now on in this process use ``threads`` threads.

    pymupdf's layout model builds its sessions with default options: one intra-op thread per core, in every
    worker, so two workers on two cores ran four spinning threads that also starved the daemon's own loop.
    The pool sizes ``threads`` so that the workers together fill the cores once (the rule rapidocr's sessions
    already follow). pymupdf exposes no setting for this, hence the subclass. (The layout model is memory
    bound on small machines: see bench/ocr_cpu.py for what the pool gains over one process.)
    """
    import onnxruntime as ort

    base = ort.SessionOptions
    if getattr(base, "_ftmllm_threads", None) == threads:
        return

    class CappedSessionOptions(base):  # type: ignore[misc, valid-type]
        _ftmllm_threads = threads

        def __init__(self) -> None:
            super().__init__()
            self.intra_op_num_threads = threads
            self.inter_op_num_threads = 1

    ort.SessionOptions = CappedSessionOptions


def _hint_password(name: str) -> str:
    return f"give the password with a sidecar {name}.password file or `ftctl submit ocr {name} --password` (asked)"


class Worker:
    """State kept between requests: open documents (LRU), the OCR engine, pymupdf4llm heading statistics."""

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self._docs: OrderedDict[tuple[Any, ...], pymupdf.Document] = OrderedDict()
        self._needs_pass: dict[tuple[Any, ...], bool] = {}
        self._headers: dict[tuple[Any, ...], Any] = {}
        self._ocr: Any = None
        self._md: Any = None

    # -- set-up --------------------------------------------------------------------------------------------

    def preload(self) -> None:
        """Import and warm what requests will use, so that a page's timeout measures the page, not imports."""
        if "markdown" in self.cfg.preload:
            doc = pymupdf.open()
            page = doc.new_page(width=200, height=100)
            page.insert_text((20, 50), "warm up")
            self._markdown(doc, 0, key=("warm-up",))
            self._headers.pop(("warm-up",), None)
        if "ocr" in self.cfg.preload:
            pix = pymupdf.Pixmap(pymupdf.csRGB, pymupdf.IRect(0, 0, 64, 32), False)
            pix.clear_with(255)
            self._ocr_engine()(pix.tobytes("png"))

    def _markdown(self, doc: pymupdf.Document, page_no: int, key: tuple[Any, ...]) -> str:
        if self._md is None:
            cap_onnx_threads(self.cfg.threads)
            import pymupdf4llm

            pymupdf4llm.use_layout(self.cfg.markdown_mode == "layout")
            self._md = pymupdf4llm
        if self.cfg.markdown_mode == "layout":
            # use_ocr=False: image-only pages are OCR'd by the engine, with its own timeout and reading order.
            text = self._md.to_markdown(doc, pages=[page_no], use_ocr=False, show_progress=False)
        else:
            from pymupdf4llm.helpers import pymupdf_rag

            # Heading levels come from font-size statistics over the document; computing them once per
            # document instead of once per page call keeps a long document linear.
            hdr = self._headers.get(key)
            if hdr is None:
                hdr = pymupdf_rag.IdentifyHeaders(doc, pages=range(min(doc.page_count, HEADER_SAMPLE_PAGES)))
                self._headers[key] = hdr
            text = pymupdf_rag.to_markdown(doc, pages=[page_no], hdr_info=hdr, show_progress=False)
        return str(text)

    def _ocr_engine(self) -> Any:
        if self._ocr is None:
            from rapidocr import RapidOCR

            logging.getLogger("RapidOCR").setLevel(logging.ERROR)
            threads = self.cfg.threads
            self._ocr = RapidOCR(
                params={
                    "Global.log_level": "error",
                    "EngineConfig.onnxruntime.intra_op_num_threads": threads,
                    "EngineConfig.onnxruntime.inter_op_num_threads": 1,
                    # The angle classifier sees each line squeezed to 192x48 pixels; on long full-width lines
                    # it called upright text "180" and the recogniser then read the flipped crop as garbage
                    # ("he rr r r n t s z e y oer"): 8-26 % CER on clean scans (tests/ocrtruth.py's dense
                    # pages). Lines upside down within an upright page do not occur in documents.
                    "Global.use_cls": False,
                    # The detector at full page resolution costs ~4 s a page here; capping its input side
                    # keeps body text legible at 144 dpi and halves the time (see README numbers).
                    "Det.limit_type": "max",
                    "Det.limit_side_len": self.cfg.ocr_det_side,
                }
            )
        return self._ocr

    # -- documents -----------------------------------------------------------------------------------------

    def _open(self, path: str, password: str | None) -> tuple[pymupdf.Document, tuple[Any, ...]]:
        name = Path(path).name
        try:
            st = os.stat(path)
            with open(path, "rb") as f:
                head = f.read(HEADER_WINDOW)
        except OSError as e:
            raise PdfError(
                "unreadable", f"cannot read {name}: {e.strerror}; check that it exists and is readable"
            ) from None
        key = (path, password, st.st_size, st.st_mtime_ns)
        doc = self._docs.get(key)
        if doc is not None:
            self._docs.move_to_end(key)
            return doc, key
        if not head:
            raise PdfError("not_pdf", f"{name} is empty (0 bytes); copy the whole file again")
        # No header: not a PDF, unless MuPDF still finds pages in it (pdf.js' bug1606566.pdf lacks "%PDF-"
        # and is otherwise sound; viewers open it, so do we).
        not_pdf = PdfError("not_pdf", f"{name} is not a PDF (no %PDF- header); only PDF files can be converted")
        has_header = b"%PDF-" in head
        try:
            doc = pymupdf.open(path, filetype="pdf")
        except (pymupdf.FileDataError, pymupdf.mupdf.FzErrorBase) as e:
            if not has_header:
                raise not_pdf from None
            raise PdfError(
                "corrupt",
                f"{name} is damaged and MuPDF cannot open it ({_reason(e)}); re-export or re-download it",
            ) from None
        # read needs_pass once, here: pymupdf 2.0 returns empty text for every page of an authenticated
        # document once needs_pass has been read after authenticate() (seen with AES-256 files)
        needs_pass = bool(doc.needs_pass)
        self._needs_pass[key] = needs_pass
        if needs_pass:
            if password is None:
                raise PdfError("encrypted", f"encrypted: {name} needs a password; {_hint_password(name)}")
            prepared = saslprep(password)
            if not doc.authenticate(password) and not (
                prepared is not None and prepared != password and doc.authenticate(prepared)
            ):
                raise PdfError("bad_password", f"the password given for {name} does not open it; "
                               f"correct it ({_hint_password(name)})")
        try:
            count = doc.page_count
        except (pymupdf.mupdf.FzErrorBase, RuntimeError) as e:
            raise PdfError(
                "corrupt",
                f"{name} is damaged: MuPDF cannot count its pages ({_reason(e)}); re-export or re-download it",
            ) from None
        if count == 0 and not has_header:
            raise not_pdf
        if count == 0:
            raise PdfError("zero_pages", f"{name} has no pages (it is probably truncated or damaged); "
                           "nothing to convert: re-export or re-download it")
        self._docs[key] = doc
        while len(self._docs) > 2:
            old_key, old = self._docs.popitem(last=False)
            self._headers.pop(old_key, None)
            self._needs_pass.pop(old_key, None)
            old.close()
        return doc, key

    def _page(self, path: str, password: str | None, page_no: int) -> tuple[pymupdf.Page, tuple[Any, ...]]:
        doc, key = self._open(path, password)
        if not 0 <= page_no < doc.page_count:
            raise PdfError("page_range", f"{Path(path).name} has {doc.page_count} pages; page {page_no + 1} "
                           "does not exist")
        return doc.load_page(page_no), key

    # -- requests ------------------------------------------------------------------------------------------

    def op_inspect(self, path: str, password: str | None) -> PdfInfo:
        doc, key = self._open(path, password)
        sizes: list[tuple[float, float]] = []
        for i in range(doc.page_count):
            try:
                r = doc.page_cropbox(i)
                sizes.append((round(r.width, 2), round(r.height, 2)))
            except (pymupdf.mupdf.FzErrorBase, RuntimeError, ValueError):
                sizes.append((0.0, 0.0))  # a broken page; its own conversion will say what is wrong
        meta = doc.metadata or {}
        return PdfInfo(
            page_count=doc.page_count,
            encrypted=bool(meta.get("encryption")) or self._needs_pass.get(key, False),
            needs_password=self._needs_pass.get(key, False),
            page_sizes=sizes,
            title=clean_text(meta.get("title") or ""),
            encryption=clean_text(meta.get("encryption") or ""),
            warnings=_warnings(),
        )

    def op_render(
        self, path: str, password: str | None, page_no: int, dpi: float, max_pixels: int | None, with_png: bool
    ) -> RenderedPage:
        page, _ = self._page(path, password, page_no)
        text = clean_text(page.get_text("text", sort=True))
        annotated = page.first_annot is not None or page.first_widget is not None
        usable, score = text_layer_usable(text, _image_coverage(page), annotated)
        if not with_png:
            return RenderedPage(b"", 0, 0, 0.0, text, usable, score, False)
        rect = page.rect
        cap = min(max_pixels or PIXEL_CEILING, PIXEL_CEILING)
        zoom = dpi / 72
        if rect.width * rect.height * zoom * zoom > cap:
            zoom = math.sqrt(cap / (rect.width * rect.height)) * 0.999  # rounding up must stay within the cap
        pix = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False, colorspace=pymupdf.csRGB)
        ratio, _color = pix.color_topusage()
        return RenderedPage(
            png=pix.tobytes("png"),
            width=pix.width,
            height=pix.height,
            dpi=round(zoom * 72, 2),
            text=text,
            text_usable=usable,
            text_score=score,
            blank=ratio >= 0.9995,
        )

    def op_markdown(self, path: str, password: str | None, page_no: int) -> str:
        page, key = self._page(path, password, page_no)
        return clean_text(self._markdown(page.parent, page_no, key))

    def op_ocr(self, png: bytes) -> str:
        result = self._ocr_engine()(png)
        if result.boxes is None or result.txts is None:
            return ""
        boxes = reading_order.boxes_from_ocr(result.boxes.tolist(), list(result.txts))
        return clean_text(reading_order.to_markdown(boxes))


def _reason(e: BaseException) -> str:
    text = clean_text(str(e)).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def _where(kwargs: dict[str, Any]) -> str:
    if "path" not in kwargs:
        return "the page image"
    name = Path(kwargs["path"]).name
    return f"page {kwargs['page_no'] + 1} of {name}" if "page_no" in kwargs else name


def _warnings() -> str:
    text = clean_text(pymupdf.TOOLS.mupdf_warnings(reset=True) or "")
    return text[-MAX_WARNINGS_CHARS:]


def _image_coverage(page: pymupdf.Page) -> float:
    area = abs(page.rect)
    if area <= 0:
        return 0.0
    covered = 0.0
    for info in page.get_image_info():
        covered += abs(pymupdf.Rect(info["bbox"]) & page.rect)
    return min(1.0, covered / area)


def _die_with_parent() -> None:
    # If the daemon is killed -9, a worker busy in MuPDF's C code would otherwise run on to the end.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def serve(conn: Connection) -> None:
    """The worker's main loop: read the config, load, say ready, answer requests until the socket closes."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is for the daemon, which stops us
    cfg: WorkerConfig = conn.recv()
    pymupdf.TOOLS.mupdf_display_errors(False)
    pymupdf.TOOLS.mupdf_display_warnings(False)
    worker = Worker(cfg)
    trim = _malloc_trim()
    started = time.monotonic()
    worker.preload()
    _warnings()
    conn.send(WorkerReady(pid=os.getpid(), seconds=time.monotonic() - started, pymupdf=pymupdf.__version__))
    while True:
        try:
            op, kwargs = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply: tuple[Any, ...] = ("ok", getattr(worker, "op_" + op)(**kwargs))
        except PdfError as e:
            reply = ("err", e.code, clean_text(e.message))
        except (pymupdf.mupdf.FzErrorBase, pymupdf.FileDataError) as e:
            # MuPDF's own exceptions (FzError*) do not derive from RuntimeError; FileDataError does.
            reply = ("err", "corrupt", f"{_where(kwargs)} cannot be read, MuPDF says: {_reason(e)}; "
                     "the file is damaged: re-export or re-download it")
        except MemoryError:
            reply = ("err", "internal", f"{_where(kwargs)}: out of memory while converting it")
        except RuntimeError as e:
            # Some MuPDF failures reach Python as RuntimeError("code=N: …") rather than as FzError*.
            code = "corrupt" if str(e).startswith("code=") else "internal"
            reply = ("err", code, f"{_where(kwargs)} cannot be read, MuPDF says: {_reason(e)}")
        except Exception as e:
            reply = ("err", "internal", f"{_where(kwargs)} failed in {op}: {type(e).__name__}: {_reason(e)}")
        _warnings()
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return
        except Exception as e:  # a result that does not pickle is our bug; say so instead of dying
            conn.send(("err", "internal", f"cannot send the result: {type(e).__name__}: {_reason(e)}"))
        sys.stdout.flush()
        trim()  # after the reply: the daemon is not kept waiting for it


def _malloc_trim() -> Callable[[], object]:
    """glibc's malloc_trim(0), or a no-op where there is none.

    The layout model and MuPDF free most of what a page allocated, but glibc keeps the freed heap: a worker
    with the OCR models loaded grew by ~5 MB a page (273 → 582 MB over 60 pages, ~1.1 GB each on a 300-page
    document); trimming after every request keeps it flat (~265 MB) for ~9 ms a request (2 % of a layout page).
    """
    try:
        fn = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: fn(0)


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])))
