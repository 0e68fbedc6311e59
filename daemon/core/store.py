"""The SQLite store: the single source of truth for jobs, pages, loss points and the event log.

Every state change is one transaction that updates its row *and* appends an event row; the event's
``seq`` is the row's AUTOINCREMENT key, so it is global, never reused and never goes backwards, even after
``kill -9``. The store owns no sockets: :class:`daemon.core.events.EventBus` publishes what the store returns.

Event rows are only the seq counter and the jobs' history: no client ever reads events back from the store (a
client that missed some takes a new snapshot), so old rows are pruned (:meth:`Store.set_retention`), except
the last :data:`HISTORY_KEPT` history lines of each job, which ``ftctl show`` reads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

from shared.protocol import (
    TERMINAL_STATES,
    HistoryEntry,
    JobInfo,
    JobState,
    PageInfo,
    Progress,
    TrainPoint,
)

SCHEMA_VERSION = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error TEXT NOT NULL DEFAULT '',
    artifacts TEXT NOT NULL DEFAULT '{}',
    progress TEXT NOT NULL DEFAULT '{}',
    attempts INTEGER NOT NULL DEFAULT 0,
    gpus TEXT NOT NULL DEFAULT '[]',
    priority INTEGER NOT NULL DEFAULT 0,
    interactive INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    job_id INTEGER,
    what TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id);
CREATE INDEX IF NOT EXISTS events_history ON events(job_id, seq) WHERE what != '';
CREATE TABLE IF NOT EXISTS pages (
    job_id INTEGER NOT NULL,
    page_no INTEGER NOT NULL,
    state TEXT NOT NULL,
    method TEXT NOT NULL DEFAULT '',
    text TEXT NOT NULL DEFAULT '',
    timings TEXT NOT NULL DEFAULT '{}',
    error TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, page_no)
);
CREATE TABLE IF NOT EXISTS train_points (
    job_id INTEGER NOT NULL,
    step INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job_id, step)
);
CREATE TABLE IF NOT EXISTS sources (
    sha256 TEXT PRIMARY KEY,
    job_id INTEGER NOT NULL
);
"""

_JOB_COLUMNS = "id, kind, owner, state, name, spec, created, started, finished, error, artifacts, progress, " \
    "attempts, gpus, priority, interactive"
_point_encoder = msgspec.msgpack.Encoder()
log = logging.getLogger(__name__)

# A job's history (``ftctl show``) keeps its newest lines when older events are pruned.
HISTORY_KEPT = 200
# Retention is checked after this many new events; one pass deletes at most PRUNE_BATCH rows (a few ms) and
# the next pass follows on the event loop while more is due, so pruning never holds the loop for long.
PRUNE_EVERY = 1000
PRUNE_BATCH = 5_000
# After a checkpoint the WAL file is cut back to this: a long reader (a backup, an sqlite3 shell) can make
# it grow by every commit meanwhile, and SQLite otherwise keeps a grown WAL file at its largest size.
WAL_LIMIT_BYTES = 16 * 1024 * 1024


def _drop_event_bodies(db: sqlite3.Connection) -> None:
    """Schema 1 kept every event's encoded body, which nothing ever read back: events go to clients as they
    happen, and a client that missed some asks for a snapshot. Rewrites the events table once."""
    db.execute("ALTER TABLE events DROP COLUMN body")


def _add_job_priority(db: sqlite3.Connection) -> None:
    """Schema 3 orders the queue by a job's priority (higher first), then puts jobs someone waits for first;
    jobs of an older store had neither."""
    db.execute("ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE jobs ADD COLUMN interactive INTEGER NOT NULL DEFAULT 0")


# schema N → N + 1, run in order at open inside one transaction; a store this version wrote never needs them
_MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _drop_event_bodies, 2: _add_job_priority}


class StoreError(Exception):
    pass


class UnknownJob(StoreError):
    def __init__(self, job_id: int) -> None:
        super().__init__(f"no job {job_id}; list jobs with `ftctl jobs --all`")
        self.job_id = job_id


# msgspec's decoders: a tenth of json.loads's time, which was most of listing 1,000 jobs (`ftctl jobs --json`)
_decode_json = msgspec.json.Decoder().decode
_decode_progress = msgspec.json.Decoder(Progress).decode


def _job_from_row(row: sqlite3.Row | tuple[Any, ...]) -> JobInfo:
    (jid, kind, owner, state, name, spec, created, started, finished, error, artifacts, progress, attempts,
     gpus, priority, interactive) = row
    return JobInfo(
        id=jid,
        kind=kind,
        owner=owner,
        state=state,
        name=name,
        spec=_decode_json(spec),
        created=created,
        started=started,
        finished=finished,
        error=error,
        artifacts=_decode_json(artifacts),
        progress=_decode_progress(progress),
        attempts=attempts,
        gpus=_decode_json(gpus),
        priority=priority,
        interactive=bool(interactive),
    )


class Store:
    """One connection, used from the daemon's event loop thread only (one owner, no locks needed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # 0600 whatever the umask: SQLite gives the -wal and -shm files the database file's mode, and job
        # specs, pages and history are the daemon's to show (an older store made 0640 is narrowed here)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if part.exists():
                os.chmod(part, 0o600)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed transaction survives a process crash (kill -9); only a power
        # loss may lose the last few, and never corrupts the file.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
        # a new store gets every table; an older one keeps its tables as they are until _migrate changes them
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            raise StoreError(
                f"{path}: store schema {row[0]} is newer than this ftmllmd understands ({SCHEMA_VERSION}); "
                "upgrade ftmllm"
            )
        else:
            self._migrate(int(row[0]))

    def _migrate(self, found: int) -> None:
        if found == SCHEMA_VERSION:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for version in range(found, SCHEMA_VERSION):
                _MIGRATIONS[version](self._db)
            self._db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self.commit()
        if self._prune_handle is not None:
            self._prune_handle.cancel()
        self._db.close()

    # Group commit: inside a running event loop, all changes of one loop turn share one transaction,
    # committed by a callback scheduled at the first change; each change is atomic on its own through a
    # savepoint. A burst of 5,000 progress updates a second then costs one commit per turn, not 5,000.
    # ``on_commit`` runs after every commit: the event bus publishes there, so no client ever sees an
    # event that a crash could take back (and whose seq would then be handed out again).
    on_commit: Callable[[], None] | None = None
    _batch_open = False
    # event retention (see set_retention): 0 = no bound of that kind
    retention_events = 0
    retention_age_s = 0.0
    _since_prune = 0
    _prune_handle: asyncio.Handle | None = None

    def commit(self) -> None:
        if self._batch_open:
            try:
                self._db.execute("COMMIT")
            except BaseException:
                self._queued = None  # counted changes may be gone with the transaction: count again
                raise
            self._batch_open = False
        if self.on_commit is not None:
            self.on_commit()
        if self._since_prune >= PRUNE_EVERY:
            self._since_prune = 0
            self._prune_pass()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        deferred = True
        if not self._batch_open:
            self._db.execute("BEGIN IMMEDIATE")
            self._batch_open = True
            try:
                asyncio.get_running_loop().call_soon(self.commit)
            except RuntimeError:  # no event loop (tools, tests): commit each change at once
                deferred = False
        self._db.execute("SAVEPOINT change")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK TO change")
            self._db.execute("RELEASE change")
            if not deferred:
                self.commit()
            raise
        self._db.execute("RELEASE change")
        if not deferred:
            self.commit()

    def _append_event(self, db: sqlite3.Connection, ts: float, job_id: int | None, what: str) -> int:
        """The event's row: its seq, and its line in the job's history when ``what`` says something."""
        cur = db.execute("INSERT INTO events (ts, job_id, what) VALUES (?, ?, ?)", (ts, job_id, what))
        assert cur.lastrowid is not None
        self._since_prune += 1
        return cur.lastrowid

    # ------------------------------------------------------------------------------------ retention

    def set_retention(self, events: int, max_age_s: float) -> None:
        """Keep the newest ``events`` event rows and none older than ``max_age_s`` (0: no such bound), besides
        each job's last HISTORY_KEPT history lines; prunes what is due now, then after every PRUNE_EVERY events."""
        self.retention_events = max(0, events)
        self.retention_age_s = max(0.0, max_age_s)
        self._prune_pass()

    def _prune_pass(self) -> None:
        try:
            more = self.prune_events()
        except sqlite3.Error:
            log.exception("pruning old events failed; the store keeps them until the next try")
            return
        if more and self._prune_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop (tools, tests): the next PRUNE_EVERY events go on
            self._prune_handle = loop.call_soon(self._prune_later)

    def _prune_later(self) -> None:
        self._prune_handle = None
        if self._batch_open:  # a change is waiting for its group commit: prune after it
            self._since_prune = PRUNE_EVERY
            return
        self._prune_pass()

    def _prune_cut(self, done: int, now: float) -> tuple[int, bool]:
        """The highest seq that may go (older than both bounds that are set), and whether more may follow it
        (the age walk looks at one batch of rows at a time)."""
        seq = self.seq
        cut = 0
        if self.retention_events:
            cut = max(cut, seq - self.retention_events)
        more_old = False
        if self.retention_age_s:
            # seq order is time order: walk from the last pass up to the first row young enough to keep
            window = min(seq, done + PRUNE_BATCH)
            row = self._db.execute(
                "SELECT seq FROM events WHERE seq > ? AND seq <= ? AND ts >= ? ORDER BY seq LIMIT 1",
                (done, window, now - self.retention_age_s),
            ).fetchone()
            more_old = row is None and window < seq
            cut = max(cut, row[0] - 1 if row else window)
        return cut, more_old

    def prune_events(self, now: float | None = None) -> bool:
        """One pass of at most PRUNE_BATCH rows; True when more is due (the caller runs another pass soon).

        The history lines in the pruned range are kept, trimmed to each job's newest HISTORY_KEPT."""
        if not (self.retention_events or self.retention_age_s) or self._batch_open:
            return False
        done = int(self.get_meta("events_pruned_upto", "0"))
        cut, beyond = self._prune_cut(done, time.time() if now is None else now)
        if cut <= done:
            return False
        upto = min(cut, done + PRUNE_BATCH)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM events WHERE seq > ? AND seq <= ? AND (what = '' OR job_id IS NULL)",
                       (done, upto))
            # history lines left in the range: those past their job's newest HISTORY_KEPT go too
            db.execute(
                "DELETE FROM events WHERE seq IN (SELECT seq FROM (SELECT seq, row_number() OVER "
                "(PARTITION BY job_id ORDER BY seq DESC) AS n FROM events WHERE what != '' AND job_id IN "
                "(SELECT job_id FROM events WHERE seq > ? AND seq <= ?)) WHERE n > ? AND seq <= ?)",
                (done, upto, HISTORY_KEPT, upto))
            self.set_meta("events_pruned_upto", str(upto))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return upto < cut or beyond

    # ------------------------------------------------------------------------------------------ meta

    @property
    def seq(self) -> int:
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='events'").fetchone()
        return int(row[0]) if row else 0

    def get_meta(self, key: str, default: str = "") -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return str(row[0]) if row else default

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def record(self, what: str, job_id: int | None = None) -> int:
        """Append an event that is not tied to a row change here (engine state, queue pause); its seq."""
        with self._tx() as db:
            return self._append_event(db, time.time(), job_id, what)

    # ------------------------------------------------------------------------------------------ jobs

    def create_job(self, kind: str, owner: str, name: str, spec: dict[str, Any], priority: int = 0,
                   interactive: bool = False) -> tuple[int, JobInfo, str]:
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO jobs (kind, owner, state, name, spec, created, priority, interactive) "
                "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)",
                (kind, owner, name, json.dumps(spec), now, priority, int(interactive)),
            )
            assert cur.lastrowid is not None
            job = JobInfo(id=cur.lastrowid, kind=kind, owner=owner, state="queued", name=name, spec=spec,
                          created=now, priority=priority, interactive=interactive)
            what = f"queued by {owner}"
            seq = self._append_event(db, now, job.id, what)
        self._count_queued(owner, +1)
        return seq, job, what

    def get_job(self, job_id: int) -> JobInfo:
        row = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJob(job_id)
        return _job_from_row(row)

    def list_jobs(self, include_finished: bool = True, limit: int | None = None, *, owners: Iterable[str] = (),
                  states: Iterable[str] = (), kinds: Iterable[str] = ()) -> list[JobInfo]:
        """The newest ``limit`` jobs, oldest first; each non-empty filter keeps the jobs with one of its values."""
        where: list[str] = []
        values: list[Any] = []
        if not include_finished:
            where.append(f"state NOT IN ({','.join(repr(s) for s in sorted(TERMINAL_STATES))})")
        for column, wanted in (("owner", list(owners)), ("state", list(states)), ("kind", list(kinds))):
            if wanted:
                where.append(f"{column} IN ({','.join('?' for _ in wanted)})")
                values.extend(wanted)
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        rows = self._db.execute(sql, values).fetchall()
        return [_job_from_row(r) for r in reversed(rows)]

    def jobs_in_state(self, *states: JobState) -> list[JobInfo]:
        marks = ",".join("?" for _ in states)
        rows = self._db.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY id", states
        ).fetchall()
        return [_job_from_row(r) for r in rows]

    def update_job(self, job_id: int, what: str, **changes: Any) -> tuple[int, JobInfo]:
        """Change fields of a job and log ``what`` in its history, atomically."""
        now = time.time()
        sets: list[str] = []
        values: list[Any] = []
        for key, value in changes.items():
            if key in ("spec", "artifacts", "gpus"):
                value = json.dumps(value)
            elif key == "progress":
                value = json.dumps(msgspec.to_builtins(value))
            elif key not in ("state", "started", "finished", "error", "attempts", "name", "priority"):
                raise StoreError(f"job field {key} cannot be updated")
            sets.append(f"{key}=?")
            values.append(value)
        with self._tx() as db:
            before = None
            if "state" in changes:
                before = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if sets:
                cur = db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id=?", (*values, job_id))
                if cur.rowcount == 0:
                    raise UnknownJob(job_id)
            row = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise UnknownJob(job_id)
            job = _job_from_row(row)
            seq = self._append_event(db, now, job_id, what)
        if before is not None and (before[0] == "queued") != (job.state == "queued"):
            self._count_queued(job.owner, -1 if before[0] == "queued" else +1)
        return seq, job

    def history(self, job_id: int, limit: int = 200) -> list[HistoryEntry]:
        rows = self._db.execute(
            "SELECT seq, ts, what FROM events WHERE job_id=? AND what != '' ORDER BY seq DESC LIMIT ?",
            (job_id, limit),
        ).fetchall()
        return [HistoryEntry(seq=s, ts=t, what=w) for s, t, w in reversed(rows)]

    # Queued jobs per owner, counted once from the table and then kept by create_job and update_job (the only
    # writers of jobs.state): the per-user cap asks at every submit, and counting 10,000 index entries each
    # time made a hot-folder drop of 10,000 files spend seconds of the event loop on it.
    _queued: dict[str, int] | None = None

    def queued_of(self, owner: str) -> int:
        """How many jobs of ``owner`` wait in the queue."""
        if self._queued is None:
            self._queued = dict(self._db.execute(
                "SELECT owner, count(*) FROM jobs WHERE state='queued' GROUP BY owner").fetchall())
        return self._queued.get(owner, 0)

    def _count_queued(self, owner: str, delta: int) -> None:
        if self._queued is not None:
            self._queued[owner] = self._queued.get(owner, 0) + delta

    def counts(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())

    # ----------------------------------------------------------------------------------------- pages

    def set_page(self, page: PageInfo, text: str | None = None) -> int:
        """Store a page's state (and its text once done); returns the event's seq."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO pages (job_id, page_no, state, method, text, timings, error) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(job_id, page_no) DO UPDATE SET "
                "state=excluded.state, method=excluded.method, text=excluded.text, timings=excluded.timings, "
                "error=excluded.error",
                (page.job_id, page.page_no, page.state, page.method, text or "", json.dumps(page.timings),
                 page.error),
            )
            return self._append_event(db, now, page.job_id, "")

    def pages(self, job_id: int) -> list[PageInfo]:
        rows = self._db.execute(
            "SELECT page_no, state, method, timings, error, length(text) FROM pages WHERE job_id=? "
            "ORDER BY page_no",
            (job_id,),
        ).fetchall()
        return [
            PageInfo(job_id=job_id, page_no=n, state=s, method=m, timings=json.loads(t), error=e, chars=c)
            for n, s, m, t, e, c in rows
        ]

    def page_text(self, job_id: int, page_no: int) -> tuple[PageInfo, str]:
        row = self._db.execute(
            "SELECT state, method, timings, error, text FROM pages WHERE job_id=? AND page_no=?",
            (job_id, page_no),
        ).fetchone()
        if row is None:
            raise StoreError(f"job {job_id} has no page {page_no}; see `ftctl show {job_id}`")
        s, m, t, e, text = row
        return PageInfo(job_id=job_id, page_no=page_no, state=s, method=m, timings=json.loads(t), error=e,
                        chars=len(text)), text

    # ---------------------------------------------------------------------------------- train points

    def add_train_points(self, points: Iterable[TrainPoint]) -> list[tuple[int, TrainPoint]]:
        """Store loss points, one row per step: an eval line at a step that already has its training loss
        fills in ``eval_loss``; a point that adds nothing is skipped (logs repeat after a resume)."""
        out: list[tuple[int, TrainPoint]] = []
        now = time.time()
        with self._tx() as db:
            for p in points:
                row = db.execute("SELECT data FROM train_points WHERE job_id=? AND step=?",
                                 (p.job_id, p.step)).fetchone()
                if row is not None:
                    old = msgspec.msgpack.decode(row[0], type=TrainPoint)
                    p = _merge_point(old, p)
                    if p == old:
                        continue
                db.execute("INSERT OR REPLACE INTO train_points (job_id, step, data) VALUES (?, ?, ?)",
                           (p.job_id, p.step, _point_encoder.encode(p)))
                out.append((self._append_event(db, now, p.job_id, ""), p))
        return out

    def train_points(self, job_id: int, since_step: int = -1) -> list[TrainPoint]:
        rows = self._db.execute(
            "SELECT data FROM train_points WHERE job_id=? AND step>? ORDER BY step", (job_id, since_step)
        ).fetchall()
        return [msgspec.msgpack.decode(r[0], type=TrainPoint) for r in rows]

    def remove_jobs(self, job_ids: Iterable[int]) -> tuple[int, list[int]]:
        """Forget finished jobs: their rows, history, pages, loss points and source records, in one change
        (the files they wrote are not the store's). Returns (the event's seq, the ids removed); ids of jobs
        that are gone or not finished are left out."""
        ids = sorted(set(job_ids))
        terminal = sorted(TERMINAL_STATES)
        removed: list[int] = []
        with self._tx() as db:
            for start in range(0, len(ids), 500):  # SQLite's bound on host parameters
                chunk = ids[start:start + 500]
                marks = ",".join("?" for _ in chunk)
                removed += [r[0] for r in db.execute(
                    f"SELECT id FROM jobs WHERE id IN ({marks}) AND state IN ({','.join('?' for _ in terminal)})",
                    (*chunk, *terminal)).fetchall()]
            for start in range(0, len(removed), 500):
                chunk = removed[start:start + 500]
                marks = ",".join("?" for _ in chunk)
                for table, column in (("events", "job_id"), ("pages", "job_id"), ("train_points", "job_id"),
                                      ("sources", "job_id"), ("jobs", "id")):
                    db.execute(f"DELETE FROM {table} WHERE {column} IN ({marks})", chunk)
            seq = self._append_event(db, time.time(), None, "")
        return seq, removed

    def finished_before(self, cutoff: float, owner: str | None = None) -> list[int]:
        """Ids of finished jobs that ended before ``cutoff`` (of ``owner`` only, unless None)."""
        terminal = sorted(TERMINAL_STATES)
        sql = (f"SELECT id FROM jobs WHERE state IN ({','.join('?' for _ in terminal)}) "
               "AND COALESCE(finished, created) < ?")
        values: list[Any] = [*terminal, cutoff]
        if owner is not None:
            sql += " AND owner=?"
            values.append(owner)
        return [r[0] for r in self._db.execute(sql + " ORDER BY id", values).fetchall()]

    # ------------------------------------------------------------------------------- source dedupe

    def job_for_source(self, sha256: str) -> int | None:
        row = self._db.execute("SELECT job_id FROM sources WHERE sha256=?", (sha256,)).fetchone()
        return int(row[0]) if row else None

    def remember_source(self, sha256: str, job_id: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO sources VALUES (?, ?)", (sha256, job_id))


def _merge_point(old: TrainPoint, new: TrainPoint) -> TrainPoint:
    """``old`` with the fields it lacks taken from ``new`` (same job and step); ``ts`` stays the first one."""
    filled = {f: getattr(new, f) for f in old.__struct_fields__
              if getattr(old, f) is None and getattr(new, f) is not None}
    return msgspec.structs.replace(old, **filled) if filled else old
