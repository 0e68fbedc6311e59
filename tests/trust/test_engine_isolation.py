"""Nothing reaches around the daemon to its engines (issue 12).

* The private-network launcher (daemon/children/private_net.py), without vLLM: a child that listens on
  127.0.0.1 is reachable from nowhere else, as root and as an unprivileged user; where namespaces are forbidden
  (a seccomp filter on unshare, which is how systemd's RestrictNamespaces= works) it runs nothing and says
  what to change.
* The daemon's vLLM supervisor with a fake ``vllm`` (a script serving vLLM's HTTP on the --uds socket it is
  given, and holding a TCP listener as vLLM's engine does): where it listens and which network it sees, a
  record of the previous version reaped, an engine that answers /health but never completes restarted within
  the configured time, the refusal and the opt-out where namespaces are forbidden.
* The remote engine: the API key file's checks, the key sent and never shown, plain http only to loopback.

The real vLLM's listeners and socket are checked in tests/vllm/test_vllm_engine.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import psutil
import pytest

from daemon.children import private_net
from daemon.engines.remote import RemoteRefused, check_url, read_api_key
from daemon.engines.vllm_command import build_env, make_private_dir
from daemon.engines.vllm_supervisor import POLL_S, probe_every
from shared.config import VllmConfig
from shared.protocol import EngineCommand, EngineReply, Status, StatusReply
from tests.daemon_proc import ROOT, DaemonProc, wait_for
from tests.engines import stack
from tests.vllm.conftest import toml_value

SYSTEM_PYTHON = "/usr/bin/python3"
SETPRIV = "/usr/bin/setpriv"
NOBODY = 65534

# Listens on 127.0.0.1, reports (port, pid, uid, network namespace) on the fd given, waits for stdin to close.
LISTENER = r"""
import os, socket, sys
s = socket.create_server(("127.0.0.1", 0))
os.write(int(sys.argv[1]), f"{s.getsockname()[1]} {os.getpid()} {os.getuid()} {os.readlink('/proc/self/ns/net')}\n"
         .encode())
sys.stdin.read()
"""

# What systemd's RestrictNamespaces=yes does to unshare(2): EPERM from a seccomp filter. Then execs argv[1:].
DENY_UNSHARE = r"""
import ctypes, os, struct, sys
nr = {"x86_64": 272, "aarch64": 97}[os.uname().machine]
prog = [(0x20, 0, 0, 0), (0x15, 0, 1, nr), (0x06, 0, 0, 0x00050000 | 1), (0x06, 0, 0, 0x7FFF0000)]
buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *ins) for ins in prog))
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Fprog(len(prog), ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "seccomp")
os.execv(sys.argv[1], sys.argv[1:])
"""

# A stand-in for `vllm serve MODEL --uds SOCK …`: vLLM's HTTP on the socket; POST /collective_rpc wedges it as
# it wedged the real one (issue 12): /health and /metrics still answer, completions never do.
FAKE_VLLM = r"""
import http.server, json, os, socket, socketserver, sys, threading
args = sys.argv[1:]
uds = args[args.index("--uds") + 1]
name = args[args.index("--served-model-name") + 1]
tcp = socket.create_server(("127.0.0.1", 0))  # as vLLM's engine opens its gloo listeners
with open(os.environ["FAKE_VLLM_RECORD"], "a") as fh:
    fh.write(json.dumps({"pid": os.getpid(), "uds": uds, "argv": args, "tcp_port": tcp.getsockname()[1],
                         "netns": os.readlink("/proc/self/ns/net"),
                         "rpc_base": os.environ.get("VLLM_RPC_BASE_PATH", "")}) + "\n")
wedged = threading.Event()
METRICS = b'vllm:num_requests_running{engine="0"} 0.0\nvllm:generation_tokens_total{engine="0"} 7.0\n'

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def address_string(self):
        return "uds"
    def log_message(self, fmt, *a):
        sys.stderr.write("fake vllm: " + fmt % a + "\n")
    def send(self, code, body):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        answers = {"/health": b"", "/metrics": METRICS, "/v1/models": {"data": [{"id": name}]}}
        self.send(200, answers[self.path]) if self.path in answers else self.send(404, {"detail": "no"})
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/collective_rpc":
            wedged.set()
            self.send(200, {})
        elif self.path == "/v1/chat/completions":
            if wedged.is_set():
                threading.Event().wait()
            self.send(200, {"choices": [{"message": {"role": "assistant", "content": "x"}, "finish_reason": "length"}]})
        elif self.path == "/tokenize":
            self.send(200, {"count": 9})
        else:
            self.send(404, {"detail": "no"})

class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

