"""Render a LLaMA-Factory job spec: a template from configs/llamafactory/ (or the user's own LLaMA-Factory YAML,
``ftctl train --yaml my.yaml``) + ``key=value`` overrides + dataset.

The daemon owns where a job writes, so some keys are forced and the user may not set them (``output_dir``
per job under the state dir, ``overwrite_output_dir: false`` so a restarted job resumes from its last
checkpoint, ``dataset_dir`` = the daemon's datasets); a user's YAML may hold them (every LLaMA-Factory example
does) and they are replaced, as a template's are. ``report_to`` is ``none`` unless the spec asks for
``tensorboard``, whose logs go into the job's folder (``tensorboard/``); integrations that send metrics off
the server (wandb, mlflow, …) are refused. Others get a daemon default the user may change
(``logging_steps``; ``save_total_limit``, capped so checkpoints cannot fill the disk). The result is frozen
YAML text, stored with the job and run as is. Which ``--set`` keys a member may give, and which paths a job
may name, is access.py's: the daemon checks both at submit.

Nothing here imports LLaMA-Factory: rendering and validation (validate.py) take milliseconds.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from shared.overrides import SpecProblem, parse_overrides

JobKind = Literal["train", "eval", "export"]
CliCommand = Literal["train", "export"]

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_YAML_BYTES = 256 * 1024  # a LLaMA-Factory config is a few dozen lines
TENSORBOARD_DIR = "tensorboard"  # in the job's folder, beside output/ (LLaMA-Factory refuses a full output_dir)
TENSORBOARD_ENV = "TENSORBOARD_LOGGING_DIR"  # transformers' TensorBoardCallback writes there
REPORT_TO = ("none", "tensorboard")  # what stays on this server


@dataclass(frozen=True)
class SpecDefaults:
    """What the daemon sets on every job (from the ``[train]`` config section)."""

    save_total_limit: int = 3  # also the cap on what a user may ask for
    logging_steps: int = 1  # one loss point per optimizer step: the client's chart is live


@dataclass(frozen=True)
class RenderedSpec:
    template: str
    kind: JobKind
    command: CliCommand  # `llamafactory-cli <command> job.yaml`
    params: dict[str, Any]
    yaml_text: str
    output_dir: Path  # output_dir (train, eval) or export_dir (export)
    datasets: tuple[str, ...]
    gpus: int
    env: dict[str, str] = field(default_factory=dict)  # env the child needs for this spec (graceful stop)

    @property
    def stage(self) -> str | None:
        stage = self.params.get("stage")
        return str(stage) if stage is not None else None

    @property
    def max_steps(self) -> int | None:
        """The requested optimizer steps, when the spec fixes them (else epochs decide)."""
        value = self.params.get("max_steps")
        return int(value) if isinstance(value, int) and value > 0 else None


def template_names(templates_dir: Path) -> list[str]:
    return sorted(p.stem for p in templates_dir.glob("*.yaml"))


def load_template(templates_dir: Path, name: str) -> dict[str, Any]:
    path = templates_dir / f"{name}.yaml"
    if not _KEY_RE.match(name.replace(".", "_").replace("-", "_")) or not path.is_file():
        names = template_names(templates_dir)
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise SpecProblem([f"unknown template '{name}': {hint}choose one of {', '.join(names) or '(none)'} "
                           f"in {templates_dir}"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SpecProblem([f"{path}: not valid YAML ({_one_line(exc)}); fix the template"]) from None
    if not isinstance(data, dict):
        raise SpecProblem([f"{path}: a template must be a YAML mapping of LLaMA-Factory keys; fix the template"])
    return data


def user_yaml(text: str, name: str) -> dict[str, Any]:
    """A user's LLaMA-Factory YAML (what `llamafactory-cli train my.yaml` reads) as params. A key set to null
    means LLaMA-Factory's default, so it is dropped, as if absent."""
    if len(text.encode("utf-8", errors="replace")) > MAX_YAML_BYTES:
        raise SpecProblem([f"{name}: larger than {MAX_YAML_BYTES // 1024} KiB, which no LLaMA-Factory config is; "
                           "give the YAML you would pass to `llamafactory-cli train`"])
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecProblem([f"{name}: not valid YAML ({_one_line(exc)}); fix the file"]) from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise SpecProblem([f"{name}: a LLaMA-Factory config is a YAML mapping of keys (as for `llamafactory-cli "
                           f"train {name}`); fix the file"])
    return {k: v for k, v in data.items() if v is not None}


def report_to(value: Any) -> tuple[str, str | None]:
    """``report_to`` as the job runs it ("none" or "tensorboard"), and a problem line for anything else."""
    names = [] if value is None else [value] if isinstance(value, str) else value if isinstance(value, list) \
        else [value]
    names = [str(n).strip() for part in names for n in str(part).split(",") if str(n).strip()]
    refused = [n for n in names if n not in REPORT_TO]
    if refused:
        what = ("every installed integration, wandb and mlflow included," if "all" in refused
                else f"{', '.join(refused)}")
        return "none", (f"report_to {', '.join(refused)}: {what} would send the training metrics and config off "
                        "this server as the daemon's user; use report_to: tensorboard (logs stay in the job's "
                        "folder) or none")
    return ("tensorboard" if "tensorboard" in names else "none"), None


