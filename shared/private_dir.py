"""Is a socket directory safe to use? The one check the daemon (before it binds) and every client (before it
connects) make, so that neither talks through a place another local user controls.

A directory is trusted when nobody but its owner can change it (not group- or world-writable, not a symbolic
link) and its owner is someone the caller already trusts: the caller itself, root, or — for a system
service's ``/run/ftmllm`` made by systemd — whoever owns it, provided it sits in a parent only root can write
(``/run``), so nobody could have put it there but root. A ``/tmp/ftmllm-1000`` pre-created by another user
fails the owner test and is refused by name: ``refusing /tmp/ftmllm-1000: owned by eve``.

Hand-written rather than a library: it is a dozen ``lstat`` checks, and the wording of each refusal matters.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path


class UnsafePath(Exception):
    """One line: which path was refused, why, and what to do."""


def owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def socket_group(path: Path) -> str:
    """The group that may use a socket: the file's group, or its folder's when the file cannot be seen."""
    for p in (path, path.parent):
        try:
            return grp.getgrgid(p.stat().st_gid).gr_name
        except (OSError, KeyError):
            continue
    return "ftmllm"


def _only_root_can_create_in(parent: Path) -> bool:
    try:
        st = os.lstat(parent)
    except OSError:
        return False
    return st.st_uid == 0 and stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o022


def dir_problem(path: Path, uid: int | None = None) -> str | None:
    """Why ``path`` must not hold our sockets, or None when it may (a missing directory is no problem)."""
    uid = os.getuid() if uid is None else uid
    try:
        st = os.lstat(path)
    except (FileNotFoundError, PermissionError):
        return None  # nothing there, or nothing this user may see: connecting says which
    if stat.S_ISLNK(st.st_mode):
        return f"refusing {path}: it is a symbolic link (to {os.readlink(path)}); remove it"
    if not stat.S_ISDIR(st.st_mode):
        return f"refusing {path}: it is not a directory; remove it"
    if st.st_uid not in (uid, 0) and not _only_root_can_create_in(path.parent):
        return (f"refusing {path}: owned by {owner_name(st.st_uid)}, not by you ({owner_name(uid)}); "
                "remove it (ask an admin if you cannot) or use another dir ([paths] runtime_dir)")
    if st.st_mode & 0o022:
        who = "every user" if st.st_mode & 0o002 else "its group"
        return (f"refusing {path}: writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}), so the sockets in it "
                f"could be replaced; run `chmod go-w {path}` or remove it")
    return None


def socket_problem(path: Path, uid: int | None = None) -> str | None:
    """Why the socket file ``path`` must not be trusted, or None (a missing one is no problem here)."""
    problem = dir_problem(path.parent, uid)
    if problem:
        return problem
    try:
        st = os.lstat(path)
        dir_owner = os.lstat(path.parent).st_uid
    except (FileNotFoundError, PermissionError):
        return None  # a non-member cannot look into a 0750 socket dir: connecting tells her so
    if not stat.S_ISSOCK(st.st_mode):
        return f"refusing {path}: it is not a socket; remove it"
    if st.st_uid != dir_owner:
        return (f"refusing {path}: owned by {owner_name(st.st_uid)}, but its directory by "
                f"{owner_name(dir_owner)}; remove it")
    return None


def check_dir(path: Path, uid: int | None = None) -> None:
    problem = dir_problem(path, uid)
    if problem:
        raise UnsafePath(problem)


def check_socket(path: Path, uid: int | None = None) -> None:
    problem = socket_problem(path, uid)
    if problem:
        raise UnsafePath(problem)


def is_own_private_dir(path: Path) -> bool:
    """``path`` is a real directory of this user that nobody else can write (e.g. logind's /run/user/<uid>)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def make_private_dir(path: Path, mode: int = 0o700, gid: int | None = None) -> None:
    """Create ``path`` (parents as needed) or take an existing one we own; ``mode`` exactly, whatever the
    umask; with ``gid`` the directory's group becomes it (a system service's socket group). Raises
    UnsafePath for a directory someone else owns, or one others could write until now (what they may have
    left in it is not ours to trust: the owner removes it or tightens it by hand)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        check_dir(path)  # says why in its words
        raise UnsafePath(f"refusing {path}: owned by {owner_name(st.st_uid)}, not by this daemon's user "
                         f"({owner_name(os.getuid())}); remove it or set [paths] runtime_dir")
    check_dir(path)  # ours, but group- or world-writable
    if gid is not None and st.st_gid != gid:
        os.chown(path, -1, gid)
    os.chmod(path, mode)
