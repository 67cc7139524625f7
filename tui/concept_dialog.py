"""Put the image under the cursor, or every filtered image, in a concept (or take them out of theirs)."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Select

NO_CONCEPT = "\x00none"  # the Select value for "take them out of their concept" (no concept can be named so)


@dataclass(frozen=True)
class ConceptChoice:
    """What the dialog was closed with: the concept (None: out of any concept) and which images."""

    concept: str | None
    all_filtered: bool


class ConceptDialog(ModalScreen[ConceptChoice | None]):
    """Pick a concept, then "this image" or "all N filtered images"; Escape cancels."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]
    DEFAULT_CSS = """
    ConceptDialog { align: center middle; }
    ConceptDialog > Vertical { width: 72; max-width: 100%; height: auto; border: thick $primary; background: $surface; padding: 1 2; }
    ConceptDialog Select { margin: 1 0; }
    ConceptDialog Horizontal { height: auto; }
    ConceptDialog Button { margin-right: 1; }
    """

    def __init__(self, concepts: list[str], image_label: str, filtered: int, filter_text: str, *,
                 current: str | None = None, all_refused: str | None = None) -> None:
        super().__init__()
        self.concepts = concepts
        self.image_label = image_label
        self.filtered = filtered
        self.filter_text = filter_text
        self.current = current  # the image's concept: the choice starts there
        self.all_refused = all_refused  # why "all filtered" is off (a filter typed but not applied)

    def compose(self) -> ComposeResult:
        shown = self.filter_text or "none: all images"
        with Vertical():
            yield Label("[b]Concept[/b] (repeats, trigger and class come with it)")
            start = self.current if self.current in self.concepts else (self.concepts[0] if self.concepts else NO_CONCEPT)
            yield Select([(Text(name), name) for name in self.concepts] + [("no concept: take them out of theirs", NO_CONCEPT)],
                         value=start, allow_blank=False, id="concept-choice")
            yield Label(Text(f"filter: {shown}" if not self.all_refused else self.all_refused), id="concept-filter")
            with Horizontal():
                yield Button(Text(f"This image ({self.image_label})"), id="concept-one", variant="primary")
                yield Button(f"All {self.filtered:,} filtered", id="concept-all", variant="warning", disabled=bool(self.all_refused))
                yield Button("Cancel (esc)", id="concept-cancel")

    @on(Button.Pressed)
    def _answer(self, event: Button.Pressed) -> None:
        if event.button.id == "concept-cancel":
            self.dismiss(None)
            return
        value = self.query_one("#concept-choice", Select).value
        self.dismiss(ConceptChoice(None if value == NO_CONCEPT else str(value), event.button.id == "concept-all"))
