"""Sockets in places nobody else controls, tried as real Unix users (tests/systemd/unix_users.py).

* Without XDG_RUNTIME_DIR a user's sockets go to logind's /run/user/<uid>/ftmllm when that dir is hers, else
  under her state dir: never /tmp, where mallory could create the directory first.
* A runtime dir mallory made (or anyone can write) is refused by the daemon and by ftctl, naming the dir and
  its owner; ftctl exits 3 and sends nothing, so a request (a password in a spec, say) never reaches a socket
  she planted there. With nothing there, "not running" is said as before.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_proc import ROOT
from tests.systemd.unix_users import Account, UnixUsers, unix_users

EXIT_NO_DAEMON = 3  # tui/ftctl/output.py
CLIENT_PACKAGES = ("zmq", "msgspec", "typing_extensions", "rich", "shared", "tui")
DEADLINE_S = 60.0
WHERE = "from shared.config import Config, resolve_paths; print(resolve_paths(Config(), None).runtime_dir)"


@pytest.fixture(scope="module")
def users() -> Iterator[UnixUsers]:
    with unix_users(packages=CLIENT_PACKAGES) as u:
        yield u


@pytest.fixture
def sticky() -> Iterator[Path]:
    """A /tmp-like parent (1777, short path): anyone may create a directory in it."""
    d = Path(tempfile.mkdtemp(prefix="ftsq", dir="/tmp"))
    d.chmod(0o1777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_as(users: UnixUsers, who: Account, argv: list[str], env: dict[str, str] | None = None,
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(users.command(who, argv), env={**users.env(), **(env or {})}, cwd=users.pythonpath,
                          capture_output=True, text=True, timeout=DEADLINE_S, check=False)


def own_dir(parent: Path, who: Account, mode: int = 0o700) -> Path:
    d = Path(tempfile.mkdtemp(dir=parent))
    os.chown(d, who.uid, who.gid)
    d.chmod(mode)
    return d


def config_for(parent: Path, runtime: Path) -> Path:
    """A config every user can read that puts the sockets in ``runtime``."""
    cfg = Path(tempfile.mkdtemp(prefix="cfg", dir=parent)) / "ftmllm.toml"
    cfg.parent.chmod(0o755)
    cfg.write_text(f'[paths]\nruntime_dir = "{runtime}"\nstate_dir = "{parent}/state"\nhotfolder = "{parent}/hot"\n')
    cfg.chmod(0o644)
    return cfg


# ------------------------------------------------------------------------------- where the sockets go

def test_without_xdg_runtime_dir_the_sockets_go_to_her_run_user_dir_or_her_state_dir(users: UnixUsers,
                                                                                       sticky: Path) -> None:
    alice, mallory = users.alice, users.mallory
    home = own_dir(sticky, alice, 0o755)
    env = {"HOME": str(home)}  # and no XDG_RUNTIME_DIR: su, cron, some ssh sessions
    user_run = Path(f"/run/user/{alice.uid}")
    assert not user_run.exists(), f"{user_run} exists already; this test makes and removes it"
    squat = Path(f"/tmp/ftmllm-{alice.uid}")  # where clients and daemon used to fall back to
    made_squat = not squat.exists()
    if made_squat:
        squat.mkdir(mode=0o777)
        os.chown(squat, mallory.uid, mallory.gid)
        squat.chmod(0o777)
    try:
        res = run_as(users, alice, ["-c", WHERE], env)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == f"{home}/.local/state/ftmllm/run"

        user_run.mkdir(mode=0o700)
        os.chown(user_run, alice.uid, alice.gid)
        res = run_as(users, alice, ["-c", WHERE], env)
        assert res.stdout.strip() == f"{user_run}/ftmllm", res.stderr

        os.chown(user_run, mallory.uid, mallory.gid)  # not hers: never used
        res = run_as(users, alice, ["-c", WHERE], env)
        assert res.stdout.strip() == f"{home}/.local/state/ftmllm/run", res.stderr
    finally:
        shutil.rmtree(user_run, ignore_errors=True)
        if made_squat:
            shutil.rmtree(squat, ignore_errors=True)


# ------------------------------------------------------------------------------------- the daemon

def start_daemon(home: Path, config: Path) -> subprocess.CompletedProcess[str]:
    """ftmllmd as root (the strongest case: root may write anywhere, and still must not bind there)."""
    env = {k: v for k, v in os.environ.items() if k not in ("FTMLLM_CONFIG", "FTMLLM_HOME")}
    return subprocess.run([sys.executable, "-m", "daemon.main", "--config", str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=DEADLINE_S, check=False)


def test_the_daemon_refuses_a_runtime_dir_mallory_made_and_binds_nothing(users: UnixUsers, sticky: Path) -> None:
    squat = own_dir(sticky, users.mallory, 0o777)
    res = start_daemon(sticky, config_for(sticky, squat))
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith(f"ftmllmd: refusing {squat}: owned by {users.mallory.name}"), res.stderr
    assert "Traceback" not in res.stderr  # one line, not a stack
    assert list(squat.iterdir()) == []


def test_the_daemon_refuses_its_own_runtime_dir_when_everyone_can_write_it(sticky: Path) -> None:
    run = sticky / "run"
    run.mkdir()
    run.chmod(0o777)
    res = start_daemon(sticky, config_for(sticky, run))
    assert res.returncode != 0
    assert f"refusing {run}: writable by every user (mode 0777)" in res.stderr, res.stderr
    assert list(run.iterdir()) == []


# ------------------------------------------------------------------------------------------ ftctl

def ftctl(users: UnixUsers, who: Account, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_as(users, who, ["-m", "tui.ftctl", "--config", str(config), "--timeout", "3", *args])


def test_ftctl_refuses_a_socket_in_mallorys_dir_and_sends_her_nothing(users: UnixUsers, sticky: Path) -> None:
    alice, mallory = users.alice, users.mallory
    squat = own_dir(sticky, mallory, 0o777)
    # mallory's fake daemon: a listening socket where alice's ftctl would look for ctl.sock
    fake = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        fake.bind(str(squat / "ctl.sock"))
        os.chown(squat / "ctl.sock", mallory.uid, mallory.gid)
        (squat / "ctl.sock").chmod(0o666)
        fake.listen(8)
        fake.setblocking(False)
        res = ftctl(users, alice, config_for(sticky, squat), "submit", "selftest", "--set", "steps=1")
        assert res.returncode == EXIT_NO_DAEMON, (res.returncode, res.stderr)
        assert res.stderr.startswith(f"ftctl: refusing {squat}: owned by {mallory.name}, not by you ({alice.name})")
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        with pytest.raises(BlockingIOError):
            fake.accept()  # nobody ever connected
    finally:
        fake.close()


def test_ftctl_refuses_her_own_dir_when_everyone_can_write_it(users: UnixUsers, sticky: Path) -> None:
    alice = users.alice
    run = own_dir(sticky, alice, 0o777)
    res = ftctl(users, alice, config_for(sticky, run), "jobs")
    assert res.returncode == EXIT_NO_DAEMON, (res.returncode, res.stderr)
    assert f"ftctl: refusing {run}: writable by every user (mode 0777)" in res.stderr
    assert f"chmod go-w {run}" in res.stderr  # and what to do


def test_with_nothing_there_ftctl_still_says_not_running(users: UnixUsers, sticky: Path) -> None:
    res = ftctl(users, users.alice, config_for(sticky, sticky / "nothing"), "jobs")
    assert res.returncode == EXIT_NO_DAEMON, (res.returncode, res.stderr)
    assert "ftmllmd is not running" in res.stderr and "refusing" not in res.stderr
