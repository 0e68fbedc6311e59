"""Training: loss curves of one or more runs overlaid — raw loss faint, EMA-smoothed bright, eval loss as
markers — with the learning rate below, x by step or by time, live as TrainProgress events arrive."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from rich.text import Text
from textual import on
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.timer import Timer
from textual.widget import Widget
from textual.widgets import SelectionList, Static
from textual.widgets.selection_list import Selection

from shared.protocol import JobInfo, TrainPoint
from tui.format import STATE_STYLE, duration
from tui.screens.base import FtScreen
from tui.state import Changes
from tui.widgets.chart import LineChart, Series, ema, fmt_num

RUN_COLORS = ("cyan", "magenta", "yellow", "green", "bright_blue", "red")
TRAIN_KINDS = ("train",)
SMOOTHING_STEPS = (0.0, 0.3, 0.6, 0.8, 0.9, 0.95, 0.99)
DRAW_INTERVAL_S = 0.25


def x_of(p: TrainPoint, first: TrainPoint, by_time: bool) -> float:
    if not by_time:
        return float(p.step)
    if p.elapsed_s is not None:
        return p.elapsed_s
    return p.ts - first.ts


STATE_GLYPH = {"running": "▶", "queued": "…", "succeeded": "✓", "failed": "✗", "canceled": "⊘",
               "interrupted": "!"}


def run_label(job: JobInfo) -> Text:
    return Text.assemble((STATE_GLYPH.get(job.state, "?") + " ", STATE_STYLE.get(job.state, "")),
                         (f"{job.id} ", "bold"), (job.name[:15], ""))


class TrainingScreen(FtScreen):
    MODE = "training"
    HELP = ("Training runs: space ticks a run to overlay it (colours match the legend). Faint lines are the raw "
            "loss, bright ones its EMA (TensorBoard's smoothing, + and - change it), dots are eval loss; the "
            "lower chart is the learning rate. x switches the x axis between step and time. t submits a new "
            "run from a template; d puts a finished run's adapter into the engine.")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("x", "toggle_x", "x: step/time"),
        Binding("plus,equals_sign", "smooth(1)", "Smooth+"),
        Binding("minus", "smooth(-1)", "Smooth-"),
        Binding("d", "app.deploy_job", "Deploy", tooltip="serve the highlighted finished run's adapter"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.by_time = False
        self.smoothing_index = 2
        self._options: list[tuple[int, str, str]] = []
        self._chosen: set[int] = set()
        self._touched = False
        self.highlighted: int | None = None
        self._draw_timer: Timer | None = None

    def compose_body(self) -> Iterable[Widget]:
        with Horizontal(id="train-body"):
            with Vertical(id="train-runs-box"):
                yield Static("Runs (space: overlay)", classes="section-title")
                yield SelectionList[int](id="train-runs")
            with Vertical(id="train-charts"):
                yield Static(id="train-legend")
                yield LineChart(id="train-loss", empty="no loss points yet: pick a training run on the left")
                yield Static("learning rate", id="train-lr-title", classes="section-title")
                yield LineChart(id="train-lr", empty="no learning-rate points yet")
                yield Static(id="train-stats")

    def on_mount(self) -> None:
        self.query_one(SelectionList).focus()

    def focus_target(self) -> Widget:
        return self.query_one(SelectionList)

    def runs(self) -> list[JobInfo]:
        return [j for j in self.st.jobs_by_recency() if j.kind in TRAIN_KINDS]

    async def refresh_all(self) -> None:
        self._sync_runs()
        for job in self.runs():
            if job.id in self._chosen:
                self.host.want_train(job.id)
        self._draw()

    async def on_changes(self, changes: Changes) -> None:
        redraw = False
        if changes.jobs:
            redraw = self._sync_runs()
        if changes.train & (self._chosen | {self.highlighted or -1}):
            redraw = True
        if redraw and self._draw_timer is None:
            # a live run adds a point per step: the charts redraw at most 4 times a second
            self._draw_timer = self.set_timer(DRAW_INTERVAL_S, self._draw)

    @property
    def settling(self) -> bool:
        return self._draw_timer is not None

    def _sync_runs(self) -> bool:
        runs = self.runs()
        if not self._touched:
            # until the user picks: the newest run and every running one
            self._chosen = {j.id for j in runs if j.state == "running"} | ({runs[0].id} if runs else set())
        options: list[tuple[int, str, str]] = [(j.id, str(j.state), j.name) for j in runs]
        if options == self._options:
            return False
        self._options = options
        sel = self.query_one(SelectionList)
        keep = sel.highlighted
        with self.prevent(SelectionList.SelectedChanged):
            sel.clear_options()
            sel.add_options([Selection(run_label(j), j.id, j.id in self._chosen) for j in runs])
        if runs:
            sel.highlighted = min(keep or 0, len(runs) - 1)
        return True

    @on(SelectionList.SelectedChanged, "#train-runs")
    def _runs_chosen(self, event: SelectionList.SelectedChanged[int]) -> None:
        self._touched = True
        self._chosen = set(event.selection_list.selected)
        for job_id in self._chosen:
            self.host.want_train(job_id)
        self._draw()

    @on(SelectionList.SelectionHighlighted, "#train-runs")
    def _run_highlighted(self, event: SelectionList.SelectionHighlighted[int]) -> None:
        self.highlighted = event.selection.value
        self.host.want_train(self.highlighted)
        self._stats()

    def selected_job(self) -> JobInfo | None:
        return self.st.job(self.highlighted)

    def action_toggle_x(self) -> None:
        self.by_time = not self.by_time
        self._draw()

    def action_smooth(self, delta: int) -> None:
        self.smoothing_index = max(0, min(len(SMOOTHING_STEPS) - 1, self.smoothing_index + delta))
        self._draw()

    # -------------------------------------------------------------------------------- charts

    def _draw(self) -> None:
        if self._draw_timer is not None:
            self._draw_timer.stop()
            self._draw_timer = None
        weight = SMOOTHING_STEPS[self.smoothing_index]
        loss: list[Series] = []
        lr: list[Series] = []
        legend = Text(no_wrap=True, overflow="ellipsis")
        order = [j for j in self.runs() if j.id in self._chosen]
        for i, job in enumerate(order):
            color = RUN_COLORS[i % len(RUN_COLORS)]
            pts = self.st.train_series(job.id)
            if not pts:
                continue
            first = pts[0]
            lp = [(x_of(p, first, self.by_time), p.loss) for p in pts if p.loss is not None]
            if lp:
                loss.append(Series(lp, color, dim=True, dots=True))
                sm = ema([y for _, y in lp], weight)
                loss.append(Series([(x, y) for (x, _), y in zip(lp, sm, strict=True)], color))
            ev = [(x_of(p, first, self.by_time), p.eval_loss) for p in pts if p.eval_loss is not None]
            if ev:
                loss.append(Series(ev, "white", markers=True))
            lrp = [(x_of(p, first, self.by_time), p.lr) for p in pts if p.lr is not None]
            if lrp:
                lr.append(Series(lrp, color))
            legend.append("━ ", style=color)
            legend.append(f"{job.id} ", style="bold")
            last = next((p.loss for p in reversed(pts) if p.loss is not None), None)
            if last is not None:
                legend.append(f"{last:.3f}  ")
        legend.append(f"· EMA {weight:g} (+/-) · x: {'time' if self.by_time else 'step'} (x) · ● eval",
                      style="dim")
        xf = duration if self.by_time else (lambda v: f"{v:.0f}")
        self.query_one("#train-legend", Static).update(legend)
        self.query_one("#train-loss", LineChart).set_series(loss, x_fmt=xf)
        self.query_one("#train-lr", LineChart).set_series(lr, x_fmt=xf, y_floor=0.0)
        self._stats()

    def _stats(self) -> None:
        job = self.st.job(self.highlighted) if self.highlighted is not None else None
        stats = self.query_one("#train-stats", Static)
        if job is None:
            stats.update(Text("no training runs yet: press t to submit one from a template", style="dim")
                         if not self.runs() else "")
            return
        pts = self.st.train_series(job.id)
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(f"job {job.id} ", style="bold")
        t.append(job.state, style=STATE_STYLE.get(job.state, ""))
        if pts:
            last = pts[-1]
            t.append(f"  step {last.step}/{last.total_steps or '?'}")
            lp = [p.loss for p in pts if p.loss is not None]
            if lp:
                smooth = ema(lp, SMOOTHING_STEPS[self.smoothing_index])[-1]
                t.append(f"  loss {lp[-1]:.4f} (ema {smooth:.4f})")
            ev = [p.eval_loss for p in pts if p.eval_loss is not None]
            if ev:
                t.append(f"  eval {ev[-1]:.4f}")
            lr = next((p.lr for p in reversed(pts) if p.lr is not None), None)
            if lr is not None:
                t.append(f"  lr {fmt_num(lr)}")
            if last.epoch is not None:
                t.append(f"  epoch {last.epoch:.2f}")
            if last.remaining_s:
                t.append(f"  eta {duration(last.remaining_s)}")
        else:
            t.append("  no loss points yet", style="dim")
        if job.error:
            t.append(f"  {job.error}", style="red")
        stats.update(t)
