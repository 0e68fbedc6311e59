"""What the spool keeps: entries a queued job still needs survive a collection however old, the rest go."""

from __future__ import annotations

import os
import time
from pathlib import Path

from daemon.core.store import Store
from daemon.spool.part import SpoolPart
from daemon.spool.spool import Spool
from shared.config import load_settings


def spooled(spool: Spool, path: Path, data: bytes) -> str:
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        return spool.put(fd, os.getuid()).sha256
    finally:
        os.close(fd)


def test_an_ocr_eval_jobs_pdfs_and_truth_files_are_held_like_an_ocr_jobs_file(tmp_path: Path) -> None:
    settings = load_settings(None, tmp_path / "home")
    spool = Spool.of(settings)
    spool.prepare()
    store = Store(tmp_path / "state.sqlite")
    try:
        ocr_pdf, pdf, truth, loose = (spooled(spool, tmp_path / f"f{i}", f"file {i}".encode()) for i in range(4))
        store.create_job("ocr", "alice", "a.pdf", {"sha256": ocr_pdf})
        store.create_job("ocr_eval", "alice", "eval", {"docs": [{"pdf": pdf, "truth": truth, "name": "x.pdf"}]})
        part = SpoolPart(settings, spool, store, allowed=lambda uid: True)
        assert part.held() == {ocr_pdf, pdf, truth}
        later = time.time() + settings.config.spool.keep_hours * 3600 + 60
        assert spool.collect(part.held(), now=later) == 1
        assert spool.path(loose) is None
        assert all(spool.path(d) is not None for d in (ocr_pdf, pdf, truth))
    finally:
        store.close()
