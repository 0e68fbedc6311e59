"""The daemon: sockets, store, event bus, job manager, lifecycle, and the requests every daemon answers.

:class:`Daemon` answers the core requests and runs the parts plugged into it (daemon/part.py); each owns its
own state (the store owns rows, the job manager owns transitions and tasks, the engine part owns its child
process, the GPU allocator owns the GPU list) and the daemon asks the parts for what status and snapshots show.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from daemon import __version__
from daemon.core.events import EventBus, EventSocket
from daemon.core.sdnotify import Notifier
from daemon.core.store import Store, StoreError
from daemon.ctl.auth import ZAP_DOMAIN, Identities, bind_zap, parse_peer, serve_zap, socket_gid
from daemon.ctl.server import CtlServer, Handler
from daemon.jobs.base import Caller
from daemon.jobs.manager import Admission, JobManager, RequestDenied
from daemon.jobs.selftest import SelftestKind
from daemon.part import Part
from shared.config import Config, ConfigError, Settings, changed_keys, load_settings
from shared.private_dir import make_private_dir
from shared.protocol import (
    MAX_WIRE_BYTES,
    NO_UID,
    PROTOCOL_VERSION,
    TERMINAL_STATES,
    Cancel,
    Done,
    EngineInfo,
    GetSnapshot,
    GpuInfo,
    Hello,
    HelloReply,
    JobDetail,
    JobList,
    JobLogs,
    JobPages,
    JobsRemoved,
    ListJobs,
    LogChunk,
    OcrOutput,
    PagesReply,
    PageText,
    PageTextReply,
    PauseQueue,
    Ping,
    Pong,
    RemovedJobs,
    RemoveJobs,
    ResumeQueue,
    Retry,
    SetPriority,
    ShowJob,
    Snapshot,
    Status,
    StatusReply,
    Submit,
    TrainPoints,
    TrainPointsReply,
)

log = logging.getLogger(__name__)

# what status and snapshots show until a part says otherwise
NO_ENGINE = EngineInfo(kind="cpu", state="stopped", reason="no engine configured yet")
NO_GPUS = "no GPUs found"
# Requests that return what a job read or wrote, and what each returns: with daemon.visibility = "owner" only
# the job's owner and admins get an answer. Lists, snapshots, `show`, page states and loss curves say that a
# job exists and how it goes, which every member sees (README, "Who sees what").
CONTENT_REQUESTS: dict[type, str] = {JobLogs: "log", PageText: "page text", OcrOutput: "Markdown output"}
OWNER_CACHE = 4096  # jobs whose owner's uid is remembered for the topic of their streamed text


class Daemon:
    def __init__(self, settings: Settings, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.notifier = notifier or Notifier(None)
        self._status_pending = False
        self.paths = settings.paths
        self.session = uuid.uuid4().hex[:12]
        self.started = time.monotonic()
        self.ctx = zmq.asyncio.Context()
        self.store = Store(self.paths.state_dir / "ftmllm.sqlite")
        self.store.set_meta("session", self.session)
        self.identities = Identities(admin_group=settings.config.daemon.admin_group,
                                     allowed_group=settings.config.daemon.socket_group)
        self.visibility = settings.config.daemon.visibility
        self._owner_uids: dict[int, int] = {}
        # bounded per connection and per member, behind ZAP, in a context of its own (daemon/core/events.py)
        self.events = EventSocket(self.paths.events_socket, allowed=self.identities.allowed, peer=parse_peer,
                                  sees_all=self.sees_content)
        self.bus = EventBus(self.events.sock, self.session, self.store.seq, owner_of=self._owner_uid)
        self.store.on_commit = self._committed
        self.jobs = JobManager(settings, self.store, self.bus, {"selftest": SelftestKind()})
        self.parts: list[Part] = []
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.rcvhwm = 10_000
        self.router.sndhwm = 10_000
        self.router.setsockopt(zmq.MAXMSGSIZE, MAX_WIRE_BYTES)
        self.ctl = CtlServer(self.router, self.identities, self._handlers())
        self._tasks: list[asyncio.Task[Any]] = []

    def plug(self, parts: Sequence[Part], admission: Admission | None) -> None:
        """Plug the parts in: their kinds, lane limits, handlers and job-end hooks now; they start in this
        order and stop in reverse. ``admission`` decides when a queued job starts and on which GPUs (the GPU
        allocator); None leaves it to the lane limits alone."""
        if self.parts:
            raise RuntimeError("the daemon's parts are plugged in once")
        for part in parts:
            _claim(self.jobs.kinds, part.kinds(), "job kind")
            _claim(self.ctl.handlers, self._guarded(part.handlers()), "request")
            self.jobs.lane_limits.update(part.lane_limits())
            self.jobs.end_hooks.append(part.on_job_end)
        self.jobs.admission = admission
        self.parts = list(parts)

    def _committed(self) -> None:
        self.bus.committed()
        self.on_change()

    # ------------------------------------------------------------------------------------ startup

    def bind(self) -> None:
        """Bind both sockets (called once the single-instance lock is held)."""
        run = self.paths.runtime_dir
        gid = socket_gid(self.settings.config.daemon.socket_group)
        # 0700, or as systemd's RuntimeDirectory would make it for the group that may reach the sockets;
        # UnsafePath (one line naming the dir and its owner) for a dir another user owns or can write
        make_private_dir(run, 0o700 if gid is None else 0o750, gid)
        for name in ("ctl.sock", "events.sock"):
            # a socket file left by a killed daemon: we hold the lock, so nobody else owns it
            (run / name).unlink(missing_ok=True)
        # the ZAP handler is bound before the ROUTER, and the domain is enforced: no connection can slip
        # in unauthenticated (and stay anonymous) in between
        self.zap_sock = bind_zap(self.ctx)
        self.router.zap_domain = ZAP_DOMAIN.encode()
        self.router.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        self.router.bind(self.paths.ctl_endpoint)
        self.events.bind()
        for name in ("ctl.sock", "events.sock"):
            os.chmod(run / name, 0o660)
            if gid is not None:
                os.chown(run / name, -1, gid)

    async def start(self) -> None:
        self.jobs.recover()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(serve_zap(self.zap_sock, self.identities), name="zap"),
            loop.create_task(self.ctl.serve(), name="ctl"),
            loop.create_task(self.events.serve(), name="events"),
            loop.create_task(self.bus.run_heartbeat(self.settings.config.daemon.heartbeat_s), name="hb"),
            loop.create_task(self.jobs.run(), name="jobs"),
        ]
        for part in self.parts:
            await part.start()
        self.jobs.kick()

    async def stop(self, timeout: float = 60.0) -> None:
        await self.jobs.stop(timeout)
        for part in reversed(self.parts):
            try:
                await part.stop()
            except Exception:
                log.exception("error while stopping %s", type(part).__name__)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.store.commit()
        self.bus.flush()
        self.router.close()
        self.events.close()
        for name in ("ctl.sock", "events.sock"):
            # gone socket files tell clients at once that no daemon runs here
            (self.paths.runtime_dir / name).unlink(missing_ok=True)
        self.ctx.term()
        self.store.close()

    # ------------------------------------------------------------------------------ what is shown

    def _shown(self) -> tuple[EngineInfo, list[GpuInfo], str]:
        """(engine, GPUs, GPU note) as the parts show them; a later part's word over an earlier one's."""
        engine, note = NO_ENGINE, NO_GPUS
        gpus: list[GpuInfo] = []
        for part in self.parts:
            shown = part.shown()
            engine = shown.engine if shown.engine is not None else engine
            gpus = shown.gpus if shown.gpus is not None else gpus
            note = shown.gpu_note if shown.gpu_note is not None else note
        return engine, gpus, note

    @property
    def engine(self) -> EngineInfo:
        """The engine that serves jobs naming none, as the part that owns it shows it."""
        return self._shown()[0]

    def status_line(self) -> str:
        """One line for systemd's STATUS= (shown by `systemctl status ftmllmd`)."""
        counts = self.store.counts()
        queue = "paused" if self.jobs.paused else "open"
        return (f"{counts.get('running', 0)} running, {counts.get('queued', 0)} queued (queue {queue}); "
                f"engine {self.engine.kind} {self.engine.state}")

    def on_change(self) -> None:
        """After a commit: refresh systemd's STATUS= at most once a second."""
        if self._status_pending or not self.notifier.enabled:
            return
        self._status_pending = True

        def send() -> None:
            self._status_pending = False
            self.notifier.status(self.status_line())

        asyncio.get_running_loop().call_later(1.0, send)

    def reload(self) -> None:
        """SIGHUP: re-read the config file, apply the keys of :data:`LIVE_KEYS` and say in one line what
        changed and which changed keys wait for a restart."""
        self.notifier.reloading(f"reloading {self.settings.source}")
        try:
            # the file the daemon started with; a daemon started without one looks for the XDG file again
            fresh = load_settings(self.settings.config_file, self.settings.home)
        except ConfigError as exc:
            log.error("reload failed, still running with the previous config: %s", exc)
            self.notifier.ready(f"reload failed: {exc}; still running with the previous config")
            return
        cfg = fresh.config.daemon
        logging.getLogger().setLevel(cfg.log_level.upper())
        self.jobs.max_queued = cfg.max_queued_per_user
        self.store.set_retention(cfg.event_retention, cfg.event_retention_days * 86400)
        self.identities.forget()  # group membership changes apply at once, not after the cache expires
        changed = changed_keys(self.settings.config, fresh.config)
        applied = [k for k in changed if k in LIVE_KEYS]
        waiting = [k for k in changed if k not in LIVE_KEYS]
        # what the running daemon goes by from now on: the next reload compares with this
        self.settings = replace(self.settings, config=_merge_live(self.settings.config, fresh.config))
        log.info("reloaded %s: %s; %s", fresh.source,
                 f"applied {', '.join(applied)}" if applied else "nothing to apply",
                 f"needs a restart: {', '.join(waiting)}" if waiting else "nothing waits for a restart")
        self.notifier.ready(self.status_line())

    # ------------------------------------------------------------------------------- who sees what

    def sees_content(self, uid: int) -> bool:
        """May this user see every job's content (page text, logs, outputs, streamed tokens)?"""
        return self.visibility == "team" or self.identities.caller(uid).is_admin

    def _owner_uid(self, job_id: int) -> int:
        """The uid of a job's owner, whose topic its streamed text goes out on (NO_UID: admins' alone)."""
        uid = self._owner_uids.get(job_id)
        if uid is None:
            try:
                owner = self.store.get_job(job_id).owner
                # "uid1234": a caller without a passwd entry (daemon/ctl/auth.py's user_name)
                uid = int(owner[3:]) if owner.startswith("uid") and owner[3:].isdigit() else pwd.getpwnam(owner).pw_uid
            except (KeyError, StoreError):
                uid = NO_UID
            if len(self._owner_uids) >= OWNER_CACHE:
                self._owner_uids.clear()
            self._owner_uids[job_id] = uid
        return uid

    def _guarded(self, handlers: dict[type, Handler]) -> dict[type, Handler]:
        """``handlers`` with the owner check of :data:`CONTENT_REQUESTS` in front of theirs."""
        return {t: self._owner_only(h, CONTENT_REQUESTS[t]) if t in CONTENT_REQUESTS else h
                for t, h in handlers.items()}

    def _owner_only(self, handler: Handler, what: str) -> Handler:
        def guarded(body: Any, caller: Caller) -> Any:
            if self.sees_content(caller.uid):
                return handler(body, caller)
            try:
                job = self.store.get_job(body.job_id)
            except StoreError:
                return handler(body, caller)  # which says what is wrong with the request, as for anyone
            if job.owner != caller.user:
                raise RequestDenied("forbidden", f"job {job.id} is {job.owner}'s, and this daemon shows a job's "
                                                 f"{what} to its owner and admins only (daemon.visibility = "
                                                 f'"owner"); ask {job.owner} or an admin')
            return handler(body, caller)

        return guarded

    # ----------------------------------------------------------------------------------- handlers

    def _handlers(self) -> dict[type, Handler]:
        return self._guarded({
            Hello: self.on_hello,
            Ping: lambda _b, _c: Pong(ts=time.time()),
            GetSnapshot: lambda _b, _c: self.snapshot(),
            Status: self.on_status,
            ListJobs: self.on_list_jobs,
            RemoveJobs: self.on_remove_jobs,
            ShowJob: self.on_show,
            Submit: self.on_submit,
            Cancel: self.on_cancel,
            Retry: lambda b, c: Done(message=f"job {self.jobs.retry(b.job_id, c).id} queued again"),
            SetPriority: self.on_set_priority,
            JobLogs: self.on_logs,
            PauseQueue: lambda _b, c: self._pause(True, c),
            ResumeQueue: lambda _b, c: self._pause(False, c),
            JobPages: lambda b, _c: PagesReply(pages=self.store.pages(b.job_id)),
            PageText: self.on_page_text,
            TrainPoints: lambda b, _c: TrainPointsReply(points=self.store.train_points(b.job_id, b.since_step)),
        })

    async def on_submit(self, body: Submit, caller: Caller) -> JobDetail:
        job = await self.jobs.submit(body.kind, body.spec, body.name, caller, priority=body.priority,
                                     interactive=body.interactive)
        return JobDetail(job=job, history=self.store.history(job.id),
                         log_path=str(self.jobs.job_dir(job.id) / "job.log"))

    def on_hello(self, body: Hello, caller: Caller) -> HelloReply:
        return HelloReply(version=PROTOCOL_VERSION, session=self.session, daemon_version=__version__,
                          pid=os.getpid(), user=caller.user, seq=self.bus.seq)

    def snapshot(self) -> Snapshot:
        engine, gpus, note = self._shown()
        return Snapshot(session=self.session, seq=self.bus.seq, jobs=self.store.list_jobs(), engine=engine,
                        gpus=gpus, gpu_note=note, queue_paused=self.jobs.paused)

    def on_status(self, body: Status, caller: Caller) -> StatusReply:
        engine, gpus, note = self._shown()
        return StatusReply(session=self.session, pid=os.getpid(), version=__version__,
                           uptime_s=time.monotonic() - self.started, seq=self.bus.seq,
                           state_dir=str(self.paths.state_dir), runtime_dir=str(self.paths.runtime_dir),
                           hotfolder=str(self.paths.inbox), counts=self.store.counts(),
                           queue_paused=self.jobs.paused, engine=engine, gpus=gpus, gpu_note=note)

    def on_show(self, body: ShowJob, caller: Caller) -> JobDetail:
        job = self.store.get_job(body.job_id)
        return JobDetail(job=job, history=self.store.history(job.id),
                         log_path=str(self.jobs.job_dir(job.id) / "job.log"))

    def on_set_priority(self, body: SetPriority, caller: Caller) -> JobDetail:
        job = self.jobs.set_priority(body.job_id, body.priority, caller)
        return JobDetail(job=job, history=self.store.history(job.id),
                         log_path=str(self.jobs.job_dir(job.id) / "job.log"))

    def on_list_jobs(self, body: ListJobs, caller: Caller) -> JobList:
        # naming a finished state is asking for finished jobs
        finished = body.all or bool(TERMINAL_STATES.intersection(body.states))
        return JobList(jobs=self.store.list_jobs(include_finished=finished, limit=body.limit or None,
                                                 owners=body.owners, states=body.states, kinds=body.kinds))

    def on_remove_jobs(self, body: RemoveJobs, caller: Caller) -> RemovedJobs:
        if body.older_than_s is not None:
            if body.job_ids:
                raise RequestDenied("bad_request", "remove_jobs: name jobs or give older_than_s, not both")
            # an admin cleans up after everyone, a member after herself
            ids = self.store.finished_before(time.time() - body.older_than_s,
                                             None if caller.is_admin else caller.user)
        else:
            ids = []
            for job_id in body.job_ids:  # all or none: each is checked before any goes
                job = self.store.get_job(job_id)
                self.jobs._check_owner(job, caller, "remove")  # the rule cancel follows
                if job.state not in TERMINAL_STATES:
                    raise RequestDenied("invalid_state", f"job {job.id} is {job.state}; only finished jobs can be "
                                                         f"removed: `ftctl cancel {job.id}` first")
                ids.append(job.id)
        if not ids:
            return RemovedJobs(job_ids=[])
        seq, removed = self.store.remove_jobs(ids)
        self.bus.durable(seq, JobsRemoved(job_ids=removed))
        log.info("%s removed %d finished job(s): %s", caller.user, len(removed), removed[:20])
        return RemovedJobs(job_ids=removed)

    def on_cancel(self, body: Cancel, caller: Caller) -> Done:
        job = self.jobs.cancel(body.job_id, caller)
        return Done(message=f"job {job.id} ({job.name}) is being canceled")

    def on_logs(self, body: JobLogs, caller: Caller) -> LogChunk:
        job = self.store.get_job(body.job_id)
        return read_log(self.jobs.job_dir(job.id), body, job.state in TERMINAL_STATES)

    def on_page_text(self, body: PageText, caller: Caller) -> PageTextReply:
        page, text = self.store.page_text(body.job_id, body.page_no)
        return PageTextReply(page=page, text=text)

    def _pause(self, paused: bool, caller: Caller) -> Done:
        if not caller.is_admin:
            raise RequestDenied("forbidden", f"{caller.user} cannot {'pause' if paused else 'resume'} the queue: it "
                                             "holds or starts every member's jobs; ask an admin (the daemon's user, "
                                             "root or daemon.admin_group)")
        self.jobs.set_paused(paused, caller)
        return Done(message="queue paused: running jobs go on, queued ones wait for `ftctl resume`"
                    if paused else "queue resumed")


