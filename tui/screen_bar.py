"""The top line of every screen: F1 and the screens' keys (the current one lit), then the catalog's path where
there is room. The footer, which lists a screen's own keys first, cut the screen keys off in an 80-column terminal."""

from __future__ import annotations

from rich.cells import cell_len
from textual.app import RenderResult
from textual.content import Content
from textual.widget import Widget

from tui.safe_text import visible

# (key, mode, label) of each screen, in key order: the app binds them, this bar shows them
SCREEN_KEYS = (
    ("f2", "pipeline", "Pipeline"),
    ("f3", "browser", "Browse"),
    ("f4", "captions", "Captions"),
    ("f5", "duplicates", "Duplicates"),
    ("f6", "sql", "SQL"),
    ("f7", "train", "Train"),
)


class ScreenBar(Widget):
    """Where you are and where the function keys go; each name is also clickable."""

    DEFAULT_CSS = """
    ScreenBar { dock: top; height: 1; background: $panel; color: $text; }
    """

    def __init__(self, current: str, *, id: str | None = "screen-bar") -> None:
        super().__init__(id=id)
        self.current = current

    def render(self) -> RenderResult:
        items = [("F1", "Help", "app.help", False)]
        items += [(key.upper(), label, f"app.show('{mode}')", mode == self.current) for key, mode, label in SCREEN_KEYS]
        spaced = " " + "  ".join(f"{key} {label}" for key, label, _, _ in items)
        gap = "  " if len(spaced) <= self.size.width else " "  # a narrow terminal keeps every key, closer together
        parts: list[Content | str] = [" "]
        for i, (key, label, action, current) in enumerate(items):
            if i:
                parts.append(gap)
            style = "reverse bold" if current else ""
            parts.append(Content.from_markup(f"[{style} @click={action}]$key[/]", key=f"{key} {label}") if style
                         else Content.from_markup(f"[@click={action}][b]$key[/b] $label[/]", key=key, label=label))
        line = Content("").join(parts)
        room = self.size.width - line.cell_length - 2
        catalog = visible(str(getattr(self.app, "catalog_path", "") or ""))
        if room >= 12 and catalog:  # the catalog's path on the right, its start cut first (the file name matters)
            shown = catalog
            while cell_len(shown) > room:  # cells, not characters: a CJK name is two cells a character
                shown = "…" + shown[2:]
            line = Content("").join([line, " " * (self.size.width - line.cell_length - cell_len(shown) - 1),
                                     Content.styled(shown, "dim")])
        return line
