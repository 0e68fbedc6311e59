"""The supervised ``vllm serve`` child: start, readiness, restart with backoff, stop, sleep/wake, LoRA.

* The child runs in its own process group (``start_new_session``) with its output in
  ``<state>/vllm/vllm.log`` (never a pipe). Stopping it is SIGTERM to the group, then SIGKILL after a grace
  period: vLLM's engine core is a separate process that a signal to the API server alone would orphan,
  with the GPU memory it holds. A pid file lets the next daemon kill a child left by a daemon that was
  killed itself.
* Ready = ``GET /health`` answers 200 within ``start_timeout_s``. While ready, ``/metrics`` is read every
  :data:`POLL_S` seconds: running/waiting requests, KV-cache use and tokens/s go out as engine events, and
  the shared :class:`InFlight` pool follows the server's queue. A child that exits, or stops answering for
  :data:`HUNG_POLLS` polls, is killed (group) and started again after a backoff (1 s, 2 s, 5 s … 60 s);
  :data:`MAX_CRASHES` crashes within ten minutes, or :data:`MAX_START_FAILURES` failed starts in a row,
  leave it ``failed`` with the reason from its log, until ``ftctl engine start``.
* Requests broken by a crash are not lost: :meth:`broken` waits for the restart and the converter sends
  them again (see :mod:`daemon.ocr.vlm`).
* Sleep/wake for the training scheduler: with ``enable_sleep_mode`` ``POST /sleep?level=1`` and
  ``/wake_up`` (vLLM serves these only with ``VLLM_SERVER_DEV_MODE=1``, set for the child); without it,
  stop and start. Either way the engine is then ``parked``: pages wait instead of failing, and a new OCR job
  does not start it behind the scheduler's back.
* LoRA adapters are loaded at runtime (``VLLM_ALLOW_RUNTIME_LORA_UPDATING``, ``/v1/load_lora_adapter``),
  remembered in ``<state>/vllm/adapters.json`` and loaded again after every restart.

States: stopped → starting → ready ⇄ sleeping; ready → restarting → ready; starting/restarting → failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import httpx
import psutil

from daemon.core.atomic import write_atomic
from daemon.core.sdnotify import child_environ
from daemon.engines.vlm.chat_stream import error_message
from daemon.engines.vlm.converter import Target
from daemon.engines.vlm.inflight import InFlight
from daemon.engines.vlm.server_metrics import ServerLoad, parse_load
from daemon.ocr.errors import OcrError
from shared.config import MAX_IPC_PATH, VllmConfig

log = logging.getLogger(__name__)

POLL_S = 2.0
HUNG_POLLS = 15  # 30 s without an answer from a live process: hung
STOP_GRACE_S = 30.0
BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
MAX_START_FAILURES = 3
MAX_CRASHES = 6  # within CRASH_WINDOW_S
CRASH_WINDOW_S = 600.0
LOG_TAIL_BYTES = 64 * 1024

ChangeHook = Callable[[str, bool], None]  # (what happened, durable)
ReadyHook = Callable[[Target], Awaitable[None]]


class EngineCommandError(Exception):
    """A request to the engine that cannot be done; the message says why and what to do."""


class StartFailed(Exception):
    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal  # retrying cannot help (no executable, no model)


def build_command(cfg: VllmConfig, executable: str, port: int, served_name: str, gpus: int) -> list[str]:
    """The argv of ``vllm serve`` for this config."""
    argv = [
        executable, "serve", cfg.model,
        "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", served_name,
        "--max-model-len", str(cfg.max_model_len),
        "--dtype", cfg.dtype,
        "--gpu-memory-utilization", f"{cfg.gpu_memory_utilization:g}",
        # one image per request, no video: what the OCR requests send, and what the budget assumes
        "--limit-mm-per-prompt", '{"image":1,"video":0}',
        # the server resizes every image within these bounds, whatever a client sends
        "--mm-processor-kwargs", json.dumps({"min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels}),
    ]
    if cfg.quantization:
        argv += ["--quantization", cfg.quantization]
    if cfg.enable_lora:
        argv += ["--enable-lora", "--max-lora-rank", str(cfg.max_lora_rank)]
    if cfg.enable_sleep_mode:
        argv += ["--enable-sleep-mode"]
    if gpus > 1 and not any(a in ("-tp", "--tensor-parallel-size") or a.startswith("--tensor-parallel-size=")
                            for a in cfg.extra_args):
        argv += ["--tensor-parallel-size", str(gpus)]
    return argv + list(cfg.extra_args)


# vLLM binds ZeroMQ ipc sockets at <VLLM_RPC_BASE_PATH or TMPDIR>/<uuid4>; past sun_path's 107 bytes the
# engine dies at start with a ZMQError. A deep TMPDIR (a test's tmp_path, a per-user tmp) must not do that.
_VLLM_IPC_NAME_LEN = 1 + 36


def ipc_base_too_long(env: Mapping[str, str]) -> bool:
    """Whether vLLM started with ``env`` would put its ipc sockets past sun_path's limit."""
    if "VLLM_RPC_BASE_PATH" in env:
        return False  # chosen by the user: theirs to get right
    base = env.get("TMPDIR") or env.get("TEMP") or env.get("TMP") or "/tmp"  # tempfile.gettempdir()'s order
    return len(os.fsencode(base.rstrip("/"))) + _VLLM_IPC_NAME_LEN > MAX_IPC_PATH


