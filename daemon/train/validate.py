"""Reject in milliseconds what LLaMA-Factory would reject after 15 s of imports.

The valid keys, their types and choices, the chat templates and the stages come from the key catalogue of the
LLaMA-Factory that ``train.llamafactory_cli`` runs (catalogue.py: generated from its argument dataclasses and
cached per version; ``llamafactory_keys.json`` is the copy shipped for one version, and the fallback). Checked
here, each problem as one line naming the key or file and the fix:

* unknown keys ("Some keys are not used by the HfArgumentParser"), with the closest valid key;
* values of the wrong type or outside a key's choices (stage, template, finetuning_type, …);
* datasets missing from the daemon's dataset_info.json ("Undefined dataset X in dataset_info.json."), of the
  wrong kind for the stage (ranking data for dpo/rm only), or whose file or media files are gone;
* a model or adapter directory that is not there, or not a model;
* the cheap consistency rules of LLaMA-Factory's own get_train_args (predict without generate, …).
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.train.datasets import DATASET_INFO, MEDIA_LIST_SUFFIX, dataset_file, read_dataset_info
from daemon.train.spec import RenderedSpec
from shared.overrides import SpecProblem

DEFAULT_CATALOG = Path(__file__).resolve().parent / "llamafactory_keys.json"

# Any of these makes a directory a model LLaMA-Factory can load a tokenizer from ("Failed to load tokenizer.")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_RANKING_STAGES = ("rm", "dpo")  # LLaMA-Factory loads dpo data as stage "rm": both need ranking data


@dataclass(frozen=True)
class KeyInfo:
    kind: str  # bool | int | float | str | any
    nullable: bool = False
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class KeyCatalog:
    llamafactory_version: str
    commands: Mapping[str, frozenset[str]]  # "train" / "export" -> the keys its parser accepts
    keys: Mapping[str, KeyInfo]
    templates: frozenset[str]
    stages: tuple[str, ...]
    transformers_version: str = ""
    tensorboard: bool | None = None  # installed beside that LLaMA-Factory (None: not known)

    def accepted(self, command: str) -> frozenset[str]:
        return self.commands[command]


def load_catalog(path: Path = DEFAULT_CATALOG) -> KeyCatalog:
    """Load once at daemon start and keep it (a few ms)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    keys: dict[str, KeyInfo] = {}
    for fields in data["groups"].values():
        for name, info in fields.items():
            keys[name] = KeyInfo(kind=info["kind"], nullable=bool(info.get("nullable")),
                                 choices=tuple(info.get("choices", ())))
    commands = {cmd: frozenset(k for g in groups for k in data["groups"][g])
                for cmd, groups in data["commands"].items()}
    return KeyCatalog(llamafactory_version=data["llamafactory_version"], commands=commands, keys=keys,
                      templates=frozenset(data["templates"]), stages=tuple(data["stages"]),
                      transformers_version=str(data.get("transformers_version", "")))


def check_spec(spec: RenderedSpec, *, catalog: KeyCatalog, dataset_dir: Path,
               env: Mapping[str, str] | None = None, check_media: bool = True) -> None:
    """Raise SpecProblem (one line per problem) if LLaMA-Factory would reject this spec."""
    problems = validate_params(spec.params, command=spec.command, catalog=catalog, dataset_dir=dataset_dir,
                               env=env, check_media=check_media)
    if problems:
        raise SpecProblem(problems)


def validate_params(
    params: Mapping[str, Any],
    *,
    command: str,
    catalog: KeyCatalog,
    dataset_dir: Path,
    env: Mapping[str, str] | None = None,
    check_media: bool = True,
) -> list[str]:
    env = os.environ if env is None else env
    problems: list[str] = []
    accepted = catalog.accepted(command)
    for key, value in params.items():
        if key not in accepted:
            problems.append(_unknown_key(key, accepted, catalog, command))
            continue
        problem = _check_value(key, value, catalog.keys[key])
        if problem:
            problems.append(problem)
    if problems:
        return problems  # later checks read these keys; do not pile guesses on top of a typo

    template = params.get("template")
    if template is not None and template not in catalog.templates:
        problems.append(_bad_choice("template", template, catalog.templates,
                                    f"templates of LLaMA-Factory {catalog.llamafactory_version}"))
    problems += _check_model(params, env)
    if "tensorboard" in _listed(params.get("report_to")) and catalog.tensorboard is False:
        problems.append(f"report_to tensorboard: neither tensorboard nor tensorboardX is installed beside "
                        f"LLaMA-Factory {catalog.llamafactory_version} (train.llamafactory_cli's venv); ask an "
                        "admin to `pip install tensorboard` there, or remove report_to")
    if command == "train":
        problems += _check_rules(params, catalog)
        problems += _check_datasets(params, dataset_dir, check_media)
        ds = params.get("deepspeed")
        if isinstance(ds, str) and ds:
            problems += _check_deepspeed(Path(ds))
    for key, value in params.items():
        if isinstance(value, str) and "${" in value:
            problems.append(f"{key}: '{value}' contains '${{', which LLaMA-Factory's config loader (OmegaConf) "
                            "reads as an interpolation; remove it")
    return problems


