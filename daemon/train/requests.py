"""The training requests that are not jobs: datasets (add, list, remove), templates, eval-compare, deploy.

Datasets are shared by everyone who uses the daemon; datasets.py keeps who added one beside it, and only
that user or an admin may replace or remove it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon.core.store import Store
from daemon.engines.vllm_supervisor import adapter_name
from daemon.engines.vlm.adapter_budget import plan_for, read_budget
from daemon.engines.vlm.budget import BudgetError, config_limits
from daemon.engines.vlm.prompts import load_prompt
from daemon.gpus.engine_port import DeployError, DeployForbidden, GpuEngine
from daemon.jobs.base import Caller, SpecError
from daemon.jobs.manager import RequestDenied
from daemon.ocr.errors import OcrError, PdfError
from daemon.ocr.pdfworker import PdfWorkerPool
from daemon.spool.spool import Spool, SpoolError
from daemon.train.datasets import (
    DatasetProblem,
    DatasetSummary,
    add_dataset,
    count_records,
    dataset_file,
    handed_media,
    list_datasets,
    read_about,
    remove_dataset,
    write_about,
)
from daemon.train.from_pages import VAL_SUFFIX, build, handed_documents, serving_render
from daemon.train.kind import TrainSetup
from daemon.train.launch import MODEL_FILES, any_present, saved_state
from daemon.train.results import EvalColumn, ResultsMissing, compare_table, read_eval_metrics
from daemon.train.spec import job_kind, load_template, template_names
from shared.overrides import SpecProblem
from shared.protocol import (
    DatasetAdd,
    DatasetAddSpooled,
    DatasetEntry,
    DatasetFromPages,
    DatasetList,
    DatasetRemove,
    DatasetsReply,
    Deploy,
    Done,
    EvalCompare,
    EvalCompareReply,
    JobInfo,
    ListTemplates,
    TemplateEntry,
    TemplatesReply,
)

# an adapter's name, after the owner's user name and "/" if given (daemon/engines/vllm_supervisor.py)
_ADAPTER_NAME_RE = re.compile(r"^(?:[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class TrainRequests:
    def __init__(self, setup: TrainSetup, store: Store, engine: Callable[[], GpuEngine | None]) -> None:
        self.setup = setup
        self.store = store
        self.engine = engine

    def handlers(self) -> dict[type, Any]:
        return {DatasetAdd: self.on_dataset_add, DatasetAddSpooled: self.on_dataset_add_spooled,
                DatasetFromPages: self.on_dataset_from_pages,
                DatasetRemove: self.on_dataset_remove,
                DatasetList: self.on_dataset_list, ListTemplates: self.on_templates,
                EvalCompare: self.on_eval_compare, Deploy: self.on_deploy}

    # -------------------------------------------------------------------------------------- datasets

    @property
    def _dir(self) -> Path:
        return self.setup.datasets_dir

    def _check_owner(self, name: str, caller: Caller, verb: str) -> None:
        owner = read_about(self._dir, name).get("owner")
        if caller.is_admin or (owner and owner == caller.user):
            return
        who = f"it belongs to {owner}" if owner else "it was not added through ftctl"
        raise RequestDenied("forbidden", f"dataset '{name}': {who}; only its owner or an admin may {verb} it "
                                         "(add yours under another name)")

    async def on_dataset_add(self, body: DatasetAdd, caller: Caller) -> DatasetsReply:
        # a path would be read with the daemon's rights, which may be more than the caller's
        raise SpecError(f"{body.file}: the daemon reads only files handed over to it; add the dataset with ftctl "
                        "of the daemon's version (`ftctl dataset add NAME FILE [--images DIR]` hands them over)")

    async def on_dataset_add_spooled(self, body: DatasetAddSpooled, caller: Caller) -> DatasetsReply:
        if body.replace and body.name in await asyncio.to_thread(list_datasets, self._dir):
            self._check_owner(body.name, caller, "replace")
        spool = Spool.of(self.setup.settings)

        def add() -> DatasetSummary:
            records = spool.lookup(body.records, caller.uid)
            handed = handed_media(spool, body.media, caller.uid) if body.media else {}
            return add_dataset(body.name, records, dataset_dir=self._dir, ranking=body.ranking,
                               replace=body.replace, handed=handed, shown=body.records_name or "records.json")

        try:
            # reading and checking every record and image takes seconds on big datasets: not in the loop
            summary = await asyncio.to_thread(add)
        except (DatasetProblem, SpoolError) as exc:
            raise SpecError(str(exc)) from None
        write_about(self._dir, summary, owner=caller.user, source=Path(body.records_name))
        entry = DatasetEntry(name=body.name, file=str(summary.file), records=summary.records, images=summary.images,
                             ranking=summary.ranking)
        return DatasetsReply(datasets=[entry], message=summary.message)

    async def on_dataset_from_pages(self, body: DatasetFromPages, caller: Caller) -> DatasetsReply:
        names = (body.name, f"{body.name}{VAL_SUFFIX}")
        if body.replace:
            existing = await asyncio.to_thread(list_datasets, self._dir)
            for name in names:
                if name in existing:
                    self._check_owner(name, caller, "replace")
        settings = self.setup.settings
        spool = Spool.of(settings)
        try:
            docs = await asyncio.to_thread(handed_documents, spool, body.documents, caller.uid)
            render = serving_render(settings)
            # a pool of its own: the engines' workers serve OCR jobs, and these are the same code (worker_ops)
            async with PdfWorkerPool(size=1, preload=(),
                                     log_path=settings.paths.state_dir / "pdfworkers.log") as pool:
                built = await build(body.name, docs, pool=pool, render=render, dataset_dir=self._dir,
                                    val=body.val, seed=body.seed, replace=body.replace,
                                    folder=body.folder or "the folder",
                                    page_timeout_s=settings.config.ocr.page_timeout_s)
        except (DatasetProblem, SpoolError) as exc:
            raise SpecError(str(exc)) from None
        except PdfError as exc:  # the worker itself (a document's own trouble is counted by build)
            raise RequestDenied("unavailable", f"rendering the pages failed: {exc.message}; see "
                                               f"{settings.paths.state_dir / 'pdfworkers.log'}") from None
        entries = []
        for summary in (built.train, built.val):
            if summary is None:
                continue
            write_about(self._dir, summary, owner=caller.user, source=Path(body.folder),
                        extra=built.meta.get(summary.name))
            entries.append(DatasetEntry(name=summary.name, file=str(summary.file), records=summary.records,
                                        images=summary.images))
        return DatasetsReply(datasets=entries, message=built.message(body.name))

    async def on_dataset_list(self, body: DatasetList, caller: Caller) -> DatasetsReply:
        return await asyncio.to_thread(self._list)

    def _list(self) -> DatasetsReply:
        try:
            info = list_datasets(self._dir)
        except DatasetProblem as exc:
            raise SpecError(str(exc)) from None
        entries = []
        for name, entry in info.items():
            about = read_about(self._dir, name)
            path = (dataset_file(self._dir, entry) if isinstance(entry, dict) else None) or self._dir
            records, images = about.get("records"), about.get("images")
            if records is None and path.is_file():  # placed by hand: count once, here
                records, images = count_records(path)
            entries.append(DatasetEntry(name=name, file=str(path), records=int(records or 0),
                                        images=int(images or 0),
                                        ranking=bool(entry.get("ranking")) if isinstance(entry, dict) else False))
        message = "" if entries else (f"no datasets in {self._dir}; add one with `ftctl dataset add NAME FILE.json "
                                      "[--images DIR]`")
        return DatasetsReply(datasets=entries, message=message)

    async def on_dataset_remove(self, body: DatasetRemove, caller: Caller) -> Done:
        if body.name in await asyncio.to_thread(list_datasets, self._dir):
            self._check_owner(body.name, caller, "remove")
        try:
            await asyncio.to_thread(remove_dataset, body.name, self._dir)
        except DatasetProblem as exc:
            raise SpecError(str(exc)) from None
        return Done(message=f"dataset '{body.name}' removed; jobs that already ran with it keep their results")

    # ------------------------------------------------------------------------------------- templates

    def on_templates(self, body: ListTemplates, caller: Caller) -> TemplatesReply:
        tdir = self.setup.templates_dir
        entries = []
        for name in template_names(tdir):
            try:
                params = load_template(tdir, name)
            except SpecProblem as exc:
                entries.append(TemplateEntry(name=name, kind="?", description=f"broken: {exc}"))
                continue
            kind = job_kind(params)
            entries.append(TemplateEntry(name=name, kind=kind, description=_first_comment(tdir / f"{name}.yaml"),
                                         stage=str(params.get("stage", "")) if kind == "train" else ""))
        return TemplatesReply(templates=entries, templates_dir=str(tdir))

    # ---------------------------------------------------------------------------------- eval compare

    def on_eval_compare(self, body: EvalCompare, caller: Caller) -> EvalCompareReply:
        if not body.job_ids:
            raise RequestDenied("bad_request", "name the eval jobs to compare: ftctl eval-compare JOB JOB …")
        columns: list[EvalColumn] = []
        rows: list[dict[str, Any]] = []
        datasets: set[tuple[str, ...]] = set()
        for job_id in body.job_ids:
            job = self.store.get_job(job_id)
            if job.kind != "eval":
                raise RequestDenied("invalid_state", f"job {job_id} is {_a(job.kind)} {job.kind} job; eval-compare "
                                                     "reads eval jobs (`ftctl eval … --adapter-job N`)")
            if job.state != "succeeded":
                raise RequestDenied("invalid_state", f"eval job {job_id} is {job.state}, so it has no metrics yet; "
                                                     f"`ftctl show {job_id}`")
            try:
                metrics = read_eval_metrics(Path(job.spec["output_dir"]))
            except ResultsMissing as exc:
                raise RequestDenied("invalid_state", str(exc)) from None
            title = f"job {job.id} ({_eval_source(job)})"
            columns.append(EvalColumn(title=title, metrics=metrics))
            rows.append({"job_id": job.id, "title": title, "metrics": metrics, "datasets": job.spec.get("datasets")})
            datasets.add(tuple(job.spec.get("datasets", ())))
        table = compare_table(columns)
        if len(datasets) > 1:
            shown = "; ".join(f"job {r['job_id']}: {','.join(r['datasets'] or ())}" for r in rows)
            table += f"\nnote: these jobs scored different datasets ({shown}); compare like with like"
        else:
            table = f"dataset: {','.join(next(iter(datasets))) or '(from the template)'}\n" + table
        return EvalCompareReply(table=table, columns=rows)

    # ---------------------------------------------------------------------------------------- deploy

    async def on_deploy(self, body: Deploy, caller: Caller) -> Done:
        job = self.store.get_job(body.job_id)
        if job.kind == "train":
            if job.owner != caller.user and not caller.is_admin:
                # the engine would read the adapter with the daemon's rights, for whoever asked
                raise RequestDenied("forbidden", f"{caller.user} cannot deploy the adapter of job {job.id}: it "
                                                 f"belongs to {job.owner}; ask {job.owner} or an admin to deploy it")
            out = Path(job.spec["output_dir"])
            if not saved_state(out).adapter:
                raise RequestDenied("invalid_state", f"train job {job.id} ({job.state}) has no adapter in {out}; "
                                                     "deploy a finished (or gracefully canceled) train job")
            name = body.name or f"job{job.id}"
            if not _ADAPTER_NAME_RE.match(name):
                raise RequestDenied("bad_request", f"adapter name '{name}': use letters, digits, '_', '-' or '.'")
            # first: an adapter no engine of this config can serve as trained is refused whatever runs now
            budget_note = await asyncio.to_thread(self._budget_note, job.id, out)
            engine = self._engine_or_explain(f"the adapter is in {out}")
            try:
                # the adapter is the caller's in the engine: a member's name goes under her own (alice/job7)
                message = await engine.load_adapter(name, out, caller)
            except DeployForbidden as exc:
                raise RequestDenied("forbidden", str(exc)) from None
            except DeployError as exc:
                raise RequestDenied("invalid_state", str(exc)) from None
            served = adapter_name(name, caller.user, caller.is_admin)
            return Done(message=f"{message}; {budget_note}; name it in OCR jobs with --adapter {served}")
        if job.kind == "export":
            merged = Path(job.spec["output_dir"])
            if job.state != "succeeded" or not any_present(merged, MODEL_FILES):
                raise RequestDenied("invalid_state", f"export job {job.id} is {job.state} and has no merged model in "
                                                     f"{merged}; deploy a succeeded export job")
            if not caller.is_admin:
                raise RequestDenied("forbidden", "serving another model changes the engine for everyone; ask an "
                                                 "admin (the daemon's user, root or the admin group) to deploy it")
            engine = self._engine_or_explain(f"the merged model is in {merged}")
            try:
                message = await engine.serve_model(merged)
            except DeployError as exc:
                raise RequestDenied("invalid_state", str(exc)) from None
            return Done(message=message)
        raise RequestDenied("invalid_state", f"job {job.id} is {_a(job.kind)} {job.kind} job; deploy takes a train "
                                             "job (its adapter) or an export job (its merged model)")

    def _budget_note(self, job_id: int, out: Path) -> str:
        """One line on the image budget the adapter was trained with (adapter_budget.py), or RequestDenied
        with the setting to change when the engine of this config cannot serve that budget."""
        budget = read_budget(out)
        cfg = self.setup.settings.config
        if budget is None:
            return (f"no image budget was recorded with it, so its pages are rendered at vllm.max_pixels "
                    f"{cfg.vllm.max_pixels}")
        try:
            prompt = load_prompt(cfg.ocr.prompt)
        except OcrError as exc:
            raise RequestDenied("unavailable", exc.message) from None
        v = cfg.vllm
        limits = config_limits(v.max_model_len, v.max_tokens, v.min_pixels, v.max_pixels, prompt)
        try:
            plan, notes = plan_for(budget, limits, dpi=cfg.ocr.dpi, prompt=prompt)
        except BudgetError as exc:
            raise RequestDenied("invalid_state", f"the adapter of job {job_id} cannot be served as it was "
                                                 f"trained: {exc}") from None
        return "; ".join([f"it was trained on pages of at most {plan.max_pixels} pixels (image_max_pixels), "
                          "which the engine can serve", *notes])

    def _engine_or_explain(self, where: str) -> GpuEngine:
        engine = self.engine()
        if engine is None:
            raise RequestDenied("unavailable", f"no vLLM engine runs in this daemon, so there is nothing to deploy "
                                               f"into ({where}); set vllm.model in the config and restart "
                                               "ftmllmd, then deploy again")
        return engine


def _eval_source(job: JobInfo) -> str:
    if job.spec.get("adapter_job") is not None:
        return f"adapter of job {job.spec['adapter_job']}"
    adapter = job.spec.get("params", {}).get("adapter_name_or_path")
    return f"adapter {Path(str(adapter)).name}" if adapter else "base"


def _first_comment(path: Path) -> str:
    """The first sentence of the template's leading comment."""
    lines: list[str] = []
    try:
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if not line.startswith("#"):
                    break
                lines.append(line.lstrip("#").strip())
    except OSError:
        return ""
    text = " ".join(lines)
    end = text.find(". ")
    return text[: end + 1] if end >= 0 else text


def _a(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"
