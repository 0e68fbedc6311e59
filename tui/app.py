"""``ftui``: the terminal UI of ftmllmd — everything the daemon knows, live, at 80×24 over SSH.

One worker (:class:`~tui.link.Link`) owns the daemon client; screens read the :class:`~tui.state.State`
when told what changed, and reach the daemon only through the app as their :class:`~tui.host.Host`
(:meth:`FtuiApp.send`, whose answer comes back to them as a Message, and ``want_pages``/``want_train``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from textual import on, work
from textual.app import App
from textual.binding import Binding, BindingType
from textual.message_pump import MessagePump
from textual.screen import Screen
from textual.worker import Worker, WorkerState

from shared.client import AsyncClient, DaemonUnavailable, RemoteError
from shared.config import ConfigError, load_settings
from shared.handover import Handed, HandoverRefused, HandoverUnavailable
from shared.protocol import (
    TERMINAL_STATES,
    Cancel,
    Deploy,
    Done,
    EngineCommand,
    EngineReply,
    JobDetail,
    JobInfo,
    PauseQueue,
    ReplyBody,
    RequestBody,
    ResumeQueue,
    Retry,
    Submit,
)
from tui.commands import FtCommands
from tui.link import Link, Source
from tui.messages import Replied, RequestFailed, StateChanged
from tui.screens.base import FtScreen
from tui.screens.dashboard import DashboardScreen
from tui.screens.engine import EngineScreen
from tui.screens.jobs import JobsScreen
from tui.screens.modals import ConfirmScreen, FilePickerScreen, HelpScreen, TrainFormScreen
from tui.screens.ocr import OcrScreen
from tui.screens.training import TrainingScreen
from tui.screens.try_ask import TryScreen
from tui.state import State

OCR_SUFFIXES = (".pdf", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")
TICK_S = 2.0


def default_templates_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "configs" / "llamafactory"


class FtuiApp(App[None]):
    TITLE = "ftmllm"
    CSS_PATH = "app.tcss"
    MODES: ClassVar[dict[str, str | Callable[[], Screen[Any]]]] = {
        "dashboard": DashboardScreen,
        "jobs": JobsScreen,
        "training": TrainingScreen,
        "ocr": OcrScreen,
        "engine": EngineScreen,
        "try": TryScreen,
    }
    COMMANDS = App.COMMANDS | {FtCommands}
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("1", "switch_mode('dashboard')", "Dashboard", show=False),
        Binding("2", "switch_mode('jobs')", "Jobs", show=False),
        Binding("3", "switch_mode('training')", "Training", show=False),
        Binding("4", "switch_mode('ocr')", "OCR", show=False),
        Binding("5", "switch_mode('engine')", "Engine", show=False),
        Binding("6", "switch_mode('try')", "Try", show=False),
        Binding("question_mark", "help", "Help"),
        Binding("n", "submit_ocr", "OCR", tooltip="convert a PDF or image to Markdown (file picker)"),
        Binding("t", "submit_train", "Train", tooltip="submit a training run from a template (a form)"),
        Binding("c", "cancel_job", "Cancel", tooltip="cancel the job under the cursor (asks first)"),
        Binding("r", "retry_job", "Retry", tooltip="queue the failed or canceled job under the cursor again"),
        Binding("p", "toggle_queue", "Queue", tooltip="pause or resume the queue"),
        Binding("q", "quit", "Quit", tooltip="leave ftui (the daemon and its jobs go on)"),
    ]

    def __init__(self, source_factory: Callable[[], Source], *, clock: Callable[[], float] = time.time,
                 templates_dir: Path | None = None, start_mode: str = "dashboard", flush_s: float = 0.05,
                 file_root: Path | None = None, tick_s: float = TICK_S) -> None:
        super().__init__()
        self.clock = clock
        self.templates_dir = templates_dir or default_templates_dir()
        self.start_mode = start_mode
        self.flush_s = flush_s
        self.file_root = file_root or Path.cwd()
        self.tick_s = tick_s
        self.source = source_factory()
        self.link = Link(self.source, self.post_message, clock=clock, flush_s=flush_s)
        self.batches_handled = 0
        self._restarts_seen = 0

    # --------------------------------------------------------------------------------- lifecycle

    def on_mount(self) -> None:
        self.theme = "textual-dark"
        self.switch_mode(self.start_mode)
        self._follow_daemon()
        if self.tick_s > 0:
            self.set_interval(self.tick_s, self._tick)

    @work(group="daemon", exclusive=True, exit_on_error=False, name="daemon")
    async def _follow_daemon(self) -> None:
        await self.link.run()

    @on(Worker.StateChanged)
    def _worker_changed(self, event: Worker.StateChanged) -> None:
        # one place turns any worker's failure into something the user sees (harlequin's pattern)
        if event.state != WorkerState.ERROR:
            return
        err = event.worker.error
        self.notify(f"ftui bug in {event.worker.name}: {type(err).__name__}: {err}. It keeps running; "
                    "please report this message", severity="error", timeout=10)
        if event.worker.name == "daemon":
            self.set_timer(1.0, self._follow_daemon)

    async def on_unmount(self) -> None:
        await self.link.close()
        self.source.close()

    async def on_state_changed(self, message: StateChanged) -> None:
        try:
            ch = message.changes
            conn = self.link.state.connection
            if ch.reloaded and conn.restarts_seen != self._restarts_seen:
                self._restarts_seen = conn.restarts_seen
                self.notify("ftmllmd restarted; ftui reloaded its state", timeout=5)
            for screen in list(self.screen_stack):
                if isinstance(screen, FtScreen):
                    await screen.apply(ch)
            self.batches_handled += 1
        finally:
            # the next batch waits until this one is on the screen: a slow terminal or a busy CPU gets
            # fewer, bigger batches instead of a growing queue
            self.call_after_refresh(self.link.ack)

    def _tick(self) -> None:
        for screen in self.screen_stack:
            if isinstance(screen, FtScreen) and screen.is_mounted:
                screen.tick()

    # ------------------------------------------------------------------- what screens ask (tui.host.Host)

    @property
    def state(self) -> State:
        return self.link.state

    def want_pages(self, job_id: int) -> None:
        self.link.want_pages(job_id)

    def want_train(self, job_id: int) -> None:
        self.link.want_train(job_id)

    def send(self, body: RequestBody, *, reply_to: MessagePump | None = None, tag: str = "",
             announce: bool = True) -> None:
        """Ask the daemon; the answer comes back to ``reply_to`` as Replied / RequestFailed, and (with
        ``announce``) as a notification saying what happened."""
        self.run_worker(self._send(body, reply_to, tag, announce), group="requests", exit_on_error=False)

    async def _send(self, body: RequestBody, reply_to: MessagePump | None, tag: str, announce: bool) -> None:
        try:
            reply: ReplyBody = await self.link.request(body)
        except RemoteError as exc:
            if announce:
                self.notify(exc.message, severity="error", timeout=8)
            if reply_to is not None:
                reply_to.post_message(RequestFailed(tag, exc.code, exc.message))
            return
        except DaemonUnavailable as exc:
            if announce:
                self.notify(str(exc), severity="error", timeout=8)
            if reply_to is not None:
                reply_to.post_message(RequestFailed(tag, "unavailable", str(exc)))
            return
        if announce:
            text = announcement(reply)
            if text:
                self.notify(text, timeout=4)
        if reply_to is not None:
            reply_to.post_message(Replied(tag, reply))

    # ----------------------------------------------------------------------------------- actions

    def current_job(self) -> JobInfo | None:
        """The job under the cursor of the topmost ftui screen (below any dialog)."""
        for s in reversed(self.screen_stack):
            if isinstance(s, FtScreen):
                return s.selected_job()
        return None

    def action_help(self) -> None:
        screens = [s for s in reversed(self.screen_stack) if isinstance(s, FtScreen)]
        self.push_screen(HelpScreen(self, screens[0] if screens else None))

    def action_submit_ocr(self) -> None:
        def chosen(path: Path | None) -> None:
            if path is not None:
                self.submit_ocr(path)

        self.push_screen(FilePickerScreen(self.file_root, OCR_SUFFIXES,
                                          title="Convert a PDF (or image) to Markdown"), chosen)

    def submit_ocr(self, path: Path) -> None:
        self.run_worker(self._submit_ocr(path.expanduser().absolute()), group="requests", exit_on_error=False)

    async def _submit_ocr(self, path: Path) -> None:
        # opened here with the user's own rights and handed over: the daemon reads no path a client names
        try:
            handed = await self.hand_over(path)
        except (HandoverRefused, HandoverUnavailable) as exc:
            self.notify(str(exc), severity="error", timeout=8)
            return
        self.send(Submit(kind="ocr", spec={"spool": handed.sha256, "name": handed.name}))

    async def hand_over(self, path: Path) -> Handed:
        return await self.link.hand_over(path)

    def action_submit_train(self) -> None:
        def chosen(body: Submit | None) -> None:
            if body is not None:
                self.send(body)

        self.push_screen(TrainFormScreen(self, self.templates_dir, self.file_root), chosen)

    def action_submit_selftest(self) -> None:
        """A job that only reports progress: shows the daemon, the queue and ftui working end to end."""
        self.send(Submit(kind="selftest", spec={"steps": 50, "rate": 25}))

    def action_cancel_job(self, job_id: int | None = None) -> None:
        job = self.state.job(job_id) if job_id is not None else self.current_job()
        if job is None:
            self.notify("no job selected: move the cursor onto a job (Jobs screen: 2) first", severity="warning")
            return
        if job.state in TERMINAL_STATES:
            self.notify(f"job {job.id} already {job.state}; nothing to cancel", severity="warning")
            return
        where = f" on GPUs {','.join(map(str, job.gpus))}" if job.gpus else ""
        question = (f"Cancel job {job.id} “{job.name}” ({job.kind}, {job.state}{where}), owned by {job.owner}?\n"
                    f"It stops now; `r` (retry) queues it again later.")

        def answered(yes: bool | None) -> None:
            if yes:
                self.send(Cancel(job_id=job.id))

        self.push_screen(ConfirmScreen(question, yes="Cancel the job", no="Keep it running"), answered)

    def action_retry_job(self, job_id: int | None = None) -> None:
        job = self.state.job(job_id) if job_id is not None else self.current_job()
        if job is None:
            self.notify("no job selected: move the cursor onto a job (Jobs screen: 2) first", severity="warning")
            return
        self.send(Retry(job_id=job.id))

    def action_deploy_job(self, job_id: int | None = None) -> None:
        """Serve a finished training run's adapter in the engine (asks first: the engine may restart)."""
        job = self.state.job(job_id) if job_id is not None else self.current_job()
        if job is None or job.kind not in ("train", "export") or job.state != "succeeded":
            self.notify("pick a succeeded train or export job first (Training screen: 3)", severity="warning")
            return
        what = ("its LoRA adapter goes live in the engine" if job.kind == "train" else
                "its merged model becomes the engine's model; the engine restarts")

        def answered(yes: bool | None) -> None:
            if yes:
                self.send(Deploy(job_id=job.id))

        self.push_screen(ConfirmScreen(f"Deploy job {job.id} “{job.name}” ({job.owner})?\n{what}.",
                                       yes="Deploy", no="Not now"), answered)

    def action_toggle_queue(self) -> None:
        self.send(ResumeQueue() if self.state.mirror.queue_paused else PauseQueue())

    def action_pause_queue(self) -> None:
        self.send(PauseQueue())

    def action_resume_queue(self) -> None:
        self.send(ResumeQueue())

    def action_engine(self, action: str, name: str = "", path: str = "") -> None:
        self.send(EngineCommand(action=action, name=name, path=path))  # type: ignore[arg-type]

    async def action_show_job(self, job_id: int) -> None:
        """Open the Jobs screen on one job (Enter on the dashboard, the command palette)."""
        await self.switch_mode("jobs")
        screen = self.screen
        if isinstance(screen, JobsScreen):
            screen.select_job(job_id)


