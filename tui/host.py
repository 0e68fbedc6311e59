"""What ftui's screens need of the app: :class:`Host`. Screens depend on this, never on :mod:`tui.app`.

A screen asks for things in one place, the host: :meth:`Host.send` for an answer that comes back to the
asking widget (``Replied`` / ``RequestFailed``); :meth:`Host.want_pages` and :meth:`Host.want_train` for data
that belongs in the :class:`~tui.state.State` (a job's pages, a run's loss points), which arrives like every
event, as a ``StateChanged``. Everything it shows it reads from :attr:`Host.state`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, cast

from textual.dom import DOMNode
from textual.message_pump import MessagePump

from shared.handover import Handed
from shared.protocol import RequestBody
from tui.state import State


class Host(Protocol):
    @property
    def state(self) -> State:
        """What ftui knows about the daemon (the link is its only writer)."""

    @property
    def clock(self) -> Callable[[], float]:
        """The time "3m ago" is measured from (frozen in the snapshot tests)."""

    @property
    def file_root(self) -> Path:
        """Where file pickers start and relative paths are read from."""

    def send(self, body: RequestBody, *, reply_to: MessagePump | None = None, tag: str = "",
             announce: bool = True) -> None:
        """Ask the daemon; the answer comes back to ``reply_to`` as Replied / RequestFailed tagged ``tag``,
        and (with ``announce``) as a notification saying what happened."""

    async def hand_over(self, path: Path) -> Handed:
        """Open ``path`` with the user's own rights and hand it to the daemon (shared/handover.py), which reads
        no path itself; raises HandoverRefused (about the file) or HandoverUnavailable (about the daemon)."""

    def want_pages(self, job_id: int) -> None:
        """Load a job's page list into the state once; PageChanged events keep it current."""

    def want_train(self, job_id: int) -> None:
        """Load a run's loss points into the state once; TrainProgress events keep them current."""

    async def action_show_job(self, job_id: int) -> None:
        """Open the Jobs screen on one job."""


def host_of(node: DOMNode) -> Host:
    """The app ``node`` runs in, as the :class:`Host` it is (tui.app.FtuiApp)."""
    return cast(Host, node.app)
