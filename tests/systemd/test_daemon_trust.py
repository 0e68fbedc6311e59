"""The shared-server trust model, end to end: the real ftmllmd (run as root here, as a service user in
production) and the real ``ftctl``, run as real Unix users created for the test (see unix_users.py).

Roles (group names are generated per run):
* group G stands for ``ftmllm`` (``daemon.socket_group``): alice, bob and carol are members, mallory not;
* group A stands for ``ftmllm-admin`` (``daemon.admin_group``): carol is a member.

The runtime dir is prepared as systemd's ``RuntimeDirectory=`` would (0750, owned by the daemon's user and
the socket group); everything else (socket modes, their group, ZAP, who may cancel) is the daemon's doing.
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import stat
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.protocol import TERMINAL_STATES, Cancel, Done, JobDetail, ShowJob
from tests.daemon_proc import DaemonProc, wait_for
from tests.systemd.unix_users import Account, UnixUsers, unix_users

# ftctl's exit codes (tui/ftctl/output.py), the contract scripts rely on
EXIT_NO_DAEMON, EXIT_FORBIDDEN = 3, 4
CLIENT_PACKAGES = ("zmq", "msgspec", "typing_extensions", "rich", "shared", "tui", "daemon")
DEADLINE_S = 60.0  # generous: several helpers share two cores

# alice's own client, saying it is someone else in Hello and in the job's name
CLAIMING_CLIENT = textwrap.dedent("""
    import json, sys
    from shared.client import Client
    from shared.config import load_settings
    from shared.protocol import Hello, HelloReply, JobDetail, Submit
    home, claim = sys.argv[1], sys.argv[2]
    c = Client(load_settings(None, home, client=True).paths, name=claim, timeout=30)
    try:
        hello = c.call(Hello(client=claim), HelloReply)
        spec = {"steps": 1, "rate": 0, "hold": True}
        job = c.call(Submit(kind="selftest", spec=spec, name=claim + "'s job"), JobDetail).job
        print(json.dumps({"hello_user": hello.user, "owner": job.owner, "id": job.id}))
    finally:
        c.close()
