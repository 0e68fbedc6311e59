"""The wire protocol between ftmllmd and its clients (ftctl, ftui): every message is a typed struct.

Two sockets (ZeroMQ guide, chapter 5, "Clone"):

* ``ctl``: ROUTER (daemon) <-> DEALER (client). A client sends one frame, an encoded :class:`Request`;
  the daemon answers one frame, an encoded :class:`Reply` with the same ``id``. Many may be in flight.
* ``events``: PUB (daemon) -> SUB (client). Two frames: the topic (``job.<id>``, ``ocr.<id>``,
  ``train.<id>``, ``engine``, ``gpu``, ``queue``, ``hb``; streamed text on its owner's topics,
  ``ocr.text.<uid>.<id>`` and ``ask.<uid>-<token>``: see :func:`topic_of`) and an encoded :class:`Event`.

Durable events change state that lives in the store; each takes the next ``seq`` (global, never reused,
never going backwards across restarts). Stream events (text deltas, GPU samples, heartbeats) change no
stored state: they carry the last durable ``seq`` and ``durable=False``, so a client can tell a lost
durable event (a gap) from a stream event it may simply miss.

A client subscribes first, then asks for a :class:`Snapshot` stamped with ``seq``, drops durable events
with ``seq <= snapshot.seq`` and applies the rest; a gap means "ask for a new snapshot". Heartbeats carry
the daemon's ``session`` (new at every daemon start) and its current ``seq``, so a client notices a restart
and a lost tail event within a heartbeat.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

PROTOCOL_VERSION = 1
# Requests above this are refused before decoding, so a hostile or broken client cannot make the daemon
# allocate without bound; real requests are a few hundred bytes. Replies (snapshots) have no such limit.
MAX_FRAME_BYTES = 256 * 1024
# Past this libzmq itself drops the connection before the daemon sees the frame.
MAX_WIRE_BYTES = 1024 * 1024

# Field limits, checked while a request decodes: a too-long field is refused before any handler runs (nothing
# is stored), with an error naming the field. Far above what a person types: a name holds any file name
# (NAME_MAX is 255 bytes), a path PATH_MAX, a question a page of prompt.
MAX_NAME_CHARS = 256
MAX_PATH_CHARS = 4096
MAX_TEXT_CHARS = 32 * 1024
MAX_LIST_ITEMS = 1000
# A job spec is free-form, so its encoded size is bounded instead; real ones are well under 4 KiB. It is
# stored with its job, and every change of the job rewrites that row.
MAX_SPEC_BYTES = 64 * 1024
# the most of a job's log one request reads into memory
MAX_LOG_CHUNK = 4 * 1024 * 1024

Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)]
PathText = Annotated[str, msgspec.Meta(max_length=MAX_PATH_CHARS)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT_CHARS)]

JobState = Literal["queued", "running", "succeeded", "failed", "canceled", "interrupted"]
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})


class Struct(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Base of every message: unknown fields are a decoding error, not silently dropped."""


# --------------------------------------------------------------------------------------------- records


class Progress(Struct):
    done: float = 0
    total: float = 0
    unit: str = ""
    # what the job is doing now, in words ("page 3 of 12", "step 40/200, loss 1.82")
    note: str = ""
    rate: float = 0.0  # units per second, smoothed
    eta_s: float | None = None


class JobInfo(Struct):
    id: int
    kind: str
    owner: str
    state: JobState
    name: str
    spec: dict[str, Any]
    created: float
    started: float | None = None
    finished: float | None = None
    error: str = ""
    artifacts: dict[str, str] = {}
    progress: Progress = msgspec.field(default_factory=Progress)
    attempts: int = 0
    gpus: list[int] = []
    priority: int = 0  # higher starts (and gets engine slots) first; equal priorities go in submit order
    interactive: bool = False  # someone waits for it (Submit.interactive): before batch work of equal priority


class HistoryEntry(Struct):
    seq: int
    ts: float
    what: str


class GpuProcess(Struct):
    pid: int
    used_mib: float
    user: str = ""
    job_id: int | None = None  # None: a process the daemon does not own (a "foreign" process)


