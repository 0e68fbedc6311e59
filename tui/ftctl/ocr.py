"""``ftctl submit ocr FILE.pdf``: submit a conversion, with a progress bar (pages/s, ETA) and, with
``--follow``, the current page's text as the engine streams it.

The PDF is opened here, with the user's own rights, and handed to the daemon (shared/handover.py): a file
the user cannot read is refused before anything is sent. With ``--out-dir`` ftctl waits for the job and
writes the Markdown and its sidecar itself, again with the user's rights. A password is asked for
(``--password``) or read from a file or stdin (``--password-file``), never taken from the command line,
where every user on the machine could read it (``ps``).
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from shared.client import Client
from shared.handover import HandoverRefused, HandoverUnavailable, hand_over
from shared.protocol import EventBody, JobDetail, JobInfo, OcrOutput, OcrOutputReply, Submit, TextDelta
from tui.ftctl.args import Subparsers, add_submit_flags
from tui.ftctl.follow import View, follow
from tui.ftctl.output import EXIT_FAILED, EXIT_OK, emit_json, err, handover_failed, job_exit, usage

ASK = "\0ask"  # --password without a value
MAX_PASSWORD_BYTES = 4096


class Problem(Exception):
    """Something about the command's files; the message names the file and what to do."""


def cmd_submit_ocr(args: argparse.Namespace, c: Client) -> int:
    path = Path(args.file).expanduser().absolute()
    try:
        out_dir = writable_dir(Path(args.out_dir).expanduser().absolute()) if args.out_dir else None
        password = read_password(args, path)
        handed = hand_over(c.paths, path)
    except Problem as exc:
        return usage(str(exc))
    except (HandoverRefused, HandoverUnavailable) as exc:
        return handover_failed(exc)
    spec: dict[str, Any] = {"spool": handed.sha256, "name": handed.name, "force": args.force}
    for key, value in (("password", password), ("engine", args.engine), ("adapter", args.adapter),
                       ("max_pages", args.pages)):
        if value:
            spec[key] = value
    body = Submit(kind="ocr", spec=spec, name=args.name or "", priority=args.priority,
                  interactive=bool(args.wait or args.follow or out_dir))  # someone waits for it
    job = c.call(body, JobDetail).job
    if not (args.wait or args.follow or out_dir):
        if args.json:
            emit_json(job)
        else:
            err.print(f"job {job.id} queued ({job.name}); `ftctl show {job.id}` for its state")
            print(job.id)
        return EXIT_OK
    job = follow(c, job.id, OcrView(stream_text=args.follow, quiet=args.json))
    markdown = job.artifacts.get("markdown", "")
    if out_dir is not None and markdown:
        try:
            markdown = str(fetch_outputs(c, job.id, out_dir)[0])
        except OSError as exc:
            err.print(f"ftctl: job {job.id} {job.state}, but writing its results into {out_dir} failed "
                      f"({exc.strerror or exc}); they are also in the daemon's outbox: {markdown}",
                      markup=False)
            return EXIT_FAILED
    if args.json:
        emit_json(job)
    elif job.state == "succeeded":
        err.print(f"job {job.id} succeeded: {markdown}", markup=False)
    else:
        err.print(f"job {job.id} {job.state}: {job.error}", markup=False)
    return job_exit(job)


def read_password(args: argparse.Namespace, pdf: Path) -> str:
    """The PDF's password: asked for (--password), read from a file or stdin (--password-file), or from
    FILE.pdf.password next to it; "" for none."""
    if args.password not in (None, ASK):
        raise Problem("--password takes no value: a password on the command line is visible to every user (ps); "
                      "give --password alone to be asked for it, or --password-file FILE (- for stdin)")
    if args.password_file:
        source = Path(args.password_file).expanduser()
        try:
            raw = sys.stdin.read(MAX_PASSWORD_BYTES) if args.password_file == "-" else \
                source.read_text(encoding="utf-8")[:MAX_PASSWORD_BYTES]
        except (OSError, UnicodeDecodeError) as exc:
            raise Problem(f"--password-file {source}: cannot be read ({getattr(exc, 'strerror', None) or exc}); "
                          "give a readable UTF-8 file, or - to read the password from stdin") from None
        return raw.strip("\r\n")
    if args.password == ASK:
        return getpass.getpass(f"password for {pdf.name}: ")
    side = pdf.with_name(pdf.name + ".password")
    try:
        return side.read_text(encoding="utf-8")[:MAX_PASSWORD_BYTES].strip("\r\n")
    except (OSError, UnicodeDecodeError):
        return ""


def writable_dir(folder: Path) -> Path:
    """``folder``, made if missing, once it is known the user may write there: before the job, not after."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Problem(f"--out-dir {folder}: cannot be made ({exc.strerror}); give a folder you can write to") from None
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise Problem(f"--out-dir {folder}: not a folder you can write to; give another one")
    return folder


def fetch_outputs(c: Client, job_id: int, out_dir: Path) -> tuple[Path, Path]:
    """Fetch an OCR job's Markdown and sidecar and write them into ``out_dir`` with the user's own rights
    (whole files: written to a temp name, then renamed); returns their paths."""
    reply = c.call(OcrOutput(job_id=job_id), OcrOutputReply, timeout=120.0)
    stem = Path(reply.name).name.lstrip(".").replace("\0", "") or "document"
    md, side = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    _write_whole(side, reply.sidecar)
    _write_whole(md, reply.markdown)
    return md, side


def _write_whole(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # mode 0666 less the umask, as any file the user makes
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
                          description="Convert a PDF to Markdown (written into the hot folder's outbox; with "
                          "--out-dir also into that folder, by ftctl with your rights). The PDF is opened by "
                          "ftctl with your rights and handed to the daemon. The same content twice gives one "
                          "job unless --force.")
    sp.set_defaults(fn=cmd_submit_ocr)
    sp.add_argument("file", help="the PDF")
    sp.add_argument("--password", nargs="?", const=ASK, metavar="",
                    help="ask for the password of an encrypted PDF (it is never taken from the command line, "
                         "where ps shows it to everyone; FILE.pdf.password next to the PDF works too)")
    sp.add_argument("--password-file", dest="password_file", metavar="FILE",
                    help="read the PDF's password from FILE (- for stdin)")
    sp.add_argument("--engine", help="cpu | vllm | remote (default: the daemon's engine)")
    sp.add_argument("--adapter", help="a LoRA adapter loaded in the vLLM engine")
    sp.add_argument("--out-dir", dest="out_dir",
                    help="wait for the job, then write the .md and .json into this folder (with your rights)")
    sp.add_argument("--pages", type=int, default=0, help="convert only the first N pages")
    sp.add_argument("--force", action="store_true", help="convert again even if this content was converted")
    sp.add_argument("--follow", action="store_true", help="stream the text of the page being converted")
    add_submit_flags(sp)
