"""The GPU scheduler on recorded NVML snapshots of 8-GPU boxes (tests/fixtures/nvml: recorded-format
fixtures standing in for NVML, which cannot run here), fed to the real plan()."""

from __future__ import annotations

from itertools import chain, combinations
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.gpus.nvml import GpuSnapshot
from daemon.gpus.plan import EngineAction, EngineView, Policy, QueuedJob, Start, plan
from daemon.gpus.plan import PlacedJob as RunningJob

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nvml"
IDLE = GpuSnapshot.load(FIXTURES / "box8_idle.json")
FOREIGN = GpuSnapshot.load(FIXTURES / "box8_foreign.json")
ENGINE = GpuSnapshot.load(FIXTURES / "box8_engine.json")
ENGINE_ASLEEP = GpuSnapshot.load(FIXTURES / "box8_engine_asleep.json")
MIXED = GpuSnapshot.load(FIXTURES / "box8_mixed_memory.json")
VLLM = EngineView(gpus=(0, 1), state="running", can_sleep=True, pids=(7301, 7302))


def test_fifo_allocation_on_an_idle_box_never_shares_a_gpu() -> None:
    d = plan([QueuedJob(1, 2), QueuedJob(2, 4), QueuedJob(3, 1), QueuedJob(4, 2)], [], IDLE)
    assert d.starts == [Start(1, (0, 1)), Start(2, (2, 3, 4, 5)), Start(3, (6,))]
    assert d.waiting[4].startswith("needs 2 GPU(s), 1 usable now") and d.engine is None


def test_foreign_processes_make_gpus_busy_and_are_named() -> None:
    d = plan([QueuedJob(1, 6)], [], FOREIGN)
    assert d.starts == []
    assert "bob's python (pid 48211, 30.5 GiB)" in d.waiting[1]
    assert "carol's python3 (pid 50117, 50.8 GiB) and 1 more" in d.waiting[1]
    assert "GPU 7: 40.0 GiB in use by processes not visible here" in d.waiting[1]
    assert plan([QueuedJob(2, 5)], [], FOREIGN).starts == [Start(2, (0, 1, 3, 4, 6))]


def test_blocked_head_does_not_stop_jobs_it_could_never_use() -> None:
    # job 1 can only start once foreign processes leave (nothing running frees GPUs): later jobs go ahead
    d = plan([QueuedJob(1, 6), QueuedJob(2, 2), QueuedJob(3, 3)], [], FOREIGN)
    assert d.starts == [Start(2, (0, 1)), Start(3, (3, 4, 6))] and 1 in d.waiting


def test_backfill_takes_no_gpu_the_head_will_need() -> None:
    running = [RunningJob(10, (0, 1, 2, 3)), RunningJob(11, (4, 5))]
    # head needs 4, has 2: if job 11 ends first, the head needs both free GPUs → no backfill
    d = plan([QueuedJob(1, 4), QueuedJob(2, 1)], running, IDLE)
    assert d.starts == [] and set(d.waiting) == {1, 2}


def test_backfill_uses_gpus_the_head_can_spare() -> None:
    running = [RunningJob(10, (0, 1, 2)), RunningJob(11, (3, 4, 5))]
    # head needs 3, has 2; whichever job ends first frees 3, so 2 of the free GPUs are spare
    d = plan([QueuedJob(1, 3), QueuedJob(2, 1), QueuedJob(3, 1)], running, IDLE)
    assert d.starts == [Start(2, (6,)), Start(3, (7,))] and 1 in d.waiting


