"""What ftui knows about the daemon: the client's mirror plus the pieces a snapshot does not carry (pages,
loss points, streamed text, engine history). The :class:`~tui.link.Link` is its only writer; widgets read it
when a :class:`~tui.messages.StateChanged` tells them what changed."""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Literal

from shared.client import Mirror
from shared.protocol import TERMINAL_STATES, EngineInfo, HistoryEntry, JobInfo, PageInfo, TextDelta, TrainPoint

# Streamed text kept per key (a page being decoded, an answer): enough for any page, bounded for a runaway.
MAX_TEXT_CHARS = 200_000
MAX_TEXT_KEYS = 64
ENGINE_HISTORY = 600
HISTORY_PER_JOB = 200  # what the daemon's ShowJob returns at most


@dataclass
class Changes:
    """What changed since the widgets last looked; merged until they have handled the previous batch."""

    reloaded: bool = False  # a new snapshot: redraw everything
    connection: bool = False
    jobs: set[int] = field(default_factory=set)
    engine: bool = False
    gpus: bool = False
    queue: bool = False
    pages: set[int] = field(default_factory=set)  # job ids
    text: set[str] = field(default_factory=set)  # stream keys
    train: set[int] = field(default_factory=set)  # job ids
    events: int = 0  # events folded into this batch

    def merge(self, other: Changes) -> None:
        self.reloaded |= other.reloaded
        self.connection |= other.connection
        self.jobs |= other.jobs
        self.engine |= other.engine
        self.gpus |= other.gpus
        self.queue |= other.queue
        self.pages |= other.pages
        self.text |= other.text
        self.train |= other.train
        self.events += other.events

    def __bool__(self) -> bool:
        return bool(self.reloaded or self.connection or self.jobs or self.engine or self.gpus or self.queue
                    or self.pages or self.text or self.train)


@dataclass
class TextStream:
    """Text streamed under one key. ``total`` counts every character ever received, so a reader that
    remembers how far it got can take just the new part even after the head was dropped."""

    key: str
    job_id: int = 0
    page_no: int = 0
    text: str = ""
    total: int = 0
    final: bool = False
    generation: int = 0  # bumped when the engine starts the text over (a retry): readers redraw

    def append(self, delta: TextDelta) -> None:
        if delta.reset:
            self.text = ""
            self.total = 0
            self.final = False
            self.generation += 1
        self.text += delta.text
        self.total += len(delta.text)
        if len(self.text) > MAX_TEXT_CHARS:
            self.text = self.text[-MAX_TEXT_CHARS:]
        self.final = self.final or delta.final

    def since(self, seen: int, generation: int) -> str | None:
        """The text after the first ``seen`` characters of ``generation``; None when the reader must
        redraw from :attr:`text` (the text was started over, or the part after ``seen`` was dropped)."""
        new = self.total - seen
        if generation != self.generation or new < 0 or new > len(self.text):
            return None
        return self.text[len(self.text) - new:] if new else ""


@dataclass(frozen=True)
class EngineSample:
    ts: float
    tokens_per_s: float
    pages_per_s: float
    running: int
    waiting: int
    kv_cache_pct: float


ConnectionKind = Literal["connecting", "connected", "down"]


@dataclass
class Connection:
    kind: ConnectionKind = "connecting"
    message: str = "connecting to ftmllmd…"
    user: str = ""
    daemon_version: str = ""
    session: str = ""
    since: float = 0.0
    restarts_seen: int = 0


