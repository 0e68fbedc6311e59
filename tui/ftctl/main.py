"""``ftctl``'s command line: the core commands here and in :mod:`tui.ftctl.queue`, the commands of the other
modules added by :func:`add_module_commands`, and the main that finds the daemon, runs the command and turns
what went wrong into an exit code (see :mod:`tui.ftctl.output`).

Start-up time is part of the interface (scripts and prompts run ``ftctl status``): this module imports
only argparse and the light modules, each command imports what it uses, and a core command
(:data:`QUICK`) builds its parser without importing the other modules at all.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tui.ftctl import output, queue
from tui.ftctl.args import (
    ID_HELP,
    JSON_HELP,
    SET_HELP,
    Subparsers,
    add_json_flag,
    add_submit_flags,
)
from tui.ftctl.output import EXIT_FAILED, EXIT_FORBIDDEN, EXIT_NO_DAEMON, EXIT_OK, EXIT_USAGE, emit_json, note

if TYPE_CHECKING:
    from shared.client import Client
    from shared.protocol import JobInfo

Command = Callable[[argparse.Namespace, "Client"], int]

# the core commands (built below): their parser needs none of the other modules
QUICK = frozenset({"status", "jobs", "show", "wait", "cancel", "rm", "clean", "priority", "retry", "logs",
                   "events", "pause", "resume", "__complete"})
GLOBAL_OPTIONS_WITH_VALUE = ("--config", "--home", "--timeout")

EPILOG = """\
Exit codes:
  0 ok, 1 failed, 2 usage or a spec the daemon rejected, 3 daemon not running, 4 not allowed,
  5 (wait) a job was canceled or left interrupted and none failed, 130 Ctrl-C

--set KEY=VALUE (submit selftest, train, eval, export):
  the value is YAML, and so JSON too: steps=3, learning_rate=1e-4, bf16=true, name='a b', KEY= or KEY=null
  removes the key so its default applies

--json (every command that talks to the daemon) prints the reply with every field, defaults included; the
fields are those of the structs in shared/protocol.py:
  status → StatusReply          jobs → [JobInfo]              show, priority → JobDetail
  wait → [JobInfo] as they ended                              rm, clean → RemovedJobs
  cancel → [{"id", "result": canceling|finished|refused, "message"}]
  retry, pause, resume, deploy, dataset rm → Done              logs → LogChunk (one a line with -f)
  events → Event, one a line    submit … → JobInfo            engine → EngineReply
  templates → TemplatesReply    dataset list → [DatasetEntry] dataset add → DatasetsReply
  eval-compare → EvalCompareReply.columns

