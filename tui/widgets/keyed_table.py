"""A DataTable whose rows have stable keys and whose cells are only touched when their text changes.

A full rebuild flickers and loses the cursor; at 20 updates a second it also costs real CPU. So a sync
rebuilds only when the set or order of rows changed, and otherwise calls ``update_cell`` per changed cell.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from rich.cells import cell_len
from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey


class KeyedTable(DataTable[object]):
    COLUMNS: tuple[tuple[str, str], ...] = ()

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes, cursor_type="row", zebra_stripes=False)
        self.order: list[Hashable] = []
        self._plain: dict[Hashable, tuple[str, ...]] = {}
        self._columns: tuple[tuple[str, str], ...] = ()

    def columns_for_width(self, width: int) -> tuple[tuple[str, str], ...]:
        """The columns to show at this width (narrow terminals get fewer)."""
        return self.COLUMNS

    def on_mount(self) -> None:
        self._set_columns(self.columns_for_width(self.app.size.width))

    def _set_columns(self, columns: tuple[tuple[str, str], ...]) -> bool:
        if columns == self._columns:
            return False
        self.clear(columns=True)
        self._columns = columns
        self.order = []
        self._plain.clear()
        for key, label in columns:
            self.add_column(label, key=key)
        return True

    @property
    def column_keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self._columns)

    @property
    def current_key(self) -> Hashable | None:
        if not self.order or not 0 <= self.cursor_row < len(self.order):
            return None
        return self.order[self.cursor_row]

    def sync_rows(self, rows: Sequence[tuple[Hashable, tuple[object, ...]]]) -> bool:
        """Show exactly these rows in this order; returns True when the rows were rebuilt."""
        order = [k for k, _ in rows]
        if order != self.order:
            keep = self.current_key
            row = self.cursor_row
            self.clear()
            self._plain.clear()
            for key, cells in rows:
                self.add_row(*cells, key=str(key))
                self._plain[key] = tuple(str(c) for c in cells)
            self.order = order
            if keep is not None and keep in order:
                self.move_cursor(row=order.index(keep), animate=False)
            elif order:
                self.move_cursor(row=min(max(row, 0), len(order) - 1), animate=False)
            return True
        for key, cells in rows:
            plain = tuple(str(c) for c in cells)
            old = self._plain.get(key)
            if old == plain:
                continue
            for col, cell, was, text in zip(self.column_keys, cells, old or plain, plain, strict=True):
                if old is None or was != text:
                    # re-measuring a column costs a pass over it: only when the text no longer fits
                    column = self.columns.get(ColumnKey(col))
                    wider = column is None or cell_len(text) > column.content_width
                    self.update_cell(str(key), col, cell, update_width=wider)
            self._plain[key] = plain
        return False

    def select_key(self, key: Hashable) -> bool:
        if key in self.order:
            self.move_cursor(row=self.order.index(key), animate=False)
            return True
        return False
