"""The Prometheus endpoint: a real daemon scraped over its Unix socket and over loopback TCP, parsed with
prometheus_client's parser and checked by `promtool check metrics`; the collector on a real store."""

from __future__ import annotations

import json
import re
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from daemon.core.store import Store
from daemon.metrics.collect import DaemonCollector
from daemon.metrics.server import MAX_CONNECTIONS
from daemon.part import Part, Shown
from shared.protocol import EngineInfo, GpuInfo, GpuProcess, JobDetail, Submit, TrainPoint
from tests.daemon_proc import ROOT, DaemonProc, run_job, wait_for
from tests.fixtures.pdfs import numbered

SNAPSHOT = ROOT / "tests" / "fixtures" / "nvml" / "box8_foreign.json"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def http_get(path: str | None, port: int | None = None, target: str = "/metrics") -> tuple[int, str]:
    """One HTTP/1.0 request over the Unix socket ``path`` or 127.0.0.1:``port``: (status, body)."""
    family = socket.AF_UNIX if path else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path if path else ("127.0.0.1", port))
        s.sendall(f"GET {target} HTTP/1.0\r\nHost: ftmllm\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def samples(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    # not a skip: CI installs it (Debian package `prometheus`), and a missing one must be seen
    assert promtool, "promtool is missing: install the Debian package `prometheus` (apt-get install prometheus)"
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr


def start(extra: str = "") -> DaemonProc:
    d = DaemonProc()
    cfg = d.home / "ftmllm.toml"
    cfg.write_text(f'[scheduler]\ngpu_snapshot_file = "{SNAPSHOT}"\n[hotfolder]\nsettle_s = 0.3\n'
                   f'[ocr]\nmarkdown_mode = "legacy"\n{extra}')
    d.config = cfg
    d.start()
    # hello is answered once the sockets are bound; the parts (the metrics listener among them) start after
    wait_for(lambda: "ftmllmd: ready in" in d.log_text(), 30, "the daemon's parts to have started")
    return d


@pytest.fixture
def daemon() -> Iterator[DaemonProc]:
    d = start()
    try:
        yield d
    finally:
        d.close()


def test_scrape_of_a_real_daemon_parses_passes_promtool_and_counts_jobs_pages_and_gpus(daemon: DaemonProc) -> None:
    sock = daemon.paths.runtime_dir / "metrics.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o660  # as ctl.sock: the daemon's user and its socket group
    # the runtime dir is the daemon's alone (0700 without a socket group): no other local user gets to it.
    # nobody (65534), with Debian's python3: the venv's interpreter may sit where nobody cannot read
    assert stat.S_IMODE(daemon.paths.runtime_dir.stat().st_mode) == 0o700
    r = subprocess.run(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                        "-c", f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({str(sock)!r})"],
                       capture_output=True, text=True, timeout=30, cwd="/",
                       env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})
    assert r.returncode != 0 and "PermissionError" in r.stderr, r.stderr
    c = daemon.client()
    ok, _ = run_job(c, "selftest", {"steps": 3, "rate": 0})
    failed, _ = run_job(c, "selftest", {"steps": 1, "rate": 0, "fail": True})
    assert (ok.state, failed.state) == ("succeeded", "failed")
    held = c.call(Submit(kind="selftest", spec={"steps": 1, "rate": 0, "hold": True}), JobDetail)
    pdf = numbered(daemon.paths.inbox / "three.pdf", pages=3)
    wait_for(lambda: (daemon.paths.done / "three.pdf").exists(), 60, "the dropped PDF to be converted")
    assert not pdf.exists()

    status, text = http_get(str(sock))
    assert status == 200
    promtool_check(text)
    found = samples(text)
    me = ok.owner
    assert value(found, "ftmllm_jobs_ended_total", kind="selftest", owner=me, state="succeeded") == 1
    assert value(found, "ftmllm_jobs_ended_total", kind="selftest", owner=me, state="failed") == 1
    assert value(found, "ftmllm_jobs_ended_total", kind="ocr", owner=me, state="succeeded") == 1
    assert value(found, "ftmllm_jobs", state="running", kind="selftest", owner=me) == 1  # the held one
    assert value(found, "ftmllm_jobs_stored", state="succeeded") == 2 and value(found, "ftmllm_jobs_stored",
                                                                                  state="failed") == 1
    assert value(found, "ftmllm_job_run_seconds_count", kind="selftest", state="succeeded") == 1
    assert value(found, "ftmllm_job_queue_wait_seconds_count", kind="selftest") == 3
    # every page of the PDF, by the method that converted it, with its time
    methods = {dict(k[1])["method"]: v for k, v in found.items() if k[0] == "ftmllm_pages_total"}
    assert sum(methods.values()) == 3, methods
    method = next(iter(methods))
    assert value(found, "ftmllm_page_seconds_count", method=method) == 3
    assert value(found, "ftmllm_page_seconds_bucket", method=method, le="+Inf") == 3
    assert value(found, "ftmllm_engine_state", kind="cpu", state="ready") == 1
    assert value(found, "ftmllm_hotfolder_inbox_files") == 0
    # the recorded 8-GPU box: GPU 2 is busy with someone else's process
    assert value(found, "ftmllm_gpu_memory_used_bytes", gpu="2") == pytest.approx(31234 * 1024 * 1024, rel=0.01)
    assert value(found, "ftmllm_gpu_foreign_memory_bytes", gpu="2") > 30e9
    assert value(found, "ftmllm_gpu_utilization_ratio", gpu="2") == pytest.approx(0.97)
    # a file waiting in the inbox (it never settles into a PDF) is the hot folder's backlog
    (daemon.paths.inbox / "half.pdf").write_bytes(b"%PDF-1.7 not finished")
    assert value(samples(http_get(str(sock))[1]), "ftmllm_hotfolder_inbox_files") == 1
    assert held.job.owner == me


