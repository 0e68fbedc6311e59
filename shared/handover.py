"""Handing a file to ftmllmd: the client opens it with its own rights and passes the open file.

Every file a job reads must be one its submitter can read. The daemon cannot check that with its own
rights (it may read more than the member), so the client opens the file itself and passes the open
descriptor over ``handover.sock`` (SCM_RIGHTS on a ``SOCK_SEQPACKET`` Unix socket beside ``ctl.sock``):
a descriptor exists only if the kernel let the caller open the file. The daemon learns the caller from
SO_PEERCRED, copies the bytes into its content-addressed spool (``<state>/spool/<sha256>``) while the
caller waits, and answers the sha256 and size. A job then names that sha256; only a user who handed those
bytes over may name it.

The wire format, one datagram each way per file: the client sends :class:`HandoverRequest` (msgpack) with
exactly one descriptor; the daemon answers :class:`HandoverReply`. A connection may hand over many files in
a row (a dataset's images).
"""

from __future__ import annotations

import array
import getpass
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import msgspec

from shared.config import Paths
from shared.private_dir import socket_group, socket_problem

HANDOVER_VERSION = 1
# a request or reply datagram is a few dozen bytes; anything longer is not ours
MAX_DATAGRAM = 4096
# the reply comes once the daemon has copied and hashed the file: allow for a slow disk, never forever
BASE_TIMEOUT_S = 30.0
SLOWEST_BYTES_PER_S = 20 * 1024 * 1024


class HandoverRequest(msgspec.Struct, forbid_unknown_fields=True):
    v: int


class HandoverReply(msgspec.Struct, omit_defaults=True):
    sha256: str = ""
    size: int = 0
    error: str = ""  # why the daemon did not take the file, one line


class HandoverRefused(Exception):
    """This file cannot be handed over; the message names the file and what to do."""


class HandoverUnavailable(Exception):
    """No daemon takes files there (not running, not allowed, too old); the message says what to do."""


def _not_running(paths: Paths, why: str) -> str:
    return (f"ftmllmd is {why} (looked for {paths.handover_socket}); start it with `systemctl start ftmllmd`, "
            "or run `ftmllmd` in another terminal (`make run` in a checkout)")


@dataclass(frozen=True)
class Handed:
    sha256: str  # the daemon's own hash of the bytes it keeps: what a job names
    size: int
    name: str  # the file's own name, for job names and messages


def _me() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def open_readable(path: Path) -> int:
    """Open ``path`` for reading with the caller's own rights; HandoverRefused says why not."""
    try:
        # O_NONBLOCK: a FIFO named by mistake must not hang the client; it is refused below
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise HandoverRefused(f"{path}: no such file; check the path") from None
    except PermissionError:
        raise HandoverRefused(f"{_me()} cannot read {path} (permission denied); only files you can read "
                              "can be handed to ftmllmd: ask its owner to share it, or copy it") from None
    except OSError as exc:
        raise HandoverRefused(f"{path}: cannot be opened ({exc.strerror}); check the path") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise HandoverRefused(f"{path}: {what}; give a file")
    return fd


class Handover:
    """One connection to the daemon's ``handover.sock``; hands over one file after another."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        path = paths.handover_socket
        # open files must never go to a socket another user planted: they would read what we can
        problem = socket_problem(path)
        if problem:
            raise HandoverUnavailable(problem)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            sock.close()
            if paths.ctl_socket.exists():
                raise HandoverUnavailable(f"ftmllmd at {paths.runtime_dir} has no {path.name}: it is older than "
                                          "this client; upgrade ftmllmd to the version of ftctl/ftui") from None
            raise HandoverUnavailable(_not_running(paths, "not running")) from None
        except ConnectionRefusedError:
            sock.close()
            raise HandoverUnavailable(_not_running(paths, "not running (stale socket file)")) from None
        except PermissionError:
            sock.close()
            group = socket_group(path)
            raise HandoverUnavailable(f"not allowed to connect to {path}: ask an admin to add you to group "
                                      f"'{group}' (`sudo usermod -aG {group} $USER`, then log in again)") from None
        self._sock = sock

    def __enter__(self) -> Handover:
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def file(self, path: Path) -> Handed:
        """Open ``path`` with the caller's rights and hand it over."""
        fd = open_readable(path)
        try:
            return self.fd(fd, path.name, shown=str(path))
        finally:
            os.close(fd)

    def fd(self, fd: int, name: str, shown: str = "") -> Handed:
        """Hand over an open file (a memfd too); ``shown`` names it in messages."""
        shown = shown or name
        size = os.fstat(fd).st_size
        self._sock.settimeout(BASE_TIMEOUT_S + size / SLOWEST_BYTES_PER_S)
        request = msgspec.msgpack.encode(HandoverRequest(v=HANDOVER_VERSION))
        try:
            self._sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
            data = self._sock.recv(MAX_DATAGRAM)
        except TimeoutError:
            raise HandoverUnavailable(f"ftmllmd took longer than {self._sock.gettimeout():.0f}s to take {shown}; "
                                      "see `ftctl status` and the daemon's log") from None
        except (BrokenPipeError, ConnectionResetError):
            data = b""
        if not data:
            raise HandoverUnavailable(f"ftmllmd closed {self.paths.handover_socket} without taking {shown}: you "
                                      f"may not be in group '{socket_group(self.paths.handover_socket)}', or it "
                                      "stopped; see `ftctl status`")
        try:
            reply = msgspec.msgpack.decode(data, type=HandoverReply)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise HandoverUnavailable(f"ftmllmd answered the handover of {shown} with something this client "
                                      "cannot read; use the same ftmllm version on both sides") from None
        if reply.error:
            raise HandoverRefused(f"{shown}: {reply.error}")
        return Handed(sha256=reply.sha256, size=reply.size, name=name)


def hand_over(paths: Paths, path: Path) -> Handed:
    """Hand one file over (blocking): what ``ftctl submit ocr`` and ftui's Try screen do."""
    with Handover(paths) as h:
        return h.file(path)
