"""The child-process module with real children: the stop ladder's deadlines, a whole group stopped when its
leader is gone, an orphan found from its record after its daemon was killed, and a pid that now belongs to
another process left alone.

Children say they are ready by writing to a FIFO the test reads (with a deadline), never by the test sleeping.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from daemon.children.env import child_environ
from daemon.children.process import ChildProcess, group_members, read_stat
from daemon.children.record import read_record, reap_recorded, write_record

ROOT = Path(__file__).resolve().parents[2]
READY_S = 30.0

IGNORES_SIGTERM = r"""
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(sys.argv[1], "w") as fh:
    fh.write("ready")
while True:
    time.sleep(1)
"""

# A leader with a worker in its group, like vLLM's API server and engine core: the worker's pid is the signal.
WITH_WORKER = r"""
import subprocess, sys, time
worker = subprocess.Popen(["sleep", "600"])
with open(sys.argv[1], "w") as fh:
    fh.write(str(worker.pid))
if sys.argv[2] == "exit":
    sys.exit(3)
worker.wait()
"""

# A daemon that starts a child, records it, says so on stdout and then waits to be killed.
DAEMON = r"""
import os, sys
from pathlib import Path
from daemon.children.process import ChildProcess
from daemon.children.record import write_record
script, record, log, fifo = sys.argv[1:5]
child = ChildProcess.start([sys.executable, "-c", script, fifo, "stay"], os.environ, log_path=Path(log))
write_record(Path(record), child.record, {"port": 8000})
print("recorded", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "ready"
    os.mkfifo(path)
    return path


@pytest.fixture
def started() -> Iterator[list[ChildProcess]]:
    """Children a test starts; whatever is left of their groups is killed afterwards."""
    children: list[ChildProcess] = []
    yield children
    for child in children:
        child.signal_group(signal.SIGKILL)
        child._proc.wait(10)


def _ready(fifo: Path) -> str:
    """What the child wrote into ``fifo`` once it got ready; fails after READY_S."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        readable, _, _ = select.select([fd], [], [], READY_S)
        assert readable, f"the child did not get ready within {READY_S:.0f}s"
        return os.read(fd, 100).decode()
    finally:
        os.close(fd)


def _start(started: list[ChildProcess], argv: list[str], log: Path) -> ChildProcess:
    child = ChildProcess.start(argv, os.environ, log_path=log)
    started.append(child)
    return child


async def test_a_child_that_ignores_sigterm_gets_sigkill_when_the_term_deadline_passes(
        tmp_path: Path, fifo: Path, started: list[ChildProcess]) -> None:
    child = _start(started, [sys.executable, "-c", IGNORES_SIGTERM, str(fifo)], tmp_path / "c.log")
    assert _ready(fifo) == "ready"
    outcome = await child.stop(term_s=0.5, kill_s=5)
    assert outcome.how == "killed" and outcome.returncode == -signal.SIGKILL
    assert 0.5 <= outcome.seconds < 3
    assert group_members(child.pgid) == []


async def test_a_group_whose_leader_is_gone_is_still_stopped_as_a_whole(
        tmp_path: Path, fifo: Path, started: list[ChildProcess]) -> None:
    child = _start(started, [sys.executable, "-c", WITH_WORKER, str(fifo), "exit"], tmp_path / "c.log")
    worker = int(_ready(fifo))
    assert await child.exited() == 3
    assert child.alive() and group_members(child.pgid) == [worker]  # the worker outlived its leader
    outcome = await child.stop(term_s=10)
    assert outcome.how == "terminated" and outcome.returncode == 3
    assert not child.alive()


def test_the_child_leads_its_group_reads_dev_null_and_writes_to_its_log(
        tmp_path: Path, fifo: Path, started: list[ChildProcess]) -> None:
    log = tmp_path / "c.log"
    child = _start(started, [sys.executable, "-c", IGNORES_SIGTERM, str(fifo)], log)
    _ready(fifo)
    fds = {n: os.readlink(f"/proc/{child.pid}/fd/{n}") for n in (0, 1, 2)}
    assert fds == {0: "/dev/null", 1: str(log), 2: str(log)}
    assert os.getpgid(child.pid) == child.pid == child.pgid and os.getsid(child.pid) == child.pid


def test_an_orphan_left_by_a_killed_daemon_is_found_from_its_record_and_ended(tmp_path: Path, fifo: Path) -> None:
    record = tmp_path / "vllm.pid.json"
    daemon = subprocess.Popen(
        [sys.executable, "-c", DAEMON, WITH_WORKER, str(record), str(tmp_path / "c.log"), str(fifo)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert daemon.stdout is not None and daemon.stdout.readline() == b"recorded\n"
        worker = int(_ready(fifo))
    finally:
        daemon.kill()
        daemon.wait()
    data = json.loads(record.read_text())
    assert data["port"] == 8000  # what the owner adds stays in the record
    pgid = data["pgid"]
    assert worker in group_members(pgid)  # its daemon is gone, the child and its worker are not
    left = reap_recorded(record, term_s=10)
    assert left is not None and left.pid == data["pid"]
    assert group_members(pgid) == [] and not record.exists()


def test_a_record_in_the_previous_versions_format_still_finds_its_orphan(
        tmp_path: Path, fifo: Path, started: list[ChildProcess]) -> None:
    child = _start(started, [sys.executable, "-c", WITH_WORKER, str(fifo), "stay"], tmp_path / "c.log")
    _ready(fifo)
    trainer = tmp_path / "trainer.json"  # written as the previous version did: json.dumps(asdict(record))
    trainer.write_text(json.dumps({"pid": child.pid, "pgid": child.pgid, "start_ticks": child.record.start_ticks}))
    assert read_record(trainer) == child.record
    vllm = tmp_path / "vllm.pid.json"  # the previous vLLM record had no group and no start time
    vllm.write_text(json.dumps({"pid": child.pid, "port": 8000, "argv": ["vllm", "serve", "m"]}) + "\n")
    left = reap_recorded(vllm, term_s=10)
    assert left is not None and left.pgid == child.pid
    assert group_members(child.pgid) == [] and not vllm.exists()


def test_a_record_whose_pid_now_belongs_to_another_process_is_not_killed(
        tmp_path: Path, fifo: Path, started: list[ChildProcess]) -> None:
    child = _start(started, [sys.executable, "-c", WITH_WORKER, str(fifo), "stay"], tmp_path / "c.log")
    _ready(fifo)
    members = group_members(child.pgid)
    earlier = tmp_path / "trainer.json"  # the recorded process started at another time than the one there now
    write_record(earlier, replace(child.record, start_ticks=child.record.start_ticks - 1))
    assert reap_recorded(earlier) is None and not earlier.exists()
    legacy = tmp_path / "vllm.pid.json"  # a record without start time, written an hour before this process began
    legacy.write_text(json.dumps({"pid": child.pid, "port": 8000, "argv": ["vllm", "serve", "m"]}))
    hour_ago = time.time() - 3600
    os.utime(legacy, (hour_ago, hour_ago))
    assert reap_recorded(legacy) is None
    assert group_members(child.pgid) == members and child.returncode is None
    stat = read_stat(child.pid)
    assert stat is not None and stat.start_ticks == child.record.start_ticks


def test_child_environ_drops_what_systemd_gave_the_daemon_and_layers_the_rest_in_order() -> None:
    base = {"PATH": "/usr/bin", "NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1",
            "LISTEN_FDS": "2", "LISTEN_PID": "1", "LISTEN_FDNAMES": "ctl", "HOME": "/home/a"}
    env = child_environ(base, {"HF_HOME": "/hf", "HOME": "/srv"}, {"HF_HOME": "/job"})
    assert env == {"PATH": "/usr/bin", "HOME": "/srv", "HF_HOME": "/job"}
    assert base["NOTIFY_SOCKET"] == "/run/systemd/notify"  # the daemon's own stays as it was
