"""One page through a vision-language model behind an OpenAI-compatible server (the ``vllm`` and ``remote``
engines share this).

For each page:

1. Budget (:mod:`daemon.ocr.budget`): the pipeline rendered the page at :attr:`VlmConverter.max_pixels`;
   the exact image-token count of the real pixel size is checked against ``max_model_len`` and the page is
   rendered smaller if it still does not fit, so vLLM never gets a request it must refuse.
2. Request: chat completion, ``stream: true``, the prompt text before the image (every page shares that
   prefix, so vLLM's prefix cache serves it), the PNG as a data URL, sampling from the config, the model
   name of the job's adapter if it names one. A slot of the shared :class:`InFlight` pool is held while the
   request runs.
3. Stream: each piece of text is passed on as a :class:`TextDelta`; the :class:`RepetitionGuard` watches it
   and closes the stream when the tail repeats (vLLM aborts the request).
4. Outcome: ``stop`` → the page's Markdown. A loop, ``length`` or vLLM's own ``repetition`` → the next
   temperature of :data:`LADDER`, after a ``TextDelta(reset=True)``. When the ladder runs out → the page's
   text layer (``method="fallback"``, the reasons in ``detail``).
5. A broken stream (the server died, was stopped for training, restarts) is not the page's fault: the
   backend waits until the server is back and the same attempt is sent again, without using up the ladder.
   A 4xx answer fails the page with the server's message quoted.
"""

from __future__ import annotations

import base64
import contextlib
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import httpx

from daemon.engines.vlm.budget import (
    SAFETY_TOKENS,
    BudgetError,
    Limits,
    RenderPlan,
    check_image,
    estimate_prompt_tokens,
    plan_render,
)
from daemon.engines.vlm.chat_stream import Piece, Rejected, ServerGone, stream_chat
from daemon.engines.vlm.http_clients import HttpClients, transport
from daemon.engines.vlm.inflight import InFlight
from daemon.engines.vlm.runaway import LADDER, Loop, RepetitionGuard, cut_loop, describe
from daemon.ocr.engine import PageInput, PageResult, TextDelta
from daemon.ocr.errors import OcrError
from daemon.ocr.pdfworker import PdfWorkerPool

# A page survives this many broken streams (server restarts) before it fails: a server that dies on
# every attempt at this page is probably crashing because of it.
MAX_SERVER_BREAKS = 8
# The shortest answer worth asking for when an image leaves little room.
MIN_ANSWER = 64
# Renders tried to get a page under the budget (the first one is the pipeline's).
MAX_RERENDERS = 3
# Request fields the configuration may not override (the daemon sets them per page).
RESERVED_FIELDS = frozenset({"model", "messages", "stream", "stream_options", "max_tokens", "temperature"})


@dataclass(frozen=True)
class Target:
    """Where one request goes."""

    root: str  # http://host:port (the server's /v1, /metrics and /health live below it)
    model: str  # the served base model name
    api_key: str = field(default="", repr=False)  # never in a log line or an error message
    generation: int = 0  # bumped by every (re)start of a supervised server
    uds: str = ""  # the Unix socket the server listens on (the daemon's vLLM); "" = TCP to root


class Backend(Protocol):
    name: str

    async def target(self, adapter: str = "") -> Target:
        """A server (with ``adapter`` loaded, if named) that takes requests now; waits while one starts or
        wakes. OcrError when none will."""
        ...

    async def broken(self, target: Target, error: str) -> str | None:
        """A request to ``target`` broke off. Wait until a retry makes sense and return None, or return why
        the page must fail."""
        ...

    def release(self, target: Target) -> None:
        """The request sent to ``target`` is over (however it ended)."""
        ...

    def page_done(self, tokens: int) -> None:
        """A page finished on this backend (for pages/s)."""
        ...


@dataclass(frozen=True)
class _Attempt:
    outcome: str  # stop | length | loop | repetition | abort (the server dropped it) | gone (it went away)
    text: str
    loop: Loop | None
    tokens: int
    target: Target
    error: str = ""


