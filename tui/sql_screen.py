"""SQL console: an editor with SQL highlighting, results table, history, export; read-only unless switched."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
from rich.text import Text
from textual import on, work
from textual.actions import SkipAction
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Footer, Input, Label, OptionList, Switch, TextArea
from textual.widgets.option_list import Option

from tui.confirm import Confirm
from tui.image_table import cell, is_number
from tui.messages import CatalogChanged
from tui.page_table import PageTable
from tui.queries import save_to_history, saved_history
from tui.row_detail import RowDetail
from tui.safe_text import markup_safe, visible
from tui.screen_bar import ScreenBar
from tui.size_classes import SizeClasses
from tui.workers import people_message
from workbench.catalog import CatalogError, is_read_only_sql, protected_file, run_sql, statement_kinds

RESULT_ROWS = 1000  # rows shown; export writes them all
EXAMPLE = "SELECT format, count(*) AS images, avg(width) AS mean_width\nFROM dataset\nGROUP BY format\nORDER BY images DESC, format;"


def _history_option(sql: str) -> Option:
    """A history line: the query on one line, cut at 80 characters (Text: never read as markup)."""
    return Option(Text(visible(" ".join(sql.split())[:80])))


class QueryCancelled(Exception):
    """The query was cancelled (a newer one started, Escape, or the screen closed)."""


class InterruptibleQuery:
    """The cursors one console query runs on, so the UI thread can interrupt it.

    DuckDB's interrupt() stops only what runs on the very cursor it is called on, and run_sql opens
    its own cursor from the connection it is given: so run_sql is given this object, which hands out
    (and remembers) those cursors.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self._con = con
        self._lock = threading.Lock()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        self.cancelled = False
        self.finished = False

    def cursor(self) -> duckdb.DuckDBPyConnection:
        with self._lock:
            self.check()
            cur = self._con.cursor()
            self._cursors.append(cur)
            return cur

    def check(self) -> None:
        """Raise QueryCancelled once cancelled (called between steps: interrupt() misses a query not yet started)."""
        if self.cancelled:
            raise QueryCancelled()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            for cur in self._cursors:
                try:
                    cur.interrupt()
                except duckdb.Error:  # already closed
                    pass

    def close(self) -> None:
        with self._lock:
            for cur in self._cursors:
                try:
                    cur.close()
                except duckdb.Error:
                    pass
            self._cursors.clear()
            self.finished = True


class ConfirmWrite(Confirm):
    """Ask before letting SQL change the catalog."""

    def __init__(self) -> None:
        super().__init__(
            "[b]Allow SQL to change the catalog?[/b]\nINSERT, UPDATE, DELETE, CREATE... will run for real. "
            "There is no undo. COPY … TO writes files, though never over an image, its caption file or the catalog.",
            yes="Yes, write mode",
        )


