"""How ``vllm serve`` is started and what its end means: argv, environment, its private directory, exit and log
reading. Pure functions but for :func:`make_private_dir`; the supervisor (:mod:`daemon.engines.vllm_supervisor`)
runs what they build.

vLLM is reachable by the daemon alone: it listens on ``<private dir>/vllm.sock`` (``--uds``, no TCP port), its
own ZeroMQ ipc sockets go to the same directory (``VLLM_RPC_BASE_PATH``), and the directory is a fresh
``mkdtemp`` (0700, a random name nobody can create first), removed when the child goes. The TCP listeners its
engine still opens are hidden by a private network namespace (:mod:`daemon.children.private_net`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import tempfile
from collections.abc import Mapping
from pathlib import Path

from daemon.children.env import child_environ
from daemon.children.private_net import MARK
from shared.config import MAX_IPC_PATH, VllmConfig

LOG_TAIL_BYTES = 64 * 1024

# vLLM binds ZeroMQ ipc sockets at <VLLM_RPC_BASE_PATH or TMPDIR>/<uuid4>; past sun_path's 107 bytes the
# engine dies at start with a ZMQError. A deep TMPDIR (a test's tmp_path, a per-user tmp) must not do that.
_VLLM_IPC_NAME_LEN = 1 + 36
_ERROR_LINE = re.compile(r"(Error|error|ERROR|Exception|not supported|No such|out of memory|OOM)")


SOCKET_NAME = "vllm.sock"
PRIVATE_DIR_PREFIX = "ftvllm-"


def build_command(cfg: VllmConfig, executable: str, uds: str, served_name: str, gpus: int) -> list[str]:
    """The argv of ``vllm serve`` for this config, serving HTTP on the Unix socket ``uds`` only (vLLM ignores
    any --host/--port in ``extra_args`` once --uds is given)."""
    argv = [
        executable, "serve", cfg.model,
        "--uds", uds,
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
    if cfg.stream_interval > 0 and not any(a.startswith("--stream-interval") for a in cfg.extra_args):
        argv += ["--stream-interval", str(cfg.stream_interval)]
    if gpus > 1 and not any(a in ("-tp", "--tensor-parallel-size") or a.startswith("--tensor-parallel-size=")
                            for a in cfg.extra_args):
        argv += ["--tensor-parallel-size", str(gpus)]
    return argv + list(cfg.extra_args)


def build_env(cfg: VllmConfig, base: Mapping[str, str], gpu_indices: list[int], *,
              private_dir: Path | None = None) -> dict[str, str]:
    """The child's environment: ``base`` for a child, vLLM's switches for what the config enables, the GPUs,
    then ``[vllm] env`` from the config; vLLM's ipc sockets in ``private_dir`` whatever the config says."""
    env = child_environ(base)
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("VLLM_DO_NOT_TRACK", "1")
    if cfg.enable_lora:
        # /v1/load_lora_adapter loads any path the caller names: safe only because nobody but the daemon can
        # reach the socket
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if cfg.enable_sleep_mode:
        # /sleep and /wake_up are "development" endpoints in vLLM, and the same switch opens /collective_rpc,
        # /pause, /reset_prefix_cache…, none of them guarded by vLLM's API key. They stay on, reachable on the
        # private socket only: sleep is how training borrows the engine's GPUs in seconds, where stop/start
        # reloads the weights (minutes for a large model). With sleep mode off the switch stays off.
        env["VLLM_SERVER_DEV_MODE"] = "1"
    if gpu_indices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpu_indices)
    if cfg.private_network:
        # the namespace has only lo: vLLM's own guess (a UDP "connect" to 8.8.8.8) finds no route
        env.setdefault("VLLM_HOST_IP", "127.0.0.1")
    env.update(cfg.env)
    if private_dir is not None:
        env["VLLM_RPC_BASE_PATH"] = str(private_dir)  # not the config's: a shared directory would expose them
    return env


def make_private_dir() -> Path:
    """A fresh directory that only this user can enter (mkdtemp: 0700, a random name made with O_EXCL semantics,
    so nobody can create or replace it first), short enough for the sockets vLLM binds in it."""
    base = tempfile.gettempdir()
    # <base>/ftvllm-XXXXXXXX/<uuid4>: vLLM's longest socket name in it
    if len(os.fsencode(base.rstrip("/"))) + 1 + len(PRIVATE_DIR_PREFIX) + 8 + _VLLM_IPC_NAME_LEN > MAX_IPC_PATH:
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix=PRIVATE_DIR_PREFIX, dir=base))


def served_name_of(cfg: VllmConfig) -> str:
    return cfg.served_name or Path(cfg.model.rstrip("/")).name or cfg.model


def ipc_base_too_long(env: Mapping[str, str]) -> bool:
    """Whether vLLM started with ``env`` would put its ipc sockets past sun_path's limit."""
    if "VLLM_RPC_BASE_PATH" in env:
        return False  # chosen by the user: theirs to get right
    base = env.get("TMPDIR") or env.get("TEMP") or env.get("TMP") or "/tmp"  # tempfile.gettempdir()'s order
    return len(os.fsencode(base.rstrip("/"))) + _VLLM_IPC_NAME_LEN > MAX_IPC_PATH


def give_short_ipc_dir(env: dict[str, str]) -> Path | None:
    """If vLLM's ipc sockets would not fit under ``env``'s TMPDIR, make a short directory for them, point
    ``VLLM_RPC_BASE_PATH`` at it and return it (the caller removes it when vLLM is gone); else None. For a
    vLLM started outside the supervisor (tests); the supervisor gives its vLLM a :func:`make_private_dir`."""
    if not ipc_base_too_long(env):
        return None
    made = Path(tempfile.mkdtemp(prefix="ftvllm-", dir="/tmp"))
    env["VLLM_RPC_BASE_PATH"] = str(made)
    return made


def exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def launcher_complaint(path: Path) -> str:
    """The private-network launcher's own last line in the log (why it did not run vLLM), without its mark;
    "" if it wrote none."""
    for line in reversed(_log_tail(path)):
        if line.startswith(MARK):
            return line[len(MARK):].strip()
    return ""


def _log_tail(path: Path) -> list[str]:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            return fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []


def log_reason(path: Path) -> str:
    """The line of vLLM's log that best says why it stopped (the last error-looking line), shortened."""
    lines = _log_tail(path)
    for line in reversed(lines):
        text = line.strip()
        if text and _ERROR_LINE.search(text) and not text.startswith(("File ", "Traceback", "^")):
            return text[-300:]
    return next((ln.strip()[-300:] for ln in reversed(lines) if ln.strip()), "")
