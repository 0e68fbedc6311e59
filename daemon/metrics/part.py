"""The metrics part: serves ``[metrics] listen`` and feeds job ends to the collector that owns the counts."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from daemon.core.store import Store
from daemon.ctl.auth import socket_gid
from daemon.metrics.collect import DaemonCollector, count_files
from daemon.metrics.server import MetricsServer
from daemon.part import Part
from shared.config import MAX_IPC_PATH, Settings, metrics_tcp
from shared.protocol import JobInfo

log = logging.getLogger(__name__)


def socket_path(settings: Settings) -> Path | None:
    """The Unix socket ``[metrics] listen`` names (a bare name: inside the runtime dir); None for TCP or off."""
    listen = settings.config.metrics.listen
    if not listen or metrics_tcp(listen) is not None:
        return None
    path = Path(listen).expanduser()
    return path if path.is_absolute() else settings.paths.runtime_dir / path


class MetricsPart(Part):
    def __init__(self, settings: Settings, store: Store, parts: Callable[[], Sequence[Part]],
                 paused: Callable[[], bool]) -> None:
        """``parts``: the daemon's parts, whose ``shown()`` gives the engine and the GPUs; ``paused``: whether
        the queue is paused."""
        self.settings = settings
        self.collector = DaemonCollector(store, parts, paused)
        # the part's own registry: nothing outside this part registers or writes a metric
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self.server = MetricsServer(self.render)
        self.inbox = settings.paths.inbox if settings.config.hotfolder.enabled else None
        self._socket: Path | None = None

    async def render(self) -> bytes:
        if self.inbox is not None:
            # a walk of the file system, off the loop; the rest reads the loop's own state
            self.collector.inbox_files = await asyncio.to_thread(count_files, str(self.inbox))
        return generate_latest(self.registry)

    async def start(self) -> None:
        listen = self.settings.config.metrics.listen
        if not listen:
            return
        try:
            tcp = metrics_tcp(listen)
            if tcp is not None:
                await self.server.start_tcp(*tcp)
                # the port bound, not the one asked: port 0 lets the kernel choose (tests)
                host = f"[{tcp[0]}]" if ":" in tcp[0] else tcp[0]
                log.info("metrics: http://%s:%s/metrics (loopback: every local user can read it)", host,
                         self.server.port)
                return
            path = socket_path(self.settings)
            assert path is not None
            if len(str(path).encode()) > MAX_IPC_PATH:
                raise OSError(f"the path is longer than a Unix socket's {MAX_IPC_PATH} bytes")
            if path.is_socket():
                # a socket left by a killed daemon: we hold the state lock, so it is nobody else's
                path.unlink()
            await self.server.start_unix(str(path))
            self._socket = path
            gid = socket_gid(self.settings.config.daemon.socket_group)
            # as ctl.sock: the daemon's user and socket_group members, who see every job anyway
            os.chmod(path, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IWGRP)
            if gid is not None:
                os.chown(path, -1, gid)
            log.info("metrics: GET /metrics on the Unix socket %s", path)
        except OSError as exc:
            # monitoring is not worth stopping the GPU server for: said once, loudly
            log.error("metrics endpoint off: cannot listen on %s (%s); fix [metrics] listen and restart", listen,
                      exc.strerror or exc)

    async def stop(self) -> None:
        await self.server.close()
        if self._socket is not None:
            self._socket.unlink(missing_ok=True)

    def on_job_end(self, job: JobInfo) -> None:
        self.collector.job_ended(job)
