"""The OCR engine on Ray (``vllm.replicas = 2``) on a real two-node Ray cluster (tests/cluster/ray_cluster.py):
a real ftmllmd submits two real `vllm serve` replicas (vLLM's CPU build, the tiny Qwen2-VL) as Ray jobs, one
per node; a 12-page PDF is served by both; one replica's vLLM is killed mid-job: no page is lost, none is
converted twice, the replica is replaced, and a runtime LoRA load reaches every replica, the new one too."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from shared.protocol import EngineCommand, EngineReply, Event, PageChanged
from tests.cluster.ray_cluster import WORKER_IP, RayTestCluster
from tests.daemon_proc import ROOT, DaemonProc, wait_for
from tests.engines import stack
from tests.fixtures import pdfs
from tests.ocr.submit import fetch, submit_ocr
from tests.vllm.conftest import JobTrace, VllmDaemon, follow, toml_value, wait_engine

pytestmark = pytest.mark.vllm

STOPS = ["ure", "7", "%", "'"]  # the tiny model's greedy loops end its answers (tests/vllm/test_vllm_engine.py)
SERVE_DEADLINE_S = 400.0
REPLICA_RE = re.compile(r"(ftmllm-vllm-\w+-\d+) on node (\w+): (http://[\d.]+:\d+)")


def replica_sections(home: Path, cluster: RayTestCluster, **overrides: object) -> dict[str, dict[str, object]]:
    """The config sections of a daemon whose OCR engine is ``vllm.replicas = 2`` on ``cluster`` (the tiny model,
    CPU flags)."""
    env = {k: v for k, v in stack.vllm_env(home / "engine", lora=True).items()
           if k.startswith(("VLLM_", "HF_", "TORCHINDUCTOR_", "TRANSFORMERS_", "TOKENIZERS_", "TMPDIR"))}
    vllm: dict[str, object] = {
        "executable": str(stack.vllm_venv() / "bin" / "vllm"), "model": str(stack.tiny_model_cached()),
        "served_name": "tiny", "max_model_len": 2048, "dtype": "bfloat16", "enable_sleep_mode": False,
        "enable_lora": True, "max_lora_rank": 8, "extra_args": ["--enforce-eager", "--skip-mm-profiling"],
        "env": env, "start_timeout_s": SERVE_DEADLINE_S, "max_tokens": 64, "max_in_flight": 2,
        "sampling": {"min_tokens": 24, "stop": STOPS}, "replicas": 2}
    vllm.update(overrides)
    return {"hotfolder": {"enabled": False},
            "ocr": {"engine": "vllm", "workers": 2, "dpi": 50, "page_timeout_s": 300.0},
            "cluster": {"backend": "ray", "address": cluster.address, "shared_dir": str(cluster.root / "shared"),
                        "auth_token_file": str(cluster.token_file)},
            "vllm": vllm}


def replica_config(home: Path, cluster: RayTestCluster, **overrides: object) -> str:
    """:func:`replica_sections` as TOML."""
    lines = []
    for name, values in replica_sections(home, cluster, **overrides).items():
        lines += [f"[{name}]"] + [f"{k} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def fleet(ray_cluster: RayTestCluster) -> Iterator[VllmDaemon]:
    d = DaemonProc()
    d.config = d.home / "ftmllm.toml"
    d.config.write_text(replica_config(d.home, ray_cluster))
    d.start(timeout=60)
    vd = VllmDaemon(proc=d, model=stack.tiny_model_cached())
    try:
        wait_engine(vd, "ready", SERVE_DEADLINE_S)
        yield vd
    finally:
        d.close()


def replicas(vd: VllmDaemon) -> dict[str, str]:
    """Submission id -> URL of each replica serving now, as `ftctl engine status` shows them."""
    message = vd.proc.client(timeout=30).call(EngineCommand(action="status"), EngineReply).message
    return {sid: url for sid, _node, url in REPLICA_RE.findall(message)}


def models_on(cluster: RayTestCluster, sid: str, url: str) -> list[str]:
    """/v1/models of one replica, with the key the daemon gave it (in the Ray job's env, as Ray shows it)."""
    info = cluster.job_client().get_job_info(sid)
    key = info.runtime_env["env_vars"]["VLLM_API_KEY"]
    resp = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert resp.status_code == 200, resp.text
    return [m["id"] for m in resp.json()["data"]]


def vllm_pid(url: str) -> int:
    """The API server of the replica at ``url`` (the top one of the processes with its command line)."""
    port = url.rsplit(":", 1)[1]
    found = set()
    for p in psutil.process_iter(["cmdline"]):
        argv = p.info["cmdline"] or []
        if "serve" in argv and "--port" in argv and argv[argv.index("--port") + 1] == port and "-c" not in argv:
            found.add(p.pid)
    top = [pid for pid in found if psutil.Process(pid).ppid() not in found]
    assert len(top) == 1, f"vllm serve processes for port {port}: {sorted(found)}"
    return top[0]


def test_two_replicas_on_ray_serve_a_pdf_and_one_killed_loses_no_page_and_is_replaced(
        fleet: VllmDaemon, ray_cluster: RayTestCluster) -> None:
    two = wait_for(lambda: (r := replicas(fleet)) and len(r) == 2 and r, SERVE_DEADLINE_S, "2 serving replicas",
                   interval=1.0)
    assert isinstance(two, dict)
    # one per node, each on its node's own address (as Ray knows it); /v1 refuses a client without the key
    hosts = {u.split("//")[1].split(":")[0] for u in two.values()}
    assert len(hosts) == 2 and WORKER_IP in hosts, two
    for url in two.values():  # bound to that address alone, not to every address of the node
        host, port = url.split("//")[1].split(":")
        listening = {(c.laddr.ip, c.laddr.port) for c in psutil.Process(vllm_pid(url)).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN}
        assert (host, int(port)) in listening and ("0.0.0.0", int(port)) not in listening, listening
    assert httpx.get(next(iter(two.values())) + "/v1/models", timeout=30).status_code == 401

    c = fleet.proc.client(timeout=120)
    adapter = stack.build_tiny_lora(fleet.proc.home / "tiny-lora")
    reply = c.call(EngineCommand(action="load", name="tiny-lora", path=str(adapter)), EngineReply, timeout=300)
    assert "loaded on 2 replica(s)" in reply.message, reply.message
    for sid, url in two.items():
        assert "tiny-lora" in models_on(ray_cluster, sid, url)

    work = Path(tempfile.mkdtemp(prefix="ftrr", dir="/tmp"))
    try:
        pdf = pdfs.numbered(work / "twelve.pdf", 12)
        pids = {sid: vllm_pid(url) for sid, url in two.items()}
        killed: list[int] = []
        victims: list[str] = []

        asks = fleet.proc.client(timeout=30)

        def ours(url: str) -> int:
            """The daemon's requests in flight on the replica at ``url`` (`ftctl engine status`: "N ours")."""
            found = re.search(re.escape(url) + r": [^;]*?(\d+) ours",
                              asks.call(EngineCommand(action="status"), EngineReply).message)
            return int(found.group(1)) if found else 0

        def kill_when_a_page_is_done(trace: JobTrace, ev: Event) -> None:
            if not killed and isinstance(ev.body, PageChanged) and ev.body.page.state == "done":
                # a replica with a page of ours in flight: frozen before the daemon is asked, so that the page
                # stays in flight until the kill (vLLM's own gauge lags; CI twice killed an idle replica)
                for sid, url in sorted(two.items()):
                    os.kill(pids[sid], signal.SIGSTOP)
                    if ours(url):
                        victims.append(sid)
                        os.kill(pids[sid], signal.SIGKILL)
                        killed.append(len(trace.pages_done()))
                        return
                    os.kill(pids[sid], signal.SIGCONT)

        trace = follow(c, lambda: submit_ocr(c, pdf).job, 600, on_event=kill_when_a_page_is_done)
        assert killed and killed[0] < 12, "the replica was not killed while pages were still to do"
        victim_sid = victims[0]
        assert trace.job is not None and trace.job.state == "succeeded", f"{trace.job}\n{fleet.proc.log_text()[-4000:]}"
        done = trace.pages_done()
        assert sorted(done) == list(range(1, 13)), f"pages done (with repeats): {sorted(done)}"
        fetch(c, trace.job.id, work / "out")
        md = (work / "out" / "twelve.md").read_text()
        assert [md.count(f"<!-- page {n} -->") for n in range(1, 13)] == [1] * 12
        # pages in flight on the killed replica broke off and were sent to the other one
        assert "a request broke off" in fleet.proc.log_text()

        # the killed replica is replaced by a new Ray job, which gets the adapter loaded before it serves
        def replaced() -> dict[str, str] | None:
            now = replicas(fleet)
            return now if len(now) == 2 and victim_sid not in now else None

        after = wait_for(replaced, SERVE_DEADLINE_S, "a replacement replica serving", interval=1.0)
        assert isinstance(after, dict)
        new_sid = next(s for s in after if s not in two)
        assert "tiny-lora" in models_on(ray_cluster, new_sid, after[new_sid])
        assert ray_cluster.job_client().get_job_info(victim_sid).status == "FAILED"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_replicas_without_a_ray_backend_stop_the_daemon_naming_the_keys(tmp_path: Path) -> None:
    config = tmp_path / "ftmllm.toml"
    config.write_text('[hotfolder]\nenabled = false\n[vllm]\nmodel = "/m"\nreplicas = 2\n')
    r = subprocess.run([sys.executable, "-m", "daemon.main", "--home", str(tmp_path / "home"), "--config",
                        str(config)], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "vllm.replicas = 2 needs a Ray cluster" in r.stderr and '[cluster] backend = "ray"' in r.stderr
