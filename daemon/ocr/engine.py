"""The engine interface: one page in; text deltas, then exactly one result, out.

Every engine (``cpu`` here, ``vllm`` and ``remote`` later) fits this, so the pipeline does not care which one
converts a page::

    async for item in engine.convert(page):
        if isinstance(item, TextDelta):   # zero or more, as text arrives (publish on ocr.<job>)
            ...
        else:                             # one PageResult, always last
            ...

Contract:

- ``convert`` yields zero or more :class:`TextDelta`, then exactly one :class:`PageResult`, then stops.
  :func:`run_page` drains it and enforces this.
- Deltas are a live preview. ``PageResult.text`` is the page's Markdown, authoritative. When an engine starts
  a page over (a retry after a runaway stream), it sends a delta with ``reset=True``: drop what was shown.
- A page that cannot be converted raises :class:`~daemon.ocr.errors.OcrError` (``PdfError`` is one) with a
  stable ``code`` and a message naming the page and the fix; the pipeline records the page as failed.
  ``method="fallback"`` marks a page that came out of a lesser path (e.g. the plain text layer after the
  main path failed); ``detail`` says why.
- ``needs_image``: the pipeline must render the page (``PageInput.png``) before calling. When False it still
  fills ``text_layer``/``text_layer_usable`` (cheap: :meth:`PdfWorkerPool.page_text`); the engine renders
  itself if it needs to. :func:`load_page_input` does exactly this.
- ``max_pixels``: the largest image (width × height) the pipeline renders for this engine; an engine that
  serves adapters may render an adapter's pages at the budget it trained with (``page_max_pixels(adapter)``,
  optional: :func:`page_max_pixels`).
- ``PageInput.adapter``: the LoRA adapter the job names; engines without adapters refuse such jobs at submit.
- ``concurrency``: how many ``convert`` calls to keep in flight for this engine, all running jobs together (the
  CPU engine: one per PDF worker; vLLM: enough to keep its batch full). One page scheduler per engine fills
  these slots from the pages of every running job (daemon/ocr/pages.py), plus a small prefetch of rendered
  pages for an engine that ``needs_image``.
- ``start``/``stop`` bring up and tear down what the engine owns (a ``vllm serve`` child); both idempotent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from daemon.jobs.base import SpecError
from daemon.ocr.errors import OcrError
from daemon.ocr.pdfworker import PdfWorkerPool

Method = Literal["text_layer", "ocr", "vlm", "fallback"]


@dataclass(frozen=True)
class PageInput:
    job_id: str
    page_no: int  # 0-based
    pdf: Path
    password: str | None
    png: bytes | None  # the rendered page when the engine needs_image, else None
    width: int  # pixels of png (0 without one)
    height: int
    text_layer: str  # the PDF's own text for the page, plain ("" for a scan)
    text_layer_usable: bool
    adapter: str = ""  # the LoRA adapter the job names ("" = the served base model)


@dataclass(frozen=True)
class TextDelta:
    text: str
    reset: bool = False  # True: the engine restarted the page; discard the preview so far, then show text


@dataclass(frozen=True)
class PageResult:
    text: str  # the page's Markdown
    method: Method
    model: str  # what produced it, e.g. "pymupdf4llm-layout", "rapidocr-PP-OCRv6", the served model name
    timings: dict[str, float]  # seconds per stage, e.g. {"markdown_s": 0.4, "total_s": 0.41}
    tokens: int | None  # generated tokens (VLM engines), None otherwise
    detail: str = ""  # why a fallback was used, what was skipped; "" when nothing to say


class Engine(Protocol):
    name: str  # "cpu", "vllm", "remote"
    model: str
    needs_image: bool
    concurrency: int

    @property
    def max_pixels(self) -> int | None:
        """The render cap (width × height) of a page rendered for it (needs_image); None = no cap. VLM engines
        derive it from their image-token budget."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def convert(self, page: PageInput) -> AsyncIterator[TextDelta | PageResult]: ...


@dataclass
class EngineChoice:
    """Which engines exist and which one serves by default, with the reason (shown in `ftctl status`)."""

    engines: dict[str, Engine] = field(default_factory=dict)
    default: str = "cpu"
    reason: str = ""

    def get(self, name: str) -> Engine:
        key = name or self.default
        engine = self.engines.get(key)
        if engine is None:
            raise SpecError(f"engine '{key}' is not available on this daemon ({self.reason}); "
                            f"use one of: {', '.join(sorted(self.engines)) or 'none'}")
        return engine


class EngineContractError(OcrError):
    """An engine broke the convert() contract (a bug in the engine, not in the file)."""


def job_adapter(engine: Engine, adapter: str, user: str) -> str:
    """The adapter a job of ``user`` names, as the engine serves it: a bare name is her own when she has one
    (names are namespaced by owner). SpecError at submit when the engine cannot use it."""
    if not adapter:
        return ""
    check = getattr(engine, "check_adapter", None)
    problem = check(adapter, user) if check is not None else (
        f"engine {engine.name} cannot use LoRA adapters; name --engine vllm (or leave out --adapter)")
    if problem:
        raise SpecError(problem)
    resolved: str = engine.resolve_adapter(adapter, user)  # type: ignore[attr-defined]
    return resolved


def page_max_pixels(engine: Engine, adapter: str) -> int | None:
    """The pixel cap for a page ``adapter`` reads on ``engine``."""
    per_adapter = getattr(engine, "page_max_pixels", None)
    return per_adapter(adapter) if per_adapter is not None and adapter else engine.max_pixels


async def run_page(
    engine: Engine, page: PageInput, on_delta: Callable[[TextDelta], None] | None = None
) -> PageResult:
    """Drive ``engine.convert(page)`` to its result, passing deltas to ``on_delta``; enforce the contract."""
    result: PageResult | None = None
    async for item in engine.convert(page):
        if result is not None:
            raise EngineContractError("internal", f"engine {engine.name} yielded after its PageResult")
        if isinstance(item, PageResult):
            result = item
        elif on_delta is not None:
            on_delta(item)
    if result is None:
        raise EngineContractError("internal", f"engine {engine.name} ended page {page.page_no + 1} without a result")
    return result


async def load_page_input(
    pool: PdfWorkerPool,
    *,
    job_id: str,
    pdf: Path,
    page_no: int,
    password: str | None,
    needs_image: bool,
    dpi: float = 144,
    max_pixels: int | None = None,
    timeout: float = 120.0,
    adapter: str = "",
) -> PageInput:
    """What the pipeline hands an engine: the rendered page if it needs one, and always the text layer."""
    if needs_image:
        r = await pool.render_page(pdf, page_no, password, dpi=dpi, max_pixels=max_pixels, timeout=timeout)
        png: bytes | None = r.png
    else:
        r = await pool.page_text(pdf, page_no, password, timeout=timeout)
        png = None
    return PageInput(
        job_id=job_id,
        page_no=page_no,
        pdf=pdf,
        password=password,
        png=png,
        width=r.width,
        height=r.height,
        text_layer=r.text,
        text_layer_usable=r.text_usable,
        adapter=adapter,
    )
