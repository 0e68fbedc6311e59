"""Render a LLaMA-Factory job spec: a template from configs/llamafactory/ + ``key=value`` overrides + dataset.

The daemon owns where a job writes and how it reports, so some keys are forced and the user may not set
them (``output_dir`` per job under the state dir, ``overwrite_output_dir: false`` so a restarted job
resumes from its last checkpoint, ``report_to: none``, ``dataset_dir`` = the daemon's datasets); others
get a daemon default the user may change (``logging_steps``; ``save_total_limit``, capped so checkpoints
cannot fill the disk). The result is frozen YAML text, stored with the job and run as is.

Nothing here imports LLaMA-Factory: rendering and validation (validate.py) take milliseconds.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from daemon.core.atomic import write_atomic

JobKind = Literal["train", "eval", "export"]
CliCommand = Literal["train", "export"]

# Keys whose values are paths on the server: ftctl turns relative ones into absolute ones (the daemon's
# working directory is not the user's); see absolutize_paths.
PATH_KEYS = ("model_name_or_path", "adapter_name_or_path", "deepspeed", "media_dir", "tokenized_path")

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SpecProblem(ValueError):
    """A spec that cannot be rendered or would be rejected; ``str()`` is one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


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


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` with a YAML-typed value (``lr=1e-4`` is a float, ``bf16=false`` a bool);
    ``key=`` or ``key=null`` removes the key, so LLaMA-Factory's own default applies."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not _KEY_RE.match(key):
        raise SpecProblem([f"override '{item}' is not key=value; write it as --set learning_rate=1e-4"])
    raw = raw.strip()
    if raw == "":
        return key, None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. an unbalanced bracket in a path): keep the text as written
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", raw):
        # YAML 1.1 reads 1e-4 (no dot) as a string; everyone means the number
        value = float(raw)
    elif isinstance(value, list):
        value = ",".join(str(v) for v in value)  # LLaMA-Factory's list keys are comma-separated strings
    elif isinstance(value, dict):
        value = raw
    return key, value


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    problems: list[str] = []
    for item in items:
        try:
            key, value = parse_override(item)
        except SpecProblem as exc:
            problems.extend(exc.problems)
            continue
        out[key] = value
    if problems:
        raise SpecProblem(problems)
    return out


def absolutize_paths(overrides: Mapping[str, Any], cwd: Path) -> dict[str, Any]:
    """For ftctl: relative paths in path-valued keys mean the user's directory, not the daemon's.
    A value that does not exist relative to ``cwd`` is left alone (a hub id, or a configs/ name)."""
    out = dict(overrides)
    for key in PATH_KEYS:
        value = out.get(key)
        if not isinstance(value, str) or not value:
            continue
        parts = [p.strip() for p in value.split(",")]
        fixed = [str((cwd / p).resolve()) if not os.path.isabs(p) and (cwd / p).exists() else p for p in parts]
        out[key] = ",".join(fixed)
    return out


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
) -> RenderedSpec:
    """Template + overrides + dataset → the frozen job. ``job_dir`` is this job's directory under the
    state dir; LLaMA-Factory writes into ``job_dir/output`` (or ``job_dir/merged`` for an export), which
    must hold nothing else: LLaMA-Factory refuses a non-empty output_dir without a checkpoint in it."""
    params = load_template(templates_dir, template)
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

    if kind == "export":
        out = job_dir / "merged"
        params["export_dir"] = str(out)
        env: dict[str, str] = {}
    else:
        out = job_dir / "output"
        limit = params.get("save_total_limit")
        if not isinstance(limit, int) or limit <= 0 or limit > defaults.save_total_limit:
            params["save_total_limit"] = defaults.save_total_limit
        params.setdefault("logging_steps", defaults.logging_steps)
        params["output_dir"] = str(out)
        params["overwrite_output_dir"] = False
        params["report_to"] = "none"
        params["dataset_dir"] = str(dataset_dir)
        # LLaMA-Factory's LogCallback installs its SIGABRT handler (stop at the next step and save) only
        # in LlamaBoard mode; the workdir is where that mode writes its running log.
        env = {"LLAMABOARD_ENABLED": "1", "LLAMABOARD_WORKDIR": str(out)}

    ds_key = "eval_dataset" if kind == "eval" else "dataset"
    final_names = tuple(n.strip() for n in str(params.get(ds_key) or "").split(",") if n.strip())
    header = (f"# ftmllm job: template {template} ({kind}), gpus {gpus}\n"
              f"# overrides: {', '.join(f'{k}={v}' for k, v in given.items()) or '(none)'}\n")
    text = header + yaml.safe_dump(params, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return RenderedSpec(template=template, kind=kind, command="export" if kind == "export" else "train",
                        params=params, yaml_text=text, output_dir=out, datasets=final_names, gpus=gpus,
                        env=env)


def write_job_yaml(spec: RenderedSpec, path: Path) -> None:
    """Write the frozen YAML atomically (a half-written job.yaml would fail the resume after a crash)."""
    write_atomic(path, spec.yaml_text, mode=0o600)


def _forced_keys(kind: JobKind) -> dict[str, str]:
    if kind == "export":
        return {"export_dir": "the job's own directory under the state dir"}
    return {
        "output_dir": "the job's own directory under the state dir",
        "overwrite_output_dir": "always false, so an interrupted job resumes from its last checkpoint",
        "report_to": "always none; progress reaches ftctl/ftui from trainer_log.jsonl",
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
