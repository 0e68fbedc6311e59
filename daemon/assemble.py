"""Build the daemon from its parts: the one place that knows which parts exist and what each is given."""

from __future__ import annotations

from daemon.cluster.open import open_cluster
from daemon.cluster.part import ClusterPart
from daemon.cluster.replica_port import ReplicaGpus
from daemon.core.sdnotify import Notifier
from daemon.daemon import Daemon
from daemon.engines.control import EngineControl
from daemon.gpus.allocator import GpuAllocator
from daemon.gpus.source import open_gpu_source
from daemon.metrics.part import MetricsPart
from daemon.ocr.evaljob import OcrEvalPart
from daemon.ocr.part import OcrPart
from daemon.spool.part import SpoolPart
from daemon.spool.spool import Spool
from daemon.train.kind import datasets_dir_of
from daemon.train.part import TrainingPart
from shared.config import Settings


def assemble(settings: Settings, notifier: Notifier | None = None) -> Daemon:
    # first: Ray's import and its cluster check come before any socket exists (a failure exits cleanly)
    cluster = open_cluster(settings)  # None: trainers are the daemon's children ([cluster] backend = "local")
    daemon = Daemon(settings, notifier)
    store, bus, jobs = daemon.store, daemon.bus, daemon.jobs
    scheduler = settings.config.scheduler
    gpus_seen = cluster.gpus if cluster is not None else open_gpu_source(scheduler)
    fleet = cluster.vllm_replicas(settings) if cluster is not None else None
    engines = EngineControl(settings, store, bus, gpus_seen, fleet=fleet)
    # the engine whose GPUs training borrows: the local vLLM, or the replicas on the cluster's nodes
    gpu_engine = engines.gpu_engine if fleet is None or cluster is None else ReplicaGpus(fleet, cluster.gpus)
    if cluster is not None:
        training = TrainingPart(settings, store, gpu_engine, make_kind=cluster.train_kind,
                                jobs_dir=cluster.jobs_dir)
    else:
        training = TrainingPart(settings, store, gpu_engine)
    gpus = GpuAllocator(scheduler, store, bus, jobs, monitor=gpus_seen, engine=gpu_engine,
                        lanes=training.lanes, pids_of=training.pids)
    spool = Spool.of(settings)
    # first: handover.sock is open before the hot folder takes its first file
    handover = SpoolPart(settings, spool, store, daemon.identities.allowed)
    ocr = OcrPart(settings, store, jobs, engines.pool, engines.choice, spool, daemon.identities.allowed)
    ocr_eval = OcrEvalPart(settings, store, engines.pool, engines.choice, spool, datasets_dir_of(settings),
                           ocr.kind.scheduler)
    # last: it only reads what the others own (their shown(), the store) and counts the jobs that end
    metrics = MetricsPart(settings, store, lambda: daemon.parts, lambda: jobs.paused)
    daemon.plug([handover, engines, training, gpus, ocr, ocr_eval, ClusterPart(cluster, store), metrics],
                admission=gpus.admit)
    return daemon
