"""Configuration: one TOML file, typed, every key with a default (documented in configs/ftmllm.toml).

Which file: ``--config FILE``, else ``$FTMLLM_CONFIG``, else (without ``--home``/``$FTMLLM_HOME``)
``$XDG_CONFIG_HOME/ftmllm/ftmllm.toml`` (``~/.config/ftmllm/ftmllm.toml``) when it exists, else the built-in
defaults. A key that does nothing is refused, never ignored.

Where things live, in order of precedence:
* a config file: its ``[paths]`` decide;
* ``--home DIR`` or ``$FTMLLM_HOME`` (what ``make run`` uses): everything under DIR (state/, run/, inbox/…);
* systemd: ``$STATE_DIRECTORY`` and ``$RUNTIME_DIRECTORY`` as the unit sets them;
* otherwise XDG user dirs: state ``~/.local/state/ftmllm``, runtime ``$XDG_RUNTIME_DIR/ftmllm``,
  hot folder ``~/ftmllm/{inbox,outbox,done,failed}``. Without ``$XDG_RUNTIME_DIR`` (su, cron, some ssh
  sessions) the runtime dir is ``/run/user/<uid>/ftmllm`` when logind made that dir for the user, else
  ``<state dir>/run``: never a shared place such as /tmp, where another user could create it first.
Clients (ftctl, ftui) resolve the same way, so both ends find the same sockets; both refuse a runtime dir
another user owns or can write (shared/private_dir.py).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec

from shared.private_dir import is_own_private_dir

# Unix socket paths are limited to 107 bytes by the kernel (sun_path).
MAX_IPC_PATH = 107


class ConfigError(Exception):
    """A config problem, phrased as one line: file, key, reason, fix."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class PathsConfig(_Section, frozen=True):
    state_dir: str = ""
    runtime_dir: str = ""
    hotfolder: str = ""


class DaemonConfig(_Section, frozen=True):
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    heartbeat_s: float = 1.0
    # members of this Unix group may cancel and retry anyone's jobs
    admin_group: str = ""
    # members of this group may connect (the socket files are group-owned, mode 0660); "" = the daemon's group
    socket_group: str = ""
    # jobs one user may have waiting in the queue (admins and hot-folder jobs included); 0 = no limit
    max_queued_per_user: int = 10_000
    # the highest priority a member may give her own jobs (-100..100); above it only admins
    member_max_priority: int = 0
    # event rows the store keeps: the newest N (0 = no count bound), none older than the days (0 = no age
    # bound); each job's last 200 history lines stay regardless (clients resync by snapshot, never from these)
    event_retention: int = 100_000
    event_retention_days: float = 30.0
    # who sees a job's content (page text, logs, outputs, streamed tokens): every member ("team"), or only its
    # owner and admins ("owner"); that a job exists, its state and progress are every member's either way
    visibility: Literal["team", "owner"] = "team"


class HotfolderConfig(_Section, frozen=True):
    enabled: bool = True
    # a file is taken once its size and mtime have been quiet this long (and it parses)
    settle_s: float = 2.0
    # re-scan the inbox this often as well as listening to events: some file systems (NFS, CIFS) send none
    rescan_s: float = 30.0
    # the LoRA adapter dropped files are read with (a name `ftctl deploy` served; "" = the base model)
    adapter: str = ""


class OcrConfig(_Section, frozen=True):
    engine: Literal["auto", "vllm", "remote", "cpu"] = "auto"
    dpi: int = 144
    page_timeout_s: float = 120.0
    workers: int = 2
    # OCR documents open at once; their pages share the engine through one page queue (daemon/ocr/pages.py),
    # so this bounds memory (open PDFs, jobs waiting for their turn), not how full the engine is
    max_concurrent_jobs: int = 64
    prompt: str = "default"  # a file name in configs/prompts/ (without .txt) or a path
    # the CPU engine's text-layer Markdown: layout (better headings and tables) or legacy (≈5× faster)
    markdown_mode: Literal["layout", "legacy"] = "layout"


