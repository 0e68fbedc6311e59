"""Protocol benchmark: request round-trip over ipc, event fan-out to 10 subscribers, idle RSS, start time.

Goals (issue 2): p99 round-trip < 2 ms; 5,000 events/s to 10 subscribers with zero loss and p99 < 20 ms;
idle RSS < 120 MB; start-to-ready < 1 s. Last line: key=value pairs.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import psutil
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.client import Client
from shared.protocol import (
    PROTOCOL_VERSION,
    JobDetail,
    Ping,
    Request,
    ShowJob,
    Submit,
    decode_event,
    decode_reply,
    encode,
)
from tests.daemon_proc import DaemonProc, wait_for

RATE = 5000
SECONDS = 4
SUBSCRIBERS = 10


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def round_trips(endpoint: str, n: int = 5000) -> list[float]:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(endpoint)
    out = []
    for i in range(n):
        t = time.perf_counter()
        s.send(encode(Request(id=i, v=PROTOCOL_VERSION, body=Ping())))
        decode_reply(s.recv())
        out.append((time.perf_counter() - t) * 1000)
    ctx.destroy(linger=0)
    return out[100:]  # the first ones include connection set-up


def subscriber_group(endpoint: str, n: int, ready: mp.Barrier, stop_seq: mp.Value, q: mp.Queue) -> None:
    ctx = zmq.Context()
    socks = []
    for _ in range(n):
        s = ctx.socket(zmq.SUB)
        s.rcvhwm = 0
        s.setsockopt(zmq.SUBSCRIBE, b"job.")
        s.setsockopt(zmq.SUBSCRIBE, b"hb")
        s.connect(endpoint)
        socks.append(s)
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    # wait until every socket has seen a heartbeat: the subscriptions are live
    live: set[int] = set()
    while len(live) < n:
        for s, _ in poller.poll(2000):
            decode_event(s.recv_multipart()[1])
            live.add(socks.index(s))
    ready.wait()
    seqs: list[list[int]] = [[] for _ in range(n)]
    lat: list[float] = []
    while True:
        for s, _ in poller.poll(500):
            while True:
                try:
                    _t, frame = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                ev = decode_event(frame)
                if ev.durable:
                    seqs[socks.index(s)].append(ev.seq)
                    lat.append((time.time() - ev.ts) * 1000)
        if stop_seq.value and all(x and x[-1] >= stop_seq.value for x in seqs):
            break
    q.put((seqs, lat[::10]))
    ctx.destroy(linger=0)


def main() -> int:
    t0 = time.monotonic()
    d = DaemonProc()
    d.start()
    ready_s = time.monotonic() - t0  # includes Python start-up of the daemon process
    try:
        assert d.proc is not None
        proc = psutil.Process(d.proc.pid)
        wait_for(lambda: True, 0, "")
        time.sleep(1.0)  # let the daemon settle before sampling idle memory (a measurement, not a sync)
        idle_rss = proc.memory_info().rss / 2**20
        rtt = round_trips(d.paths.ctl_endpoint)
        p50, p99 = statistics.median(rtt), pct(rtt, 0.99)
        print(f"round-trip over ipc: p50 {p50:.3f} ms, p99 {p99:.3f} ms ({len(rtt)} pings)")

        groups = 2
        ready = mp.Barrier(groups + 1)
        stop_seq = mp.Value("q", 0)
        q: mp.Queue = mp.Queue()
        procs = [mp.Process(target=subscriber_group, args=(d.paths.events_endpoint, SUBSCRIBERS // groups, ready,
                                                           stop_seq, q)) for _ in range(groups)]
        for p in procs:
            p.start()
        ready.wait()
        c = Client(d.paths)
        start_seq = c.hello().seq
        t_flood = time.monotonic()
        job = c.call(Submit(kind="selftest", spec={"steps": RATE * SECONDS, "rate": RATE}), JobDetail).job
        wait_for(lambda: c.call(ShowJob(job_id=job.id), JobDetail).job.state == "succeeded", 120, "flood end")
        flood_s = time.monotonic() - t_flood
        end_seq = c.hello().seq
        stop_seq.value = end_seq
        results = [q.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
        c.close()
        expected = set(range(start_seq + 1, end_seq + 1))
        lost = 0
        lat: list[float] = []
        for seqs, sample in results:
            for s in seqs:
                lost += len(expected - set(s))
            lat += sample
        rate = (end_seq - start_seq) / flood_s
        fan_p99 = pct(lat, 0.99)
        print(f"fan-out: {end_seq - start_seq} durable events in {flood_s:.1f}s ({rate:.0f}/s) to {SUBSCRIBERS} "
              f"subscribers: {lost} lost, latency p50 {statistics.median(lat):.2f} ms, p99 {fan_p99:.2f} ms")
        print(f"daemon idle RSS {idle_rss:.1f} MB; start-to-ready {ready_s:.2f} s (process start included)")
        print(f"p99_ms={p99:.3f} fanout_loss={lost} fanout_rate={rate:.0f} fanout_p99_ms={fan_p99:.2f} "
              f"idle_rss_mb={idle_rss:.1f} ready_s={ready_s:.2f}")
    finally:
        d.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
