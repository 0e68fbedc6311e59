"""Training through the real daemon: a real ftmllmd subprocess whose [train] llamafactory_cli is the real
LLaMA-Factory (its own venv, tests/engines), the tiny Qwen2-VL and the tiny image dataset built offline.
Shared by tests/train_daemon and bench/train_queue.py."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.client import Client
from shared.protocol import (
    TERMINAL_STATES,
    Event,
    JobChanged,
    JobDetail,
    JobInfo,
    ShowJob,
    TrainPoint,
    TrainPoints,
    TrainPointsReply,
    TrainProgress,
)
from tests.daemon_proc import ROOT, DaemonProc, wait_for
from tests.engines import stack

# What makes the Qwen2-VL templates run on 2 CPU cores in seconds (the rest is the template's own).
CPU_SETS = ("bf16=false", "image_max_pixels=12544", "cutoff_len=512", "preprocessing_num_workers=1",
            "dataloader_num_workers=0", "video_max_pixels=", "trust_remote_code=")
# A real trainer on a loaded 2-core box: imports alone take 15-40 s
RUN_TIMEOUT_S = 900.0


@dataclass
class Box:
    """What every test here shares: the tiny model and dataset (built once), the daemon config."""

    root: Path
    model: Path
    src: Path  # tiny_sft.json, tiny_dpo.json, images/
    cli: Path
    env: dict[str, str]  # [train] env: what the LLaMA-Factory children need on top of the daemon's

    def train_section(self) -> dict[str, Any]:
        # model_roots: the tiny model lives under root, and the daemon trains only from admin-listed folders
        return {"llamafactory_cli": str(self.cli), "env": self.env, "stop_term_s": 10.0,
                "model_roots": [str(self.model)]}

    def config(self, path: Path, **extra: dict[str, Any]) -> Path:
        """A daemon config with [train] set for this box, plus ``extra`` sections."""
        sections: dict[str, dict[str, Any]] = {"train": self.train_section(), "hotfolder": {"enabled": False}}
        for name, values in extra.items():
            sections.setdefault(name, {}).update(values)
        path.write_text("".join(toml_section(name, values) for name, values in sections.items()))
        return path

    def train_sets(self, *more: str) -> list[str]:
        return [f"model_name_or_path={self.model}", *CPU_SETS, *more]


def build_box(root: Path) -> Box:
    """The tiny model and dataset under ``root`` (the model is built once and cached), and the env for [train]."""
    lf_env = stack.llamafactory_env(root / "lf")
    env = {k: v for k, v in lf_env.items() if os.environ.get(k) != v and k != "CUDA_VISIBLE_DEVICES"}
    return Box(root=root, model=stack.build_tiny_model(root / "model"),
               src=stack.build_tiny_dataset(root / "src", records=8), cli=stack.llamafactory_cli(), env=env)


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def toml_section(name: str, values: dict[str, Any]) -> str:
    return f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())


class TrainDaemon(DaemonProc):
    """A real ftmllmd with a training config, and the real ftctl pointed at it."""

    _shared: Client | None = None

    @property
    def c(self) -> Client:
        """One client for the test's requests (a new one after a restart of the daemon is not needed:
        ZeroMQ reconnects by itself)."""
        if self._shared is None:
            self._shared = self.client(timeout=30)
        return self._shared

    def ftctl(self, *args: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "tui.ftctl", "--home", str(self.home)]
        if self.config:
            argv += ["--config", str(self.config)]
        return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def submit_id(self, *args: str) -> int:
        """Run an ftctl submit command (no --wait) and return the job id it prints."""
        r = self.ftctl(*args, timeout=120)
        assert r.returncode == 0, r.stderr
        return int(r.stdout.strip().splitlines()[-1])

    def job(self, job_id: int) -> JobDetail:
        return self.c.call(ShowJob(job_id=job_id), JobDetail)

    def points(self, job_id: int) -> list[TrainPoint]:
        return self.c.call(TrainPoints(job_id=job_id), TrainPointsReply).points

    def wait_job(self, job_id: int, states: frozenset[str] = TERMINAL_STATES,
                 timeout: float = RUN_TIMEOUT_S) -> JobInfo:
        c = self.c
        job = wait_for(lambda: (j := c.call(ShowJob(job_id=job_id), JobDetail).job).state in states and j,
                       timeout, f"job {job_id} to reach {sorted(states)}", interval=0.2)
        assert isinstance(job, JobInfo)
        return job

    def history(self, job_id: int) -> list[str]:
        return [h.what for h in self.job(job_id).history]

    def log_tail(self, job_id: int, chars: int = 4000) -> str:
        path = self.paths.state_dir / "jobs" / str(job_id) / "job.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no job.log)"


def start_daemon(box: Box, name: str, start_timeout: float = 30.0, **extra: dict[str, Any]) -> TrainDaemon:
    home = Path(tempfile.mkdtemp(prefix=f"ft{name}", dir="/tmp"))
    d = TrainDaemon(home=home, config=box.config(home / "ftmllm.toml", **extra))
    return d.start(start_timeout)  # type: ignore[return-value]


def start_with_toml(name: str, toml: str) -> TrainDaemon:
    """A daemon in a fresh home, configured by ``toml`` alone (no tiny model or trainer: what needs none)."""
    home = Path(tempfile.mkdtemp(prefix=f"ft{name}", dir="/tmp"))
    config = home / "ftmllm.toml"
    config.write_text(toml)
    return TrainDaemon(home=home, config=config).start()  # type: ignore[return-value]


@contextlib.contextmanager
def daemon_with_dataset(box: Box, name: str, **extra: dict[str, Any]) -> Iterator[TrainDaemon]:
    """:func:`start_daemon` with the tiny dataset added as ``tiny_sft`` (what a module's jobs train on);
    closed at the end."""
    d = start_daemon(box, name, **extra)
    try:
        r = d.ftctl("dataset", "add", "tiny_sft", str(box.src / "tiny_sft.json"))
        assert r.returncode == 0, r.stderr
        yield d
    finally:
        d.close()


@dataclass
class Recorder:
    """Events of some topics as a subscribed client sees them, with their arrival times."""

    client: Client
    topics: tuple[str, ...]
    events: list[tuple[float, Event]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Recorder:
        stream = self.client.events(self.topics)

        def pump() -> None:
            try:
                for ev in stream:
                    with self._lock:
                        self.events.append((time.time(), ev))
            except Exception:
                pass  # the client closed

        threading.Thread(target=pump, name="recorder", daemon=True).start()
        # the SUB socket connects asynchronously: wait until a heartbeat proves the subscription is live
        wait_for(lambda: self.snapshot(), 30, "the first event (subscription live)")
        return self

    def snapshot(self) -> list[tuple[float, Event]]:
        with self._lock:
            return list(self.events)

    def train_points(self, job_id: int) -> list[tuple[float, TrainPoint]]:
        return [(t, e.body.point) for t, e in self.snapshot()
                if isinstance(e.body, TrainProgress) and e.body.point.job_id == job_id]

    def finished_at(self, job_id: int) -> float | None:
        for t, e in self.snapshot():
            if isinstance(e.body, JobChanged) and e.body.job.id == job_id and e.body.job.state in TERMINAL_STATES:
                return t
        return None

    def wait(self, predicate: Callable[[], object], timeout: float, what: str) -> object:
        return wait_for(predicate, timeout, what, interval=0.05)


def job_id_of(stderr: str) -> int:
    m = re.search(r"job (\d+) queued", stderr)
    assert m, stderr
    return int(m.group(1))
