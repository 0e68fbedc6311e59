"""The spool: files clients handed over, kept by content under ``<state>/spool``.

``<sha256>`` holds the bytes (0600, written to a temp name, synced, renamed: what a job reads is frozen
and whole); ``<sha256>.uids`` lists, one a line, the users who handed those bytes over. A job may name an
entry only when its submitter is on that list, so knowing a hash gives nobody a file. Entries no queued,
running or interrupted job names (the spec's ``sha256``) go ``spool.keep_hours`` after their last use.

The spool is files only, no memory: the handover server (part.py) writes it, OCR jobs, ``ask`` and
``dataset add`` look entries up through their own :class:`Spool` over the same folder.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from daemon.ctl.auth import user_name
from shared.config import Settings, SpoolConfig

log = logging.getLogger(__name__)

MIB = 1024 * 1024
GIB = 1024 * MIB
SHA256_RE = re.compile(r"[0-9a-f]{64}")
UIDS_SUFFIX = ".uids"
TEMP_PREFIX = ".in."
# a temp file this old is what a crash left behind
STALE_TEMP_S = 3600.0
_BLOCK = 1 * MIB


class SpoolError(Exception):
    """Why a file was not taken, or an entry cannot be used: one line for the client."""


@dataclass(frozen=True)
class Spooled:
    sha256: str
    size: int
    path: Path


class Spool:
    def __init__(self, root: Path, cfg: SpoolConfig) -> None:
        self.root = root
        self.cfg = cfg

    @classmethod
    def of(cls, settings: Settings) -> Spool:
        return cls(settings.paths.state_dir / "spool", settings.config.spool)

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)  # whatever the umask: nobody but the daemon lists what was handed over

    # ---------------------------------------------------------------------------------- taking a file

    def put(self, fd: int, uid: int) -> Spooled:
        """Copy the open file ``fd`` into the spool for ``uid`` (blocking: call it in a thread)."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SpoolError("not a regular file (a folder, pipe or device); hand over a file")
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        if flags & getattr(os, "O_PATH", 0) or flags & os.O_ACCMODE == os.O_WRONLY:
            raise SpoolError("the file was not opened for reading; open it for reading and hand it over again")
        limit = self.cfg.max_file_mib * MIB
        if st.st_size > limit:
            raise SpoolError(f"{st.st_size / MIB:,.0f} MiB is more than this daemon takes (spool.max_file_mib = "
                             f"{self.cfg.max_file_mib}); ask an admin to raise it")
        self._check_room(st.st_size)
        tmp = self.root / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        out = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            size, digest = _copy(fd, out, limit)
            os.fsync(out)
        except BaseException:
            os.close(out)
            tmp.unlink(missing_ok=True)
            raise
        os.close(out)
        dest = self.root / digest
        if dest.exists():
            tmp.unlink()
            os.utime(dest)
        else:
            os.rename(tmp, dest)
            _sync_dir(self.root)
        self._grant(digest, uid)
        return Spooled(sha256=digest, size=size, path=dest)

    def _check_room(self, size: int) -> None:
        vfs = os.statvfs(self.root)
        free = vfs.f_bavail * vfs.f_frsize
        if free - size < self.cfg.min_free_gib * GIB:
            raise SpoolError(f"the daemon's disk has {free / GIB:.1f} GiB free, too little for {size / MIB:,.0f} "
                             f"MiB more (spool.min_free_gib = {self.cfg.min_free_gib}); ask an admin to make room")

    def _grant(self, digest: str, uid: int) -> None:
        if uid in self.granted(digest):
            return
        # O_APPEND: two handovers of the same bytes at once each add their line whole
        fd = os.open(self.root / f"{digest}{UIDS_SUFFIX}", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{uid}\n".encode())
        finally:
            os.close(fd)

    def granted(self, digest: str) -> set[int]:
        try:
            text = (self.root / f"{digest}{UIDS_SUFFIX}").read_text(encoding="ascii")
        except (FileNotFoundError, UnicodeDecodeError):
            return set()
        return {int(line) for line in text.split() if line.isdigit()}

    # ------------------------------------------------------------------------------------ using one

    def lookup(self, digest: str, uid: int) -> Path:
        """The entry ``digest`` if ``uid`` handed those bytes over; SpoolError otherwise.

        Whether the bytes are there for someone else is not said: a hash must not tell who has what."""
        if not isinstance(digest, str) or not SHA256_RE.fullmatch(digest):
            raise SpoolError(f"'{str(digest)[:80]}' is not a sha256 from handover.sock; the client hands the file "
                             "over first (ftctl and ftui do)")
        path = self.root / digest
        if uid not in self.granted(digest) or not path.is_file():
            raise SpoolError(f"no file with sha256 {digest[:12]}… was handed over by {user_name(uid)} (or it was "
                             f"removed {self.cfg.keep_hours:g} h after its last use); hand the file over again")
        return path

    def path(self, digest: str) -> Path | None:
        """The entry a job was accepted with (no owner check: the job's submit did it), None if gone."""
        if not SHA256_RE.fullmatch(digest):
            return None
        path = self.root / digest
        return path if path.is_file() else None

    def touch(self, digest: str) -> None:
        """The entry was used: its keep_hours start again."""
        if SHA256_RE.fullmatch(digest):
            try:
                os.utime(self.root / digest)
            except FileNotFoundError:
                pass

    # ---------------------------------------------------------------------------------- collecting

    def collect(self, held: Collection[str], now: float | None = None) -> int:
        """Remove entries unused for keep_hours that no job in ``held`` needs, and temp files a crash left;
        returns how many entries went."""
        now = time.time() if now is None else now
        keep_s = self.cfg.keep_hours * 3600
        removed = 0
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return 0
        present = set(names)
        for name in names:
            path = self.root / name
            try:
                age = now - path.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            if name.startswith(TEMP_PREFIX):
                if age > STALE_TEMP_S:
                    path.unlink(missing_ok=True)
            elif SHA256_RE.fullmatch(name):
                if name not in held and age > keep_s:
                    (self.root / f"{name}{UIDS_SUFFIX}").unlink(missing_ok=True)
                    path.unlink(missing_ok=True)
                    removed += 1
            elif name.endswith(UIDS_SUFFIX) and name[: -len(UIDS_SUFFIX)] not in present and age > STALE_TEMP_S:
                path.unlink(missing_ok=True)
        return removed


def _copy(src: int, dst: int, limit: int) -> tuple[int, str]:
    """All of ``src`` from its start into ``dst`` in one pass, hashing each block on its way: the hash is of
    the bytes written, so a writer still busy with the source cannot make the name and the content disagree.
    (One pass over a buffer beats a kernel copy followed by a hash of the copy: the hash is what costs, and
    reading the copy back through mmap adds page faults.) Refuses past ``limit`` bytes (a file still growing)."""
    h = hashlib.sha256()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    offset = 0
    while True:
        try:
            n = os.preadv(src, [buf], offset)
        except OSError as exc:
            if exc.errno in (errno.EBADF, errno.EINVAL, errno.EISDIR):
                raise SpoolError("the file cannot be read through the descriptor handed over; open it for "
                                 "reading and hand it over again") from None
            raise SpoolError(f"reading the file failed ({exc.strerror}); check it and hand it over again") from None
        if n == 0:
            return offset, h.hexdigest()
        offset += n
        if offset > limit:
            raise SpoolError(f"the file grew past spool.max_file_mib ({limit // MIB} MiB) while it was handed "
                             "over; hand it over when it is complete")
        block = view[:n]
        h.update(block)
        while block:
            block = block[os.write(dst, block):]


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
