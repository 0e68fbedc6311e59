"""What the trust model rests on, checked with real Unix users against libzmq (pyzmq 27.3, libzmq 4.3.5).

* With a ZAP domain on a ROUTER bound to ipc://, the ZAP request's address frame is
  ``localhost:UID:GID:PID`` of the connecting process, read by libzmq with SO_PEERCRED: the kernel's word,
  not the client's.
* The handler's User-Id then rides on every message of that connection (``Frame.get("User-Id")``), next to
  ``Peer-Address``.
* A socket file of mode 0660 keeps users outside its group from connecting at all.
* A ZAP refusal (400) reaches the client as HANDSHAKE_FAILED_AUTH, so a client can say why.
* With ZAP_ENFORCE_DOMAIN and no handler, nobody gets in (fails closed).

Each client is a real process run with setpriv as a user created for the test (see unix_users.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from tests.systemd.unix_users import Account, UnixUsers, unix_users

CLIENT = textwrap.dedent("""
    import json, os, sys, zmq
    from zmq.utils.monitor import recv_monitor_message
    path, claim = sys.argv[1], sys.argv[2]
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    mon = s.get_monitor_socket()
    s.connect("ipc://" + path)
    s.send_json({"claim": claim, "pid": os.getpid()})
    reply = s.recv().decode() if s.poll(int(sys.argv[3])) else None
    events = []
    # a refused connect() is retried every 100 ms, so the monitor never falls silent: read a bounded number
    while len(events) < 20 and mon.poll(200):
        m = recv_monitor_message(mon)
        events.append([zmq.Event(m["event"]).name, m["value"]])
    s.disable_monitor(); mon.close(linger=0); s.close(linger=0); ctx.term()
    print(json.dumps({"reply": reply, "pid": os.getpid(), "may_open": os.access(path, os.W_OK),
                      "events": events}))
""")


@pytest.fixture(scope="module")
def users() -> Iterator[UnixUsers]:
    with unix_users(packages=("zmq",)) as u:
        (u.pythonpath / "peer_client.py").write_text(CLIENT)
        (u.pythonpath / "peer_client.py").chmod(0o644)
        yield u


@dataclass
class Server:
    """A ROUTER on ipc:// with ZAP, as the daemon's ctl socket; records what libzmq tells it."""

    path: Path
    refuse_uids: set[int] = field(default_factory=set)
    zap_requests: list[list[bytes]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
async def server(users: UnixUsers) -> AsyncIterator[Server]:
    run = Path(tempfile.mkdtemp(prefix="fttrun", dir="/tmp"))
    run.chmod(0o755)  # open directory: the socket file's own mode is what keeps outsiders out
    srv = Server(run / "ctl.sock")
    ctx = zmq.asyncio.Context()
    zap = ctx.socket(zmq.REP)
    zap.bind("inproc://zeromq.zap.01")  # before the ROUTER binds, or early peers skip authentication
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ZAP_DOMAIN, b"ftmllm")
    router.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    router.bind(f"ipc://{srv.path}")
    os.chown(srv.path, -1, users.gid)
    os.chmod(srv.path, 0o660)

    async def zap_handler() -> None:
        while True:
            frames = await zap.recv_multipart()
            srv.zap_requests.append(frames)
            version, request_id, _domain, address = frames[:4]
            uid = int(address.decode().split(":")[1])
            if uid in srv.refuse_uids:
                await zap.send_multipart([version, request_id, b"400", b"not in group ftmllm", b"", b""])
            else:
                await zap.send_multipart([version, request_id, b"200", b"OK", str(uid).encode(), b""])

    async def serve() -> None:
        while True:
            rid, body = await router.recv_multipart(copy=False)
            srv.messages.append({"body": json.loads(body.bytes), "User-Id": body.get("User-Id"),
                                 "Peer-Address": body.get("Peer-Address")})
            await router.send_multipart([rid.bytes, b"ok"])

    tasks = [asyncio.create_task(zap_handler()), asyncio.create_task(serve())]
    try:
        yield srv
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        ctx.destroy(linger=0)
        shutil.rmtree(run, ignore_errors=True)


