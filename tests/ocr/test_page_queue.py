"""Job priorities and the engine's one page queue, through a real daemon with the CPU engine and real workers."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.client import RemoteError
from shared.protocol import (
    Done,
    JobDetail,
    PageQueue,
    PageQueueReply,
    PauseQueue,
    ResumeQueue,
    SetPriority,
    ShowJob,
    Submit,
)
from tests.daemon_proc import ROOT, DaemonProc, wait_for
from tests.fixtures import pdfs
from tests.ocr.submit import submit_ocr
from tui.screens.ocr import queue_line

CONFIG = """
[ocr]
workers = 2
markdown_mode = "legacy"
page_timeout_s = 60.0
[hotfolder]
enabled = false
"""


@pytest.fixture
def fast() -> Iterator[DaemonProc]:
    d = DaemonProc()
    cfg = d.home / "ftmllm.toml"
    cfg.write_text(CONFIG)
    d.config = cfg
    d.start()
    try:
        yield d
    finally:
        d.close()


def test_jobs_start_by_priority_then_interactive_then_in_submit_order(fast: DaemonProc) -> None:
    c = fast.client()
    c.call(PauseQueue(), Done)
    spec = {"steps": 1, "rate": 0}
    a = c.call(Submit(kind="selftest", spec=spec, name="a"), JobDetail).job
    b = c.call(Submit(kind="selftest", spec=spec, name="b"), JobDetail).job
    hi = c.call(Submit(kind="selftest", spec=spec, name="hi", priority=5), JobDetail).job
    waits = c.call(Submit(kind="selftest", spec=spec, name="waits", interactive=True), JobDetail).job
    assert (hi.priority, waits.interactive, a.priority) == (5, True, 0)
    moved = c.call(SetPriority(job_id=b.id, priority=9), JobDetail)
    assert moved.job.priority == 9 and moved.history[-1].what.startswith("priority 0 → 9 by ")
    c.call(ResumeQueue(), Done)
    ids = (a.id, b.id, hi.id, waits.id)
    jobs = wait_for(lambda: (js := [c.call(ShowJob(job_id=i), JobDetail).job for i in ids]) and
                    all(j.state == "succeeded" for j in js) and js, 30, "the four jobs to succeed")
    assert isinstance(jobs, list)
    started = sorted(jobs, key=lambda j: j.started or 0)
    assert [j.name for j in started] == ["b", "hi", "waits", "a"]
    # a finished job's priority no longer matters; a job that does not exist is named
    with pytest.raises(RemoteError) as exc:
        c.call(SetPriority(job_id=a.id, priority=1), JobDetail)
    assert exc.value.code == "invalid_state" and "already succeeded" in exc.value.message
    with pytest.raises(RemoteError) as exc:
        c.call(SetPriority(job_id=9999, priority=1), JobDetail)
    assert exc.value.code == "unknown_job"
    with pytest.raises(RemoteError) as exc:
        c.call(SetPriority(job_id=a.id, priority=1000), JobDetail)
    assert "'priority'" in exc.value.message


def test_a_one_page_pdf_after_two_long_ones_finishes_first(fast: DaemonProc, tmp_path: Path) -> None:
    c = fast.client()
    long_pdf = pdfs.numbered(tmp_path / "long.pdf", pages=200)
    first = submit_ocr(c, long_pdf).job
    second = submit_ocr(c, long_pdf, force=True, name="long-again.pdf").job
    wait_for(lambda: c.call(ShowJob(job_id=second.id), JobDetail).job.progress.done >= 1, 60,
             "the second long PDF to have a page done")
    # both long documents share the engine while they run, and the queue says so
    queue = c.call(PageQueue(), PageQueueReply)
    cpu = next(e for e in queue.engines if e.engine == "cpu")
    assert cpu.slots == 2 and queue.open_jobs == 2 and queue.max_open == 64 and queue.queued_jobs == 0
    assert {j.job_id for j in cpu.jobs} == {first.id, second.id} and cpu.waiting > 300
    assert all(j.total == 200 and j.job_class == "submit" for j in cpu.jobs)
    line = queue_line(queue, second.id).plain  # ftui's OCR screen
    assert re.match(r"cpu: \d/2 pages in flight, \d+ waiting · job \d+: ", line), line
    status = subprocess.run([sys.executable, "-m", "tui.ftctl", "--home", str(fast.home), "status"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert status.returncode == 0, status.stderr
    assert re.search(r"^ocr pages: cpu \d/2 in flight, \d+ waiting$", status.stdout, re.M), status.stdout
    assert re.search(rf"^  job {first.id} \S+ \(submit, priority 0\): \d in flight, ", status.stdout, re.M)
    small = submit_ocr(c, pdfs.numbered(tmp_path / "one.pdf", pages=1)).job
    done = wait_for(lambda: (j := c.call(ShowJob(job_id=small.id), JobDetail).job).state == "succeeded" and j,
                    60, "the one-page PDF to be converted")
    assert done
    for long_job in (first, second):
        state = c.call(ShowJob(job_id=long_job.id), JobDetail).job
        assert state.state == "running" and state.progress.done < 200, (state.state, state.progress)
    for long_job in (first, second):
        wait_for(lambda j=long_job: c.call(ShowJob(job_id=j.id), JobDetail).job.state == "succeeded", 180,
                 f"job {long_job.id} to finish")
    after = c.call(PageQueue(), PageQueueReply)
    assert all(e.in_flight == 0 and e.waiting == 0 and not e.jobs for e in after.engines)
