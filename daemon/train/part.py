"""Training in the daemon: the train/eval/export kinds, the GPU allocator, and the training requests.

``install(daemon, settings)`` is called by daemon/assemble.py before the engines are built (they look at
``daemon.gpu_monitor``); ``use_engine`` afterwards hands the allocator the vLLM engine it may park.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from daemon.daemon import Daemon
from daemon.gpus.allocator import GpuAllocator
from daemon.gpus.engine_port import GpuEngine, SupervisedVllm
from daemon.gpus.nvml import GpuSnapshot
from daemon.train.kind import TRAIN_KINDS, TRAIN_LANE, LlamaFactoryKind, TrainSetup
from daemon.train.requests import TrainRequests
from shared.config import Settings
from shared.protocol import GpuInfo

log = logging.getLogger(__name__)

# the allocator decides how many GPU-lane jobs run at once (one per free GPU set, cpu_slots without GPUs)
UNLIMITED = 1 << 16


class RecordedGpus:
    """A recorded snapshot in place of NVML ([scheduler] gpu_snapshot_file), read again at every sample so a
    demo can change it while the daemon runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def snapshot(self) -> GpuSnapshot:
        return GpuSnapshot.load(self.path)

    def close(self) -> None:
        pass


class TrainingPart:
    def __init__(self, daemon: Daemon, settings: Settings) -> None:
        self.daemon = daemon
        self.setup = TrainSetup.create(settings, daemon.store)
        for kind in TRAIN_KINDS:
            daemon.kinds[kind] = LlamaFactoryKind(kind, self.setup)
        daemon.jobs.lane_limits[TRAIN_LANE] = UNLIMITED
        cfg = settings.config.scheduler
        recorded = Path(cfg.gpu_snapshot_file).expanduser() if cfg.gpu_snapshot_file else None
        self.allocator = GpuAllocator(cfg, daemon.store, daemon.bus, daemon.jobs, lanes=(TRAIN_LANE,),
                                      pids_of=self.setup.pids, on_sample=self._sampled,
                                      monitor=RecordedGpus(recorded) if recorded else None)
        daemon.jobs.admission = self.allocator.admit
        daemon.jobs.end_hooks.append(self.allocator.on_job_end)
        daemon.gpu_monitor = self.allocator.monitor  # type: ignore[attr-defined]  # the engines' GPU view
        requests = TrainRequests(self.setup, daemon.store, lambda: self.allocator.engine)
        daemon.extra_handlers.update(requests.handlers())
        daemon.start_callbacks.append(self.start)
        daemon.stop_callbacks.append(self.stop)

    def _sampled(self, gpus: list[GpuInfo], note: str) -> None:
        self.daemon.gpus = gpus
        self.daemon.gpu_note = note

    def use_engine(self, engine_control: Any) -> None:
        """The vLLM engine, if the daemon has one, is what the allocator parks when a job needs its GPU."""
        vllm = getattr(engine_control, "vllm", None)
        if vllm is not None:
            self.set_engine(SupervisedVllm(vllm.supervisor))

    def set_engine(self, engine: GpuEngine | None) -> None:
        self.allocator.engine = engine

    async def start(self) -> None:
        snap = await self.allocator.sample()
        log.info("GPUs: %s", snap.note)
        self.daemon.add_task(self.allocator.run(), "gpus")

    async def stop(self) -> None:
        self.allocator.close()


def install(daemon: Daemon, settings: Settings) -> TrainingPart:
    return TrainingPart(daemon, settings)
