"""OCR: a document's pages with their state and timings, and the page being decoded as live Markdown
(Textual's MarkdownStream fed from the coalesced text deltas); Enter opens a finished page instead."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import ClassVar

from rich.text import Text
from textual import on
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widget import Widget
from textual.widgets import Markdown, Static
from textual.widgets.markdown import MarkdownStream

from shared.protocol import (
    TERMINAL_STATES,
    JobInfo,
    PageInfo,
    PageQueue,
    PageQueueReply,
    PageText,
    PageTextReply,
)
from tui.format import duration
from tui.messages import JobHighlighted, Replied, RequestFailed
from tui.screens.base import FtScreen
from tui.screens.ocr_eval import OcrEvalScreen
from tui.state import Changes, TextStream
from tui.widgets.follow_scroll import FollowScroll
from tui.widgets.job_table import JobTable
from tui.widgets.keyed_table import Cell, Column, KeyedTable

PAGE_STYLE = {"pending": "dim", "running": "cyan", "done": "green", "failed": "red"}
METHOD_SHORT = {"text_layer": "text", "fallback": "fallback", "ocr": "ocr", "vlm": "vlm"}
QUEUE_TAG = "page-queue"


def queue_line(reply: PageQueueReply, job_id: int | None) -> Text:
    """The engines' page queues in one line, and where the selected job stands in its queue."""
    parts: list[Text] = []
    for e in reply.engines:
        t = Text()
        t.append(f"{e.engine}: ", style="bold")
        t.append(f"{e.in_flight}/{e.slots} pages in flight", style="cyan" if e.in_flight else "dim")
        t.append(f", {e.waiting} waiting", style="dim")
        parts.append(t)
    if reply.queued_jobs:
        t = Text(f"{reply.queued_jobs} document(s) not open yet ({reply.open_jobs}/{reply.max_open} open)",
                 style="yellow")
        if reply.why_queued:
            t.append(f": {reply.why_queued}", style="dim")
        parts.append(t)
    mine = next((j for e in reply.engines for j in e.jobs if j.job_id == job_id), None)
    if mine is not None:
        t = Text(f"job {mine.job_id}: {mine.in_flight} in flight, {mine.waiting} waiting", style="bold")
        t.append(f" ({mine.job_class}, priority {mine.priority})", style="dim")
        if mine.why:
            t.append(f" — {mine.why}", style="yellow")
        parts.append(t)
    line = Text(" · ", style="dim").join(parts)
    line.no_wrap = True
    line.overflow = "ellipsis"
    return line


def page_time(page: PageInfo) -> float | None:
    if not page.timings:
        return None
    return page.timings.get("total", sum(page.timings.values()))


def page_cells(page: PageInfo) -> tuple[Cell, ...]:
    t = page_time(page)
    return (
        str(page.page_no),
        Text(page.state, style=PAGE_STYLE.get(page.state, "")),
        METHOD_SHORT.get(page.method, page.method) or "-",
        duration(t) if t is not None else "-",
        str(page.chars) if page.chars else "-",
    )


class PageTable(KeyedTable):
    COLUMNS = (Column("page", "PAGE", "right"), Column("state", "STATE"), Column("method", "METHOD"),
               Column("time", "TIME", "right"), Column("chars", "CHARS", "right"))

    def sync(self, pages: list[PageInfo]) -> None:
        self.sync_rows([(p.page_no, page_cells(p)) for p in pages])

    @property
    def page_no(self) -> int | None:
        key = self.current_key
        return key if isinstance(key, int) else None


