"""The real-world pdf.js corpus (69 files, many broken) dropped into the hot folder at once.

Every file must end in done/ or failed/ with a reason, no file may hold the queue past its page timeout,
the daemon must not die, and files whose password is known convert when it is given (as a sidecar).
"""

from __future__ import annotations

import csv
import shutil
import time
from pathlib import Path

import pytest

from shared.protocol import JobList, ListJobs
from tests.daemon_proc import ROOT, wait_for
from tests.hotfolder.conftest import hot_daemon, landed

CORPUS = ROOT.parent / "shared" / "corpus" / "pdfjs"
PAGE_TIMEOUT_S = 30


def manifest() -> list[dict[str, str]]:
    with (CORPUS / "MANIFEST.tsv").open() as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"the corpus is not at {CORPUS} (../shared/corpus/pdfjs)")
def test_every_corpus_file_ends_in_done_or_failed_with_a_reason() -> None:
    rows = manifest()
    assert len(rows) == 69
    d = hot_daemon()
    cfg = d.home / "ftmllm.toml"
    # legacy Markdown: this test is about robustness on broken files, not layout quality (tested elsewhere)
    cfg.write_text(cfg.read_text().replace("page_timeout_s = 60.0", f"page_timeout_s = {PAGE_TIMEOUT_S}.0\n"
                                                                      "markdown_mode = 'legacy'"))
    d.start()
    try:
        t0 = time.monotonic()
        for row in rows:
            if row["password"]:
                (d.paths.inbox / (row["file"] + ".password")).write_text(row["password"])
            shutil.copyfile(CORPUS / row["file"], d.paths.inbox / row["file"])
        total_pages = sum(int(r["pages_pymupdf"] or 0) for r in rows)
        # generous: every page could time out once and there are two workers
        deadline = 120 + total_pages * 2.0
        wait_for(lambda: all(landed(d, r["file"]) for r in rows), deadline, "every corpus file to land")
        elapsed = time.monotonic() - t0
        assert d.proc is not None and d.proc.poll() is None, "the daemon died"
        jobs = {j.name: j for j in d.client().call(ListJobs(all=True), JobList).jobs}
        table = []
        outcome: dict[str, str] = {}
        for row in rows:
            where = landed(d, row["file"])
            assert where is not None
            if d.paths.done in where.parents:
                outcome[row["file"]] = "done"
                reason = ""
            else:
                outcome[row["file"]] = "failed"
                reason = Path(str(where) + ".error.txt").read_text().splitlines()[0]
                assert reason and "What to do" in Path(str(where) + ".error.txt").read_text()
            job = jobs.get(row["file"])
            if job is not None and job.started and job.finished:
                # nothing held the queue past its timeout: a job takes at most its pages × the page timeout
                assert job.finished - job.started < (int(row["pages_pymupdf"] or 1) + 2) * PAGE_TIMEOUT_S
            table.append((row["category"], row["file"], row["pages_pymupdf"], row["plain_pymupdf_result"],
                          outcome[row["file"]], reason[:90]))
        print(f"\ncorpus: {len(rows)} files, {total_pages} pages in {elapsed:.0f}s")
        for line in sorted(table):
            print("  {:<11} {:<32} {:>4} {:<17} {:<6} {}".format(*line))
        counts = {k: list(outcome.values()).count(k) for k in ("done", "failed")}
        print(f"  done={counts['done']} failed={counts['failed']}")
        for row in rows:
            if row["password"] and row["file"] != "saslprep-r6.pdf":
                assert outcome[row["file"]] == "done", f"{row['file']} did not convert with its known password"
            if row["plain_pymupdf_result"] == "zero_pages":
                assert outcome[row["file"]] == "failed"
        assert counts["done"] >= 50
        assert not list(d.paths.inbox.glob("*.pdf"))
    finally:
        d.close()
