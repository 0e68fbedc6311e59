"""Run a command in a network namespace of its own, where only ``lo`` exists: its TCP listeners (vLLM's engine
opens a dozen on 127.0.0.1 for torch.distributed/gloo) are out of every other local user's reach.

Run as a script, not imported by the child: ``[sys.executable, "-I", "-S", <this file>, "--", argv...]``
(:func:`launcher_argv`). It makes the namespace, brings ``lo`` up and execs ``argv``, so the pid (and the child
record the daemon wrote for it) stays the same. Standard library only, and run by path with ``-I -S``: the
child's working directory is the engine's workdir, and nothing found there or in PYTHON* variables may take
part in making the namespace.

* root: ``unshare(CLONE_NEWNET)``. A root without CAP_SYS_ADMIN (a container) falls back to the next way.
* any other user: ``unshare(CLONE_NEWUSER | CLONE_NEWNET)`` with the user's own uid and gid mapped to
  themselves (``setgroups`` denied, as the kernel requires of an unprivileged gid_map). Files keep the access
  they had: the kernel checks the real ids and supplementary groups, which the map does not change.
* ``lo`` is brought up before exec: afterwards an unprivileged process has no capability in the namespace.

Failure to make the namespace ends the launcher with :data:`EXIT_NO_NAMESPACE` and one line on stderr saying
why; the command is then not run at all (the caller decides whether a shared network is acceptable).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
# sysexits' EX_OSERR; the supervisor tells it from vLLM's own exit codes by the line the launcher writes
EXIT_NO_NAMESPACE = 71
EXIT_NO_EXEC = 127
MARK = "ftmllm private network:"  # starts every line the launcher itself writes to the log


class NamespaceError(OSError):
    pass


def launcher_argv(argv: list[str]) -> list[str]:
    """The argv that runs ``argv`` in a private network namespace."""
    return [sys.executable, "-I", "-S", os.path.abspath(__file__), "--", *argv]


def _unshare(flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise NamespaceError(err, os.strerror(err))


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def enter_private_network() -> str:
    """Move this (single-threaded) process into a new network namespace with ``lo`` up; returns how."""
    uid, gid = os.geteuid(), os.getegid()
    how = ""
    if uid == 0:
        try:
            _unshare(CLONE_NEWNET)
            how = "network namespace"
        except NamespaceError as exc:
            if exc.errno != errno.EPERM:
                raise
    if not how:
        _unshare(CLONE_NEWUSER | CLONE_NEWNET)
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
        _write("/proc/self/gid_map", f"{gid} {gid} 1\n")
        how = "user and network namespace"
    _bring_up_lo()
    return how


def _bring_up_lo() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sh22x", b"lo", 0)
        flags = struct.unpack("16sh22x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sh22x", b"lo", flags | IFF_UP))


def why_not(exc: OSError) -> str:
    """One line: what failed and what to change."""
    cause = f"{exc.strerror or exc}" + (f" ({exc.filename})" if getattr(exc, "filename", None) else "")
    return (f"{MARK} cannot make a private network namespace for the engine: {cause}; if the daemon runs under "
            "systemd, its unit needs RestrictNamespaces=user net (RestrictNamespaces=yes forbids it; see the "
            "shipped systemd/ftmllmd.service), else unprivileged user namespaces are off on this host "
            "(sysctl kernel.unprivileged_userns_clone, user.max_user_namespaces, AppArmor's "
            "apparmor_restrict_unprivileged_userns); or set vllm.private_network = false to accept that every "
            "local user can reach the engine's internal TCP ports")


def main(args: list[str]) -> int:
    if not args or args[0] != "--" or len(args) < 2:
        print(f"usage: {os.path.basename(sys.argv[0])} -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    argv = args[1:]
    try:
        enter_private_network()
    except OSError as exc:
        print(why_not(exc), file=sys.stderr, flush=True)
        return EXIT_NO_NAMESPACE
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"{MARK} cannot run {argv[0]}: {exc.strerror}", file=sys.stderr, flush=True)
    return EXIT_NO_EXEC


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
