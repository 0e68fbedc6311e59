"""A real ftmllmd in a subprocess, on its own short temp dir, for tests and benches."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from shared.client import Client, DaemonUnavailable
from shared.config import load_settings
from shared.protocol import TERMINAL_STATES, Hello, HelloReply, JobChanged, JobDetail, JobInfo, Submit

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> object:
    """Poll a condition until it holds (a deadline, not a sleep as synchronisation)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class DaemonProc:
    def __init__(self, home: Path | None = None, config: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer
        self.home = home or Path(tempfile.mkdtemp(prefix="ft", dir="/tmp"))
        self.config = config
        self.env = {**os.environ, **(env or {})}
        self.env.pop("FTMLLM_CONFIG", None)
        self.env.pop("FTMLLM_HOME", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.settings = load_settings(config, self.home)
        self.paths = self.settings.paths
        self.log_path = self.home / "daemon.log"
        self._clients: list[Client] = []

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "daemon.main", "--home", str(self.home)]
        if self.config:
            argv += ["--config", str(self.config)]
        return argv

    def start(self, timeout: float = 30.0) -> DaemonProc:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv(), cwd=ROOT, env=self.env, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        probe = Client(self.paths, name="test-probe", timeout=1.0)
        try:
            def answers() -> bool:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"ftmllmd exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
                try:
                    return isinstance(probe.call(Hello(client="test"), HelloReply), HelloReply)
                except DaemonUnavailable:
                    return False

            try:
                wait_for(answers, timeout, "ftmllmd to answer hello")
            except AssertionError as exc:  # what it was doing instead
                raise AssertionError(f"{exc}; its log ends:\n{self.log_text()[-3000:]}") from None
        finally:
            probe.close()
        return self

    def client(self, timeout: float = 10.0) -> Client:
        c = Client(self.paths, name="test", timeout=timeout)
        self._clients.append(c)
        return c

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def close(self, remove: bool = True) -> None:
        for c in self._clients:
            c.close()
        self._clients.clear()
        self.stop()
        if remove:
            shutil.rmtree(self.home, ignore_errors=True)


def run_job(c: Client, kind: str, spec: dict[str, object]) -> tuple[JobInfo, float]:
    """Submit a job and follow its events to its end: (the ended job, seconds from submit to end)."""
    events = c.events(("job.",))
    next(events)  # subscribed before the submit: the end cannot be missed
    t = time.perf_counter()
    job = c.call(Submit(kind=kind, spec=spec), JobDetail).job
    for ev in events:
        if isinstance(ev.body, JobChanged) and ev.body.job.id == job.id and ev.body.job.state in TERMINAL_STATES:
            return ev.body.job, time.perf_counter() - t
    raise AssertionError("the event stream ended before the job did")
