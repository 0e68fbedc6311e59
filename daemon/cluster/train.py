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
* A node that dies under a train job: the job resumes from its last complete checkpoint on another node, up
  to :data:`NODE_LOSS_RETRIES` times, as one ftmllm job (its history says so).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from daemon.cluster.ray_jobs import RayRun, entrypoint, python_beside
from daemon.core.atomic import write_atomic
from daemon.gpus.ray_source import RayGpus
from daemon.jobs.base import JobContext, JobFailed
from daemon.train.kind import JOB_YAML, KindName, LlamaFactoryKind, TrainSetup
from daemon.train.launch import LaunchError, build_argv, build_env, prepare_resume, resolve_cli

RAY_RECORD = "ray_job.json"  # the Ray submission a run made, to stop it if the daemon died meanwhile
NODE_LOSS_RETRIES = 2


class RayTrainKind(LlamaFactoryKind):
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
        env = build_env(base={}, gpus=count, extra=cfg.env, spec_env=spec.get("env", {}),
                        deepspeed=bool(spec["params"].get("deepspeed")))
        # Ray's wait between its SIGTERM (the wrapper's graceful stop) and SIGKILL (ray_jobs.py)
        env["RAY_JOB_STOP_WAIT_TIME_S"] = str(max(1, int(cfg.graceful_stop_s)))
        command = entrypoint(python_beside(cli), argv)
        pin = self._node_of(ctx.gpus)
        for n in range(NODE_LOSS_RETRIES + 1):
            sid = str(ctx.job.id) if ctx.job.attempts <= 1 and n == 0 else f"{ctx.job.id}.{ctx.job.attempts}.{n}"
            run = await RayRun.submit(self.client, submission_id=sid, command=command, gpus=count, env=env,
                                      log_path=ctx.log_path, cwd=yaml_path.parent, node_id=pin)
            write_atomic(ctx.dir / RAY_RECORD, json.dumps({"submission_id": sid}))
            try:
                try:
                    await run.started()
                    if run.node_id:
                        ctx.set_artifacts({"node": run.node_id[:8]})
                        gpus = f"{count} GPU{'s' if count != 1 else ''}" if count else "no GPU"
                        ctx.note(f"llamafactory-cli {spec['command']} started as Ray job {sid} on node "
                                 f"{run.node_id[:8]} ({gpus})")
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
            if run.node_lost and n < NODE_LOSS_RETRIES:
                info = prepare_resume(out) if self.kind == "train" else None
                whence = info.checkpoint.name if info is not None and info.checkpoint is not None else "the start"
                ctx.note(f"Ray node {run.node_id[:8]} left while job {ctx.job.id} ran ({run.message[:160]}); "
                         f"it runs again from {whence} on another node")
                pin = None
                continue
            if run.node_lost:
                raise JobFailed(f"the Ray nodes running job {ctx.job.id} died {n + 1} times ({run.message[:160]}); "
                                f"check the cluster (`ftctl status`), then `ftctl retry {ctx.job.id}`")
            if rc != 0 and not run.exit_code and run.status == "FAILED":
                raise JobFailed(f"Ray could not run job {ctx.job.id}: {run.message[:300]}; see `ftctl logs "
                                f"{ctx.job.id}`")
            return self._result(ctx, out, rc, last)
        raise AssertionError("unreachable")

    def _node_of(self, gpus: list[int]) -> str | None:
        """The one node all the GPUs the allocator chose are on, else None (Ray places the job)."""
        nodes = {node.node_id for g in gpus if (node := self.gpus.node_of(g)) is not None}
        return nodes.pop() if len(nodes) == 1 and gpus else None

    async def _end_earlier_submission(self, ctx: JobContext) -> None:
        """A daemon that died left a Ray job of this ftmllm job running: stop it before running again."""
        record = ctx.dir / RAY_RECORD
        try:
            sid = json.loads(record.read_text())["submission_id"]
        except (OSError, ValueError, KeyError):
            return
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
