"""A Static that ignores updates which would not change what it shows.

``Static.update`` always asks for a new layout of the screen; during an event flood the same text is
set many times a second (counts that did not change), and each of those layouts costs milliseconds."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static


class LiveStatic(Static):
    _shown: object = None

    def show_content(self, content: Text | str) -> None:
        if content == self._shown:
            return
        self._shown = content
        self.update(content)
