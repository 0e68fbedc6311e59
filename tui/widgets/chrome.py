"""What every screen shows around its body: the top bar (screens, who you are, the queue) and the banner
that says when the daemon is not there, where ftui looked, and how to start it."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical

from tui.state import State
from tui.widgets.live_static import LiveStatic

SCREENS: tuple[tuple[str, str, str], ...] = (
    ("1", "dashboard", "Dash"),
    ("2", "jobs", "Jobs"),
    ("3", "training", "Train"),
    ("4", "ocr", "OCR"),
    ("5", "engine", "Engine"),
    ("6", "try", "Try"),
)


TITLES = {"dashboard": "Dashboard", "jobs": "Jobs", "training": "Training", "ocr": "OCR", "engine": "Engine",
          "try": "Try"}


class TopBar(LiveStatic):
    DEFAULT_CSS = """
    TopBar { height: 1; background: $panel; color: $text; }
    """

    _last: tuple[State, str] | None = None

    def on_resize(self) -> None:
        if self._last is not None:
            self.show(*self._last)

    def show(self, state: State, mode: str) -> None:
        self._last = (state, mode)
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(" ftmllm ", style="bold reverse")
        for key, name, label in SCREENS:
            t.append(" ")
            if name == mode:
                t.append(f"{key} {label}", style="bold reverse")
            else:
                t.append(key, style="bold")
                t.append(f" {label}", style="dim")
        c = state.connection
        right = Text(no_wrap=True)
        if c.kind == "connected":
            right.append("● ", style="green")
            right.append(c.user or "?")
            running = sum(1 for j in state.jobs.values() if j.state == "running")
            queued = sum(1 for j in state.jobs.values() if j.state == "queued")
            right.append(f"  {running} running {queued} queued", style="dim")
            if state.mirror.queue_paused:
                right.append(" PAUSED", style="bold yellow")
        elif c.kind == "connecting":
            right.append("◌ connecting", style="yellow")
        else:
            right.append("✖ no daemon", style="bold red")
        width = self.size.width or 80
        gap = width - t.cell_len - right.cell_len - 1
        if gap > 0:
            t.append(" " * gap)
            t.append_text(right)
            t.append(" ")
        self.show_content(t)


class Banner(LiveStatic):
    """Hidden while connected; otherwise the reason, where ftui looked, and how to start the daemon."""

    DEFAULT_CSS = """
    Banner { height: auto; max-height: 6; padding: 0 1; display: none; }
    Banner.-down { display: block; background: $error 30%; color: $text; }
    Banner.-connecting { display: block; background: $warning 20%; color: $text; }
    """

    def show(self, state: State) -> None:
        c = state.connection
        self.set_class(c.kind == "down", "-down")
        self.set_class(c.kind == "connecting", "-connecting")
        if c.kind != "connected":
            self.show_content(c.message)


class Chrome(Vertical):
    """The top bar and the banner, docked together (two widgets docked on one edge would overlap)."""

    DEFAULT_CSS = """
    Chrome { dock: top; height: auto; }
    """

    def compose(self) -> ComposeResult:
        yield TopBar()
        yield Banner()


class KeyBar(LiveStatic):
    """The keys of this screen and the app, in one line at the bottom.

    Textual's Footer rebuilds its widgets whenever focus or the screen changes (measured: most of the
    cost of switching screens during an event flood); this line is drawn once per screen."""

    DEFAULT_CSS = """
    KeyBar { dock: bottom; height: 1; background: $panel; color: $text-muted; text-wrap: nowrap;
             text-overflow: ellipsis; }
    """

    def show_keys(self, keys: list[tuple[str, str]]) -> None:
        t = Text(no_wrap=True, overflow="ellipsis")
        for key, what in keys:
            t.append(f" {key}", style="bold")
            t.append(f" {what} ")
        self.show_content(t)
