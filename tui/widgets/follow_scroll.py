"""A scroll area that follows its end while the reader is at the end, like ``tail -f``.

Textual's ``anchor()`` does this too, but in Textual 8 it also pins short content to the bottom of the
area (negative scroll); a page of Markdown should start at the top."""

from __future__ import annotations

from textual.containers import VerticalScroll
from textual.geometry import Size


class FollowScroll(VerticalScroll):
    _content_height = 0

    def _scroll_update(self, virtual_size: Size) -> None:
        # Textual calls this whenever the content's size changes (a container gets no Resize event for
        # that); the test test_follow_scroll_* pins the behaviour should the hook move
        old_max = max(0, self._content_height - self.scrollable_content_region.height)
        was_at_end = self.scroll_y >= old_max - 1
        grew = virtual_size.height > self._content_height
        self._content_height = virtual_size.height
        super()._scroll_update(virtual_size)
        if grew and was_at_end and self._content_height > self.scrollable_content_region.height:
            self.call_after_refresh(self.scroll_end, animate=False, immediate=True)
