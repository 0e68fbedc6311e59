"""What the GPUs are doing, from NVML (nvidia-ml-py), as a :class:`GpuSnapshot` the scheduler plans on.

* Short TTL cache: a snapshot is reused for ``ttl_s`` (the scheduler and the status reply may ask many
  times a second; one NVML sweep of 8 GPUs with their processes costs a few ms).
* Never a crash: no NVML library, no driver, no permission → an empty snapshot with ``cpu_only=True`` and
  the reason ("no GPUs found (NVML: NVML Shared Library Not Found)"). An NVML failure after GPUs were seen
  is not "no GPUs": the snapshot says ``cpu_only=False`` with the error, so nothing is started on a guess.
* A snapshot saves to and loads from JSON (``save``/``load``); tests feed recorded snapshots of 8-GPU boxes
  to the real scheduler, since NVML cannot run on a machine without GPUs.
* Process owners come from /proc (the uid of ``/proc/PID``); a pid in another container shows no user.
"""

from __future__ import annotations

import os
import pwd
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

SNAPSHOT_FORMAT = "ftmllm-gpu-snapshot/1"
MIB = 1024 * 1024


class GpuProcessSample(msgspec.Struct, frozen=True, kw_only=True):
    """A process on a GPU as NVML saw it (clients see it as shared.protocol.GpuProcess, with its job)."""

    pid: int
    used_mib: float | None = None  # None: NVML does not say (some drivers, MIG, containers)
    user: str = ""  # "" when the pid is not visible here (another pid namespace)
    name: str = ""


class GpuSample(msgspec.Struct, frozen=True, kw_only=True):
    """A GPU as NVML saw it (clients see it as shared.protocol.GpuInfo, with the jobs and engine on it)."""

    index: int
    uuid: str = ""
    name: str = ""
    memory_total_mib: float = 0.0
    memory_used_mib: float = 0.0
    memory_free_mib: float = 0.0
    utilization_pct: float | None = None
    processes: tuple[GpuProcessSample, ...] = ()
    node: str = ""  # the cluster node it is on (daemon/gpus/ray_source.py); "" on one machine


class GpuSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    format: str = SNAPSHOT_FORMAT
    taken_at: float = 0.0  # Unix time
    host: str = ""
    driver_version: str = ""
    gpus: tuple[GpuSample, ...] = ()
    cpu_only: bool = False  # True: no GPU here at all; jobs run on the CPU
    error: str = ""  # why there are no GPUs, or what failed

    @property
    def note(self) -> str:
        """One line for `ftctl status` / the TUI."""
        if self.gpus:
            return f"{len(self.gpus)} GPUs" + (f" ({self.error})" if self.error else "")
        return self.error or "no GPUs found"

    def to_json(self) -> bytes:
        return msgspec.json.format(msgspec.json.encode(self), indent=1)

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(self.to_json())
        tmp.replace(path)

    @classmethod
    def from_json(cls, data: bytes | str) -> GpuSnapshot:
        return msgspec.json.decode(data, type=cls)

    @classmethod
    def load(cls, path: Path) -> GpuSnapshot:
        return cls.from_json(path.read_bytes())


class GpuMonitor:
    """NVML behind a TTL cache. One per daemon; call from one thread (NVML calls take milliseconds, so
    the daemon may call it in its loop or in a worker thread, not both)."""

    def __init__(self, ttl_s: float = 1.0, retry_s: float = 60.0, nvml: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``nvml``: the pynvml module (default: imported on first use)."""
        self.ttl_s = ttl_s
        self.retry_s = retry_s
        self._nvml = nvml
        self._clock = clock
        self._initialised = False
        self._seen_gpus = False
        self._cached: GpuSnapshot | None = None
        self._cached_at = 0.0

    def snapshot(self) -> GpuSnapshot:
        now = self._clock()
        ttl = self.ttl_s if (self._cached is None or not self._cached.cpu_only) else self.retry_s
        if self._cached is not None and now - self._cached_at < ttl:
            return self._cached
        self._cached = self._take()
        self._cached_at = now
        return self._cached

    def close(self) -> None:
        if self._initialised and self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._initialised = False

    def _take(self) -> GpuSnapshot:
        taken_at, host = time.time(), socket.gethostname()
        try:
            nvml = self._load()
            if not self._initialised:
                nvml.nvmlInit()
                self._initialised = True
            driver = _text(nvml.nvmlSystemGetDriverVersion())
            gpus = tuple(self._gpu(nvml, i) for i in range(nvml.nvmlDeviceGetCount()))
        except Exception as exc:
            reason = _nvml_reason(exc)
            if self._seen_gpus:
                return GpuSnapshot(taken_at=taken_at, host=host, cpu_only=False,
                                   error=f"GPU status unavailable (NVML: {reason}); no GPU job starts until it "
                                         "is back")
            return GpuSnapshot(taken_at=taken_at, host=host, cpu_only=True, error=f"no GPUs found (NVML: {reason})")
        if not gpus:
            return GpuSnapshot(taken_at=taken_at, host=host, driver_version=driver, cpu_only=True,
                               error="no GPUs found (NVML sees 0 devices)")
        self._seen_gpus = True
        return GpuSnapshot(taken_at=taken_at, host=host, driver_version=driver, gpus=gpus)

    def _load(self) -> Any:
        if self._nvml is None:
            import pynvml  # nvidia-ml-py; imported lazily so a machine without it still starts

            self._nvml = pynvml
        return self._nvml

    def _gpu(self, nvml: Any, index: int) -> GpuSample:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        util = _optional(lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
        procs: dict[int, GpuProcessSample] = {}
        for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            for p in _optional(lambda g=getter: getattr(nvml, g)(handle)) or ():  # type: ignore[misc]
                used = getattr(p, "usedGpuMemory", None)
                used_mib = used / MIB if isinstance(used, int) and used >= 0 else None
                if p.pid not in procs:
                    procs[p.pid] = GpuProcessSample(pid=p.pid, used_mib=used_mib, user=process_user(p.pid),
                                              name=process_name(p.pid))
        return GpuSample(
            index=index,
            uuid=_text(_optional(lambda: nvml.nvmlDeviceGetUUID(handle)) or ""),
            name=_text(_optional(lambda: nvml.nvmlDeviceGetName(handle)) or ""),
            memory_total_mib=mem.total / MIB,
            memory_used_mib=mem.used / MIB,
            memory_free_mib=mem.free / MIB,
            utilization_pct=util,
            processes=tuple(sorted(procs.values(), key=lambda p: p.pid)),
        )


def process_user(pid: int) -> str:
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return ""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _optional(call: Callable[[], Any]) -> Any:
    """A per-GPU query some GPUs do not support (utilisation under MIG, processes in some containers)."""
    try:
        return call()
    except Exception:
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_reason(exc: BaseException) -> str:
    if isinstance(exc, ImportError):
        return "nvidia-ml-py is not installed"
    return str(exc) or type(exc).__name__
