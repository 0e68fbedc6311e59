"""How ``vllm serve`` is started and what its end means: argv, environment, port, ipc directory, exit and log
reading. Pure functions (the port and ipc helpers touch the system only to look); the supervisor
(:mod:`daemon.engines.vllm_supervisor`) runs what they build.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path

from daemon.children.env import child_environ
from shared.config import MAX_IPC_PATH, VllmConfig

LOG_TAIL_BYTES = 64 * 1024

# vLLM binds ZeroMQ ipc sockets at <VLLM_RPC_BASE_PATH or TMPDIR>/<uuid4>; past sun_path's 107 bytes the
# engine dies at start with a ZMQError. A deep TMPDIR (a test's tmp_path, a per-user tmp) must not do that.
_VLLM_IPC_NAME_LEN = 1 + 36
_ERROR_LINE = re.compile(r"(Error|error|ERROR|Exception|not supported|No such|out of memory|OOM)")


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


def build_env(cfg: VllmConfig, base: Mapping[str, str], gpu_indices: list[int]) -> dict[str, str]:
    """The child's environment: ``base`` for a child, vLLM's switches for what the config enables, the GPUs,
    then ``[vllm] env`` from the config."""
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
