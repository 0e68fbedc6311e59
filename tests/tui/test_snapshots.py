"""SVG snapshots of every ftui screen at 80×24 and 160×48, drawn from fixed data (tests/tui/fixed_data.py)
with a frozen clock, UTC and no cursor blink, so they only change when the UI does.

Regenerate after a deliberate UI change: ``pytest tests/tui/test_snapshots.py --snapshot-update``, then
look at the report or the SVGs under tests/tui/__snapshots__/ before committing them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Input, SelectionList, TextArea
from textual.worker import WorkerState

from shared.client import unavailable_message
from tests.tui.conftest import wait_until
from tests.tui.fixed_data import NOW, FixedSource, fixed_paths
from tui.app import FtuiApp
from tui.screens.base import FtScreen

FIXTURES = Path(__file__).parent / "fixtures"
PATHS = fixed_paths(Path("/run/ftmllm"))
SIZES = [(80, 24), (160, 48)]
SnapCompare = Callable[..., bool]


def fixed_app(down: bool = False, **kw: Any) -> FtuiApp:
    message = unavailable_message(PATHS, "not running") if down else ""
    return FtuiApp(lambda: FixedSource(PATHS, down=message), clock=lambda: NOW, tick_s=0,
                   templates_dir=FIXTURES / "templates", file_root=FIXTURES, **kw)


async def settle(pilot: Pilot[Any]) -> None:
    """Wait until the data is drawn: snapshot loaded, nothing pending in the link, no request or screen
    still loading; then stop cursors blinking."""
    app = pilot.app
    assert isinstance(app, FtuiApp)

    def quiet() -> bool:
        busy = [w for w in app.workers if w.group == "requests" and w.state in
                (WorkerState.PENDING, WorkerState.RUNNING)]
        screens = [s for s in app.screen_stack if isinstance(s, FtScreen) and s.settling]
        return app.link.idle and app.batches_handled > 0 and not busy and not screens

    await wait_until(pilot, quiet, "the fixed data to be drawn")
    for w in app.query(Input):
        w.cursor_blink = False
    for ta in app.query(TextArea):
        ta.cursor_blink = False
    await pilot.pause()


def run(*keys: str, then: Callable[[Pilot[Any]], Awaitable[None]] | None = None
        ) -> Callable[[Pilot[Any]], Awaitable[None]]:
    async def before(pilot: Pilot[Any]) -> None:
        await settle(pilot)
        if keys:
            await pilot.press(*keys)
            await settle(pilot)
        if then is not None:
            await then(pilot)
            await settle(pilot)

    return before


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dashboard_shows_gpus_with_owners_jobs_and_engine(snap_compare: SnapCompare, utc: None,
                                                          size: tuple[int, int]) -> None:
    assert snap_compare(fixed_app(), terminal_size=size, run_before=run())


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_jobs_screen_shows_table_and_the_selected_jobs_detail(snap_compare: SnapCompare, utc: None,
                                                              size: tuple[int, int]) -> None:
    # the failed OCR job: its error line and history are in the detail pane
    assert snap_compare(fixed_app(start_mode="jobs"), terminal_size=size, run_before=run("down", "down", "down"))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_jobs_screen_log_tab(snap_compare: SnapCompare, utc: None, size: tuple[int, int]) -> None:
    assert snap_compare(fixed_app(start_mode="jobs"), terminal_size=size, run_before=run("l"))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_training_overlays_two_runs_with_ema_and_eval(snap_compare: SnapCompare, utc: None,
                                                      size: tuple[int, int]) -> None:
    async def both(pilot: Pilot[Any]) -> None:
        runs = pilot.app.screen.query_one(SelectionList)
        runs.select(38)  # overlay the finished run on the running one

    assert snap_compare(fixed_app(start_mode="training"), terminal_size=size, run_before=run(then=both))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_training_x_by_time(snap_compare: SnapCompare, utc: None, size: tuple[int, int]) -> None:
    assert snap_compare(fixed_app(start_mode="training"), terminal_size=size, run_before=run("x", "plus"))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_ocr_shows_pages_and_the_live_page_as_markdown(snap_compare: SnapCompare, utc: None,
                                                       size: tuple[int, int]) -> None:
    assert snap_compare(fixed_app(start_mode="ocr"), terminal_size=size, run_before=run())


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_ocr_opens_a_finished_page(snap_compare: SnapCompare, utc: None, size: tuple[int, int]) -> None:
    # tab to the pages, down to page 3 (a table), Enter opens its stored text
    assert snap_compare(fixed_app(start_mode="ocr"), terminal_size=size,
                        run_before=run("tab", "down", "down", "enter"))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_engine_shows_model_adapters_and_throughput_history(snap_compare: SnapCompare, utc: None,
                                                            size: tuple[int, int]) -> None:
    assert snap_compare(fixed_app(start_mode="engine"), terminal_size=size, run_before=run())


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_try_streams_the_answer(snap_compare: SnapCompare, utc: None, size: tuple[int, int]) -> None:
    async def ask(pilot: Pilot[Any]) -> None:
        screen = pilot.app.screen
        screen.query_one("#try-file", Input).value = str(FIXTURES / "templates" / ".." / "page.png")
        screen.query_one("#try-question", Input).focus()
        await pilot.press(*"What does the table say?", "enter")
        await wait_until(pilot, lambda: "answered" in str(screen.query_one("#try-status").render()),
                         "the whole answer")
        screen.query_one("#try-file", Input).value = "page.png"  # an absolute path would differ per checkout

    assert snap_compare(fixed_app(start_mode="try"), terminal_size=size, run_before=run(then=ask))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_banner_says_where_ftui_looked_and_how_to_start_the_daemon(snap_compare: SnapCompare, utc: None,
                                                                    size: tuple[int, int]) -> None:
    async def down(pilot: Pilot[Any]) -> None:
        app = pilot.app
        assert isinstance(app, FtuiApp)
        await wait_until(pilot, lambda: app.link.state.connection.kind == "down" and app.link.idle, "the banner")

    assert snap_compare(fixed_app(down=True), terminal_size=size, run_before=down)


def test_cancel_confirmation_names_job_and_owner(snap_compare: SnapCompare, utc: None) -> None:
    assert snap_compare(fixed_app(), run_before=run("down", "c"))


def test_help_lists_screens_and_keys(snap_compare: SnapCompare, utc: None) -> None:
    assert snap_compare(fixed_app(start_mode="jobs"), terminal_size=(100, 40), run_before=run("question_mark"))


def test_training_form(snap_compare: SnapCompare, utc: None) -> None:
    assert snap_compare(fixed_app(start_mode="training"), terminal_size=(100, 32), run_before=run("t"))