The daemon is found like ftmllmd finds its sockets: --config/$FTMLLM_CONFIG, --home/$FTMLLM_HOME, else
$XDG_RUNTIME_DIR/ftmllm (or /run/user/UID/ftmllm). Shell completion: `ftctl completion bash|zsh`.
"""


# ------------------------------------------------------------------------------------------- commands


def cmd_status(args: argparse.Namespace, c: Client) -> int:
    from shared.protocol import Status, StatusReply

    st = c.call(Status(), StatusReply)
    if args.json:
        emit_json(st)
        return EXIT_OK
    counts = ", ".join(f"{n} {s}" for s, n in sorted(st.counts.items())) or "no jobs yet"
    eng = st.engine
    lines = [
        f"ftmllmd {st.version} pid {st.pid}, up {st.uptime_s:.0f}s, session {st.session}, seq {st.seq}",
        f"jobs:      {counts}{' (queue PAUSED: `ftctl resume`)' if st.queue_paused else ''}",
        f"engine:    {eng.kind} {eng.state}{' ' + eng.model if eng.model else ''}"
        f"{' — ' + eng.reason if eng.reason else ''}",
    ]
    if st.gpus:
        lines += [f"gpu {g.index}:     {g.name} {g.mem_used_mib:.0f}/{g.mem_total_mib:.0f} MiB, "
                  f"{g.util_pct:.0f}% util, jobs {g.job_ids or '-'}" for g in st.gpus]
    else:
        lines.append(f"gpus:      {st.gpu_note}")
    from shared.protocol import ClusterReply, ClusterStatus

    cluster = c.call(ClusterStatus(), ClusterReply)  # [cluster] backend = "ray": every node, a dead one too
    if cluster.backend != "local":
        why = f" — {cluster.error}" if cluster.error else ""
        lines.append(f"cluster:   {cluster.backend} at {cluster.address}{why}")
        lines += [f"node {n.name}: {n.state}{' (head)' if n.head else ''}, {n.address}, {n.gpus} GPUs, "
                  f"jobs {n.job_ids or '-'}" for n in cluster.nodes]
    from shared.protocol import PageQueue, PageQueueReply

    pq = c.call(PageQueue(limit=10), PageQueueReply)  # the OCR page queue: pages per job, and why one waits
    for e in (e for e in pq.engines if e.jobs):
        lines.append(f"ocr pages: {e.engine} {e.in_flight}/{e.slots} in flight, {e.waiting} waiting")
        lines += [f"  job {j.job_id} {j.owner} ({j.job_class}, priority {j.priority}): {j.in_flight} in flight, "
                  f"{j.waiting} waiting, {j.done}/{j.total} done{' — ' + j.why if j.why else ''}" for j in e.jobs]
        lines += [f"  … and {e.more_jobs} more job(s)"] if e.more_jobs else []
    if pq.queued_jobs:
        lines.append(f"ocr queue: {pq.queued_jobs} not open yet ({pq.open_jobs}/{pq.max_open} open) {pq.why_queued}")
    lines.append(f"hot folder: drop PDFs into {st.hotfolder}")
    lines.append(f"state:     {st.state_dir}   sockets: {st.runtime_dir}")
    if sys.stdout.isatty() and not os.environ.get("NO_COLOR"):
        # bold by hand: Rich's start-up would be a sixth of this command's whole run
        lines[0] = f"\033[1m{lines[0]}\033[0m"
    sys.stdout.write("\n".join(lines) + "\n")
    return EXIT_OK


def cmd_show(args: argparse.Namespace, c: Client) -> int:
    import json
    import time

    from shared.protocol import JobDetail, ShowJob
    from tui.format import STATE_STYLE

    d = c.call(ShowJob(job_id=args.id), JobDetail)
    if args.json:
        emit_json(d)
        return EXIT_OK
    out, ago = output.out, output.ago
    j = d.job
    out.print(f"[bold]job {j.id}[/] {j.kind} [{STATE_STYLE.get(j.state, '')}]{j.state}[/] — {j.name}")
    out.print(f"owner {j.owner}, created {ago(j.created)}, started {ago(j.started)}, finished {ago(j.finished)}, "
              f"attempts {j.attempts}, priority {j.priority}{', GPUs ' + ','.join(map(str, j.gpus)) if j.gpus else ''}")
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
    from shared.overrides import SpecProblem, parse_overrides
    from shared.protocol import JobDetail, Submit

    try:
        sets = parse_overrides(args.set or [])
    except SpecProblem as exc:
        return output.usage(str(exc))
    spec = {key: value for key, value in sets.items() if value is not None}  # `key=`: the kind's default
    d = c.call(Submit(kind=args.kind, spec=spec, name=args.name or "", priority=args.priority,
                      interactive=args.wait), JobDetail)
    return after_submit(args, c, d.job)


def after_submit(args: argparse.Namespace, c: Client, job: JobInfo) -> int:
    from tui.ftctl.follow import View, follow

    if args.json and not args.wait:
        emit_json(job)
        return EXIT_OK
    note(f"job {job.id} queued ({job.name}); follow it with `ftctl show {job.id}` or `ftctl logs {job.id} -f`")
    if not args.wait:
        print(job.id)
        return EXIT_OK
    job = follow(c, job.id, View())
    if args.json:
        emit_json(job)
    else:
        note(f"job {job.id} {job.state}{': ' + job.error if job.error else ''}")
    return output.job_exit(job)


def cmd_retry(args: argparse.Namespace, c: Client) -> int:
    from shared.protocol import Done, Retry

    return _done(args, c.call(Retry(job_id=args.id), Done))


def _done(args: argparse.Namespace, reply: Any) -> int:
    if args.json:
        emit_json(reply)
    else:
        note(reply.message)
    return EXIT_OK


def cmd_logs(args: argparse.Namespace, c: Client) -> int:
    import json
    import time

    from shared.protocol import JobLogs, LogChunk

    def show(chunk: LogChunk) -> None:
        if args.json:
            sys.stdout.write(json.dumps(output.every_field(chunk), ensure_ascii=False) + "\n")
        else:
            sys.stdout.write(chunk.text)
        sys.stdout.flush()

    chunk = c.call(JobLogs(job_id=args.id, tail=args.tail), LogChunk)
    show(chunk)
    while args.follow and not chunk.finished:
        # the log is a file the daemon appends to; polling it by offset keeps the daemon free of
        # per-client state and works the same for the job's own lines and its child's output
        time.sleep(0.3)
        chunk = c.call(JobLogs(job_id=args.id, offset=chunk.offset), LogChunk)
        if chunk.text or chunk.finished:
            show(chunk)
    if args.follow:
        chunk = c.call(JobLogs(job_id=args.id, offset=chunk.offset), LogChunk)
        if chunk.text:
            show(chunk)
    return EXIT_OK


def cmd_events(args: argparse.Namespace, c: Client) -> int:
    import json
    import time

    from shared.protocol import Heartbeat, JobChanged

    topics = tuple(args.topic) if args.topic else ("",)
    try:
        for ev in c.events(topics):
            if not args.heartbeats and isinstance(ev.body, Heartbeat):
                continue
            if args.json:
                sys.stdout.write(json.dumps(output.every_field(ev), ensure_ascii=False) + "\n")
            else:
                kind = type(ev.body).__name__
                detail = getattr(ev.body, "what", "") or ""
                summary = f"job {ev.body.job.id} {ev.body.job.state}" if isinstance(ev.body, JobChanged) else ""
                sys.stdout.write(f"{ev.seq:>8} {time.strftime('%H:%M:%S', time.localtime(ev.ts))} {kind:<14} "
                                 f"{summary} {detail}\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_pause(args: argparse.Namespace, c: Client) -> int:
    from shared.protocol import Done, PauseQueue

    return _done(args, c.call(PauseQueue(), Done))


def cmd_resume(args: argparse.Namespace, c: Client) -> int:
    from shared.protocol import Done, ResumeQueue

    return _done(args, c.call(ResumeQueue(), Done))


class _Version(argparse.Action):
    """``--version``: the installed package's version, read only when asked (importlib.metadata is slow)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("ftmllm")
        except PackageNotFoundError:
            v = "unknown (not installed: `pip install -e .`)"
        sys.stdout.write(f"ftctl {v}\n")
        parser.exit()