class VllmConfig(_Section, frozen=True):
    executable: str = "vllm"  # or the full path of a vllm in its own venv
    model: str = ""
    served_name: str = ""
    max_model_len: int = 8192
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.85
    max_pixels: int = 1003520  # also the budget from-pages renders training pages at; deploy checks adapters
    min_pixels: int = 3136
    max_tokens: int = 4096
    temperature: float = 0.0
    # more fields for every OCR request (vLLM's chat API): top_p, top_k, repetition_penalty, min_tokens, stop …
    sampling: dict[str, Any] = {}
    quantization: str = ""
    enable_lora: bool = True
    max_lora_rank: int = 64
    enable_sleep_mode: bool = True
    extra_args: list[str] = []
    env: dict[str, str] = {}
    start_timeout_s: float = 600.0
    # an idle engine is probed this often with a one-token completion, which must come back within as long
    health_timeout_s: float = 60.0
    # vLLM in a network namespace of its own: its internal TCP ports reachable by no other local user
    private_network: bool = True
    max_in_flight: int = 64
    # tokens vLLM gathers per streamed chunk (--stream-interval): one chunk per token costs the server and the
    # daemon a message each; text still shows as it comes. 0 leaves the flag out (vLLM releases before it)
    stream_interval: int = 8
    gpus: int = 1
    # with [cluster] backend = "ray": this many `vllm serve` replicas as Ray jobs on GPU nodes; 0 = one local engine
    replicas: int = 0


class RemoteConfig(_Section, frozen=True):
    urls: list[str] = []
    model: str = ""
    # a file holding the servers' API key (sent as Authorization: Bearer); owned by the daemon's user, 0600
    api_key_file: str = ""


class TrainConfig(_Section, frozen=True):
    llamafactory_cli: str = "llamafactory-cli"
    env: dict[str, str] = {}
    save_total_limit: int = 3
    graceful_stop_s: float = 60.0
    templates_dir: str = ""  # "" = configs/llamafactory of this installation
    datasets_dir: str = ""  # "" = <state_dir>/datasets (holds dataset_info.json)
    logging_steps: int = 1
    stop_term_s: float = 15.0  # after the graceful stop: SIGTERM, then SIGKILL after this many seconds
    # folders whose models every member may train from (model_name_or_path, adapters); [] = hub ids only
    model_roots: list[str] = []
    # model folders whose own Python (config.json auto_map) a job may run with trust_remote_code: true
    trusted_models: list[str] = []
    # more LLaMA-Factory keys members may --set, beyond daemon/train/access.py's ALLOWED_KEYS
    extra_allowed_keys: list[str] = []


class SchedulerConfig(_Section, frozen=True):
    share_gpus: bool = False
    min_free_gib: float = 0.0
    gpu_poll_s: float = 2.0
    # memory in use on a GPU with no listed process that still counts as idle (driver, display)
    idle_used_mib: float = 1024.0
    # jobs that run at once without GPUs (on the CPU)
    cpu_slots: int = 1
    # a recorded GPU snapshot (JSON, daemon/gpus/nvml.py) used instead of NVML: demos and tests without GPUs
    gpu_snapshot_file: str = ""


class SpoolConfig(_Section, frozen=True):
    # the largest file a client may hand over (a PDF, a dataset's records or one of its images)
    max_file_mib: int = 4096
    # a handover is refused when it would leave less than this free on the state dir's file system
    min_free_gib: float = 2.0
    # a handed-over file no queued, running or interrupted job needs is removed this long after its last use
    keep_hours: float = 24.0


class ClusterConfig(_Section, frozen=True):
    # "local": trainers are child processes of the daemon; "ray": they are Ray jobs on a Ray cluster
    backend: Literal["local", "ray"] = "local"
    # the Ray head's dashboard, where Ray Jobs and the state API answer: "http://head:8265"
    address: str = ""
    # a folder every node sees at the same path (job dirs, checkpoints, adapters); required with ray
    shared_dir: str = ""
    # the cluster's token (Ray's token authentication, RAY_AUTH_MODE=token); "" = a cluster without one
    auth_token_file: str = ""


class MetricsConfig(_Section, frozen=True):
    # the Prometheus endpoint: a Unix socket (a name is taken inside the runtime dir), or 127.0.0.1:PORT / [::1]:PORT
    # (loopback only: every local user can read it); "" = off
    listen: str = "metrics.sock"


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
_TCP_RE = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:/\[\]]+)):(?P<port>\d{1,5})$")


