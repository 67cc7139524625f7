"""One result row in full: every column's whole value, in a read-only editor to select and copy from."""

from __future__ import annotations

import json
from typing import Any, Sequence

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, TextArea

from tui.safe_text import visible


def row_text(columns: Sequence[str], row: Sequence[Any]) -> str:
    """'column: value' lines, values whole (lists and structs as JSON); control characters shown as escapes."""
    def shown(value: Any) -> str:
        if isinstance(value, (list, dict)):
            return json.dumps(value, default=str, ensure_ascii=False)
        return "NULL" if value is None else str(value)

    return "\n".join(f"{name}: {visible(shown(value))}" for name, value in zip(columns, row))


class RowDetail(ModalScreen[None]):
    """The SQL screen's row under the cursor, whole (the table cuts long values to fit)."""

    BINDINGS = [Binding("escape,q", "dismiss", "Close")]
    DEFAULT_CSS = """
    RowDetail { align: center middle; }
    RowDetail > Vertical { width: 90%; height: 80%; border: thick $accent; background: $surface; padding: 0 1; }
    RowDetail Label { height: 1; color: $text-muted; }
    RowDetail TextArea { height: 1fr; }
    """

    def __init__(self, columns: Sequence[str], row: Sequence[Any], number: int) -> None:
        super().__init__()
        self.text = row_text(columns, row)
        self.number = number

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"row {self.number:,} in full · select text to copy it · Esc closes")
            yield TextArea(self.text, read_only=True, soft_wrap=True, id="row-text")

    def on_mount(self) -> None:
        self.query_one("#row-text", TextArea).focus()
