"""Jobs: every job in a filterable, sortable table; the selected one's spec, progress, history and log."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from rich.text import Text
from textual import on
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.timer import Timer
from textual.widget import Widget
from textual.widgets import ContentSwitcher, Input, Log, Static

from shared.protocol import TERMINAL_STATES, HistoryEntry, JobDetail, JobInfo, JobLogs, LogChunk, ShowJob
from tui.format import STATE_STYLE, ago, clock_time, progress_text, run_time
from tui.messages import JobHighlighted, Replied, RequestFailed
from tui.screens.base import FtScreen
from tui.state import Changes
from tui.widgets.job_table import JobTable
from tui.widgets.live_static import LiveStatic

STATE_RANK = {"running": 0, "queued": 1, "interrupted": 2, "failed": 3, "canceled": 4, "succeeded": 5}
SORTS: tuple[tuple[str, Callable[[JobInfo], Any]], ...] = (
    ("activity", lambda j: (STATE_RANK.get(j.state, 9), -(j.finished or j.created or 0))),
    ("id", lambda j: j.id),
    ("state", lambda j: (STATE_RANK.get(j.state, 9), j.id)),
    ("kind", lambda j: (j.kind, j.id)),
    ("owner", lambda j: (j.owner, j.id)),
    ("created", lambda j: j.created),
    ("progress", lambda j: (j.progress.done / j.progress.total) if j.progress.total else -1.0),
)
FIELDS = ("id", "kind", "state", "owner", "name")
LOG_TAIL = 200
LOG_POLL_S = 1.0
DETAIL_DEBOUNCE_S = 0.15
INFO_INTERVAL_S = 0.25


def job_matches(job: JobInfo, query: str) -> bool:
    """Every word must match: ``state:running``, ``kind:ocr``, ``owner:alice``, ``id:12``, or a substring
    of id, kind, state, owner or name."""
    for word in query.lower().split():
        key, sep, value = word.partition(":")
        if sep and key in FIELDS:
            if value not in str(getattr(job, key)).lower():
                return False
        elif not any(word in str(getattr(job, f)).lower() for f in FIELDS):
            return False
    return True


def job_detail_text(job: JobInfo, history: list[HistoryEntry], log_path: str, now: float) -> Text:
    t = Text()
    t.append(f"job {job.id} ", style="bold")
    t.append(f"{job.kind} ")
    t.append(job.state, style=STATE_STYLE.get(job.state, ""))
    t.append(f" — {job.name}\n")
    gpus = f" · GPUs {','.join(map(str, job.gpus))}" if job.gpus else ""
    t.append(f"owner {job.owner} · created {ago(job.created, now)} · ran {run_time(job, now)} · "
             f"attempts {job.attempts}{gpus}\n", style="dim")
    p = job.progress
    if p.total or p.note:
        t.append(f"progress {progress_text(job)}")
        if p.rate and job.state == "running":
            t.append(f" · {p.rate:.3g} {p.unit or 'units'}/s")
        if p.note:
            t.append(f" · {p.note}")
        t.append("\n")
    if job.error:
        t.append("error: ", style="bold red")
        t.append(job.error + "\n", style="red")
    for k, v in job.artifacts.items():
        t.append(f"artifact {k}: ", style="bold")
        t.append(v + "\n")
    t.append("spec ", style="bold")
    t.append(json.dumps(job.spec, ensure_ascii=False, indent=1, sort_keys=True) + "\n")
    if log_path:
        t.append(f"log {log_path}\n", style="dim")
    if history:
        t.append("history\n", style="bold")
        for h in history[-50:]:
            t.append(f"  {clock_time(h.ts)} ", style="dim")
            t.append(h.what + "\n")
    return t


class JobsScreen(FtScreen):
    MODE = "jobs"
    HELP = ("All jobs the daemon knows. Type in the filter (/) — words match id, kind, state, owner or name; "
            "state:running, kind:ocr, owner:alice narrow to a field. s cycles the sort, S reverses it. The pane "
            "below shows the selected job's spec, progress, error, artifacts and history; l switches to its "
            "log, which follows the job while it runs.")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "focus_filter", "Filter"),
        Binding("s", "cycle_sort", "Sort"),
        Binding("S", "reverse_sort", "Reverse", show=False),
        Binding("l", "toggle_log", "Log/Detail"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.sort_index = 0
        self.sort_reverse = False
        self.filter_text = ""
        self.job_id: int | None = None
        self._detail: JobDetail | None = None
        self._detail_dirty = False
        self._detail_in_flight = False
        self._log_offset: int | None = None
        self._log_job: int | None = None
        self._log_in_flight = False
        self._log_finished = False
        self._info_timer: Timer | None = None

    def compose_body(self) -> Iterable[Widget]:
        with Horizontal(id="jobs-filter-row"):
            yield Input(placeholder="/ filter: words, state:running kind:ocr owner:alice", id="jobs-filter")
            yield Static(id="jobs-sort")
        yield JobTable(self.visible_jobs, self.now, id="jobs-table")
        # two panes and a one-line header rather than TabbedContent: half the widgets, and switching to
        # this screen during an event flood is measurably quicker
        yield LiveStatic(id="jobs-pane-title", classes="pane-title")
        with ContentSwitcher(id="jobs-detail", initial="jobs-info-scroll"):
            with VerticalScroll(id="jobs-info-scroll"):
                yield LiveStatic("no job selected", id="jobs-info-text")
            yield Log(id="jobs-log-view", highlight=False, max_lines=5000)

    def on_mount(self) -> None:
        self.query_one(JobTable).focus()
        self.set_interval(LOG_POLL_S, self._poll_log)
        self._sort_label()
        self._pane_title()

    def focus_target(self) -> Widget:
        return self.query_one(JobTable)

    # ------------------------------------------------------------------------------ table

    async def refresh_all(self) -> None:
        self._table()
        self._show_info()

    async def on_changes(self, changes: Changes) -> None:
        if changes.jobs:
            self.query_one(JobTable).request_sync()
            if self.job_id in changes.jobs:
                # the mirror has the job and the link keeps its new history lines: no need to ask again;
                # redrawn at most 4 times a second, like the table
                if self._info_timer is None:
                    self._info_timer = self.set_timer(INFO_INTERVAL_S, self._show_info)
                job = self.st.job(self.job_id)
                if job is not None and job.state in TERMINAL_STATES:
                    self._poll_log()

    def tick(self) -> None:
        self.query_one(JobTable).request_sync()

    def visible_jobs(self) -> list[JobInfo]:
        name, key = SORTS[self.sort_index]
        jobs = [j for j in self.st.jobs.values() if job_matches(j, self.filter_text)]
        reverse = self.sort_reverse != (name in ("id", "created"))  # newest first by default for those
        return sorted(jobs, key=key, reverse=reverse)

    def _table(self) -> None:
        self.query_one(JobTable).sync_now()

    def _sort_label(self) -> None:
        name = SORTS[self.sort_index][0]
        self.query_one("#jobs-sort", Static).update(
            Text.assemble(("sort ", "dim"), (name, "bold"), (" ↑" if self.sort_reverse else " ↓", "")))

    @on(Input.Changed, "#jobs-filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value
        self._table()

    @on(Input.Submitted, "#jobs-filter")
    def _filter_done(self) -> None:
        self.query_one(JobTable).focus()

    def action_focus_filter(self) -> None:
        self.query_one("#jobs-filter", Input).focus()

    def action_cycle_sort(self) -> None:
        self.sort_index = (self.sort_index + 1) % len(SORTS)
        self._sort_label()
        self._table()

    def action_reverse_sort(self) -> None:
        self.sort_reverse = not self.sort_reverse
        self._sort_label()
        self._table()

    def action_toggle_log(self) -> None:
        panes = self.query_one(ContentSwitcher)
        panes.current = "jobs-info-scroll" if panes.current == "jobs-log-view" else "jobs-log-view"
        self._pane_title()

    def _pane_title(self) -> None:
        log = self.query_one(ContentSwitcher).current == "jobs-log-view"
        t = Text(no_wrap=True)
        t.append(" Detail ", style="" if log else "bold reverse")
        t.append(" ")
        t.append(" Log ", style="bold reverse" if log else "")
        t.append("   l switches", style="dim")
        self.query_one("#jobs-pane-title", LiveStatic).show_content(t)

    def select_job(self, job_id: int) -> None:
        if not self.query_one(JobTable).select_key(job_id):
            # hidden by the filter: clear it so the job shows
            self.query_one("#jobs-filter", Input).value = ""
            self.filter_text = ""
            self._table()
            self.query_one(JobTable).select_key(job_id)
        self.query_one(JobTable).focus()

    def selected_job(self) -> JobInfo | None:
        return self.st.job(self.job_id)

    @property
    def settling(self) -> bool:
        if self.query_one(JobTable).pending or self._info_timer is not None:
            return True
        if self.job_id is None:
            return False
        return self._detail is None or self._detail_in_flight or self._log_in_flight or self._log_offset is None

    # ----------------------------------------------------------------------------- detail

    def on_job_highlighted(self, message: JobHighlighted) -> None:
        if message.job_id == self.job_id:
            return
        self.job_id = message.job_id
        self._detail = None
        self._show_info()
        self._reset_log()
        self.set_timer(DETAIL_DEBOUNCE_S, self._load_selected)

    def _load_selected(self) -> None:
        if self.job_id is None:
            return
        self._request_detail()
        self._poll_log()

    def _request_detail(self) -> None:
        if self.job_id is None:
            return
        if self._detail_in_flight:
            self._detail_dirty = True
            return
        self._detail_in_flight = True
        self.host.send(ShowJob(job_id=self.job_id), reply_to=self, tag=f"show:{self.job_id}", announce=False)

    def _show_info(self) -> None:
        if self._info_timer is not None:
            self._info_timer.stop()
            self._info_timer = None
        job = self.st.job(self.job_id)
        info = self.query_one("#jobs-info-text", LiveStatic)
        if job is None:
            info.show_content("no job selected: move the cursor in the table above" if not self.st.jobs else
                              "no job selected")
            return
        d = self._detail if self._detail is not None and self._detail.job.id == job.id else None
        history = self.st.merged_history(job.id, d.history) if d else []
        info.show_content(job_detail_text(job, history, d.log_path if d else "", self.now()))

    def _reset_log(self) -> None:
        self.query_one(Log).clear()
        self._log_offset = None
        self._log_job = self.job_id
        self._log_finished = False

    def _poll_log(self) -> None:
        if self.job_id is None or self._log_in_flight or self._log_finished or not self.is_current:
            return
        self._log_in_flight = True
        if self._log_offset is None:
            body = JobLogs(job_id=self.job_id, tail=LOG_TAIL)
        else:
            body = JobLogs(job_id=self.job_id, offset=self._log_offset)
        self.host.send(body, reply_to=self, tag=f"log:{self.job_id}", announce=False)

    def on_replied(self, message: Replied) -> None:
        kind, _, ident = message.tag.partition(":")
        job_id = int(ident) if ident.isdigit() else None
        if kind == "show":
            self._detail_in_flight = False
            if isinstance(message.reply, JobDetail) and job_id == self.job_id:
                self._detail = message.reply
                self._show_info()
            if self._detail_dirty:
                self._detail_dirty = False
                self._request_detail()
        elif kind == "log":
            self._log_in_flight = False
            if isinstance(message.reply, LogChunk) and job_id == self.job_id == self._log_job:
                chunk = message.reply
                log = self.query_one(Log)
                if chunk.text:
                    log.write(chunk.text)
                elif self._log_offset is None and chunk.finished:
                    log.write_line(f"(job {job_id} wrote no log lines; its history is on the Detail tab)")
                self._log_offset = chunk.offset
                self._log_finished = chunk.finished

    def on_request_failed(self, message: RequestFailed) -> None:
        kind = message.tag.partition(":")[0]
        if kind == "show":
            self._detail_in_flight = False
        elif kind == "log":
            self._log_in_flight = False
            self.query_one(Log).write_line(f"[log unavailable: {message.message}]")
            self._log_finished = True

