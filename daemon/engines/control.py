"""The daemon's OCR engines: which exist, which one serves and why, the PDF workers they convert with, their
state as events, and the ``engine`` and ``ask`` requests.

* ``cpu`` always exists. ``vllm`` exists when ``vllm.model`` is set (a supervised ``vllm serve``), ``remote``
  when ``remote.urls`` lists servers. A job may name any of them; the default serves the hot folder and
  jobs that name none.
* The default: ``ocr.engine = "auto"`` takes vllm when there are GPUs, a model and a vllm executable,
  else cpu; an explicit ``"vllm"`` is honoured without GPUs (vLLM's CPU build). The reason goes into
  :class:`EngineInfo` (``ftctl status``).
* The default engine's state changes are durable ``EngineChanged`` events (a row in the store, a ``seq``);
  its load figures (running/waiting, KV cache, tokens/s) are stream events every couple of seconds.
  Snapshots and status ask :meth:`EngineControl.shown`.
* The GPU allocator borrows the vLLM engine's GPUs through :attr:`EngineControl.gpu_engine`
  (daemon/engines/gpu_port.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import struct
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import msgspec

from daemon.core.events import EventBus
from daemon.core.store import Store, StoreError
from daemon.ctl.server import Handler
from daemon.engines.cpu import CpuEngine
from daemon.engines.gpu_port import SupervisedVllm
from daemon.engines.remote import Fleet, RemoteEngine
from daemon.engines.vllm import VllmEngine
from daemon.engines.vllm_supervisor import AdapterRefused, EngineCommandError
from daemon.engines.vlm.adapter_budget import plan_for, read_budget
from daemon.engines.vlm.budget import BudgetError
from daemon.engines.vlm.prompts import load_prompt
from daemon.gpus.engine_port import GpuEngine
from daemon.gpus.source import GpuSource
from daemon.jobs.base import Caller
from daemon.jobs.manager import RequestDenied
from daemon.jobs.outputs import inside, under_jobs
from daemon.ocr.engine import Engine, EngineChoice
from daemon.ocr.errors import OcrError
from daemon.ocr.pdfworker import PdfWorkerPool
from daemon.part import Part, Shown
from daemon.spool.spool import Spool, SpoolError
from shared.config import Settings
from shared.protocol import (
    Ask,
    AskReply,
    AskSpooled,
    EngineChanged,
    EngineCommand,
    EngineInfo,
    EngineReply,
    JobInfo,
    TextDelta,
    ask_key,
)

log = logging.getLogger(__name__)

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def gpu_view(source: GpuSource) -> tuple[list[int], str]:
    """GPU indices (most free memory first) and a note."""
    try:
        snap = source.snapshot()
    except Exception as exc:  # NVML trouble is never a reason not to start
        return [], f"no GPUs found ({exc})"
    gpus = sorted(snap.gpus, key=lambda g: -g.memory_free_mib)
    return [g.index for g in gpus], snap.note


def choose_default(settings: Settings, engines: Collection[str], gpus: list[int], gpu_note: str,
                   vllm_exe: str | None) -> tuple[str, str]:
    """(engine name, why) for ocr.engine, given the engines the config provides."""
    cfg = settings.config
    wanted = cfg.ocr.engine
    if wanted == "cpu":
        return "cpu", 'configured: ocr.engine = "cpu" (text layer + offline OCR)'
    if wanted == "vllm":
        if "vllm" not in engines:
            return "cpu", ('ocr.engine = "vllm" but vllm.model is empty; set it — serving with the CPU engine '
                           "meanwhile")
        where = f"on GPU {','.join(map(str, gpus[:cfg.vllm.gpus]))}" if gpus else "without GPUs (vLLM's CPU build)"
        return "vllm", f'configured: ocr.engine = "vllm", {cfg.vllm.model} {where}'
    if wanted == "remote":
        if "remote" not in engines:
            return "cpu", 'ocr.engine = "remote" but remote.urls is empty; list the servers — serving with the ' \
                          "CPU engine meanwhile"
        return "remote", f'configured: ocr.engine = "remote", {len(cfg.remote.urls)} server(s)'
    # auto
    if not gpus:
        return "cpu", f"auto: {gpu_note or 'no GPUs found'}, using the CPU engine (text layer + offline OCR)"
    if "vllm" not in engines:
        return "cpu", (f"auto: {len(gpus)} GPU(s) but vllm.model is empty; set it to serve with vLLM — using the "
                       "CPU engine")
    if vllm_exe is None:
        return "cpu", (f"auto: {len(gpus)} GPU(s) but no vllm executable '{cfg.vllm.executable}'; set vllm."
                       "executable — using the CPU engine")
    return "vllm", f"auto: {len(gpus)} GPU(s) and {vllm_exe}: serving {cfg.vllm.model} with vLLM"


@dataclass(frozen=True)
class Decision:
    default: str  # the engine that serves jobs naming none
    reason: str
    gpus: list[int]  # GPU indices, most free memory first


def decide(settings: Settings, gpus_seen: GpuSource) -> Decision:
    """Which engine serves by default, before anything is built (what the PDF workers preload depends on it)."""
    cfg = settings.config
    gpus, note = gpu_view(gpus_seen)
    available = {"cpu"} | ({"vllm"} if cfg.vllm.model else set()) | ({"remote"} if cfg.remote.urls else set())
    default, reason = choose_default(settings, available, gpus, note, shutil.which(cfg.vllm.executable))
    return Decision(default, reason, gpus)


def worker_preload(decision: Decision) -> tuple[str, ...]:
    """What the PDF workers load at start: the CPU engine's models (≈270 MB a worker, seconds to load) only
    when it serves; a VLM engine's pages need rendering alone (a job naming cpu loads them on first use)."""
    return ("markdown", "ocr") if decision.default == "cpu" else ()


