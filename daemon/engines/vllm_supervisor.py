"""The supervised ``vllm serve`` child: start, readiness, restart with backoff, stop, sleep/wake, LoRA.

* The child is a :class:`~daemon.children.process.ChildProcess`: its own process group, output in
  ``<state>/vllm/vllm.log`` (never a pipe). Stopping it is SIGTERM to the group, then SIGKILL after
  :data:`STOP_GRACE_S`: vLLM's engine core is a separate process that a signal to the API server alone
  would orphan, with the GPU memory it holds. Its record, ``vllm.pid.json``, lets the next daemon end a
  child left by a daemon that was killed itself (:mod:`daemon.children.record`).
* How it is started (argv, environment, its private directory) is :mod:`daemon.engines.vllm_command`'s. It
  listens on ``<fresh 0700 dir>/vllm.sock`` only, and every request of the daemon goes there; with
  ``vllm.private_network`` (the default) it runs in a network namespace of its own
  (:mod:`daemon.children.private_net`), so the TCP ports its engine opens are reachable from nowhere else. If
  that namespace cannot be made, vLLM does not start, and the error says what to change.
* Ready = ``/health`` answers and then a one-token completion comes back, within ``start_timeout_s``
  (``/health`` alone once said "ready" of an engine that never completed anything again). While ready,
  ``/metrics`` is read every :data:`POLL_S` seconds: running/waiting requests, KV-cache use and tokens/s go
  out as engine events, and the shared :class:`InFlight` pool follows the server's queue. An engine that
  generates tokens is alive; one that has generated none for :func:`probe_every` seconds gets a one-token
  completion, which must come back within ``health_timeout_s`` (probes are real requests, counted in vLLM's
  metrics: none while the engine works anyway). A child that exits, stops answering for :data:`HUNG_POLLS`
  polls, or leaves a probe unanswered while it generates no token at all (hung, not busy), is killed
  (group) and started again after a backoff (1 s, 2 s, 5 s …
  60 s), and the reason is a durable engine event and part of ``ftctl engine status``;
  :data:`MAX_CRASHES` crashes within ten minutes, or :data:`MAX_START_FAILURES` failed starts in a row,
  leave it ``failed`` with the reason from its log, until ``ftctl engine start``.
* Requests broken by a crash are not lost: :meth:`broken` waits for the restart and the converter sends
  them again (see :mod:`daemon.engines.vlm.converter`).
* Sleep/wake for the training scheduler: with ``enable_sleep_mode`` ``POST /sleep?level=1`` and
  ``/wake_up`` (vLLM serves these only with ``VLLM_SERVER_DEV_MODE=1``, set for the child, and only the
  daemon can reach them: see :func:`daemon.engines.vllm_command.build_env`); without it,
  stop and start. Either way the engine is then ``parked``: pages wait instead of failing, and a new OCR job
  does not start it behind the scheduler's back.
* LoRA adapters are loaded at runtime (``VLLM_ALLOW_RUNTIME_LORA_UPDATING``, ``/v1/load_lora_adapter``),
  remembered with their owners in ``<state>/vllm/adapters.json`` and loaded again after every restart. Names
  are namespaced by owner (:func:`adapter_name`): alice's ``invoices`` is served as ``alice/invoices``, an
  admin's bare name is the team's; only an adapter's owner or an admin replaces or unloads it.

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
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import msgspec

from daemon.children.private_net import EXIT_NO_NAMESPACE, launcher_argv
from daemon.children.process import ChildProcess
from daemon.children.record import reap_recorded, write_record
from daemon.core.atomic import write_atomic
from daemon.engines.vllm_command import (
    PRIVATE_DIR_PREFIX,
    SOCKET_NAME,
    build_command,
    build_env,
    exit_text,
    launcher_complaint,
    log_reason,
    make_private_dir,
    served_name_of,
)
from daemon.engines.vlm.chat_stream import error_message
from daemon.engines.vlm.converter import Target
from daemon.engines.vlm.http_clients import UDS_ROOT, HttpClients, transport
from daemon.engines.vlm.inflight import InFlight
from daemon.engines.vlm.server_metrics import ServerLoad, parse_load
from daemon.ocr.errors import OcrError
from shared.config import VllmConfig

log = logging.getLogger(__name__)

POLL_S = 2.0
HUNG_POLLS = 15  # 30 s without an answer from a live process: hung
STOP_GRACE_S = 30.0
BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
MAX_START_FAILURES = 3
MAX_CRASHES = 6  # within CRASH_WINDOW_S
CRASH_WINDOW_S = 600.0


def probe_every(health_timeout_s: float) -> float:
    """Seconds between two probes of an engine that generates nothing: a hung one is found within about twice
    its timeout."""
    return max(POLL_S, health_timeout_s)


ChangeHook = Callable[[str, bool], None]  # (what happened, durable)
ReadyHook = Callable[[Target], Awaitable[None]]


class EngineCommandError(Exception):
    """A request to the engine that cannot be done; the message says why and what to do."""


class AdapterRefused(EngineCommandError):
    """The adapter (or the name asked for) is another member's: the protocol's ``forbidden``."""


# an adapter's own name, and a user name before it ("alice/invoices")
ADAPTER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}\$?")


def adapter_name(asked: str, user: str, admin: bool) -> str:
    """The name vLLM serves an adapter under when ``user`` loads it as ``asked``. A member's go under her own
    name (``invoices`` → ``alice/invoices``), so no member can take or replace another's; an admin's bare name
    is the team's (``invoices``), and an admin may load into a member's namespace (the adapter is hers then).
    Raises :class:`AdapterRefused` for a member naming another's namespace."""
    ns, slash, base = asked.rpartition("/")
    if not ADAPTER_NAME_RE.fullmatch(base) or (slash and not _USER_RE.fullmatch(ns)):
        raise EngineCommandError(f"'{asked}' cannot name an adapter: use letters, digits, '_', '-' and '.' (at most "
                                 "64, starting with a letter or digit), optionally after a user name and '/'")
    if not slash:
        return asked if admin else f"{user}/{asked}"
    if ns != user and not admin:
        raise AdapterRefused(f"{user} cannot load an adapter as '{asked}': names under '{ns}/' are {ns}'s; load it "
                             f"as '{base}' (served as {user}/{base})")
    return asked


