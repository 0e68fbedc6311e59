"""sd_notify from the real ftmllmd: the test plays systemd with a unix datagram socket set as $NOTIFY_SOCKET.

The daemon is the real ``python -m daemon.main`` in a subprocess (tests/daemon_proc.py); nothing in it is
replaced. The listener thread timestamps each datagram on arrival and checks the socket files right then.

The blocked loop is a real one, without test-only code: the config file is swapped for a FIFO and the daemon
gets SIGHUP; its reload reads the config on the event loop, so the loop sits in open() until the test
writes the config into the FIFO. The process keeps running (not stopped), only its loop is stuck, and the
watchdog pings stop for exactly that long, which is what lets systemd's WatchdogSec catch a hung loop.
"""

from __future__ import annotations

import itertools
import os
import signal
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from daemon.core.sdnotify import SYSTEMD_ONLY_ENV
from shared.client import Client
from shared.protocol import Hello, HelloReply, JobDetail, ShowJob, Submit
from tests.daemon_proc import ROOT, DaemonProc, wait_for
from tests.fixtures.pdfs import born_digital
from tests.ocr.submit import submit_ocr
from tests.systemd.notify_listener import Datagram, NotifyListener

WATCHDOG_USEC = 400_000
PING_S = WATCHDOG_USEC / 2 / 1_000_000  # sd_watchdog_enabled(3): ping at half the timeout
# generous: several helpers share two cores
START_S = 60.0
CONFIG = '[daemon]\nlog_level = "info"\n\n[ocr]\nworkers = 1\n'


@dataclass
class NotifiedDaemon:
    d: DaemonProc
    sd: NotifyListener
    config: Path

    @property
    def pid(self) -> int:
        assert self.d.proc is not None
        return self.d.proc.pid

    def ready_index(self) -> int:
        return self.sd.wait_index("READY", timeout=START_S)

    def client(self) -> Client:
        return self.d.client(timeout=20)

    def signal(self, sig: signal.Signals) -> None:
        assert self.d.proc is not None
        self.d.proc.send_signal(sig)

    def sigterm_expect_stopping_and_exit_0(self) -> Datagram:
        """SIGTERM; STOPPING=1 must arrive and the process exit 0, with no READY=1 after STOPPING=1."""
        assert self.d.proc is not None
        last = len(self.sd.snapshot()) - 1
        self.signal(signal.SIGTERM)
        stopping = self.sd.wait_index("STOPPING", after=last, timeout=START_S)
        assert self.d.proc.wait(START_S) == 0, self.d.log_text()[-2000:]
        assert self.sd.index_of("READY", after=stopping) is None
        return self.sd.snapshot()[stopping]


@contextmanager
def notified_daemon(watchdog_pid: str | None = None) -> Iterator[NotifiedDaemon]:
    home = Path(tempfile.mkdtemp(prefix="ftn", dir="/tmp"))  # short: unix socket paths ≤ 107 bytes
    config = home / "ftmllm.toml"
    config.write_text(CONFIG)
    d = DaemonProc(home=home, config=config)
    run, inbox = d.paths.runtime_dir, d.paths.inbox

    def probe() -> tuple[bool, bool, bool]:
        return (run / "ctl.sock").exists(), (run / "events.sock").exists(), inbox.is_dir()

    with NotifyListener(probe) as sd:
        d.env.update(NOTIFY_SOCKET=sd.address, WATCHDOG_USEC=str(WATCHDOG_USEC))
        d.env.pop("WATCHDOG_PID", None)
        if watchdog_pid is not None:
            d.env["WATCHDOG_PID"] = watchdog_pid
        # not d.start(): that polls hello until it answers; here READY=1 is the signal to wait for
        with d.log_path.open("ab") as log:
            d.proc = subprocess.Popen(d.argv(), cwd=ROOT, env=d.env, stdout=log, stderr=log,
                                      stdin=subprocess.DEVNULL)
        try:
            yield NotifiedDaemon(d, sd, config)
        finally:
            _unblock(config)
            if d.proc.poll() is None:
                d.proc.kill()  # the test failed half-way; a clean stop was not what it checked
                d.proc.wait(30)
            d.close()


