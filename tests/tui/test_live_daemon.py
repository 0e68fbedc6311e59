"""ftui driven by Textual's Pilot against a real ftmllmd subprocess (real ZeroMQ sockets, real SQLite)."""

from __future__ import annotations

from pathlib import Path

from textual.command import CommandPalette
from textual.widgets import Input, Log

from shared.client import AsyncClient
from shared.config import Paths
from shared.protocol import JobDetail, Submit
from tests.daemon_proc import DaemonProc
from tests.tui.conftest import wait_until
from tui.app import FtuiApp
from tui.screens.dashboard import DashboardScreen
from tui.screens.modals import ConfirmScreen
from tui.widgets.chrome import Banner, TopBar
from tui.widgets.job_table import JobTable


def make_app(paths: Paths, **kw: object) -> FtuiApp:
    return FtuiApp(lambda: AsyncClient(paths, name="ftui-test", timeout=5.0), file_root=Path("/tmp"),
                   **kw)  # type: ignore[arg-type]


def cell(table: JobTable, job_id: int, column: str) -> str:
    return table.get_cell(job_id, column)


def connected(app: FtuiApp) -> bool:
    st = app.link.state
    return st.loaded and st.connection.kind == "connected"


async def test_selftest_submitted_from_the_palette_appears_progresses_and_succeeds(daemon: DaemonProc) -> None:
    app = make_app(daemon.paths)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: connected(app), "ftui to load the daemon's snapshot")
        await pilot.press("ctrl+p")
        await wait_until(pilot, lambda: isinstance(app.screen, CommandPalette), "the command palette")
        await pilot.press(*"submit selftest")
        palette = app.screen
        assert isinstance(palette, CommandPalette)
        await wait_until(pilot, lambda: palette._list_visible and palette.query_one("CommandList").option_count,
                         "palette hits")
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.link.state.jobs, "the submitted job to reach the mirror")
        job_id = max(app.link.state.jobs)
        screen = app.screen
        assert isinstance(screen, DashboardScreen)
        table = screen.query_one(JobTable)
        await wait_until(pilot, lambda: job_id in table.order, "the job to appear in the dashboard table")
        seen: set[str] = set()

        def progressed() -> bool:
            text = cell(table, job_id, "progress")
            seen.add(text)
            return cell(table, job_id, "state") == "succeeded"

        await wait_until(pilot, progressed, "the job to succeed", timeout=30)
        assert cell(table, job_id, "progress") == "50/50 100%"
        partial = {t for t in seen if t.startswith(tuple(f"{n}/50 " for n in range(1, 50)))}
        assert partial, f"never saw a step between the first and the last: {sorted(seen)}"


async def test_cancel_asks_first_naming_job_and_owner_then_cancels(daemon: DaemonProc) -> None:
    c = daemon.client()
    job = c.call(Submit(kind="selftest", spec={"steps": 1, "rate": 10, "hold": True}, name="held job"),
                 JobDetail).job
    app = make_app(daemon.paths)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: connected(app) and app.link.state.jobs.get(job.id), "the held job")
        table = app.screen.query_one(JobTable)
        await wait_until(pilot, lambda: table.job_id == job.id, "the cursor on the job")
        await wait_until(pilot, lambda: app.link.state.jobs[job.id].state == "running", "the job to run")
        await pilot.press("c")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
        question = str(app.screen.query_one(".dialog-text").render())
        assert f"job {job.id}" in question and "held job" in question and f"owned by {job.owner}" in question
        await pilot.press("n")
        await wait_until(pilot, lambda: not isinstance(app.screen, ConfirmScreen), "the dialog to close")
        assert app.link.state.jobs[job.id].state == "running"  # "no" leaves it alone
        await pilot.press("c")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation again")
        await pilot.press("y")
        await wait_until(pilot, lambda: cell(table, job.id, "state") == "canceled", "the job to show canceled")


async def test_p_pauses_and_resumes_the_queue_and_the_top_bar_says_so(daemon: DaemonProc) -> None:
    app = make_app(daemon.paths)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: connected(app), "the snapshot")
        bar = app.screen.query_one(TopBar)
        await pilot.press("p")
        await wait_until(pilot, lambda: "PAUSED" in str(bar.render()), "the top bar to say PAUSED")
        assert app.link.state.mirror.queue_paused
        await pilot.press("p")
        await wait_until(pilot, lambda: "PAUSED" not in str(bar.render()), "PAUSED to go")


