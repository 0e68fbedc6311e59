"""sd_notify against a real unix datagram socket standing in for systemd's $NOTIFY_SOCKET.

The end-to-end tests run a real asyncio program in a subprocess that uses daemon/core/sdnotify.py the way the
daemon does; the test process plays systemd and timestamps every datagram as it arrives.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.children.env import child_environ
from daemon.core.sdnotify import Notifier

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Datagram:
    t: float  # time.monotonic() at arrival
    fields: dict[str, str]


class FakeSystemd:
    """A bound AF_UNIX/SOCK_DGRAM socket, like the one systemd listens on."""

    def __init__(self, address: str, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind(address)
        self.received: list[Datagram] = []

    def recv(self, timeout: float) -> Datagram | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        dgram = Datagram(time.monotonic(), fields)
        self.received.append(dgram)
        return dgram

    def collect_until_exit(self, proc: subprocess.Popen[bytes], deadline_s: float) -> list[Datagram]:
        """Every datagram until the child has exited and the socket is drained (or the deadline passes)."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.recv(0.05) is None and proc.poll() is not None:
                break
        else:
            proc.kill()
            raise AssertionError(f"the notifier program did not finish within {deadline_s}s")
        return self.received


@pytest.fixture
def fs_socket() -> Iterator[tuple[FakeSystemd, str]]:
    # pytest's tmp_path can exceed the 107-byte limit of a unix socket path
    d = tempfile.mkdtemp(prefix="sdn", dir="/tmp")
    path = os.path.join(d, "notify")
    fake = FakeSystemd(path)
    try:
        yield fake, path
    finally:
        fake.sock.close()
        os.unlink(path)
        os.rmdir(d)


@pytest.fixture
def abstract_socket() -> Iterator[tuple[FakeSystemd, str]]:
    name = f"ftmllm-test-{uuid.uuid4().hex}"
    fake = FakeSystemd("\0" + name)
    try:
        yield fake, "@" + name
    finally:
        fake.sock.close()


# The program under test: what the daemon does, plus markers around a deliberately blocked event loop.
PROGRAM = textwrap.dedent("""
    import asyncio, os, subprocess, sys, time
    from daemon.core.sdnotify import Notifier

    BLOCK_S = float(sys.argv[1])

    async def main() -> None:
        n = Notifier.from_environ(unset=True)
        watchdog = asyncio.create_task(n.run_watchdog())
        n.ready("ready: 0 jobs queued, engine cpu")
        await asyncio.sleep(8 * n.watchdog_interval())   # healthy: the loop turns, pings flow
        n.notify("X_BLOCK=begin")
        time.sleep(BLOCK_S)                               # a handler that blocks the loop
        n.notify("X_BLOCK=end")
        await asyncio.sleep(8 * n.watchdog_interval())   # healthy again
        probe = "import os; print(','.join(k for k in os.environ if 'NOTIFY' in k or 'WATCHDOG' in k))"
        child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
        n.notify("X_CHILD_SAW=" + (child.stdout.strip() or "nothing"))
        n.stopping("stopping: no new work")
        watchdog.cancel()

    asyncio.run(main())
""")


def _run_program(tmp_path: Path, notify_socket: str, block_s: float, watchdog_usec: int) -> subprocess.Popen[bytes]:
    script = tmp_path / "notifier_program.py"
    script.write_text(PROGRAM)
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket, "WATCHDOG_USEC": str(watchdog_usec),
           "PYTHONPATH": str(ROOT)}
    env.pop("WATCHDOG_PID", None)
    return subprocess.Popen([sys.executable, str(script), str(block_s)], env=env, cwd=tmp_path)


