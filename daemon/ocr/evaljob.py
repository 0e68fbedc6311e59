"""The ``ocr_eval`` job kind: convert pages whose truth is known with a real engine and score each page.

A document's truth is Markdown with the outbox's ``<!-- page N -->`` markers (daemon/ocr/scoring.py). The
client hands over each PDF and its truth file (shared/handover.py, as ``ocr`` jobs take files: the caller
opens them with her own rights); the spec names the spool entries, which only a user who handed those bytes
over may name. Every truth page with text is converted the way an ``ocr`` job converts it (same engine, same
render: :func:`~daemon.ocr.engine.load_page_input` with ``ocr.dpi`` and the engine's pixel cap, for an adapter
the budget it trained with) and scored: CER, WER, heading recall, table-cell F1, reading order.

Each converted page is stored like an OCR job's page (``ftctl show``, the TUI's page list, and a restart
resumes after the last page done); its scores go into ``ocr_eval.json`` in the job's dir with the totals
(weighted by truth length: :func:`~daemon.ocr.scoring.aggregate`), and the truth pages into ``truth.json``
beside it, for the side-by-side diff. :class:`~shared.protocol.OcrEvalResult` reads them back.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import msgspec

from daemon.core.store import Store
from daemon.ctl.server import Handler
from daemon.jobs.base import Caller, JobContext, JobFailed, JobKind, Resources, SpecError
from daemon.jobs.manager import RequestDenied
from daemon.jobs.queue import order_key
from daemon.ocr.engine import Engine, EngineChoice, job_adapter, load_page_input, page_max_pixels, run_page
from daemon.ocr.errors import OcrError
from daemon.ocr.pages import PageScheduler
from daemon.ocr.pdfworker import PdfWorkerPool
from daemon.ocr.scoring import PageScore, aggregate, score_page, split_pages
from daemon.part import Part
from daemon.spool.spool import Spool, SpoolError
from daemon.spool.tree import safe_name
from shared.config import Settings
from shared.protocol import JobInfo, OcrEvalResult, OcrEvalResultReply, PageInfo

KIND = "ocr_eval"
RESULTS = "ocr_eval.json"
TRUTH = "truth.json"
METRICS = ("cer", "wer", "heading_recall", "table_f1", "reading_order")
MAX_DOCS = 500
# what daemon/train/datasets.py writes beside a dataset, and the section daemon/train/from_pages.py puts in it
ABOUT_SUFFIX = ".about.json"
FROM_PAGES = "from_pages"
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_TRUTH_BYTES = 16 * 1024 * 1024  # a truth file is a document's text: far below this


class EvalDoc(msgspec.Struct, forbid_unknown_fields=True):
    pdf: str  # the spool entry of the PDF
    truth: str  # the spool entry of its truth Markdown
    name: str = ""


class OcrEvalRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    docs: list[EvalDoc] = []
    dataset: str = ""  # instead of docs: a `dataset from-pages` dataset, whose validation documents are scored
    engine: str = ""  # "" = the daemon's configured engine
    adapter: str = ""
    source: str = ""  # what the client read the pairs from (a folder), for the title


class OcrEvalSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    docs: list[EvalDoc] = []
    dataset: str = ""  # the validation dataset (NAME.val) whose kept documents are scored
    engine: str
    adapter: str = ""
    source: str = ""


class OcrEvalKind:
    kind = KIND

    def __init__(self, settings: Settings, pool: PdfWorkerPool, choice: EngineChoice, spool: Spool,
                 datasets_dir: Path, pages: Callable[[Engine], PageScheduler]) -> None:
        """``datasets_dir``: where training datasets are registered (their ``NAME.about.json``); ``pages``: an
        engine's page queue, the one OCR jobs use (:meth:`OcrKind.scheduler`)."""
        self.pages = pages
        self.settings = settings
        self.pool = pool
        self.choice = choice
        self.spool = spool
        self.datasets_dir = datasets_dir

    # ------------------------------------------------------------------------------------- submit

    def validate(self, spec: dict[str, Any], caller: Caller) -> tuple[str, dict[str, Any]]:
        try:
            s = msgspec.convert(spec, OcrEvalRequest)
        except msgspec.ValidationError as exc:
            raise SpecError(f"ocr_eval spec: {exc}; keys: docs [{{pdf, truth, name}}] or dataset, engine, "
                            "adapter, source") from None
        dataset = ""
        if s.dataset:
            if s.docs:
                raise SpecError("ocr_eval spec: give docs or dataset, not both")
            dataset = validation_of(self.datasets_dir, s.dataset)
            dataset_docs(self.datasets_dir, dataset)  # refused now, not when the job runs
        elif not s.docs:
            raise SpecError("ocr_eval: no documents; give a folder of x.pdf + x.md pairs or a dataset built by "
                            "`ftctl dataset from-pages` (ftctl ocr-eval DIR|DATASET)")
        if len(s.docs) > MAX_DOCS:
            raise SpecError(f"ocr_eval: {len(s.docs)} documents; at most {MAX_DOCS} per job (split the folder)")
        docs = []
        for d in s.docs:
            for entry in (d.pdf, d.truth):
                try:
                    self.spool.lookup(entry, caller.uid)
                except SpoolError as exc:
                    raise SpecError(f"ocr_eval: {exc}") from None
            docs.append(EvalDoc(pdf=d.pdf, truth=d.truth, name=safe_name(d.name, "document.pdf")))
        engine = self.choice.get(s.engine)
        adapter = job_adapter(engine, s.adapter, caller.user)
        frozen = OcrEvalSpec(docs=docs, dataset=dataset, engine=engine.name, adapter=adapter,
                             source=dataset or s.source[:256])
        name = f"{frozen.source or docs[0].name} · {engine.name}{' + ' + adapter if adapter else ''}"
        return name[:200], msgspec.to_builtins(frozen)

    def resources(self, job: JobInfo) -> Resources:
        return Resources(lane="ocr")

    def resumable(self, job: JobInfo) -> bool:
        return True

    # ---------------------------------------------------------------------------------------- run

    async def run(self, ctx: JobContext) -> str:
        spec = msgspec.convert(ctx.job.spec, OcrEvalSpec)
        engine = self.choice.get(spec.engine)
        await self.pool.start()
        await engine.start()
        cfg = self.settings.config.ocr
        plan: list[tuple[str, Path, int, str]] = []  # document, its PDF, page (1-based), truth Markdown
        skipped = 0
        if spec.dataset:
            try:
                sources = dataset_docs(self.datasets_dir, spec.dataset)
            except SpecError as exc:
                raise JobFailed(str(exc)) from None
        else:
            sources = [(d.name, self._spooled(d.pdf, d.name), self._spooled(d.truth, d.name + " (truth)"))
                       for d in spec.docs]
        for name, pdf, truth in sources:
            try:
                info = await self.pool.inspect(pdf, None, timeout=cfg.page_timeout_s)
                truth_md = truth.read_bytes()[:MAX_TRUTH_BYTES].decode("utf-8", errors="replace")
            except OcrError as exc:
                raise JobFailed(f"{name}: {exc.message}") from None
            except OSError as exc:
                raise JobFailed(f"{name}: its truth file ({truth}) cannot be read ({exc.strerror or exc}); "
                                "run ftctl ocr-eval again") from None
            for n, text in sorted(split_pages(truth_md).items()):
                if 1 <= n <= info.page_count and text.strip():
                    plan.append((name, pdf, n, text))
                else:
                    skipped += 1
        if not plan:
            raise JobFailed("no page has truth text (each page's Markdown follows a `<!-- page N -->` line of a "
                            "page the PDF has); fix the .md files and submit again")
        write_json(ctx.dir / TRUTH, [{"doc": d, "page": n, "truth": t} for d, _, n, t in plan])
        done = {p.page_no for p in ctx.store.pages(ctx.job.id) if p.state == "done"}
        ctx.note(f"{len(plan)} page(s) of {len(sources)} document(s), engine {engine.name} ({engine.model})"
                 + (f", adapter {spec.adapter}" if spec.adapter else "")
                 + (f"; {skipped} page(s) without truth skipped" if skipped else ""))
        ctx.reset_rate(len(done))
        finished = [len(done)]

        async def convert(index: int) -> None:
            _, pdf, page_no, _ = plan[index - 1]
            await self._convert_page(ctx, engine, spec.adapter, pdf, index, page_no)
            finished[0] += 1
            ctx.progress(finished[0], len(plan), "pages", note=f"page {finished[0]} of {len(plan)}")

        # the pages wait their turn in the engine's one queue, with every running OCR job's (daemon/ocr/pages.py)
        todo = [i for i in range(1, len(plan) + 1) if i not in done]
        await self.pages(engine).run(ctx.job.id, ctx.job.owner, ctx.job.name, order_key(ctx.job), todo, convert,
                                     len(plan), len(done))
        scores: dict[int, PageScore] = {}
        rows: list[dict[str, Any]] = []
        for i, (doc, _, n, truth_md) in enumerate(plan, 1):
            page, output = ctx.store.page_text(ctx.job.id, i)
            score = score_page(truth_md, output)
            scores[i] = score
            rows.append({"index": i, "doc": doc, "page": n, "method": page.method, "error": page.error,
                         **asdict(score)})
        total = aggregate(scores)
        totals = {k: getattr(total, k) for k in METRICS}
        results = {"engine": engine.name, "model": engine.model, "adapter": spec.adapter, "source": spec.source,
                   "pages": rows, "totals": totals, "skipped": skipped,
                   "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        path = ctx.dir / RESULTS
        write_json(path, results)
        ctx.set_artifacts({"results": str(path)}, what=f"scores in {path}")
        return f"succeeded: {len(plan)} page(s): " + ", ".join(
            f"{k} {fmt_metric(k, v)}" for k, v in totals.items() if v is not None)

    def _spooled(self, sha256: str, name: str) -> Path:
        stored = self.spool.path(sha256)
        if stored is None:
            raise JobFailed(f"{name} is no longer in the daemon's spool (files go {self.spool.cfg.keep_hours:g} h "
                            "after their job ended); run ftctl ocr-eval again")
        return stored

    async def _convert_page(self, ctx: JobContext, engine: Engine, adapter: str, pdf: Path, index: int,
                            page_no: int) -> None:
        cfg = self.settings.config.ocr
        job_id = ctx.job.id
        ctx.set_page(PageInfo(job_id=job_id, page_no=index, state="running"))
        t0 = time.monotonic()
        try:
            page = await load_page_input(self.pool, job_id=str(job_id), pdf=pdf, page_no=page_no - 1,
                                         password=None, needs_image=engine.needs_image, dpi=cfg.dpi,
                                         max_pixels=page_max_pixels(engine, adapter), timeout=cfg.page_timeout_s,
                                         adapter=adapter)
            result = await run_page(engine, page)
        except OcrError as exc:
            # a page the engine cannot read scores as empty output: that is what a user would get
            ctx.set_page(PageInfo(job_id=job_id, page_no=index, state="failed", error=exc.message,
                                  timings={"total_s": time.monotonic() - t0}), "")
            ctx.log(f"page {index} ({pdf.name} page {page_no}): failed: {exc.message}")
            return
        ctx.set_page(PageInfo(job_id=job_id, page_no=index, state="done", method=result.method,
                              timings={**result.timings, "total_s": time.monotonic() - t0},
                              chars=len(result.text), error=result.detail), result.text)


def validation_of(datasets_dir: Path, name: str) -> str:
    """The dataset whose documents score an engine: NAME's validation half (NAME.val) when NAME was built by
    `dataset from-pages` with one, else NAME itself when it is such a validation half."""
    about = read_about(datasets_dir, name)
    section = about.get(FROM_PAGES) if isinstance(about.get(FROM_PAGES), dict) else None
    if section is None:
        raise SpecError(f"dataset '{name}' was not built by `ftctl dataset from-pages` (no {name}{ABOUT_SUFFIX} "
                        "with its documents); give a folder of x.pdf + x.md pairs instead, or build the dataset "
                        "with from-pages")
    if section.get("split") == "val":
        return name
    val = section.get("validation")
    if not isinstance(val, str) or not val:
        raise SpecError(f"dataset '{name}' has no validation documents; build it again with `ftctl dataset "
                        "from-pages NAME DIR --val 0.2` (or score a folder of x.pdf + x.md pairs)")
    return val


def dataset_docs(datasets_dir: Path, name: str) -> list[tuple[str, Path, Path]]:
    """(document, its kept PDF, its kept truth) of a from-pages validation dataset, read from the daemon's own
    copy (NAME.about.json: ``from_pages.documents``, written by daemon/train/from_pages.py)."""
    section = read_about(datasets_dir, name).get(FROM_PAGES)
    documents = section.get("documents") if isinstance(section, dict) else None
    found: list[tuple[str, Path, Path]] = []
    for d in documents if isinstance(documents, list) else []:
        if isinstance(d, dict) and all(isinstance(d.get(k), str) and d.get(k) for k in ("name", "pdf", "truth")):
            pdf, truth = Path(d["pdf"]), Path(d["truth"])
            # the paths are the daemon's own, but a damaged about.json must not send it elsewhere
            if pdf.is_relative_to(datasets_dir) and truth.is_relative_to(datasets_dir):
                found.append((str(d["name"]), pdf, truth))
    if not found:
        raise SpecError(f"dataset '{name}' keeps no documents with their truth ({name}{ABOUT_SUFFIX}); build it "
                        "again with `ftctl dataset from-pages`")
    return found


def read_about(datasets_dir: Path, name: str) -> dict[str, Any]:
    if not DATASET_NAME.match(name):
        raise SpecError(f"dataset name '{name}' is not allowed; give the name `ftctl dataset list` shows")
    try:
        data = json.loads((datasets_dir / f"{name}{ABOUT_SUFFIX}").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"no dataset '{name}'; `ftctl dataset list` shows the datasets") from None
    except (OSError, ValueError) as exc:
        raise SpecError(f"dataset '{name}': its {name}{ABOUT_SUFFIX} cannot be read ({exc}); build it again") from None
    return data if isinstance(data, dict) else {}


def fmt_metric(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.2f} %" if key in ("cer", "wer") else f"{value:.3f}"


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


# ------------------------------------------------------------------------------------------- the part


class OcrEvalPart(Part):
    """The ``ocr_eval`` kind and the request that reads its scores back."""

    def __init__(self, settings: Settings, store: Store, pool: PdfWorkerPool, engines: EngineChoice,
                 spool: Spool, datasets_dir: Path, pages: Callable[[Engine], PageScheduler]) -> None:
        self.settings = settings
        self.store = store
        self.kind = OcrEvalKind(settings, pool, engines, spool, datasets_dir, pages)

    def kinds(self) -> dict[str, JobKind]:
        return {self.kind.kind: self.kind}

    def handlers(self) -> dict[type, Handler]:
        return {OcrEvalResult: self.on_result}

    async def on_result(self, body: OcrEvalResult, caller: Caller) -> OcrEvalResultReply:
        job = self.store.get_job(body.job_id)
        if job.kind != KIND:
            raise RequestDenied("bad_request", f"job {job.id} is a {job.kind} job; only ocr_eval jobs have OCR "
                                               "scores (`ftctl ocr-eval DIR`)")
        # the truth and output are the documents' text: shown as the daemon shows any job's content
        if body.page and not (self.settings.config.daemon.visibility == "team" or caller.is_admin
                              or job.owner == caller.user):
            raise RequestDenied("forbidden", f"job {job.id} is {job.owner}'s, and this daemon shows a job's page "
                                             "text to its owner only (daemon.visibility = \"owner\"); ask "
                                             f"{job.owner} or an admin")
        where = job.artifacts.get("results", "")
        if not where:
            raise RequestDenied("invalid_state", f"ocr_eval job {job.id} is {job.state}, so it has no scores yet; "
                                                 f"`ftctl show {job.id}`")
        try:
            results, truths = await asyncio.to_thread(
                lambda: (json.loads(Path(where).read_text(encoding="utf-8")),
                         json.loads((Path(where).parent / TRUTH).read_text(encoding="utf-8")) if body.page else []))
        except (OSError, ValueError) as exc:
            raise RequestDenied("invalid_state", f"ocr_eval job {job.id}: {where} cannot be read ({exc}); "
                                                 f"`ftctl retry {job.id}` scores again") from None
        pages = results["pages"]
        title = f"job {job.id}: {results['engine']}" + (f" + {results['adapter']}" if results["adapter"] else "")
        reply = OcrEvalResultReply(job_id=job.id, title=title, totals=results["totals"], pages=pages)
        if body.page:
            if not 1 <= body.page <= len(pages):
                raise RequestDenied("bad_request", f"ocr_eval job {job.id} scored {len(pages)} page(s); give a "
                                                   f"page from 1 to {len(pages)}")
            reply.truth = truths[body.page - 1]["truth"]
            reply.output = self.store.page_text(job.id, body.page)[1]
        return reply
