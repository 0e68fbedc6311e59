"""kill -9 of the daemon in the middle of a 50-page document: the restart converts only what was left."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from shared.protocol import JobDetail, ShowJob
from tests.daemon_proc import wait_for
from tests.fixtures import pdfs
from tests.hotfolder.conftest import hot_daemon
from tests.ocr.submit import fetch, submit_ocr


def engine_calls(job_log: Path) -> Counter[int]:
    """Pages handed to the engine, from the job log's 'page N: converting' lines (one per engine call)."""
    return Counter(int(m) for m in re.findall(r"page (\d+): converting", job_log.read_text()))


def test_kill9_mid_document_resumes_at_first_unfinished_page_with_identical_output(tmp_path: Path) -> None:
    src = pdfs.numbered(tmp_path / "fifty.pdf", pages=50)
    d = hot_daemon()
    try:
        d.start()
        c = d.client()
        job = submit_ocr(c, src).job
        wait_for(lambda: c.call(ShowJob(job_id=job.id), JobDetail).job.progress.done >= 10, 120, "10 pages done")
        d.kill9()
        before = engine_calls(d.paths.state_dir / "jobs" / str(job.id) / "job.log")
        done_before = {n for n in before}
        assert 10 <= len(done_before) < 50
        d.start()
        c = d.client()
        final = wait_for(lambda: (j := c.call(ShowJob(job_id=job.id), JobDetail).job).state == "succeeded" and j,
                         180, "the resumed job to finish")
        fetch(c, job.id, tmp_path / "a")  # before the second run writes its own (same name, same owner)
        calls = engine_calls(d.paths.state_dir / "jobs" / str(job.id) / "job.log")
        assert set(calls) == set(range(1, 51))
        twice = [n for n, k in calls.items() if k > 1]
        # only pages that were in flight at the kill (at most one per worker) may have run twice
        assert len(twice) <= 2, twice
        history = [h.what for h in c.call(ShowJob(job_id=job.id), JobDetail).history]
        assert any(h.startswith("resuming at page") for h in history)
        # an uninterrupted run of the same file gives the same Markdown
        again = submit_ocr(c, src, force=True).job
        wait_for(lambda: c.call(ShowJob(job_id=again.id), JobDetail).job.state == "succeeded", 180, "second run")
        fetch(c, again.id, tmp_path / "b")
        assert Path(final.artifacts["markdown"]).name == "fifty.md"  # type: ignore[union-attr]
        resumed_md = (tmp_path / "a" / "fifty.md").read_text()
        assert resumed_md == (tmp_path / "b" / "fifty.md").read_text()
        assert all(pdfs.page_word(k) in resumed_md for k in range(1, 51))
    finally:
        d.close()
