"""What is LLaMA-Factory's in running one `llamafactory-cli train|export job.yaml`: finding the cli, its argv and
environment, how it stops gracefully, and what it saved.

* The process itself (own process group, log file, stop ladder, record) is :mod:`daemon.children`'s.
* Stop: LLaMA-Factory's LogCallback catches SIGABRT in LlamaBoard mode (LLAMABOARD_ENABLED=1) and stops at
  the next step, saving the adapter. SIGABRT goes only to processes that catch it: the cli and torchrun do
  not, and would dump core instead of waiting for their workers. Then SIGTERM to the group, then SIGKILL.
* What was saved is read from output_dir (checkpoint-N folders, the adapter files, trainer_state.json's
  global_step vs max_steps) — the exit status alone cannot tell a graceful stop from a finish.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Self

from daemon.children.env import child_environ
from daemon.children.process import ChildProcess

# Files that make a directory hold a saved model or adapter (transformers/peft names).
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class LaunchError(RuntimeError):
    """The trainer could not be started; the message says why and what to change."""


def resolve_cli(value: str) -> str:
    """``train.llamafactory_cli``: a command on PATH, a path to it, or a venv directory holding it."""
    path = Path(value).expanduser()
    if path.is_dir():
        path = path / "bin" / "llamafactory-cli"
    if path.is_absolute() or os.sep in value:
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise LaunchError(f"llamafactory-cli not found at {path}; set [train] llamafactory_cli to the "
                              "executable or to the venv that has LLaMA-Factory installed")
        return str(path)
    found = shutil.which(value)
    if not found:
        raise LaunchError(f"'{value}' is not on the daemon's PATH; set [train] llamafactory_cli to the full "
                          "path of llamafactory-cli or to its venv")
    return found


def build_argv(cli: str, command: Literal["train", "export"], yaml_path: Path) -> list[str]:
    if command == "train" and re.search(r"\s", str(yaml_path)):
        # LLaMA-Factory's torchrun launcher re-splits its argv on whitespace
        raise LaunchError(f"job file path {yaml_path} contains a space, which LLaMA-Factory's torchrun launch "
                          "splits apart; use a state dir without spaces")
    return [cli, command, str(yaml_path)]


def build_env(
    *,
    base: Mapping[str, str],
    gpus: Sequence[int] | int,
    extra: Mapping[str, str] = {},
    spec_env: Mapping[str, str] = {},
    deepspeed: bool = False,
) -> dict[str, str]:
    """The child's environment: ``base`` for a child (an inherited LLAMABOARD_* dropped too), plus ``[train]
    env`` from the config, plus what the spec needs (LLAMABOARD_*), with the GPUs the scheduler gave (none:
    the CPU; a count: that many, which the cluster node the job lands on picks and names in
    CUDA_VISIBLE_DEVICES itself, see daemon/cluster)."""
    own = {k: v for k, v in base.items() if not k.startswith("LLAMABOARD_")}
    env = child_environ(own, extra, spec_env)
    if isinstance(gpus, int):
        env.pop("CUDA_VISIBLE_DEVICES", None)
        count = gpus
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
        count = len(gpus)
    # several GPUs need one process each; DeepSpeed needs torchrun even on one GPU ("Please use
    # `FORCE_TORCHRUN=1` to launch DeepSpeed training.")
    if count > 1 or deepspeed:
        env["FORCE_TORCHRUN"] = "1"
        # one process per GPU given; LLaMA-Factory's default (the devices torch sees) is 0 on a Ray node whose
        # GPUs are logical, and counts every GPU of a node whose CUDA_VISIBLE_DEVICES Ray did not narrow
        env["NPROC_PER_NODE"] = str(max(1, count))
    else:
        env.pop("FORCE_TORCHRUN", None)
        env.pop("NPROC_PER_NODE", None)
    env.setdefault("PYTHONUNBUFFERED", "1")  # log lines reach the file as they happen
    return env


class TrainProcess(ChildProcess):
    """One running ``llamafactory-cli``; its graceful stop is SIGABRT (see the module docstring)."""

    graceful_signal = signal.SIGABRT

    @classmethod
    def start(cls, argv: Sequence[str], env: Mapping[str, str], *, log_path: Path, cwd: Path | None = None) -> Self:
        try:
            return super().start(argv, env, log_path=log_path, cwd=cwd)
        except OSError as exc:
            raise LaunchError(f"cannot start {argv[0]}: {exc.strerror}; check [train] llamafactory_cli") from None

    def abort_catchers(self) -> list[int]:
        """Processes of the group that catch SIGABRT: LLaMA-Factory's trainers in LlamaBoard mode."""
        return self.catchers(signal.SIGABRT)


