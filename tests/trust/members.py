"""A shared server for the "nothing beyond the caller's rights" tests: the real ftmllmd (as root, the user
who can read and write everything, so every refusal below is the daemon's doing, not the kernel's) with the
unit's UMask (0027) and the system layout (runtime dir 0750 and hot folder 2750/3770 of the socket group),
and real members alice and bob and an outsider mallory (tests/systemd/unix_users.py) who run the real ftctl,
or a small client script, as themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shared.protocol import JobList, ListJobs
from tests.daemon_proc import DaemonProc
from tests.systemd.unix_users import Account, UnixUsers, unix_users

CLIENT_PACKAGES = ("zmq", "msgspec", "typing_extensions", "rich", "shared", "tui")
DEADLINE_S = 120.0  # generous: several helpers share two cores
UNIT_UMASK = 0o027

# Any request, as JSON ({"type": "submit", …}), sent as the user running it; prints what came back.
REQUEST_AS = textwrap.dedent("""
    import json, sys
    import msgspec
    from shared.client import Client, RemoteError
    from shared.config import load_settings
    from shared.protocol import RequestBody
    home, raw = sys.argv[1], sys.argv[2]
    c = Client(load_settings(None, home, client=True).paths, timeout=60)
    try:
        reply = c.request(msgspec.json.decode(raw, type=RequestBody))
        print(json.dumps({"ok": True, "reply": msgspec.to_builtins(reply)}))
    except RemoteError as exc:
        print(json.dumps({"ok": False, "code": exc.code, "message": exc.message}))
    finally:
        c.close()
""")

# Hands the daemon a descriptor opened some way (read, write-only, O_PATH, a pipe, a folder), or a file
# opened for reading; prints the sha256 or the refusal.
HAND_AS = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from shared.config import load_settings
    from shared.handover import Handover, HandoverRefused, HandoverUnavailable
    home, how, target = sys.argv[1], sys.argv[2], sys.argv[3]
    paths = load_settings(None, home, client=True).paths
    try:
        with Handover(paths) as h:
            if how == "file":
                handed = h.file(Path(target))
            else:
                if how == "pipe":
                    fd, _w = os.pipe()
                else:
                    flags = {"read": os.O_RDONLY, "write": os.O_WRONLY, "path": os.O_PATH,
                             "dir": os.O_RDONLY | os.O_DIRECTORY}[how]
                    fd = os.open(target, flags)
                handed = h.fd(fd, Path(target).name)
        print(json.dumps({"ok": True, "sha256": handed.sha256, "size": handed.size}))
    except (HandoverRefused, HandoverUnavailable) as exc:
        print(json.dumps({"ok": False, "message": str(exc)}))
""")


@dataclass
class Server:
    d: DaemonProc
    users: UnixUsers
    home: Path
    files: Path  # a folder everyone may enter: each user's own files go in a subfolder there

    def run(self, who: Account, argv: list[str], stdin: str | None = None,
            timeout: float = DEADLINE_S) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.users.command(who, argv), env=self.users.env(), cwd=self.users.pythonpath,
                              capture_output=True, text=True, timeout=timeout, check=False, input=stdin)

    def ftctl(self, who: Account, *args: str, stdin: str | None = None,
              timeout: float = DEADLINE_S) -> subprocess.CompletedProcess[str]:
        """The real ftctl CLI, run as ``who`` (exactly that user's uid and groups)."""
        return self.run(who, ["-m", "tui.ftctl", "--home", str(self.home), *args], stdin=stdin, timeout=timeout)

    def request(self, who: Account, body: dict[str, object]) -> dict[str, object]:
        """A request as ``who`` sends it with a client of their own: {"ok", "reply"} or {"ok", "code", "message"}."""
        res = self.run(who, ["request_as.py", str(self.home), json.dumps(body)])
        assert res.returncode == 0, res.stderr
        return dict(json.loads(res.stdout))

    def hand(self, who: Account, how: str, target: Path) -> dict[str, object]:
        res = self.run(who, ["hand_as.py", str(self.home), how, str(target)])
        assert res.returncode == 0, res.stderr
        return dict(json.loads(res.stdout))

    def folder(self, who: Account, name: str, mode: int = 0o755) -> Path:
        """A folder of ``who``'s own under :attr:`files`."""
        path = self.files / name
        path.mkdir(mode=mode)
        path.chmod(mode)
        os.chown(path, who.uid, who.gid)
        return path

    def own(self, who: Account, path: Path, data: bytes, mode: int = 0o600) -> Path:
        """A file of ``who``'s, with ``mode``."""
        path.write_bytes(data)
        os.chown(path, who.uid, who.gid)
        path.chmod(mode)
        return path

    def job_ids(self) -> list[int]:
        return [j.id for j in self.d.client().call(ListJobs(all=True), JobList).jobs]


@contextmanager
def serving(users: UnixUsers, home: Path, config: Path) -> Iterator[Server]:
    """The daemon of ``home`` started under the unit's umask, with a files folder every user may enter;
    stopped again before unix_users() removes the users."""
    files = home / "files"
    files.mkdir(mode=0o755)
    d = DaemonProc(home=home, config=config)
    old = os.umask(UNIT_UMASK)  # the daemon inherits it, as from the unit's UMask=
    try:
        d.start(timeout=DEADLINE_S)
    finally:
        os.umask(old)
    try:
        yield Server(d, users, home, files)
    finally:
        d.close(remove=False)


@contextmanager
def member_server(extra_config: str = "") -> Iterator[Server]:
    with unix_users(packages=CLIENT_PACKAGES) as users:
        for name, text in (("request_as.py", REQUEST_AS), ("hand_as.py", HAND_AS)):
            (users.pythonpath / name).write_text(text)
            (users.pythonpath / name).chmod(0o644)
        home = Path(tempfile.mkdtemp(prefix="ftt", dir="/tmp"))  # short: unix socket paths ≤ 107 bytes
        try:
            home.chmod(0o755)
            config = home / "ftmllm.toml"
            config.write_text(f'[daemon]\nsocket_group = "{users.group}"\n[hotfolder]\nsettle_s = 0.3\n'
                              f'rescan_s = 1.0\n{extra_config}')
            run = home / "run"
            run.mkdir(mode=0o750)
            os.chown(run, 0, users.gid)
            # as systemd-tmpfiles makes them (systemd/tmpfiles.d): members drop into the sticky, setgid inbox;
            # only the daemon writes the others, members read them through the group
            for name, mode in (("inbox", 0o3770), ("outbox", 0o2750), ("done", 0o2750), ("failed", 0o2750)):
                (home / name).mkdir()
                os.chown(home / name, 0, users.gid)
                (home / name).chmod(mode)
            with serving(users, home, config) as server:
                yield server
        finally:
            shutil.rmtree(home, ignore_errors=True)
