"""What every ftui screen shares: the top bar and banner around its body, the footer, and the two ways it
learns about the daemon (``refresh_all`` on show or reload, ``on_changes`` for a coalesced batch)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widget import Widget

from shared.protocol import JobInfo
from tui.host import Host, host_of
from tui.state import Changes, State
from tui.widgets.chrome import Banner, Chrome, KeyBar, TopBar

KEY_LABELS = {"question_mark": "?", "slash": "/", "plus": "+", "equals_sign": "=", "minus": "-",
              "escape": "esc", "enter": "⏎"}


def key_label(keys: str) -> str:
    """How a binding's key is written for people ("ctrl+o" → "^o", "question_mark" → "?")."""
    first = keys.split(",")[0]
    if first.startswith("ctrl+"):
        return "^" + first[5:]
    return KEY_LABELS.get(first, first)


class FtScreen(Screen[None]):
    MODE: ClassVar[str] = ""
    HELP: ClassVar[str] = ""  # one paragraph for the help screen: what this screen shows
    BINDINGS: ClassVar[list[Binding | tuple[str, str] | tuple[str, str, str]]] = [
        Binding("escape", "leave_input", "Back", show=False),
    ]

    @property
    def host(self) -> Host:
        return host_of(self)

    @property
    def st(self) -> State:
        return self.host.state

    def now(self) -> float:
        return self.host.clock()

    def compose(self) -> ComposeResult:
        yield Chrome()
        yield from self.compose_body()
        yield KeyBar()

    def compose_body(self) -> Iterable[Widget]:
        return ()

    # ------------------------------------------------------------------------------- updates

    async def apply(self, changes: Changes) -> None:
        if not self.is_mounted:
            return
        if changes.connection or changes.reloaded or changes.queue or changes.jobs:
            self.refresh_chrome()
        if changes.reloaded:
            await self.refresh_all()
        else:
            await self.on_changes(changes)

    def refresh_chrome(self) -> None:
        for bar in self.query(TopBar):
            bar.show(self.st, self.MODE)
        for banner in self.query(Banner):
            banner.show(self.st)
        for keys in self.query(KeyBar):
            keys.show_keys(self.key_hints())

    def key_hints(self) -> list[tuple[str, str]]:
        """This screen's keys first, then the app's (those marked to show)."""
        hints: list[tuple[str, str]] = []
        for b in [*type(self).BINDINGS, *type(self.app).BINDINGS]:
            if isinstance(b, Binding) and b.show and b.description:
                hints.append((key_label(b.key), b.description))
        hints.append(("^p", "commands"))
        return hints

    async def refresh_all(self) -> None:
        """Draw everything from the state (on show, and after a snapshot)."""

    async def on_changes(self, changes: Changes) -> None:
        """Draw what a batch of events changed; the default redraws everything."""
        await self.refresh_all()

    def tick(self) -> None:
        """Every few seconds: redraw what depends on the clock ("3m ago")."""

    async def on_screen_resume(self) -> None:
        self.refresh_chrome()
        await self.refresh_all()

    def on_resize(self) -> None:
        self.refresh_chrome()

    @property
    def settling(self) -> bool:
        """Whether this screen still waits for an answer or a redraw it asked for."""
        return False

    # -------------------------------------------------------------------------------- actions

    def selected_job(self) -> JobInfo | None:
        """The job the app's cancel and retry act on."""
        return None

    def action_leave_input(self) -> None:
        """Escape: leave a text field so single-key shortcuts work again."""
        target = self.focus_target()
        if target is not None:
            target.focus()
        else:
            self.set_focus(None)

    def focus_target(self) -> Widget | None:
        return None
