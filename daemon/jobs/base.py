"""What a job kind is, and what a running job may touch.

A kind (``ocr``, ``train``, ``selftest`` …) validates a spec at submit, says what it needs to run, and runs
one job to its end. The :class:`JobManager` owns the job's state; the kind only reports through its
:class:`JobContext`, so there is one owner of every row.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from daemon.core.events import EventBus
from daemon.core.store import Store
from shared.config import Settings
from shared.protocol import (
    EventBody,
    JobChanged,
    JobInfo,
    PageChanged,
    PageInfo,
    Progress,
    TrainPoint,
    TrainProgress,
)


class SpecError(Exception):
    """A spec rejected at submit; the message names the key or file and the fix."""


class JobFailed(Exception):
    """A job ended badly; the message is the one line a person reads to act on it."""


class JobInterrupted(Exception):
    """The job's machine went away under it (a Ray node died), not the job's fault: it ends ``interrupted``
    and, with ``requeue``, goes back to the queue at once, to be placed again and resume from what it saved."""

    def __init__(self, message: str, requeue: bool) -> None:
        super().__init__(message)
        self.requeue = requeue


@dataclass(frozen=True)
class Resources:
    lane: str = "default"  # jobs of one lane share its concurrency limit (ocr, train, selftest)
    gpus: int = 0  # in all: with nodes > 1, gpus // nodes on each node
    min_free_gib: float = 0.0
    nodes: int = 1  # cluster nodes it spans (a multi-node train job on the ray backend)


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as the kernel says (see daemon/ctl/auth.py), never as the client claims."""

    user: str
    uid: int
    groups: frozenset[str] = frozenset()
    is_admin: bool = False


@dataclass
class JobContext:
    job: JobInfo
    dir: Path
    settings: Settings
    store: Store
    bus: EventBus
    gpus: list[int] = field(default_factory=list)
    resumed: bool = False  # this run continues an interrupted one
    # why the job's task is being cancelled: "canceled by alice" for a user's cancel, "" while it runs on
    # its own or when the daemon is stopping (then the job must stop so that it can resume later)
    cancel_reason: Callable[[], str] = lambda: ""
    _rate_t0: float = field(default_factory=time.monotonic)
    _rate_done0: float = 0.0

    @property
    def log_path(self) -> Path:
        return self.dir / "job.log"

    def log(self, line: str) -> None:
        """A line for `ftctl logs`; children write their own output to files next to it."""
        with self.log_path.open("a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%H:%M:%S')} {line}\n")

    def _update(self, what: str, **changes: Any) -> None:
        seq, self.job = self.store.update_job(self.job.id, what, **changes)
        self.bus.durable(seq, JobChanged(job=self.job, what=what))

    def progress(self, done: float, total: float, unit: str, note: str = "", history: str = "",
                 eta_s: float | None = None) -> None:
        """``eta_s``: the child's own estimate when it has one (a trainer's remaining_time), else the rate's."""
        now = time.monotonic()
        elapsed = now - self._rate_t0
        rate = (done - self._rate_done0) / elapsed if elapsed > 0 and done > self._rate_done0 else 0.0
        eta = eta_s if eta_s is not None else (total - done) / rate if rate > 0 and total > done else None
        self._update(history, progress=Progress(done=done, total=total, unit=unit, note=note, rate=rate,
                                                eta_s=eta))

    def reset_rate(self, done: float) -> None:
        """Start measuring rate from here (after a resume, pages done earlier are not this run's speed)."""
        self._rate_t0 = time.monotonic()
        self._rate_done0 = done

    def note(self, what: str) -> None:
        """A line in the job's history (and in `ftctl show`)."""
        self.log(what)
        self._update(what)

    def set_artifacts(self, artifacts: dict[str, str], what: str = "") -> None:
        self._update(what, artifacts={**self.job.artifacts, **artifacts})

    def set_page(self, page: PageInfo, text: str | None = None) -> None:
        self.bus.durable(self.store.set_page(page, text), PageChanged(page=page))

    def add_train_points(self, points: Iterable[TrainPoint]) -> int:
        added = self.store.add_train_points(points)
        for seq, point in added:
            self.bus.durable(seq, TrainProgress(point=point))
        return len(added)

    def stream(self, body: EventBody) -> None:
        self.bus.stream(body)


class JobKind(Protocol):
    kind: str

    def validate(
        self, spec: dict[str, Any], caller: Caller
    ) -> tuple[str, dict[str, Any]] | Awaitable[tuple[str, dict[str, Any]]]:
        """Check a spec in well under a second; return (display name, the frozen spec). Raise SpecError.

        May be a coroutine when checking needs I/O (opening a PDF in a worker process)."""
        ...

    def resources(self, job: JobInfo) -> Resources: ...

    async def run(self, ctx: JobContext) -> str:
        """Run to the end; return a one-line summary. Raise JobFailed; CancelledError means stop now."""
        ...

    def resumable(self, job: JobInfo) -> bool:
        """Whether an interrupted job of this kind continues by itself after a daemon restart."""
        ...


# A hook the daemon calls when a job leaves the running state (the engine scheduler listens to free GPUs).
JobEndHook = Callable[[JobInfo], None]
