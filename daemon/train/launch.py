"""Start, stop and inspect one `llamafactory-cli train|export job.yaml` child.

* The child gets its own session and process group (a multi-GPU run is cli → torchrun → one worker per
  GPU; killing the group is how GPU memory is reliably given back), stdin from /dev/null and
  stdout+stderr to a log file, never a pipe (a pipe nobody drains froze LlamaBoard's training).
* Signal dispositions and the signal mask are reset in the child: a daemon started from a non-interactive
  shell may have SIGINT ignored, and a thread that blocked signals would hand that mask to the child, so
  SIGABRT/SIGTERM would never arrive.
* Stop: LLaMA-Factory's LogCallback catches SIGABRT in LlamaBoard mode (LLAMABOARD_ENABLED=1) and stops at
  the next step, saving the adapter. SIGABRT goes only to processes that catch it (read from
  /proc/PID/status SigCgt): the cli and torchrun do not, and would dump core instead of waiting for their
  workers. Then SIGTERM to the group, then SIGKILL.
* What was saved is read from output_dir (checkpoint-N folders, the adapter files, trainer_state.json's
  global_step vs max_steps) — the exit status alone cannot tell a graceful stop from a finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# Environment the daemon must not hand to a trainer: systemd's notify/watchdog (the child would ping as if
# it were the service) and socket activation.
_DROPPED_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
# Signals whose dispositions the child gets back to default (SIGKILL/SIGSTOP cannot be changed).
_RESET_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGABRT, signal.SIGHUP, signal.SIGQUIT,
                  signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE, signal.SIGCHLD)

# Files that make a directory hold a saved model or adapter (transformers/peft names).
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

StopHow = Literal["already_exited", "graceful", "terminated", "killed"]


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
    gpus: Sequence[int],
    extra: Mapping[str, str] = {},
    spec_env: Mapping[str, str] = {},
    deepspeed: bool = False,
) -> dict[str, str]:
    """The child's environment: the daemon's, minus systemd's, plus ``[train] env`` from the config, plus
    what the spec needs (LLAMABOARD_*), with the GPUs the scheduler gave (none: the CPU)."""
    env = {k: v for k, v in base.items() if k not in _DROPPED_ENV and not k.startswith("LLAMABOARD_")}
    env.update(extra)
    env.update(spec_env)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    # several GPUs need one process each; DeepSpeed needs torchrun even on one GPU ("Please use
    # `FORCE_TORCHRUN=1` to launch DeepSpeed training.")
    if len(gpus) > 1 or deepspeed:
        env["FORCE_TORCHRUN"] = "1"
    else:
        env.pop("FORCE_TORCHRUN", None)
    env.setdefault("PYTHONUNBUFFERED", "1")  # log lines reach the file as they happen
    return env


def _child_setup() -> None:  # runs in the child between fork and exec: only async-signal-safe-ish calls
    for sig in _RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


@dataclass(frozen=True)
class ProcessRecord:
    """What the store keeps of a running trainer, to find it again after a daemon crash."""

    pid: int
    pgid: int
    start_ticks: int  # /proc/PID/stat starttime: tells our process from a later one with the same pid


@dataclass(frozen=True)
class StopOutcome:
    how: StopHow
    returncode: int | None
    seconds: float


class TrainProcess:
    """One running trainer. Start with :meth:`start`; one owner (the job's task)."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self._proc = proc
        self.log_path = log_path
        self.pid = proc.pid
        self.pgid = proc.pid  # start_new_session: the child leads its own session and group
        self.record = ProcessRecord(pid=proc.pid, pgid=proc.pid, start_ticks=_start_ticks(proc.pid) or 0)

    @classmethod
    def start(cls, argv: Sequence[str], env: Mapping[str, str], *, log_path: Path,
              cwd: Path | None = None) -> TrainProcess:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            try:
                proc = subprocess.Popen(
                    list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_child_setup,
                    close_fds=True,
                )
            except OSError as exc:
                raise LaunchError(f"cannot start {argv[0]}: {exc.strerror}; check [train] llamafactory_cli") \
                    from None
        return cls(proc, log_path)

    @property
    def returncode(self) -> int | None:
        return self._proc.poll()

    async def wait(self, interval: float = 0.1) -> int:
        """The leader's exit status, then waits until the rest of its group is gone too (torchrun workers
        outlive a crashed launcher; their GPU memory is only free once they are)."""
        fd = _pidfd(self.pid)
        try:
            while self._proc.poll() is None:
                if fd is not None:
                    await _readable(fd, interval * 10)
                else:
                    await asyncio.sleep(interval)
        finally:
            if fd is not None:
                os.close(fd)
        while group_members(self.pgid):
            await asyncio.sleep(interval)
        rc = self._proc.returncode
        assert rc is not None
        return rc

    def abort_catchers(self) -> list[int]:
        """Processes of the group that catch SIGABRT: LLaMA-Factory's trainers in LlamaBoard mode."""
        return [pid for pid in group_members(self.pgid) if _catches(pid, signal.SIGABRT)]

    async def stop(self, graceful_s: float, term_s: float = 15.0, kill_s: float = 10.0) -> StopOutcome:
        """Stop the trainer, saving what can be saved: SIGABRT to each trainer process once (its flag stays
        set) while it finishes its step and saves; then SIGTERM to the group; then SIGKILL to the group."""
        t0 = time.monotonic()
        if not self._alive():
            return StopOutcome("already_exited", self._proc.poll(), 0.0)
        deadline = t0 + graceful_s
        sent: set[int] = set()
        while graceful_s > 0 and time.monotonic() < deadline:
            targets = [pid for pid in self.abort_catchers() if pid not in sent]
            if not targets and not sent:
                break  # still importing (nothing to save yet) or no LlamaBoard mode: go on to SIGTERM
            # Once per pid: a trainer shutting down gets Python's default handlers back, and a second
            # SIGABRT then would abort it. Workers that appear later (torchrun) get theirs when seen.
            for pid in targets:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGABRT)
                sent.add(pid)
            if await self._wait_gone(min(1.0, deadline - time.monotonic())):
                return StopOutcome("graceful", self._proc.poll(), time.monotonic() - t0)
        steps: tuple[tuple[signal.Signals, StopHow, float], ...] = (
            (signal.SIGTERM, "terminated", term_s), (signal.SIGKILL, "killed", kill_s))
        for sig, how, wait_s in steps:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, sig)
            if await self._wait_gone(wait_s):
                return StopOutcome(how, self._proc.poll(), time.monotonic() - t0)
        return StopOutcome("killed", self._proc.poll(), time.monotonic() - t0)

    def _alive(self) -> bool:
        return self._proc.poll() is None or bool(group_members(self.pgid))

    async def _wait_gone(self, seconds: float) -> bool:
        end = time.monotonic() + max(0.0, seconds)
        while True:
            if not self._alive():
                return True
            if time.monotonic() >= end:
                return False
            await asyncio.sleep(0.05)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = _read_stat(int(entry.name))
        if stat and stat[2] == pgid and stat[0] != "Z":
            out.append(int(entry.name))
    return out


def kill_leftover(record: ProcessRecord, term_s: float = 15.0) -> bool:
    """After a daemon crash: end the trainer group it left behind (if it is still ours). The kernel does
    not reuse a pid as long as a process group of that id has members, so members found are ours unless
    the leader's pid now belongs to a newer process. Returns whether anything was killed."""
    leader = _read_stat(record.pid)
    if leader and leader[3] != record.start_ticks:
        return False
    if not group_members(record.pgid):
        return False
    for sig, wait_s in ((signal.SIGTERM, term_s), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(record.pgid, sig)
        end = time.monotonic() + wait_s
        while time.monotonic() < end and group_members(record.pgid):
            time.sleep(0.05)
        if not group_members(record.pgid):
            break
    return True


def _read_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgrp, starttime) from /proc/PID/stat; None if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()  # the command name may contain spaces and parentheses
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def _start_ticks(pid: int) -> int | None:
    stat = _read_stat(pid)
    return stat[3] if stat else None


def _catches(pid: int, sig: int) -> bool:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


async def _readable(fd: int, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await asyncio.wait_for(fut, timeout)
    except TimeoutError:
        pass
    finally:
        loop.remove_reader(fd)


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
