"""A child process in its own process group: start it, wait for it, stop it with a ladder of deadlines.

The daemon's children are trees: ``vllm serve`` runs its engine core as a second process, a multi-GPU
training run is cli → torchrun → one worker per GPU. The GPU memory they hold is free only once every
process of the tree is gone, so the group, not the leader, is what is waited for and stopped.

* The child gets its own session and process group (it leads it: pgid == pid), stdin from /dev/null and
  stdout+stderr to a log file, never a pipe (a pipe nobody drains froze LlamaBoard's training).
* Signal dispositions and the signal mask are reset in the child: a daemon started from a non-interactive
  shell may have SIGINT ignored, and a thread that blocked signals would hand that mask to the child, so
  the stop signals would never arrive.
* Stop ladder: the child's graceful signal (if it has one) once to each process of the group that catches
  it (read from /proc/PID/status SigCgt), then SIGTERM to the group, then SIGKILL to the group, each step
  with its deadline. A process that does not catch the graceful signal is spared it: for SIGABRT, the
  default action would dump core instead of waiting for the workers.
* :class:`ProcessRecord` (pid, group, start time from /proc) is what outlives the daemon; see
  :mod:`daemon.children.record`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, NamedTuple, Self

# Signals whose dispositions the child gets back to default (SIGKILL/SIGSTOP cannot be changed).
_RESET_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGABRT, signal.SIGHUP, signal.SIGQUIT,
                  signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE, signal.SIGCHLD)
_POLL_S = 0.05  # how often the group's membership is read while waiting for it to empty

StopHow = Literal["already_exited", "graceful", "terminated", "killed"]


class ProcStat(NamedTuple):
    state: str  # R, S, D, Z, …
    ppid: int
    pgrp: int
    start_ticks: int  # clock ticks after boot


@dataclass(frozen=True)
class ProcessRecord:
    """Who a child is, in terms that outlive the daemon: its pid, its group and when it started, which tells
    it from a later process given the same pid."""

    pid: int
    pgid: int
    start_ticks: int  # /proc/PID/stat starttime
    # False: start_ticks is only a bound the process cannot have started after (a record written before
    # start times were kept: the time of the record itself)
    exact: bool = True

    def leader_is_ours(self) -> bool:
        """Whether the process now at ``pid`` is the recorded one; True if no process has that pid."""
        stat = read_stat(self.pid)
        if stat is None:
            return True
        return stat.start_ticks == self.start_ticks if self.exact else stat.start_ticks <= self.start_ticks


@dataclass(frozen=True)
class StopOutcome:
    how: StopHow
    returncode: int | None  # the leader's
    seconds: float


def _reset_signals() -> None:  # runs in the child between fork and exec
    for sig in _RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


class ChildProcess:
    """One child and its process group. Start with :meth:`start`; one owner at a time."""

    # sent first when stopping, to the processes of the group that catch it; None: SIGTERM to the group is
    # the child's graceful stop
    graceful_signal: ClassVar[signal.Signals | None] = None

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self._proc = proc
        self.log_path = log_path
        self.pid = proc.pid
        self.pgid = proc.pid  # start_new_session: the child leads its own session and group
        stat = read_stat(proc.pid)  # not reaped yet, so readable even if it has already exited
        self.record = ProcessRecord(pid=proc.pid, pgid=proc.pid, start_ticks=stat.start_ticks if stat else 0)

    @classmethod
    def start(cls, argv: Sequence[str], env: Mapping[str, str], *, log_path: Path, cwd: Path | None = None) -> Self:
        """Start ``argv`` with its output appended to ``log_path``. Raises OSError if it cannot be run."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_reset_signals, close_fds=True,
            )
        return cls(proc, log_path)

    @property
    def returncode(self) -> int | None:
        """The leader's exit status; None while it runs."""
        return self._proc.poll()

    def alive(self) -> bool:
        """The leader or any other process of its group still runs."""
        return self._proc.poll() is None or bool(group_members(self.pgid))

    def catchers(self, sig: signal.Signals) -> list[int]:
        """Processes of the group that catch ``sig``."""
        return [pid for pid in group_members(self.pgid) if catches(pid, sig)]

    def signal_group(self, sig: signal.Signals) -> None:
        signal_group(self.pgid, sig)

    async def exited(self) -> int:
        """The leader's exit status, once it has exited (the rest of its group may still run)."""
        fd = _pidfd(self.pid)
        try:
            while (rc := self._proc.poll()) is None:
                if fd is None:
                    await asyncio.sleep(_POLL_S)
                else:
                    await _readable(fd, 1.0)
        finally:
            if fd is not None:
                os.close(fd)
        return rc

    async def wait(self) -> int:
        """The leader's exit status, once the rest of its group is gone too (torchrun workers outlive a crashed
        launcher; their GPU memory is only free once they are)."""
        rc = await self.exited()
        while group_members(self.pgid):
            await asyncio.sleep(_POLL_S)
        return rc

    async def stop(self, graceful_s: float = 0.0, term_s: float = 15.0, kill_s: float = 10.0) -> StopOutcome:
        """Stop the group: the graceful signal for up to ``graceful_s``, then SIGTERM for up to ``term_s``,
        then SIGKILL for up to ``kill_s``. Returns at the first step after which nothing of the group is left."""
        t0 = time.monotonic()
        if not self.alive():
            return StopOutcome("already_exited", self._proc.poll(), 0.0)
        if self.graceful_signal is not None and graceful_s > 0 and await self._graceful(self.graceful_signal,
                                                                                         t0 + graceful_s):
            return StopOutcome("graceful", self._proc.poll(), time.monotonic() - t0)
        steps: tuple[tuple[signal.Signals, StopHow, float], ...] = (
            (signal.SIGTERM, "terminated", term_s), (signal.SIGKILL, "killed", kill_s))
        for sig, how, wait_s in steps:
            self.signal_group(sig)
            if await self._gone_within(wait_s):
                return StopOutcome(how, self._proc.poll(), time.monotonic() - t0)
        return StopOutcome("killed", self._proc.poll(), time.monotonic() - t0)

    async def _graceful(self, sig: signal.Signals, deadline: float) -> bool:
        sent: set[int] = set()
        while time.monotonic() < deadline:
            targets = [pid for pid in self.catchers(sig) if pid not in sent]
            if not targets and not sent:
                return False  # nobody catches it (yet: still importing, nothing to save): go on to SIGTERM
            # Once per pid: a process shutting down may get Python's default handlers back, and a second
            # signal would then kill it. Processes that appear later (torchrun's workers) get theirs when seen.
            for pid in targets:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                sent.add(pid)
            if await self._gone_within(min(1.0, deadline - time.monotonic())):
                return True
        return False

    async def _gone_within(self, seconds: float) -> bool:
        end = time.monotonic() + max(0.0, seconds)
        while self.alive():
            if time.monotonic() >= end:
                return False
            await asyncio.sleep(_POLL_S)
        return True


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = read_stat(int(entry.name))
        if stat is not None and stat.pgrp == pgid and stat.state != "Z":
            out.append(int(entry.name))
    return out


def read_stat(pid: int) -> ProcStat | None:
    """What /proc/PID/stat says of ``pid``; None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()  # the command name may contain spaces and parentheses
    return ProcStat(fields[0], int(fields[1]), int(fields[2]), int(fields[19]))


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether ``pid`` has a handler installed for ``sig`` (/proc/PID/status SigCgt)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


async def _readable(fd: int, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fut, timeout)
    finally:
        loop.remove_reader(fd)
