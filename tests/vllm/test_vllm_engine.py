"""The vllm engine against a real `vllm serve` that the daemon starts and supervises (CPU build, tiny model).

One daemon (one vLLM) serves every test of this module. The tiny model has random weights: greedy decoding
falls into a loop at once ("7777…", " one an%%%…") and never emits its end token, so this config ends each
answer after 24 tokens (`vllm.sampling`: min_tokens, and stop strings from its loops); the runaway guard is
tested on the raw loops in test_runaway.py.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pymupdf
import pytest

from daemon.engines.vlm.server_metrics import parse_load
from shared.client import RemoteError
from shared.handover import hand_over
from shared.protocol import (
    TERMINAL_STATES,
    AskReply,
    AskSpooled,
    Done,
    EngineCommand,
    EngineReply,
    Event,
    JobDetail,
    JobList,
    JobPages,
    ListJobs,
    PageChanged,
    PagesReply,
    PauseQueue,
    ResumeQueue,
    ShowJob,
    TextDelta,
)
from tests.daemon_proc import DaemonProc, wait_for
from tests.engines import stack
from tests.fixtures import pdfs
from tests.ocr.submit import fetch
from tests.ocr.submit import submit_ocr as handed_over
from tests.systemd.unix_users import unix_users
from tests.vllm.conftest import JobTrace, VllmDaemon, engine_state, follow, start_vllm_daemon, wait_engine

pytestmark = pytest.mark.vllm

# the tiny model's greedy loops (" oneure oneure…", "7777…", "%%%…", "''''…"): after min_tokens the
# next repetition ends the answer (vLLM takes at most 4 stop strings)
STOPS = ["ure", "7", "%", "'"]
JOB_TIMEOUT_S = 400.0


@pytest.fixture(scope="module")
def vd() -> Iterator[VllmDaemon]:
    d = start_vllm_daemon(max_tokens=256, max_pixels=4_000_000, max_in_flight=8,
                          sampling={"min_tokens": 24, "stop": STOPS})
    try:
        yield d
    finally:
        d.proc.close()


@pytest.fixture
def work() -> Iterator[Path]:
    # short paths, readable by the daemon (same user); removed afterwards
    path = Path(tempfile.mkdtemp(prefix="ftv", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


CONNECT = """
import errno, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
    print("connected")
except OSError as exc:
    print(errno.errorcode.get(exc.errno or 0, str(exc)))
"""


def tcp_listeners_in_own_network(pid: int) -> list[int]:
    """Ports ``pid`` listens on, as its own network namespace sees them (/proc/PID/net/tcp is that view; psutil
    and ss read the caller's)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_vllm_has_no_tcp_port_anyone_here_can_reach_and_its_socket_admits_no_other_user(vd: VllmDaemon) -> None:
    tree = set(vd.vllm_pids())
    assert tree, vd.logs()
    for pid in list(tree):
        tree |= {p.pid for p in psutil.Process(pid).children(recursive=True)}
    # nothing of the vLLM tree listens on TCP as this (the host's) network namespace sees it: psutil and ss
    assert [c for c in psutil.net_connections(kind="inet") if c.pid in tree and c.status == psutil.CONN_LISTEN] == []
    ss = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=30, check=True).stdout
    assert not any(f"pid={pid}," in ss for pid in tree), ss
    # its engine's listeners (torch.distributed/gloo) exist, in a network of its own, and are refused from here
    mine = os.readlink("/proc/self/ns/net")
    assert all(os.readlink(f"/proc/{pid}/ns/net") != mine for pid in tree)
    ports = [port for pid in tree for port in tcp_listeners_in_own_network(pid)]
    assert ports, "vLLM's engine was expected to listen on 127.0.0.1 inside its namespace"
    for port in ports:
        with socket.socket() as s:
            s.settimeout(5)
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} of vLLM's engine is reachable"
    # no port to squat: vLLM was given a socket, in a 0700 directory of the daemon's user
    argv = json.loads((vd.proc.paths.state_dir / "vllm" / "vllm.pid.json").read_text())["argv"]
    assert "--uds" in argv and "--port" not in argv and "--host" not in argv
    sock = Path(vd.uds)
    st = sock.parent.stat()
    assert sock.is_socket() and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    # another user, in the daemon's group or not, cannot even reach the socket
    with unix_users(packages=()) as users:
        for who in (users.alice, users.mallory):
            r = subprocess.run(users.command(who, ["-c", CONNECT, str(sock)]), env=users.env(), capture_output=True,
                               text=True, timeout=60, check=False)
            assert r.stdout.strip() == "EACCES", (who.name, r.stdout, r.stderr)
    status, _ = vd.http_json("/health")  # the daemon's user can
    assert status == 200


