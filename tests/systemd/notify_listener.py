"""Plays systemd's side of sd_notify(3) for a real daemon process: a bound unix datagram socket whose
address is handed to the daemon as ``$NOTIFY_SOCKET``.

A background thread receives every datagram as soon as it arrives, timestamps it, and runs a ``probe``
right then (e.g. "do the socket files exist?"), so a test can say what was true at the moment the daemon
said READY=1, not some time later when the test got round to looking.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType


@dataclass(frozen=True)
class Datagram:
    t: float  # time.monotonic() at arrival
    fields: dict[str, str]
    probe: object = None  # what the probe returned at arrival


@dataclass
class NotifyListener:
    probe: Callable[[], object] = lambda: None
    received: list[Datagram] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        # pytest's tmp_path can exceed the 107-byte limit of a unix socket path
        self._dir = tempfile.mkdtemp(prefix="sdn", dir="/tmp")
        self.address = os.path.join(self._dir, "notify")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.address)
        self._sock.settimeout(0.1)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="fake-systemd", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            t = time.monotonic()
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            dgram = Datagram(t, fields, self.probe())
            with self._cond:
                self.received.append(dgram)
                self._cond.notify_all()

    def snapshot(self) -> list[Datagram]:
        with self._cond:
            return list(self.received)

    def wait(self, predicate: Callable[[list[Datagram]], object], timeout: float, what: str) -> object:
        """Wait until ``predicate(received)`` is truthy; AssertionError naming ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate(self.received)
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    got = [d.fields for d in self.received[-8:]]
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last datagrams: {got}")
                self._cond.wait(left)

    def index_of(self, key: str, after: int = -1) -> int | None:
        """Index of the first datagram after ``after`` that carries ``key`` (e.g. "READY"), or None."""
        with self._cond:
            for i in range(after + 1, len(self.received)):
                if key in self.received[i].fields:
                    return i
        return None

    def wait_index(self, key: str, after: int = -1, timeout: float = 60.0) -> int:
        """Wait for the first datagram after index ``after`` carrying ``key``; its index."""
        def found(_received: list[Datagram]) -> int | None:
            i = self.index_of(key, after)
            return None if i is None else i + 1  # +1: index 0 must count as found

        return int(self.wait(found, timeout, f"{key}= after datagram #{after}")) - 1  # type: ignore[call-overload]

    def count(self, key: str, after: int = -1, before: int | None = None) -> int:
        with self._cond:
            return sum(1 for d in self.received[after + 1:before] if key in d.fields)

    def count_during(self, key: str, after: int, seconds: float) -> int:
        """How many datagrams carrying ``key`` arrive (after index ``after``) within the next ``seconds``.

        An observation window for asserting that something does *not* happen; it returns early, with the
        count, as soon as one arrives."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while self.count(key, after) == 0 and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            return self.count(key, after)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> NotifyListener:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
