"""``ftctl dataset from-pages NAME DIR [--val 0.1]``: corrected pages become a LLaMA-Factory dataset.

DIR holds ``x.pdf`` + ``x.md`` pairs, the Markdown being the document's truth in the form the outbox writes
(``<!-- page N -->`` before each page), typically an outbox file a person corrected. ftctl hands every file
over with the user's own rights (shared/handover.py); the daemon reads only those spool entries.

Each page becomes one sample: the user turn is the OCR prompt followed by the page image, the answer is that
page's truth. The image is what serving sends for the same page: the PDF workers' one render operation
(``PdfWorkerPool.render_page``, daemon/ocr/worker_ops.py), at ``ocr.dpi``, capped at the pixels the vLLM
engine renders for (``vllm.max_pixels`` lowered by the ``max_model_len`` budget, daemon/engines/vlm/budget.py),
with the prompt of ``ocr.prompt`` in the same place (text, then image). What was used is kept in the
dataset's metadata (``NAME.about.json``: ``from_pages.render``), and a train job on the dataset keeps it
beside its adapter.

Documents, never pages, are split between NAME (training) and NAME.val (validation), so no document has
pages on both sides; the split depends only on the documents' names and the seed. Pages whose truth is
missing or empty (no ``x.md``, no marker for that page, a failed-page marker, blank text) are skipped and
counted. NAME.val also keeps the validation documents themselves (PDF and truth), for scoring an engine.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.core.atomic import write_atomic
from daemon.engines.vlm.budget import BudgetError, config_limits, plan_render
from daemon.engines.vlm.prompts import load_prompt
from daemon.ocr.errors import OcrError, PdfError
from daemon.ocr.pdfworker import PdfWorkerPool
from daemon.ocr.scoring import split_pages
from daemon.spool.spool import Spool
from daemon.train.datasets import (
    IMAGE_TAG,
    DatasetProblem,
    DatasetSummary,
    add_dataset,
    kept_path,
    list_datasets,
    remove_dataset,
)
from shared.config import Settings

VAL_SUFFIX = ".val"
MODE = "page"  # one sample a page: the whole page image -> the page's Markdown
ABOUT_KEY = "from_pages"


@dataclass(frozen=True)
class RenderSettings:
    """How training pages are rendered: what serving renders with."""

    dpi: float
    max_pixels: int
    prompt: str
    prompt_name: str
    mode: str = MODE
    renderer: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"dpi": self.dpi, "max_pixels": self.max_pixels, "prompt": self.prompt,
                "prompt_name": self.prompt_name, "mode": self.mode, "renderer": self.renderer}


def serving_render(settings: Settings) -> RenderSettings:
    """The dpi, pixel cap and prompt the vLLM engine of this config renders pages with (before the server
    has counted the templated prompt, as the engine starts). DatasetProblem names the setting to fix."""
    cfg = settings.config
    try:
        prompt = load_prompt(cfg.ocr.prompt)
    except OcrError as exc:
        raise DatasetProblem([exc.message]) from None
    v = cfg.vllm
    try:
        plan = plan_render(config_limits(v.max_model_len, v.max_tokens, v.min_pixels, v.max_pixels, prompt))
    except BudgetError as exc:
        raise DatasetProblem([str(exc)]) from None
    return RenderSettings(dpi=cfg.ocr.dpi, max_pixels=plan.max_pixels, prompt=prompt, prompt_name=cfg.ocr.prompt)


@dataclass(frozen=True)
class Document:
    name: str  # x.pdf, as in the user's folder
    pdf: Path  # its spool entry
    md: Path | None  # the truth's spool entry; None: no x.md beside it


def handed_documents(spool: Spool, manifest: str, uid: int) -> list[Document]:
    """The documents a client handed over: ``manifest`` names a handed-over JSON object, x.pdf ->
    {"pdf": sha256, "md": sha256 or ""}; every entry must be ``uid``'s (SpoolError otherwise)."""
    try:
        data = json.loads(spool.lookup(manifest, uid).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    ok = isinstance(data, dict) and data and all(
        isinstance(k, str) and k.lower().endswith(".pdf") and "/" not in k and isinstance(v, dict)
        and isinstance(v.get("pdf"), str) and isinstance(v.get("md", ""), str) for k, v in data.items())
    if not ok or not isinstance(data, dict):
        raise DatasetProblem(["the list of handed-over documents is not a JSON object of x.pdf -> {pdf, md}; build "
                              "the dataset with ftctl of the daemon's version"])
    return [Document(name, spool.lookup(v["pdf"], uid), spool.lookup(v["md"], uid) if v.get("md") else None)
            for name, v in sorted(data.items())]


def split_documents(names: list[str], val: float, seed: int) -> tuple[list[str], list[str]]:
    """(training, validation) document names: a seeded shuffle of the sorted names, ``val`` of them (at least
    one when val > 0 and there are two or more, never all) for validation."""
    if not 0 <= val < 1:
        raise DatasetProblem([f"--val {val}: give the share of documents for validation, from 0 to below 1 "
                              "(e.g. 0.1)"])
    order = sorted(names)
    random.Random(seed).shuffle(order)
    count = 0 if val == 0 or len(order) < 2 else min(len(order) - 1, max(1, round(len(order) * val)))
    return sorted(order[count:]), sorted(order[:count])


def page_truths(md: str) -> dict[int, str]:
    """Page number (1-based) -> that page's truth, stripped; empty pages included (they are skipped)."""
    return {n: text.strip() for n, text in split_pages(md).items() if n >= 1}


@dataclass
class Built:
    """What a build made, for the reply."""

    train: DatasetSummary | None = None
    val: DatasetSummary | None = None
    train_docs: list[str] = field(default_factory=list)
    val_docs: list[str] = field(default_factory=list)
    pages_skipped: int = 0  # pages of the PDFs without truth (missing or empty)
    docs_without_truth: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # document -> why it could not be read
    render: RenderSettings | None = None
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)  # dataset -> what its about.json keeps

    def message(self, name: str) -> str:
        assert self.train is not None and self.render is not None
        parts = [f"dataset '{name}' added: {self.train.records} training pages from {len(self.train_docs)} "
                 f"document(s)"]
        if self.val is not None:
            parts.append(f"'{name}{VAL_SUFFIX}': {self.val.records} validation pages from {len(self.val_docs)} "
                         "document(s)")
        parts.append(f"skipped {self.pages_skipped} page(s) without truth"
                     + (f" ({len(self.docs_without_truth)} document(s) without a .md)" if self.docs_without_truth
                        else ""))
        if self.failed:
            first = next(iter(self.failed.items()))
            parts.append(f"{len(self.failed)} document(s) unreadable ({first[0]}: {first[1]})")
        r = self.render
        parts.append(f"rendered at {r.dpi:g} dpi, at most {r.max_pixels} pixels; train with --dataset {name}")
        return "; ".join(parts)


