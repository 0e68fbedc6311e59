"""Small text formatters shared by the screens. Every one that depends on the time takes ``now`` so the
snapshot tests can freeze the clock."""

from __future__ import annotations

import time

from shared.protocol import JobInfo

STATE_STYLE = {
    "queued": "yellow",
    "running": "cyan",
    "succeeded": "green",
    "failed": "red",
    "canceled": "magenta",
    "interrupted": "yellow",
}


def ago(ts: float | None, now: float) -> str:
    if not ts:
        return "-"
    d = max(0.0, now - ts)
    if d < 60:
        return f"{d:.0f}s ago"
    if d < 3600:
        return f"{d / 60:.0f}m ago"
    if d < 86400:
        return f"{d / 3600:.1f}h ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def duration(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def clock_time(ts: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "-"


def progress_text(job: JobInfo) -> str:
    p = job.progress
    if p.total:
        pct = 100.0 * p.done / p.total if p.total else 0.0
        text = f"{p.done:g}/{p.total:g} {p.unit} {pct:.0f}%"
        if job.state == "running" and p.eta_s is not None:
            text += f" eta {duration(p.eta_s)}"
        return text
    return p.note or "-"


def run_time(job: JobInfo, now: float) -> str:
    """How long the job ran (or has been running)."""
    if not job.started:
        return "-"
    return duration((job.finished or now) - job.started)


def bar(fraction: float, width: int) -> str:
    """A text bar of ``width`` cells with eighth-block resolution."""
    fraction = min(1.0, max(0.0, fraction))
    eighths = round(fraction * width * 8)
    full, part = divmod(eighths, 8)
    partial = " ▏▎▍▌▋▊▉"[part] if part else ""
    return ("█" * full + partial).ljust(width)[:width]


def mib(value: float) -> str:
    return f"{value / 1024:.1f}G" if value >= 1024 else f"{value:.0f}M"
