"""The Link (ftui's one owner of the daemon client) against a real daemon: nothing lost, floods folded."""

from __future__ import annotations

import asyncio
import time

from shared.client import AsyncClient
from shared.protocol import JobDetail, Submit
from tests.daemon_proc import DaemonProc
from tui.link import Link
from tui.messages import StateChanged


async def until(condition: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_token_deltas_arrive_complete_in_order_and_folded_into_few_batches(daemon: DaemonProc) -> None:
    client = AsyncClient(daemon.paths, name="link-test")
    batches: list[StateChanged] = []
    link: Link | None = None

    def post(message: object) -> None:
        assert isinstance(message, StateChanged)
        batches.append(message)
        asyncio.get_running_loop().call_soon(link.ack)  # type: ignore[union-attr]

    link = Link(client, post, flush_s=0.05)
    task = asyncio.get_running_loop().create_task(link.run())
    try:
        await until(lambda: link.state.loaded, "the snapshot")
        steps, deltas = 400, 3
        job = (await client.call(Submit(kind="selftest", spec={"steps": steps, "rate": 400, "deltas": deltas}),
                                 JobDetail)).job
        t0 = time.monotonic()
        first = len(batches)
        await until(lambda: link.state.jobs.get(job.id) is not None
                    and link.state.jobs[job.id].state == "succeeded", "the job to end")
        expected = "".join(f"tok{i} " for i in range(deltas)) * steps
        key = f"{job.id}:1"
        # the daemon flushes its coalesced deltas on a 50 ms timer: the tail may land after "succeeded"
        await until(lambda: key in link.state.text and link.state.text[key].total >= len(expected) and link.idle,
                    "the last deltas")
        elapsed = time.monotonic() - t0
        assert link.state.text[key].text == expected  # complete, in order, nothing twice
        assert link.state.jobs[job.id].progress.done == steps
        # ~1,600 events (a durable one per step, deltas coalesced by the daemon) became batches paced at
        # flush_s: at most one per interval (plus the one that was pending at the start)
        handled = len(batches) - first
        events = sum(b.changes.events for b in batches[first:])
        assert events >= steps
        assert handled <= elapsed / 0.05 + 2, f"{handled} batches in {elapsed:.2f}s"
        assert any(job.id in b.changes.jobs for b in batches[first:])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await link.close()
        client.close()
