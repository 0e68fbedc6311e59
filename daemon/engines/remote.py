"""The ``remote`` engine: pages to OpenAI-compatible servers the daemon does not run (vLLM on other boxes).

* Every :data:`POLL_S` seconds each server's ``/metrics`` is read; a page goes to the server with the
  shortest queue: its running + waiting requests not sent by this daemon, plus what this daemon has in
  flight there now (counted live, so a burst of pages spreads out before the next poll).
* A server that cannot be reached is left out for a while (10 s, doubling to 5 min); a page whose stream
  broke is sent again to the best server left. When no server answers for :data:`GIVE_UP_S`, pages fail.
* ``/v1/models`` tells the served model, its ``max_model_len`` (vLLM includes it) and the LoRA adapters
  each server has loaded; a page naming an adapter goes only to servers that have it.
* The budget, request, runaway guard and ladder are the vllm engine's (:mod:`daemon.engines.vlm.converter`), with the
  sampling settings of ``[vllm]``.
* Trust: pages (and the key) travel only over https, or plain http to this machine's loopback. The API key
  comes from ``remote.api_key_file``, read at start: a regular file of the daemon's own user that no one else
  may read or write (:func:`read_api_key`). It is sent as ``Authorization: Bearer`` and appears in no log line,
  status or error (``api key: set``). Either check failing leaves the engine ``failed`` with a one-line reason.
* A :class:`Fleet` (``vllm.replicas`` on a Ray cluster, daemon/cluster/replicas.py) instead of ``remote.urls``:
  the servers are the fleet's replicas serving now, read again at every poll and page; the fleet's own API key
  is sent, and its plain-http node addresses are the cluster's trust, not ``remote.urls``' (README "Beyond one
  machine").
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import pwd
import stat
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import httpx

from daemon.engines.vlm.budget import config_limits
from daemon.engines.vlm.chat_stream import api_root, headers, tokenized_length
from daemon.engines.vlm.converter import Sampling, Target, VlmConverter
from daemon.engines.vlm.inflight import InFlight
from daemon.engines.vlm.server_metrics import ServerLoad, parse_load
from daemon.ocr.engine import PageInput, PageResult, TextDelta
from daemon.ocr.errors import OcrError
from daemon.ocr.pdfworker import PdfWorkerPool
from shared.config import OcrConfig, RemoteConfig, VllmConfig

log = logging.getLogger(__name__)

POLL_S = 2.0
DOWN_S = (10.0, 20.0, 40.0, 80.0, 160.0, 300.0)
GIVE_UP_S = 300.0


@dataclass
class Server:
    root: str
    load: ServerLoad = field(default_factory=ServerLoad)
    ours_at_poll: int = 0  # our requests in flight there when load was read
    in_flight: int = 0
    up: bool = False
    down_until: float = 0.0
    failures: int = 0
    models: dict[str, str] = field(default_factory=dict)  # id -> parent ("" for a base model)
    max_model_len: int = 0
    error: str = ""

    def score(self) -> int:
        """Requests queued there: others' (from its metrics) plus ours (live)."""
        foreign = max(0, self.load.queue - self.ours_at_poll)
        return foreign + self.in_flight


class Fleet(Protocol):
    """Servers the daemon starts elsewhere and keeps at their number (vLLM replicas on Ray)."""

    size: int
    api_key: str

    def roots(self) -> list[str]: ...  # http://host:port of each replica serving now

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def describe(self) -> str: ...

    async def load_adapter(self, name: str, path: str) -> str: ...

    async def unload_adapter(self, name: str) -> str: ...


class RemoteRefused(Exception):
    """The [remote] settings cannot be used safely; the message is one line naming the key and the fix."""