class SqlScreen(SizeClasses, Screen):
    """Query the catalog with DuckDB SQL."""

    CSS_PATH = "sql_screen.tcss"
    BINDINGS = [
        # Priority: the editor would take ctrl+e (line end) and ctrl+w (delete word) for itself.
        Binding("f9,ctrl+enter,ctrl+j", "run", "Run", priority=True, tooltip="Run the query"),
        Binding("ctrl+e", "export('csv')", "CSV", priority=True, tooltip="Export the result as CSV"),
        Binding("ctrl+t", "export('parquet')", "Parquet", priority=True, tooltip="Export the result as Parquet"),
        Binding("ctrl+w", "toggle_write", "Write mode", priority=True),
        # as in harlequin (the editor's own select-all is F7, which opens the Train screen here); Home is line start
        Binding("ctrl+a", "select_all", "Select all", priority=True, show=False,
                tooltip="Select the whole query in the editor, so what you type replaces it (Home: line start)"),
        # Priority, else the editor takes Escape to move focus (it still does with no query running).
        # Not in the footer: the status line says "Esc cancels" while a query runs.
        Binding("escape", "cancel_query", "Cancel query", priority=True, show=False),
        # not priority: enter keeps its meaning in the editor, inputs, buttons and history; on the results it opens the row
        Binding("enter", "show_row", "Row in full", show=False),
    ]

    def action_select_all(self) -> None:
        focused = self.focused
        if isinstance(focused, TextArea):
            focused.select_all()
        elif isinstance(focused, Input):  # a box of its own: ctrl+a is line start there, as typed
            focused.action_home()

    @dataclass
    class _Result(Message):
        sql: str
        columns: list[str]
        rows: list[tuple]
        total: int | None
        seconds: float
        wrote: bool
        query: InterruptibleQuery | None = None

    @dataclass
    class _Exported(Message):
        path: str

    @dataclass
    class _Failed(Message):
        error: str
        query: InterruptibleQuery | None = None
        sql: str | None = None  # a console query that failed (None: an export)

    def __init__(self) -> None:
        super().__init__()
        self.history: list[str] = []
        self.show_timings = True
        self.last_sql: str | None = None
        self.running_query: InterruptibleQuery | None = None  # the query running now
        self.running_export: InterruptibleQuery | None = None  # the latest export (may have finished)

    def compose(self) -> ComposeResult:
        yield ScreenBar("sql")
        with Horizontal(id="sql-top"):
            yield TextArea.code_editor(EXAMPLE, language="sql", id="editor")
            with Vertical(id="sql-side"):
                yield Label("history (enter loads):")
                yield OptionList(id="history")
                with Horizontal(id="write-row"):
                    yield Switch(value=False, id="write")
                    yield Label("write mode", id="write-label")
        with Horizontal(id="sql-actions"):
            yield Button("Run (F9)", id="run", variant="primary")
            yield Input(placeholder="export file, beside the catalog unless absolute (results.csv / .parquet)", id="export-path")
            yield Button("CSV", id="export-csv")
            yield Button("Parquet", id="export-parquet")
        yield Label("read-only: SELECT, EXPLAIN, DESCRIBE… run; writes need write mode", id="sql-status")
        yield PageTable(id="results")
        yield Footer()

    @dataclass
    class _History(Message):
        queries: list[str]

    def on_mount(self) -> None:
        self.query_one("#editor", TextArea).focus()
        self._read_saved_history()

    @work(thread=True, exclusive=True, group="sql-history")
    def _read_saved_history(self) -> None:
        try:
            self.post_message(self._History(saved_history(self.app.con)))
        except duckdb.Error:  # a history that cannot be read leaves the console as it is
            pass

    @on(_History)
    def _history_loaded(self, message: _History) -> None:
        self.history = message.queries + self.history  # (a query run while it loaded comes after)
        history = self.query_one("#history", OptionList)
        history.clear_options()
        history.add_options([_history_option(sql) for sql in self.history])
        history.scroll_end(animate=False)  # the newest queries, at the bottom, in view (only the oldest showed)
        if self.history and self.query_one("#editor", TextArea).text == EXAMPLE:
            self.query_one("#editor", TextArea).load_text(self.history[-1])  # go on where the last visit stopped

    # --- run ----------------------------------------------------------------------

    @property
    def write_mode(self) -> bool:
        return self.query_one("#write", Switch).value

    @on(Button.Pressed, "#run")
    def action_run(self) -> None:
        sql = self.query_one("#editor", TextArea).text.strip()
        if not sql:
            self.notify("Type a query first.", severity="warning")
            return
        self.query_one("#sql-status", Label).update("running… (Esc cancels)")
        self._stop_query()  # one query at a time: a new one stops the old
        self.running_query = InterruptibleQuery(self.app.con)
        self._run(self.running_query, sql, self.write_mode)

    def action_cancel_query(self) -> None:
        if self.running_query is None:
            raise SkipAction()  # nothing to cancel: Escape keeps its meaning in the editor
        self._stop_query()
        self.query_one("#sql-status", Label).update("query cancelled")

    def _stop_query(self) -> None:
        if self.running_query is not None:
            self.running_query.cancel()
            self.running_query = None

    def on_unmount(self) -> None:
        # Quitting must not wait for a long query: the app's exit waits for every worker thread.
        self._stop_query()
        if self.running_export is not None:
            self.running_export.cancel()

    @work(thread=True, exclusive=True, group="sql-run")
    def _run(self, query: InterruptibleQuery, sql: str, write: bool) -> None:
        started = time.perf_counter()
        wrote = False
        try:
            wrote = not is_read_only_sql(sql)  # raises on SQL that does not parse: shown like any other error
            relation = run_sql(query, sql, write=write)
            if relation is None:
                result = self._Result(sql, [], [], None, time.perf_counter() - started, wrote, query)
            else:
                query.check()
                rows = relation.limit(RESULT_ROWS + 1).fetchall()
                total = len(rows) if len(rows) <= RESULT_ROWS else None
                result = self._Result(sql, list(relation.columns), rows[:RESULT_ROWS], total, time.perf_counter() - started, wrote, query)
        except Exception as error:
            if query.cancelled:  # whoever cancelled it has said so
                if wrote:
                    self.post_message(CatalogChanged("sql"))  # a write may have got through before the interrupt
                return
            message = people_message(error)
            if isinstance(error, CatalogError) and not write and "read-only by default" in message:
                message = "Refused: this SQL writes to the catalog. Switch on write mode (ctrl+w) to allow it."
            elif isinstance(error, CatalogError):  # a refusal in write mode too (a protected table, the catalog file)
                message = message.replace("--write", "write mode")
            self._remember(sql, ok=False)  # kept, to be mended: it is in the history list too
            self.post_message(self._Failed(message, query, sql))
            return
        finally:
            query.close()
        if not query.cancelled:
            self._remember(sql, ok=True)
            self.post_message(result)
        elif wrote:
            self.post_message(CatalogChanged("sql"))

    def _remember(self, sql: str, *, ok: bool) -> None:
        """Save a query to the catalog's history (in the worker that ran it; a failure to save is no query error)."""
        try:
            save_to_history(self.app.con, sql, ok=ok)
        except duckdb.Error:
            pass

    def _add_to_history(self, sql: str) -> None:
        if not self.history or self.history[-1] != sql:
            self.history.append(sql)
            history = self.query_one("#history", OptionList)
            history.add_option(_history_option(sql))
            history.scroll_end(animate=False)

    def _current(self, query: InterruptibleQuery | None) -> bool:
        """Whether a query's message is still wanted (not from one cancelled or replaced meanwhile)."""
        if query is None:  # exports
            return True
        if query is not self.running_query:
            return False
        self.running_query = None
        return True

    @on(_Result)
    def _result(self, message: _Result) -> None:
        if not self._current(message.query):
            return
        self.last_sql = message.sql
        self._add_to_history(message.sql)
        first = message.rows[0] if message.rows else None
        self.result_columns, self.result_rows = message.columns, message.rows  # whole values, for the row view
        self.query_one("#results", PageTable).set_rows(
            message.columns,
            [[cell(name, value) for name, value in zip(message.columns, row)] for row in message.rows],
            right_aligned=[first is not None and is_number(v) for v in (first or [])] or None,
            cursor=0,
        )
        shown = f"{len(message.rows):,} rows" if message.total is not None else f"first {RESULT_ROWS:,} rows (export for all)"
        ran = len(statement_kinds(message.sql))
        shown += f" of the last of {ran} statements, which all ran" if ran > 1 else ""
        shown += " · Enter on a row shows it in full" if message.rows else ""
        timing = f" · {message.seconds * 1000:.0f} ms" if self.show_timings else ""
        self.query_one("#sql-status", Label).update(shown + timing)
        if message.wrote:
            self.post_message(CatalogChanged("sql"))

    @on(_Failed)
    def _failed(self, message: _Failed) -> None:
        if not self._current(message.query):
            return
        if message.sql is not None:
            self._add_to_history(message.sql)
        # the status line holds the error's first line (its details are in the toast); errors quote the SQL's data
        self.query_one("#sql-status", Label).update(f"[red]{markup_safe((message.error.splitlines() or [''])[0])}[/]")
        self.query_one("#results", PageTable).set_rows([], [])  # not the previous query's rows under this error
        self.result_columns, self.result_rows = [], []
        self.last_sql = None  # nor its export
        self.notify(message.error, title="SQL", severity="error", timeout=8)

    @on(OptionList.OptionSelected, "#history")
    def _load_history(self, event: OptionList.OptionSelected) -> None:
        self.query_one("#editor", TextArea).load_text(self.history[event.option_index])
        self.query_one("#editor", TextArea).focus()

    # --- write mode -----------------------------------------------------------------

    def action_toggle_write(self) -> None:
        switch = self.query_one("#write", Switch)
        switch.value = not switch.value

    @on(Switch.Changed, "#write")
    def _write_changed(self, event: Switch.Changed) -> None:
        if not event.value:
            self.query_one("#write-label", Label).update("write mode")
            return

        def answered(yes: bool | None) -> None:
            switch = self.query_one("#write", Switch)
            if yes:
                self.query_one("#write-label", Label).update("[b yellow]WRITE MODE[/]")
            else:
                with switch.prevent(Switch.Changed):
                    switch.value = False

        self.app.push_screen(ConfirmWrite(), answered)

    @on(PageTable.RowSelected, "#results")
    def _row_selected(self, event: PageTable.RowSelected) -> None:
        self._show_row(event.row)

    def action_show_row(self) -> None:
        results = self.query_one("#results", PageTable)
        if self.focused is not results:
            raise SkipAction()
        self._show_row(results.cursor_row)

    def _show_row(self, index: int) -> None:
        """A result row's values whole (Enter or a double click on it): the table cuts them to fit."""
        rows = getattr(self, "result_rows", [])
        if 0 <= index < len(rows):
            self.app.push_screen(RowDetail(self.result_columns, rows[index], index + 1))

    # --- export -----------------------------------------------------------------------

    @on(Button.Pressed, "#export-csv")
    def _export_csv(self) -> None:
        self.action_export("csv")

    @on(Button.Pressed, "#export-parquet")
    def _export_parquet(self) -> None:
        self.action_export("parquet")

    def action_export(self, kind: str) -> None:
        if self.last_sql is None or not is_read_only_sql(self.last_sql):
            self.notify("Run a SELECT first; its full result is exported.", severity="warning")
            return
        if self.query_one("#editor", TextArea).text.strip() != self.last_sql:  # export what the table shows, or nothing
            self.notify("The editor holds a query not run yet: run it (F9) first; export runs the query shown again, for all its rows.",
                        severity="warning")
            return
        typed = self.query_one("#export-path", Input).value.strip()
        path = Path(typed or f"results.{kind}")
        if path.suffix.lower() != f".{kind}":
            path = path.with_suffix(f".{kind}")
        if not path.is_absolute():
            path = self.app.catalog_path.resolve().parent / path
        if path.is_dir() or not path.parent.is_dir():
            self.notify(f"Cannot write {path}: give a file name in an existing folder.", severity="error")  # toasts never read markup
            return
        protected = protected_file(self.app.con, path)
        if protected:
            self.notify(f"Not written: {protected}. Give another file name.", severity="error")
            return
        if path.exists():
            def answered(replace: bool | None) -> None:
                if replace:
                    self._start_export(path, kind)

            self.app.push_screen(Confirm(f"{markup_safe(str(path))} already exists. Replace it?", yes="Replace"), answered)
            return
        self._start_export(path, kind)

    def _start_export(self, path: Path, kind: str) -> None:
        if self.running_export is not None:
            self.running_export.cancel()
        self.running_export = InterruptibleQuery(self.app.con)
        self._export(self.running_export, self.last_sql, path, kind)

    @work(thread=True, exclusive=True, group="sql-export")
    def _export(self, query: InterruptibleQuery, sql: str, path: Path, kind: str) -> None:
        try:
            relation = run_sql(query, sql)
            query.check()
            if kind == "csv":
                relation.write_csv(str(path))
            else:
                relation.write_parquet(str(path))
        except Exception as error:
            if not query.cancelled:
                self.post_message(self._Failed(people_message(error)))
            return
        finally:
            query.close()
        self.post_message(self._Exported(str(path)))

    @on(_Exported)
    def _exported(self, message: _Exported) -> None:
        self.query_one("#sql-status", Label).update(f"exported to {markup_safe(str(message.path))}")
        self.notify(f"wrote {message.path}", title="Export")
