"""kill -9 and restart; late joiners; the Clone pattern keeps a client's mirror equal to the store."""

from __future__ import annotations

import threading

import msgspec

from shared.client import Client, Update
from shared.protocol import (
    Done,
    GetSnapshot,
    HelloReply,
    JobDetail,
    JobList,
    ListJobs,
    PauseQueue,
    ResumeQueue,
    ShowJob,
    Snapshot,
    Submit,
)
from tests.daemon_proc import DaemonProc, wait_for


class Watcher:
    """Consumes Client.watch() in a thread and records what it saw."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.updates: list[Update] = []
        self.sessions: list[str] = []
        self._it = client.watch()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for u in self._it:
            if u.kind == "snapshot":
                self.sessions.append(self.client.mirror.session)
            self.updates.append(u)


def _submit(c: Client, **spec: object) -> int:
    return c.call(Submit(kind="selftest", spec=dict(spec)), JobDetail).job.id


def test_kill9_restart_keeps_jobs_marks_running_interrupted_and_client_follows(daemon: DaemonProc) -> None:
    c = daemon.client()
    watcher = Watcher(c)
    first = c.hello()
    wait_for(lambda: first.session in watcher.sessions, 10, "watcher's first snapshot")
    resumable = _submit(c, steps=1, rate=0, hold=True)
    stays = _submit(c, steps=1, rate=0, hold=True, resume=False)
    wait_for(lambda: all(c.call(ShowJob(job_id=j), JobDetail).job.state == "running" for j in (resumable, stays)),
             10, "both jobs running")
    c.call(PauseQueue(), Done)
    queued = _submit(c, steps=2, rate=0)
    seq_before = c.hello().seq

    daemon.kill9()
    daemon.start()

    second = c.call(__import__("shared.protocol", fromlist=["Hello"]).Hello(client="t"), HelloReply)
    assert second.session != first.session
    assert second.seq >= seq_before  # seq never goes backwards
    jobs = {j.id: j for j in c.call(ListJobs(all=True), JobList).jobs}
    assert set(jobs) == {resumable, stays, queued}
    assert jobs[stays].state == "interrupted"
    assert jobs[resumable].state == "queued"  # the queue is still paused: it waits, resuming later
    assert jobs[queued].state == "queued"
    hist = [h.what for h in c.call(ShowJob(job_id=resumable), JobDetail).history]
    assert any(h.startswith("interrupted") for h in hist) and any("resuming" in h for h in hist)
    # the same client object reconnected by itself and reloaded from the new daemon
    wait_for(lambda: second.session in watcher.sessions, 15, "watcher to see the new session")
    assert any(u.session_changed for u in watcher.updates)
    wait_for(lambda: c.mirror.jobs.get(stays) is not None and c.mirror.jobs[stays].state == "interrupted",
             10, "mirror to show the interrupted job")
    c.call(ResumeQueue(), Done)
    wait_for(lambda: c.call(ShowJob(job_id=queued), JobDetail).job.state == "succeeded", 10, "queued job to run")
    wait_for(lambda: c.mirror.jobs[queued].state == "succeeded", 10, "mirror to follow")
    assert c.mirror.seq > second.seq


def test_late_joiner_during_1000_events_per_second_ends_equal_to_store(daemon: DaemonProc) -> None:
    c = daemon.client()
    job = _submit(c, steps=3000, rate=1000)
    wait_for(lambda: c.call(ShowJob(job_id=job), JobDetail).job.progress.done >= 500, 20, "flood underway")
    late = daemon.client()
    watcher = Watcher(late)
    wait_for(lambda: watcher.sessions, 10, "late joiner's snapshot")
    assert late.mirror.jobs[job].progress.done < 3000  # it really joined mid-flood
    wait_for(lambda: c.call(ShowJob(job_id=job), JobDetail).job.state == "succeeded", 30, "flood to end")
    final = c.call(GetSnapshot(), Snapshot)
    wait_for(lambda: late.mirror.seq == final.seq, 10, "late joiner to catch up")
    assert msgspec.to_builtins(late.mirror.jobs) == msgspec.to_builtins({j.id: j for j in final.jobs})
    events = sum(1 for u in watcher.updates if u.kind == "event" and u.event and u.event.durable)
    assert events > 100  # most of the state came as events, not as snapshots