def tensorboard_command(env: Mapping[str, str]) -> str | None:
    """The command that shows a job's TensorBoard logs (`ftctl show`), if it writes any."""
    folder = env.get(TENSORBOARD_ENV)
    return f"tensorboard --logdir {folder}" if folder else None


def job_kind(template: Mapping[str, Any]) -> JobKind:
    """A template that exports (any ``export_*`` key) runs `llamafactory-cli export`; one that predicts
    without training is an eval; everything else trains."""
    if any(str(k).startswith("export_") for k in template):
        return "export"
    if (template.get("do_predict") or template.get("do_eval")) and not template.get("do_train"):
        return "eval"
    return "train"


def render(
    template: str,
    *,
    templates_dir: Path,
    job_dir: Path,
    dataset_dir: Path,
    overrides: Mapping[str, Any] | Iterable[str] = (),
    datasets: Sequence[str] = (),
    gpus: int = 1,
    defaults: SpecDefaults = SpecDefaults(),
    base: Mapping[str, Any] | None = None,
) -> RenderedSpec:
    """Template + overrides + dataset → the frozen job. ``job_dir`` is this job's directory under the
    state dir; LLaMA-Factory writes into ``job_dir/output`` (or ``job_dir/merged`` for an export), which
    must hold nothing else: LLaMA-Factory refuses a non-empty output_dir without a checkpoint in it.
    ``base``: the user's own YAML (:func:`user_yaml`) instead of a template; ``template`` is then its name."""
    params = dict(base) if base is not None else load_template(templates_dir, template)
    given = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    kind = job_kind(params)
    problems: list[str] = []
    forced = _forced_keys(kind)
    for key in given:
        if key in forced:
            problems.append(f"{key} is set by the daemon ({forced[key]}); remove --set {key}")
    asked_limit = given.get("save_total_limit")
    if kind != "export" and isinstance(asked_limit, int) and asked_limit > defaults.save_total_limit:
        problems.append(f"save_total_limit {asked_limit} is above this server's limit of "
                        f"{defaults.save_total_limit} checkpoints per job; use {defaults.save_total_limit} or less")
    if gpus < 0:
        problems.append(f"gpus must be 0 or more (got {gpus}); use --gpus N")
    names = tuple(n for d in datasets for n in (s.strip() for s in d.split(",")) if n)
    if kind == "export" and names:
        problems.append("an export job merges an adapter and reads no dataset; remove --dataset")
    if problems:
        raise SpecProblem(problems)

    for key, value in given.items():
        if value is None:
            params.pop(key, None)
        else:
            params[key] = value
    if names:
        params["eval_dataset" if kind == "eval" else "dataset"] = ",".join(names)
    ds = params.get("deepspeed")
    if isinstance(ds, str) and ds:
        params["deepspeed"] = str(_resolve_deepspeed(ds, templates_dir.parent / "deepspeed"))

    replaced = sorted(k for k in forced if base is not None and k in base)
    if kind == "export":
        out = job_dir / "merged"
        params["export_dir"] = str(out)
        env: dict[str, str] = {}
    else:
        out = job_dir / "output"
        reporting, problem = report_to(params.get("report_to", "none"))
        if problem:
            raise SpecProblem([problem])
        limit = params.get("save_total_limit")
        if not isinstance(limit, int) or limit <= 0 or limit > defaults.save_total_limit:
            params["save_total_limit"] = defaults.save_total_limit
        params.setdefault("logging_steps", defaults.logging_steps)
        params["output_dir"] = str(out)
        params["overwrite_output_dir"] = False
        params["report_to"] = reporting
        params["dataset_dir"] = str(dataset_dir)
        # LLaMA-Factory's LogCallback installs its SIGABRT handler (stop at the next step and save) only
        # in LlamaBoard mode; the workdir is where that mode writes its running log.
        env = {"LLAMABOARD_ENABLED": "1", "LLAMABOARD_WORKDIR": str(out)}
        if reporting == "tensorboard":
            env[TENSORBOARD_ENV] = str(job_dir / TENSORBOARD_DIR)

    ds_key = "eval_dataset" if kind == "eval" else "dataset"
    final_names = tuple(n.strip() for n in str(params.get(ds_key) or "").split(",") if n.strip())
    source = f"your YAML {template}" if base is not None else f"template {template}"
    header = (f"# ftmllm job: {source} ({kind}), gpus {gpus}\n"
              f"# overrides: {', '.join(f'{k}={v}' for k, v in given.items()) or '(none)'}\n")
    if replaced:
        header += f"# set by the daemon instead of the YAML's own: {', '.join(replaced)}\n"
    text = header + yaml.safe_dump(params, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return RenderedSpec(template=template, kind=kind, command="export" if kind == "export" else "train",
                        params=params, yaml_text=text, output_dir=out, datasets=final_names, gpus=gpus,
                        env=env)


def _forced_keys(kind: JobKind) -> dict[str, str]:
    if kind == "export":
        return {"export_dir": "the job's own directory under the state dir"}
    return {
        "output_dir": "the job's own directory under the state dir",
        "overwrite_output_dir": "always false, so an interrupted job resumes from its last checkpoint",
        "dataset_dir": "the daemon's datasets; add yours with `ftctl dataset add`",
    }


def _resolve_deepspeed(value: str, deepspeed_dir: Path) -> Path:
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    for candidate in (deepspeed_dir / value, deepspeed_dir / f"{value}.json", deepspeed_dir / path.name):
        if candidate.is_file():
            return candidate
    return path  # validate.py reports it as missing, naming the file


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