def announcement(reply: ReplyBody) -> str:
    """The one line to show after a request succeeded (the daemon's own words where it sent some)."""
    if isinstance(reply, Done):
        return reply.message
    if isinstance(reply, EngineReply):
        return reply.message or f"engine {reply.engine.state}"
    if isinstance(reply, JobDetail):
        j = reply.job
        return f"job {j.id} {j.state} ({j.name}); watch it on the Jobs screen (2)"
    return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ftui",
        description="The terminal UI of ftmllmd: GPUs, jobs, training curves, OCR pages, the engine, live.",
        epilog="The daemon is found like ftctl finds it: --config/$FTMLLM_CONFIG, --home/$FTMLLM_HOME, "
        "else $XDG_RUNTIME_DIR/ftmllm (or /run/user/UID/ftmllm). Press ? inside for the keys.",
    )
    p.add_argument("--config", help="the daemon's TOML config (to find its sockets)")
    p.add_argument("--home", help="the daemon's --home dir (what `make run` uses: ./.ftmllm)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer (default 10)")
    p.add_argument("--screen", default="dashboard", choices=list(FtuiApp.MODES), help="screen to start on")
    args = p.parse_args(argv)
    try:
        settings = load_settings(args.config, args.home)
    except ConfigError as exc:
        print(f"ftui: {exc}", file=sys.stderr)
        return 2
    tdir = settings.config.train.templates_dir
    app = FtuiApp(lambda: AsyncClient(settings.paths, name="ftui", timeout=args.timeout),
                  templates_dir=Path(tdir).expanduser() if tdir else None, start_mode=args.screen)
    app.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
