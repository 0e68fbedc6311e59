"""The queue commands pueue, task-spooler and Slurm users reach for: ``jobs`` with filters, ``wait``,
``cancel`` of several jobs (or all of one's own), ``rm``/``clean`` of finished jobs and ``priority``.

Only light imports at the top: ``ftctl jobs`` is one of the commands that must start fast.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import TYPE_CHECKING, Any

from shared.client import Client, RemoteError
from shared.protocol import (
    TERMINAL_STATES,
    Cancel,
    Done,
    Heartbeat,
    JobChanged,
    JobDetail,
    JobInfo,
    JobList,
    ListJobs,
    RemovedJobs,
    RemoveJobs,
    SetPriority,
    ShowJob,
)
from tui.ftctl import output
from tui.ftctl.output import (
    EXIT_CANCELED,
    EXIT_FAILED,
    EXIT_FORBIDDEN,
    EXIT_OK,
    EXIT_USAGE,
    emit_json,
    note,
    usage,
    worst_exit,
)

if TYPE_CHECKING:
    from rich.table import Table

STATES = ("queued", "running", "succeeded", "failed", "canceled", "interrupted")
# `ftctl wait` subscribes to each job's own topic up to this many, to every job's above it
WAIT_TOPICS_MAX = 50
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


# ------------------------------------------------------------------------------------------------ jobs


def jobs_table(jobs: list[JobInfo]) -> Table:
    from rich.table import Table

    from tui.format import STATE_STYLE

    t = Table(box=None, pad_edge=False)
    # NODE: the cluster node a job ran on ([cluster] backend = "ray"); absent when no job names one
    nodes = any(j.artifacts.get("node") for j in jobs)
    for col in ("ID", "KIND", "STATE", "OWNER", "PRIO", "NAME", "PROGRESS", *(("NODE",) if nodes else ()), "CREATED"):
        t.add_column(col, no_wrap=col != "NAME")
    for j in jobs:
        p = j.progress
        prog = f"{p.done:g}/{p.total:g} {p.unit}" if p.total else (p.note or "-")
        state = f"[{STATE_STYLE.get(j.state, '')}]{j.state}[/]"
        node = (j.artifacts.get("node") or "-",) if nodes else ()
        t.add_row(str(j.id), j.kind, state, j.owner, str(j.priority) if j.priority else "", j.name, prog, *node,
                  output.ago(j.created))
    return t


def list_request(args: argparse.Namespace, me: str = "") -> ListJobs:
    owners = list(args.user or [])
    if getattr(args, "mine", False) and me:
        owners.append(me)
    return ListJobs(all=args.all, limit=args.limit, owners=owners, states=list(args.state or []),
                    kinds=list(args.kind or []))


def cmd_jobs(args: argparse.Namespace, c: Client) -> int:
    me = c.hello().user if args.mine else ""
    jobs = c.call(list_request(args, me), JobList).jobs
    if args.json:
        emit_json(jobs)
    elif args.quiet:
        sys.stdout.write("".join(f"{j.id}\n" for j in jobs))
    elif not jobs:
        finished_too = args.all or args.state
        if args.user or args.state or args.kind or args.mine:
            note("no jobs match" + ("" if finished_too else " among those queued or running (--all: finished too)"))
        else:
            note("no jobs" + ("" if finished_too else " queued or running (`ftctl jobs --all` shows finished ones)"))
    else:
        output.out.print(jobs_table(jobs))
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ wait


def cmd_wait(args: argparse.Namespace, c: Client) -> int:
    """Follow the jobs' events until every one has ended; the exit code is the worst end's (output.py)."""
    ids = list(dict.fromkeys(args.ids))
    topics = tuple(f"job.{i}" for i in ids) if len(ids) <= WAIT_TOPICS_MAX else ("job.",)
    events = c.events(topics)  # subscribed first: a job that ends from now on is seen
    jobs = {i: c.call(ShowJob(job_id=i), JobDetail).job for i in ids}
    session = ""
    live = False
    try:
        while not _all_ended(c, jobs):
            ev = next(events)
            body = ev.body
            # the first message proves the subscription live, and a new daemon session may have come with
            # changes made while we were not connected: what happened before either is in a fresh answer
            if not live or (isinstance(body, Heartbeat) and ev.session != session):
                jobs = {i: c.call(ShowJob(job_id=i), JobDetail).job for i in jobs}
                live = True
            session = ev.session
            # an end is final here (an older event may still arrive after the fresh answer)
            if isinstance(body, JobChanged) and body.job.id in jobs and jobs[body.job.id].state not in TERMINAL_STATES:
                jobs[body.job.id] = body.job
                if body.what and not args.quiet and not args.json:
                    note(f"job {body.job.id}: {body.what}")
    finally:
        events.close()
    ended = [jobs[i] for i in ids]
    if args.json:
        emit_json(ended)
    elif not args.quiet:
        for j in ended:
            note(f"job {j.id} {j.state}{': ' + j.error if j.error else ''}")
    return worst_exit([j.state for j in ended])


def _all_ended(c: Client, jobs: dict[int, JobInfo]) -> bool:
    """Has every job ended? An interrupted one has if it stays so: a resumable job goes back to the queue in
    the same breath as it is marked interrupted, so it is asked for again."""
    for job_id, job in jobs.items():
        if job.state == "interrupted":
            jobs[job_id] = job = c.call(ShowJob(job_id=job_id), JobDetail).job
        if job.state not in TERMINAL_STATES and job.state != "interrupted":
            return False
    return True


# ---------------------------------------------------------------------------------------------- cancel


def confirm(what: str, ids: list[int], yes: bool) -> bool | None:
    """True to go on. More than one job: asked on a terminal unless ``yes``; None (refused, with the fix
    said) where nobody can answer."""
    if yes or len(ids) <= 1:
        return True
    shown = ", ".join(map(str, ids[:10])) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        note(f"ftctl: {what} would touch {len(ids)} jobs ({shown}) and there is no terminal to confirm on; "
             "add -y to go ahead")
        return None
    sys.stderr.write(f"{what} {len(ids)} jobs ({shown})? [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def select(args: argparse.Namespace, c: Client, default_states: tuple[str, ...]) -> list[int] | None:
    """The jobs a command names: its ids, or those its filters (--mine, --user, --state, --kind) match;
    None (said why) when the command line names none."""
    if args.ids:
        if args.mine or args.user or args.state or args.kind:
            usage("name jobs by id or by --mine/--user/--state/--kind, not both")
            return None
        return list(dict.fromkeys(args.ids))
    if not (args.mine or args.user or args.state or args.kind):
        usage("name the jobs: ids, or --mine, --user USER, --state STATE, --kind KIND")
        return None
    me = c.hello().user if args.mine else ""
    owners = [*(args.user or []), *([me] if me else [])]
    states = list(args.state or default_states)
    jobs = c.call(ListJobs(all=True, limit=0, owners=owners, states=states, kinds=list(args.kind or [])),
                  JobList).jobs
    return [j.id for j in jobs]


def cmd_cancel(args: argparse.Namespace, c: Client) -> int:
    ids = select(args, c, ("queued", "running"))
    if ids is None:
        return EXIT_USAGE
    if not ids:
        note("no jobs match; nothing to cancel")
        if args.json:
            emit_json([])
        return EXIT_OK
    go = confirm("cancel", ids, args.yes)
    if not go:
        return EXIT_USAGE if go is None else EXIT_FAILED
    results: list[dict[str, Any]] = []
    code = EXIT_OK
    for job_id in ids:
        try:
            message = c.call(Cancel(job_id=job_id), Done).message
            result = "canceling"
        except RemoteError as exc:
            message = exc.message
            if exc.code == "invalid_state":  # already over: what the user wanted is true
                result = "finished"
                message = f"note: {exc.message}"
            else:
                result = "refused"
                code = max(code, EXIT_FORBIDDEN if exc.code == "forbidden" else
                           EXIT_USAGE if exc.code == "unknown_job" else EXIT_FAILED)
        results.append({"id": job_id, "result": result, "message": message})
        if not args.json:
            note(f"ftctl: {message}" if result == "refused" else message)
    if args.wait:
        waiting = [r["id"] for r in results if r["result"] == "canceling"]
        if waiting:
            ended = cmd_wait(argparse.Namespace(ids=waiting, quiet=True, json=False), c)
            code = max(code, EXIT_OK if ended in (EXIT_OK, EXIT_CANCELED) else EXIT_FAILED)
    if args.json:
        emit_json(results)
    return code


# ------------------------------------------------------------------------------------------ rm, clean


def cmd_rm(args: argparse.Namespace, c: Client) -> int:
    ids = list(dict.fromkeys(args.ids))
    go = confirm("remove", ids, args.yes)
    if not go:
        return EXIT_USAGE if go is None else EXIT_FAILED
    reply = c.call(RemoveJobs(job_ids=ids), RemovedJobs)
    return _removed(args, reply)


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``7d``, ``2w`` → seconds; ValueError for anything else."""
    m = _DURATION_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(text)
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def cmd_clean(args: argparse.Namespace, c: Client) -> int:
    try:
        older = parse_duration(args.older_than)
    except ValueError:
        return usage(f"--older-than {args.older_than!r}: not a duration; write e.g. 90s, 15m, 12h, 7d or 2w")
    reply = c.call(RemoveJobs(older_than_s=older), RemovedJobs)
    return _removed(args, reply)


