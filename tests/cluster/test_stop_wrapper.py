"""The wrappers ftmllm's Ray jobs run under (daemon/cluster/ray_jobs.py STOP_WRAPPER for trainers,
daemon/cluster/replicas.py REPLICA_WRAPPER for vLLM replicas), without a cluster: real processes stand where
Ray's raylet, its job supervisor and the trainer or vLLM would be."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from daemon.cluster.ray_jobs import STOP_WRAPPER
from daemon.cluster.replicas import REPLICA_WRAPPER
from tests.daemon_proc import wait_for

# stands for Ray's job supervisor: starts the wrapper (around a long `sleep`, the trainer or vLLM) and says its pid
SUPERVISOR = ("import json, subprocess, sys; p = subprocess.Popen([sys.executable, '-c', *json.loads(sys.argv[1])], "
              "stdout=open(sys.argv[2], 'w'), stderr=subprocess.STDOUT); print(p.pid, flush=True); sys.stdin.read()")
# the wrapper's argv: a trainer's; a replica's (host, then `vllm serve ...` to which it adds --host and --port)
WRAPPED = {"trainer": [STOP_WRAPPER, "sleep", "300"],
           "replica": [REPLICA_WRAPPER, "127.0.0.1", "sh", "-c", "exec sleep 300", "vllm"]}
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


@pytest.fixture(params=sorted(WRAPPED))
def wrapped(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Wrapped]:
    log = tmp_path / "wrapper.log"
    raylet = subprocess.Popen([sys.executable, "-c", RAYLET, SUPERVISOR, json.dumps(WRAPPED[request.param]), str(log)],
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
def test_what_a_ray_job_runs_is_stopped_when_its_supervisor_or_raylet_dies(wrapped: Wrapped, dies: str) -> None:
    # the node left the cluster while its machine runs on: the job runs again elsewhere, so the trainer left here
    # must not go on writing into the job's shared folder, nor a replica hold its GPU (a supervisor may well
    # outlive its raylet, and a dead raylet stays a zombie until `ray start` reaps it; a supervisor that exits
    # takes the process it started with it, as Ray's did under load in CI, and that process's children live on)
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
    assert "left the cluster: stopping the" in wrapped.log.read_text()


def test_what_runs_under_a_living_supervisor_is_left_alone(wrapped: Wrapped) -> None:
    _gone, alive = psutil.wait_procs([wrapped.trainer], timeout=2.5)  # five of the wrapper's checks pass
    assert alive == [wrapped.trainer] and "left the cluster" not in wrapped.log.read_text()
    wrapped.trainer.kill()
