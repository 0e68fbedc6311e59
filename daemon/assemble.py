"""Build the daemon from its parts: the one place that knows which job kinds, engines and watchers exist."""

from __future__ import annotations

from daemon.service import Daemon
from shared.config import Settings


def assemble(settings: Settings) -> Daemon:
    return Daemon(settings)
