"""Caption editor: edit the current caption, accept or reject a model's, bulk edits over the filtered rows with undo."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Checkbox, Footer, Input, Label, OptionList, TextArea
from textual.widgets.option_list import Option
from textual.worker import get_current_worker

from pipelines import caption_edits
from tui import queries
from tui.confirm import Confirm
from tui.image_table import ImageTable, cut_start
from tui.messages import CatalogChanged, ImagePicked
from tui.page_table import PageTable
from tui.preview import ImagePreview, load_preview
from tui.safe_text import markup_safe, visible
from tui.screen_bar import ScreenBar
from tui.size_classes import SizeClasses
from tui.workers import people_message


def _unreadable_note(left_out: int) -> str:
    """What a bulk edit says of the filtered rows it leaves alone (files ingest could not read have no caption)."""
    return f" ({left_out:,} {'image' if left_out == 1 else 'images'} whose files could not be read at ingest left alone)" if left_out else ""


class CaptionsScreen(SizeClasses, Screen):
    """Fix captions one by one or in bulk; every edit becomes a 'manual' caption.

    Leaving an image with unsaved edits saves them (as ctrl+s would): editing runs down the rows
    with ctrl+down, and a typed caption is never dropped silently.
    """

    # the rows, not the filter box (the first focusable widget): the screen's keys (x, c, enter) act on them at once
    AUTO_FOCUS = "#rows"
    CSS_PATH = "captions_screen.tcss"
    BINDINGS = [
        # Priority: the editor and inputs would take ctrl+a (line start) for themselves.
        Binding("ctrl+s", "save", "Save", priority=True, tooltip="Save the edited caption (moving to another image saves it too)"),
        Binding("ctrl+a", "accept", "Accept", priority=True, tooltip="Accept the selected source as the caption"),
        Binding("ctrl+r", "reject", "Reject", priority=True, tooltip="Reject the selected caption source"),
        Binding("f8", "undo_bulk", "Undo bulk", priority=True, tooltip="Undo the last bulk edit"),
        Binding("ctrl+f", "focus_filter", "Filter", priority=True),  # also from the caption editor
        # Not priority: enter keeps its meaning in inputs, buttons and the sources list; on the table it edits.
        Binding("enter", "edit", "Edit caption of the row", show=False),
        Binding("ctrl+down", "move(1)", "Next", priority=True, tooltip="Next image"),
        Binding("ctrl+up", "move(-1)", "Prev", priority=True, tooltip="Previous image"),
    ]

    @dataclass
    class _Loaded(Message):
        image_id: str
        details: dict
        picture: Any

    @dataclass
    class _Done(Message):
        text: str
        undo: caption_edits.BulkUndo | None = None
        undone: bool = False
        severity: str = "information"

    @dataclass
    class _Planned(Message):
        """A bulk edit counted, ready to be confirmed: what it does and to how many captions."""

        filter_text: str  # the filter the targets come from, as applied
        total: int  # images the filter shows
        targets: list[str]  # those of them that loaded (the ones edited)
        edit: dict
        description: str
        changes: int  # captions the edit would change
        emptied: int  # captions it would leave empty: not changed

    @dataclass
    class _Failed(Message):
        error: str

    def __init__(self) -> None:
        super().__init__()
        self.image_id: str | None = None  # the image in the editor
        self.loaded_text = ""  # its caption as the catalog had it: the editor differs from it when edited
        self._wanted: str | None = None  # the image last picked (its details may still be loading)
        self._overwrite_editor = False  # the next load replaces even edited text (after accept/reject)
        self._write_lock = threading.Lock()
        self.last_bulk: caption_edits.BulkUndo | None = None
        self.source_texts: dict[str, str] = {}  # source -> caption text, for the image in the editor
        # the editor's text and the sidecar box, mirrored for on_unmount, when the widgets are already gone
        self._editor_text = ""
        self._write_sidecars = False
        # saves started and not yet written (image_id -> text): a reload read before one lands must not put the old
        # caption back in the editor, and quitting before its worker ran must still write it
        self._unsaved: dict[str, tuple[str, bool]] = {}
        self._path_line = ("", "")  # (path, caption source) of the image in the editor, cut to the label's width

    def compose(self) -> ComposeResult:
        yield ScreenBar("captions")
        with Horizontal(id="captions-main"):
            yield ImageTable(
                id="captions-table",
                columns=["path", "caption", "caption_source"],  # the source also shows beside the editor
                placeholder="filter the rows to edit: SQL WHERE (caption IS NULL) or text",
            )
            with Vertical(id="caption-editor"):
                yield ImagePreview(id="caption-preview")
                yield Label("no image selected", id="caption-path")
                yield TextArea("", id="caption-text", soft_wrap=True)
                with Horizontal(classes="button-row"):
                    yield Button("Save (ctrl+s)", id="save", variant="primary")
                    yield Checkbox("write sidecar .txt", id="sidecars")
                yield Label("captions by source (accept ctrl+a / reject ctrl+r):")
                yield OptionList(id="sources")
                with Horizontal(classes="button-row"):
                    yield Button("Accept", id="accept", variant="success")
                    yield Button("Reject", id="reject", variant="error")
        with Horizontal(id="bulk-bar"):
            yield Input(placeholder="find", id="find")
            yield Input(placeholder="replace with", id="replace")
            yield Checkbox("regex", id="regex", tooltip="find is a regular expression (RE2; \\1 in replace is its first group)")
            yield Button("Replace in filtered", id="bulk-replace")
            yield Button("Undo bulk (F8)", id="bulk-undo", disabled=True)
            yield Input(placeholder="trigger token", id="token")
            yield Button("Add token", id="bulk-add")
            yield Button("Remove token", id="bulk-remove")
        yield Footer()

    def on_mount(self) -> None:
        self.seen_version = self.app.catalog_version

    def on_screen_resume(self) -> None:
        self.refresh_if_stale()

    def on_screen_suspend(self) -> None:
        """Another screen (F3, F7 …): an edited caption is saved, as on leaving the image; Browse and a training
        run started now see it. A question or help shown over this screen is not leaving it."""
        if not isinstance(self.app.screen, ModalScreen):
            self._autosave()

    def refresh_if_stale(self) -> None:
        """Reload the rows if the catalog changed since they were read."""
        if self.seen_version != self.app.catalog_version:
            self.seen_version = self.app.catalog_version
            self.query_one(ImageTable).reload(keep_position=True)

    # --- the image being edited -------------------------------------------------

    @on(ImagePicked)
    def _picked(self, message: ImagePicked) -> None:
        if message.image_id != self.image_id:
            self._autosave()
        self._wanted = message.image_id
        self._load(message.image_id)

    @property
    def edited(self) -> bool:
        """Whether the editor holds text not saved for the image it shows."""
        return self.image_id is not None and self.query_one("#caption-text", TextArea).text.strip() != self.loaded_text.strip()

    def _autosave(self) -> None:
        """Save the editor's text for the image it shows, if edited (called when leaving that image)."""
        if not self.edited:
            return
        text = self.query_one("#caption-text", TextArea).text
        if not text.strip():
            self.notify("The emptied caption was not saved: reject its source instead (ctrl+r).", title="Captions", severity="warning")
            return
        self._save(self.image_id, text, "caption saved on leaving the image")

    @on(TextArea.Changed, "#caption-text")
    def _typed(self, event: TextArea.Changed) -> None:
        self._editor_text = event.text_area.text

    @on(Checkbox.Changed, "#sidecars")
    def _sidecars_toggled(self, event: Checkbox.Changed) -> None:
        self._write_sidecars = event.value

    def on_unmount(self) -> None:
        """Quitting with an edited caption saves it, as leaving the image does; here, before the app closes the catalog.
        So do saves asked for whose workers had not run yet (ctrl+s and ctrl+q in one keystroke read)."""
        text = self._editor_text
        if self.app.con is None:
            return
        with self._write_lock:  # after any write still running in a worker
            for image_id, (saved, sidecar) in list(self._unsaved.items()):
                caption_edits.save_manual_caption(self.app.con, image_id, saved, sidecar=sidecar)
            if self.image_id is None or not text.strip() or text.strip() == self.loaded_text.strip():
                return
            caption_edits.save_manual_caption(self.app.con, self.image_id, text, sidecar=self._write_sidecars)

    @work(thread=True, exclusive=True, group="caption-load")
    def _load(self, image_id: str) -> None:
        try:
            details = queries.image_details(self.app.con, image_id)
        except Exception as error:
            self.post_message(self._Failed(people_message(error)))
            return
        self.post_message(self._Loaded(image_id, details, load_preview(queries.image_file(details))))

    @on(_Loaded)
    def _show(self, message: _Loaded) -> None:
        if message.image_id != self._wanted:
            return  # a later pick is loading: never show an image the table cursor has left
        editor = self.query_one("#caption-text", TextArea)
        if message.image_id != self.image_id:
            self._autosave()  # typed while this image was loading: it belongs to the image shown then
        # A reload of the same image (after any write) keeps what is being typed, unless a source was just chosen.
        reloaded = message.image_id == self.image_id
        keep_typing = reloaded and self.edited and not self._overwrite_editor
        self._overwrite_editor = False
        self.image_id = message.image_id
        row = message.details.get("row", {})
        self._path_line = (visible(str(row.get("path"))), visible(row.get("caption_source") or "no caption"))
        self._show_path_line()
        # Multi-line captions stay editable; other controls show as escapes (and are saved so if edited).
        self.loaded_text = visible(row.get("caption") or "", keep="\n\t")
        if message.image_id in self._unsaved:  # read before a save of it landed: the save is what it will hold
            self.loaded_text = self._unsaved[message.image_id][0]
        if not keep_typing and editor.text != self.loaded_text:  # an unchanged reload keeps the cursor where it is
            editor.load_text(self.loaded_text)
            editor.move_cursor(editor.document.end)  # tags are added at the end: typing goes there, not in front
            # now, not when TextArea.Changed arrives: a quit before it would save this text to the image left
            self._editor_text = editor.text
        sources = self.query_one("#sources", OptionList)
        # a reload of the same image keeps the source picked; another image starts on the caption in use, so
        # ctrl+a or ctrl+r before moving never acts on another source by surprise
        picked = self._selected_source() if reloaded else None
        sources.clear_options()
        self.source_texts = dict(message.details.get("captions", []))
        start = 0
        for index, (source, text) in enumerate(message.details.get("captions", [])):
            mark = "● " if source == row.get("caption_source") else "  "
            if source == picked or (mark == "● " and picked not in self.source_texts):
                start = index
            sources.add_option(Option(f"{mark}{markup_safe(source)}: {markup_safe(text)}", id=source))
        if sources.option_count:
            sources.highlighted = start
        self.query_one("#caption-preview", ImagePreview).show(message.picture)

    def _show_path_line(self) -> None:
        path, in_use = self._path_line
        path_label = self.query_one("#caption-path", Label)
        room = path_label.size.width - len(in_use) - 4
        if room > 8:  # a narrow editor keeps the file name
            path = cut_start(path, room)
        path_label.update(f"{markup_safe(path)}  [dim]({markup_safe(in_use)})[/]")

    def on_resize(self, event) -> None:  # Textual also calls SizeClasses.on_resize (handlers run along the MRO)
        if self._path_line[0]:
            self.call_after_refresh(self._show_path_line)  # once the label has its new width

    @on(PageTable.RowSelected)
    def action_edit(self) -> None:
        """Enter (or a double click) on a row: type its caption."""
        self.query_one("#caption-text", TextArea).focus()

    def action_move(self, delta: int) -> None:
        """Next/previous image without leaving the caption editor (pages at the ends)."""
        self.query_one("#rows", PageTable).action_cursor(delta)

    def _selected_source(self) -> str | None:
        sources = self.query_one("#sources", OptionList)
        if sources.highlighted is None:
            return None
        return sources.get_option_at_index(sources.highlighted).id

    # --- writes -----------------------------------------------------------------

    @property
    def sidecars(self) -> bool:
        return self.query_one("#sidecars", Checkbox).value

    @on(Button.Pressed, "#save")
    def action_save(self) -> None:
        if self.image_id is None:
            self.notify("Pick an image first.", severity="warning")
            return
        text = self.query_one("#caption-text", TextArea).text
        if not text.strip():
            self.notify("A caption cannot be empty; reject it instead to fall back to another source.", severity="warning")
            return
        self._save(self.image_id, text, "caption saved")

    def _save(self, image_id: str, text: str, done: str) -> None:
        sidecar = self.sidecars
        self.loaded_text = text  # saved: no longer an edit (a failure is reported by _Failed)
        self._unsaved[image_id] = (text, sidecar)

        def save(con) -> str:
            left = caption_edits.save_manual_caption(con, image_id, text, sidecar=sidecar)
            if self._unsaved.get(image_id, (None,))[0] == text:  # not a newer save of it, still to be written
                self._unsaved.pop(image_id, None)
            return done + (f"; sidecar not written: {left[0]}" if left else "")

        self._write(save)

    def action_focus_filter(self) -> None:
        self.query_one(ImageTable).action_focus_filter()  # as Browse: at once, its text selected

    @on(Button.Pressed, "#accept")
    def action_accept(self) -> None:
        focused = self.app.focused
        if isinstance(focused, Input):  # a bulk-bar box (find, replace, token): ctrl+a is line start there, as typed
            focused.action_home()
            return
        source, image_id = self._selected_source(), self.image_id
        if not (source and image_id):
            return

        def accept() -> None:
            self._overwrite_editor = True  # the chosen caption replaces what is in the editor
            self._write(lambda con: caption_edits.choose_caption(con, image_id, source) or f"using the {source} caption")

        if not self.edited:
            accept()
            return
        question = (f"[b]Discard your unsaved edit and use the {markup_safe(source)} caption?[/b]\n"
                    "Save the edit first (ctrl+s) to keep it as the manual caption.")
        self.app.push_screen(Confirm(question, yes="Discard edit"), lambda yes: accept() if yes else None)

    @on(Button.Pressed, "#reject")
    def action_reject(self) -> None:
        """Delete the highlighted source's caption of this image, after asking (there is no undo)."""
        source, image_id = self._selected_source(), self.image_id
        if not (source and image_id):
            return
        if source == "duplicate":  # not asked: rejecting it is refused
            self.notify(caption_edits.CARRIED_NOT_REJECTED, title="Captions", severity="warning", timeout=10)
            return
        text = self.source_texts.get(source, "")
        shown = text if len(text) <= 160 else text[:159] + "…"
        # "type my own caption, then reject the model's": the typed text is saved first, as leaving the image would;
        # rejecting the manual caption itself discards the edit too, and says so
        typed = self.query_one("#caption-text", TextArea).text if self.edited else ""
        keep_typed = bool(typed.strip()) and source != "manual"
        question = (f"[b]Reject the {markup_safe(source)} caption of this image?[/b]\n{markup_safe(shown)}\n\n"
                    "Its text is deleted from the catalog and the next source takes over. There is no undo."
                    + ("\nYour typed caption is saved first, as the manual caption." if keep_typed else "")
                    + ("\nYour unsaved edit is discarded too." if self.edited and not keep_typed else ""))
        sidecar = self.sidecars

        def reject(con) -> str:
            if keep_typed:
                caption_edits.save_manual_caption(con, image_id, typed, sidecar=sidecar)
            caption_edits.reject_caption(con, image_id, source)
            return ("caption saved; " if keep_typed else "") + f"{source} caption rejected"

        def answered(yes: bool | None) -> None:
            if yes:
                self._overwrite_editor = True
                self._write(reject)

        self.app.push_screen(Confirm(question, yes="Reject"), answered)

    @on(Button.Pressed, "#bulk-replace")
    def _bulk_replace(self) -> None:
        find = self.query_one("#find", Input).value
        if not find:
            self.notify("Type the text to find.", severity="warning")
            return
        self._bulk(find=find, replace=self.query_one("#replace", Input).value, regex=self.query_one("#regex", Checkbox).value)

    @on(Button.Pressed, "#bulk-add")
    def _bulk_add(self) -> None:
        self._bulk(add_token=self.query_one("#token", Input).value)

    @on(Button.Pressed, "#bulk-remove")
    def _bulk_remove(self) -> None:
        self._bulk(remove_token=self.query_one("#token", Input).value)

    def _bulk(self, **edit: str | bool) -> None:
        """Count what a bulk edit would change over the rows the table shows, then ask (_ask_bulk)."""
        # the caption being typed is saved first: the edit then applies to it (the edit's reload put the typed text
        # back, and leaving the row saved it over the edit)
        self._autosave()
        table = self.query_one(ImageTable)
        if not any(v.strip() for k, v in edit.items() if k not in ("replace", "regex")):
            self.notify("Type a trigger token first.", severity="warning")
            return
        problem = table.not_applied()  # bulk edits change the rows the table shows, never those of a filter only typed
        if problem:
            self.notify(problem, title="Captions", severity="warning", timeout=8)
            return
        self._plan_bulk(table.result, edit)

    @work(thread=True, exclusive=True, group="caption-plan")
    def _plan_bulk(self, result: queries.BrowseResult, edit: dict) -> None:
        try:
            targets = result.image_ids(ok_only=True)
            preview = caption_edits.preview_bulk_edit(self.app.con, targets, **edit)
        except Exception as error:
            self.post_message(self._Failed(people_message(error)))
            return
        if not get_current_worker().is_cancelled:  # a newer click replaced this one
            self.post_message(self._Planned(result.filter.text.strip(), result.total, targets, edit, preview.description,
                                            preview.changed, preview.emptied))

    @on(_Planned)
    def _ask_bulk(self, message: _Planned) -> None:
        table = self.query_one(ImageTable)
        applied = table.result.filter.text.strip() if table.result is not None else None
        if message.filter_text != applied or message.filter_text != table.query_one("#filter", Input).value.strip():
            self.notify("The filter changed meanwhile; run the bulk edit again.", title="Captions", severity="warning")
            return
        left_out = message.total - len(message.targets)
        note = _unreadable_note(left_out)
        if message.emptied:
            note += (f"; {message.emptied:,} caption{'s' if message.emptied != 1 else ''} it would leave empty "
                     f"{'are' if message.emptied != 1 else 'is'} not changed (Reject falls back to another source)")
        if not message.changes:
            self.notify(f"{message.description}: 0 captions changed, none of the {len(message.targets):,} filtered "
                        f"images needs it{note}", title="Captions", markup=False)
            return
        shown = message.filter_text or "none: all images"
        shown = shown if len(shown) <= 120 else shown[:119] + "…"
        captions = "caption" if message.changes == 1 else "captions"
        images = "image" if len(message.targets) == 1 else "images"
        question = (f"[b]Bulk edit: {markup_safe(message.description)}[/b]\n"
                    f"This changes {message.changes:,} {captions} of the {len(message.targets):,} {images} the table shows{note}.\n"
                    f"Filter: {markup_safe(shown)}\n\nF8 undoes it (captions edited after it are kept).")
        sidecars = self.sidecars
        if sidecars:
            question += ("\nEach changed image's sidecar (its .txt or .caption, or a new .txt) is written too; "
                         "F8 puts them back.")

        def answered(yes: bool | None) -> None:
            if yes:
                self._run_bulk(message.targets, message.edit, sidecars, left_out)

        self.app.push_screen(Confirm(question, yes=f"Change {message.changes:,} {captions}"), answered)

    # Writes are not exclusive: a newer write must not cancel an older one before it ran (a save on
    # leaving an image would be lost); the lock runs them one at a time.
    @work(thread=True, group="caption-write")
    def _run_bulk(self, targets: list[str], edit: dict, sidecars: bool, left_out: int) -> None:
        try:
            with self._write_lock:
                undo = caption_edits.bulk_edit(self.app.con, targets, sidecars=sidecars, **edit)
        except caption_edits.SidecarsNotWritten as error:  # the captions are saved: F8 still undoes them
            undo = caption_edits.last_bulk_edit(self.app.con)
            self.post_message(self._Done(str(error), undo=undo, severity="warning"))
            return
        except Exception as error:
            self.post_message(self._Failed(people_message(error)))
            return
        note = _unreadable_note(left_out)
        if undo.sidecars_left:
            note += (f"; {len(undo.sidecars_left):,} sidecar file(s) edited in another tool since ingest left as they are "
                     f"(e.g. {undo.sidecars_left[0]}): ingest reads them")
        self.post_message(self._Done(f"{undo.description}: {undo.changed:,} caption{'' if undo.changed == 1 else 's'} changed{note}", undo=undo,
                                     severity="warning" if undo.sidecars_left else "information"))

    @on(Button.Pressed, "#bulk-undo")
    def action_undo_bulk(self) -> None:
        undo = self.last_bulk
        if undo is None:
            self.notify("No bulk edit to undo.", severity="warning")
            return
        self._run_undo(undo)

    @work(thread=True, group="caption-write")
    def _run_undo(self, undo: caption_edits.BulkUndo) -> None:
        try:
            with self._write_lock:
                outcome = caption_edits.undo_bulk(self.app.con, undo)
        except Exception as error:
            self.post_message(self._Failed(people_message(error)))
            return
        if not outcome.skipped:
            self.post_message(self._Done(f"undid {undo.description} on {outcome.restored:,} images", undone=True))
            return
        them = "its caption was" if outcome.skipped == 1 else "their captions were"
        skipped = f"{outcome.skipped:,} image{'s' if outcome.skipped != 1 else ''} left alone: {them} edited after the bulk edit"
        text = (f"undid {undo.description} on {outcome.restored:,} images; {skipped}" if outcome.restored
                else f"nothing undone for {undo.description}: {skipped}")
        self.post_message(self._Done(text, undone=True, severity="warning"))

    @work(thread=True, group="caption-write")
    def _write(self, change, undone: bool = False) -> None:
        try:
            with self._write_lock:
                text = change(self.app.con)
        except Exception as error:
            self.post_message(self._Failed(people_message(error)))
            return
        self.post_message(self._Done(text, undone=undone))

    @on(_Done)
    def _done(self, message: _Done) -> None:
        if message.undo is not None and message.undo.changed:  # an edit that changed nothing keeps the last undo
            self.last_bulk = message.undo
        if message.undone:
            self.last_bulk = None
        self.query_one("#bulk-undo", Button).disabled = self.last_bulk is None
        # plain text: descriptions hold what was typed (a token like "[b]" is not markup)
        self.notify(message.text, title="Captions", severity=message.severity,
                    timeout=8 if message.severity == "warning" else None, markup=False)
        self.post_message(CatalogChanged("captions"))
        self.seen_version = self.app.catalog_version + 1
        self.query_one(ImageTable).reload(keep_position=True)

    @on(_Failed)
    def _failed(self, message: _Failed) -> None:
        self.notify(message.error, title="Captions", severity="error", timeout=8)
