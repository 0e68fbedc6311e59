"""`ftctl engine …` and `ask` against a real daemon serving with the CPU engine (no vLLM configured)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.client import RemoteError
from shared.protocol import Ask, AskReply
from tests.daemon_proc import ROOT, DaemonProc
from tests.fixtures import pdfs
from tests.ocr.submit import submit_ocr


def ftctl(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tui.ftctl", "--home", str(home), *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def test_engine_status_says_which_engine_serves_and_why(daemon: DaemonProc) -> None:
    r = ftctl(daemon.home, "engine", "status")
    assert r.returncode == 0, r.stderr
    assert "engine:   cpu ready" in r.stdout and "why:      auto:" in r.stdout
    data = json.loads(ftctl(daemon.home, "engine", "status", "--json").stdout)
    # omit_defaults: kind "cpu" is the default, so it is left out
    assert data["engine"].get("kind", "cpu") == "cpu" and data["engine"]["state"] == "ready"
    assert data["message"].startswith("serving: cpu")


def test_engine_commands_without_vllm_say_how_to_configure_it(daemon: DaemonProc) -> None:
    r = ftctl(daemon.home, "engine", "start")
    assert r.returncode == 1 and "vllm.model" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = ftctl(daemon.home, "engine", "load", "x")
    assert r.returncode == 2 and "ftctl engine load NAME PATH" in r.stderr


def test_a_job_naming_an_adapter_on_the_cpu_engine_is_refused_at_submit(daemon: DaemonProc, tmp_path: Path) -> None:
    pdf = pdfs.numbered(tmp_path / "a.pdf", 1)
    c = daemon.client()
    with pytest.raises(RemoteError) as exc:
        submit_ocr(c, pdf, adapter="mine")
    assert exc.value.code == "invalid_spec" and "cannot use LoRA adapters" in exc.value.message


def test_ask_needs_a_vision_language_engine(daemon: DaemonProc, tmp_path: Path) -> None:
    pdf = pdfs.numbered(tmp_path / "a.pdf", 1)
    with pytest.raises(RemoteError) as exc:
        daemon.client().call(Ask(question="What is this?", file=str(pdf)), AskReply)
    assert exc.value.code == "unavailable" and "vllm or remote engine" in exc.value.message
