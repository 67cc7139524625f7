"""A filterable, sortable table of images paged from DuckDB (never loads all rows)."""

from __future__ import annotations

from dataclasses import dataclass

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Checkbox, Input, Label, Select

from tui import queries
from tui.messages import ImagePicked
from tui.page_table import PageTable
from tui.safe_text import markup_safe
from tui.workers import people_message

SHORT_COLUMNS = {"image_id": 12}
TEXT_WIDTH = 48


def cell(column: str, value, path_width: int = TEXT_WIDTH) -> str | None:
    """A table cell: NULL stays None (PageTable draws it apart from any text), floats short, long text cut to fit
    (a path to `path_width`, at its start)."""
    if value is None:
        return None
    if isinstance(value, bool):  # "yes" stands out from "no" down a column; True and False look alike
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.2f}" if 1 <= abs(value) < 1e9 else f"{value:.3g}"
    if isinstance(value, list):  # tags: as they are typed, not as a Python list
        value = ", ".join("NULL" if item is None else str(item) for item in value)
    text = str(value).replace("\n", " ")
    is_path = column == "path" or column.endswith("_path")
    limit = path_width if is_path else SHORT_COLUMNS.get(column, TEXT_WIDTH)
    if len(text) <= limit:
        return text
    if is_path:
        return cut_start(text, limit)
    return text[: limit - 1] + "…"


def cut_start(text: str, width: int) -> str:
    """`text` in `width` characters, cut at its start: the end tells files apart (…/5_wbk cat/img1.jpg)."""
    return text if len(text) <= width else "…" + text[len(text) - width + 1 :]


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)



class FilterInput(Input):
    """The filter box: Escape goes back to the rows (the screen's keys act there), as Enter does after filtering."""

    BINDINGS = [Binding("escape", "back_to_rows", "Rows", show=False)]

    def action_back_to_rows(self) -> None:
        self.screen.set_focus(self.query_ancestor(ImageTable).query_one("#rows"))


