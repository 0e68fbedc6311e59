"""The job list: one row per job, keyed by job id, updated cell by cell as events arrive."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from rich.text import Text
from textual import events
from textual.timer import Timer

from shared.protocol import JobInfo
from tui.format import STATE_STYLE, ago, progress_text, run_time
from tui.messages import JobHighlighted
from tui.widgets.keyed_table import Cell, Column, KeyedTable

SYNC_INTERVAL_S = 0.25  # job tables redraw at most 4 times a second
WIDE = 110  # terminal columns from which the table shows run time and age, and longer names
NARROW_COLUMNS = (Column("id", "ID", "right"), Column("kind", "KIND"), Column("state", "STATE"),
                  Column("owner", "OWNER", max_width=8), Column("name", "NAME", flex=True, max_width=20),
                  Column("progress", "PROGRESS", max_width=14))
WIDE_COLUMNS = (Column("id", "ID", "right"), Column("kind", "KIND"), Column("state", "STATE"),
                Column("owner", "OWNER", max_width=16), Column("name", "NAME", flex=True, max_width=34),
                Column("progress", "PROGRESS", max_width=40), Column("ran", "RAN", "right"),
                Column("created", "CREATED", "right"))


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def short_progress(job: JobInfo) -> str:
    p = job.progress
    if p.total:
        return f"{p.done:g}/{p.total:g} {100.0 * p.done / p.total:.0f}%"
    return _cut(p.note, 14) if p.note else "-"


def job_cells(job: JobInfo, now: float, wide: bool) -> tuple[Cell, ...]:
    cells: tuple[Cell, ...] = (
        str(job.id),
        job.kind,
        Text(job.state, style=STATE_STYLE.get(job.state, "")),
        _cut(job.owner, 16 if wide else 8),
        job.name,
        progress_text(job) if wide else short_progress(job),
    )
    if wide:
        cells += (run_time(job, now), ago(job.created, now))
    return cells


class JobTable(KeyedTable):
    """Rows come from ``source`` (read when the table redraws, so a deferred redraw shows fresh data)."""

    COLUMNS = WIDE_COLUMNS
    DEFAULT_CSS = """
    JobTable { height: 1fr; }
    """

    def __init__(self, source: Callable[[], Sequence[JobInfo]], clock: Callable[[], float], *,
                 id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.source = source
        self.clock = clock
        self._synced_at = -1.0
        self._deferred: Timer | None = None

    def columns_for_width(self, width: int) -> tuple[Column, ...]:
        return WIDE_COLUMNS if width >= WIDE else NARROW_COLUMNS

    def on_mount(self) -> None:
        self.set_columns(self.columns_for_width(self.app.size.width))

    @property
    def job_id(self) -> int | None:
        key = self.current_key
        return key if isinstance(key, int) else None

    @property
    def pending(self) -> bool:
        """A throttled redraw is due."""
        return self._deferred is not None

    def request_sync(self) -> None:
        """Redraw soon: at once if the last redraw is old enough, else once the interval has passed.
        Progress ticking 20 times a second is noise to a reader and costs a full table render each time."""
        wait = self._synced_at + SYNC_INTERVAL_S - time.monotonic()
        if wait <= 0:
            self.sync_now()
        elif self._deferred is None:
            self._deferred = self.set_timer(wait, self.sync_now)

    def sync_now(self) -> None:
        if self._deferred is not None:
            self._deferred.stop()
            self._deferred = None
        self._synced_at = time.monotonic()
        now = self.clock()
        wide = len(self.column_keys) > len(NARROW_COLUMNS)
        if self.sync_rows([(j.id, job_cells(j, now, wide)) for j in self.source()]):
            self.post_message(JobHighlighted(self.job_id))

    def on_resize(self, event: events.Resize) -> None:
        super().on_resize(event)
        if self.set_columns(self.columns_for_width(self.app.size.width)):
            self.sync_now()

    def on_keyed_table_highlighted(self, event: KeyedTable.Highlighted) -> None:
        event.stop()
        self.post_message(JobHighlighted(self.job_id))