def _unblock(config: Path) -> None:
    """If the daemon still waits on the config FIFO (a failed test), let it go so it can be stopped."""
    try:
        fd = os.open(config, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # a regular file (nothing to do) or a FIFO nobody reads
        return
    os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_ready_comes_with_status_once_sockets_answer_then_pings_and_status_updates_flow() -> None:
    with notified_daemon() as nd:
        ready = nd.ready_index()
        dgram = nd.sd.snapshot()[ready]
        # checked by the listener thread the moment READY=1 arrived, not later
        assert dgram.probe == (True, True, True), "READY=1 before ctl.sock, events.sock and the inbox existed"
        assert dgram.fields["READY"] == "1"
        assert "0 running, 0 queued" in dgram.fields["STATUS"] and "engine cpu" in dgram.fields["STATUS"]
        # READY means "clients may talk to me now": the first hello must be answered, no retrying needed
        hello = nd.client().call(Hello(client="test"), HelloReply)
        assert hello.pid == nd.pid

        nd.sd.wait(lambda _r: nd.sd.count("WATCHDOG", after=ready) >= 6, START_S, "6 watchdog pings")
        pings = [d.t for d in nd.sd.snapshot()[ready + 1:] if d.fields.get("WATCHDOG") == "1"]
        gap = statistics.median(b - a for a, b in itertools.pairwise(pings))
        assert PING_S * 0.5 < gap < WATCHDOG_USEC / 1e6, f"median ping gap {gap:.3f}s, expected ~{PING_S}s"

        # state changes reach `systemctl status` as STATUS= lines, coalesced to at most one a second: this
        # job commits ~10 progress updates a second for 2 s
        c = nd.client()
        job = c.call(Submit(kind="selftest", spec={"steps": 20, "rate": 10}), JobDetail).job
        wait_for(lambda: c.call(ShowJob(job_id=job.id), JobDetail).job.state == "succeeded", START_S,
                 f"job {job.id} to succeed", interval=0.1)

        def status_only(received: list[Datagram]) -> list[Datagram]:
            return [d for d in received[ready + 1:] if set(d.fields) == {"STATUS"}]

        nd.sd.wait(lambda r: status_only(r) and status_only(r)[-1].fields["STATUS"].startswith("0 running"),
                   START_S, "a STATUS= line after the job ended")
        lines = status_only(nd.sd.snapshot())
        assert any(d.fields["STATUS"].startswith("1 running") for d in lines), [d.fields for d in lines]
        gaps = [b.t - a.t for a, b in itertools.pairwise(lines)]
        assert 2 <= len(lines) <= 8 and min(gaps) >= 0.9, f"STATUS= not coalesced: {len(lines)} lines, gaps {gaps}"

        stopping = nd.sigterm_expect_stopping_and_exit_0()
        assert stopping.fields["STATUS"].startswith("stopping")


def test_sighup_sends_reloading_then_ready_and_a_blocked_loop_stops_the_pings() -> None:
    with notified_daemon() as nd:
        ready = nd.ready_index()
        nd.sd.wait(lambda _r: nd.sd.count("WATCHDOG", after=ready) >= 2, START_S, "pings after READY")

        # a plain reload: RELOADING=1 (with the MONOTONIC_USEC systemd ≥ 253 wants), then READY=1
        nd.signal(signal.SIGHUP)
        reloading = nd.sd.wait_index("RELOADING", after=ready)
        fields = nd.sd.snapshot()[reloading].fields
        assert fields["RELOADING"] == "1" and int(fields["MONOTONIC_USEC"]) > 0
        assert str(nd.config) in fields["STATUS"]
        reloaded = nd.sd.wait_index("READY", after=reloading)

        # a rejected config still ends the reload with READY=1 (else systemd would wait for it forever),
        # saying why in STATUS=, and the daemon keeps running on the previous config
        _write_atomic(nd.config, CONFIG.replace('"info"', '"loud"'))
        nd.signal(signal.SIGHUP)
        rejected = nd.sd.wait_index("RELOADING", after=reloaded)
        reloaded = nd.sd.wait_index("READY", after=rejected)
        status = nd.sd.snapshot()[reloaded].fields["STATUS"]
        assert status.startswith("reload failed") and str(nd.config) in status, status
        assert nd.client().hello().pid == nd.pid
        _write_atomic(nd.config, CONFIG)

        # now a reload that blocks the event loop: the config becomes a FIFO nobody writes yet
        fifo = nd.config.with_name("fifo.tmp")
        os.mkfifo(fifo)
        os.replace(fifo, nd.config)
        nd.signal(signal.SIGHUP)
        # RELOADING=1 is sent by the loop right before it opens the config: from here on the loop is stuck
        stuck = nd.sd.wait_index("RELOADING", after=reloaded)
        window = 6 * PING_S
        assert nd.sd.count_during("WATCHDOG", after=stuck, seconds=window) == 0, \
            f"a watchdog ping arrived while the event loop was blocked ({window:.1f}s window)"
        state = Path(f"/proc/{nd.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state in ("S", "D"), f"the daemon should be alive and waiting, not stopped (state {state})"

        with open(nd.config, "w") as fh:  # the loop's open() returns, the reload completes
            fh.write(CONFIG)
        unstuck = nd.sd.wait_index("READY", after=stuck)
        snap = nd.sd.snapshot()
        assert nd.sd.count("WATCHDOG", after=stuck, before=unstuck) == 0
        assert snap[unstuck].t - snap[stuck].t >= window
        _write_atomic(nd.config, CONFIG)
        nd.sd.wait(lambda _r: nd.sd.count("WATCHDOG", after=unstuck) >= 3, START_S, "pings after the block")
        assert nd.client().hello().pid == nd.pid
        nd.sigterm_expect_stopping_and_exit_0()


def test_children_of_the_daemon_do_not_inherit_notify_socket_or_watchdog_variables() -> None:
    with notified_daemon() as nd:
        nd.ready_index()
        pdf = born_digital(nd.d.home / "report.pdf")
        job = submit_ocr(nd.client(), pdf).job

        def worker() -> psutil.Process | None:
            # a child that has exec'd: before exec, /proc/PID/environ would still show the parent's
            for child in psutil.Process(nd.pid).children(recursive=True):
                try:
                    if "daemon.ocr.worker_ops" in child.cmdline():
                        return child
                except psutil.Error:
                    continue
            return None

        child = wait_for(worker, START_S, "the OCR job's PDF worker process")
        assert isinstance(child, psutil.Process)
        child_env = _environ(child.pid)
        assert "PATH" in child_env  # the environ was read (the worker is alive and exec'd)
        assert not set(SYSTEMD_ONLY_ENV) & child_env.keys(), f"inherited: {set(SYSTEMD_ONLY_ENV) & child_env.keys()}"
        # the daemon itself was given them (its exec-time environ), so their absence above means something
        assert _environ(nd.pid)["NOTIFY_SOCKET"] == nd.sd.address
        assert nd.client().call(ShowJob(job_id=job.id), JobDetail).job.state == "running"
        nd.sigterm_expect_stopping_and_exit_0()


def test_a_watchdog_pid_naming_another_process_turns_the_pings_off() -> None:
    # systemd sets WATCHDOG_PID to the main pid; one naming someone else was inherited and is not ours
    with notified_daemon(watchdog_pid=str(os.getpid())) as nd:
        nd.ready_index()
        assert nd.client().hello().pid == nd.pid
        assert nd.sd.count_during("WATCHDOG", after=-1, seconds=6 * PING_S) == 0
        nd.sigterm_expect_stopping_and_exit_0()


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item)
