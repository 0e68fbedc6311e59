"""The event bus and the events socket.

:class:`EventBus` is the one place that turns state changes into published events. Durable events are
committed by the store first and published after, in the same loop turn, so the order on the wire is the
order of ``seq``. Stream events (text deltas, GPU samples) are coalesced per key and flushed on a short timer:
a model emitting 200 tokens/s per page over 64 pages must not become 12,800 messages a second for every
client.

:class:`EventSocket` is the socket they go out on, bounded so that no member can grow the daemon with it:

* **Frames**: ``MAXMSGSIZE`` of :data:`MAX_SUBSCRIPTION_BYTES`. A subscriber only ever sends subscriptions
  (a topic of a few dozen bytes); libzmq drops a connection whose frame header says more before it allocates
  the frame (a 300 MB frame took a plain PUB to 342 MB).
* **Topics**: an XPUB in manual mode (``XPUB_MANUAL``) applies only subscriptions to what the daemon
  publishes (:func:`well_formed`, after ``topic_of`` in shared/protocol.py); others are ignored and logged.
* **Whose text**: streamed text goes out on its owner's topics (``ocr.text.<uid>.<job>``, ``ask.<uid>-…``).
  With ``daemon.visibility = "owner"`` a member who is not an admin gets of each subscription only the part
  she may follow (:func:`member_part`): ``""`` becomes every topic but other members' text, a subscription
  to another member's text nothing at all (logged). A PUB cannot filter per subscriber, but libzmq matches
  each connection against what the daemon applied for it, so the text never reaches her connection. Every
  durable event stays on a topic every member may follow, so nobody sees a ``seq`` gap (the Clone pattern).
* **Subscriptions**: at most :data:`MAX_TOPICS` per connection and :data:`MAX_CONNECTIONS` subscribing
  connections per user. In manual mode libzmq still keeps every subscription a connection sends, applied or
  not, until the connection goes, so a cap is kept by ending the connection (50,000 subscriptions from one
  connection took a plain PUB to 4.6 GB, still 4.7 GB after it went).
* **Slow subscribers**: ``SNDHWM`` of :data:`EVENT_HWM` events per connection; past it the XPUB drops for that
  subscriber alone, which sees a ``seq`` gap (or a heartbeat ahead of its mirror) and reloads a snapshot
  (the Clone pattern in shared/client.py).
* **Who**: the socket file is 0660 in the socket group, and the socket has a ZAP handler of its own (it lives
  in a context of its own, so its own ``inproc://zeromq.zap.01``) that refuses peers outside that group, as
  the ctl socket's does.

Telling connections apart: an XPUB names no connection, and the ``Peer-Address`` metadata of a subscription
(``localhost:uid:gid:pid``, SO_PEERCRED) only tells processes apart, so a long-lived process that opens and
closes subscribers (ftui's job views) would add up forever. Instead the ZAP handler gives every handshake
its own User-Id, ``<uid>:<pid>:<n>``, which libzmq attaches to every subscription of that connection: the
daemon knows each connection's topic set exactly. When a connection goes, libzmq hands back one
unsubscription per topic it held, without metadata, in byte order, all at once; the connection whose set
that run is (or the ones whose sets it is made of, when several went together) is forgotten.

Ending a connection: libzmq has no call for it on a bound socket. The daemon shuts down (never closes) the
accepted socket in this process whose local address is the events socket and whose peer (SO_PEERCRED) is
the offending process; libzmq reads EOF, ends the connection and frees what it kept. Every events
connection of that process goes (none is told apart from the others at that level); its ZeroMQ reconnects
and sends its subscriptions again, and ftctl and ftui never come near a cap.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.asyncio

from shared.private_dir import owner_name
from shared.protocol import NO_UID, Event, EventBody, Heartbeat, TextDelta, encode, own_topic_prefixes, topic_of

log = logging.getLogger(__name__)

# Text deltas are merged per key and sent at most this often (~20 per second).
DELTA_FLUSH_S = 0.05
# Events queued for one subscriber before it misses some (and reloads a snapshot): 2 s at 5,000 events/s,
# a few MB at the events' usual size. It bounds what a subscriber that stops reading costs the daemon.
EVENT_HWM = 10_000
# The largest frame a subscriber may send: subscriptions are a few dozen bytes, the ZMTP handshake ~60.
MAX_SUBSCRIPTION_BYTES = 256
# Subscription messages queued per connection before libzmq stops reading it. Each time the daemon reads,
# libzmq moves the whole queue into the socket and keeps every subscription it moved (manual mode) until the
# connection goes: with 1,000 it ran 50,000 (330 MB) ahead of the daemon's reading and cutting a flood.
SUBSCRIPTION_HWM = 10
# ftctl and ftui subscribe to at most a handful of topics per connection, and a person runs a few of them.
MAX_TOPICS = 64
MAX_CONNECTIONS = 64
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"ftmllm-events"
# one log line per user and kind of trouble per this many seconds (a refused client retries every 100 ms)
SAY_EVERY_S = 60.0
# a connection just ended is not looked for again sooner (what it had in flight still arrives)
CUT_AGAIN_S = 1.0
# subscription messages handled before the loop gets a turn (a flood must not hold up requests)
READ_BATCH = 1000

_NAMES = (b"hb", b"engine", b"gpu", b"queue", b"job.", b"ocr.", b"ocr.text.", b"train.", b"ask.")
_NUMBERED = re.compile(rb"(?:job|ocr|train)\.\d{1,19}|ocr\.text\.\d{1,10}(?:\.\d{0,19})?|ask\.[0-9A-Za-z:_-]{1,64}")
# What every member may follow, whatever daemon.visibility says: everything but streamed text. Page states go
# out on ocr.<id>, whose prefixes are "ocr.0" … "ocr.9"; text on "ocr.text.…", which none of them covers.
SHARED_PREFIXES = (b"hb", b"engine", b"gpu", b"queue", b"job.", b"train.", *(b"ocr.%d" % d for d in range(10)))


def well_formed(topic: bytes) -> bool:
    """A prefix of a topic the daemon publishes (``topic_of`` in shared/protocol.py): "" (all), "hb",
    "engine", "gpu", "queue", "job.", "job.<id>", "ocr.<id>", "ocr.text.<uid>.<id>", "train.<id>", "ask.<key>"
    or any prefix of one."""
    return any(name.startswith(topic) for name in _NAMES) or _NUMBERED.fullmatch(topic) is not None


def member_part(topic: bytes, uid: int) -> tuple[bytes, ...]:
    """What a subscription to ``topic`` gets a member who sees only her own text (``daemon.visibility =
    "owner"``, not an admin): the topic itself if it lies inside what she may follow, else the prefixes she
    may follow that lie inside it; nothing for a subscription to another member's text."""
    hers = SHARED_PREFIXES + tuple(p.encode() for p in own_topic_prefixes(uid))
    if any(topic.startswith(p) for p in hers):
        return (topic,)
    return tuple(p for p in hers if p.startswith(topic))


