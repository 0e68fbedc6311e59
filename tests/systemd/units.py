"""Helpers for the systemd tests: run Debian's systemd tools on rendered files, without a running systemd.

`systemd-analyze verify` exits 0 even for unknown keys or unparsable values (it only prints them), so a
unit passes only when the exit status is 0 *and* no line of its output mentions the file.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

APT_HINT = "install Debian's systemd package: apt-get install -y systemd"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} not found on PATH; {APT_HINT}")
    return path


def verify(unit: Path, *, user: bool, runtime_dir: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if user:
        # The user-manager variant needs a runtime dir to exist, even though nothing runs.
        runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime_dir)
    cmd = [tool("systemd-analyze"), "verify", "--man=no", *(["--user"] if user else []), str(unit)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)


def verify_problems(unit: Path, *, user: bool, runtime_dir: Path) -> list[str]:
    """Every complaint systemd-analyze has about ``unit``; empty means it passes."""
    res = verify(unit, user=user, runtime_dir=runtime_dir)
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if unit.name in ln or str(unit) in ln]
    if res.returncode != 0:
        lines.insert(0, f"exit status {res.returncode}: {res.stderr.strip()}")
    return lines


def make_executable(path: Path, body: str = "#!/bin/sh\nexit 0\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit, by key (a key may repeat); comments and sections ignored."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;[" or "=" not in line:
            continue
        key, value = line.split("=", 1)
        out.setdefault(key, []).append(value)
    return out