# --------------------------------------------------------------------------------------------- parser


def _add_filters(sp: argparse.ArgumentParser, states_help: str) -> None:
    sp.add_argument("--mine", action="store_true", help="your own jobs")
    sp.add_argument("--user", "-u", action="append", metavar="USER", help="jobs of USER (repeatable)")
    sp.add_argument("--state", "-s", action="append", choices=queue.STATES, help=states_help)
    sp.add_argument("--kind", "-k", action="append", metavar="KIND",
                    help="jobs of this kind: ocr, train, eval, export, selftest (repeatable)")


def add_core_commands(sub: Subparsers) -> Subparsers:
    """The commands of this module and queue.py; returns ``submit``'s subparsers for the job kinds."""

    def add(name: str, fn: Command, help: str, description: str = "") -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=description or help)
        sp.set_defaults(fn=fn)
        return sp

    sp = add("status", cmd_status, "daemon, engine, GPUs and queue at a glance")
    add_json_flag(sp)
    sp = add("jobs", queue.cmd_jobs, "list queued and running jobs (--all: finished ones too), filtered",
             "List jobs, oldest first. Filters are applied by the daemon; each filter given must match "
             "(repeat one for any of several values). Naming a finished state with --state lists finished "
             "jobs without --all. -q prints ids only, for scripts: ftctl cancel $(ftctl jobs -q --mine).")
    sp.add_argument("--all", "-a", action="store_true", help="finished jobs too")
    sp.add_argument("--limit", type=int, default=200, metavar="N", help="the newest N jobs (default 200; 0: all)")
    _add_filters(sp, "jobs in this state (repeatable)")
    sp.add_argument("--quiet", "-q", action="store_true", help="print only the job ids, one a line")
    add_json_flag(sp)
    sp = add("show", cmd_show, "one job: spec, progress, error, artifacts, history")
    sp.add_argument("id", type=int, help=ID_HELP)
    add_json_flag(sp)

    submit = sub.add_parser("submit", help="submit a job (ocr, selftest, …)", description="Submit a job.")
    kinds = submit.add_subparsers(dest="kind", required=True, metavar="KIND")
    sp = kinds.add_parser("selftest", help="a job that only emits progress: checks a daemon end to end",
                          description="A job that only emits progress. Keys: steps (10), rate (10/s; 0: as fast "
                          "as possible), deltas (0), fail (false), hold (false), resume (true).")
    sp.set_defaults(fn=cmd_submit_generic)
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    add_submit_flags(sp)

    sp = add("wait", queue.cmd_wait, "wait until jobs end; the exit code is the worst end's",
             "Wait until every job named has ended (followed through the daemon's events, no polling). "
             "Exit 0: all succeeded; 1: one failed; 5: none failed but one was canceled or is left "
             "interrupted; 2: no such job.")
    sp.add_argument("ids", type=int, nargs="+", metavar="ID", help=ID_HELP)
    sp.add_argument("--quiet", "-q", action="store_true", help="print nothing while waiting or at the end")
    add_json_flag(sp)
    sp = add("cancel", queue.cmd_cancel, "cancel jobs: by id, or all of yours (--mine), by --state/--user/--kind",
             "Cancel queued or running jobs (yours, unless you are an admin): the ids given, or every job the "
             "filters match (default states: queued and running). More than one job is confirmed on a "
             "terminal unless -y; without a terminal, -y is needed. A job that has already ended is a note, "
             "exit 0.")
    sp.add_argument("ids", type=int, nargs="*", metavar="ID", help=ID_HELP)
    _add_filters(sp, "cancel jobs in this state: queued, running (repeatable; default both)")
    sp.add_argument("--yes", "-y", action="store_true", help="do not ask before cancelling several jobs")
    sp.add_argument("--wait", action="store_true", help="wait until they have stopped")
    add_json_flag(sp)
    sp = add("rm", queue.cmd_rm, "forget finished jobs (the files they wrote stay)",
             "Remove finished jobs from the daemon's store: their row, history, pages and loss points. The files "
             "they wrote (outbox Markdown, adapters, logs in the job's folder) stay. Yours, unless you are an "
             "admin; all named or none.")
    sp.add_argument("ids", type=int, nargs="+", metavar="ID", help=ID_HELP)
    sp.add_argument("--yes", "-y", action="store_true", help="do not ask before removing several jobs")
    add_json_flag(sp)
    sp = add("clean", queue.cmd_clean, "forget your finished jobs older than a duration (an admin's: everyone's)",
             "Remove every finished job of yours (an admin: of everyone) that ended longer ago than "
             "--older-than. The files they wrote stay.")
    sp.add_argument("--older-than", dest="older_than", required=True, metavar="DURATION",
                    help="e.g. 90s, 15m, 12h, 7d, 2w; 0 removes every finished job")
    add_json_flag(sp)
    sp = add("priority", queue.cmd_priority, "change a queued or running job's priority",
             "Change a job's priority: higher starts first (and gets engine slots first); equal priorities "
             "keep submit order. Yours, unless you are an admin.")
    sp.add_argument("id", type=int, help=ID_HELP)
    sp.add_argument("priority", type=int, metavar="N", help="-100..100; 0 is every job's default")
    add_json_flag(sp)
    sp = add("retry", cmd_retry, "queue a failed, canceled or interrupted job again")
    sp.add_argument("id", type=int, help=ID_HELP)
    add_json_flag(sp)
    sp = add("logs", cmd_logs, "print a job's log (-f: follow until the job ends)")
    sp.add_argument("id", type=int, help=ID_HELP)
    sp.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    sp.add_argument("-n", "--tail", type=int, default=50, metavar="N", help="lines from the end (default 50)")
    add_json_flag(sp)
    sp = add("events", cmd_events, "live tail of the daemon's events (Ctrl-C to stop)")
    sp.add_argument("--topic", action="append", help="topic prefix: job.12, ocr.12, train.12, engine, gpu")
    sp.add_argument("--json", action="store_true", help="one JSON object (an Event) a line")
    sp.add_argument("--heartbeats", action="store_true", help="show heartbeats too")
    sp = add("pause", cmd_pause, "pause the queue: running jobs go on, queued ones wait (admins)")
    add_json_flag(sp)
    sp = add("resume", cmd_resume, "resume the queue (admins)")
    add_json_flag(sp)
    sp = sub.add_parser("__complete")  # no help: hidden; what the completion scripts call
    sp.set_defaults(fn=queue.cmd_complete)
    sp.add_argument("what", choices=("jobs", "active", "templates", "datasets"))
    return kinds