@dataclass
class Sampling:
    prompt: str
    temperature: float = 0.0
    max_tokens: int = 4096
    extra: dict[str, Any] = field(default_factory=dict)  # top_p, repetition_penalty, stop, min_tokens …
    ladder: tuple[float, ...] = LADDER


_FENCE = re.compile(r"\A\s*```(?:markdown|md)?[ \t]*\n(.*?)\n?```\s*\Z", re.S)


def unfence(text: str) -> str:
    """Qwen2-VL often wraps a page in ```markdown … ```; the page is the inside."""
    m = _FENCE.match(text)
    return m.group(1) if m else text


def data_url(png: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(png).decode("ascii")


def chat_body(model: str, prompt: str, image_url: str, *, temperature: float, max_tokens: int,
              extra: dict[str, Any]) -> dict[str, Any]:
    """The request: prompt text first, then the image (a shared prefix for vLLM's prefix cache)."""
    body = {k: v for k, v in extra.items() if k not in RESERVED_FIELDS}
    body.update({
        "model": model,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": prompt},
            {"type": "image_url", "image_url": {"url": image_url}},
        ]}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": temperature,
    })
    return body


def new_http_client(max_in_flight: int, uds: str = "") -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max_in_flight + 8, max_keepalive_connections=max_in_flight + 8)
    # read timeout: the longest silence between two streamed pieces before a server counts as hung
    return httpx.AsyncClient(timeout=httpx.Timeout(connect=10.0, read=300.0, write=60.0, pool=None), limits=limits,
                             transport=transport(uds, limits))


