"""A real two-node Ray cluster on this machine for the cluster tests and bench/cluster.py: a head and a worker
node, each `ray start --block` with its own ports, declaring 2 logical GPUs (Ray accepts them without
hardware). Kept small for a 2-core box: a tiny object store, no metrics/usage reporting, every listener that
can be on 127.0.0.1 (the dashboard) there. The worker node uses a second loopback address.

Both nodes share one temp dir, as Ray's own multi-node-on-one-machine setup does (it numbers the second
node's sockets): a node's dashboard agent reads a job's log from the temp dir it takes from the head, so a
worker with a temp dir of its own would write its jobs' logs where no one reads them.

Each node is a `ray start --block` process, the parent of that node's Ray processes: stopping it (SIGTERM)
makes it end them; what is left (workers, helpers) is ended by pid, found by descent and, for the cluster,
by the temp dir in the command line. The temp dir is removed."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tests.daemon_proc import wait_for

RAY = str(Path(sys.executable).parent / "ray")
HEAD_IP, WORKER_IP = "127.0.0.1", "127.0.0.2"
GPUS_PER_NODE = 2
CPUS_PER_NODE = 4  # logical: a job's entrypoint takes 1, Ray's job supervisor takes none
OBJECT_STORE_BYTES = 80 * 1024 * 1024  # Ray's minimum is ~75 MiB


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ray_env(token_file: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
                "RAY_enable_metrics_collection": "0",
                # Ray's token authentication: its ports refuse whoever does not send the token
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)})
    return env


@dataclass
class RayNodeProc:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def procs(self) -> dict[int, psutil.Process]:
        """This node's processes still running: the `ray start` process and its descendants (psutil.Process
        checks its start time before a signal: a reused pid is spared)."""
        return _with_descendants(p for p in [_process(self.proc.pid)] if p is not None)

    def raylet_pid(self) -> int:
        for pid, p in self.procs().items():
            with contextlib.suppress(psutil.Error):
                if p.name() == "raylet":
                    return pid
        raise AssertionError(f"no raylet for {self.name}")

    def stop(self) -> None:
        # taken before the stop: a helper whose parent ends is reparented and no longer descends from it
        before = self.procs()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=20)
        _end(list({**before, **self.procs()}.values()))
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _with_descendants(roots: Iterable[psutil.Process]) -> dict[int, psutil.Process]:
    found: dict[int, psutil.Process] = {}
    for p in roots:
        found[p.pid] = p
        with contextlib.suppress(psutil.Error):
            found.update((c.pid, c) for c in p.children(recursive=True))
    return found


def _end(procs: list[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _gone, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


@dataclass
class RayTestCluster:
    root: Path
    gcs_port: int
    dashboard_port: int
    client_port: int  # Ray Client's server on the head (ray://)
    nodes: list[RayNodeProc] = field(default_factory=list)

    @property
    def address(self) -> str:
        """What [cluster] address takes: the dashboard, where Ray Jobs and the state API answer."""
        return f"http://{HEAD_IP}:{self.dashboard_port}"

    @property
    def head(self) -> RayNodeProc:
        return self.nodes[0]

    @property
    def worker(self) -> RayNodeProc:
        return self.nodes[1]

    @property
    def temp_dir(self) -> Path:
        return self.root / "ray"

    @property
    def token_file(self) -> Path:
        """What [cluster] auth_token_file takes."""
        return self.root / "auth_token"

    @property
    def headers(self) -> dict[str, str]:
        """For this process's own Ray clients: the token sent explicitly (Ray's token mode is read from the
        environment at import, which the whole test session shares)."""
        return {"Authorization": f"Bearer {self.token_file.read_text().strip()}"}

    def job_client(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers=self.headers)

    def _start(self, name: str, args: list[str]) -> RayNodeProc:
        temp = self.temp_dir
        temp.mkdir(parents=True, exist_ok=True)
        log = self.root / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [RAY, "start", "--block", "--disable-usage-stats", f"--temp-dir={temp}",
                 f"--num-gpus={GPUS_PER_NODE}", f"--num-cpus={CPUS_PER_NODE}",
                 f"--object-store-memory={OBJECT_STORE_BYTES}",
                 f"--dashboard-agent-listen-port={free_port()}", *args],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=ray_env(self.token_file),
                start_new_session=True)
        node = RayNodeProc(name=name, proc=proc, log=log)
        self.nodes.append(node)
        return node

    def start(self, timeout: float = 120.0) -> RayTestCluster:
        self._start("head", ["--head", f"--node-ip-address={HEAD_IP}", f"--port={self.gcs_port}",
                             "--include-dashboard=true", f"--dashboard-host={HEAD_IP}",
                             f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={self.client_port}"])
        self.wait_nodes(1, timeout)
        self._start("worker", [f"--address={HEAD_IP}:{self.gcs_port}", f"--node-ip-address={WORKER_IP}"])
        self.wait_nodes(2, timeout)
        return self

    def alive_nodes(self) -> list[dict[str, object]]:
        from ray.util.state.api import StateApiClient
        from ray.util.state.common import ListApiOptions, StateResource

        try:
            nodes = StateApiClient(address=self.address, headers=self.headers).list(
                StateResource.NODES, options=ListApiOptions(timeout=5), raise_on_missing_output=False)
        except Exception:
            return []
        return [{"id": n.node_id, "ip": n.node_ip} for n in nodes if n.state == "ALIVE"]

    def wait_nodes(self, count: int, timeout: float) -> None:
        def ready() -> bool:
            for node in self.nodes:
                if node.proc.poll() is not None:
                    raise AssertionError(f"ray start ({node.name}) exited: {node.log.read_text()[-3000:]}")
            return len(self.alive_nodes()) == count
        wait_for(ready, timeout, f"{count} alive Ray nodes", interval=0.5)

    def node_id(self, ip: str) -> str:
        return next(str(n["id"]) for n in self.alive_nodes() if n["ip"] == ip)

    def stop(self) -> None:
        # what names the temp dir and its descendants, taken before the nodes stop (see RayNodeProc.stop)
        named = []
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any(str(self.temp_dir) in a for a in (p.info["cmdline"] or [])):
                    named.append(p)
        stray = _with_descendants(named)
        for node in reversed(self.nodes):
            node.stop()
        _end(list(stray.values()))
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster() -> RayTestCluster:
    root = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    cluster = RayTestCluster(root=root, gcs_port=free_port(), dashboard_port=free_port(), client_port=free_port())
    cluster.token_file.write_text(secrets.token_hex(32))
    cluster.token_file.chmod(0o600)
    try:
        return cluster.start()
    except BaseException:
        cluster.stop()
        raise


if __name__ == "__main__":  # a manual look: start it, print the nodes, stop it
    t0 = time.monotonic()
    c = start_cluster()
    print(f"up in {time.monotonic() - t0:.1f}s at {c.address}: {c.alive_nodes()}")
    c.stop()
