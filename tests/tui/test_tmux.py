"""ftui in a real terminal: tmux runs the installed ``ftui`` against a real daemon, send-keys drives it,
capture-pane reads what a person would see."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.daemon_proc import DaemonProc

FTUI = Path(sys.executable).parent / "ftui"


class Tmux:
    """One private tmux server (its own -L socket), so nothing else the user runs in tmux is touched."""

    def __init__(self, name: str) -> None:
        self.base = ["tmux", "-L", name, "-f", "/dev/null"]
        self.session = "ftui"

    def run(self, *args: str) -> str:
        return subprocess.run([*self.base, *args], check=True, capture_output=True, text=True).stdout

    def start(self, command: str, width: int = 100, height: int = 30) -> None:
        self.run("new-session", "-d", "-s", self.session, "-x", str(width), "-y", str(height), command)

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", self.session, *keys)

    def screen(self) -> str:
        """The pane's text; "" once the session has ended (ftui quit), even if it ends during the capture."""
        res = subprocess.run([*self.base, "capture-pane", "-p", "-t", self.session], capture_output=True, text=True)
        if res.returncode == 0:
            return res.stdout
        if not self.alive():
            return ""
        raise subprocess.CalledProcessError(res.returncode, res.args, res.stdout, res.stderr)

    def alive(self) -> bool:
        return subprocess.run([*self.base, "has-session", "-t", self.session], capture_output=True).returncode == 0

    def wait_for(self, condition: Callable[[str], bool], what: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if condition(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; the screen:\n{text}")
            time.sleep(0.05)

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    t = Tmux(f"ftui-test-{os.getpid()}")
    try:
        yield t
    finally:
        t.kill()


def job_row(screen: str, job_id: int) -> str:
    return next((ln for ln in screen.splitlines() if ln.split()[:2] == [str(job_id), "selftest"]), "")


def test_ftui_in_tmux_submits_a_job_shows_it_finish_and_quits(daemon: DaemonProc, tmux: Tmux) -> None:
    # 256 colours, as over a plain SSH session; Textual draws on stderr, so nothing is redirected
    cmd = f"env TERM=xterm-256color COLORTERM= {shlex.quote(str(FTUI))} --home {shlex.quote(str(daemon.home))}"
    tmux.start(cmd)
    tmux.wait_for(lambda s: "ID" in s and "KIND" in s and "STATE" in s and "● " in s, "the job list, connected")
    tmux.keys("C-p")
    tmux.wait_for(lambda s: "Search for commands" in s or "Submit" in s, "the command palette")
    tmux.keys("-l", "submit selftest")
    tmux.wait_for(lambda s: "Submit selftest job" in s, "the palette hit")
    tmux.keys("Enter")
    screen = tmux.wait_for(lambda s: job_row(s, 1) != "", "job 1 in the job list")
    assert "queued" in job_row(screen, 1) or "running" in job_row(screen, 1) or "succeeded" in job_row(screen, 1)
    screen = tmux.wait_for(lambda s: "succeeded" in job_row(s, 1), "job 1 to finish", timeout=30)
    assert "50/50" in job_row(screen, 1)
    tmux.keys("q")
    tmux.wait_for(lambda s: s == "", "ftui to quit and its session to end")


def test_ftui_exits_when_its_terminal_goes_away(tmux: Tmux) -> None:
    # no daemon here: ftui sits on its "not running" banner, retrying; closing the terminal must end it
    home = Path(tempfile.mkdtemp(prefix="ft", dir="/tmp"))
    try:
        tmux.start(f"env TERM=xterm-256color {shlex.quote(str(FTUI))} --home {shlex.quote(str(home))}")
        tmux.wait_for(lambda s: "not running" in s and "systemctl start ftmllmd" in s, "the banner")
        proc = psutil.Process(int(tmux.run("display", "-p", "-t", tmux.session, "#{pane_pid}").strip()))
        tmux.kill()
        deadline = time.monotonic() + 10
        while proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "ftui kept running after its terminal closed"
            time.sleep(0.05)
    finally:
        shutil.rmtree(home, ignore_errors=True)