def add_module_commands(sub: Subparsers, kinds: Subparsers) -> None:
    """The commands the other modules bring, imported only when one of them runs (or for help and
    completion). A new module adds one line here."""
    from tui.ftctl import completion, engine, ocr, quality, service, train

    ocr.add_parser(kinds)
    train.add_submit_parsers(kinds)
    service.add_parser(sub)
    train.add_parsers(sub)
    quality.add_parsers(sub)
    engine.add_parser(sub)
    completion.add_parser(sub, build_parser)


def build_parser(quick: bool = False) -> argparse.ArgumentParser:
    """Every command; with ``quick`` only the core ones (enough to parse a core command's line)."""
    p = argparse.ArgumentParser(
        prog="ftctl",
        description="Drive ftmllmd from the shell: list, submit, follow, wait for and cancel jobs.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action=_Version, nargs=0, help="print ftctl's version and exit")
    p.add_argument("--config", help="the daemon's TOML config (to find its sockets)")
    p.add_argument("--home", help="the daemon's --home dir (what `make run` uses: ./.ftmllm)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer (default 10)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    kinds = add_core_commands(sub)
    if not quick:
        add_module_commands(sub, kinds)
        _json_help(p)
    return p


def _json_help(parser: argparse.ArgumentParser) -> None:
    """Every ``--json`` says what it does, whichever module added it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in set(action.choices.values()):
                _json_help(sp)
        elif action.dest == "json" and not action.help:
            action.help = JSON_HELP


def command_word(argv: list[str]) -> str:
    """The command of a command line ("" when there is none), found without a parser."""
    it = iter(argv)
    for word in it:
        if word in GLOBAL_OPTIONS_WITH_VALUE:
            next(it, None)
        elif not word.startswith("-"):
            return word
    return ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(quick=command_word(argv) in QUICK and "-h" not in argv and "--help" not in argv)
    args = parser.parse_args(argv)
    local = getattr(args, "local", None)
    if local is not None:
        return int(local(args))
    from shared.client import Client, DaemonUnavailable, RemoteError
    from shared.config import ConfigError, load_settings

    try:
        settings = load_settings(args.config, args.home, client=True)
    except ConfigError as exc:
        if args.fn is queue.cmd_complete:  # a prompt shows no errors
            return EXIT_OK
        note(f"ftctl: {exc}")
        return EXIT_USAGE
    client = Client(settings.paths, timeout=args.timeout)
    try:
        return int(args.fn(args, client))
    except DaemonUnavailable as exc:
        if args.fn is queue.cmd_complete:
            return EXIT_OK
        note(f"ftctl: {exc}")
        return EXIT_NO_DAEMON
    except RemoteError as exc:
        note(f"ftctl: {exc.message}")  # messages name config keys like [train] …
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
