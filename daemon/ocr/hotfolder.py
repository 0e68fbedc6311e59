"""The hot folder: a PDF dropped into ``inbox/`` (or a subfolder) becomes Markdown in ``outbox/``.

A watchdog observer thread reports changes to the event loop (call_soon_threadsafe); the loop owns all
state here. A file is taken once it is complete: size and mtime quiet for ``settle_s`` and a PDF trailer
(``%%EOF``) at its end — a copy still in progress has neither. Files already there at start are taken, a
periodic re-scan covers file systems that send no events, and a deleted-and-recreated inbox is watched
again. Same content (sha256) gives one job: the ``ocr`` kind decides what is a duplicate and refuses it at
submit; a refused copy moves to ``done/`` with a note naming the earlier job. When the job ends the source
moves to ``done/`` or to ``failed/`` with ``<name>.error.txt`` saying what happened and what to do.

What the daemon reads of the inbox is only what its owner could have handed over: a dropped file is opened
without following links (a symlink goes to ``failed/`` with the reason), its owner (``st_uid``) owns the job,
and it is refused when the owner is not the one who could have put it there: a file with other hard links,
one owned by a user outside the daemon's group, or a private file (no group or other read bit) moved in from
elsewhere (it keeps its old group; a file made in the inbox takes the inbox's). The bytes go into the spool
before the job starts, so a file replaced in the inbox later changes nothing. Every write (outputs, moves,
reason files) walks the daemon's folders without following links.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import ObservedWatch

from daemon.ctl.auth import user_name
from daemon.jobs.base import Caller, SpecError
from daemon.jobs.manager import QueueFull, RequestDenied
from daemon.ocr.kind import DuplicateSource, HotDrop
from daemon.spool.spool import Spool, SpoolError
from daemon.spool.tree import TreeError, exists_at, free_name, opened_dir, safe_name, safe_rel_dir, write_at
from shared.config import Settings
from shared.protocol import TERMINAL_STATES, JobInfo

log = logging.getLogger(__name__)

IGNORED_SUFFIXES = (".part", ".crdownload", ".tmp", "~", ".password", ".error.txt", ".note.txt")
# a file that never shows a PDF trailer is taken anyway after this many settle periods, so it fails with
# a reason instead of sitting in the inbox unexplained
TRAILER_PATIENCE = 10
MAX_PASSWORD_BYTES = 4096


class Refused(Exception):
    """A dropped file the hot folder will not convert; the message is the reason in its .error.txt."""


def ignored(path: Path, root: Path) -> bool:
    try:
        rel = path.relative_to(root)
    except ValueError:
        return True
    if any(part.startswith(".") for part in rel.parts):
        return True
    name = path.name.lower()
    return name.endswith(IGNORED_SUFFIXES) or not name.endswith(".pdf")


def has_pdf_trailer(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        size = os.fstat(fd).st_size
        return b"%%EOF" in os.pread(fd, 2048, max(0, size - 2048))
    except OSError:
        return False
    finally:
        os.close(fd)


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    quiet_since: float
    first_seen: float
    regular: bool  # a link or a pipe is refused at once: no trailer to wait for
    due: float = 0.0  # when to look at it next (monotonic): candidates are kept in this order


class _Handler(FileSystemEventHandler):
    def __init__(self, loop: asyncio.AbstractEventLoop, notify: Callable[[Path], None]) -> None:
        self.loop = loop
        self.notify = notify

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        for p in (event.src_path, getattr(event, "dest_path", "")):
            if p:
                path = Path(os.fsdecode(p))
                self.loop.call_soon_threadsafe(self.notify, path)


Submit = Callable[[dict[str, Any], str, Caller], Awaitable[JobInfo]]


class _NoRoom(Exception):
    """The dropped file's owner has a full queue: the file waits in the inbox (not copied, not moved)."""