""")


@dataclass
class Server:
    d: DaemonProc
    users: UnixUsers

    @property
    def carol(self) -> Account:
        assert self.users.carol is not None
        return self.users.carol

    def ftctl(self, who: Account, *args: str, timeout: float = DEADLINE_S) -> subprocess.CompletedProcess[str]:
        """The real ftctl CLI, run as ``who`` (exactly that user's uid and groups)."""
        argv = self.users.command(who, ["-m", "tui.ftctl", "--home", str(self.d.home), *args])
        return subprocess.run(argv, env=self.users.env(), cwd=self.users.pythonpath, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def state(self, job_id: int) -> str:
        return self.d.client().call(ShowJob(job_id=job_id), JobDetail).job.state


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with unix_users(packages=CLIENT_PACKAGES, admin=True) as users:
        (users.pythonpath / "claiming_client.py").write_text(CLAIMING_CLIENT)
        (users.pythonpath / "claiming_client.py").chmod(0o644)
        home = Path(tempfile.mkdtemp(prefix="ftt", dir="/tmp"))  # short: unix socket paths ≤ 107 bytes
        try:
            home.chmod(0o755)
            config = home / "ftmllm.toml"
            config.write_text(f'[daemon]\nsocket_group = "{users.group}"\nadmin_group = "{users.admin_group}"\n')
            run = home / "run"
            run.mkdir(mode=0o750)
            os.chown(run, 0, users.gid)
            d = DaemonProc(home=home, config=config)
            try:
                d.start(timeout=DEADLINE_S)
                yield Server(d, users)
            finally:
                d.close()  # stops the daemon before unix_users() removes the users
        finally:
            shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def alice_job(server: Server) -> Iterator[int]:
    """A selftest job alice submitted with ftctl, running (held) until someone cancels it."""
    res = server.ftctl(server.users.alice, "submit", "selftest", "--set", "steps=1", "--set", "rate=0",
                       "--set", "hold=true", "--json")
    assert res.returncode == 0, res.stderr
    job_id = int(json.loads(res.stdout)["id"])
    wait_for(lambda: server.state(job_id) == "running", DEADLINE_S, f"job {job_id} to run", interval=0.05)
    try:
        yield job_id
    finally:
        if server.state(job_id) not in TERMINAL_STATES:
            server.d.client().call(Cancel(job_id=job_id), Done)  # as root: the daemon's own uid, an admin


def test_socket_files_are_0660_and_belong_to_the_socket_group(server: Server) -> None:
    for name in ("ctl.sock", "events.sock"):
        st = os.stat(server.d.paths.runtime_dir / name)
        assert stat.S_ISSOCK(st.st_mode), name
        assert stat.S_IMODE(st.st_mode) == 0o660, f"{name}: mode {stat.S_IMODE(st.st_mode):o}"
        assert grp.getgrgid(st.st_gid).gr_name == server.users.group, name


def test_a_job_belongs_to_the_kernel_user_whatever_name_the_client_sends(server: Server) -> None:
    alice, bob = server.users.alice, server.users.bob
    argv = server.users.command(alice, ["claiming_client.py", str(server.d.home), bob.name])
    res = subprocess.run(argv, env=server.users.env(), cwd=server.users.pythonpath, capture_output=True,
                         text=True, timeout=DEADLINE_S, check=False)
    assert res.returncode == 0, res.stderr
    seen = json.loads(res.stdout)
    try:
        assert seen["hello_user"] == alice.name
        assert seen["owner"] == alice.name
        job = server.d.client().call(ShowJob(job_id=seen["id"]), JobDetail).job
        assert job.owner == alice.name and job.name == f"{bob.name}'s job"
    finally:
        server.d.client().call(Cancel(job_id=seen["id"]), Done)


def test_another_member_cannot_cancel_her_job_and_is_told_whose_it_is(server: Server, alice_job: int) -> None:
    alice, bob = server.users.alice, server.users.bob
    res = server.ftctl(bob, "cancel", str(alice_job))
    assert res.returncode == EXIT_FORBIDDEN, (res.returncode, res.stderr)
    assert f"job {alice_job} belongs to {alice.name}, not {bob.name}" in res.stderr
    assert server.users.admin_group in res.stderr  # who else may: the admin group, by name
    assert server.state(alice_job) == "running"
    # members may still see everything, including the jobs of others
    listing = server.ftctl(bob, "jobs", "--json")
    assert listing.returncode == 0, listing.stderr
    assert {"id": alice_job, "owner": alice.name} in [{"id": j["id"], "owner": j["owner"]}
                                                      for j in json.loads(listing.stdout)]


def test_the_owner_can_cancel_her_own_job(server: Server, alice_job: int) -> None:
    res = server.ftctl(server.users.alice, "cancel", str(alice_job), "--wait")
    assert res.returncode == 0, res.stderr
    assert server.state(alice_job) == "canceled"


def test_an_admin_can_cancel_anyones_job_and_the_history_names_her(server: Server, alice_job: int) -> None:
    res = server.ftctl(server.carol, "cancel", str(alice_job), "--wait")
    assert res.returncode == 0, res.stderr
    detail = server.d.client().call(ShowJob(job_id=alice_job), JobDetail)
    assert detail.job.state == "canceled"
    assert any(f"canceled by {server.carol.name}" in h.what for h in detail.history), detail.history
    # and retry is the owner's or an admin's too
    res = server.ftctl(server.users.bob, "retry", str(alice_job))
    assert res.returncode == EXIT_FORBIDDEN, (res.returncode, res.stderr)
    assert server.state(alice_job) == "canceled"


def test_a_user_outside_the_socket_group_cannot_connect_and_is_told_why(server: Server) -> None:
    mallory = server.users.mallory
    log_before = len(server.d.log_text())
    res = server.ftctl(mallory, "jobs")
    assert res.returncode == EXIT_NO_DAEMON, (res.returncode, res.stderr)
    assert f"not allowed to connect to {server.d.paths.ctl_socket}" in res.stderr
    assert "usermod -aG" in res.stderr  # and what to do about it
    # stopped by the kernel (file modes), before the daemon's ZAP handler saw anything
    assert f"refused connection from {mallory.name}" not in server.d.log_text()[log_before:]


def test_zap_still_refuses_an_outsider_when_the_socket_file_is_opened_up(server: Server) -> None:
    """Defence in depth: a socket made world-writable by mistake still lets no outsider in."""
    ctl = server.d.paths.ctl_socket
    mallory = server.users.mallory
    ctl.parent.chmod(0o755)
    ctl.chmod(0o666)
    try:
        res = server.ftctl(mallory, "--timeout", "3", "jobs")
    finally:
        ctl.chmod(0o660)
        ctl.parent.chmod(0o750)
    assert res.returncode == EXIT_NO_DAEMON, (res.returncode, res.stderr)
    assert "ftmllmd" in res.stderr and str(ctl) in res.stderr
    wait_for(lambda: f"refused connection from {mallory.name} (uid {mallory.uid}" in server.d.log_text(),
             DEADLINE_S, "the daemon's log line about the refused handshake")
    assert f"not in group {server.users.group}" in server.d.log_text()