class VlmConverter:
    def __init__(self, backend: Backend, limiter: InFlight, pool: PdfWorkerPool, limits: Limits,
                 sampling: Sampling, *, dpi: float = 144, render_timeout_s: float = 120.0) -> None:
        self.backend = backend
        self.limiter = limiter
        self.pool = pool
        self.limits = limits  # replaced when the server tells the real prompt length or max_model_len
        self.sampling = sampling
        self.dpi = dpi
        self.render_timeout_s = render_timeout_s
        self._clients = HttpClients(lambda uds: new_http_client(self.limiter.maximum, uds))
        self.aborted = 0  # requests this daemon closed because they ran away (for status and tests)

    def client(self, uds: str = "") -> httpx.AsyncClient:
        """The client for the server on Unix socket ``uds`` ("" = TCP)."""
        return self._clients.get(uds)

    async def close(self) -> None:
        await self._clients.aclose()

    def plan(self) -> RenderPlan:
        try:
            return plan_render(self.limits)
        except BudgetError as exc:
            raise OcrError("budget", str(exc)) from None

    @property
    def max_pixels(self) -> int:
        """The render cap the pipeline uses for a page (the budget's, never above vllm.max_pixels)."""
        try:
            return plan_render(self.limits).max_pixels
        except BudgetError:
            return self.limits.max_pixels  # convert() fails the page with the reason

    # ------------------------------------------------------------------------------------- one page

    async def convert(self, page: PageInput) -> AsyncIterator[TextDelta | PageResult]:
        where = f"page {page.page_no + 1} of {page.pdf.name}"
        plan = self.plan()
        timings: dict[str, float] = {}
        png, notes = await self._fit(page, plan, timings, where)
        image = data_url(png)
        temps = (self.sampling.temperature, *self.sampling.ladder)
        failures: list[str] = []
        first_text: str | None = None
        base_model = ""
        shown = False
        breaks = 0
        attempt = 0
        clock = {"wait_s": 0.0, "generate_s": 0.0}
        while attempt < len(temps):
            temperature = temps[attempt]
            if shown:
                yield TextDelta("", reset=True)
                shown = False
            result: _Attempt | None = None
            try:
                async with contextlib.aclosing(self._attempt(page.adapter, self.sampling.prompt, image, temperature,
                                                             plan.max_tokens, clock)) as attempt_items:
                    async for item in attempt_items:
                        if isinstance(item, _Attempt):
                            result = item
                        else:
                            shown = True
                            yield item
            except Rejected as exc:
                raise OcrError("rejected", f"{self.backend.name} refused {where} (HTTP {exc.status}): "
                                           f"\"{exc.message}\"") from None
            assert result is not None
            base_model = result.target.model
            if result.outcome in ("gone", "abort"):
                # the server died, restarts, or dropped the request to sleep: not the page's fault
                await self._server_broke(result.target, result.error or "the server aborted the request",
                                         breaks, where)
                breaks += 1
                continue
            if result.outcome == "stop":
                self.backend.page_done(result.tokens)
                timings.update({"wait_s": clock["wait_s"], "generate_s": clock["generate_s"],
                                "attempts": float(attempt + 1)})
                detail = "; ".join([*notes, *(f"retried after {f}" for f in failures)])
                yield PageResult(text=unfence(result.text), method="vlm",
                                 model=_model_label(base_model, page.adapter), timings=timings,
                                 tokens=result.tokens, detail=detail)
                return
            if first_text is None:
                first_text = cut_loop(result.text, result.loop) if result.loop is not None else result.text
            failures.append(describe(result.outcome, result.loop, temperature, result.tokens))
            attempt += 1
        timings.update({"wait_s": clock["wait_s"], "generate_s": clock["generate_s"], "attempts": float(attempt)})
        reasons = f"{len(failures)} attempts failed ({'; '.join(failures)})"
        if page.text_layer.strip():
            detail = "; ".join([*notes, f"{reasons}; used the page's text layer"])
            yield TextDelta(page.text_layer, reset=True)
            yield PageResult(text=page.text_layer, method="fallback", model="text-layer", timings=timings,
                             tokens=None, detail=detail)
            return
        if first_text and first_text.strip():
            detail = "; ".join([*notes, f"{reasons}; the page has no text layer: kept the first attempt's text "
                                        "up to where it started repeating"])
            yield TextDelta(unfence(first_text), reset=True)
            yield PageResult(text=unfence(first_text), method="fallback", model=_model_label(base_model, page.adapter),
                             timings=timings, tokens=None, detail=detail)
            return
        raise OcrError("runaway", f"{where}: {reasons}, and the page has no text layer to fall back on; "
                                  "try another adapter or prompt (ocr.prompt), or the cpu engine "
                                  "(`ftctl submit ocr --engine cpu`)")

    # ------------------------------------------------------------------------------- a question

    def question_limits(self, question: str) -> Limits:
        return replace(self.limits, prompt_tokens=estimate_prompt_tokens(question))

    async def answer(self, question: str, image: bytes, width: int, height: int, *, adapter: str = "",
                     mime: str = "image/png") -> AsyncIterator[TextDelta]:
        """A streamed answer about one image (ftui's Try screen): one attempt, stopped if it loops, sent
        again after a server restart."""
        limits = self.question_limits(question)
        try:
            plan = plan_render(limits)
            check = check_image(width, height, limits, plan.max_tokens)
        except BudgetError as exc:
            raise OcrError("budget", str(exc)) from None
        max_tokens = plan.max_tokens
        if not check.fits:
            max_tokens = limits.max_model_len - limits.prompt_tokens - SAFETY_TOKENS - check.image_tokens
            if max_tokens < MIN_ANSWER:
                raise OcrError("budget", f"a {width}×{height} image leaves no room for an answer in max_model_len "
                                         f"{limits.max_model_len}; ask about a smaller image or a PDF page")
        url = data_url(image, mime)
        clock = {"wait_s": 0.0, "generate_s": 0.0}
        for breaks in range(MAX_SERVER_BREAKS):
            result: _Attempt | None = None
            shown = False
            try:
                async with contextlib.aclosing(self._attempt(adapter, question, url, self.sampling.temperature,
                                                             max_tokens, clock, first=True)) as items:
                    async for item in items:
                        if isinstance(item, _Attempt):
                            result = item
                        else:
                            shown = True
                            yield item
            except Rejected as exc:
                raise OcrError("rejected", f"{self.backend.name} refused the question (HTTP {exc.status}): "
                                           f"\"{exc.message}\"") from None
            assert result is not None
            if result.outcome in ("gone", "abort"):
                await self._server_broke(result.target, result.error or "the server aborted the request", breaks,
                                         "the question")
                if shown:
                    yield TextDelta("", reset=True)
                continue
            if result.outcome == "loop":
                yield TextDelta("\n\n[stopped: the answer kept repeating itself]")
            elif result.outcome == "length":
                yield TextDelta(f"\n\n[cut at {max_tokens} tokens]")
            return

    async def _attempt(self, adapter: str, prompt: str, image: str, temperature: float, max_tokens: int,
                       clock: dict[str, float], first: bool = False) -> AsyncGenerator[TextDelta | _Attempt, None]:
        """One request: its text as deltas, then an :class:`_Attempt` saying how it ended. ``first``: a question
        someone waits for, sent before the pages waiting for a slot."""
        t = time.monotonic()
        async with self.limiter.slot(first=first):
            target = await self.backend.target(adapter)
            try:
                clock["wait_s"] += time.monotonic() - t
                t = time.monotonic()
                body = chat_body(adapter or target.model, prompt, image, temperature=temperature,
                                 max_tokens=max_tokens, extra=self.sampling.extra)
                guard = RepetitionGuard()
                outcome, error, tokens, pieces = "", "", None, 0
                stream = stream_chat(self.client(target.uds), target.root, body, target.api_key)
                try:
                    async for piece in stream:
                        if piece.finish is not None:
                            outcome, tokens = piece.finish, piece.completion_tokens
                            continue
                        pieces += 1
                        yield TextDelta(piece.text)
                        if guard.feed(piece.text) is not None:
                            outcome = "loop"
                            self.aborted += 1
                            break  # closing the stream makes vLLM abort the request
                except ServerGone as exc:
                    outcome, error = "gone", str(exc)
                finally:
                    await stream.aclose()
                    clock["generate_s"] += time.monotonic() - t
            finally:
                self.backend.release(target)
        yield _Attempt(outcome=outcome, text=guard.text, loop=guard.loop,
                       tokens=tokens if tokens is not None else pieces, target=target, error=error)

    async def _server_broke(self, target: Target, error: str, breaks: int, where: str) -> None:
        if breaks + 1 >= MAX_SERVER_BREAKS:
            raise OcrError("engine", f"{where}: the {self.backend.name} server broke off this page "
                                     f"{breaks + 1} times (last: {error}); its log says why")
        why = await self.backend.broken(target, error)
        if why is not None:
            raise OcrError("engine", f"{where}: {why}")

    async def _fit(self, page: PageInput, plan: RenderPlan, timings: dict[str, float],
                   where: str) -> tuple[bytes, list[str]]:
        """The page's PNG, rendered smaller until it fits the budget; notes for the page's detail."""
        if page.png is None:
            raise OcrError("internal", f"{where}: the page was not rendered (the engine needs an image)")
        png, width, height = page.png, page.width, page.height
        notes: list[str] = []
        if plan.detail and width * height > 0.9 * plan.max_pixels:
            notes.append(plan.detail)
        for _ in range(MAX_RERENDERS):
            try:
                check = check_image(width, height, self.limits, plan.max_tokens)
            except BudgetError as exc:
                raise OcrError("budget", f"{where}: {exc}") from None
            if check.fits:
                return png, notes
            t = time.monotonic()
            r = await self.pool.render_page(page.pdf, page.page_no, page.password, dpi=self.dpi,
                                            max_pixels=check.smaller_pixels, timeout=self.render_timeout_s)
            timings["render_s"] = timings.get("render_s", 0.0) + time.monotonic() - t
            notes.append(f"the {width}×{height} image needed {check.image_tokens} tokens, more than "
                         f"max_model_len {self.limits.max_model_len} leaves; rendered again at "
                         f"{r.width}×{r.height}")
            png, width, height = r.png, r.width, r.height
        raise OcrError("budget", f"{where}: the image does not fit max_model_len {self.limits.max_model_len} even "
                                 f"at {width}×{height}; raise vllm.max_model_len or lower max_tokens")


def _model_label(base: str, adapter: str) -> str:
    return f"{base}+{adapter}" if adapter else base


__all__ = ["Backend", "Piece", "Sampling", "Target", "VlmConverter", "chat_body", "data_url", "unfence"]