print("fake vllm serving on", uds, flush=True)
Server(uds, Handler).serve_forever()
"""


def our_netns() -> str:
    return os.readlink("/proc/self/ns/net")


def connectable(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def host_listeners(pids: set[int]) -> list[object]:
    """TCP listeners of ``pids`` as this (the host's) network namespace sees them."""
    return [c for c in psutil.net_connections(kind="inet") if c.pid in pids and c.status == psutil.CONN_LISTEN]


@contextlib.contextmanager
def listener(argv_prefix: list[str], python: str) -> Iterator[tuple[subprocess.Popen[bytes], list[str]]]:
    """Run LISTENER behind ``argv_prefix``; yield the process and what it reported."""
    r, w = os.pipe()
    proc = subprocess.Popen([*argv_prefix, python, "-c", LISTENER, str(w)], pass_fds=(w,), stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 30)
        line = os.read(r, 4096).decode() if ready else ""
        if not line:
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"the listener reported nothing: {err.decode(errors='replace')}")
        yield proc, line.split()
    finally:
        os.close(r)
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)


@pytest.fixture
def readable_launcher() -> Iterator[Path]:
    """private_net.py where any user can read it (the checkout may sit under a 0700 /root); stdlib only."""
    d = Path(tempfile.mkdtemp(prefix="ftpn", dir="/tmp"))
    d.chmod(0o755)
    copy = d / "private_net.py"
    shutil.copy(private_net.__file__, copy)
    copy.chmod(0o644)
    yield copy
    shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- launcher


def test_a_listener_started_through_the_launcher_is_unreachable_from_the_host_as_root() -> None:
    assert os.geteuid() == 0, "run as root, as CI does"
    # control: the same child without the launcher is reachable, so the check below can fail
    with listener([], sys.executable) as (_, (port, _pid, _uid, netns)):
        assert netns == our_netns() and connectable(int(port))
    with listener(private_net.launcher_argv([]), sys.executable) as (proc, (port, pid, uid, netns)):
        assert int(pid) == proc.pid  # exec, not a child: the daemon's record of the pid holds
        assert int(uid) == 0 and netns != our_netns()
        assert not connectable(int(port))
        assert host_listeners({proc.pid}) == []


