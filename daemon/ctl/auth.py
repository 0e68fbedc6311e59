"""Who is calling: the client's Unix user comes from the kernel, never from a name the client sends.

With a ZAP domain set on the ``ctl`` socket, libzmq asks a ZAP handler (RFC 27) about every new
connection. For an ``ipc://`` peer the request's address frame ends in ``UID:GID:PID`` (libzmq reads
SO_PEERCRED). The handler answers with the uid as User-Id, and libzmq then attaches that User-Id to every
message of the connection, where the server reads it with ``Frame.get("User-Id")``.

Permission to connect at all is the socket file's mode (0660, group-owned); the handler refuses peers
outside the allowed group as a second line.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from daemon.jobs.base import Caller
from shared.config import ConfigError

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = "ftmllm"
# Anchored: libzmq writes "<peer ip>:UID:GID:PID" for a unix socket peer, where the ip part is "localhost"
# (or empty). A tcp peer's address is just its IP, and an IPv6 one such as "2001:db8:5:0:0" would match an
# unanchored "(\d+):(\d+):(\d+)$" and pass for uid 5 (or root).
_PEER_RE = re.compile(r"(?:localhost)?:(\d+):(\d+):(\d+)")
# Group membership is re-read this often, so `gpasswd -d USER ftmllm-admin` takes effect without a restart.
IDENTITY_TTL_S = 30.0


def parse_peer(address: str) -> tuple[int, int, int] | None:
    """``localhost:UID:GID:PID`` (or ``:UID:GID:PID``) → (uid, gid, pid); None if it carries no creds."""
    m = _PEER_RE.fullmatch(address)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


def group_names(uid: int) -> frozenset[str]:
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return frozenset()
    names = set()
    for gid in os.getgrouplist(pw.pw_name, pw.pw_gid):
        try:
            names.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue
    return frozenset(names)


@dataclass
class Identities:
    """Maps the User-Id on a message to a Caller; caches lookups (they hit NSS)."""

    admin_group: str = ""
    allowed_group: str = ""  # "" = anyone who can open the socket file
    daemon_uid: int = field(default_factory=os.getuid)
    ttl_s: float = IDENTITY_TTL_S
    clock: Callable[[], float] = time.monotonic
    _cache: dict[int, tuple[float, Caller]] = field(default_factory=dict)

    def caller(self, uid: int) -> Caller:
        now = self.clock()
        cached = self._cache.get(uid)
        if cached is not None and now - cached[0] < self.ttl_s:
            return cached[1]
        name = user_name(uid)
        groups = group_names(uid)
        is_admin = uid == 0 or uid == self.daemon_uid or (bool(self.admin_group) and self.admin_group in groups)
        caller = Caller(user=name, uid=uid, groups=groups, is_admin=is_admin)
        self._cache[uid] = (now, caller)
        return caller

    def forget(self) -> None:
        """Drop every cached lookup (on SIGHUP: an admin who just changed groups wants it applied now)."""
        self._cache.clear()

    def allowed(self, uid: int) -> bool:
        if not self.allowed_group or uid in (0, self.daemon_uid):
            return True
        return self.allowed_group in self.caller(uid).groups

    def from_frame(self, frame: zmq.Frame) -> Caller:
        try:
            user_id = frame.get("User-Id")
        except (zmq.ZMQError, KeyError):
            user_id = None
        if user_id and str(user_id).isdigit():
            return self.caller(int(user_id))
        # no credentials (tcp without CURVE identity): an anonymous caller that owns nothing
        return Caller(user="anonymous", uid=-1)


def socket_gid(group: str) -> int | None:
    """The gid the socket files should belong to (``daemon.socket_group``), None to leave them as created."""
    if not group:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"daemon.socket_group: there is no Unix group '{group}'; create it "
                          f"(groupadd {group}) or change the config") from None


def bind_zap(ctx: zmq.asyncio.Context) -> zmq.asyncio.Socket:
    """Bind the ZAP handler's socket; must happen before the ctl socket is bound (see service.bind)."""
    sock = ctx.socket(zmq.REP)
    sock.linger = 0
    sock.bind(ZAP_ENDPOINT)
    return sock


async def serve_zap(sock: zmq.asyncio.Socket, identities: Identities) -> None:
    """The ZAP handler: answers every new connection for the daemon's lifetime."""
    refused: dict[int, float] = {}
    try:
        while True:
            frames = await sock.recv_multipart()
            version, request_id, _domain, address = frames[0], frames[1], frames[2], frames[3]
            peer = parse_peer(address.decode(errors="replace"))
            if peer is None:
                # not a unix socket peer (no kernel credentials): nobody to attribute requests to, so no
                # entry until tcp:// gets its CURVE key check; fail closed rather than admit "anonymous"
                key = -1
                if time.monotonic() - refused.get(key, -1e9) > 60:
                    refused[key] = time.monotonic()
                    log.warning("refused connection from %s: no peer credentials (only local ipc:// clients "
                                "are accepted)", address.decode(errors="replace"))
                status, text, user = b"400", b"no peer credentials: connect over the local ipc socket", b""
            elif identities.allowed(peer[0]):
                status, text, user = b"200", b"OK", str(peer[0]).encode()
            else:
                # libzmq retries a refused handshake: say it once a minute per user, not per retry
                if time.monotonic() - refused.get(peer[0], -1e9) > 60:
                    refused[peer[0]] = time.monotonic()
                    log.warning("refused connection from %s (uid %d, pid %d): not in group %s",
                                user_name(peer[0]), peer[0], peer[2], identities.allowed_group)
                status, text, user = b"400", b"not a member of the daemon's group", b""
            await sock.send_multipart([version, request_id, status, text, user, b""])
    finally:
        sock.close()