class GpuInfo(Struct):
    index: int
    name: str
    uuid: str = ""
    mem_total_mib: float = 0
    mem_used_mib: float = 0
    util_pct: float = 0
    processes: list[GpuProcess] = []
    job_ids: list[int] = []
    engine: bool = False


class EngineInfo(Struct):
    kind: str = "cpu"  # cpu | vllm | remote
    state: str = "stopped"  # stopped | starting | ready | sleeping | restarting | failed
    model: str = ""
    reason: str = ""  # why this engine serves ("auto: no GPUs found, using the CPU engine")
    adapters: list[str] = []
    running: int = 0
    waiting: int = 0
    kv_cache_pct: float = 0.0
    tokens_per_s: float = 0.0
    pages_per_s: float = 0.0
    gpus: list[int] = []
    error: str = ""


class PageInfo(Struct):
    job_id: int
    page_no: int  # 1-based, as people count pages
    state: Literal["pending", "running", "done", "failed"]
    method: str = ""  # text_layer | ocr | vlm | fallback
    timings: dict[str, float] = {}
    error: str = ""
    chars: int = 0


class TrainPoint(Struct):
    job_id: int
    step: int
    total_steps: int = 0
    loss: float | None = None
    lr: float | None = None
    eval_loss: float | None = None
    epoch: float | None = None
    percentage: float | None = None
    elapsed_s: float | None = None
    remaining_s: float | None = None
    ts: float = 0.0


# -------------------------------------------------------------------------------------------- requests


class Hello(Struct, tag="hello"):
    client: Name = ""


class GetSnapshot(Struct, tag="snapshot"):
    pass


class Status(Struct, tag="status"):
    pass


class Ping(Struct, tag="ping"):
    pass


class ClusterStatus(Struct, tag="cluster"):
    """The nodes of the cluster the daemon's training runs on ([cluster] backend = "ray")."""


class ListJobs(Struct, tag="jobs"):
    all: bool = False
    limit: int = 200  # the newest this many; 0: all
    # filters, applied by the daemon: a job is listed when it matches each one given (any of its values);
    # naming a finished state lists finished jobs without `all`
    owners: Annotated[list[Name], msgspec.Meta(max_length=MAX_LIST_ITEMS)] = []
    states: Annotated[list[JobState], msgspec.Meta(max_length=MAX_LIST_ITEMS)] = []
    kinds: Annotated[list[Name], msgspec.Meta(max_length=MAX_LIST_ITEMS)] = []


class ShowJob(Struct, tag="show"):
    job_id: int


# a job's priority: higher first; the hot folder's jobs get 0 like a plain submit
MIN_PRIORITY = -100
MAX_PRIORITY = 100
Priority = Annotated[int, msgspec.Meta(ge=MIN_PRIORITY, le=MAX_PRIORITY)]


class Submit(Struct, tag="submit"):
    kind: Name
    spec: dict[str, Any]  # at most MAX_SPEC_BYTES encoded (checked in decode_request)
    name: Name = ""
    priority: Priority = 0
    # a person waits for the result (`ftctl submit --wait/--follow`): among jobs of equal priority it starts,
    # and its pages reach the engine, before plain submits, which go before the hot folder's batch
    interactive: bool = False


class Cancel(Struct, tag="cancel"):
    job_id: int


class Retry(Struct, tag="retry"):
    job_id: int


class SetPriority(Struct, tag="set_priority"):
    """Change a queued or running job's priority (its owner or an admin); answered with :class:`JobDetail`."""

    job_id: int
    priority: Priority


class RemoveJobs(Struct, tag="remove_jobs"):
    """Forget finished jobs (their rows, history, pages and loss points; the files they wrote stay): the jobs
    named, all or none (each must be finished and the caller's, or the caller an admin), or with
    ``older_than_s`` every finished job that ended longer ago than that, of the caller's (an admin's: anyone's).
    Answered with :class:`RemovedJobs`."""

    job_ids: Annotated[list[int], msgspec.Meta(max_length=MAX_LIST_ITEMS)] = []
    older_than_s: Annotated[float, msgspec.Meta(ge=0)] | None = None


