"""``vllm.replicas = N`` with ``[cluster] backend = "ray"``: N ``vllm serve`` replicas, each a Ray job
(daemon/cluster/ray_jobs.py), that the ``remote`` engine (daemon/engines/remote.py) sends pages to by queue
depth. This is the engine's :class:`daemon.engines.remote.Fleet`.

* A replica is the local engine's command line (daemon/engines/vllm_command.py) with ``--host <node address>
  --port <free port>`` instead of ``--uds``: the daemon picks the node (alive, enough logical GPUs, fewest of
  its replicas; pinned by Ray's node-id label) and so knows its address; :data:`REPLICA_WRAPPER` on the node
  binds a free port there, prints it, and runs vLLM in a process group of its own that it ends with itself, and
  when the node leaves the cluster while its machine runs on (daemon/cluster/ray_jobs.py NODE_GUARD).
* It serves pages once its ``/health`` answers and the runtime LoRA adapters loaded so far are loaded on it.
* A replica whose Ray job ends (vLLM died, its node left) is dropped from the engine's list and another is
  submitted; pages in flight there broke off and the converter sends them again elsewhere.
* Trust: a replica listens on TCP on its node's address, reachable from the cluster's network, unlike the
  local engine's private socket. Its ``/v1`` endpoints (pages, adapter loads) take a random API key this daemon
  makes at start (``VLLM_API_KEY``, in the job's env: Ray's token guards who can read it); ``/metrics`` and
  ``/health`` are open. Sleep mode (vLLM's unguarded dev endpoints) is off on replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from daemon.cluster.ray_jobs import NODE_GUARD, RayRun, python_beside
from daemon.engines.vllm_command import build_command, build_env, served_name_of
from daemon.gpus.ray_source import RayNode, list_ray_nodes
from shared.config import VllmConfig

log = logging.getLogger(__name__)

LISTENING = "ftmllm-replica-listening "
RECORD = "replicas.json"  # the submissions this daemon made, to stop them if it died meanwhile
HEALTH_POLL_S = 1.0

# Run as `python -c REPLICA_WRAPPER HOST vllm serve ...` on the node.
REPLICA_WRAPPER = NODE_GUARD + r"""
import socket
host = sys.argv[1]
with socket.socket() as s:
    s.bind((host, 0))
    port = s.getsockname()[1]
os.environ['VLLM_HOST_IP'] = host
guarded()
# its own group: vLLM's engine process outlives a killed API server unless the group is ended
child = subprocess.Popen(sys.argv[2:] + ['--host', host, '--port', str(port)], start_new_session=True)
print(f'ftmllm-replica-listening http://{host}:{port}', flush=True)
def signal_group(sig):
    try:
        os.killpg(child.pid, sig)
    except ProcessLookupError:
        pass
signal.signal(signal.SIGTERM, lambda _sig, _frame: signal_group(signal.SIGTERM))
left = []
threading.Thread(target=watch_node, daemon=True,
                 args=(child, lambda: (left.append(True), signal_group(signal.SIGKILL)), 'the vLLM replica')).start()
rc = child.wait()
signal_group(signal.SIGKILL)
if left:
    sys.exit(NODE_LEFT_EXIT)
