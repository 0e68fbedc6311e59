"""The Part protocol: how a part of the daemon (the engines, training, the GPU allocator, OCR) plugs into it.

The daemon (daemon/daemon.py) owns the sockets, the store, the event bus and the job manager. A part owns its
own state and shows it only through these methods, so "who owns this?" always has one answer: the part.
daemon/assemble.py builds the parts, each handed what it needs as constructor arguments, and plugs them in.

The daemon asks each part once, when plugged in, for its job kinds, lane limits and request handlers (a kind
or a request type claimed twice is a wiring bug and stops the daemon at once); starts the parts in the order
they were plugged in and stops them in reverse; tells each part when a job ends; and asks each part, for every
status reply and snapshot, what it has to show.

A part subclasses :class:`Part` and overrides what it has; every default says "nothing".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from daemon.ctl.server import Handler
from daemon.jobs.base import JobKind
from shared.protocol import EngineInfo, GpuInfo, JobInfo


@dataclass(frozen=True)
class Shown:
    """What a part adds to `ftctl status` and to snapshots; None: it has nothing to say about that field."""

    engine: EngineInfo | None = None
    gpus: list[GpuInfo] | None = None
    gpu_note: str | None = None


class Part(Protocol):
    def kinds(self) -> dict[str, JobKind]:
        """The job kinds this part runs, by name."""
        return {}

    def lane_limits(self) -> dict[str, int]:
        """How many jobs of a lane may run at once, for the lanes this part decides about."""
        return {}

    def handlers(self) -> dict[type, Handler]:
        """The requests this part answers, by request type."""
        return {}

    async def start(self) -> None:
        """With the daemon: sockets bound, interrupted jobs requeued, no job started yet."""
        return None

    async def stop(self) -> None:
        """The running jobs have stopped: end this part's own tasks and children."""
        return None

    def on_job_end(self, job: JobInfo) -> None:
        """A job left the running state (succeeded, failed, canceled or interrupted)."""
        return None

    def shown(self) -> Shown:
        return Shown()