# ------------------------------------------------------------------------------------------ what was saved


@dataclass(frozen=True)
class SavedState:
    output_dir: Path
    checkpoints: tuple[int, ...]  # steps of the complete checkpoint-N folders, ascending
    adapter: bool  # a LoRA adapter in output_dir itself (saved at the end, or at a graceful stop)
    model: bool  # full model weights in output_dir itself
    global_step: int | None  # from output_dir/trainer_state.json (written last), else the last checkpoint's
    max_steps: int | None

    @property
    def last_checkpoint(self) -> Path | None:
        return self.output_dir / f"checkpoint-{self.checkpoints[-1]}" if self.checkpoints else None

    @property
    def finished(self) -> bool:
        """All requested steps ran (a graceful stop also saves, but earlier)."""
        return (self.adapter or self.model) and self.global_step is not None and self.max_steps is not None \
            and self.global_step >= self.max_steps

    def describe(self) -> str:
        steps = f"step {self.global_step} of {self.max_steps}" if self.global_step is not None else "step ?"
        if self.adapter or self.model:
            what = "adapter" if self.adapter else "model"
            if self.finished:
                return f"{what} saved in {self.output_dir} after all {self.max_steps} steps"
            return f"{what} saved in {self.output_dir} at {steps} (stopped early)"
        if self.checkpoints:
            return f"no final adapter; last checkpoint {self.last_checkpoint} ({steps})"
        return "nothing saved (stopped before the first checkpoint)"


def saved_state(output_dir: Path) -> SavedState:
    checkpoints = tuple(sorted(step for step, path in _checkpoint_dirs(output_dir) if _complete(path)))
    state = _trainer_state(output_dir / "trainer_state.json")
    if state is None and checkpoints:
        state = _trainer_state(output_dir / f"checkpoint-{checkpoints[-1]}" / "trainer_state.json")
    global_step = state.get("global_step") if state else None
    max_steps = state.get("max_steps") if state else None
    return SavedState(
        output_dir=output_dir,
        checkpoints=checkpoints,
        adapter=all_present(output_dir, ("adapter_config.json",)) and any_present(output_dir, ADAPTER_FILES),
        model=any_present(output_dir, MODEL_FILES),
        global_step=global_step if isinstance(global_step, int) else None,
        max_steps=max_steps if isinstance(max_steps, int) else None,
    )


@dataclass(frozen=True)
class ResumeInfo:
    checkpoint: Path | None  # what LLaMA-Factory will resume from (its own choice: the highest checkpoint-N)
    removed: tuple[Path, ...]  # incomplete checkpoints removed (a kill during a save leaves one)


def prepare_resume(output_dir: Path) -> ResumeInfo:
    """Before relaunching an interrupted job on the same output_dir: remove checkpoint folders a kill left
    half-written (transformers would pick the highest and fail on it), so the resume starts from the last
    complete one. trainer_log.jsonl stays; its repeated steps are dropped by progress.py."""
    removed = []
    for _, path in _checkpoint_dirs(output_dir):
        if not _complete(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    done = sorted(step for step, path in _checkpoint_dirs(output_dir))
    return ResumeInfo(checkpoint=output_dir / f"checkpoint-{done[-1]}" if done else None, removed=tuple(removed))


def _checkpoint_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    try:
        entries = list(os.scandir(output_dir))
    except OSError:
        return []
    out = []
    for e in entries:
        m = _CHECKPOINT_RE.match(e.name)
        if m and e.is_dir():
            out.append((int(m.group(1)), Path(e.path)))
    return out


def _complete(path: Path) -> bool:
    """transformers writes trainer_state.json after the weights; both present = a usable checkpoint."""
    return (path / "trainer_state.json").is_file() and (any_present(path, ADAPTER_FILES) or
                                                         any_present(path, MODEL_FILES))


def any_present(folder: Path, names: Sequence[str]) -> bool:
    return any((folder / n).is_file() for n in names)


def all_present(folder: Path, names: Sequence[str]) -> bool:
    return all((folder / n).is_file() for n in names)


def _trainer_state(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
