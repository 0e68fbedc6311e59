"""The event bus: the PUB socket, and the one place that turns state changes into published events.

Durable events are committed by the store first and published after, in the same loop turn, so the order
on the wire is the order of ``seq``. Stream events (text deltas, GPU samples) are coalesced per key and
flushed on a short timer: a model emitting 200 tokens/s per page over 64 pages must not become 12,800
messages a second for every client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import zmq
import zmq.asyncio

from shared.protocol import Event, EventBody, Heartbeat, TextDelta, encode, topic_of

log = logging.getLogger(__name__)

# Text deltas are merged per key and sent at most this often (~20 per second).
DELTA_FLUSH_S = 0.05


class EventBus:
    def __init__(self, sock: zmq.asyncio.Socket, session: str, seq: int) -> None:
        self._sock = sock
        self.session = session
        self.seq = seq  # the last durable seq published (or found in the store at start)
        self.started = time.monotonic()
        self._pending_deltas: dict[str, TextDelta] = {}
        self._uncommitted: list[tuple[int, EventBody]] = []
        self._flush_handle: asyncio.TimerHandle | None = None

    def _send(self, body: EventBody, seq: int, durable: bool) -> None:
        frame = encode(Event(seq=seq, session=self.session, ts=time.time(), durable=durable, body=body))
        try:
            self._sock.send_multipart([topic_of(body).encode(), frame], flags=zmq.NOBLOCK)
        except zmq.Again:
            # PUB never blocks; this only happens if the socket's own queue is full: the subscribers will
            # see a seq gap and ask for a snapshot, so nothing is lost for good.
            log.warning("event socket full: dropped event seq=%d", seq)

    def durable(self, seq: int, body: EventBody) -> None:
        """Publish the event the store wrote as ``seq``, as soon as the store commits it."""
        self._uncommitted.append((seq, body))

    def committed(self) -> None:
        """The store's commit hook: everything written so far is safe, send it in seq order."""
        pending, self._uncommitted = self._uncommitted, []
        for seq, body in pending:
            self.seq = max(self.seq, seq)
            self._send(body, seq, True)

    def stream(self, body: EventBody) -> None:
        """Publish an event that changes no stored state (deltas are coalesced, see module doc)."""
        if isinstance(body, TextDelta):
            prev = self._pending_deltas.get(body.key)
            if prev is not None and not body.reset:
                body = TextDelta(key=body.key, text=prev.text + body.text, job_id=body.job_id,
                                 page_no=body.page_no, final=body.final, reset=prev.reset)
            self._pending_deltas[body.key] = body
            if body.final:
                self._flush_key(body.key)
            elif self._flush_handle is None:
                self._flush_handle = asyncio.get_running_loop().call_later(DELTA_FLUSH_S, self.flush)
            return
        self._send(body, self.seq, False)

    def _flush_key(self, key: str) -> None:
        delta = self._pending_deltas.pop(key, None)
        if delta is not None:
            self._send(delta, self.seq, False)

    def flush(self) -> None:
        self._flush_handle = None
        for key in list(self._pending_deltas):
            self._flush_key(key)

    def heartbeat(self) -> None:
        self._send(Heartbeat(pid=os.getpid(), uptime_s=time.monotonic() - self.started), self.seq, False)

    async def run_heartbeat(self, interval: float) -> None:
        while True:
            self.heartbeat()
            await asyncio.sleep(interval)