async def connect_as(users: UnixUsers, who: Account, srv: Server, claim: str,
                     wait_ms: int = 10_000) -> dict[str, Any]:
    """Run the client as `who`; it waits up to wait_ms for the reply (a refused one never comes)."""
    proc = await asyncio.create_subprocess_exec(
        *users.command(who, [str(users.pythonpath / "peer_client.py"), str(srv.path), claim, str(wait_ms)]),
        env=users.env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:  # a hung client would keep its user from being deleted
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


async def test_zap_request_for_an_ipc_peer_carries_its_kernel_uid_gid_pid(users: UnixUsers, server: Server) -> None:
    got = await connect_as(users, users.alice, server, claim="root")
    assert got["reply"] == "ok"
    a = users.alice
    address = f"localhost:{a.uid}:{a.gid}:{got['pid']}"
    assert server.zap_requests == [[b"1.0", b"1", b"ftmllm", address.encode(), b"", b"NULL"]]
    (msg,) = server.messages
    assert msg["body"] == {"claim": "root", "pid": got["pid"]}
    # the claim in the body is ignored; the kernel's uid is on the frame
    assert msg["User-Id"] == str(a.uid) and msg["Peer-Address"] == address


async def test_two_users_are_told_apart_whatever_they_claim(users: UnixUsers, server: Server) -> None:
    await connect_as(users, users.alice, server, claim=users.alice.name)
    await connect_as(users, users.bob, server, claim=users.alice.name)
    seen = [(m["body"]["claim"], m["User-Id"]) for m in server.messages]
    assert seen == [(users.alice.name, str(users.alice.uid)), (users.alice.name, str(users.bob.uid))]


async def test_a_user_outside_the_group_cannot_connect_to_a_0660_socket(users: UnixUsers, server: Server) -> None:
    assert server.path.stat().st_mode & 0o777 == 0o660
    got = await connect_as(users, users.mallory, server, claim=users.alice.name, wait_ms=1500)
    assert got["may_open"] is False and got["reply"] is None
    # the kernel refused connect() (EACCES): libzmq just keeps retrying, it never reaches the daemon
    assert {name for name, _ in got["events"]} <= {"CONNECT_RETRIED", "CLOSED", "CONNECT_DELAYED"}
    assert server.zap_requests == [] and server.messages == []


async def test_a_zap_refusal_reaches_the_client_as_handshake_failed_auth(users: UnixUsers, server: Server) -> None:
    server.refuse_uids.add(users.bob.uid)
    got = await connect_as(users, users.bob, server, claim=users.bob.name, wait_ms=1500)
    assert got["reply"] is None
    assert ["HANDSHAKE_FAILED_AUTH", 400] in got["events"]
    # libzmq may retry the handshake after a refusal (each attempt is refused again): a daemon should
    # rate-limit its log line per uid, and a client should give up on HANDSHAKE_FAILED_AUTH
    assert server.zap_requests and server.messages == []
    assert {f[3].decode().split(":")[1] for f in server.zap_requests} == {str(users.bob.uid)}


async def test_enforced_zap_domain_without_a_handler_lets_nobody_in() -> None:
    ctx = zmq.asyncio.Context()
    run = Path(tempfile.mkdtemp(prefix="fttz", dir="/tmp"))
    try:
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.ZAP_DOMAIN, b"ftmllm")
        router.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        router.bind(f"ipc://{run}/ctl.sock")
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(f"ipc://{run}/ctl.sock")
        await dealer.send(b"hello")
        assert await router.poll(1000) == 0
    finally:
        ctx.destroy(linger=0)
        shutil.rmtree(run, ignore_errors=True)
