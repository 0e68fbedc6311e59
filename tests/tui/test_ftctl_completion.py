"""Shell completion (issue 16): ``ftctl completion bash|zsh`` prints a script that completes commands, options
and choices by itself, and job ids, templates and datasets from the live daemon, through a real bash and the
real ftctl; silent and quick when the daemon is down."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.protocol import JobDetail, ShowJob, Submit
from tests.daemon_proc import ROOT, DaemonProc, wait_for


@pytest.fixture
def on_path() -> Iterator[Path]:
    """A folder with an ``ftctl`` that runs this checkout's, as an installed console script would."""
    folder = Path(tempfile.mkdtemp(prefix="ftcomp"))
    exe = folder / "ftctl"
    exe.write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec "{sys.executable}" -m tui.ftctl "$@"\n')
    exe.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def script(shell: str) -> str:
    r = subprocess.run([sys.executable, "-m", "tui.ftctl", "completion", shell], capture_output=True, text=True,
                       cwd=ROOT, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout


def complete(bash_script: Path, words: list[str], home: Path, path: Path) -> tuple[list[str], str, float]:
    """What bash offers for the last of ``words`` (COMPREPLY), what it printed on stderr, and how long it took."""
    line = " ".join(words)
    body = (f"source {bash_script}\nCOMP_WORDS=({' '.join(repr(w) for w in words)})\n"
            f"COMP_CWORD={len(words) - 1}\nCOMP_LINE={line!r}\nCOMP_POINT=${{#COMP_LINE}}\n"
            "_shtab_ftctl\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
    env = {**os.environ, "PATH": f"{path}:{os.environ['PATH']}", "FTMLLM_HOME": str(home)}
    env.pop("FTMLLM_CONFIG", None)
    t = time.monotonic()
    r = subprocess.run(["bash", "--norc", "-c", body], capture_output=True, text=True, env=env, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    return [w for w in r.stdout.splitlines() if w], r.stderr, time.monotonic() - t


def test_bash_completes_commands_choices_and_live_job_ids(daemon: DaemonProc, on_path: Path,
                                                          tmp_path: Path) -> None:
    bash_script = tmp_path / "ftctl.bash"
    bash_script.write_text(script("bash"))
    c = daemon.client()
    done = c.call(Submit(kind="selftest", spec={"steps": 1, "rate": 0}), JobDetail).job
    wait_for(lambda: c.call(ShowJob(job_id=done.id), JobDetail).job.state == "succeeded", 60, "job done")
    held = c.call(Submit(kind="selftest", spec={"steps": 1, "rate": 0, "hold": True}), JobDetail).job

    words, _, _ = complete(bash_script, ["ftctl", "ca"], daemon.home, on_path)
    assert words == ["cancel"]
    words, _, _ = complete(bash_script, ["ftctl", "jobs", "--state", "q"], daemon.home, on_path)
    assert words == ["queued"]
    words, _, _ = complete(bash_script, ["ftctl", "show", ""], daemon.home, on_path)
    assert sorted(map(int, words)) == [done.id, held.id]  # every job
    words, _, _ = complete(bash_script, ["ftctl", "cancel", ""], daemon.home, on_path)
    assert words == [str(held.id)]  # only what can still be canceled
    words, _, _ = complete(bash_script, ["ftctl", "submit", "selftest", "--pr"], daemon.home, on_path)
    assert words == ["--priority"]
    words, _, _ = complete(bash_script, ["ftctl", "train", "qwen2vl_lora_s"], daemon.home, on_path)
    assert "qwen2vl_lora_sft" in words  # the daemon's templates (configs/llamafactory)


def test_completion_is_silent_and_quick_without_a_daemon(on_path: Path, tmp_path: Path) -> None:
    bash_script = tmp_path / "ftctl.bash"
    bash_script.write_text(script("bash"))
    home = Path(tempfile.mkdtemp(prefix="ftnone"))
    try:
        words, stderr, spent = complete(bash_script, ["ftctl", "show", ""], home, on_path)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert words == [] and stderr == ""
    assert spent < 5  # the one-second request timeout never even starts: no socket, no wait
    r = subprocess.run([sys.executable, "-m", "tui.ftctl", "--home", str(home), "__complete", "jobs"],
                       capture_output=True, text=True, cwd=ROOT, check=False)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_zsh_script_registers_and_lists_live_job_ids(daemon: DaemonProc, on_path: Path, tmp_path: Path) -> None:
    text = script("zsh")
    assert text.startswith("#compdef ftctl")
    for what in ("jobs", "active", "templates", "datasets"):
        assert f"_ftctl_complete_{what}()" in text and f"ftctl __complete {what}" in text
    assert shutil.which("zsh"), "zsh is not installed: .ci/run installs it (apt-get install zsh)"
    (tmp_path / "ftctl.zsh").write_text(text)
    held = daemon.client().call(Submit(kind="selftest", spec={"steps": 1, "rate": 0, "hold": True}), JobDetail).job
    # compadd, zsh's "offer these", stubbed to print what it is given: a completion widget needs a terminal
    body = (f"autoload -Uz compinit && compinit -u -d {tmp_path}/zcompdump\n"
            f"eval \"$(<{tmp_path}/ftctl.zsh)\"\n"
            "compadd() { print -rl -- ${(P)2} }\n"
            "print registered:$_comps[ftctl]\n_ftctl_complete_active\n")
    env = {**os.environ, "PATH": f"{on_path}:{os.environ['PATH']}", "FTMLLM_HOME": str(daemon.home)}
    r = subprocess.run(["zsh", "-f", "-c", body], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["registered:_shtab_ftctl", str(held.id)]
