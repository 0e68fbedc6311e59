"""OCR scores: the ``ocr_eval`` runs side by side (a chart of each run's error rate page by page, and the
metric table of `ftctl ocr-compare`), the highlighted run's pages worst first, and Enter on a page opens its
truth and output side by side with the differing lines marked. Reached from the OCR screen (key ``e``)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Static

from shared.protocol import OcrEvalResult, OcrEvalResultReply
from tui.messages import Replied, RequestFailed
from tui.screens.base import FtScreen
from tui.state import Changes
from tui.widgets.chart import LineChart, Series
from tui.widgets.keyed_table import Cell, Column, KeyedTable
from tui.widgets.score_table import compare_table

KIND = "ocr_eval"
RUN_COLORS = ("cyan", "magenta", "yellow", "green", "bright_blue", "red")
MAX_COMPARED = len(RUN_COLORS)


def pct(v: object) -> str:
    return f"{v * 100:.2f}" if isinstance(v, int | float) else "-"


def score(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, int | float) else "-"


class RunTable(KeyedTable):
    COLUMNS = (Column("cmp", "CMP"), Column("job", "JOB", "right"), Column("name", "NAME", flex=True),
               Column("state", "STATE"), Column("pages", "PAGES", "right"), Column("cer", "CER %", "right"),
               Column("wer", "WER %", "right"), Column("table", "TABLE F1", "right"))


class WorstPages(KeyedTable):
    COLUMNS = (Column("index", "#", "right"), Column("doc", "DOCUMENT", flex=True), Column("page", "PAGE", "right"),
               Column("cer", "CER %", "right"), Column("wer", "WER %", "right"), Column("table", "TABLE F1", "right"),
               Column("method", "METHOD"))


class OcrEvalScreen(FtScreen):
    MODE = "ocr"
    HELP = ("ocr_eval runs (`ftctl ocr-eval`): space marks the runs compared in the chart (CER per page) and the "
            "metric table; the highlighted run's pages below, worst first; Enter on a page shows its truth and "
            "output side by side.")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("space", "toggle_compare", "Compare"),
        Binding("escape", "app.pop_screen", "Back"),
        Binding("tab", "app.focus_next", "Next pane", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.results: dict[int, OcrEvalResultReply] = {}
        self.asked: set[int] = set()
        self.compared: list[int] = []  # job ids, in the order they were marked
        self.unmarked: set[int] = set()  # runs the user took out of the comparison
        self.job_id: int | None = None  # the highlighted run

    def compose_body(self) -> Iterable[Widget]:
        yield RunTable(id="eval-runs")
        with Horizontal(id="eval-compare"):
            yield LineChart(id="eval-chart", empty="no scored run yet: `ftctl ocr-eval DIR` makes one")
            yield Static(id="eval-table")
        yield Static(id="eval-pages-title", classes="section-title")
        yield WorstPages(id="eval-pages")

    def on_mount(self) -> None:
        self.query_one(RunTable).focus()

    def focus_target(self) -> Widget:
        return self.query_one(RunTable)

    async def refresh_all(self) -> None:
        self._sync()

    async def on_changes(self, changes: Changes) -> None:
        if changes.jobs:
            self._sync()

    def _sync(self) -> None:
        runs = self.st.jobs_of_kind(KIND)
        for job in runs:
            if job.state == "succeeded" and job.id not in self.asked:
                self.asked.add(job.id)
                self.host.send(OcrEvalResult(job_id=job.id), reply_to=self, tag=f"eval:{job.id}", announce=False)
        rows: list[tuple[int, tuple[Cell, ...]]] = []
        for job in runs:
            r = self.results.get(job.id)
            t = r.totals if r is not None else {}
            mark = Text("●", style=RUN_COLORS[self.compared.index(job.id)]) if job.id in self.compared else ""
            rows.append((job.id, (mark, str(job.id), job.name, job.state, str(len(r.pages)) if r else "-",
                                  pct(t.get("cer")), pct(t.get("wer")), score(t.get("table_f1")))))
        self.query_one(RunTable).sync_rows(rows)
        if self.job_id is None and runs:
            self.job_id = runs[0].id
        self._draw()

    def _draw(self) -> None:
        runs = [self.results[j] for j in self.compared if j in self.results]
        series = [Series([(float(p["index"]), float(p["cer"]) * 100) for p in r.pages], RUN_COLORS[n],
                         markers=len(r.pages) == 1)
                  for n, r in enumerate(runs)]
        self.query_one("#eval-chart", LineChart).set_series(series, x_fmt=lambda x: f"p{x:.0f}",
                                                            y_fmt=lambda y: f"{y:.1f}%", y_floor=0.0)
        self.query_one("#eval-table", Static).update(compare_table(runs) if runs else "")
        chosen = self.results.get(self.job_id) if self.job_id is not None else None
        title = self.query_one("#eval-pages-title", Static)
        table = self.query_one(WorstPages)
        if chosen is None:
            title.update(Text("pick a scored run above", style="dim"))
            table.sync_rows([])
            return
        title.update(Text(f"{chosen.title}: pages, worst first (Enter: truth and output side by side)",
                          no_wrap=True, overflow="ellipsis"))
        worst = sorted(chosen.pages, key=lambda p: (-float(p["cer"]), p["index"]))
        table.sync_rows([(p["index"], (str(p["index"]), str(p["doc"]), str(p["page"]), pct(p["cer"]),
                                       pct(p["wer"]), score(p.get("table_f1")), str(p.get("method") or "-")))
                         for p in worst])

    def on_replied(self, message: Replied) -> None:
        reply = message.reply
        if not isinstance(reply, OcrEvalResultReply):
            return
        if message.tag.startswith("eval:"):
            self.results[reply.job_id] = reply
            # the newest runs are compared until the user marks some herself
            if reply.job_id not in self.unmarked and len(self.compared) < MAX_COMPARED:
                self.compared.append(reply.job_id)
            self._sync()
        elif message.tag.startswith("diff:") and reply.job_id == self.job_id:
            page = next((p for p in reply.pages if p["index"] == int(message.tag.split(":")[2])), None)
            what = f"{reply.title} · {page['doc']} page {page['page']} · CER {pct(page['cer'])} %" if page else ""
            self.app.push_screen(DiffScreen(what, reply.truth, reply.output))

    def on_request_failed(self, message: RequestFailed) -> None:
        if message.tag.startswith(("eval:", "diff:")):
            self.query_one("#eval-pages-title", Static).update(Text(message.message, style="red"))

    @on(KeyedTable.Highlighted, "#eval-runs")
    def _highlighted(self, event: KeyedTable.Highlighted) -> None:
        event.stop()
        if isinstance(event.key, int) and event.key != self.job_id:
            self.job_id = event.key
            self._draw()

    def action_toggle_compare(self) -> None:
        key = self.query_one(RunTable).current_key
        if not isinstance(key, int):
            return
        if key in self.compared:
            self.compared.remove(key)
            self.unmarked.add(key)
        elif len(self.compared) < MAX_COMPARED:
            self.compared.append(key)
            self.unmarked.discard(key)
        self._sync()

    @on(KeyedTable.Selected, "#eval-pages")
    def _open(self, event: KeyedTable.Selected) -> None:
        event.stop()
        if self.job_id is not None and isinstance(event.key, int):
            self.host.send(OcrEvalResult(job_id=self.job_id, page=event.key), reply_to=self,
                           tag=f"diff:{self.job_id}:{event.key}", announce=False)


def diff_texts(truth: str, output: str) -> tuple[Text, Text]:
    """Both texts line by line, lines only in the truth red on the left, lines only in the output green on the
    right (difflib on lines: a reader sees where the engine went wrong, not every character)."""
    a, b = truth.splitlines(), output.splitlines()
    left, right = Text(), Text()
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        for line in a[i1:i2]:
            left.append(line + "\n", style="" if op == "equal" else "red")
        for line in b[j1:j2]:
            right.append(line + "\n", style="" if op == "equal" else "green")
    return left, right


class DiffScreen(ModalScreen[None]):
    """One page's truth and output side by side."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q", "dismiss", "Close")]
    DEFAULT_CSS = """
    DiffScreen { align: center middle; }
    DiffScreen > Vertical { width: 96%; height: 92%; background: $surface; border: round $accent; }
    DiffScreen .diff-side { width: 1fr; height: 1fr; padding: 0 1; }
    DiffScreen #diff-title { height: 1; text-style: bold; }
    """

    def __init__(self, title: str, truth: str, output: str) -> None:
        super().__init__()
        self.title_text = title
        self.truth, self.output = diff_texts(truth, output)

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(Text(self.title_text + "  (escape: close)", no_wrap=True, overflow="ellipsis"),
                         id="diff-title")
            with Horizontal():
                with VerticalScroll(classes="diff-side"):
                    yield Static(Text("truth", style="bold underline"))
                    yield Static(self.truth, id="diff-truth")
                with VerticalScroll(classes="diff-side"):
                    yield Static(Text("output", style="bold underline"))
                    yield Static(self.output, id="diff-output")

    async def action_dismiss(self, result: None = None) -> None:
        self.dismiss(result)
