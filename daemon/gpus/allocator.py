"""The daemon's GPUs: sampled on a timer, jobs admitted through the plan, the engine parked for them.

:class:`GpuAllocator` is the daemon part that owns the GPU list; it joins three pieces to the running daemon:

* the GPU source (:mod:`daemon.gpus.source`: NVML or a recorded snapshot) — sampled every ``[scheduler]
  gpu_poll_s`` in one worker thread (NVML calls take milliseconds; one thread, as the monitor asks). Each
  sample becomes the GPU list that status and snapshots show and goes out as a ``GpusSampled`` event on topic
  ``gpu``, with the jobs and the engine on each GPU. No NVML here: "no GPUs found …", and jobs run on the CPU
  ``cpu_slots`` at a time.
* :func:`daemon.gpus.plan.plan` — the job manager's admission check: a queued job of a GPU lane starts when
  the plan says so, on the GPUs it names; otherwise its progress note says why it waits. A job that can never
  start here fails with the reason.
* the engine (:class:`daemon.gpus.engine_port.GpuEngine`, when a vLLM engine runs) — parked (sleep or stop)
  when a job needs its GPU, brought back when no job uses it any more. Whether it is parked is the engine's
  to say (:attr:`EngineView.parked`), so an admin's `ftctl engine wake` is never undone here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from collections.abc import Callable, Iterable

from daemon.core.events import EventBus
from daemon.core.store import Store
from daemon.gpus.engine_port import GpuEngine
from daemon.gpus.nvml import GpuSnapshot
from daemon.gpus.plan import Decisions, EngineAction, EngineView, PlacedJob, Policy, QueuedJob, plan
from daemon.gpus.source import GpuSource
from daemon.jobs.base import Resources
from daemon.jobs.manager import JobManager, RunningJob
from daemon.part import Part, Shown
from shared.config import SchedulerConfig
from shared.protocol import GpuInfo, GpuProcess, GpusSampled, JobInfo, Progress

log = logging.getLogger(__name__)

# the allocator, not a lane limit, decides how many jobs of its lanes run at once (one per free GPU set,
# cpu_slots without GPUs)
UNLIMITED = 1 << 16


class GpuAllocator(Part):
    def __init__(self, cfg: SchedulerConfig, store: Store, bus: EventBus, jobs: JobManager, *,
                 monitor: GpuSource, lanes: Iterable[str], pids_of: Callable[[int], list[int]],
                 engine: GpuEngine | None = None,
                 on_sample: Callable[[list[GpuInfo], str], None] | None = None) -> None:
        """``monitor``: NVML or a recorded snapshot (:mod:`daemon.gpus.source`); ``lanes``: the lanes whose
        jobs need GPUs; ``pids_of(job_id)``: a running job's processes (so they are not taken for foreign
        ones); ``engine``: the GPU engine it may park; ``on_sample(gpus, note)``: told of every new GPU list."""
        self.cfg = cfg
        self.store = store
        self.bus = bus
        self.jobs = jobs
        self.lanes = frozenset(lanes)
        self.pids_of = pids_of
        self.on_sample = on_sample
        self.monitor = monitor
        self.policy = Policy(share_gpus=cfg.share_gpus, min_free_gib=cfg.min_free_gib,
                             idle_used_mib=cfg.idle_used_mib, cpu_slots=cfg.cpu_slots)
        self.engine = engine
        self.snapshot: GpuSnapshot | None = None
        self._engine_task: asyncio.Task[None] | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._waiting: dict[int, str] = {}  # job id -> the reason last shown on the job
        self._published: tuple[list[GpuInfo], str] | None = None
        # NVML is called from this one thread only
        self._nvml = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvml")

    # ---------------------------------------------------------------------------------------- the part

    def lane_limits(self) -> dict[str, int]:
        return dict.fromkeys(self.lanes, UNLIMITED)

    async def start(self) -> None:
        snap = await self.sample()
        log.info("GPUs: %s", snap.note)
        self._sampler = asyncio.get_running_loop().create_task(self.run(), name="gpus")

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
        self.close()

    def shown(self) -> Shown:
        if self._published is None:
            return Shown()
        gpus, note = self._published
        return Shown(gpus=gpus, gpu_note=note)

    # ---------------------------------------------------------------------------------------- sampling

    def _take(self) -> GpuSnapshot:
        return self.monitor.snapshot()

    async def sample(self) -> GpuSnapshot:
        snap = await asyncio.get_running_loop().run_in_executor(self._nvml, self._take)
        self.snapshot = snap
        self._publish(snap)
        return snap

    async def run(self) -> None:
        """Sample forever; a sample may free GPUs a queued job waits for, so the queue is looked at again."""
        while True:
            try:
                await self.sample()
            except Exception:  # NVML surprises must not end the sampling (the monitor already catches most)
                log.exception("GPU sampling failed")
            if self._waiting:
                self.jobs.kick()
            await asyncio.sleep(self.cfg.gpu_poll_s)

    def close(self) -> None:
        self._nvml.submit(self.monitor.close)
        self._nvml.shutdown(wait=False)

    def _publish(self, snap: GpuSnapshot) -> None:
        gpus = self.gpu_infos(snap)
        note = snap.note
        if self._published == (gpus, note):
            return
        self._published = (gpus, note)
        if self.on_sample is not None:
            self.on_sample(gpus, note)
        self.bus.stream(GpusSampled(gpus=gpus, note=note))

    def _republish(self) -> None:
        if self.snapshot is not None:
            self._publish(self.snapshot)

    def gpu_infos(self, snap: GpuSnapshot) -> list[GpuInfo]:
        """The snapshot as the protocol shows it: each GPU with the jobs on it and whether the engine is."""
        job_of_pid: dict[int, int] = {}
        jobs_on: dict[int, list[int]] = {}
        for job_id, run in self.jobs.running.items():
            if run.resources.lane not in self.lanes:
                continue
            for gpu in run.gpus:
                jobs_on.setdefault(gpu, []).append(job_id)
            if snap.gpus:
                job_of_pid.update(dict.fromkeys(self.pids_of(job_id), job_id))
        engine = self.engine_view(pids=False)
        engine_gpus = set(engine.gpus) if engine.state in ("running", "sleeping") else set()
        out = []
        for g in snap.gpus:
            procs = [GpuProcess(pid=p.pid, used_mib=p.used_mib or 0.0, user=p.user, job_id=job_of_pid.get(p.pid))
                     for p in g.processes]
            out.append(GpuInfo(index=g.index, name=g.name, uuid=g.uuid, mem_total_mib=g.memory_total_mib,
                               mem_used_mib=g.memory_used_mib, util_pct=g.utilization_pct or 0.0, processes=procs,
                               job_ids=sorted(jobs_on.get(g.index, [])), engine=g.index in engine_gpus))
        return out

    # ---------------------------------------------------------------------------------------- admission

    def engine_view(self, pids: bool) -> EngineView:
        return self.engine.view(pids=pids) if self.engine is not None else EngineView()

    def _plan(self, running: dict[int, RunningJob]) -> Decisions:
        snap = self.snapshot
        if snap is None:  # before the first sample (the daemon's start): take one now, it costs milliseconds
            snap = self.snapshot = self._take()
        # the manager's index, in its start order (priority first): a backlog of OCR files in other lanes
        # costs nothing here
        queue = [QueuedJob(job_id=job_id, gpus=res.gpus, min_free_gib=res.min_free_gib, nodes=res.nodes)
                 for job_id, res in self.jobs.queue.queued_in(self.lanes)]
        placed = [PlacedJob(job_id=jid, gpus=tuple(r.gpus), min_free_gib=r.resources.min_free_gib,
                              pids=tuple(self.pids_of(jid)) if snap.gpus else ())
                   for jid, r in running.items() if r.resources.lane in self.lanes]
        return plan(queue, placed, snap, self.engine_view(pids=bool(snap.gpus)), self.policy,
                    own_pids=(os.getpid(),))

    def admit(self, job: JobInfo, res: Resources, running: dict[int, RunningJob]) -> list[int] | None:
        """The job manager's admission hook (see the module docstring)."""
        if res.lane not in self.lanes:
            return []
        decisions = self._plan(running)
        self._engine_act(decisions.engine)
        if job.id in decisions.impossible:
            reason = decisions.impossible[job.id]
            self._waiting.pop(job.id, None)
            self.jobs.fail_queued(job.id, reason)
            return None
        for start in decisions.starts:
            if start.job_id == job.id:
                self._waiting.pop(job.id, None)
                # once the manager has launched it, clients see the job on its GPUs without waiting a sample
                asyncio.get_running_loop().call_soon(self._republish)
                return list(start.gpus)
        reason = decisions.waiting.get(job.id, "waiting for GPUs")
        if self._waiting.get(job.id) != reason:
            self._waiting[job.id] = reason
            self.jobs.set_note(job.id, Progress(note=reason if reason.startswith("waiting") else f"waiting: {reason}"))
        return None

    def on_job_end(self, job: JobInfo) -> None:
        """A job ended: its GPUs are free, so the engine may come back (nothing queued asks the manager)."""
        waited = self._waiting.pop(job.id, None) is not None
        if not job.gpus and not waited:
            return  # it held no GPU and waited for none (an OCR page job, say): nothing here changed
        if job.state == "interrupted":
            # its machine went away under it (a Ray node): it is placed again at once, on a fresh view
            self.snapshot = None
        self._republish()
        if self.engine is None:
            return
        running = {jid: r for jid, r in self.jobs.running.items() if jid != job.id}
        self._engine_act(self._plan(running).engine)

    def _engine_act(self, action: EngineAction | None) -> None:
        if action is None or self.engine is None:
            return
        if self._engine_task is not None and not self._engine_task.done():
            return  # one engine change at a time; the next plan asks again
        engine = self.engine

        async def act() -> None:
            try:
                if action.action == "wake":
                    await engine.unpark(action.reason)
                else:
                    await engine.park(action.action, action.reason, action.gpus)
                log.info("engine %s: %s", action.action, action.reason)
                await self.sample()  # what the GPUs look like now, before the queue is looked at again
            except Exception:
                log.exception("could not %s the engine (%s)", action.action, action.reason)
            finally:
                self.jobs.kick()

        self._engine_task = asyncio.get_running_loop().create_task(act(), name=f"engine-{action.action}")