def submit_ocr(vd: VllmDaemon, pdf: Path, out: Path, **spec: object) -> JobDetail:
    """``out``: where the test reads the results once the job ended, after ``fetch`` (ftctl --out-dir's way)."""
    return handed_over(vd.proc.client(timeout=60), pdf, **spec)


def sidecar(out: Path, stem: str) -> dict[str, object]:
    return json.loads((out / f"{stem}.json").read_text())


def test_twelve_page_pdf_streams_deltas_while_decoding_and_assembles_in_page_order(vd: VllmDaemon,
                                                                                  work: Path) -> None:
    pdf = pdfs.numbered(work / "twelve.pdf", 12)
    c = vd.proc.client(timeout=60)
    trace = follow(c, lambda: submit_ocr(vd, pdf, work / "out").job, JOB_TIMEOUT_S)
    assert trace.job is not None and trace.job.state == "succeeded", f"{trace.job}\n{vd.logs()}"
    fetch(c, trace.job.id, work / "out")
    # text arrived while pages were decoding: deltas with text for a page before that page was done
    first_done: dict[int, int] = {}
    first_text: dict[int, int] = {}
    for i, ev in enumerate(trace.events):
        if isinstance(ev.body, PageChanged) and ev.body.page.state == "done":
            first_done.setdefault(ev.body.page.page_no, i)
        if isinstance(ev.body, TextDelta) and ev.body.text:
            first_text.setdefault(ev.body.page_no, i)
    assert set(first_done) == set(range(1, 13))
    early = [n for n in first_done if n in first_text and first_text[n] < first_done[n]]
    assert len(early) >= 6, f"only pages {early} streamed text before they were done"
    # the Markdown has the 12 pages in order, each with the model's text
    md = (work / "out" / "twelve.md").read_text()
    markers = [f"<!-- page {n} -->" for n in range(1, 13)]
    positions = [md.index(m) for m in markers]
    assert positions == sorted(positions)
    side = sidecar(work / "out", "twelve")
    pages = side["page_results"]
    assert isinstance(pages, list) and [p["page"] for p in pages] == list(range(1, 13))
    assert {p["method"] for p in pages} == {"vlm"}, pages
    assert side["engine"] == "vllm" and side["model"] == "tiny"
    assert all(p.chars > 0 for p in c.call(JobPages(job_id=trace.job.id), PagesReply).pages)


def test_kill9_of_vllm_mid_job_restarts_it_and_no_page_is_lost_or_done_twice(vd: VllmDaemon, work: Path) -> None:
    total = 40
    pdf = pdfs.numbered(work / "forty.pdf", total)
    before = vd.vllm_pids()
    assert len(before) == 1, before
    killed: list[int] = []

    def kill_when_a_page_is_done(trace: JobTrace, ev: Event) -> None:
        if not killed and isinstance(ev.body, PageChanged) and ev.body.page.state == "done":
            os.kill(before[0], signal.SIGKILL)
            killed.append(len(trace.pages_done()))

    c = vd.proc.client(timeout=60)
    trace = follow(c, lambda: submit_ocr(vd, pdf, work / "out").job, JOB_TIMEOUT_S + 300,
                   on_event=kill_when_a_page_is_done)
    assert killed and killed[0] < total, "vLLM was not killed while pages were still to do"
    assert trace.job is not None and trace.job.state == "succeeded", f"{trace.job}\n{vd.logs()}"
    fetch(c, trace.job.id, work / "out")
    done = trace.pages_done()
    assert sorted(done) == list(range(1, total + 1)), f"pages done (with repeats): {sorted(done)}"
    states = trace.engine_states()
    assert "restarting" in states and states[-1] == "ready", states
    after = vd.vllm_pids()
    assert len(after) == 1 and after != before
    side = sidecar(work / "out", "forty")
    pages = side["page_results"]
    assert isinstance(pages, list)
    assert {p["method"] for p in pages} == {"vlm"}
    # a page broken by the crash was sent again without using up its runaway ladder
    assert {p["timings"]["attempts"] for p in pages} == {1.0}
    md = (work / "out" / "forty.md").read_text()
    assert [md.count(f"<!-- page {n} -->") for n in range(1, total + 1)] == [1] * total


