"""A real ftmllmd whose config makes it start a real ``vllm serve`` (vLLM's CPU build, the tiny Qwen2-VL).

vLLM takes 40 s to start on a quiet 2-core machine and up to 150 s under load, so each test module shares one
daemon (and its one vLLM) across its tests, and every wait is a deadline on a condition.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from shared.client import Client
from shared.protocol import (
    TERMINAL_STATES,
    EngineChanged,
    Event,
    JobChanged,
    JobInfo,
    PageChanged,
    Status,
    StatusReply,
    TextDelta,
)
from tests.daemon_proc import DaemonProc
from tests.engines import stack

READY_DEADLINE_S = 400.0
_ENV_PREFIXES = ("VLLM_", "HF_", "TORCHINDUCTOR_", "TRANSFORMERS_", "TOKENIZERS_", "TMPDIR", "PYTHONUNBUFFERED")


def toml_value(value: object) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)  # strings, numbers, booleans and lists of them are valid TOML this way


@dataclass
class VllmDaemon:
    proc: DaemonProc
    model: Path

    # every request goes to the socket; the host name is never resolved
    root = "http://localhost"

    @property
    def uds(self) -> str:
        """vLLM's socket now (a new one with every start of vLLM), from the daemon's record of its child."""
        record = json.loads((self.proc.paths.state_dir / "vllm" / "vllm.pid.json").read_text())
        return str(record["uds"])

    def http_json(self, path: str, body: object | None = None, timeout: float = 60.0) -> tuple[int, Any]:
        """A request straight to vLLM's socket (the test runs as root, which the socket's 0700 directory admits)."""
        return stack.http_json(self.root + path, body, timeout=timeout, uds=self.uds)

    @property
    def vllm_log(self) -> Path:
        return self.proc.paths.state_dir / "vllm" / "vllm.log"

    def logs(self) -> str:
        vllm = self.vllm_log.read_text(errors="replace")[-3000:] if self.vllm_log.exists() else "(no vllm log)"
        return f"--- daemon log ---\n{self.proc.log_text()[-3000:]}\n--- vllm log ---\n{vllm}"

    def vllm_pids(self) -> list[int]:
        """The daemon's `vllm serve` children (the API server; the engine runs inside it here)."""
        assert self.proc.proc is not None
        kids = psutil.Process(self.proc.proc.pid).children(recursive=False)
        return [p.pid for p in kids if "serve" in " ".join(p.cmdline()) and "vllm" in " ".join(p.cmdline())]

    def metrics(self) -> str:
        status, text = self.http_json("/metrics", timeout=10)
        assert status == 200, text
        return str(text)


