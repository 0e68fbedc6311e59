"""daemon/ctl/auth.py on its own: the ZAP handler with real ZeroMQ sockets, and identity lookups with real Unix
users and groups (useradd/usermod/gpasswd, see unix_users.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from daemon.ctl.auth import ZAP_DOMAIN, Identities, bind_zap, parse_peer, serve_zap


@pytest.mark.parametrize("address, expected", [
    ("localhost:1001:995:5271", (1001, 995, 5271)),
    (":0:0:1", (0, 0, 1)),
    ("127.0.0.1", None),                 # a tcp peer: its IP only
    ("2001:db8:5:0:0", None),            # IPv6 whose last groups are decimal digits: not "uid 5"
    ("fe80::1:2:3", None),
    ("localhost:1001:995", None),
    ("evil:localhost:0:0:1", None),
])
def test_peer_credentials_are_read_only_from_the_unix_socket_form(address: str,
                                                                  expected: tuple[int, int, int] | None) -> None:
    assert parse_peer(address) == expected


@pytest.fixture
async def zap_router() -> AsyncIterator[tuple[zmq.asyncio.Socket, str, str]]:
    """A ROUTER set up as daemon/daemon.py does (handler bound first, domain enforced), on ipc and tcp."""
    d = tempfile.mkdtemp(prefix="ftz", dir="/tmp")
    ctx = zmq.asyncio.Context()
    zap = bind_zap(ctx)
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.zap_domain = ZAP_DOMAIN.encode()
    router.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    ipc = f"ipc://{d}/ctl.sock"
    router.bind(ipc)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    handler = asyncio.create_task(serve_zap(zap, Identities()))
    try:
        yield router, ipc, f"tcp://127.0.0.1:{port}"
    finally:
        handler.cancel()
        await asyncio.gather(handler, return_exceptions=True)
        router.close()
        ctx.destroy(linger=0)
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        os.rmdir(d)


async def _handshake(endpoint: str, timeout: float = 30.0) -> str:
    """Connect a DEALER from another context; the name of the first handshake outcome event."""
    ctx = zmq.asyncio.Context()
    dealer = ctx.socket(zmq.DEALER)
    mon = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    try:
        dealer.connect(endpoint)
        event = parse_monitor_message(await asyncio.wait_for(mon.recv_multipart(), timeout))
        return str(zmq.Event(event["event"]).name)
    finally:
        dealer.disable_monitor()
        mon.close(linger=0)
        dealer.close(linger=0)
        ctx.term()


async def test_a_unix_socket_peer_gets_in_with_its_kernel_uid(zap_router: tuple[zmq.asyncio.Socket, str, str]) -> None:
    router, ipc, _tcp = zap_router
    assert await _handshake(ipc) == "HANDSHAKE_SUCCEEDED"
    ctx = zmq.asyncio.Context()
    dealer = ctx.socket(zmq.DEALER)
    try:
        dealer.connect(ipc)
        await dealer.send(b"hello")
        _rid, body = await asyncio.wait_for(router.recv_multipart(copy=False), 30)
        assert body.get("User-Id") == str(os.getuid())
    finally:
        dealer.close(linger=0)
        ctx.term()


async def test_a_peer_without_kernel_credentials_is_refused(zap_router: tuple[zmq.asyncio.Socket, str, str]) -> None:
    # tcp:// carries no uid: until CURVE keys are checked, such a peer must not get in as "anonymous"
    _router, _ipc, tcp = zap_router
    assert await _handshake(tcp) == "HANDSHAKE_FAILED_AUTH"


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def test_group_changes_apply_after_the_cache_ttl_or_at_once_after_forget() -> None:
    from tests.systemd.unix_users import unix_users

    now = [1000.0]
    with unix_users(packages=(), admin=True) as users:
        ids = Identities(admin_group=users.admin_group, allowed_group=users.group, daemon_uid=-2,
                         ttl_s=30.0, clock=lambda: now[0])
        bob = users.bob
        assert ids.caller(bob.uid).user == bob.name and not ids.caller(bob.uid).is_admin
        assert ids.allowed(bob.uid) and not ids.allowed(users.mallory.uid)
        assert ids.caller(users.carol.uid).is_admin  # type: ignore[union-attr]

        _run("usermod", "-aG", users.admin_group, bob.name)
        now[0] += 29.0
        assert not ids.caller(bob.uid).is_admin  # still the cached answer
        now[0] += 2.0
        assert ids.caller(bob.uid).is_admin  # re-read: made admin without restarting the daemon

        _run("gpasswd", "-d", bob.name, users.admin_group)
        _run("gpasswd", "-d", bob.name, users.group)
        ids.forget()  # what SIGHUP should do
        assert not ids.caller(bob.uid).is_admin
        assert not ids.allowed(bob.uid)  # removed from the socket group: refused at the next handshake
    assert Path("/etc/group").read_text().count(users.group) == 0
