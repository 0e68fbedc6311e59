"""A training job outlives its daemon: one 40-step run is interrupted twice while the real trainer runs, first
by a daemon stop (SIGTERM, as `systemctl stop` does), then by kill -9 of the daemon; each time the next start
resumes it from its last checkpoint by itself, and it finishes the requested steps."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.children.process import group_members
from daemon.train.launch import saved_state
from shared.protocol import JobInfo
from tests.train_daemon.support import RUN_TIMEOUT_S, Box, Recorder, TrainDaemon, start_daemon

pytestmark = pytest.mark.llamafactory

STEPS = 40


@dataclass
class Interrupted:
    d: TrainDaemon
    job: JobInfo  # as it ended
    stopped: JobInfo  # right after the daemon stop
    stop_rc: int
    stop_pgid: int  # the trainer's group when the daemon was stopped
    kill_trainer: dict[str, int]  # the trainer record when the daemon was killed
    kill_orphaned: bool  # the trainer was still running after kill -9
    history: list[str]


@pytest.fixture(scope="module")
def run(box: Box) -> Iterator[Interrupted]:
    d = start_daemon(box, "rs")
    try:
        assert d.ftctl("dataset", "add", "tiny_sft", str(box.src / "tiny_sft.json")).returncode == 0
        rec = Recorder(d.client(), ("train.",)).start()
        sets = box.train_sets(f"max_steps={STEPS}", "save_steps=5", "gradient_accumulation_steps=1")
        job_id = d.submit_id("train", "qwen2vl_lora_sft", "--dataset", "tiny_sft",
                             *[a for s in sets for a in ("--set", s)])
        record = d.paths.state_dir / "jobs" / str(job_id) / "trainer.json"

        def reached(step: int) -> bool:
            return any(p.step >= step for _, p in rec.train_points(job_id))

        rec.wait(lambda: reached(7), RUN_TIMEOUT_S, "step 7 (checkpoint-5 written)")
        stop_pgid = json.loads(record.read_text())["pgid"]
        stop_rc = d.stop()
        d.start()
        stopped = d.job(job_id).job  # the first thing the new daemon does is requeue it

        rec.wait(lambda: reached(17), RUN_TIMEOUT_S, "step 17 after the first resume")
        trainer = json.loads(record.read_text())
        d.kill9()
        # without systemd's cgroup kill the trainer outlives its daemon: the next daemon must end it
        orphaned = bool(group_members(trainer["pgid"]))
        d.start()
        job = d.wait_job(job_id)
        yield Interrupted(d=d, job=job, stopped=stopped, stop_rc=stop_rc, stop_pgid=stop_pgid, kill_trainer=trainer,
                          kill_orphaned=orphaned, history=d.history(job_id))
    finally:
        d.close()


def _resumes(history: list[str]) -> list[int]:
    found = [re.fullmatch(rf"resuming from checkpoint-(\d+) \(step \d+ of {STEPS}\)", h) for h in history]
    return [int(m.group(1)) for m in found if m]


def test_a_daemon_stop_stops_the_trainer_at_once_and_the_next_start_resumes_it(run: Interrupted) -> None:
    assert run.stop_rc == 0
    stopped_at = next(h for h in run.history if h.startswith("trainer stopped for the daemon's shutdown"))
    m = re.fullmatch(r"trainer stopped for the daemon's shutdown; it resumes from checkpoint-(\d+) at the next "
                     r"start", stopped_at)
    assert m, stopped_at
    assert "interrupted: the daemon is stopping; it resumes at the next start" in run.history
    assert run.stopped.state in ("queued", "running")  # requeued by itself, nobody retried it
    assert _resumes(run.history)[0] == int(m.group(1)) >= 5
    assert not group_members(run.stop_pgid)  # the daemon did not leave it running


def test_kill9_of_the_daemon_mid_run_resumes_from_the_last_checkpoint_by_itself(run: Interrupted) -> None:
    job, history = run.job, run.history
    assert job.state == "succeeded", job.error
    assert run.kill_orphaned, "the trainer died with the daemon; nothing was left to recover"
    assert "interrupted: the daemon stopped while this job ran" in history
    assert history.count("resuming by itself after the daemon restart") == 2
    assert f"ended the trainer the previous daemon left running (pid {run.kill_trainer['pid']})" in history
    first, second = _resumes(history)
    assert second > first  # it went on from where the first resume got to
    out = Path(job.spec["output_dir"])
    log = (out.parent / "job.log").read_text(errors="replace")
    assert f"Resuming training from {out}/checkpoint-{second}" in log
    state = saved_state(out)
    assert state.finished and state.global_step == STEPS and state.adapter
    assert [p.step for p in run.d.points(job.id)] == list(range(1, STEPS + 1))  # every step once
    assert job.attempts == 3 and not group_members(run.kill_trainer["pgid"])
    assert not (out.parent / "trainer.json").exists()
