"""The GPU allocator between the real job manager, store and event bus and the vLLM engine, on recorded 8-GPU
snapshots.

Neither NVML nor vLLM on GPUs can run on this machine, so the GPUs are the recorded snapshots of
tests/fixtures/nvml (an engine on GPUs 0 and 1, then the same box with the engine asleep), and the engine is a
stand-in that records what it was asked and, like vLLM's sleep mode, gives its GPU memory back when parked
(the next snapshot is the "asleep" recording). Everything else is the daemon's own code.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import zmq
import zmq.asyncio

from daemon.core.events import EventBus
from daemon.core.store import Store
from daemon.gpus.allocator import GpuAllocator
from daemon.gpus.nvml import GpuSnapshot
from daemon.gpus.plan import EngineState, EngineView
from daemon.jobs.base import Caller, JobContext, Resources
from daemon.jobs.manager import JobManager
from shared.config import load_settings
from shared.protocol import GpuInfo, JobInfo

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nvml"
CALLER = Caller(user="alice", uid=1000)


@dataclass
class Recorded:
    path: Path

    def snapshot(self) -> GpuSnapshot:
        return GpuSnapshot.load(self.path)

    def close(self) -> None:
        pass


@dataclass
class ParkableEngine:
    """Stands in for vLLM on GPUs 0 and 1 (pids as recorded); parking switches the recording to 'asleep'."""

    source: Recorded
    state: EngineState = "running"
    calls: list[str] = field(default_factory=list)

    def view(self, pids: bool = True) -> EngineView:
        return EngineView(gpus=(0, 1), state=self.state, can_sleep=True, parked=self.state == "sleeping",
                          pids=(7301, 7302) if pids else ())

    async def park(self, how: Literal["sleep", "stop"], reason: str, gpus: tuple[int, ...] = ()) -> None:
        self.calls.append(f"{how}: {reason}")
        self.state = "sleeping"
        self.source.path = FIXTURES / "box8_engine_asleep.json"

    async def unpark(self, reason: str) -> None:
        self.calls.append(f"wake: {reason}")
        self.state = "running"
        self.source.path = FIXTURES / "box8_engine.json"

    async def load_adapter(self, name: str, path: Path) -> str:
        raise AssertionError("not used here")

    async def serve_model(self, path: Path) -> str:
        raise AssertionError("not used here")


class HeldKind:
    """A GPU-lane job that holds its GPUs until the test releases it."""

    kind = "held"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.gpus: dict[int, list[int]] = {}

    def validate(self, spec: dict[str, Any], caller: Caller) -> tuple[str, dict[str, Any]]:
        return f"{spec['gpus']} GPUs", spec

    def resources(self, job: JobInfo) -> Resources:
        return Resources(lane="train", gpus=int(job.spec["gpus"]))

    async def run(self, ctx: JobContext) -> str:
        self.gpus[ctx.job.id] = ctx.gpus
        await self.release.wait()
        return "done"

    def resumable(self, job: JobInfo) -> bool:
        return False


@dataclass
class World:
    store: Store
    jobs: JobManager
    alloc: GpuAllocator
    engine: ParkableEngine
    kind: HeldKind
    samples: list[list[GpuInfo]]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    settings = load_settings(None, tmp_path)
    store = Store(tmp_path / "state.sqlite")
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(f"ipc://{tmp_path}/ev.sock")
    bus = EventBus(pub, "test", store.seq)
    store.on_commit = bus.committed
    kind = HeldKind()
    jobs = JobManager(settings, store, bus, {"held": kind})  # type: ignore[dict-item]
    source = Recorded(FIXTURES / "box8_engine.json")
    samples: list[list[GpuInfo]] = []
    alloc = GpuAllocator(settings.config.scheduler, store, bus, jobs, lanes=("train",), pids_of=lambda _j: [],
                         on_sample=lambda gpus, _note: samples.append(gpus), monitor=source)
    engine = ParkableEngine(source)
    alloc.engine = engine
    jobs.admission = alloc.admit
    jobs.end_hooks.append(alloc.on_job_end)
    jobs.lane_limits["train"] = 100
    runner = asyncio.get_running_loop().create_task(jobs.run())
    await alloc.sample()
    try:
        yield World(store=store, jobs=jobs, alloc=alloc, engine=engine, kind=kind, samples=samples)
    finally:
        kind.release.set()
        await jobs.stop(5)
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        alloc.close()
        pub.close()
        ctx.term()
        store.close()


async def until(predicate: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_a_job_needing_the_engines_gpus_parks_the_engine_runs_on_them_and_wakes_it_after(world: World) -> None:
    small = await world.jobs.submit("held", {"gpus": 2}, "", CALLER)
    await until(lambda: small.id in world.kind.gpus, "the 2-GPU job to start")
    assert world.kind.gpus[small.id] == [2, 3] and world.engine.calls == []  # free GPUs first: the engine stays

    big = await world.jobs.submit("held", {"gpus": 5}, "", CALLER)
    await until(lambda: big.id in world.kind.gpus, "the 5-GPU job to start")
    assert world.engine.calls == [f"sleep: job {big.id} needs GPU(s) the engine holds"]
    assert world.kind.gpus[big.id] == [0, 1, 4, 5, 7]  # never GPU 6 (someone else's process) nor 2, 3
    shown = {g.index: g for g in world.samples[-1]}
    assert shown[0].job_ids == [big.id] and shown[2].job_ids == [small.id] and shown[6].job_ids == []

    world.kind.release.set()
    await until(lambda: len(world.engine.calls) == 2, "the engine to be woken")
    assert world.engine.calls[1] == "wake: no job uses the engine's GPUs any more"
    assert [world.store.get_job(j.id).state for j in (small, big)] == ["succeeded", "succeeded"]


async def test_a_job_waiting_for_gpus_says_why_and_one_that_can_never_run_fails(world: World) -> None:
    first = await world.jobs.submit("held", {"gpus": 5}, "", CALLER)  # 2,3,4,5,7: the engine keeps 0,1
    await until(lambda: first.id in world.kind.gpus, "the first job to start")
    assert world.engine.calls == []
    waiting = await world.jobs.submit("held", {"gpus": 3}, "", CALLER)
    await until(lambda: world.store.get_job(waiting.id).progress.note, "a waiting note")
    note = world.store.get_job(waiting.id).progress.note
    # only the engine's two GPUs are left: parking it would not be enough, so it is left alone
    assert note.startswith(f"waiting: needs 3 GPU(s), 2 usable now (GPU 2: job {first.id};"), note
    assert note.endswith("; +2 more)") and world.engine.calls == []  # GPU 6 (foreign) and 7 (job)
    never = await world.jobs.submit("held", {"gpus": 9}, "", CALLER)
    await until(lambda: world.store.get_job(never.id).state == "failed", "the 9-GPU job to fail")
    assert world.store.get_job(never.id).error == ("asks for 9 GPUs; this machine has 8: submit it with --gpus 8 "
                                                   "or fewer")
