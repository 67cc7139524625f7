"""The Textual workbench: opens the catalog, composes the screens and routes between them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import duckdb
from textual.app import App
from textual.binding import Binding

from tui.browser_screen import BrowserScreen
from tui.captions_screen import CaptionsScreen
from tui.confirm import Confirm
from tui.duplicates_screen import DuplicatesScreen
from tui.help_screen import HelpScreen
from tui.image_table import ImageTable
from tui.locked_screen import LockedScreen
from tui.messages import CatalogChanged, WorkFailed
from tui.page_table import PageTable
from tui.pipeline_screen import PipelineScreen
from tui.safe_text import visible
from tui.screen_bar import SCREEN_KEYS
from tui.sql_screen import SqlScreen
from tui.train_screen import TrainScreen
from workbench.catalog import CatalogError, CatalogLockedError, connect

STEP_STOP_WAIT = 10.0  # seconds quitting waits for cancelled steps to record how they ended

_SCREEN_CLASSES = {"pipeline": PipelineScreen, "browser": BrowserScreen, "captions": CaptionsScreen,
                   "duplicates": DuplicatesScreen, "sql": SqlScreen, "train": TrainScreen}
SCREENS_BY_KEY = tuple((key, mode, label, _SCREEN_CLASSES[mode]) for key, mode, label in SCREEN_KEYS)


def _text_written_since(log: Path, offset: int, most_lines: int = 60) -> str:
    """The last lines the log got after `offset` (the traceback of the session that just ended)."""
    with open(log, "rb") as handle:
        handle.seek(offset)
        lines = handle.read().decode("utf-8", "replace").rstrip().splitlines()
    return "\n".join(lines[-most_lines:])


class WorkbenchApp(App[None]):
    """One catalog, six screens; all blocking work runs in thread workers with their own cursors."""

    TITLE = "workbench"
    CSS_PATH = "app.tcss"
    MODES = {mode: screen for _, mode, _, screen in SCREENS_BY_KEY}
    # Screen keys are priority bindings: TextArea takes F6/F7 (select line/all) when an editor has focus. They and
    # F1 are shown in each screen's top line (ScreenBar), not in the footer, which cut them off at 80 columns.
    BINDINGS = [
        Binding("f1", "help", "Help", show=False),
        *(Binding(key, f"show('{mode}')", label, priority=True, show=False) for key, mode, label, _ in SCREENS_BY_KEY),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, catalog_path: str | os.PathLike[str], *, start: str | None = None) -> None:
        super().__init__()
        self.catalog_path = Path(catalog_path)
        self.start = start
        self.con: duckdb.DuckDBPyConnection | None = None
        self.catalog_version = 0
        self.running_steps: set = set()  # CancellableProgress of steps and training running now
        self.training_in: str | None = None  # the output folder of the training run going on now, if one is
        self.failure: str | None = None  # why the app could not open the catalog
        self.crash_report: str | None = None  # the traceback of an error that stopped the app, for the CLI to print
        self.stderr_log: Path | None = None  # where native code's stderr (and Textual's tracebacks) went while it ran
        self.sub_title = str(self.catalog_path)

    def run(self, *args, **kwargs):
        """Run in the terminal; output that native code writes to stderr goes to a log instead of the screen."""
        from tui.terminal import native_stderr_to
        from workbench.config import workbench_home

        log = self.stderr_log = workbench_home() / "logs" / "tui-stderr.log"
        start = log.stat().st_size if log.is_file() else 0
        with native_stderr_to(log):
            result = super().run(*args, **kwargs)
        if self.return_code and self.failure is None:
            # Textual printed the traceback while fd 2 still went to the log: the user saw the screen vanish and
            # nothing else, and the shell got exit 0
            self.crash_report = _text_written_since(log, start) if log.is_file() else ""
        return result

    def on_mount(self) -> None:
        self.open_catalog()

    def open_catalog(self) -> None:
        """Open the catalog for writing; if another process holds it, show who with wait/retry."""
        if self.con is not None:
            return
        new = not Path(self.catalog_path).exists()
        try:
            self.con = connect(self.catalog_path)
        except CatalogLockedError as error:
            if isinstance(self.screen, LockedScreen):
                self.screen.update_message(str(error))
            else:
                self.push_screen(LockedScreen(str(error)))
            return
        except CatalogError as error:
            self.failure = str(error)  # the CLI prints it after the screen is restored
            self.exit(return_code=2)
            return
        if isinstance(self.screen, LockedScreen):
            self.pop_screen()
        if new:  # every other command refuses a catalog that is not there; here it is how a project starts
            self.notify(f"A new catalog: {Path(self.catalog_path).resolve()}. Ingest folders on the Pipeline screen "
                        "(F2), or quit and open another with --catalog.", title="New catalog", timeout=12)
        if self.start is None:
            cur = self.con.cursor()
            has_images = cur.execute("SELECT count(*) > 0 FROM images").fetchone()[0]
            cur.close()
            self.start = "browser" if has_images else "pipeline"
        self.switch_mode(self.start)

    def action_show(self, mode: str) -> None:
        if self.con is None:
            self.bell()
            return
        self.switch_mode(mode)

    def notify(self, message: str, *, title: str = "", severity="information", timeout: float | None = None,
               markup: bool = False) -> None:
        """Toasts carry catalog text (paths, captions, SQL errors): always shown as text, control characters escaped.

        `markup` is ignored: widgets pass True by default, and no toast here is meant to read markup.
        """
        # line breaks stay (DuckDB's errors are several lines); every other control character is escaped
        title = visible(title)
        if severity == "error":  # said in words: without colour (NO_COLOR) an error toast looked like any other
            title = f"Error: {title}" if title else "Error"
        super().notify(visible(str(message), keep="\n"), title=title, severity=severity, timeout=timeout, markup=False)

    async def action_quit(self) -> None:
        """Quit; running steps and training are stopped first, in view: they record how they ended (a training run
        its checkpoint), which takes seconds, and a UI that froze meanwhile looked hung."""
        if not self.running_steps or getattr(self, "_quitting", False):
            self.exit()  # (a second ctrl+q: now; on_unmount still waits, bounded, for the steps' records)
            return
        if isinstance(self.screen, Confirm):
            return  # already asking
        self.push_screen(Confirm("Work is running (a pipeline step or training): quitting stops it where it is, a "
                                 "training run at a checkpoint that Resume goes on from. Stop and quit?", yes="Stop and quit"),
                         lambda yes: self._stop_and_quit() if yes else None)

    def _stop_and_quit(self) -> None:
        if not self.running_steps:  # ended meanwhile
            self.exit()
            return
        self._quitting = True
        for progress in list(self.running_steps):
            progress.cancel()
        self.notify("Stopping what runs: it records how it ended (training: where Resume goes on), then the workbench "
                    "closes. ctrl+q again closes now.", title="Quit", timeout=STEP_STOP_WAIT)
        deadline = time.monotonic() + STEP_STOP_WAIT

        def closed_when_stopped() -> None:
            if not self.running_steps or time.monotonic() > deadline:
                self.exit()

        self.set_interval(0.1, closed_when_stopped)

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        sections = [("everywhere", type(self))]
        sections += [(label, screen) for _, _, label, screen in SCREENS_BY_KEY]
        sections += [("image tables", ImageTable), ("tables", PageTable)]
        self.push_screen(HelpScreen(sections))

    def on_catalog_changed(self, message: CatalogChanged) -> None:
        self.catalog_version += 1
        # Steps and training run on while another screen is shown: the screen in view shows their result now,
        # not when it is next opened. (A screen that made the change itself has already counted it as seen.)
        refresh = getattr(self.screen, "refresh_if_stale", None)
        if refresh is not None:
            self.call_later(refresh)

    def on_work_failed(self, message: WorkFailed) -> None:
        self.notify(message.error, title=message.title, severity="error", timeout=8)

    def on_unmount(self) -> None:
        # Running steps stop at their next progress call, so quitting never waits for a whole step;
        # wait for that (bounded) before closing: closing the connection closes the steps' cursors too,
        # and their runs rows would stay 'running' instead of being recorded 'cancelled'.
        for progress in list(self.running_steps):
            progress.cancel()
        deadline = time.monotonic() + STEP_STOP_WAIT
        while self.running_steps and time.monotonic() < deadline:
            time.sleep(0.02)
        con, self.con = self.con, None
        if con is None:
            return
        for _ in range(100):  # a worker may be between calls on the connection; give it a moment
            try:
                con.close()
                return
            except duckdb.Error:
                time.sleep(0.02)
