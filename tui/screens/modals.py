"""The dialogs: confirm, help, file picker, the training form, load an adapter. Each returns its answer with
``dismiss``; none talks to the daemon except through its :class:`~tui.host.Host`."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.suggester import SuggestFromList
from textual.widgets import DirectoryTree, Input, Label, Markdown, Select, Static, TextArea

from shared.overrides import absolutize, parse_override_text
from shared.protocol import DatasetList, DatasetsReply, ListTemplates, Submit, TemplateEntry, TemplatesReply
from tui.host import Host
from tui.messages import Replied, RequestFailed
from tui.screens.base import FtScreen, key_label
from tui.widgets.chrome import SCREENS, TITLES


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str, *, yes: str = "Yes", no: str = "No") -> None:
        super().__init__()
        self.question = question
        self.yes = yes
        self.no = no

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, classes="dialog-text")
            yield Static(Text.assemble(("y", "bold reverse"), f" {self.yes}    ", ("n", "bold reverse"),
                                       f" {self.no}"), classes="dialog-keys")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


def help_markdown(app: App[Any], screen: FtScreen | None) -> str:
    lines = ["# ftui keys", "", "Everything works by keyboard; the mouse is optional.", "", "## Screens", ""]
    modes: dict[str, Any] = getattr(app, "MODES", {})
    for key, mode, _label in SCREENS:
        cls = modes.get(mode)
        lines.append(f"- **{key}** {TITLES[mode]} — {getattr(cls, 'HELP', '')}")
    lines += ["", "## Everywhere", ""]
    for b in app.BINDINGS:
        if isinstance(b, Binding) and b.description and not b.key.isdigit():
            lines.append(f"- **{_key_name(b.key)}** {b.tooltip or b.description}")
    lines.append("- **ctrl+p** command palette (every action, jobs by number)")
    lines.append("- **tab / shift+tab** move between panes; **escape** leaves a text field")
    if screen is not None:
        lines += ["", f"## This screen ({screen.MODE})", ""]
        for b in type(screen).BINDINGS:
            if isinstance(b, Binding) and b.description and b.key != "escape":
                lines.append(f"- **{_key_name(b.key)}** {b.tooltip or b.description}")
    lines += ["", "When the daemon is not running, the banner says where ftui looked and how to start it "
              "(`systemctl start ftmllmd`, or `ftmllmd` in another terminal); ftui reconnects by itself."]
    return "\n".join(lines)


def _key_name(key: str) -> str:
    return " / ".join(key_label(k) for k in key.split(","))


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,question_mark", "close", "Close")]

    def __init__(self, app: App[Any], screen: FtScreen | None) -> None:
        super().__init__()
        self._text = help_markdown(app, screen)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog help-dialog"):
            with VerticalScroll():
                yield Markdown(self._text)
            yield Static(Text.assemble(("escape", "bold reverse"), " close"), classes="dialog-keys")

    def action_close(self) -> None:
        self.dismiss(None)


class PickerTree(DirectoryTree):
    def __init__(self, path: Path, suffixes: tuple[str, ...], **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.suffixes = suffixes

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return sorted((p for p in paths if not p.name.startswith(".")
                       and (p.is_dir() or p.suffix.lower() in self.suffixes)),
                      key=lambda p: (not p.is_dir(), p.name.lower()))


class FilePickerScreen(ModalScreen[Path | None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel"),
        Binding("backspace", "parent", "Up a folder", show=False),
    ]

    def __init__(self, root: Path, suffixes: tuple[str, ...], *, title: str = "Pick a file") -> None:
        super().__init__()
        self.root = root.absolute()
        self.suffixes = suffixes
        self.title_text = title

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog picker-dialog"):
            yield Static(Text(self.title_text, style="bold"))
            yield Input(value=str(self.root) + "/", id="picker-path",
                        placeholder="a path: Enter takes a file or opens a folder")
            yield PickerTree(self.root, self.suffixes, id="picker-tree")
            yield Static(Text(f"{', '.join(self.suffixes)} · Enter picks · backspace: up a folder · escape",
                              style="dim"), id="picker-status")

    def on_mount(self) -> None:
        self.query_one(PickerTree).focus()

    def _status(self, text: str, style: str = "red") -> None:
        self.query_one("#picker-status", Static).update(Text(text, style=style))

    @on(DirectoryTree.FileSelected)
    def _file(self, event: DirectoryTree.FileSelected) -> None:
        self.dismiss(Path(event.path))

    @on(DirectoryTree.DirectorySelected)
    def _dir(self, event: DirectoryTree.DirectorySelected) -> None:
        self.query_one("#picker-path", Input).value = str(event.path) + "/"

    @on(Input.Submitted, "#picker-path")
    def _typed(self, event: Input.Submitted) -> None:
        path = Path(event.value.strip()).expanduser()
        if path.is_file():
            if path.suffix.lower() not in self.suffixes:
                self._status(f"{path.name}: not one of {', '.join(self.suffixes)}; pick another file")
                return
            self.dismiss(path.absolute())
        elif path.is_dir():
            self._open(path)
        else:
            self._status(f"no such file or folder: {path}; fix the path or browse below")

    def _open(self, path: Path) -> None:
        self.root = path.absolute()
        self.query_one(PickerTree).path = self.root
        self.query_one("#picker-path", Input).value = str(self.root) + "/"
        self.query_one(PickerTree).focus()

    def action_parent(self) -> None:
        if self.query_one("#picker-path", Input).has_focus:
            return
        self._open(self.root.parent)

    def action_cancel(self) -> None:
        self.dismiss(None)


def local_templates(templates_dir: Path) -> list[TemplateEntry]:
    """The templates of this installation, for a daemon too old to list its own."""
    if not templates_dir.is_dir():
        return []
    return [TemplateEntry(name=p.stem, kind="train") for p in sorted(templates_dir.glob("*.yaml"))]


def template_preview(templates_dir: Path, entry: TemplateEntry, lines: int = 40) -> str:
    """The template's settings when its file is readable from here (ftui on the server), else its
    one-line description."""
    try:
        text = (templates_dir / f"{entry.name}.yaml").read_text(encoding="utf-8")
    except OSError:
        return entry.description or f"{entry.kind} template {entry.name}"
    body = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    head = [entry.description] if entry.description else []
    return "\n".join(head + body[:lines])


class TrainFormScreen(ModalScreen[Submit | None]):
    """A training run from a template: template, dataset, GPUs and overrides, checked before it is sent.
    Templates and datasets come from the daemon (ListTemplates, DatasetList)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "submit", "Submit"),
    ]

    def __init__(self, host: Host, templates_dir: Path, cwd: Path) -> None:
        super().__init__()
        self.host = host
        self.templates_dir = templates_dir
        self.cwd = cwd
        self.templates: dict[str, TemplateEntry] = {}

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog form-dialog"):
            yield Static(Text("Submit a training run", style="bold"))
            with Horizontal(classes="form-row"):
                yield Label("Template", classes="form-label")
                yield Select[str]([], id="train-template", prompt="loading the daemon's templates…")
            with Horizontal(classes="form-row"):
                yield Label("Dataset", classes="form-label")
                yield Input(placeholder="a registered dataset (ftctl dataset list)", id="train-dataset")
            with Horizontal(classes="form-row"):
                yield Label("GPUs", classes="form-label")
                yield Input(value="1", type="integer", id="train-gpus")
                yield Label(" Name", classes="form-label")
                yield Input(placeholder="optional", id="train-name")
            yield Label("Overrides: key=value, one per line (learning_rate=1e-4, num_train_epochs=2)")
            yield TextArea(id="train-overrides", soft_wrap=False, show_line_numbers=False)
            with VerticalScroll(id="train-preview-box"):
                yield Static(id="train-preview")
            yield Static(id="train-status")
            yield Static(Text.assemble(("ctrl+s", "bold reverse"), " submit   ", ("escape", "bold reverse"),
                                       " cancel   tab: next field"), classes="dialog-keys")

    def on_mount(self) -> None:
        self.query_one("#train-template", Select).focus()
        self.host.send(ListTemplates(), reply_to=self, tag="templates", announce=False)
        self.host.send(DatasetList(), reply_to=self, tag="datasets", announce=False)

    def _set_templates(self, entries: list[TemplateEntry]) -> None:
        self.templates = {t.name: t for t in entries if t.kind == "train"}
        sel = self.query_one("#train-template", Select)
        sel.set_options([(f"{t.name}  ({t.stage})" if t.stage else t.name, t.name)
                         for t in self.templates.values()])
        if self.templates:
            sel.value = next(iter(self.templates))
        else:
            self._status(f"the daemon has no training templates (looked in {self.templates_dir}); add a YAML "
                         "there, see configs/llamafactory/")

    @on(Select.Changed, "#train-template")
    def _template(self, event: Select.Changed) -> None:
        if isinstance(event.value, str) and event.value in self.templates:
            self.query_one("#train-preview", Static).update(
                Text(template_preview(self.templates_dir, self.templates[event.value]), style="dim"))

    def on_replied(self, message: Replied) -> None:
        if message.tag == "templates" and isinstance(message.reply, TemplatesReply):
            if message.reply.templates_dir:
                self.templates_dir = Path(message.reply.templates_dir)
            self._set_templates(message.reply.templates)
        elif message.tag == "datasets" and isinstance(message.reply, DatasetsReply):
            names = message.reply.names
            field = self.query_one("#train-dataset", Input)
            field.suggester = SuggestFromList(names, case_sensitive=False)
            if names:
                field.placeholder = "e.g. " + ", ".join(names[:4])

    def on_request_failed(self, message: RequestFailed) -> None:
        if message.tag == "templates":
            self._set_templates(local_templates(self.templates_dir))
        elif message.tag == "datasets":
            self._status(f"could not list datasets ({message.message}); type the name", "yellow")

    def _status(self, text: str, style: str = "red") -> None:
        self.query_one("#train-status", Static).update(Text(text, style=style))

    def action_submit(self) -> None:
        template = self.query_one("#train-template", Select).value
        if not isinstance(template, str):
            self._status("pick a template first")
            return
        dataset = self.query_one("#train-dataset", Input).value.strip()
        gpus_text = self.query_one("#train-gpus", Input).value.strip() or "1"
        if not gpus_text.isdigit():
            self._status(f"GPUs: {gpus_text!r} is not a whole number")
            return
        try:
            overrides = absolutize(parse_override_text(self.query_one("#train-overrides", TextArea).text), self.cwd)
        except ValueError as exc:
            self._status(f"overrides {exc}")
            return
        spec: dict[str, Any] = {"template": template, "set": overrides, "gpus": int(gpus_text)}
        if dataset:
            spec["dataset"] = dataset
        self.dismiss(Submit(kind="train", spec=spec, name=self.query_one("#train-name", Input).value.strip()))

    def action_cancel(self) -> None:
        self.dismiss(None)


