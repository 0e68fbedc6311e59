"""The ``ocr`` job kind: validate → per page (render or text layer → engine → stored result) → Markdown.

The daemon reads no path a client names: a client hands the PDF over first (shared/handover.py) and the spec
names the spool entry handover.sock answered, which only a user who handed those bytes over may name; the
hot folder spools what it takes the same way, as the dropped file's owner. The fingerprint (``sha256``),
``source`` and ``rel_dir`` are the daemon's own, never a client's. A password never enters the spec: it is
kept in a 0600 file in the job's dir (the spec says ``password: set``) and removed when the job ends.

Each finished page is stored (text, method, timings) the moment it is done; a job that runs again (after
a crash, a daemon restart or a retry) starts at the first page not done, so no page is converted twice.
The assembled ``<stem>.md`` and its sidecar ``<stem>.json`` go to the outbox only (``rel_dir`` mirrors a hot
folder subfolder), written without following links, with the umask's mode, never over another owner's
output: that name taken, the job writes ``<stem>.job<ID>.md``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from daemon.core.store import Store, UnknownJob
from daemon.jobs.base import Caller, JobContext, JobFailed, Resources, SpecError
from daemon.jobs.queue import order_key
from daemon.ocr.engine import (
    Engine,
    EngineChoice,
    PageResult,
    job_adapter,
    load_page_input,
    page_max_pixels,
    run_page,
)
from daemon.ocr.engine import TextDelta as EngineDelta
from daemon.ocr.errors import OcrError
from daemon.ocr.pages import PageScheduler
from daemon.ocr.pdfworker import PdfWorkerPool
from daemon.ocr.signals import checks_layer, page_signals
from daemon.ocr.signals import collect as collect_signals
from daemon.spool.spool import Spool, SpoolError
from daemon.spool.tree import TreeError, exists_at, opened_dir, safe_name, safe_rel_dir, write_at
from shared.config import Settings
from shared.protocol import TERMINAL_STATES, JobInfo, PageInfo, TextDelta

log = logging.getLogger(__name__)

PASSWORD_FILE = "password"
INPUT_DIR = "input"
# a password between validate and on_created (the same turn of the event loop, in practice)
_PENDING = "pending:"
_PENDING_TTL_S = 60.0

# spec keys a client may not send, and why
REFUSED_KEYS = {
    "file": "ocr spec: 'file' names a path for the daemon to read, and the daemon reads only files handed over to "
            "it; use ftctl submit ocr FILE (or ftui) of the daemon's version, which hand the file over",
    "out_dir": "ocr spec: 'out_dir' is gone: the daemon writes only into its outbox; `ftctl submit ocr FILE --out-dir "
               "DIR` writes the results into DIR with your own rights",
    "sha256": "ocr spec: 'sha256' is the daemon's own hash of the file handed over; leave it out",
    "source": "ocr spec: 'source' is set by the daemon (ctl or hotfolder); leave it out",
    "rel_dir": "ocr spec: 'rel_dir' is set by the hot folder for the subfolder a file was dropped in; leave it out",
    "size": "ocr spec: 'size' is measured by the daemon; leave it out",
    "dropped": "ocr spec: 'dropped' is set by the hot folder for the file it took; leave it out",
}


class OcrRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """An ``ocr`` spec as a client sends it."""

    spool: str  # the sha256 handover.sock answered for the PDF
    name: str = ""  # the file's name: the job's name and the outputs' (made safe)
    password: str = ""  # never stored in the spec
    engine: str = ""  # "" = the daemon's configured engine
    adapter: str = ""  # a LoRA adapter loaded in the vLLM engine
    force: bool = False  # convert again even if the same content was converted before
    max_pages: int = 0  # 0 = all


@dataclass(frozen=True)
class HotDrop:
    """The hot folder's own part of a spec. Only daemon code can put this object into a spec: what a client
    sends is plain data decoded from msgpack."""

    rel_dir: str  # the inbox subfolder the file lies in, as found there
    dropped: str  # the file's path below the inbox, as found there (moved to done/ or failed/ at the end)
    password: str = ""  # from the file's .password sidecar


class OcrSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """An ``ocr`` job as stored: every field set or checked by the daemon."""

    sha256: str  # the spool entry: the daemon's hash of the bytes it was handed (the fingerprint)
    name: str  # a safe file name
    size: int = 0
    password: str = ""  # "set" when the job's dir holds its password file; never the password
    engine: str = ""
    adapter: str = ""
    force: bool = False
    source: str = "ctl"  # "ctl" or "hotfolder"
    rel_dir: str = ""  # the hot folder subfolder the file came from, made safe (mirrored in outbox/done/failed)
    dropped: str = ""  # hot folder: the file's path below the inbox
    max_pages: int = 0


class DuplicateSource(SpecError):
    """The same content was converted, or is being converted, by ``earlier`` (a job not failed or canceled)."""

    def __init__(self, message: str, earlier: JobInfo) -> None:
        super().__init__(message)
        self.earlier = earlier


class OcrKind:
    kind = "ocr"

    def __init__(self, settings: Settings, pool: PdfWorkerPool, choice: EngineChoice, store: Store, spool: Spool,
                 job_dir: Callable[[int], Path]) -> None:
        """``spool``: where handed-over files are; ``job_dir(id)``: a job's own folder (made on first use)."""
        self.settings = settings
        self.pool = pool
        self.choice = choice
        self.store = store
        self.spool = spool
        self.job_dir = job_dir
        self._pending: dict[str, str] = {}  # token in a new job's spec -> its password
        self.pages: dict[str, PageScheduler] = {}  # one page queue per engine, made with its first job

    def scheduler(self, engine: Engine) -> PageScheduler:
        sched = self.pages.get(engine.name)
        if sched is None:
            sched = self.pages[engine.name] = PageScheduler(engine.name, lambda: engine.concurrency,
                                                            prefetch=engine.needs_image)
        return sched

    def on_priority(self, job: JobInfo) -> None:
        """A running job's new priority: its waiting pages move to their new turn."""
        for sched in self.pages.values():
            sched.set_key(job.id, order_key(job))

    # ------------------------------------------------------------------------------------- submit

    async def validate(self, spec: dict[str, Any], caller: Caller) -> tuple[str, dict[str, Any]]:
        spec = dict(spec)
        drop = spec.pop("hot_drop", None)
        if drop is not None and not isinstance(drop, HotDrop):
            raise SpecError("ocr spec: 'hot_drop' belongs to the daemon's hot folder; leave it out")
        refused = sorted(spec.keys() & REFUSED_KEYS.keys())
        if refused:
            raise SpecError(REFUSED_KEYS[refused[0]])
        try:
            s = msgspec.convert(spec, OcrRequest)
        except msgspec.ValidationError as exc:
            raise SpecError(f"ocr spec: {exc}; keys: spool, name, password, engine, adapter, force, "
                            "max_pages") from None
        try:
            src = self.spool.lookup(s.spool, caller.uid)
        except SpoolError as exc:
            raise SpecError(f"ocr: {exc}") from None
        name = safe_name(s.name, "document.pdf")
        if s.max_pages < 0:
            raise SpecError(f"ocr spec: max_pages {s.max_pages}: give 0 (all pages) or a positive number")
        engine = self.choice.get(s.engine)  # an unknown engine is a submit error, not a failed job
        adapter = job_adapter(engine, s.adapter, caller.user)
        if not s.force:
            self._refuse_duplicate(name, s.spool)
        password = drop.password if drop is not None else s.password
        frozen = OcrSpec(sha256=s.spool, name=name, size=src.stat().st_size, password=self._hold(password),
                         engine=s.engine, adapter=adapter, force=s.force,
                         source="hotfolder" if drop is not None else "ctl",
                         rel_dir=safe_rel_dir(drop.rel_dir) if drop is not None else "",
                         dropped=drop.dropped if drop is not None else "", max_pages=s.max_pages)
        return name, msgspec.to_builtins(frozen)

    def _refuse_duplicate(self, name: str, sha256: str) -> None:
        """The one check for "this content again": a job that converted it, or is converting it, and did not
        fail or get canceled (then converting again is what the user wants)."""
        earlier = self._source_holder(sha256)
        if earlier is None:
            return
        where = earlier.artifacts.get("markdown", "")
        if earlier.state in TERMINAL_STATES:
            raise DuplicateSource(f"{name}: the same content was already converted by job {earlier.id}"
                                  f"{' → ' + where if where else ''}; add --force to convert it again", earlier)
        raise DuplicateSource(f"{name}: the same content is already being converted by job {earlier.id}; "
                              f"follow it with `ftctl show {earlier.id}`", earlier)

    def _source_holder(self, sha256: str) -> JobInfo | None:
        """The job that stands for this content: one that converted it or is converting it."""
        job_id = self.store.job_for_source(sha256)
        if job_id is None:
            return None
        try:
            earlier = self.store.get_job(job_id)
        except UnknownJob:
            return None
        return None if earlier.state in ("failed", "canceled") else earlier

    def _hold(self, password: str) -> str:
        """Keep a password in memory until the job has its dir (on_created); the spec gets a token for it. A
        submit refused after validating (the queue full) leaves it there only until the timer drops it."""
        if not password:
            return ""
        token = _PENDING + secrets.token_hex(16)
        self._pending[token] = password
        asyncio.get_running_loop().call_later(_PENDING_TTL_S, self._pending.pop, token, None)
        return token

    def on_created(self, job: JobInfo) -> dict[str, Any] | None:
        # the fingerprint row belongs to the job that stands for the content; a --force copy next to a live
        # one does not take it over
        if self._source_holder(job.spec["sha256"]) is None:
            self.store.remember_source(job.spec["sha256"], job.id)
        token = str(job.spec.get("password", ""))
        if not token.startswith(_PENDING):
            return None
        held = self._pending.pop(token, None)
        if held is not None:
            write_secret(self.job_dir(job.id) / PASSWORD_FILE, held)
        return {**job.spec, "password": "set" if held is not None else ""}

    def forget_secrets(self, job: JobInfo) -> None:
        """The job ended: its password file goes (an interrupted job keeps it to resume)."""
        if job.state in TERMINAL_STATES:
            (self.job_dir(job.id) / PASSWORD_FILE).unlink(missing_ok=True)

    resources_lane = "ocr"

    def resources(self, job: JobInfo) -> Resources:
        return Resources(lane=self.resources_lane)

    def resumable(self, job: JobInfo) -> bool:
        return True

    # ---------------------------------------------------------------------------------------- run

    async def run(self, ctx: JobContext) -> str:
        try:
            spec = msgspec.convert(ctx.job.spec, OcrSpec)
        except msgspec.ValidationError:
            raise JobFailed("this job was queued by an older ftmllmd, which read files by path; submit the file "
                            "again (ftctl submit ocr FILE) to convert it") from None
        src = self._input(ctx, spec)
        try:
            return await self._convert(ctx, spec, src)
        finally:
            if src.parent == ctx.dir / INPUT_DIR:
                src.unlink(missing_ok=True)  # the link; the spool keeps the bytes for a retry

    def _input(self, ctx: JobContext, spec: OcrSpec) -> Path:
        """The job's file under its own name (what the PDF workers' messages say), linked to its spool entry."""
        stored = self.spool.path(spec.sha256)
        if stored is None:
            raise JobFailed(f"{spec.name} is no longer in the daemon's spool (files go {self.spool.cfg.keep_hours:g} "
                            "h after their job ended); submit it again")
        folder = ctx.dir / INPUT_DIR
        folder.mkdir(mode=0o700, exist_ok=True)
        link = folder / spec.name
        link.unlink(missing_ok=True)
        try:
            os.link(stored, link)
        except OSError:  # the spool on another file system: the entry itself, under its hash
            return stored
        return link

    def _password(self, ctx: JobContext, spec: OcrSpec) -> str | None:
        if spec.password != "set":
            return None
        try:
            return (ctx.dir / PASSWORD_FILE).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise JobFailed(f"the password of {spec.name} was removed when this job ended; submit the file again "
                            "with its password (ftctl submit ocr FILE --password)") from None

    async def _convert(self, ctx: JobContext, spec: OcrSpec, src: Path) -> str:
        engine = self.choice.get(spec.engine)
        # the MuPDF workers (≈270 MB each with their OCR models) start with the first OCR job, not with
        # the daemon: a daemon that only trains never pays for them
        await self.pool.start()
        await engine.start()
        cfg = self.settings.config.ocr
        password = self._password(ctx, spec)
        try:
            info = await self.pool.inspect(src, password, timeout=cfg.page_timeout_s)
        except OcrError as exc:
            raise JobFailed(exc.message) from None
        total = info.page_count if not spec.max_pages else min(spec.max_pages, info.page_count)
        done = {p.page_no for p in ctx.store.pages(ctx.job.id) if p.state == "done"}
        if done:
            ctx.note(f"resuming at page {min(set(range(1, total + 1)) - done, default=total)}: "
                     f"{len(done)} of {total} pages already done")
        else:
            ctx.note(f"{total} page(s), engine {engine.name} ({engine.model})")
        ctx.reset_rate(len(done))
        ctx.progress(len(done), total, "pages", note=f"{len(done)} of {total} pages")
        todo = [n for n in range(1, total + 1) if n not in done]
        failures: dict[int, str] = {}
        finished = [len(done)]
        signals: dict[int, dict[str, Any]] = {}

        async def page(n: int) -> None:
            await self._convert_page(ctx, engine, spec, src, password, n, total, failures, finished, signals)

        # the pages join the engine's one queue, shared with every running job (daemon/ocr/pages.py)
        await self.scheduler(engine).run(ctx.job.id, ctx.job.owner, ctx.job.name, order_key(ctx.job), todo, page,
                                         total, len(done))
        # per-page doubts for the sidecar (`ftctl ocr-review` sorts a day's pages by them)
        signals = await collect_signals(self.pool, ctx.store, ctx.job.id, src, password, cfg.page_timeout_s,
                                        signals)
        md_path, sidecar = self._write_outputs(ctx, spec, engine, total, signals)
        ctx.set_artifacts({"markdown": str(md_path), "sidecar": str(sidecar)},
                          what=f"wrote {md_path}")
        if failures:
            first = min(failures)
            raise JobFailed(f"{len(failures)} of {total} page(s) failed (page {first}: {failures[first]}); "
                            f"the other pages are in {md_path}; `ftctl retry {ctx.job.id}` converts only the "
                            "failed pages again")
        return f"succeeded: {total} page(s) → {md_path}"

    async def _convert_page(self, ctx: JobContext, engine: Engine, spec: OcrSpec, src: Path, password: str | None,
                            n: int, total: int, failures: dict[int, str], finished: list[int],
                            signals: dict[int, dict[str, Any]]) -> None:
        cfg = self.settings.config.ocr
        job_id = ctx.job.id
        key = f"{job_id}:{n}"
        ctx.set_page(PageInfo(job_id=job_id, page_no=n, state="running"))
        ctx.log(f"page {n}: converting with engine {engine.name}")
        t0 = time.monotonic()

        def on_delta(d: EngineDelta) -> None:
            ctx.stream(TextDelta(key=key, text=d.text, job_id=job_id, page_no=n, reset=d.reset))

        try:
            page = await load_page_input(self.pool, job_id=str(job_id), pdf=src, page_no=n - 1, password=password,
                                         needs_image=engine.needs_image, dpi=cfg.dpi,
                                         max_pixels=page_max_pixels(engine, spec.adapter),
                                         timeout=cfg.page_timeout_s, adapter=spec.adapter)
            result: PageResult = await run_page(engine, page, on_delta)
        except OcrError as exc:
            failures[n] = exc.message
            ctx.set_page(PageInfo(job_id=job_id, page_no=n, state="failed", error=exc.message,
                                  timings={"total_s": time.monotonic() - t0}))
            ctx.log(f"page {n}: failed: {exc.message}")
            return
        ctx.stream(TextDelta(key=key, text="", job_id=job_id, page_no=n, final=True))
        timings = {**result.timings, "total_s": time.monotonic() - t0}
        info = PageInfo(job_id=job_id, page_no=n, state="done", method=result.method, timings=timings,
                        chars=len(result.text), error=result.detail)
        ctx.set_page(info, result.text)
        # the sidecar's signals now, while the rendered page's text layer is at hand (no second read of it)
        usable = checks_layer(info) and page.text_layer_usable
        signals[n] = page_signals(info, result.text, page.text_layer if usable else None)
        finished[0] += 1
        ctx.progress(finished[0], total, "pages", note=f"page {n} done ({result.method}, {timings['total_s']:.1f}s)")

    # -------------------------------------------------------------------------------------- output

    def _write_outputs(self, ctx: JobContext, spec: OcrSpec, engine: Engine, total: int,
                       signals: dict[int, dict[str, Any]] | None = None) -> tuple[Path, Path]:
        parts: list[str] = []
        pages_meta: list[dict[str, Any]] = []
        infos = {p.page_no: p for p in ctx.store.pages(ctx.job.id)}
        for n in range(1, total + 1):
            p = infos.get(n)
            if p is not None and p.state == "done":
                _, text = ctx.store.page_text(ctx.job.id, n)
                parts.append(f"<!-- page {n} -->\n\n{text.strip()}\n")
            else:
                reason = p.error if p is not None else "not converted"
                parts.append(f"<!-- page {n}: failed: {reason} -->\n")
            pages_meta.append({
                "page": n,
                "status": p.state if p is not None else "pending",
                "method": p.method if p is not None else "",
                "timings": p.timings if p is not None else {},
                "detail": p.error if p is not None else "",
                "chars": p.chars if p is not None else 0,
                **(signals or {}).get(n, {}),
            })
        meta = {
            "source": f"{spec.rel_dir}/{spec.name}" if spec.rel_dir else spec.name,
            "sha256": spec.sha256,
            "job": ctx.job.id,
            "owner": ctx.job.owner,
            "pages": total,
            "engine": engine.name,
            "model": engine.model,
            "adapter": spec.adapter,
            # what the pages were rendered at: an adapter's recorded training budget, else the engine's
            "max_pixels": page_max_pixels(engine, spec.adapter),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "page_results": pages_meta,
        }
        markdown = "\n".join(parts)
        sidecar = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
        outbox = self.settings.paths.outbox
        try:
            with opened_dir(outbox, spec.rel_dir, create=True) as folder:
                base = self._place(ctx, folder, outbox / spec.rel_dir, spec, markdown, sidecar)
        except (TreeError, OSError) as exc:
            raise JobFailed(f"the results of {spec.name} could not be written into {outbox / spec.rel_dir} "
                            f"({exc}); the pages are kept: fix the folder and `ftctl retry {ctx.job.id}`") from None
        where = outbox / spec.rel_dir
        return where / f"{base}.md", where / f"{base}.json"

    def _place(self, ctx: JobContext, folder: int, where: Path, spec: OcrSpec, markdown: str, sidecar: str) -> str:
        """Write both files under the first base name this job may use; return it. A name is the job's when
        an earlier run of it wrote there, or when what is there belongs to the same owner (a newer version of
        a document replaces the older one); anyone else's output is never replaced."""
        stem = Path(spec.name).stem or "document"
        earlier = ctx.job.artifacts.get("markdown", "")
        own = Path(earlier).stem if earlier and Path(earlier).parent == where else None
        candidates = [own] if own else []
        candidates += [stem, f"{stem}.job{ctx.job.id}"] + [f"{stem}.job{ctx.job.id}.{n}" for n in range(1, 100)]
        # daemon.visibility = "owner": the group that may reach the outbox must not read others' text there
        # (the owner fetches hers with `ftctl submit … --out-dir` or `ftctl output`)
        mode = 0o600 if self.settings.config.daemon.visibility == "owner" else 0o666
        for base in candidates:
            md, side = f"{base}.md", f"{base}.json"
            if base == own or self._same_owner(folder, side, ctx.job):
                write_at(folder, side, sidecar, mode=mode)
                write_at(folder, md, markdown, mode=mode)
                return base
            if exists_at(folder, md) or exists_at(folder, side):
                continue
            if not write_at(folder, side, sidecar, replace=False, mode=mode):
                continue
            if write_at(folder, md, markdown, replace=False, mode=mode):
                return base
            os.unlink(side, dir_fd=folder)  # lost the race for the .md: give the pair up
        raise OSError(f"no free name for {stem}.md")

    def _same_owner(self, folder: int, sidecar: str, job: JobInfo) -> bool:
        """Whether the output pair of ``sidecar`` there was written by a job of ``job``'s owner."""
        try:
            fd = os.open(sidecar, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=folder)
        except OSError:
            return False
        try:
            with os.fdopen(fd, "rb", closefd=False) as fh:
                meta = json.loads(fh.read(1 << 20))
            writer = self.store.get_job(int(meta["job"]))
        except (OSError, ValueError, KeyError, TypeError, UnknownJob):
            return False
        finally:
            os.close(fd)
        return writer.owner == job.owner and writer.kind == self.kind


def write_secret(path: Path, secret: str) -> None:
    """A file only the daemon's user can read, whatever the umask."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, secret.encode("utf-8"))
    finally:
        os.close(fd)
