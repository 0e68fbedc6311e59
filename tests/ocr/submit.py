"""How tests submit an OCR job as ftctl does: the PDF handed over (shared/handover.py), the spec naming what
the daemon answered; and how ftctl's --out-dir fetches the results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.client import Client
from shared.handover import hand_over
from shared.protocol import JobDetail, Submit
from tui.ftctl.ocr import fetch_outputs


def submit_ocr(c: Client, pdf: Path, **spec: Any) -> JobDetail:
    handed = hand_over(c.paths, pdf)
    return c.call(Submit(kind="ocr", spec={"spool": handed.sha256, "name": pdf.name, **spec}), JobDetail)


def fetch(c: Client, job_id: int, out_dir: Path) -> tuple[Path, Path]:
    """The job's Markdown and sidecar written into ``out_dir``, as `ftctl submit ocr --out-dir` does."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return fetch_outputs(c, job_id, out_dir)
