"""Training next to the OCR engine's vLLM replicas on a real two-node Ray cluster (2 logical GPUs a node): the
allocator sees the GPU each replica holds, so a train job that needs a whole node stops only that node's
replica (the other node's serves on), trains there, and the replica comes back once the job has ended. Real
parts: two `vllm serve` replicas (vLLM's CPU build) and the real `llamafactory-cli`, both as Ray jobs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shared.protocol import EngineCommand, EngineReply
from tests.cluster.ray_cluster import RayTestCluster
from tests.cluster.test_ray_replicas import SERVE_DEADLINE_S, replica_sections, replicas
from tests.daemon_proc import wait_for
from tests.engines import stack
from tests.train_daemon.support import RUN_TIMEOUT_S, Box, TrainDaemon, daemon_with_dataset
from tests.vllm.conftest import VllmDaemon

pytestmark = [pytest.mark.vllm, pytest.mark.llamafactory]


@pytest.fixture(scope="module")
def both(box: Box, ray_cluster: RayTestCluster) -> Iterator[TrainDaemon]:
    sections = replica_sections(box.root / "replicas", ray_cluster)
    with daemon_with_dataset(box, "raymix", scheduler={"gpu_poll_s": 0.5}, **sections) as d:  # type: ignore[arg-type]
        yield d


def engine_message(d: TrainDaemon) -> str:
    return d.c.call(EngineCommand(action="status"), EngineReply).message


def test_a_job_that_needs_a_whole_node_stops_that_nodes_replica_only_and_it_comes_back_after(
        both: TrainDaemon, box: Box, ray_cluster: RayTestCluster) -> None:
    vd = VllmDaemon(proc=both, model=stack.tiny_model_cached())
    wait_for(lambda: len(replicas(vd)) == 2, SERVE_DEADLINE_S, "2 serving replicas", interval=1.0)
    sets = [a for s in box.train_sets("max_steps=40", "save_steps=100") for a in ("--set", s)]
    job_id = both.submit_id("train", "qwen2vl_lora_sft", "--dataset", "tiny_sft", "--gpus", "2", *sets)
    # while it trains: one replica stopped for it, the other still serving
    message = wait_for(lambda: (m := engine_message(both)) and "stopped for training" in m and m,
                       RUN_TIMEOUT_S, "a replica stopped for the job", interval=0.2)
    assert "1 of 2 vLLM replicas on Ray serving" in str(message) and "1 stopped for training on node" in str(message)
    job = both.wait_job(job_id)
    history = " ".join(both.history(job_id))
    assert job.state == "succeeded", f"{job.error}\n{history}\n{both.log_tail(job_id)}"
    assert "waiting for the vLLM engine to stop" in history or "started on GPUs" in history
    # it ran on the node whose replica stopped, on both its GPUs
    stopped_on = str(message).split("stopped for training on node(s) ")[1][:8]
    assert job.artifacts["node"] == stopped_on and len(job.gpus) == 2
    # and the replica comes back once the job has ended
    wait_for(lambda: len(replicas(vd)) == 2 and "stopped for training" not in engine_message(both),
             SERVE_DEADLINE_S, "the stopped replica serving again", interval=1.0)
