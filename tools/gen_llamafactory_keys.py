"""Write daemon/train/llamafactory_keys.json from the installed LLaMA-Factory (run once per version).

A developer tool, not part of the daemon. Run it with the python of a venv where llamafactory is installed
(never the daemon's venv):

    ~/.cache/ftmllm-test/llamafactory-<hash>/bin/python tools/gen_llamafactory_keys.py [OUT.json]

It reads the dataclasses LLaMA-Factory's HfArgumentParser parses (``_TRAIN_ARGS`` for `llamafactory-cli
train`, ``_INFER_ARGS`` for `llamafactory-cli export`), the registered chat templates and the stages, so
the daemon can reject a bad spec in milliseconds (daemon/train/validate.py) instead of after 15 s of imports. The file
records the versions it came from; regenerate it when the LLaMA-Factory in train.llamafactory_cli changes.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
import types
import typing
from importlib.metadata import version
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "daemon" / "train" / "llamafactory_keys.json"


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
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        out[f.name] = describe(hints.get(f.name, Any))
    return out


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
        "generated_by": "tools/gen_llamafactory_keys.py",
        "llamafactory_version": version("llamafactory"),
        "transformers_version": version("transformers"),
        "commands": commands,
        "groups": groups,
        "templates": sorted(TEMPLATES),
        "stages": list(typing.get_args(stage_type)),
    }


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else DEFAULT_OUT
    data = generate()
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(out)
    n = {c: sum(len(data["groups"][g]) for g in gs) for c, gs in data["commands"].items()}
    print(f"wrote {out}: llamafactory {data['llamafactory_version']}, keys {n}, "
          f"{len(data['templates'])} templates, stages {data['stages']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
