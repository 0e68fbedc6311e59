"""The ``vllm`` engine: pages to a ``vllm serve`` child the daemon supervises.

The child's life (start, restarts, sleep, adapters) is
:class:`~daemon.engines.vllm_supervisor.VllmSupervisor`'s; a page's life (budget, request, stream, runaway
guard, ladder, fallback) is :class:`~daemon.engines.vlm.converter.VlmConverter`'s. This class joins them into
an :class:`~daemon.ocr.engine.Engine`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

from daemon.engines.vllm_supervisor import ChangeHook, VllmSupervisor
from daemon.engines.vlm.adapter_budget import render_cap
from daemon.engines.vlm.budget import config_limits
from daemon.engines.vlm.chat_stream import tokenized_length
from daemon.engines.vlm.converter import Sampling, Target, VlmConverter
from daemon.engines.vlm.inflight import InFlight
from daemon.ocr.engine import PageInput, PageResult, TextDelta
from daemon.ocr.pdfworker import PdfWorkerPool
from shared.config import OcrConfig, VllmConfig

log = logging.getLogger(__name__)


class VllmEngine:
    name = "vllm"
    needs_image = True

    def __init__(self, cfg: VllmConfig, ocr: OcrConfig, pool: PdfWorkerPool, workdir: Path, prompt: str, *,
                 gpu_indices: list[int] | None = None, on_change: ChangeHook | None = None) -> None:
        self.cfg = cfg
        self.prompt = prompt
        self.limiter = InFlight(cfg.max_in_flight)
        self.supervisor = VllmSupervisor(cfg, workdir, limiter=self.limiter, gpu_indices=gpu_indices,
                                         on_change=on_change, on_ready=self._on_ready)
        self.model = self.supervisor.served_name
        self.concurrency = cfg.max_in_flight
        self.dpi = ocr.dpi
        limits = config_limits(cfg.max_model_len, cfg.max_tokens, cfg.min_pixels, cfg.max_pixels, prompt)
        sampling = Sampling(prompt=prompt, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                            extra=dict(cfg.sampling))
        self.converter = VlmConverter(self, self.limiter, pool, limits, sampling, dpi=ocr.dpi,
                                      render_timeout_s=ocr.page_timeout_s)

    @property
    def max_pixels(self) -> int | None:
        return self.converter.max_pixels

    def page_max_pixels(self, adapter: str) -> int | None:
        """The pixel cap a page read by ``adapter`` renders at: the budget the adapter trained with (recorded
        beside it by its train job) when the engine can serve it, else the engine's own."""
        path = self.supervisor.adapters.get(adapter) if adapter else None
        cap = render_cap(Path(path) if path else None, self.converter.limits, dpi=self.dpi, prompt=self.prompt)
        return cap if cap is not None else self.max_pixels

    async def start(self) -> None:
        """Start vLLM unless the scheduler parked it (then pages wait for the wake-up); returns at once."""
        if not self.supervisor.parked:
            await self.supervisor.start()

    async def stop(self) -> None:
        await self.supervisor.close()
        await self.converter.close()

    def convert(self, page: PageInput) -> AsyncIterator[TextDelta | PageResult]:
        return self.converter.convert(page)

    def check_adapter(self, name: str, user: str = "") -> str | None:
        return self.supervisor.check_adapter(name, user)

    def resolve_adapter(self, name: str, user: str) -> str:
        """The served name ``name`` means for ``user``: her own adapter of that bare name, if loaded."""
        return self.supervisor.resolve_adapter(name, user)

    # Backend (daemon.engines.vlm.converter) ------------------------------------------------------------------

    async def target(self, adapter: str = "") -> Target:
        return await self.supervisor.target()

    async def broken(self, target: Target, error: str) -> str | None:
        log.debug("vllm: a request broke off (%s); waiting for the server", error)
        return await self.supervisor.broken(target, error)

    def release(self, target: Target) -> None:
        """Nothing to account per server: there is one."""

    def page_done(self, tokens: int) -> None:
        self.supervisor.page_done(tokens)

    async def _on_ready(self, target: Target) -> None:
        """Ask the server how long the templated prompt really is (the budget assumed an upper bound)."""
        count = await tokenized_length(self.converter.client(target.uds), target.root, target.model, self.prompt)
        if count is not None:
            self.converter.limits = replace(self.converter.limits, prompt_tokens=count)

