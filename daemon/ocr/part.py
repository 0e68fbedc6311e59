"""OCR in the daemon: the ``ocr`` job kind and the hot folder that feeds it."""

from __future__ import annotations

import asyncio
from typing import Any

from daemon.core.store import Store
from daemon.jobs.base import Caller, JobKind
from daemon.jobs.manager import JobManager
from daemon.ocr.engine import EngineChoice
from daemon.ocr.hotfolder import HotFolder
from daemon.ocr.kind import OcrKind
from daemon.ocr.pdfworker import PdfWorkerPool
from daemon.part import Part
from shared.config import Settings
from shared.protocol import JobInfo


class OcrPart(Part):
    def __init__(self, settings: Settings, store: Store, jobs: JobManager, pool: PdfWorkerPool,
                 engines: EngineChoice) -> None:
        """``pool``: the PDF workers pages are rendered in (the engine part sizes and closes it); ``engines``:
        the engines a job may name and the default one."""
        self.enabled = settings.config.hotfolder.enabled
        self.kind = OcrKind(settings, pool, engines, store)

        async def submit(spec: dict[str, Any], name: str, caller: Caller) -> JobInfo:
            return await jobs.submit(self.kind.kind, spec, name, caller)

        self.hot = HotFolder(settings, submit)
        self._watch: asyncio.Task[None] | None = None

    def kinds(self) -> dict[str, JobKind]:
        return {self.kind.kind: self.kind}

    async def start(self) -> None:
        if self.enabled:
            self.hot.start()
            self._watch = asyncio.get_running_loop().create_task(self.hot.run(), name="hotfolder")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        self.hot.stop()

    def on_job_end(self, job: JobInfo) -> None:
        # also when the hot folder is off now: a job it submitted earlier still moves its source out
        self.hot.on_job_end(job)
