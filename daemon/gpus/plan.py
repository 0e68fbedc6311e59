"""Which queued jobs start now, on which GPUs, and what the vLLM engine must do: a pure function.

``plan(queue, running, snapshot, engine, policy)`` reads a GPU snapshot (daemon/gpus/nvml.py), the daemon's
allocation table (running jobs and their GPUs) and the engine's state, and returns :class:`Decisions`. It
changes nothing; the daemon carries the decisions out and plans again on the next event (a job queued or
ended, the engine asleep, a new snapshot).

The rules:
* A GPU is free for a job when no running job holds it, the engine does not sit on it, and nothing else
  uses it: a process the daemon does not know ("foreign": someone's `python train.py`) or, when NVML
  lists no process (another container), more than ``policy.idle_used_mib`` of memory in use. With
  ``share_gpus``, a GPU held by another job or by foreign processes is also usable when its free memory
  covers the job's ``min_free_gib`` (which sharing then requires); GPUs are never over-committed beyond
  that, and two jobs never share a GPU otherwise.
* FIFO with backfill (EASY-style, without run-time estimates): jobs are taken in queue order. The first job
  that cannot start is the head; a later job may start on GPUs the head could use only if the head could
  still start as early as it could have in every order the running jobs might finish: with ``d`` GPUs
  missing for the head, a later job may take ``min(s - d)`` of its GPUs, over the sums ``s >= d`` of the
  GPUs of any subset of running jobs. GPUs the head cannot use at all (e.g. too little memory for its
  ``min_free_gib``) are free to take. Only the head is protected, so a blocked big job is not starved by a
  stream of small ones, and small jobs still fill GPUs nobody else can use yet.
* The engine: a job may use the engine's GPUs only once the engine sleeps (vLLM's sleep mode frees its
  memory) or is stopped; engine GPUs are taken last. When a job needs them, the decision is "sleep" (or
  "stop" without sleep mode) and the job waits for it. When no running job holds an engine GPU and no
  queued job waits for one, an engine the scheduler parked is woken.
* No GPUs at all (NVML absent): jobs run on the CPU, one at a time. A snapshot that failed after GPUs were
  seen starts nothing that needs a GPU.
* A cluster (GPUs that name their node, daemon/gpus/ray_source.py): a job's process runs on one node, so its
  GPUs are taken on one node; a job of ``nodes`` > 1 takes ``gpus / nodes`` on each of that many distinct
  nodes (the nodes with the best GPUs first, by the same ranking).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal

from daemon.gpus.nvml import GpuSample, GpuSnapshot

EngineState = Literal["running", "sleeping", "stopped", "absent"]
MIB_PER_GIB = 1024.0


@dataclass(frozen=True)
class QueuedJob:
    job_id: int
    gpus: int  # 0: runs on the CPU; with nodes > 1 the total, gpus // nodes on each
    min_free_gib: float = 0.0
    nodes: int = 1


@dataclass(frozen=True)
class PlacedJob:
    """A running job and the GPUs it was placed on."""

    job_id: int
    gpus: tuple[int, ...]
    pids: tuple[int, ...] = ()  # its processes (so they are not taken for foreign ones)
    min_free_gib: float = 0.0


@dataclass(frozen=True)
class EngineView:
    gpus: tuple[int, ...] = ()
    state: EngineState = "absent"
    can_sleep: bool = True
    parked: bool = False  # asleep or stopped because the scheduler asked (so the scheduler wakes it)
    pids: tuple[int, ...] = ()
    # an engine of several servers (vLLM replicas on a cluster) parks the ones on the GPUs a job needs: those
    # GPUs (among ``gpus``) are parked while the engine runs on the others
    parked_gpus: tuple[int, ...] = ()


@dataclass(frozen=True)
class Policy:
    share_gpus: bool = False
    min_free_gib: float = 0.0  # default for jobs that do not say
    idle_used_mib: float = 1024.0  # memory in use with no process listed that still counts as an idle GPU
    cpu_slots: int = 1  # jobs at once on a machine without GPUs


@dataclass(frozen=True)
class Start:
    job_id: int
    gpus: tuple[int, ...]


@dataclass(frozen=True)
class EngineAction:
    action: Literal["sleep", "stop", "wake"]
    reason: str
    gpus: tuple[int, ...] = ()  # sleep/stop: the engine's GPUs the waiting jobs need (all of it may go)


@dataclass
class Decisions:
    starts: list[Start] = field(default_factory=list)
    engine: EngineAction | None = None
    waiting: dict[int, str] = field(default_factory=dict)  # job id -> why it does not start now
    impossible: dict[int, str] = field(default_factory=dict)  # job id -> why it can never start here


@dataclass
class _Gpu:
    info: GpuSample
    holders: set[int] = field(default_factory=set)  # running (or just started) job ids
    foreign: str = ""  # why something we do not own makes it busy; "" = nothing
    engine: bool = False  # the engine sits on it (running) — usable only after sleep/stop
    engine_parked: bool = False  # the engine owns it but sleeps or was stopped
    reserved_mib: float = 0.0  # min_free of jobs sharing it (share_gpus)

    @property
    def free_mib(self) -> float:
        return self.info.memory_free_mib - self.reserved_mib


def plan(
    queue: Sequence[QueuedJob],
    running: Sequence[PlacedJob],
    snapshot: GpuSnapshot,
    engine: EngineView | None = None,
    policy: Policy = Policy(),
    own_pids: Collection[int] = (),
) -> Decisions:
    engine = engine or EngineView()
    out = Decisions()
    if snapshot.cpu_only:
        _plan_cpu(queue, running, policy, out)
        return out

    gpus = _gpu_table(snapshot, running, engine, own_pids, policy)
    if not gpus:
        for job in queue:
            if job.gpus == 0:
                out.starts.append(Start(job.job_id, ()))
            else:
                out.waiting[job.job_id] = snapshot.error or "GPU status unavailable; waiting for NVML"
        return out

    head_budget: int | None = None  # how many of the head's GPUs later jobs may still take
    head_gpus: set[int] = set()
    needs_engine: list[int] = []
    for job in queue:
        if job.gpus == 0:
            out.starts.append(Start(job.job_id, ()))
            continue
        need_mib = (job.min_free_gib or policy.min_free_gib) * MIB_PER_GIB
        clustered = any(g.info.node for g in gpus.values())
        if clustered:
            misfit, never = _cluster_misfit(job, gpus)
            if misfit:
                (out.impossible if never else out.waiting)[job.job_id] = misfit
                continue
        elif job.nodes > 1:
            out.impossible[job.job_id] = (f"spans {job.nodes} nodes; this daemon plans one machine: set [cluster] "
                                          "backend = \"ray\" or submit it without --nodes")
            continue
        elif job.gpus > len(gpus):
            out.impossible[job.job_id] = (f"asks for {job.gpus} GPUs; this machine has {len(gpus)}: submit it "
                                          f"with --gpus {len(gpus)} or fewer")
            continue
        # a cluster node without NVML reports no memory (0): a need is not held against what is unknown
        biggest = max(g.info.memory_total_mib for g in gpus.values())
        if need_mib > biggest > 0:
            out.impossible[job.job_id] = (f"asks for {need_mib / MIB_PER_GIB:.0f} GiB free per GPU; the largest "
                                          f"GPU here has {biggest / MIB_PER_GIB:.0f} GiB: lower min_free_gib")
            continue

        usable = _ranked([g for g in gpus.values() if _usable(g, need_mib, policy)])
        if head_budget is not None:
            # after the head: GPUs the head cannot use first, then the head's within the budget
            usable = ([g for g in usable if g.info.index not in head_gpus]
                      + [g for g in usable if g.info.index in head_gpus][:head_budget])
        chosen = _per_node(usable, job) if clustered else usable[: job.gpus]
        if len(chosen) == job.gpus:
            if head_budget is not None:
                head_budget -= sum(1 for g in chosen if g.info.index in head_gpus)
            idx = tuple(sorted(g.info.index for g in chosen))
            for g in chosen:
                g.holders.add(job.job_id)
                g.reserved_mib += need_mib
            if any(g.engine for g in chosen):
                needs_engine.append(job.job_id)
                out.waiting[job.job_id] = (f"waiting for the vLLM engine to {_park_verb(engine)} (it holds GPU "
                                           f"{','.join(str(g.info.index) for g in chosen if g.engine)})")
            else:
                out.starts.append(Start(job.job_id, idx))
            continue

        out.waiting[job.job_id] = _why_waiting(job, gpus, need_mib, policy, len(usable), clustered)
        if head_budget is None and not policy.share_gpus:
            head_gpus = {g.info.index for g in usable}
            head_budget = _backfill_budget(job.gpus - len(usable), running, out.starts)

    if needs_engine and engine.state == "running":
        action: Literal["sleep", "stop"] = "sleep" if engine.can_sleep else "stop"
        wanted = tuple(sorted(g.info.index for g in gpus.values() if g.engine and g.holders & set(needs_engine)))
        out.engine = EngineAction(action, f"job {needs_engine[0]} needs GPU(s) the engine holds", wanted)
    elif engine.parked and (engine.state in ("sleeping", "stopped") or engine.parked_gpus) and not needs_engine:
        in_use = {gi for r in running for gi in r.gpus} | {gi for s in out.starts for gi in s.gpus}
        if not in_use & set(engine.parked_gpus or engine.gpus):
            out.engine = EngineAction("wake", "no job uses the engine's GPUs any more")
    return out


def _plan_cpu(queue: Sequence[QueuedJob], running: Sequence[PlacedJob], policy: Policy,
              out: Decisions) -> None:
    slots = max(0, policy.cpu_slots - len(running))
    for job in queue:
        if slots > 0:
            out.starts.append(Start(job.job_id, ()))
            slots -= 1
        else:
            out.waiting[job.job_id] = ("no GPUs here: jobs run on the CPU one at a time; waits for the "
                                       "running job")


def _gpu_table(snapshot: GpuSnapshot, running: Sequence[PlacedJob], engine: EngineView,
               own_pids: Collection[int], policy: Policy) -> dict[int, _Gpu]:
    known = set(own_pids) | set(engine.pids) | {p for r in running for p in r.pids}
    engine_on = set(engine.gpus) if engine.state in ("running", "sleeping") or engine.parked else set()
    table: dict[int, _Gpu] = {}
    for info in snapshot.gpus:
        g = _Gpu(info=info)
        parked_here = info.index in engine.parked_gpus
        g.engine = info.index in engine_on and engine.state == "running" and not parked_here
        g.engine_parked = info.index in engine_on and (engine.state != "running" or parked_here)
        foreign = [p for p in info.processes if p.pid not in known]
        if foreign:
            p = foreign[0]
            used = f", {p.used_mib / MIB_PER_GIB:.1f} GiB" if p.used_mib is not None else ""
            who = f"{p.user}'s " if p.user else ""
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            g.foreign = f"{who}{p.name or 'process'} (pid {p.pid}{used}){more}"
        elif not info.processes and info.memory_used_mib > policy.idle_used_mib \
                and info.index not in engine_on:
            g.foreign = (f"{info.memory_used_mib / MIB_PER_GIB:.1f} GiB in use by processes not visible here "
                         "(another container?)")
        table[info.index] = g
    for r in running:
        for gi in r.gpus:
            if gi in table:
                table[gi].holders.add(r.job_id)
                table[gi].reserved_mib += r.min_free_gib * MIB_PER_GIB
    return table


def _usable(g: _Gpu, need_mib: float, policy: Policy) -> bool:
    if g.engine:  # its memory is the engine's until it sleeps; the next plan sees the real free memory
        return not g.holders and not g.foreign
    if g.free_mib < need_mib and g.info.memory_total_mib > 0:  # 0: unknown (daemon/gpus/ray_source.py)
        return False
    if not g.holders and not g.foreign:
        return True
    # sharing needs a stated memory need: without one "usable" would mean "anything goes"
    return policy.share_gpus and need_mib > 0 and not g.engine


def _ranked(gpus: list[_Gpu]) -> list[_Gpu]:
    """Plain free GPUs first, then parked engine GPUs, then shared ones, then the running engine's (whose
    use means putting it to sleep); within a class the most free memory, then the lowest index."""
    def rank(g: _Gpu) -> tuple[int, float, int]:
        cls = 3 if g.engine else 2 if (g.holders or g.foreign) else 1 if g.engine_parked else 0
        return (cls, -g.free_mib, g.info.index)
    return sorted(gpus, key=rank)


def _per_node(usable: list[_Gpu], job: QueuedJob) -> list[_Gpu]:
    """On a cluster: ``gpus / nodes`` GPUs on each of ``nodes`` distinct nodes, from ``usable`` in its order (the
    nodes whose best GPU ranks first); fewer than the job needs when no such set is usable now."""
    each = job.gpus // job.nodes
    by_node: dict[str, list[_Gpu]] = {}
    for g in usable:
        by_node.setdefault(g.info.node, []).append(g)
    fitting = [on[:each] for on in by_node.values() if len(on) >= each]
    if len(fitting) < job.nodes:
        return []
    return [g for on in fitting[: job.nodes] for g in on]


def _cluster_misfit(job: QueuedJob, gpus: dict[int, _Gpu]) -> tuple[str, bool]:
    """Why ``job`` does not fit the cluster's alive nodes ("" when it does), and whether that is for good: more
    GPUs on one node than the largest node has never fits (nodes are alike as a rule); too few such nodes may
    change as nodes join, so the job waits."""
    per_node: dict[str, int] = {}
    for g in gpus.values():
        per_node[g.info.node] = per_node.get(g.info.node, 0) + 1
    if job.gpus % job.nodes:
        return f"asks for {job.gpus} GPUs on {job.nodes} nodes, which does not divide: give --gpus per node", True
    each, most = job.gpus // job.nodes, max(per_node.values())
    if each > most:
        return (f"asks for {each} GPUs on one node; the largest node of the cluster has {most}: submit it with "
                f"--gpus {most} or fewer" + (", over several nodes with --nodes" if job.nodes == 1 else "")), True
    big_enough = sum(1 for n in per_node.values() if n >= each)
    if big_enough >= job.nodes:
        return "", False
    return (f"waiting for nodes: it spans {job.nodes} nodes with {each} GPU(s) each; {big_enough} of the "
            f"{len(per_node)} alive nodes have that many (cancel it, or it starts when enough nodes join)"), False


def _backfill_budget(missing: int, running: Sequence[PlacedJob], started: Sequence[Start]) -> int:
    """How many of the head's usable GPUs later jobs may take without delaying the head in any order
    the running jobs finish (see the module docstring). Nothing running that could ever free enough:
    the head waits on something else (foreign processes), and later jobs may use everything."""
    holdings = [len(r.gpus) for r in running] + [len(s.gpus) for s in started]
    sums = {0}
    for h in holdings:
        sums |= {s + h for s in sums}
    enough = [s - missing for s in sums if s >= missing]
    return min(enough) if enough else 1 << 30


def _why_waiting(job: QueuedJob, gpus: dict[int, _Gpu], need_mib: float, policy: Policy, usable: int,
                 clustered: bool) -> str:
    busy = []
    for g in sorted(gpus.values(), key=lambda x: x.info.index):
        if g.holders:
            busy.append(f"GPU {g.info.index}: job {','.join(str(j) for j in sorted(g.holders))}")
        elif g.foreign:
            busy.append(f"GPU {g.info.index}: {g.foreign}")
        elif g.free_mib < need_mib:
            busy.append(f"GPU {g.info.index}: {g.free_mib / MIB_PER_GIB:.0f} GiB free < "
                        f"{need_mib / MIB_PER_GIB:.0f} GiB")
    shown = "; ".join(busy[:4]) + (f"; +{len(busy) - 4} more" if len(busy) > 4 else "")
    if job.nodes > 1:
        return f"needs {job.gpus // job.nodes} GPU(s) on each of {job.nodes} nodes, {usable} usable now ({shown})"
    if clustered and job.gpus > 1:
        return f"needs {job.gpus} GPU(s) on one node, {usable} usable now across the cluster ({shown})"
    return f"needs {job.gpus} GPU(s), {usable} usable now ({shown})"


def _park_verb(engine: EngineView) -> str:
    return "sleep" if engine.can_sleep else "stop"
