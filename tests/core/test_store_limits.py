"""The real Store (SQLite file) keeps itself bounded: event retention by count and age with each job's history
kept, the WAL cut back after a long reader, and the per-owner queued count the queue cap reads."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from daemon.core.store import HISTORY_KEPT, PRUNE_BATCH, PRUNE_EVERY, WAL_LIMIT_BYTES, Store, UnknownJob
from shared.protocol import Progress


def rows(store: Store, where: str = "1") -> int:
    return int(store._db.execute(f"SELECT count(*) FROM events WHERE {where}").fetchone()[0])


def test_count_retention_prunes_old_events_and_keeps_each_jobs_last_history_lines(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    _seq, chatty, _ = store.create_job("selftest", "alice", "chatty", {})
    _seq, quiet, _ = store.create_job("selftest", "bob", "quiet", {})
    store.update_job(quiet.id, "started on CPU", state="running")
    for i in range(3 * HISTORY_KEPT):  # a history line every 5 events: three times the lines it keeps
        store.update_job(chatty.id, f"line {i}", progress=Progress(done=i))
        for _ in range(4):
            store.update_job(chatty.id, "", progress=Progress(done=i))
    store.set_retention(events=500, max_age_s=0)
    while store.prune_events():
        pass
    seq = store.seq
    assert rows(store, f"what = '' AND seq <= {seq - 500}") == 0
    assert rows(store, f"seq > {seq - 500}") == 500  # the newest 500, untouched
    chatty_lines = [h.what for h in store.history(chatty.id, limit=10 * HISTORY_KEPT)]
    assert len(chatty_lines) == HISTORY_KEPT and chatty_lines[-1] == f"line {3 * HISTORY_KEPT - 1}"
    # the quiet job's two lines are far older than the newest 500 events and still there
    assert [h.what for h in store.history(quiet.id)] == ["queued by bob", "started on CPU"]
    assert store.seq == seq  # seq never goes back, however many rows went
    store.create_job("selftest", "alice", "later", {})
    assert store.seq == seq + 1
    store.close()


def test_age_retention_prunes_what_is_older_and_a_pass_is_bounded(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    _seq, job, _ = store.create_job("selftest", "alice", "j", {})
    store._db.execute("BEGIN")
    store._batch_open = True  # one transaction for the lot, as the daemon's group commit does
    for i in range(PRUNE_BATCH + 5000):
        store.update_job(job.id, "", progress=Progress(done=i))
    store._batch_open = False
    store._db.execute("COMMIT")
    young = store.seq
    store.update_job(job.id, "", progress=Progress(done=-1))
    old_rows = rows(store)
    store.retention_age_s = 60.0
    # a day later everything is old: one pass takes at most PRUNE_BATCH rows and says more is due
    assert store.prune_events(now=time.time() + 86400) is True
    assert old_rows - rows(store) <= PRUNE_BATCH
    while store.prune_events(now=time.time() + 86400):
        pass
    assert rows(store, "what = ''") == 0 and rows(store) == 1  # the job's one history line
    # now: only rows older than a minute go, and there are none
    store.update_job(job.id, "", progress=Progress(done=-2))
    assert store.prune_events() is False and rows(store, f"seq > {young}") == 1
    store.close()


def test_pruning_runs_by_itself_every_prune_every_events(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    _seq, job, _ = store.create_job("selftest", "alice", "j", {})
    store.set_retention(events=100, max_age_s=0)
    for i in range(5 * PRUNE_EVERY):
        store.update_job(job.id, "", progress=Progress(done=i))
    assert rows(store) <= 100 + PRUNE_EVERY + 1
    store.close()


def test_the_wal_is_cut_back_after_a_long_reader(tmp_path: Path) -> None:
    """The store's multiplier: every change rewrites the whole job row (a 200 KB name made every progress step
    200 KB of WAL), and a reader holding a snapshot keeps the WAL from restarting meanwhile."""
    store = Store(tmp_path / "s.sqlite")
    _seq, job, _ = store.create_job("selftest", "alice", "j", {"blob": "b" * 60_000})
    reader = sqlite3.connect(tmp_path / "s.sqlite")
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM jobs").fetchone()
    for i in range(300):
        store.update_job(job.id, "", progress=Progress(done=i, note="n" * (i % 7)))
    wal = tmp_path / "s.sqlite-wal"
    assert wal.stat().st_size > WAL_LIMIT_BYTES  # what a reader costs with a big row
    reader.rollback()
    reader.close()
    for i in range(1200):
        store.update_job(job.id, "", progress=Progress(done=i, note="n" * (i % 7)))
    assert wal.stat().st_size <= WAL_LIMIT_BYTES
    store.close()


@pytest.mark.parametrize("fresh", [True, False])
def test_queued_count_per_owner_follows_every_state_change(tmp_path: Path, fresh: bool) -> None:
    store = Store(tmp_path / "s.sqlite")
    ids = [store.create_job("selftest", owner, "j", {})[1].id for owner in ("alice", "alice", "bob", "alice")]
    if fresh:  # counted from the table, not followed from the start
        store = Store(tmp_path / "s.sqlite")
    assert (store.queued_of("alice"), store.queued_of("bob"), store.queued_of("carol")) == (3, 1, 0)
    store.update_job(ids[0], "started", state="running")
    store.update_job(ids[0], "", progress=Progress(done=1))
    store.update_job(ids[1], "canceled", state="canceled")
    store.update_job(ids[2], "started", state="running")
    store.update_job(ids[2], "interrupted", state="interrupted")
    store.update_job(ids[2], "resuming", state="queued")
    store.update_job(ids[3], "still", state="queued")  # queued → queued changes nothing
    with pytest.raises(UnknownJob):  # a change that fails is not counted
        store.update_job(999, "started", state="running")
    truth = dict(store._db.execute("SELECT owner, count(*) FROM jobs WHERE state='queued' GROUP BY owner"))
    assert truth == {"alice": 1, "bob": 1}
    assert (store.queued_of("alice"), store.queued_of("bob")) == (1, 1)
    store.close()
