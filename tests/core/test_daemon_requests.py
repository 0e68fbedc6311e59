"""The daemon as a real subprocess on real ipc sockets: every request type round-trips."""

from __future__ import annotations

import os
import stat
import typing

import pytest

from shared.client import DaemonUnavailable, RemoteError
from shared.protocol import (
    Ask,
    AskSpooled,
    Cancel,
    DatasetAdd,
    DatasetAddSpooled,
    DatasetFromPages,
    DatasetRemove,
    Deploy,
    Done,
    EvalCompare,
    GetSnapshot,
    Hello,
    HelloReply,
    JobDetail,
    JobList,
    JobLogs,
    JobPages,
    ListJobs,
    LogChunk,
    OcrEvalResult,
    OcrOutput,
    PagesReply,
    PageText,
    PauseQueue,
    Ping,
    Pong,
    RequestBody,
    ResumeQueue,
    Retry,
    SetPriority,
    ShowJob,
    Snapshot,
    Status,
    StatusReply,
    Submit,
    TrainPoints,
    TrainPointsReply,
)
from tests.daemon_proc import DaemonProc, wait_for


def test_every_request_type_gets_a_typed_reply(daemon: DaemonProc) -> None:
    c = daemon.client()
    hello = c.call(Hello(client="t"), HelloReply)
    assert hello.pid == daemon.proc.pid and hello.user  # type: ignore[union-attr]
    assert isinstance(c.call(Ping(), Pong).ts, float)
    job = c.call(Submit(kind="selftest", spec={"steps": 3, "rate": 0}), JobDetail).job
    assert job.state == "queued" and job.kind == "selftest"
    wait_for(lambda: c.call(ShowJob(job_id=job.id), JobDetail).job.state == "succeeded", 10, "selftest to end")
    assert [j.id for j in c.call(ListJobs(all=True), JobList).jobs] == [job.id]
    assert c.call(ListJobs(all=False), JobList).jobs == []
    snap = c.call(GetSnapshot(), Snapshot)
    assert snap.session == hello.session and snap.seq >= 5
    st = c.call(Status(), StatusReply)
    assert st.counts == {"succeeded": 1} and st.gpu_note
    logs = c.call(JobLogs(job_id=job.id), LogChunk)
    assert logs.finished and logs.offset == logs.size
    assert c.call(JobPages(job_id=job.id), PagesReply).pages == []
    assert c.call(TrainPoints(job_id=job.id), TrainPointsReply).points == []
    assert "paused" in c.call(PauseQueue(), Done).message
    assert "resumed" in c.call(ResumeQueue(), Done).message
    with pytest.raises(RemoteError) as e:
        c.call(Cancel(job_id=job.id), Done)
    assert e.value.code == "invalid_state" and "already succeeded" in e.value.message
    with pytest.raises(RemoteError) as e:
        c.call(Retry(job_id=job.id), Done)
    assert e.value.code == "invalid_state"
    with pytest.raises(RemoteError) as e:
        c.call(PageText(job_id=job.id, page_no=1), Done)
    assert "no page 1" in e.value.message
    with pytest.raises(RemoteError) as e:
        c.call(ShowJob(job_id=999), JobDetail)
    assert e.value.code == "unknown_job"
    with pytest.raises(RemoteError) as e:
        c.call(Submit(kind="selftest", spec={"stepz": 3}), JobDetail)
    assert e.value.code == "invalid_spec" and "stepz" in e.value.message


def _sample(cls: type) -> typing.Any:
    """A minimal instance of a request type, from its annotations."""
    values: dict[str, typing.Any] = {}
    hints = typing.get_type_hints(cls)
    for name in cls.__struct_fields__:
        t = hints[name]
        if typing.get_origin(t) is dict:
            values[name] = {}
        elif typing.get_origin(t) is list:
            values[name] = []
        elif t is int:
            values[name] = 1
        elif t is str:
            values[name] = "x"
        elif typing.get_origin(t) is typing.Literal:
            values[name] = typing.get_args(t)[0]
    required = len(cls.__struct_fields__) - len(cls.__struct_defaults__)
    kwargs = {k: values[k] for k in cls.__struct_fields__[:required]}
    return cls(**kwargs)


