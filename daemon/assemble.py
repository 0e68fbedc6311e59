"""Build the daemon from its parts: the one place that knows which parts exist and what each is given."""

from __future__ import annotations

from daemon.core.sdnotify import Notifier
from daemon.daemon import Daemon
from daemon.engines.control import EngineControl
from daemon.gpus.allocator import GpuAllocator
from daemon.gpus.source import open_gpu_source
from daemon.ocr.part import OcrPart
from daemon.spool.part import SpoolPart
from daemon.spool.spool import Spool
from daemon.train.part import TrainingPart
from shared.config import Settings


def assemble(settings: Settings, notifier: Notifier | None = None) -> Daemon:
    daemon = Daemon(settings, notifier)
    store, bus, jobs = daemon.store, daemon.bus, daemon.jobs
    scheduler = settings.config.scheduler
    gpus_seen = open_gpu_source(scheduler)
    engines = EngineControl(settings, store, bus, gpus_seen)
    training = TrainingPart(settings, store, engines.gpu_engine)
    gpus = GpuAllocator(scheduler, store, bus, jobs, monitor=gpus_seen, engine=engines.gpu_engine,
                        lanes=training.lanes, pids_of=training.pids)
    spool = Spool.of(settings)
    # first: handover.sock is open before the hot folder takes its first file
    handover = SpoolPart(settings, spool, store, daemon.identities.allowed)
    ocr = OcrPart(settings, store, jobs, engines.pool, engines.choice, spool, daemon.identities.allowed)
    daemon.plug([handover, engines, training, gpus, ocr], admission=gpus.admit)
    return daemon
