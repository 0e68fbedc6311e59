"""What ftctl prints and the codes it exits with.

Exit codes: 0 done; 1 the job or request failed; 2 bad usage or a spec the daemon rejected;
3 the daemon is not running or not answering; 4 not allowed (not your job); 5 (``ftctl wait``) a job was
canceled or left interrupted, none failed; 130 interrupted by Ctrl-C.

People read Rich text: results on stdout (``out``), progress and what happened on stderr (``err``), so that
``ftctl … | head`` and ``JOB=$(ftctl submit …)`` get only the result. Scripts pass ``--json`` and get every
field of the reply (:func:`emit_json`).

The two consoles are made at their first use (module ``__getattr__``): Rich is a good part of a quick command's
start-up, and ``ftctl jobs --json`` never needs it.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

import msgspec

from shared.protocol import JobInfo

if TYPE_CHECKING:
    from rich.console import Console

    out: Console
    err: Console

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_DAEMON, EXIT_FORBIDDEN, EXIT_CANCELED = 0, 1, 2, 3, 4, 5

_consoles: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    if name not in ("out", "err"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _consoles:
        from rich.console import Console

        _consoles[name] = Console(stderr=name == "err", highlight=False, soft_wrap=True)
    return _consoles[name]


_PLAIN = (str, int, float, bool, type(None))


def every_field(obj: Any) -> Any:
    """``obj`` as JSON-ready builtins with every field, defaults included.

    The wire format omits defaults to stay small; a script reading ``ftctl --json`` should not have to know
    that a missing ``error`` means "" or a missing ``eta_s`` means null.
    """
    if isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, msgspec.Struct):
        cfg = obj.__struct_config__
        fields: dict[str, Any] = {}
        if cfg.tag_field is not None:
            fields[cfg.tag_field] = cfg.tag
        for name in obj.__struct_fields__:
            value = getattr(obj, name)
            fields[name] = value if isinstance(value, _PLAIN) else every_field(value)
        return fields
    if isinstance(obj, dict):
        return {k: every_field(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [every_field(v) for v in obj]
    return msgspec.to_builtins(obj)


def emit_json(obj: Any) -> None:
    # msgspec's encoder and formatter: the stdlib's pure-Python indenting encoder took ~100 ms for 1,000 jobs
    data = msgspec.json.format(msgspec.json.encode(every_field(obj)), indent=2)
    sys.stdout.write(data.decode() + "\n")


def ago(ts: float | None) -> str:
    from tui.format import ago as format_ago

    return format_ago(ts, time.time())


def usage(message: str) -> int:
    """Say what was wrong with the command line; returns the exit code for it."""
    sys.stderr.write(f"ftctl: {message}\n")
    return EXIT_USAGE


def handover_failed(exc: Exception) -> int:
    """Say why a file could not be handed over (shared/handover.py); returns the exit code: the file's fault
    (HandoverRefused) is bad usage, a daemon that does not take it (HandoverUnavailable) is EXIT_NO_DAEMON."""
    from shared.handover import HandoverUnavailable  # only the commands that hand files over need it

    sys.stderr.write(f"ftctl: {exc}\n")
    return EXIT_NO_DAEMON if isinstance(exc, HandoverUnavailable) else EXIT_USAGE


def note(message: str) -> None:
    """One plain line on stderr (no Rich: quick commands stay quick)."""
    sys.stderr.write(message + "\n")


def job_exit(job: JobInfo) -> int:
    """A followed job's exit code: 0 only if it succeeded."""
    return EXIT_OK if job.state == "succeeded" else EXIT_FAILED


# how bad each end is for `ftctl wait`: the worst of the jobs waited for gives the exit code
_WORST = {"succeeded": (0, EXIT_OK), "canceled": (1, EXIT_CANCELED), "interrupted": (1, EXIT_CANCELED),
          "failed": (2, EXIT_FAILED)}


def worst_exit(states: list[str]) -> int:
    """``ftctl wait``'s exit code: 0 all succeeded, 1 one failed, 5 none failed but one was canceled (or is
    left interrupted)."""
    return max((_WORST.get(s, (2, EXIT_FAILED)) for s in states), default=(0, EXIT_OK))[1]