def test_only_get_metrics_is_served_and_idle_connections_cannot_starve_a_scrape(daemon: DaemonProc) -> None:
    sock = str(daemon.paths.runtime_dir / "metrics.sock")
    assert http_get(sock, target="/")[0] == 404
    idle = []
    try:
        for _ in range(MAX_CONNECTIONS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(sock)
            idle.append(s)
        # the idle ones hold every slot: a further scrape is told so at once instead of queueing behind them
        wait_for(lambda: http_get(sock)[0] == 503, 10, "a scrape beyond the limit to be refused")
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: http_get(sock)[0] == 200, 10, "a scrape to be served once the idle connections went")


def test_loopback_tcp_listener_serves_and_the_socket_goes_when_the_daemon_stops() -> None:
    d = start('[metrics]\nlisten = "127.0.0.1:0"\n')
    try:
        found = wait_for(lambda: re.search(r"metrics: http://127\.0\.0\.1:(\d+)/metrics", d.log_text()), 10,
                         "the metrics port in the log")
        assert isinstance(found, re.Match)
        port = int(found.group(1))
        status, text = http_get(None, port)
        assert status == 200 and "ftmllm_build_info" in text
        assert not (d.paths.runtime_dir / "metrics.sock").exists()
    finally:
        d.close()


def test_empty_listen_turns_the_endpoint_off() -> None:
    d = start('[metrics]\nlisten = ""\n')
    try:
        assert not (d.paths.runtime_dir / "metrics.sock").exists()
        assert "metrics:" not in d.log_text()
    finally:
        d.close()


class _GpuBox(Part):
    """What the GPU allocator shows while a job's trainer holds memory on GPU 3 next to a foreign process."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id

    def shown(self) -> Shown:
        return Shown(gpus=[GpuInfo(index=3, name="H200", mem_total_mib=143771, mem_used_mib=20000, util_pct=50,
                                   processes=[GpuProcess(pid=10, used_mib=12000, job_id=self.job_id),
                                              GpuProcess(pid=11, used_mib=8000)],
                                   job_ids=[self.job_id])])


def test_training_loss_and_the_job_on_each_gpu_come_from_the_store_and_the_parts(tmp_path: Path) -> None:
    store = Store(tmp_path / "ftmllm.sqlite")
    try:
        _, job, _ = store.create_job("train", "alice", "sft", {})
        store.update_job(job.id, "started", state="running", started=job.created + 30)
        store.add_train_points([TrainPoint(job_id=job.id, step=s, total_steps=200, loss=2.0 - s / 10, lr=1e-4)
                                for s in (1, 2, 3)])
        collector = DaemonCollector(store, lambda: [_GpuBox(job.id)], lambda: False)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        found = samples(generate_latest(registry).decode())
        labels = {"job": str(job.id), "owner": "alice"}
        assert value(found, "ftmllm_train_step", **labels) == 3
        assert value(found, "ftmllm_train_steps", **labels) == 200
        assert value(found, "ftmllm_train_loss", **labels) == pytest.approx(1.7)
        assert value(found, "ftmllm_job_queue_wait_seconds_bucket", kind="train", le="60.0") == 1
        assert value(found, "ftmllm_job_queue_wait_seconds_bucket", kind="train", le="15.0") == 0
        assert value(found, "ftmllm_gpu_job_memory_bytes", gpu="3", job=str(job.id), kind="train",
                     owner="alice") == 12000 * 1024 * 1024
        assert value(found, "ftmllm_gpu_foreign_memory_bytes", gpu="3") == 8000 * 1024 * 1024
        # later points replace the earlier ones; the job's end takes its series away and counts it
        store.add_train_points([TrainPoint(job_id=job.id, step=4, total_steps=200, loss=1.5)])
        assert value(samples(generate_latest(registry).decode()), "ftmllm_train_step", **labels) == 4
        _, ended = store.update_job(job.id, "done", state="succeeded", finished=time.time())
        collector.job_ended(ended)
        after = samples(generate_latest(registry).decode())
        assert not [k for k in after if k[0] == "ftmllm_train_step"]
        assert value(after, "ftmllm_jobs_ended_total", kind="train", owner="alice", state="succeeded") == 1
        assert value(after, "ftmllm_job_run_seconds_count", kind="train", state="succeeded") == 1
        promtool_check(generate_latest(registry).decode())
    finally:
        store.close()


class _Engine(Part):
    def shown(self) -> Shown:
        return Shown(engine=EngineInfo(kind="vllm", state="ready"))


def test_the_grafana_dashboard_asks_only_for_metrics_the_daemon_exports(tmp_path: Path) -> None:
    store = Store(tmp_path / "ftmllm.sqlite")
    try:
        collector = DaemonCollector(store, lambda: [_Engine()], lambda: False)
        collector.inbox_files = 0
        exported: set[str] = set()
        for fam in collector.collect():
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}.get(fam.type, ("",))
            exported |= {fam.name + s for s in suffixes}
    finally:
        store.close()
    dashboard = json.loads((ROOT / "configs" / "grafana" / "ftmllm.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\bftmllm_[a-z_]+", e)}
    assert len(dashboard["panels"]) >= 10 and used, dashboard["panels"]
    assert used <= exported, used - exported
    # and each query is PromQL that Prometheus accepts: promtool parses them as recording rules
    rules = tmp_path / "rules.json"  # JSON is YAML
    rules.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": e.replace("$__rate_interval", "5m").replace("$instance", ".*")}
        for i, e in enumerate(exprs)]}]}))
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: install the Debian package `prometheus` (apt-get install prometheus)"
    r = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