class State:
    def __init__(self, mirror: Mirror) -> None:
        self.mirror = mirror
        self.connection = Connection()
        self.pages: dict[int, dict[int, PageInfo]] = {}
        self.train: dict[int, dict[int, TrainPoint]] = {}
        self.text: OrderedDict[str, TextStream] = OrderedDict()
        self.engine_history: deque[EngineSample] = deque(maxlen=ENGINE_HISTORY)
        # history lines seen in JobChanged events, so a detail view fetched once (ShowJob) stays current
        # without asking the daemon again at every step
        self.history: dict[int, deque[HistoryEntry]] = {}
        self.loaded = False  # a snapshot arrived at least once

    # --------------------------------------------------------------------------------- readers

    @property
    def jobs(self) -> dict[int, JobInfo]:
        return self.mirror.jobs

    @property
    def engine(self) -> EngineInfo:
        return self.mirror.engine

    def job(self, job_id: int | None) -> JobInfo | None:
        return None if job_id is None else self.mirror.jobs.get(job_id)

    def jobs_by_recency(self) -> list[JobInfo]:
        """Running first, then queued (oldest first: next to start), then finished (newest first)."""
        order = {"running": 0, "queued": 1, "interrupted": 2}
        return sorted(self.mirror.jobs.values(),
                      key=lambda j: (order.get(j.state, 3),
                                     j.id if j.state == "queued" else -(j.finished or j.created or 0), -j.id))

    def jobs_of_kind(self, kind: str) -> list[JobInfo]:
        return [j for j in self.jobs_by_recency() if j.kind == kind]

    def train_series(self, job_id: int) -> list[TrainPoint]:
        return [p for _, p in sorted(self.train.get(job_id, {}).items())]

    def page_list(self, job_id: int) -> list[PageInfo]:
        return [p for _, p in sorted(self.pages.get(job_id, {}).items())]

    def live_stream_of_job(self, job_id: int) -> TextStream | None:
        """The stream of the page this job decodes now: the newest key of the job that is not final."""
        best: TextStream | None = None
        for s in self.text.values():
            if s.job_id == job_id and (best is None or not s.final):
                best = s
        return best

    # --------------------------------------------------------------------------------- writers

    def reset_for_new_session(self) -> None:
        """A new daemon: streamed text and cached pages may describe a past that the store rewrote."""
        self.pages.clear()
        self.train.clear()
        self.text.clear()
        self.history.clear()

    def add_history(self, job_id: int, entry: HistoryEntry) -> None:
        tail = self.history.get(job_id)
        if tail is None:
            tail = self.history[job_id] = deque(maxlen=HISTORY_PER_JOB)
        tail.append(entry)

    def merged_history(self, job_id: int, fetched: list[HistoryEntry]) -> list[HistoryEntry]:
        """A job's history as fetched, plus the lines that arrived as events since."""
        last = fetched[-1].seq if fetched else 0
        newer = [h for h in self.history.get(job_id, ()) if h.seq > last]
        return (fetched + newer)[-HISTORY_PER_JOB:]

    def set_pages(self, job_id: int, pages: list[PageInfo]) -> None:
        self.pages[job_id] = {p.page_no: p for p in pages}

    def set_page(self, page: PageInfo) -> None:
        self.pages.setdefault(page.job_id, {})[page.page_no] = page

    def add_train_points(self, points: list[TrainPoint]) -> set[int]:
        touched: set[int] = set()
        for p in points:
            self.train.setdefault(p.job_id, {})[p.step] = p
            touched.add(p.job_id)
        return touched

    def add_text(self, delta: TextDelta) -> None:
        stream = self.text.get(delta.key)
        if stream is None:
            stream = TextStream(key=delta.key, job_id=delta.job_id, page_no=delta.page_no)
            self.text[delta.key] = stream
            self._evict_text()
        else:
            self.text.move_to_end(delta.key)
        stream.append(delta)

    def _evict_text(self) -> None:
        while len(self.text) > MAX_TEXT_KEYS:
            # drop the oldest finished stream (or a stream of a finished job) first, else the oldest of all
            victim = next((k for k, s in self.text.items() if s.final or self._job_over(s.job_id)),
                          next(iter(self.text)))
            del self.text[victim]

    def _job_over(self, job_id: int) -> bool:
        job = self.mirror.jobs.get(job_id)
        return job is not None and job.state in TERMINAL_STATES

    def sample_engine(self, ts: float) -> None:
        e = self.mirror.engine
        self.engine_history.append(EngineSample(ts=ts, tokens_per_s=e.tokens_per_s, pages_per_s=e.pages_per_s,
                                                running=e.running, waiting=e.waiting,
                                                kv_cache_pct=e.kv_cache_pct))
