"""The hot folder: a PDF dropped into ``inbox/`` (or a subfolder) becomes Markdown in ``outbox/``.

A watchdog observer thread reports changes to the event loop (call_soon_threadsafe); the loop owns all
state here. A file is taken once it is complete: size and mtime quiet for ``settle_s`` and a PDF trailer
(``%%EOF``) at its end — a copy still in progress has neither. Files already there at start are taken, a
periodic re-scan covers file systems that send no events, and a deleted-and-recreated inbox is watched
again. Same content (sha256) gives one job: the ``ocr`` kind decides what is a duplicate and refuses it at
submit; a refused copy moves to ``done/`` with a note naming the earlier job. When the job ends the source
moves to ``done/`` or to ``failed/`` with ``<name>.error.txt`` saying what happened and what to do.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import ObservedWatch

from daemon.core.atomic import write_atomic
from daemon.ctl.auth import user_name
from daemon.jobs.base import Caller, SpecError
from daemon.ocr.kind import DuplicateSource, sha256_of
from shared.config import Settings
from shared.protocol import JobInfo

log = logging.getLogger(__name__)

IGNORED_SUFFIXES = (".part", ".crdownload", ".tmp", "~", ".password", ".error.txt", ".note.txt")
# a file that never shows a PDF trailer is taken anyway after this many settle periods, so it fails with
# a reason instead of sitting in the inbox unexplained
TRAILER_PATIENCE = 10


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
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 2048))
            return b"%%EOF" in fh.read()
    except OSError:
        return False


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    quiet_since: float
    first_seen: float


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


class HotFolder:
    def __init__(self, settings: Settings, submit: Submit) -> None:
        """``submit(spec, name, caller)``: submits an ``ocr`` job (the job manager's submit)."""
        self.paths = settings.paths
        self.cfg = settings.config.hotfolder
        self._submit = submit
        self._candidates: dict[Path, _Candidate] = {}
        self._taking: set[Path] = set()
        self._observer: Any = None
        self._watch: ObservedWatch | None = None
        self._inbox_id: tuple[int, int] | None = None
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
        """(Re)watch the inbox; called at start and whenever the inbox was deleted and recreated."""
        inbox = self.paths.inbox
        inbox.mkdir(parents=True, exist_ok=True)
        if self._watch is not None:
            try:
                self._observer.unschedule(self._watch)
            except (KeyError, OSError):
                pass
        loop = asyncio.get_running_loop()
        self._watch = self._observer.schedule(_Handler(loop, self._seen), str(inbox), recursive=True)
        st = inbox.stat()
        self._inbox_id = (st.st_dev, st.st_ino)

    async def run(self) -> None:
        tick = max(0.05, min(self.cfg.settle_s / 4, 0.5))
        last_scan = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            try:
                st = self.paths.inbox.stat()
                current: tuple[int, int] | None = (st.st_dev, st.st_ino)
            except FileNotFoundError:
                current = None
            if current != self._inbox_id:
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
            st = path.stat()
        except FileNotFoundError:
            self._candidates.pop(path, None)
            return
        now = time.monotonic()
        c = self._candidates.get(path)
        if c is None:
            self._candidates[path] = _Candidate(st.st_size, st.st_mtime_ns, now, now)
        elif (c.size, c.mtime_ns) != (st.st_size, st.st_mtime_ns):
            c.size, c.mtime_ns, c.quiet_since = st.st_size, st.st_mtime_ns, now

    def _check_candidates(self) -> None:
        now = time.monotonic()
        for path, c in list(self._candidates.items()):
            self._seen(path)  # picks up changes that sent no event, drops vanished files
            if path not in self._candidates or now - c.quiet_since < self.cfg.settle_s:
                continue
            if not has_pdf_trailer(path) and now - c.first_seen < TRAILER_PATIENCE * max(self.cfg.settle_s, 1.0):
                continue
            del self._candidates[path]
            self._taking.add(path)
            task = asyncio.get_running_loop().create_task(self._take(path))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------------------------- taking

    async def _take(self, path: Path) -> None:
        try:
            digest = await asyncio.to_thread(sha256_of, path)
            rel = str(path.parent.relative_to(self.paths.inbox))
            spec = {"file": str(path), "sha256": digest, "source": "hotfolder", "rel_dir": "" if rel == "." else rel}
            owner = path.stat().st_uid
            caller = Caller(user=user_name(owner), uid=owner)
            job = await self._submit(spec, path.name, caller)
            log.info("hot folder: %s → job %d", path.relative_to(self.paths.inbox), job.id)
        except FileNotFoundError:
            pass  # removed before we got to it
        except DuplicateSource as dup:
            # our own job for this very file (seen again by a re-scan or after a restart) is no duplicate
            if Path(dup.earlier.spec.get("file", "")) != path:
                self._move_duplicate(path, dup.earlier)
        except SpecError as exc:
            self._move(path, "failed", str(exc))
        except Exception:
            log.exception("hot folder: could not take %s", path)
        finally:
            self._taking.discard(path)

    def _move_duplicate(self, path: Path, earlier: JobInfo) -> None:
        md = earlier.artifacts.get("markdown", "")
        state = "converted" if earlier.state == "succeeded" else f"being converted ({earlier.state})"

        def note(dest: Path) -> str:
            return (f"{path.name} has the same content as {Path(earlier.spec.get('file', '?')).name}, already "
                    f"{state} by job {earlier.id}{' → ' + md if md else ''}. Nothing was converted again. To "
                    f"convert it anyway: ftctl submit ocr --force {dest}\n")

        dest = self._move(path, "done", note=(".note.txt", note))
        log.info("hot folder: %s is a duplicate of job %d; moved to %s", path.name, earlier.id, dest)

    def _move(self, path: Path, where: str, error: str | None = None,
              note: tuple[str, Callable[[Path], str]] | None = None) -> Path:
        """Move a source out of the inbox; its explanation (error or note) is written first, so whoever
        sees the file in done/ or failed/ also finds why it is there."""
        rel = path.parent.relative_to(self.paths.inbox)
        dest_dir = (self.paths.done if where == "done" else self.paths.failed) / rel
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / path.name
        n = 1
        while dest.exists():
            dest = dest_dir / f"{path.stem}.{n}{path.suffix}"
            n += 1
        if error is not None:
            note = (".error.txt", lambda _dest: f"{path.name}: {error}\nWhat to do: fix the cause above, then "
                                                f"move the file back into {self.paths.inbox} to convert it again.\n")
        if note is not None:
            suffix, text = note
            write_atomic(dest.with_name(dest.name + suffix), text(dest))
        side = path.with_name(path.name + ".password")
        if side.exists():
            shutil.move(side, dest.with_name(dest.name + ".password"))
        shutil.move(path, dest)
        return dest

    def on_job_end(self, job: JobInfo) -> None:
        """Job end hook: move a hot-folder source to done/ or failed/ (interrupted ones stay to resume)."""
        if job.kind != "ocr" or job.spec.get("source") != "hotfolder" or job.state == "interrupted":
            return
        path = Path(job.spec["file"])
        if not path.exists():
            return
        try:
            path.relative_to(self.paths.inbox)
        except ValueError:
            return
        if job.state == "succeeded":
            self._move(path, "done", None)
        else:
            self._move(path, "failed", job.error or f"job {job.id} was {job.state}")