def test_a_listener_started_through_the_launcher_is_unreachable_from_the_host_as_an_unprivileged_user(
        readable_launcher: Path) -> None:
    as_nobody = [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
    launcher = [*as_nobody, SYSTEM_PYTHON, "-I", "-S", str(readable_launcher), "--"]
    with listener(launcher, SYSTEM_PYTHON) as (proc, (port, pid, uid, netns)):
        assert int(pid) == proc.pid
        # the user namespace maps the user to itself: files keep the access they had
        assert int(uid) == NOBODY and psutil.Process(proc.pid).uids().real == NOBODY
        assert netns != our_netns() and not connectable(int(port))
        assert host_listeners({proc.pid}) == []


def test_where_namespaces_are_forbidden_the_launcher_runs_nothing_and_says_what_to_change(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    r = subprocess.run([sys.executable, "-c", DENY_UNSHARE, *private_net.launcher_argv(
        [sys.executable, "-c", f"open({str(marker)!r}, 'w')"])], capture_output=True, text=True, timeout=60)
    assert r.returncode == private_net.EXIT_NO_NAMESPACE and not marker.exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Operation not permitted" in lines[0], r.stderr
    assert "RestrictNamespaces=user net" in lines[0] and "vllm.private_network = false" in lines[0]


# ------------------------------------------------------------------------------- supervisor, fake vLLM


class FakeVllmDaemon(DaemonProc):
    """ftmllmd serving with vLLM, where `vllm` is FAKE_VLLM; ``prefix`` runs before the daemon (a seccomp filter)."""

    def __init__(self, prefix: list[str] | None = None, **vllm: object) -> None:
        super().__init__()
        self.prefix = prefix or []
        exe = self.home / "fake-vllm"
        exe.write_text(f"#!{sys.executable}\n{FAKE_VLLM}")
        exe.chmod(0o755)
        (self.home / "model").mkdir()
        self.starts_file = self.home / "starts.jsonl"
        section: dict[str, object] = {"executable": str(exe), "model": str(self.home / "model"),
                                      "served_name": "fake", "health_timeout_s": 2.0, "start_timeout_s": 60.0,
                                      "env": {"FAKE_VLLM_RECORD": str(self.starts_file)}}
        section.update(vllm)
        self.config = self.home / "ftmllm.toml"
        self.config.write_text("\n".join(["[hotfolder]", "enabled = false", "[ocr]", 'engine = "vllm"', "workers = 1",
                                          "[vllm]", *(f"{k} = {toml_value(v)}" for k, v in section.items())]) + "\n")

    def argv(self) -> list[str]:
        return [*self.prefix, *super().argv()]

    def starts(self) -> list[dict[str, object]]:
        text = self.starts_file.read_text() if self.starts_file.exists() else ""
        return [json.loads(line) for line in text.splitlines()]

    def engine(self) -> StatusReply:
        return self.client(timeout=30).call(Status(), StatusReply)

    def wait_state(self, state: str, timeout: float = 60.0) -> StatusReply:
        def reached() -> StatusReply | None:
            st = self.engine()
            return st if st.engine.state == state else None
        try:
            return wait_for(reached, timeout, f"the engine to be {state}", interval=0.1)  # type: ignore[return-value]
        except AssertionError:
            raise AssertionError(f"engine {self.engine().engine}\n{self.log_text()[-3000:]}") from None

    def ftctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tui.ftctl", "--home", str(self.home), *args],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)


@contextlib.contextmanager
def fake_daemon(prefix: list[str] | None = None, **vllm: object) -> Iterator[FakeVllmDaemon]:
    d = FakeVllmDaemon(prefix, **vllm)
    try:
        yield d
    finally:
        d.close()


@contextlib.contextmanager
def stray_process_group() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_the_engine_listens_on_a_private_socket_in_a_private_network_and_an_old_record_is_reaped() -> None:
    with fake_daemon() as d, stray_process_group() as stray:
        # what the previous version wrote for a vLLM it left running: a port, no socket, no start time
        record = d.paths.state_dir / "vllm" / "vllm.pid.json"
        record.parent.mkdir(parents=True)
        record.write_text(json.dumps({"pid": stray.pid, "port": 41234, "argv": ["vllm", "serve", "m"]}))
        d.start(timeout=60)
        d.wait_state("ready")
        assert stray.wait(10) == -signal.SIGTERM  # ended by the new daemon, as the old record asked
        [start] = d.starts()
        uds = Path(str(start["uds"]))
        argv = start["argv"]
        assert isinstance(argv, list) and "--port" not in argv and "--host" not in argv
        # a fresh 0700 directory of the daemon's user holds the API socket and vLLM's own ipc sockets
        private = uds.parent
        st = private.stat()
        assert private.name.startswith("ftvllm-") and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
        assert uds.is_socket() and start["rpc_base"] == str(private)
        assert json.loads(record.read_text())["uds"] == str(uds)
        # its TCP listener sits in a network of its own: nobody here can connect to it
        assert start["netns"] != our_netns()
        assert not connectable(int(str(start["tcp_port"])))
        assert host_listeners({int(str(start["pid"]))}) == []
        assert d.log_text().count("vLLM runs in a network namespace of its own") == 1
        reply = d.client().call(EngineCommand(action="stop"), EngineReply, timeout=60)
        assert reply.engine.state == "stopped" and not private.exists()  # the directory goes with the child


def test_an_engine_that_answers_health_but_never_completes_is_restarted_within_the_configured_time() -> None:
    health_timeout_s = 2.0
    with fake_daemon(health_timeout_s=health_timeout_s) as d:
        d.start(timeout=60)
        d.wait_state("ready")
        [first] = d.starts()
        status, _ = stack.http_json("http://localhost/health", uds=str(first["uds"]), timeout=10)
        assert status == 200
        status, _ = stack.http_json("http://localhost/collective_rpc", {"method": "get_model"}, uds=str(first["uds"]),
                                    timeout=10)
        assert status == 200
        wedged_at = time.monotonic()
        st = d.wait_state("restarting", timeout=60)
        took = time.monotonic() - wedged_at
        # a probe starts within probe_every + one poll, gets health_timeout_s, is looked at within a poll
        bound = probe_every(health_timeout_s) + health_timeout_s + 2 * POLL_S + 2.0
        assert took <= bound, f"found hung after {took:.1f}s (bound {bound:.1f}s)"
        assert "hung" in st.engine.error and "one-token completion" in st.engine.error, st.engine.error
        d.wait_state("ready")
        second = d.starts()[1]
        assert second["pid"] != first["pid"] and not psutil.pid_exists(int(str(first["pid"])))
        assert d.log_text().count("vLLM runs in a network namespace of its own") == 1  # said once, not per start
        r = d.ftctl("engine", "status")
        assert r.returncode == 0 and "restarted 1 time (last:" in r.stdout and "hung" in r.stdout, r.stdout


def test_where_namespaces_are_forbidden_the_engine_does_not_start_and_says_what_to_change() -> None:
    with fake_daemon(prefix=[sys.executable, "-c", DENY_UNSHARE]) as d:
        d.start(timeout=60)
        st = d.wait_state("failed")
        assert d.starts() == []  # vLLM never ran on the shared network
        assert "\n" not in st.engine.error and "RestrictNamespaces=user net" in st.engine.error, st.engine.error
        assert "vllm.private_network = false" in st.engine.error


def test_private_network_false_shares_the_host_network_and_says_so() -> None:
    with fake_daemon(prefix=[sys.executable, "-c", DENY_UNSHARE], private_network=False) as d:
        d.start(timeout=60)
        d.wait_state("ready")
        [start] = d.starts()
        assert start["netns"] == our_netns() and connectable(int(str(start["tcp_port"])))
        assert d.log_text().count("vllm.private_network = false: vLLM shares the host's network") == 1


def test_the_private_directory_is_fresh_short_and_the_configs_rpc_path_does_not_move_it(tmp_path: Path) -> None:
    a, b = make_private_dir(), make_private_dir()
    try:
        assert a != b and stat.S_IMODE(a.stat().st_mode) == 0o700 and a.stat().st_uid == os.geteuid()
        assert len(os.fsencode(a / "0a6d3f55-0000-4000-8000-000000000000")) <= 107
        env = build_env(VllmConfig(model="m", env={"VLLM_RPC_BASE_PATH": "/tmp"}), {"PATH": "/bin"}, [],
                        private_dir=a)
        assert env["VLLM_RPC_BASE_PATH"] == str(a) and env["VLLM_HOST_IP"] == "127.0.0.1"
    finally:
        a.rmdir()
        b.rmdir()


# ------------------------------------------------------------------------------------------ remote engine


def key_file(path: Path, key: str, mode: int = 0o600) -> Path:
    path.write_text(key + "\n")
    path.chmod(mode)
    return path


def test_the_api_key_file_must_be_ours_and_private(tmp_path: Path) -> None:
    good = key_file(tmp_path / "key", "sk-abc123")
    assert read_api_key(str(good)) == "sk-abc123"
    link = tmp_path / "link"
    link.symlink_to(good)
    assert read_api_key(str(link)) == "sk-abc123"  # the file read is the file checked
    refusals = {
        "mode 0640": key_file(tmp_path / "group", "k", 0o640),
        "mode 0604": key_file(tmp_path / "world", "k", 0o604),
        "not a regular file": tmp_path,
        "cannot open it": tmp_path / "missing",
        "it is empty": key_file(tmp_path / "empty", ""),
        "owned by nobody": key_file(tmp_path / "theirs", "k"),
    }
    os.chown(refusals["owned by nobody"], NOBODY, NOBODY)
    for expected, path in refusals.items():
        with pytest.raises(RemoteRefused) as exc:
            read_api_key(str(path))
        msg = str(exc.value)
        assert expected in msg and str(path) in msg and "\n" not in msg, msg
        assert "chmod 600" in msg or "write the key" in msg, msg


def test_plain_http_is_refused_except_to_this_machine() -> None:
    for ok in ("https://gpu2:8000/v1", "http://127.0.0.1:8000/v1", "http://localhost:8000", "http://[::1]:8000/v1"):
        check_url(ok)
    with pytest.raises(RemoteRefused, match="use https://") as exc:
        check_url("http://gpu2:8000/v1")
    assert "\n" not in str(exc.value)
    with pytest.raises(RemoteRefused, match="not an http"):
        check_url("gpu2:8000")


class _Recorder(BaseHTTPRequestHandler):
    seen: ClassVar[list[str]] = []

    def log_message(self, fmt: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        type(self).seen.append(self.headers.get("Authorization", ""))
        body = b'{"data": [{"id": "tiny", "max_model_len": 2048}]}' if self.path == "/v1/models" else \
            b'vllm:num_requests_running{engine="0"} 0.0\n'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_the_remote_api_key_is_sent_as_bearer_and_never_shown() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    secret = "sk-test-" + os.urandom(8).hex()
    d = DaemonProc()
    try:
        key = key_file(d.home / "remote.key", secret)
        d.config = d.home / "ftmllm.toml"
        d.config.write_text("\n".join([
            "[hotfolder]", "enabled = false", "[ocr]", 'engine = "remote"', "workers = 1",
            "[remote]", f'urls = ["http://127.0.0.1:{server.server_address[1]}/v1"]',
            f"api_key_file = {json.dumps(str(key))}",
        ]) + "\n")
        d.start(timeout=60)
        c = d.client(timeout=30)
        wait_for(lambda: c.call(EngineCommand(action="status"), EngineReply).engine.state == "ready", 60,
                 "the remote engine to reach the server", interval=0.2)
        assert _Recorder.seen and set(_Recorder.seen) == {f"Bearer {secret}"}
        r = subprocess.run([sys.executable, "-m", "tui.ftctl", "--home", str(d.home), "engine", "status", "--json"],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.returncode == 0 and "api key: set" in r.stdout, r.stdout
        assert secret not in r.stdout + r.stderr
        d.stop()
        assert secret not in d.log_text()
    finally:
        d.close()
        server.shutdown()
        server.server_close()
