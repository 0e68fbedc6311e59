"""OCR in the daemon: the ``ocr`` job kind, the hot folder that feeds it, and the request that hands a
finished job's Markdown to its client (``ftctl submit ocr --out-dir`` writes it with the user's rights)."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon.core.store import Store
from daemon.ctl.server import Handler
from daemon.jobs.base import Caller, JobKind
from daemon.jobs.manager import JobManager, RequestDenied
from daemon.ocr.engine import EngineChoice
from daemon.ocr.hotfolder import HotFolder
from daemon.ocr.kind import OcrKind
from daemon.ocr.pdfworker import PdfWorkerPool
from daemon.part import Part
from daemon.spool.spool import Spool
from shared.config import Settings
from shared.protocol import EnginePages, JobInfo, OcrOutput, OcrOutputReply, PageJob, PageQueue, PageQueueReply

# the most a sidecar or Markdown file sent back may be: far above any real document's text
MAX_OUTPUT_BYTES = 256 * 1024 * 1024


class OcrPart(Part):
    def __init__(self, settings: Settings, store: Store, jobs: JobManager, pool: PdfWorkerPool,
                 engines: EngineChoice, spool: Spool, allowed: Callable[[int], bool]) -> None:
        """``pool``: the PDF workers pages are rendered in (the engine part sizes and closes it); ``engines``:
        the engines a job may name and the default one; ``spool``: the files handed over (and the hot folder's
        takings); ``allowed(uid)``: may that user use the daemon (owners of dropped files must)."""
        self.enabled = settings.config.hotfolder.enabled
        self.settings = settings
        self.store = store
        self.jobs = jobs
        self.kind = OcrKind(settings, pool, engines, store, spool, jobs.job_dir)
        jobs.priority_hooks.append(self.kind.on_priority)

        async def submit(spec: dict[str, Any], name: str, caller: Caller) -> JobInfo:
            return await jobs.submit(self.kind.kind, spec, name, caller)

        self.hot = HotFolder(settings, submit, spool, allowed, jobs.has_queue_room)
        self._watch: asyncio.Task[None] | None = None

    def kinds(self) -> dict[str, JobKind]:
        return {self.kind.kind: self.kind}

    def handlers(self) -> dict[type, Handler]:
        return {OcrOutput: self.on_output, PageQueue: self.on_page_queue}

    def on_page_queue(self, body: PageQueue, caller: Caller) -> PageQueueReply:
        engines = []
        for name, sched in sorted(self.kind.pages.items()):
            jobs = sched.jobs()
            engines.append(EnginePages(
                engine=name, slots=sched.slots, in_flight=sched.in_flight, waiting=sched.waiting,
                jobs=[PageJob(job_id=j.job_id, owner=j.owner, name=j.name, priority=j.priority,
                              job_class=j.job_class, in_flight=j.in_flight, waiting=j.waiting, done=j.done,
                              total=j.total, why=j.why) for j in jobs[:body.limit]],
                more_jobs=max(0, len(jobs) - body.limit)))
        lane = self.kind.resources_lane
        running = sum(1 for r in self.jobs.running.values() if r.resources.lane == lane)
        limit = self.jobs.lane_limits.get(lane, 1)
        queued = self.jobs.queue.waiting(lane)
        why = ""
        if queued and self.jobs.paused:
            why = "the queue is paused (`ftctl resume`, an admin)"
        elif queued and running >= limit:
            why = (f"{running} documents are open, the most [ocr] max_concurrent_jobs allows; the next opens "
                   "when one ends (higher priority first, owners in turn)")
        return PageQueueReply(engines=engines, open_jobs=running, max_open=limit, queued_jobs=queued,
                              why_queued=why)

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
        if job.kind != self.kind.kind:
            return
        self.kind.forget_secrets(job)
        # also when the hot folder is off now: a job it submitted earlier still moves its source out
        self.hot.on_job_end(job)

    async def on_output(self, body: OcrOutput, caller: Caller) -> OcrOutputReply:
        job = self.store.get_job(body.job_id)
        if job.kind != self.kind.kind:
            raise RequestDenied("bad_request", f"job {job.id} is a {job.kind} job; only OCR jobs have Markdown")
        md, side = job.artifacts.get("markdown", ""), job.artifacts.get("sidecar", "")
        if not md or not side:
            raise RequestDenied("invalid_state", f"job {job.id} has no Markdown yet (it is {job.state}); wait for "
                                                 f"it to end (`ftctl show {job.id}`)")
        try:
            markdown, sidecar = await asyncio.to_thread(lambda: (_read_output(Path(md)), _read_output(Path(side))))
        except OSError as exc:
            raise RequestDenied("invalid_state", f"job {job.id}: its results in {Path(md).parent} cannot be read "
                                                 f"({exc.strerror or exc}); `ftctl retry {job.id}` writes them "
                                                 "again") from None
        return OcrOutputReply(name=Path(md).stem, markdown=markdown, sidecar=sidecar)


def _read_output(path: Path) -> str:
    """A file the job wrote into the outbox, read without following a link someone put in its place."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_OUTPUT_BYTES:
            raise OSError(f"{path.name} is not a plain file of its size")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", errors="replace")
