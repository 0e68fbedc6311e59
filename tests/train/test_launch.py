"""Starting and stopping trainer process groups, with real child processes.

The children here are small Python programs that behave like the parts of a LLaMA-Factory run that matter
to the daemon (a launcher that does not catch SIGABRT, a trainer that does and saves before exiting); the
real `llamafactory-cli` is run in test_real_llamafactory.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from daemon.children.process import group_members
from daemon.children.record import kill_leftover
from daemon.train.launch import (
    LaunchError,
    TrainProcess,
    build_argv,
    build_env,
    prepare_resume,
    resolve_cli,
    saved_state,
)

TRAINER = r"""
import os, signal, sys, time
out = sys.argv[1]
aborted = False
def on_abort(signum, frame):
    global aborted
    aborted = True
signal.signal(signal.SIGABRT, on_abort)   # what LLaMA-Factory's LogCallback does in LlamaBoard mode
open(os.path.join(out, "ready"), "w").close()
step = 0
while not aborted:
    step += 1
    print(f"step {step}", flush=True)
    time.sleep(0.02)
with open(os.path.join(out, "saved"), "w") as fh:
    fh.write(str(step))
print("saved adapter", flush=True)
"""

LAUNCHER = r"""
import subprocess, sys
# like llamafactory-cli -> torchrun: waits for its worker, does not catch SIGABRT
sys.exit(subprocess.run([sys.executable, "-c", sys.argv[1], sys.argv[2]]).returncode)
"""

STUBBORN = r"""
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(os.path.join(sys.argv[1], "ready"), "w").close()
print("ignoring SIGTERM", file=sys.stderr, flush=True)
while True:
    time.sleep(1)