class JobLogs(Struct, tag="logs"):
    job_id: int
    offset: int | None = None  # byte offset to read from; None: the last `tail` lines
    tail: int = 50
    max_bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_LOG_CHUNK)] = 256 * 1024


class PauseQueue(Struct, tag="pause"):
    pass


class ResumeQueue(Struct, tag="resume"):
    pass


class EngineCommand(Struct, tag="engine"):
    action: Literal["status", "start", "stop", "sleep", "wake", "adapters", "load", "unload"]
    name: Name = ""
    path: PathText = ""


class PageText(Struct, tag="page_text"):
    job_id: int
    page_no: int


class JobPages(Struct, tag="pages"):
    job_id: int


class TrainPoints(Struct, tag="train_points"):
    job_id: int
    since_step: int = -1


class DatasetAdd(Struct, tag="dataset_add"):
    name: Name
    file: PathText  # absolute path of the sharegpt JSON (ftctl resolves it)
    images: PathText = ""  # the folder image paths in the records are relative to ("" = next to the file)
    ranking: bool | None = None  # None: detect from the first record (chosen/rejected)
    replace: bool = False


class DatasetRemove(Struct, tag="dataset_remove"):
    name: Name


class DatasetList(Struct, tag="datasets"):
    pass


class EvalCompare(Struct, tag="eval_compare"):
    job_ids: Annotated[list[int], msgspec.Meta(max_length=MAX_LIST_ITEMS)]


class ListTemplates(Struct, tag="templates"):
    """The LLaMA-Factory job templates the daemon renders specs from (`ftctl templates`)."""


class Deploy(Struct, tag="deploy"):
    """A finished train job's adapter goes live in the vLLM engine (runtime LoRA) under ``name``, or an
    export job's merged model becomes the engine's model (the engine restarts)."""

    job_id: int
    name: Name = ""


class Ask(Struct, tag="ask"):
    """One question about one image or PDF page, answered by the serving engine (ftui's Try screen)."""

    question: Text
    file: PathText
    page_no: int = 1
    adapter: Name = ""


# The daemon reads no path a client names: a client hands the file over first (shared/handover.py) and the
# requests below name what handover.sock answered, the sha256 of the bytes the daemon keeps.

Sha256 = Annotated[str, msgspec.Meta(max_length=64)]


class AskSpooled(Struct, tag="ask_spooled"):
    """:class:`Ask` about a file the client handed over (ftui's Try screen)."""

    question: Text
    spool: Sha256
    name: Name  # the file's name: its suffix says image or PDF
    page_no: int = 1
    adapter: Name = ""


class DatasetAddSpooled(Struct, tag="dataset_add_spooled"):
    """`ftctl dataset add NAME FILE [--images DIR]`: the records file and every image or video they name,
    handed over by the client."""

    name: Name
    records: Sha256
    records_name: Name  # the file's own name (.json or .jsonl), for messages
    # a handed-over JSON object: each media path exactly as the records write it -> the sha256 of that file
    media: Sha256 = ""
    ranking: bool | None = None  # None: detect from the first record (chosen/rejected)
    replace: bool = False


class DatasetFromPages(Struct, tag="dataset_from_pages"):
    """`ftctl dataset from-pages NAME DIR [--val 0.1]`: every ``x.pdf`` of DIR and its truth ``x.md`` (the
    outbox's Markdown with ``<!-- page N -->`` markers), handed over by the client. The daemon renders each
    page as serving does and registers NAME (training pages) and NAME.val (validation pages)."""

    name: Name
    # a handed-over JSON object: document name (x.pdf) -> {"pdf": sha256, "md": sha256 or "" (no truth)}
    documents: Sha256
    folder: PathText = ""  # DIR as the user named it, for messages
    val: float = 0.1  # the share of documents (not pages) kept for validation
    seed: int = 0  # which documents: the same seed and documents give the same split
    replace: bool = False


