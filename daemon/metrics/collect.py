"""What a Prometheus scrape shows, gathered at scrape time from the parts that own it.

Nothing else in the daemon writes a metric: :class:`DaemonCollector` asks the store (jobs, pages, loss points),
the parts' ``shown()`` (engine, GPUs), the job manager (queue paused) and the hot folder's inbox when scraped.
What only an event can tell (how long a job waited and ran, which pages finished) it counts itself, as the
job-end hook and the scrapes see them; those counts start at zero with the daemon, as Prometheus expects of
counters and histograms.

Labels carry no secrets, paths, job names or text: user names, job ids and kinds, page methods, GPU indices
and names (a TCP endpoint is readable by every local user).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon import __version__
from daemon.core.store import Store
from daemon.part import Part
from shared.protocol import TERMINAL_STATES, EngineInfo, GpuInfo, JobInfo

MIB = 1024 * 1024
ENGINE_STATES = ("stopped", "starting", "ready", "sleeping", "restarting", "failed")
LIVE_STATES = ("queued", "running", "interrupted")
# queue waits run from seconds (an idle daemon) to a day (a long training queue); runs from a selftest's
# second to a two-day training; a page from a text layer's 50 ms to the page timeout
WAIT_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 12 * 3600.0, 24 * 3600.0)
RUN_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 3 * 3600.0, 6 * 3600.0, 12 * 3600.0, 24 * 3600.0,
               48 * 3600.0)
PAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# a hot folder is counted up to this many files: a scrape stays quick whatever lands there
INBOX_COUNT_LIMIT = 100_000
Labels = tuple[tuple[str, str], ...]  # ((label, value), …) of one sample


@dataclass
class _Histogram:
    """One histogram per label set, owned by the collector (never a process-wide metric object)."""

    bounds: tuple[float, ...]
    series: dict[tuple[str, ...], tuple[list[int], list[float]]] = field(default_factory=dict)

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        counts, total = self.series.setdefault(labels, ([0] * (len(self.bounds) + 1), [0.0]))
        counts[bisect.bisect_left(self.bounds, value)] += 1
        total[0] += value

    def family(self, name: str, doc: str, label_names: Sequence[str]) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(name, doc, labels=label_names)
        for labels, (counts, total) in sorted(self.series.items()):
            cumulative, buckets = 0, []
            for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            fam.add_metric(list(labels), buckets, total[0])
        return fam


@dataclass
class _RunningJob:
    """What the collector remembers of a running job between scrapes."""

    pages_counted: set[int] = field(default_factory=set)
    train_step: int = -1
    train: dict[str, float] = field(default_factory=dict)


def shown_by(parts: Sequence[Part]) -> tuple[EngineInfo | None, list[GpuInfo]]:
    """(engine, GPUs) as the parts show them, a later part's word over an earlier one's (as the daemon's
    status reply has them)."""
    engine: EngineInfo | None = None
    gpus: list[GpuInfo] = []
    for part in parts:
        shown = part.shown()
        engine = shown.engine if shown.engine is not None else engine
        gpus = shown.gpus if shown.gpus is not None else gpus
    return engine, gpus


def count_files(folder: str, limit: int = INBOX_COUNT_LIMIT) -> int:
    """Files below ``folder`` (hidden ones and hidden folders left out, as the hot folder leaves them)."""
    n = 0
    for _root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        n += sum(1 for f in files if not f.startswith("."))
        if n >= limit:
            return limit
    return n


class DaemonCollector(Collector):
    """Runs on the daemon's event loop (the store is the loop's): collect() is called by the scrape handler."""

    def __init__(self, store: Store, parts: Callable[[], Sequence[Part]], paused: Callable[[], bool]) -> None:
        self.store = store
        self.parts = parts
        self.paused = paused
        self.inbox_files: int | None = None  # set by the scrape before collect(); None: no hot folder
        self._wait = _Histogram(WAIT_BUCKETS)
        self._run = _Histogram(RUN_BUCKETS)
        self._page_s = _Histogram(PAGE_BUCKETS)
        self._pages: dict[tuple[str, str], int] = {}
        self._ended: dict[tuple[str, str, str], int] = {}
        self._running: dict[int, _RunningJob] = {}

    # ------------------------------------------------------------------------------ what events tell

    def job_ended(self, job: JobInfo) -> None:
        seen = self._running.pop(job.id, None)
        if job.started is not None:
            if seen is None:  # it started and ended between two scrapes
                self._wait.observe((job.kind,), max(0.0, job.started - job.created))
            if job.finished is not None:
                self._run.observe((job.kind, job.state), max(0.0, job.finished - job.started))
            self._count_pages(job.id, seen or _RunningJob())
        key = (job.kind, job.owner, job.state)
        self._ended[key] = self._ended.get(key, 0) + 1

    def _count_pages(self, job_id: int, seen: _RunningJob) -> None:
        for page in self.store.pages(job_id):
            if page.state not in ("done", "failed") or page.page_no in seen.pages_counted:
                continue
            seen.pages_counted.add(page.page_no)
            method = page.method or "none"
            self._pages[(method, page.state)] = self._pages.get((method, page.state), 0) + 1
            total_s = page.timings.get("total_s")
            if page.state == "done" and total_s is not None:
                self._page_s.observe((method,), total_s)

    def _follow(self, job: JobInfo) -> _RunningJob:
        seen = self._running.get(job.id)
        if seen is None:
            seen = self._running[job.id] = _RunningJob()
            if job.started is not None:
                self._wait.observe((job.kind,), max(0.0, job.started - job.created))
        if job.kind == "ocr":
            self._count_pages(job.id, seen)
        for point in self.store.train_points(job.id, since_step=seen.train_step):
            seen.train_step = point.step
            seen.train["step"] = point.step
            seen.train["total_steps"] = point.total_steps
            for name in ("loss", "eval_loss", "lr", "epoch"):
                value = getattr(point, name)
                if value is not None:
                    seen.train[name] = value
        return seen

    # ------------------------------------------------------------------------------------- a scrape

    def collect(self) -> Iterator[Metric]:
        yield _gauge("ftmllm_build_info", "The daemon's version.", [((("version", __version__),), 1.0)])
        live = [j for j in self.store.list_jobs(include_finished=False) if j.state in LIVE_STATES]
        yield from self._jobs(live)
        engine, gpus = shown_by(self.parts())
        if engine is not None:
            yield from _engine(engine)
        yield from _gpus(gpus, {j.id: j for j in live})
        if self.inbox_files is not None:
            yield _gauge("ftmllm_hotfolder_inbox_files", "Files in the hot folder's inbox: dropped and not yet "
                         "converted (waiting to settle, for queue room, or for their job).",
                         [((), float(self.inbox_files))])

    def _jobs(self, live: list[JobInfo]) -> Iterator[Metric]:
        by: dict[tuple[str, str, str], int] = {}
        for job in live:
            by[(job.state, job.kind, job.owner)] = by.get((job.state, job.kind, job.owner), 0) + 1
        yield _gauge("ftmllm_jobs", "Jobs not yet ended, by state, kind and owner.",
                     [((("state", s), ("kind", k), ("owner", o)), float(n)) for (s, k, o), n in sorted(by.items())])
        stored = self.store.counts()
        yield _gauge("ftmllm_jobs_stored", "Jobs in the store by state, ended ones included.",
                     [((("state", s),), float(stored.get(s, 0))) for s in (*LIVE_STATES, *sorted(TERMINAL_STATES))])
        ended = CounterMetricFamily("ftmllm_jobs_ended", "Jobs that left the running state since the daemon "
                                    "started, by kind, owner and the state they ended in.",
                                    labels=["kind", "owner", "state"])
        for (k, o, s), n in sorted(self._ended.items()):
            ended.add_metric([k, o, s], n)
        yield ended
        yield _gauge("ftmllm_queue_paused", "1 while an admin has paused the queue.",
                     [((), 1.0 if self.paused() else 0.0)])
        running = [j for j in live if j.state == "running"]
        for job in running:
            self._follow(job)
        for gone in self._running.keys() - {j.id for j in running}:
            del self._running[gone]  # interrupted at a stop: no job-end for it in this daemon's life
        yield self._wait.family("ftmllm_job_queue_wait_seconds", "From submit to start, of jobs that started.",
                                ["kind"])
        yield self._run.family("ftmllm_job_run_seconds", "From start to end, of jobs that ended.",
                               ["kind", "state"])
        pages = CounterMetricFamily("ftmllm_pages", "Pages converted (done) or given up (failed), by method.",
                                    labels=["method", "state"])
        for (m, s), n in sorted(self._pages.items()):
            pages.add_metric([m, s], n)
        yield pages
        yield self._page_s.family("ftmllm_page_seconds", "Time of one converted page, by method.", ["method"])
        owner = {j.id: j.owner for j in running}
        for name, key, doc in (("ftmllm_train_loss", "loss", "The latest training loss of a running job."),
                               ("ftmllm_train_eval_loss", "eval_loss", "The latest eval loss of a running job."),
                               ("ftmllm_train_learning_rate", "lr", "The latest learning rate of a running job."),
                               ("ftmllm_train_epoch", "epoch", "The epoch a running training job is in."),
                               ("ftmllm_train_step", "step", "The latest logged step of a running job."),
                               ("ftmllm_train_steps", "total_steps", "The steps a running job will take.")):
            yield _gauge(name, doc, [((("job", str(i)), ("owner", owner[i])), seen.train[key])
                                     for i, seen in sorted(self._running.items()) if key in seen.train])


def _gauge(name: str, doc: str, samples: Iterable[tuple[Labels, float]]) -> GaugeMetricFamily:
    """A gauge family from (((label, value), …), sample) rows, which all name the same labels."""
    rows = list(samples)
    fam = GaugeMetricFamily(name, doc, labels=[k for k, _v in rows[0][0]] if rows else [])
    for labels, value in rows:
        fam.add_metric([v for _k, v in labels], value)
    return fam


def _engine(engine: EngineInfo) -> Iterator[Metric]:
    yield _gauge("ftmllm_engine_state", "1 for the state the default engine is in, 0 for the others.",
                 [((("kind", engine.kind), ("state", s)), 1.0 if engine.state == s else 0.0) for s in ENGINE_STATES])
    yield _gauge("ftmllm_engine_requests", "Page requests at the engine: being generated, or waiting for a slot.",
                 [((("state", "running"),), float(engine.running)), ((("state", "waiting"),), float(engine.waiting))])
    yield _gauge("ftmllm_engine_kv_cache_ratio", "The share of the engine's KV cache in use (0–1).",
                 [((), engine.kv_cache_pct / 100)])
    yield _gauge("ftmllm_engine_tokens_per_second", "Tokens the engine generates a second (smoothed).",
                 [((), engine.tokens_per_s)])
    yield _gauge("ftmllm_engine_pages_per_second", "Pages the engine converts a second (smoothed).",
                 [((), engine.pages_per_s)])


def _gpus(gpus: list[GpuInfo], live: dict[int, JobInfo]) -> Iterator[Metric]:
    yield _gauge("ftmllm_gpu_memory_total_bytes", "A GPU's memory.",
                 [((("gpu", str(g.index)), ("name", g.name)), g.mem_total_mib * MIB) for g in gpus])
    yield _gauge("ftmllm_gpu_memory_used_bytes", "A GPU's memory in use, by anyone.",
                 [((("gpu", str(g.index)),), g.mem_used_mib * MIB) for g in gpus])
    yield _gauge("ftmllm_gpu_utilization_ratio", "A GPU's utilisation (0–1) over NVML's last sample period.",
                 [((("gpu", str(g.index)),), g.util_pct / 100) for g in gpus])
    yield _gauge("ftmllm_gpu_engine", "1 on the GPUs the OCR engine holds.",
                 [((("gpu", str(g.index)),), 1.0 if g.engine else 0.0) for g in gpus])
    rows: list[tuple[Labels, float]] = []
    foreign: list[tuple[Labels, float]] = []
    for g in gpus:
        used: dict[int, float] = dict.fromkeys(g.job_ids, 0.0)
        other = 0.0
        for p in g.processes:
            if p.job_id is None:
                other += p.used_mib
            else:
                used[p.job_id] = used.get(p.job_id, 0.0) + p.used_mib
        for job_id, mib in sorted(used.items()):
            job = live.get(job_id)
            rows.append(((("gpu", str(g.index)), ("job", str(job_id)), ("kind", job.kind if job else ""),
                          ("owner", job.owner if job else "")), mib * MIB))
        foreign.append(((("gpu", str(g.index)),), other * MIB))
    yield _gauge("ftmllm_gpu_job_memory_bytes", "GPU memory held by a job's processes, one series per job on "
                 "the GPU (0 for a job placed there whose processes hold none yet).", rows)
    yield _gauge("ftmllm_gpu_foreign_memory_bytes", "GPU memory held by processes no job of the daemon owns.",
                 foreign)