def give_short_ipc_dir(env: dict[str, str]) -> Path | None:
    """If vLLM's ipc sockets would not fit under ``env``'s TMPDIR, make a short directory for them, point
    ``VLLM_RPC_BASE_PATH`` at it and return it (the caller removes it when vLLM is gone); else None."""
    if not ipc_base_too_long(env):
        return None
    made = Path(tempfile.mkdtemp(prefix="ftvllm-", dir="/tmp"))
    env["VLLM_RPC_BASE_PATH"] = str(made)
    return made


def build_env(cfg: VllmConfig, base: dict[str, str], gpu_indices: list[int]) -> dict[str, str]:
    env = child_environ(base)
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("VLLM_DO_NOT_TRACK", "1")
    if cfg.enable_lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if cfg.enable_sleep_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"  # /sleep and /wake_up are "development" endpoints in vLLM
    if gpu_indices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpu_indices)
    env.update(cfg.env)
    return env


def served_name_of(cfg: VllmConfig) -> str:
    return cfg.served_name or Path(cfg.model.rstrip("/")).name or cfg.model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


_ERROR_LINE = re.compile(r"(Error|error|ERROR|Exception|not supported|No such|out of memory|OOM)")


def log_reason(path: Path) -> str:
    """The line of vLLM's log that best says why it stopped (the last error-looking line), shortened."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        text = line.strip()
        if text and _ERROR_LINE.search(text) and not text.startswith(("File ", "Traceback", "^")):
            return text[-300:]
    return next((ln.strip()[-300:] for ln in reversed(lines) if ln.strip()), "")


class VllmSupervisor:
    def __init__(self, cfg: VllmConfig, workdir: Path, *, limiter: InFlight, gpu_indices: list[int] | None = None,
                 on_change: ChangeHook | None = None, on_ready: ReadyHook | None = None) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.log_path = workdir / "vllm.log"
        self.pid_path = workdir / "vllm.pid.json"
        self.adapters_path = workdir / "adapters.json"
        self.limiter = limiter
        self.gpu_indices = list(gpu_indices or [])
        self.on_change = on_change or (lambda _what, _durable: None)
        self.on_ready = on_ready
        self.served_name = served_name_of(cfg)
        self.state = "stopped"
        self.error = ""
        self.parked = False  # asleep or stopped because the scheduler asked: pages wait, jobs do not start it
        self.generation = 0
        self.port = cfg.port
        self.proc: asyncio.subprocess.Process | None = None
        self.adapters: dict[str, str] = self._read_adapters()
        self.load = ServerLoad()
        self.tokens_per_s = 0.0
        self.pages_per_s = 0.0
        self.pages_done = 0
        self.restarts = 0
        self._task: asyncio.Task[None] | None = None
        self._changed: asyncio.Event | None = None
        self._http: httpx.AsyncClient | None = None
        self._last_poll: tuple[float, float, int] | None = None  # (time, generation tokens, pages)
        self._lock: asyncio.Lock | None = None  # serialises start/stop/sleep/wake
        self._ipc_dir: Path | None = None  # made for vLLM's sockets when TMPDIR is too deep; goes with the child

    # ------------------------------------------------------------------------------------ helpers

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(10.0))
        return self._http

    def _mutex(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _set_state(self, state: str, what: str) -> None:
        self.state = state
        if state == "ready":
            self.error = ""
        log.info("vllm engine %s: %s", state, what)
        ev = self._event()
        ev.set()
        self._changed = asyncio.Event()
        self.on_change(what, True)

    async def _state_changed(self, timeout: float | None = None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event().wait(), timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running and self.proc is not None else None

    def describe(self) -> str:
        """One paragraph for `ftctl engine status`."""
        parts = [f"vLLM {self.state}: {self.served_name} ({self.cfg.model})"]
        if self.state in ("ready", "sleeping"):
            parts.append(f"at {self.root}, pid {self.pid}")
        if self.parked:
            parts.append("parked by the scheduler (pages wait until it wakes)")
        if self.adapters:
            parts.append("adapters: " + ", ".join(f"{k} ({v})" for k, v in sorted(self.adapters.items())))
        if self.error:
            parts.append(f"last problem: {self.error}")
        parts.append(f"log: {self.log_path}")
        return "; ".join(parts)

    # ------------------------------------------------------------------------------ public control

    async def start(self) -> str:
        """Start the child (and keep it running) unless it already runs; returns at once."""
        async with self._mutex():
            if self._task is not None and not self._task.done():
                if self.state == "sleeping":
                    return await self._wake_locked()
                self.parked = False
                return f"vLLM is already {self.state}"
            await self._launch_supervisor()
            return f"vLLM is starting ({self.served_name}); log: {self.log_path}"

    async def _launch_supervisor(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self._reap_orphan)
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name="vllm-supervisor")
        # Unparked only now, with no await since the task exists: a page asking for the server while the
        # orphan check ran would have seen "stopped, not parked, no supervisor" and failed instead of waiting.
        self.parked = False

    async def stop(self, what: str = "stopped", parked: bool = False) -> str:
        async with self._mutex():
            return await self._stop_locked(what, parked)

    async def _stop_locked(self, what: str, parked: bool) -> str:
        self.parked = parked
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        was = self.running
        await self._terminate()
        self.load = ServerLoad()
        self.tokens_per_s = self.pages_per_s = 0.0
        if self.state != "stopped" or was:
            self._set_state("stopped", what)
        return what

    async def close(self) -> None:
        await self.stop("stopped with the daemon")
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def sleep(self) -> str:
        """Free the GPU for training: /sleep?level=1 with sleep mode, else stop. Pages wait meanwhile."""
        async with self._mutex():
            if self.state == "sleeping":
                return "vLLM is already asleep"
            if self.state in ("stopped", "failed") and not self.running:
                self.parked = True
                return f"vLLM is {self.state}; it stays so until woken"
            if self.cfg.enable_sleep_mode and self.state == "ready":
                self.parked = True
                self._set_state("sleeping", "going to sleep to free the GPU (level 1: weights to CPU RAM, KV cache "
                                "dropped)")
                try:
                    resp = await self._client().post(f"{self.root}/sleep", params={"level": 1}, timeout=300.0)
                except httpx.HTTPError as exc:
                    return await self._stop_locked(f"stopped: /sleep failed ({exc})", parked=True)
                if resp.status_code != 200:
                    return await self._stop_locked(f"stopped: /sleep answered {resp.status_code} "
                                                   f"({error_message(resp.content)})", parked=True)
                self.on_change("asleep: GPU memory freed", True)
                return "vLLM is asleep (its GPU memory is free); `ftctl engine wake` brings it back"
            return await self._stop_locked("stopped to free the GPU (sleep mode is off: it will start again "
                                           "when woken)", parked=True)

    async def wake(self) -> str:
        async with self._mutex():
            return await self._wake_locked()

    async def _wake_locked(self) -> str:
        if self.state == "sleeping" and self.running:
            self.parked = False  # pages wait while it is "sleeping" whatever this says
            try:
                resp = await self._client().post(f"{self.root}/wake_up", timeout=300.0)
            except httpx.HTTPError as exc:
                raise EngineCommandError(f"vLLM did not wake up ({exc}); `ftctl engine stop` then "
                                         "`ftctl engine start`") from None
            if resp.status_code != 200:
                raise EngineCommandError(f"vLLM did not wake up: {resp.status_code} {error_message(resp.content)}")
            self._set_state("ready", "awake again")
            return "vLLM is awake"
        if self._task is not None and not self._task.done():
            self.parked = False
            return f"vLLM is {self.state}"
        await self._launch_supervisor()
        return "vLLM is starting again"

    async def wait_ready(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state != "ready":
            if self.state == "failed" or (self.state == "stopped" and self._task is None and not self.parked):
                return False
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            await self._state_changed(left)
        return True

    # ------------------------------------------------------------------------------ for the converter

    async def target(self) -> Target:
        while True:
            if self.state == "ready":
                return Target(root=self.root, model=self.served_name, generation=self.generation)
            if self.state == "failed":
                raise OcrError("engine", f"the vLLM engine failed: {self.error}; fix the cause (log: "
                                         f"{self.log_path}), then `ftctl engine start` and `ftctl retry` the job")
            if self.state == "stopped" and not self.parked and self._task is None:
                raise OcrError("engine", "the vLLM engine was stopped; `ftctl engine start`, then `ftctl retry` "
                                         "the job")
            await self._state_changed()

    async def broken(self, target: Target, error: str) -> str | None:
        """A stream to ``target`` broke: wait for the crash to be noticed and the restart, then retry."""
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if self.generation != target.generation or self.state != "ready" or not self.running:
                break
            if await self._healthy():
                return None  # the server is fine: a dropped connection; send it again
            await self._state_changed(0.5)  # wake early on a state change, else poll /health again
        try:
            await self.target()
        except OcrError as exc:
            return exc.message
        return None

    def page_done(self, tokens: int) -> None:
        self.pages_done += 1

    # ----------------------------------------------------------------------------------- adapters

    def check_adapter(self, name: str) -> str | None:
        """None if a job may name this adapter, else why not and what to do."""
        if not self.cfg.enable_lora:
            return (f"adapter '{name}': the vLLM engine runs without LoRA; set vllm.enable_lora = true and "
                    "restart the daemon")
        if name not in self.adapters:
            loaded = ", ".join(sorted(self.adapters)) or "none"
            return (f"adapter '{name}' is not loaded in the vLLM engine (loaded: {loaded}); load it first with "
                    f"`ftctl engine load {name} /path/to/adapter`")
        return None

    async def load_adapter(self, name: str, path: str) -> str:
        if not self.cfg.enable_lora:
            raise EngineCommandError("the vLLM engine runs without LoRA; set vllm.enable_lora = true and restart "
                                     "the daemon")
        if not name or any(c.isspace() for c in name) or name == self.served_name:
            raise EngineCommandError(f"'{name}' cannot name an adapter: give a name without spaces that is not "
                                     f"the base model's ({self.served_name})")
        adapter_dir = Path(path).expanduser()
        if not adapter_dir.is_absolute():
            raise EngineCommandError(f"{path}: give the adapter's absolute path (ftctl does this for you)")
        if not (adapter_dir / "adapter_config.json").is_file():
            raise EngineCommandError(f"{adapter_dir}: no adapter_config.json there; give the directory of a PEFT "
                                     "LoRA adapter (LLaMA-Factory's output_dir or one of its checkpoint-N)")
        async with self._mutex():
            if self.state == "ready":
                if name in self.adapters:
                    await self._post_adapter("unload", {"lora_name": name})
                status, message = await self._post_adapter("load", {"lora_name": name,
                                                                     "lora_path": str(adapter_dir)})
                if status != 200:
                    raise EngineCommandError(f"vLLM could not load adapter '{name}' from {adapter_dir}: "
                                             f"\"{message}\"")
                note = f"adapter {name} loaded from {adapter_dir}"
            else:
                note = f"adapter {name} ({adapter_dir}) will be loaded when vLLM is ready (it is {self.state})"
            self.adapters[name] = str(adapter_dir)
            self._write_adapters()
        self.on_change(note, True)
        return note

    async def unload_adapter(self, name: str) -> str:
        async with self._mutex():
            if name not in self.adapters:
                loaded = ", ".join(sorted(self.adapters)) or "none"
                raise EngineCommandError(f"adapter '{name}' is not loaded (loaded: {loaded})")
            if self.state == "ready":
                status, message = await self._post_adapter("unload", {"lora_name": name})
                if status != 200 and status != 404:
                    raise EngineCommandError(f"vLLM could not unload adapter '{name}': \"{message}\"")
            del self.adapters[name]
            self._write_adapters()
        note = f"adapter {name} unloaded"
        self.on_change(note, True)
        return note

    async def _post_adapter(self, action: str, body: dict[str, str]) -> tuple[int, str]:
        try:
            resp = await self._client().post(f"{self.root}/v1/{action}_lora_adapter", json=body, timeout=120.0)
        except httpx.HTTPError as exc:
            return 0, f"{type(exc).__name__}: {exc}"
        return resp.status_code, error_message(resp.content)

    async def _restore_adapters(self) -> list[str]:
        problems: list[str] = []
        for name, path in list(self.adapters.items()):
            status, message = await self._post_adapter("load", {"lora_name": name, "lora_path": path})
            if status != 200:
                problems.append(f"adapter {name} could not be loaded again from {path}: \"{message}\"")
                del self.adapters[name]
        if problems:
            self._write_adapters()
        return problems

    def _read_adapters(self) -> dict[str, str]:
        try:
            data = json.loads(self.adapters_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _write_adapters(self) -> None:
        write_atomic(self.adapters_path, json.dumps(self.adapters, indent=1, sort_keys=True) + "\n")

    # ------------------------------------------------------------------------------ the child

    async def _supervise(self) -> None:
        try:
            await self._supervise_loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not leave the engine "starting" for ever
            log.exception("vllm supervisor failed")
            await self._terminate()
            self._task = None
            self.error = f"internal error in the daemon's vLLM supervisor: {exc!r}"
            self._set_state("failed", f"{self.error}; see the daemon log and `ftctl engine start`")

    async def _supervise_loop(self) -> None:
        failures = 0
        crashes: list[float] = []
        first = True
        while True:
            self._set_state("starting" if first else "restarting",
                            f"starting vLLM ({self.served_name})" if first else "starting vLLM again")
            t0 = time.monotonic()
            try:
                await self._launch()
            except StartFailed as exc:
                await self._terminate()
                failures += 1
                self.error = str(exc)
                if exc.fatal or failures >= MAX_START_FAILURES:
                    self._task = None
                    self._set_state("failed", f"vLLM did not start: {exc}")
                    return
                delay = BACKOFF_S[min(failures - 1, len(BACKOFF_S) - 1)]
                self._set_state("restarting", f"vLLM did not start ({exc}); trying again in {delay:g}s")
                await asyncio.sleep(delay)
                first = False
                continue
            failures = 0
            self.generation += 1
            problems = await self._restore_adapters()
            if self.on_ready is not None:
                await self.on_ready(Target(root=self.root, model=self.served_name, generation=self.generation))
            self._last_poll = None
            note = "; ".join(problems)
            self._set_state("ready", f"vLLM ready at {self.root} after {time.monotonic() - t0:.0f}s"
                            + (f" ({note})" if note else ""))
            if note:
                self.error = note
            reason = await self._watch()
            was_sleeping = self.state == "sleeping"
            await self._terminate()
            self.load = ServerLoad()
            self.error = f"{reason} ({log_reason(self.log_path) or 'see ' + str(self.log_path)})"
            if was_sleeping:
                # asleep for training: whoever wakes it starts it again
                self._task = None
                self._set_state("stopped", f"{self.error}; it was asleep: it starts again when woken")
                return
            now = time.monotonic()
            crashes = [t for t in crashes if now - t < CRASH_WINDOW_S] + [now]
            self.restarts += 1
            if len(crashes) >= MAX_CRASHES:
                self._task = None
                self._set_state("failed", f"vLLM crashed {len(crashes)} times in {CRASH_WINDOW_S / 60:.0f} min "
                                f"(last: {self.error}); `ftctl engine start` once the cause is fixed")
                return
            delay = BACKOFF_S[min(len(crashes) - 1, len(BACKOFF_S) - 1)]
            self._set_state("restarting", f"{self.error}; restarting in {delay:g}s, pages in flight are sent "
                            "again")
            await asyncio.sleep(delay)
            first = False

    async def _launch(self) -> None:
        exe = shutil.which(self.cfg.executable)
        if exe is None:
            raise StartFailed(f"the vllm executable '{self.cfg.executable}' was not found; set vllm.executable "
                              "to the vllm of its venv (e.g. /opt/vllm/bin/vllm)", fatal=True)
        model = self.cfg.model
        if not model:
            raise StartFailed("no model configured; set vllm.model to a model directory or hub name", fatal=True)
        if model.startswith(("/", "./", "~")) and not Path(model).expanduser().exists():
            raise StartFailed(f"the model directory {model} does not exist; fix vllm.model", fatal=True)
        if not self.port or not port_free(self.port):
            if self.cfg.port and self.port == self.cfg.port:
                log.warning("port %d (vllm.port) is taken; vLLM gets a free port this time", self.cfg.port)
            self.port = free_port()
        argv = build_command(self.cfg, exe, self.port, self.served_name, max(1, len(self.gpu_indices)))
        env = build_env(self.cfg, dict(os.environ), self.gpu_indices)
        self._drop_ipc_dir()
        self._ipc_dir = give_short_ipc_dir(env)
        if self._ipc_dir is not None:
            log.info("vLLM's ipc sockets go to %s: its TMPDIR is too deep for a Unix socket path", self._ipc_dir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as logfh:
            logfh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} ftmllmd starts: {shlex.join(argv)}\n".encode())
            logfh.flush()
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=logfh, stderr=asyncio.subprocess.STDOUT,
                    env=env, cwd=self.workdir, start_new_session=True)
            except OSError as exc:
                raise StartFailed(f"cannot run {exe}: {exc.strerror}", fatal=True) from None
        write_atomic(self.pid_path, json.dumps({"pid": self.proc.pid, "port": self.port, "argv": argv}) + "\n")
        deadline = time.monotonic() + self.cfg.start_timeout_s
        proc = self.proc
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise StartFailed(f"vllm serve ended ({exit_text(proc.returncode)}) before it was ready: "
                                  f"{log_reason(self.log_path) or 'see ' + str(self.log_path)}")
            if await self._healthy(timeout=2.0):
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.5)  # wakes early if it exits, else polls /health again
        raise StartFailed(f"no answer from /health within start_timeout_s = {self.cfg.start_timeout_s:g}s; "
                          f"raise vllm.start_timeout_s if the model is large (log: {self.log_path})")

    async def _healthy(self, timeout: float = 5.0) -> bool:
        try:
            resp = await self._client().get(f"{self.root}/health", timeout=timeout)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    async def _watch(self) -> str:
        """Until the child exits or hangs: poll /metrics. Returns why it ended."""
        proc = self.proc
        assert proc is not None
        waiter = asyncio.ensure_future(proc.wait())
        misses = 0
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=POLL_S)
                if done:
                    return f"vLLM exited ({exit_text(proc.returncode)})"
                if await self._poll():
                    misses = 0
                else:
                    misses += 1
                    if misses >= HUNG_POLLS:
                        return f"vLLM stopped answering for {misses * POLL_S:.0f}s (hung); killed it"
        finally:
            waiter.cancel()

    async def _poll(self) -> bool:
        try:
            resp = await self._client().get(f"{self.root}/metrics", timeout=5.0)
        except httpx.HTTPError:
            return False
        if resp.status_code != 200:
            return False
        load = parse_load(resp.text)
        now = time.monotonic()
        if self._last_poll is not None:
            t, gen, pages = self._last_poll
            dt = max(now - t, 1e-6)
            self.tokens_per_s = max(0.0, (load.generation_tokens - gen) / dt)
            self.pages_per_s = max(0.0, (self.pages_done - pages) / dt)
        self._last_poll = (now, load.generation_tokens, self.pages_done)
        changed = (load.running, load.waiting, round(load.kv_cache_pct, 1)) != (
            self.load.running, self.load.waiting, round(self.load.kv_cache_pct, 1)) or self.tokens_per_s > 0
        self.load = load
        await self.limiter.observe(load.running, load.waiting)
        if changed:
            self.on_change("", False)
        return True

    async def _terminate(self) -> None:
        """SIGTERM the child's process group, SIGKILL after the grace period; kill stragglers of the group."""
        proc, self.proc = self.proc, None
        if proc is None:
            self._drop_ipc_dir()
            return
        pgid = proc.pid  # start_new_session: the child leads its own group
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                log.warning("vllm did not stop within %.0fs of SIGTERM; killing its process group", STOP_GRACE_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)  # whatever is left of the group (an orphaned engine core)
        if proc.returncode is None:
            await proc.wait()
        self.pid_path.unlink(missing_ok=True)
        self._drop_ipc_dir()

    def _drop_ipc_dir(self) -> None:
        """vLLM leaves its ipc socket files behind; the directory made for them goes with the child."""
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
            self._ipc_dir = None

    def _reap_orphan(self) -> None:
        """A vLLM left running by a daemon that was killed holds its GPU memory and port: end it."""
        try:
            info = json.loads(self.pid_path.read_text())
            pid = int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        victims: list[psutil.Process] = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if os.getpgid(p.pid) == pid and "vllm" in " ".join(p.info["cmdline"] or []):
                    victims.append(p)
            except (OSError, psutil.Error):
                continue
        if victims:
            log.warning("ending %d process(es) of a vLLM left by an earlier daemon (group %d)", len(victims), pid)
            for p in victims:
                with contextlib.suppress(psutil.Error):
                    p.terminate()
            _gone, alive = psutil.wait_procs(victims, timeout=STOP_GRACE_S)
            for p in alive:
                with contextlib.suppress(psutil.Error):
                    p.kill()
        self.pid_path.unlink(missing_ok=True)
