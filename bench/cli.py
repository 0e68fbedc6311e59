"""ftctl start-up benchmark (issue 16): wall time of the whole ``ftctl`` process, as a shell or a prompt runs it,
against a real daemon whose real store holds 1,000 jobs.

Goals: ``ftctl status`` < 150 ms, ``ftctl jobs --json`` (all 1,000 jobs: ``--all --limit 0``) < 300 ms; each
the median of 20 runs. Where the time goes: ``python -X importtime -m tui.ftctl status``.
Last line: ``status_ms=… jobs_json_ms=…`` (bench/metrics.py measures the scrape).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.protocol import JobDetail, JobList, ListJobs, Submit
from tests.daemon_proc import ROOT, DaemonProc, wait_for

JOBS = 1000
RUNS = 20


def fill(d: DaemonProc) -> None:
    """1,000 finished selftest jobs, submitted like any client would."""
    c = d.client(timeout=30)
    for _ in range(JOBS):
        c.call(Submit(kind="selftest", spec={"steps": 1, "rate": 0}), JobDetail)
    wait_for(lambda: all(j.state == "succeeded" for j in c.call(ListJobs(all=True, limit=0), JobList).jobs),
             120, "1,000 jobs to finish", interval=0.2)


def timed(argv: list[str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the process, its stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=False)
    spent = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return spent, cpu, r.stdout


def median_ms(argv: list[str]) -> tuple[float, float, float, str]:
    """Median wall ms, p90 wall ms, median CPU ms (what the machine's load does not change much), stdout."""
    timed(argv)  # one warm-up: bytecode and page cache, as on a machine where ftctl runs every day
    runs = [timed(argv) for _ in range(RUNS)]
    walls = sorted(w for w, _, _ in runs)
    cpu = statistics.median(c for _, c, _ in runs)
    return statistics.median(walls) * 1000, walls[int(0.9 * len(walls))] * 1000, cpu * 1000, runs[-1][2]


def main() -> None:
    d = DaemonProc().start()
    try:
        fill(d)
        ftctl = [sys.executable, "-m", "tui.ftctl", "--home", str(d.home)]
        env_note = f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f}"
        status_ms, status_p90, status_cpu, _ = median_ms([*ftctl, "status"])
        jobs_ms, jobs_p90, jobs_cpu, text = median_ms([*ftctl, "jobs", "--json", "--all", "--limit", "0"])
        listed = len(json.loads(text))
        assert listed == JOBS, f"ftctl jobs --json listed {listed} jobs, not {JOBS}"
        bare_ms, _, bare_cpu, _ = median_ms([sys.executable, "-c", "pass"])
    finally:
        d.close()
    print(f"{env_note}; median of {RUNS} whole-process runs, {JOBS} jobs in the store (wall, and the "
          "process's own CPU time, which other load changes less)")
    print(f"python -c pass           {bare_ms:6.0f} ms   cpu {bare_cpu:4.0f} ms   (the interpreter alone)")
    print(f"ftctl status             {status_ms:6.0f} ms   cpu {status_cpu:4.0f} ms   p90 {status_p90:.0f} ms"
          "   (goal < 150)")
    print(f"ftctl jobs --json (all)  {jobs_ms:6.0f} ms   cpu {jobs_cpu:4.0f} ms   p90 {jobs_p90:.0f} ms"
          "   (goal < 300)")
    print(f"status_ms={status_ms:.0f} jobs_json_ms={jobs_ms:.0f}")


if __name__ == "__main__":
    main()