async def test_without_a_daemon_the_banner_says_where_it_looked_and_ftui_connects_once_it_starts() -> None:
    proc = DaemonProc()  # its home exists, nothing runs yet
    app = make_app(proc.paths)
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            banner = app.screen.query_one(Banner)
            await wait_until(pilot, lambda: app.link.state.connection.kind == "down", "ftui to notice")
            text = str(banner.render())
            assert str(proc.paths.ctl_socket) in text
            assert "systemctl start ftmllmd" in text and "ftmllmd" in text
            assert banner.display
            proc.start()
            await wait_until(pilot, lambda: connected(app), "ftui to connect by itself", timeout=20)
            await wait_until(pilot, lambda: not banner.display, "the banner to go")
    finally:
        proc.close()


async def test_daemon_restart_is_noticed_and_the_state_reloaded(daemon: DaemonProc) -> None:
    c = daemon.client()
    first = c.call(Submit(kind="selftest", spec={"steps": 2, "rate": 0}), JobDetail).job
    app = make_app(daemon.paths)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: connected(app) and first.id in app.link.state.jobs, "the first job")
        session = app.link.state.connection.session
        daemon.close(remove=False)
        await wait_until(pilot, lambda: app.link.state.connection.kind == "down", "ftui to see the daemon go",
                         timeout=20)
        daemon.start()
        later = daemon.client().call(Submit(kind="selftest", spec={"steps": 2, "rate": 0}), JobDetail).job
        await wait_until(pilot, lambda: connected(app) and app.link.state.mirror.session != session,
                         "the new session", timeout=20)
        await wait_until(pilot, lambda: later.id in app.screen.query_one(JobTable).order, "the job after restart")
        assert first.id in app.screen.query_one(JobTable).order
        assert app.link.state.connection.restarts_seen == 1


async def test_filter_on_jobs_screen_narrows_the_table(daemon: DaemonProc) -> None:
    c = daemon.client()
    a = c.call(Submit(kind="selftest", spec={"steps": 1, "rate": 0}, name="alpha run"), JobDetail).job
    b = c.call(Submit(kind="selftest", spec={"steps": 1, "rate": 0}, name="beta run"), JobDetail).job
    app = make_app(daemon.paths, start_mode="jobs")
    async with app.run_test(size=(100, 30)) as pilot:
        table = app.screen.query_one(JobTable)
        await wait_until(pilot, lambda: {a.id, b.id} <= set(table.order), "both jobs")
        await pilot.press("slash", *"beta")
        assert app.screen.query_one("#jobs-filter", Input).value == "beta"
        await wait_until(pilot, lambda: table.order == [b.id], "only the beta job")
        await pilot.press("escape")
        info = app.screen.query_one("#jobs-info-text")
        # the detail pane shows the job's history, fetched with ShowJob
        await wait_until(pilot, lambda: "queued by" in str(info.render()) and "succeeded" in str(info.render()),
                         "the history in the detail pane")
        await pilot.press("l")  # the log tab: this kind writes no log lines, and the pane says so
        log = app.screen.query_one("#jobs-log-view", Log)
        await wait_until(pilot, lambda: any("wrote no log lines" in ln for ln in log.lines), "the log pane")


async def test_try_shows_the_daemons_refusal_when_no_vision_engine_serves(daemon: DaemonProc) -> None:
    image = daemon.home / "page.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    app = make_app(daemon.paths, start_mode="try")
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_until(pilot, lambda: connected(app), "the snapshot")
        screen = app.screen
        screen.query_one("#try-file", Input).value = str(image)
        screen.query_one("#try-question", Input).focus()
        await pilot.press(*"what is on the page?", "enter")
        status = screen.query_one("#try-status")
        # this box runs the cpu engine: the daemon refuses with a reason, and the screen shows it
        await wait_until(pilot, lambda: "did not take the question" in str(status.render()), "the refusal")
        assert "unavailable" in str(status.render()) and "cpu engine" in str(status.render())
