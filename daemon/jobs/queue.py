"""The queued jobs in memory, in the order they start: the job manager's index of the store's queue.

A scheduling pass runs at every submit and every job end; reading the queue from the store each time made a
drop of 10,000 files O(n) per pass and O(n²) per drain. The index is built from the store once and then kept
by the manager at every state change, so a pass costs O(1) per job it looks at.

Order within a lane: higher ``priority`` first, then interactive jobs (someone waits for them), then plain
submits, then the hot folder's batch; within one such class the owners take turns (one user's 5,000 files do
not hold a colleague's one behind them) and each owner's jobs go in submit order (FIFO).
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter, OrderedDict, deque
from collections.abc import Collection
from dataclasses import dataclass, field

from daemon.jobs.base import Resources
from shared.protocol import JobInfo

# job classes, in the order they get the engine (and a lane slot) among jobs of equal priority
BATCH, SUBMIT, INTERACTIVE = 0, 1, 2
CLASS_NAMES = {BATCH: "batch", SUBMIT: "submit", INTERACTIVE: "interactive"}


def job_class(job: JobInfo) -> int:
    if job.interactive:
        return INTERACTIVE
    return BATCH if job.spec.get("source") == "hotfolder" else SUBMIT


def order_key(job: JobInfo) -> tuple[int, int]:
    """Higher goes first."""
    return job.priority, job_class(job)


@dataclass
class _Entry:
    key: tuple[int, int]
    owner: str
    resources: Resources
    gen: int


@dataclass
class _Class:
    """One (priority, class) of a lane: each owner's jobs in FIFO, owners in turn."""

    owners: OrderedDict[str, deque[tuple[int, int]]] = field(default_factory=OrderedDict)


@dataclass
class _Lane:
    keys: list[tuple[int, int]] = field(default_factory=list)  # ascending; the last one goes first
    classes: dict[tuple[int, int], _Class] = field(default_factory=dict)


class JobQueue:
    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self._lanes: dict[str, _Lane] = {}
        self._gen = itertools.count()
        self._per_lane: Counter[str] = Counter()

    def __contains__(self, job_id: int) -> bool:
        return job_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def resources(self, job_id: int) -> Resources:
        return self._entries[job_id].resources

    def lanes(self) -> list[str]:
        return list(self._lanes)

    def add(self, job: JobInfo, resources: Resources) -> None:
        """Queue ``job`` at the end of its owner's line in its class; a job already there with the same order
        keeps its place (progress notes of a waiting job change nothing)."""
        key = order_key(job)
        old = self._entries.get(job.id)
        if old is not None and old.key == key and old.resources.lane == resources.lane:
            old.resources = resources
            return
        entry = _Entry(key=key, owner=job.owner, resources=resources, gen=next(self._gen))
        self._entries[job.id] = entry
        if old is not None:
            self._per_lane[old.resources.lane] -= 1
        self._per_lane[resources.lane] += 1
        self._push(job.id, entry, front=False)

    def _push(self, job_id: int, entry: _Entry, front: bool) -> None:
        lane = self._lanes.setdefault(entry.resources.lane, _Lane())
        cls = lane.classes.get(entry.key)
        if cls is None:
            cls = lane.classes[entry.key] = _Class()
            bisect.insort(lane.keys, entry.key)
        line = cls.owners.get(entry.owner)
        if line is None:
            line = cls.owners[entry.owner] = deque()
        if front:
            line.appendleft((job_id, entry.gen))
            cls.owners.move_to_end(entry.owner, last=False)
        else:
            line.append((job_id, entry.gen))

    def remove(self, job_id: int) -> None:
        """The job left the queue (started, canceled, failed); its line entry is skipped when reached."""
        entry = self._entries.pop(job_id, None)
        if entry is not None:
            self._per_lane[entry.resources.lane] -= 1

    def pop(self, lane_name: str) -> int | None:
        """The next job of the lane to start, taken out of its line (it stays queued until the manager says
        otherwise: :meth:`put_back` when it cannot start now, :meth:`remove` when it started)."""
        lane = self._lanes.get(lane_name)
        while lane is not None and lane.keys:
            key = lane.keys[-1]
            cls = lane.classes[key]
            while cls.owners:
                owner, line = next(iter(cls.owners.items()))
                while line:
                    job_id, gen = line.popleft()
                    entry = self._entries.get(job_id)
                    if entry is None or entry.gen != gen:
                        continue  # left the queue, or queued again elsewhere (a new priority)
                    if line:
                        cls.owners.move_to_end(owner)  # the next owner's turn
                    else:
                        del cls.owners[owner]
                    return job_id
                del cls.owners[owner]
            del lane.classes[key]
            lane.keys.pop()
        if lane is not None and not lane.keys:
            del self._lanes[lane_name]
        return None

    def put_back(self, job_id: int) -> None:
        """A popped job that could not start now: first of its owner's line again."""
        entry = self._entries.get(job_id)
        if entry is not None:
            self._push(job_id, entry, front=True)

    def waiting(self, lane_name: str) -> int:
        """How many queued jobs are in a lane."""
        return self._per_lane[lane_name]

    def queued_in(self, lanes: Collection[str]) -> list[tuple[int, Resources]]:
        """The queued jobs of ``lanes`` with their resources, highest order first and FIFO within one: what the
        GPU allocator plans with (a walk of the index, no store read, whatever the other lanes hold)."""
        if not any(self._per_lane[lane] for lane in lanes):
            return []
        found = [(job_id, e) for job_id, e in self._entries.items() if e.resources.lane in lanes]
        found.sort(key=lambda item: (-item[1].key[0], -item[1].key[1], item[1].gen))
        return [(job_id, e.resources) for job_id, e in found]
