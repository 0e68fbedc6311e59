"""What a running trainer may touch, for Landlock (daemon/children/landlock.py): submit-time checks (access.py)
decide what a job names; this keeps the trainer to it while it runs, so that a link swapped after submit, a
bug, or code that slipped through cannot read the store, other jobs' folders or the members' files.

Read: the trainer's Python (its venv and the interpreter it was made from), the model roots and trusted
models, the hub cache (hub ids), the datasets and the media folders of the job's datasets, the deepspeed
configs, the adapters the job names (already checked: the caller's own jobs or the roots). Write: the job's
folder only, with the caches a trainer writes (datasets' Arrow files, transformers' remote-code modules,
Triton, matplotlib) pointed into its ``tmp/``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.train.access import Policy
from daemon.train.datasets import MEDIA_LIST_SUFFIX, dataset_file, read_dataset_info

TMP_DIR = "tmp"  # in the job's folder: the trainer's TMPDIR and caches


@dataclass(frozen=True)
class TrainerRules:
    read: tuple[str, ...]
    write: tuple[str, ...]
    tmp: str
    env: dict[str, str] = field(default_factory=dict)  # on top of the trainer's environment


def trainer_rules(*, cli: str, job_dir: Path, params: Mapping[str, Any], policy: Policy, datasets_dir: Path,
                  env: Mapping[str, str]) -> TrainerRules:
    tmp = job_dir / TMP_DIR
    read: list[str] = [cli, os.path.realpath(cli), *python_folders(cli), *policy.readable_roots(), _hub_cache(env),
                       str(datasets_dir), str(policy.deepspeed_dir)]
    read += media_folders(params, datasets_dir)
    for key in ("model_name_or_path", "adapter_name_or_path"):
        value = params.get(key)
        if isinstance(value, str):
            read += [os.path.realpath(p.strip()) for p in value.split(",") if os.path.isabs(p.strip())]
    caches = {"HF_DATASETS_CACHE": tmp / "datasets", "HF_MODULES_CACHE": tmp / "modules",
              "TRITON_CACHE_DIR": tmp / "triton", "MPLCONFIGDIR": tmp / "matplotlib"}
    return TrainerRules(read=tuple(dict.fromkeys(read)), write=(str(job_dir),), tmp=str(tmp),
                        env={k: str(v) for k, v in caches.items()})


def python_folders(cli: str) -> list[str]:
    """The venv ``cli`` lives in and the Python installation its interpreter comes from."""
    folders: list[str] = []
    script = Path(cli)
    venv = script.parent.parent
    if (venv / "pyvenv.cfg").is_file():
        folders += [str(venv), os.path.realpath(venv)]
        home = _pyvenv_home(venv / "pyvenv.cfg")
        if home:
            folders.append(os.path.realpath(Path(home).parent))
    interpreter = _shebang(script)
    if interpreter:
        folders.append(str(Path(os.path.realpath(interpreter)).parent.parent))
    return folders


def media_folders(params: Mapping[str, Any], datasets_dir: Path) -> list[str]:
    """The folders of the media files of the job's datasets (``dataset add --images`` leaves them in place)."""
    names = [n.strip() for key in ("dataset", "eval_dataset") for n in str(params.get(key) or "").split(",")]
    try:
        info = read_dataset_info(datasets_dir)
    except ValueError:
        return []
    folders: dict[str, None] = {}
    for name in filter(None, names):
        entry = info.get(name)
        path = dataset_file(datasets_dir, entry) if isinstance(entry, dict) else None
        if path is None:
            continue
        try:
            lines = path.with_suffix(MEDIA_LIST_SUFFIX).read_text(encoding="utf-8").splitlines()
        except OSError:
            continue
        for line in lines:
            if os.path.isabs(line):
                folders[os.path.dirname(line)] = None
    return list(folders)


def _hub_cache(env: Mapping[str, str]) -> str:
    if env.get("HF_HUB_CACHE"):
        return env["HF_HUB_CACHE"]
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                              "huggingface")
    return os.path.join(home, "hub")


def _pyvenv_home(cfg: Path) -> str:
    for line in cfg.read_text(encoding="utf-8", errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "home":
            return value.strip()
    return ""


def _shebang(script: Path) -> str:
    try:
        with script.open("rb") as fh:
            first = fh.readline(4096)
    except OSError:
        return ""
    if not first.startswith(b"#!"):
        return ""
    words = first[2:].decode(errors="replace").split()
    return words[0] if words and os.path.isabs(words[0]) else ""
