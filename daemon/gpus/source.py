"""Where the daemon's GPU snapshots come from: NVML, or a recorded snapshot file (``[scheduler]
gpu_snapshot_file``) for demos and tests on machines without GPUs.

One source per daemon, opened by the assembly and shared: the engine part looks at it once to pick the
default engine, the GPU allocator samples it for the rest of the daemon's life.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from daemon.gpus.nvml import GpuMonitor, GpuSnapshot
from shared.config import SchedulerConfig


class GpuSource(Protocol):
    def snapshot(self) -> GpuSnapshot: ...

    def close(self) -> None: ...


class RecordedGpus:
    """A recorded snapshot in place of NVML, read again at every sample so a demo can change it while the
    daemon runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def snapshot(self) -> GpuSnapshot:
        return GpuSnapshot.load(self.path)

    def close(self) -> None:
        pass


def open_gpu_source(cfg: SchedulerConfig) -> GpuSource:
    if cfg.gpu_snapshot_file:
        return RecordedGpus(Path(cfg.gpu_snapshot_file).expanduser())
    # shorter than the poll interval, so every sample is a fresh look
    return GpuMonitor(ttl_s=max(0.1, cfg.gpu_poll_s / 2))
