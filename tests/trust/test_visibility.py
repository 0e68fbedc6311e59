"""Who sees what a job read or wrote (issue 11), end to end: the real ftmllmd (as root, with the unit's umask)
and real Unix users (tests/systemd/unix_users.py): alice and bob are members, carol an admin.

With ``daemon.visibility = "owner"`` bob still sees that alice's job exists and how it goes, but none of its
streamed text reaches any connection of his, whatever he subscribes to, and its log, page text and Markdown
are refused to him with one line; the admin and alice see everything. With ``"team"`` (the default) bob sees
them too, as before."""

from __future__ import annotations

import json
import os
import select
import shutil
import stat
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.core.events import SHARED_PREFIXES, member_part
from shared.protocol import TERMINAL_STATES, Done, JobDetail, PauseQueue, ResumeQueue, ShowJob, text_topic
from tests.daemon_proc import wait_for
from tests.fixtures import pdfs
from tests.systemd.unix_users import Account, unix_users
from tests.trust.members import CLIENT_PACKAGES, DEADLINE_S, REQUEST_AS, Server, serving

EXIT_FORBIDDEN = 4
SECRET = pdfs.page_word(1)  # what alice's PDF says on its first page

# Subscribes as the user running it, one SUB connection per argument (topics separated by "|"; a first topic
# "client" subscribes as shared/client.py does), each also to the job's own topic and heartbeats. Prints
# "live" once every connection has had a message, then one JSON line when every connection saw the job end.
WATCH_AS = textwrap.dedent("""
    import json, sys, time
    import zmq
    from shared.client import with_own_text
    from shared.config import load_settings
    from shared.protocol import TERMINAL_STATES, JobChanged, PageChanged, TextDelta, decode_event
    home, job_id, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
    paths = load_settings(None, home, client=True).paths
    ctx = zmq.Context()
    socks, seen = [], []
    for spec in sys.argv[4:]:
        topics = spec.split("|")
        if topics[0] == "client":
            topics = list(with_own_text(tuple(topics[1:])))
        s = ctx.socket(zmq.SUB)
        s.linger = 0
        for t in [*topics, "hb", f"job.{job_id}"]:
            s.setsockopt(zmq.SUBSCRIBE, t.encode())
        s.connect(paths.events_endpoint)
        socks.append(s)
        seen.append({"topics": topics, "live": False, "done": False, "text": "", "deltas": 0, "other_deltas": 0,
                     "pages": 0, "jobs": 0, "seqs": []})
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    announced = False
    while not all(r["done"] for r in seen) and time.monotonic() < deadline:
        for s, _ in poller.poll(100):
            r = seen[socks.index(s)]
            _topic, frame = s.recv_multipart()
            ev = decode_event(frame)
            b = ev.body
            r["live"] = True
            if ev.durable:
                r["seqs"].append(ev.seq)
            if isinstance(b, TextDelta):
                if b.job_id == job_id:
                    r["deltas"] += 1
                    r["text"] += b.text
                else:
                    r["other_deltas"] += 1
            elif isinstance(b, PageChanged) and b.page.job_id == job_id:
                r["pages"] += 1
            elif isinstance(b, JobChanged) and b.job.id == job_id:
                r["jobs"] += 1
                r["done"] = r["done"] or b.job.state in TERMINAL_STATES
        if not announced and all(r["live"] for r in seen):
            print("live", flush=True)
            announced = True
    print(json.dumps(seen), flush=True)
    ctx.destroy(linger=0)
""")


@contextmanager
def member_site(daemon_keys: str, extra: str = "", packages: tuple[str, ...] = CLIENT_PACKAGES) -> Iterator[Server]:
    """The real ftmllmd as root with the unit's umask and the system layout, members alice and bob, admin carol
    (tests/trust/members.py, with an admin and ``daemon_keys`` in [daemon]); ``extra``: more TOML sections."""
    with unix_users(packages=packages, admin=True) as users:
        for name, text in (("request_as.py", REQUEST_AS), ("watch_as.py", WATCH_AS)):
            (users.pythonpath / name).write_text(text)
            (users.pythonpath / name).chmod(0o644)
        home = Path(tempfile.mkdtemp(prefix="ftv", dir="/tmp"))  # short: unix socket paths ≤ 107 bytes
        try:
            home.chmod(0o755)
            config = home / "ftmllm.toml"
            config.write_text(f'[daemon]\nsocket_group = "{users.group}"\nadmin_group = "{users.admin_group}"\n'
                              f'heartbeat_s = 0.2\n{daemon_keys}\n[hotfolder]\nenabled = false\n{extra}')
            run = home / "run"
            run.mkdir(mode=0o750)
            os.chown(run, 0, users.gid)
            with serving(users, home, config) as server:
                yield server
        finally:
            shutil.rmtree(home, ignore_errors=True)


def carol(server: Server) -> Account:
    assert server.users.carol is not None
    return server.users.carol


