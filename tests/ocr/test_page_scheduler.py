"""The job queue's order (daemon/jobs/queue.py) and the engine's one page queue (daemon/ocr/pages.py), driven
with real coroutines on a real event loop: priority first, then interactive before plain submits before the hot
folder's batch, owners in turn, jobs in turn, FIFO within one owner."""

from __future__ import annotations

import asyncio
import time

import pytest

from daemon.engines.vlm.inflight import InFlight
from daemon.jobs.base import Resources
from daemon.jobs.queue import BATCH, INTERACTIVE, SUBMIT, JobQueue, order_key
from daemon.ocr.pages import PageScheduler
from shared.protocol import JobInfo


def job(job_id: int, owner: str = "alice", priority: int = 0, interactive: bool = False,
        source: str = "ctl") -> JobInfo:
    return JobInfo(id=job_id, kind="ocr", owner=owner, state="queued", name=f"j{job_id}",
                   spec={"source": source}, created=0.0, priority=priority, interactive=interactive)


def drain(q: JobQueue, lane: str = "ocr") -> list[int]:
    out = []
    while (popped := q.pop(lane)) is not None:
        out.append(popped)
        q.remove(popped)
    return out


def test_the_queue_starts_higher_priority_first_then_classes_then_owners_in_turn() -> None:
    q = JobQueue()
    res = Resources(lane="ocr")
    for i in range(1, 6):
        q.add(job(i, "alice", source="hotfolder"), res)  # a batch of five
    q.add(job(6, "bob", source="hotfolder"), res)
    q.add(job(7, "carol"), res)  # a plain submit
    q.add(job(8, "dave", interactive=True), res)
    q.add(job(9, "erin", priority=-1, interactive=True), res)
    q.add(job(10, "alice", priority=3, source="hotfolder"), res)
    assert len(q) == 10 and q.waiting("ocr") == 10
    assert order_key(job(1, source="hotfolder"))[1] == BATCH and order_key(job(7))[1] == SUBMIT
    assert order_key(job(8, interactive=True))[1] == INTERACTIVE
    # bob's one batch file goes second among the batch, not after alice's five
    assert drain(q) == [10, 8, 7, 1, 6, 2, 3, 4, 5, 9]
    assert q.waiting("ocr") == 0


def test_a_new_priority_moves_a_queued_job_and_a_refused_one_keeps_its_place() -> None:
    q = JobQueue()
    res = Resources(lane="train")
    for i in (1, 2, 3):
        q.add(job(i), res)
    q.add(job(3, priority=5), res)  # SetPriority on job 3
    q.add(job(2), res)  # a progress note on a waiting job: no move
    first = q.pop("train")
    assert first == 3
    q.put_back(3)  # admission said "not now": it stays first
    assert q.pop("train") == 3
    q.remove(3)
    q.remove(1)  # canceled while queued
    q.add(job(1), res)  # retried: queued again, at the end of alice's line
    assert drain(q, "train") == [2, 1]
    assert q.pop("nothing") is None


async def test_pages_of_all_jobs_share_the_slots_owners_first_then_jobs() -> None:
    sched = PageScheduler("test", lambda: 2, prefetch=False)
    started: list[tuple[int, int]] = []
    gate = asyncio.Event()
    running = [0]
    peak = [0]

    def runner(job_id: int):  # type: ignore[no-untyped-def]
        async def run(page: int) -> None:
            started.append((job_id, page))
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            await gate.wait()
            await asyncio.sleep(0)
            running[0] -= 1
        return run

    big = [asyncio.create_task(sched.run(i, "alice", f"big{i}", (0, SUBMIT), list(range(1, 21)), runner(i), 20, 0))
           for i in (1, 2)]
    await asyncio.sleep(0)
    small = asyncio.create_task(sched.run(3, "bob", "one page", (0, SUBMIT), [1], runner(3), 1, 0))
    await asyncio.sleep(0)
    urgent = asyncio.create_task(sched.run(4, "carol", "urgent", (0, INTERACTIVE), [1, 2], runner(4), 2, 0))
    await asyncio.sleep(0)
    assert sched.in_flight == 2 and sched.waiting == 40 + 1 + 2 - 2
    rows = {j.job_id: j for j in sched.jobs()}
    assert next(j.job_id for j in sched.jobs()) == 4  # the interactive job's turn comes first
    assert rows[3].waiting == 1 and rows[3].why.startswith("2 page(s) of higher-priority jobs go first")
    gate.set()
    await asyncio.wait_for(asyncio.gather(*big, small, urgent), 10)
    assert peak[0] == 2 and sched.in_flight == 0 and sched.waiting == 0 and len(sched) == 0
    order = [j for j, _p in started]
    # the first big job took both slots while alone; then carol's interactive pages, then bob's one page
    # within alice's next turn, not after her 38 waiting pages
    assert order[:2] == [1, 1]
    assert order[2:4] == [4, 4]
    assert 3 in order[4:6]
    # alice's two jobs take turns page by page
    rest = [j for j in order[4:] if j != 3]
    assert rest[:6] == [1, 2, 1, 2, 1, 2]
    assert sorted(started) == sorted({*started}), "a page ran twice"
    assert sched.pages_done == 43


