"""Training with [cluster] backend = "ray" on a real two-node Ray cluster (tests/cluster/ray_cluster.py): the
tiny LoRA SFT submitted with the real ftctl to a real ftmllmd runs as a Ray job (the real llamafactory-cli of
the engine venv, started by Ray on one of the nodes); loss points reach a subscribed client while it trains,
the adapter lands in shared_dir; a cancel stops it through Ray so that the adapter is saved."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.cluster.ray_jobs import RayRun
from daemon.train.launch import saved_state
from shared.protocol import JobInfo, Status, StatusReply
from tests.cluster.conftest import ray_job
from tests.cluster.ray_cluster import GPUS_PER_NODE, HEAD_IP, RayTestCluster
from tests.daemon_proc import wait_for
from tests.train_daemon.support import RUN_TIMEOUT_S, Box, Recorder, TrainDaemon, job_id_of, start_daemon

pytestmark = pytest.mark.llamafactory


@dataclass
class Run:
    job: JobInfo
    stdout: str
    live_points: int
    running_status: StatusReply  # `ftctl status` data while it trained


@pytest.fixture(scope="module")
def sft(rayd: TrainDaemon, box: Box) -> Run:
    recorder = Recorder(rayd.client(), ("train.", "job.")).start()
    sets = [a for s in box.train_sets("max_steps=6", "save_steps=3", "gradient_accumulation_steps=1")
            for a in ("--set", s)]
    r = rayd.ftctl("train", "qwen2vl_lora_sft", "--dataset", "tiny_sft", "--gpus", "1", *sets)
    job_id = job_id_of(r.stderr) if "queued" in r.stderr else int(r.stdout.strip().splitlines()[-1])
    status = wait_for(lambda: (s := rayd.c.call(Status(), StatusReply)) and any(g.job_ids for g in s.gpus) and s,
                      RUN_TIMEOUT_S, "status to show the job on a cluster GPU", interval=0.2)
    assert isinstance(status, StatusReply)
    job = rayd.wait_job(job_id)
    recorder.wait(lambda: recorder.finished_at(job_id), 60, "the job's last event")
    end = recorder.finished_at(job_id)
    assert end is not None
    live = sum(1 for t, p in recorder.train_points(job_id) if t < end and p.loss is not None)
    return Run(job=job, stdout=r.stdout, live_points=live, running_status=status)


def test_sft_runs_as_a_ray_job_streams_loss_points_and_saves_the_adapter_in_shared_dir(
        rayd: TrainDaemon, sft: Run, ray_cluster: RayTestCluster) -> None:
    job = sft.job
    assert job.state == "succeeded", f"{job.error}\n{rayd.log_tail(job.id)}"
    assert sft.live_points >= 3  # they reached the client while it trained, not at the end
    assert [p.step for p in rayd.points(job.id)] == list(range(1, 7))
    adapter = Path(job.artifacts["adapter"])
    assert adapter == ray_cluster.root / "shared" / "jobs" / str(job.id) / "output"
    assert (adapter / "adapter_model.safetensors").is_file() and job.artifacts["saved"].endswith("after all 6 steps")
    info = ray_job(ray_cluster, str(job.id))  # submission id = the ftmllm job id
    assert str(getattr(info, "status", "")).endswith("SUCCEEDED")
    node = getattr(info, "driver_node_id", "")
    assert job.artifacts["node"] == node[:8]
    assert node in {str(n["id"]) for n in ray_cluster.alive_nodes()}
    assert f"started as Ray job {job.id} on node {node[:8]} (1 GPU)" in " ".join(rayd.history(job.id))
    logs = rayd.ftctl("logs", str(job.id), "-n", "400")
    assert "***** train metrics *****" in logs.stdout  # the trainer's output, streamed from the node


def test_status_shows_the_cluster_gpus_and_the_job_on_the_node_ray_ran_it_on(sft: Run,
                                                                             ray_cluster: RayTestCluster) -> None:
    status = sft.running_status
    assert len(status.gpus) == 2 * GPUS_PER_NODE
    assert "Ray cluster: 2 of 2 nodes alive" in status.gpu_note
    held = [g for g in status.gpus if sft.job.id in g.job_ids]
    assert len(held) == 1
    # the allocator's choice is where Ray ran it: the job is pinned to that GPU's node
    assert re.fullmatch(rf"node {sft.job.artifacts['node']} GPU [01]", held[0].name), held[0].name


def test_ftctl_status_lists_the_nodes_and_ftctl_jobs_has_a_node_column(rayd: TrainDaemon, sft: Run,
                                                                       ray_cluster: RayTestCluster) -> None:
    r = rayd.ftctl("status")
    assert r.returncode == 0, r.stderr
    assert f"cluster:   ray at {ray_cluster.address}" in r.stdout
    nodes = re.findall(r"^node (\w{8}): (alive|dead)( \(head\))?, [\d.]+, (\d) GPUs, jobs", r.stdout, re.M)
    assert sorted(n[0] for n in nodes) == sorted(str(n["id"])[:8] for n in ray_cluster.alive_nodes())
    assert all(state == "alive" and gpus == str(GPUS_PER_NODE) for _, state, _, gpus in nodes)
    assert sum(1 for n in nodes if n[2]) == 1
    r = rayd.ftctl("jobs", "--all")
    assert r.returncode == 0, r.stderr
    header = r.stdout.splitlines()[0].split()
    assert "NODE" in header
    row = next(line.split() for line in r.stdout.splitlines() if line.split()[:1] == [str(sft.job.id)])
    assert sft.job.artifacts["node"] in row


def test_cancel_stops_the_ray_job_gracefully_and_the_adapter_is_saved(
        rayd: TrainDaemon, box: Box, ray_cluster: RayTestCluster, sft: Run) -> None:
    recorder = Recorder(rayd.client(), ("train.",)).start()
    sets = [a for s in box.train_sets("max_steps=400", "save_steps=1000") for a in ("--set", s)]
    job_id = rayd.submit_id("train", "qwen2vl_lora_sft", "--dataset", "tiny_sft", *sets)
    recorder.wait(lambda: any(p.step >= 2 for _, p in recorder.train_points(job_id)), RUN_TIMEOUT_S, "step 2")
    r = rayd.ftctl("cancel", str(job_id), "--wait", timeout=300)
    assert r.returncode == 0, r.stderr
    job = rayd.wait_job(job_id)
    assert job.state == "canceled", f"{job.error}\n{rayd.log_tail(job_id)}"
    out = Path(job.spec["output_dir"])
    state = saved_state(out)
    assert state.adapter and state.global_step is not None and 2 <= state.global_step < 400, state
    assert job.artifacts["adapter"] == str(out)
    assert any("trainer stopped (gracefully" in h for h in rayd.history(job_id)), rayd.history(job_id)
    assert str(getattr(ray_job(ray_cluster, str(job_id)), "status", "")).endswith("STOPPED")
    assert "SIGABRT to the trainer" in rayd.log_tail(job_id, 20000)


def test_a_daemon_killed_mid_run_leaves_its_ray_job_which_the_next_daemon_stops_and_resumes(
        rayd: TrainDaemon, box: Box, ray_cluster: RayTestCluster, sft: Run) -> None:
    recorder = Recorder(rayd.client(), ("train.",)).start()
    sets = [a for s in box.train_sets("max_steps=400", "save_steps=2", "gradient_accumulation_steps=1")
            for a in ("--set", s)]
    job_id = rayd.submit_id("train", "qwen2vl_lora_sft", "--dataset", "tiny_sft", *sets)
    out = Path(rayd.job(job_id).job.spec["output_dir"])
    wait_for(lambda: saved_state(out).checkpoints, RUN_TIMEOUT_S, "checkpoint-2", interval=0.2)
    rayd.kill9()
    # Ray's job does not depend on the daemon: it trains on
    assert str(getattr(ray_job(ray_cluster, str(job_id)), "status", "")).endswith("RUNNING")
    rayd.start()
    resumed = wait_for(lambda: next((h for h in rayd.history(job_id) if h.startswith("resuming from checkpoint-")),
                                    None), RUN_TIMEOUT_S, "the resume", interval=0.2)
    step = int(re.match(r"resuming from checkpoint-(\d+)", str(resumed)).group(1))  # type: ignore[union-attr]
    recorder.wait(lambda: any(p.step > step + 1 for _, p in recorder.train_points(job_id)), RUN_TIMEOUT_S,
                  "a step after the resume")
    assert rayd.ftctl("cancel", str(job_id), "--wait", timeout=300).returncode == 0
    job = rayd.wait_job(job_id)
    history = rayd.history(job_id)
    assert job.state == "canceled", history
    assert f"stopped Ray job {job_id}, which the previous daemon left running" in history
    assert str(getattr(ray_job(ray_cluster, str(job_id)), "status", "")).endswith("STOPPED")
    assert str(getattr(ray_job(ray_cluster, f"{job_id}.2"), "status", "")).endswith("STOPPED")
    steps = [p.step for p in rayd.points(job_id)]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] > step  # each step once, across both runs


def test_a_job_over_two_nodes_runs_torchrun_across_them_with_one_ray_job_per_node(
        rayd: TrainDaemon, box: Box, ray_cluster: RayTestCluster, sft: Run) -> None:
    sets = [a for s in box.train_sets("max_steps=4", "save_steps=2", "gradient_accumulation_steps=1",
                                      "per_device_train_batch_size=1") for a in ("--set", s)]
    job_id = rayd.submit_id("train", "qwen2vl_lora_sft", "--dataset", "tiny_sft", "--gpus", "1", "--nodes", "2",
                            *sets)
    job = rayd.wait_job(job_id)
    history = " ".join(rayd.history(job_id))
    assert job.state == "succeeded", f"{job.error}\n{history}\n{rayd.log_tail(job_id, 6000)}"
    # one Ray job per node, on the two nodes the allocator chose (rank 0 on the first)
    ranks = [ray_job(ray_cluster, str(job_id)), ray_job(ray_cluster, f"{job_id}-rank1")]
    assert all(str(getattr(r, "status", "")).endswith("SUCCEEDED") for r in ranks)
    nodes = [str(getattr(r, "driver_node_id", "")) for r in ranks]
    assert sorted(nodes) == sorted(str(n["id"]) for n in ray_cluster.alive_nodes())
    assert job.artifacts["node"] == ",".join(n[:8] for n in nodes)
    assert f"started as Ray jobs {job_id}, {job_id}-rank1… on nodes {job.artifacts['node']}" in history
    log = rayd.log_tail(job_id, 40000)
    assert "node rank 0 of 2" in log and "Multi-node training enabled: num nodes: 2" in log
    rank1 = rayd.paths.state_dir / "jobs" / str(job_id) / "rank1.log"  # beside job.log
    assert "node rank 1 of 2" in rank1.read_text()
    # data parallel over the two nodes: each step reads one record per rank, so 4 steps are the 8 records once
    out = Path(job.spec["output_dir"])
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["epoch"] == pytest.approx(1.0)
    assert (out / "adapter_model.safetensors").is_file()
    assert [p.step for p in rayd.points(job_id)] == [1, 2, 3, 4]


def test_a_ray_client_address_finds_the_clusters_dashboard(box: Box, ray_cluster: RayTestCluster) -> None:
    # the daemon's start waits for a Ray Client session, for which Ray first starts a server on the head: 3 s
    # here alone, once more than 30 s in a full run (the daemon's log says what it waits for)
    d = start_daemon(box, "rayclient", start_timeout=120.0,
                     cluster={"backend": "ray", "address": f"ray://{HEAD_IP}:{ray_cluster.client_port}",
                              "shared_dir": str(ray_cluster.root / "shared"),
                              "auth_token_file": str(ray_cluster.token_file)})
    try:
        r = d.ftctl("status")
        assert r.returncode == 0, r.stderr
        # Ray told the daemon where its dashboard is: nodes and GPUs come from there
        assert f"cluster:   ray at {ray_cluster.address}" in r.stdout
        assert len(re.findall(r"^node \w{8}: alive", r.stdout, re.M)) == 2, r.stdout
    finally:
        d.close()


def test_the_cluster_refuses_a_client_without_its_token(ray_cluster: RayTestCluster) -> None:
    # what the daemon's [cluster] auth_token_file is for: Ray's ports are reachable by every local user
    from ray.job_submission import JobSubmissionClient

    assert isinstance(ray_cluster.job_client().list_jobs(), list)
    with pytest.raises(Exception, match="Missing authentication token"):
        JobSubmissionClient(ray_cluster.address).list_jobs()


def test_a_ray_jobs_log_is_whole_when_rays_log_stream_ends_short(ray_cluster: RayTestCluster, tmp_path: Path) -> None:
    # seen under load: Ray's stream of a job's log ended without its last lines (a canceled trainer's last steps
    # and save); here the real stream is cut after the first half, and the job's end fills in the rest once
    go = tmp_path / "go"
    code = ("import os, time\n"
            "for i in range(1, 101): print(f'line {i}', flush=True)\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.05)\n"
            "for i in range(101, 201): print(f'line {i}', flush=True)\n")
    log = tmp_path / "job" / "job.log"

    async def run() -> int:
        r = await RayRun.submit(ray_cluster.job_client(), submission_id=f"log-{uuid.uuid4().hex[:8]}",
                                command=shlex.join([sys.executable, "-c", code]), gpus=0, env={}, log_path=log)
        try:
            await asyncio.to_thread(wait_for, lambda: log.exists() and "line 100\n" in log.read_text(),
                                    RUN_TIMEOUT_S, "the first half of the log through Ray's stream")
            r._tasks[1].cancel()  # the stream ends here, short of the job's log
            go.touch()
            return await r.wait()
        finally:
            r.close()

    assert asyncio.run(run()) == 0
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("line ")]
    assert lines == [f"line {i}" for i in range(1, 201)]  # each once, in order
