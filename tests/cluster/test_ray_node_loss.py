"""A node dies under a Ray training job: the worker node's raylet is killed mid-run (the node leaves the cluster;
its machine, and the trainer's processes on it, live on: the job's wrapper stops the trainer); the job ends
interrupted, goes back to the queue and resumes from its last complete checkpoint on the other node, as the
same ftmllm job, and ends with the requested number of steps, each reported once. The dead node stays visible
in the cluster view."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from daemon.train.launch import saved_state
from shared.protocol import Status, StatusReply
from tests.cluster.conftest import ray_job
from tests.cluster.ray_cluster import GPUS_PER_NODE, WORKER_IP, RayTestCluster
from tests.daemon_proc import wait_for
from tests.train_daemon.support import RUN_TIMEOUT_S, Box, Recorder, TrainDaemon

pytestmark = pytest.mark.llamafactory

# enough that the trainer is far from done when its node goes (a step takes ~0.2 s here)
STEPS = 60


def test_a_job_whose_node_dies_resumes_from_its_checkpoint_on_the_other_node(
        rayd: TrainDaemon, box: Box, ray_cluster: RayTestCluster) -> None:
    worker = ray_cluster.node_id(WORKER_IP)
    recorder = Recorder(rayd.client(), ("train.",)).start()
    sets = [a for s in box.train_sets(f"max_steps={STEPS}", "save_steps=2") for a in ("--set", s)]
    job_id = rayd.submit_id("train", "qwen2vl_lora_sft", "--dataset", "tiny_sft", *sets)
    # worker GPUs come first in the allocator's numbering, so the first job lands on the worker node
    wait_for(lambda: rayd.job(job_id).job.artifacts.get("node"), RUN_TIMEOUT_S, "the job's node", interval=0.2)
    assert rayd.job(job_id).job.artifacts["node"] == worker[:8]
    out = Path(rayd.job(job_id).job.spec["output_dir"])
    wait_for(lambda: len(saved_state(out).checkpoints) >= 2, RUN_TIMEOUT_S, "checkpoint-4", interval=0.2)
    os.kill(ray_cluster.worker.raylet_pid(), signal.SIGKILL)

    job = rayd.wait_job(job_id)
    history = " ".join(rayd.history(job_id))
    assert job.state == "succeeded", f"{job.error}\n{history}\n{rayd.log_tail(job_id)}"
    # the job ended interrupted, went back to the queue and was placed again by the allocator
    assert f"interrupted: Ray node {worker[:8]} left while job {job_id} ran" in history
    assert "it runs again from checkpoint-" in history and "queued again: it resumes from what it saved" in history
    assert "resuming from checkpoint-" in history, f"{history}\n{rayd.log_tail(job_id, 12000)}"
    assert str(getattr(ray_job(ray_cluster, f"{job_id}.2"), "status", "")).endswith("SUCCEEDED")
    head = ray_cluster.node_id(ray_cluster_head_ip(ray_cluster))
    assert job.artifacts["node"] == head[:8]
    assert saved_state(out).finished and job.artifacts["saved"].endswith(f"after all {STEPS} steps")
    assert [p.step for p in rayd.points(job_id)] == list(range(1, STEPS + 1))  # each step once, across both runs
    assert str(getattr(ray_job(ray_cluster, str(job_id)), "status", "")).endswith("FAILED")
    status = rayd.c.call(Status(), StatusReply)
    assert f"Ray cluster: 1 of 2 nodes alive (dead: {worker[:8]})" in status.gpu_note
    assert len(status.gpus) == GPUS_PER_NODE  # nothing is planned on the dead node's GPUs
    r = rayd.ftctl("status")
    assert re.search(rf"^node {worker[:8]}: dead, {re.escape(WORKER_IP)}, {GPUS_PER_NODE} GPUs", r.stdout, re.M), \
        r.stdout
    assert recorder.train_points(job_id)


def ray_cluster_head_ip(cluster: RayTestCluster) -> str:
    return next(str(n["ip"]) for n in cluster.alive_nodes() if n["ip"] != WORKER_IP)