# What SIGHUP applies to the running daemon (Daemon.reload); every other key is read once, at start.
LIVE_KEYS = frozenset({
    "daemon.log_level",
    "daemon.max_queued_per_user",
    "daemon.event_retention",
    "daemon.event_retention_days",
})


def _merge_live(running: Config, fresh: Config) -> Config:
    """The running config with the live keys of ``fresh``: a key that waits for a restart keeps being reported."""
    by_section: dict[str, dict[str, Any]] = {}
    for dotted in LIVE_KEYS:
        section, key = dotted.split(".", 1)
        by_section.setdefault(section, {})[key] = getattr(getattr(fresh, section), key)
    return msgspec.structs.replace(running, **{section: msgspec.structs.replace(getattr(running, section), **keys)
                                               for section, keys in by_section.items()})


def _claim(table: dict[Any, Any], new: dict[Any, Any], what: str) -> None:
    twice = table.keys() & new.keys()
    if twice:
        names = ", ".join(sorted(k if isinstance(k, str) else k.__name__ for k in twice))
        raise RuntimeError(f"{what} {names} claimed by two parts of the daemon")
    table.update(new)


def read_log(job_dir: Path, req: JobLogs, finished: bool) -> LogChunk:
    """The job's log (its own lines and its child's output, one file), read by byte offset."""
    path = job_dir / "job.log"
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return LogChunk(text="", offset=0, size=0, finished=finished)
    with path.open("rb") as fh:
        if req.offset is None:
            # the last `tail` lines: read a window from the end, big enough for long lines
            start = max(0, size - req.max_bytes)
            fh.seek(start)
            lines = fh.read().splitlines(keepends=True)
            chunk = b"".join(lines[-req.tail:]) if req.tail > 0 else b""
            offset = size
        else:
            start = min(max(req.offset, 0), size)
            fh.seek(start)
            chunk = fh.read(req.max_bytes)
            offset = start + len(chunk)
    return LogChunk(text=chunk.decode("utf-8", errors="replace"), offset=offset, size=size, finished=finished)
