"""The events socket under attack by a member, and closed to outsiders: the real ftmllmd (as root, socket
group G) and flooders run as real Unix users (tests/systemd/unix_users.py), over ipc:// only.

* 50,000 distinct subscriptions from one connection, again at every reconnect, and a 300 MB frame, leave the
  daemon's RSS (and its peak, VmHWM) within +50 MB, and other clients still get their events;
* too many subscribing connections of one member, or a topic the daemon never publishes, are logged;
* a non-member gets nothing even when the socket file is opened up (ZAP, as on the ctl socket);
* a subscriber that stops reading costs the daemon a bounded queue and, reading again, finds the gap and
  reloads a snapshot (the Clone pattern).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.core.events import MAX_CONNECTIONS, MAX_TOPICS, split_gone, well_formed
from shared.client import AsyncClient
from shared.protocol import JobChanged, JobDetail, ShowJob, Submit
from tests.daemon_proc import DaemonProc, run_job, wait_for
from tests.systemd.unix_users import Account, UnixUsers, unix_users

DEADLINE_S = 120.0  # generous: several helpers share two cores
GROWTH_MB = 50.0

FLOODER = textwrap.dedent("""
    # python3 flooder.py ENDPOINT WHAT N CUTS: floods the events socket, then prints how often the daemon ended
    # the connection (waiting for CUTS of them, at most 90 s)
    import random, sys, time, zmq
    endpoint, what, n, cuts = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    ctx = zmq.Context()
    socks = [ctx.socket(zmq.XSUB if what == "frame" else zmq.SUB) for _ in range(n if what == "conns" else 1)]
    mon = socks[0].get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
    for s in socks:
        s.sndhwm = 0  # else ZeroMQ itself drops subscriptions past its 1,000-message queue
        s.connect(endpoint)
    rnd = random.Random(12)
    if what == "topics":
        for _ in range(n):
            socks[0].setsockopt(zmq.SUBSCRIBE, rnd.randbytes(128))
    elif what == "jobs":
        for i in range(n):
            socks[0].setsockopt(zmq.SUBSCRIBE, b"job.%d" % i)
    elif what == "conns":
        for s in socks:
            s.setsockopt(zmq.SUBSCRIBE, b"hb")
    ended, deadline = 0, time.monotonic() + 90
    while ended < cuts and time.monotonic() < deadline:
        # touching the socket lets it act on a reconnect: a SUB sends all its subscriptions again then
        socks[0].getsockopt(zmq.EVENTS)
        if not mon.poll(100):
            continue
        event = int.from_bytes(mon.recv_multipart()[0][:2], "little")
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED and what == "frame":
            socks[0].send(b"\\x02" + bytes(n * 2**20))  # an XSUB sends only to a peer it has
        elif event == zmq.EVENT_DISCONNECTED:
            ended += 1
    print(ended)
    ctx.destroy(linger=0)
""")

OUTSIDER = textwrap.dedent("""
    # python3 outsider.py ENDPOINT: prints "refused" once the handshake is refused, "got" if any event arrives
    import sys, time, zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.SUB)
    mon = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(sys.argv[1])
    poller = zmq.Poller()
    poller.register(s, zmq.POLLIN)
    poller.register(mon, zmq.POLLIN)
    deadline, said = time.monotonic() + 60, "nothing"
    while time.monotonic() < deadline:
        ready = dict(poller.poll(1000))
        if s in ready:
            said = "got"
            break
        if mon in ready:
            said = "refused"
            break
    print(said)
    ctx.destroy(linger=0)
