"""Helpers for tests that run the real engines (vLLM CPU, LLaMA-Factory) from the project venv.

The engines live in their own cached venvs (tests/engines/venvs.py); this module builds or finds them, builds
the tiny Qwen2-VL checkpoint and dataset, and gives the env and flags that work on a CPU-only machine (facts
in shared/notes/cpu-test-stack.md). Everything here shells out; nothing imports torch or vllm.

    from tests.engines import stack
    model = stack.build_tiny_model(tmp_path / "model")
    with stack.running_vllm(model, tmp_path / "vllm") as server:
        ...  # server.base_url, server.proc, server.log

Every cached artefact lives under ${FTMLLM_TEST_CACHE:-~/.cache/ftmllm-test} and is keyed by the hash of
what builds it, so a changed script rebuilds and nothing half-built is reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from daemon.engines.vllm_command import give_short_ipc_dir

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / "fixtures"


def _load(path: Path) -> ModuleType:
    # The sibling scripts are also CLIs run by path; load them by path so no sys.path or package layout matters.
    spec = importlib.util.spec_from_file_location(f"_ftmllm_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


venvs = _load(HERE / "venvs.py")

TINY_MODEL_SCRIPT = FIXTURES / "tiny_qwen2vl.py"
TINY_DATASET_SCRIPT = FIXTURES / "tiny_dataset.py"

# Working `vllm serve` flags on CPU (start to /health in 25-75 s on 2 cores).
VLLM_FLAGS = [
    "--dtype", "bfloat16",
    "--max-model-len", "2048",
    "--limit-mm-per-prompt", '{"image":1,"video":0}',
    "--enforce-eager",
    "--skip-mm-profiling",
]


def cache_dir() -> Path:
    """Root of the engine test cache (venvs, tiny models)."""
    return Path(venvs.cache_root())


def vllm_venv() -> Path:
    """The ready vLLM CPU venv, built on first use (about 4 min; cached afterwards)."""
    return Path(venvs.ensure("vllm"))


def llamafactory_venv() -> Path:
    """The ready LLaMA-Factory venv, built on first use (about 4-6 min; cached afterwards)."""
    return Path(venvs.ensure("llamafactory"))


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:12]


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cached_build(kind: str, key: str, build: Any) -> Path:
    """Return cache_dir()/models/<kind>-<key>, running build(tmp_dir) once into a temp dir + rename."""
    models = cache_dir() / "models"
    final = models / f"{kind}-{key}"
    if final.is_dir():
        return final
    models.mkdir(parents=True, exist_ok=True)
    with _lock(f"model-{kind}"):
        if final.is_dir():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=models))
        try:
            build(tmp)
            os.rename(tmp, final)  # a model dir is relocatable; the rename makes it appear whole
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in models.glob(f"{kind}-*"):
            if old != final and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    return final


def _run_fixture(args: list[str], log_name: str) -> None:
    python = vllm_venv() / "bin" / "python"
    proc = subprocess.run([str(python), *args], capture_output=True, text=True, check=False,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
    if proc.returncode != 0:
        raise RuntimeError(f"{log_name} failed (exit {proc.returncode}); its output:\n{proc.stdout}\n{proc.stderr}")


def tiny_model_cached(seed: int = 0) -> Path:
    """The cached tiny Qwen2-VL checkpoint for `seed` (shared, read-only by convention)."""
    key = _digest(TINY_MODEL_SCRIPT.read_bytes(), str(seed), venvs.venv_path("vllm").name)

    def build(tmp: Path) -> None:
        _run_fixture([str(TINY_MODEL_SCRIPT), str(tmp), "--seed", str(seed)], "tiny_qwen2vl.py")

    return _cached_build(f"tiny-qwen2vl-s{seed}", key, build)


def build_tiny_model(dest: Path, seed: int = 0) -> Path:
    """Copy the tiny Qwen2-VL checkpoint (built once and cached) into `dest`; return `dest`."""
    shutil.copytree(tiny_model_cached(seed), dest, dirs_exist_ok=True)
    return dest


def tiny_lora_cached(seed: int = 0) -> Path:
    """The cached random LoRA adapter (rank 8, language-model q_proj/v_proj) for the tiny model."""
    model = tiny_model_cached(seed)
    key = _digest(TINY_MODEL_SCRIPT.read_bytes(), str(seed), model.name, "lora")

    def build(tmp: Path) -> None:
        _run_fixture([str(TINY_MODEL_SCRIPT), str(model), "--seed", str(seed), "--lora", str(tmp)],
                     "tiny_qwen2vl.py --lora")

    return _cached_build(f"tiny-lora-s{seed}", key, build)


def build_tiny_lora(dest: Path, seed: int = 0) -> Path:
    """Copy the tiny random LoRA adapter into `dest`; return `dest` (pair it with build_tiny_model(seed))."""
    shutil.copytree(tiny_lora_cached(seed), dest, dirs_exist_ok=True)
    return dest


def build_tiny_dataset(dest: Path, records: int = 8, size: int = 56) -> Path:
    """Write the tiny sharegpt image dataset (datasets "tiny_sft", "tiny_dpo") into `dest`; return `dest`."""
    _load(TINY_DATASET_SCRIPT).write_dataset(dest, records, size)
    return dest


def _engine_env(tmp: Path, extra: Mapping[str, str]) -> dict[str, str]:
    for sub in ("tmp", "hf"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp / "hf"),
        "TMPDIR": str(tmp / "tmp"),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def vllm_env(tmp: Path, *, lora: bool = False) -> dict[str, str]:
    """Environment for `vllm serve` on CPU; every cache points into `tmp`. lora=True allows runtime LoRA."""
    extra = {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
        "VLLM_CACHE_ROOT": str(tmp / "vllm-cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor-cache"),
    }
    if lora:
        extra["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return _engine_env(tmp, extra)


def vllm_launcher() -> list[str]:
    """argv prefix that starts the server: [<vllm venv>/bin/vllm, "serve"]."""
    return [str(vllm_venv() / "bin" / "vllm"), "serve"]


def vllm_args(model: Path, port: int, *, lora: bool = False, max_lora_rank: int = 8) -> list[str]:
    """Arguments after `vllm serve`: the model, loopback host/port and the flags that work on CPU."""
    args = [str(model), "--host", "127.0.0.1", "--port", str(port), *VLLM_FLAGS]
    if lora:
        args += ["--enable-lora", "--max-lora-rank", str(max_lora_rank)]
    return args


def vllm_command(model: Path, port: int, *, lora: bool = False) -> list[str]:
    """Full argv: vllm_launcher() + vllm_args()."""
    return [*vllm_launcher(), *vllm_args(model, port, lora=lora)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._uds = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._uds)
        self.sock = sock


def http_json(url: str, body: object | None = None, timeout: float = 60.0, uds: str | None = None,
              ) -> tuple[int, Any]:
    """GET (body None) or POST JSON; return (status, parsed JSON or text). HTTP errors are returned, not raised.
    With ``uds`` the request goes to that Unix socket (the daemon's vLLM) and only the path of ``url`` counts."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if uds is not None:
        conn = _UnixConnection(uds, timeout)
        try:
            conn.request("GET" if data is None else "POST", urllib.parse.urlsplit(url).path or "/", data, headers)
            resp = conn.getresponse()
            status, raw = resp.status, resp.read()
        finally:
            conn.close()
    else:
        req = urllib.request.Request(url, data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


@contextlib.contextmanager
def tcp_to_unix(uds: Callable[[], str]) -> Iterator[str]:
    """A TCP port on 127.0.0.1 that forwards each connection to the Unix socket ``uds()`` names at that moment
    (for a client that speaks only TCP, as the remote engine does, to reach the daemon's vLLM); yields
    ``http://127.0.0.1:PORT``. Test-only: it opens to every local user what the daemon keeps private."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    stop = threading.Event()
    open_socks: set[socket.socket] = set()

    def pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                server.connect(uds())
            except OSError:
                client.close()
                server.close()
                continue
            open_socks.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()

    acceptor = threading.Thread(target=serve, daemon=True)
    acceptor.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        acceptor.join(5)
        listener.close()
        for sock in open_socks:
            sock.close()


@dataclass
class VllmServer:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    model: Path
    ipc_dir: Path | None = None  # made when the workdir is too deep for vLLM's ipc sockets; removed by stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the server's process group (it owns the engine), SIGKILL the group after `timeout`."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.ipc_dir is not None:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)  # vLLM leaves its socket files behind
        return int(self.proc.returncode)


def start_vllm(model: Path, workdir: Path, *, lora: bool = False, port: int | None = None,
               extra_args: list[str] | None = None) -> VllmServer:
    """Start `vllm serve` in its own process group, logging to workdir/vllm.log; do not wait for it."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = workdir / "vllm.log"
    env = vllm_env(workdir, lora=lora)
    ipc_dir = give_short_ipc_dir(env)  # a deep tmp_path (CI's /tmp/pytest-of-root/pytest-100/…)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*vllm_command(model, port, lora=lora), *(extra_args or [])],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=workdir, start_new_session=True,
        )
    return VllmServer(proc=proc, port=port, log=log, model=model, ipc_dir=ipc_dir)


def wait_healthy(server: VllmServer, deadline_s: float = 300.0) -> float:
    """Poll /health until 200; return seconds waited. Raises with the log tail if it exits or times out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        if server.proc.poll() is not None:
            tail = server.log.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"vllm exited with {server.proc.returncode} before /health answered:\n{tail}")
        with contextlib.suppress(OSError):
            status, _ = http_json(server.base_url + "/health", timeout=2)
            if status == 200:
                return time.monotonic() - t0
        time.sleep(0.5)  # polling a condition with a deadline, not synchronising on time
    tail = server.log.read_text(errors="replace")[-4000:]
    server.stop()
    raise TimeoutError(f"vllm did not answer /health within {deadline_s:.0f}s; log tail:\n{tail}")


@contextlib.contextmanager
def running_vllm(model: Path, workdir: Path, *, lora: bool = False,
                 extra_args: list[str] | None = None) -> Iterator[VllmServer]:
    """Start vllm, wait for /health, yield it, then stop the whole process group."""
    server = start_vllm(model, workdir, lora=lora, extra_args=extra_args)
    try:
        wait_healthy(server)
        yield server
    finally:
        server.stop()


def llamafactory_env(tmp: Path) -> dict[str, str]:
    """Environment for `llamafactory-cli` on CPU; caches point into `tmp`."""
    return _engine_env(tmp, {
        "DISABLE_VERSION_CHECK": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_DATASETS_CACHE": str(tmp / "hf" / "datasets"),
    })


def llamafactory_cli() -> Path:
    return llamafactory_venv() / "bin" / "llamafactory-cli"


def sft_config(model: Path, dataset_dir: Path, output_dir: Path, **overrides: object) -> dict[str, object]:
    """A 10-step LoRA SFT config that runs on CPU in well under a minute (override any key)."""
    config: dict[str, object] = {
        "model_name_or_path": str(model),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_target": "all",
        "lora_rank": 8,
        "dataset_dir": str(dataset_dir),
        "dataset": "tiny_sft",
        "template": "qwen2_vl",
        "image_max_pixels": 12544,
        "cutoff_len": 512,
        "overwrite_cache": True,
        "preprocessing_num_workers": 1,
        "dataloader_num_workers": 0,
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
        "logging_steps": 1,
        "save_steps": 5,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1.0e-3,
        "max_steps": 10,
        "lr_scheduler_type": "cosine",
        "bf16": False,
        "report_to": "none",
    }
    config.update(overrides)
    return config


def write_yaml(path: Path, config: Mapping[str, object]) -> Path:
    """Write a flat config as YAML (each value JSON-encoded, which YAML reads as is); atomic."""
    lines = [f"{key}: {json.dumps(value)}" for key, value in config.items()]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path