def test_job_needing_the_engines_gpus_puts_it_to_sleep_then_runs_then_wakes_it() -> None:
    d = plan([QueuedJob(1, 7)], [], ENGINE, VLLM)
    assert d.starts == [] and d.engine == EngineAction("sleep", "job 1 needs GPU(s) the engine holds", (0, 1))
    assert d.waiting[1] == "waiting for the vLLM engine to sleep (it holds GPU 0,1)"
    asleep = EngineView(gpus=(0, 1), state="sleeping", parked=True, pids=(7301, 7302))
    d = plan([QueuedJob(1, 7)], [], ENGINE_ASLEEP, asleep)
    assert d.starts == [Start(1, (0, 1, 2, 3, 4, 5, 7))] and d.engine is None
    d = plan([], [RunningJob(1, (0, 1, 2, 3, 4, 5, 7))], ENGINE_ASLEEP, asleep)
    assert d.engine is None  # still in use
    d = plan([], [], ENGINE_ASLEEP, asleep)
    assert d.engine == EngineAction("wake", "no job uses the engine's GPUs any more")


def test_engine_without_sleep_mode_is_stopped_and_small_jobs_leave_it_alone() -> None:
    no_sleep = EngineView(gpus=(0, 1), state="running", can_sleep=False, pids=(7301, 7302))
    assert plan([QueuedJob(1, 7)], [], ENGINE, no_sleep).engine == EngineAction(
        "stop", "job 1 needs GPU(s) the engine holds", (0, 1))
    d = plan([QueuedJob(2, 5)], [], ENGINE, VLLM)
    assert d.starts == [Start(2, (2, 3, 4, 5, 7))] and d.engine is None
    assert "pid 61002" in plan([QueuedJob(3, 8)], [], ENGINE, VLLM).waiting[3]


def test_an_engine_the_user_stopped_is_not_woken() -> None:
    stopped = EngineView(gpus=(0, 1), state="stopped", parked=False)
    d = plan([QueuedJob(1, 2)], [], IDLE, stopped)
    assert d.starts == [Start(1, (0, 1))] and d.engine is None


def test_min_free_gib_picks_gpus_with_room_and_refuses_the_impossible() -> None:
    d = plan([QueuedJob(1, 2, min_free_gib=60), QueuedJob(2, 4, min_free_gib=30)], [], MIXED)
    assert d.starts == [Start(1, (0, 1)), Start(2, (2, 3, 4, 5))]
    d = plan([QueuedJob(3, 1, min_free_gib=100), QueuedJob(4, 9)], [], MIXED)
    assert "lower min_free_gib" in d.impossible[3] and "this machine has 8" in d.impossible[4]
    assert d.starts == []


def test_sharing_needs_a_memory_figure_and_honours_it() -> None:
    share = Policy(share_gpus=True)
    running = [RunningJob(10, tuple(range(8)), min_free_gib=40)]
    assert plan([QueuedJob(1, 1)], running, IDLE, policy=share).starts == []  # no figure: no sharing
    d = plan([QueuedJob(1, 1, min_free_gib=30), QueuedJob(2, 8, min_free_gib=30)], running, IDLE, policy=share)
    assert d.starts == [Start(1, (0,))] and 2 in d.waiting  # GPU 0 now has 79.6 - 40 - 30 < 30 GiB left
    assert plan([QueuedJob(1, 1, min_free_gib=30)], running, IDLE).starts == []  # sharing is off by default


def test_no_gpus_runs_jobs_on_the_cpu_one_at_a_time() -> None:
    cpu = GpuSnapshot(cpu_only=True, error="no GPUs found (NVML: NVML Shared Library Not Found)")
    d = plan([QueuedJob(1, 2), QueuedJob(2, 1)], [], cpu)
    assert d.starts == [Start(1, ())] and "one at a time" in d.waiting[2]
    assert plan([QueuedJob(2, 1)], [RunningJob(1, ())], cpu).starts == []


def test_lost_nvml_starts_only_cpu_jobs() -> None:
    lost = GpuSnapshot(error="GPU status unavailable (NVML: Unknown Error); no GPU job starts until it is back")
    d = plan([QueuedJob(1, 1), QueuedJob(2, 0)], [], lost)
    assert d.starts == [Start(2, ())] and d.waiting[1] == lost.error


# ---------------------------------------------------------------------------------------- properties

SNAPSHOTS = [IDLE, FOREIGN, ENGINE, ENGINE_ASLEEP, MIXED]


