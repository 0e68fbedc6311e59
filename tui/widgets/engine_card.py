"""The serving engine in a few lines: what runs, why, how busy."""

from __future__ import annotations

from rich.text import Text

from shared.protocol import EngineInfo
from tui.format import bar
from tui.widgets.live_static import LiveStatic

ENGINE_STATE_STYLE = {"ready": "green", "starting": "yellow", "restarting": "yellow", "sleeping": "blue",
                      "stopped": "dim", "failed": "bold red"}


def engine_text(e: EngineInfo, width: int, compact: bool) -> Text:
    t = Text(overflow="ellipsis")
    t.append("Engine ", style="bold")
    t.append(f"{e.kind} ")
    t.append(e.state, style=ENGINE_STATE_STYLE.get(e.state, ""))
    if e.model:
        t.append(f"  {e.model}")
    if e.gpus:
        t.append(f"  GPUs {','.join(map(str, e.gpus))}", style="dim")
    t.append("\n")
    t.append(f"running {e.running}  waiting {e.waiting}  ")
    t.append("KV ")
    t.append(bar(e.kv_cache_pct / 100.0, 8), style="magenta")
    t.append(f" {e.kv_cache_pct:.0f}%  {e.tokens_per_s:.0f} tok/s  {e.pages_per_s:.2f} pages/s")
    adapters = ", ".join(e.adapters) if e.adapters else "none loaded"
    t.append(f"\nadapters: {adapters}", style="dim" if not e.adapters else "")
    if e.error:
        t.append(f"\n{e.error}", style="red")
    elif e.reason and not compact:
        t.append(f"\n{e.reason}", style="dim")
    elif e.reason:
        t.append(f"  · {e.reason}", style="dim")
    return t


class EngineCard(LiveStatic):
    DEFAULT_CSS = """
    EngineCard { height: auto; padding: 0 1; border-top: solid $panel-lighten-2; }
    """

    def show(self, engine: EngineInfo, compact: bool = True) -> None:
        self.show_content(engine_text(engine, self.size.width or 80, compact))