@dataclass
class Watch:
    proc: subprocess.Popen[str]
    who: Account

    def result(self) -> list[dict[str, Any]]:
        out, err = self.proc.communicate(timeout=DEADLINE_S)
        assert self.proc.returncode == 0, err
        seen: list[dict[str, Any]] = json.loads(out.strip().splitlines()[-1])
        assert all(r["done"] for r in seen), (self.who.name, seen)  # each connection saw the job to its end
        return seen


def watch(server: Server, who: Account, job_id: int, *connections: str) -> Watch:
    """Connections of ``who``, subscribed and live (each has had a message) when this returns."""
    argv = server.users.command(who, ["watch_as.py", str(server.home), str(job_id), str(DEADLINE_S), *connections])
    proc = subprocess.Popen(argv, env=server.users.env(), cwd=server.users.pythonpath, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], DEADLINE_S)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "live":
        proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"{who.name}'s subscriber did not come up: {line!r} {err}")
    return Watch(proc, who)


def submit_paused(server: Server, who: Account, name: str) -> int:
    """``who`` submits a PDF of hers with the queue paused (by root, an admin): the job waits for the watchers."""
    pdf = pdfs.numbered(server.folder(who, f"{who.name}-{name}") / f"{name}.pdf", 2)
    os.chown(pdf, who.uid, who.gid)
    pdf.chmod(0o600)  # hers alone: ftctl opens it with her rights and hands it over
    server.d.client().call(PauseQueue(), Done)
    res = server.ftctl(who, "submit", "ocr", str(pdf), "--json")
    assert res.returncode == 0, res.stderr
    job_id = int(json.loads(res.stdout)["id"])
    return job_id


def run_and_end(server: Server, job_id: int) -> None:
    server.d.client().call(ResumeQueue(), Done)
    c = server.d.client()
    wait_for(lambda: c.call(ShowJob(job_id=job_id), JobDetail).job.state in TERMINAL_STATES, DEADLINE_S,
             f"job {job_id} to end")
    assert c.call(ShowJob(job_id=job_id), JobDetail).job.state == "succeeded"


def one_line_refusal(res: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert res.returncode == EXIT_FORBIDDEN, (res.returncode, res.stdout, res.stderr)
    line = res.stderr.strip()
    assert len(line.splitlines()) == 1, line
    for text in expected:
        assert text in line, (text, line)
    assert SECRET not in res.stdout + res.stderr


# ------------------------------------------------------------------------------------------- owner mode


@dataclass
class Converted:
    server: Server
    job_id: int
    alice: list[dict[str, Any]]
    bob: list[dict[str, Any]]
    carol: list[dict[str, Any]]


@pytest.fixture(scope="module")
def owner() -> Iterator[Converted]:
    with member_site('visibility = "owner"') as server:
        alice, bob = server.users.alice, server.users.bob
        job = submit_paused(server, alice, "private")
        mine = text_topic(alice.uid, job)
        watches = [
            watch(server, alice, job, f"client|job.{job}|ocr.{job}"),  # as `ftctl submit ocr --follow` does
            # everything, every prefix that covers her text, and her text's own topic
            watch(server, bob, job, "", "o", "ocr.", "ocr.text.", f"ocr.text.{alice.uid}.", mine, f"ocr.{job}",
                  f"client|ocr.{job}"),
            watch(server, carol(server), job, ""),
        ]
        run_and_end(server, job)
        a, b, c = (w.result() for w in watches)
        yield Converted(server, job, a, b, c)


def test_another_members_streamed_text_reaches_none_of_her_connections(owner: Converted) -> None:
    alice, bob = owner.server.users.alice, owner.server.users.bob
    # it was there to be seen: alice (through shared/client.py) and the admin got it as it streamed
    assert owner.alice[0]["deltas"] > 0 and SECRET in owner.alice[0]["text"]
    assert SECRET in owner.carol[0]["text"]
    # bob: not one delta on any connection, yet he saw the job and its pages go by
    for conn in owner.bob:
        assert conn["deltas"] == 0 and conn["text"] == "", conn["topics"]
    assert SECRET not in json.dumps(owner.bob)
    for conn in (owner.bob[0], owner.bob[2], owner.bob[6]):  # "", "ocr.", "ocr.<job>"
        assert conn["pages"] > 0 and conn["jobs"] > 0, conn["topics"]
    # every durable event reached him in order: no gap, so the Clone pattern never reloads for this
    seqs = owner.bob[0]["seqs"]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert seqs == owner.carol[0]["seqs"][-len(seqs):]
    log = owner.server.d.log_text()
    # said once a minute per member, for the first of his subscriptions that got nothing
    assert f"did not subscribe {bob.name} (pid " in log and f"to b'ocr.text.{alice.uid}.'" in log


def test_her_log_page_text_and_markdown_are_refused_to_another_member(owner: Converted) -> None:
    server, job = owner.server, owner.job_id
    alice, bob = server.users.alice, server.users.bob
    why = (f"job {job} is {alice.name}'s", 'daemon.visibility = "owner"', f"ask {alice.name} or an admin")
    one_line_refusal(server.ftctl(bob, "logs", str(job)), "log", *why)
    for body, what in (({"type": "page_text", "job_id": job, "page_no": 1}, "page text"),
                       ({"type": "ocr_output", "job_id": job}, "Markdown output"),
                       ({"type": "logs", "job_id": job}, "log")):
        reply = server.request(bob, body)
        assert reply["ok"] is False and reply["code"] == "forbidden", reply
        assert all(w in str(reply["message"]) for w in (what, *why)) and SECRET not in json.dumps(reply)
    # nor from disk: in owner mode the outbox files are the daemon's user's alone
    outputs = sorted(server.d.paths.outbox.rglob("*.md"))
    assert outputs and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in outputs), outputs
    read = server.run(bob, ["-c", "import sys; print(open(sys.argv[1]).read())", str(outputs[0])])
    assert read.returncode != 0 and "Permission denied" in read.stderr and SECRET not in read.stdout
    # what every member sees: the job, its owner, state and progress (as squeue would show it)
    shown = server.ftctl(bob, "show", str(job))
    assert shown.returncode == 0 and alice.name in shown.stdout and "succeeded" in shown.stdout
    listed = json.loads(server.ftctl(bob, "jobs", "--all", "--json").stdout)
    assert [(j["owner"], j["state"]) for j in listed if j["id"] == job] == [(alice.name, "succeeded")]
    pages = server.request(bob, {"type": "pages", "job_id": job})
    assert pages["ok"] is True and len(pages["reply"]["pages"]) == 2  # type: ignore[index]
    # the owner and an admin read it all
    for who in (alice, carol(server)):
        text = server.request(who, {"type": "page_text", "job_id": job, "page_no": 1})
        assert text["ok"] is True and SECRET in text["reply"]["text"], (who.name, text)  # type: ignore[index]
        md = server.request(who, {"type": "ocr_output", "job_id": job})
        assert md["ok"] is True and SECRET in md["reply"]["markdown"], (who.name, md)  # type: ignore[index]
        assert server.ftctl(who, "logs", str(job)).returncode == 0