class PageQueue(Struct, tag="page_queue"):
    """The OCR page queue of each engine (`ftctl status`, ftui's OCR screen): pages in flight per job, pages
    waiting, and why a job waits."""

    limit: Annotated[int, msgspec.Meta(ge=0, le=MAX_LIST_ITEMS)] = 50  # the most jobs listed per engine


class OcrOutput(Struct, tag="ocr_output"):
    """A finished OCR job's Markdown and sidecar, which `ftctl submit ocr --out-dir` writes with the user's
    own rights (the daemon writes only in its own tree)."""

    job_id: int


class OcrEvalResult(Struct, tag="ocr_eval_result"):
    """An ``ocr_eval`` job's scores (`ftctl ocr-eval`, `ftctl eval-compare`); ``page`` > 0 also sends that page's
    truth and output (its index in the reply's ``pages``, 1-based) for a side-by-side diff."""

    job_id: int
    page: int = 0


RequestBody = (
    Hello
    | GetSnapshot
    | Status
    | ClusterStatus
    | Ping
    | ListJobs
    | ShowJob
    | Submit
    | Cancel
    | Retry
    | SetPriority
    | RemoveJobs
    | JobLogs
    | PauseQueue
    | ResumeQueue
    | EngineCommand
    | PageText
    | JobPages
    | TrainPoints
    | DatasetAdd
    | DatasetRemove
    | DatasetList
    | EvalCompare
    | ListTemplates
    | Deploy
    | Ask
    | AskSpooled
    | DatasetAddSpooled
    | DatasetFromPages
    | OcrOutput
    | PageQueue
    | OcrEvalResult
)


class Request(Struct):
    id: int
    v: int
    body: RequestBody


# --------------------------------------------------------------------------------------------- replies


class HelloReply(Struct, tag="hello"):
    version: int
    session: str
    daemon_version: str
    pid: int
    user: str  # who the daemon believes you are (from the kernel, not from anything you sent)
    seq: int


class Snapshot(Struct, tag="snapshot"):
    session: str
    seq: int
    jobs: list[JobInfo]
    engine: EngineInfo
    gpus: list[GpuInfo]
    gpu_note: str
    queue_paused: bool


class StatusReply(Struct, tag="status"):
    session: str
    pid: int
    version: str
    uptime_s: float
    seq: int
    state_dir: str
    runtime_dir: str
    hotfolder: str
    counts: dict[str, int]
    queue_paused: bool
    engine: EngineInfo
    gpus: list[GpuInfo]
    gpu_note: str


class Pong(Struct, tag="pong"):
    ts: float


class JobList(Struct, tag="jobs"):
    jobs: list[JobInfo]


class JobDetail(Struct, tag="job"):
    job: JobInfo
    history: list[HistoryEntry]
    log_path: str


class RemovedJobs(Struct, tag="removed_jobs"):
    job_ids: list[int]


class LogChunk(Struct, tag="log"):
    text: str
    offset: int  # where the next read should start
    size: int
    finished: bool  # the job is in a terminal state: nothing more will be written


class Done(Struct, tag="ok"):
    message: str = ""


class EngineReply(Struct, tag="engine"):
    engine: EngineInfo
    message: str = ""


class PageTextReply(Struct, tag="page_text"):
    page: PageInfo
    text: str


class PagesReply(Struct, tag="pages"):
    pages: list[PageInfo]


class TrainPointsReply(Struct, tag="train_points"):
    points: list[TrainPoint]


class ClusterNode(Struct):
    node_id: str
    name: str  # what people see: the first 8 hex digits of Ray's node id (job.artifacts["node"] names it too)
    address: str
    state: str  # alive | dead (a node that left stays listed)
    head: bool = False
    gpus: int = 0  # logical GPUs it declared
    job_ids: list[int] = []  # the daemon's running jobs on it


class ClusterReply(Struct, tag="cluster"):
    backend: str  # local | ray
    address: str = ""
    nodes: list[ClusterNode] = []
    error: str = ""  # why the nodes could not be listed


class DatasetEntry(Struct):
    name: str
    file: str
    records: int = 0
    images: int = 0
    ranking: bool = False


