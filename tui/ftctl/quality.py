"""How good is the OCR? ``ftctl ocr-eval``, ``ftctl ocr-compare`` and ``ftctl ocr-review``.

    ftctl ocr-eval DIR|DATASET [--engine NAME] [--adapter NAME|JOB] [--wait]   score x.pdf + x.md pairs
    ftctl ocr-compare JOB JOB…  [--json]                             ocr_eval runs side by side
    ftctl ocr-review [DIR] [--since DATE|Nh] [--limit N] [--json]     a day's outbox pages, most likely wrong first

``ocr-eval`` opens every file with your rights and hands it to the daemon (shared/handover.py), as ``ftctl
submit ocr`` does; a file you cannot read is refused before anything is sent. ``x.md`` is the truth of ``x.pdf``
in the outbox's form (``<!-- page N -->`` before each page): a corrected outbox file is one.

``ocr-review`` reads the sidecars (``<name>.json``) the daemon wrote into the outbox, with your rights, and
sorts their pages by the ``risk`` signal the daemon computed (daemon/ocr/signals.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.table import Table

from shared.client import Client
from shared.handover import Handover, HandoverRefused, HandoverUnavailable
from shared.protocol import JobDetail, OcrEvalResult, OcrEvalResultReply, Submit
from tui.ftctl.args import Subparsers, add_submit_flags
from tui.ftctl.follow import follow
from tui.ftctl.ocr import OcrView
from tui.ftctl.output import EXIT_OK, emit_json, err, handover_failed, job_exit, out, usage
from tui.widgets.score_table import compare_table

MAX_SIDECAR_BYTES = 16 * 1024 * 1024


# ------------------------------------------------------------------------------------------- ocr-eval


def find_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """The x.pdf with an x.md beside them, in name order (not recursive)."""
    pairs = []
    for pdf in sorted(folder.iterdir()):
        if pdf.suffix.lower() == ".pdf" and pdf.is_file():
            truth = pdf.with_suffix(".md")
            if truth.is_file():
                pairs.append((pdf, truth))
    return pairs


def adapter_name(value: str) -> str:
    """``--adapter 9`` is the adapter of train job 9, as `ftctl deploy 9` names it (job9)."""
    return f"job{value}" if value.isdigit() else value


def cmd_ocr_eval(args: argparse.Namespace, c: Client) -> int:
    folder = Path(args.source).expanduser().absolute()
    if folder.is_dir():
        pairs = find_pairs(folder)
        if not pairs:
            return usage(f"{folder} has no x.pdf with an x.md beside it; put each PDF's truth Markdown (`<!-- page "
                         "N -->` before each page, as the outbox writes it) next to it under the same name")
        try:
            with Handover(c.paths) as h:
                docs = [{"pdf": h.file(pdf).sha256, "truth": h.file(md).sha256, "name": pdf.name}
                        for pdf, md in pairs]
        except (HandoverRefused, HandoverUnavailable) as exc:
            return handover_failed(exc)
        spec: dict[str, Any] = {"docs": docs, "source": folder.name}
        what = f"{len(pairs)} document(s)"
    elif "/" not in args.source and not folder.exists():
        # a dataset built by `ftctl dataset from-pages`: the daemon scores its kept validation documents
        spec, what = {"dataset": args.source}, f"dataset {args.source}"
    else:
        return usage(f"{folder} is not a folder; give a folder of x.pdf files each with its truth x.md beside it, "
                     "or the name of a dataset built by `ftctl dataset from-pages`")
    if args.engine:
        spec["engine"] = args.engine
    if args.adapter:
        spec["adapter"] = adapter_name(args.adapter)
    job = c.call(Submit(kind="ocr_eval", spec=spec, name=args.name or "", priority=args.priority,
                        interactive=bool(args.wait)), JobDetail).job
    if not args.wait:
        if args.json:
            emit_json(job)
        else:
            err.print(f"job {job.id} queued ({what}); `ftctl ocr-compare {job.id}` shows its "
                      "scores when it is done")
            print(job.id)
        return EXIT_OK
    job = follow(c, job.id, OcrView(stream_text=False, quiet=args.json))
    if job.state != "succeeded":
        err.print(f"job {job.id} {job.state}: {job.error}", markup=False)
        return job_exit(job)
    reply = c.call(OcrEvalResult(job_id=job.id), OcrEvalResultReply)
    if args.json:
        emit_json(reply)
    else:
        out.print(compare_table([reply]), markup=False)
        out.print(worst_pages(reply, 5), markup=False)
    return EXIT_OK


# ---------------------------------------------------------------------------------------- ocr-compare


def worst_pages(reply: OcrEvalResultReply, n: int) -> str:
    """The pages with the highest CER, one line each."""
    ranked = sorted(reply.pages, key=lambda p: -float(p.get("cer") or 0.0))[:n]
    lines = [f"worst pages of job {reply.job_id}:"]
    lines += [f"  {p['cer'] * 100:6.2f} %  {p['doc']} page {p['page']}" + (f"  ({p['error']})" if p.get("error")
                                                                           else "") for p in ranked]
    return "\n".join(lines)


def cmd_ocr_compare(args: argparse.Namespace, c: Client) -> int:
    runs = [c.call(OcrEvalResult(job_id=j), OcrEvalResultReply) for j in args.jobs]
    if args.json:
        emit_json([{"job_id": r.job_id, "title": r.title, "pages": len(r.pages), "metrics": r.totals}
                   for r in runs])
        return EXIT_OK
    sources = {tuple(sorted((p["doc"], p["page"]) for p in r.pages)) for r in runs}
    out.print(compare_table(runs), markup=False)
    if len(sources) > 1:
        out.print("note: these runs scored different pages; compare like with like", markup=False)
    return EXIT_OK


# ----------------------------------------------------------------------------------------- ocr-review


@dataclass(frozen=True)
class ReviewedPage:
    risk: float
    markdown: Path  # the outbox file the page is in
    page: int
    method: str
    status: str
    signals: dict[str, Any]
    detail: str


def since_time(value: str, now: float) -> float:
    """``--since``: ``12h``/``3d`` back from now, or a date (``2026-11-30``) or time (``…T08:00``) in local time;
    "" for today's midnight."""
    if not value:
        return datetime.fromtimestamp(now).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    units = {"h": 3600.0, "d": 86400.0, "m": 60.0}
    if value[-1:] in units and value[:-1].replace(".", "", 1).isdigit():
        return now - float(value[:-1]) * units[value[-1]]
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise ValueError(f"--since {value}: give a date (2026-11-30), a time (2026-11-30T08:00) or a span back "
                         "from now (12h, 3d)") from None


