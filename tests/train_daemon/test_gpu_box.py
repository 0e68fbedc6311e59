"""The daemon's GPU allocation on a recorded 8-GPU snapshot, and a user's cancel of a running trainer.

NVML cannot run on this machine, so the daemon reads tests/fixtures/nvml/box8_foreign.json instead
([scheduler] gpu_snapshot_file; the JSON is what GpuMonitor records). Everything else is real: the daemon's
scheduler places the job, and the real llamafactory-cli runs it with the CUDA_VISIBLE_DEVICES it was given
(CPU torch ignores it and trains on the CPU).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.gpus.nvml import GpuSnapshot
from daemon.train.launch import saved_state
from shared.protocol import JobInfo, Status, StatusReply
from tests.daemon_proc import ROOT, wait_for
from tests.train_daemon.support import RUN_TIMEOUT_S, Box, Recorder, TrainDaemon, start_daemon

pytestmark = pytest.mark.llamafactory

SNAPSHOT = ROOT / "tests" / "fixtures" / "nvml" / "box8_foreign.json"


@dataclass
class Scenario:
    d: TrainDaemon
    trainer: JobInfo  # the 1-GPU job, as it ran
    environ: dict[str, str]  # the trainer process's environment
    status: StatusReply  # while it ran
    big: JobInfo  # asks for 6 GPUs (only 5 are free of foreign processes), while the trainer ran: waits
    huge: JobInfo  # asks for 9 GPUs: can never run here
    canceled: JobInfo
    cancel: str  # what `ftctl cancel --wait` said


@pytest.fixture(scope="module")
def scenario(box: Box) -> Iterator[Scenario]:
    d = start_daemon(box, "gpu", scheduler={"gpu_snapshot_file": str(SNAPSHOT), "gpu_poll_s": 0.5})
    try:
        assert d.ftctl("dataset", "add", "tiny_sft", str(box.src / "tiny_sft.json")).returncode == 0
        rec = Recorder(d.client(), ("train.",)).start()
        sets = [a for s in box.train_sets("max_steps=200", "save_steps=50") for a in ("--set", s)]
        job_id = d.submit_id("train", "qwen2vl_lora_sft", "--dataset", "tiny_sft", "--gpus", "1", *sets)
        big = d.submit_id("train", "qwen2vl_lora_sft", "--dataset", "tiny_sft", "--gpus", "6", *sets)
        huge = d.submit_id("train", "qwen2vl_lora_sft", "--dataset", "tiny_sft", "--gpus", "9", *sets)
        rec.wait(lambda: any(p.step >= 3 for _, p in rec.train_points(job_id)), RUN_TIMEOUT_S, "step 3")
        record = json.loads((d.paths.state_dir / "jobs" / str(job_id) / "trainer.json").read_text())
        raw = Path(f"/proc/{record['pid']}/environ").read_bytes()
        environ = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
        status = wait_for(lambda: (s := d.c.call(Status(), StatusReply)) and any(g.job_ids for g in s.gpus) and s,
                          30, "status to show the job on its GPU")
        assert isinstance(status, StatusReply)
        running, waiting = d.job(job_id).job, d.job(big).job
        cancel = d.ftctl("cancel", str(job_id), "--wait", timeout=300)
        assert cancel.returncode == 0, cancel.stderr
        yield Scenario(d=d, trainer=running, environ=environ, status=status, big=waiting,
                       huge=d.wait_job(huge), canceled=d.wait_job(job_id), cancel=cancel.stderr)
        d.ftctl("cancel", str(big))
    finally:
        d.close()


def _busy_gpus() -> tuple[set[int], dict[int, set[str]]]:
    """What the recorded snapshot says is in use: GPUs with processes, or memory used by invisible ones."""
    snap = GpuSnapshot.load(SNAPSHOT)
    users = {g.index: {p.user for p in g.processes if p.user} for g in snap.gpus}
    return {g.index for g in snap.gpus if g.processes or g.memory_used_mib > 1024}, users


def test_a_job_runs_on_a_gpu_no_one_else_uses_with_cuda_visible_devices_set(scenario: Scenario) -> None:
    busy, _ = _busy_gpus()
    assert len(scenario.trainer.gpus) == 1 and scenario.trainer.gpus[0] not in busy
    gpu = scenario.trainer.gpus[0]
    assert scenario.environ["CUDA_VISIBLE_DEVICES"] == str(gpu)
    assert "FORCE_TORCHRUN" not in scenario.environ  # one GPU: no torchrun
    assert scenario.status.gpu_note == "8 GPUs"
    shown = {g.index: g.job_ids for g in scenario.status.gpus}
    assert shown[gpu] == [scenario.trainer.id] and all(not ids for i, ids in shown.items() if i != gpu)
    assert f"started on GPUs {gpu}" in scenario.d.history(scenario.trainer.id)


def test_a_job_that_needs_more_gpus_than_are_free_waits_and_says_why(scenario: Scenario) -> None:
    busy, users = _busy_gpus()
    assert scenario.big.state == "queued"
    note = scenario.big.progress.note
    assert note.startswith(f"waiting: needs 6 GPU(s), {8 - len(busy) - 1} usable now"), note
    assert f"GPU {scenario.trainer.gpus[0]}: job {scenario.trainer.id}" in note  # the running job holds one
    first_foreign = min(i for i in busy if users[i])
    assert f"GPU {first_foreign}: {next(iter(users[first_foreign]))}'s" in note  # a foreign process another


def test_a_job_asking_for_more_gpus_than_the_machine_has_fails_with_the_fix(scenario: Scenario) -> None:
    assert scenario.huge.state == "failed"
    assert scenario.huge.error == "asks for 9 GPUs; this machine has 8: submit it with --gpus 8 or fewer"


def test_cancel_mid_run_stops_the_trainer_gracefully_and_keeps_the_adapter(scenario: Scenario) -> None:
    job = scenario.canceled
    assert job.state == "canceled" and "is being canceled" in scenario.cancel
    out = Path(job.spec["output_dir"])
    state = saved_state(out)
    assert state.adapter and not state.finished and state.global_step is not None and state.global_step >= 3
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    history = scenario.d.history(job.id)
    stopped = next(h for h in history if h.startswith("trainer stopped"))
    assert stopped.startswith("trainer stopped (gracefully after "), stopped
    assert stopped.endswith(f"adapter saved in {out} at step {state.global_step} of 200 (stopped early)")
    assert history[-1] == "canceled by " + job.owner and job.artifacts["adapter"] == str(out)
