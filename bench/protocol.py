"""Protocol benchmark: request round-trip over ipc, event fan-out to 10 subscribers, idle RSS, start time, and
what floods of the events socket cost the daemon.

Goals (issue 2): p99 round-trip < 2 ms; 5,000 events/s to 10 subscribers with zero loss and p99 < 20 ms;
idle RSS < 120 MB; start-to-ready < 1 s. Issue 12: one process sending 50,000 distinct subscriptions, and one
sending a 300 MB frame, grow the daemon's RSS by < 50 MB (peak: VmHWM in /proc/<pid>/status), memory goes
back when they go, and the fan-out after them stays >= 0.95x the 4,850 events/s measured before the limits.
A flood that takes the daemon past FLOOD_GUARD_MB is stopped there (the figure then reads as a lower bound).
Last line: key=value pairs.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import statistics
import sys
import time
from collections.abc import Callable
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
FLOOD_SUBSCRIPTIONS = 50_000
FLOOD_TOPIC_BYTES = 128  # distinct random topics, each under the events socket's frame limit
FLOOD_FRAME_MB = 300
FLOOD_HOLD_S = 5.0  # how long a flooder keeps at it (ZeroMQ resends its subscriptions at each reconnect)
FLOOD_GUARD_MB = 3000.0  # a daemon without limits is stopped here: other work shares this machine


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


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB: now, and the peak since flood() last reset it."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def subscription_flooder(endpoint: str, n: int) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.SUB)
    s.sndhwm = 0  # else ZeroMQ itself drops subscriptions past its 1,000-message queue
    s.connect(endpoint)
    rnd = random.Random(12)
    for _ in range(n):
        s.setsockopt(zmq.SUBSCRIBE, rnd.randbytes(FLOOD_TOPIC_BYTES))
    end = time.monotonic() + FLOOD_HOLD_S
    while time.monotonic() < end:
        # the flood goes on in ZeroMQ's I/O thread; touching the socket lets it act on a reconnect, where a
        # SUB sends all its subscriptions again
        s.getsockopt(zmq.EVENTS)
        time.sleep(0.01)
    ctx.destroy(linger=0)


def frame_flooder(endpoint: str, mb: int) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.XSUB)  # the one peer of a publisher that may send data upstream
    s.sndtimeo = int(FLOOD_HOLD_S * 1000)
    s.connect(endpoint)
    try:
        s.send(b"\x02" + bytes(mb * 2**20))
    except zmq.Again:
        pass
    time.sleep(FLOOD_HOLD_S)
    ctx.destroy(linger=0)


def flood(pid: int, target: Callable[..., None], *args: object) -> tuple[float, float]:
    """Run one flooder process; (peak RSS growth, RSS growth once it is gone) of the daemon, in MB."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS, so it reads this flood's peak
    rss0, _ = memory_mb(pid)
    p = mp.Process(target=target, args=args)
    p.start()
    guarded = False
    while p.is_alive():
        if memory_mb(pid)[0] - rss0 > FLOOD_GUARD_MB:
            p.kill()
            guarded = True
        p.join(0.05)
    time.sleep(1.0)  # what the daemon frees once the connection is gone (a measurement, not a sync)
    rss1, hwm1 = memory_mb(pid)
    peak = hwm1 - rss0
    if guarded:
        print(f"  (stopped at the {FLOOD_GUARD_MB:.0f} MB guard)")
    return peak, rss1 - rss0


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

        sub_peak, sub_after = flood(proc.pid, subscription_flooder, d.paths.events_endpoint, FLOOD_SUBSCRIPTIONS)
        print(f"subscription flood ({FLOOD_SUBSCRIPTIONS:,} distinct {FLOOD_TOPIC_BYTES}-byte topics from one "
              f"connection, {FLOOD_HOLD_S:.0f} s): daemon RSS +{sub_peak:.1f} MB at the peak, "
              f"{sub_after:+.1f} MB after it went")
        frame_peak, frame_after = flood(proc.pid, frame_flooder, d.paths.events_endpoint, FLOOD_FRAME_MB)
        print(f"frame flood (one {FLOOD_FRAME_MB} MB frame): daemon RSS +{frame_peak:.1f} MB at the peak, "
              f"{frame_after:+.1f} MB after it went")
        flood_rss = max(sub_peak, frame_peak)

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
              f"idle_rss_mb={idle_rss:.1f} ready_s={ready_s:.2f} flood_rss_mb={flood_rss:.1f}")
    finally:
        d.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
