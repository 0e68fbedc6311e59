"""The job manager: the one owner of job state transitions and of the running job tasks.

queued → running → succeeded | failed | canceled; a job running when the daemon died becomes
``interrupted`` at the next start and, if its kind can resume, goes back to the queue by itself.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from daemon.core.events import EventBus
from daemon.core.store import Store
from daemon.jobs.base import (
    Caller,
    JobContext,
    JobEndHook,
    JobFailed,
    JobInterrupted,
    JobKind,
    Resources,
    SpecError,
)
from daemon.jobs.queue import JobQueue
from shared.config import Settings
from shared.protocol import TERMINAL_STATES, JobChanged, JobInfo, Progress, QueueChanged

log = logging.getLogger(__name__)


class RequestDenied(Exception):
    """A request refused for a reason the caller can act on; ``code`` is the protocol ErrorCode."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class QueueFull(RequestDenied):
    """The caller has [daemon] max_queued_per_user jobs waiting; the hot folder leaves such a file in the inbox."""

    def __init__(self, user: str, queued: int) -> None:
        super().__init__("too_large", f"{user} has {queued:,} jobs waiting in the queue, the most [daemon] "
                                      "max_queued_per_user allows; submit again once some have started, or "
                                      "cancel some (`ftctl jobs`, `ftctl cancel ID`)")


# a scheduling pass that started nothing and took longer than this makes the next one wait (JobManager.run)
SCHEDULER_PACE_S = 0.002

# admit(job, resources, running) -> the GPU indices to give the job, or None to leave it queued for now
Admission = Callable[[JobInfo, Resources, dict[int, "RunningJob"]], "list[int] | None"]


@dataclass
class RunningJob:
    job: JobInfo
    resources: Resources
    task: asyncio.Task[None]
    gpus: list[int] = field(default_factory=list)
    cancel_reason: str = ""  # set when a user cancels; "" while it runs on its own


