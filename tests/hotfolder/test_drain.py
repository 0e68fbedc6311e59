"""Many files through the hot folder: owners take turns, and a kill -9 mid-drain loses and repeats nothing."""

from __future__ import annotations

import re
from pathlib import Path

from shared.protocol import JobList, ListJobs
from tests.daemon_proc import DaemonProc, wait_for
from tests.hotfolder.conftest import hot_daemon
from tests.hotfolder.drops import drop_many, word

LEGACY = """
markdown_mode = "legacy"
"""
ALICE, BOB = 50_001, 50_002  # uids without passwd entries: their jobs are "uid50001"'s and "uid50002"'s


def ocr_jobs(d: DaemonProc) -> JobList:
    return d.client().call(ListJobs(all=True, limit=1000), JobList)


def test_a_colleagues_one_file_does_not_wait_for_anothers_backlog(tmp_path: Path) -> None:
    # two documents open at once, so the job queue's order decides as much as the page queue's
    d = hot_daemon(LEGACY + "max_concurrent_jobs = 2\n")
    try:
        d.start()
        drop_many(d.paths.inbox, tmp_path / "a", range(1, 13), pages=6, uid=ALICE, prefix="alice")
        wait_for(lambda: sum(j.owner == f"uid{ALICE}" for j in ocr_jobs(d).jobs) == 12, 60,
                 "alice's twelve files to be queued")
        drop_many(d.paths.inbox, tmp_path / "b", range(100, 101), pages=1, uid=BOB, prefix="bob")
        bob = wait_for(lambda: [j for j in ocr_jobs(d).jobs if j.owner == f"uid{BOB}" and j.state == "succeeded"],
                       120, "bob's file to be converted")
        assert isinstance(bob, list)
        finished = bob[0].finished or 0
        alice_done = [j for j in ocr_jobs(d).jobs if j.owner == f"uid{ALICE}" and j.state == "succeeded"
                      and (j.finished or 0) < finished]
        # in submit order bob would wait for all twelve; owners in turn, for the two open and about one more
        assert len(alice_done) <= 5, [j.name for j in alice_done]
        wait_for(lambda: all(j.state == "succeeded" for j in ocr_jobs(d).jobs), 180, "alice's files")
    finally:
        d.close()


def converting_lines(d: DaemonProc) -> int:
    return sum(len(re.findall(r"page \d+: converting", log.read_text()))
               for log in (d.paths.state_dir / "jobs").glob("*/job.log"))


def test_kill9_mid_drain_then_restart_gives_each_output_once(tmp_path: Path) -> None:
    n = 200
    d = hot_daemon(LEGACY)
    try:
        d.start()
        drop_many(d.paths.inbox, tmp_path / "drop", range(n))
        wait_for(lambda: len(list(d.paths.done.glob("*.pdf"))) >= n // 4, 120, "a quarter of the drop to be done")
        d.kill9()
        at_kill = len(list(d.paths.done.glob("*.pdf")))
        assert at_kill < n, "the drain was over before the kill; the test proves nothing"
        d.start()
        wait_for(lambda: len(list(d.paths.done.glob("*.pdf"))) == n and not list(d.paths.inbox.glob("*.pdf")),
                 300, f"all {n} files to be done after the restart")
        outputs = sorted(d.paths.outbox.glob("*.md"))
        assert len(outputs) == n and not list(d.paths.failed.iterdir())
        assert not list(d.paths.done.glob("*.note.txt")), "a file was taken twice and refused as a duplicate"
        for k, md in enumerate(outputs):
            assert md.name == f"scan{k:06d}.md" and word(k) in md.read_text()
        jobs = ocr_jobs(d).jobs
        assert len(jobs) == n and all(j.state == "succeeded" for j in jobs)
        # no page converted twice but those in flight at the kill (one per engine slot)
        assert n <= converting_lines(d) <= n + 2
    finally:
        d.close()
