"""Talking to systemd over ``$NOTIFY_SOCKET`` (sd_notify(3)): readiness, status, reload, stop, watchdog.

After nobodd's ``nobodd/systemd.py``, with three differences the daemon needs:

* no module-level singleton: ``Notifier.from_environ()`` is built once by the daemon and passed around;
* the socket is non-blocking and errors are swallowed (logged once per kind): a full or vanished
  notify socket must never stall or kill the event loop;
* ``run_watchdog()`` pings from the event loop itself, so a loop stuck in a blocking call stops pinging
  and systemd's watchdog restarts the daemon, which is the point of having one.

Without ``$NOTIFY_SOCKET`` (not started by systemd, or ``Type=`` is not notify) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

# What systemd hands the daemon for itself alone; children must not see it (a child that pings would keep a
# dead daemon "alive", one that sends READY=1 would confuse the unit's state).
SYSTEMD_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


def _socket_address(value: str) -> str | None:
    # "/path" is a file system socket, "@name" an abstract one (Linux); systemd ≥ 254 can also hand out
    # "vsock:…" addresses, which only matter inside VMs and are not supported here.
    if len(value) > 1 and value[0] == "/":
        return value
    if len(value) > 1 and value[0] == "@":
        return "\0" + value[1:]
    return None


def _one_line(text: str) -> str:
    # A newline would start a new field: "STATUS=a\nREADY=1" would declare readiness.
    return " ".join(text.splitlines())


class Notifier:
    """The daemon's link to systemd. Build it with :meth:`from_environ`; all methods are cheap and safe."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._address = _socket_address(address) if address else None
        self._raw_address = address
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None
        self._logged: set[str] = set()
        if address and self._address is None:
            self._log_once("address", "NOTIFY_SOCKET=%r is not a path or @abstract name; systemd will not "
                           "hear from ftmllmd (check the unit's Type= and NotifyAccess=)", address)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = False,
                     pid: int | None = None) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (default: ``os.environ``).

        ``unset=True`` removes them from ``environ`` afterwards (like sd_notify's ``unset_environment``), so
        children started later with the plain environment cannot inherit them.
        """
        env = os.environ if environ is None else environ
        usec: int | None = None
        raw_usec, raw_pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if raw_usec:
            try:
                usec = int(raw_usec)
            except ValueError:
                usec = None
            # WATCHDOG_PID names the process the watchdog is meant for; an inherited one is someone else's.
            if raw_pid and raw_pid != str(os.getpid() if pid is None else pid):
                usec = None
        notifier = cls(env.get("NOTIFY_SOCKET"), usec)
        if unset:
            for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(key, None)
        return notifier

    @property
    def enabled(self) -> bool:
        """True when systemd listens (``NOTIFY_SOCKET`` was set to a usable address)."""
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises), or None."""
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    # ------------------------------------------------------------------------------------------- sending

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields in one datagram. True if it left; False (never an exception) if not."""
        if self._address is None or not fields:
            return False
        payload = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # A receiver that stopped reading must not block the event loop: drop the message instead.
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(payload, self._address)
        except BlockingIOError:
            self._log_once("full", "systemd's notify socket %s is full; dropped %r (it will be resent on the "
                           "next state change or ping)", self._raw_address, fields[0])
            return False
        except OSError as exc:
            self._log_once(f"os:{exc.errno}", "cannot notify systemd via %s: %s; the unit's state may lag "
                           "(check NOTIFY_SOCKET and that systemd still runs)", self._raw_address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup (or a reload) is complete: sockets bound, store open, hot folder watched."""
        return self.notify("READY=1", *self._status_field(status))

    def status(self, text: str) -> bool:
        """One line shown by ``systemctl status ftmllmd``."""
        return self.notify(f"STATUS={_one_line(text)}")

    def reloading(self, status: str | None = None) -> bool:
        """A reload starts (SIGHUP); call :meth:`ready` when it is done.

        Carries ``MONOTONIC_USEC`` (CLOCK_MONOTONIC in µs), which systemd ≥ 253 requires with RELOADING=1
        for ``Type=notify-reload``; older versions ignore the field.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={now_usec}", *self._status_field(status))

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun; systemd now allows ``TimeoutStopSec`` for the exit."""
        return self.notify("STOPPING=1", *self._status_field(status))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before systemd gives up on the current start or stop (e.g. a checkpoint
        still being written). Only has an effect once the configured timeout is nearly used up."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(1, int(seconds * 1_000_000))}")

    def watchdog_ping(self) -> bool:
        return self.notify("WATCHDOG=1")

    async def run_watchdog(self) -> None:
        """Ping at :meth:`watchdog_interval` until cancelled; returns at once when no watchdog is set.

        The pings come from the event loop on purpose, not from a thread: if a handler blocks the loop, the
        pings stop, and systemd kills and restarts the daemon after ``WatchdogSec``.
        """
        interval = self.watchdog_interval()
        if interval is None:
            return
        while True:
            self.watchdog_ping()
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # ------------------------------------------------------------------------------------------ helpers

    @staticmethod
    def _status_field(status: str | None) -> tuple[str, ...]:
        return () if status is None else (f"STATUS={_one_line(status)}",)

    def _log_once(self, kind: str, msg: str, *args: object) -> None:
        if kind in self._logged:
            log.debug(msg, *args)
            return
        self._logged.add(kind)
        log.warning(msg, *args)
