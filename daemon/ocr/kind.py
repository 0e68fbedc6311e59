"""The ``ocr`` job kind: validate → per page (render or text layer → engine → stored result) → Markdown.

Each finished page is stored (text, method, timings) the moment it is done; a job that runs again (after
a crash, a daemon restart or a retry) starts at the first page not done, so no page is converted twice.
The assembled ``<stem>.md`` and its sidecar ``<stem>.json`` are written atomically to the outbox.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import msgspec

from daemon.core.atomic import write_atomic
from daemon.core.store import Store, UnknownJob
from daemon.jobs.base import Caller, JobContext, JobFailed, Resources, SpecError
from daemon.ocr.engine import Engine, EngineChoice, PageResult, load_page_input, run_page
from daemon.ocr.engine import TextDelta as EngineDelta
from daemon.ocr.errors import OcrError
from daemon.ocr.pdfworker import PdfWorkerPool
from shared.config import Settings
from shared.protocol import TERMINAL_STATES, JobInfo, PageInfo, TextDelta

log = logging.getLogger(__name__)


class OcrSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    file: str
    sha256: str = ""
    password: str = ""
    engine: str = ""  # "" = the daemon's configured engine
    adapter: str = ""  # a LoRA adapter loaded in the vLLM engine
    force: bool = False  # convert again even if the same content was converted before
    out_dir: str = ""  # where the Markdown goes ("" = the outbox)
    source: str = "ctl"  # "ctl" or "hotfolder"
    rel_dir: str = ""  # the hot folder subfolder the file came from (mirrored in outbox/done/failed)
    max_pages: int = 0  # 0 = all


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class DuplicateSource(SpecError):
    """The same content was converted, or is being converted, by ``earlier`` (a job not failed or canceled)."""

    def __init__(self, message: str, earlier: JobInfo) -> None:
        super().__init__(message)
        self.earlier = earlier


class OcrKind:
    kind = "ocr"

    def __init__(self, settings: Settings, pool: PdfWorkerPool, choice: EngineChoice, store: Store) -> None:
        self.settings = settings
        self.pool = pool
        self.choice = choice
        self.store = store

    # ------------------------------------------------------------------------------------- submit

    async def validate(self, spec: dict[str, Any], caller: Caller) -> tuple[str, dict[str, Any]]:
        try:
            s = msgspec.convert(spec, OcrSpec)
        except msgspec.ValidationError as exc:
            raise SpecError(f"ocr spec: {exc}; keys: file, password, engine, adapter, force, out_dir") from None
        path = Path(s.file).expanduser()
        if not path.is_absolute():
            raise SpecError(f"{s.file}: give an absolute path (ftctl does this for you)")
        if not path.is_file():
            raise SpecError(f"{path}: no such file; check the path (the daemon must be able to read it)")
        if not os.access(path, os.R_OK):
            raise SpecError(f"{path}: the daemon (user {os.getuid()}) cannot read it; make it readable "
                            "(chmod o+r) or drop it into the hot folder instead")
        engine = self.choice.get(s.engine)  # an unknown engine is a submit error, not a failed job
        if s.adapter:
            check = getattr(engine, "check_adapter", None)
            problem = check(s.adapter) if check is not None else (
                f"engine {engine.name} cannot use LoRA adapters; name --engine vllm (or leave out --adapter)")
            if problem:
                raise SpecError(problem)
        digest = s.sha256 or await asyncio.to_thread(sha256_of, path)
        if not s.force:
            self._refuse_duplicate(path, digest)
        password = s.password or _sidecar_password(path)
        frozen = msgspec.structs.replace(s, file=str(path), sha256=digest, password=password)
        return path.name, msgspec.to_builtins(frozen)

    def _refuse_duplicate(self, path: Path, sha256: str) -> None:
        """The one check for "this content again": a job that converted it, or is converting it, and did not
        fail or get canceled (then converting again is what the user wants)."""
        job_id = self.store.job_for_source(sha256)
        if job_id is None:
            return
        try:
            earlier = self.store.get_job(job_id)
        except UnknownJob:
            return
        if earlier.state in ("failed", "canceled"):
            return
        where = earlier.artifacts.get("markdown", "")
        if earlier.state in TERMINAL_STATES:
            raise DuplicateSource(f"{path.name}: the same content was already converted by job {earlier.id}"
                                  f"{' → ' + where if where else ''}; add --force to convert it again", earlier)
        raise DuplicateSource(f"{path.name}: the same content is already being converted by job {earlier.id}; "
                              f"follow it with `ftctl show {earlier.id}`", earlier)

    def on_created(self, job: JobInfo) -> None:
        self.store.remember_source(job.spec["sha256"], job.id)

    def resources(self, job: JobInfo) -> Resources:
        return Resources(lane="ocr")

    def resumable(self, job: JobInfo) -> bool:
        return True

    # ---------------------------------------------------------------------------------------- run

    async def run(self, ctx: JobContext) -> str:
        spec = msgspec.convert(ctx.job.spec, OcrSpec)
        src = Path(spec.file)
        if not src.exists():
            raise JobFailed(f"{src}: the file is gone; put it back and `ftctl retry {ctx.job.id}`")
        engine = self.choice.get(spec.engine)
        # the MuPDF workers (≈270 MB each with their OCR models) start with the first OCR job, not with
        # the daemon: a daemon that only trains never pays for them
        await self.pool.start()
        await engine.start()
        cfg = self.settings.config.ocr
        password = spec.password or None
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
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in todo:
            queue.put_nowait(n)
        failures: dict[int, str] = {}
        finished = [len(done)]

        async def worker() -> None:
            while True:
                try:
                    n = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await self._convert_page(ctx, engine, spec, src, password, n, total, failures, finished)

        workers = [asyncio.create_task(worker()) for _ in range(max(1, min(engine.concurrency, len(todo))))]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
        md_path, sidecar = self._write_outputs(ctx, spec, engine, total)
        ctx.set_artifacts({"markdown": str(md_path), "sidecar": str(sidecar)},
                          what=f"wrote {md_path}")
        if failures:
            first = min(failures)
            raise JobFailed(f"{len(failures)} of {total} page(s) failed (page {first}: {failures[first]}); "
                            f"the other pages are in {md_path}; `ftctl retry {ctx.job.id}` converts only the "
                            "failed pages again")
        return f"succeeded: {total} page(s) → {md_path}"

    async def _convert_page(self, ctx: JobContext, engine: Engine, spec: OcrSpec, src: Path, password: str | None,
                            n: int, total: int, failures: dict[int, str], finished: list[int]) -> None:
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
                                         max_pixels=engine.max_pixels, timeout=cfg.page_timeout_s,
                                         adapter=spec.adapter)
            result: PageResult = await run_page(engine, page, on_delta)
        except OcrError as exc:
            failures[n] = exc.message
            ctx.set_page(PageInfo(job_id=job_id, page_no=n, state="failed", error=exc.message,
                                  timings={"total_s": time.monotonic() - t0}))
            ctx.log(f"page {n}: failed: {exc.message}")
            return
        ctx.stream(TextDelta(key=key, text="", job_id=job_id, page_no=n, final=True))
        timings = {**result.timings, "total_s": time.monotonic() - t0}
        ctx.set_page(PageInfo(job_id=job_id, page_no=n, state="done", method=result.method, timings=timings,
                              chars=len(result.text), error=result.detail), result.text)
        finished[0] += 1
        ctx.progress(finished[0], total, "pages", note=f"page {n} done ({result.method}, {timings['total_s']:.1f}s)")

    # -------------------------------------------------------------------------------------- output

    def out_dir(self, spec: OcrSpec) -> Path:
        if spec.out_dir:
            return Path(spec.out_dir)
        return self.settings.paths.outbox / spec.rel_dir

    def _write_outputs(self, ctx: JobContext, spec: OcrSpec, engine: Engine, total: int) -> tuple[Path, Path]:
        stem = Path(spec.file).stem
        out = self.out_dir(spec)
        out.mkdir(parents=True, exist_ok=True)
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
            })
        md_path = out / f"{stem}.md"
        sidecar = out / f"{stem}.json"
        write_atomic(md_path, "\n".join(parts))
        meta = {
            "source": spec.file,
            "sha256": spec.sha256,
            "job": ctx.job.id,
            "pages": total,
            "engine": engine.name,
            "model": engine.model,
            "adapter": spec.adapter,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "page_results": pages_meta,
        }
        write_atomic(sidecar, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        return md_path, sidecar


def _sidecar_password(pdf: Path) -> str:
    side = pdf.with_name(pdf.name + ".password")
    try:
        return side.read_text(encoding="utf-8").strip("\r\n")
    except (FileNotFoundError, UnicodeDecodeError):
        return ""
