"""Every Message ftui's widgets exchange, in one place (as harlequin does).

The flow: the :class:`~tui.link.Link` (the one worker that owns the daemon client) posts
:class:`StateChanged` to the app at most ~20 times a second; the app hands it to the screens on the stack.
A widget that needs the daemon posts nothing to a socket: it asks the app (``app.send``), and the answer
comes back to it as :class:`Replied` or :class:`RequestFailed`.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from shared.protocol import ReplyBody
from tui.state import Changes


class StateChanged(Message):
    """The daemon's state changed; ``changes`` says which parts (coalesced since the last one)."""

    def __init__(self, changes: Changes) -> None:
        super().__init__()
        self.changes = changes


@dataclass
class Replied(Message):
    """A request sent for this widget was answered. ``tag`` is what the widget named the request."""

    tag: str
    reply: ReplyBody


@dataclass
class RequestFailed(Message):
    """A request sent for this widget was refused or the daemon did not answer."""

    tag: str
    code: str  # the protocol ErrorCode, or "unavailable" when the daemon is not there
    message: str


@dataclass
class JobHighlighted(Message):
    """The cursor of a job table moved onto a job."""

    job_id: int | None
