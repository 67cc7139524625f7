"""A fast, read-only table of one page of rows, drawn line by line (Textual's line API).

Textual's DataTable renders every cell through Rich, which costs ~0.5 ms a cell; a page of an image
catalog must redraw in a few ms, so this widget lays out plain strings into Strips itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.cells import cell_len, set_cell_size
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from tui.safe_text import visible

MAX_COLUMN_WIDTH = 48
SEPARATOR = " │ "
NULL_MARK = "∅"  # a None cell (SQL NULL), drawn dim: no string value, '·' or 'NULL' included, looks like it


class PageTable(ScrollView, can_focus=True):
    """Rows of text with a header, a row cursor, vertical and horizontal scrolling, and clickable headers."""

    COMPONENT_CLASSES = {"page-table--header", "page-table--cursor", "page-table--odd", "page-table--dim"}
    DEFAULT_CSS = """
    PageTable { height: 1fr; background: $surface; }
    PageTable > .page-table--header { background: $primary-darken-2; color: $text; text-style: bold; }
    PageTable > .page-table--cursor { background: $accent 40%; text-style: bold; }
    PageTable:focus > .page-table--cursor { background: $accent; color: $text; }
    PageTable > .page-table--odd { background: $boost; }
    PageTable > .page-table--dim { color: $text-muted; }
    """
    BINDINGS = [
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("home", "cursor_to(0)", "Top", show=False),
        Binding("end", "cursor_to(-1)", "Bottom", show=False),
    ]

    cursor_row: reactive[int] = reactive(0)

    @dataclass
    class _TableMessage(Message):
        table: "PageTable"

        @property
        def control(self) -> "PageTable":
            return self.table

    @dataclass
    class RowHighlighted(_TableMessage):
        row: int

    @dataclass
    class RowSelected(_TableMessage):
        row: int

    @dataclass
    class HeaderClicked(_TableMessage):
        column: str

    @dataclass
    class EdgeReached(_TableMessage):
        """The cursor tried to move past the first (-1) or last (+1) row: the owner may load another page."""

        direction: int

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.columns: list[str] = []
        self.rows: list[list[str | None]] = []
        self.widths: list[int] = []
        self.right_aligned: list[bool] = []

    @property
    def row_count(self) -> int:
        return len(self.rows)

    def set_rows(self, columns: list[str], rows: list[list[str | None]], *, right_aligned: list[bool] | None = None, cursor: int | None = None) -> None:
        """Show new rows (strings, already formatted, or None for a NULL); keep the cursor where it was unless told.

        Control characters are shown as escapes: cells go to the terminal as raw segments.
        """
        self.columns = columns = [visible(name) for name in columns]
        self.rows = rows = [[None if text is None else visible(text) for text in row] for row in rows]
        self.right_aligned = right_aligned or [False] * len(columns)
        # widths of what is drawn: an escaped control character takes four cells, not none
        self.widths = [
            min(MAX_COLUMN_WIDTH, max([cell_len(name)] + [cell_len(NULL_MARK if r[i] is None else r[i]) for r in rows]))
            for i, name in enumerate(columns)
        ]
        total_width = sum(self.widths) + len(SEPARATOR) * max(len(columns) - 1, 0) + 1
        self.virtual_size = Size(total_width, len(rows) + 1)
        target = self.cursor_row if cursor is None else cursor
        clamped = min(max(target, 0), max(len(rows) - 1, 0))
        if clamped == self.cursor_row:
            self.post_message(self.RowHighlighted(self, clamped))
        self.cursor_row = clamped
        self._scroll_cursor_into_view()
        self.refresh()

    # --- drawing ----------------------------------------------------------------

    def _line_segments(self, cells: list[str | None], style: Style) -> list[Segment]:
        segments = [Segment(" ", style)]
        dim = style + self.get_component_rich_style("page-table--dim")
        for i, text in enumerate(cells):
            if i:
                segments.append(Segment(SEPARATOR, style))
            width = self.widths[i]
            null = text is None
            text = NULL_MARK if null else text
            if cell_len(text) > width:
                text = set_cell_size(text, width - 1) + "…"
            segments.append(Segment(text.rjust(width) if self.right_aligned[i] else set_cell_size(text, width), dim if null else style))
        return segments

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.size.width
        if y == 0:
            cells: list[str | None] = self.columns
            style = self.get_component_rich_style("page-table--header")
        else:
            index = scroll_y + y - 1
            if index >= len(self.rows):
                return Strip.blank(width, self.rich_style)
            cells = self.rows[index]
            if index == self.cursor_row:
                style = self.get_component_rich_style("page-table--cursor")
            elif index % 2:
                style = self.rich_style + self.get_component_rich_style("page-table--odd")
            else:
                style = self.rich_style
        segments = self._line_segments(cells, style) if cells else []
        return Strip(segments).crop_extend(scroll_x, scroll_x + width, style)

    # --- cursor -----------------------------------------------------------------

    def watch_cursor_row(self, old: int, new: int) -> None:
        self.refresh()
        if self.rows:
            self.post_message(self.RowHighlighted(self, new))

    def _scroll_cursor_into_view(self) -> None:
        visible = max(self.size.height - 1, 1)
        top = self.scroll_offset.y
        if self.cursor_row < top:
            self.scroll_to(y=self.cursor_row, animate=False)
        elif self.cursor_row >= top + visible:
            self.scroll_to(y=self.cursor_row - visible + 1, animate=False)

    def action_cursor(self, delta: int) -> None:
        target = self.cursor_row + delta
        if target < 0 or target >= len(self.rows):
            self.post_message(self.EdgeReached(self, -1 if target < 0 else 1))
            return
        self.cursor_row = target
        self._scroll_cursor_into_view()

    def action_cursor_to(self, row: int) -> None:
        if self.rows:
            self.cursor_row = row % len(self.rows)
            self._scroll_cursor_into_view()

    def action_select(self) -> None:
        if self.rows:
            self.post_message(self.RowSelected(self, self.cursor_row))

    def on_click(self, event: events.Click) -> None:
        scroll_x, scroll_y = self.scroll_offset
        if event.y == 0:
            x = event.x + scroll_x - 1
            for name, width in zip(self.columns, self.widths):
                if x < width + len(SEPARATOR):
                    self.post_message(self.HeaderClicked(self, name))
                    return
                x -= width + len(SEPARATOR)
            return
        index = scroll_y + event.y - 1
        if 0 <= index < len(self.rows):
            if index == self.cursor_row and event.chain >= 2:
                self.action_select()
            self.cursor_row = index