sys.exit(128 - rc if rc < 0 else rc)
"""


def replica_argv(cfg: VllmConfig) -> list[str]:
    """The local engine's `vllm serve` argv without ``--uds`` (the wrapper adds --host/--port) and without
    sleep mode (see the module docstring)."""
    argv = build_command(cfg, cfg.executable, "", served_name_of(cfg), cfg.gpus)
    i = argv.index("--uds")
    del argv[i:i + 2]
    return [a for a in argv if a != "--enable-sleep-mode"]


def replica_env(cfg: VllmConfig, api_key: str) -> dict[str, str]:
    env = build_env(cfg, base={}, gpu_indices=[])
    env.pop("VLLM_SERVER_DEV_MODE", None)
    env["VLLM_API_KEY"] = api_key
    env["RAY_JOB_STOP_WAIT_TIME_S"] = "10"
    return env


@dataclass
class Replica:
    submission_id: str
    node: RayNode
    run: RayRun
    root: str = ""  # http://host:port once it serves
    task: asyncio.Task[None] | None = None
    started_at: float = field(default_factory=time.monotonic)


class VllmReplicas:
    def __init__(self, cfg: VllmConfig, client: Any, address: str, state_dir: Path) -> None:
        self.cfg = cfg
        self.client = client
        self.address = address
        self.dir = state_dir / "vllm-replicas"
        self.size = cfg.replicas
        self.api_key = secrets.token_urlsafe(32)
        self.replicas: list[Replica] = []
        self.parked: list[RayNode] = []  # the nodes of replicas stopped for a training job (replica_port.py)
        self.adapters: dict[str, str] = {}  # name -> path, loaded on every replica, new ones included
        self.error = ""
        self.replaced = 0
        self._tag = f"{int(time.time()):x}"
        self._seq = 0
        self._fails = 0
        self._keeper: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None

    # Fleet -----------------------------------------------------------------------------------------------

    def roots(self) -> list[str]:
        return [r.root for r in self.replicas if r.root and r.run.alive()]

    async def start(self) -> None:
        if self._keeper is None or self._keeper.done():
            self.dir.mkdir(parents=True, exist_ok=True)
            await self._stop_leftovers()
            self._keeper = asyncio.get_running_loop().create_task(self._keep(), name="vllm-replicas")

    async def stop(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
            self._keeper = None
        await asyncio.gather(*(self._end(r) for r in self.replicas), return_exceptions=True)
        self.replicas = []
        (self.dir / RECORD).unlink(missing_ok=True)
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def park(self, per_node: dict[str, int], stop_s: float) -> None:
        """Stop ``per_node[node id]`` replicas on each of those nodes (training needs their GPUs) and keep them
        stopped until :meth:`unpark`; the others serve on. Pages they had in flight are sent again elsewhere."""
        chosen: list[Replica] = []
        for node_id, count in per_node.items():
            on_node = [r for r in self.replicas if r.node.node_id == node_id]
            on_node.sort(key=lambda r: bool(r.root))  # one still starting goes first: it serves nobody yet
            chosen += on_node[:count]
        for r in chosen:
            self.replicas.remove(r)
            self.parked.append(r.node)
            if r.task is not None:
                r.task.cancel()
        self._record()
        await asyncio.gather(*(r.run.stop(term_s=stop_s) for r in chosen), return_exceptions=True)
        for r in chosen:
            r.run.close()

    def unpark(self) -> None:
        """The parked replicas start again (:meth:`_keep` places them, on the nodes with the fewest)."""
        self.parked.clear()

    def describe(self) -> str:
        parts = [f"{len(self.roots())} of {self.size} vLLM replicas on Ray serving"]
        if self.parked:
            parts.append(f"{len(self.parked)} stopped for training on node(s) "
                         f"{', '.join(sorted({n.short for n in self.parked}))}")
        parts += [f"{r.submission_id} on node {r.node.short}: {r.root or r.run.status.lower()}"
                  for r in self.replicas]
        if self.replaced:
            parts.append(f"{self.replaced} replaced")
        if self.error:
            parts.append(f"last problem: {self.error}")
        return ", ".join(parts)

    async def load_adapter(self, name: str, path: str) -> str:
        """On every serving replica now, and on each one started later."""
        ready = [r for r in self.replicas if r.root]
        if not ready:
            raise RuntimeError("no vLLM replica serves yet; load the adapter once `ftctl status` shows one")
        await asyncio.gather(*(self._load(r.root, name, path) for r in ready))
        self.adapters[name] = path
        return f"adapter {name} loaded on {len(ready)} replica(s) from {path}"

    async def unload_adapter(self, name: str) -> str:
        if name not in self.adapters:
            raise RuntimeError(f"adapter {name} is not loaded; `ftctl engine adapters` lists what is")
        del self.adapters[name]
        ready = [r.root for r in self.replicas if r.root]
        results = await asyncio.gather(*(self._post(root, "/v1/unload_lora_adapter", {"lora_name": name})
                                         for root in ready), return_exceptions=True)
        failed = [root for root, res in zip(ready, results, strict=True) if isinstance(res, BaseException)]
        return f"adapter {name} unloaded" + (f" (not from {', '.join(failed)}: unreachable)" if failed else "")

    # keeping N replicas ----------------------------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(30.0))
        return self._http

    async def _post(self, root: str, path: str, body: dict[str, str]) -> None:
        resp = await self._client().post(root + path, json=body, headers={"Authorization": f"Bearer {self.api_key}"})
        if resp.status_code >= 400:
            raise RuntimeError(f"{root}{path}: HTTP {resp.status_code}: {resp.text[:200]}")

    async def _load(self, root: str, name: str, path: str) -> None:
        await self._post(root, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    async def _keep(self) -> None:
        while True:
            for r in [r for r in self.replicas if not r.run.alive()]:
                self.replicas.remove(r)
                r.run.close()
                if r.task is not None:
                    r.task.cancel()
                self.replaced += 1
                served = bool(r.root)
                self._fails = 0 if served else self._fails + 1
                self.error = f"replica {r.submission_id} on node {r.node.short} ended ({r.run.status}" + (
                    f", exit {r.run.exit_code}" if r.run.exit_code is not None else "") + f"; {r.run.message[:120]})"
                log.warning("vLLM %s; starting another", self.error)
            missing = self.size - len(self.replicas) - len(self.parked)
            if missing > 0:
                if self._fails:  # replicas that never served: something is wrong with them, not a node
                    await asyncio.sleep(min(60.0, 2.0 ** self._fails))
                try:
                    nodes = await asyncio.to_thread(list_ray_nodes, self.address)
                except Exception as exc:  # the head restarting: ask again
                    self.error = f"the Ray cluster does not answer ({type(exc).__name__})"
                    await asyncio.sleep(2.0)
                    continue
                for _ in range(missing):
                    node = self._choose(nodes)
                    if node is None:
                        self.error = f"no alive Ray node has {self.cfg.gpus} GPU(s) for a vLLM replica"
                        break
                    await self._submit(node)
            await asyncio.sleep(0.5)

    def _choose(self, nodes: list[RayNode]) -> RayNode | None:
        """The alive node with enough GPUs and the fewest of our replicas (worker nodes before the head)."""
        count = {n.node_id: 0 for n in nodes}
        for r in self.replicas:
            count[r.node.node_id] = count.get(r.node.node_id, 0) + 1
        fit = [n for n in nodes if n.alive and n.gpus >= self.cfg.gpus]
        return min(fit, key=lambda n: (count[n.node_id], n.head, n.node_id)) if fit else None

    async def _submit(self, node: RayNode) -> None:
        self._seq += 1
        sid = f"ftmllm-vllm-{self._tag}-{self._seq}"
        argv = replica_argv(self.cfg)
        command = shlex.join([python_beside(self.cfg.executable), "-c", REPLICA_WRAPPER, node.ip, *argv])
        try:
            run = await RayRun.submit(self.client, submission_id=sid, command=command, gpus=self.cfg.gpus,
                                      env=replica_env(self.cfg, self.api_key), log_path=self.dir / f"{sid}.log",
                                      node_id=node.node_id)
        except Exception as exc:
            self.error = f"Ray refused replica {sid}: {type(exc).__name__}: {str(exc)[:200]}"
            log.error("vLLM replicas: %s", self.error)
            self._fails += 1
            return
        replica = Replica(submission_id=sid, node=node, run=run)
        replica.task = asyncio.get_running_loop().create_task(self._until_serving(replica), name=f"replica-{sid}")
        self.replicas.append(replica)
        self._record()
        log.info("vLLM replica %s submitted to node %s (%s)", sid, node.short, node.ip)

    async def _until_serving(self, r: Replica) -> None:
        deadline = time.monotonic() + self.cfg.start_timeout_s
        url = ""
        while r.run.alive() and time.monotonic() < deadline:
            if not url:
                url = _listening(r.run.log_path)
            if url:
                with contextlib.suppress(httpx.HTTPError):
                    if (await self._client().get(url + "/health", timeout=5.0)).status_code == 200:
                        break
            await asyncio.sleep(HEALTH_POLL_S)
        else:
            if r.run.alive():  # never became healthy: end it, _keep starts another
                self.error = f"replica {r.submission_id} not healthy after {self.cfg.start_timeout_s:.0f}s"
                await self._end(r)
            return
        try:
            for name, path in list(self.adapters.items()):
                await self._load(url, name, path)
        except (httpx.HTTPError, RuntimeError) as exc:
            self.error = f"replica {r.submission_id} could not load the adapters: {exc}"
            await self._end(r)
            return
        r.root = url
        self._fails = 0
        log.info("vLLM replica %s serves at %s after %.0fs", r.submission_id, url, time.monotonic() - r.started_at)

    async def _end(self, r: Replica) -> None:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.client.stop_job, r.submission_id)

    def _record(self) -> None:
        (self.dir / RECORD).write_text(json.dumps([r.submission_id for r in self.replicas]))

    async def _stop_leftovers(self) -> None:
        """Replicas a daemon that died left running on the cluster."""
        try:
            sids = json.loads((self.dir / RECORD).read_text())
        except (OSError, ValueError):
            return
        for sid in sids:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.client.stop_job, sid)
        (self.dir / RECORD).unlink(missing_ok=True)


def _listening(log_path: Path) -> str:
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        if line.startswith(LISTENING):
            return line[len(LISTENING):].strip()
    return ""