@st.composite
def situations(draw: st.DrawFn) -> tuple[GpuSnapshot, list[RunningJob], list[QueuedJob], EngineView]:
    snap = draw(st.sampled_from(SNAPSHOTS))
    engine = draw(st.sampled_from([
        EngineView(),
        EngineView(gpus=(0, 1), state="running", can_sleep=draw(st.booleans()), pids=(7301, 7302)),
        EngineView(gpus=(0, 1), state="sleeping", parked=True, pids=(7301, 7302)),
    ]))
    free = [g for g in range(8) if g not in engine.gpus]
    order = draw(st.permutations(free))
    running: list[RunningJob] = []
    pos = 0
    for job_id in range(100, 100 + draw(st.integers(0, 3))):
        n = draw(st.integers(1, 3))
        if pos + n > len(order):
            break
        running.append(RunningJob(job_id, tuple(sorted(order[pos:pos + n]))))
        pos += n
    queue = [QueuedJob(i, draw(st.integers(0, 9)), draw(st.sampled_from([0.0, 0.0, 30.0, 60.0])))
             for i in range(draw(st.integers(0, 8)))]
    return snap, running, queue, engine


@settings(max_examples=250, deadline=None)
@given(situations())
def test_a_plan_never_over_commits_a_gpu(sit: tuple[GpuSnapshot, list[RunningJob], list[QueuedJob],
                                                   EngineView]) -> None:
    snap, running, queue, engine = sit
    d = plan(queue, running, snap, engine)
    wanted = {j.job_id: j for j in queue}
    held = [g for r in running for g in r.gpus]
    new = [g for s in d.starts for g in s.gpus]
    assert len(set(held + new)) == len(held + new)  # no GPU in two jobs
    busy = {g.index for g in snap.gpus
            if any(p.pid not in engine.pids for p in g.processes) or (not g.processes and g.memory_used_mib > 1024)}
    assert not set(new) & busy  # nothing lands next to a foreign process
    if engine.state == "running":
        assert not set(new) & set(engine.gpus)  # the engine sleeps first
    for s in d.starts:
        job = wanted[s.job_id]
        assert len(s.gpus) == job.gpus
        for g in s.gpus:
            assert snap.gpus[g].memory_free_mib >= job.min_free_gib * 1024
    decided = [s.job_id for s in d.starts] + list(d.waiting) + list(d.impossible)
    assert sorted(decided) == sorted(wanted)  # every job gets exactly one answer


@settings(max_examples=200, deadline=None)
@given(situations())
def test_backfill_never_delays_the_head(sit: tuple[GpuSnapshot, list[RunningJob], list[QueuedJob],
                                                  EngineView]) -> None:
    snap, running, queue, _ = sit
    snap = IDLE  # count-based guarantee: all GPUs alike, no foreign processes
    queue = [QueuedJob(j.job_id, j.gpus) for j in queue]
    d = plan(queue, running, snap)
    blocked = [j for j in queue if j.job_id in d.waiting and j.gpus > 0]
    if not blocked:
        return
    head = blocked[0]
    started_before = {s.job_id for s in d.starts if s.job_id < head.job_id}
    free_now = 8 - sum(len(r.gpus) for r in running) - sum(
        len(s.gpus) for s in d.starts if s.job_id in started_before)
    later = sum(len(s.gpus) for s in d.starts if s.job_id > head.job_id)
    holders = [len(r.gpus) for r in running] + [len(s.gpus) for s in d.starts if s.job_id in started_before]
    for subset in chain.from_iterable(combinations(holders, k) for k in range(len(holders) + 1)):
        if free_now + sum(subset) >= head.gpus:  # the head could start when these end…
            assert free_now - later + sum(subset) >= head.gpus  # …and still can, with the backfilled jobs


