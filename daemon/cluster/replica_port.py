"""The vLLM replicas on Ray (daemon/cluster/replicas.py) as the GPU allocator sees an engine
(:class:`daemon.gpus.engine_port.GpuEngine`), so that training never lands on a GPU a replica holds and a job
that needs one gets it.

* Where they sit: Ray counts GPUs per node and does not say which of a node's GPUs a replica got, so each
  replica is given the allocator's highest-numbered GPUs of its node (training takes the lowest free first).
  Replicas stopped for training keep their GPUs' numbers, as parked ones (``EngineView.parked_gpus``).
* Park: the plan names the engine GPUs a job needs; the replicas on those GPUs' nodes stop (as many as the GPUs
  need) and the others serve on: training on one node does not stop OCR on the rest of the cluster. There is no
  sleep mode on replicas (see replicas.py), so a parked replica is stopped and starts again when woken.
* Wake: once no job holds a parked replica's GPUs, every parked replica starts again.
* Deploying a model or a member's adapter is the local engine's: replicas take adapters from `ftctl engine load`
  (admins; the names are shared by every replica).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from daemon.cluster.replicas import VllmReplicas
from daemon.gpus.engine_port import DeployError
from daemon.gpus.plan import EngineView
from daemon.gpus.ray_source import RayGpus
from daemon.jobs.base import Caller

STOP_S = 60.0  # a replica's own stop, before Ray kills it


class ReplicaGpus:
    def __init__(self, fleet: VllmReplicas, gpus: RayGpus) -> None:
        self.fleet = fleet
        self.gpus = gpus

    def _slots(self) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        """Per node id: the GPU numbers of its running replicas and of its parked ones (see the docstring)."""
        each = self.fleet.cfg.gpus
        running: dict[str, list[int]] = {}
        parked: dict[str, list[int]] = {}
        for node in self.gpus.nodes:
            if not node.alive:
                continue
            top = self.gpus.first_index(node) + node.gpus
            n_parked = sum(1 for p in self.fleet.parked if p.node_id == node.node_id) * each
            n_running = sum(1 for r in self.fleet.replicas if r.node.node_id == node.node_id) * each
            numbers = list(range(top - 1, top - 1 - min(node.gpus, n_parked + n_running), -1))
            parked[node.node_id], running[node.node_id] = numbers[:n_parked], numbers[n_parked:]
        return running, parked

    def view(self, pids: bool = True) -> EngineView:
        running, parked = self._slots()
        on = sorted(g for gs in running.values() for g in gs)
        off = sorted(g for gs in parked.values() for g in gs)
        state: Literal["running", "stopped"] = "running" if on or not off else "stopped"
        return EngineView(gpus=tuple(sorted(on + off)), state=state, can_sleep=False, parked=bool(off),
                          parked_gpus=tuple(off))

    async def park(self, how: Literal["sleep", "stop"], reason: str, gpus: tuple[int, ...] = ()) -> None:
        running, _parked = self._slots()
        wanted = set(gpus) if gpus else {g for gs in running.values() for g in gs}
        per_node = {node_id: math.ceil(len(wanted & set(gs)) / self.fleet.cfg.gpus)
                    for node_id, gs in running.items() if wanted & set(gs)}
        await self.fleet.park(per_node, STOP_S)

    async def unpark(self, reason: str) -> None:
        self.fleet.unpark()

    async def load_adapter(self, name: str, path: Path, caller: Caller) -> str:
        raise DeployError(f"the OCR engine is {self.fleet.size} vLLM replicas on Ray: an admin loads adapters on "
                          f"every replica with `ftctl engine load {name} {path}`")

    async def serve_model(self, path: Path) -> str:
        raise DeployError(f"the OCR engine is {self.fleet.size} vLLM replicas on Ray, which serve vllm.model: set "
                          f"vllm.model = \"{path}\" in the config and restart the daemon to serve {path}")
