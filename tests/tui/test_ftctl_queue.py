"""ftctl's queue commands (issue 16) as scripts use them: the real CLI in a subprocess against a real daemon
and its real store — wait, cancel of several jobs, filters, rm/clean, priority, --json on every command,
--version, the one --set syntax and the help text of every option."""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest

from shared.protocol import JobDetail, JobInfo, JobList, ListJobs, ShowJob, Submit
from tests.daemon_proc import ROOT, DaemonProc, wait_for
from tui.ftctl.main import build_parser

DEADLINE_S = 60.0


def ftctl(home: Path, *args: str, timeout: float = DEADLINE_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tui.ftctl", "--home", str(home), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL)


def submit(d: DaemonProc, **spec: object) -> JobInfo:
    return d.client().call(Submit(kind="selftest", spec={"rate": 0, **spec}), JobDetail).job


def state(d: DaemonProc, job_id: int) -> str:
    return d.client().call(ShowJob(job_id=job_id), JobDetail).job.state


def ended(d: DaemonProc, job_id: int, wanted: str = "succeeded") -> None:
    wait_for(lambda: state(d, job_id) == wanted, DEADLINE_S, f"job {job_id} {wanted}")


def running(d: DaemonProc, job_id: int) -> None:
    wait_for(lambda: state(d, job_id) == "running", DEADLINE_S, f"job {job_id} running")


# ------------------------------------------------------------------------------------------------ wait


def test_wait_returns_when_the_jobs_end_with_the_worst_ones_exit_code(daemon: DaemonProc) -> None:
    ok = submit(daemon, steps=1)
    ended(daemon, ok.id)
    assert ftctl(daemon.home, "wait", str(ok.id)).returncode == 0

    held = submit(daemon, steps=1, hold=True)
    running(daemon, held.id)
    waiting = subprocess.Popen([sys.executable, "-m", "tui.ftctl", "--home", str(daemon.home), "wait", "--json",
                                str(ok.id), str(held.id)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=3)  # a job still runs: wait must not return
        assert ftctl(daemon.home, "cancel", str(held.id)).returncode == 0
        stdout, _ = waiting.communicate(timeout=DEADLINE_S)
    finally:
        waiting.kill()
    assert waiting.returncode == 5  # canceled, none failed
    assert [(j["id"], j["state"]) for j in json.loads(stdout)] == [(ok.id, "succeeded"), (held.id, "canceled")]

    # a job that fails while wait follows it: 1, the worst of succeeded, canceled and failed
    failing = submit(daemon, steps=20, rate=10, fail=True)
    r = ftctl(daemon.home, "wait", str(ok.id), str(held.id), str(failing.id))
    assert r.returncode == 1, r.stderr
    assert f"job {failing.id} failed" in r.stderr
    assert ftctl(daemon.home, "wait", "9999").returncode == 2


def test_wait_sees_a_job_left_interrupted_by_a_daemon_restart(daemon: DaemonProc) -> None:
    stuck = submit(daemon, steps=1, hold=True, resume=False)  # stays interrupted after a restart
    running(daemon, stuck.id)
    waiting = subprocess.Popen([sys.executable, "-m", "tui.ftctl", "--home", str(daemon.home), "wait",
                                str(stuck.id)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=3)
        daemon.kill9()
        daemon.start()  # the same store: the job is marked interrupted, and wait hears of the new session
        _, stderr = waiting.communicate(timeout=DEADLINE_S)
    finally:
        waiting.kill()
    assert waiting.returncode == 5, stderr
    assert f"job {stuck.id} interrupted" in stderr


# ---------------------------------------------------------------------------------------------- cancel


def test_cancel_several_by_filter_confirm_and_finished_is_a_note(daemon: DaemonProc) -> None:
    done = submit(daemon, steps=1)
    ended(daemon, done.id)
    r = ftctl(daemon.home, "cancel", str(done.id))
    assert r.returncode == 0 and "already succeeded" in r.stderr and "note" in r.stderr

    held = submit(daemon, steps=1, hold=True)
    running(daemon, held.id)
    assert ftctl(daemon.home, "pause").returncode == 0  # the test runs as root: an admin
    queued = [submit(daemon, steps=1), submit(daemon, steps=1)]
    # two jobs and no terminal: refused with the fix, nothing canceled
    r = ftctl(daemon.home, "cancel", "--state", "queued")
    assert r.returncode == 2 and "-y" in r.stderr
    assert [state(daemon, j.id) for j in queued] == ["queued", "queued"]

    r = ftctl(daemon.home, "cancel", "--state", "queued", "-y", "--json")
    assert r.returncode == 0, r.stderr
    assert sorted(x["id"] for x in json.loads(r.stdout)) == [j.id for j in queued]
    assert all(x["result"] == "canceling" for x in json.loads(r.stdout))
    assert [state(daemon, j.id) for j in queued] == ["canceled", "canceled"]
    assert state(daemon, held.id) == "running"  # not queued: left alone

    r = ftctl(daemon.home, "cancel", str(held.id), "--wait")
    assert r.returncode == 0 and state(daemon, held.id) == "canceled"
    assert ftctl(daemon.home, "cancel", "424242").returncode == 2
    assert ftctl(daemon.home, "cancel").returncode == 2  # names no job


def test_cancelling_several_asks_on_a_terminal(daemon: DaemonProc) -> None:
    held = [submit(daemon, steps=1, hold=True), submit(daemon, steps=1, hold=True)]
    for job in held:
        running(daemon, job.id)
    for answer, code, states in (("n", 1, ["running", "running"]), ("y", 0, ["canceled", "canceled"])):
        master, slave = os.openpty()
        try:
            proc = subprocess.Popen([sys.executable, "-m", "tui.ftctl", "--home", str(daemon.home), "cancel",
                                     "--mine"], cwd=ROOT, stdin=slave, stderr=slave, stdout=subprocess.PIPE)
            seen = b""
            deadline = time.monotonic() + DEADLINE_S
            while b"[y/N]" not in seen:
                assert time.monotonic() < deadline and proc.poll() is None, seen
                if select.select([master], [], [], 1)[0]:
                    seen += os.read(master, 1024)
            assert b"cancel 2 jobs" in seen
            os.write(master, answer.encode() + b"\n")
            assert proc.wait(DEADLINE_S) == code
        finally:
            os.close(master)
            os.close(slave)
        for job in held:
            if states[0] == "canceled":
                ended(daemon, job.id, "canceled")
        assert [state(daemon, j.id) for j in held] == states


# ------------------------------------------------------------------------------------ filters, rm, clean


def test_jobs_filters_ids_only_and_rm_clean_keep_outputs(daemon: DaemonProc) -> None:
    ok = submit(daemon, steps=1)
    bad = submit(daemon, steps=1, fail=True)
    ended(daemon, ok.id)
    ended(daemon, bad.id, "failed")
    held = submit(daemon, steps=1, hold=True)
    running(daemon, held.id)

    def ids(*args: str) -> list[int]:
        r = ftctl(daemon.home, "jobs", "-q", *args)
        assert r.returncode == 0, r.stderr
        return [int(x) for x in r.stdout.split()]

    assert ids() == [held.id]  # active only
    assert ids("--all") == [ok.id, bad.id, held.id]
    assert ids("--state", "failed") == [bad.id]  # a finished state lists finished jobs without --all
    assert ids("--state", "failed", "--state", "succeeded") == [ok.id, bad.id]
    assert ids("--all", "--kind", "selftest", "--user", "root") == [ok.id, bad.id, held.id]
    assert ids("--all", "--kind", "ocr") == []
    assert ids("--all", "--user", "nobody-here") == []
    assert ids("--all", "--mine") == [ok.id, bad.id, held.id]
    assert [j["id"] for j in json.loads(ftctl(daemon.home, "jobs", "--json", "-s", "failed").stdout)] == [bad.id]

    # rm: all named or none; a running job is refused with what to do
    r = ftctl(daemon.home, "rm", str(ok.id), str(held.id), "-y")
    assert r.returncode == 2 and f"ftctl cancel {held.id}" in r.stderr
    assert ids("--all") == [ok.id, bad.id, held.id]
    job_dir = daemon.paths.state_dir / "jobs" / str(ok.id)
    assert job_dir.is_dir()
    output = job_dir / "result.md"  # what a job leaves in its folder (adapters, logs, Markdown)
    output.write_text("kept")
    r = ftctl(daemon.home, "rm", str(ok.id), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["job_ids"] == [ok.id]
    assert ids("--all") == [bad.id, held.id]
    assert output.read_text() == "kept"  # the files a job wrote stay
    assert ftctl(daemon.home, "show", str(ok.id)).returncode == 2

    assert ftctl(daemon.home, "clean", "--older-than", "1d").stdout == ""  # nothing that old
    assert ids("--all") == [bad.id, held.id]
    r = ftctl(daemon.home, "clean", "--older-than", "0", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["job_ids"] == [bad.id]
    assert ids("--all") == [held.id]
    assert ftctl(daemon.home, "clean", "--older-than", "soon").returncode == 2
    # a client's mirror drops removed jobs (the event ftui applies)
    assert [j.id for j in daemon.client().call(ListJobs(all=True), JobList).jobs] == [held.id]


# ------------------------------------------------------------------------------- priority, --set, json


def test_priority_at_submit_and_later(daemon: DaemonProc) -> None:
    r = ftctl(daemon.home, "submit", "selftest", "--set", "hold=true", "--set", "steps=1", "--priority", "3",
              "--json")
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    assert job["priority"] == 3
    r = ftctl(daemon.home, "priority", str(job["id"]), "7", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["job"]["priority"] == 7
    assert ftctl(daemon.home, "priority", str(job["id"]), "1000").returncode == 2
    assert ftctl(daemon.home, "cancel", str(job["id"])).returncode == 0


def test_set_values_are_yaml_and_old_json_values_still_work(daemon: DaemonProc) -> None:
    # JSON literals (what selftest took before) are YAML too; YAML's own spellings work as well
    for sets in (["steps=2", "rate=0.0", "fail=false", "deltas=0"], ["steps=2", "rate=0", "fail=no", "deltas=null"]):
        argv = [a for s in sets for a in ("--set", s)]
        r = ftctl(daemon.home, "submit", "selftest", *argv, "--wait", "--json")
        assert r.returncode == 0, r.stderr
        job = json.loads(r.stdout)
        assert job["state"] == "succeeded" and job["spec"]["steps"] == 2 and job["spec"]["fail"] is False
        assert job["interactive"] is True  # --wait: someone waits for it
    r = ftctl(daemon.home, "submit", "selftest", "--set", "fail=true", "--set", "rate=0", "--wait")
    assert r.returncode == 1
    assert ftctl(daemon.home, "submit", "selftest", "--set", "no-equals-sign").returncode == 2


def test_json_on_every_daemon_command_parses(daemon: DaemonProc) -> None:
    job = submit(daemon, steps=1)
    bad = submit(daemon, steps=1, fail=True)
    ended(daemon, job.id)
    ended(daemon, bad.id, "failed")
    shapes = {
        ("status",): lambda v: v["type"] == "status" and v["counts"] == {"succeeded": 1, "failed": 1},
        ("jobs", "--all"): lambda v: v[0]["id"] == job.id and v[0]["error"] == "",
        ("show", str(job.id)): lambda v: v["job"]["id"] == job.id and v["history"],
        ("wait", str(job.id)): lambda v: v[0]["state"] == "succeeded",
        ("logs", str(job.id)): lambda v: v["type"] == "log" and v["finished"] is True,
        ("cancel", str(job.id)): lambda v: v[0]["result"] == "finished",
        ("retry", str(bad.id)): lambda v: v["type"] == "ok" and "queued again" in v["message"],
        ("pause",): lambda v: v["type"] == "ok",
        ("resume",): lambda v: v["type"] == "ok",
        ("engine", "status"): lambda v: v["type"] == "engine",
        ("clean", "--older-than", "1w"): lambda v: v["job_ids"] == [],
    }
    for args, check in shapes.items():
        r = ftctl(daemon.home, *args, "--json")
        assert r.returncode == 0, (args, r.stderr)
        assert check(json.loads(r.stdout)), (args, r.stdout)


def test_quick_commands_import_neither_the_other_modules_nor_rich_nor_asyncio(daemon: DaemonProc) -> None:
    """What keeps `ftctl status` and `ftctl jobs --json` fast (bench/cli.py measures them)."""
    probe = ("import io, sys, contextlib\n"
             "from tui.ftctl.main import main\n"
             "for argv in (['status'], ['jobs', '--json', '--all'], ['status', '--json']):\n"
             "    with contextlib.redirect_stdout(io.StringIO()):\n"
             "        assert main(['--home', sys.argv[1], *argv]) == 0\n"
             "heavy = [m for m in sys.modules if m.split('.')[0] in ('rich', 'asyncio', 'yaml', 'textual')\n"
             "         or m in ('tui.ftctl.train', 'tui.ftctl.ocr', 'tui.ftctl.engine', 'shared.handover')]\n"
             "print(sorted(heavy))\n")
    r = subprocess.run([sys.executable, "-c", probe, str(daemon.home)], capture_output=True, text=True, cwd=ROOT,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_version_is_the_installed_packages() -> None:
    r = subprocess.run([sys.executable, "-m", "tui.ftctl", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == f"ftctl {version('ftmllm')}"


def test_every_option_and_positional_says_what_it_is() -> None:
    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    if not name.startswith("__"):  # the completion scripts' hidden helper
                        walk(sub, f"{path} {name}")
            elif not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "ftctl")
    assert missing == []
    text = subprocess.run([sys.executable, "-m", "tui.ftctl", "--help"], capture_output=True, text=True,
                          cwd=ROOT).stdout
    assert "YAML" in text and "shared/protocol.py" in text and "5 (wait)" in text