def check_url(url: str) -> None:
    """https anywhere; plain http only to a loopback host (nothing of a page or the key crosses a network)."""
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    if scheme == "https" and host:
        return
    if scheme == "http" and host and _loopback(host):
        return
    if scheme == "http" and host:
        raise RemoteRefused(f"remote.urls: {url} is plain http to another machine: pages and the API key would "
                            "cross the network readable by anyone on the way; use https://")
    raise RemoteRefused(f"remote.urls: {url} is not an http(s) URL; give the server's base URL, e.g. "
                        "https://gpu2:8000/v1")


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key(path: str) -> str:
    """The key in ``path``: a regular file owned by the daemon's user, with no group or other permission bits.
    Raises RemoteRefused (one line naming the file and what to do) otherwise."""
    file = Path(path).expanduser()
    me = os.geteuid()
    try:
        # O_NONBLOCK: a FIFO put there must not hang the daemon; fstat checks the very file that is read
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise RemoteRefused(f"remote.api_key_file {file}: cannot open it ({exc.strerror}); put the key in that file, "
                            f"owned by {_user(me)}, and chmod 600 {file}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RemoteRefused(f"remote.api_key_file {file} is not a regular file; put the key in a plain file "
                                f"owned by {_user(me)} and chmod 600 it")
        if st.st_uid != me:
            raise RemoteRefused(f"remote.api_key_file {file} is owned by {_user(st.st_uid)}, not by the daemon's "
                                f"user {_user(me)}; chown {_user(me)} {file} && chmod 600 {file}")
        if st.st_mode & 0o077:
            raise RemoteRefused(f"remote.api_key_file {file} has mode {stat.S_IMODE(st.st_mode):04o}: others may "
                                f"read or change the key; chmod 600 {file}")
        raw = os.read(fd, 64 * 1024)
    finally:
        os.close(fd)
    key = raw.decode("utf-8", "replace").strip()
    if not key or any(c.isspace() for c in key):
        raise RemoteRefused(f"remote.api_key_file {file}: " + ("it is empty" if not key else
                            "it holds more than one word") + "; write the key alone on one line")
    return key


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def pick(servers: list[Server], now: float, adapter: str = "") -> Server | None:
    """The server with the shortest queue among those up (and having the adapter, if one is named)."""
    usable = [s for s in servers if s.up and s.down_until <= now and (not adapter or adapter in s.models)]
    if not usable:
        return None
    return min(usable, key=lambda s: (s.score(), s.failures))


