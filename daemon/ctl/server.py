"""The ``ctl`` socket: decode a request, find out who sent it, dispatch, answer — and never die of a frame.

Handlers may be plain functions (answered in the same loop turn) or coroutines (answered when done,
while other requests proceed): many requests are in flight at once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import zmq
import zmq.asyncio

from daemon.core.store import StoreError, UnknownJob
from daemon.ctl.auth import Identities
from daemon.jobs.base import Caller, JobFailed, SpecError
from daemon.jobs.manager import RequestDenied
from shared.protocol import (
    MAX_FRAME_BYTES,
    ErrorInfo,
    ProtocolError,
    Reply,
    ReplyBody,
    decode_request,
    encode,
    request_id_of,
    too_large_message,
)

log = logging.getLogger(__name__)

Handler = Callable[[Any, Caller], "ReplyBody | Awaitable[ReplyBody]"]


class DropCounter:
    """Counts frames dropped without a reply and logs a summary line at most every ``every`` seconds."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.count = 0
        self._last = 0.0

    def drop(self, reason: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last >= self.every:
            log.warning("dropped %d malformed frame(s) on the ctl socket so far; latest: %s", self.count, reason)
            self._last = now


class CtlServer:
    def __init__(self, sock: zmq.asyncio.Socket, identities: Identities,
                 handlers: dict[type, Handler]) -> None:
        self.sock = sock
        self.identities = identities
        self.handlers = handlers
        self.dropped = DropCounter()
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            try:
                self._handle(frames)
            except Exception:  # the last line of defence: a request must never end the loop
                log.exception("unexpected error handling a request")

    def _handle(self, frames: list[zmq.Frame]) -> None:
        if len(frames) != 2:
            self.dropped.drop(f"{len(frames)} frames instead of 2")
            return
        ident, payload = frames
        caller = self.identities.from_frame(payload)
        size = len(payload.buffer)
        if size > MAX_FRAME_BYTES:  # answered without copying the frame into Python
            self._reply(ident.bytes, Reply(id=request_id_of(payload.buffer), error=ErrorInfo(
                code="too_large", message=too_large_message(size))))
            return
        data = payload.bytes
        try:
            req = decode_request(data)
        except ProtocolError as exc:
            rid = request_id_of(data)
            self._reply(ident.bytes, Reply(id=rid, error=ErrorInfo(code=exc.code, message=exc.message)))
            return
        handler = self.handlers.get(type(req.body))
        if handler is None:
            self._reply(ident.bytes, Reply(id=req.id, error=ErrorInfo(
                code="bad_request", message=f"this daemon does not handle '{type(req.body).__name__}' yet")))
            return
        try:
            result = handler(req.body, caller)
        except Exception as exc:
            self._reply(ident.bytes, Reply(id=req.id, error=_error_of(exc)))
            return
        if inspect.isawaitable(result):
            task = asyncio.get_running_loop().create_task(self._finish(ident.bytes, req.id, result))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self._reply(ident.bytes, Reply(id=req.id, result=result))

    async def _finish(self, ident: bytes, rid: int, pending: Awaitable[ReplyBody]) -> None:
        try:
            result = await pending
        except Exception as exc:
            self._reply(ident, Reply(id=rid, error=_error_of(exc)))
        else:
            self._reply(ident, Reply(id=rid, result=result))

    def _reply(self, ident: bytes, reply: Reply) -> None:
        # after the store's group commit (scheduled earlier in this turn, so it runs first): a client never
        # holds an answer about a change that a crash could still take back
        asyncio.get_running_loop().call_soon(self._send, ident, reply)

    def _send(self, ident: bytes, reply: Reply) -> None:
        try:
            self.sock.send_multipart([ident, encode(reply)], flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("reply to a client dropped: its queue is full (a client not reading its replies)")
        except zmq.ZMQError as exc:
            # ROUTER_MANDATORY is off, so an unknown peer is dropped silently; anything else is logged
            log.warning("could not send a reply: %s", exc)


def _error_of(exc: Exception) -> ErrorInfo:
    if isinstance(exc, RequestDenied):
        return ErrorInfo(code=exc.code, message=exc.message)  # type: ignore[arg-type]
    if isinstance(exc, SpecError):
        return ErrorInfo(code="invalid_spec", message=str(exc))
    if isinstance(exc, UnknownJob):
        return ErrorInfo(code="unknown_job", message=str(exc))
    if isinstance(exc, (StoreError, JobFailed)):
        return ErrorInfo(code="invalid_state", message=str(exc))
    log.exception("request handler failed", exc_info=exc)
    return ErrorInfo(code="internal", message=f"internal error ({type(exc).__name__}: {exc}); "
                                              "see the daemon log (journalctl -u ftmllmd)")
