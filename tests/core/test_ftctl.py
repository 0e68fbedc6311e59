"""ftctl as people and scripts use it: a real subprocess against a real daemon."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.daemon_proc import ROOT, DaemonProc


def ftctl(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tui.ftctl", "--home", str(home), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_no_daemon_is_one_line_with_how_to_start_and_exit_3() -> None:
    home = Path(tempfile.mkdtemp(prefix="ft"))  # short: the socket paths under it must fit sun_path
    try:
        r = ftctl(home, "jobs")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert r.returncode == 3
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not running" in lines[0] and "systemctl start ftmllmd" in lines[0]


def test_submit_wait_json_show_logs_and_exit_codes(daemon: DaemonProc) -> None:
    ok = ftctl(daemon.home, "submit", "selftest", "--set", "steps=3", "--set", "rate=0", "--wait", "--json")
    assert ok.returncode == 0, ok.stderr
    job = json.loads(ok.stdout)
    assert job["state"] == "succeeded" and job["progress"]["done"] == 3
    # every field is there, defaults included: a script need not know that a missing "error" means ""
    assert job["error"] == "" and "eta_s" in job["progress"]
    bad = ftctl(daemon.home, "submit", "selftest", "--set", "fail=true", "--set", "rate=0", "--wait")
    assert bad.returncode == 1 and "asked to fail" in bad.stderr
    rejected = ftctl(daemon.home, "submit", "selftest", "--set", "speed=3")
    assert rejected.returncode == 2 and "speed" in rejected.stderr
    listing = json.loads(ftctl(daemon.home, "jobs", "--all", "--json").stdout)
    assert [j["state"] for j in listing] == ["succeeded", "failed"]
    shown = ftctl(daemon.home, "show", str(job["id"]))
    assert "queued by" in shown.stdout and "succeeded" in shown.stdout
    assert ftctl(daemon.home, "show", "77").returncode == 2
    logs = ftctl(daemon.home, "logs", str(job["id"]), "-f")
    assert logs.returncode == 0
    status = json.loads(ftctl(daemon.home, "status", "--json").stdout)
    assert status["counts"] == {"failed": 1, "succeeded": 1}


def test_help_explains_every_command() -> None:
    r = subprocess.run([sys.executable, "-m", "tui.ftctl", "--help"], capture_output=True, text=True, cwd=ROOT)
    for cmd in ("status", "jobs", "show", "submit", "cancel", "retry", "logs", "events"):
        assert cmd in r.stdout
    assert "Exit codes" in r.stdout
