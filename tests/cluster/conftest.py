"""Fixtures for the Ray backend tests: a real two-node Ray cluster on this machine (ray_cluster.py) and the
tiny model and dataset the local training tests use (tests/train_daemon/support.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.ray_cluster import RayTestCluster, start_cluster
from tests.train_daemon.support import Box, TrainDaemon, daemon_with_dataset


@pytest.fixture(scope="module")  # per module: the node-loss test leaves a dead node behind
def ray_cluster() -> Iterator[RayTestCluster]:
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def rayd(box: Box, ray_cluster: RayTestCluster) -> Iterator[TrainDaemon]:
    """A real ftmllmd with [cluster] backend = "ray" on the module's cluster, the tiny dataset added."""
    shared = ray_cluster.root / "shared"
    with daemon_with_dataset(box, "ray", cluster={"backend": "ray", "address": ray_cluster.address,
                                                          "shared_dir": str(shared),
                                                          "auth_token_file": str(ray_cluster.token_file)},
                             scheduler={"gpu_poll_s": 0.5}, train={"graceful_stop_s": 60.0}) as d:
        yield d


def ray_job(cluster: RayTestCluster, submission_id: str) -> object:
    """Ray's own record of a submission (JobDetails), asked of the cluster directly."""
    return cluster.job_client().get_job_info(submission_id)
