"""The GPUs of a Ray cluster as a :class:`GpuSnapshot`, for ``[cluster] backend = "ray"``: the allocator plans
against every alive node's logical GPUs, so the ftmllm queue still never over-commits one and still backfills.

* Ray is imported here only when the ray backend is chosen (``pip install 'ftmllm[ray]'``); a daemon without
  it says so in one line (:func:`require_ray`).
* Nodes come from Ray's state API (``ray.util.state.list_nodes`` against the dashboard address). Each GPU gets
  an index that stays the same while the daemon runs: nodes are numbered in the order this source first saw
  them (worker nodes before the head), and node k's GPUs follow node k-1's. A node that died keeps its
  indices but its GPUs leave the snapshot, so nothing is planned on them.
* Ray knows GPUs as counts, not as devices with memory: a GPU's memory is reported as unknown (0), and the
  plan does not hold a job's ``min_free_gib`` against it. (The dashboard's node summary has each node's
  devices from NVML, but Ray does not say which device a job got, so their memory cannot be put on the GPUs
  numbered here.) Ray work that ftmllm did not submit is not seen as using
  a GPU (Ray itself still will not over-commit it: such a job then waits in Ray's own queue).
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from types import ModuleType

from daemon.gpus.nvml import GpuSample, GpuSnapshot
from shared.config import ClusterConfig, ConfigError

STATE_TIMEOUT_S = 10
SUSPECT_S = 120.0  # how long a node a job lost stays out of the plan while Ray still calls it alive


def ray_missing_message() -> str:
    return (f"[cluster] backend = \"ray\" needs Ray, which {sys.executable} cannot import; install it with "
            "`pip install 'ftmllm[ray]'` into the daemon's environment, or set [cluster] backend = \"local\"")


def require_ray() -> ModuleType:
    """Import Ray (with its job client and state API) or raise ConfigError saying what to install."""
    try:
        import ray
        import ray.job_submission
        import ray.util.state
    except ImportError:
        raise ConfigError(ray_missing_message()) from None
    return ray


def check_cluster_config(cfg: ClusterConfig, source: str) -> None:
    """What the ray backend cannot start without, as one line naming the key."""
    if not cfg.address.startswith(("http://", "https://", "ray://")):
        raise ConfigError(f"{source}: [cluster] address must be the Ray dashboard's URL, e.g. "
                          f"\"http://head:8265\", or a Ray Client address, \"ray://head:10001\" (got "
                          f"{cfg.address!r}); see README \"Beyond one machine\"")
    if not cfg.shared_dir.startswith("/"):
        raise ConfigError(f"{source}: [cluster] shared_dir must be an absolute path every node mounts "
                          f"(got {cfg.shared_dir!r}); see README \"Beyond one machine\"")


@dataclass(frozen=True)
class RayNode:
    node_id: str
    ip: str
    name: str  # the node's host name as Ray knows it
    alive: bool
    head: bool
    gpus: int  # logical GPUs the node declared
    cpus: float

    @property
    def short(self) -> str:
        """What people see: the first 8 hex digits of Ray's node id (several nodes may share an IP)."""
        return self.node_id[:8]


def list_ray_nodes(address: str) -> list[RayNode]:
    require_ray()
    from ray.util.state import list_nodes

    nodes = list_nodes(address=address, detail=True, limit=1000, timeout=STATE_TIMEOUT_S, raise_on_missing_output=False)
    out = []
    for n in nodes:
        res = n.resources_total or {}
        out.append(RayNode(node_id=n.node_id, ip=n.node_ip or "", name=n.node_name or n.node_ip or "",
                           alive=n.state == "ALIVE", head=bool(n.is_head_node), gpus=int(res.get("GPU", 0)),
                           cpus=float(res.get("CPU", 0))))
    return out


class RayGpus:
    """The GPU source for the ray backend (see the module docstring). Also the cluster's node list: the
    status reply shows what the last sample saw."""

    def __init__(self, address: str) -> None:
        require_ray()
        self.address = address
        self._order: dict[str, int] = {}  # node id -> first GPU index
        self._next = 0
        self._lock = threading.Lock()
        self.nodes: list[RayNode] = []
        self._suspects: dict[str, float] = {}  # node id -> until when nothing is planned on it

    def first_index(self, node: RayNode) -> int:
        with self._lock:
            if node.node_id not in self._order:
                self._order[node.node_id] = self._next
                self._next += node.gpus
            return self._order[node.node_id]

    def node_of(self, index: int) -> RayNode | None:
        for node in self.nodes:
            first = self._order.get(node.node_id)
            if first is not None and first <= index < first + node.gpus:
                return node
        return None

    def suspect(self, node_id: str, seconds: float = SUSPECT_S) -> None:
        """A job lost this node: plan nothing on it for ``seconds``, though Ray may still call it alive (Ray
        takes a while to declare a node dead; a job placed there meanwhile would wait in Ray for ever)."""
        with self._lock:
            self._suspects[node_id] = time.monotonic() + seconds

    def _suspected(self, node: RayNode) -> bool:
        with self._lock:
            until = self._suspects.get(node.node_id)
            if until is not None and (not node.alive or time.monotonic() > until):
                del self._suspects[node.node_id]  # Ray has said what became of it, or had long enough
                return False
            return until is not None

    def snapshot(self) -> GpuSnapshot:
        try:
            nodes = list_ray_nodes(self.address)
        except Exception as exc:  # the head is down or unreachable: plan nothing on a guess
            return GpuSnapshot(taken_at=time.time(), host=self.address, cpu_only=False,
                               error=f"Ray cluster at {self.address} does not answer ({type(exc).__name__}: "
                                     f"{str(exc)[:200]})")
        # workers first, the head last (it also runs Ray's control plane, so the allocator, which takes the
        # lowest free index, gives it training last); by id within: a stable numbering for the nodes already
        # there when the daemon starts
        nodes.sort(key=lambda n: (n.head, n.node_id))
        gpus = []
        for node in nodes:
            first = self.first_index(node)
            if not node.alive or self._suspected(node):
                continue
            for k in range(node.gpus):
                gpus.append(GpuSample(index=first + k, uuid=f"ray-{node.node_id}-{k}",
                                      name=f"node {node.short} GPU {k}", node=node.node_id))
        self.nodes = nodes
        dead = [n.short for n in nodes if not n.alive]
        alive = len(nodes) - len(dead)
        # the dashboard shows this line under the GPUs: a node that left is named there, not hidden
        note = f"Ray cluster: {alive} of {len(nodes)} nodes alive" + (f" (dead: {', '.join(dead)})" if dead else "")
        return GpuSnapshot(taken_at=time.time(), host=self.address, gpus=tuple(sorted(gpus, key=lambda g: g.index)),
                           cpu_only=not gpus and alive > 0, error=note)

    def close(self) -> None:
        pass
