"""Build the daemon from its parts: the one place that knows which job kinds, engines and watchers exist."""

from __future__ import annotations

from typing import Any

from daemon.core.sdnotify import Notifier
from daemon.daemon import Daemon
from daemon.engines import control as engine_control
from daemon.jobs.base import Caller
from daemon.ocr.hotfolder import HotFolder
from daemon.ocr.kind import OcrKind
from daemon.ocr.pdfworker import PdfWorkerPool
from daemon.train import part as training
from shared.config import Settings
from shared.protocol import JobInfo


def assemble(settings: Settings, notifier: Notifier | None = None) -> Daemon:
    daemon = Daemon(settings, notifier=notifier)
    cfg = settings.config.ocr
    # train/eval/export jobs, the GPU allocator and the dataset/template/deploy requests; before the engines,
    # which look at the GPUs through it
    train = training.install(daemon, settings)
    # which engine serves (cpu, vllm, remote) and why; it decides what the PDF workers preload
    decision = engine_control.decide(daemon, settings)
    pool = PdfWorkerPool(size=max(1, cfg.workers), markdown_mode=cfg.markdown_mode,
                         preload=engine_control.worker_preload(decision),
                         log_path=settings.paths.state_dir / "pdfworkers.log")
    # the engines, `ftctl engine …` and `ask` requests, engine state events
    engines = engine_control.install(daemon, settings, pool, decision)
    train.use_engine(engines)  # the vLLM engine is parked when a job needs its GPU
    ocr = OcrKind(settings, pool, engines.choice, daemon.store)
    daemon.kinds["ocr"] = ocr

    async def submit(spec: dict[str, Any], name: str, caller: Caller) -> JobInfo:
        return await daemon.jobs.submit("ocr", spec, name, caller)

    hot = HotFolder(settings, submit, ocr.existing_job)
    daemon.jobs.end_hooks.append(hot.on_job_end)

    async def start_parts() -> None:
        if settings.config.hotfolder.enabled:
            hot.start()
            daemon.add_task(hot.run(), "hotfolder")

    async def stop_parts() -> None:
        hot.stop()
        await pool.close()

    daemon.start_callbacks.append(start_parts)
    daemon.stop_callbacks.append(stop_parts)
    return daemon