class OcrScreen(FtScreen):
    MODE = "ocr"
    HELP = ("OCR jobs on top; below, the selected document's pages (state, method, time, characters) and, on "
            "the right, the page being decoded as live Markdown. Enter on a page opens its finished text; f "
            "goes back to following the live page. n submits a file.")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f", "follow", "Follow live"),
        Binding("e", "scores", "OCR scores", show=False, tooltip="ocr_eval runs compared; worst pages as a diff"),
        Binding("tab", "app.focus_next", "Next pane", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.job_id: int | None = None
        self.following = True
        self.view_key: str | None = None  # the stream shown while following
        self._written = 0
        self._generation = 0
        self._stream: MarkdownStream | None = None
        self._follow_lock = asyncio.Lock()
        self.opened_page: int | None = None
        self.queue: PageQueueReply | None = None

    def compose_body(self) -> Iterable[Widget]:
        yield JobTable(self.ocr_jobs, self.now, id="ocr-jobs")
        # shown once the daemon says how its page queue stands (and while OCR jobs are open)
        queue = Static(id="ocr-queue")
        queue.display = False
        yield queue
        with Horizontal(id="ocr-body"):
            yield PageTable(id="ocr-pages")
            with Vertical(id="ocr-view"):
                yield Static(id="ocr-page-title", classes="section-title")
                with FollowScroll(id="ocr-md-scroll"):
                    yield Markdown(id="ocr-md")

    def on_mount(self) -> None:
        self.query_one(JobTable).focus()

    def focus_target(self) -> Widget:
        return self.query_one(JobTable)

    def ocr_jobs(self) -> list[JobInfo]:
        return self.st.jobs_of_kind("ocr")

    async def refresh_all(self) -> None:
        self.query_one(JobTable).sync_now()
        self._ask_queue()
        if self.job_id is not None:
            self.host.want_pages(self.job_id)
        self._pages()
        await self._follow()

    async def on_changes(self, changes: Changes) -> None:
        if changes.jobs:
            self.query_one(JobTable).request_sync()
        if self.job_id in changes.pages:
            self._pages()
        if changes.text or (self.job_id in changes.jobs):
            await self._follow()

    def tick(self) -> None:
        self.query_one(JobTable).request_sync()
        self._ask_queue()

    def _ask_queue(self) -> None:
        if any(j.state in ("queued", "running") for j in self.ocr_jobs()):
            self.host.send(PageQueue(), reply_to=self, tag=QUEUE_TAG, announce=False)
        elif self.queue is not None:
            self.queue = None
            self._show_queue()

    def _show_queue(self) -> None:
        bar = self.query_one("#ocr-queue", Static)
        reply = self.queue
        if reply is None or not (reply.queued_jobs or any(e.jobs for e in reply.engines)):
            bar.display = False
            return
        bar.update(queue_line(reply, self.job_id))
        bar.display = True

    def selected_job(self) -> JobInfo | None:
        return self.st.job(self.job_id)

    @property
    def settling(self) -> bool:
        if self.query_one(JobTable).pending:
            return True
        # MarkdownStream appends in its own task; it is done when nothing waits in it
        s = self._stream
        return s is not None and bool(getattr(s, "_pending", None) or s._new_markup.is_set())

    async def on_job_highlighted(self, message: JobHighlighted) -> None:
        if message.job_id == self.job_id:
            return
        self.job_id = message.job_id
        self.following = True
        self.opened_page = None
        if self.job_id is not None:
            self.host.want_pages(self.job_id)
        self._pages()
        self._show_queue()
        await self._reset_view()
        await self._follow()

    def _pages(self) -> None:
        pages = self.st.page_list(self.job_id) if self.job_id is not None else []
        self.query_one(PageTable).sync(pages)

    # ------------------------------------------------------------------------------ live text

    async def _reset_view(self, text: str = "") -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        await self.query_one("#ocr-md", Markdown).update(text)
        self.view_key = None
        self._written = 0

    async def _follow(self) -> None:
        # refresh_all and on_changes may both get here while a write awaits: one at a time, or text repeats
        async with self._follow_lock:
            await self._follow_locked()

    async def _follow_locked(self) -> None:
        if not self.following:
            return
        title = self.query_one("#ocr-page-title", Static)
        job = self.st.job(self.job_id)
        if job is None:
            title.update(Text("no OCR job selected: press n to convert a file", style="dim")
                         if not self.ocr_jobs() else "")
            return
        stream = self.st.live_stream_of_job(job.id)
        if stream is None:
            what = ("waiting for the first page…" if job.state in ("queued", "running") else
                    f"job {job.state}: Enter on a page shows its text")
            title.update(Text(what, style="dim"))
            return
        if stream.key != self.view_key:
            await self._reset_view()
            self.view_key = stream.key
            self._generation = stream.generation
        title.update(self._live_title(stream, job))
        new = stream.since(self._written, self._generation)
        if new is None:
            # started over by the engine, or the head was dropped while we were behind: show what is kept
            await self._reset_view(stream.text)
            self.view_key = stream.key
            self._written = stream.total
            self._generation = stream.generation
            return
        if new:
            if self._stream is None:
                self._stream = Markdown.get_stream(self.query_one("#ocr-md", Markdown))
            self._written = stream.total
            await self._stream.write(new)

    def _live_title(self, stream: TextStream, job: JobInfo) -> Text:
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(f"page {stream.page_no}", style="bold")
        live = not stream.final and job.state not in TERMINAL_STATES
        t.append(" — decoding live" if live else " — done", style="cyan" if live else "green")
        t.append(f"  {stream.total} chars", style="dim")
        return t

    def action_scores(self) -> None:
        self.app.push_screen(OcrEvalScreen())

    def action_follow(self) -> None:
        self.following = True
        self.opened_page = None
        self.call_later(self._refollow)

    async def _refollow(self) -> None:
        async with self._follow_lock:
            await self._reset_view()
            await self._follow_locked()

    @on(KeyedTable.Selected, "#ocr-pages")
    def _open_page(self, event: KeyedTable.Selected) -> None:
        event.stop()
        page_no = self.query_one(PageTable).page_no
        if self.job_id is None or page_no is None:
            return
        self.host.send(PageText(job_id=self.job_id, page_no=page_no), reply_to=self,
                       tag=f"page:{self.job_id}:{page_no}", announce=False)

    async def on_replied(self, message: Replied) -> None:
        if message.tag == QUEUE_TAG and isinstance(message.reply, PageQueueReply):
            self.queue = message.reply
            self._show_queue()
            return
        if not message.tag.startswith("page:") or not isinstance(message.reply, PageTextReply):
            return
        page = message.reply.page
        if page.job_id != self.job_id:
            return
        self.following = False
        self.opened_page = page.page_no
        await self._reset_view(message.reply.text or "*(this page has no text)*")
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(f"page {page.page_no}", style="bold")
        pt = page_time(page)
        t.append(f" · {page.state} · {page.method or '?'} · {duration(pt) if pt is not None else '-'}",
                 style=PAGE_STYLE.get(page.state, ""))
        t.append(" · f: live", style="dim")
        self.query_one("#ocr-page-title", Static).update(t)
        self.query_one("#ocr-md-scroll", VerticalScroll).scroll_home(animate=False)

    def on_request_failed(self, message: RequestFailed) -> None:
        if message.tag == QUEUE_TAG:  # an older daemon, or none: no queue line
            self.queue = None
            self._show_queue()
        if message.tag.startswith("page:"):
            self.query_one("#ocr-page-title", Static).update(Text(message.message, style="red"))