""")


@dataclass
class Server:
    d: DaemonProc
    users: UnixUsers

    @property
    def pid(self) -> int:
        assert self.d.proc is not None
        return self.d.proc.pid

    def run(self, who: Account, script: str, *args: object) -> str:
        argv = self.users.command(who, [script, self.d.paths.events_endpoint, *map(str, args)])
        res = subprocess.run(argv, env=self.users.env(), cwd=self.users.pythonpath, capture_output=True,
                             text=True, timeout=DEADLINE_S, check=False)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with unix_users(packages=("zmq",)) as users:
        for name, text in (("flooder.py", FLOODER), ("outsider.py", OUTSIDER)):
            (users.pythonpath / name).write_text(text)
            (users.pythonpath / name).chmod(0o644)
        home = Path(tempfile.mkdtemp(prefix="ftt", dir="/tmp"))  # short: unix socket paths <= 107 bytes
        try:
            home.chmod(0o755)
            config = home / "ftmllm.toml"
            config.write_text(f'[daemon]\nsocket_group = "{users.group}"\n')
            d = DaemonProc(home=home, config=config)
            try:
                d.start(timeout=DEADLINE_S)
                yield Server(d, users)
            finally:
                d.close()  # stops the daemon before unix_users() removes the users
        finally:
            shutil.rmtree(home, ignore_errors=True)


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB from /proc/<pid>/status: now, and the peak since the last reset_peak."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def reset_peak(pid: int) -> float:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    return memory_mb(pid)[0]


def assert_bounded(pid: int, before: float, what: str) -> None:
    rss, peak = memory_mb(pid)
    assert peak - before < GROWTH_MB, f"{what}: the daemon's RSS peaked {peak - before:.0f} MB above {before:.0f}"
    assert rss - before < GROWTH_MB, f"{what}: the daemon kept {rss - before:.0f} MB"


def assert_others_still_get_events(server: Server) -> None:
    job, _ = run_job(server.d.client(), "selftest", {"steps": 3, "rate": 0})
    assert job.state == "succeeded"


# ------------------------------------------------------------------------------------------ floods

@pytest.mark.parametrize("what", ["topics", "jobs"])
def test_50000_subscriptions_from_one_connection_leave_the_daemon_within_50_mb(server: Server, what: str) -> None:
    alice = server.users.alice
    listening = server.d.client().events(("job.",))
    next(listening)  # a member's subscriber, live from before the flood to after it
    before = reset_peak(server.pid)
    # the daemon ends the connection at the cap; ZeroMQ reconnects and sends all 50,000 again, three times
    assert server.run(alice, "flooder.py", what, 50_000, 3) == "3"
    assert_bounded(server.pid, before, f"50,000 subscriptions ({what})")
    wait_for(lambda: f"events connection(s) of {alice.name}" in server.d.log_text(), DEADLINE_S, "the log line")
    assert f"more than {MAX_TOPICS} subscriptions on one connection" in server.d.log_text()
    assert_others_still_get_events(server)
    job = server.d.client().call(Submit(kind="selftest", spec={"steps": 1, "rate": 0}), JobDetail).job
    assert any(isinstance(ev.body, JobChanged) and ev.body.job.id == job.id for ev in listening)


def test_a_300_mb_frame_is_dropped_unread(server: Server) -> None:
    before = reset_peak(server.pid)
    assert server.run(server.users.alice, "flooder.py", "frame", 300, 1) == "1"
    assert_bounded(server.pid, before, "a 300 MB frame")
    assert_others_still_get_events(server)


def test_too_many_subscribing_connections_of_one_member_are_ended(server: Server) -> None:
    bob = server.users.bob
    before = reset_peak(server.pid)
    assert server.run(bob, "flooder.py", "conns", MAX_CONNECTIONS + 1, 1) == "1"
    assert_bounded(server.pid, before, "connections")
    wait_for(lambda: f"more than {MAX_CONNECTIONS} subscribing connections of one user" in server.d.log_text(),
             DEADLINE_S, "the log line")
    assert_others_still_get_events(server)


def test_a_subscriber_that_stops_reading_resyncs_by_snapshot(server: Server) -> None:
    async def scenario() -> None:
        slow = AsyncClient(server.d.paths, event_hwm=100)
        updates = slow.watch()
        try:
            assert (await asyncio.wait_for(anext(updates), DEADLINE_S)).kind == "snapshot"
            before = reset_peak(server.pid)
            # from here until the job ends this loop is blocked: nobody reads the slow subscriber's socket
            c = server.d.client()
            job = c.call(Submit(kind="selftest", spec={"steps": 30_000, "rate": 0}), JobDetail).job
            wait_for(lambda: c.call(ShowJob(job_id=job.id), JobDetail).job.state == "succeeded", DEADLINE_S,
                     "30,000 steps", interval=0.2)
            assert_bounded(server.pid, before, "a subscriber that stopped reading")
            kinds: list[str] = []
            while (slow.mirror.jobs.get(job.id) is None or slow.mirror.jobs[job.id].state != "succeeded"):
                kinds.append((await asyncio.wait_for(anext(updates), DEADLINE_S)).kind)
            assert "snapshot" in kinds  # it missed events, saw the gap and reloaded
            assert kinds.count("event") < 30_000
            assert slow.mirror.jobs[job.id] == c.call(ShowJob(job_id=job.id), JobDetail).job
        finally:
            slow.close()  # its suspended watch() is closed with the loop

    asyncio.run(scenario())


# ----------------------------------------------------------------------------------------- who may

def test_a_non_member_cannot_subscribe_even_through_an_opened_up_socket(server: Server) -> None:
    events = server.d.paths.events_socket
    mallory = server.users.mallory
    events.parent.chmod(0o755)
    events.chmod(0o666)
    try:
        assert server.run(mallory, "outsider.py") == "refused"
    finally:
        events.chmod(0o660)
        events.parent.chmod(0o750)
    wait_for(lambda: f"refused an events connection from {mallory.name}" in server.d.log_text(), DEADLINE_S,
             "the log line")
    assert server.run(server.users.alice, "outsider.py") == "got"  # a member, the same way: heartbeats


def test_a_topic_the_daemon_never_publishes_is_ignored_and_logged(server: Server) -> None:
    import zmq  # the test's own subscriber, as root (an allowed uid)

    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.SUB)
        s.setsockopt(zmq.SUBSCRIBE, b"nope")
        s.connect(server.d.paths.events_endpoint)
        wait_for(lambda: "ignored the subscription b'nope'" in server.d.log_text(), DEADLINE_S, "the log line")
    finally:
        ctx.destroy(linger=0)


# --------------------------------------------------------------------------------- the bookkeeping

def test_well_formed_topics_are_the_prefixes_of_what_the_daemon_publishes() -> None:
    for topic in (b"", b"h", b"hb", b"engine", b"gpu", b"queue", b"job", b"job.", b"job.12", b"ocr.3",
                  b"train.7", b"ask.", b"ask.0f3a9c11d2e4"):
        assert well_formed(topic), topic
    for topic in (b"nope", b"hbx", b"job.x", b"job.12a", b"engine.1", b"ask.a b", b"job." + b"1" * 40,
                  os.urandom(16) + b"\xff"):
        assert not well_formed(topic), topic


def test_what_libzmq_hands_back_is_cut_into_the_connections_that_went() -> None:
    a, b, c = b"conn-a", b"conn-b", b"conn-c"
    sets = {frozenset({b"", b"hb"}): [a], frozenset({b"job.", b"hb"}): [b], frozenset({b""}): [c]}
    # one connection: its topics, in byte order
    assert split_gone([b"", b"hb"], sets) == [frozenset({b"", b"hb"})]
    # two at once, one after the other
    assert split_gone([b"hb", b"job.", b"", b"hb"], sets) == [frozenset({b"job.", b"hb"}),
                                                             frozenset({b"", b"hb"})]
    assert split_gone([b"", b"", b"hb"], sets) == [frozenset({b""}), frozenset({b"", b"hb"})]
    # nothing known holds exactly these: no guess
    assert split_gone([b"gpu"], sets) is None
    assert split_gone([b"", b""], sets) is None  # one connection holds {""}, not two
