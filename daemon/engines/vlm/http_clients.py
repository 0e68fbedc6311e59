"""HTTP clients by where the server listens: TCP (the remote engine's servers) or a Unix socket (the daemon's
own vLLM, reachable nowhere else; see :mod:`daemon.engines.vllm_command`).

The supervised vLLM gets a fresh socket with each start, so a client made for one socket is useless once the
next one appears: it is closed then (its requests, if any, broke with the server that went away).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx

# The Host of every request to a Unix socket: vLLM does not look at it, and no name is resolved.
UDS_ROOT = "http://localhost"

Maker = Callable[[str], httpx.AsyncClient]


def transport(uds: str, limits: httpx.Limits | None = None) -> httpx.AsyncHTTPTransport | None:
    """The transport of a client for Unix socket ``uds`` (None for TCP: httpx's default, with ``limits`` given to
    the client). A client given a transport takes its pool limits from it."""
    if not uds:
        return None
    return httpx.AsyncHTTPTransport(uds=uds, limits=limits or httpx.Limits())


class HttpClients:
    def __init__(self, make: Maker) -> None:
        """``make(uds)`` builds a client with the caller's timeouts and limits, for Unix socket ``uds`` ("":
        TCP); :func:`transport` makes its transport."""
        self._make = make
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def get(self, uds: str = "") -> httpx.AsyncClient:
        """The client for the server on Unix socket ``uds`` ("" = over TCP, to whatever URL is asked)."""
        client = self._clients.get(uds)
        if client is None:
            if uds:
                for old in [k for k in self._clients if k]:
                    self._close_later(self._clients.pop(old))
            client = self._clients[uds] = self._make(uds)
        return client

    def _close_later(self, client: httpx.AsyncClient) -> None:
        task = asyncio.get_running_loop().create_task(client.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(c.aclose() for c in clients), *self._closing, return_exceptions=True)