class HotFolder:
    def __init__(self, settings: Settings, submit: Submit, spool: Spool, allowed: Callable[[int], bool],
                 has_room: Callable[[str], bool]) -> None:
        """``submit(spec, name, caller)``: submits an ``ocr`` job (the job manager's submit); ``spool``: where
        a taken file's bytes go; ``allowed(uid)``: may that user use the daemon (the socket group's rule)."""
        self.paths = settings.paths
        self.cfg = settings.config.hotfolder
        self.group = settings.config.daemon.socket_group
        self._submit = submit
        self.spool = spool
        self.allowed = allowed
        # the owner's queue has room ([daemon] max_queued_per_user): checked before the bytes are copied, so a
        # backlog waiting in the inbox costs one fstat per file and re-scan, not a copy into the spool
        self.has_room = has_room
        self._waiting: set[Path] = set()  # files left in the inbox for a full queue, said once each
        self._unsafe: set[Path] = set()  # paths below a linked folder, said once
        # files whose job is queued or running (they stay in the inbox until it ends), as they were taken:
        # a re-scan does not copy them into the spool again
        self._submitted: dict[Path, tuple[int, int, int, int]] = {}
        # in the order they are due to be looked at again: each tick looks only at the due ones, so 10,000 files
        # dropped at once cost one stat each per settle period, not one each per tick
        self._candidates: OrderedDict[Path, _Candidate] = OrderedDict()
        self._taking: set[Path] = set()
        self._observer: Any = None
        self._watch: ObservedWatch | None = None
        # the watched inbox, held open: while this descriptor lives its inode number cannot be reused, so a
        # recreated inbox always differs from it in (dev, ino), however quickly it was deleted and made again
        self._inbox_fd: int | None = None
        self._arm_failed = False  # said once, not every tick
        self._tasks: set[asyncio.Task[None]] = set()

    # --------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        for d in (self.paths.inbox, self.paths.outbox, self.paths.done, self.paths.failed):
            d.mkdir(parents=True, exist_ok=True)
        self._observer = Observer()
        self._observer.daemon = True
        self._arm()
        self._observer.start()
        self.rescan()

    def _arm(self) -> None:
        """(Re)watch the inbox; called at start and whenever the inbox was deleted or replaced."""
        inbox = self.paths.inbox
        if self._watch is not None:
            try:
                self._observer.unschedule(self._watch)
            except (KeyError, OSError):
                pass
            self._watch = None
        if self._inbox_fd is not None:
            os.close(self._inbox_fd)
            self._inbox_fd = None
        try:
            inbox.mkdir(parents=True, exist_ok=True)
            # opened before the watch is placed: if the folder is swapped in between, the watch is on the new
            # one, the descriptor on the old, and the next tick sees they differ and arms again
            fd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if not self._arm_failed:
                log.warning("hot folder: cannot open the inbox %s (%s); trying again every tick — make it a "
                            "folder the daemon's user can write", inbox, exc)
            self._arm_failed = True
            return
        self._arm_failed = False
        self._inbox_fd = fd
        try:
            self._watch = self._observer.schedule(_Handler(asyncio.get_running_loop(), self._seen), str(inbox),
                                                  recursive=True)
        except OSError as exc:  # deleted again between the open and the watch
            log.warning("hot folder: cannot watch the inbox %s (%s); trying again", inbox, exc)

    def _inbox_replaced(self) -> bool:
        if self._inbox_fd is None or self._watch is None:
            return True
        try:
            st = self.paths.inbox.stat()
        except FileNotFoundError:
            return True
        held = os.fstat(self._inbox_fd)
        return (st.st_dev, st.st_ino) != (held.st_dev, held.st_ino)

    async def run(self) -> None:
        tick = max(0.05, min(self.cfg.settle_s / 4, 0.5))
        last_scan = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            if self._inbox_replaced():
                log.warning("the inbox %s was removed or replaced; watching it again", self.paths.inbox)
                self._arm()
                self.rescan()
            elif time.monotonic() - last_scan >= self.cfg.rescan_s:
                self.rescan()
                last_scan = time.monotonic()
            self._check_candidates()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._inbox_fd is not None:
            os.close(self._inbox_fd)
            self._inbox_fd = None
        for t in self._tasks:
            t.cancel()

    # -------------------------------------------------------------------------------- discovery

    def rescan(self) -> None:
        for root, dirs, files in os.walk(self.paths.inbox):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for f in files:
                self._seen(Path(root) / f)

    def _seen(self, path: Path) -> None:
        if ignored(path, self.paths.inbox) or path in self._taking:
            return
        try:
            st = path.lstat()
        except FileNotFoundError:
            self._candidates.pop(path, None)
            return
        if not self._plain_folders(path) or self._submitted.get(path) == _identity(st):
            return
        now = time.monotonic()
        c = self._candidates.get(path)
        if c is None:
            self._candidates[path] = _Candidate(st.st_size, st.st_mtime_ns, now, now, stat.S_ISREG(st.st_mode),
                                                due=now + self.cfg.settle_s)
        elif (c.size, c.mtime_ns) != (st.st_size, st.st_mtime_ns):
            c.size, c.mtime_ns, c.quiet_since = st.st_size, st.st_mtime_ns, now
            c.due = now + self.cfg.settle_s
            self._candidates.move_to_end(path)

    def _plain_folders(self, path: Path) -> bool:
        """Whether every folder between the inbox and ``path`` is a real one: below a linked folder the file
        is someone else's tree, which the daemon neither converts nor moves."""
        here = self.paths.inbox
        for part in path.parent.relative_to(self.paths.inbox).parts:
            here = here / part
            try:
                linked = stat.S_ISLNK(here.lstat().st_mode)
            except FileNotFoundError:
                return False
            if linked:
                if path not in self._unsafe:
                    self._unsafe.add(path)
                    log.warning("hot folder: %s is a symbolic link to a folder; nothing below it is converted "
                                "or moved (drop files into real folders)", here)
                return False
        return True

    def _check_candidates(self) -> None:
        now = time.monotonic()
        settle = self.cfg.settle_s
        for _ in range(len(self._candidates)):  # each at most once: a settle of 0 requeues at "now"
            path, c = next(iter(self._candidates.items()))
            if c.due > now:
                break  # the rest are due later
            c.due = now + settle
            self._candidates.move_to_end(path)
            self._seen(path)  # picks up changes that sent no event, drops vanished files
            if path not in self._candidates or now - c.quiet_since < settle:
                continue
            if c.regular and not has_pdf_trailer(path) and \
                    now - c.first_seen < TRAILER_PATIENCE * max(settle, 1.0):
                continue
            del self._candidates[path]
            self._taking.add(path)
            task = asyncio.get_running_loop().create_task(self._take(path))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------------------------- taking

    async def _take(self, path: Path) -> None:
        rel = path.relative_to(self.paths.inbox)
        rel_dir = "" if str(rel.parent) == "." else str(rel.parent)
        try:
            # in the loop (the store is the loop's): one lstat tells whose queue it would join
            owner_uid = os.lstat(path).st_uid
            if not self.has_room(user_name(owner_uid)):
                raise _NoRoom(f"{user_name(owner_uid)} has [daemon] max_queued_per_user jobs queued")
            spooled, owner, password = await asyncio.to_thread(self._spool_drop, rel)
            caller = Caller(user=user_name(owner), uid=owner)
            spec = {"spool": spooled.sha256, "name": path.name, "hot_drop": HotDrop(rel_dir=rel_dir, password=password,
                                                                                     dropped=str(rel))}
            if self.cfg.adapter:
                spec["adapter"] = self.cfg.adapter
            job = await self._submit(spec, path.name, caller)
            self._submitted[path] = spooled.identity
            self._waiting.discard(path)
            log.info("hot folder: %s → job %d (owner %s)", rel, job.id, caller.user)
        except FileNotFoundError:
            pass  # removed before we got to it
        except DuplicateSource as dup:
            # our own job for this very file (seen again after a restart) is no duplicate
            if dup.earlier.spec.get("dropped") != str(rel):
                self._move_duplicate(rel, dup.earlier)
            elif dup.earlier.state not in TERMINAL_STATES:
                self._submitted[path] = spooled.identity
        except (QueueFull, _NoRoom) as exc:
            if path not in self._waiting:
                self._waiting.add(path)
                log.warning("hot folder: %s stays in the inbox until its owner's queue has room: %s", rel,
                            exc.message if isinstance(exc, QueueFull) else exc)
        except Refused as exc:
            self._move(rel, "failed", str(exc))
        except (SpecError, RequestDenied) as exc:
            self._move(rel, "failed", exc.message if isinstance(exc, RequestDenied) else str(exc))
        except Exception:
            log.exception("hot folder: could not take %s", path)
        finally:
            self._taking.discard(path)

    def _spool_drop(self, rel: Path) -> tuple[_Taken, int, str]:
        """Open the dropped file without following links, check who could have put it there, and copy it
        into the spool as its owner's: (the spool entry, the owner's uid, its .password sidecar or "")."""
        name = rel.name
        try:
            with opened_dir(self.paths.inbox, str(rel.parent)) as folder:
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                                 dir_fd=folder)
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        raise Refused("is a symbolic link; the hot folder converts only files dropped as such "
                                      "(copy the file itself in with cp)") from None
                    if exc.errno == errno.EACCES:
                        raise Refused(f"the daemon's user cannot read it; make it readable for group "
                                      f"{self.group or 'of the daemon'} (chmod g+r) and drop it again") from None
                    raise
                try:
                    st = os.fstat(fd)
                    self._check_dropped(st, folder)
                    password = self._password_of(folder, name, st.st_uid)
                    try:
                        spooled = self.spool.put(fd, st.st_uid)
                    except SpoolError as exc:
                        raise Refused(str(exc)) from None
                finally:
                    os.close(fd)
        except TreeError as exc:
            raise Refused(str(exc)) from None
        return _Taken(spooled.sha256, _identity(st)), st.st_uid, password

    def _check_dropped(self, st: os.stat_result, folder: int) -> None:
        owner = user_name(st.st_uid)
        if not stat.S_ISREG(st.st_mode):
            raise Refused("is not a regular file (a pipe, device or folder); drop PDF files")
        if st.st_nlink > 1:
            raise Refused(f"has {st.st_nlink} hard links, so it also lies elsewhere and who put it here cannot be "
                          f"told; {owner} can copy it in with cp instead of linking it")
        if not (st.st_uid in (0, os.getuid()) or self.allowed(st.st_uid)):
            raise Refused(f"belongs to {owner}, who may not use ftmllm (not in group {self.group}); only "
                          "members' files are converted")
        if not st.st_mode & (stat.S_IRGRP | stat.S_IROTH) and st.st_gid != os.fstat(folder).st_gid:
            raise Refused(f"is private to {owner} (mode {stat.S_IMODE(st.st_mode):04o}) and was moved in from "
                          f"elsewhere, so whoever moved it need not be {owner}; {owner} can copy it in with cp")

    def _password_of(self, folder: int, name: str, owner: int) -> str:
        """The PDF's ``.password`` sidecar, if its owner put it there."""
        side = f"{name}.password"
        try:
            fd = os.open(side, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
        except OSError:
            return ""
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != owner or st.st_nlink > 1:
                log.warning("hot folder: ignored %s: not a plain file of %s, who owns the PDF", side,
                            user_name(owner))
                return ""
            raw = os.read(fd, MAX_PASSWORD_BYTES)
        finally:
            os.close(fd)
        try:
            return raw.decode("utf-8").strip("\r\n")
        except UnicodeDecodeError:
            return ""

    def _move_duplicate(self, rel: Path, earlier: JobInfo) -> None:
        md = earlier.artifacts.get("markdown", "")
        state = "converted" if earlier.state == "succeeded" else f"being converted ({earlier.state})"

        def note(dest: Path) -> str:
            return (f"{rel.name} has the same content as {earlier.spec.get('name', '?')}, already {state} by job "
                    f"{earlier.id}{' → ' + md if md else ''}. Nothing was converted again. To convert it anyway: "
                    f"ftctl submit ocr --force {dest}\n")

        dest = self._move(rel, "done", note=(".note.txt", note))
        log.info("hot folder: %s is a duplicate of job %d; moved to %s", rel.name, earlier.id, dest)

    def _move(self, rel: Path, where: str, error: str | None = None,
              note: tuple[str, Callable[[Path], str]] | None = None) -> Path | None:
        """Move a source out of the inbox; its explanation (error or note) is written first, so whoever
        sees the file in done/ or failed/ also finds why it is there. None when it could not be moved."""
        name = rel.name
        root = self.paths.done if where == "done" else self.paths.failed
        dest_rel = safe_rel_dir(str(rel.parent))
        if error is not None:
            note = (".error.txt", lambda _dest: f"{name}: {error}\nWhat to do: fix the cause above, then move the "
                                                f"file back into {self.paths.inbox} to convert it again.\n")
        try:
            with opened_dir(self.paths.inbox, str(rel.parent)) as src, \
                    opened_dir(root, dest_rel, create=True) as dst:
                if not exists_at(src, name):
                    return None
                dest_name = free_name(dst, safe_name(name))
                dest = root / dest_rel / dest_name
                if note is not None:
                    suffix, text = note
                    write_at(dst, dest_name + suffix, text(dest))
                side = f"{name}.password"
                if exists_at(src, side):
                    _move_at(src, side, dst, dest_name + ".password")
                _move_at(src, name, dst, dest_name)
        except (TreeError, OSError) as exc:
            log.warning("hot folder: could not move %s to %s/ (%s); it stays where it is", rel, where, exc)
            return None
        return dest

    def on_job_end(self, job: JobInfo) -> None:
        """Job end hook: move a hot-folder source to done/ or failed/ (interrupted ones stay to resume)."""
        if job.kind != "ocr" or job.spec.get("source") != "hotfolder" or job.state == "interrupted":
            return
        dropped = job.spec.get("dropped")
        if not isinstance(dropped, str) or not dropped:
            return
        self._submitted.pop(self.paths.inbox / dropped, None)
        if job.state == "succeeded":
            self._move(Path(dropped), "done", None)
        else:
            self._move(Path(dropped), "failed", job.error or f"job {job.id} was {job.state}")


@dataclass(frozen=True)
class _Taken:
    sha256: str
    identity: tuple[int, int, int, int]


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """The same file, unchanged: a file replaced or rewritten in place differs in one of these."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _move_at(src: int, name: str, dst: int, dest_name: str) -> None:
    """Rename within one file system; across two, copy (never following a link) and remove the original."""
    try:
        os.rename(name, dest_name, src_dir_fd=src, dst_dir_fd=dst)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=src)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    write_at(dst, dest_name, b"".join(chunks))
    os.unlink(name, dir_fd=src)
