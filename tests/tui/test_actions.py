"""Every action reachable by keyboard sends the request it should, driven through the real app.

The daemon side is the fixed source (tests/tui/fixed_data.py), which records each request: OCR, training
and engine parts are not needed to check what ftui asks for. The same flows against a real daemon are in
test_live_daemon.py."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from textual.pilot import Pilot
from textual.widgets import Input, Select, TextArea

from shared.protocol import Deploy, EngineCommand, Retry, Submit
from tests.tui.conftest import wait_until
from tests.tui.fixed_data import NOW, FixedSource, fixed_paths
from tui.app import FtuiApp
from tui.screens.modals import AdapterScreen, ConfirmScreen, FilePickerScreen, HelpScreen, TrainFormScreen

FIXTURES = Path(__file__).parent / "fixtures"


def app_and_source(**kw: Any) -> tuple[FtuiApp, FixedSource]:
    source = FixedSource(fixed_paths(Path("/run/ftmllm")))
    app = FtuiApp(lambda: source, clock=lambda: NOW, tick_s=0, templates_dir=FIXTURES / "templates",
                  file_root=FIXTURES, **kw)
    return app, source


async def loaded(pilot: Pilot[Any]) -> None:
    app = pilot.app
    assert isinstance(app, FtuiApp)
    await wait_until(pilot, lambda: app.link.state.loaded and app.link.idle and app.batches_handled, "the data")


def sent(source: FixedSource, kind: type) -> list[Any]:
    return [r for r in source.requests if isinstance(r, kind)]


async def test_n_picks_a_file_by_typed_path_and_submits_an_ocr_job_for_it() -> None:
    app, source = app_and_source()
    async with app.run_test(size=(100, 30)) as pilot:
        await loaded(pilot)
        await pilot.press("n")
        await wait_until(pilot, lambda: isinstance(app.screen, FilePickerScreen), "the file picker")
        field = app.screen.query_one("#picker-path", Input)
        field.focus()
        field.value = str(FIXTURES / "nope.pdf")
        await pilot.press("enter")
        assert "no such file" in str(app.screen.query_one("#picker-status").render())  # says what is wrong
        field.value = str(FIXTURES / "page.png")
        await pilot.press("enter")
        await wait_until(pilot, lambda: sent(source, Submit), "the submit")
        handed = hashlib.sha256((FIXTURES / "page.png").read_bytes()).hexdigest()
        assert sent(source, Submit) == [Submit(kind="ocr", spec={"spool": handed, "name": "page.png"})]


async def test_t_form_submits_template_dataset_gpus_and_overrides() -> None:
    app, source = app_and_source(start_mode="training")
    async with app.run_test(size=(100, 32)) as pilot:
        await loaded(pilot)
        await pilot.press("t")
        await wait_until(pilot, lambda: isinstance(app.screen, TrainFormScreen), "the form")
        form = app.screen
        await wait_until(pilot, lambda: form.query_one("#train-template", Select).value == "qwen2vl_lora_sft",
                         "the daemon's templates")
        form.query_one("#train-dataset", Input).value = "invoices"
        form.query_one("#train-gpus", Input).value = "2"
        form.query_one("#train-name", Input).value = "inv r32"
        form.query_one("#train-overrides", TextArea).text = "lora_rank=32\nlearning_rate=5e-5\nbad line"
        await pilot.press("ctrl+s")
        assert "line 3" in str(form.query_one("#train-status").render())  # names the bad line, keeps the form
        assert app.screen is form
        form.query_one("#train-overrides", TextArea).text = "lora_rank=32\nlearning_rate=5e-5"
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: sent(source, Submit), "the submit")
        assert sent(source, Submit) == [Submit(kind="train", name="inv r32", spec={
            "template": "qwen2vl_lora_sft", "dataset": "invoices", "gpus": 2,
            "set": {"lora_rank": 32, "learning_rate": 5e-5}})]


async def test_engine_keys_send_sleep_wake_and_load_adapter() -> None:
    app, source = app_and_source(start_mode="engine")
    async with app.run_test(size=(100, 30)) as pilot:
        await loaded(pilot)
        await pilot.press("s", "w")
        await wait_until(pilot, lambda: len(sent(source, EngineCommand)) == 2, "two engine commands")
        await pilot.press("a")
        await wait_until(pilot, lambda: isinstance(app.screen, AdapterScreen), "the adapter dialog")
        await pilot.press(*"invoices-v4", "enter", *"/srv/adapters/inv4", "enter")
        await wait_until(pilot, lambda: len(sent(source, EngineCommand)) == 3, "the load")
        await pilot.press("u")  # the highlighted adapter
        await wait_until(pilot, lambda: len(sent(source, EngineCommand)) == 4, "the unload")
        assert sent(source, EngineCommand) == [
            EngineCommand(action="sleep"), EngineCommand(action="wake"),
            EngineCommand(action="load", name="invoices-v4", path="/srv/adapters/inv4"),
            EngineCommand(action="unload", name="invoices-v3")]


async def test_retry_sends_retry_for_the_job_under_the_cursor() -> None:
    app, source = app_and_source(start_mode="jobs")
    async with app.run_test(size=(100, 30)) as pilot:
        await loaded(pilot)
        await pilot.press("down", "down", "down")  # job 43, the failed OCR job
        await pilot.press("r")
        await wait_until(pilot, lambda: sent(source, Retry), "the retry")
        assert sent(source, Retry) == [Retry(job_id=43)]


async def test_d_on_a_finished_run_asks_then_deploys_it() -> None:
    app, source = app_and_source(start_mode="training")
    async with app.run_test(size=(100, 30)) as pilot:
        await loaded(pilot)
        await pilot.press("down")  # job 38, succeeded
        await pilot.press("d")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), "the confirmation")
        assert "job 38" in str(app.screen.query_one(".dialog-text").render())
        await pilot.press("y")
        await wait_until(pilot, lambda: sent(source, Deploy), "the deploy")
        assert sent(source, Deploy) == [Deploy(job_id=38)]


async def test_question_mark_opens_help_naming_this_screens_keys_and_escape_closes_it() -> None:
    app, _ = app_and_source(start_mode="ocr")
    async with app.run_test(size=(100, 30)) as pilot:
        await loaded(pilot)
        await pilot.press("question_mark")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen), "help")
        assert "## This screen (ocr)" in app.screen._text and "Follow live" in app.screen._text
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, HelpScreen), "help to close")


async def test_number_keys_switch_screens_and_escape_leaves_a_text_field() -> None:
    app, _ = app_and_source(start_mode="try")
    async with app.run_test(size=(100, 30)) as pilot:
        await loaded(pilot)
        await pilot.press("2")  # typed into the file field: it has the focus
        assert app.current_mode == "try"
        await pilot.press("escape", "2")
        assert app.current_mode == "jobs"
        for key, mode in zip("134561", ("dashboard", "training", "ocr", "engine", "try", "dashboard"),
                             strict=True):
            if app.current_mode == "try":
                await pilot.press("escape")
            await pilot.press(key)
            assert app.current_mode == mode
