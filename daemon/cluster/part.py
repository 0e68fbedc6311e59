"""What `ftctl status` shows of the cluster (:class:`shared.protocol.ClusterStatus`): every node Ray knows, alive
or dead, its logical GPUs and the daemon's running jobs on it. With the local backend: just that it is local."""

from __future__ import annotations

import asyncio

from daemon.cluster.open import RayCluster
from daemon.core.store import Store
from daemon.ctl.server import Handler
from daemon.gpus.ray_source import list_ray_nodes
from daemon.jobs.base import Caller
from daemon.part import Part
from shared.protocol import ClusterNode, ClusterReply, ClusterStatus


class ClusterPart(Part):
    def __init__(self, cluster: RayCluster | None, store: Store) -> None:
        self.cluster = cluster
        self.store = store

    def handlers(self) -> dict[type, Handler]:
        return {ClusterStatus: self.on_status}

    async def on_status(self, _body: ClusterStatus, _caller: Caller) -> ClusterReply:
        if self.cluster is None:
            return ClusterReply(backend="local")
        try:
            nodes = await asyncio.to_thread(list_ray_nodes, self.cluster.address)
        except Exception as exc:  # the head does not answer: say so, the rest of status still shows
            return ClusterReply(backend="ray", address=self.cluster.address,
                                error=f"the Ray cluster does not answer ({type(exc).__name__})")
        jobs: dict[str, list[int]] = {}
        for job in self.store.jobs_in_state("running"):
            node = job.artifacts.get("node")
            if node:
                jobs.setdefault(node, []).append(job.id)
        nodes.sort(key=lambda n: (not n.head, n.node_id))
        return ClusterReply(backend="ray", address=self.cluster.address, nodes=[
            ClusterNode(node_id=n.node_id, name=n.short, address=n.ip, state="alive" if n.alive else "dead",
                        head=n.head, gpus=n.gpus, job_ids=sorted(jobs.get(n.short, [])))
            for n in nodes])