class DatasetsReply(Struct, tag="datasets"):
    datasets: list[DatasetEntry]
    message: str = ""

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.datasets]


class EvalCompareReply(Struct, tag="eval_compare"):
    table: str  # the seeds' table (bleu-4, rouge-1/2/l, runtime, samples/s), as plain text
    columns: list[dict[str, Any]] = []


class TemplateEntry(Struct):
    name: str
    kind: str  # train | eval | export: which command submits it (`ftctl train|eval|export NAME`)
    description: str = ""  # the template's first comment line
    stage: str = ""  # sft, dpo, … for train templates


class TemplatesReply(Struct, tag="templates"):
    templates: list[TemplateEntry]
    templates_dir: str = ""


class AskReply(Struct, tag="ask"):
    stream_topic: str  # the answer streams as TextDelta events on this topic
    request_key: str


class OcrOutputReply(Struct, tag="ocr_output"):
    name: str  # the outputs' stem: write <name>.md and <name>.json
    markdown: str
    sidecar: str  # JSON


class OcrEvalResultReply(Struct, tag="ocr_eval_result"):
    job_id: int
    title: str  # e.g. "job 12: vllm + alice/job9" (engine, adapter)
    totals: dict[str, float | None]  # cer, wer, heading_recall, table_f1, reading_order (None: no such content)
    pages: list[dict[str, Any]]  # per page: index, doc, page, the same metrics, chars, method
    truth: str = ""  # with OcrEvalResult.page: that page's truth and output Markdown
    output: str = ""


class PageJob(Struct):
    """One OCR job's pages in its engine's page queue."""

    job_id: int
    owner: str
    name: str
    priority: int = 0
    job_class: str = "submit"  # interactive | submit | batch: the turn order among jobs of equal priority
    in_flight: int = 0
    waiting: int = 0
    done: int = 0
    total: int = 0
    why: str = ""  # why its pages wait; "" while one is in flight


class EnginePages(Struct):
    engine: str
    slots: int  # pages the engine is fed at once (its concurrency and a small prefetch)
    in_flight: int
    waiting: int  # pages of open documents waiting for a slot
    jobs: list[PageJob] = []  # in turn order, the first ``limit``
    more_jobs: int = 0  # open jobs not listed


class PageQueueReply(Struct, tag="page_queue"):
    engines: list[EnginePages]
    open_jobs: int = 0  # OCR documents open (running)
    max_open: int = 0  # [ocr] max_concurrent_jobs
    queued_jobs: int = 0  # OCR jobs waiting to be opened
    why_queued: str = ""  # why they wait ("" when none does)


ReplyBody = (
    HelloReply
    | Snapshot
    | StatusReply
    | ClusterReply
    | Pong
    | JobList
    | JobDetail
    | RemovedJobs
    | LogChunk
    | Done
    | EngineReply
    | PageTextReply
    | PagesReply
    | TrainPointsReply
    | DatasetsReply
    | EvalCompareReply
    | TemplatesReply
    | AskReply
    | OcrOutputReply
    | PageQueueReply
    | OcrEvalResultReply
)

ErrorCode = Literal[
    "bad_request",  # the frame did not decode, or a field has the wrong type
    "version",  # client and daemon speak different protocol versions
    "too_large",
    "unknown_job",
    "invalid_spec",  # the job spec was rejected at submit; the message names the key or file
    "invalid_state",  # e.g. cancel a finished job
    "forbidden",  # not the owner, not an admin
    "unavailable",  # the engine or another part is not there
    "internal",
]


class ErrorInfo(Struct):
    code: ErrorCode
    message: str


class Reply(Struct):
    id: int
    result: ReplyBody | None = None
    error: ErrorInfo | None = None


# ---------------------------------------------------------------------------------------------- events


class Heartbeat(Struct, tag="hb"):
    pid: int
    uptime_s: float


class JobChanged(Struct, tag="job"):
    job: JobInfo
    what: str  # one line for the job's history ("queued by alice", "page 3/12 done", "failed: …")