def _listed(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",")]
    return [str(v) for v in value] if isinstance(value, list) else []


def _unknown_key(key: str, accepted: frozenset[str], catalog: KeyCatalog, command: str) -> str:
    close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
    if key in catalog.keys:  # valid for the other command (e.g. output_dir in an export)
        return (f"unknown key '{key}': `llamafactory-cli {command}` does not take it (only the other command "
                f"does); remove it")
    hint = f"did you mean '{close[0]}'? " if close else ""
    return (f"unknown key '{key}': {hint}LLaMA-Factory {catalog.llamafactory_version} would stop with "
            f"'Some keys are not used by the HfArgumentParser'; fix the spelling or remove it")


def _check_value(key: str, value: Any, info: KeyInfo) -> str | None:
    if value is None:
        return None if info.nullable or info.kind in ("any", "str") else (
            f"{key}: needs a value ({info.kind}); remove it to use LLaMA-Factory's default")
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, (str, int, float)) and not isinstance(value, bool),
    }.get(info.kind, True)
    if not ok:
        what = {"bool": "true or false", "int": "an integer", "float": "a number"}.get(info.kind, "text")
        return f"{key}: {value!r} is not {what}; write e.g. --set {key}={_example(info.kind)}"
    if info.choices and str(value) not in info.choices:
        return _bad_choice(key, value, info.choices, "allowed values")
    return None


def _example(kind: str) -> str:
    return {"bool": "true", "int": "8", "float": "1e-4"}.get(kind, "text")


def _bad_choice(key: str, value: Any, choices: Iterable[str], what: str) -> str:
    choices = sorted(choices)
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    listed = ", ".join(choices) if len(choices) <= 12 else ", ".join(choices[:12]) + ", …"
    return f"{key}: '{value}' is not one of the {what}; {hint}choose from {listed}"


def _looks_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or os.path.exists(value) or value.count("/") != 1


def _check_model(params: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    problems: list[str] = []
    model = params.get("model_name_or_path")
    if not model:
        return ["model_name_or_path is not set; set it with --set model_name_or_path=/path/to/model"]
    model = str(model)
    if _looks_local(model):
        path = Path(model).expanduser()
        if not path.is_dir():
            problems.append(f"model_name_or_path {path}: directory not found; point it at a Hugging Face model "
                            "directory (config.json, tokenizer, weights)")
        elif not (path / "config.json").is_file():
            problems.append(f"model_name_or_path {path}: has no config.json, so it is not a model directory; "
                            "point it at the folder that holds config.json")
        elif not any((path / f).is_file() for f in _TOKENIZER_FILES):
            problems.append(f"model_name_or_path {path}: has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
                            "LLaMA-Factory would stop with 'Failed to load tokenizer.'; copy the tokenizer in")
    elif _offline(env) and not _in_hf_cache(model, env):
        problems.append(f"model_name_or_path {model}: a hub id that is not in the Hugging Face cache, and the "
                        "trainer runs offline (HF_HUB_OFFLINE); download it first or give a local directory")
    for adapter in str(params.get("adapter_name_or_path") or "").split(","):
        adapter = adapter.strip()
        if not adapter or not _looks_local(adapter):
            continue
        apath = Path(adapter).expanduser()
        if not (apath / "adapter_config.json").is_file():
            what = "directory not found" if not apath.is_dir() else "has no adapter_config.json"
            problems.append(f"adapter_name_or_path {apath}: {what}; point it at a LoRA adapter (a finished "
                            "train job's output, or one of its checkpoint-N folders)")
    return problems


def _offline(env: Mapping[str, str]) -> bool:
    return env.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _in_hf_cache(repo_id: str, env: Mapping[str, str]) -> bool:
    hub = env.get("HF_HUB_CACHE") or os.path.join(
        env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                           "huggingface"), "hub")
    return (Path(hub) / f"models--{repo_id.replace('/', '--')}" / "snapshots").is_dir()


def _flag(params: Mapping[str, Any], key: str) -> bool:
    return bool(params.get(key))