def _removed(args: argparse.Namespace, reply: RemovedJobs) -> int:
    if args.json:
        emit_json(reply)
    else:
        ids = reply.job_ids
        shown = ", ".join(map(str, ids[:20])) + (" …" if len(ids) > 20 else "")
        note(f"removed {len(ids)} finished job(s){': ' + shown if ids else ''}; the files they wrote stay")
    return EXIT_OK


# -------------------------------------------------------------------------------------------- priority


def cmd_priority(args: argparse.Namespace, c: Client) -> int:
    d = c.call(SetPriority(job_id=args.id, priority=args.priority), JobDetail)
    if args.json:
        emit_json(d)
    else:
        note(f"job {d.job.id} ({d.job.state}) now has priority {d.job.priority}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------ completion


def cmd_complete(args: argparse.Namespace, c: Client) -> int:
    """What the shell completion scripts ask for (``ftctl __complete WHAT``): one word a line, nothing at all
    when the daemon is down or slow (a prompt must never hang or print errors)."""
    try:
        words = _completion_words(args.what, c)
    except Exception:
        return EXIT_OK
    sys.stdout.write("".join(f"{w}\n" for w in words))
    return EXIT_OK


def _completion_words(what: str, c: Client) -> list[str]:
    if what in ("jobs", "active"):
        jobs = c.call(ListJobs(all=what == "jobs", limit=200), JobList, timeout=1.0).jobs
        return [str(j.id) for j in reversed(jobs)]  # newest first
    if what == "templates":
        from shared.protocol import ListTemplates, TemplatesReply

        return [t.name for t in c.call(ListTemplates(), TemplatesReply, timeout=1.0).templates]
    if what == "datasets":
        from shared.protocol import DatasetList, DatasetsReply

        return c.call(DatasetList(), DatasetsReply, timeout=1.0).names
    return []
