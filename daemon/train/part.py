"""Training in the daemon: the train/eval/export kinds and the requests that are not jobs (datasets,
templates, eval-compare, deploy). When its jobs start and on which GPUs is the GPU allocator's to decide
(daemon/gpus/allocator.py), over the lanes and processes this part names."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from daemon.core.store import Store
from daemon.ctl.server import Handler
from daemon.gpus.engine_port import GpuEngine
from daemon.jobs.base import JobKind
from daemon.part import Part
from daemon.train.kind import TRAIN_KINDS, TRAIN_LANE, KindName, LlamaFactoryKind, TrainSetup
from daemon.train.requests import TrainRequests
from shared.config import Settings


class TrainingPart(Part):
    lanes = (TRAIN_LANE,)  # its jobs run on GPUs the allocator hands out

    def __init__(self, settings: Settings, store: Store, engine: GpuEngine | None, *,
                 make_kind: Callable[[KindName, TrainSetup], JobKind] = LlamaFactoryKind,
                 jobs_dir: Path | None = None) -> None:
        """``engine``: the GPU engine `ftctl deploy` loads adapters into (None: nothing to deploy into).
        ``make_kind``/``jobs_dir``: where the trainers run and write (a cluster's, see daemon/cluster; by
        default child processes of the daemon writing under its state dir)."""
        self.setup = TrainSetup.create(settings, store)
        if jobs_dir is not None:
            self.setup.jobs_dir = jobs_dir
        self._kinds: dict[str, JobKind] = {kind: make_kind(kind, self.setup) for kind in TRAIN_KINDS}
        self.requests = TrainRequests(self.setup, store, lambda: engine)

    def kinds(self) -> dict[str, JobKind]:
        return dict(self._kinds)

    def handlers(self) -> dict[type, Handler]:
        return self.requests.handlers()

    def pids(self, job_id: int) -> list[int]:
        """A running job's processes (the allocator must not take them for someone else's)."""
        return self.setup.pids(job_id)