def metrics_tcp(listen: str) -> tuple[str, int] | None:
    """(host, port) when ``[metrics] listen`` names a TCP address, None when it names a Unix socket."""
    m = _TCP_RE.match(listen)
    if m is None:
        return None
    return m.group("v6") or m.group("host"), int(m.group("port"))


class Config(_Section, frozen=True):
    paths: PathsConfig = PathsConfig()
    daemon: DaemonConfig = DaemonConfig()
    hotfolder: HotfolderConfig = HotfolderConfig()
    ocr: OcrConfig = OcrConfig()
    vllm: VllmConfig = VllmConfig()
    remote: RemoteConfig = RemoteConfig()
    train: TrainConfig = TrainConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    spool: SpoolConfig = SpoolConfig()
    metrics: MetricsConfig = MetricsConfig()
    cluster: ClusterConfig = ClusterConfig()


@dataclass(frozen=True)
class Paths:
    state_dir: Path
    runtime_dir: Path
    hotfolder: Path

    @property
    def ctl_endpoint(self) -> str:
        return f"ipc://{self.runtime_dir / 'ctl.sock'}"

    @property
    def events_endpoint(self) -> str:
        return f"ipc://{self.runtime_dir / 'events.sock'}"

    @property
    def ctl_socket(self) -> Path:
        return self.runtime_dir / "ctl.sock"

    @property
    def events_socket(self) -> Path:
        return self.runtime_dir / "events.sock"

    @property
    def handover_socket(self) -> Path:
        """Where clients pass open files to the daemon (shared/handover.py)."""
        return self.runtime_dir / "handover.sock"

    @property
    def inbox(self) -> Path:
        return self.hotfolder / "inbox"

    @property
    def outbox(self) -> Path:
        return self.hotfolder / "outbox"

    @property
    def done(self) -> Path:
        return self.hotfolder / "done"

    @property
    def failed(self) -> Path:
        return self.hotfolder / "failed"


@dataclass(frozen=True)
class Settings:
    config: Config
    paths: Paths
    source: str  # where the config came from, for messages
    config_file: Path | None = None
    home: Path | None = None


_PATH_RE = re.compile(r"at `\$\.?([^`]*)`")
# keys an older ftmllm documented that no code ever read: setting one must not look as if it did something
_REMOVED_KEYS = {
    "daemon.tcp_endpoint": "remote clients are not supported: run ftctl/ftui on the server, over ssh",
    "daemon.curve_authorized_keys": "remote clients are not supported: run ftctl/ftui on the server, over ssh",
}


