"""Try: ask the serving engine about one image or PDF page, with the base model or an adapter, and watch
the answer stream in — what people used LLaMA-Factory's webchat for after training."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import on
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.widget import Widget
from textual.widgets import Input, Label, Markdown, Select, Static
from textual.widgets.markdown import MarkdownStream

from shared.handover import HandoverRefused, HandoverUnavailable
from shared.protocol import AskReply, AskSpooled
from tui.messages import Replied, RequestFailed
from tui.screens.base import FtScreen
from tui.screens.modals import FilePickerScreen
from tui.state import Changes
from tui.widgets.follow_scroll import FollowScroll

BASE = "__base__"
ASK_SUFFIXES = (".pdf", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp")


class TryScreen(FtScreen):
    MODE = "try"
    HELP = ("Pick an image or a PDF page (ctrl+o opens a file picker, or type the path), choose the base model "
            "or a loaded adapter, type a question and press Enter: the engine's answer streams below. Escape "
            "leaves a field so the number keys switch screens again.")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+o", "browse", "Pick file"),
        Binding("ctrl+r", "ask", "Ask again"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.request_key: str | None = None
        self._written = 0
        self._generation = 0
        self._stream: MarkdownStream | None = None
        self._answer_lock = asyncio.Lock()
        self._asked_at = 0.0
        self._adapters: list[str] = []

    def compose_body(self) -> Iterable[Widget]:
        with Horizontal(classes="form-row"):
            yield Label("File ", classes="form-label")
            yield Input(placeholder="path of an image or PDF (ctrl+o: pick)", id="try-file")
            yield Label(" page ", classes="form-label")
            yield Input(value="1", type="integer", id="try-page")
        with Horizontal(classes="form-row"):
            yield Label("Model", classes="form-label")
            yield Select[str]([("base model", BASE)], value=BASE, allow_blank=False, id="try-adapter")
        yield Input(placeholder="your question, e.g. “Transcribe this page as Markdown” — Enter asks",
                    id="try-question")
        yield Static(id="try-status")
        with FollowScroll(id="try-answer-scroll"):
            yield Markdown(id="try-answer")

    def on_mount(self) -> None:
        self.query_one("#try-file", Input).focus()
        self._status(Text("the answer appears here", style="dim"))

    def focus_target(self) -> Widget:
        return self.query_one("#try-answer-scroll")

    async def refresh_all(self) -> None:
        self._adapter_options()
        await self._answer()

    async def on_changes(self, changes: Changes) -> None:
        if changes.engine:
            self._adapter_options()
        if self.request_key is not None and self.request_key in changes.text:
            await self._answer()

    def _adapter_options(self) -> None:
        names = list(self.st.engine.adapters)
        if names == self._adapters:
            return
        self._adapters = names
        sel: Select[str] = self.query_one("#try-adapter", Select)
        keep = sel.value
        sel.set_options([("base model", BASE), *((f"adapter {n}", n) for n in names)])
        sel.value = keep if isinstance(keep, str) and (keep == BASE or keep in names) else BASE

    def _status(self, text: Text | str) -> None:
        self.query_one("#try-status", Static).update(text)

    def action_browse(self) -> None:
        def chosen(path: Path | None) -> None:
            if path is not None:
                self.query_one("#try-file", Input).value = str(path)
                self.query_one("#try-question", Input).focus()

        self.app.push_screen(FilePickerScreen(self.host.file_root, ASK_SUFFIXES, title="Pick an image or a PDF"),
                             chosen)

    @on(Input.Submitted, "#try-question")
    def _question_entered(self) -> None:
        self.action_ask()

    @on(Input.Submitted, "#try-file")
    def _file_entered(self) -> None:
        self.query_one("#try-question", Input).focus()

    def action_ask(self) -> None:
        raw = self.query_one("#try-file", Input).value.strip()
        question = self.query_one("#try-question", Input).value.strip()
        if not raw:
            self._status(Text("no file yet: type its path or press ctrl+o to pick one", style="yellow"))
            self.query_one("#try-file", Input).focus()
            return
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = (self.host.file_root / path).absolute()
        if not path.is_file():
            self._status(Text(f"no such file: {path}; check the path or press ctrl+o to pick one", style="red"))
            return
        if not question:
            self._status(Text("type a question first, then Enter", style="yellow"))
            self.query_one("#try-question", Input).focus()
            return
        page_text = self.query_one("#try-page", Input).value.strip() or "1"
        page_no = int(page_text) if page_text.isdigit() and int(page_text) > 0 else 1
        adapter = self.query_one("#try-adapter", Select).value
        adapter_name = adapter if isinstance(adapter, str) and adapter != BASE else ""
        self.request_key = None
        self._asked_at = self.now()
        self.call_later(self._clear_answer)
        who = f"adapter {adapter_name}" if adapter_name else "the base model"
        self._status(Text(f"asking {who} about {path.name} page {page_no}…", style="cyan"))
        self.run_worker(self._hand_over_and_ask(path, question, page_no, adapter_name), group="ask",
                        exclusive=True, exit_on_error=False)

    async def _hand_over_and_ask(self, path: Path, question: str, page_no: int, adapter: str) -> None:
        # the file is opened here with the user's own rights and handed to the daemon, which reads no path
        try:
            handed = await self.host.hand_over(path)
        except (HandoverRefused, HandoverUnavailable) as exc:
            self._status(Text(str(exc), style="red"))
            return
        self.host.send(AskSpooled(question=question, spool=handed.sha256, name=handed.name, page_no=page_no,
                                  adapter=adapter), reply_to=self, tag="ask", announce=False)

    async def _clear_answer(self) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        await self.query_one("#try-answer", Markdown).update("")
        self._written = 0

    async def on_replied(self, message: Replied) -> None:
        if message.tag != "ask" or not isinstance(message.reply, AskReply):
            return
        self.request_key = message.reply.request_key
        self._written = 0
        self._generation = 0
        self._status(Text("answering…", style="cyan"))
        await self._answer()  # deltas may have arrived before the reply

    def on_request_failed(self, message: RequestFailed) -> None:
        if message.tag == "ask":
            self._status(Text(f"the engine did not take the question ({message.code}): {message.message}",
                              style="red"))

    async def _answer(self) -> None:
        async with self._answer_lock:  # a reply and a batch of deltas may both get here
            await self._answer_locked()

    async def _answer_locked(self) -> None:
        if self.request_key is None:
            return
        stream = self.st.text.get(self.request_key)
        if stream is None:
            return
        new = stream.since(self._written, self._generation)
        if new is None:
            await self._clear_answer()
            new = stream.text
            self._generation = stream.generation
        if new:
            if self._stream is None:
                self._stream = Markdown.get_stream(self.query_one("#try-answer", Markdown))
            self._written = stream.total
            await self._stream.write(new)
        if stream.final:
            took = self.now() - self._asked_at
            if "[error]" in stream.text[-2000:]:
                self._status(Text("the engine stopped with an error (below); fix what it says and press ctrl+r",
                                  style="red"))
            else:
                self._status(Text(f"answered: {stream.total} characters in {took:.1f}s · ctrl+r asks again",
                                  style="green"))
