"""A small HTTP/1.0 server for ``GET /metrics`` on the daemon's event loop, over a Unix socket or loopback TCP.

On the loop because the store and the parts are the loop's: a scrape reads them where they live, without
locks. Bounded so that a scraper cannot hold the loop or the daemon's memory: a few connections at once
(more are answered 503 and closed), a request head of at most 8 KiB read within a few seconds, one request
per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 4
MAX_HEAD_BYTES = 8192
READ_TIMEOUT_S = 5.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Render = Callable[[], Awaitable[bytes]]


class MetricsServer:
    def __init__(self, render: Render) -> None:
        self.render = render
        self._open = 0
        self._server: asyncio.Server | None = None

    async def start_unix(self, path: str) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=path, limit=MAX_HEAD_BYTES)

    async def start_tcp(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host=host, port=port, limit=MAX_HEAD_BYTES)

    @property
    def port(self) -> int | None:
        """The TCP port bound (with port 0 asked, the one the kernel chose); None on a Unix socket."""
        if self._server is None:
            return None
        name = self._server.sockets[0].getsockname()
        return name[1] if isinstance(name, tuple) else None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > MAX_CONNECTIONS:
                await _reply(writer, 503, b"too many scrapes at once\n")
                return
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                return
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
                await _reply(writer, 400, b"bad request\n")
            elif parts[0] not in (b"GET", b"HEAD"):
                await _reply(writer, 405, b"GET /metrics\n")
            elif parts[1].split(b"?", 1)[0] != b"/metrics":
                await _reply(writer, 404, b"the metrics are at /metrics\n")
            else:
                body = await self.render()
                await _reply(writer, 200, b"" if parts[0] == b"HEAD" else body, CONTENT_TYPE, len(body))
        except Exception:
            log.exception("metrics scrape failed")
            with contextlib.suppress(Exception):
                await _reply(writer, 500, b"the scrape failed; see the daemon's log\n")
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
            503: "Service Unavailable"}


async def _reply(writer: asyncio.StreamWriter, code: int, body: bytes, content_type: str = "text/plain",
                 length: int | None = None) -> None:
    head = (f"HTTP/1.0 {code} {_REASONS[code]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n")
    writer.write(head.encode() + body)
    with contextlib.suppress(ConnectionError):
        await asyncio.wait_for(writer.drain(), READ_TIMEOUT_S)