class EngineControl(Part):
    def __init__(self, settings: Settings, store: Store, bus: EventBus, gpus_seen: GpuSource,
                 fleet: Fleet | None = None) -> None:
        """``gpus_seen``: the GPUs the default engine is chosen by (and vLLM placed on). ``fleet``: vLLM
        replicas on a Ray cluster (``vllm.replicas``), served as the remote engine instead of a local vLLM."""
        # httpx logs every request at INFO: the /metrics poll alone would fill the daemon's log
        logging.getLogger("httpx").setLevel(logging.WARNING)
        self.settings = settings
        self.store = store
        self.bus = bus
        cfg = settings.config
        decision = decide(settings, gpus_seen)
        if fleet is not None:
            decision = Decision("remote", f"vllm.replicas = {fleet.size}: {cfg.vllm.model} on the Ray cluster",
                                decision.gpus)
        # the PDF workers are the engines': what they load at start depends on which engine serves
        self.pool = pool = PdfWorkerPool(size=max(1, cfg.ocr.workers), markdown_mode=cfg.ocr.markdown_mode,
                                         preload=worker_preload(decision),
                                         log_path=settings.paths.state_dir / "pdfworkers.log")
        self.cpu = CpuEngine(pool, page_timeout_s=cfg.ocr.page_timeout_s, dpi=cfg.ocr.dpi)
        engines: dict[str, Engine] = {"cpu": self.cpu}
        self.prompt_error = ""
        try:
            prompt = load_prompt(cfg.ocr.prompt)
        except OcrError as exc:
            self.prompt_error = exc.message
            prompt = ""
        gpus = decision.gpus
        self.vllm: VllmEngine | None = None
        self.remote: RemoteEngine | None = None
        if cfg.vllm.model and fleet is None:
            self.vllm = VllmEngine(cfg.vllm, cfg.ocr, pool, settings.paths.state_dir / "vllm", prompt,
                                   gpu_indices=gpus[: cfg.vllm.gpus],
                                   on_change=lambda what, durable: self._changed("vllm", what, durable))
            engines["vllm"] = self.vllm
        if cfg.remote.urls or fleet is not None:
            self.remote = RemoteEngine(cfg.remote, cfg.vllm, cfg.ocr, pool, prompt, fleet=fleet,
                                       on_change=lambda what, durable: self._changed("remote", what, durable))
            engines["remote"] = self.remote
        self.choice = EngineChoice(engines=engines, default=decision.default, reason=decision.reason)
        # what the GPU allocator parks when a job needs its GPUs, and what `ftctl deploy` loads into
        self.gpu_engine: GpuEngine | None = SupervisedVllm(self.vllm.supervisor) if self.vllm is not None else None
        self._asks: set[asyncio.Task[None]] = set()
        self._pool_start: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------------------------- state

    def shown(self) -> Shown:
        return Shown(engine=self.info())

    def info(self, name: str | None = None) -> EngineInfo:
        name = name or self.choice.default
        reason = self.choice.reason
        if name == "vllm" and self.vllm is not None:
            sup = self.vllm.supervisor
            error = self.prompt_error or sup.error
            return EngineInfo(kind="vllm", state="failed" if self.prompt_error else sup.state, model=sup.served_name,
                              reason=reason, adapters=sorted(sup.adapters), running=sup.load.running,
                              waiting=sup.load.waiting, kv_cache_pct=round(sup.load.kv_cache_pct, 1),
                              tokens_per_s=round(sup.tokens_per_s, 1), pages_per_s=round(sup.pages_per_s, 2),
                              gpus=list(sup.gpu_indices), error=error)
        if name == "remote" and self.remote is not None:
            r = self.remote
            return EngineInfo(kind="remote", state=r.state, model=r.model, reason=reason, adapters=r.adapters,
                              running=r.running, waiting=r.waiting, kv_cache_pct=round(r.kv_cache_pct, 1),
                              tokens_per_s=round(r.tokens_per_s, 1), pages_per_s=round(r.pages_per_s, 2),
                              error=self.prompt_error or r.error)
        return EngineInfo(kind="cpu", state="ready", model=self.cpu.model, reason=reason)

    def _changed(self, name: str, what: str, durable: bool) -> None:
        """An engine's state changed (durable) or its load figures moved (stream)."""
        if name != self.choice.default:
            if durable and what:
                log.info("%s engine: %s", name, what)
            return
        event = EngineChanged(engine=self.info(name))
        if durable:
            self.bus.durable(self.store.record(f"engine {name}: {what}"), event)
        else:
            self.bus.stream(event)

    # ------------------------------------------------------------------------- daemon lifecycle

    async def start(self) -> None:
        """With the daemon: the default engine starts now (vLLM takes minutes), the others on first use."""
        if self.prompt_error:
            log.error("OCR prompt: %s", self.prompt_error)
        if self.choice.default != "cpu":
            # the PDF workers only render for a VLM engine (light, see worker_preload): have them ready before
            # the first page rather than after it
            self._pool_start = asyncio.get_running_loop().create_task(self._start_pool(), name="pdf-workers")
        if self.choice.default == "vllm" and self.vllm is not None and not self.prompt_error:
            await self.vllm.start()
        elif self.choice.default == "remote" and self.remote is not None:
            await self.remote.start()

    async def _start_pool(self) -> None:
        try:
            await self.pool.start()
        except OcrError as exc:  # the first job says it again, with its own context
            log.error("PDF workers: %s", exc.message)

    async def stop(self) -> None:
        for engine in (self.vllm, self.remote):
            if engine is not None:
                try:
                    await engine.stop()
                except Exception:
                    log.exception("stopping the %s engine failed", engine.name)
        if self._pool_start is not None:
            self._pool_start.cancel()
        await self.pool.close()

    # ------------------------------------------------------------------------------ requests

    def handlers(self) -> dict[type, Handler]:
        return {EngineCommand: self.on_command, Ask: self.on_ask, AskSpooled: self.on_ask_spooled}

    async def on_command(self, body: EngineCommand, caller: Caller) -> EngineReply:
        action = body.action
        if action == "status":
            return EngineReply(engine=self.info(), message=self._status_text())
        if action in ("load", "unload") and self.vllm is None and self.remote is not None and self.remote.fleet:
            return await self._fleet_adapter(body, caller, self.remote)
        if action == "adapters" and self.vllm is None and self.remote is not None:
            names = self.remote.adapters
            return EngineReply(engine=self.info("remote"),
                               message="adapters on the remote servers: " + (", ".join(names) or "none"))
        if self.vllm is None and self.remote is not None and self.remote.fleet:
            raise RequestDenied("unavailable", f"'ftctl engine {action}' works on a local vLLM engine; this daemon's "
                                "vLLM replicas run on the Ray cluster, where it starts and replaces them itself "
                                "(vllm.replicas)")
        if self.vllm is None:
            raise RequestDenied("unavailable", f"'ftctl engine {action}' works on the vLLM engine, and this daemon "
                                "has none; set vllm.model (and executable) in the config, then restart it")
        sup = self.vllm.supervisor
        if action in ("start", "stop", "sleep", "wake") and not caller.is_admin:
            raise RequestDenied("forbidden", f"'{action}' changes the shared vLLM engine for everyone; ask an admin "
                                "(the daemon's user, root or the admin group) to do it")
        try:
            if action == "start":
                if self.prompt_error:
                    raise RequestDenied("unavailable", self.prompt_error)
                message = await sup.start()
            elif action == "stop":
                message = await sup.stop("stopped by " + caller.user)
            elif action == "sleep":
                message = await sup.sleep()
            elif action == "wake":
                message = await sup.wake()
            elif action == "adapters":
                message = ("adapters: " + sup.adapter_list() if sup.adapters
                           else "no adapters loaded; `ftctl engine load NAME PATH` loads one")
            elif action == "load":
                if not body.name or not body.path:
                    raise RequestDenied("bad_request", "load needs a name and a path: ftctl engine load NAME PATH")
                path = self._adapter_path(body.path, caller)
                self._check_budget(path)
                message = await sup.load_adapter(body.name, path, user=caller.user, admin=caller.is_admin)
            elif action == "unload":
                if not body.name:
                    raise RequestDenied("bad_request", "unload needs the adapter's name: ftctl engine unload NAME")
                message = await sup.unload_adapter(body.name, user=caller.user, admin=caller.is_admin)
            else:  # pragma: no cover - the protocol's Literal admits nothing else
                raise RequestDenied("bad_request", f"unknown engine action {action}")
        except AdapterRefused as exc:
            raise RequestDenied("forbidden", str(exc)) from None
        except EngineCommandError as exc:
            raise RequestDenied("invalid_state", str(exc)) from None
        return EngineReply(engine=self.info("vllm"), message=message)

    async def _fleet_adapter(self, body: EngineCommand, caller: Caller, remote: RemoteEngine) -> EngineReply:
        """A runtime LoRA load or unload on every vLLM replica (and on those started later); the replicas'
        adapter names are shared, as on remote servers: admins only."""
        assert remote.fleet is not None
        if not caller.is_admin:
            raise RequestDenied("forbidden", f"'{body.action}' changes the adapters of every vLLM replica, whose "
                                "names all users share; ask an admin (the daemon's user, root or the admin group)")
        if not body.name or (body.action == "load" and not body.path):
            raise RequestDenied("bad_request", f"{body.action} needs an adapter name"
                                + (" and a path: ftctl engine load NAME PATH" if body.action == "load" else ""))
        try:
            if body.action == "load":
                message = await remote.fleet.load_adapter(body.name, self._adapter_path(body.path, caller))
            else:
                message = await remote.fleet.unload_adapter(body.name)
        except RuntimeError as exc:
            raise RequestDenied("invalid_state", str(exc)) from None
        await remote.refresh()
        return EngineReply(engine=self.info("remote"), message=message)

    def _adapter_path(self, path: str, caller: Caller) -> str:
        """The directory the engine is to read an adapter from, as ``caller`` may have it read: vLLM reads it
        with the daemon's rights. An admin names any; a member the output of one of her train jobs (or one of
        its checkpoint-N) or a folder inside train.model_roots, as for training (daemon/train/access.py, which
        the engines cannot import); it is resolved here, so vLLM reads the folder that was checked."""
        if caller.is_admin:
            return path
        real = os.path.realpath(path)
        found = under_jobs(real, os.path.realpath(self.settings.paths.state_dir / "jobs"), self._job_or_none)
        if found is not None:
            job = found.job
            if job is not None and job.owner != caller.user:
                raise RequestDenied("forbidden", f"{caller.user} cannot load the adapter in {path}: it is job "
                                                 f"{job.id}'s, which belongs to {job.owner}; ask {job.owner} or an "
                                                 "admin to deploy it")
            if not found.adapter:
                raise RequestDenied("forbidden", f"{path}: not the adapter of a train job; deploy one of yours "
                                                 "with `ftctl deploy JOB`")
            return real
        train = self.settings.config.train
        if any(inside(real, os.path.realpath(r)) for r in (*train.model_roots, *train.trusted_models) if r):
            return real
        shown = ", ".join(train.model_roots) or "none set"
        raise RequestDenied("forbidden", f"{caller.user} cannot load the adapter in {path}: the engine reads an "
                                         "adapter with the daemon's rights, so a member loads one of her train "
                                         f"jobs (`ftctl deploy JOB`) or one inside train.model_roots ({shown}); "
                                         "copy it there or ask an admin")

    def _job_or_none(self, job_id: int) -> JobInfo | None:
        try:
            return self.store.get_job(job_id)
        except StoreError:
            return None

    def _check_budget(self, path: str) -> None:
        """An adapter trained at an image budget this engine cannot serve is refused with the setting to
        change (daemon/engines/vlm/adapter_budget.py); one without a recorded budget loads as before."""
        budget = read_budget(Path(path))
        if budget is None or self.vllm is None:
            return
        try:
            plan_for(budget, self.vllm.converter.limits, dpi=self.settings.config.ocr.dpi, prompt=self.vllm.prompt)
        except BudgetError as exc:
            raise RequestDenied("invalid_state", f"the adapter in {path} cannot be served as it was trained: "
                                                 f"{exc}") from None

    def _status_text(self) -> str:
        parts = [f"serving: {self.choice.default} — {self.choice.reason}"]
        if self.vllm is not None:
            parts.append(self.vllm.supervisor.describe())
        if self.remote is not None:
            parts.append(self.remote.describe())
        if self.prompt_error:
            parts.append(f"prompt: {self.prompt_error}")
        return "\n".join(parts)

    def _asking_engine(self) -> VllmEngine | RemoteEngine:
        engine = self.choice.engines.get(self.choice.default)
        if not isinstance(engine, (VllmEngine, RemoteEngine)):
            raise RequestDenied("unavailable", "questions about a page need a vision-language model (the vllm or "
                                f"remote engine); this daemon serves with the cpu engine ({self.choice.reason})")
        return engine

    async def on_ask(self, body: Ask, caller: Caller) -> AskReply:
        self._asking_engine()
        # a path would be read with the daemon's rights, which may be more than the caller's
        raise RequestDenied("bad_request", f"{body.file}: the daemon reads only files handed over to it; ask "
                                           "from ftui of the daemon's version (its Try screen hands the file over)")

    async def on_ask_spooled(self, body: AskSpooled, caller: Caller) -> AskReply:
        engine = self._asking_engine()
        if not body.question.strip():
            raise RequestDenied("bad_request", "the question is empty; type what you want to know about the page")
        try:
            path = Spool.of(self.settings).lookup(body.spool, caller.uid)
        except SpoolError as exc:
            raise RequestDenied("bad_request", f"{body.name}: {exc}") from None
        if body.adapter:
            if engine is self.vllm:
                # a bare name means the asker's own adapter of that name, if she has one (vllm_supervisor.py)
                body = msgspec.structs.replace(
                    body, adapter=self.vllm.supervisor.resolve_adapter(body.adapter, caller.user))
            problem = engine.check_adapter(body.adapter)
            if problem:
                raise RequestDenied("invalid_state", problem)
        # the answer streams on the asker's topic (ask.<uid>-…), which daemon.visibility = "owner" keeps to her
        key = ask_key(caller.uid, uuid.uuid4().hex[:12])
        task = asyncio.get_running_loop().create_task(self._answer(engine, body, path, key), name=f"ask-{key}")
        self._asks.add(task)
        task.add_done_callback(self._asks.discard)
        return AskReply(stream_topic=f"ask.{key}", request_key=key)

    async def _answer(self, engine: VllmEngine | RemoteEngine, body: AskSpooled, path: Path, key: str) -> None:
        bus = self.bus
        try:
            await engine.start()
            image, width, height, mime = await self._image_of(engine, path, body.name, body.page_no - 1,
                                                              body.question)
            async for delta in engine.converter.answer(body.question, image, width, height, adapter=body.adapter,
                                                       mime=mime):
                bus.stream(TextDelta(key=key, text=delta.text, reset=delta.reset))
            bus.stream(TextDelta(key=key, text="", final=True))
        except OcrError as exc:
            bus.stream(TextDelta(key=key, text=f"\n[error] {exc.message}", final=True))
        except Exception as exc:
            log.exception("answering a question failed")
            bus.stream(TextDelta(key=key, text=f"\n[error] internal error ({exc!r}); see the daemon log",
                                 final=True))

    async def _image_of(self, engine: VllmEngine | RemoteEngine, path: Path, name: str, page_no: int,
                        question: str) -> tuple[bytes, int, int, str]:
        """``path``: the spool entry; ``name``: the file's own name, whose suffix says image or PDF."""
        mime = IMAGE_TYPES.get(Path(name).suffix.lower())
        if mime is not None:
            data = await asyncio.to_thread(path.read_bytes)
            size = image_dimensions(data)
            if size is None:
                raise OcrError("not_image", f"{name} is not a PNG or JPEG image it can read; convert it to PNG")
            return data, size[0], size[1], mime
        from daemon.engines.vlm.budget import plan_render  # the render cap for this question's prompt

        cap = plan_render(engine.converter.question_limits(question)).max_pixels
        r = await self.pool.render_page(path, page_no, None, dpi=self.settings.config.ocr.dpi, max_pixels=cap,
                                        timeout=self.settings.config.ocr.page_timeout_s)
        return r.png, r.width, r.height, "image/png"


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG or JPEG from its header, without decoding it."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        w, h = struct.unpack(">II", data[16:24])
        return int(w), int(h)
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                i += 1
                continue
            marker = data[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            length = struct.unpack(">H", data[i + 2:i + 4])[0]
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                h, w = struct.unpack(">HH", data[i + 5:i + 9])
                return int(w), int(h)
            i += 2 + length
    return None