class JobsRemoved(Struct, tag="jobs_removed"):
    """Finished jobs were forgotten (`ftctl rm`, `ftctl clean`): drop them from a mirror."""

    job_ids: list[int]


class PageChanged(Struct, tag="page"):
    page: PageInfo


class TextDelta(Struct, tag="delta"):
    """A piece of streamed model output: OCR text of a page, or an answer (``ask``)."""

    key: str  # "<job>:<page>" for OCR, the request_key for ask
    text: str
    job_id: int = 0
    page_no: int = 0
    final: bool = False
    reset: bool = False  # the engine started this page over (a retry): drop what was shown so far


class TrainProgress(Struct, tag="train"):
    point: TrainPoint


class EngineChanged(Struct, tag="engine"):
    engine: EngineInfo


class GpusSampled(Struct, tag="gpus"):
    gpus: list[GpuInfo]
    note: str = ""


class QueueChanged(Struct, tag="queue"):
    paused: bool


EventBody = (
    Heartbeat | JobChanged | JobsRemoved | PageChanged | TextDelta | TrainProgress | EngineChanged | GpusSampled
    | QueueChanged
)


class Event(Struct):
    seq: int
    session: str
    ts: float
    durable: bool
    body: EventBody


# ------------------------------------------------------------------------------------------- encoding

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_event_decoder = msgspec.msgpack.Decoder(Event)


class ProtocolError(Exception):
    """A frame that is not a valid message; ``code`` is the ErrorInfo code to answer with."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def too_large_message(size: int) -> str:
    return (f"request of {size:,} bytes is over the {MAX_FRAME_BYTES:,}-byte limit; shorten its longest field "
            f"(names are at most {MAX_NAME_CHARS} characters, paths {MAX_PATH_CHARS})")


# msgspec's words for a field it refused: "Expected `str` of length <= 256 - at `$.body.name`"
_AT_FIELD_RE = re.compile(r"(?P<reason>.*) - at `\$\.body\.(?P<field>[^`]+)`")
_LENGTH_RE = re.compile(r"Expected `(\w+)` of length <= (\d+)")
_NUMBER_RE = re.compile(r"Expected `(?:int|float)` ([<>]=) (\d+)")


def _field_error(exc: msgspec.ValidationError, frame: bytes) -> ProtocolError:
    """A field out of its bounds, in words that name the field and the limit; other errors as msgspec says."""
    at = _AT_FIELD_RE.fullmatch(str(exc))
    length = _LENGTH_RE.fullmatch(at.group("reason")) if at else None
    number = _NUMBER_RE.fullmatch(at.group("reason")) if at else None
    if at is None or (length is None and number is None):
        return ProtocolError("bad_request", f"undecodable request: {exc}")
    what = f"{_request_tag(frame)} request: field '{at.group('field')}'"
    if length is not None:
        kind, limit = length.groups()
        unit = "characters" if kind == "str" else "items"
        return ProtocolError("too_large", f"{what} is over its limit of {int(limit):,} {unit}; shorten it")
    assert number is not None
    op, bound = number.groups()
    return ProtocolError("too_large" if op == "<=" else "bad_request", f"{what} must be {op} {bound}")


def _request_tag(frame: bytes) -> str:
    try:
        raw = msgspec.msgpack.decode(frame)
        return str(raw["body"]["type"])
    except Exception:
        return "the"


def _check_spec_size(body: Submit, frame_size: int) -> None:
    if frame_size <= MAX_SPEC_BYTES:
        return  # the spec is part of the frame: it cannot be bigger (no encoding pass on every submit)
    size = len(_encoder.encode(body.spec))
    if size > MAX_SPEC_BYTES:
        raise ProtocolError("too_large", f"submit request: field 'spec' is {size:,} bytes encoded, over its limit "
                                         f"of {MAX_SPEC_BYTES:,}; pass big data as a file path in the spec")


def decode_request(frame: bytes) -> Request:
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError("too_large", too_large_message(len(frame)))
    try:
        req = _request_decoder.decode(frame)
    except msgspec.ValidationError as exc:
        raise _field_error(exc, frame) from None
    except (msgspec.DecodeError, ValueError) as exc:
        # ValueError: msgspec raises UnicodeDecodeError for invalid UTF-8 in a string field
        raise ProtocolError("bad_request", f"undecodable request: {exc}") from None
    if isinstance(req.body, Submit):
        _check_spec_size(req.body, len(frame))
    if req.v != PROTOCOL_VERSION:
        raise ProtocolError(
            "version",
            f"client speaks protocol {req.v}, daemon speaks {PROTOCOL_VERSION}: "
            "install the same ftmllm version for ftctl/ftui as the daemon runs",
        )
    return req


def encode_request(req: Request) -> bytes:
    """The frame of ``req``, checked against the limits the daemon applies, so a client says what is wrong
    without a round trip (and a frame over MAX_WIRE_BYTES, which libzmq would drop unanswered, is never sent).
    Raises :class:`ProtocolError` with the daemon's own message."""
    frame = encode(req)
    decode_request(frame)
    return frame


