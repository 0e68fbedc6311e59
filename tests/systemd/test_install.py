"""`ftctl install-service` (daemon/system/install.py): what it writes, where, and what it tells you."""

from __future__ import annotations

import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.system import install as service_install
from daemon.system.install import InstallError, default_exec_path, install, templates_dir, write_atomic
from shared.config import parse_config
from tests.systemd.units import make_executable, unit_settings, verify_problems


@pytest.fixture
def public_dir() -> Iterator[Path]:
    # tmp_path lives under /tmp/pytest-of-root (0700): a stranger cannot reach anything in it.
    d = Path(tempfile.mkdtemp(prefix="fti", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def test_default_exec_path_is_the_ftmllmd_of_this_venv() -> None:
    exe = default_exec_path()
    assert exe == Path(sys.executable).absolute().parent / "ftmllmd"
    assert exe.exists(), "the project is installed into this venv with its ftmllmd console script"


def test_user_install_writes_the_unit_and_returns_the_systemctl_commands(tmp_path: Path) -> None:
    exe = make_executable(tmp_path / "venv" / "bin" / "ftmllmd")
    res = install(True, tmp_path / "units", exec_path=exe)
    assert res.unit_path == tmp_path / "units" / "ftmllmd.service" and res.written == [res.unit_path]
    assert unit_settings(res.unit_path.read_text())["ExecStart"] == [str(exe)]
    assert res.commands == [
        f"systemctl --user link {res.unit_path}",
        "systemctl --user daemon-reload",
        "systemctl --user enable --now ftmllmd.service",
        'loginctl enable-linger "$USER"   # keeps it running after you log out',
        "journalctl --user -u ftmllmd.service -f",
    ]
    assert sorted(p.name for p in (tmp_path / "units").iterdir()) == ["ftmllmd.service"]  # no temp files
    assert verify_problems(res.unit_path, user=True, runtime_dir=tmp_path / "xdg") == []


def test_system_install_to_dest_writes_unit_sysusers_and_tmpfiles(tmp_path: Path) -> None:
    exe = make_executable(tmp_path / "venv" / "bin" / "ftmllmd")
    dest = tmp_path / "stage"
    res = install(False, dest, exec_path=exe, config=Path("/srv/conf/ftmllm.toml"))
    sysusers, tmpfiles = dest / "sysusers.d" / "ftmllm.conf", dest / "tmpfiles.d" / "ftmllm.conf"
    assert res.written == [dest / "ftmllmd.service", sysusers, tmpfiles]
    assert sysusers.read_text() == (templates_dir() / "sysusers.d" / "ftmllm.conf").read_text()
    assert unit_settings(res.unit_path.read_text())["ExecStart"] == [f"{exe} --config /srv/conf/ftmllm.toml"]
    cmds = [c.removeprefix("sudo ") for c in res.commands]
    assert cmds[:6] == [
        f"systemd-sysusers {sysusers}",
        f"systemd-tmpfiles --create {tmpfiles}",
        f"systemctl link {res.unit_path}",
        "systemctl daemon-reload",
        "systemctl enable --now ftmllmd.service",
        cmds[5],
    ] and cmds[5].startswith('usermod -aG ftmllm "$USER"')
    assert cmds[-1] == "journalctl -u ftmllmd.service -f"
    assert verify_problems(res.unit_path, user=False, runtime_dir=tmp_path / "xdg") == []


def test_reinstall_replaces_the_unit_in_place(tmp_path: Path) -> None:
    old = make_executable(tmp_path / "old" / "bin" / "ftmllmd")
    new = make_executable(tmp_path / "new" / "bin" / "ftmllmd")
    install(True, tmp_path / "units", exec_path=old)
    res = install(True, tmp_path / "units", exec_path=new)
    assert unit_settings(res.unit_path.read_text())["ExecStart"] == [str(new)]
    assert [p.name for p in (tmp_path / "units").iterdir()] == ["ftmllmd.service"]


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "ftmllmd.service"
    target.write_text("previous unit\n")
    with pytest.raises(UnicodeEncodeError):
        write_atomic(target, "half a unit \udc80 that cannot be encoded")
    assert target.read_text() == "previous unit\n"
    assert [p.name for p in tmp_path.iterdir()] == ["ftmllmd.service"]


def test_install_without_an_ftmllmd_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(InstallError, match=r"no ftmllmd executable there; install ftmllm into this venv"):
        install(True, tmp_path, exec_path=tmp_path / "bin" / "ftmllmd")
    assert list(tmp_path.iterdir()) == []


def test_a_unit_dir_you_may_not_write_gives_the_sudo_or_dest_hint(public_dir: Path) -> None:
    # Root may write anywhere, so the installer runs as user nobody, from a copy nobody can read.
    # The whole daemon package is copied, not the installer alone: whatever it imports comes from this checkout,
    # never from something an earlier run left importable for /usr/bin/python3.
    pkg = public_dir / "pkg"
    source = Path(service_install.__file__).resolve().parents[1]
    shutil.copytree(source, pkg / "daemon", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(templates_dir(), pkg / "systemd")
    exe = make_executable(public_dir / "bin" / "ftmllmd")
    root_only = public_dir / "units"
    root_only.mkdir()
    for p in [public_dir, *public_dir.rglob("*")]:
        p.chmod(0o755 if p.is_dir() or p == exe else 0o644)
    code = ("import sys; from pathlib import Path; from daemon.system.install import install, InstallError\n"
            "try: install(False, Path(sys.argv[1]), exec_path=Path(sys.argv[2]))\n"
            "except InstallError as e: print(e)")
    nobody = pwd.getpwnam("nobody")
    res = subprocess.run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
                          "/usr/bin/python3", "-c", code, str(root_only), str(exe)],
                         env={"PYTHONPATH": str(pkg), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == (f"{root_only}: permission denied; run `sudo ftctl install-service` for the "
                                  "system service, add --user for your own, or write elsewhere with --dest DIR")
    assert list(root_only.iterdir()) == []


def test_system_install_warns_when_user_ftmllm_cannot_reach_the_executable(
    tmp_path: Path, public_dir: Path
) -> None:
    private = make_executable(tmp_path / "venv" / "bin" / "ftmllmd")  # under a 0700 dir
    res = install(False, tmp_path / "stage", exec_path=private)
    about_exe = [w for w in res.warnings if w.startswith(f"ftmllmd {private} ")]
    assert len(about_exe) == 1 and "203/EXEC" in about_exe[0]

    reachable = make_executable(public_dir / "venv" / "bin" / "ftmllmd")  # #!/bin/sh: reachable too
    res = install(False, tmp_path / "stage", exec_path=reachable)
    # (a warning about the checkout itself may remain where the checkout sits under /root)
    assert not [w for w in res.warnings if str(reachable) in w or "/bin/sh" in w]


def test_system_config_template_is_valid_for_the_daemons_config_parser() -> None:
    path = templates_dir() / "ftmllm-system.toml"
    cfg = parse_config(path.read_text(), str(path))
    assert cfg.paths.runtime_dir == "/run/ftmllm" and cfg.paths.hotfolder == "/srv/ftmllm/hotfolder"
    assert cfg.daemon.socket_group == "ftmllm" and cfg.daemon.admin_group == "ftmllm-admin"
