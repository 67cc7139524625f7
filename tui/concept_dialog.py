"""Put the image under the cursor, or every filtered image, in a concept (or take them out of theirs); make a new
concept or change one's trigger, class and repeats on the way."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select

NO_CONCEPT = "\x00none"  # the Select value for "take them out of their concept" (no concept can be named so)
NEW_CONCEPT = "\x00new"  # the Select value for "a new concept" (named in the name field)


@dataclass(frozen=True)
class ConceptSettings:
    """A concept's name, trigger token, class noun (DreamBooth's class prompt comes from it) and repeats."""

    name: str
    trigger: str
    class_noun: str
    repeats: str  # as typed: the concept step checks it


@dataclass(frozen=True)
class ConceptChoice:
    """What the dialog was closed with: the concept (None: out of any concept), which images, and the concept's
    settings when they are new or changed (None: as they are)."""

    concept: str | None
    all_filtered: bool
    settings: ConceptSettings | None = None


class ConceptDialog(ModalScreen[ConceptChoice | None]):
    """Pick a concept (or a new one), see or change its trigger, class and repeats, then "this image" or "all N
    filtered images"; Escape cancels."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]
    DEFAULT_CSS = """
    ConceptDialog { align: center middle; }
    ConceptDialog > Vertical { width: 76; max-width: 100%; height: auto; max-height: 100%; border: thick $primary;
                               background: $surface; padding: 0 2; overflow-y: auto; }
    ConceptDialog Select { margin: 1 0 0 0; }
    ConceptDialog #concept-fields { height: auto; margin: 1 0 0 0; }
    ConceptDialog #concept-fields Input { width: 1fr; }
    ConceptDialog #concept-name.-hidden { display: none; }
    ConceptDialog #concept-filter { margin: 1 0; }
    ConceptDialog Horizontal { height: auto; }
    ConceptDialog Button { margin-right: 1; }
    """

    def __init__(self, concepts: list[ConceptSettings], image_label: str, filtered: int, filter_text: str, *,
                 current: str | None = None, all_refused: str | None = None) -> None:
        super().__init__()
        self.concepts = {concept.name: concept for concept in concepts}
        self.image_label = image_label
        self.filtered = filtered
        self.filter_text = filter_text
        self.current = current  # the image's concept: the choice starts there
        self.all_refused = all_refused  # why "all filtered" is off (a filter typed but not applied)

    def compose(self) -> ComposeResult:
        shown = self.filter_text or "none: all images"
        names = list(self.concepts)
        with Vertical():
            yield Label("[b]Concept[/b]: trigger, class, repeats (a change applies to all its images)")
            start = self.current if self.current in self.concepts else (names[0] if names else NEW_CONCEPT)
            yield Select([(Text(name), name) for name in names] + [("new concept…", NEW_CONCEPT),
                                                                   ("no concept: take them out of theirs", NO_CONCEPT)],
                         value=start, allow_blank=False, id="concept-choice")
            with Horizontal(id="concept-fields"):
                yield Input(placeholder="name", id="concept-name")
                yield Input(placeholder="trigger", id="concept-trigger")
                yield Input(placeholder="class", id="concept-class")
                yield Input(placeholder="repeats", id="concept-repeats", type="integer")
            yield Label(Text(f"filter: {shown}" if not self.all_refused else self.all_refused), id="concept-filter")
            with Horizontal():
                yield Button(Text(f"This image ({self.image_label})"), id="concept-one", variant="primary")
                yield Button(f"All {self.filtered:,} filtered", id="concept-all", variant="warning", disabled=bool(self.all_refused))
                yield Button("Cancel (esc)", id="concept-cancel")

    def on_mount(self) -> None:
        for field in ("name", "trigger", "class", "repeats"):  # labelled on their border: values fill them
            self.query_one(f"#concept-{field}", Input).border_title = field
        self._show_fields(self.query_one("#concept-choice", Select).value)

    @on(Select.Changed, "#concept-choice")
    def _choice_changed(self, event: Select.Changed) -> None:
        self._show_fields(event.value)

    def _show_fields(self, value) -> None:
        """The chosen concept's settings in the fields; empty ones (and a name field) for a new concept."""
        concept = self.concepts.get(value) if isinstance(value, str) else None
        self.query_one("#concept-fields").display = value != NO_CONCEPT
        self.query_one("#concept-name", Input).set_class(value != NEW_CONCEPT, "-hidden")
        values = ("", "", "", "1") if concept is None else ("", concept.trigger, concept.class_noun, concept.repeats)
        for field, text in zip(("name", "trigger", "class", "repeats"), values):
            self.query_one(f"#concept-{field}", Input).value = text

    def _settings(self, value: str) -> ConceptSettings | None:
        typed = ConceptSettings(*(self.query_one(f"#concept-{field}", Input).value.strip()
                                  for field in ("name", "trigger", "class", "repeats")))
        if value == NEW_CONCEPT:
            return typed
        old = self.concepts[value]
        typed = ConceptSettings(value, typed.trigger, typed.class_noun, typed.repeats)
        return None if typed == old else typed

    @on(Button.Pressed)
    def _answer(self, event: Button.Pressed) -> None:
        if event.button.id == "concept-cancel":
            self.dismiss(None)
            return
        value = self.query_one("#concept-choice", Select).value
        all_filtered = event.button.id == "concept-all"
        if value == NO_CONCEPT:
            self.dismiss(ConceptChoice(None, all_filtered))
            return
        settings = self._settings(str(value))
        if value == NEW_CONCEPT and not (settings.name and settings.trigger):
            self.notify("A new concept needs a name and a trigger token.", severity="warning")
            return
        self.dismiss(ConceptChoice(settings.name if value == NEW_CONCEPT else str(value), all_filtered, settings))