class ImageTable(Vertical):
    """Filter box, sort picker and a paged DataTable over images_view.

    Posts ImageTable.Loaded when a new filtered snapshot is ready and ImagePicked when the cursor moves.
    """

    BINDINGS = [
        Binding("pagedown", "page(1)", "Next page", priority=True, show=False),
        Binding("pageup", "page(-1)", "Prev page", priority=True, show=False),
        Binding("ctrl+home", "first_page", "First page", show=False),
        Binding("ctrl+end", "last_page", "Last page", show=False),
        Binding("ctrl+f", "focus_filter", "Filter"),
    ]

    @dataclass
    class Loaded(Message):
        result: queries.BrowseResult

    @dataclass
    class _Ready(Message):
        result: queries.BrowseResult
        keep: tuple[str | None, int, int] | None = None  # (image_id, page offset, cursor row) to stay on

    @dataclass
    class _Rows(Message):
        result: queries.BrowseResult
        offset: int
        rows: list
        cursor: int | None = None

    @dataclass
    class _Failed(Message):
        error: str

    @dataclass
    class _FirstRows(Message):
        columns: list
        rows: list

    def __init__(self, *, columns: list[str] | None = None, placeholder: str | None = None, id: str | None = None) -> None:
        super().__init__(id=id)
        self.shown_columns = columns
        self.placeholder = placeholder or "filter: SQL WHERE over images_view (width > 1024 AND format = 'PNG'), or text to search (\"in quotes\": always text)"
        self.result: queries.BrowseResult | None = None
        self.page_offset = 0
        self.page_size = queries.PAGE_SIZE
        self._sort_choices: list[str] = []

    def compose(self) -> ComposeResult:
        with Horizontal(classes="filter-bar"):
            yield FilterInput(placeholder=self.placeholder, id="filter")
            yield Select([("path", "path")], value="path", allow_blank=False, id="sort", prompt="sort")
            yield Checkbox("desc", id="descending")
        yield Label("loading…", id="table-status")
        yield PageTable(id="rows")

    def on_mount(self) -> None:
        self.reload(first=True)
        # the screens holding the table have its rows as AUTO_FOCUS, which Textual applies only while the terminal
        # reports the app focused (app_focus): after a blur reported at start nothing would have the focus, and the
        # keys typed first would go nowhere
        self.call_after_refresh(lambda: self.screen.focused is None and self.screen.set_focus(self.query_one("#rows")))

    # --- loading ------------------------------------------------------------

    @property
    def current_filter(self) -> queries.Filter:
        sort = self.query_one("#sort", Select).value
        return queries.Filter(
            text=self.query_one("#filter", Input).value,
            sort_column=sort if isinstance(sort, str) else "path",
            descending=self.query_one("#descending", Checkbox).value,
        )

    @property
    def requested_filter(self) -> queries.Filter | None:
        """The filter last asked for; `result` catches up with it when its rows have loaded."""
        return getattr(self, "_requested", None)

    def not_applied(self) -> str | None:
        """Why the rows shown are not those the filter box describes (None when they are): an action over the
        filtered rows must act on the rows shown, never on a filter only typed or still loading."""
        typed = self.query_one("#filter", Input).value.strip()
        result, requested = self.result, self.requested_filter
        if result is not None and typed == result.filter.text.strip():
            return None
        if requested is not None and typed == requested.text.strip() and getattr(self, "_failed_filter", None) == requested:
            return "The filter failed (its error is on the status line): mend it or clear it, and press Enter."
        if result is None or (requested is not None and typed == requested.text.strip()):
            return "The filtered rows are still loading; try again when the row count shows."
        return "The filter box differs from the filter the table shows: press Enter to apply it first."

    def reload(self, *, first: bool = False, keep_position: bool = False) -> None:
        """Re-run the filter (after edits or when the filter or sort changed).

        keep_position: stay on the page and image under the cursor (after edits), not on row 1. The rows are those
        of the filter the table shows: text typed in the filter box but not applied (Enter) stays unapplied, so an
        edit or exclusion never swaps the rows, and the image under the cursor, for others.
        """
        self.query_one("#table-status", Label).update("loading…")
        self.query_one("#table-status", Label).remove_class("-error")
        shown = self.result.filter if keep_position and self.result is not None else None
        self._requested = shown if shown is not None else self.current_filter
        self._failed_filter = None
        keep = None
        if shown is not None:
            keep = (self.current_image_id, self.page_offset, self.query_one("#rows", PageTable).cursor_row)
        self._build(self._requested, first, keep)

    @work(thread=True, exclusive=True, group="image-table-build")
    def _build(self, flt: queries.Filter, first: bool = False, keep: tuple | None = None) -> None:
        try:
            if first:
                columns, rows = queries.first_page(self.app.con, flt, self.page_size)
                self.post_message(self._FirstRows(columns, rows))
            result = queries.browse(self.app.con, flt)
        except Exception as error:
            self.post_message(self._Failed(people_message(error)))
            return
        self.post_message(self._Ready(result, keep))

    @work(thread=True, exclusive=True, group="image-table-page")
    def _fetch(
        self, result: queries.BrowseResult, offset: int, cursor: int | None = None, *, stay: bool = False, keep_id: str | None = None
    ) -> None:
        try:
            if stay:
                # The kept image may have moved (its sort key was edited) or left the filter.
                position = None if keep_id is None else result.position_of(keep_id)
                if position is not None:
                    offset, cursor = position // self.page_size * self.page_size, position % self.page_size
                else:  # gone: stay on the same page (or the new last one) near the same row
                    offset = min(offset, max(result.total - 1, 0) // self.page_size * self.page_size)
            rows = result.page(offset, self.page_size)
        except Exception as error:
            self.post_message(self._Failed(people_message(error)))
            return
        if rows is None:  # a newer filter replaced this snapshot meanwhile
            return
        self.post_message(self._Rows(result, offset, rows, cursor))

    @on(_Failed)
    def _failed(self, message: _Failed) -> None:
        self._rows_next = False  # the filter box keeps the focus, to mend what it holds
        self._failed_filter = self.requested_filter
        status = self.query_one("#table-status", Label)
        status.update(f"[red]{markup_safe(message.error)}[/]")
        status.add_class("-error")
        self.notify(message.error, title="Filter", severity="error")

    @on(_Ready)
    def _ready(self, message: _Ready) -> None:
        if message.result.filter != getattr(self, "_requested", message.result.filter):
            message.result.close()  # a later filter is on its way
            return
        old, self.result = self.result, message.result
        if old is not None:
            old.close()
        if getattr(self, "_rows_next", False) and self.query_one("#filter", Input).has_focus:
            self.query_one("#rows", PageTable).focus()
        self._rows_next = False
        self._set_columns(message.result.columns)
        if message.keep is None:  # another filter or sort: its first row, not the old row number
            self._fetch(message.result, 0, 0)
        else:
            # where the cursor is now, not where it was when the reload began: keys pressed meanwhile (ctrl+down
            # after a caption save) moved it, and the image it was on then pulled it back a row
            image_id, offset, cursor = message.keep
            image_id = self.current_image_id or image_id
            offset, cursor = self.page_offset, self.query_one("#rows", PageTable).cursor_row
            self._fetch(message.result, offset, cursor, stay=True, keep_id=image_id)
        self.post_message(self.Loaded(message.result))

    def _set_columns(self, columns: list[str]) -> None:
        if columns != self._sort_choices:
            self._sort_choices = columns
            sort = self.query_one("#sort", Select)
            current = sort.value
            with sort.prevent(Select.Changed):
                sort.set_options([(c, c) for c in columns])
                sort.value = current if current in columns else "path"

    def visible_columns(self, columns: list[str]) -> list[str]:
        if self.shown_columns is None:
            return columns
        return [c for c in self.shown_columns if c in columns]

    @on(_FirstRows)
    def _first_rows(self, message: _FirstRows) -> None:
        """Show the first page while the snapshot for paging is still being built."""
        if self.result is not None:
            return
        self._show_rows(message.columns, message.rows, None)
        self.query_one("#table-status", Label).update(f"rows 1–{len(message.rows):,} of … (counting)")

    @on(_Rows)
    def _rows(self, message: _Rows) -> None:
        if message.result is not self.result:
            return
        self.page_offset = message.offset
        self._show_rows(message.result.columns, message.rows, message.cursor)
        self._update_status()

    def on_resize(self, event) -> None:
        shown = getattr(self, "_shown_rows", None)
        if shown is not None:  # the path width follows the table's width
            self._show_rows(*shown, self.query_one("#rows", PageTable).cursor_row)

    def _show_rows(self, columns: list[str], rows: list[tuple], cursor: int | None) -> None:
        self._shown_rows = (columns, rows)
        table = self.query_one("#rows", PageTable)
        shown = self.visible_columns(columns)
        index = [columns.index(c) for c in shown]
        id_index = columns.index("image_id")
        self.page_ids = [row[id_index] for row in rows]
        first = rows[0] if rows else None
        # a path takes at most two fifths of the table: at 80 columns the caption beside it stays in view
        path_width = max(16, min(TEXT_WIDTH, self.size.width * 2 // 5)) if self.size.width else TEXT_WIDTH
        table.set_rows(
            shown,
            [[cell(columns[i], row[i], path_width) for i in index] for row in rows],
            right_aligned=[first is not None and is_number(first[i]) for i in index],
            cursor=cursor,
        )

    def _update_status(self) -> None:
        result = self.result
        if result is None:
            return
        rows_here = len(getattr(self, "page_ids", []))
        first = self.page_offset + 1 if rows_here else 0
        kind = {"all": "all images", "sql": "SQL filter", "text": "text search"}[result.kind]
        arrow = "↓" if result.filter.descending else "↑"
        self.query_one("#table-status", Label).update(
            f"rows {first:,}–{self.page_offset + rows_here:,} of {result.total:,} · {kind} · sorted by "
            f"{result.filter.sort_column} {arrow} · PgUp/PgDn pages"
        )

    # --- user actions ---------------------------------------------------------

    @on(Input.Submitted, "#filter")
    def _filter_submitted(self) -> None:
        self._rows_next = True  # once the rows load: filter, then curate them with the screen's keys
        self.reload()

    @on(Select.Changed, "#sort")
    @on(Checkbox.Changed, "#descending")
    def _filter_changed(self) -> None:
        if self.current_filter != getattr(self, "_requested", None):
            self.reload()

    @on(PageTable.HeaderClicked, "#rows")
    def _header_clicked(self, event: PageTable.HeaderClicked) -> None:
        column = event.column
        sort = self.query_one("#sort", Select)
        descending = self.query_one("#descending", Checkbox)
        if sort.value == column:
            descending.value = not descending.value  # fires Checkbox.Changed -> reload
        else:
            sort.value = column  # fires Select.Changed -> reload

    @on(PageTable.RowHighlighted, "#rows")
    def _highlighted(self, event: PageTable.RowHighlighted) -> None:
        event.stop()
        image_id = self.image_id_at(event.row)
        if image_id is not None:
            self.post_message(ImagePicked(image_id))

    @on(PageTable.EdgeReached, "#rows")
    def _edge(self, event: PageTable.EdgeReached) -> None:
        """Arrow keys past the page's end load the neighbouring page."""
        self.action_page(event.direction, cursor=0 if event.direction > 0 else self.page_size - 1)

    def image_id_at(self, row: int) -> str | None:
        ids = getattr(self, "page_ids", [])
        return ids[row] if 0 <= row < len(ids) else None

    @property
    def current_image_id(self) -> str | None:
        return self.image_id_at(self.query_one("#rows", PageTable).cursor_row)

    def action_page(self, delta: int, cursor: int | None = None) -> None:
        result = self.result
        if result is None:
            return
        offset = self.page_offset + delta * self.page_size
        if 0 <= offset < max(result.total, 1):
            self._fetch(result, offset, cursor)

    def action_first_page(self) -> None:
        if self.result is not None:
            self._fetch(self.result, 0, 0)

    def action_last_page(self) -> None:
        if self.result is not None and self.result.total:
            self._fetch(self.result, (self.result.total - 1) // self.page_size * self.page_size)

    def action_focus_filter(self) -> None:
        # at once, not after the queued events (Widget.focus defers): keys that arrive with ctrl+f, in one read over
        # ssh or from a paste, are the filter's, not the rows'
        box = self.query_one("#filter", Input)
        self.screen.set_focus(box)
        box.select_all()  # typing replaces the last filter (it was appended to it, into a parse error)

    def on_unmount(self) -> None:
        if self.result is not None:
            self.result.close()
