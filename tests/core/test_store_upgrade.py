"""A store written by the previous version opens in this one: its jobs are listed and go on where they were.

The fixture is that version's own store as SQL text (tests/fixtures/store_v_0172257.sql, made by running the
daemon of commit 0172257): job 1 succeeded, job 2 (a selftest at step 11 of 30) was running when the daemon
was killed -9, job 3 was queued while the queue was paused.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from daemon.core.store import SCHEMA_VERSION, Store
from shared.protocol import Done, JobDetail, JobList, ListJobs, ResumeQueue, ShowJob, Status, StatusReply
from tests.daemon_proc import DaemonProc, wait_for

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "store_v_0172257.sql"


def event_columns(db_path: Path) -> list[str]:
    db = sqlite3.connect(db_path)
    try:
        return [row[1] for row in db.execute("PRAGMA table_info(events)")]
    finally:
        db.close()


def test_a_store_of_the_previous_version_opens_and_its_interrupted_job_resumes() -> None:
    d = DaemonProc()
    db_path = d.paths.state_dir / "ftmllm.sqlite"
    db_path.parent.mkdir(parents=True)
    db = sqlite3.connect(db_path)
    db.executescript(FIXTURE.read_text())
    db.close()
    assert "body" in event_columns(db_path)
    try:
        d.start()
        c = d.client()
        jobs = c.call(ListJobs(all=True), JobList).jobs
        assert [(j.id, j.name, j.state) for j in jobs] == [
            (1, "done before the upgrade", "succeeded"),
            (2, "running at the upgrade", "queued"),
            (3, "queued at the upgrade", "queued"),
        ]
        history = [h.what for h in c.call(ShowJob(job_id=2), JobDetail).history]
        assert history[-2:] == ["interrupted: the daemon stopped while this job ran",
                                "resuming by itself after the daemon restart"]
        assert c.call(Status(), StatusReply).queue_paused  # paused before the upgrade, paused after it
        assert c.hello().seq > 21  # the old store's last seq: new events come after it

        c.call(ResumeQueue(), Done)
        wait_for(lambda: [c.call(ShowJob(job_id=j), JobDetail).job.state for j in (2, 3)] == ["succeeded"] * 2,
                 20, "jobs 2 and 3 to succeed")
        resumed = c.call(ShowJob(job_id=2), JobDetail)
        assert resumed.job.attempts == 2 and "resuming at step 12 of 30" in [h.what for h in resumed.history]
        assert d.stop() == 0
        db = sqlite3.connect(db_path)
        assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == (str(SCHEMA_VERSION),)
        db.close()
        assert "body" not in event_columns(db_path)
    finally:
        d.close()


def test_a_new_store_has_no_event_bodies(tmp_path: Path) -> None:
    Store(tmp_path / "new.sqlite").close()
    assert event_columns(tmp_path / "new.sqlite") == ["seq", "ts", "job_id", "what"]


def test_an_older_store_gains_job_priorities_that_last(tmp_path: Path) -> None:
    db_path = tmp_path / "old.sqlite"
    db = sqlite3.connect(db_path)
    db.executescript(FIXTURE.read_text())
    db.close()
    store = Store(db_path)
    try:
        assert [(j.id, j.priority, j.interactive) for j in store.list_jobs()] == [(1, 0, False), (2, 0, False),
                                                                                  (3, 0, False)]
        _seq, job = store.update_job(3, "priority 0 → 7", priority=7)
        assert job.priority == 7
    finally:
        store.close()
    reopened = Store(db_path)
    try:
        assert reopened.get_job(3).priority == 7 and reopened.get_job(2).priority == 0
    finally:
        reopened.close()
