"""Drop a PDF into the hot folder, get Markdown back: a real daemon, a real watchdog, real MuPDF workers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from shared.protocol import JobList, ListJobs
from tests.daemon_proc import DaemonProc, wait_for
from tests.fixtures import pdfs
from tests.hotfolder.conftest import hot_daemon, landed


def drop(d: DaemonProc, src: Path, rel: str = "") -> Path:
    """Copy a file into the inbox the way careful tools do: write a .part file, then rename it."""
    dest_dir = d.paths.inbox / rel
    dest_dir.mkdir(parents=True, exist_ok=True)
    part = dest_dir / (src.name + ".part")
    shutil.copyfile(src, part)
    dest = dest_dir / src.name
    os.rename(part, dest)
    return dest


def test_born_digital_scan_and_mixed_pdfs_become_markdown(hot: DaemonProc, tmp_path: Path) -> None:
    drop(hot, pdfs.born_digital(tmp_path / "report.pdf"))
    drop(hot, pdfs.scanned(tmp_path / "letter.pdf"), rel="scans/2026")
    drop(hot, pdfs.mixed(tmp_path / "mixed.pdf"))
    for name in ("report.pdf", "letter.pdf", "mixed.pdf"):
        where = wait_for(lambda n=name: landed(hot, n), 120, f"{name} to be converted")
        assert hot.paths.done in where.parents, (name, where)  # type: ignore[union-attr]
    report = (hot.paths.outbox / "report.md").read_text()
    assert f"# **{pdfs.TITLE}**" in report or f"# {pdfs.TITLE}" in report
    assert pdfs.INTRO in report and pdfs.CJK_TEXT in report
    assert "|North|120|4800|" in report.replace(" ", "") and "|---|---|---|" in report.replace(" ", "")
    # the subfolder is mirrored in outbox and done; the scan's text came back through OCR
    letter = (hot.paths.outbox / "scans" / "2026" / "letter.md").read_text()
    assert "quick brown fox" in letter and "4711" in letter
    assert (hot.paths.done / "scans" / "2026" / "letter.pdf").exists()
    side = json.loads((hot.paths.outbox / "scans" / "2026" / "letter.json").read_text())
    assert side["pages"] == 1 and side["engine"] == "cpu" and len(side["sha256"]) == 64
    assert side["page_results"][0]["method"] == "ocr" and side["page_results"][0]["status"] == "done"
    mixed = json.loads((hot.paths.outbox / "mixed.json").read_text())
    assert [p["method"] for p in mixed["page_results"]] == ["text_layer", "ocr", "text_layer"]
    text = (hot.paths.outbox / "mixed.md").read_text()
    assert all(w in text for w in pdfs.MIXED_WORDS)
    assert not list(hot.paths.inbox.rglob("*.pdf"))


def test_partial_hidden_and_backup_files_are_ignored(hot: DaemonProc, tmp_path: Path) -> None:
    src = pdfs.numbered(tmp_path / "n.pdf", pages=1)
    for name in ("a.pdf.part", "b.pdf.crdownload", ".hidden.pdf", "c.pdf~", "notes.txt"):
        shutil.copyfile(src, hot.paths.inbox / name)
    (hot.paths.inbox / ".sync").mkdir()
    shutil.copyfile(src, hot.paths.inbox / ".sync" / "d.pdf")
    drop(hot, src)  # a real one, to know the watcher has looked at everything
    wait_for(lambda: landed(hot, "n.pdf"), 60, "n.pdf to be converted")
    left = sorted(p.name for p in hot.paths.inbox.rglob("*") if p.is_file())
    assert left == [".hidden.pdf", "a.pdf.part", "b.pdf.crdownload", "c.pdf~", "d.pdf", "notes.txt"]
    jobs = hot.client().call(ListJobs(all=True), JobList).jobs
    assert [j.name for j in jobs] == ["n.pdf"]


def test_same_content_twice_gives_one_job_and_says_where_the_output_is(hot: DaemonProc, tmp_path: Path) -> None:
    src = pdfs.numbered(tmp_path / "first.pdf", pages=2)
    drop(hot, src)
    wait_for(lambda: landed(hot, "first.pdf"), 60, "first.pdf to be converted")
    again = tmp_path / "again.pdf"
    shutil.copyfile(src, again)
    drop(hot, again)
    where = wait_for(lambda: landed(hot, "again.pdf"), 60, "the duplicate to be moved")
    assert hot.paths.done in where.parents  # type: ignore[union-attr]
    note = Path(str(where) + ".note.txt").read_text()
    assert "same content as first.pdf" in note and "first.md" in note and "--force" in note
    assert len(hot.client().call(ListJobs(all=True), JobList).jobs) == 1


def test_files_already_in_inbox_at_start_are_taken(tmp_path: Path) -> None:
    d = hot_daemon()
    try:
        d.paths.inbox.mkdir(parents=True)
        shutil.copyfile(pdfs.numbered(tmp_path / "early.pdf", pages=1), d.paths.inbox / "early.pdf")
        d.start()
        wait_for(lambda: landed(d, "early.pdf"), 60, "early.pdf to be converted")
        assert (d.paths.outbox / "early.md").exists()
    finally:
        d.close()


def test_deleting_and_recreating_the_inbox_does_not_stop_it(hot: DaemonProc, tmp_path: Path) -> None:
    shutil.rmtree(hot.paths.inbox)
    wait_for(lambda: hot.paths.inbox.is_dir(), 10, "the daemon to recreate the inbox")
    # again and again while the daemon may be between making the inbox and watching it; a new folder may
    # reuse the old one's inode number
    for _ in range(5):
        shutil.rmtree(hot.paths.inbox, ignore_errors=True)
        hot.paths.inbox.mkdir(exist_ok=True)
    drop(hot, pdfs.numbered(tmp_path / "later.pdf", pages=1))
    wait_for(lambda: landed(hot, "later.pdf"), 60, "later.pdf to be converted after the inbox came back")
    assert "watching it again" in hot.log_text()


def test_encrypted_pdf_needs_its_password_and_broken_files_fail_with_a_reason(hot: DaemonProc,
                                                                              tmp_path: Path) -> None:
    locked = pdfs.encrypted(tmp_path / "locked.pdf")
    keyed = pdfs.encrypted(tmp_path / "keyed.pdf", password="open sesame")
    (hot.paths.inbox / "keyed.pdf.password").write_text("open sesame\n")
    drop(hot, keyed)
    drop(hot, locked)
    drop(hot, pdfs.zero_pages(tmp_path / "empty.pdf"))
    drop(hot, pdfs.not_pdf(tmp_path / "list.pdf"))
    for name in ("keyed.pdf", "locked.pdf", "empty.pdf", "list.pdf"):
        wait_for(lambda n=name: landed(hot, n), 60, f"{name} to end")
    assert pdfs.ENCRYPTED_TEXT in (hot.paths.outbox / "keyed.md").read_text()
    errors = {n: (hot.paths.failed / f"{n}.error.txt").read_text() for n in ("locked.pdf", "empty.pdf", "list.pdf")}
    assert "encrypted" in errors["locked.pdf"] and "password" in errors["locked.pdf"]
    assert "page" in errors["empty.pdf"]
    for text in errors.values():
        assert "What to do" in text
    assert hot.proc is not None and hot.proc.poll() is None
