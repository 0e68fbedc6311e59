"""``ftctl submit ocr FILE.pdf``: submit a conversion, with a progress bar (pages/s, ETA) and, with
``--follow``, the current page's text as the engine streams it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from shared.client import Client
from shared.protocol import EventBody, JobDetail, JobInfo, Submit, TextDelta
from tui.ftctl.args import Subparsers, add_submit_flags
from tui.ftctl.follow import View, follow
from tui.ftctl.output import EXIT_OK, emit_json, err, job_exit


def cmd_submit_ocr(args: argparse.Namespace, c: Client) -> int:
    path = Path(args.file).expanduser().resolve()
    spec: dict[str, Any] = {"file": str(path), "force": args.force}
    for key in ("password", "engine", "adapter", "out_dir"):
        value = getattr(args, key)
        if value:
            spec[key] = str(Path(value).expanduser().resolve()) if key == "out_dir" else value
    if args.pages:
        spec["max_pages"] = args.pages
    job = c.call(Submit(kind="ocr", spec=spec, name=args.name or ""), JobDetail).job
    if not (args.wait or args.follow):
        if args.json:
            emit_json(job)
        else:
            err.print(f"job {job.id} queued ({job.name}); `ftctl show {job.id}` for its state")
            print(job.id)
        return EXIT_OK
    job = follow(c, job.id, OcrView(stream_text=args.follow, quiet=args.json))
    if args.json:
        emit_json(job)
    elif job.state == "succeeded":
        err.print(f"job {job.id} succeeded: {job.artifacts.get('markdown', '')}")
    else:
        err.print(f"job {job.id} {job.state}: {job.error}")
    return job_exit(job)


class OcrView(View):
    """Pages done of all, pages/s and the time left; with ``stream_text``, the text of each page on stdout
    as the engine writes it."""

    def __init__(self, *, stream_text: bool, quiet: bool) -> None:
        super().__init__(quiet=quiet)
        self.stream_text = stream_text
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=err,
                                 disable=quiet, transient=stream_text)
        self.task: TaskID | None = None
        self.job_id = 0
        self.current_page = 0

    def topics(self, job_id: int) -> tuple[str, ...]:
        return (f"ocr.{job_id}",) if self.stream_text else ()

    def open(self, job: JobInfo) -> None:
        self.job_id = job.id
        self.progress.start()
        self.task = self.progress.add_task(f"job {job.id} {job.name}", total=job.progress.total or None, rate="")

    def job_changed(self, job: JobInfo, what: str) -> None:
        # the bar says it all: no history lines
        assert self.task is not None
        p = job.progress
        self.progress.update(self.task, completed=p.done, total=p.total or None,
                             rate=f"{p.rate:.2f} pages/s" if p.rate else "")

    def event(self, body: EventBody) -> None:
        if not (self.stream_text and isinstance(body, TextDelta) and body.job_id == self.job_id):
            return
        if body.page_no != self.current_page:
            self.current_page = body.page_no
            sys.stdout.write(f"\n\n--- page {self.current_page} ---\n")
        if body.reset:
            sys.stdout.write("\n[retrying this page]\n")
        sys.stdout.write(body.text)
        sys.stdout.flush()

    def close(self) -> None:
        self.progress.stop()
        if self.stream_text:
            sys.stdout.write("\n")


def add_parser(kinds: Subparsers) -> None:
    """``ftctl submit ocr``."""
    sp = kinds.add_parser("ocr", help="convert a PDF to Markdown",
                          description="Convert a PDF to Markdown (written next to the hot folder's outbox "
                          "unless --out-dir). The same content twice gives one job unless --force.")
    sp.set_defaults(fn=cmd_submit_ocr)
    sp.add_argument("file", help="the PDF")
    sp.add_argument("--password", help="for an encrypted PDF (or put it in FILE.pdf.password)")
    sp.add_argument("--engine", help="cpu | vllm | remote (default: the daemon's engine)")
    sp.add_argument("--adapter", help="a LoRA adapter loaded in the vLLM engine")
    sp.add_argument("--out-dir", dest="out_dir", help="where the .md and .json go (default: the outbox)")
    sp.add_argument("--pages", type=int, default=0, help="convert only the first N pages")
    sp.add_argument("--force", action="store_true", help="convert again even if this content was converted")
    sp.add_argument("--follow", action="store_true", help="stream the text of the page being converted")
    add_submit_flags(sp)
