"""``ftctl install-service`` as a user types it: the real console script of this venv, in a subprocess.

What it writes must be accepted by Debian's ``systemd-analyze verify`` (tests/systemd/units.py), point
ExecStart at this venv's ftmllmd, and what it prints must be the commands to run next.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from daemon.system import install as service_install
from daemon.system.install import default_exec_path, templates_dir
from tests.systemd.units import unit_settings, verify_problems

FTCTL = Path(sys.executable).absolute().parent / "ftctl"


def ftctl(*args: str) -> subprocess.CompletedProcess[str]:
    assert FTCTL.exists(), f"{FTCTL} missing: install the project into this venv with `pip install -e .`"
    return subprocess.run([str(FTCTL), *args], capture_output=True, text=True, timeout=120, check=False,
                          env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"})


def test_install_service_user_to_dest_writes_a_unit_systemd_analyze_accepts(tmp_path: Path) -> None:
    dest = tmp_path / "units"
    res = ftctl("install-service", "--user", "--dest", str(dest))
    assert res.returncode == 0, res.stderr
    unit = dest / "ftmllmd.service"
    assert sorted(p.name for p in dest.iterdir()) == ["ftmllmd.service"]
    assert unit_settings(unit.read_text())["ExecStart"] == [str(default_exec_path())]
    assert f"wrote {unit}" in res.stdout
    assert f"systemctl --user link {unit}" in res.stdout
    assert "systemctl --user enable --now ftmllmd.service" in res.stdout
    assert verify_problems(unit, user=True, runtime_dir=tmp_path / "xdg") == []


def test_install_service_system_to_dest_writes_unit_and_snippets_systemd_analyze_accepts(tmp_path: Path) -> None:
    dest = tmp_path / "stage"
    config = tmp_path / "conf" / "ftmllm.toml"
    res = ftctl("install-service", "--dest", str(dest), "--config-file", str(config))
    assert res.returncode == 0, res.stderr
    unit = dest / "ftmllmd.service"
    assert unit_settings(unit.read_text())["ExecStart"] == [f"{default_exec_path()} --config {config}"]
    for name in ("sysusers.d", "tmpfiles.d"):
        snippet = dest / name / "ftmllm.conf"
        assert snippet.read_text() == (templates_dir() / name / "ftmllm.conf").read_text()
        assert f"wrote {snippet}" in res.stdout
    assert not config.exists()  # --dest writes no config: that is the administrator's file
    for command in (f"systemd-sysusers {dest / 'sysusers.d' / 'ftmllm.conf'}", f"systemctl link {unit}",
                    "systemctl enable --now ftmllmd.service"):
        assert command in res.stdout
    # a venv that user ftmllm cannot reach (e.g. under /root) is said before systemd fails with 203/EXEC
    expected = service_install._reachability_warnings(default_exec_path())
    assert [line for line in res.stderr.splitlines() if line.startswith("warning:")] == \
        [f"warning: {w}" for w in expected]
    assert verify_problems(unit, user=False, runtime_dir=tmp_path / "xdg") == []
