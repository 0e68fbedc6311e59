"""The one client of ftmllmd, with an asyncio face (:class:`AsyncClient`, for ftui) and a blocking face
(:class:`Client`, for ftctl and scripts).

It follows the Clone pattern (see shared/protocol.py): :meth:`AsyncClient.watch` subscribes, waits for
the first heartbeat (so the subscription is live), takes a snapshot, then applies durable events in
``seq`` order to a :class:`Mirror`. A gap, a heartbeat ahead of the mirror, or a new daemon session means
"take a new snapshot". ZeroMQ reconnects the sockets by itself when the daemon comes back; the client
notices the new session from the heartbeat.
"""

from __future__ import annotations

import importlib
import itertools
import os
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import zmq

from shared.config import Paths
from shared.private_dir import socket_group, socket_problem
from shared.protocol import (
    PROTOCOL_VERSION,
    EngineChanged,
    EngineInfo,
    Event,
    GetSnapshot,
    GpuInfo,
    GpusSampled,
    Heartbeat,
    Hello,
    HelloReply,
    JobChanged,
    JobInfo,
    JobsRemoved,
    ProtocolError,
    QueueChanged,
    ReplyBody,
    Request,
    RequestBody,
    Snapshot,
    decode_event,
    decode_reply,
    encode_request,
    text_topic,
)

if TYPE_CHECKING:
    import asyncio
    import concurrent.futures

    import zmq.asyncio

    from shared.handover import Handed
else:
    class _Lazy:
        """A module imported at its first use. The blocking :class:`Client` asks without an event loop, and
        importing asyncio was a fifth of ``ftctl status``'s whole run."""

        def __init__(self, name: str) -> None:
            self._name = name

        def __getattr__(self, attr: str) -> Any:
            return getattr(importlib.import_module(self._name), attr)

    asyncio = _Lazy("asyncio")

T = TypeVar("T")

DRAIN_MAX = 512  # frames read in one burst by watch()
_JOB_PAGES = re.compile(r"ocr\.(\d{1,19})")
# Events queued in this process before ZeroMQ drops (the daemon then drops too, at its own bound): a burst
# of ~40 s at 5,000 events/s; a watcher that falls further behind takes a snapshot.
EVENT_HWM = 200_000


class DaemonUnavailable(Exception):
    """The daemon is not running or not answering; the message says where we looked and how to start it."""


class UnsafeSocket(DaemonUnavailable):
    """The socket or its directory is one another user owns or can write: nothing is sent there (the message
    names the path and the owner, e.g. "refusing /tmp/ftmllm-1003: owned by eve, not by you (alice); …")."""


def check_socket(path: Path) -> None:
    """Before connecting: a request (a password in a spec, say) must not go to a socket another user planted."""
    problem = socket_problem(path)
    if problem:
        raise UnsafeSocket(problem)


