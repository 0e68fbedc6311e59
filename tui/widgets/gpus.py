"""Per-GPU memory and utilisation bars, each with the jobs (and users) holding it."""

from __future__ import annotations

from rich.text import Text

from shared.protocol import GpuInfo, JobInfo
from tui.format import bar, mib
from tui.widgets.live_static import LiveStatic


def util_style(frac: float) -> str:
    return "red" if frac >= 0.9 else "yellow" if frac >= 0.6 else "green"


def gpu_owners(gpu: GpuInfo, jobs: dict[int, JobInfo]) -> str:
    """Who holds the GPU: ftmllm jobs with their owners, the engine, and processes the daemon does not own."""
    parts: list[str] = []
    for jid in gpu.job_ids:
        j = jobs.get(jid)
        parts.append(f"job {jid} {j.kind} ({j.owner})" if j else f"job {jid}")
    if gpu.engine:
        parts.append("engine")
    for p in gpu.processes:
        if p.job_id is None:
            parts.append(f"pid {p.pid}({p.user or '?'}) {mib(p.used_mib)}")
    return ", ".join(parts) or "idle"


def gpu_text(gpus: list[GpuInfo], note: str, jobs: dict[int, JobInfo], width: int) -> Text:
    t = Text(no_wrap=True, overflow="ellipsis")
    if not gpus:
        t.append("GPUs  ", style="bold")
        t.append(note or "none reported", style="dim")
        return t
    wide = width >= 120
    bar_w = 20 if wide else 10
    for i, g in enumerate(gpus):
        if i:
            t.append("\n")
        mem = g.mem_used_mib / g.mem_total_mib if g.mem_total_mib else 0.0
        util = g.util_pct / 100.0
        name = g.name.replace("NVIDIA ", "")
        t.append(f"GPU{g.index} ", style="bold")
        if wide:
            t.append(f"{name[:22]:<22} ", style="dim")
        t.append("mem ")
        t.append(bar(mem, bar_w), style=util_style(mem))
        t.append(f" {mib(g.mem_used_mib):>5}/{mib(g.mem_total_mib):<5} ")
        t.append("util ")
        t.append(bar(util, bar_w // 2), style=util_style(util))
        t.append(f" {g.util_pct:3.0f}% ")
        t.append(gpu_owners(g, jobs), style="cyan")
    if note:
        t.append("\n")
        t.append(note, style="dim")
    return t


class GpuPanel(LiveStatic):
    DEFAULT_CSS = """
    GpuPanel { height: auto; max-height: 10; padding: 0 1; text-wrap: nowrap; text-overflow: ellipsis; }
    """

    _last: tuple[list[GpuInfo], str, dict[int, JobInfo]] | None = None

    def on_resize(self) -> None:
        if self._last is not None:
            self.show(*self._last)

    def show(self, gpus: list[GpuInfo], note: str, jobs: dict[int, JobInfo]) -> None:
        self._last = (gpus, note, jobs)
        self.show_content(gpu_text(gpus, note, jobs, self.size.width or self.app.size.width))
