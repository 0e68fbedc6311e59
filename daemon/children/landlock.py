"""Confine a child with Landlock, so that even a bug (or a member's code that slipped through) in a trainer or
vLLM cannot read the store, other jobs' folders or the members' files the daemon's user may read.

Landlock (Linux ≥ 5.13) is unprivileged and works under ``NoNewPrivileges=yes``: a process restricts itself
and every process it starts, for good. The child is started as ``python -I …/landlock.py --read P … --write P
… -- argv…``: this module confines itself and then execs ``argv``. A wrapper rather than a
``preexec_fn``, because forking a threaded asyncio daemon and running Python before exec is not safe.

What a child may do: read (and execute) the system (/usr, /etc, /proc, /sys…) and the ``read`` folders;
create, change and remove files only in the ``write`` folders and /tmp, /dev/shm; open devices for reading
and writing (the GPUs: /dev/nvidia* are opened read-write and driven with ioctl). The network is not
restricted (torchrun rendezvous over localhost). A kernel without Landlock: :func:`wrap` logs once and the
child runs unconfined; an older Landlock (ABI < 5) handles fewer rights and confines what it knows.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NoReturn

log = logging.getLogger(__name__)

# generic syscall numbers (the same on x86_64 and aarch64)
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR, MAKE_REG = 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 8
MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # ABI 2, 3, 5
_FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV  # all a rule on a file (not a dir) may hold
_READ = EXECUTE | READ_FILE | READ_DIR
_WRITE = (1 << 16) - 1

# What every child reads: the system, shared libraries, /proc and /sys (CPU and GPU topology), /etc.
SYSTEM_READ = ("/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin", "/etc", "/opt", "/proc", "/sys")
# Shared memory (data loader workers, NCCL). Not /tmp: other users' files live there; a child gets its own
# TMPDIR (``tmp=``) instead.
SYSTEM_WRITE = ("/dev/shm",)

_warned = False


class LandlockUnavailable(OSError):
    """The kernel has no Landlock (too old, or not in its ``lsm=`` list)."""


def abi_version() -> int:
    """The kernel's Landlock ABI, 0 when there is none."""
    libc = ctypes.CDLL(None, use_errno=True)
    version = libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(int(version), 0)


def handled_rights(abi: int) -> int:
    rights = (1 << 13) - 1  # ABI 1: EXECUTE … MAKE_SYM
    if abi >= 2:
        rights |= REFER
    if abi >= 3:
        rights |= TRUNCATE
    if abi >= 5:
        rights |= IOCTL_DEV
    return rights


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]  # ABI 1's size: net and scopes stay unhandled


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def confine(read: Iterable[str | Path] = (), write: Iterable[str | Path] = ()) -> int:
    """Restrict this process (and all it starts) to the rules in the module docstring; returns the ABI used.
    Folders that do not exist are skipped. Raises LandlockUnavailable or OSError."""
    abi = abi_version()
    if abi <= 0:
        raise LandlockUnavailable(errno.EOPNOTSUPP, "this kernel has no Landlock")
    handled = handled_rights(abi)
    libc = ctypes.CDLL(None, use_errno=True)
    attr = _RulesetAttr(handled)
    fd = libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
                      ctypes.c_uint32(0))
    if fd < 0:
        raise OSError(ctypes.get_errno(), f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    try:
        rules = [(p, _READ) for p in (*SYSTEM_READ, *read)]
        rules += [("/dev", _READ | WRITE_FILE | IOCTL_DEV)]
        rules += [(p, _WRITE) for p in (*SYSTEM_WRITE, *write)]
        for path, rights in rules:
            _add_rule(libc, fd, str(path), rights & handled)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if libc.syscall(_SYS_RESTRICT_SELF, fd, ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)
    return abi


def _add_rule(libc: ctypes.CDLL, ruleset: int, path: str, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if not os.path.isdir(f"/proc/self/fd/{fd}"):
            rights &= _FILE_RIGHTS
        rule = _PathBeneath(rights, fd)
        if libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"landlock_add_rule {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def wrap(argv: Sequence[str], *, read: Iterable[str | Path] = (), write: Iterable[str | Path] = (),
         tmp: str | Path | None = None, python: str = sys.executable) -> list[str]:
    """``argv`` started confined (see the module docstring); ``argv`` itself where the kernel has no Landlock,
    said once in the daemon's log. ``tmp``: a folder the wrapper creates (0700) and gives the child as TMPDIR,
    writable."""
    global _warned
    if abi_version() <= 0:
        if not _warned:
            log.warning("this kernel has no Landlock: trainers and engines run unconfined, with all the rights of "
                        "the daemon's user (Linux ≥ 5.13 with landlock in its lsm= list confines them)")
            _warned = True
        return list(argv)
    # the file itself, isolated (-I): it needs no package on sys.path and no PYTHON* variable can change it
    args = [python, "-I", str(Path(__file__).resolve())]
    args += [a for p in read for a in ("--read", str(p))]
    args += [a for p in write for a in ("--write", str(p))]
    args += ["--tmp", str(tmp)] if tmp is not None else []
    return [*args, "--", *argv]


def main(args: Sequence[str]) -> NoReturn:
    given: dict[str, list[str]] = {"--read": [], "--write": [], "--tmp": []}
    rest = list(args)
    while rest and rest[0] != "--":
        flag = rest.pop(0)
        if flag not in given or not rest:
            _die(f"usage: landlock.py [--read P | --write P | --tmp DIR]… -- CMD ARG…; got {flag!r}")
        given[flag].append(rest.pop(0))
    if not rest[1:]:
        _die("no command after --")
    read, write = given["--read"], given["--write"]
    for tmp in given["--tmp"]:
        os.makedirs(tmp, mode=0o700, exist_ok=True)
        os.environ["TMPDIR"] = tmp
        write.append(tmp)
    try:
        confine(read, write)
    except OSError as exc:
        _die(f"cannot confine the child with Landlock ({exc}); it was not started")
    try:
        os.execvp(rest[1], rest[1:])
    except OSError as exc:
        _die(f"cannot start {rest[1]}: {exc}")


def _die(message: str) -> NoReturn:
    print(f"landlock: {message}", file=sys.stderr, flush=True)
    raise SystemExit(126)


if __name__ == "__main__":
    main(sys.argv[1:])