class RemoteError(Exception):
    """The daemon refused a request; ``code`` is the protocol ErrorCode, the message says why and what to do."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def request_frame(rid: int, body: RequestBody) -> bytes:
    """The request as the daemon reads it. The daemon's own limits are checked here (RemoteError): a frame
    libzmq would drop unanswered is never sent."""
    try:
        return encode_request(Request(id=rid, v=PROTOCOL_VERSION, body=body))
    except ProtocolError as exc:
        raise RemoteError(exc.code, exc.message) from None


def unavailable_message(paths: Paths, why: str) -> str:
    return (f"ftmllmd is {why} (looked for {paths.ctl_socket}); start it with `systemctl start ftmllmd`, "
            f"or run `ftmllmd` in another terminal (`make run` in a checkout)")


def check_listening(paths: Paths) -> None:
    """Fail fast when nobody listens: a missing socket file, or one left behind by a killed daemon
    (ZeroMQ itself would retry quietly until the request timed out)."""
    check_socket(paths.ctl_socket)
    path = str(paths.ctl_socket)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except FileNotFoundError:
        raise DaemonUnavailable(unavailable_message(paths, "not running")) from None
    except ConnectionRefusedError:
        raise DaemonUnavailable(unavailable_message(paths, "not running (stale socket file)")) from None
    except PermissionError:
        group = socket_group(paths.ctl_socket)
        raise DaemonUnavailable(
            f"not allowed to connect to {path}: ask an admin to add you to group '{group}' "
            f"(`sudo usermod -aG {group} $USER`, then log in again)"
        ) from None
    finally:
        probe.close()


def _refused(monitor: Any) -> bool:
    """Did the daemon refuse a handshake (not in its group)? That shows only on the monitor socket, not as an
    error on sends."""
    if monitor is None:
        return False
    refused = False
    while True:
        try:
            monitor.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return refused
        refused = True


def no_answer_message(paths: Paths, refused: bool, timeout: float) -> str:
    if refused:
        group = socket_group(paths.ctl_socket)
        return (f"ftmllmd refused the connection on {paths.ctl_socket}: you are not in group '{group}'; "
                f"ask an admin to add you (`sudo usermod -aG {group} $USER`, then log in again)")
    return unavailable_message(paths, f"not answering within {timeout:.0f}s")


@dataclass
class Mirror:
    """The client's copy of the daemon's state, kept equal to the store by snapshot + durable events."""

    session: str = ""
    seq: int = 0
    jobs: dict[int, JobInfo] = field(default_factory=dict)
    engine: EngineInfo = field(default_factory=EngineInfo)
    gpus: list[GpuInfo] = field(default_factory=list)
    gpu_note: str = ""
    queue_paused: bool = False

    def load(self, snap: Snapshot) -> None:
        self.session = snap.session
        self.seq = snap.seq
        self.jobs = {j.id: j for j in snap.jobs}
        self.engine = snap.engine
        self.gpus = snap.gpus
        self.gpu_note = snap.gpu_note
        self.queue_paused = snap.queue_paused

    def apply(self, ev: Event) -> None:
        body = ev.body
        if ev.durable:
            self.seq = ev.seq
        if isinstance(body, JobChanged):
            self.jobs[body.job.id] = body.job
        elif isinstance(body, JobsRemoved):
            for job_id in body.job_ids:
                self.jobs.pop(job_id, None)
        elif isinstance(body, EngineChanged):
            self.engine = body.engine
        elif isinstance(body, GpusSampled):
            self.gpus = body.gpus
            self.gpu_note = body.note
        elif isinstance(body, QueueChanged):
            self.queue_paused = body.paused


UpdateKind = Literal["snapshot", "event", "lost"]


@dataclass(frozen=True)
class Update:
    """What :meth:`AsyncClient.watch` yields: the mirror was (re)loaded, an event was applied, or the
    daemon has gone silent (``lost``). ``session_changed`` marks the first snapshot of a new daemon."""

    kind: UpdateKind
    event: Event | None = None
    session_changed: bool = False
    reason: str = ""


class AsyncClient:
    def __init__(self, paths: Paths, *, name: str = "ftmllm-client", timeout: float = 5.0,
                 heartbeat_s: float = 1.0, event_hwm: int = EVENT_HWM) -> None:
        self.paths = paths
        self.name = name
        self.timeout = timeout
        self.heartbeat_s = heartbeat_s
        self.event_hwm = event_hwm
        import zmq.asyncio

        self.ctx = zmq.asyncio.Context()
        # every socket of it, the handshake monitor's too: a client a caller forgot to close must not hang its
        # process at exit, when the garbage collector terms the context (seen: a test run that never ended)
        self.ctx.setsockopt(zmq.LINGER, 0)
        self._dealer: zmq.asyncio.Socket | None = None
        self._monitor: Any = None
        self._monitor_owner: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self.mirror = Mirror()

    # -------------------------------------------------------------------------------- requests

    def _ensure_dealer(self) -> zmq.asyncio.Socket:
        if self._dealer is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.reconnect_ivl = 100
            sock.reconnect_ivl_max = 1000
            # a handshake the daemon refused (not in its group) shows only here, not as an error on sends
            # read through a plain shadow socket: a NOBLOCK recv on the asyncio one returns a future
            self._monitor_owner = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            self._monitor = zmq.Socket.shadow(self._monitor_owner.underlying)
            sock.connect(self.paths.ctl_endpoint)
            self._dealer = sock
            self._reader = asyncio.get_running_loop().create_task(self._read_replies())
        return self._dealer

    async def _read_replies(self) -> None:
        assert self._dealer is not None
        while True:
            frame = await self._dealer.recv()
            try:
                reply = decode_reply(frame)
            except Exception:
                continue  # a reply from a newer daemon we cannot read: its request will time out
            fut = self._pending.pop(reply.id, None)
            if fut is not None and not fut.done():
                fut.set_result(reply)

    async def request(self, body: RequestBody, timeout: float | None = None) -> ReplyBody:
        """Send one request and wait for its reply; raises RemoteError or DaemonUnavailable."""
        if self._dealer is None:
            check_listening(self.paths)
        sock = self._ensure_dealer()
        rid = next(self._ids)
        frame = request_frame(rid, body)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        await sock.send(frame)
        try:
            reply = await asyncio.wait_for(fut, timeout or self.timeout)
        except TimeoutError:
            self._pending.pop(rid, None)
            raise DaemonUnavailable(no_answer_message(self.paths, _refused(self._monitor),
                                                      timeout or self.timeout)) from None
        if reply.error is not None:
            raise RemoteError(reply.error.code, reply.error.message)
        assert reply.result is not None
        return reply.result  # type: ignore[no-any-return]

    async def call(self, body: RequestBody, expect: type[T], timeout: float | None = None) -> T:
        result = await self.request(body, timeout)
        if not isinstance(result, expect):
            raise RemoteError("internal", f"expected a {expect.__name__} reply, got {type(result).__name__}")
        return result

    async def hello(self) -> HelloReply:
        return await self.call(Hello(client=self.name), HelloReply)

    async def snapshot(self) -> Snapshot:
        return await self.call(GetSnapshot(), Snapshot)

    async def hand_over(self, path: Path) -> Handed:
        """Open ``path`` with this user's rights and hand it to the daemon (shared/handover.py)."""
        from shared.handover import hand_over  # only ftui's Try screen hands files over through this client

        return await asyncio.to_thread(hand_over, self.paths, path)

    # ---------------------------------------------------------------------------------- events

    def subscribe(self, topics: tuple[str, ...] = ("",)) -> zmq.asyncio.Socket:
        check_socket(self.paths.events_socket)
        sub = self.ctx.socket(zmq.SUB)
        sub.linger = 0
        sub.rcvhwm = self.event_hwm
        sub.reconnect_ivl = 100
        sub.reconnect_ivl_max = 1000
        for t in with_own_text(topics):
            sub.setsockopt(zmq.SUBSCRIBE, t.encode())
        if "" not in topics:
            sub.setsockopt(zmq.SUBSCRIBE, b"hb")
        sub.connect(self.paths.events_endpoint)
        return sub

    def events(self, topics: tuple[str, ...]) -> AsyncIterator[Event]:
        """Raw events of some topics, and heartbeats (no mirror, no gap checks): e.g. one job's text deltas.

        Subscribed before this returns, not at the first ``anext``: what a caller asks next (a job's state)
        is followed by every later event once the first message, at the latest a heartbeat, has arrived
        (ZeroMQ joins a subscriber a moment after it connects)."""
        return self._read_events(self.subscribe(topics))

    async def _read_events(self, sub: zmq.asyncio.Socket) -> AsyncIterator[Event]:
        try:
            while True:
                _topic, frame = await sub.recv_multipart()
                yield decode_event(frame)
        finally:
            sub.close()

    async def watch(self) -> AsyncIterator[Update]:
        """Keep :attr:`mirror` equal to the daemon's state, for as long as the caller iterates."""
        sub = self.subscribe()
        # frames already queued are read in a burst through a plain (non-asyncio) shadow of the same
        # socket: one event-loop round trip per frame cost a TUI most of a core at 5,000 events/s
        drain: zmq.Socket[bytes] = zmq.Socket.shadow(sub.underlying)
        lost_after = 3 * self.heartbeat_s
        need_snapshot = True
        lost = False
        session_changed = False
        try:
            while True:
                try:
                    frames = [await asyncio.wait_for(sub.recv_multipart(), lost_after)]
                except TimeoutError:
                    if not lost:
                        lost = True
                        yield Update("lost", reason=f"no heartbeat from ftmllmd for {lost_after:.0f}s")
                    continue
                while len(frames) < DRAIN_MAX:
                    try:
                        frames.append(drain.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                lost = False
                for _topic, frame in frames:
                    ev = decode_event(frame)
                    if ev.session != self.mirror.session and self.mirror.session:
                        session_changed = True
                    if need_snapshot or ev.session != self.mirror.session:
                        # a message arrived, so the subscription is live: a snapshot taken now misses nothing
                        try:
                            snap = await self.snapshot()
                        except DaemonUnavailable:
                            continue
                        self.mirror.load(snap)
                        need_snapshot = False
                        yield Update("snapshot", session_changed=session_changed)
                        session_changed = False
                        if ev.session != snap.session:
                            continue
                    if ev.durable:
                        if ev.seq <= self.mirror.seq:
                            continue  # already in the snapshot
                        if ev.seq != self.mirror.seq + 1:
                            need_snapshot = True
                            continue
                    elif isinstance(ev.body, Heartbeat) and ev.seq > self.mirror.seq:
                        need_snapshot = True  # events before this heartbeat were lost (e.g. high-water mark)
                        continue
                    self.mirror.apply(ev)
                    yield Update("event", event=ev)
        finally:
            sub.close()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        for fut in self._pending.values():
            fut.cancel()
        # destroy, not term: it also closes SUB sockets of watch() generators still suspended somewhere
        self.ctx.destroy(linger=0)


def with_own_text(topics: tuple[str, ...]) -> tuple[str, ...]:
    """``topics`` and, for each OCR job named (``ocr.<id>``: its pages), that job's streamed text if it is
    this user's own: text goes out on its owner's topic (``text_topic`` in shared/protocol.py), which the
    daemon may keep to its owner (``daemon.visibility = "owner"``)."""
    extra = [text_topic(os.getuid(), int(m.group(1))) for t in topics if (m := _JOB_PAGES.fullmatch(t))]
    return (*topics, *extra)


class Client:
    """The blocking face. Requests go over a plain blocking DEALER socket of its own (no event loop, no thread:
    ``ftctl status`` starts and ends in a blink); events and :meth:`watch` run the same AsyncClient on a private
    event loop in a background thread, started at their first use."""

    def __init__(self, paths: Paths, *, name: str = "ftctl", timeout: float = 5.0) -> None:
        self.paths = paths
        self.name = name
        self.timeout = timeout
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._dealer: zmq.Socket[bytes] | None = None
        self._monitor: zmq.Socket[bytes] | None = None
        self._ids = itertools.count(1)
        # one blocking socket, several threads (a test follows watch() in one and asks in another)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._async_client: AsyncClient | None = None
        self._iterations: set[concurrent.futures.Future[None]] = set()

    @property
    def _async(self) -> AsyncClient:
        if self._async_client is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="ftmllm-client", daemon=True)
            self._thread.start()
            self._async_client = self._run(_make_async(self.paths, self.name, self.timeout))
        return self._async_client

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def mirror(self) -> Mirror:
        return self._async.mirror

    def _ensure_dealer(self) -> zmq.Socket[bytes]:
        if self._dealer is None:
            check_listening(self.paths)
            self._ctx = zmq.Context()
            self._ctx.setsockopt(zmq.LINGER, 0)  # as in AsyncClient: nothing may hold the process at exit
            sock = self._ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.reconnect_ivl = 100
            sock.reconnect_ivl_max = 1000
            self._monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            sock.connect(self.paths.ctl_endpoint)
            self._dealer = sock
        return self._dealer

    def request(self, body: RequestBody, timeout: float | None = None) -> ReplyBody:
        """Send one request and wait for its reply; raises RemoteError or DaemonUnavailable."""
        wait = timeout or self.timeout
        with self._lock:
            sock = self._ensure_dealer()
            rid = next(self._ids)
            frame = request_frame(rid, body)
            sock.send(frame)
            deadline = time.monotonic() + wait
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(max(1, int(left * 1000))):
                    raise DaemonUnavailable(no_answer_message(self.paths, _refused(self._monitor), wait))
                try:
                    reply = decode_reply(sock.recv())
                except Exception:
                    continue  # a reply from a newer daemon we cannot read: its request will time out
                if reply.id == rid:
                    break  # others: answers to requests that timed out before
        if reply.error is not None:
            raise RemoteError(reply.error.code, reply.error.message)
        assert reply.result is not None
        return reply.result  # type: ignore[no-any-return]

    def call(self, body: RequestBody, expect: type[T], timeout: float | None = None) -> T:
        result = self.request(body, timeout)
        if not isinstance(result, expect):
            raise RemoteError("internal", f"expected a {expect.__name__} reply, got {type(result).__name__}")
        return result

    def hello(self) -> HelloReply:
        return self.call(Hello(client=self.name), HelloReply)

    def _iterate(self, agen: AsyncIterator[T], stop: threading.Event) -> Generator[T, None, None]:
        import queue  # only for events: requests need no hand-over between threads

        q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=10_000)

        async def pump() -> None:
            try:
                async for item in agen:
                    q.put(("item", item))
                    if stop.is_set():
                        break
            except asyncio.CancelledError:  # the client is closing: the iteration just ends
                q.put(("end", None))
                raise
            except Exception as exc:  # handed to the consuming thread
                q.put(("error", exc))
            else:
                q.put(("end", None))

        assert self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        self._iterations.add(fut)
        try:
            while True:
                kind, item = q.get()
                if kind == "item":
                    yield item
                elif kind == "error":
                    raise item
                else:
                    return
        finally:
            stop.set()
            fut.cancel()
            self._iterations.discard(fut)

    def watch(self) -> Generator[Update, None, None]:
        """Blocking iterator over mirror updates; stop by breaking out of the loop."""
        return self._iterate(self._async.watch(), threading.Event())

    def events(self, topics: tuple[str, ...]) -> Generator[Event, None, None]:
        """Subscribed before this returns (see :meth:`AsyncClient.events`)."""
        client = self._async
        return self._iterate(self._run(_subscribe(client, topics)), threading.Event())

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                self._ctx.destroy(linger=0)
                self._ctx = self._dealer = self._monitor = None
        if self._loop is None or self._async_client is None:
            return

        async def _close() -> None:
            for fut in list(self._iterations):
                fut.cancel()
            await asyncio.sleep(0)  # let the cancelled pumps unwind before their sockets go
            assert self._async_client is not None
            self._async_client.close()

        try:
            self._run(_close(), timeout=5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            assert self._thread is not None
            self._thread.join(timeout=5)
            self._async_client = None


async def _make_async(paths: Paths, name: str, timeout: float) -> AsyncClient:
    return AsyncClient(paths, name=name, timeout=timeout)


async def _subscribe(client: AsyncClient, topics: tuple[str, ...]) -> AsyncIterator[Event]:
    # on the loop's thread, which owns the client's sockets
    return client.events(topics)