def _check_rules(params: Mapping[str, Any], catalog: KeyCatalog) -> list[str]:
    """The checks of LLaMA-Factory's get_train_args that need no model and no torch."""
    problems: list[str] = []
    stage = params.get("stage", "sft")
    if stage not in catalog.stages:
        return [_bad_choice("stage", stage, catalog.stages, "stages")]
    if stage != "sft" and _flag(params, "predict_with_generate"):
        problems.append(f"predict_with_generate works only with stage sft (this is {stage}); remove it")
    if stage == "sft" and _flag(params, "do_predict") and not _flag(params, "predict_with_generate"):
        problems.append("do_predict with stage sft needs predict_with_generate: true to save predictions; set it")
    if _flag(params, "do_train") and not params.get("dataset"):
        problems.append("a training job needs a dataset; add --dataset NAME (see `ftctl dataset list`)")
    wants_eval = any(_flag(params, k) for k in ("do_eval", "do_predict", "predict_with_generate"))
    if wants_eval and not params.get("eval_dataset") and float(params.get("val_size") or 0) < 1e-6:
        problems.append("evaluating needs eval_dataset (--dataset NAME on an eval template) or val_size > 0; "
                        "set one")
    if stage == "ppo" and not _flag(params, "do_train"):
        problems.append("stage ppo only trains; evaluate with the sft stage (the qwen2vl_eval template)")
    if params.get("max_steps", -1) in (-1, None) and _flag(params, "streaming"):
        problems.append("streaming datasets need max_steps; set --set max_steps=N")
    backend = params.get("infer_backend")
    if backend not in (None, "huggingface"):
        problems.append(f"infer_backend {backend} is only for LLaMA-Factory's API/chat, not for training; remove it")
    return problems


def _check_deepspeed(path: Path) -> list[str]:
    if not path.is_file():
        return [f"deepspeed {path}: file not found; use one of configs/deepspeed/*.json "
                "(e.g. --set deepspeed=ds_z3_config.json) or an absolute path"]
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"deepspeed {path}: not valid JSON ({exc}); fix the file"]
    return []


def _check_datasets(params: Mapping[str, Any], dataset_dir: Path, check_media: bool) -> list[str]:
    names = [("dataset", n.strip()) for n in str(params.get("dataset") or "").split(",") if n.strip()]
    names += [("eval_dataset", n.strip()) for n in str(params.get("eval_dataset") or "").split(",") if n.strip()]
    if not names:
        return []
    info_path = dataset_dir / DATASET_INFO
    try:
        info = read_dataset_info(dataset_dir)
    except ValueError as exc:
        return [str(exc)]
    problems: list[str] = []
    stage = params.get("stage", "sft")
    media_root = Path(str(params.get("media_dir") or dataset_dir))
    for key, name in names:
        entry = info.get(name)
        if not isinstance(entry, dict):
            close = difflib.get_close_matches(name, list(info), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(f"{key}: no dataset '{name}' in {info_path}; {hint}add it with "
                            f"`ftctl dataset add {name} FILE.json`")
            continue
        ranking = bool(entry.get("ranking", False))
        if ranking != (stage in _RANKING_STAGES):
            need = "ranking data (chosen/rejected)" if stage in _RANKING_STAGES else "non-ranking data"
            problems.append(f"{key}: dataset '{name}' is {'ranking' if ranking else 'non-ranking'} data, but "
                            f"stage {stage} needs {need}; pick a matching dataset or stage")
        path = dataset_file(dataset_dir, entry)
        if path is None:
            continue
        if not path.exists():
            problems.append(f"{key}: dataset '{name}' file {path} is gone; add the dataset again")
        elif check_media and path.is_file():
            problems += _check_media(name, path, entry, media_root)
    return problems


def _check_media(name: str, path: Path, entry: Mapping[str, Any], media_root: Path) -> list[str]:
    columns = entry.get("columns") or {}
    media_cols = [columns[c] for c in ("images", "videos", "audios") if c in columns]
    if not media_cols:
        return []
    listed = path.with_suffix(MEDIA_LIST_SUFFIX)
    items: list[tuple[int | None, str]]
    try:
        if listed.stat().st_mtime >= path.stat().st_mtime:  # written by `dataset add` with the records
            items = [(None, p) for p in listed.read_text(encoding="utf-8").splitlines() if p]
        else:
            items = _media_items(path, media_cols)
    except FileNotFoundError:
        items = _media_items(path, media_cols)  # a dataset placed by hand: read its records
    except (OSError, ValueError) as exc:
        return [f"dataset '{name}' file {path}: cannot be read ({exc}); add the dataset again"]
    # an absolute item stays itself under the join, as in LLaMA-Factory's own lookup
    root = str(media_root)
    missing = [f"record {i}: {item}" if i is not None else item for i, item in items
               if not os.path.isfile(os.path.join(root, item))]  # os.path: 3x faster than Path on 100k files
    if not missing:
        return []
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    return [f"dataset '{name}': {len(missing)} media files are gone ({'; '.join(missing[:3])}{more}); restore "
            "them or add the dataset again"]


def _media_items(path: Path, media_cols: list[str]) -> list[tuple[int | None, str]]:
    text = path.read_text(encoding="utf-8")
    records = [json.loads(x) for x in text.splitlines() if x.strip()] if path.suffix == ".jsonl" \
        else json.loads(text)
    items: list[tuple[int | None, str]] = []
    for i, record in enumerate(records if isinstance(records, list) else []):
        for col in media_cols:
            value = record.get(col) if isinstance(record, dict) else None
            items += [(i, v) for v in ([value] if isinstance(value, str) else (value or [])) if isinstance(v, str)]
    return items