def parse_config(text: str, source: str) -> Config:
    """Decode TOML text into a Config; every problem comes back as one line naming file, key and fix."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML ({exc}); fix the syntax, see configs/ftmllm.toml") from None
    for dotted, why in _REMOVED_KEYS.items():
        section, _, key = dotted.partition(".")
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raise ConfigError(f"{source}: key '{dotted}' does nothing ({why}); remove it")
    try:
        cfg = msgspec.convert(raw, type=Config)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        match = _PATH_RE.search(msg)
        key = match.group(1) if match else ""
        reason = _PATH_RE.sub("", msg).strip(" -")
        unknown = re.match(r"Object contains unknown field `([^`]+)`", reason)
        if unknown:
            full = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
            raise ConfigError(
                f"{source}: unknown key '{full}'; remove it or check the spelling against configs/ftmllm.toml"
            ) from None
        raise ConfigError(f"{source}: key '{key}': {reason}; see configs/ftmllm.toml for the allowed values") from None
    tcp = metrics_tcp(cfg.metrics.listen)
    if tcp is not None and tcp[0] not in LOOPBACK_HOSTS:
        raise ConfigError(f"{source}: key 'metrics.listen': {cfg.metrics.listen} is not a loopback address and the "
                          "endpoint has no authentication; use 127.0.0.1:PORT, [::1]:PORT or a Unix socket")
    return cfg


def _user_paths() -> tuple[Path, Path, Path]:
    home = Path.home()
    state = Path(os.environ.get("XDG_STATE_HOME") or home / ".local" / "state") / "ftmllm"
    xdg_run = os.environ.get("XDG_RUNTIME_DIR")
    if xdg_run:
        runtime = Path(xdg_run) / "ftmllm"
    else:
        # logind's dir is the user's alone (0700) and gone at reboot, as sockets should be; a state dir
        # under the user's home is the fallback nobody else can create first (unlike /tmp/ftmllm-<uid>)
        user_run = Path(f"/run/user/{os.getuid()}")
        runtime = user_run / "ftmllm" if is_own_private_dir(user_run) else state / "run"
    return state, runtime, home / "ftmllm"


def resolve_paths(cfg: Config, home: Path | None, env: dict[str, str] | None = None) -> Paths:
    env = dict(os.environ) if env is None else env
    if home is not None:
        home = home.expanduser().absolute()
        state, runtime, hot = home / "state", home / "run", home
    elif env.get("STATE_DIRECTORY") and env.get("RUNTIME_DIRECTORY"):
        # systemd may list several dirs separated by ':'; ours is the first
        state = Path(env["STATE_DIRECTORY"].split(":")[0])
        runtime = Path(env["RUNTIME_DIRECTORY"].split(":")[0])
        hot = _user_paths()[2]  # ~/ftmllm for a user unit; the system config sets [paths] hotfolder
    else:
        state, runtime, hot = _user_paths()
    if cfg.paths.state_dir:
        state = Path(cfg.paths.state_dir).expanduser()
    if cfg.paths.runtime_dir:
        runtime = Path(cfg.paths.runtime_dir).expanduser()
    if cfg.paths.hotfolder:
        hot = Path(cfg.paths.hotfolder).expanduser()
    paths = Paths(state_dir=state.absolute(), runtime_dir=runtime.absolute(), hotfolder=hot.absolute())
    longest = str(paths.handover_socket)
    if len(longest.encode()) > MAX_IPC_PATH:
        raise ConfigError(
            f"runtime dir {paths.runtime_dir} is too long for a Unix socket path ({len(longest)} > "
            f"{MAX_IPC_PATH} bytes); set [paths] runtime_dir to a shorter directory"
        )
    return paths


SYSTEM_CONFIG = Path("/etc/ftmllm/ftmllm.toml")


def user_config_file() -> Path | None:
    """``$XDG_CONFIG_HOME/ftmllm/ftmllm.toml`` (else ``~/.config/ftmllm/ftmllm.toml``) when it exists."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    path = Path(base) / "ftmllm" / "ftmllm.toml"
    return path if path.is_file() else None


def changed_keys(old: Config, new: Config) -> list[str]:
    """The dotted keys whose values differ between two configs, in file order."""
    a, b = msgspec.to_builtins(old), msgspec.to_builtins(new)
    return [f"{section}.{key}" for section in a for key in a[section] if a[section][key] != b[section][key]]


def load_settings(config_file: str | Path | None = None, home: str | Path | None = None,
                  client: bool = False) -> Settings:
    """The one way both daemon and clients find their config (see the module docstring).

    A client given nothing uses the user's own daemon if one runs, else the system service's config."""
    env_file = os.environ.get("FTMLLM_CONFIG")
    env_home = os.environ.get("FTMLLM_HOME")
    file = Path(config_file) if config_file else (Path(env_file) if env_file else None)
    home_dir = Path(home) if home else (Path(env_home) if env_home else None)
    if file is None and home_dir is None:
        # --home keeps a setup self-contained (make run, tests): no file from the user's dirs leaks into it
        file = user_config_file()
    if client and file is None and home_dir is None and SYSTEM_CONFIG.exists():
        own = resolve_paths(Config(), None)
        if not own.ctl_socket.exists():
            file = SYSTEM_CONFIG
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"{file}: cannot read the config file ({exc.strerror}); "
                "check the path given with --config or FTMLLM_CONFIG"
            ) from None
        cfg = parse_config(text, str(file))
        source = str(file)
    else:
        cfg = Config()
        source = "built-in defaults"
    return Settings(config=cfg, paths=resolve_paths(cfg, home_dir), source=source, config_file=file, home=home_dir)


def default_config_toml() -> str:
    """Every key with its default, as TOML (what configs/ftmllm.toml must document)."""
    lines: list[str] = []
    for section_name, section in msgspec.structs.asdict(Config()).items():
        lines.append(f"[{section_name}]")
        for key, value in msgspec.structs.asdict(section).items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))