def test_her_own_text_still_streams_to_her_in_owner_mode(owner: Converted) -> None:
    """bob's own job: his subscription to everything brings him his own text, and alice none of it."""
    server = owner.server
    alice, bob = server.users.alice, server.users.bob
    job = submit_paused(server, bob, "his")
    watches = [watch(server, bob, job, ""), watch(server, alice, job, "", "ocr.")]
    run_and_end(server, job)
    his, hers = watches[0].result(), watches[1].result()
    assert SECRET in his[0]["text"]
    assert all(conn["deltas"] == 0 for conn in hers) and SECRET not in json.dumps(hers)


# -------------------------------------------------------------------------------------------- team mode


def test_with_team_visibility_every_member_sees_the_text_log_and_output() -> None:
    with member_site("") as server:
        alice, bob = server.users.alice, server.users.bob
        job = submit_paused(server, alice, "shared")
        bobs = watch(server, bob, job, "")
        run_and_end(server, job)
        assert SECRET in bobs.result()[0]["text"]
        logs = server.ftctl(bob, "logs", str(job))
        assert logs.returncode == 0 and logs.stdout.strip(), logs.stderr
        text = server.request(bob, {"type": "page_text", "job_id": job, "page_no": 1})
        assert text["ok"] is True and SECRET in text["reply"]["text"]  # type: ignore[index]
        md = server.request(bob, {"type": "ocr_output", "job_id": job})
        assert md["ok"] is True and SECRET in md["reply"]["markdown"]  # type: ignore[index]


# ------------------------------------------------------------------------------------ the topic rule


def test_a_member_gets_of_a_subscription_only_what_she_may_follow() -> None:
    alice, bob = 1001, 1002
    assert set(member_part(b"", bob)) == {*SHARED_PREFIXES, b"ocr.text.1002.", b"ask.1002-"}
    assert set(member_part(b"ocr.", bob)) == {b"ocr.%d" % d for d in range(10)} | {b"ocr.text.1002."}
    assert member_part(b"ask.", bob) == (b"ask.1002-",)
    for topic in (b"job.12", b"ocr.12", b"train.7", b"hb", b"ocr.text.1002.12", b"ask.1002-0f3a"):
        assert member_part(topic, bob) == (topic,), topic  # inside what he may follow: as asked
    for topic in (b"ocr.text.1001.12", b"ocr.text.1001.", b"ask.1001-0f3a", b"ocr.text.10021."):
        assert member_part(topic, bob) == (), topic  # another member's text: nothing
    # the uid ends with a separator: uid 100 gets nothing of uid 1002's prefixes, nor 1002 of 10021's
    assert member_part(b"ocr.text.100", 100) == (b"ocr.text.100.",)
    assert text_topic(alice, 12) == "ocr.text.1001.12"
    assert not any(text_topic(alice, 12).encode().startswith(p) for p in member_part(b"", bob))
    assert any(text_topic(bob, 12).encode().startswith(p) for p in member_part(b"", bob))
