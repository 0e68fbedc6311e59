"""The one loop that follows a job until it ends, for every ``--wait`` and ``--follow``.

Each command brings a :class:`View` (what to show while the job runs: history lines, a progress bar, loss
points, the page being converted); :func:`follow` does the part that is easy to get wrong once per command:
subscribe first, then ask for the job's state, and ask again when the first message proves the subscription
live (ZeroMQ joins a subscriber a moment after it connects), so that a job ending in between cannot leave
ftctl waiting forever.
"""

from __future__ import annotations

from shared.client import Client
from shared.protocol import TERMINAL_STATES, EventBody, JobChanged, JobDetail, JobInfo, ShowJob
from tui.ftctl.output import err


class View:
    """What a command shows while it follows a job. This one prints the job's history lines on stderr
    (nothing with ``quiet``); subclasses add a progress bar or stream what the job produces."""

    def __init__(self, *, quiet: bool = False) -> None:
        self.quiet = quiet

    def topics(self, job_id: int) -> tuple[str, ...]:
        """Event topics to follow besides the job's own (``job.N``)."""
        return ()

    def open(self, job: JobInfo) -> None:
        """The job is not over yet: start showing it."""

    def job_changed(self, job: JobInfo, what: str) -> None:
        if what and not self.quiet:
            err.print(f"job {job.id}: {what}", markup=False)

    def event(self, body: EventBody) -> None:
        """Any other event of :meth:`topics` (heartbeats included)."""

    def close(self) -> None:
        """The job ended (or ftctl was interrupted): stop showing it."""


def follow(c: Client, job_id: int, view: View) -> JobInfo:
    """Show the job through ``view`` until it ends; returns it as it ended."""
    events = c.events((f"job.{job_id}", *view.topics(job_id)))
    job = _show(c, job_id)
    if job.state in TERMINAL_STATES:
        return job
    view.open(job)
    try:
        live = False
        for ev in events:
            body = ev.body
            if isinstance(body, JobChanged) and body.job.id == job_id:
                job = body.job
                view.job_changed(job, body.what)
            else:
                if not live:
                    # what happened before this first message is in the answer
                    job = _show(c, job_id)
                    view.job_changed(job, "")
                view.event(body)
            live = True
            if job.state in TERMINAL_STATES:
                break
    finally:
        view.close()
    return job


def _show(c: Client, job_id: int) -> JobInfo:
    return c.call(ShowJob(job_id=job_id), JobDetail).job

