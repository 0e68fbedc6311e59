"""One page queue per engine: the pages of every running OCR job share the engine's slots.

Feeding the engine per document left a vLLM server that batches 64 pages running two when the hot folder
brought one-page PDFs, and made one page dropped behind two long reports wait for both. Here each running job
hands its pages to its engine's :class:`PageScheduler`, which keeps ``slots`` pages in flight, chosen in turn.
The slots are the engine's ``concurrency``, plus, for an engine fed rendered images, a small prefetch
(:func:`prefetch_of`): the next pages render while the engine works, and no more rendered images than that are
ever in memory. (The CPU engine renders inside its own call: a page in flight there is a page in a worker.)
The turn order:

1. the highest (priority, class) first: a job's priority, then interactive (someone waits), plain submit,
   the hot folder's batch (daemon/jobs/queue.py);
2. within it, owners take turns (one user's 5,000 files do not starve a colleague's one);
3. within an owner, her jobs take turns (a one-page PDF is done within a few page times, whatever runs).

Each choice is O(1) (ordered dicts rotated in place). Resume and retry stay the kind's: a page is stored the
moment it is done, and a job that runs again hands only its pages not done.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from daemon.jobs.queue import CLASS_NAMES

Key = tuple[int, int]  # (priority, class): higher first
PageRun = Callable[[int], Awaitable[None]]


def prefetch_of(concurrency: int) -> int:
    """Pages in flight beyond the engine's own concurrency: enough that a freed engine slot finds its next page
    rendered and waiting, few enough that rendered images never pile up."""
    return max(2, concurrency // 4)


@dataclass(eq=False)
class _Job:
    job_id: int
    owner: str
    name: str
    key: Key
    pages: deque[int]  # waiting, in order
    run: PageRun
    total: int
    done: int
    finished: asyncio.Future[None]
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    in_turn: bool = False  # in the rotation (it has pages waiting)
    dropped: bool = False
    since: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class JobPages:
    """A job's pages as the scheduler sees them (for status, the OCR screen and the job's note)."""

    job_id: int
    owner: str
    name: str
    priority: int
    job_class: str
    in_flight: int
    waiting: int
    done: int
    total: int
    why: str  # why its pages wait ("" while one is in flight)


class PageScheduler:
    def __init__(self, engine: str, concurrency: Callable[[], int], prefetch: bool = True) -> None:
        """``concurrency()``: the engine's slots now (read at every choice: a remote engine's may change);
        ``prefetch``: feed it pages beyond those (an engine fed rendered images)."""
        self.engine = engine
        self._concurrency = concurrency
        self._prefetch = prefetch
        self.in_flight = 0
        self.waiting = 0
        self.pages_done = 0
        self._jobs: dict[int, _Job] = {}
        self._keys: list[Key] = []  # ascending; the last one has the turn
        self._turns: dict[Key, OrderedDict[str, OrderedDict[int, _Job]]] = {}

    @property
    def slots(self) -> int:
        c = max(1, self._concurrency())
        return c + prefetch_of(c) if self._prefetch else c

    def __len__(self) -> int:
        return len(self._jobs)

    # ------------------------------------------------------------------------------------------ jobs

    async def run(self, job_id: int, owner: str, name: str, key: Key, pages: list[int], run: PageRun,
                  total: int, done: int) -> None:
        """Convert ``pages`` of one job with ``run(page_no)`` (which records each page itself) in the engine's
        shared slots; returns when all are done. Cancelling the caller stops the job's pages at once."""
        if job_id in self._jobs:
            raise RuntimeError(f"job {job_id} is already in the page queue of engine {self.engine}")
        job = _Job(job_id=job_id, owner=owner, name=name, key=key, pages=deque(pages), run=run, total=total,
                   done=done, finished=asyncio.get_running_loop().create_future())
        self._jobs[job_id] = job
        if not job.pages:
            job.finished.set_result(None)
        else:
            self.waiting += len(job.pages)
            self._enter(job)
            self._fill()
        try:
            await job.finished
        finally:
            tasks = self._drop(job)
            if tasks:
                # the job ends only once its pages have stopped: nothing of it runs after its state changed
                await asyncio.gather(*tasks, return_exceptions=True)

    def set_key(self, job_id: int, key: Key) -> None:
        """A new priority: the job's waiting pages move to their new turn."""
        job = self._jobs.get(job_id)
        if job is None or job.key == key:
            return
        if job.in_turn:
            self._leave(job)
            job.key = key
            self._enter(job)
        else:
            job.key = key

    # ------------------------------------------------------------------------------------ choosing

    def _enter(self, job: _Job) -> None:
        owners = self._turns.get(job.key)
        if owners is None:
            owners = self._turns[job.key] = OrderedDict()
            bisect.insort(self._keys, job.key)
        jobs = owners.get(job.owner)
        if jobs is None:
            jobs = owners[job.owner] = OrderedDict()
        jobs[job.job_id] = job
        job.in_turn = True

    def _leave(self, job: _Job) -> None:
        owners = self._turns[job.key]
        jobs = owners[job.owner]
        del jobs[job.job_id]
        if not jobs:
            del owners[job.owner]
            if not owners:
                del self._turns[job.key]
                self._keys.remove(job.key)  # a handful of keys at most
        job.in_turn = False

    def _next(self) -> _Job | None:
        if not self._keys:
            return None
        owners = self._turns[self._keys[-1]]
        owner, jobs = next(iter(owners.items()))
        job_id, job = next(iter(jobs.items()))
        jobs.move_to_end(job_id)
        owners.move_to_end(owner)
        return job

    def _fill(self) -> None:
        loop = asyncio.get_running_loop()
        slots = self.slots
        while self.in_flight < slots:
            job = self._next()
            if job is None:
                return
            page = job.pages.popleft()
            self.waiting -= 1
            if not job.pages:
                self._leave(job)
            self.in_flight += 1
            task = loop.create_task(self._one(job, page), name=f"ocr-{job.job_id}-p{page}")
            job.tasks.add(task)
            # a callback, not a finally: a task cancelled before its first step never runs its body
            task.add_done_callback(functools.partial(self._page_done, job))

    @staticmethod
    async def _one(job: _Job, page: int) -> None:
        await job.run(page)

    def _page_done(self, job: _Job, task: asyncio.Task[None]) -> None:
        job.tasks.discard(task)
        self.in_flight -= 1
        if task.cancelled():
            pass
        elif (exc := task.exception()) is not None:
            # a bug, not a failed page (the kind records those): the job fails, the queue goes on
            if not job.finished.done():
                job.finished.set_exception(exc)
        else:
            job.done += 1
            self.pages_done += 1
        if not job.dropped and not job.pages and not job.tasks and not job.finished.done():
            job.finished.set_result(None)
        self._fill()

    def _drop(self, job: _Job) -> list[asyncio.Task[None]]:
        job.dropped = True
        if job.in_turn:
            self._leave(job)
        self.waiting -= len(job.pages)
        job.pages.clear()
        self._jobs.pop(job.job_id, None)
        tasks = list(job.tasks)
        for t in tasks:
            t.cancel()
        return tasks

    # -------------------------------------------------------------------------------------- showing

    def jobs(self) -> list[JobPages]:
        """Every job in the queue, in the order its pages get their turn (highest class first)."""
        ahead_of: dict[Key, int] = {}
        ahead = 0
        for key in reversed(self._keys):
            ahead_of[key] = ahead
            ahead += sum(len(j.pages) for jobs in self._turns[key].values() for j in jobs.values())
        out = []
        for job in sorted(self._jobs.values(), key=lambda j: (-j.key[0], -j.key[1], j.job_id)):
            out.append(JobPages(job_id=job.job_id, owner=job.owner, name=job.name, priority=job.key[0],
                                job_class=CLASS_NAMES.get(job.key[1], str(job.key[1])), in_flight=len(job.tasks),
                                waiting=len(job.pages), done=job.done, total=job.total,
                                why=self._why(job, ahead_of)))
        return out

    def _why(self, job: _Job, ahead_of: dict[Key, int]) -> str:
        if job.tasks or not job.pages:
            return ""
        higher = ahead_of.get(job.key, 0)
        if higher:
            return f"{higher} page(s) of higher-priority jobs go first"
        return (f"engine {self.engine} busy: all {self.slots} page slots taken; its turn comes round-robin "
                "between owners, then jobs")
