"""Fixed daemon state for ftui's snapshot tests, built by code so it is the same on every run.

The OCR, training and engine parts publish these messages when they run; here they are written out by
hand (PageChanged, TrainPoint, EngineInfo, GpuInfo) so every screen can be drawn with data before those
parts land, and so snapshots never depend on timing. The GPUs are what NVML reports on a 2×H100 box.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from shared.client import DaemonUnavailable, Mirror, RemoteError, Update
from shared.config import Paths
from shared.handover import Handed
from shared.protocol import (
    AskReply,
    AskSpooled,
    DatasetEntry,
    DatasetList,
    DatasetsReply,
    Deploy,
    Done,
    EngineChanged,
    EngineCommand,
    EngineInfo,
    EngineReply,
    Event,
    EventBody,
    GpuInfo,
    GpuProcess,
    HelloReply,
    HistoryEntry,
    JobDetail,
    JobInfo,
    JobLogs,
    JobPages,
    ListTemplates,
    LogChunk,
    PageChanged,
    PageInfo,
    PagesReply,
    PageText,
    PageTextReply,
    Progress,
    ReplyBody,
    RequestBody,
    ShowJob,
    Snapshot,
    TemplateEntry,
    TemplatesReply,
    TextDelta,
    TrainPoint,
    TrainPoints,
    TrainPointsReply,
)

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"
NOW = 1_760_000_000.0  # the frozen clock of every snapshot (2025-10-09 08:53:20 UTC)
SESSION = "f1xed5e55ion"


def _job(id: int, kind: str, owner: str, state: Any, name: str, spec: dict[str, Any], created_ago: float,
         started_ago: float | None = None, finished_ago: float | None = None, **kw: Any) -> JobInfo:
    return JobInfo(id=id, kind=kind, owner=owner, state=state, name=name, spec=spec, created=NOW - created_ago,
                   started=NOW - started_ago if started_ago is not None else None,
                   finished=NOW - finished_ago if finished_ago is not None else None, **kw)


def jobs() -> list[JobInfo]:
    return [
        _job(44, "ocr", "alice", "running", "annual-report-2024.pdf", {"file": "/srv/in/annual-report-2024.pdf"},
             95, 90, progress=Progress(done=3, total=8, unit="pages", note="page 4 of 8", rate=0.05, eta_s=100),
             attempts=1, gpus=[0]),
        _job(42, "train", "bob", "running", "invoices lora r16",
             {"template": "qwen2vl_lora_sft", "dataset": "invoices", "gpus": 1,
              "set": {"learning_rate": 0.0002, "lora_rank": 16}},
             3700, 3600, progress=Progress(done=120, total=300, unit="steps", note="step 120/300, loss 0.912",
                                          rate=0.033, eta_s=5400), attempts=1, gpus=[1]),
        _job(45, "selftest", "carol", "queued", "selftest 50 steps", {"steps": 50, "rate": 20}, 12),
        _job(43, "ocr", "dave", "failed", "scan-0012.pdf", {"file": "/srv/in/scan-0012.pdf"}, 1900, 1880, 1870,
             error="encrypted: give the password with `ftctl submit ocr FILE --password` or a "
                   "scan-0012.pdf.password file next to it", attempts=1),
        _job(41, "export", "bob", "canceled", "export receipts-v1", {"template": "qwen2vl_export"}, 5400, 5300,
             5200, attempts=1),
        _job(38, "train", "alice", "succeeded", "receipts lora r8",
             {"template": "qwen2vl_lora_sft", "dataset": "receipts", "gpus": 1, "set": {"lora_rank": 8}},
             90000, 89000, 80000, progress=Progress(done=200, total=200, unit="steps"), attempts=1,
             artifacts={"adapter": "/var/lib/ftmllm/jobs/38/output"}),
    ]


def engine(tokens_per_s: float = 812.0, running: int = 3, waiting: int = 1, kv: float = 42.5) -> EngineInfo:
    return EngineInfo(kind="vllm", state="ready", model="Qwen/Qwen2-VL-2B-Instruct",
                      reason="auto: 2 GPUs found; vLLM serves on GPU 0",
                      adapters=["invoices-v3", "receipts-v1"], running=running, waiting=waiting,
                      kv_cache_pct=kv, tokens_per_s=tokens_per_s, pages_per_s=0.8, gpus=[0])


def gpus() -> list[GpuInfo]:
    return [
        GpuInfo(index=0, name="NVIDIA H100 80GB HBM3", uuid="GPU-0", mem_total_mib=81559, mem_used_mib=61234,
                util_pct=87, processes=[GpuProcess(pid=2101, used_mib=59000, user="ftmllm", job_id=44)],
                job_ids=[44], engine=True),
        GpuInfo(index=1, name="NVIDIA H100 80GB HBM3", uuid="GPU-1", mem_total_mib=81559, mem_used_mib=43100,
                util_pct=99, processes=[GpuProcess(pid=3302, used_mib=41000, user="bob", job_id=42),
                                        GpuProcess(pid=4242, used_mib=2100, user="eve")],
                job_ids=[42]),
    ]


def snapshot() -> Snapshot:
    return Snapshot(session=SESSION, seq=500, jobs=jobs(), engine=engine(), gpus=gpus(), gpu_note="",
                    queue_paused=False)


def train_points(job_id: int) -> list[TrainPoint]:
    """A plausible loss curve: exponential decay plus seeded noise, eval every 40 steps, cosine lr."""
    rng = random.Random(job_id)
    total = 300 if job_id == 42 else 200
    last = 120 if job_id == 42 else 200
    start = 2.4 if job_id == 42 else 2.1
    floor = 0.7 if job_id == 42 else 0.55
    t0 = NOW - (3600 if job_id == 42 else 89000)
    pts = []
    for step in range(1, last + 1):
        loss = floor + (start - floor) * math.exp(-step / 45) + rng.gauss(0, 0.06)
        lr = 2e-4 * (step / 10 if step < 10 else 0.5 * (1 + math.cos(math.pi * (step - 10) / (total - 10))))
        pts.append(TrainPoint(job_id=job_id, step=step, total_steps=total, loss=round(loss, 4), lr=lr,
                              eval_loss=round(floor + 0.08 + (start - floor) * math.exp(-step / 45), 4)
                              if step % 40 == 0 else None,
                              epoch=step / 100, percentage=100 * step / total, elapsed_s=step * 30.0,
                              remaining_s=(total - step) * 30.0, ts=t0 + step * 30.0))
    return pts


PAGE_TEXT = {
    1: "# Annual Report 2024\n\nNorthwind Traders — prepared for the board, March 2025.\n",
    2: "## Letter to shareholders\n\nRevenue grew **14 %** to 12.4 M€, driven by the Nordic region.\n",
    3: "## Key figures\n\n| Year | Revenue | Margin |\n|---|---|---|\n| 2023 | 10.9 M€ | 8.1 % |\n"
       "| 2024 | 12.4 M€ | 9.3 % |\n",
}
LIVE_PAGE = 4
LIVE_TEXT = ("## Outlook\n\nFor 2025 we expect:\n\n- steady growth in the Nordics\n- a new warehouse in "
             "Gdańsk (Q3)\n- capital expenditure of about 1.2 M€\n\nThe board proposes a dividend of")


def pages(job_id: int) -> list[PageInfo]:
    if job_id != 44:
        return []
    out = []
    for no in range(1, 9):
        if no in PAGE_TEXT:
            out.append(PageInfo(job_id=44, page_no=no, state="done", method="text_layer" if no < 3 else "vlm",
                                timings={"render": 0.21, "engine": 1.3 * no, "total": 0.21 + 1.3 * no},
                                chars=len(PAGE_TEXT[no])))
        elif no == LIVE_PAGE:
            out.append(PageInfo(job_id=44, page_no=no, state="running", method="vlm"))
        else:
            out.append(PageInfo(job_id=44, page_no=no, state="pending"))
    return out


def events() -> list[tuple[float, EventBody]]:
    """What arrives after the snapshot, with when: engine samples every 15 s for the last 10 minutes
    (the tokens/s history), then the live page's text."""
    out: list[tuple[float, EventBody]] = []
    for i in range(40):
        tps = 600 + 250 * math.sin(i / 5) + 10 * i
        out.append((NOW - (39 - i) * 15, EngineChanged(engine=engine(
            tokens_per_s=round(tps), running=1 + i % 4, waiting=i % 3, kv=30 + i * 0.4))))
    for piece in _pieces(LIVE_TEXT, 9):
        out.append((NOW, TextDelta(key=f"44:{LIVE_PAGE}", text=piece, job_id=44, page_no=LIVE_PAGE)))
    out.append((NOW, PageChanged(page=pages(44)[LIVE_PAGE - 1])))
    return out


