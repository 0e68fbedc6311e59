"""shared/private_dir.py: the socket-directory checks the daemon and every client make (real files, real owners)."""

from __future__ import annotations

import os
import pwd
import socket
from pathlib import Path

import pytest

from shared.private_dir import UnsafePath, check_socket, dir_problem, make_private_dir, socket_problem

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def sticky(tmp_path: Path) -> Path:
    """A /tmp-like parent: world-writable with the sticky bit, where anyone may create a directory."""
    d = tmp_path / "tmp"
    d.mkdir()
    d.chmod(0o1777)
    return d


def test_a_directory_another_user_made_in_a_shared_parent_is_refused_by_name(sticky: Path) -> None:
    squat = sticky / "ftmllm-1000"
    squat.mkdir(mode=0o700)
    os.chown(squat, NOBODY.pw_uid, NOBODY.pw_gid)
    problem = dir_problem(squat, uid=os.getuid() or 1000)
    assert problem is not None and problem.startswith(f"refusing {squat}: owned by nobody")
    with pytest.raises(UnsafePath, match="owned by nobody"):
        make_private_dir(squat)


def test_a_world_writable_directory_is_refused_even_if_it_is_yours(sticky: Path) -> None:
    d = sticky / "mine"
    d.mkdir()
    d.chmod(0o777)
    problem = dir_problem(d)
    assert problem is not None and "writable by every user (mode 0777)" in problem


def test_a_symlink_is_refused(sticky: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    link = sticky / "ftmllm-link"
    link.symlink_to(target)
    assert dir_problem(link) == f"refusing {link}: it is a symbolic link (to {target}); remove it"


def test_a_service_dir_in_a_root_only_parent_is_trusted_whoever_owns_it(tmp_path: Path) -> None:
    run = tmp_path / "run"  # like /run: root's, 0755
    run.mkdir(mode=0o755)
    svc = run / "ftmllm"
    svc.mkdir(mode=0o750)
    os.chown(svc, NOBODY.pw_uid, NOBODY.pw_gid)  # like /run/ftmllm owned by user ftmllm
    assert dir_problem(svc, uid=12345) is None


def test_make_private_dir_creates_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        make_private_dir(tmp_path / "a" / "run")
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "run").stat().st_mode & 0o7777 == 0o700


def test_a_socket_owned_by_someone_else_than_its_directory_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "run"
    make_private_dir(d)
    path = d / "ctl.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        assert socket_problem(path) is None
        os.chown(path, NOBODY.pw_uid, -1, follow_symlinks=False)
        with pytest.raises(UnsafePath, match=f"refusing {path}: owned by nobody"):
            check_socket(path)


def test_make_private_dir_refuses_its_own_dir_that_others_could_write_until_now(tmp_path: Path) -> None:
    for mode, who in ((0o777, "every user"), (0o770, "its group")):
        d = tmp_path / f"run{mode:o}"
        d.mkdir()
        d.chmod(mode)
        with pytest.raises(UnsafePath, match=f"refusing {d}: writable by {who} \\(mode 0{mode:o}\\)"):
            make_private_dir(d)
        assert d.stat().st_mode & 0o7777 == mode  # left as found: its owner decides


def test_make_private_dir_gives_a_service_dir_its_socket_group(tmp_path: Path) -> None:
    d = tmp_path / "run"
    make_private_dir(d, 0o750, NOBODY.pw_gid)
    st = d.stat()
    assert (st.st_mode & 0o7777, st.st_gid) == (0o750, NOBODY.pw_gid)