@pytest.mark.parametrize("which", ["fs_socket", "abstract_socket"])
def test_ready_pings_and_stopping_arrive_in_order_and_a_blocked_loop_stops_the_pings(
    tmp_path: Path, request: pytest.FixtureRequest, which: str
) -> None:
    fake, address = request.getfixturevalue(which)
    interval = 0.05  # WATCHDOG_USEC=100ms → a ping every 50 ms
    block_s = 1.5
    proc = _run_program(tmp_path, address, block_s, watchdog_usec=int(2 * interval * 1e6))
    got = fake.collect_until_exit(proc, deadline_s=60)
    assert proc.returncode == 0

    kinds = [next(iter(d.fields)) for d in got]
    assert kinds[0] == "READY", kinds
    assert got[0].fields["STATUS"] == "ready: 0 jobs queued, engine cpu"
    assert kinds[-1] == "STOPPING" and got[-1].fields["STATUS"] == "stopping: no new work"
    begin = kinds.index("X_BLOCK")
    end = begin + 1
    assert got[end].fields == {"X_BLOCK": "end"}, "no datagram at all may arrive while the loop is blocked"

    before = [d for d in got[1:begin] if "WATCHDOG" in d.fields]
    after = [d for d in got[end:] if "WATCHDOG" in d.fields]
    assert len(before) >= 3 and len(after) >= 3, (len(before), len(after))
    # Measured on the socket: silence for as long as the loop was blocked, pings close together otherwise.
    silence = got[end].t - got[begin].t
    assert silence >= block_s * 0.9
    gaps = [b.t - a.t for a, b in itertools.pairwise(after)]
    assert max(gaps) < block_s / 2, gaps
    assert got[-2].fields == {"X_CHILD_SAW": "nothing"}, "children must not inherit NOTIFY_SOCKET/WATCHDOG_*"


def test_reloading_carries_monotonic_usec_for_notify_reload(fs_socket: tuple[FakeSystemd, str]) -> None:
    fake, path = fs_socket
    n = Notifier.from_environ({"NOTIFY_SOCKET": path})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading("reloading /etc/ftmllm/ftmllm.toml")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    got = fake.recv(5)
    assert got is not None and got.fields["RELOADING"] == "1"
    assert before <= int(got.fields["MONOTONIC_USEC"]) <= after
    assert got.fields["STATUS"] == "reloading /etc/ftmllm/ftmllm.toml"
    assert n.ready()
    got = fake.recv(5)
    assert got is not None and got.fields == {"READY": "1"}


def test_status_text_cannot_inject_another_field(fs_socket: tuple[FakeSystemd, str]) -> None:
    fake, path = fs_socket
    Notifier(path).status("queue: 2 jobs\nREADY=1")
    got = fake.recv(5)
    assert got is not None and got.fields == {"STATUS": "queue: 2 jobs READY=1"}


def test_extend_timeout_is_sent_in_microseconds(fs_socket: tuple[FakeSystemd, str]) -> None:
    fake, path = fs_socket
    Notifier(path).extend_timeout(30)
    got = fake.recv(5)
    assert got is not None and got.fields == {"EXTEND_TIMEOUT_USEC": "30000000"}


async def test_without_notify_socket_everything_is_a_noop() -> None:
    env: dict[str, str] = {"WATCHDOG_USEC": "1000000"}
    n = Notifier.from_environ(env)
    assert not n.enabled and n.watchdog_interval() is None
    assert n.ready() is False and n.stopping() is False and n.watchdog_ping() is False
    await n.run_watchdog()  # returns at once instead of pinging nobody forever


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid_only() -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_environ(dict(env)).watchdog_interval() == 15.0
    assert Notifier.from_environ({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval() == 15.0
    # inherited from a parent that was the watchdog's target: not ours to ping
    assert Notifier.from_environ({**env, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval() is None
    assert Notifier.from_environ({**env, "WATCHDOG_USEC": "bogus"}).watchdog_interval() is None


def test_unset_removes_the_variables_and_child_environ_strips_them() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1", "PATH": "/usr/bin"}
    assert child_environ(env) == {"PATH": "/usr/bin"}
    n = Notifier.from_environ(env, unset=True)
    assert n.enabled and env == {"PATH": "/usr/bin"}


def test_a_vanished_notify_socket_is_logged_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier(str(tmp_path / "gone"))
    with caplog.at_level(logging.WARNING, logger="daemon.core.sdnotify"):
        results = [n.watchdog_ping() for _ in range(5)]
    assert results == [False] * 5
    assert len(caplog.records) == 1 and "cannot notify systemd" in caplog.records[0].getMessage()


def test_a_full_notify_socket_drops_messages_instead_of_blocking_the_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = "\0" + f"ftmllm-full-{uuid.uuid4().hex}"
    fake = FakeSystemd(name, rcvbuf=4096)  # never read from: systemd hung
    n = Notifier("@" + name[1:])
    results: list[bool] = []
    sender = threading.Thread(target=lambda: results.extend(n.watchdog_ping() for _ in range(2000)))
    with caplog.at_level(logging.WARNING, logger="daemon.core.sdnotify"):
        sender.start()
        sender.join(timeout=30)
    fake.sock.close()
    assert not sender.is_alive(), "notify() blocked on a full socket"
    assert results.count(False) > 0 and results[0] is True
    assert sum("is full" in r.getMessage() for r in caplog.records) == 1
