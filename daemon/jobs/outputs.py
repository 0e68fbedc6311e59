"""What a path under the jobs' folder is: whose job it belongs to, and whether it is a train job's adapter
(``<jobs>/<id>/output`` or one of its ``checkpoint-N``). One rule for the two places that let a member point
at an adapter: a training spec's ``adapter_name_or_path`` (daemon/train/access.py) and `ftctl engine load`
(daemon/engines/control.py), each of which words its own refusal."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shared.protocol import JobInfo

CHECKPOINT_RE = re.compile(r"checkpoint-\d+")


def inside(path: str, root: str) -> bool:
    """``path`` is ``root`` or below it (both already resolved)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@dataclass(frozen=True)
class UnderJobs:
    job: JobInfo | None  # the job whose folder it is in; None: no such job (or not in a job's folder)
    adapter: bool  # the job is a train job and the path its output or one of its checkpoints


def under_jobs(real: str, jobs_dir: str, job_of: Callable[[int], JobInfo | None]) -> UnderJobs | None:
    """What ``real`` (resolved) is inside ``jobs_dir`` (resolved); None when it is not inside it."""
    if not inside(real, jobs_dir):
        return None
    parts = Path(os.path.relpath(real, jobs_dir)).parts if real != jobs_dir else ()
    job = job_of(int(parts[0])) if parts and parts[0].isdigit() else None
    adapter = (job is not None and job.kind == "train" and parts[1:2] == ("output",)
               and (len(parts) == 2 or (len(parts) == 3 and CHECKPOINT_RE.fullmatch(parts[2]) is not None)))
    return UnderJobs(job=job, adapter=adapter)
