"""10,000 malformed frames: each gets a structured error or is dropped with a log line; the daemon lives."""

from __future__ import annotations

import random

import msgspec
import psutil
import zmq

from shared.protocol import MAX_FRAME_BYTES, PROTOCOL_VERSION, Ping, Pong, Reply, Request, decode_reply, encode
from tests.daemon_proc import DaemonProc, wait_for


def _frames(rng: random.Random) -> list[list[bytes]]:
    pack = msgspec.msgpack.encode
    big = b"\x00" * (MAX_FRAME_BYTES + 1)
    makers = [
        lambda i: [rng.randbytes(rng.randint(0, 200))],  # random bytes
        lambda i: [pack({"id": i, "v": PROTOCOL_VERSION, "body": {"type": "nonsense"}})],  # unknown kind
        lambda i: [pack({"id": i, "v": PROTOCOL_VERSION, "body": {"type": "show", "job_id": "x"}})],  # wrong type
        lambda i: [pack({"id": i, "v": 99, "body": {"type": "ping"}})],  # wrong version
        lambda i: [pack({"id": i, "v": PROTOCOL_VERSION})],  # missing body
        lambda i: [pack([1, 2, 3])],  # wrong shape
        lambda i: [b"a", b"b"],  # too many frames
        lambda i: [big] if i % 64 == 7 else [pack({"id": i})],  # over the size limit
    ]
    return [makers[i % len(makers)](i) for i in range(10_000)]


def test_10000_malformed_frames_get_errors_or_drops_and_daemon_keeps_answering(daemon: DaemonProc) -> None:
    assert daemon.proc is not None
    proc = psutil.Process(daemon.proc.pid)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = 10_000
    sock.connect(daemon.paths.ctl_endpoint)
    try:
        # warm up so the baseline RSS includes the normal request path
        sock.send(encode(Request(id=1, v=PROTOCOL_VERSION, body=Ping())))
        assert isinstance(decode_reply(sock.recv()).result, Pong)
        rss_before = proc.memory_info().rss
        rng = random.Random(7)
        frames = _frames(rng)
        multi = sum(1 for f in frames if len(f) > 1)
        errors: dict[str, int] = {}
        received = 0

        def take(reply: Reply) -> None:
            assert reply.error is not None and reply.result is None
            assert reply.error.message
            errors[reply.error.code] = errors.get(reply.error.code, 0) + 1

        sent = 0
        for f in frames:  # like a real client: read replies while sending, at most 64 in flight
            sock.send_multipart(f)
            sent += len(f) == 1
            while sock.poll(0) or sent - received > 64:
                take(decode_reply(sock.recv()))
                received += 1
        while received < len(frames) - multi:
            take(decode_reply(sock.recv()))
            received += 1
        assert {"bad_request", "version", "too_large"} <= set(errors)
        sock.send(encode(Request(id=424242, v=PROTOCOL_VERSION, body=Ping())))
        reply = decode_reply(sock.recv())
        assert reply.id == 424242 and isinstance(reply.result, Pong)
        growth_mb = (proc.memory_info().rss - rss_before) / 2**20
        assert growth_mb < 20, f"RSS grew by {growth_mb:.1f} MB"
        wait_for(lambda: "dropped" in daemon.log_text() and "malformed" in daemon.log_text(), 5,
                 "a log line about dropped frames")
    finally:
        ctx.destroy(linger=0)
