"""Many distinct small PDFs dropped at once, as a scanner or a mail rule does (tests and bench/hotfolder_scale.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pymupdf


def word(k: int) -> str:
    """The distinct word of drop k: every file has its own content (the hot folder refuses repeats)."""
    return f"sheet{k:06d}"


def make_pdf(path: Path, k: int, pages: int = 1) -> Path:
    doc = pymupdf.open()
    for n in range(1, pages + 1):
        page = doc.new_page(width=595, height=842)
        page.insert_text((72, 72), f"Scan {k} page {n}", fontsize=16, fontname="hebo")
        page.insert_text((72, 110), f"The word of this sheet is {word(k)} on page {n}.", fontsize=11)
    doc.save(path)
    doc.close()
    return path


def drop_many(inbox: Path, scratch: Path, ks: range, pages: int = 1, uid: int | None = None,
              prefix: str = "scan") -> list[Path]:
    """Write each PDF beside the inbox, then rename it in (a complete file appears at once, as careful tools do);
    ``uid``: the owner the dropped files get (the hot folder's job owner)."""
    scratch.mkdir(parents=True, exist_ok=True)
    inbox.mkdir(parents=True, exist_ok=True)
    out = []
    for k in ks:
        src = make_pdf(scratch / f"{prefix}{k:06d}.pdf", k, pages)
        part = inbox / f"{src.name}.part"
        shutil.copyfile(src, part)
        if uid is not None:
            os.chown(part, uid, -1)
        dest = inbox / src.name
        os.rename(part, dest)
        src.unlink()
        out.append(dest)
    return out
