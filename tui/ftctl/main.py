"""``ftctl``'s command line: every command, in one static list (:func:`build_parser`), and the main that
finds the daemon, runs the command and turns what went wrong into an exit code (see :mod:`tui.ftctl.output`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.markup import escape
from rich.table import Table

from shared.client import Client, DaemonUnavailable, RemoteError
from shared.config import ConfigError, Settings, load_settings
from shared.overrides import SpecProblem, parse_overrides
from shared.protocol import (
    Cancel,
    Done,
    JobChanged,
    JobDetail,
    JobInfo,
    JobList,
    JobLogs,
    ListJobs,
    LogChunk,
    PauseQueue,
    ResumeQueue,
    Retry,
    ShowJob,
    Status,
    StatusReply,
    Submit,
)
from tui.format import STATE_STYLE
from tui.ftctl import engine, ocr, service, train
from tui.ftctl.args import add_submit_flags
from tui.ftctl.follow import View, follow
from tui.ftctl.output import (
    EXIT_FAILED,
    EXIT_FORBIDDEN,
    EXIT_NO_DAEMON,
    EXIT_OK,
    EXIT_USAGE,
    ago,
    emit_json,
    err,
    every_field,
    job_exit,
    out,
    usage,
)

Command = Callable[[argparse.Namespace, Client], int]


def jobs_table(jobs: list[JobInfo]) -> Table:
    t = Table(box=None, pad_edge=False)
    for col in ("ID", "KIND", "STATE", "OWNER", "NAME", "PROGRESS", "CREATED"):
        t.add_column(col, no_wrap=col != "NAME")
    for j in jobs:
        p = j.progress
        prog = f"{p.done:g}/{p.total:g} {p.unit}" if p.total else (p.note or "-")
        state = f"[{STATE_STYLE.get(j.state, '')}]{j.state}[/]"
        t.add_row(str(j.id), j.kind, state, j.owner, j.name, prog, ago(j.created))
    return t


# ------------------------------------------------------------------------------------------- commands


def cmd_status(args: argparse.Namespace, c: Client) -> int:
    st = c.call(Status(), StatusReply)
    if args.json:
        emit_json(st)
        return EXIT_OK
    counts = ", ".join(f"{n} {s}" for s, n in sorted(st.counts.items())) or "no jobs yet"
    out.print(f"[bold]ftmllmd {st.version}[/] pid {st.pid}, up {st.uptime_s:.0f}s, session {st.session}, "
              f"seq {st.seq}")
    out.print(f"jobs:      {counts}{' (queue PAUSED: `ftctl resume`)' if st.queue_paused else ''}")
    eng = st.engine
    out.print(escape(f"engine:    {eng.kind} {eng.state}{' ' + eng.model if eng.model else ''}"
                     f"{' — ' + eng.reason if eng.reason else ''}"))
    if st.gpus:
        for g in st.gpus:
            out.print(f"gpu {g.index}:     {g.name} {g.mem_used_mib:.0f}/{g.mem_total_mib:.0f} MiB, "
                      f"{g.util_pct:.0f}% util, jobs {g.job_ids or '-'}")
    else:
        out.print(f"gpus:      {st.gpu_note}")
    out.print(f"hot folder: drop PDFs into {st.hotfolder}")
    out.print(f"state:     {st.state_dir}   sockets: {st.runtime_dir}")
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace, c: Client) -> int:
    jobs = c.call(ListJobs(all=args.all, limit=args.limit), JobList).jobs
    if args.json:
        emit_json(jobs)
    elif not jobs:
        out.print("no jobs" + ("" if args.all else " queued or running (`ftctl jobs --all` shows finished ones)"))
    else:
        out.print(jobs_table(jobs))
    return EXIT_OK


def cmd_show(args: argparse.Namespace, c: Client) -> int:
    d = c.call(ShowJob(job_id=args.id), JobDetail)
    if args.json:
        emit_json(d)
        return EXIT_OK
    j = d.job
    out.print(f"[bold]job {j.id}[/] {j.kind} [{STATE_STYLE.get(j.state, '')}]{j.state}[/] — {j.name}")
    out.print(f"owner {j.owner}, created {ago(j.created)}, started {ago(j.started)}, finished {ago(j.finished)}, "
              f"attempts {j.attempts}{', GPUs ' + ','.join(map(str, j.gpus)) if j.gpus else ''}")
    if j.progress.total or j.progress.note:
        out.print(f"progress: {j.progress.done:g}/{j.progress.total:g} {j.progress.unit} {j.progress.note}")
    if j.error:
        out.print(f"[red]error:[/] {j.error}")
    for k, v in j.artifacts.items():
        out.print(f"artifact {k}: {v}")
    out.print("spec: " + json.dumps(j.spec, ensure_ascii=False))
    out.print(f"log: {d.log_path}  (`ftctl logs {j.id} -f`)")
    out.print("[bold]history[/]")
    for h in d.history:
        out.print(f"  {time.strftime('%H:%M:%S', time.localtime(h.ts))}  {h.what}")
    return EXIT_OK


def cmd_submit_generic(args: argparse.Namespace, c: Client) -> int:
    try:
        sets = parse_overrides(args.set or [])
    except SpecProblem as exc:
        return usage(str(exc))
    spec = {key: value for key, value in sets.items() if value is not None}  # `key=`: the kind's default
    d = c.call(Submit(kind=args.kind, spec=spec, name=args.name or ""), JobDetail)
    return after_submit(args, c, d.job)


def after_submit(args: argparse.Namespace, c: Client, job: JobInfo) -> int:
    if args.json and not args.wait:
        emit_json(job)
        return EXIT_OK
    err.print(f"job {job.id} queued ({job.name}); follow it with `ftctl show {job.id}` or `ftctl logs {job.id} -f`")
    if not args.wait:
        print(job.id)
        return EXIT_OK
    job = follow(c, job.id, View())
    if args.json:
        emit_json(job)
    else:
        err.print(f"job {job.id} {job.state}{': ' + job.error if job.error else ''}")
    return job_exit(job)


def cmd_cancel(args: argparse.Namespace, c: Client) -> int:
    d = c.call(Cancel(job_id=args.id), Done)
    err.print(d.message)
    if args.wait:
        return EXIT_OK if follow(c, args.id, View(quiet=True)).state == "canceled" else EXIT_FAILED
    return EXIT_OK


def cmd_retry(args: argparse.Namespace, c: Client) -> int:
    err.print(c.call(Retry(job_id=args.id), Done).message)
    return EXIT_OK


def cmd_logs(args: argparse.Namespace, c: Client) -> int:
    chunk = c.call(JobLogs(job_id=args.id, tail=args.tail), LogChunk)
    sys.stdout.write(chunk.text)
    sys.stdout.flush()
    while args.follow and not chunk.finished:
        # the log is a file the daemon appends to; polling it by offset keeps the daemon free of
        # per-client state and works the same for the job's own lines and its child's output
        time.sleep(0.3)
        chunk = c.call(JobLogs(job_id=args.id, offset=chunk.offset), LogChunk)
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    if args.follow:
        chunk = c.call(JobLogs(job_id=args.id, offset=chunk.offset), LogChunk)
        sys.stdout.write(chunk.text)
    return EXIT_OK


def cmd_events(args: argparse.Namespace, c: Client) -> int:
    topics = tuple(args.topic) if args.topic else ("",)
    try:
        for ev in c.events(topics):
            if not args.heartbeats and ev.body.__class__.__name__ == "Heartbeat":
                continue
            if args.json:
                sys.stdout.write(json.dumps(every_field(ev), ensure_ascii=False) + "\n")
            else:
                kind = type(ev.body).__name__
                detail = getattr(ev.body, "what", "") or ""
                sys.stdout.write(f"{ev.seq:>8} {time.strftime('%H:%M:%S', time.localtime(ev.ts))} {kind:<14} "
                                 f"{_event_summary(ev.body)} {detail}\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _event_summary(body: Any) -> str:
    if isinstance(body, JobChanged):
        return f"job {body.job.id} {body.job.state}"
    return ""


def cmd_pause(args: argparse.Namespace, c: Client) -> int:
    err.print(c.call(PauseQueue(), Done).message)
    return EXIT_OK


def cmd_resume(args: argparse.Namespace, c: Client) -> int:
    err.print(c.call(ResumeQueue(), Done).message)
    return EXIT_OK


# --------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ftctl",
        description="Drive ftmllmd from the shell: list, submit, follow and cancel jobs.",
        epilog="Exit codes: 0 ok, 1 failed, 2 usage/rejected spec, 3 daemon not running, 4 not allowed. "
        "The daemon is found like ftmllmd finds its sockets: --config/$FTMLLM_CONFIG, --home/$FTMLLM_HOME, "
        "else $XDG_RUNTIME_DIR/ftmllm (or /run/user/UID/ftmllm).",
    )
    p.add_argument("--config", help="the daemon's TOML config (to find its sockets)")
    p.add_argument("--home", help="the daemon's --home dir (what `make run` uses: ./.ftmllm)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer (default 10)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Command, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        return sp

    sp = add("status", cmd_status, "daemon, engine, GPUs and queue at a glance")
    sp.add_argument("--json", action="store_true")
    sp = add("jobs", cmd_jobs, "list queued and running jobs (--all: finished ones too)")
    sp.add_argument("--all", "-a", action="store_true")
    sp.add_argument("--limit", type=int, default=200)
    sp.add_argument("--json", action="store_true")
    sp = add("show", cmd_show, "one job: spec, progress, error, artifacts, history")
    sp.add_argument("id", type=int)
    sp.add_argument("--json", action="store_true")

    submit = sub.add_parser("submit", help="submit a job (ocr, selftest, …)", description="Submit a job.")
    kinds = submit.add_subparsers(dest="kind", required=True, metavar="KIND")
    sp = kinds.add_parser("selftest", help="a job that only emits progress: checks a daemon end to end")
    sp.set_defaults(fn=cmd_submit_generic)
    sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="spec keys: steps (10), rate (10/s), deltas (0), fail (false), hold (false)")
    add_submit_flags(sp)
    ocr.add_parser(kinds)
    train.add_submit_parsers(kinds)
    service.add_parser(sub)
    train.add_parsers(sub)
    engine.add_parser(sub)

    sp = add("cancel", cmd_cancel, "cancel a queued or running job (yours, unless you are an admin)")
    sp.add_argument("id", type=int)
    sp.add_argument("--wait", action="store_true", help="wait until it has stopped")
    sp = add("retry", cmd_retry, "queue a failed, canceled or interrupted job again")
    sp.add_argument("id", type=int)
    sp = add("logs", cmd_logs, "print a job's log (-f: follow until the job ends)")
    sp.add_argument("id", type=int)
    sp.add_argument("-f", "--follow", action="store_true")
    sp.add_argument("-n", "--tail", type=int, default=50, help="lines from the end (default 50)")
    sp = add("events", cmd_events, "live tail of the daemon's events (Ctrl-C to stop)")
    sp.add_argument("--topic", action="append", help="topic prefix: job.12, ocr.12, train.12, engine, gpu")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--heartbeats", action="store_true", help="show heartbeats too")
    add("pause", cmd_pause, "pause the queue: running jobs go on, queued ones wait")
    add("resume", cmd_resume, "resume the queue")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    local = getattr(args, "local", None)
    if local is not None:
        return int(local(args))
    try:
        settings: Settings = load_settings(args.config, args.home, client=True)
    except ConfigError as exc:
        err.print(f"ftctl: {exc}")
        return EXIT_USAGE
    client = Client(settings.paths, timeout=args.timeout)
    try:
        return int(args.fn(args, client))
    except DaemonUnavailable as exc:
        err.print(f"ftctl: {exc}", markup=False)
        return EXIT_NO_DAEMON
    except RemoteError as exc:
        err.print(f"ftctl: {exc.message}", markup=False)  # messages name config keys like [train] …
        if exc.code == "forbidden":
            return EXIT_FORBIDDEN
        if exc.code in ("invalid_spec", "bad_request", "unknown_job", "invalid_state", "too_large"):
            return EXIT_USAGE
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `ftctl … | head`: the reader has what it wanted
        sys.stderr.close()
        return EXIT_OK
    finally:
        client.close()
