"""The environment a child process starts with: the daemon's own, minus what systemd meant for the daemon alone.

A child that inherited ``NOTIFY_SOCKET``/``WATCHDOG_*`` could ping as if it were the service (and keep a dead
daemon "alive") or declare readiness; one that inherited ``LISTEN_*`` would take the daemon's activated
sockets for its own. Each engine adds its own variables on top.
"""

from __future__ import annotations

from collections.abc import Mapping

from daemon.core.sdnotify import SYSTEMD_ONLY_ENV


def child_environ(environ: Mapping[str, str], *layers: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``environ`` without the variables meant for the daemon alone, with ``layers`` applied on top
    in order (a later layer wins)."""
    env = {k: v for k, v in environ.items() if k not in SYSTEMD_ONLY_ENV}
    for layer in layers:
        env.update(layer)
    return env