def cluster(*gpus_per_node: int) -> GpuSnapshot:
    """A Ray cluster's snapshot as daemon/gpus/ray_source.py builds it: each GPU names its node, no memory known."""
    from daemon.gpus.nvml import GpuSample

    samples, index = [], 0
    for n, count in enumerate(gpus_per_node):
        for k in range(count):
            samples.append(GpuSample(index=index, name=f"node n{n} GPU {k}", node=f"n{n}"))
            index += 1
    return GpuSnapshot(gpus=tuple(samples))


def test_on_a_cluster_a_job_takes_its_gpus_on_one_node_and_a_multi_node_job_on_distinct_nodes() -> None:
    two_by_two = cluster(2, 2)
    # one GPU taken on node 0: a 2-GPU job cannot straddle the nodes, it goes whole to node 1
    d = plan([QueuedJob(1, 2)], [RunningJob(9, (0,))], two_by_two)
    assert d.starts == [Start(1, (2, 3))]
    d = plan([QueuedJob(1, 2)], [RunningJob(9, (0,)), RunningJob(10, (2,))], two_by_two)
    assert d.waiting[1].startswith("needs 2 GPU(s) on one node, 2 usable now across the cluster")
    # 1 GPU on each of 2 nodes; 2 on each of 2 nodes
    assert plan([QueuedJob(2, 2, nodes=2)], [], two_by_two).starts == [Start(2, (0, 2))]
    assert plan([QueuedJob(3, 4, nodes=2)], [], two_by_two).starts == [Start(3, (0, 1, 2, 3))]
    # node 1 busy: a two-node job waits (nodes come and go), and says why
    d = plan([QueuedJob(4, 2, nodes=2)], [RunningJob(9, (2, 3))], two_by_two)
    assert d.starts == [] and d.waiting[4].startswith("needs 1 GPU(s) on each of 2 nodes, 2 usable now (GPU 2: job 9")
    # more nodes than are alive: waits for nodes; more GPUs on a node than any node has: never
    d = plan([QueuedJob(5, 3, nodes=3), QueuedJob(6, 3), QueuedJob(7, 3, nodes=2)], [], two_by_two)
    assert d.waiting[5].startswith("waiting for nodes: it spans 3 nodes with 1 GPU(s) each; 2 of the 2 alive")
    assert "the largest node of the cluster has 2" in d.impossible[6] and "does not divide" in d.impossible[7]
    # one machine (no node names): --nodes cannot be honoured
    assert "set [cluster] backend" in plan([QueuedJob(8, 2, nodes=2)], [], IDLE).impossible[8]


def test_an_engine_of_replicas_parks_only_the_servers_on_the_gpus_a_job_needs_and_wakes_them_after() -> None:
    # two replicas, one GPU each, on GPU 1 of node 0 and GPU 3 of node 1 (daemon/cluster/replica_port.py)
    fleet = EngineView(gpus=(1, 3), state="running", can_sleep=False)
    d = plan([QueuedJob(1, 2)], [], cluster(2, 2), fleet)
    # the job goes whole to one node, whose replica's GPU it needs: that replica stops, the other serves on
    assert d.starts == [] and d.engine == EngineAction("stop", "job 1 needs GPU(s) the engine holds", (1,))
    parked = EngineView(gpus=(1, 3), state="running", can_sleep=False, parked=True, parked_gpus=(1,))
    d = plan([QueuedJob(1, 2)], [], cluster(2, 2), parked)
    assert d.starts == [Start(1, (0, 1))] and d.engine is None
    # while the job holds GPU 1 the replica stays parked; once it has ended, it comes back
    assert plan([], [RunningJob(1, (0, 1))], cluster(2, 2), parked).engine is None
    assert plan([], [], cluster(2, 2), parked).engine == EngineAction("wake", "no job uses the engine's GPUs any more")


def test_on_a_cluster_min_free_gib_is_not_held_against_unknown_memory() -> None:
    # Ray counts GPUs and knows no memory (0): the need is not refused as "more than the largest GPU has"
    assert plan([QueuedJob(3, 1, min_free_gib=40)], [], cluster(2)).starts == [Start(3, (0,))]