def finished_total(metrics: str, reason: str) -> float:
    """vllm:request_success_total{finished_reason=reason}, summed over engines."""
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("vllm:request_success_total{") and f'finished_reason="{reason}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def vllm_config(home: Path, hotfolder: dict[str, object] | None = None, **vllm: object) -> str:
    """TOML for a daemon that serves OCR with vLLM on the tiny model (flags and env that work on CPU); its hot
    folder is off unless ``hotfolder`` gives that section's keys."""
    env = {k: v for k, v in stack.vllm_env(home / "engine", lora=True).items() if k.startswith(_ENV_PREFIXES)}
    # Deep on purpose, as a pytest tmp_path on CI is: vLLM's ipc sockets would not fit under it, and the
    # daemon must notice and give them a short directory (test_engine_stop_… checks that it goes with vLLM).
    deep = home / "engine" / ("deep-" + "d" * 60) / "tmp"
    deep.mkdir(parents=True, exist_ok=True)
    env["TMPDIR"] = str(deep)
    section: dict[str, object] = {
        "executable": str(stack.vllm_venv() / "bin" / "vllm"),
        "model": str(stack.tiny_model_cached()),
        "served_name": "tiny",
        "max_model_len": 2048,
        "dtype": "bfloat16",
        "enable_sleep_mode": False,  # "Sleep mode is not supported on current platform" (CPU)
        "enable_lora": True,
        "max_lora_rank": 8,
        "extra_args": ["--enforce-eager", "--skip-mm-profiling"],
        "env": env,
        "start_timeout_s": READY_DEADLINE_S,
        # the hung-engine probe is a real request, counted in vLLM's metrics (test_runaway counts them): an idle
        # engine is probed every 5 min here, not every minute
        "health_timeout_s": 300.0,
    }
    section.update(vllm)
    hot: dict[str, object] = {"enabled": False} if hotfolder is None else hotfolder
    lines = ["[hotfolder]", *(f"{k} = {toml_value(v)}" for k, v in hot.items()),
             "[ocr]", 'engine = "vllm"', "workers = 2", "dpi = 50", "page_timeout_s = 300.0", "[vllm]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in section.items()]
    return "\n".join(lines) + "\n"


def start_vllm_daemon(**vllm: object) -> VllmDaemon:
    """Start ftmllmd with vLLM as its engine and wait (≤ 400 s) until the engine is ready."""
    d = DaemonProc()
    cfg = d.home / "ftmllm.toml"
    cfg.write_text(vllm_config(d.home, None, **vllm))
    d.config = cfg
    d.start(timeout=60)
    vd = VllmDaemon(proc=d, model=stack.tiny_model_cached())
    try:
        wait_engine(vd, "ready", READY_DEADLINE_S)
    except BaseException:
        d.close(remove=False)
        raise
    return vd


def engine_state(vd: VllmDaemon) -> StatusReply:
    c = vd.proc.client(timeout=30)
    return c.call(Status(), StatusReply)


def wait_engine(vd: VllmDaemon, state: str, timeout: float) -> StatusReply:
    deadline = time.monotonic() + timeout
    while True:
        st = engine_state(vd)
        if st.engine.state == state:
            return st
        if st.engine.state == "failed" and state != "failed":
            raise AssertionError(f"the vllm engine failed: {st.engine.error}\n{vd.logs()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"engine still {st.engine.state} after {timeout:.0f}s, wanted {state}\n{vd.logs()}")
        time.sleep(0.5)  # polling a condition with a deadline


@dataclass
class JobTrace:
    """What a subscribed client saw of one job."""

    job: JobInfo | None = None
    events: list[Event] = field(default_factory=list)

    def deltas(self) -> list[TextDelta]:
        return [e.body for e in self.events if isinstance(e.body, TextDelta)]

    def pages_done(self) -> list[int]:
        return [e.body.page.page_no for e in self.events
                if isinstance(e.body, PageChanged) and e.body.page.state == "done"]

    def engine_states(self) -> list[str]:
        return [e.body.engine.state for e in self.events if isinstance(e.body, EngineChanged) and e.durable]


def follow(client: Client, submit: Callable[[], JobInfo], timeout: float,
           on_event: Callable[[JobTrace, Event], None] | None = None) -> JobTrace:
    """Subscribe (job, ocr and engine topics), then submit, then collect events until the job ends."""
    events: Iterator[Event] = client.events(("job.", "ocr.", "engine"))
    next(events)  # the first event (a heartbeat at the latest) proves the subscription is live
    trace = JobTrace()
    job = submit()
    trace.job = job
    deadline = time.monotonic() + timeout
    for ev in events:
        body = ev.body
        mine = (isinstance(body, JobChanged) and body.job.id == job.id) or (
            isinstance(body, (PageChanged, TextDelta)) and getattr(body, "job_id", None) == job.id) or (
            isinstance(body, PageChanged) and body.page.job_id == job.id) or isinstance(body, EngineChanged)
        if mine:
            trace.events.append(ev)
            if on_event is not None:
                on_event(trace, ev)
        if isinstance(body, JobChanged) and body.job.id == job.id:
            trace.job = body.job
            if body.job.state in TERMINAL_STATES:
                return trace
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job.id} not finished after {timeout:.0f}s (state "
                                 f"{trace.job.state if trace.job else '?'})")
    raise AssertionError("the event stream ended")
