"""What ftctl prints and the codes it exits with.

Exit codes: 0 done; 1 the job or request failed; 2 bad usage or a spec the daemon rejected;
3 the daemon is not running or not answering; 4 not allowed (not your job).

People read Rich text: results on stdout (``out``), progress and what happened on stderr (``err``), so that
``ftctl … | head`` and ``JOB=$(ftctl submit …)`` get only the result. Scripts pass ``--json`` and get every
field of the reply (:func:`emit_json`).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import msgspec
from rich.console import Console

from shared.protocol import JobInfo
from tui.format import ago as format_ago

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_DAEMON, EXIT_FORBIDDEN = 0, 1, 2, 3, 4

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def every_field(obj: Any) -> Any:
    """``obj`` as JSON-ready builtins with every field, defaults included.

    The wire format omits defaults to stay small; a script reading ``ftctl --json`` should not have to know
    that a missing ``error`` means "" or a missing ``eta_s`` means null.
    """
    if isinstance(obj, msgspec.Struct):
        cfg = obj.__struct_config__
        fields: dict[str, Any] = {}
        if cfg.tag_field is not None:
            fields[cfg.tag_field] = cfg.tag
        for name in obj.__struct_fields__:
            fields[name] = every_field(getattr(obj, name))
        return fields
    if isinstance(obj, dict):
        return {k: every_field(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [every_field(v) for v in obj]
    return msgspec.to_builtins(obj)


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(every_field(obj), indent=2, ensure_ascii=False) + "\n")


def ago(ts: float | None) -> str:
    return format_ago(ts, time.time())


def usage(message: str) -> int:
    """Say what was wrong with the command line; returns the exit code for it."""
    err.print(f"ftctl: {message}", markup=False)
    return EXIT_USAGE


def job_exit(job: JobInfo) -> int:
    """A followed job's exit code: 0 only if it succeeded."""
    return EXIT_OK if job.state == "succeeded" else EXIT_FAILED