class AdapterScreen(ModalScreen[tuple[str, str] | None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "submit", "Load")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text("Load a LoRA adapter into the engine", style="bold"))
            with Horizontal(classes="form-row"):
                yield Label("Name", classes="form-label")
                yield Input(placeholder="how requests will name it", id="adapter-name")
            with Horizontal(classes="form-row"):
                yield Label("Path", classes="form-label")
                yield Input(placeholder="the adapter's directory on the server (a job's output_dir)",
                            id="adapter-path")
            yield Static(id="adapter-status")
            yield Static(Text.assemble(("Enter/ctrl+s", "bold reverse"), " load   ", ("escape", "bold reverse"),
                                       " cancel"), classes="dialog-keys")

    def on_mount(self) -> None:
        self.query_one("#adapter-name", Input).focus()

    @on(Input.Submitted)
    def _entered(self, event: Input.Submitted) -> None:
        if event.input.id == "adapter-name":
            self.query_one("#adapter-path", Input).focus()
        else:
            self.action_submit()

    def action_submit(self) -> None:
        name = self.query_one("#adapter-name", Input).value.strip()
        path = self.query_one("#adapter-path", Input).value.strip()
        if not name or not path:
            self.query_one("#adapter-status", Static).update(Text("both a name and a path are needed",
                                                                  style="red"))
            return
        self.dismiss((name, str(Path(path).expanduser().absolute())))

    def action_cancel(self) -> None:
        self.dismiss(None)
