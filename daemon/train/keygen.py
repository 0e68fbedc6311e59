"""Write the key catalogue of an installed LLaMA-Factory: the keys its HfArgumentParser accepts, their types and
choices, the chat templates and the stages (what daemon/train/validate.py checks a spec against).

NOT imported by the daemon: daemon/train/catalogue.py runs this file with the python of the venv that
``train.llamafactory_cli`` lives in, as a child process (importing LLaMA-Factory takes 15-40 s and all of
torch), and caches the result per version. Developers refresh the shipped fallback copy with
tools/gen_llamafactory_keys.py. Only the standard library and LLaMA-Factory are imported here.

    python keygen.py --probe      one JSON line: the versions, and whether TensorBoard is installed
    python keygen.py OUT.json     the catalogue, written atomically (a temporary file, then renamed)
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import json
import os
import sys
import types
import typing
from importlib.metadata import version
from pathlib import Path
from typing import Any

# transformers' TensorBoardCallback takes either
TENSORBOARD_MODULES = ("tensorboard", "tensorboardX")


def describe(tp: Any) -> dict[str, Any]:
    """A field's type as validate.py checks it: kind (bool/int/float/str/any), nullable, choices."""
    members = list(typing.get_args(tp)) if _is_union(tp) else [tp]
    nullable = type(None) in members
    members = [m for m in members if m is not type(None)]
    choices: list[Any] = []
    kinds: set[str] = set()
    for m in members:
        origin = typing.get_origin(m)
        if origin is typing.Literal:
            choices.extend(typing.get_args(m))
            kinds.add("str" if all(isinstance(c, str) for c in typing.get_args(m)) else "any")
        elif isinstance(m, type) and issubclass(m, enum.Enum):
            choices.extend(e.value for e in m)
            kinds.add("str")
        elif m is bool:
            kinds.add("bool")
        elif m is int:
            kinds.add("int")
        elif m is float:
            kinds.add("float")
        elif m is str:
            kinds.add("str")
        else:
            kinds.add("any")
    if kinds == {"int", "float"}:
        kinds = {"float"}
    kind = kinds.pop() if len(kinds) == 1 else "any"
    out: dict[str, Any] = {"kind": kind}
    if nullable:
        out["nullable"] = True
    # A union with plain str (e.g. `Union[SchedulerType, str]`) is still converted to the enum in
    # transformers' __post_init__, so its choices are enforced too.
    if choices:
        out["choices"] = sorted({str(c) for c in choices})
    return out


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def fields_of(cls: type) -> dict[str, dict[str, Any]]:
    hints = typing.get_type_hints(cls)
    out: dict[str, dict[str, Any]] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init:
            continue
        out[f.name] = describe(hints.get(f.name, Any))
    return out


def probe() -> dict[str, Any]:
    """What the daemon asks on each new cli: cheap (no LLaMA-Factory import, ~0.2 s)."""
    return {"llamafactory": version("llamafactory"), "transformers": version("transformers"),
            "tensorboard": any(importlib.util.find_spec(m) is not None for m in TENSORBOARD_MODULES)}


def generate() -> dict[str, Any]:
    from llamafactory.data.template import TEMPLATES
    from llamafactory.hparams import parser as lf_parser
    from llamafactory.hparams.finetuning_args import FinetuningArguments

    groups: dict[str, dict[str, dict[str, Any]]] = {}
    commands: dict[str, list[str]] = {}
    for command, classes in (("train", lf_parser._TRAIN_ARGS), ("export", lf_parser._INFER_ARGS)):
        commands[command] = [cls.__name__ for cls in classes]
        for cls in classes:
            groups.setdefault(cls.__name__, fields_of(cls))
    stage_type = typing.get_type_hints(FinetuningArguments)["stage"]
    return {
        "generated_by": "daemon/train/keygen.py",
        "llamafactory_version": version("llamafactory"),
        "transformers_version": version("transformers"),
        "commands": commands,
        "groups": groups,
        "templates": sorted(TEMPLATES),
        "stages": list(typing.get_args(stage_type)),
    }


def write(out: Path, data: dict[str, Any]) -> None:
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, indent=1, sort_keys=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(out)  # a reader sees the old file or the whole new one


def main(argv: list[str]) -> int:
    here = os.path.dirname(os.path.realpath(__file__))
    if sys.path and os.path.realpath(sys.path[0] or ".") == here:
        sys.path.pop(0)  # run by path: this folder's datasets.py would shadow Hugging Face's `datasets`
    if argv[1:] == ["--probe"]:
        print(json.dumps(probe()))
        return 0
    if len(argv) != 2:
        print(f"usage: {argv[0]} --probe | OUT.json", file=sys.stderr)
        return 2
    out = Path(argv[1])
    data = generate()
    write(out, data)
    n = {c: sum(len(data["groups"][g]) for g in gs) for c, gs in data["commands"].items()}
    print(f"wrote {out}: llamafactory {data['llamafactory_version']}, keys {n}, "
          f"{len(data['templates'])} templates, stages {data['stages']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