def poster_pdf(path: Path) -> Path:
    """One 3000×3000 pt page: at 50 dpi 2083×2083 px, ≈ 5,500 image tokens for a 2048-token context."""
    doc = pymupdf.open()
    page = doc.new_page(width=3000, height=3000)
    page.insert_text((200, 400), "A poster far larger than the model's context", fontsize=120)
    doc.save(path)
    doc.close()
    return path


def test_page_image_far_over_the_budget_is_downsized_and_accepted(vd: VllmDaemon, work: Path) -> None:
    pdf = poster_pdf(work / "poster.pdf")
    # what vLLM says to the page at its rendered size: the budget is real
    pix = pymupdf.open(pdf)[0].get_pixmap(dpi=50)
    body = {"model": "tiny", "max_tokens": 16, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Convert this page to Markdown."},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                   + base64.b64encode(pix.tobytes("png")).decode()}}]}]}
    status, answer = vd.http_json("/v1/chat/completions", body, timeout=300)
    assert status == 400 and "maximum context length" in json.dumps(answer), (status, answer)
    c = vd.proc.client(timeout=60)
    trace = follow(c, lambda: submit_ocr(vd, pdf, work / "out").job, JOB_TIMEOUT_S)
    assert trace.job is not None and trace.job.state == "succeeded", f"{trace.job}\n{vd.logs()}"
    fetch(c, trace.job.id, work / "out")
    page = sidecar(work / "out", "poster")["page_results"][0]  # type: ignore[index]
    assert page["method"] == "vlm", page
    assert "instead of max_pixels" in page["detail"] and "max_model_len 2048" in page["detail"], page


def test_lora_adapter_loaded_at_runtime_is_used_by_a_job_and_unloaded(vd: VllmDaemon, work: Path) -> None:
    adapter = stack.build_tiny_lora(work / "tiny-lora")
    c = vd.proc.client(timeout=120)
    reply = c.call(EngineCommand(action="load", name="tiny-lora", path=str(adapter)), EngineReply, timeout=300)
    assert "tiny-lora" in reply.engine.adapters and "loaded" in reply.message
    status, models = vd.http_json("/v1/models")
    assert status == 200 and "tiny-lora" in [m["id"] for m in models["data"]]
    pdf = pdfs.numbered(work / "lora.pdf", 3)
    trace = follow(c, lambda: submit_ocr(vd, pdf, work / "out", adapter="tiny-lora").job, JOB_TIMEOUT_S)
    assert trace.job is not None and trace.job.state == "succeeded", f"{trace.job}\n{vd.logs()}"
    fetch(c, trace.job.id, work / "out")
    side = sidecar(work / "out", "lora")
    assert side["adapter"] == "tiny-lora"
    assert {p["method"] for p in side["page_results"]} == {"vlm"}  # type: ignore[union-attr]
    # every request named the adapter, and vLLM ran them with it (it refuses unknown model names with 404)
    assert "tiny-lora" in vd.metrics()
    reply = c.call(EngineCommand(action="unload", name="tiny-lora"), EngineReply, timeout=300)
    assert reply.engine.adapters == []
    with pytest.raises(RemoteError) as refused:
        submit_ocr(vd, pdfs.numbered(work / "again.pdf", 1), work / "out", adapter="tiny-lora")
    assert refused.value.code == "invalid_spec" and "ftctl engine load tiny-lora" in refused.value.message


def test_ask_streams_an_answer_about_a_pdf_page(vd: VllmDaemon, work: Path) -> None:
    pdf = pdfs.numbered(work / "ask.pdf", 2)
    c = vd.proc.client(timeout=60)
    events = c.events(("ask.",))
    next(events)  # live subscription
    handed = hand_over(c.paths, pdf)
    reply = c.call(AskSpooled(question="What is on this page?", spool=handed.sha256, name=pdf.name, page_no=2),
                   AskReply)
    assert reply.stream_topic == f"ask.{reply.request_key}"
    text = ""
    for ev in events:
        if isinstance(ev.body, TextDelta) and ev.body.key == reply.request_key:
            text = ev.body.text if ev.body.reset else text + ev.body.text
            if ev.body.final:
                break
    assert text.strip() and "[error]" not in text, text


def test_engine_stop_for_training_makes_pages_wait_and_wake_brings_it_back(vd: VllmDaemon, work: Path) -> None:
    """Sleep mode does not exist on CPU: "sleep" stops vLLM (parked) and "wake" starts it again."""
    c = vd.proc.client(timeout=120)
    # the engine's TMPDIR is too deep for its ipc sockets (conftest): the daemon gave it a short directory
    ipc_dir = Path(re.findall(r"vLLM's ipc sockets go to (\S+):", vd.proc.log_text())[-1])
    assert any(p.is_socket() for p in ipc_dir.iterdir())
    reply = c.call(EngineCommand(action="sleep"), EngineReply, timeout=300)
    assert reply.engine.state == "stopped" and "sleep mode is off" in reply.message, reply
    assert vd.vllm_pids() == []
    assert not ipc_dir.exists()  # vLLM leaves its socket files; the directory went with it
    job = submit_ocr(vd, pdfs.numbered(work / "parked.pdf", 2), work / "out").job
    wait_for(lambda: c.call(ShowJob(job_id=job.id), JobDetail).job.state == "running", 60, "the job to run",
             interval=0.2)
    # the job runs, its pages wait: nothing fails, and the job does not start a parked engine itself
    assert engine_state(vd).engine.state == "stopped"
    assert vd.vllm_pids() == []
    assert all(p.state != "failed" for p in c.call(JobPages(job_id=job.id), PagesReply).pages)
    reply = c.call(EngineCommand(action="wake"), EngineReply, timeout=300)
    assert "starting" in reply.message
    wait_engine(vd, "ready", 400)
    wait_for(lambda: c.call(ShowJob(job_id=job.id), JobDetail).job.state in TERMINAL_STATES, JOB_TIMEOUT_S,
             "the job that waited for the engine to end", interval=0.5)
    # a page that asked for the server while the wake-up was under way once failed ("the vLLM engine was
    # stopped") instead of waiting: the supervisor now unparks only once its task exists
    ended = c.call(ShowJob(job_id=job.id), JobDetail).job
    assert ended.state == "succeeded", f"{ended.error}\n{vd.logs()}"


@pytest.fixture
def forwarded(vd: VllmDaemon) -> Iterator[str]:
    """vLLM listens on a Unix socket of its daemon only: a TCP forwarder of the test stands in for the network
    between a remote engine and its server."""
    with stack.tcp_to_unix(lambda: vd.uds) as root:
        yield root


def test_remote_engine_sends_pages_to_the_server_that_answers(vd: VllmDaemon, work: Path, forwarded: str) -> None:
    """A second daemon that runs no vLLM: its `remote` engine uses this module's server (and a dead one)."""
    dead = f"http://127.0.0.1:{stack.free_port()}/v1"
    root = forwarded
    d = DaemonProc()
    cfg = d.home / "ftmllm.toml"
    cfg.write_text("\n".join([
        "[hotfolder]", "enabled = false",
        "[ocr]", 'engine = "remote"', "dpi = 50",
        "[vllm]", "max_tokens = 256", "max_model_len = 2048", "max_pixels = 4000000",
        f"sampling = {{min_tokens = 24, stop = {json.dumps(STOPS)}}}",
        "[remote]", f"urls = [{json.dumps(dead)}, {json.dumps(root + '/v1')}]",
    ]) + "\n")
    d.config = cfg
    try:
        d.start(timeout=60)
        c = d.client(timeout=60)
        wait_for(lambda: c.call(EngineCommand(action="status"), EngineReply).engine.state == "ready", 60,
                 "the remote engine to find its server", interval=0.2)
        status = c.call(EngineCommand(action="status"), EngineReply)
        assert status.engine.kind == "remote" and status.engine.model == "tiny", status
        assert "down" in status.message and root in status.message, status.message
        pdf = pdfs.numbered(work / "remote.pdf", 4)
        job = handed_over(c, pdf).job
        wait_for(lambda: c.call(ShowJob(job_id=job.id), JobDetail).job.state in ("succeeded", "failed"),
                 JOB_TIMEOUT_S, "the remote job", interval=0.2)
        done = c.call(ShowJob(job_id=job.id), JobDetail).job
        assert done.state == "succeeded", f"{done.error}\n{d.log_text()[-3000:]}"
        fetch(c, done.id, work / "out")
        side = sidecar(work / "out", "remote")
        assert side["engine"] == "remote"
        assert {p["method"] for p in side["page_results"]} == {"vlm"}  # type: ignore[union-attr]
    finally:
        d.close()


def split_pages(pdf: Path, folder: Path) -> list[Path]:
    """Each page of ``pdf`` as a one-page PDF of its own: the same pixels, prompt and tokens, 32 documents."""
    folder.mkdir(parents=True, exist_ok=True)
    src = pymupdf.open(pdf)
    out = []
    for n in range(src.page_count):
        one = pymupdf.open()
        one.insert_pdf(src, from_page=n, to_page=n)
        path = folder / f"page{n + 1:02d}.pdf"
        one.save(path)
        one.close()
        out.append(path)
    src.close()
    return out


def peak_running(vd: VllmDaemon, until: Callable[[], bool], timeout: float) -> int:
    """The most requests vLLM ran at once (its own gauge, polled) until ``until()`` holds."""
    peak = 0
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError(f"not done after {timeout:.0f}s\n{vd.logs()}")
        peak = max(peak, parse_load(vd.metrics()).running)
        time.sleep(0.1)  # the poll's pace, not a synchronisation: the gauge holds while pages run
    return peak


def test_small_pdfs_submitted_at_once_fill_the_server_as_one_long_pdf_does(vd: VllmDaemon, work: Path) -> None:
    pages = 32
    big = pdfs.numbered(work / "big.pdf", pages)
    c = vd.proc.client(timeout=60)

    def all_ended(ids: list[int]) -> Callable[[], bool]:
        return lambda: all(j.state in TERMINAL_STATES for j in c.call(ListJobs(all=True), JobList).jobs
                           if j.id in ids)

    one = handed_over(c, big).job
    peak_one = peak_running(vd, all_ended([one.id]), JOB_TIMEOUT_S)
    singles = split_pages(big, work / "split")
    # at once: queued while the queue is paused, started together; submitted one by one into a running queue,
    # the first pages were done before the last files were handed over, and the gauge was read only after
    c.call(PauseQueue(), Done)
    try:
        small = [handed_over(c, pdf).job.id for pdf in singles]
    finally:
        c.call(ResumeQueue(), Done)
    peak_small = peak_running(vd, all_ended(small), JOB_TIMEOUT_S)
    states = {c.call(ShowJob(job_id=i), JobDetail).job.state for i in [one.id, *small]}
    assert states == {"succeeded"}, vd.logs()
    # the engine's 8 slots (vllm.max_in_flight here) are full either way; fed per document, two PDFs at a time,
    # the small ones never had more than 2 requests running
    assert peak_one >= 6 and peak_small >= peak_one, (peak_one, peak_small)
