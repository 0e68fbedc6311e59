"""The one ``key=value`` syntax for every ``--set`` (ftctl submit, ftctl train) and ftui's overrides box.

Values are YAML-typed (``lr=1e-4`` is a float, ``bf16=false`` a bool, ``steps=20`` an int, anything else
text); ``key=`` or ``key=null`` removes the key so the template's (or LLaMA-Factory's) default applies.
Path-valued training keys are made absolute on the client, because the daemon's working directory is not
the user's (:func:`absolutize`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

# Training keys whose values are paths on the server (comma-separated lists allowed).
PATH_KEYS = ("model_name_or_path", "adapter_name_or_path", "deepspeed", "media_dir", "tokenized_path")

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# YAML 1.1 reads 1e-4 (no dot) as a string; everyone means the number
_EXPONENT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


class SpecProblem(ValueError):
    """One or more problems with a job spec or its overrides, each a line saying what to change."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


def parse_value(raw: str) -> Any:
    """A YAML-typed value; ``""`` is None (remove the key)."""
    raw = raw.strip()
    if raw == "":
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw  # not YAML (e.g. an unbalanced bracket in a path): keep the text as written
    if isinstance(value, str) and _EXPONENT_RE.fullmatch(raw):
        return float(raw)
    if isinstance(value, list):
        return ",".join(str(v) for v in value)  # LLaMA-Factory's list keys are comma-separated strings
    if isinstance(value, dict):
        return raw
    return value


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` → (key, YAML-typed value); raises SpecProblem naming the item and the fix."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not _KEY_RE.match(key):
        raise SpecProblem([f"override '{item}' is not key=value; write it as --set learning_rate=1e-4"])
    return key, parse_value(raw)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Every item parsed; all malformed ones reported at once."""
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


def parse_override_text(text: str) -> dict[str, Any]:
    """Overrides typed into a box: ``key=value`` per line or separated by spaces, ``#`` starts a comment.
    Raises ValueError naming the first bad line."""
    out: dict[str, Any] = {}
    for n, line in enumerate(text.splitlines(), 1):
        for item in line.split():
            if item.startswith("#"):
                break
            try:
                key, value = parse_override(item)
            except SpecProblem:
                raise ValueError(f"line {n}: {item!r} is not key=value (e.g. learning_rate=1e-4)") from None
            out[key] = value
    return out


def absolutize(overrides: Mapping[str, Any], cwd: Path) -> dict[str, Any]:
    """Relative paths in :data:`PATH_KEYS` made absolute against the user's ``cwd``. Only what looks local
    (``./x``, ``~/x``) or exists there is touched: ``Qwen/Qwen2-VL-2B-Instruct`` is a hub name, not a path."""
    out = dict(overrides)
    for key in PATH_KEYS:
        value = out.get(key)
        if not isinstance(value, str) or not value:
            continue
        parts = [p.strip() for p in value.split(",")]
        out[key] = ",".join(_absolute(p, cwd) for p in parts)
    return out


def _absolute(part: str, cwd: Path) -> str:
    local = Path(part).expanduser()
    if local.is_absolute():
        return str(local)
    if part.startswith((".", "~")) or (cwd / local).exists():
        return os.path.abspath(cwd / local)
    return part
