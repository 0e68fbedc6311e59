"""The command palette (ctrl+p): every action of ftui by name, and each job by number."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, cast

from textual.command import DiscoveryHit, Hit, Hits, Provider

from shared.protocol import TERMINAL_STATES
from tui.screens.engine import EngineScreen
from tui.widgets.chrome import SCREENS, TITLES

if TYPE_CHECKING:
    from tui.app import FtuiApp

Command = tuple[str, str, Callable[[], object]]


class FtCommands(Provider):
    def commands(self) -> list[Command]:
        app = cast("FtuiApp", self.app)
        st = app.state
        cmds: list[Command] = []
        for key, mode, _label in SCREENS:
            cmds.append((f"Go to {TITLES[mode]}", f"screen {key}", partial(app.switch_mode, mode)))
        cmds += [
            ("Submit OCR of a file…", "pick a PDF or image (n)", app.action_submit_ocr),
            ("Submit training run…", "from a template with overrides (t)", app.action_submit_train),
            ("Submit selftest job", "50 progress steps, no GPU: checks the daemon end to end",
             app.action_submit_selftest),
            ("Pause the queue", "running jobs go on; queued ones wait", app.action_pause_queue),
            ("Resume the queue", "start queued jobs again", app.action_resume_queue),
            ("Engine: sleep", "free GPU memory, keep the engine", partial(app.action_engine, "sleep")),
            ("Engine: wake", "wake a sleeping engine", partial(app.action_engine, "wake")),
            ("Engine: start", "start the serving engine", partial(app.action_engine, "start")),
            ("Engine: stop", "stop the serving engine", partial(app.action_engine, "stop")),
            ("Engine: load adapter…", "load a LoRA adapter", self._load_adapter),
            ("Help", "all keys (?)", app.action_help),
        ]
        for name in st.engine.adapters:
            cmds.append((f"Engine: unload adapter {name}", "", partial(app.action_engine, "unload", name)))
        for job in st.jobs_by_recency()[:200]:
            label = f"job {job.id} {job.kind} {job.state} — {job.name} ({job.owner})"
            cmds.append((f"Show {label}", "open on the Jobs screen", partial(app.action_show_job, job.id)))
            if job.state not in TERMINAL_STATES:
                cmds.append((f"Cancel {label}", "asks first", partial(app.action_cancel_job, job.id)))
            if job.kind in ("train", "export") and job.state == "succeeded":
                cmds.append((f"Deploy {label}", "serve its adapter/model", partial(app.action_deploy_job, job.id)))
            if job.state in ("failed", "canceled", "interrupted"):
                cmds.append((f"Retry {label}", "queue it again", partial(app.action_retry_job, job.id)))
        return cmds

    def _load_adapter(self) -> None:
        app = cast("FtuiApp", self.app)

        async def go() -> None:
            await app.switch_mode("engine")
            screen = app.screen
            if isinstance(screen, EngineScreen):
                screen.action_load_adapter()

        app.call_later(go)

    async def discover(self) -> Hits:
        for name, help_text, cb in self.commands():
            if not name.startswith(("Show job", "Cancel job", "Retry job", "Deploy job")):
                yield DiscoveryHit(name, cb, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, help_text, cb in self.commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), cb, help=help_text)
