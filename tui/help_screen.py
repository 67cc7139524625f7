"""F1: every key binding of the app and of each screen, generated from the BINDINGS themselves."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

ABOUT = (
    "Screens switch with the function keys shown in the top line (or a click on their names). Every button and "
    "table also works with the mouse; in the Browse and Captions tables, click a column header to sort by it. Tab "
    "moves between fields."
)


def _bindings(owner) -> list[Binding]:
    found = []
    for item in getattr(owner, "BINDINGS", []):
        if isinstance(item, Binding):
            found.append(item)
        else:
            key, action, *rest = item
            found.append(Binding(key, action, rest[0] if rest else ""))
    return found


def bindings_table(sections: list[tuple[str, object]]) -> Table:
    table = Table(expand=True, show_edge=False)
    table.add_column("where", style="bold magenta", no_wrap=True)
    table.add_column("keys", style="bold cyan", no_wrap=True)
    table.add_column("does")
    for title, owner in sections:
        first = True
        for binding in _bindings(owner):
            keys = ", ".join(k.strip() for k in binding.key.split(","))
            table.add_row(title if first else "", keys, binding.tooltip or binding.description or binding.action)
            first = False
    return table


class HelpScreen(ModalScreen[None]):
    """Lists every binding; Escape or F1 closes it."""

    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close help")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 90%; height: 90%; border: thick $primary; background: $surface; padding: 0 1; }
    """

    def __init__(self, sections: list[tuple[str, object]]) -> None:
        super().__init__()
        self.sections = sections

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static("[b]workbench: keys[/b]  (Esc closes)\n" + ABOUT + "\n")
            self.table = bindings_table(self.sections)
            yield Static(self.table, id="help-bindings")
