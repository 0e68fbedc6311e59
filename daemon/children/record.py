"""A child's record on disk, so that a daemon started after a crash ends the process group its predecessor left
running (holding GPU memory, a port).

The record holds the leader's pid, its group and its start time (/proc/PID/stat starttime): by the time the
record is read, the pid alone may belong to a later, unrelated process, which must not be killed. It is
written atomically: a crash mid-write leaves the old record or none, never a torn one.

What is written: ``{"pid", "pgid", "start_ticks"}`` plus what the owner adds (vLLM: its port and argv).
Records written before start times were kept (``vllm.pid.json`` of earlier versions: ``{"pid", "port",
"argv"}``) are read too: the child led its own group, and it cannot have started after its record was
written, which is what tells it from a later process then.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path

from daemon.children.process import ProcessRecord, group_members, signal_group
from daemon.core.atomic import write_atomic

log = logging.getLogger(__name__)

# /proc/stat's btime is in whole seconds, so a start time computed from it may read up to a second early.
_BOOT_TIME_SLACK_S = 2.0
_POLL_S = 0.05


def write_record(path: Path, record: ProcessRecord, extra: Mapping[str, object] = {}) -> None:
    body = {**extra, "pid": record.pid, "pgid": record.pgid, "start_ticks": record.start_ticks}
    write_atomic(path, json.dumps(body) + "\n", mode=0o600)


def read_record(path: Path) -> ProcessRecord | None:
    """The record at ``path``; None if there is none, or it cannot be read (logged)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        written = path.stat().st_mtime
        pid = int(data["pid"])
        pgid = int(data.get("pgid", pid))
        if "start_ticks" in data:
            return ProcessRecord(pid=pid, pgid=pgid, start_ticks=int(data["start_ticks"]))
        return ProcessRecord(pid=pid, pgid=pgid, start_ticks=_ticks_after_boot(written), exact=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.warning("%s: unreadable process record; ignoring it", path)
        return None


def kill_leftover(record: ProcessRecord, term_s: float = 15.0, kill_s: float = 10.0) -> bool:
    """After a daemon crash: end the group ``record`` names if it is still ours (SIGTERM, then SIGKILL after
    ``term_s``). The kernel does not reuse a pid while a process group of that id has members, so members
    found are ours unless the leader's pid now belongs to a newer process. Returns whether anything was
    signalled. Blocks until the group is gone or the deadlines have passed."""
    if not record.leader_is_ours() or not group_members(record.pgid):
        return False
    for sig, wait_s in ((signal.SIGTERM, term_s), (signal.SIGKILL, kill_s)):
        signal_group(record.pgid, sig)
        end = time.monotonic() + wait_s
        while group_members(record.pgid) and time.monotonic() < end:
            time.sleep(_POLL_S)
        if not group_members(record.pgid):
            break
    return True


def reap_recorded(path: Path, term_s: float = 15.0) -> ProcessRecord | None:
    """End what the record at ``path`` names (see :func:`kill_leftover`) and remove the record. Returns the
    record if a process was left to end, else None. Blocks: run it in a thread from the event loop."""
    record = read_record(path)
    killed = record is not None and kill_leftover(record, term_s)
    path.unlink(missing_ok=True)
    return record if killed else None


def _ticks_after_boot(when: float) -> int:
    """``when`` (a wall-clock time) in /proc/PID/stat starttime's unit: clock ticks after boot."""
    boot = _boot_time()
    return int((when - boot + _BOOT_TIME_SLACK_S) * os.sysconf("SC_CLK_TCK"))


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise OSError("/proc/stat has no btime line")
