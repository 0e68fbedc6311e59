"""The train/eval/export kinds with ``[cluster] backend = "ray"``: everything as locally (submit checks, the
frozen YAML, loss points from trainer_log.jsonl, what was saved, resume from the last checkpoint) except
where the trainer runs: a Ray job (daemon/cluster/ray_jobs.py) instead of a child process of the daemon.

* The job dir (job.yaml, output/: checkpoints, adapter, trainer_log.jsonl) lives under ``[cluster]
  shared_dir``/jobs, which every node mounts at the same path; the job's log stays in the daemon's state dir.
* Placement: the allocator plans against the cluster's GPUs (daemon/gpus/ray_source.py). When the GPUs it
  chose are all on one node, the Ray job is pinned to that node (``ray.io/node-id`` label), so what
  `ftctl status` shows is where the job really runs; otherwise Ray places it.
* Not in the sandbox: a Ray worker runs the command as the user that started Ray on that node, without
  Landlock or a private network namespace (README "Beyond one machine" says what trust that loses).
* A node that dies under a train job: the job ends ``interrupted`` and goes back to the queue at once; the
  allocator places it again on the nodes still alive, and it resumes from its last complete checkpoint, up
  to :data:`NODE_LOSS_RETRIES` times (its history says each step).
* ``--nodes K``: one Ray job per node, torchrun across them (daemon/cluster/gang.py says how and why).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

from daemon.cluster.gang import RayGang
from daemon.cluster.ray_jobs import RayRun, entrypoint, python_beside
from daemon.core.atomic import write_atomic
from daemon.gpus.ray_source import RayGpus, RayNode
from daemon.jobs.base import JobContext, JobFailed, JobInterrupted
from daemon.train.kind import JOB_YAML, KindName, LlamaFactoryKind, TrainSetup
from daemon.train.launch import LaunchError, build_argv, build_env, prepare_resume, resolve_cli

RAY_RECORD = "ray_job.json"  # the Ray submission a run made, to stop it if the daemon died meanwhile
NODE_LOSS_RETRIES = 2


class RayTrainKind(LlamaFactoryKind):
    max_nodes = 64

    def __init__(self, kind: KindName, setup: TrainSetup, *, client: Any, gpus: RayGpus) -> None:
        super().__init__(kind, setup)
        self.client = client
        self.gpus = gpus

    async def run(self, ctx: JobContext) -> str:
        cfg = self.setup.settings.config.train
        spec = ctx.job.spec
        out = Path(spec["output_dir"])
        yaml_path = self.setup.jobs_dir / str(ctx.job.id) / JOB_YAML
        if not yaml_path.is_file():
            write_atomic(yaml_path, spec["yaml"], mode=0o644)  # nodes read it as the Ray user
        try:
            cli = resolve_cli(cfg.llamafactory_cli)
            argv = build_argv(cli, spec["command"], yaml_path)
        except LaunchError as exc:
            raise JobFailed(str(exc)) from None
        await self._end_earlier_submission(ctx)
        finished = await self._before_start(ctx, out)
        if finished is not None:
            return finished
        count = int(spec.get("gpus", 1))
        nodes = int(spec.get("nodes", 1))
        env = build_env(base={}, gpus=count, extra=cfg.env, spec_env=spec.get("env", {}),
                        deepspeed=bool(spec["params"].get("deepspeed")))
        # Ray's wait between its SIGTERM (the wrapper's graceful stop) and SIGKILL (ray_jobs.py)
        env["RAY_JOB_STOP_WAIT_TIME_S"] = str(max(1, int(cfg.graceful_stop_s)))
        command = entrypoint(python_beside(cli), argv)
        # Ray never reuses a submission id: a later run of the job (after a node loss, a retry) gets its own
        sid = str(ctx.job.id) if ctx.job.attempts <= 1 else f"{ctx.job.id}.{ctx.job.attempts}"
        if nodes > 1:
            run: RayRun | RayGang = await self._submit_gang(ctx, sid, command, count, nodes, env, yaml_path.parent)
        else:
            run = await RayRun.submit(self.client, submission_id=sid, command=command, gpus=count, env=env,
                                      log_path=ctx.log_path, cwd=yaml_path.parent, node_id=self._node_of(ctx.gpus))
            write_atomic(ctx.dir / RAY_RECORD, json.dumps({"submission_ids": [sid]}))
        try:
            try:
                await run.started()
                self._say_where(ctx, run, sid, count)
                # RayRun has what _follow and _stop use of a TrainProcess (returncode, wait, stop)
                last = await self._follow(ctx, run, out)  # type: ignore[arg-type]
                rc = await run.wait()
            except asyncio.CancelledError:
                await self._stop(ctx, run, out)  # type: ignore[arg-type]
                raise
        finally:
            run.close()
            if not run.alive():
                (ctx.dir / RAY_RECORD).unlink(missing_ok=True)
        if run.node_lost:
            for node_id in self._lost_nodes(run):
                self.gpus.suspect(node_id)  # the job's next placement must not pick it again
            lost = ", ".join(sorted({n[:8] for n in self._lost_nodes(run)})) or run.node_id[:8]
            if ctx.job.attempts > NODE_LOSS_RETRIES:
                raise JobFailed(f"the Ray nodes running job {ctx.job.id} died {ctx.job.attempts} times "
                                f"({run.message[:160]}); check the cluster (`ftctl status`), then `ftctl retry "
                                f"{ctx.job.id}`")
            info = prepare_resume(out) if self.kind == "train" else None
            whence = info.checkpoint.name if info is not None and info.checkpoint is not None else "the start"
            raise JobInterrupted(f"Ray node {lost} left while job {ctx.job.id} ran ({run.message[:160]}); it runs "
                                 f"again from {whence} on the GPUs the scheduler finds", requeue=True)
        if rc != 0 and not run.exit_code and run.status == "FAILED":
            raise JobFailed(f"Ray could not run job {ctx.job.id}: {run.message[:300]}; see `ftctl logs "
                            f"{ctx.job.id}`")
        return self._result(ctx, out, rc, last)

    async def _submit_gang(self, ctx: JobContext, sid: str, command: str, count: int, nodes: int,
                           env: dict[str, str], cwd: Path) -> RayGang:
        """One Ray job per node the allocator chose, rank 0 first (daemon/cluster/gang.py)."""
        placed = self._nodes_of(ctx.gpus)
        if len(placed) != nodes:
            raise JobFailed(f"job {ctx.job.id} spans {nodes} nodes but its GPUs {ctx.gpus} are on {len(placed)} "
                            f"(a node left meanwhile?); `ftctl retry {ctx.job.id}`")
        port_file = cwd / f"master_port.{sid}"
        port_file.unlink(missing_ok=True)  # a rank must never read an earlier run's port
        sids = [sid if r == 0 else f"{sid}-rank{r}" for r in range(nodes)]
        write_atomic(ctx.dir / RAY_RECORD, json.dumps({"submission_ids": sids}))
        ranks: list[RayRun] = []
        try:
            for r, node in enumerate(placed):
                rank_env = {**env, "FORCE_TORCHRUN": "1", "NNODES": str(nodes), "NODE_RANK": str(r),
                            "NPROC_PER_NODE": str(max(1, count)), "MASTER_ADDR": placed[0].ip,
                            "FTMLLM_PORT_FILE": str(port_file)}
                log = ctx.log_path if r == 0 else ctx.log_path.with_name(f"rank{r}.log")
                ranks.append(await RayRun.submit(self.client, submission_id=sids[r], command=command, gpus=count,
                                                 env=rank_env, log_path=log, cwd=cwd, node_id=node.node_id))
        except BaseException:
            for rank in ranks:
                rank.close()
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.client.stop_job, rank.submission_id)
            raise
        return RayGang(ranks)

    def _say_where(self, ctx: JobContext, run: RayRun | RayGang, sid: str, count: int) -> None:
        if not run.node_id:
            return
        spec = ctx.job.spec
        gpus = f"{count} GPU{'s' if count != 1 else ''}" if count else "no GPU"
        if isinstance(run, RayGang):
            where = ",".join(n[:8] for n in run.node_ids)
            ctx.set_artifacts({"node": where})
            ctx.note(f"llamafactory-cli {spec['command']} started as Ray jobs {sid}, {sid}-rank1… on nodes {where} "
                     f"({gpus} each, torchrun over {len(run.ranks)} nodes; rank logs beside the job log)")
            return
        ctx.set_artifacts({"node": run.node_id[:8]})
        ctx.note(f"llamafactory-cli {spec['command']} started as Ray job {sid} on node {run.node_id[:8]} ({gpus})")

    @staticmethod
    def _lost_nodes(run: RayRun | RayGang) -> list[str]:
        ranks = run.ranks if isinstance(run, RayGang) else [run]
        return [r.node_id for r in ranks if r.node_lost]

    def _nodes_of(self, gpus: list[int]) -> list[RayNode]:
        """The distinct nodes of ``gpus``, in the order of their first GPU (rank 0 on the first)."""
        seen: dict[str, RayNode] = {}
        for g in sorted(gpus):
            node = self.gpus.node_of(g)
            if node is not None:
                seen.setdefault(node.node_id, node)
        return list(seen.values())

    def _node_of(self, gpus: list[int]) -> str | None:
        """The one node all the GPUs the allocator chose are on, else None (Ray places the job)."""
        nodes = {node.node_id for g in gpus if (node := self.gpus.node_of(g)) is not None}
        return nodes.pop() if len(nodes) == 1 and gpus else None

    async def _end_earlier_submission(self, ctx: JobContext) -> None:
        """A daemon that died left a Ray job of this ftmllm job running: stop it before running again."""
        record = ctx.dir / RAY_RECORD
        try:
            saved = json.loads(record.read_text())
            # "submission_id": what a daemon before multi-node jobs recorded
            sids = saved.get("submission_ids") or [saved["submission_id"]]
        except (OSError, ValueError, KeyError, AttributeError):
            return
        for sid in sids:
            try:
                stopped = await asyncio.to_thread(self.client.stop_job, sid)
            except Exception:  # already gone from Ray (the head restarted): nothing to stop
                stopped = False
            if stopped:
                ctx.note(f"stopped Ray job {sid}, which the previous daemon left running")
                deadline = asyncio.get_running_loop().time() + self.setup.settings.config.train.graceful_stop_s + 15
                while asyncio.get_running_loop().time() < deadline:
                    info = await asyncio.to_thread(self.client.get_job_info, sid)
                    if str(getattr(info.status, "value", info.status)) in ("SUCCEEDED", "FAILED", "STOPPED"):
                        break
                    await asyncio.sleep(0.5)
        record.unlink(missing_ok=True)