async def test_a_canceled_job_stops_its_pages_and_frees_its_slots() -> None:
    sched = PageScheduler("test", lambda: 1, prefetch=True)
    assert sched.slots == 3  # one engine slot and a prefetch of two
    hold = asyncio.Event()
    ran: list[tuple[int, int]] = []
    stopped = []

    async def slow(page: int) -> None:
        ran.append((1, page))
        try:
            await hold.wait()
        except asyncio.CancelledError:
            stopped.append(page)
            raise

    async def quick(page: int) -> None:
        ran.append((2, page))

    first = asyncio.create_task(sched.run(1, "alice", "slow", (0, SUBMIT), [1, 2, 3, 4, 5], slow, 5, 0))
    t0 = time.monotonic()
    while sched.in_flight < 3 and time.monotonic() - t0 < 5:
        await asyncio.sleep(0)
    second = asyncio.create_task(sched.run(2, "bob", "quick", (0, SUBMIT), [1, 2], quick, 2, 0))
    await asyncio.sleep(0)
    assert [j.why != "" for j in sched.jobs()] == [False, True]
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert sorted(stopped) == [1, 2, 3]  # the job ended only after its pages stopped
    await asyncio.wait_for(second, 5)
    assert [p for j, p in ran if j == 2] == [1, 2]
    assert sched.in_flight == 0 and sched.waiting == 0 and len(sched) == 0


async def test_a_page_that_raises_fails_its_job_not_the_queue() -> None:
    sched = PageScheduler("test", lambda: 2, prefetch=False)

    async def broken(page: int) -> None:
        if page == 2:
            raise RuntimeError("a bug in the kind")

    async def fine(page: int) -> None:
        await asyncio.sleep(0)

    bad = asyncio.create_task(sched.run(1, "alice", "bad", (0, SUBMIT), [1, 2, 3, 4], broken, 4, 0))
    good = asyncio.create_task(sched.run(2, "alice", "good", (0, SUBMIT), [1, 2, 3], fine, 3, 0))
    with pytest.raises(RuntimeError, match="a bug in the kind"):
        await asyncio.wait_for(bad, 5)
    await asyncio.wait_for(good, 5)
    assert sched.in_flight == 0 and sched.waiting == 0 and len(sched) == 0


async def test_a_new_priority_moves_a_running_jobs_waiting_pages() -> None:
    sched = PageScheduler("test", lambda: 1, prefetch=False)
    gate = asyncio.Event()
    order: list[int] = []

    def runner(job_id: int):  # type: ignore[no-untyped-def]
        async def run(page: int) -> None:
            order.append(job_id)
            await gate.wait()
        return run

    a = asyncio.create_task(sched.run(1, "alice", "a", (0, SUBMIT), [1, 2, 3], runner(1), 3, 0))
    await asyncio.sleep(0)
    b = asyncio.create_task(sched.run(2, "bob", "b", (0, SUBMIT), [1, 2, 3], runner(2), 3, 0))
    await asyncio.sleep(0)
    sched.set_key(2, (5, SUBMIT))
    sched.set_key(99, (5, SUBMIT))  # not in the queue: nothing happens
    gate.set()
    await asyncio.wait_for(asyncio.gather(a, b), 5)
    assert order == [1, 2, 2, 2, 1, 1]


async def test_a_question_someone_waits_for_takes_the_next_engine_slot_before_waiting_pages() -> None:
    pool = InFlight(2)
    order: list[str] = []
    release = asyncio.Event()

    async def request(name: str, first: bool = False) -> None:
        async with pool.slot(first=first):
            order.append(name)
            await release.wait()

    busy = [asyncio.create_task(request(f"page{i}")) for i in (1, 2)]
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(request(f"page{i}")) for i in (3, 4, 5)]
    await asyncio.sleep(0)
    question = asyncio.create_task(request("question", first=True))
    await asyncio.sleep(0)
    assert order == ["page1", "page2"]
    release.set()
    await asyncio.wait_for(asyncio.gather(*busy, *waiting, question), 5)
    assert order[2] == "question" and sorted(order[3:]) == ["page3", "page4", "page5"]
    assert pool.active == 0
