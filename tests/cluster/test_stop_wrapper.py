"""The wrapper every Ray job of ftmllm runs under (daemon/cluster/ray_jobs.py STOP_WRAPPER), without a cluster:
real processes stand where Ray's job supervisor and the trainer would be."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from daemon.cluster.ray_jobs import STOP_WRAPPER
from tests.daemon_proc import wait_for

# stands for Ray's job supervisor: starts the wrapper (around a long `sleep`, the trainer) and says its pid
SUPERVISOR = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', sys.argv[1], 'sleep', '300'], "
              "stdout=open(sys.argv[2], 'w'), stderr=subprocess.STDOUT); print(p.pid, flush=True); sys.stdin.read()")
# stands for the node's raylet, the supervisor's parent: starts it and says its pid
RAYLET = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', *sys.argv[1:]]); "
          "print(p.pid, flush=True); sys.stdin.read()")


@dataclass
class Wrapped:
    raylet: subprocess.Popen[str]
    supervisor: psutil.Process
    wrapper: psutil.Process
    trainer: psutil.Process
    log: Path


@pytest.fixture
def wrapped(tmp_path: Path) -> Iterator[Wrapped]:
    log = tmp_path / "wrapper.log"
    raylet = subprocess.Popen([sys.executable, "-c", RAYLET, SUPERVISOR, STOP_WRAPPER, str(log)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    supervisor: psutil.Process | None = None
    try:
        assert raylet.stdout is not None
        supervisor = psutil.Process(int(raylet.stdout.readline()))
        wrapper = psutil.Process(int(raylet.stdout.readline()))  # the supervisor prints on the same stdout
        trainer = wait_for(lambda: next((c for c in wrapper.children(recursive=True) if c.name() == "sleep"), None), 30,
                           "the trainer under the wrapper", interval=0.05)
        assert isinstance(trainer, psutil.Process)
        yield Wrapped(raylet=raylet, supervisor=supervisor, wrapper=wrapper, trainer=trainer, log=log)
    finally:
        for p in (raylet, supervisor):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                p.kill()
        raylet.wait(timeout=10)


@pytest.mark.parametrize("dies", ["supervisor", "supervisor, with the process it started", "raylet",
                                  "raylet, not yet reaped"])
def test_a_trainer_whose_ray_supervisor_or_raylet_died_is_stopped_by_its_wrapper(wrapped: Wrapped, dies: str) -> None:
    # the node left the cluster while its machine runs on: the job runs again elsewhere, so the trainer left here
    # must not go on writing into the job's shared folder (a supervisor may well outlive its raylet, and a dead
    # raylet stays a zombie until `ray start` reaps it; a supervisor that exits takes the process it started with
    # it, as Ray's did under load in CI, and that process's children live on)
    if dies.startswith("supervisor"):
        if dies.endswith("it started"):
            wrapped.wrapper.kill()
        wrapped.supervisor.kill()
    else:
        wrapped.raylet.kill()
        if dies == "raylet":
            wrapped.raylet.wait(timeout=10)
    gone, _ = psutil.wait_procs([wrapped.trainer], timeout=15)
    assert gone == [wrapped.trainer]
    assert "left the cluster: stopping the trainer here" in wrapped.log.read_text()


def test_a_trainer_whose_supervisor_lives_is_left_alone(wrapped: Wrapped) -> None:
    _gone, alive = psutil.wait_procs([wrapped.trainer], timeout=2.5)  # two of the wrapper's checks pass
    assert alive == [wrapped.trainer] and "left the cluster" not in wrapped.log.read_text()
    wrapped.trainer.kill()
