"""GpuMonitor: the real NVML on this machine (no GPU: a reason, never a crash), and recorded 8-GPU snapshots
replayed through NVML's API, since NVML cannot run without a GPU. The replay serves a recorded fixture;
the conversion, caching and failure handling under test are the real code."""

from __future__ import annotations

import getpass
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from daemon.gpus.nvml import GpuMonitor, GpuSnapshot
from daemon.gpus.nvml import GpuProcessSample as GpuProcess

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nvml"
MIB = 1024 * 1024


class NvmlReplay:
    """pynvml's functions, answering from a recorded GpuSnapshot."""

    class Failure(Exception):
        pass

    def __init__(self, snap: GpuSnapshot) -> None:
        self.snap = snap
        self.failing = ""
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if self.failing:
            raise NvmlReplay.Failure(self.failing)

    def nvmlInit(self) -> None:
        self._check()

    def nvmlShutdown(self) -> None:
        pass

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check()
        return self.snap.driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self.snap.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> Any:
        self._check()
        return self.snap.gpus[i]

    def nvmlDeviceGetMemoryInfo(self, g: Any) -> Any:
        return SimpleNamespace(total=int(g.memory_total_mib * MIB), used=int(g.memory_used_mib * MIB),
                               free=int(g.memory_free_mib * MIB))

    def nvmlDeviceGetUtilizationRates(self, g: Any) -> Any:
        return SimpleNamespace(gpu=int(g.utilization_pct), memory=0)

    def nvmlDeviceGetComputeRunningProcesses(self, g: Any) -> list[Any]:
        return [SimpleNamespace(pid=p.pid, usedGpuMemory=None if p.used_mib is None else int(p.used_mib * MIB))
                for p in g.processes]

    def nvmlDeviceGetGraphicsRunningProcesses(self, g: Any) -> list[Any]:
        return []

    def nvmlDeviceGetUUID(self, g: Any) -> bytes:
        return g.uuid.encode()  # older nvidia-ml-py returns bytes

    def nvmlDeviceGetName(self, g: Any) -> str:
        return g.name


def _without_proc_fields(snap: GpuSnapshot) -> list[Any]:
    return [(g.index, g.uuid, g.name, g.memory_total_mib, g.memory_used_mib, g.memory_free_mib, g.utilization_pct,
             [(p.pid, p.used_mib) for p in g.processes]) for g in snap.gpus]


def test_no_nvml_here_means_cpu_only_with_the_reason() -> None:
    snap = GpuMonitor().snapshot()  # the real pynvml on this GPU-less machine
    assert snap.cpu_only and snap.gpus == ()
    assert snap.error.startswith("no GPUs found (NVML: ")
    assert snap.note == snap.error


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.json")))
def test_recorded_snapshot_replays_to_the_same_snapshot(name: str) -> None:
    recorded = GpuSnapshot.load(FIXTURES / name)
    assert len(recorded.gpus) == 8
    taken = GpuMonitor(nvml=NvmlReplay(recorded)).snapshot()
    assert not taken.cpu_only and taken.error == "" and taken.driver_version == recorded.driver_version
    assert _without_proc_fields(taken) == _without_proc_fields(recorded)


def test_snapshot_json_round_trip(tmp_path: Path) -> None:
    recorded = GpuSnapshot.load(FIXTURES / "box8_foreign.json")
    recorded.save(tmp_path / "s.json")
    assert GpuSnapshot.load(tmp_path / "s.json") == recorded
    assert recorded.gpus[5].processes[0] == GpuProcess(pid=50117, used_mib=52010.0, user="carol", name="python3")


def test_process_owner_and_name_come_from_proc() -> None:
    recorded = GpuSnapshot.load(FIXTURES / "box8_idle.json")
    gpu0 = recorded.gpus[0]
    with_me = recorded.__class__(gpus=(gpu0.__class__(index=0, memory_total_mib=100.0, processes=(
        GpuProcess(pid=os.getpid(), used_mib=10.0),)),))
    taken = GpuMonitor(nvml=NvmlReplay(with_me)).snapshot()
    proc = taken.gpus[0].processes[0]
    assert proc.user == getpass.getuser() and proc.name.startswith("python")


def test_ttl_cache_and_failure_after_gpus_were_seen() -> None:
    now = [0.0]
    nvml = NvmlReplay(GpuSnapshot.load(FIXTURES / "box8_idle.json"))
    mon = GpuMonitor(ttl_s=1.0, nvml=nvml, clock=lambda: now[0])
    first = mon.snapshot()
    calls = nvml.calls
    assert mon.snapshot() is first and nvml.calls == calls  # within the TTL: no NVML call
    nvml.failing = "Unknown Error"
    now[0] = 1.5
    broken = mon.snapshot()
    assert not broken.cpu_only and broken.gpus == ()  # not "no GPUs": nothing may start on a guess
    assert broken.error == "GPU status unavailable (NVML: Unknown Error); no GPU job starts until it is back"
    nvml.failing = ""
    now[0] = 3.0
    assert len(mon.snapshot().gpus) == 8


def test_nvml_failing_from_the_start_is_retried_slowly() -> None:
    now = [0.0]
    nvml = NvmlReplay(GpuSnapshot.load(FIXTURES / "box8_idle.json"))
    nvml.failing = "Driver Not Loaded"
    mon = GpuMonitor(ttl_s=1.0, retry_s=60.0, nvml=nvml, clock=lambda: now[0])
    assert mon.snapshot().error == "no GPUs found (NVML: Driver Not Loaded)"
    nvml.failing = ""
    now[0] = 30.0
    assert mon.snapshot().cpu_only  # not asked again before retry_s
    now[0] = 61.0
    assert len(mon.snapshot().gpus) == 8
