"""The one owner of the daemon client inside ftui.

:meth:`Link.run` (started as the app's single ``daemon`` worker) connects, follows the daemon's events through
the client's Clone-pattern :meth:`~shared.client.AsyncClient.watch`, folds each event into the
:class:`~tui.state.State`, and tells the app what changed with one :class:`~tui.messages.StateChanged` at
most every ``flush_s`` — and never while the app is still handling the previous one (backpressure, as
toolong does): a flood of 5,000 token events a second costs the widgets ~20 redraws, so keys still answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

from textual.message import Message

from shared.client import DaemonUnavailable, Mirror, RemoteError, Update, unavailable_message
from shared.config import Paths
from shared.handover import Handed
from shared.protocol import (
    TERMINAL_STATES,
    EngineChanged,
    GpusSampled,
    HelloReply,
    HistoryEntry,
    JobChanged,
    JobPages,
    JobsRemoved,
    PageChanged,
    PagesReply,
    QueueChanged,
    ReplyBody,
    RequestBody,
    TextDelta,
    TrainPoints,
    TrainPointsReply,
    TrainProgress,
)
from tui.messages import StateChanged
from tui.state import Changes, State

log = logging.getLogger(__name__)

# Train jobs whose loss history is fetched at a (re)load; older ones are fetched when someone looks.
PRELOAD_TRAIN_JOBS = 8
# Handing the loop back after this long keeps a firehose from starving key handling: zmq's recv returns
# an already-finished future when data is queued, and awaiting that never yields.
YIELD_AFTER_S = 0.004


class Source(Protocol):
    """What ftui needs of the daemon; :class:`shared.client.AsyncClient` is the real one."""

    paths: Paths
    mirror: Mirror

    async def hello(self) -> HelloReply: ...

    async def request(self, body: RequestBody, timeout: float | None = None) -> ReplyBody: ...

    async def hand_over(self, path: Path) -> Handed: ...

    def watch(self) -> AsyncIterator[Update]: ...

    def close(self) -> None: ...


class Link:
    def __init__(self, source: Source, post: Callable[[Message], object], *,
                 clock: Callable[[], float] = time.time, flush_s: float = 0.05, retry_s: float = 1.0) -> None:
        self.source = source
        self.state = State(source.mirror)
        self._post = post
        self._clock = clock
        self.flush_s = flush_s
        self.retry_s = retry_s
        self._pending = Changes()
        self._flush_handle: asyncio.TimerHandle | None = None
        self._awaiting_ack = False
        self._last_flush = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._pages_loaded: set[int] = set()
        self._train_loaded: set[int] = set()

    # ------------------------------------------------------------------------------- main loop

    async def run(self) -> None:
        """Connect, follow, reconnect: runs for the life of the app."""
        while True:
            try:
                hello = await self.source.hello()
            except DaemonUnavailable as exc:
                self._set_down(f"{exc}. ftui retries by itself.")
                await asyncio.sleep(self.retry_s)  # a retry interval, not a synchronisation
                continue
            except RemoteError as exc:
                self._set_down(f"ftmllmd refused ftui: {exc.message}")
                await asyncio.sleep(self.retry_s)
                continue
            self._set_hello(hello)
            budget_end = time.monotonic() + YIELD_AFTER_S
            async for update in self.source.watch():
                self._apply(update)
                if time.monotonic() > budget_end:
                    await asyncio.sleep(0)
                    budget_end = time.monotonic() + YIELD_AFTER_S

    def _apply(self, update: Update) -> None:
        # called for every event (thousands a second in a flood): it folds into the pending batch in place
        st = self.state
        ch = self._pending
        if update.kind == "lost":
            self._set_down(self._lost_message(update.reason))
            return
        if st.connection.kind != "connected":
            st.connection.kind = "connected"
            st.connection.message = ""
            ch.connection = True
        if update.kind == "snapshot":
            if update.session_changed:
                st.reset_for_new_session()
                st.connection.restarts_seen += 1
                self._pages_loaded.clear()
                self._train_loaded.clear()
                self.spawn(self._rehello())
            first = not st.loaded or update.session_changed
            st.connection.session = st.mirror.session
            st.loaded = True
            st.sample_engine(self._clock())
            ch.reloaded = True
            self._preload(first)
        else:
            ev = update.event
            assert ev is not None
            ch.events += 1
            body = ev.body
            if isinstance(body, JobChanged):
                ch.jobs.add(body.job.id)
                if body.what:
                    st.add_history(body.job.id, HistoryEntry(seq=ev.seq, ts=ev.ts, what=body.what))
                if body.job.kind == "train" and body.job.id not in self._train_loaded:
                    self.want_train(body.job.id)
            elif isinstance(body, JobsRemoved):
                ch.jobs.update(body.job_ids)  # the mirror dropped them: tables redraw without them
            elif isinstance(body, TextDelta):
                st.add_text(body)
                ch.text.add(body.key)
            elif isinstance(body, PageChanged):
                st.set_page(body.page)
                ch.pages.add(body.page.job_id)
            elif isinstance(body, TrainProgress):
                ch.train |= st.add_train_points([body.point])
            elif isinstance(body, EngineChanged):
                st.sample_engine(ev.ts)
                ch.engine = True
            elif isinstance(body, GpusSampled):
                ch.gpus = True
            elif isinstance(body, QueueChanged):
                ch.queue = True
        self._schedule()

    def _lost_message(self, reason: str) -> str:
        where = "not running" if not self.source.paths.ctl_socket.exists() else "not answering"
        return f"{reason}. {unavailable_message(self.source.paths, where)}. Retrying by itself…"

    def _set_down(self, message: str) -> None:
        c = self.state.connection
        if c.kind == "down" and c.message == message:
            return
        c.kind = "down"
        c.message = message
        c.since = self._clock()
        self._mark(Changes(connection=True))

    def _set_hello(self, hello: HelloReply) -> None:
        c = self.state.connection
        c.user = hello.user
        c.daemon_version = hello.daemon_version
        c.session = hello.session
        if c.kind == "down":
            c.kind = "connecting"
            c.message = "connected; loading the daemon's state…"
        self._mark(Changes(connection=True))

    async def _rehello(self) -> None:
        try:
            self._set_hello(await self.source.hello())
        except (DaemonUnavailable, RemoteError):
            pass  # the watch loop reports the connection state

    # ------------------------------------------------------------------------------ coalescing

    def _mark(self, ch: Changes) -> None:
        self._pending.merge(ch)
        self._schedule()

    def _schedule(self) -> None:
        if self._flush_handle is None and self._pending:
            delay = max(0.0, self._last_flush + self.flush_s - time.monotonic())
            self._flush_handle = asyncio.get_running_loop().call_later(delay, self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if not self._pending:
            return
        if self._awaiting_ack:
            # the app has not drawn the last batch yet: keep merging, look again shortly
            self._flush_handle = asyncio.get_running_loop().call_later(self.flush_s / 2, self._flush)
            return
        changes, self._pending = self._pending, Changes()
        self._awaiting_ack = True
        self._last_flush = time.monotonic()
        self._post(StateChanged(changes))

    def ack(self) -> None:
        """The app has handled the last StateChanged; the next may go."""
        self._awaiting_ack = False

    @property
    def idle(self) -> bool:
        """Nothing pending, nothing in flight (tests wait on this before a screenshot)."""
        return not self._pending and not self._awaiting_ack and not self._tasks and self._flush_handle is None

    # ------------------------------------------------------------------------------- requests

    async def request(self, body: RequestBody, timeout: float | None = None) -> ReplyBody:
        return await self.source.request(body, timeout)

    async def hand_over(self, path: Path) -> Handed:
        return await self.source.hand_over(path)

    def spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def want_pages(self, job_id: int, force: bool = False) -> None:
        """Load a job's page list once (PageChanged events keep it current afterwards)."""
        if force or job_id not in self._pages_loaded:
            self._pages_loaded.add(job_id)
            self.spawn(self._fetch_pages(job_id))

    def want_train(self, job_id: int, force: bool = False) -> None:
        if force or job_id not in self._train_loaded:
            self._train_loaded.add(job_id)
            self.spawn(self._fetch_train(job_id))

    async def _fetch_pages(self, job_id: int) -> None:
        try:
            reply = await self.source.request(JobPages(job_id=job_id))
        except (DaemonUnavailable, RemoteError) as exc:
            self._pages_loaded.discard(job_id)
            log.debug("pages of job %d: %s", job_id, exc)
            return
        if isinstance(reply, PagesReply):
            # events that arrived meanwhile are newer than the reply only if they were applied after it
            known = self.state.pages.get(job_id, {})
            merged = {p.page_no: p for p in reply.pages}
            for no, page in known.items():
                if page.state in ("done", "failed") or no not in merged:
                    merged[no] = page
            self.state.set_pages(job_id, list(merged.values()))
            self._mark(Changes(pages={job_id}))

    async def _fetch_train(self, job_id: int) -> None:
        known = self.state.train.get(job_id)
        since = max(known) if known else -1
        try:
            reply = await self.source.request(TrainPoints(job_id=job_id, since_step=since))
        except (DaemonUnavailable, RemoteError) as exc:
            self._train_loaded.discard(job_id)
            log.debug("train points of job %d: %s", job_id, exc)
            return
        if isinstance(reply, TrainPointsReply):
            self._mark(Changes(train=self.state.add_train_points(reply.points) or {job_id}))

    def _preload(self, first: bool) -> None:
        """After a snapshot: what the default views show (pages of live OCR jobs, recent loss curves).
        Page and loss events lost in a gap are not in a snapshot, so live jobs are fetched again; for a
        run, only the points after the last step already here."""
        st = self.state
        for job in st.jobs_of_kind("ocr"):
            if job.state not in TERMINAL_STATES:
                self.want_pages(job.id, force=True)
        for job in st.jobs_of_kind("train")[:PRELOAD_TRAIN_JOBS]:
            self.want_train(job.id, force=first or job.state not in TERMINAL_STATES)

    async def close(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
