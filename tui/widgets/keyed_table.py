"""A table of rows with stable keys, drawn with Textual's Line API: only what changed is re-rendered.

Textual's DataTable keys its render caches on one counter that every ``update_cell`` bumps, so one
progress tick re-renders every visible cell through Rich (measured: ~35 ms for a 7-row job list on this
box, a whole core at 20 updates a second). Here each row's line is cached by its cell texts and the
width: a tick re-renders one row, a cursor move two. Header pinned, cursor, keyboard and mouse, and the
DataTable-like calls the screens use (``sync_rows``, ``get_cell``, ``select_key``, ``Highlighted`` /
``Selected`` messages).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

Cell = str | Text


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    justify: str = "left"  # left | right
    flex: bool = False  # takes the width the others leave
    max_width: int = 40


def _plain(cell: Cell) -> str:
    return cell.plain if isinstance(cell, Text) else cell


def _fit(text: str, width: int, justify: str) -> str:
    if cell_len(text) > width:
        text = text[: max(0, width - 1)] + "…" if width > 0 else ""
        while cell_len(text) > width:  # wide characters
            text = text[:-2] + "…"
    pad = width - cell_len(text)
    return " " * pad + text if justify == "right" else text + " " * pad


class KeyedTable(ScrollView, can_focus=True):
    COLUMNS: tuple[Column, ...] = ()
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "jump(0)", "First", show=False),
        Binding("end", "jump(-1)", "Last", show=False),
        Binding("enter", "select", "Select", show=False),
    ]
    COMPONENT_CLASSES: ClassVar[set[str]] = {"keyed-table--header", "keyed-table--cursor"}
    DEFAULT_CSS = """
    KeyedTable { height: 1fr; scrollbar-size-vertical: 1; overflow-x: hidden; }
    KeyedTable > .keyed-table--header { text-style: bold; background: $panel; }
    KeyedTable > .keyed-table--cursor { background: $panel-lighten-1; }
    KeyedTable:focus > .keyed-table--cursor { background: $accent; color: $text; text-style: bold; }
    """

    cursor_row: reactive[int] = reactive(0, always_update=False, repaint=False)

    @dataclass
    class Highlighted(Message):
        table: KeyedTable
        key: Hashable | None

        @property
        def control(self) -> KeyedTable:
            return self.table

    @dataclass
    class Selected(Message):
        table: KeyedTable
        key: Hashable

        @property
        def control(self) -> KeyedTable:
            return self.table

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.columns: tuple[Column, ...] = self.COLUMNS
        self.order: list[Hashable] = []
        self._cells: dict[Hashable, tuple[Cell, ...]] = {}
        self._plain: dict[Hashable, tuple[str, ...]] = {}
        self._widths: tuple[int, ...] = ()
        self._line_cache: dict[Hashable, tuple[tuple[str, ...], tuple[int, ...], Strip]] = {}
        self._style_cache: dict[str, Style] = {}

    # ------------------------------------------------------------------------------------ data

    @property
    def column_keys(self) -> tuple[str, ...]:
        return tuple(c.key for c in self.columns)

    def set_columns(self, columns: tuple[Column, ...]) -> bool:
        if columns == self.columns:
            return False
        self.columns = columns
        self.order = []
        self._cells.clear()
        self._plain.clear()
        self._line_cache.clear()
        self.refresh()
        return True

    @property
    def current_key(self) -> Hashable | None:
        if not self.order or not 0 <= self.cursor_row < len(self.order):
            return None
        return self.order[self.cursor_row]

    def get_cell(self, key: Hashable, column: str) -> str:
        return self._plain[key][self.column_keys.index(column)]

    def sync_rows(self, rows: Sequence[tuple[Hashable, tuple[Cell, ...]]]) -> bool:
        """Show exactly these rows in this order; returns True when the set or order of rows changed.
        The cursor stays on its row's key when that row is still there."""
        keep = self.current_key
        order = [k for k, _ in rows]
        changed_order = order != self.order
        dirty: list[int] = []
        self._cells = {}
        new_plain: dict[Hashable, tuple[str, ...]] = {}
        for i, (key, cells) in enumerate(rows):
            self._cells[key] = cells
            plain = tuple(_plain(c) for c in cells)
            if not changed_order and self._plain.get(key) != plain:
                dirty.append(i)
            new_plain[key] = plain
        self._plain = new_plain
        self.order = order
        if changed_order:
            self._line_cache = {k: v for k, v in self._line_cache.items() if k in new_plain}
            if keep is not None and keep in new_plain:
                self.set_reactive(KeyedTable.cursor_row, order.index(keep))
            else:
                self.set_reactive(KeyedTable.cursor_row, min(max(self.cursor_row, 0), max(0, len(order) - 1)))
        if self._measure() or changed_order:
            self.refresh()
        else:
            for i in dirty:
                self._refresh_row(i)
        self.virtual_size = Size(self.size.width, len(order) + 1)
        if changed_order:
            self._scroll_to_cursor()
        return changed_order

    def select_key(self, key: Hashable) -> bool:
        if key in self._plain:
            self.cursor_row = self.order.index(key)
            return True
        return False

    # ---------------------------------------------------------------------------------- layout

    def _measure(self) -> bool:
        """Column widths from the content; True when they changed (everything must be redrawn)."""
        if not self.columns:
            return False
        natural = [cell_len(c.label) for c in self.columns]
        for plain in self._plain.values():
            for i, text in enumerate(plain):
                n = cell_len(text)
                if n > natural[i]:
                    natural[i] = n
        widths = [min(n, c.max_width) for n, c in zip(natural, self.columns, strict=True)]
        available = max(0, self.size.width - self.scrollbar_size_vertical - 1) - 2 * len(widths)
        flex = [i for i, c in enumerate(self.columns) if c.flex]
        spare = available - sum(widths)
        if flex and spare > 0:
            # grow up to the column's limit; what is left stays blank at the right
            i = flex[0]
            widths[i] += min(spare, max(0, self.columns[i].max_width - widths[i]))
        elif spare < 0:
            # too wide: shrink the flexible column first, never below its label
            for i in flex:
                cut = min(-spare, widths[i] - cell_len(self.columns[i].label))
                widths[i] -= cut
                spare += cut
        result = tuple(max(1, w) for w in widths)
        if result != self._widths:
            self._widths = result
            self._line_cache.clear()
            return True
        return False

    def on_resize(self, event: events.Resize) -> None:
        self._measure()
        self.virtual_size = Size(self.size.width, len(self.order) + 1)
        self.refresh()

    # --------------------------------------------------------------------------------- drawing

    def _style(self, spec: str) -> Style:
        style = self._style_cache.get(spec)
        if style is None:
            style = Style.parse(spec) if spec else Style()
            self._style_cache[spec] = style
        return style

    def _segments(self, cells: Sequence[Cell], base: Style, plain: bool = False) -> list[Segment]:
        """One line; ``plain`` drops the cells' own colours (the cursor row has its own)."""
        segs: list[Segment] = [Segment(" ", base)]
        for cell, col, width in zip(cells, self.columns, self._widths, strict=False):
            if isinstance(cell, Text) and not plain:
                text, style = cell.plain, base + self._style(str(cell.style)) if cell.style else base
            else:
                text, style = _plain(cell), base
            segs.append(Segment(_fit(text, width, col.justify), style))
            segs.append(Segment("  ", base))
        return segs

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        base = self.rich_style
        if y == 0:
            header = self.get_component_rich_style("keyed-table--header")
            segs = self._segments([c.label for c in self.columns], base + header)
            return Strip(segs).adjust_cell_length(width, base + header)
        index = y - 1 + int(self.scroll_offset.y)
        if not 0 <= index < len(self.order):
            return Strip.blank(width, base)
        key = self.order[index]
        if index == self.cursor_row:
            style = base + self.get_component_rich_style("keyed-table--cursor")
            return Strip(self._segments(self._cells[key], style, plain=True)).adjust_cell_length(width, style)
        plain = self._plain[key]
        cached = self._line_cache.get(key)
        if cached is not None and cached[0] == plain and cached[1] == self._widths and cached[2].cell_length == width:
            return cached[2]
        strip = Strip(self._segments(self._cells[key], base)).adjust_cell_length(width, base)
        self._line_cache[key] = (plain, self._widths, strip)
        return strip

    def _refresh_row(self, index: int) -> None:
        y = index + 1 - int(self.scroll_offset.y)
        if 1 <= y < self.size.height:
            self.refresh_line(y)

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._line_cache.clear()

    # -------------------------------------------------------------------------------- movement

    def watch_cursor_row(self, old: int, new: int) -> None:
        self._refresh_row(old)
        self._refresh_row(new)
        self._scroll_to_cursor()
        self.post_message(self.Highlighted(self, self.current_key))

    def _scroll_to_cursor(self) -> None:
        visible = max(1, self.size.height - 1)
        top = int(self.scroll_offset.y)
        if self.cursor_row < top:
            self.scroll_to(y=self.cursor_row, animate=False)
        elif self.cursor_row >= top + visible:
            self.scroll_to(y=self.cursor_row - visible + 1, animate=False)

    def validate_cursor_row(self, value: int) -> int:
        return min(max(0, value), max(0, len(self.order) - 1))

    def action_cursor(self, delta: int) -> None:
        self.cursor_row += delta

    def action_page(self, direction: int) -> None:
        self.cursor_row += direction * max(1, self.size.height - 2)

    def action_jump(self, where: int) -> None:
        self.cursor_row = 0 if where == 0 else len(self.order) - 1

    def action_select(self) -> None:
        key = self.current_key
        if key is not None:
            self.post_message(self.Selected(self, key))

    def on_click(self, event: events.Click) -> None:
        index = event.y - 1 + int(self.scroll_offset.y)
        if event.y >= 1 and 0 <= index < len(self.order):
            if index == self.cursor_row and event.chain >= 2:
                self.action_select()
            self.cursor_row = index