class EventBus:
    def __init__(self, sock: zmq.asyncio.Socket, session: str, seq: int,
                 owner_of: Callable[[int], int] | None = None) -> None:
        """``owner_of(job_id)``: the uid of a job's owner, whose topic its text goes out on."""
        self._sock = sock
        self._owner_of = owner_of or (lambda _job_id: NO_UID)
        self.session = session
        self.seq = seq  # the last durable seq published (or found in the store at start)
        self.started = time.monotonic()
        self._pending_deltas: dict[str, TextDelta] = {}
        self._uncommitted: list[tuple[int, EventBody]] = []
        self._flush_handle: asyncio.TimerHandle | None = None

    def _send(self, body: EventBody, seq: int, durable: bool) -> None:
        frame = encode(Event(seq=seq, session=self.session, ts=time.time(), durable=durable, body=body))
        owner = self._owner_of(body.job_id) if isinstance(body, TextDelta) and body.job_id else NO_UID
        try:
            self._sock.send_multipart([topic_of(body, owner).encode(), frame], flags=zmq.NOBLOCK)
        except zmq.Again:
            # PUB never blocks; this only happens if the socket's own queue is full: the subscribers will
            # see a seq gap and ask for a snapshot, so nothing is lost for good.
            log.warning("event socket full: dropped event seq=%d", seq)

    def durable(self, seq: int, body: EventBody) -> None:
        """Publish the event the store wrote as ``seq``, as soon as the store commits it."""
        self._uncommitted.append((seq, body))

    def committed(self) -> None:
        """The store's commit hook: everything written so far is safe, send it in seq order."""
        pending, self._uncommitted = self._uncommitted, []
        for seq, body in pending:
            self.seq = max(self.seq, seq)
            self._send(body, seq, True)

    def stream(self, body: EventBody) -> None:
        """Publish an event that changes no stored state (deltas are coalesced, see module doc)."""
        if isinstance(body, TextDelta):
            prev = self._pending_deltas.get(body.key)
            if prev is not None and not body.reset:
                body = TextDelta(key=body.key, text=prev.text + body.text, job_id=body.job_id,
                                 page_no=body.page_no, final=body.final, reset=prev.reset)
            self._pending_deltas[body.key] = body
            if body.final:
                self._flush_key(body.key)
            elif self._flush_handle is None:
                self._flush_handle = asyncio.get_running_loop().call_later(DELTA_FLUSH_S, self.flush)
            return
        self._send(body, self.seq, False)

    def _flush_key(self, key: str) -> None:
        delta = self._pending_deltas.pop(key, None)
        if delta is not None:
            self._send(delta, self.seq, False)

    def flush(self) -> None:
        self._flush_handle = None
        for key in list(self._pending_deltas):
            self._flush_key(key)

    def heartbeat(self) -> None:
        self._send(Heartbeat(pid=os.getpid(), uptime_s=time.monotonic() - self.started), self.seq, False)

    async def run_heartbeat(self, interval: float) -> None:
        while True:
            self.heartbeat()
            await asyncio.sleep(interval)