class RemoteEngine:
    name = "remote"
    needs_image = True

    def __init__(self, cfg: RemoteConfig, vcfg: VllmConfig, ocr: OcrConfig, pool: PdfWorkerPool, prompt: str, *,
                 on_change: Callable[[str, bool], None] | None = None, fleet: Fleet | None = None) -> None:
        self.cfg = cfg
        self.prompt = prompt
        self.fleet = fleet
        self.servers = [] if fleet is not None else [Server(root=api_root(u)) for u in cfg.urls]
        self.model = cfg.model
        self.concurrency = vcfg.max_in_flight * max(1, fleet.size if fleet is not None else len(self.servers))
        self.limiter = InFlight(self.concurrency)
        self.on_change = on_change or (lambda _what, _durable: None)
        limits = config_limits(vcfg.max_model_len, vcfg.max_tokens, vcfg.min_pixels, vcfg.max_pixels, prompt)
        sampling = Sampling(prompt=prompt, temperature=vcfg.temperature, max_tokens=vcfg.max_tokens,
                            extra=dict(vcfg.sampling))
        self.converter = VlmConverter(self, self.limiter, pool, limits, sampling, dpi=ocr.dpi,
                                      render_timeout_s=ocr.page_timeout_s)
        self.state = "stopped"
        self.error = ""  # why the engine cannot be used (its settings were refused)
        self._api_key = ""
        self.pages_done = 0
        self.pages_per_s = 0.0
        self.tokens_per_s = 0.0
        self._http: httpx.AsyncClient | None = None
        self._poller: asyncio.Task[None] | None = None
        self._current: asyncio.Event | None = None
        self._prompt_counted = False

    def resolve_adapter(self, name: str, user: str) -> str:
        return name

    @property
    def max_pixels(self) -> int | None:
        return self.converter.max_pixels

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(5.0))
        return self._http

    def _event(self) -> asyncio.Event:
        if self._current is None:
            self._current = asyncio.Event()
        return self._current

    def _check_settings(self) -> None:
        """Read the key and check the URLs, now (a changed key file counts from the next start)."""
        if self.fleet is not None:
            self._api_key = self.fleet.api_key
            return
        for url in self.cfg.urls:
            check_url(url)
        self._api_key = read_api_key(self.cfg.api_key_file) if self.cfg.api_key_file else ""

    async def start(self) -> None:
        if self._poller is None or self._poller.done():
            try:
                await asyncio.to_thread(self._check_settings)
            except RemoteRefused as exc:
                if self.error != str(exc):
                    self.error = str(exc)
                    self.state = "failed"
                    log.error("remote engine: %s", self.error)
                    self.on_change(f"remote engine failed: {self.error}", True)
                return
            self.error = ""
            self.state = "starting"
            if self.fleet is not None:
                await self.fleet.start()
            self._poller = asyncio.get_running_loop().create_task(self._poll_loop(), name="remote-engine-poll")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        if self.fleet is not None:
            await self.fleet.stop()
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        await self.converter.close()
        self.state = "stopped"

    def convert(self, page: PageInput) -> AsyncIterator[TextDelta | PageResult]:
        return self.converter.convert(page)

    def check_adapter(self, name: str, user: str = "") -> str | None:
        """Remote servers are shared as configured: adapter names there are not namespaced by user."""
        if any(name in s.models for s in self.servers):
            return None
        known = sorted({m for s in self.servers for m, parent in s.models.items() if parent})
        return (f"adapter '{name}' is not loaded on any remote server (loaded there: {', '.join(known) or 'none'}); "
                "load it on the servers (vLLM's /v1/load_lora_adapter) first")

    @property
    def running(self) -> int:
        return sum(s.load.running for s in self.servers)

    @property
    def waiting(self) -> int:
        return sum(s.load.waiting for s in self.servers)

    @property
    def kv_cache_pct(self) -> float:
        up = [s.load.kv_cache_pct for s in self.servers if s.up]
        return sum(up) / len(up) if up else 0.0

    @property
    def adapters(self) -> list[str]:
        return sorted({m for s in self.servers for m, parent in s.models.items() if parent})

    def describe(self) -> str:
        key = "set" if self._api_key else ("none" if not self.cfg.api_key_file else "not read")
        lines = [f"remote {self.state}: {self.model or '(model not known yet)'}, api key: {key}"]
        if self.error:
            lines.append(f"refused: {self.error}")
        if self.fleet is not None:
            lines.append(self.fleet.describe())
        for s in self.servers:
            status = "up" if s.up and s.down_until <= time.monotonic() else f"down ({s.error or 'no answer'})"
            lines.append(f"{s.root}: {status}, {s.load.running} running, {s.load.waiting} waiting, "
                         f"{s.in_flight} ours")
        return "; ".join(lines)

    # Backend ------------------------------------------------------------------------------------------

    async def target(self, adapter: str = "") -> Target:
        if self._poller is None:
            await self.start()
        if self.error:
            raise OcrError("engine", self.error)
        deadline = time.monotonic() + GIVE_UP_S
        while True:
            self._sync()
            server = pick(self.servers, time.monotonic(), adapter)
            if server is not None:
                server.in_flight += 1
                return Target(root=server.root, model=self.model or next(iter(server.models), ""),
                              api_key=self._api_key)
            if time.monotonic() > deadline:
                raise OcrError("engine", "no remote server answered for "
                                         f"{GIVE_UP_S:.0f}s ({self.describe()}); check remote.urls")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event().wait(), POLL_S)

    async def broken(self, target: Target, error: str) -> str | None:
        for s in self.servers:
            if s.root == target.root:
                self._mark_down(s, error)
        log.info("remote %s: a request broke off (%s); sending it elsewhere", target.root, error)
        return None

    def release(self, target: Target) -> None:
        for s in self.servers:
            if s.root == target.root:
                s.in_flight = max(0, s.in_flight - 1)

    def page_done(self, tokens: int) -> None:
        self.pages_done += 1

    # polling ---------------------------------------------------------------------------------------------

    def _sync(self) -> None:
        """The fleet's replicas serving now: new ones join (polled before they take a page), gone ones leave
        (their pages in flight broke off and are sent again to the others)."""
        if self.fleet is None:
            return
        have = {s.root: s for s in self.servers}
        self.servers = [have.get(root) or Server(root=root) for root in self.fleet.roots()]

    async def refresh(self) -> None:
        """Poll every server now (their adapters changed)."""
        self._sync()
        await asyncio.gather(*(self._poll(s) for s in self.servers))

    def _mark_down(self, s: Server, error: str) -> None:
        s.failures += 1
        s.error = error
        s.up = False
        s.down_until = time.monotonic() + DOWN_S[min(s.failures - 1, len(DOWN_S) - 1)]

    async def _poll_loop(self) -> None:
        last: tuple[float, float, int] | None = None
        while True:
            self._sync()
            await asyncio.gather(*(self._poll(s) for s in self.servers))
            now = time.monotonic()
            gen = sum(s.load.generation_tokens for s in self.servers)
            if last is not None:
                dt = max(now - last[0], 1e-6)
                self.tokens_per_s = max(0.0, (gen - last[1]) / dt)
                self.pages_per_s = max(0.0, (self.pages_done - last[2]) / dt)
            last = (now, gen, self.pages_done)
            up = [s for s in self.servers if s.up]
            state = "ready" if up else ("starting" if self.fleet is not None else "failed")
            if up and not self.model:
                self.model = next((m for s in up for m, parent in s.models.items() if not parent), "")
            if up and not self._prompt_counted:
                await self._count_prompt(up[0])
            lens = [s.max_model_len for s in up if s.max_model_len]
            if lens and min(lens) != self.converter.limits.max_model_len:
                self.converter.limits = replace(self.converter.limits, max_model_len=min(lens))
            await self.limiter.observe(sum(s.load.running for s in up), sum(s.load.waiting for s in up))
            if state != self.state:
                self.state = state
                self.on_change(f"remote engine {state}: {self.describe()}", True)
            else:
                self.on_change("", False)
            ev, self._current = self._event(), asyncio.Event()
            ev.set()
            await asyncio.sleep(POLL_S)  # the poll period

    async def _count_prompt(self, s: Server) -> None:
        count = await tokenized_length(self._client(), s.root, self.model, self.prompt, self._api_key)
        if count is not None:
            self.converter.limits = replace(self.converter.limits, prompt_tokens=count)
        self._prompt_counted = True

    async def _poll(self, s: Server) -> None:
        if s.down_until > time.monotonic():
            return
        client = self._client()
        try:
            resp = await client.get(f"{s.root}/metrics", headers=headers(self._api_key))
            if resp.status_code == 200:
                s.ours_at_poll = s.in_flight
                s.load = parse_load(resp.text)
            # adapters come and go on servers we do not run: read the list at every poll
            models = await client.get(f"{s.root}/v1/models", headers=headers(self._api_key))
            models.raise_for_status()
            data = models.json().get("data", [])
            s.models = {str(m["id"]): str(m.get("parent") or "") for m in data}
            lens = [int(m["max_model_len"]) for m in data if m.get("max_model_len") and not m.get("parent")]
            s.max_model_len = min(lens) if lens else 0
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            self._mark_down(s, f"{type(exc).__name__}: {exc}")
            return
        s.up = True
        s.failures = 0
        s.error = ""
