"""Shown instead of a traceback when another process holds the catalog: wait, retry or quit."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Label, Static


class LockedScreen(Screen[None]):
    """The catalog is locked by another process; the app retries when asked (or every second while waiting)."""

    BINDINGS = [
        Binding("r", "retry", "Retry"),
        Binding("w", "wait", "Wait"),
        Binding("q", "app.quit", "Quit"),
    ]
    DEFAULT_CSS = """
    LockedScreen { align: center middle; }
    LockedScreen #locked-box { width: 80; height: auto; border: thick $error; padding: 1 2; }
    LockedScreen #locked-message { margin-bottom: 1; }
    LockedScreen Horizontal { height: auto; align: center middle; }
    LockedScreen Button { margin: 0 1; }
    """

    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message
        self.waiting = False

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="locked-box"):
            yield Label("[b]Catalog in use[/b]")
            yield Static(self.message, id="locked-message", markup=False)  # a path may hold [ ]
            yield Label("", id="locked-state")
            with Horizontal():
                yield Button("Retry", id="retry", variant="primary")
                yield Button("Wait", id="wait")
                yield Button("Quit", id="quit", variant="error")
        yield Footer()

    def update_message(self, message: str) -> None:
        self.message = message
        self.query_one("#locked-message", Static).update(message)

    @on(Button.Pressed, "#retry")
    def action_retry(self) -> None:
        self.app.open_catalog()

    @on(Button.Pressed, "#wait")
    def action_wait(self) -> None:
        if not self.waiting:
            self.waiting = True
            self.query_one("#locked-state", Label).update("waiting: retrying every second…")
            self.set_interval(1.0, self.app.open_catalog)

    @on(Button.Pressed, "#quit")
    def _quit(self) -> None:
        self.app.exit()
