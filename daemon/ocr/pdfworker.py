"""A pool of spawned worker processes that do every MuPDF call on an untrusted PDF, each with a timeout.

Why processes: MuPDF can spend minutes in C code on a hostile file (one page of the pdf.js corpus has 38,556
vector paths) and Python cannot interrupt it; a segfault in MuPDF would take the daemon with it. So the
daemon never imports MuPDF: each request goes to a worker, and a worker that overruns its timeout is killed
and replaced.

Workers are *spawned* — a fresh interpreter exec'd as ``python -m daemon.ocr.worker_ops FD`` — never forked:
a child forked after pymupdf4llm was imported was seen to hang. (``multiprocessing``'s spawn context was
tried first: it re-runs the parent's ``__main__`` in every worker, which loads the whole daemon there and
breaks outright when the main script lacks an ``if __name__ == "__main__"`` guard.) Requests and replies are
pickled over a socketpair with :class:`multiprocessing.connection.Connection` framing.

Usage, from the daemon's asyncio loop::

    async with PdfWorkerPool(size=2) as pool:
        info = await pool.inspect(path, password, timeout=30)
        page = await pool.render_page(path, 0, password, dpi=144, timeout=120)
        md = await pool.page_markdown(path, 0, password, timeout=120)
        text = await pool.ocr_image(page.png, timeout=120)

Every method raises :class:`~daemon.ocr.errors.PdfError` for anything that goes wrong with the file, the
page or the worker, and nothing else (asyncio cancellation aside: a cancelled call kills its worker, since
the work cannot be stopped any other way). Page numbers are 0-based, as in PyMuPDF; messages say
``page N`` 1-based for people.

Markdown mode (``markdown_mode``): ``layout`` (default) uses pymupdf4llm's layout model: section headings
found by layout rather than font size, paragraphs joined, two-column papers in reading order. ``legacy`` is
pymupdf4llm's font-size heuristic (heading statistics computed once per document, not once per page call):
2–7× faster, but on tracemonkey.pdf it finds none of the section headings (bold body-size text) that layout
finds, and it keeps hard line breaks. Measured here, one worker, CPU time per page of pdf.js papers and
books: layout 0.7–1.3 s, legacy 0.1–0.6 s. The CPU engine is the fallback for machines without a GPU, so
quality wins; ``legacy`` is there for throughput (config ``ocr.markdown_mode``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from daemon.ocr.errors import PdfError

log = logging.getLogger(__name__)

TIMEOUT_SETTING = "ocr.page_timeout_s"
DEFAULT_TIMEOUT_S = 120.0
MAX_TASKS_PER_WORKER = 1000  # a fresh worker now and then bounds MuPDF's caches and any leak

MarkdownMode = Literal["layout", "legacy"]


@dataclass(frozen=True)
class PdfInfo:
    page_count: int
    encrypted: bool  # the file is encrypted (with or without a user password)
    needs_password: bool  # a user password was needed to open it (and was given)
    page_sizes: list[tuple[float, float]]  # (width, height) in points; (0, 0) for a page MuPDF cannot read
    title: str
    encryption: str  # MuPDF's description, e.g. "Standard V5 R6 256-bit AES"; "" when not encrypted
    warnings: str = ""  # MuPDF's warnings while opening (repairs etc.), for the log


@dataclass(frozen=True)
class RenderedPage:
    png: bytes  # b"" when only the text layer was asked for
    width: int  # pixels
    height: int
    dpi: float  # what was used, after capping the pixel count
    text: str  # the page's text layer, plain
    text_usable: bool  # text layer good enough to convert without OCR (see text_quality)
    text_score: float  # fraction of its visible characters that are real text
    blank: bool = False  # the rendered page is one colour: nothing to OCR


@dataclass(frozen=True)
class WorkerConfig:
    markdown_mode: MarkdownMode = "layout"
    preload: tuple[str, ...] = ("markdown", "ocr")
    threads: int = 1  # onnxruntime threads per worker (rapidocr)
    ocr_det_side: int = 1280  # longest side of the image the text detector sees
    log_path: str | None = None  # the worker's stdout/stderr; None: inherit the daemon's


@dataclass(frozen=True)
class WorkerReady:
    pid: int
    seconds: float
    pymupdf: str


# The directory that holds the ``daemon`` package: the worker must import the same code as the daemon.
_SOURCE_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass(eq=False)  # identity semantics: workers live in a set
class _Worker:
    proc: subprocess.Popen[bytes]
    conn: Connection
    tasks: int = 0
    busy: bool = False
    ready: WorkerReady | None = field(default=None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def roundtrip(self, msg: tuple[str, dict[str, Any]]) -> tuple[Any, ...]:
        """Blocking send and receive, run in a thread; EOFError when the worker dies (or is killed)."""
        self.conn.send(msg)
        reply: tuple[Any, ...] = self.conn.recv()
        return reply

    def reap(self, timeout: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        with contextlib.suppress(OSError):
            self.conn.close()


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "stopped responding"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class PdfWorkerPool:
    """N spawned PDF workers; requests beyond N wait for a free worker (the wait is not part of a timeout)."""

    def __init__(
        self,
        size: int = 2,
        *,
        markdown_mode: MarkdownMode = "layout",
        preload: Iterable[str] = ("markdown", "ocr"),
        threads_per_worker: int | None = None,
        ocr_det_side: int = 1280,
        start_timeout: float = 120.0,
        log_path: Path | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.size = size
        threads = threads_per_worker or max(1, (os.cpu_count() or 1) // size)
        self._cfg = WorkerConfig(
            markdown_mode=markdown_mode,
            preload=tuple(preload),
            threads=threads,
            ocr_det_side=ocr_det_side,
            log_path=str(log_path) if log_path else None,
        )
        self._start_timeout = start_timeout
        # One thread per in-flight request plus room for the threads of just-killed workers to wind down.
        self._executor = ThreadPoolExecutor(max_workers=2 * size + 2, thread_name_prefix="pdfworker")
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._workers: set[_Worker] = set()
        self._respawns: set[asyncio.Task[None]] = set()
        self._closed = False
        self._closed_event = asyncio.Event()
        self._started = False
        self.replaced = 0  # workers killed for a timeout or found dead; for status and tests
        self.last_spawn_error = ""

    @property
    def markdown_mode(self) -> MarkdownMode:
        return self._cfg.markdown_mode

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def __aenter__(self) -> PdfWorkerPool:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Spawn the workers and wait until each has loaded its libraries."""
        if self._started:
            return
        self._started = True
        workers = await asyncio.gather(*(self._spawn() for _ in range(self.size)), return_exceptions=True)
        errors = [w for w in workers if isinstance(w, BaseException)]
        for w in workers:
            if isinstance(w, _Worker):
                self._idle.put_nowait(w)
        if errors:
            await self.close()
            raise PdfError("internal", f"the PDF workers did not start: {errors[0]}")

    async def close(self) -> None:
        """Kill every worker; pending and later calls raise PdfError('closed')."""
        self._closed = True
        self._closed_event.set()
        for task in list(self._respawns):
            task.cancel()
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(self._executor, w.kill) for w in list(self._workers)), return_exceptions=True
        )
        self._workers.clear()
        self._executor.shutdown(wait=False)

    def pids(self) -> list[int]:
        """Process ids of the live workers (for RSS accounting and tests)."""
        return sorted(w.pid for w in self._workers if w.alive())

    def busy_pids(self) -> list[int]:
        return sorted(w.pid for w in self._workers if w.busy)

    def renderer(self) -> str:
        """What renders pages (``pymupdf 1.26.4``), once a worker has started: training pages record it
        (``dataset from-pages``), since another MuPDF may rasterise the same page differently."""
        return next((f"pymupdf {w.ready.pymupdf}" for w in self._workers if w.ready is not None), "")

    async def _spawn(self) -> _Worker:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._spawn_blocking)

    def _spawn_blocking(self) -> _Worker:
        ours, theirs = socket.socketpair()
        conn = Connection(ours.detach())
        child_fd = theirs.detach()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_SOURCE_ROOT, env.get("PYTHONPATH", "")) if p)
        log_file = open(self._cfg.log_path, "ab") if self._cfg.log_path else None  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "daemon.ocr.worker_ops", str(child_fd)],
                pass_fds=(child_fd,),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT if log_file else None,
                env=env,
            )
        except BaseException:
            conn.close()
            raise
        finally:
            os.close(child_fd)
            if log_file:
                log_file.close()
        worker = _Worker(proc, conn)
        self._workers.add(worker)
        try:
            conn.send(self._cfg)
            if not conn.poll(self._start_timeout):
                raise PdfError("internal", f"a PDF worker did not start within {self._start_timeout:g} s")
            ready = conn.recv()
        except (EOFError, OSError):
            worker.kill()
            self._workers.discard(worker)
            raise PdfError("internal", f"a PDF worker {_exit_reason(proc.returncode)} while starting") from None
        except PdfError:
            worker.kill()
            self._workers.discard(worker)
            raise
        worker.ready = ready
        log.debug("pdf worker %s ready in %.1f s", worker.pid, ready.seconds)
        return worker

    def _replace(self, worker: _Worker, *, failed: bool = True) -> None:
        """Kill a worker (in the background) and start a fresh one in its place."""
        self._workers.discard(worker)
        self.replaced += failed
        with contextlib.suppress(ProcessLookupError, OSError):
            worker.proc.kill()  # now: a respawn task cancelled by close() must not leave it running
        task = asyncio.get_running_loop().create_task(self._respawn(worker))
        self._respawns.add(task)
        task.add_done_callback(self._respawns.discard)

    async def _respawn(self, old: _Worker) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, old.kill)
        delay = 1.0
        while not self._closed:
            try:
                fresh = await self._spawn()
            except Exception as e:  # PdfError, or OSError from Popen (out of fds or memory)
                self.last_spawn_error = str(e)
                log.error("%s; trying again in %.0f s", e, delay)
                await asyncio.sleep(delay)  # back-off between attempts, not synchronisation
                delay = min(delay * 2, 60.0)
                continue
            if self._closed:
                await loop.run_in_executor(self._executor, fresh.kill)
                return
            self._idle.put_nowait(fresh)
            return

    # -- requests ------------------------------------------------------------------------------------------

    async def _next_idle(self) -> _Worker | None:
        """The next free worker, or None once the pool is closed (waiters must not hang on a closed pool)."""
        if self._closed:
            return None
        get = asyncio.ensure_future(self._idle.get())
        closing = asyncio.ensure_future(self._closed_event.wait())
        try:
            await asyncio.wait({get, closing}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            closing.cancel()
            if get.done() and not get.cancelled():
                self._idle.put_nowait(get.result())  # taken just as we were cancelled: give it back
            else:
                get.cancel()
            raise
        closing.cancel()
        if not get.done():
            get.cancel()
            return None
        worker = get.result()
        if self._closed:
            self._idle.put_nowait(worker)
            return None
        return worker

    async def _call(self, op: str, kwargs: dict[str, Any], *, timeout: float, what: str) -> Any:
        if not self._started:
            await self.start()
        if self._closed:
            raise PdfError("closed", f"{what}: the PDF workers were shut down; submit the file again")
        closed = PdfError("closed", f"{what}: the PDF workers were shut down; submit the file again")
        worker = await self._next_idle()
        while worker is not None and not worker.alive():  # died while idle (OOM killer, a stray signal)
            self._replace(worker)
            worker = await self._next_idle()
        if worker is None:
            raise closed
        loop = asyncio.get_running_loop()
        worker.busy = True
        release = True
        try:
            fut = loop.run_in_executor(self._executor, worker.roundtrip, (op, kwargs))
            try:
                reply = await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                release = False
                self._replace(worker)
                raise PdfError(
                    "timeout",
                    f"{what} took longer than {timeout:.3g} s ({TIMEOUT_SETTING}); its PDF worker was stopped "
                    f"and replaced. Raise {TIMEOUT_SETTING} if the file is large but sound",
                ) from None
            except (EOFError, OSError):
                release = False
                if self._closed:
                    raise closed from None
                await loop.run_in_executor(self._executor, worker.reap, 1.0)
                reason = _exit_reason(worker.proc.returncode)
                self._replace(worker)
                raise PdfError(
                    "crash",
                    f"the PDF worker {reason} during {what} (MuPDF failed on this file); "
                    "a new worker took its place; the file is probably damaged: re-export or re-download it",
                ) from None
            except asyncio.CancelledError:
                release = False  # the worker may be deep in C code; it cannot be told to stop
                self._replace(worker)
                raise
        finally:
            worker.busy = False
            if release:
                worker.tasks += 1
                if worker.tasks >= MAX_TASKS_PER_WORKER:
                    self._replace(worker, failed=False)
                else:
                    self._idle.put_nowait(worker)
        if reply[0] == "ok":
            return reply[1]
        _, code, message = reply
        raise PdfError(code, message)

    async def inspect(self, path: Path, password: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> PdfInfo:
        """Open the file: page count, encryption, page sizes, title; PdfError if it cannot be converted."""
        info: PdfInfo = await self._call(
            "inspect", {"path": str(path), "password": password}, timeout=timeout, what=f"opening {path.name}"
        )
        return info

    async def render_page(
        self,
        path: Path,
        page_no: int,
        password: str | None = None,
        dpi: float = 144,
        max_pixels: int | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> RenderedPage:
        """The page as a PNG (RGB) at ``dpi``, lowered so that width × height ≤ max_pixels, and its text layer."""
        page: RenderedPage = await self._call(
            "render",
            {"path": str(path), "password": password, "page_no": page_no, "dpi": dpi, "max_pixels": max_pixels,
             "with_png": True},
            timeout=timeout,
            what=f"rendering page {page_no + 1} of {path.name}",
        )
        return page

    async def page_text(
        self, path: Path, page_no: int, password: str | None = None, timeout: float = DEFAULT_TIMEOUT_S
    ) -> RenderedPage:
        """The page's text layer and whether it is usable, without rendering (``png`` is empty)."""
        page: RenderedPage = await self._call(
            "render",
            {"path": str(path), "password": password, "page_no": page_no, "dpi": 72, "max_pixels": None,
             "with_png": False},
            timeout=timeout,
            what=f"reading the text of page {page_no + 1} of {path.name}",
        )
        return page

    async def page_markdown(
        self, path: Path, page_no: int, password: str | None = None, timeout: float = DEFAULT_TIMEOUT_S
    ) -> str:
        """pymupdf4llm's Markdown of one page (headings, pipe tables), from the text layer."""
        text: str = await self._call(
            "markdown",
            {"path": str(path), "password": password, "page_no": page_no},
            timeout=timeout,
            what=f"converting page {page_no + 1} of {path.name} to Markdown",
        )
        return text

    async def ocr_image(self, png: bytes, timeout: float = DEFAULT_TIMEOUT_S, what: str = "OCR of a page") -> str:
        """rapidocr on a page image, as Markdown in reading order (paragraphs, headings, simple tables)."""
        text: str = await self._call("ocr", {"png": png}, timeout=timeout, what=what)
        return text