def owner_of_name(name: str, loader: str) -> str:
    """Whose an adapter loaded as ``name`` by ``loader`` is: the namespace's user, else the loader's."""
    ns, slash, _base = name.rpartition("/")
    return ns if slash else loader


class StartFailed(Exception):
    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal  # retrying cannot help (no executable, no model)


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
        # asleep or stopped because the scheduler asked: pages wait, jobs do not start it. The one record of it:
        # the allocator reads it through the engine's view.
        self.parked = False
        self.generation = 0
        self.uds: Path | None = None  # the running child's socket, in self._private_dir
        self.proc: ChildProcess | None = None
        # served name -> directory, and served name -> the user it belongs to ("" = loaded before owners were
        # recorded: an admin's to unload)
        self.adapters: dict[str, str] = {}
        self.adapter_owners: dict[str, str] = {}
        self._read_adapters()
        self.load = ServerLoad()
        self.tokens_per_s = 0.0
        self.pages_per_s = 0.0
        self.pages_done = 0
        self.restarts = 0
        self.last_restart = ""  # why and when it was last restarted, for `ftctl engine status`
        self._task: asyncio.Task[None] | None = None
        self._changed: asyncio.Event | None = None
        self._clients = HttpClients(lambda uds: httpx.AsyncClient(timeout=httpx.Timeout(10.0),
                                                                   transport=transport(uds)))
        self._last_poll: tuple[float, float, int] | None = None  # (time, generation tokens, pages)
        self._lock: asyncio.Lock | None = None  # serialises start/stop/sleep/wake
        self._private_dir: Path | None = None  # vLLM's sockets; made for each child, goes with it
        self._network_said = False  # the choice of network is logged once

    # ------------------------------------------------------------------------------------ helpers

    @property
    def root(self) -> str:
        """The base URL of every request; they all go to :attr:`uds`, the host name is never resolved."""
        return UDS_ROOT

    @property
    def socket_path(self) -> str:
        """Where requests go: the child's socket, or with no child a path in the daemon's own workdir that never
        exists. Never "" (that would be TCP to localhost:80, whoever listens there), never a removed private
        directory (someone else could make it again)."""
        return str(self.uds or self.workdir / "no-vllm-running.sock")

    def _client(self) -> httpx.AsyncClient:
        return self._clients.get(self.socket_path)

    def target_now(self) -> Target:
        return Target(root=self.root, model=self.served_name, generation=self.generation, uds=self.socket_path)

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
            net = "private network" if self.cfg.private_network else "host network (vllm.private_network = false)"
            parts.append(f"on {self.uds}, pid {self.pid}, {net}")
        if self.parked:
            parts.append("parked by the scheduler (pages wait until it wakes)")
        if self.adapters:
            parts.append("adapters: " + self.adapter_list())
        if self.error:
            parts.append(f"last problem: {self.error}")
        if self.restarts:
            parts.append(f"restarted {self.restarts} time{'s' if self.restarts > 1 else ''} (last: "
                         f"{self.last_restart})")
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

    async def serve(self, model: Path) -> None:
        """Serve another model (a merged export) under the same served name: the server restarts."""
        self.cfg = msgspec.structs.replace(self.cfg, model=str(model), served_name=self.served_name)
        await self.stop(f"restarting to serve {model} instead of the previous model")
        await self.start()

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
        await self._clients.aclose()

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

    # ------------------------------------------------------------------------------ for the converter

    async def target(self) -> Target:
        while True:
            if self.state == "ready":
                return self.target_now()
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

    def resolve_adapter(self, asked: str, user: str) -> str:
        """The served name a page or question naming ``asked`` means: a full name as it is; a bare one the
        user's own (``user/asked``) if loaded, else the team's."""
        own = f"{user}/{asked}"
        return own if user and "/" not in asked and own in self.adapters else asked

    def adapter_list(self) -> str:
        """Every adapter with its owner and directory, for `ftctl engine adapters` and status."""
        return ", ".join(f"{name} ({self.adapter_owners.get(name) or 'owner not recorded'}: {path})"
                         for name, path in sorted(self.adapters.items()))

    def check_adapter(self, name: str, user: str = "") -> str | None:
        """None if a job of ``user`` may name this adapter (see :meth:`resolve_adapter`), else why not and what
        to do."""
        if not self.cfg.enable_lora:
            return (f"adapter '{name}': the vLLM engine runs without LoRA; set vllm.enable_lora = true and "
                    "restart the daemon")
        if self.resolve_adapter(name, user) not in self.adapters:
            loaded = ", ".join(sorted(self.adapters)) or "none"
            return (f"adapter '{name}' is not loaded in the vLLM engine (loaded: {loaded}); load it first with "
                    f"`ftctl engine load {name} /path/to/adapter`")
        return None

    async def load_adapter(self, asked: str, path: str, *, user: str, admin: bool) -> str:
        """Load (or replace) the adapter in ``path`` as ``user`` asks: under :func:`adapter_name`, hers. Who may
        read ``path`` is the caller's to check (daemon/engines/control.py, daemon/train/requests.py)."""
        if not self.cfg.enable_lora:
            raise EngineCommandError("the vLLM engine runs without LoRA; set vllm.enable_lora = true and restart "
                                     "the daemon")
        name = adapter_name(asked, user, admin)
        if name == self.served_name:
            raise EngineCommandError(f"'{name}' cannot name an adapter: it is the base model's name")
        owner = owner_of_name(name, user)
        adapter_dir = Path(path).expanduser()
        if not adapter_dir.is_absolute():
            raise EngineCommandError(f"{path}: give the adapter's absolute path (ftctl does this for you)")
        if not (adapter_dir / "adapter_config.json").is_file():
            raise EngineCommandError(f"{adapter_dir}: no adapter_config.json there; give the directory of a PEFT "
                                     "LoRA adapter (LLaMA-Factory's output_dir or one of its checkpoint-N)")
        async with self._mutex():
            if name in self.adapters:
                self._check_owner(name, user, admin, "replace")
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
            self.adapter_owners[name] = owner
            self._write_adapters()
        self.on_change(note, True)
        return note

    async def unload_adapter(self, asked: str, *, user: str, admin: bool) -> str:
        name = self.resolve_adapter(asked, user)
        async with self._mutex():
            if name not in self.adapters:
                loaded = ", ".join(sorted(self.adapters)) or "none"
                raise EngineCommandError(f"adapter '{asked}' is not loaded (loaded: {loaded})")
            self._check_owner(name, user, admin, "unload")
            if self.state == "ready":
                status, message = await self._post_adapter("unload", {"lora_name": name})
                if status != 200 and status != 404:
                    raise EngineCommandError(f"vLLM could not unload adapter '{name}': \"{message}\"")
            del self.adapters[name]
            self.adapter_owners.pop(name, None)
            self._write_adapters()
        note = f"adapter {name} unloaded"
        self.on_change(note, True)
        return note

    def _check_owner(self, name: str, user: str, admin: bool, verb: str) -> None:
        owner = self.adapter_owners.get(name, "")
        if admin or (owner and owner == user):
            return
        whose = f"it is {owner}'s; ask {owner} or an admin" if owner else \
            "it was loaded before owners were recorded; ask an admin"
        raise AdapterRefused(f"{user} cannot {verb} adapter '{name}': {whose}"
                             + ("; load yours under another name" if verb == "replace" else ""))

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
                self.adapter_owners.pop(name, None)
        if problems:
            self._write_adapters()
        return problems

    def _read_adapters(self) -> None:
        """The registry: ``{name: {"path", "owner"}}`` (a daemon before owners wrote ``{name: path}``)."""
        try:
            data = json.loads(self.adapters_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if not isinstance(data, dict):
            return
        for name, entry in data.items():
            if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                self.adapters[str(name)] = entry["path"]
                self.adapter_owners[str(name)] = str(entry.get("owner") or "")
            elif isinstance(entry, str):
                self.adapters[str(name)] = entry
                self.adapter_owners[str(name)] = ""

    def _write_adapters(self) -> None:
        registry = {name: {"path": path, "owner": self.adapter_owners.get(name, "")}
                    for name, path in self.adapters.items()}
        write_atomic(self.adapters_path, json.dumps(registry, indent=1, sort_keys=True) + "\n")

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
                await self.on_ready(self.target_now())
            self._last_poll = None
            note = "; ".join(problems)
            self._set_state("ready", f"vLLM ready on {self.uds} after {time.monotonic() - t0:.0f}s"
                            + (f" ({note})" if note else ""))
            if note:
                self.error = note
            reason = await self._watch()
            # read before the rest of the group is stopped: its shutdown lines would bury the cause
            self.error = f"{reason} ({log_reason(self.log_path) or 'see ' + str(self.log_path)})"
            self.load = ServerLoad()
            if self.state == "sleeping":
                # asleep for training: whoever wakes it starts it again
                await self._terminate()
                self._task = None
                self._set_state("stopped", f"{self.error}; it was asleep: it starts again when woken")
                return
            now = time.monotonic()
            crashes = [t for t in crashes if now - t < CRASH_WINDOW_S] + [now]
            self.restarts += 1
            self.last_restart = f"{time.strftime('%H:%M:%S')}: {reason}"
            if len(crashes) >= MAX_CRASHES:
                await self._terminate()
                self._task = None
                self._set_state("failed", f"vLLM crashed {len(crashes)} times in {CRASH_WINDOW_S / 60:.0f} min "
                                f"(last: {self.error}); `ftctl engine start` once the cause is fixed")
                return
            delay = BACKOFF_S[min(len(crashes) - 1, len(BACKOFF_S) - 1)]
            # no longer "ready" before the group is stopped (up to STOP_GRACE_S): pages wait for the restart
            # instead of being sent to a server that is gone
            self._set_state("restarting", f"{self.error}; restarting in {delay:g}s, pages in flight are sent "
                            "again")
            await self._terminate()
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
        self._drop_private_dir()
        private = self._private_dir = make_private_dir()
        self.uds = private / SOCKET_NAME
        log.info("vLLM's ipc sockets go to %s: a fresh directory only the daemon's user can enter (its API "
                 "socket %s too)", private, SOCKET_NAME)
        argv = build_command(self.cfg, exe, str(self.uds), self.served_name, max(1, len(self.gpu_indices)))
        env = build_env(self.cfg, os.environ, self.gpu_indices, private_dir=private)
        run = launcher_argv(argv) if self.cfg.private_network else argv
        if not self._network_said:
            self._network_said = True
            if self.cfg.private_network:
                log.info("vLLM runs in a network namespace of its own: the TCP ports its engine opens are "
                         "reachable by no other local user")
            else:
                log.warning("vllm.private_network = false: vLLM shares the host's network, and every local user "
                            "can connect to the TCP ports its engine opens on 127.0.0.1")
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as logfh:
            logfh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} ftmllmd starts: {shlex.join(argv)}\n".encode())
        try:
            proc = self.proc = ChildProcess.start(run, env, log_path=self.log_path, cwd=self.workdir)
        except OSError as exc:
            raise StartFailed(f"cannot run {run[0]}: {exc.strerror}", fatal=True) from None
        # the same pid runs vLLM once the launcher has made the namespace (exec): the record holds either way
        write_record(self.pid_path, proc.record, {"uds": str(self.uds), "argv": argv})
        deadline = time.monotonic() + self.cfg.start_timeout_s
        why = "no answer from /health"
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                complaint = launcher_complaint(self.log_path)
                if proc.returncode == EXIT_NO_NAMESPACE and complaint:
                    raise StartFailed(complaint, fatal=True)
                raise StartFailed(f"vllm serve ended ({exit_text(proc.returncode)}) before it was ready: "
                                  f"{log_reason(self.log_path) or 'see ' + str(self.log_path)}")
            if await self._healthy(timeout=2.0):
                # up, but only an answered completion shows the engine behind it works
                left = deadline - time.monotonic()
                problem = await self._probe(min(self.cfg.health_timeout_s, max(left, 1.0)))
                if problem is None:
                    return
                why = f"/health answers, but {problem}"
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.exited(), 0.5)  # wakes early if it exits, else polls /health again
        raise StartFailed(f"{why} within start_timeout_s = {self.cfg.start_timeout_s:g}s; raise vllm.start_timeout_s "
                          f"if the model is large (log: {self.log_path})")

    async def _healthy(self, timeout: float = 5.0) -> bool:
        try:
            resp = await self._client().get(f"{self.root}/health", timeout=timeout)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    async def _probe(self, timeout: float) -> str | None:
        """A one-token completion: None if it came back within ``timeout``, else what went wrong."""
        # the chat API, as the pages use it (vLLM 0.32's CPU engine died on a two-token raw /v1/completions)
        body = {"model": self.served_name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                "temperature": 0.0}
        try:
            # wait_for, not httpx's timeouts: those bound each read, and a server may trickle bytes
            resp = await asyncio.wait_for(self._client().post(f"{self.root}/v1/chat/completions", json=body,
                                                              timeout=timeout), timeout)
        except (TimeoutError, httpx.TimeoutException):
            return f"a one-token completion got no answer within health_timeout_s = {timeout:g}s"
        except httpx.HTTPError as exc:
            return f"a one-token completion failed ({type(exc).__name__}: {exc})"
        if resp.status_code != 200:
            return f"a one-token completion was answered {resp.status_code} ({error_message(resp.content)})"
        return None

    async def _watch(self) -> str:
        """Until the child exits or hangs: poll /metrics, probe with a one-token completion. Returns why it
        ended."""
        proc = self.proc
        assert proc is not None
        waiter = asyncio.ensure_future(proc.exited())
        probe: asyncio.Task[str | None] | None = None
        timeout = self.cfg.health_timeout_s
        next_probe = time.monotonic() + probe_every(timeout)
        tokens_seen: float | None = None  # generated tokens at the last look (None: not read yet)
        tokens_at_probe = 0.0
        misses = 0
        try:
            while True:
                done, _ = await asyncio.wait({waiter} | ({probe} if probe is not None else set()), timeout=POLL_S)
                if waiter in done:
                    return f"vLLM exited ({exit_text(proc.returncode)})"
                if await self._poll():
                    misses = 0
                    if tokens_seen is None:
                        tokens_seen = self.load.generation_tokens
                else:
                    misses += 1
                    if misses >= HUNG_POLLS:
                        return f"vLLM stopped answering for {misses * POLL_S:.0f}s (hung); killed it"
                now = time.monotonic()
                if probe is not None and probe.done():
                    problem, probe = probe.result(), None
                    next_probe = now + probe_every(timeout)
                    tokens_seen = None  # the next poll counts the probe's own token in; look from there
                    if problem is not None and self.state == "ready":
                        if self.load.generation_tokens > tokens_at_probe:
                            # tokens flowed meanwhile: busy (a long queue), not hung
                            log.info("vLLM is busy: %s, but it generated tokens meanwhile", problem)
                        else:
                            return (f"vLLM answers /health but is hung: {problem}, and it generated no token "
                                    "meanwhile; killed it")
                if probe is None and self.state == "ready" and now >= next_probe:
                    if tokens_seen is not None and self.load.generation_tokens > tokens_seen:  # it works: no need
                        tokens_seen = self.load.generation_tokens
                        next_probe = now + probe_every(timeout)
                    else:
                        tokens_seen = tokens_at_probe = self.load.generation_tokens
                        probe = asyncio.get_running_loop().create_task(self._probe(timeout), name="vllm-probe")
        finally:
            waiter.cancel()
            if probe is not None:
                probe.cancel()

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
        """SIGTERM the child's process group, SIGKILL after the grace period (an orphaned engine core too)."""
        proc = self.proc
        if proc is not None:
            # self.proc is cleared only once it is stopped: a stop cancelled half-way is finished by the next
            outcome = await proc.stop(term_s=STOP_GRACE_S)
            if outcome.how == "killed":
                log.warning("vllm did not stop within %.0fs of SIGTERM; killed its process group", STOP_GRACE_S)
            if not proc.alive():
                self.pid_path.unlink(missing_ok=True)
            if self.proc is proc:
                self.proc = None
        self._drop_private_dir()

    def _drop_private_dir(self) -> None:
        """vLLM leaves its socket files behind; the directory made for them goes with the child."""
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None
            self.uds = None

    def _reap_orphan(self) -> None:
        """A vLLM left running by a daemon that was killed holds its GPU memory: end it, and remove its socket
        directory. Records of earlier versions (a port, no socket) are read too."""
        try:
            uds = str(json.loads(self.pid_path.read_text(encoding="utf-8")).get("uds") or "")
        except (OSError, ValueError, AttributeError):
            uds = ""
        left = reap_recorded(self.pid_path, term_s=STOP_GRACE_S)
        if left is not None:
            log.warning("ended a vLLM left running by an earlier daemon (process group %d)", left.pgid)
        if uds:
            remove_private_dir(Path(uds).parent)


def remove_private_dir(path: Path) -> None:
    """Remove a socket directory an earlier daemon made, if it is one (our prefix, our own, not a link)."""
    try:
        st = path.lstat()
    except OSError:
        return
    if path.name.startswith(PRIVATE_DIR_PREFIX) and st.st_uid == os.geteuid() and stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