class JobManager:
    def __init__(self, settings: Settings, store: Store, bus: EventBus, kinds: dict[str, JobKind]) -> None:
        self.settings = settings
        self.store = store
        self.bus = bus
        self.kinds = kinds
        self.running: dict[int, RunningJob] = {}
        self.lane_limits: dict[str, int] = {
            "ocr": settings.config.ocr.max_concurrent_jobs,
            "train": 1,
            "selftest": 64,
        }
        self.admission: Admission | None = None
        self.end_hooks: list[JobEndHook] = []
        # called when a job's priority changes (the page scheduler re-orders a running job's pages)
        self.priority_hooks: list[Callable[[JobInfo], None]] = []
        self._wake = asyncio.Event()
        self._stopping = False
        # the queued jobs in start order, built from the store at the first pass (the kinds are all plugged
        # in by then) and kept by _update afterwards
        self.queue = JobQueue()
        self._indexed = False
        self._unknown: list[int] = []  # queued jobs of a kind this daemon lacks: failed at the next pass
        cfg = settings.config.daemon
        self.max_queued = cfg.max_queued_per_user
        store.set_retention(cfg.event_retention, cfg.event_retention_days * 86400)

    # -------------------------------------------------------------------------------------- state

    @property
    def paused(self) -> bool:
        return self.store.get_meta("queue_paused") == "1"

    def _update(self, job_id: int, what: str, **changes: Any) -> JobInfo:
        seq, job = self.store.update_job(job_id, what, **changes)
        self.bus.durable(seq, JobChanged(job=job, what=what))
        if "state" in changes or "priority" in changes or "spec" in changes:
            self._track(job)
        return job

    def _track(self, job: JobInfo) -> None:
        """Keep the queue index in step with the job's row."""
        if not self._indexed:
            return  # the first pass reads the whole queue anyway
        if job.state != "queued":
            self.queue.remove(job.id)
            return
        handler = self.kinds.get(job.kind)
        if handler is None:
            self._unknown.append(job.id)
            return
        self.queue.add(job, handler.resources(job))

    def _index(self) -> None:
        for job in self.store.jobs_in_state("queued"):
            handler = self.kinds.get(job.kind)
            if handler is None:
                self._unknown.append(job.id)
            else:
                self.queue.add(job, handler.resources(job))
        self._indexed = True

    def job_dir(self, job_id: int) -> Any:
        d = self.settings.paths.state_dir / "jobs" / str(job_id)
        d.mkdir(parents=True, exist_ok=True)
        return d

    # ----------------------------------------------------------------------------------- requests

    def has_queue_room(self, user: str) -> bool:
        return self.max_queued <= 0 or self.store.queued_of(user) < self.max_queued

    def _check_queue_room(self, user: str) -> None:
        """The per-user cap: for everyone, admins too (a runaway script fills the store whoever runs it), and
        for the hot folder's jobs (their files wait in the inbox until there is room)."""
        if not self.has_queue_room(user):
            raise QueueFull(user, self.store.queued_of(user))

    async def submit(self, kind: str, spec: dict[str, Any], name: str, caller: Caller, priority: int = 0,
                     interactive: bool = False) -> JobInfo:
        handler = self.kinds.get(kind)
        if handler is None:
            raise SpecError(f"unknown job kind '{kind}'; use one of: {', '.join(sorted(self.kinds))}")
        self._check_priority(priority, caller)
        self._check_queue_room(caller.user)  # before validating, which may read the whole file
        checked = handler.validate(spec, caller)
        display, frozen = await checked if inspect.isawaitable(checked) else checked
        self._check_queue_room(caller.user)  # again: other submits of this user may have gone in meanwhile
        seq, job, what = self.store.create_job(kind, caller.user, name or display, frozen, priority=priority,
                                               interactive=interactive)
        self.bus.durable(seq, JobChanged(job=job, what=what))
        on_created = getattr(handler, "on_created", None)
        final = on_created(job) if on_created is not None else None
        if isinstance(final, dict):
            # a kind may finish the spec now that the job has its id (e.g. paths under jobs/<id>/)
            job = self._update(job.id, "", spec=final)
        else:
            self._track(job)
        log.info("job %d (%s) %s", job.id, kind, what)
        self.kick()
        return job

    def _check_owner(self, job: JobInfo, caller: Caller, verb: str) -> None:
        if caller.is_admin or caller.user == job.owner:
            return
        admin = self.settings.config.daemon.admin_group
        how = f"ask {job.owner} or a member of group '{admin}'" if admin else f"ask {job.owner} or root"
        raise RequestDenied("forbidden", f"job {job.id} belongs to {job.owner}, not {caller.user}: only its "
                                         f"owner or an admin may {verb} it; {how}")

    def _check_priority(self, priority: int, caller: Caller) -> None:
        top = self.settings.config.daemon.member_max_priority
        if priority > top and not caller.is_admin:
            raise RequestDenied("forbidden", f"priority {priority} is above {top}, the most a member may give her "
                                             f"own jobs ([daemon] member_max_priority); use {top} or lower, or ask "
                                             "an admin to raise it")

    def cancel(self, job_id: int, caller: Caller) -> JobInfo:
        job = self.store.get_job(job_id)
        self._check_owner(job, caller, "cancel")
        if job.state in TERMINAL_STATES:
            raise RequestDenied("invalid_state", f"job {job_id} already {job.state}; nothing to cancel")
        run = self.running.get(job_id)
        if run is not None:
            run.cancel_reason = f"canceled by {caller.user}"
            run.task.cancel()
            return job
        return self._update(job_id, f"canceled by {caller.user}", state="canceled", finished=time.time())

    def retry(self, job_id: int, caller: Caller) -> JobInfo:
        job = self.store.get_job(job_id)
        self._check_owner(job, caller, "retry")
        if job.state not in ("failed", "canceled", "interrupted"):
            raise RequestDenied("invalid_state", f"job {job_id} is {job.state}; only failed, canceled or "
                                                 "interrupted jobs can be retried")
        self._check_queue_room(job.owner)  # the retried job waits in its owner's queue
        job = self._update(job_id, f"retried by {caller.user}", state="queued", error="", finished=None)
        self.kick()
        return job

    def set_priority(self, job_id: int, priority: int, caller: Caller) -> JobInfo:
        """A queued job moves to its new place in the queue; a running OCR job's pages are re-ordered."""
        job = self.store.get_job(job_id)
        self._check_owner(job, caller, "change the priority of")
        self._check_priority(priority, caller)
        if job.state in TERMINAL_STATES:
            raise RequestDenied("invalid_state", f"job {job_id} already {job.state}; its priority no longer "
                                                 "matters")
        if job.priority == priority:
            return job
        job = self._update(job_id, f"priority {job.priority} → {priority} by {caller.user}", priority=priority)
        run = self.running.get(job_id)
        if run is not None:
            run.job = job
        for hook in self.priority_hooks:
            try:
                hook(job)
            except Exception:
                log.exception("priority hook failed")
        self.kick()
        return job

    def fail_queued(self, job_id: int, reason: str) -> None:
        """A queued job that can never start here (the GPU scheduler says why)."""
        self._update(job_id, f"failed: {reason}", state="failed", error=reason, finished=time.time())

    def set_note(self, job_id: int, progress: Progress) -> None:
        """Show why a queued job waits (no history line: the reason changes as GPUs come and go)."""
        self._update(job_id, "", progress=progress)

    def set_paused(self, paused: bool, caller: Caller) -> None:
        self.store.set_meta("queue_paused", "1" if paused else "0")
        what = f"queue {'paused' if paused else 'resumed'} by {caller.user}"
        self.bus.durable(self.store.record(what), QueueChanged(paused=paused))
        log.info(what)
        self.kick()

    # --------------------------------------------------------------------------------- lifecycle

    def recover(self) -> None:
        """At start: jobs that were running when the daemon died are interrupted; resumable ones requeue."""
        for job in self.store.jobs_in_state("running"):
            self._update(job.id, "interrupted: the daemon stopped while this job ran", state="interrupted")
        for job in self.store.jobs_in_state("interrupted"):
            handler = self.kinds.get(job.kind)
            if handler is not None and handler.resumable(job):
                self._update(job.id, "resuming by itself after the daemon restart", state="queued")

    def kick(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Start queued jobs whenever something changes (submit, a job ends, resume, GPUs free up)."""
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                break
            if not self.paused:
                t0 = time.monotonic()
                started = self._start_ready()
                spent = time.monotonic() - t0
                if spent > SCHEDULER_PACE_S and not started:
                    # a pass that only looked (jobs waiting for GPUs the admission refuses, each asked again):
                    # kicks arriving meanwhile share the next pass, so it takes at most a tenth of the loop.
                    # A pass that started jobs did useful work at O(1) each and is not held back: a burst of
                    # small documents must reach the engine at once.
                    await asyncio.sleep(9 * spent)
                else:
                    await asyncio.sleep(0)  # requests that arrived meanwhile go first

    def _start_ready(self) -> int:
        """Start what may start; how many started.

        Runs at every submit and job end, so it must stay cheap with thousands queued (a hot-folder drop):
        a full lane costs nothing, and each job started costs O(1) in the index (daemon/jobs/queue.py)."""
        started = 0
        if not self._indexed:
            self._index()
        unknown, self._unknown = self._unknown, []
        for lost in unknown:
            job = self.store.get_job(lost)
            if job.state == "queued" and job.kind not in self.kinds:
                self._update(lost, f"failed: this daemon has no job kind '{job.kind}'", state="failed",
                             error=f"this daemon has no job kind '{job.kind}'; upgrade ftmllm")
        busy = Counter(r.resources.lane for r in self.running.values())
        for lane in self.queue.lanes():
            limit = self.lane_limits.get(lane, 1)
            refused: list[int] = []
            while busy[lane] < limit:
                popped = self.queue.pop(lane)
                if popped is None:
                    break
                job_id = popped
                job = self.store.get_job(job_id)
                handler = self.kinds[job.kind]
                res = self.queue.resources(job_id)
                gpus: list[int] | None = []
                if self.admission is not None:
                    gpus = self.admission(job, res, self.running)
                if gpus is None:
                    if job_id in self.queue:  # not failed by the admission: it waits for GPUs
                        refused.append(job_id)
                    continue
                self._launch(job, handler, res, gpus)
                busy[lane] += 1
                started += 1
            for job_id in reversed(refused):
                self.queue.put_back(job_id)
        return started

    def _launch(self, job: JobInfo, handler: JobKind, res: Resources, gpus: list[int]) -> None:
        resumed = job.attempts > 0  # it ran before: kinds continue from what they stored
        job = self._update(job.id, f"started on {'GPUs ' + ','.join(map(str, gpus)) if gpus else 'CPU'}",
                           state="running", started=time.time(), attempts=job.attempts + 1, gpus=gpus,
                           error="")
        ctx = JobContext(job=job, dir=self.job_dir(job.id), settings=self.settings, store=self.store,
                         bus=self.bus, gpus=gpus, resumed=resumed)
        task = asyncio.get_running_loop().create_task(self._run_one(handler, ctx), name=f"job-{job.id}")
        run = RunningJob(job=job, resources=res, task=task, gpus=gpus)
        self.running[job.id] = run
        ctx.cancel_reason = lambda: run.cancel_reason

    async def _run_one(self, handler: JobKind, ctx: JobContext) -> None:
        job_id = ctx.job.id
        try:
            summary = await handler.run(ctx)
        except asyncio.CancelledError:
            run = self.running.get(job_id)
            if run is not None and run.cancel_reason:
                self._finish(job_id, "canceled", run.cancel_reason, "")
            else:
                self._finish(job_id, "interrupted", "interrupted: the daemon is stopping; it resumes at the "
                                                    "next start", "")
        except JobFailed as exc:
            self._finish(job_id, "failed", f"failed: {exc}", str(exc))
        except JobInterrupted as exc:
            self._finish(job_id, "interrupted", f"interrupted: {exc}", str(exc))
            if exc.requeue and not self._stopping:
                # its GPUs were given back by the end hooks: the allocator places it again like any queued job
                self._update(job_id, "queued again: it resumes from what it saved", state="queued", error="",
                             finished=None)
                self.kick()
        except Exception as exc:  # a bug in a kind must fail its job, never the daemon
            log.exception("job %d crashed", job_id)
            msg = f"internal error ({type(exc).__name__}: {exc}); see the daemon log (journalctl -u ftmllmd)"
            self._finish(job_id, "failed", f"failed: {msg}", msg)
        else:
            self._finish(job_id, "succeeded", summary or "succeeded", "")

    def _finish(self, job_id: int, state: str, what: str, error: str) -> None:
        self.running.pop(job_id, None)
        job = self._update(job_id, what, state=state, finished=time.time(), error=error)
        log.info("job %d %s", job_id, what)
        for hook in self.end_hooks:
            try:
                hook(job)
            except Exception:
                log.exception("job end hook failed")
        self.kick()

    async def stop(self, timeout: float) -> None:
        """Stop running jobs so they can resume later (they become interrupted), within ``timeout``."""
        self._stopping = True
        self._wake.set()
        tasks = [r.task for r in self.running.values()]
        for t in tasks:
            t.cancel()
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                log.warning("job task %s did not stop within %.0fs", t.get_name(), timeout)
