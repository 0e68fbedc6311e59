"""Real Unix users for tests of who-may-do-what (the test process must be root, as CI is).

``unix_users()`` creates a group standing for ``ftmllm``, two members and one outsider with useradd (with
``admin=True`` also a second group standing for ``ftmllm-admin`` and a member of both), and removes them
afterwards, also when the test fails. ``UnixUsers.command()`` builds the argv that runs Python code as one of them with
``setpriv`` (util-linux; ``runuser -u NAME --`` works too but goes through PAM).

Why Debian's /usr/bin/python3 and a copied PYTHONPATH: the project venv's interpreter may live under
/root (pyenv), which other users cannot enter (/root is 0700), and so may the checkout. The packages a
client needs are copied into a world-readable temp dir; compiled ones (pyzmq, msgspec) need the same
Python minor version, which is checked.
"""

from __future__ import annotations

import grp
import importlib.util
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SYSTEM_PYTHON = "/usr/bin/python3"
SETPRIV = "/usr/bin/setpriv"


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int  # primary group


@dataclass(frozen=True)
class UnixUsers:
    group: str  # plays the role of group ftmllm: may connect
    gid: int
    alice: Account  # member
    bob: Account  # member
    mallory: Account  # not a member
    pythonpath: Path  # world-readable copies of the packages clients import
    admin_group: str = ""  # plays the role of daemon.admin_group (only with admin=True)
    carol: Account | None = None  # member of group and admin_group (only with admin=True)

    def command(self, who: Account, argv: Sequence[str]) -> list[str]:
        """argv running ``python3 argv…`` as ``who`` with exactly that user's groups."""
        return [SETPRIV, f"--reuid={who.uid}", f"--regid={who.gid}", "--init-groups", "--",
                SYSTEM_PYTHON, *argv]

    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(self.pythonpath), "HOME": "/nonexistent",
                "LANG": "C.UTF-8"}


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def _account(name: str) -> Account:
    pw = pwd.getpwnam(name)
    return Account(name, pw.pw_uid, pw.pw_gid)


def copy_packages(dest: Path, packages: Sequence[str]) -> None:
    """Copy top-level packages or single-file modules (and pyzmq-style ``<dist>.libs`` folders beside them)
    into ``dest``."""
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is not None and not spec.submodule_search_locations and spec.origin and spec.origin.endswith(".py"):
            shutil.copy2(spec.origin, dest / Path(spec.origin).name)  # e.g. typing_extensions.py
            continue
        if spec is None or not spec.submodule_search_locations:
            raise AssertionError(f"package {name} not importable here; install the project with pip install -e .")
        src = Path(next(iter(spec.submodule_search_locations)))
        shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        for libs in src.parent.glob(f"*{name}*.libs"):
            if not (dest / libs.name).exists():
                shutil.copytree(libs, dest / libs.name)
    for path in [dest, *dest.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


@contextmanager
def unix_users(packages: Sequence[str] = ("zmq",), admin: bool = False) -> Iterator[UnixUsers]:
    if os.geteuid() != 0:
        raise AssertionError("these tests create Unix users with useradd and must run as root (CI does)")
    for exe in (SYSTEM_PYTHON, SETPRIV, "/usr/sbin/useradd"):
        if not os.access(exe, os.X_OK):
            raise AssertionError(f"{exe} missing; apt-get install -y python3 util-linux passwd")
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                           capture_output=True, text=True, check=True)
    if probe.stdout.strip() != str(sys.version_info[:2]):
        raise AssertionError(f"{SYSTEM_PYTHON} is Python {probe.stdout.strip()}, the venv {sys.version_info[:2]}: "
                             "the copied compiled packages would not import; build the venv from the same minor")
    tag = uuid.uuid4().hex[:6]
    group = f"ftt{tag}"
    admin_group = f"ftt{tag}adm" if admin else ""
    roles = ("alice", "bob", "mallory", "carol") if admin else ("alice", "bob", "mallory")
    names = {role: f"ftt{tag}{role[0]}" for role in roles}
    created: list[str] = []
    groups: list[str] = []
    pypath = Path(tempfile.mkdtemp(prefix="fttpy", dir="/tmp"))
    try:
        for g in (group, admin_group):
            if g:
                _run("groupadd", g)
                groups.append(g)
        for role, name in names.items():
            member_of = {"mallory": "", "carol": f"{group},{admin_group}"}.get(role, group)
            extra = ["-G", member_of] if member_of else []
            _run("useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", *extra, name)
            created.append(name)
        copy_packages(pypath, packages)
        # bytecode now, as root: the clients cannot write __pycache__ here and would recompile every start
        _run(SYSTEM_PYTHON, "-m", "compileall", "-q", str(pypath))
        yield UnixUsers(group=group, gid=grp.getgrnam(group).gr_gid, alice=_account(names["alice"]),
                        bob=_account(names["bob"]), mallory=_account(names["mallory"]), pythonpath=pypath,
                        admin_group=admin_group, carol=_account(names["carol"]) if admin else None)
    finally:
        leftovers = []
        for name in created:
            res = subprocess.run(["userdel", name], capture_output=True, text=True, timeout=60, check=False)
            if res.returncode != 0:
                leftovers.append(f"{name}: {res.stderr.strip()}")
        for g in groups:
            subprocess.run(["groupdel", g], capture_output=True, timeout=60, check=False)
        shutil.rmtree(pypath, ignore_errors=True)
        if leftovers:
            raise AssertionError(f"test users left behind ({'; '.join(leftovers)}); a process of theirs still "
                                 "runs: kill it, then userdel NAME")
