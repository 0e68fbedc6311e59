"""The job kinds ``train``, ``eval`` and ``export``: one LLaMA-Factory run, from submit to its end.

* Submit: the ``--set`` keys are checked against the allow-list and the paths against what the caller may
  read (access.py: model roots, their own jobs' adapters, trusted models), then the template is rendered
  with the overrides and datasets and checked against LLaMA-Factory's own keys, templates, stages and the
  daemon's datasets (milliseconds, where the cli needs 15 s of imports to say the same). The frozen spec
  holds the template, the overrides, the rendered params and the YAML.
  Paths depend on the job id, so the spec is rendered once more when the job exists (``on_created``):
  everything the job writes lives under ``state_dir/jobs/<id>/`` (job.yaml, job.log, output/ or merged/).
* Run: ``llamafactory-cli train|export job.yaml`` in its own process group, its output appended to the
  job's log (what ``ftctl logs`` reads), never a pipe. The child's pid, group and start time are kept in
  ``trainer.json`` so a daemon that crashed can end the trainer it left behind.
* Progress: trainer_log.jsonl is polled; each new loss point is stored and published (``train.<id>``),
  the job's progress says step, loss and the trainer's own ETA.
* Cancel by a user: SIGABRT (LLaMA-Factory stops at the next step and saves the adapter), then SIGTERM,
  then SIGKILL; the history says what was saved. A daemon stop: SIGTERM at once, so the daemon stops
  quickly; the job becomes interrupted and resumes from its last checkpoint at the next start.
* Restart: the trainer a crashed daemon left running is ended, half-written checkpoints are removed and the
  run resumes from the last complete one (LLaMA-Factory does that itself with overwrite_output_dir off).
  A run that had finished while the daemon was down is taken as finished.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from daemon.children.env import child_environ
from daemon.children.landlock import wrap
from daemon.children.process import group_members
from daemon.children.record import reap_recorded, write_record
from daemon.core.atomic import write_atomic
from daemon.core.store import Store, UnknownJob
from daemon.engines.vlm.adapter_budget import budget_of, write_budget
from daemon.jobs.base import Caller, JobContext, JobFailed, Resources, SpecError
from daemon.train.access import Policy, override_problems, path_problems, yaml_problems
from daemon.train.catalogue import CACHE_DIR, CatalogueNotReady, Catalogues
from daemon.train.datasets import read_about
from daemon.train.failures import disk_free, explain_failure, read_log_tail
from daemon.train.from_pages import render_of
from daemon.train.launch import (
    MODEL_FILES,
    LaunchError,
    TrainProcess,
    any_present,
    build_argv,
    build_env,
    prepare_resume,
    resolve_cli,
    saved_state,
)
from daemon.train.progress import TRAINER_LOG, LossPoint, TrainerLogTail, seen_keys
from daemon.train.results import METRICS, PREDICT_RESULTS, ResultsMissing, read_eval_metrics
from daemon.train.sandbox import trainer_rules
from daemon.train.spec import RenderedSpec, SpecDefaults, render, tensorboard_command, user_yaml
from daemon.train.validate import KeyCatalog, check_spec, load_catalog
from shared.config import Settings
from shared.overrides import SpecProblem, parse_overrides
from shared.protocol import JobInfo, TrainPoint

KindName = Literal["train", "eval", "export"]
TRAIN_KINDS: tuple[KindName, ...] = ("train", "eval", "export")
TRAIN_LANE = "train"  # all three share the GPUs; the allocator (daemon/gpus/allocator.py) admits them
DEFAULT_TEMPLATE: dict[str, str] = {"eval": "qwen2vl_eval", "export": "qwen2vl_export"}
JOB_YAML = "job.yaml"
RECORD_FILE = "trainer.json"  # the running child (pid, pgid, start ticks), to end it after a daemon crash
PENDING_DIR = "new"  # the job dir a spec is rendered with before the job has an id
POLL_S = 0.1  # trainer_log.jsonl poll interval: a loss point reaches clients well under 500 ms
# keys the daemon takes from the train job an eval or export names with adapter_job, unless given
_FROM_TRAIN_JOB = ("model_name_or_path", "template")


def templates_dir_of(settings: Settings) -> Path:
    value = settings.config.train.templates_dir
    return Path(value).expanduser() if value else Path(__file__).resolve().parents[2] / "configs" / "llamafactory"


def datasets_dir_of(settings: Settings) -> Path:
    value = settings.config.train.datasets_dir
    return Path(value).expanduser() if value else settings.paths.state_dir / "datasets"


class TrainRequest(msgspec.Struct, forbid_unknown_fields=True):
    """What a client submits (ftctl train/eval/export, ftui's training form)."""

    template: str = ""
    set: dict[str, Any] | list[str] = {}  # overrides: {"key": value} or ["key=value", …]
    dataset: str | list[str] = []
    gpus: int = 1
    min_free_gib: float = 0.0
    adapter_job: int | None = None  # eval/export: the train job whose adapter (and base model) to use
    yaml: str = ""  # instead of a template: the user's own LLaMA-Factory YAML, read by the client (spec.user_yaml)
    yaml_name: str = ""  # its file name, for messages
    nodes: int = 1  # train on the ray backend: torchrun over this many nodes, `gpus` on each


REQUEST_KEYS = "template, set, dataset, gpus, min_free_gib, adapter_job, yaml, yaml_name, nodes"


@dataclass
class TrainSetup:
    """What the three kinds share: config, catalog, where things live, and the children now running."""

    settings: Settings
    store: Store
    catalog: KeyCatalog
    templates_dir: Path
    datasets_dir: Path
    jobs_dir: Path
    processes: dict[int, TrainProcess] = field(default_factory=dict)
    catalogues: Catalogues | None = None  # the catalogue of the configured LLaMA-Factory (catalogue.py)

    @classmethod
    def create(cls, settings: Settings, store: Store) -> TrainSetup:
        return cls(settings=settings, store=store, catalog=load_catalog(), templates_dir=templates_dir_of(settings),
                   datasets_dir=datasets_dir_of(settings), jobs_dir=settings.paths.state_dir / "jobs",
                   catalogues=Catalogues(settings.paths.state_dir / CACHE_DIR))

    async def refresh_catalog(self) -> None:
        """Before a submit is checked: the catalogue of the LLaMA-Factory train.llamafactory_cli runs now."""
        if self.catalogues is None:
            return
        cfg = self.settings.config.train
        try:
            self.catalog = await asyncio.to_thread(self.catalogues.current, cfg.llamafactory_cli,
                                                   child_environ(os.environ, cfg.env))
        except CatalogueNotReady as exc:
            raise SpecError(str(exc)) from None

    def policy(self) -> Policy:
        """What members may point jobs at (access.py), from the config of this daemon."""
        return Policy.from_config(self.settings.config.train, jobs_dir=self.jobs_dir,
                                  deepspeed_dir=self.templates_dir.parent / "deepspeed")

    def job_or_none(self, job_id: int) -> JobInfo | None:
        try:
            return self.store.get_job(job_id)
        except UnknownJob:
            return None

    def defaults(self) -> SpecDefaults:
        cfg = self.settings.config.train
        return SpecDefaults(save_total_limit=cfg.save_total_limit, logging_steps=cfg.logging_steps)

    def pids(self, job_id: int) -> list[int]:
        """The running processes of a job's trainer (torchrun starts one per GPU)."""
        proc = self.processes.get(job_id)
        return group_members(proc.pgid) if proc is not None else []


class LlamaFactoryKind:
    """One of ``train``, ``eval``, ``export`` (see the module docstring)."""

    max_nodes = 1  # one machine; the ray backend's train kind spans nodes (daemon/cluster/train.py)

    def __init__(self, kind: KindName, setup: TrainSetup) -> None:
        self.kind: str = kind
        self.setup = setup

    # ------------------------------------------------------------------------------------------- submit

    async def validate(self, spec: dict[str, Any], caller: Caller) -> tuple[str, dict[str, Any]]:
        await self.setup.refresh_catalog()
        req, frozen, rendered = self._render(spec, self.setup.jobs_dir / PENDING_DIR, caller)
        # before anything stats the files: a path the caller may not read is not looked into
        refused = path_problems(rendered.params, policy=self.setup.policy(), caller=caller,
                                job_of=self.setup.job_or_none)
        if refused:
            raise SpecError("; ".join(refused))
        try:
            resolve_cli(self.setup.settings.config.train.llamafactory_cli)
        except LaunchError as exc:
            raise SpecError(str(exc)) from None
        try:
            # reading dataset_info.json and stat-ing media files may take a few hundred ms on big datasets
            await asyncio.to_thread(check_spec, rendered, catalog=self.setup.catalog,
                                    dataset_dir=self.setup.datasets_dir,
                                    env=child_environ(os.environ, self.setup.settings.config.train.env))
        except SpecProblem as exc:
            raise SpecError(_problems_text(exc)) from None
        return _display_name(self.kind, req, frozen), frozen

    def on_created(self, job: JobInfo) -> dict[str, Any]:
        """The job has its id: render again with its own directory and write the frozen job.yaml there."""
        job_dir = self.setup.jobs_dir / str(job.id)
        _req, frozen, rendered = self._render(job.spec["request"], job_dir)
        write_atomic(job_dir / JOB_YAML, rendered.yaml_text, mode=0o600)
        return frozen

    def _render(self, spec: Mapping[str, Any], job_dir: Path, caller: Caller | None = None,
                ) -> tuple[TrainRequest, dict[str, Any], RenderedSpec]:
        """``caller``: who submits, whose --set keys and adapter job are checked; None once the job exists
        (checked at submit, rendered again only for its own directory)."""
        try:
            req = msgspec.convert(dict(spec), TrainRequest)
        except msgspec.ValidationError as exc:
            raise SpecError(f"{self.kind} spec: {exc}; the keys are {REQUEST_KEYS}") from None
        base: dict[str, Any] | None = None
        if req.yaml:
            if req.template:
                raise SpecError(f"give a template or a YAML, not both (template '{req.template}', YAML "
                                f"{req.yaml_name or '(unnamed)'})")
            template = req.yaml_name or "job.yaml"
            try:
                base = user_yaml(req.yaml, template)
            except SpecProblem as exc:
                raise SpecError(_problems_text(exc)) from None
        else:
            template = req.template or DEFAULT_TEMPLATE.get(self.kind, "")
        if not template:
            raise SpecError(f"name a template: `ftctl {self.kind} TEMPLATE` (`ftctl templates` lists them)")
        if req.gpus < 0:
            raise SpecError(f"gpus must be 0 or more (got {req.gpus}); use --gpus N")
        self._check_nodes(req)
        try:
            overrides = parse_overrides(req.set) if isinstance(req.set, list) else dict(req.set)
        except SpecProblem as exc:
            raise SpecError(_problems_text(exc)) from None
        datasets = [req.dataset] if isinstance(req.dataset, str) else list(req.dataset)
        datasets = [d for d in datasets if d]
        refused = [] if caller is None else override_problems(overrides, self.setup.policy(),
                                                               self.setup.catalog.keys.keys())
        if base is not None and caller is not None:
            refused += yaml_problems(base, self.setup.policy(), self.setup.catalog.keys.keys(), template)
        if req.adapter_job is not None:
            overrides = {**self._from_train_job(req.adapter_job, caller), **overrides}
        pages_budget = self._pages_budget(datasets)
        if pages_budget is not None and "image_max_pixels" not in {**(base or {}), **overrides}:
            # pages built by from-pages are rendered at the serving budget: train (and eval) at it too (unless
            # the job says otherwise, in --set or its own YAML)
            overrides = {**overrides, "image_max_pixels": pages_budget}
        try:
            rendered = render(template, templates_dir=self.setup.templates_dir, job_dir=job_dir,
                              dataset_dir=self.setup.datasets_dir, overrides=overrides, datasets=datasets,
                              gpus=req.gpus, defaults=self.setup.defaults(), base=base)
        except SpecProblem as exc:
            raise SpecError("; ".join([*exc.problems, *refused])) from None
        if refused:
            raise SpecError("; ".join(refused))
        if rendered.kind != self.kind and base is not None:
            raise SpecError(f"{template} is {_article(rendered.kind)} {rendered.kind} config, not "
                            f"{_article(self.kind)} {self.kind} one; submit it with `ftctl {rendered.kind} --yaml "
                            f"{template}`")
        if rendered.kind != self.kind:
            raise SpecError(f"template '{template}' is {_article(rendered.kind)} {rendered.kind} template, not "
                            f"{_article(self.kind)} {self.kind} one; submit it with `ftctl {rendered.kind} {template}`")
        frozen: dict[str, Any] = {
            "request": msgspec.to_builtins(req),
            "template": template,
            "overrides": overrides,
            "datasets": list(rendered.datasets),
            "gpus": req.gpus,
            "nodes": req.nodes,
            "min_free_gib": req.min_free_gib,
            "command": rendered.command,
            "params": rendered.params,
            "yaml": rendered.yaml_text,
            "output_dir": str(rendered.output_dir),
            "env": rendered.env,
        }
        if req.adapter_job is not None:
            frozen["adapter_job"] = req.adapter_job
        return req, frozen, rendered

    def _check_nodes(self, req: TrainRequest) -> None:
        if req.nodes == 1:
            return
        if req.nodes < 1:
            raise SpecError(f"nodes must be 1 or more (got {req.nodes}); use --nodes N")
        if self.max_nodes == 1:
            raise SpecError(f"--nodes {req.nodes}: this daemon trains on one machine; spanning nodes needs "
                            "[cluster] backend = \"ray\" (README \"Beyond one machine\"), or drop --nodes")
        if self.kind != "train":
            raise SpecError(f"--nodes {req.nodes}: only train jobs span nodes; run the {self.kind} on one node "
                            "(drop --nodes)")
        if req.gpus < 1:
            raise SpecError(f"--nodes {req.nodes} needs --gpus 1 or more (GPUs on each node)")
        if req.nodes > self.max_nodes:
            raise SpecError(f"--nodes {req.nodes} is more than the {self.max_nodes} a job may span; lower it")

    def _pages_budget(self, datasets: list[str]) -> int | None:
        """The largest pixel cap the from-pages datasets among ``datasets`` were rendered with (None: none is
        one): a page image LLaMA-Factory would shrink again is not the page serving sends."""
        caps = []
        for name in datasets:
            how = render_of(read_about(self.setup.datasets_dir, name)) or {}
            if isinstance(how.get("max_pixels"), int):
                caps.append(int(how["max_pixels"]))
        return max(caps) if caps else None

    def _from_train_job(self, job_id: int, caller: Caller | None) -> dict[str, Any]:
        try:
            job = self.setup.store.get_job(job_id)
        except UnknownJob as exc:
            raise SpecError(f"adapter job: {exc}") from None
        if caller is not None and job.owner != caller.user and not caller.is_admin:
            raise SpecError(f"{caller.user} cannot use the adapter of job {job_id}: it belongs to {job.owner}; name "
                            f"one of your own train jobs (`ftctl jobs`), or ask {job.owner} or an admin")
        if job.kind != "train":
            raise SpecError(f"job {job_id} is {_article(job.kind)} {job.kind} job; name a train job whose adapter "
                            "to use (or give --set adapter_name_or_path=DIR)")
        out = Path(str(job.spec.get("output_dir", "")))
        if not saved_state(out).adapter:
            state = f"it is {job.state}" if job.state != "succeeded" else "it saved no adapter"
            raise SpecError(f"job {job_id} has no adapter in {out} ({state}); wait for it to finish or name "
                            "another job")
        params = job.spec.get("params", {})
        taken = {k: params[k] for k in _FROM_TRAIN_JOB if params.get(k) is not None}
        return {**taken, "adapter_name_or_path": str(out)}

    def resources(self, job: JobInfo) -> Resources:
        nodes = int(job.spec.get("nodes", 1))
        return Resources(lane=TRAIN_LANE, gpus=int(job.spec.get("gpus", 1)) * nodes,
                         min_free_gib=float(job.spec.get("min_free_gib", 0.0)), nodes=nodes)

    def resumable(self, job: JobInfo) -> bool:
        return True  # train continues from its last checkpoint; eval and export simply run again

    # ---------------------------------------------------------------------------------------------- run

    async def run(self, ctx: JobContext) -> str:
        cfg = self.setup.settings.config.train
        spec = ctx.job.spec
        out = Path(spec["output_dir"])
        yaml_path = ctx.dir / JOB_YAML
        if not yaml_path.is_file():
            write_atomic(yaml_path, spec["yaml"], mode=0o600)
        try:
            cli = resolve_cli(cfg.llamafactory_cli)
            argv = build_argv(cli, spec["command"], yaml_path)
        except LaunchError as exc:
            raise JobFailed(str(exc)) from None
        finished = await self._before_start(ctx, out)
        if finished is not None:
            return finished
        env = build_env(base=os.environ, gpus=ctx.gpus, extra=cfg.env, spec_env=spec.get("env", {}),
                        deepspeed=bool(spec["params"].get("deepspeed")))
        # LLaMA-Factory starts several GPUs (and DeepSpeed) as `torchrun`, looked up on PATH: the one beside
        # its cli, though the daemon's PATH may not hold that venv
        env["PATH"] = os.pathsep.join([str(Path(cli).parent), env.get("PATH", os.defpath)])
        # Landlock: the trainer reads only what its job names and writes only its own folder (sandbox.py)
        rules = trainer_rules(cli=cli, job_dir=ctx.dir, params=spec["params"], policy=self.setup.policy(),
                              datasets_dir=self.setup.datasets_dir, env=env)
        env.update(rules.env)
        argv = wrap(argv, read=rules.read, write=rules.write, tmp=rules.tmp)
        try:
            proc = TrainProcess.start(argv, env, log_path=ctx.log_path, cwd=ctx.dir)
        except LaunchError as exc:
            raise JobFailed(str(exc)) from None
        record = ctx.dir / RECORD_FILE
        write_record(record, proc.record)
        self.setup.processes[ctx.job.id] = proc
        where = f"GPUs {','.join(map(str, ctx.gpus))}" if ctx.gpus else "the CPU"
        ctx.note(f"llamafactory-cli {spec['command']} started on {where} (pid {proc.pid})")
        tensorboard = tensorboard_command(spec.get("env", {}))
        if tensorboard:
            ctx.note(f"TensorBoard logs (report_to: tensorboard): {tensorboard}")
        try:
            try:
                last = await self._follow(ctx, proc, out)
                rc = await proc.wait()
            except asyncio.CancelledError:
                await self._stop(ctx, proc, out)
                raise
        finally:
            self.setup.processes.pop(ctx.job.id, None)
            if not proc.alive():
                record.unlink(missing_ok=True)
        return self._result(ctx, out, rc, last)

    async def _before_start(self, ctx: JobContext, out: Path) -> str | None:
        """Clean up after an earlier attempt. Returns the summary if that attempt had already finished."""
        left = await asyncio.to_thread(reap_recorded, ctx.dir / RECORD_FILE,
                                       self.setup.settings.config.train.stop_term_s)
        if left is not None:
            ctx.note(f"ended the trainer the previous daemon left running (pid {left.pid})")
        if not out.exists():
            return None
        if self.kind == "train":
            state = saved_state(out)
            if state.finished:
                # it finished while the daemon was down: take its points and results as they are
                self._report(ctx, TrainerLogTail(out / TRAINER_LOG, seen=self._seen(ctx)).poll())
                ctx.note("the trainer had finished while the daemon was down")
                return self._result(ctx, out, 0, None)
            info = prepare_resume(out)
            if info.checkpoint is not None:
                step = info.checkpoint.name.removeprefix("checkpoint-")
                total = state.max_steps or ctx.job.spec["params"].get("max_steps") or "?"
                ctx.note(f"resuming from {info.checkpoint.name} (step {step} of {total})")
                return None
            # no checkpoint: a graceful stop's adapter in output_dir would make LLaMA-Factory refuse the
            # directory, so the earlier output is kept aside and training starts over
            aside = out.with_name(out.name + ".previous")
            shutil.rmtree(aside, ignore_errors=True)
            out.rename(aside)
            ctx.note(f"no checkpoint to resume from: training starts over (the earlier output is in {aside})")
            return None
        shutil.rmtree(out, ignore_errors=True)
        ctx.note(f"{self.kind} runs again from the start ({self.kind} jobs cannot resume half-way)")
        return None

    def _seen(self, ctx: JobContext) -> set[tuple[int, Any]]:
        return seen_keys(self.setup.store.train_points(ctx.job.id))

    async def _follow(self, ctx: JobContext, proc: TrainProcess, out: Path) -> LossPoint | None:
        """Report loss points until the trainer exits; returns the last training point."""
        if self.kind == "export":
            ctx.progress(0, 0, "", note="merging the adapter into the model")
            await proc.wait()
            return None
        tail = TrainerLogTail(out / TRAINER_LOG, seen=self._seen(ctx))
        last: LossPoint | None = None
        while True:
            exited = proc.returncode is not None
            points = tail.poll()
            if points:
                last = self._report(ctx, points) or last
            if exited:
                return last
            await asyncio.sleep(POLL_S)

    def _report(self, ctx: JobContext, points: list[LossPoint]) -> LossPoint | None:
        now = time.time()
        stored = [TrainPoint(job_id=ctx.job.id, step=p.step, total_steps=p.total_steps, loss=p.loss, lr=p.lr,
                             eval_loss=p.eval_loss, epoch=p.epoch, percentage=p.percentage, elapsed_s=p.elapsed_s,
                             remaining_s=p.remaining_s, ts=now)
                  for p in points if p.kind != "progress"]
        if stored:
            ctx.add_train_points(stored)
        if not points:
            return None
        p = points[-1]
        train = [q for q in points if q.loss is not None]
        if self.kind == "eval":
            note = f"predicting: batch {p.step} of {p.total_steps}"
            ctx.progress(p.step, p.total_steps, "batches", note=note, eta_s=p.remaining_s)
        else:
            loss = f", loss {train[-1].loss:.4g}" if train else ""
            ctx.progress(p.step, p.total_steps, "steps", note=f"step {p.step}/{p.total_steps}{loss}",
                         eta_s=p.remaining_s)
        return train[-1] if train else None

    async def _stop(self, ctx: JobContext, proc: TrainProcess, out: Path) -> None:
        """The job's task was cancelled: by a user (stop gracefully, save what can be saved) or by the daemon
        stopping (end the trainer quickly; the job resumes from its last checkpoint at the next start)."""
        cfg = self.setup.settings.config.train
        reason = ctx.cancel_reason()
        try:
            if reason:
                ctx.log(f"{reason}: asking the trainer to stop at its next step and save (up to "
                        f"{cfg.graceful_stop_s:.0f}s)")
                outcome = await proc.stop(graceful_s=cfg.graceful_stop_s, term_s=cfg.stop_term_s)
                if self.kind == "train":
                    state = saved_state(out)
                    if state.adapter:
                        self._record_budget(ctx, out)
                    ctx.set_artifacts(_train_artifacts(out, state.adapter, state.describe(),
                                                       state.last_checkpoint))
                    what = state.describe()
                else:
                    what = "nothing kept" if self.kind == "export" else "no metrics (the run did not finish)"
                ctx.note(f"trainer stopped ({_how(outcome.how)} after {outcome.seconds:.1f}s): {what}")
            else:
                await proc.stop(graceful_s=0, term_s=cfg.stop_term_s)
                checkpoint = saved_state(out).last_checkpoint if self.kind == "train" else None
                whence = checkpoint.name if checkpoint is not None else "the start"
                ctx.note(f"trainer stopped for the daemon's shutdown; it resumes from {whence} at the next start")
        except asyncio.CancelledError:
            # cancelled again while stopping (the daemon is going down): end the group now; the next start
            # ends whatever is left (the record file stays)
            proc.signal_group(signal.SIGTERM)
            raise

    def _result(self, ctx: JobContext, out: Path, rc: int, last: LossPoint | None) -> str:
        if rc != 0:
            raise JobFailed(self._explain(ctx, out, rc))
        if self.kind == "train":
            state = saved_state(out)
            if not (state.adapter or state.model):
                raise JobFailed(f"llamafactory-cli ended without saving a model or adapter in {out}; see "
                                f"`ftctl logs {ctx.job.id}`")
            if state.adapter:
                self._record_budget(ctx, out)
            ctx.set_artifacts(_train_artifacts(out, state.adapter, state.describe(), state.last_checkpoint))
            points = self.setup.store.train_points(ctx.job.id)
            losses = [p for p in points if p.loss is not None]
            final = f"; final loss {losses[-1].loss:.4g} at step {losses[-1].step}" if losses else ""
            return state.describe() + final
        if self.kind == "eval":
            try:
                metrics = read_eval_metrics(out)
            except ResultsMissing as exc:
                raise JobFailed(str(exc)) from None
            ctx.set_artifacts({"output_dir": str(out), "predict_results": str(out / PREDICT_RESULTS),
                               "predictions": str(out / "generated_predictions.jsonl")})
            shown = [f"{label} {metrics[key]:.4g}" for label, key, _fmt in METRICS[:4] if key in metrics]
            return "metrics: " + (", ".join(shown) or f"none of BLEU/ROUGE in {out / PREDICT_RESULTS}")
        if not any_present(out, MODEL_FILES):
            raise JobFailed(f"llamafactory-cli export ended without writing a model into {out}; see "
                            f"`ftctl logs {ctx.job.id}`")
        ctx.set_artifacts({"merged": str(out)})
        return f"merged model in {out}"

    def _record_budget(self, ctx: JobContext, out: Path) -> None:
        """Beside the adapter: the image budget it was trained with, and how its from-pages datasets were
        rendered, so that deploy can check the engine serves its pages at the resolution it learned
        (adapter_budget.py)."""
        rendered: dict[str, dict[str, Any]] = {}
        for name in ctx.job.spec.get("datasets", ()):
            how = render_of(read_about(self.setup.datasets_dir, name))
            if how is not None:
                rendered[name] = how
        budget = budget_of(ctx.job.spec.get("params", {}), rendered)
        try:
            write_budget(out, budget)
        except OSError as exc:  # the adapter is still good; deploy then says no budget was recorded
            ctx.log(f"could not record the adapter's image budget in {out}: {exc}")

    def _explain(self, ctx: JobContext, out: Path, rc: int) -> str:
        points = self.setup.store.train_points(ctx.job.id)
        failure = explain_failure(read_log_tail(ctx.log_path), params=ctx.job.spec.get("params", {}), gpus=ctx.gpus,
                                  last_step=points[-1].step if points else None, returncode=rc,
                                  disk_free_bytes=disk_free(out))
        return failure.message


def _train_artifacts(out: Path, adapter: bool, saved: str, checkpoint: Path | None) -> dict[str, str]:
    arts = {"output_dir": str(out), "saved": saved}
    if adapter:
        arts["adapter"] = str(out)
    if checkpoint is not None:
        arts["checkpoint"] = str(checkpoint)
    return arts


def _display_name(kind: str, req: TrainRequest, frozen: Mapping[str, Any]) -> str:
    data = ",".join(frozen["datasets"])
    source = f"job {req.adapter_job}" if req.adapter_job is not None else (
        Path(str(frozen["params"].get("adapter_name_or_path", ""))).name or "base model")
    if kind == "train":
        return f"{frozen['template']} on {data}" if data else str(frozen["template"])
    if kind == "eval":
        return f"eval {source} on {data}" if data else f"eval {source}"
    return f"export {source}"


def _problems_text(exc: SpecProblem) -> str:
    return "; ".join(exc.problems)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _how(how: str) -> str:
    return {"graceful": "gracefully", "terminated": "with SIGTERM", "killed": "with SIGKILL",
            "already_exited": "it had already exited"}.get(how, how)
