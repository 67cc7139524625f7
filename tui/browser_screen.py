"""Catalog browser: the paged image table, a details pane with everything known, and a preview."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Static

from tui import queries
from tui.concept_dialog import ConceptChoice, ConceptDialog, ConceptSettings
from tui.image_table import ImageTable
from tui.messages import CatalogChanged, ImagePicked
from tui.preview import ImagePreview, load_preview
from tui.safe_text import visible
from tui.screen_bar import ScreenBar
from tui.size_classes import SizeClasses
from tui.workers import people_message, toggle_message


def _short(value: Any) -> str:
    """Long lists (embeddings) as their length, floats short."""
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"[{len(value)} values]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# Shown first, in this order; every other column follows after the captions and related tables.
KEY_FIELDS = (
    "path", "width", "height", "format", "mode", "bytes", "status", "error", "role", "caption", "caption_source",
    "duplicate_group", "is_keeper", "excluded", "exclusion_reason", "concept", "bucket_width", "bucket_height",
)


def _value(key: str, value: Any) -> Text:
    if value is None:
        return Text("∅", style="dim")  # NULL, apart from any text (PageTable draws it so too)
    if key == "paths":
        return Text("\n".join(visible(path) for path in value))
    if key in ("phash", "dhash"):
        return Text(f"{value:016x}")
    return Text(visible(_short(value)))


def _plain(value: Any) -> Text:
    """Catalog text as a cell: Text so it is never read as markup, controls shown as escapes."""
    return Text(visible(str(value)))


def details_table(details: dict[str, Any], *, field_width: int | None = None) -> Table:
    """All metadata of one image as a two-column rich table: key facts, captions by source,
    rows of related tables (CLIP scores, ...), then every other column.

    Paths and captions come from files: every value is plain Text with control characters escaped.
    """
    table = Table(show_header=False, box=None, padding=(0, 1), expand=True)
    # in a narrow pane long field names are cut (…) so the values keep room to be read
    table.add_column("field", style="bold cyan", no_wrap=True, max_width=field_width, overflow="ellipsis")
    table.add_column("value", overflow="fold")
    row = details.get("row", {})
    for key in KEY_FIELDS:
        if key in row:
            table.add_row(key, _value(key, row[key]))
    captions = details.get("captions") or []
    if captions:
        table.add_row(Text("captions by source", style="bold magenta"), "")
        for source, text in captions:
            table.add_row(_plain(f"  {source}"), _plain(text))
    for name, rows in (details.get("tables") or {}).items():
        table.add_row(Text(visible(name), style="bold magenta"), "")
        for item in rows:
            table.add_row("", _plain(", ".join(f"{k}={_short(v)}" for k, v in item.items() if v is not None)))
    rest = [key for key in row if key not in KEY_FIELDS and key != "path_bytes"]
    if rest:
        table.add_row(Text("more", style="bold magenta"), "")
        for key in rest:
            table.add_row(_plain(key), _value(key, row[key]))
    return table


# The table shows these (fewer columns render faster); sorting and filtering use every column,
# and the details pane shows them all.
# what curating looks at first comes first: at 80 columns whether an image is out, and its caption, stay in view
BROWSER_COLUMNS = [
    "path", "excluded", "caption", "tags", "exclusion_reason", "width", "height", "concept", "caption_source", "format",
    "bytes", "status", "role", "duplicate_group", "is_keeper", "bucket_width", "bucket_height",
]


DETAILS_DELAY = 0.12  # seconds the cursor must rest on a row before its details load


class BrowserScreen(SizeClasses, Screen):
    """Browse every image: filter with SQL or text, sort by any column, inspect one."""

    # the rows, not the filter box (the first focusable widget): the screen's keys (x, c, enter) act on them at once
    AUTO_FOCUS = "#rows"
    CSS_PATH = "browser_screen.tcss"
    BINDINGS = [
        # Priority, as on Captions: found whatever has the focus (and with none), not through the rows' chain
        Binding("ctrl+f", "focus_filter", "Filter", priority=True, show=False),
        Binding("c", "concept", "Concept…"),
        Binding("x", "toggle_exclude", "Exclude/include"),
    ]

    def action_focus_filter(self) -> None:
        self.query_one(ImageTable).action_focus_filter()

    @dataclass
    class _Details(Message):
        image_id: str
        details: dict
        picture: Any

    @dataclass
    class _Concepts(Message):
        concepts: list[ConceptSettings]
        image_id: str
        result: Any  # the BrowseResult the table showed when asked
        current: str | None  # the image's concept now
        not_applied: str | None  # why "all filtered" cannot be offered (a filter typed, not applied)

    @dataclass
    class _Changed(Message):
        text: str
        severity: str = "information"

    def compose(self) -> ComposeResult:
        yield ScreenBar("browser")
        with Horizontal():
            yield ImageTable(id="browser-table", columns=BROWSER_COLUMNS)
            with VerticalScroll(id="details-pane"):
                yield ImagePreview(id="preview")
                yield Static("select an image", id="details")
        yield Footer()

    def on_mount(self) -> None:
        self.seen_version = self.app.catalog_version

    def on_screen_resume(self) -> None:
        self.refresh_if_stale()

    def refresh_if_stale(self) -> None:
        """Reload the rows if the catalog changed since they were read."""
        if getattr(self, "seen_version", None) not in (None, self.app.catalog_version):
            self.seen_version = self.app.catalog_version
            self.query_one(ImageTable).reload(keep_position=True)

    @on(ImagePicked)
    def _picked(self, message: ImagePicked) -> None:
        # Wait until the cursor rests, so holding an arrow key or paging does not queue detail loads.
        if getattr(self, "_details_timer", None) is not None:
            self._details_timer.stop()
        self._details_timer = self.set_timer(DETAILS_DELAY, lambda: self._load_details(message.image_id))

    @on(ImageTable.Loaded)
    def _rows_loaded(self, message: ImageTable.Loaded) -> None:
        if message.result.total:
            return
        # no row to rest on: the last image's details and picture went on showing, and read as the filter's
        if getattr(self, "_details_timer", None) is not None:
            self._details_timer.stop()
        self.shown_details = None
        self.query_one("#details", Static).update(Text("No image matches the filter.", style="dim"))
        self.query_one("#preview", ImagePreview).show("no image")

    @work(thread=True, exclusive=True, group="browser-details")
    def _load_details(self, image_id: str) -> None:
        try:
            details = queries.image_details(self.app.con, image_id)
        except Exception as error:
            details = {"row": {"error": people_message(error)}}
        picture = load_preview(queries.image_file(details)) if details else "image no longer in the catalog"
        self.post_message(self._Details(image_id, details, picture))

    @on(_Details)
    def _show_details(self, message: _Details) -> None:
        self.shown_details = message.details
        self.query_one("#details", Static).update(details_table(message.details, field_width=14 if self.has_class("-narrow") else None))
        self.query_one("#preview", ImagePreview).show(message.picture)

    # --- curation: concept, exclude / include -----------------------------------------

    def _shown(self) -> tuple[str | None, Any]:
        """The image under the cursor and the rows the table shows; warns and gives (None, None) when not ready."""
        table = self.query_one(ImageTable)
        image_id, result = table.current_image_id, table.result
        if image_id is None or result is None:
            self.notify("No image selected.", severity="warning")
            return None, None
        return image_id, result

    def action_concept(self) -> None:
        image_id, result = self._shown()
        if image_id is None:
            return
        # "all filtered" must mean the rows shown; this one image is fine either way
        self._load_concepts(image_id, result, self.query_one(ImageTable).not_applied())

    @work(thread=True, exclusive=True, group="browser-concepts")
    def _load_concepts(self, image_id: str, result: Any, not_applied: str | None) -> None:
        from pipelines.concepts import list_concepts

        cur = self.app.con.cursor()
        try:
            concepts = [ConceptSettings(c.name, c.trigger, c.class_noun or "", str(c.repeats)) for c in list_concepts(cur)]
            current = (cur.execute("SELECT concept FROM concept_images WHERE image_id = ?", [image_id]).fetchone() or [None])[0]
        except Exception as error:
            self.post_message(self._Changed(people_message(error), "error"))
            return
        finally:
            cur.close()
        self.post_message(self._Concepts(concepts, image_id, result, current, not_applied))

    @on(_Concepts)
    def _ask_concept(self, message: _Concepts) -> None:
        def chosen(choice: ConceptChoice | None) -> None:
            if choice is not None:
                self._apply_concept(choice, message.image_id, message.result)

        dialog = ConceptDialog(message.concepts, message.image_id[:12], message.result.total, message.result.filter.text.strip(),
                               current=message.current, all_refused=message.not_applied)
        self.app.push_screen(dialog, chosen)

    @work(thread=True, group="browser-write")
    def _apply_concept(self, choice: ConceptChoice, image_id: str, result: Any) -> None:
        from pipelines.concepts import added_concept, assign_images_to_concept, unassigned_images

        cur = self.app.con.cursor()
        try:
            made = ""
            if choice.settings is not None:  # a new concept, or one whose trigger, class or repeats changed
                settings = choice.settings
                try:
                    repeats = int(settings.repeats) if settings.repeats else None
                except ValueError:
                    raise ValueError(f"repeats must be a whole number, not {settings.repeats!r}") from None
                existed = bool(cur.execute("SELECT count(*) FROM concepts WHERE name = ?", [settings.name]).fetchone()[0])
                summary = added_concept(cur, settings.name, trigger=settings.trigger or None, class_noun=settings.class_noun,
                                        repeats=repeats)
                made = f"concept {settings.name} {'changed' if existed else 'made'}; " + (f"{summary['note']}; " if summary.get("note") else "")
            ids = result.image_ids() if choice.all_filtered else [image_id]
            if choice.concept is None:
                moved = unassigned_images(cur, ids)
                text = f"took {moved:,} of {len(ids):,} image(s) out of their concept"
            else:
                moved = assign_images_to_concept(cur, choice.concept, ids)
                text = f"{made}{len(ids):,} image(s) in concept {choice.concept} ({moved:,} moved there)"
        except Exception as error:
            self.post_message(self._Changed(people_message(error), "error"))
            return
        finally:
            cur.close()
        self.post_message(self._Changed(text))

    def action_toggle_exclude(self) -> None:
        image_id, _ = self._shown()
        if image_id is not None:
            self._toggle_exclude(image_id)

    @work(thread=True, group="browser-write")
    def _toggle_exclude(self, image_id: str) -> None:
        from pipelines.filter import toggled_exclusion

        cur = self.app.con.cursor()
        try:
            text, severity = toggle_message(toggled_exclusion(cur, image_id, "excluded in the browser"), image_id,
                                            keep_hint="keep it instead on the Duplicates screen (F5, k)")
        except Exception as error:
            self.post_message(self._Changed(people_message(error), "error"))
            return
        finally:
            cur.close()
        self.post_message(self._Changed(text, severity))

    @on(_Changed)
    def _changed(self, message: _Changed) -> None:
        self.notify(message.text, title="Browse", severity=message.severity, timeout=8 if message.severity != "information" else 5)
        if message.severity == "error":
            return
        self.post_message(CatalogChanged("browse"))
        self.seen_version = self.app.catalog_version + 1
        table = self.query_one(ImageTable)
        table.reload(keep_position=True)
        if table.current_image_id is not None:
            self._load_details(table.current_image_id)