# The code each minimal request (see _sample) is refused with on a fresh daemon without engines; any other
# request gets a reply. A handler that crashed would answer "internal" instead.
REFUSED = {
    ShowJob: "unknown_job",  # no job 1
    Cancel: "unknown_job",
    Retry: "unknown_job",
    SetPriority: "unknown_job",
    JobLogs: "unknown_job",
    Deploy: "unknown_job",
    PageText: "invalid_state",  # job 1 has no page 1
    Submit: "invalid_spec",  # no kind "x"
    DatasetAdd: "invalid_spec",  # "x" is not an absolute path
    DatasetRemove: "invalid_spec",  # no dataset "x"
    EvalCompare: "bad_request",  # no jobs named
    Ask: "unavailable",  # the cpu engine answers no questions
    AskSpooled: "unavailable",
    DatasetAddSpooled: "invalid_spec",  # nothing was handed over as "x"
    DatasetFromPages: "invalid_spec",  # nothing was handed over as "x"
    OcrEvalResult: "unknown_job",
    OcrOutput: "unknown_job",
}


def test_every_request_in_the_protocol_round_trips(daemon: DaemonProc) -> None:
    """Each request type, even ones whose part is not configured, gets a reply or the error it deserves."""
    c = daemon.client()
    for cls in typing.get_args(RequestBody):
        body = _sample(cls)
        try:
            reply = c.request(body)
        except RemoteError as exc:
            assert (exc.code, bool(exc.message)) == (REFUSED.get(cls), True), (cls, exc.message)
        else:
            assert reply is not None and cls not in REFUSED, cls


def test_socket_files_are_group_rw_only(daemon: DaemonProc) -> None:
    for name in ("ctl.sock", "events.sock", "handover.sock"):
        mode = stat.S_IMODE(os.stat(daemon.paths.runtime_dir / name).st_mode)
        assert mode == 0o660, (name, oct(mode))


def test_cancel_running_job_and_retry(daemon: DaemonProc) -> None:
    c = daemon.client()
    job = c.call(Submit(kind="selftest", spec={"steps": 1, "rate": 0, "hold": True}), JobDetail).job
    wait_for(lambda: c.call(ShowJob(job_id=job.id), JobDetail).job.state == "running", 10, "job to run")
    c.call(Cancel(job_id=job.id), Done)
    detail = wait_for(lambda: (d := c.call(ShowJob(job_id=job.id), JobDetail)).job.state == "canceled" and d,
                      10, "job to be canceled")
    assert any("canceled by" in h.what for h in detail.history)  # type: ignore[union-attr]
    c.call(Retry(job_id=job.id), Done)
    wait_for(lambda: c.call(ShowJob(job_id=job.id), JobDetail).job.state == "running", 10, "job to rerun")
    assert c.call(ShowJob(job_id=job.id), JobDetail).job.attempts == 2


def test_failed_job_keeps_its_one_line_error(daemon: DaemonProc) -> None:
    c = daemon.client()
    job = c.call(Submit(kind="selftest", spec={"steps": 2, "rate": 0, "fail": True}), JobDetail).job
    failed = wait_for(lambda: (j := c.call(ShowJob(job_id=job.id), JobDetail).job).state == "failed" and j,
                      10, "job to fail")
    assert "asked to fail" in failed.error and "\n" not in failed.error  # type: ignore[union-attr]


def test_second_daemon_on_same_state_dir_refuses_and_names_the_holder(daemon: DaemonProc) -> None:
    import subprocess

    r = subprocess.run(daemon.argv(), capture_output=True, text=True, timeout=30, env=daemon.env)
    assert r.returncode == 4
    assert f"pid {daemon.proc.pid}" in r.stderr and "already runs" in r.stderr  # type: ignore[union-attr]


def test_client_says_daemon_not_running_when_socket_is_stale(daemon: DaemonProc) -> None:
    c = daemon.client()
    c.hello()
    daemon.kill9()
    assert daemon.paths.ctl_socket.exists()  # kill -9 leaves the file behind
    fresh = daemon.client(timeout=2)
    with pytest.raises(DaemonUnavailable, match="not running"):
        fresh.hello()
