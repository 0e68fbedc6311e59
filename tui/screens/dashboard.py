"""Dashboard: the GPUs with who holds them, the job list, the engine — the one-glance view."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from rich.text import Text
from textual.binding import Binding, BindingType
from textual.widget import Widget

from shared.protocol import JobInfo
from tui.screens.base import FtScreen
from tui.state import Changes
from tui.widgets.engine_card import EngineCard
from tui.widgets.gpus import GpuPanel
from tui.widgets.job_table import JobTable
from tui.widgets.live_static import LiveStatic

MAX_ROWS = 200


class DashboardScreen(FtScreen):
    MODE = "dashboard"
    HELP = ("GPU memory and utilisation with the jobs and users holding each GPU; all jobs (running first, "
            "then queued, then finished, newest first); the serving engine. Enter opens a job on the Jobs "
            "screen.")
    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter", "open_job", "Open job")]

    def compose_body(self) -> Iterable[Widget]:
        yield GpuPanel(id="dash-gpus")
        yield LiveStatic(id="dash-jobs-title", classes="section-title")
        yield JobTable(lambda: self.st.jobs_by_recency()[:MAX_ROWS], self.now, id="dash-jobs")
        yield EngineCard(id="dash-engine")

    def focus_target(self) -> Widget:
        return self.query_one(JobTable)

    def on_mount(self) -> None:
        self.query_one(JobTable).focus()

    async def refresh_all(self) -> None:
        self._gpus()
        self._jobs(now=True)
        self.query_one(EngineCard).show(self.st.engine)

    async def on_changes(self, changes: Changes) -> None:
        if changes.gpus or changes.jobs:
            self._gpus()
        if changes.jobs:
            self._jobs()
        if changes.engine:
            self.query_one(EngineCard).show(self.st.engine)

    def tick(self) -> None:
        self._jobs()

    @property
    def settling(self) -> bool:
        return self.query_one(JobTable).pending

    def _gpus(self) -> None:
        m = self.st.mirror
        self.query_one(GpuPanel).show(m.gpus, m.gpu_note, m.jobs)

    def _jobs(self, now: bool = False) -> None:
        jobs = self.st.jobs.values()
        running = sum(1 for j in jobs if j.state == "running")
        queued = sum(1 for j in jobs if j.state == "queued")
        title = Text.assemble(("Jobs ", "bold"), (f"{running} running · {queued} queued · {len(jobs)} in all", "dim"))
        if self.st.mirror.queue_paused:
            title.append("  queue PAUSED (p resumes)", style="bold yellow")
        self.query_one("#dash-jobs-title", LiveStatic).show_content(title)
        table = self.query_one(JobTable)
        table.sync_now() if now else table.request_sync()

    def selected_job(self) -> JobInfo | None:
        return self.st.job(self.query_one(JobTable).job_id)

    async def on_keyed_table_selected(self) -> None:
        await self.action_open_job()

    async def action_open_job(self) -> None:
        job_id = self.query_one(JobTable).job_id
        if job_id is not None:
            await self.host.action_show_job(job_id)
