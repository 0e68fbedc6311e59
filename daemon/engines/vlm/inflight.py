"""How many page requests the daemon keeps at a server: enough to fill its batch, not a long queue.

vLLM batches whatever is running; requests beyond its batch wait in its queue (``num_requests_waiting``),
where they gain nothing and are lost work if the server restarts. :class:`InFlight` is one bounded pool of
slots shared by the pages of every running job: its limit starts at ``max_in_flight`` and follows the
server's own numbers (:meth:`observe`, from ``/metrics`` every couple of seconds):

* the server is saturated (it runs no more than before while more than a small reserve waits, for
  :data:`SATURATED_POLLS` polls in a row) → the limit drops to the most it was seen running plus that
  reserve, so the batch refills at once when a page finishes. A burst of new pages also waits briefly
  (prefill is scheduled in chunks) while ``running`` still climbs: that is not a reason to back off.
* nothing waits and every slot is taken → the limit grows again (by a quarter), up to ``max_in_flight``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

SATURATED_POLLS = 3
PEAK_WINDOW = 15  # polls (≈ 30 s) over which the most requests seen running counts as the batch size


class InFlight:
    def __init__(self, maximum: int, minimum: int = 2) -> None:
        self.maximum = max(1, maximum)
        self.minimum = max(1, min(minimum, self.maximum))
        self.limit = self.maximum
        self.active = 0
        self._first = 0  # waiters for whom someone waits (slot(first=True))
        self._cond: asyncio.Condition | None = None
        self._running: deque[int] = deque(maxlen=PEAK_WINDOW)
        self._saturated = 0

    def _condition(self) -> asyncio.Condition:
        # created lazily: the object is built before the daemon's event loop runs
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    @contextlib.asynccontextmanager
    async def slot(self, first: bool = False) -> AsyncIterator[None]:
        """``first``: someone waits for this one request (ftui's Try): it takes the next free slot before the
        pages already waiting (the page scheduler keeps those few, daemon/ocr/pages.py)."""
        cond = self._condition()
        async with cond:
            if first:
                self._first += 1
                try:
                    await cond.wait_for(lambda: self.active < self.limit)
                finally:
                    self._first -= 1
            else:
                await cond.wait_for(lambda: self.active < self.limit and not self._first)
            self.active += 1
            if first and not self._first and self.active < self.limit:
                cond.notify(1)  # a page passed over while this one waited may go now
        try:
            yield
        finally:
            self.active -= 1
            async with cond:
                if self._first:
                    cond.notify_all()  # a plain waiter woken would only wait on: reach the urgent one
                else:
                    cond.notify(1)

    @staticmethod
    def reserve(running: int) -> int:
        """Requests kept beyond what the server runs, so its batch refills without a round trip."""
        return max(2, running // 8)

    async def observe(self, running: int, waiting: int) -> None:
        """Follow the server's queue (see the module doc)."""
        previous = self._running[-1] if self._running else 0
        self._running.append(running)
        peak = max(self._running)
        if waiting > self.reserve(running) and running <= previous:
            self._saturated += 1
        else:
            self._saturated = 0
        if self._saturated >= SATURATED_POLLS:
            new = max(self.minimum, peak + self.reserve(peak))
            if new < self.limit:
                await self.set_limit(new)
        elif waiting == 0 and self.active >= self.limit and self.limit < self.maximum:
            await self.set_limit(min(self.maximum, self.limit + max(2, self.limit // 4)))

    async def set_limit(self, limit: int) -> None:
        grew = limit > self.limit
        self.limit = max(1, limit)
        if grew:
            cond = self._condition()
            async with cond:
                cond.notify_all()
