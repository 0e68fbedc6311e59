"""The handover socket: members pass open files (SCM_RIGHTS), the daemon copies them into its spool.

``handover.sock`` lies beside ``ctl.sock`` with the same mode and group (0660, ``daemon.socket_group``). The
caller is who the kernel says (SO_PEERCRED), checked against the socket group as the ZAP handler checks the
ctl socket. Each connection is served in a thread of its own (a copy of a big file must not hold the event
loop), at most MAX_AT_ONCE at a time, and closed after IDLE_S without a request.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable

import msgspec

from daemon.core.store import Store
from daemon.ctl.auth import socket_gid, user_name
from daemon.part import Part
from daemon.spool.spool import Spool, SpoolError
from shared.config import Settings
from shared.handover import HANDOVER_VERSION, MAX_DATAGRAM, HandoverReply, HandoverRequest
from shared.protocol import JobInfo, JobState

log = logging.getLogger(__name__)

IDLE_S = 30.0
MAX_AT_ONCE = 8
# connections waiting for one of those slots; past this a new one is told to come back later
MAX_WAITING = 64
# descriptors one datagram may carry before the kernel truncates; we want one, but close what else came
MAX_FDS = 16
COLLECT_EVERY_S = 3600.0
# the jobs whose spec's "sha256" keeps a spool entry
HOLDING_STATES: tuple[JobState, ...] = ("queued", "running", "interrupted")

_reply_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(HandoverRequest)


class SpoolPart(Part):
    def __init__(self, settings: Settings, spool: Spool, store: Store, allowed: Callable[[int], bool]) -> None:
        """``allowed(uid)``: may this user use the daemon at all (the ctl socket's ZAP rule)."""
        self.settings = settings
        self.spool = spool
        self.store = store
        self.allowed = allowed
        self.path = settings.paths.handover_socket
        self._sock: socket.socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._slots = threading.BoundedSemaphore(MAX_AT_ONCE)
        self._open = 0  # connections being served or waiting for a slot
        self._open_lock = threading.Lock()

    async def start(self) -> None:
        self.spool.prepare()
        # a socket file left by a killed daemon: the daemon holds the state lock, nobody else owns it
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        sock.bind(str(self.path))
        os.chmod(self.path, 0o660)
        gid = socket_gid(self.settings.config.daemon.socket_group)
        if gid is not None:
            os.chown(self.path, -1, gid)
        sock.listen(64)
        self._sock = sock
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._accept(sock), name="handover"),
                       loop.create_task(self._collect_every(), name="spool-gc")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
        # a gone socket file tells clients at once that no daemon runs here
        self.path.unlink(missing_ok=True)

    def on_job_end(self, job: JobInfo) -> None:
        # a retry within keep_hours of the end still finds its input
        digest = job.spec.get("sha256")
        if isinstance(digest, str):
            self.spool.touch(digest)

    def held(self) -> set[str]:
        """Spool entries a queued or running job still needs: an ``ocr`` job's one file, an ``ocr_eval`` job's
        PDFs and truth files (``docs``)."""
        held: set[str] = set()
        for j in self.store.jobs_in_state(*HOLDING_STATES):
            if "sha256" in j.spec:
                held.add(str(j.spec["sha256"]))
            docs = j.spec.get("docs")
            if isinstance(docs, list):
                held.update(str(d[k]) for d in docs if isinstance(d, dict) for k in ("pdf", "truth") if k in d)
        return held

    async def _collect_every(self) -> None:
        while True:
            try:
                removed = await asyncio.to_thread(self.spool.collect, self.held())
                if removed:
                    log.info("spool: removed %d file(s) no job needs any more", removed)
            except OSError as exc:
                log.warning("spool: cleaning up %s failed (%s); trying again in an hour", self.spool.root, exc)
            await asyncio.sleep(COLLECT_EVERY_S)

    # ----------------------------------------------------------------------------------- serving

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:  # out of descriptors, say: the socket must outlive it
                log.warning("handover: accepting a connection failed (%s); trying again", exc)
                await asyncio.sleep(0.5)
                continue
            pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                 struct.calcsize("3i")))
            if not self.allowed(uid):
                log.warning("handover: refused %s (uid %d, pid %d): not in group %s", user_name(uid), uid, pid,
                            self.settings.config.daemon.socket_group)
                conn.close()
                continue
            with self._open_lock:
                busy = self._open >= MAX_AT_ONCE + MAX_WAITING
                if not busy:
                    self._open += 1
            if busy:
                try:
                    conn.send(_reply_encoder.encode(HandoverReply(error="the daemon is busy taking other files; "
                                                                        "try again in a minute")))
                except OSError:
                    pass
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn, uid), name=f"handover-{uid}", daemon=True).start()

    def _serve(self, conn: socket.socket, uid: int) -> None:
        try:
            with conn, self._slots:
                self._serve_one(conn, uid)
        finally:
            with self._open_lock:
                self._open -= 1

    def _serve_one(self, conn: socket.socket, uid: int) -> None:
        conn.settimeout(IDLE_S)
        while True:
            try:
                # CLOEXEC: a child started meanwhile (vLLM, a trainer) must not inherit a member's file
                data, ancillary, flags, _ = conn.recvmsg(MAX_DATAGRAM, socket.CMSG_SPACE(MAX_FDS * 4),
                                                         socket.MSG_CMSG_CLOEXEC)
            except OSError:  # idle too long, or the client went away
                return
            fds = _fds_of(ancillary)
            try:
                if not data and not fds:
                    return  # the client closed its end
                reply = self._take(data, fds, flags, uid)
            finally:
                for fd in fds:
                    os.close(fd)
            try:
                conn.send(_reply_encoder.encode(reply))
            except OSError:
                return

    def _take(self, data: bytes, fds: list[int], flags: int, uid: int) -> HandoverReply:
        try:
            request = _request_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return HandoverReply(error="not a handover request; use ftctl or ftui of the daemon's version")
        if request.v != HANDOVER_VERSION:
            return HandoverReply(error=f"the client speaks handover version {request.v}, the daemon "
                                       f"{HANDOVER_VERSION}; use ftctl/ftui of the daemon's version")
        if len(fds) != 1 or flags & socket.MSG_CTRUNC:
            return HandoverReply(error="hand over exactly one open file per message")
        t0 = time.monotonic()
        try:
            spooled = self.spool.put(fds[0], uid)
        except SpoolError as exc:
            return HandoverReply(error=str(exc))
        except OSError as exc:
            log.warning("handover from %s failed: %s", user_name(uid), exc)
            return HandoverReply(error=f"the daemon could not keep the file ({exc.strerror}); see its log")
        log.debug("handover: %s handed over %s (%d bytes, %.2fs)", user_name(uid), spooled.sha256[:12],
                  spooled.size, time.monotonic() - t0)
        return HandoverReply(sha256=spooled.sha256, size=spooled.size)


def _fds_of(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds
