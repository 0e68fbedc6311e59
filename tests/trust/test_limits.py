"""No member can exhaust the daemon's store or queue: field limits, the per-user queue cap, event retention.

Real daemons (tests/daemon_proc.py), the real client (shared/client.py), real SQLite; the cap with real Unix
users running the real ftctl (tests/systemd/unix_users.py).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.client import Client, RemoteError, Update
from shared.protocol import (
    MAX_NAME_CHARS,
    MAX_SPEC_BYTES,
    Ask,
    Cancel,
    DatasetAdd,
    Done,
    EngineCommand,
    JobDetail,
    JobList,
    JobLogs,
    ListJobs,
    PauseQueue,
    ProtocolError,
    Request,
    ResumeQueue,
    Retry,
    ShowJob,
    Submit,
    encode_request,
)
from tests.daemon_proc import DaemonProc, wait_for
from tests.fixtures import pdfs
from tests.hotfolder.conftest import hot_daemon, landed
from tests.systemd.unix_users import Account, UnixUsers, unix_users

DEADLINE_S = 60.0  # generous: several test runs share two cores


def store_rows(d: DaemonProc) -> tuple[int, int]:
    """(jobs, events) rows in the daemon's store, read through a second connection as any reader would."""
    db = sqlite3.connect(f"file:{d.paths.state_dir / 'ftmllm.sqlite'}?mode=ro", uri=True)
    try:
        return (db.execute("SELECT count(*) FROM jobs").fetchone()[0],
                db.execute("SELECT count(*) FROM events").fetchone()[0])
    finally:
        db.close()


def store_bytes(d: DaemonProc) -> int:
    return sum(p.stat().st_size for p in d.paths.state_dir.glob("ftmllm.sqlite*"))


def daemon_with(config: str) -> DaemonProc:
    home = Path(tempfile.mkdtemp(prefix="ft", dir="/tmp"))  # short: unix socket paths ≤ 107 bytes
    (home / "ftmllm.toml").write_text(config)
    return DaemonProc(home=home, config=home / "ftmllm.toml")


# ---------------------------------------------------------------------------------------- field limits


def test_a_1mb_job_name_is_refused_and_nothing_is_stored(daemon: DaemonProc) -> None:
    c = daemon.client()
    seq = c.hello().seq
    rows = store_rows(daemon)
    with pytest.raises(RemoteError) as exc:
        c.call(Submit(kind="selftest", spec={"steps": 1}, name="x" * 1_000_000), JobDetail)
    assert exc.value.code == "too_large"
    assert "over the 262,144-byte limit" in exc.value.message and "\n" not in exc.value.message
    with pytest.raises(RemoteError) as exc:
        c.call(Submit(kind="selftest", spec={"steps": 1}, name="x" * (MAX_NAME_CHARS + 1)), JobDetail)
    assert exc.value.code == "too_large"
    assert exc.value.message == (f"submit request: field 'name' is over its limit of {MAX_NAME_CHARS} "
                                 "characters; shorten it")
    assert c.hello().seq == seq and store_rows(daemon) == rows
    assert c.call(ListJobs(all=True), JobList).jobs == []
    # the limit itself is allowed
    job = c.call(Submit(kind="selftest", spec={"steps": 1, "rate": 0}, name="n" * MAX_NAME_CHARS), JobDetail).job
    assert job.name == "n" * MAX_NAME_CHARS


@pytest.mark.parametrize(
    ("body", "field", "words", "code"),
    [
        (Submit(kind="k" * 300, spec={}), "kind", "256 characters", "too_large"),
        (Ask(question="why? " * 7000, file="/tmp/a.pdf"), "question", "32,768 characters", "too_large"),
        (Ask(question="why?", file="/" + "d/" * 2100), "file", "4,096 characters", "too_large"),
        (DatasetAdd(name="d", file="/x.json", images="/" + "i" * 5000), "images", "4,096 characters", "too_large"),
        (EngineCommand(action="load", name="a" * 1000, path="/srv/a"), "name", "256 characters", "too_large"),
        (JobLogs(job_id=1, max_bytes=1 << 40), "max_bytes", "<= 4194304", "too_large"),
        # a negative size read the whole log before
        (JobLogs(job_id=1, max_bytes=-1), "max_bytes", ">= 0", "bad_request"),
    ],
)
def test_every_free_text_field_has_a_limit_named_in_the_error(daemon: DaemonProc, body: object, field: str,
                                                              words: str, code: str) -> None:
    c = daemon.client()
    rows = store_rows(daemon)
    with pytest.raises(RemoteError) as exc:
        c.request(body)  # type: ignore[arg-type]
    assert exc.value.code == code, exc.value.message
    assert f"field '{field}'" in exc.value.message and words in exc.value.message, exc.value.message
    assert "\n" not in exc.value.message
    assert store_rows(daemon) == rows


def test_a_spec_over_its_encoded_size_is_refused(daemon: DaemonProc) -> None:
    c = daemon.client()
    rows = store_rows(daemon)
    with pytest.raises(RemoteError) as exc:
        c.call(Submit(kind="selftest", spec={"steps": 1, "note": "s" * 100_000}), JobDetail)
    assert exc.value.code == "too_large"
    assert "field 'spec' is 100,0" in exc.value.message and f"{MAX_SPEC_BYTES:,}" in exc.value.message
    assert store_rows(daemon) == rows


def test_a_client_can_check_a_request_before_sending_it() -> None:
    """encode_request says what the daemon would say, also past the wire limit where libzmq drops the frame."""
    with pytest.raises(ProtocolError) as exc:
        encode_request(Request(id=1, v=1, body=Submit(kind="selftest", spec={}, name="x" * (2 << 20))))
    assert exc.value.code == "too_large" and "over the 262,144-byte limit" in exc.value.message
    with pytest.raises(ProtocolError) as exc:
        encode_request(Request(id=1, v=1, body=Submit(kind="selftest", spec={}, name="x" * 300)))
    assert "field 'name'" in exc.value.message
    assert encode_request(Request(id=1, v=1, body=Submit(kind="selftest", spec={}, name="ok")))


# --------------------------------------------------------------------------------- per-user queue cap

CAP = 2
CLIENT_PACKAGES = ("zmq", "msgspec", "typing_extensions", "rich", "shared", "tui", "daemon")


def ftctl(d: DaemonProc, users: UnixUsers, who: Account, *args: str) -> subprocess.CompletedProcess[str]:
    argv = users.command(who, ["-m", "tui.ftctl", "--home", str(d.home), *args])
    return subprocess.run(argv, env=users.env(), cwd=users.pythonpath, capture_output=True, text=True,
                          timeout=DEADLINE_S, check=False)


@pytest.fixture(scope="module")
def capped() -> Iterator[tuple[DaemonProc, UnixUsers]]:
    with unix_users(packages=CLIENT_PACKAGES) as users:
        home = Path(tempfile.mkdtemp(prefix="ftq", dir="/tmp"))  # short: unix socket paths ≤ 107 bytes
        try:
            home.chmod(0o755)
            config = home / "ftmllm.toml"
            config.write_text(f'[daemon]\nsocket_group = "{users.group}"\nmax_queued_per_user = {CAP}\n')
            run = home / "run"
            run.mkdir(mode=0o750)
            shutil.chown(run, "root", users.group)
            d = DaemonProc(home=home, config=config)
            try:
                d.start(timeout=DEADLINE_S)
                yield d, users
            finally:
                d.close()  # stops the daemon before unix_users() removes the users
        finally:
            shutil.rmtree(home, ignore_errors=True)


def test_a_member_is_capped_at_max_queued_per_user_and_others_are_not(capped: tuple[DaemonProc, UnixUsers]) -> None:
    d, users = capped
    alice, bob = users.alice, users.bob
    root = d.client()

    def submit(who: Account, *sets: str) -> subprocess.CompletedProcess[str]:
        argv = ["submit", "selftest", "--set", "steps=1", "--set", "rate=0", *[f"--set={s}" for s in sets]]
        return ftctl(d, users, who, *argv, "--json")

    failed = submit(alice, "fail=true")
    assert failed.returncode == 0, failed.stderr
    failed_id = int(json.loads(failed.stdout)["id"])
    wait_for(lambda: root.call(ShowJob(job_id=failed_id), JobDetail).job.state == "failed", DEADLINE_S,
             "alice's failing job to fail")
    root.call(PauseQueue(), Done)
    try:
        for _ in range(CAP):
            res = submit(alice)
            assert res.returncode == 0, res.stderr
        refused = submit(alice)
        assert refused.returncode != 0
        message = refused.stderr.strip()
        assert message.count("\n") == 0, message
        assert f"{alice.name} has {CAP} jobs waiting in the queue" in message
        assert "max_queued_per_user" in message and "ftctl cancel" in message
        # a retry would queue one more of hers: refused too
        with pytest.raises(RemoteError) as exc:
            root.call(Retry(job_id=failed_id), Done)
        assert exc.value.code == "too_large" and f"{alice.name} has {CAP} jobs" in exc.value.message
        # the cap is per user: bob is not held back by alice's queue
        assert submit(bob).returncode == 0
        owners = [j.owner for j in root.call(ListJobs(all=True), JobList).jobs if j.state == "queued"]
        assert sorted(owners) == sorted([alice.name] * CAP + [bob.name])
        # room again once one of hers leaves the queue
        first = next(j.id for j in root.call(ListJobs(all=True), JobList).jobs
                     if j.owner == alice.name and j.state == "queued")
        root.call(Cancel(job_id=first), Done)
        assert submit(alice).returncode == 0
    finally:
        root.call(ResumeQueue(), Done)


def test_a_hot_folder_drop_past_the_cap_waits_in_the_inbox_and_is_all_converted(tmp_path: Path) -> None:
    d = hot_daemon("[daemon]\nmax_queued_per_user = 2\n").start()
    try:
        c = d.client()
        c.call(PauseQueue(), Done)
        names = [f"doc{i}.pdf" for i in range(5)]
        for i, name in enumerate(names):
            src = pdfs.numbered(tmp_path / name, pages=i + 1)  # contents differ: no duplicates
            shutil.copyfile(src, d.paths.inbox / (name + ".part"))
            (d.paths.inbox / (name + ".part")).rename(d.paths.inbox / name)
        wait_for(lambda: len(c.call(ListJobs(all=True), JobList).jobs) == 2, DEADLINE_S, "two jobs queued")
        # the rest wait where they were dropped, not moved to failed/
        assert sorted(p.name for p in d.paths.inbox.glob("*.pdf")) == names
        assert not list(d.paths.failed.rglob("*.pdf"))
        c.call(ResumeQueue(), Done)
        for name in names:
            wait_for(lambda n=name: landed(d, n), 120, f"{name} to be converted")  # type: ignore[misc]
            where = landed(d, name)
            assert where is not None and d.paths.done in where.parents, (name, where)
        jobs = c.call(ListJobs(all=True), JobList).jobs
        assert sorted(j.name for j in jobs) == names and all(j.state == "succeeded" for j in jobs)
    finally:
        d.close()


# ------------------------------------------------------------------------------------- event retention

RETENTION = 1000
EVENTS = 100_000


class Watcher:
    """Follows Client.watch() in a thread: the updates it saw, until stopped."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.updates: list[Update] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for u in self.client.watch():
            self.updates.append(u)
            if self._stop.is_set():
                break

    def snapshots(self) -> int:
        return sum(1 for u in self.updates if u.kind == "snapshot")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def test_100k_events_are_pruned_to_a_bound_and_clients_resync() -> None:
    d = daemon_with(f"[daemon]\nevent_retention = {RETENTION}\nevent_retention_days = 0.0\n").start()
    try:
        steady, away = d.client(timeout=30), d.client(timeout=30)
        steady_w, away_w = Watcher(steady), Watcher(away)
        wait_for(lambda: steady_w.snapshots() and away_w.snapshots(), DEADLINE_S, "both watchers' snapshots")
        # `away` stops watching: the events it would have seen next are pruned while it is gone
        away_w.stop()
        away_seq = away.mirror.seq
        job = steady.call(Submit(kind="selftest", spec={"steps": EVENTS, "rate": 0}), JobDetail).job
        wait_for(lambda: steady.call(ShowJob(job_id=job.id), JobDetail).job.state == "succeeded", 300,
                 f"{EVENTS} progress events")
        seq = steady.hello().seq
        assert seq > EVENTS

        db = sqlite3.connect(f"file:{d.paths.state_dir / 'ftmllm.sqlite'}?mode=ro", uri=True)
        try:
            rows, oldest = db.execute("SELECT count(*), min(seq) FROM events").fetchone()
            history = db.execute("SELECT count(*) FROM events WHERE what != ''").fetchone()[0]
        finally:
            db.close()
        # the newest RETENTION, at most one prune interval (1,000 events) more, and the job's history lines
        assert rows <= RETENTION + 1000 + history, rows
        assert history <= 10  # queued, started, succeeded: the 100,000 progress steps wrote no history line
        assert oldest > away_seq  # what `away` saw last is gone from the store
        size = store_bytes(d)
        # the main file holds ~2,000 rows; the WAL is cut back to 16 MiB at the latest (SQLite checkpoints at ~4)
        assert (d.paths.state_dir / "ftmllm.sqlite").stat().st_size < 1 << 20, size
        assert size < 18 << 20, size
        hist = [h.what for h in steady.call(ShowJob(job_id=job.id), JobDetail).history]
        assert hist[0].startswith("queued by") and hist[-1].startswith("succeeded")

        # the steady watcher followed along (resyncing by snapshot whenever it fell behind) and agrees
        wait_for(lambda: steady.mirror.seq == seq, DEADLINE_S, "the steady watcher to catch up")
        assert steady.mirror.jobs[job.id].state == "succeeded"
        assert steady.mirror.jobs[job.id].progress.done == EVENTS
        # `away` comes back: a snapshot covers what was pruned
        away_again = Watcher(away)
        wait_for(lambda: away_again.snapshots(), DEADLINE_S, "the returning watcher's snapshot")
        assert away.mirror.seq == seq and away.mirror.jobs[job.id].progress.done == EVENTS
        away_again.stop()
        steady_w.stop()
    finally:
        d.close()