def _pieces(text: str, n: int) -> list[str]:
    size = math.ceil(len(text) / n)
    return [text[i:i + size] for i in range(0, len(text), size)]


ANSWER = ("The page shows the **key figures** table:\n\n| Year | Revenue |\n|---|---|\n| 2023 | 10.9 M€ |\n"
          "| 2024 | 12.4 M€ |\n\nRevenue grew by about 14 %.")


class FixedSource:
    """Answers ftui's requests from the data above, and plays :func:`events` after the snapshot.

    It stands where :class:`shared.client.AsyncClient` stands; everything behind it (Link, State, the
    screens) is the real code."""

    def __init__(self, paths: Paths, *, down: str = "") -> None:
        self.paths = paths
        self.mirror = Mirror()
        self.down = down  # non-empty: behave like a daemon that is not running
        self._queue: asyncio.Queue[EventBody] = asyncio.Queue()
        self._seq = 500
        self.requests: list[RequestBody] = []

    async def hello(self) -> HelloReply:
        if self.down:
            raise DaemonUnavailable(self.down)
        return HelloReply(version=1, session=SESSION, daemon_version="0.1.0", pid=4321, user="alice", seq=500)

    async def watch(self) -> AsyncIterator[Update]:
        self.mirror.load(snapshot())
        yield Update("snapshot")
        for ts, body in events():
            yield self._event(body, ts)
        while True:
            yield self._event(await self._queue.get())

    def _event(self, body: EventBody, ts: float = NOW) -> Update:
        ev = Event(seq=self._seq, session=SESSION, ts=ts, durable=False, body=body)
        self.mirror.apply(ev)
        return Update("event", event=ev)

    async def request(self, body: RequestBody, timeout: float | None = None) -> ReplyBody:
        self.requests.append(body)
        if self.down:
            raise DaemonUnavailable(self.down)
        if isinstance(body, ShowJob):
            job = next((j for j in self.mirror.jobs.values() if j.id == body.job_id), None)
            if job is None:
                raise RemoteError("unknown_job", f"no job {body.job_id}")
            hist = [HistoryEntry(seq=1, ts=job.created, what=f"queued by {job.owner}")]
            if job.started:
                hist.append(HistoryEntry(seq=2, ts=job.started, what="started on GPUs " + ",".join(map(str, job.gpus))
                                         if job.gpus else "started on CPU"))
            if job.finished:
                hist.append(HistoryEntry(seq=3, ts=job.finished, what=job.error or job.state))
            return JobDetail(job=job, history=hist, log_path=f"/var/lib/ftmllm/jobs/{job.id}/job.log")
        if isinstance(body, JobLogs):
            text = "".join(f"08:5{i % 10}:0{i % 10} job {body.job_id}: line {i}\n" for i in range(1, 13))
            return LogChunk(text=text if body.offset is None else "", offset=len(text), size=len(text),
                            finished=True)
        if isinstance(body, JobPages):
            return PagesReply(pages=pages(body.job_id))
        if isinstance(body, PageText):
            return PageTextReply(page=pages(body.job_id)[body.page_no - 1], text=PAGE_TEXT.get(body.page_no, ""))
        if isinstance(body, TrainPoints):
            return TrainPointsReply(points=[p for p in train_points(body.job_id) if p.step > body.since_step])
        if isinstance(body, DatasetList):
            return DatasetsReply(datasets=[DatasetEntry(name=n, file=f"/srv/data/{n}.json", records=r)
                                           for n, r in (("invoices", 1200), ("receipts", 800), ("forms-de", 300))])
        if isinstance(body, ListTemplates):
            return TemplatesReply(templates=[
                TemplateEntry(name="qwen2vl_lora_sft", kind="train", description="LoRA SFT of Qwen2-VL-2B",
                              stage="sft"),
                TemplateEntry(name="qwen2vl_lora_dpo", kind="train", description="LoRA DPO of Qwen2-VL-2B",
                              stage="dpo"),
                TemplateEntry(name="qwen2vl_export", kind="export", description="merge a LoRA adapter")],
                templates_dir=str(TEMPLATES))
        if isinstance(body, Deploy):
            return Done(message=f"job {body.job_id}'s adapter is live as {body.name or 'job-' + str(body.job_id)}")
        if isinstance(body, EngineCommand):
            return EngineReply(engine=self.mirror.engine, message=f"engine {body.action}: done")
        if isinstance(body, AskSpooled):
            key = "ask-1"
            for piece in _pieces(ANSWER, 6):
                self._queue.put_nowait(TextDelta(key=key, text=piece))
            self._queue.put_nowait(TextDelta(key=key, text="", final=True))
            return AskReply(stream_topic=f"ask.{key}", request_key=key)
        raise RemoteError("bad_request", f"the fixed source does not answer {type(body).__name__}")

    async def hand_over(self, path: Path) -> Handed:
        """As the daemon answers: the file's own sha256 (read here, with the test's rights)."""
        data = path.read_bytes()
        return Handed(sha256=hashlib.sha256(data).hexdigest(), size=len(data), name=path.name)

    def close(self) -> None:
        pass


def fixed_paths(root: Path) -> Paths:
    return Paths(state_dir=root / "state", runtime_dir=root / "run", hotfolder=root)
