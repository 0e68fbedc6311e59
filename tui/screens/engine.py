"""Engine: the serving engine (model, why it serves, adapters, running/waiting, KV cache) and its tokens/s
history; sleep, wake, start, stop, load and unload adapters from the keyboard."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from rich.text import Text
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widget import Widget
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from shared.protocol import EngineCommand
from tui.format import duration
from tui.screens.base import FtScreen
from tui.screens.modals import AdapterScreen, ConfirmScreen
from tui.state import Changes
from tui.widgets.chart import LineChart, Series
from tui.widgets.engine_card import EngineCard


class EngineScreen(FtScreen):
    MODE = "engine"
    HELP = ("The serving engine: its kind and state and why it was chosen, the model, LoRA adapters loaded, "
            "requests running and waiting, KV-cache use, and tokens/s over time. s puts it to sleep (frees GPU "
            "memory), w wakes it, a loads an adapter, u unloads the highlighted one, S starts it, X stops it.")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("s", "app.engine('sleep')", "Sleep"),
        Binding("w", "app.engine('wake')", "Wake"),
        Binding("a", "load_adapter", "Load adapter"),
        Binding("u", "unload_adapter", "Unload"),
        Binding("S", "app.engine('start')", "Start", show=False),
        Binding("X", "stop_engine", "Stop", show=False),
        Binding("R", "app.engine('status')", "Refresh", show=False),
    ]

    def compose_body(self) -> Iterable[Widget]:
        yield EngineCard(id="engine-card")
        with Horizontal(id="engine-body"):
            with Vertical(id="engine-adapters-box"):
                yield Static("Adapters", classes="section-title")
                yield OptionList(id="engine-adapters")
            with Vertical(id="engine-charts"):
                yield Static(id="engine-tps-title", classes="section-title")
                yield LineChart(id="engine-tps", empty="no throughput samples yet")
                yield Static(id="engine-queue-title", classes="section-title")
                yield LineChart(id="engine-queue", empty="no samples yet")

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()

    def focus_target(self) -> Widget:
        return self.query_one(OptionList)

    async def refresh_all(self) -> None:
        self._card()
        self._adapters()
        self._charts()

    async def on_changes(self, changes: Changes) -> None:
        if changes.engine:
            await self.refresh_all()

    def _card(self) -> None:
        self.query_one(EngineCard).show(self.st.engine, compact=False)

    def _adapters(self) -> None:
        ol = self.query_one(OptionList)
        names = list(self.st.engine.adapters)
        current = [str(ol.get_option_at_index(i).id) for i in range(ol.option_count)]
        if current == names:
            return
        keep = ol.highlighted
        ol.clear_options()
        if names:
            ol.add_options([Option(n, id=n) for n in names])
            ol.highlighted = min(keep or 0, len(names) - 1)
        else:
            ol.add_option(Option(Text("none loaded: press a to load one", style="dim"), id="", disabled=True))

    def _charts(self) -> None:
        hist = sorted(self.st.engine_history, key=lambda s: s.ts)
        now = hist[-1].ts if hist else self.now()
        tps = [(s.ts - now, s.tokens_per_s) for s in hist]
        running = [(s.ts - now, float(s.running)) for s in hist]
        waiting = [(s.ts - now, float(s.waiting)) for s in hist]
        e = self.st.engine
        self.query_one("#engine-tps-title", Static).update(Text.assemble(
            ("tokens/s ", "bold"), (f"now {e.tokens_per_s:.0f} · peak {max((v for _, v in tps), default=0):.0f}",
                                    "dim")))
        self.query_one("#engine-queue-title", Static).update(Text.assemble(
            ("requests ", "bold"), ("━ running ", "green"), ("━ waiting", "yellow"),
            (f"  KV cache {e.kv_cache_pct:.0f}%", "magenta")))

        def ago_fmt(v: float) -> str:
            return "now" if abs(v) < 0.5 else f"-{duration(-v)}"

        self.query_one("#engine-tps", LineChart).set_series([Series(tps, "cyan")], x_fmt=ago_fmt, y_floor=0.0)
        self.query_one("#engine-queue", LineChart).set_series(
            [Series(running, "green"), Series(waiting, "yellow")], x_fmt=ago_fmt, y_floor=0.0)

    def action_load_adapter(self) -> None:
        def chosen(result: tuple[str, str] | None) -> None:
            if result is not None:
                self.host.send(EngineCommand(action="load", name=result[0], path=result[1]))

        self.app.push_screen(AdapterScreen(), chosen)

    def action_unload_adapter(self) -> None:
        ol = self.query_one(OptionList)
        if ol.highlighted is None or not self.st.engine.adapters:
            self.notify("no adapter highlighted: load one with a first", severity="warning")
            return
        name = str(ol.get_option_at_index(ol.highlighted).id)
        self.host.send(EngineCommand(action="unload", name=name))

    def action_stop_engine(self) -> None:
        e = self.st.engine
        busy = f" {e.running} requests running and {e.waiting} waiting will fail." if e.running or e.waiting else ""

        def answered(yes: bool | None) -> None:
            if yes:
                self.host.send(EngineCommand(action="stop"))

        self.app.push_screen(ConfirmScreen(f"Stop the {e.kind} engine ({e.model or 'no model'})?{busy}",
                                           yes="Stop it", no="Keep it"), answered)