@dataclass
class _Connection:
    """One subscriber connection as the daemon knows it: whose, and every topic it holds in libzmq."""

    id: bytes  # the User-Id its handshake got
    uid: int
    pid: int
    topics: set[bytes] = field(default_factory=set)
    ended: bool = False  # over a cap: what it still had in flight is counted, never applied
    # what the daemon applied in libzmq for each topic it asked for (member_part), and how many of its topics
    # hold each applied prefix: libzmq keeps one subscription per prefix and connection, not a count
    granted: dict[bytes, tuple[bytes, ...]] = field(default_factory=dict)
    applied: dict[bytes, int] = field(default_factory=dict)


Peer = Callable[[str], tuple[int, int, int] | None]


class EventSocket:
    """The events socket: an XPUB in manual mode behind a ZAP handler of its own (see the module doc).

    ``allowed(uid)`` says who may subscribe; ``peer(address)`` reads (uid, gid, pid) from a ZAP request's
    address (daemon/ctl/auth.py's parse_peer: the one reading of libzmq's format); ``sees_all(uid)`` says
    whether that user may follow every member's streamed text (else only her own: :func:`member_part`)."""

    def __init__(self, path: Path, allowed: Callable[[int], bool], peer: Peer, hwm: int = EVENT_HWM,
                 sees_all: Callable[[int], bool] = lambda _uid: True) -> None:
        self.path = path
        self._allowed = allowed
        self._peer = peer
        self._sees_all = sees_all
        self.ctx = zmq.asyncio.Context()
        sock = self.ctx.socket(zmq.XPUB)
        sock.linger = 0
        sock.sndhwm = hwm
        sock.rcvhwm = SUBSCRIPTION_HWM
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION_BYTES)
        sock.setsockopt(zmq.XPUB_MANUAL, 1)
        self.sock = sock
        self._zap: zmq.asyncio.Socket | None = None
        self._ids = itertools.count(1)
        self._connections: dict[bytes, _Connection] = {}
        self._said: dict[tuple[int, str], float] = {}
        self._cut: dict[bytes, float] = {}

    def bind(self) -> None:
        # the ZAP handler first and the domain enforced: no connection slips in unauthenticated in between
        zap = self.ctx.socket(zmq.REP)
        zap.linger = 0
        zap.bind(ZAP_ENDPOINT)
        self._zap = zap
        self.sock.zap_domain = ZAP_DOMAIN
        self.sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        self.sock.bind(f"ipc://{self.path}")

    async def serve(self) -> None:
        """Answer handshakes and read subscriptions for the daemon's lifetime."""
        await asyncio.gather(self._serve_zap(), self._read_subscriptions())

    def close(self) -> None:
        self.sock.close()
        if self._zap is not None:
            self._zap.close()
        self.ctx.term()

    # ------------------------------------------------------------------------------ handshakes

    async def _serve_zap(self) -> None:
        assert self._zap is not None
        while True:
            frames = await self._zap.recv_multipart()
            version, request_id, address = frames[0], frames[1], frames[3].decode(errors="replace")
            peer = self._peer(address)
            status, text, user = b"400", b"", b""
            if peer is None:
                text = b"no peer credentials: connect over the local ipc socket"
                self._say(-1, "refused", f"refused an events connection from {address}: no peer credentials "
                          "(only local ipc:// clients are accepted)")
            elif not self._allowed(peer[0]):
                text = b"not a member of the daemon's group"
                self._say(peer[0], "refused", f"refused an events connection from {owner_name(peer[0])} "
                          f"(uid {peer[0]}, pid {peer[2]}): not in the daemon's socket group")
            else:
                status, text, user = b"200", b"OK", f"{peer[0]}:{peer[2]}:{next(self._ids)}".encode()
            await self._zap.send_multipart([version, request_id, status, text, user, b""])

    # ---------------------------------------------------------------------------- subscriptions

    async def _read_subscriptions(self) -> None:
        # read through a plain shadow: in manual mode a subscription applies to the connection of the message
        # read last, so each is decided before the next read; the asyncio socket only waits
        plain: zmq.Socket[bytes] = zmq.Socket.shadow(self.sock.underlying)
        gone: list[bytes] = []
        while True:
            await self.sock.poll()  # POLLIN
            for n in itertools.count(1):
                if n % READ_BATCH == 0:
                    await asyncio.sleep(0)
                try:
                    frame = plain.recv(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                data = frame.bytes
                try:
                    conn_id = str(frame.get("User-Id")).encode()
                except zmq.ZMQError:
                    # no metadata: libzmq hands back the topics of a connection that went (see module doc)
                    if data[:1] == b"\x00":
                        gone.append(data[1:])
                    continue
                if gone:
                    self._retire(gone)
                    gone = []
                self._handle(plain, conn_id, data)
            if gone:  # a gone connection's topics come all at once: an empty queue ends them
                self._retire(gone)
                gone = []

    def _handle(self, plain: zmq.Socket[bytes], conn_id: bytes, data: bytes) -> None:
        conn = self._connections.get(conn_id)
        if conn is None:
            uid, pid, _n = conn_id.split(b":")
            conn = self._connections[conn_id] = _Connection(conn_id, int(uid), int(pid))
        if not data or data[0] > 1:
            self._end(conn, "it sent data, not subscriptions")
        elif data[0] == 0:
            conn.topics.discard(data[1:])
            self._revoke(plain, conn, data[1:])
        else:
            topic = data[1:]
            first = not conn.topics
            conn.topics.add(topic)
            if conn.ended:
                pass
            elif len(conn.topics) > MAX_TOPICS:
                self._end(conn, f"more than {MAX_TOPICS} subscriptions on one connection")
            elif first and self._subscribers(conn.uid) > MAX_CONNECTIONS:
                self._end(conn, f"more than {MAX_CONNECTIONS} subscribing connections of one user")
            elif not well_formed(topic):
                self._say(conn.uid, "topic", f"ignored the subscription {topic[:64]!r} of {owner_name(conn.uid)} "
                          f"(pid {conn.pid}): not a topic ftmllmd publishes (see topic_of in shared/protocol.py)")
            elif topic not in conn.granted:
                part = (topic,) if self._sees_all(conn.uid) else member_part(topic, conn.uid)
                if not part:
                    self._say(conn.uid, "private", f"did not subscribe {owner_name(conn.uid)} (pid {conn.pid}) to "
                              f"{topic[:64]!r}: another member's streamed text, which daemon.visibility = "
                              '"owner" keeps to its owner and admins')
                conn.granted[topic] = part
                for prefix in part:
                    conn.applied[prefix] = conn.applied.get(prefix, 0) + 1
                    if conn.applied[prefix] == 1:
                        plain.setsockopt(zmq.SUBSCRIBE, prefix)
        if not conn.topics:
            # libzmq holds nothing for it either, and hands nothing back when it goes
            del self._connections[conn_id]

    @staticmethod
    def _revoke(plain: zmq.Socket[bytes], conn: _Connection, topic: bytes) -> None:
        for prefix in conn.granted.pop(topic, ()):
            conn.applied[prefix] -= 1
            if not conn.applied[prefix]:
                del conn.applied[prefix]
                plain.setsockopt(zmq.UNSUBSCRIBE, prefix)

    def _subscribers(self, uid: int) -> int:
        count = sum(1 for c in self._connections.values() if c.uid == uid)
        if count > MAX_CONNECTIONS:
            self._forget_dead()  # a connection whose end could not be told apart must not count against her
            count = sum(1 for c in self._connections.values() if c.uid == uid)
        return count

    def _retire(self, topics: list[bytes]) -> None:
        by_set: dict[frozenset[bytes], list[bytes]] = {}
        for conn_id, conn in self._connections.items():
            by_set.setdefault(frozenset(conn.topics), []).append(conn_id)
        pieces = split_gone(topics, by_set)
        if pieces is None:
            log.debug("could not tell which events connection(s) held %d returned topics", len(topics))
            self._forget_dead()
            return
        for piece in pieces:
            del self._connections[by_set[piece].pop()]

    def _forget_dead(self) -> None:
        for conn_id, conn in list(self._connections.items()):
            if not _alive(conn.pid):
                del self._connections[conn_id]

    def _end(self, conn: _Connection, why: str) -> None:
        conn.ended = True
        now = time.monotonic()
        if now - self._cut.get(conn.id, -CUT_AGAIN_S) < CUT_AGAIN_S:
            return  # its record may have gone (it held nothing) while its in-flight messages still arrive
        self._cut = {cid: t for cid, t in self._cut.items() if now - t < CUT_AGAIN_S}
        self._cut[conn.id] = now
        ended = cut_connections(self.path, conn.pid)
        self._say(conn.uid, "cut", f"ended {ended} events connection(s) of {owner_name(conn.uid)} (pid {conn.pid}): "
                  f"{why}; ftctl and ftui never do this, so look at what that process runs")

    def _say(self, uid: int, what: str, text: str) -> None:
        now = time.monotonic()
        if now - self._said.get((uid, what), -SAY_EVERY_S) >= SAY_EVERY_S:
            self._said[(uid, what)] = now
            log.warning("%s", text)


def split_gone(topics: list[bytes], sets: Mapping[frozenset[bytes], list[bytes]]) -> list[frozenset[bytes]] | None:
    """``topics`` (what libzmq handed back after connections went) cut into consecutive pieces, each the topic
    set of one known connection; None when no such cut exists. One gone connection's topics come together,
    so the whole run is usually one piece; several connections that went at once follow each other."""
    whole = frozenset(topics)
    if len(whole) == len(topics) and len(sets.get(whole, ())) >= 1:
        return [whole]
    n = len(topics)
    sizes = sorted({len(s) for s in sets if 0 < len(s) <= n})
    back: dict[int, tuple[int, frozenset[bytes]]] = {}
    reached = {0}
    for i in range(n):
        if i not in reached:
            continue
        for k in sizes:
            if i + k > n:
                break
            piece = frozenset(topics[i:i + k])
            if i + k not in reached and len(piece) == k and piece in sets:
                reached.add(i + k)
                back[i + k] = (i, piece)
    if n not in reached:
        return None
    pieces: list[frozenset[bytes]] = []
    i = n
    while i:
        i, piece = back[i]
        pieces.append(piece)
    if any(pieces.count(p) > len(sets[p]) for p in set(pieces)):
        return None
    return pieces[::-1]


def cut_connections(path: Path, pid: int) -> int:
    """Shut down every accepted connection on the Unix socket ``path`` in this process whose peer is ``pid``;
    how many. Shut down, not closed: the descriptor stays libzmq's, which reads EOF and cleans up. Each
    descriptor is checked through a duplicate, so one reused meanwhile for anything else is left alone."""
    ended = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            dup = os.dup(int(name))
        except OSError:
            continue  # gone since the listing
        try:
            sock = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)  # not a socket
            continue
        with sock:
            try:
                if (sock.family != socket.AF_UNIX or sock.getsockname() != str(path)
                        or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
                    continue
                peer_pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                           struct.calcsize("3i")))
                if peer_pid == pid:
                    sock.shutdown(socket.SHUT_RDWR)
                    ended += 1
            except OSError:
                continue
    return ended


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's: alive
    return True
