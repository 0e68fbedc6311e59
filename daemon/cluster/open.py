"""The cluster a daemon with ``[cluster] backend = "ray"`` hands its train/eval/export jobs to, opened once by
the assembly: the Ray job client, the GPU source the allocator plans on, and the kinds that submit to it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.cluster.replicas import VllmReplicas
from daemon.cluster.train import RayTrainKind
from daemon.gpus.ray_source import RayGpus, check_cluster_config, require_ray
from daemon.train.kind import KindName, TrainSetup
from shared.config import ConfigError, Settings

log = logging.getLogger(__name__)


@dataclass
class RayCluster:
    address: str
    shared_dir: Path
    client: Any  # ray.job_submission.JobSubmissionClient
    gpus: RayGpus

    @property
    def jobs_dir(self) -> Path:
        """Job dirs (job.yaml, checkpoints, adapters) where every node sees them."""
        return self.shared_dir / "jobs"

    def train_kind(self, kind: KindName, setup: TrainSetup) -> RayTrainKind:
        return RayTrainKind(kind, setup, client=self.client, gpus=self.gpus)

    def vllm_replicas(self, settings: Settings) -> VllmReplicas | None:
        """The OCR engine's vLLM replicas on the cluster (``vllm.replicas``), None for the local engine."""
        cfg = settings.config.vllm
        if cfg.replicas <= 0 or not cfg.model:
            return None
        return VllmReplicas(cfg, self.client, self.address, settings.paths.state_dir)


def open_cluster(settings: Settings) -> RayCluster | None:
    """None with the local backend. Raises ConfigError (one line) when Ray is missing or does not answer."""
    cfg = settings.config.cluster
    if cfg.backend != "ray":
        if settings.config.vllm.replicas > 0:
            raise ConfigError(f"{settings.source}: vllm.replicas = {settings.config.vllm.replicas} needs a Ray "
                              "cluster; set [cluster] backend = \"ray\" (README \"Beyond one machine\") or "
                              "vllm.replicas = 0 for the local engine")
        return None
    check_cluster_config(cfg, settings.source)
    if cfg.auth_token_file:
        use_token(cfg.auth_token_file, settings.source)
    require_ray()
    from ray.job_submission import JobSubmissionClient

    if cfg.address.startswith("ray://"):
        # seen to take from 3 s to more than 30 s on a busy head: say what the start waits for
        log.info("asking the Ray cluster at %s for its dashboard's URL (a Ray Client session: Ray starts a "
                 "server for it on the head); [cluster] address = \"http://head:8265\" skips this", cfg.address)
    try:
        # a ray:// address: Ray asks the cluster (a short Ray Client session) for its dashboard's URL
        client = JobSubmissionClient(cfg.address)
    except Exception as exc:  # ConnectionError, or a head that is not a Ray dashboard
        raise ConfigError(f"{settings.source}: the Ray cluster at [cluster] address {cfg.address} does not answer "
                          f"({type(exc).__name__}); start its head (`ray start --head --dashboard-host ...`) or "
                          "fix the address") from None
    # the dashboard's URL, where the state API (nodes) and the replicas' Ray jobs are asked
    address = str(client.get_address())
    shared = Path(cfg.shared_dir)
    try:
        (shared / "jobs").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{settings.source}: cannot create {shared / 'jobs'} in [cluster] shared_dir "
                          f"({exc.strerror}); mount the shared folder there or fix the path") from None
    return RayCluster(address=address, shared_dir=shared, client=client, gpus=RayGpus(address))


def use_token(path: str, source: str) -> None:
    """Ray's token authentication for this process (its job client and state API send the token): read from
    the environment when Ray is first imported, so this comes before."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read [cluster] auth_token_file {path} ({exc.strerror}); give the "
                          "file holding the cluster's token (`ray get-auth-token` on the head prints it)") from None
    if not token:
        raise ConfigError(f"{source}: [cluster] auth_token_file {path} is empty; put the cluster's token in it")
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = path