async def build(name: str, docs: list[Document], *, pool: PdfWorkerPool, render: RenderSettings,
                dataset_dir: Path, val: float, seed: int, replace: bool, folder: str,
                page_timeout_s: float = 120.0) -> Built:
    """Render every page with truth, split by document and register NAME (and NAME.val). DatasetProblem
    when nothing is left to train on or a name is taken."""
    val_name = f"{name}{VAL_SUFFIX}"
    taken = list_datasets(dataset_dir) if not replace else {}
    for target in (name, val_name):
        if target in taken:
            raise DatasetProblem([f"dataset '{target}' already exists; choose another name or build it with --replace"])
    built = Built(render=render)
    truths: dict[str, dict[int, str]] = {}
    pages: dict[str, list[tuple[int, str]]] = {}  # document -> [(page, truth)] with truth
    for doc in docs:
        try:
            info = await pool.inspect(doc.pdf, timeout=page_timeout_s)
        except PdfError as exc:
            built.failed[doc.name] = exc.message.replace(doc.pdf.name, doc.name)
            continue
        if doc.md is None:
            built.docs_without_truth.append(doc.name)
            built.pages_skipped += info.page_count
            continue
        try:
            truths[doc.name] = page_truths(doc.md.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            built.failed[doc.name] = f"its .md cannot be read as UTF-8 text ({exc}); save it as UTF-8"
            continue
        found = [(n, truths[doc.name].get(n, "")) for n in range(1, info.page_count + 1)]
        pages[doc.name] = [(n, t) for n, t in found if t]
        built.pages_skipped += sum(1 for _, t in found if not t)
    with_truth = sorted(d for d, p in pages.items() if p)
    if not with_truth:
        raise DatasetProblem([f"{folder}: no page has truth; put x.md (the outbox's Markdown with '<!-- page N -->' "
                              "markers, corrected) beside each x.pdf"])
    built.train_docs, built.val_docs = split_documents(with_truth, val, seed)
    by_name = {d.name: d for d in docs}
    dataset_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".from-pages-", dir=dataset_dir))
    try:
        split_records: dict[str, tuple[list[dict[str, Any]], dict[str, Path]]] = {}
        for split, names in (("train", built.train_docs), ("val", built.val_docs)):
            records: list[dict[str, Any]] = []
            handed: dict[str, Path] = {}
            for doc_name in names:
                doc = by_name[doc_name]
                stem = Path(doc_name).stem
                for n, truth in pages[doc_name]:
                    try:
                        page = await pool.render_page(doc.pdf, n - 1, None, dpi=render.dpi,
                                                      max_pixels=render.max_pixels, timeout=page_timeout_s)
                    except PdfError as exc:
                        raise DatasetProblem([f"{doc_name}: {exc.message.replace(doc.pdf.name, doc_name)}"]) from None
                    digest = hashlib.sha256(page.png).hexdigest()
                    image = staging / digest
                    if not image.exists():
                        image.write_bytes(page.png)
                    written = f"{stem}/page-{n}.png"
                    handed[written] = image
                    records.append({"messages": [{"role": "user", "content": render.prompt + IMAGE_TAG},
                                                 {"role": "assistant", "content": truth}],
                                    "images": [written]})
            split_records[split] = (records, handed)
        render = RenderSettings(**{**render.to_json(), "renderer": pool.renderer()})
        built.render = render
        common = {"render": render.to_json(), "seed": seed, "val": val, "folder": folder,
                  "train": name, "validation": val_name if built.val_docs else "",
                  "pages_skipped": built.pages_skipped, "documents_without_truth": built.docs_without_truth,
                  "documents_failed": built.failed}
        for split, target in (("train", name), ("val", val_name)):
            records, handed = split_records[split]
            if not records:
                if replace and target in list_datasets(dataset_dir):
                    remove_dataset(target, dataset_dir)  # the old validation half would no longer match
                continue
            file = staging / f"{split}.json"
            write_atomic(file, json.dumps(records, ensure_ascii=False), mode=0o600)
            keep: dict[str, Path] = {}
            documents = []
            for doc_name in (built.train_docs if split == "train" else built.val_docs):
                doc = by_name[doc_name]
                about: dict[str, Any] = {"name": doc_name, "pages": [n for n, _ in pages[doc_name]]}
                if split == "val":  # kept for scoring an engine on the validation documents
                    keep[doc_name] = doc.pdf
                    about["pdf"] = str(kept_path(dataset_dir, doc.pdf, doc_name))
                    if doc.md is not None:
                        md_name = Path(doc_name).stem + ".md"
                        keep[md_name] = doc.md
                        about["truth"] = str(kept_path(dataset_dir, doc.md, md_name))
                documents.append(about)
            summary = add_dataset(target, file, dataset_dir=dataset_dir, ranking=False, replace=replace,
                                  handed=handed, shown=f"{folder} ({split})", also_keep=keep)
            summary = DatasetSummary(name=target, file=summary.file, records=summary.records, images=summary.images,
                                     ranking=False, layout=summary.layout, formats=summary.formats)
            built.meta[target] = {ABOUT_KEY: {**common, "split": split, "documents": documents}}
            if split == "train":
                built.train = summary
            else:
                built.val = summary
        return built
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def render_of(about: Mapping[str, Any]) -> dict[str, Any] | None:
    """How a dataset's pages were rendered, from its ``NAME.about.json``; None unless built by from-pages."""
    section = about.get(ABOUT_KEY)
    render = section.get("render") if isinstance(section, dict) else None
    return dict(render) if isinstance(render, dict) else None