def review(folder: Path, since: float) -> list[ReviewedPage]:
    """Every page of the sidecars below ``folder`` changed since ``since``, most likely wrong first. Sidecars
    this user cannot read, or that are not the daemon's, are passed over."""
    pages: list[ReviewedPage] = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if not name.endswith(".json"):
                continue
            side = Path(root) / name
            try:
                st = side.lstat()
                if st.st_mtime < since or st.st_size > MAX_SIDECAR_BYTES or not side.is_file():
                    continue
                meta = json.loads(side.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if not isinstance(meta, dict) or not isinstance(meta.get("page_results"), list):
                continue
            for p in meta["page_results"]:
                if not isinstance(p, dict):
                    continue
                status = str(p.get("status", ""))
                # a page without signals (an older sidecar, or never converted): as doubtful as a failed one
                risk = float(p["risk"]) if isinstance(p.get("risk"), int | float) else (
                    0.0 if status == "done" else 1.0)
                signals = {k: p[k] for k in ("text_layer_cer", "attempts", "aborted_attempts", "fallback", "empty")
                           if k in p}
                pages.append(ReviewedPage(risk=risk, markdown=side.with_suffix(".md"), page=int(p.get("page", 0)),
                                          method=str(p.get("method", "")), status=status, signals=signals,
                                          detail=str(p.get("detail", ""))))
    pages.sort(key=lambda r: (-r.risk, str(r.markdown), r.page))
    return pages


def _why(r: ReviewedPage) -> str:
    s = r.signals
    why = []
    if r.status != "done":
        why.append(r.status or "not converted")
    if s.get("empty"):
        why.append("no text")
    if s.get("fallback"):
        why.append("fallback")
    if s.get("aborted_attempts"):
        why.append(f"{s['aborted_attempts']} aborted attempt(s)")
    if s.get("text_layer_cer") is not None:
        why.append(f"text layer differs {s['text_layer_cer'] * 100:.1f} %")
    return ", ".join(why)


def cmd_ocr_review(args: argparse.Namespace, c: Client) -> int:
    folder = Path(args.dir).expanduser().absolute() if args.dir else c.paths.outbox
    if not folder.is_dir():
        return usage(f"{folder} is not a folder; give the outbox (or a folder of it) to review")
    try:
        since = since_time(args.since or "", time.time())
    except ValueError as exc:
        return usage(str(exc))
    pages = review(folder, since)[: args.limit]
    if args.json:
        emit_json([{"risk": r.risk, "markdown": str(r.markdown), "page": r.page, "method": r.method,
                    "status": r.status, **r.signals, "detail": r.detail} for r in pages])
        return EXIT_OK
    if not pages:
        err.print(f"no converted pages in {folder} since {datetime.fromtimestamp(since):%Y-%m-%d %H:%M}",
                  markup=False)
        return EXIT_OK
    table = Table(box=None, pad_edge=False)
    for col in ("risk", "file", "page", "method", "why"):
        table.add_column(col, justify="right" if col in ("risk", "page") else "left")
    for r in pages:
        shown = r.markdown.relative_to(folder) if r.markdown.is_relative_to(folder) else r.markdown
        table.add_row(f"{r.risk:.2f}", str(shown), str(r.page), r.method, _why(r) or "-")
    out.print(table)
    return EXIT_OK


def add_parsers(commands: Subparsers) -> None:
    """``ftctl ocr-eval``, ``ocr-compare`` and ``ocr-review``."""
    sp = commands.add_parser("ocr-eval", help="score the OCR on PDFs whose text is known (CER, WER, tables, …)",
                             description="Convert each x.pdf of DIR (or the validation documents of a from-pages "
                             "dataset) with the engine (and adapter) and score every page against its truth (x.md "
                             "beside it): character and word error rate, heading recall, "
                             "table-cell F1, reading order. The files are opened by ftctl with your rights and "
                             "handed to the daemon. Compare runs with `ftctl ocr-compare`.")
    sp.set_defaults(fn=cmd_ocr_eval)
    sp.add_argument("source", metavar="DATASET_OR_DIR",
                    help="a folder of x.pdf + x.md (truth) pairs, or a dataset built by `ftctl dataset from-pages` "
                         "(its validation documents are scored)")
    sp.add_argument("--engine", help="cpu | vllm | remote (default: the daemon's engine)")
    sp.add_argument("--adapter", help="a LoRA adapter loaded in the vLLM engine (a train job's number: its "
                                      "deployed adapter jobN)")
    add_submit_flags(sp)

    sp = commands.add_parser("ocr-compare", help="ocr_eval runs side by side (CER, WER, headings, tables, order)",
                             description="Print the scores of finished ocr_eval jobs side by side: one row per "
                             "metric, one column per run (base model vs adapter vs cpu on the same pages).")
    sp.set_defaults(fn=cmd_ocr_compare)
    sp.add_argument("jobs", type=int, nargs="+", metavar="JOB", help="ocr_eval job ids, one column each")
    sp.add_argument("--json", action="store_true")

    sp = commands.add_parser("ocr-review", help="a day's converted pages, the most likely wrong first",
                             description="Read the sidecars (<name>.json) in the outbox (or DIR) with your rights "
                             "and list their pages by the daemon's risk signal: failed or empty pages, fallbacks, "
                             "aborted VLM attempts, OCR output that differs from the page's own text layer.")
    sp.set_defaults(fn=cmd_ocr_review)
    sp.add_argument("dir", nargs="?", help="the folder to review (default: the outbox)")
    sp.add_argument("--since", help="from when: a date, a time or a span back (12h, 3d); default: today")
    sp.add_argument("--limit", type=int, default=50, help="pages to list (default 50)")
    sp.add_argument("--json", action="store_true")
