"""Writing inside the daemon's own tree, whatever names and links members put in front of it.

Names that come from members (a PDF's name, a hot-folder subfolder) become one safe path component each
(:func:`safe_name`); folders are walked one component at a time with ``O_NOFOLLOW | O_DIRECTORY`` from a
root the admin configured, so a symlink planted anywhere below the root stops the walk instead of leading
out of the tree; files are written to a temp name and renamed (a reader never sees half a file), with the
mode the process umask gives (0640 under the unit's UMask=0027), never a chmod to something wider.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# one component, in bytes: ext4 and most file systems allow 255; room is left for ".job123.json" and
# temp-name decorations
MAX_NAME_BYTES = 180
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")


class TreeError(Exception):
    """A path below a root cannot be used safely (a link, not a folder); the message says which."""


def safe_name(name: str, fallback: str = "document") -> str:
    """``name`` as one harmless path component: no separators, NUL or control characters, not hidden, not
    ``.``/``..``, at most MAX_NAME_BYTES bytes of UTF-8 (the suffix is kept when it is cut)."""
    name = unicodedata.normalize("NFC", name)
    name = _UNSAFE.sub("_", name).strip().lstrip(".").strip()
    if not name:
        return fallback
    encoded = name.encode("utf-8", errors="replace")
    if len(encoded) > MAX_NAME_BYTES:
        stem, dot, suffix = name.rpartition(".")
        keep = f".{suffix}" if dot and stem and 0 < len(suffix.encode()) <= 16 else ""
        room = MAX_NAME_BYTES - len(keep.encode())
        name = name[: len(name) - len(keep)] if keep else name
        name = name.encode("utf-8")[:room].decode("utf-8", errors="ignore").rstrip() + keep
    return name or fallback


def safe_rel_dir(rel: str) -> str:
    """A relative folder path made of safe components ("" for none); ``..`` and empty parts are dropped."""
    parts = [safe_name(p, "") for p in Path(rel).parts if p not in ("", ".", "..", "/")]
    return "/".join(p for p in parts if p)


def _open_child(parent: int, name: str, create: bool) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, flags, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise
    try:
        os.mkdir(name, 0o777, dir_fd=parent)  # the umask decides the mode, as for every folder we make
    except FileExistsError:
        pass
    return os.open(name, flags, dir_fd=parent)


def open_dir(root: Path, rel: str = "", create: bool = False) -> int:
    """A descriptor of ``root/rel`` reached without following any link below ``root``; the caller closes it.

    Raises TreeError when a component is a link or not a folder, FileNotFoundError when one is missing
    (and ``create`` is false)."""
    if create:
        root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    walked = root
    try:
        for part in Path(rel).parts:
            if part in ("", "."):
                continue
            if part == ".." or "/" in part or "\x00" in part:
                raise TreeError(f"{walked / part}: not a plain folder name")
            walked = walked / part
            try:
                child = _open_child(fd, part, create)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise TreeError(f"{walked}: is a symbolic link or not a folder; the daemon does not "
                                    "follow links in its folders") from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def opened_dir(root: Path, rel: str = "", create: bool = False) -> Iterator[int]:
    fd = open_dir(root, rel, create)
    try:
        yield fd
    finally:
        os.close(fd)


def exists_at(dir_fd: int, name: str) -> bool:
    """Whether ``name`` is there at all (a dangling link counts)."""
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def write_at(dir_fd: int, name: str, data: bytes | str, *, replace: bool = True, mode: int = 0o666) -> bool:
    """Write ``name`` in the folder ``dir_fd`` atomically, with ``mode`` less the umask.

    ``replace=False`` claims the name: nothing is written and False is returned when something is there
    already (a link to the temp file either takes the free name or fails, so two writers never share it)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = f".{name[:60]}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return True
        try:
            os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            return False
        return True
    finally:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass


def free_name(dir_fd: int, name: str) -> str:
    """``name``, or ``stem.1.suffix``, ``stem.2.suffix`` … : the first that is not taken in ``dir_fd``."""
    if not exists_at(dir_fd, name):
        return name
    stem, dot, suffix = name.rpartition(".")
    if not dot or not stem:
        stem, suffix = name, ""
    n = 1
    while True:
        candidate = f"{stem}.{n}{'.' + suffix if suffix else ''}"
        if not exists_at(dir_fd, candidate):
            return candidate
        n += 1
