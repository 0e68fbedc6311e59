"""How many page requests the daemon keeps at a server: enough to fill its batch, not a long queue.

vLLM batches whatever is running; requests beyond its batch wait in its queue (``num_requests_waiting``),
where they gain nothing and are lost work if the server restarts. :class:`InFlight` is one bounded pool of
slots shared by the pages of every running job: its limit starts at ``max_in_flight`` and follows the
server's own numbers (:meth:`observe`, from ``/metrics`` every couple of seconds):

* the server queues more than a few requests → the limit drops to what it runs plus a small reserve, so
  the batch refills at once when a page finishes;
* nothing waits and every slot is taken → the limit grows again (by a quarter), up to ``max_in_flight``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class InFlight:
    def __init__(self, maximum: int, minimum: int = 2) -> None:
        self.maximum = max(1, maximum)
        self.minimum = max(1, min(minimum, self.maximum))
        self.limit = self.maximum
        self.active = 0
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        # created lazily: the object is built before the daemon's event loop runs
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        cond = self._condition()
        async with cond:
            await cond.wait_for(lambda: self.active < self.limit)
            self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            async with cond:
                cond.notify(1)

    def reserve(self, running: int) -> int:
        """Requests kept beyond what the server runs, so its batch refills without a round trip."""
        return max(2, running // 8)

    async def observe(self, running: int, waiting: int) -> None:
        """Follow the server's queue (see the module doc)."""
        if waiting > self.reserve(running):
            new = max(self.minimum, running + self.reserve(running))
        elif waiting == 0 and self.active >= self.limit:
            new = self.limit + max(2, self.limit // 4)
        else:
            return
        await self.set_limit(min(self.maximum, new))

    async def set_limit(self, limit: int) -> None:
        grew = limit > self.limit
        self.limit = max(1, limit)
        if grew:
            cond = self._condition()
            async with cond:
                cond.notify_all()