def request_id_of(frame: bytes | memoryview) -> int:
    """Best-effort id of an undecodable request, so the error reply reaches the right caller. Read from the
    frame's first bytes where it is (the encoder writes ``id`` first), so an oversized frame is never decoded."""
    head = bytes(frame[:16])
    if len(head) > 4 and (0x80 <= head[0] <= 0x8F) and head[1:4] == b"\xa2id":
        kind, rest = head[4], head[5:]
        if kind <= 0x7F:  # positive fixint
            return kind
        width = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}.get(kind)
        if width is not None and len(rest) >= width:
            return int.from_bytes(rest[:width], "big")
    if len(frame) > MAX_FRAME_BYTES:
        return 0
    try:
        raw = msgspec.msgpack.decode(frame[:MAX_FRAME_BYTES])
    except Exception:
        return 0
    if isinstance(raw, dict) and isinstance(raw.get("id"), int):
        return int(raw["id"])
    return 0


def decode_reply(frame: bytes) -> Reply:
    return _reply_decoder.decode(frame)


def decode_event(frame: bytes) -> Event:
    return _event_decoder.decode(frame)


# No account has this user id ((uid_t)-1): text of a job whose owner is unknown is streamed to admins alone.
NO_UID = 4294967295


def text_topic(owner_uid: int, job_id: int) -> str:
    """The topic a job's streamed text goes out on. The owner's uid comes first so that the daemon can keep
    text to its owner with prefixes alone (``daemon.visibility = "owner"``, daemon/core/events.py), while
    ``ocr.<id>`` (page states, no text) stays every member's."""
    return f"ocr.text.{owner_uid}.{job_id}"


def own_topic_prefixes(uid: int) -> tuple[str, str]:
    """The prefixes of every topic that streams ``uid``'s text: her jobs' (:func:`text_topic`) and the answers
    to her questions (:func:`ask_key`). The separator after the uid keeps uid 10 out of uid 100's."""
    return f"ocr.text.{uid}.", f"ask.{uid}-"


def ask_key(uid: int, token: str) -> str:
    """The request key of a question asked by ``uid``; its answer streams on ``ask.<key>``, the asker's."""
    return f"{uid}-{token}"


def topic_of(body: EventBody, owner_uid: int = NO_UID) -> str:
    """The PUB topic an event goes out on; clients subscribe by prefix. ``owner_uid``: the uid of the job a
    :class:`TextDelta` belongs to (an answer's key carries its asker's)."""
    if isinstance(body, JobChanged):
        return f"job.{body.job.id}"
    if isinstance(body, JobsRemoved):
        return "job.removed"
    if isinstance(body, PageChanged):
        return f"ocr.{body.page.job_id}"
    if isinstance(body, TextDelta):
        return text_topic(owner_uid, body.job_id) if body.job_id else f"ask.{body.key}"
    if isinstance(body, TrainProgress):
        return f"train.{body.point.job_id}"
    if isinstance(body, EngineChanged):
        return "engine"
    if isinstance(body, GpusSampled):
        return "gpu"
    if isinstance(body, QueueChanged):
        return "queue"
    return "hb"