"""


def _wait_for(path: Path, proc: TrainProcess) -> None:
    import time
    deadline = time.monotonic() + 20
    while not path.exists():
        assert proc.returncode is None, proc.log_path.read_text()
        assert time.monotonic() < deadline, "child never got ready"
        time.sleep(0.01)


async def test_graceful_stop_reaches_only_the_trainer_and_it_saves(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", LAUNCHER, TRAINER, str(tmp_path)]
    proc = TrainProcess.start(argv, dict(os.environ), log_path=tmp_path / "train.log")
    _wait_for(tmp_path / "ready", proc)
    assert len(proc.abort_catchers()) == 1  # the trainer, not the launcher
    outcome = await proc.stop(graceful_s=20)
    assert outcome.how == "graceful" and outcome.returncode == 0  # the launcher was not aborted (no core)
    assert int((tmp_path / "saved").read_text()) >= 1
    log = (tmp_path / "train.log").read_text()
    assert "step 1" in log and "saved adapter" in log
    assert group_members(proc.pgid) == []


async def test_without_an_abort_handler_stop_goes_to_sigterm(tmp_path: Path) -> None:
    proc = TrainProcess.start(["sleep", "60"], dict(os.environ), log_path=tmp_path / "train.log")
    outcome = await proc.stop(graceful_s=20)
    assert outcome.how == "terminated" and outcome.returncode == -signal.SIGTERM
    assert outcome.seconds < 5


async def test_a_child_ignoring_sigterm_is_killed(tmp_path: Path) -> None:
    proc = TrainProcess.start([sys.executable, "-c", STUBBORN, str(tmp_path)], dict(os.environ),
                              log_path=tmp_path / "train.log")
    _wait_for(tmp_path / "ready", proc)
    outcome = await proc.stop(graceful_s=1, term_s=0.5)
    assert outcome.how == "killed" and outcome.returncode == -signal.SIGKILL
    assert "ignoring SIGTERM" in (tmp_path / "train.log").read_text()  # stderr goes to the log too


async def test_wait_returns_the_exit_status_once_the_group_is_gone(tmp_path: Path) -> None:
    script = "import subprocess,sys; subprocess.Popen(['sleep','0.3']); sys.exit(3)"
    proc = TrainProcess.start([sys.executable, "-c", script], dict(os.environ), log_path=tmp_path / "t.log")
    assert await proc.wait() == 3
    assert group_members(proc.pgid) == []  # the orphaned `sleep` was waited for too


def test_child_gets_default_signal_dispositions_and_an_empty_mask(tmp_path: Path) -> None:
    result: dict[str, TrainProcess] = {}

    def start_from_a_thread_that_blocks_signals() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGABRT, signal.SIGTERM])
        result["p"] = TrainProcess.start(["sleep", "30"], dict(os.environ), log_path=tmp_path / "t.log")

    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a daemon started with `cmd &` from a script
    try:
        t = threading.Thread(target=start_from_a_thread_that_blocks_signals)
        t.start()
        t.join()
    finally:
        signal.signal(signal.SIGINT, old)
    proc = result["p"]
    try:
        status = dict(line.split(":\t", 1) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                      if ":\t" in line)
        assert int(status["SigBlk"], 16) == 0
        assert int(status["SigIgn"], 16) >> (signal.SIGINT - 1) & 1 == 0
        assert os.getpgid(proc.pid) == proc.pid and os.getsid(proc.pid) == proc.pid
    finally:
        os.killpg(proc.pgid, signal.SIGKILL)
        proc._proc.wait()


def test_leftover_group_of_a_crashed_daemon_is_killed_and_a_reused_pid_is_not(tmp_path: Path) -> None:
    script = "import subprocess,time; subprocess.Popen(['sleep','60']); time.sleep(60)"
    proc = TrainProcess.start([sys.executable, "-c", script], dict(os.environ), log_path=tmp_path / "t.log")
    record = proc.record
    from dataclasses import replace
    assert not kill_leftover(replace(record, start_ticks=record.start_ticks + 1))  # not ours: left alone
    assert group_members(record.pgid)
    assert kill_leftover(record, term_s=5)
    proc._proc.wait()
    assert group_members(record.pgid) == []


def test_env_drops_systemd_vars_and_sets_gpus_and_torchrun() -> None:
    base = {"PATH": "/usr/bin", "NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1", "FORCE_TORCHRUN": "1",
            "LLAMABOARD_WORKDIR": "/old"}
    one = build_env(base=base, gpus=[3], extra={"HF_HOME": "/hf"},
                    spec_env={"LLAMABOARD_ENABLED": "1", "LLAMABOARD_WORKDIR": "/job/output"})
    assert one["CUDA_VISIBLE_DEVICES"] == "3" and "FORCE_TORCHRUN" not in one
    assert "NOTIFY_SOCKET" not in one and "WATCHDOG_USEC" not in one
    assert one["HF_HOME"] == "/hf" and one["LLAMABOARD_WORKDIR"] == "/job/output"
    assert build_env(base=base, gpus=[0, 5])["FORCE_TORCHRUN"] == "1"
    # one process per GPU given, whatever torch counts on the node (0 with Ray's logical GPUs)
    assert build_env(base=base, gpus=[0, 5])["NPROC_PER_NODE"] == "2" and build_env(base={}, gpus=3)[
        "NPROC_PER_NODE"] == "3" and "NPROC_PER_NODE" not in one
    assert build_env(base=base, gpus=[1], deepspeed=True)["FORCE_TORCHRUN"] == "1"
    assert build_env(base=base, gpus=[])["CUDA_VISIBLE_DEVICES"] == ""  # CPU: no GPU visible


def test_cli_resolution_and_argv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    cli = venv / "bin" / "llamafactory-cli"
    cli.write_text("#!/bin/sh\n")
    cli.chmod(0o755)
    assert resolve_cli(str(venv)) == str(cli)
    with pytest.raises(LaunchError, match=r"set \[train\] llamafactory_cli"):
        resolve_cli(str(tmp_path / "nope" / "llamafactory-cli"))
    with pytest.raises(LaunchError, match="not on the daemon's PATH"):
        resolve_cli("llamafactory-cli-that-does-not-exist")
    assert build_argv(str(cli), "train", tmp_path / "job.yaml") == [str(cli), "train", str(tmp_path / "job.yaml")]
    with pytest.raises(LaunchError, match="contains a space"):
        build_argv(str(cli), "train", tmp_path / "my jobs" / "job.yaml")


def _checkpoint(out: Path, step: int, complete: bool = True) -> None:
    d = out / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"x")
    if complete:
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 20}))


def test_saved_state_tells_a_stop_from_a_finish(tmp_path: Path) -> None:
    out = tmp_path / "output"
    assert saved_state(out).describe() == "nothing saved (stopped before the first checkpoint)"
    _checkpoint(out, 5)
    _checkpoint(out, 10)
    st = saved_state(out)
    assert st.checkpoints == (5, 10) and st.last_checkpoint == out / "checkpoint-10" and not st.finished
    assert "last checkpoint" in st.describe() and "step 10 of 20" in st.describe()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (out / name).write_bytes(b"x")
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 13, "max_steps": 20}))
    assert saved_state(out).describe().endswith("at step 13 of 20 (stopped early)")
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 20, "max_steps": 20}))
    assert saved_state(out).finished and "after all 20 steps" in saved_state(out).describe()


def test_prepare_resume_removes_a_half_written_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "output"
    _checkpoint(out, 10)
    _checkpoint(out, 15, complete=False)  # killed while saving
    info = prepare_resume(out)
    assert info.checkpoint == out / "checkpoint-10" and info.removed == (out / "checkpoint-15",)
    assert not (out / "checkpoint-15").exists()
    assert prepare_resume(tmp_path / "fresh").checkpoint is None
