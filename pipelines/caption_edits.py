"""Caption edits by hand (the TUI's Captions screen, `workbench edit-captions`): manual captions, choosing or
rejecting model captions, bulk edits with undo.

Edits are rows in `captions` with source 'manual' (and a `caption_choice` of 'manual' so they win);
sidecar .txt files beside the images are written only when asked. Each bulk edit is recorded with what it
replaced (`caption_edits`, `caption_edit_rows`), so it can be undone from another process or a later day.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict, Unpack

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from workbench.catalog import CatalogError, catalog_files, transaction
from workbench.files import written_whole
from workbench.images import SIDECAR_READ_LIMIT, decode_caption, one_line_caption, path_text, sidecars_changed_since_ingest

MANUAL = "manual"


# what separates a caption's tags: kohya's comma, Japanese 、 and ，, a line break (as RE2 and `re` both read it)
TAG_SEPARATORS = "[,\u3001\uff0c\n]"


def _sidecar_path(image_path: str) -> Path:
    """The sidecar ingest reads for this image (`name.txt`, else `name.caption`); `name.txt` when it has none."""
    txt = Path(image_path).with_suffix(".txt")
    caption = Path(image_path).with_suffix(".caption")
    return caption if caption.is_file() and not txt.is_file() else txt


@dataclass(frozen=True)
class SidecarWrite:
    """One sidecar file written: what it held before (None: it did not exist) and what was written."""

    image_id: str
    path: str
    previous: bytes | None
    written: bytes


class SidecarsNotWritten(CatalogError):
    """Some sidecar files could not be written (the captions are saved in the catalog); `written` holds the others."""

    def __init__(self, failed: list[tuple[str, str]], written: list[SidecarWrite]):
        shown = "; ".join(f"{path}: {reason}" for path, reason in failed[:3]) + (f"; and {len(failed) - 3} more" if len(failed) > 3 else "")
        super().__init__(f"{len(failed)} sidecar file(s) could not be written ({shown}); the captions are saved in the "
                         f"catalog, and the {len(written)} file(s) written are put back by undo.")
        self.failed, self.written = failed, written


def write_sidecars(cur: duckdb.DuckDBPyConnection, image_ids: list[str], *, leave: set[str] = frozenset()) -> list[SidecarWrite]:
    """Write each image's current caption to its sidecar: the one ingest reads it from (of its files with a sidecar,
    the first in path order), else one beside its first existing file; returns what was written.
    A file that cannot be written (permissions, a folder in its place) does not stop the others: SidecarsNotWritten
    names them after the rest are written, with those written. Sidecar paths in `leave` are not written."""
    planned, failed = planned_sidecars(cur, image_ids, leave=leave)
    written, not_written = _write_planned(planned)
    failed += not_written
    if failed:
        raise SidecarsNotWritten(failed, written)
    return written


def planned_sidecars(cur: duckdb.DuckDBPyConnection, image_ids: list[str], *,
                     leave: set[str] = frozenset()) -> tuple[list[SidecarWrite], list[tuple[str, str]]]:
    """The sidecar writes `write_sidecars` would make (each file's bytes now and the bytes to write), and the files
    it would refuse (path, why), with nothing written: a bulk edit records them before it writes any."""
    if not image_ids:
        return [], []
    cur.register("sidecar_ids", pa.table({"image_id": image_ids}))
    try:
        rows = cur.execute(
            # a copy elsewhere got a sidecar of its own beside the one the caption came from, which stayed stale
            "SELECT s.image_id, coalesce(min(p.path_bytes) FILTER (WHERE p.sidecar_mtime_ns IS NOT NULL), "
            "arg_min(p.path_bytes, p.seq)), any_value(cc.caption) FROM sidecar_ids s "
            "JOIN paths p ON p.image_id = s.image_id AND NOT p.missing "
            "JOIN current_captions cc ON cc.image_id = s.image_id GROUP BY s.image_id"
        ).fetchall()
    finally:
        cur.unregister("sidecar_ids")
    planned, failed = [], []
    catalog = set(catalog_files(cur) or ())
    for image_id, path_bytes, caption in rows:
        image_path = os.fsdecode(bytes(path_bytes))
        if not os.path.exists(image_path):
            continue
        sidecar = _sidecar_path(image_path)
        if str(sidecar) in leave:
            continue
        try:
            previous = _read_own_file(sidecar)  # bytes: any encoding goes back as it was
            if previous is not None and previous.strip() and _not_a_caption(previous):
                # ingest left it out (Shift-JIS, say): the user's only copy of that caption, not a stale one
                raise OSError(errno.EILSEQ, "a caption file ingest cannot read (not UTF-8): left as it is; "
                              "re-save it as UTF-8 and ingest again to use it")
            if sidecar.resolve() in catalog:
                raise OSError(errno.EPERM, "it is the catalog")
        except OSError as error:
            failed.append((str(sidecar), error.strerror or str(error)))
            continue
        planned.append(SidecarWrite(image_id, str(sidecar), previous, (caption + "\n").encode("utf-8")))
    return planned, failed


def _write_planned(planned: list[SidecarWrite]) -> tuple[list[SidecarWrite], list[tuple[str, str]]]:
    """Write planned sidecars: (those written, (path, why) of those that could not be)."""
    written, failed = [], []
    for write in planned:
        try:
            _write_own_file(Path(write.path), write.written)
        except OSError as error:
            failed.append((write.path, error.strerror or str(error)))
            continue
        written.append(write)
    return written, failed


def _not_a_caption(data: bytes) -> bool:
    try:
        decode_caption(data)
    except ValueError:
        return True
    return False


def _read_own_file(path: Path) -> bytes | None:
    """A sidecar's bytes (None: there is none). One that is a link, or not a plain file, is refused (OSError): the
    edit would write through it to whatever it points at (the catalog, another file)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        raise OSError(errno.ELOOP, "a symbolic link: left as it is")
    if not stat.S_ISREG(info.st_mode):
        raise OSError(errno.EINVAL, "not a plain file: left as it is")
    if info.st_nlink > 1:  # the same file under another name (an image, the catalog): writing would change that too
        raise OSError(errno.EMLINK, "a file with other names (hard links): left as it is")
    if info.st_size > SIDECAR_READ_LIMIT:  # no caption (ingest left it out): not kept whole for undo, nor written over
        raise OSError(errno.EFBIG, "too large to be a caption file: left as it is")
    return path.read_bytes()


def _write_own_file(path: Path, data: bytes) -> None:
    """Write a sidecar whole or not at all: a temporary file beside it, renamed over it. Writing in place cut the
    user's caption file off when the disk filled; the rename also replaces a link or FIFO made there since it was
    read instead of writing through it. The file keeps its permissions."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    if info is not None and stat.S_ISREG(info.st_mode) and not os.access(path, os.W_OK):
        raise OSError(errno.EACCES, "a read-only file: left as it is")  # the rename would replace it regardless
    mode = stat.S_IMODE(info.st_mode) if info is not None and stat.S_ISREG(info.st_mode) else None
    written_whole(path, lambda tmp: tmp.write_bytes(data), mode=mode, sync=True)


def _restore_sidecars(writes: list[SidecarWrite]) -> int:
    """Put back sidecars a bulk edit wrote, where they still hold what it wrote: earlier text back in place,
    files it created removed. Returns files restored."""
    restored = 0
    for write in writes:
        path = Path(write.path)
        try:
            now = _read_own_file(path)
            if now == write.previous and now != write.written:
                restored += 1  # never written (the edit was stopped before it): as it was
                continue
            if now != write.written:
                continue  # edited since: that later edit stays (or a link now: left alone)
            if write.previous is None:
                path.unlink()
            else:
                _write_own_file(path, write.previous)
            restored += 1
        except OSError:
            continue
    return restored


def _edited_outside(cur: duckdb.DuckDBPyConnection, image_ids: list[str]) -> set[str]:
    """Sidecar files of these images edited in another tool since ingest read them (one deleted since is not: writing
    it again loses nothing)."""
    return {path for path in sidecars_changed_since_ingest(cur, image_ids) if os.path.isfile(path)}


def save_manual_caption(con: duckdb.DuckDBPyConnection, image_id: str, text: str, *, sidecar: bool = False) -> list[str]:
    """Store `text` (on one line) as the image's manual caption and make it the caption in use. With `sidecar`,
    its sidecar file is written too, unless edited in another tool since ingest, or not writable (a link, a file
    ingest could not read): returns what was left as it is, "path: why", the caption saved either way."""
    text = one_line_caption(text)
    if not text:
        raise CatalogError("A caption cannot be empty; reject it instead to fall back to another source.")
    cur = con.cursor()
    try:
        if not cur.execute("SELECT count(*) FROM images WHERE image_id = ?", [image_id]).fetchall()[0][0]:
            raise CatalogError(f"No image {image_id[:12]} in the catalog.")
        edited_outside = _edited_outside(cur, [image_id]) if sidecar else set()
        with transaction(cur):
            cur.execute(
                "INSERT OR REPLACE INTO captions (image_id, source, text, created_at) VALUES (?, ?, ?, now())",
                [image_id, MANUAL, text],
            )
            cur.execute("INSERT OR REPLACE INTO caption_choice (image_id, source) VALUES (?, ?)", [image_id, MANUAL])
        left = [f"{path}: edited in another tool since ingest, left as it is" for path in sorted(edited_outside)]
        if sidecar:
            try:
                write_sidecars(cur, [image_id], leave=edited_outside)
            except SidecarsNotWritten as error:  # the caption is saved: the file is said, not an error of the save
                left += [f"{path}: {why}" for path, why in error.failed]
        return left
    finally:
        cur.close()


def choose_caption(con: duckdb.DuckDBPyConnection, image_id: str, source: str) -> None:
    """Accept one source's caption (e.g. 'model:blip') as the caption in use."""
    cur = con.cursor()
    try:
        if not cur.execute("SELECT count(*) FROM caption_candidates WHERE image_id = ? AND source = ?", [image_id, source]).fetchall()[0][0]:
            raise CatalogError(f"Image {image_id[:12]} has no {source} caption.")
        cur.execute("INSERT OR REPLACE INTO caption_choice (image_id, source) VALUES (?, ?)", [image_id, source])
    finally:
        cur.close()


# A 'duplicate' caption is computed from an excluded copy's own caption (view carried_captions): deleting it here
# would not stick, so it cannot be rejected.
CARRIED_NOT_REJECTED = ("This caption is carried from a duplicate copy that dedup excluded, not stored with this image: "
                        "save a caption of your own (it comes first), or accept another source.")


def reject_caption(con: duckdb.DuckDBPyConnection, image_id: str, source: str) -> None:
    """Drop one source's caption for an image (and the choice of it); the next source takes over."""
    if source == "duplicate":
        raise CatalogError(CARRIED_NOT_REJECTED)
    cur = con.cursor()
    try:
        with transaction(cur):
            cur.execute("DELETE FROM caption_choice WHERE image_id = ? AND source = ?", [image_id, source])
            cur.execute("DELETE FROM captions WHERE image_id = ? AND source = ?", [image_id, source])
    finally:
        cur.close()


@dataclass
class BulkUndo:
    """What a bulk edit replaced, so it can be put back: manual caption and choice per changed image,
    and the text the edit wrote (an image whose caption is no longer that text was edited since)."""

    description: str
    previous: pa.Table  # image_id, manual_text, manual_created_at, choice, written_text
    sidecars: dict[str, SidecarWrite] = field(default_factory=dict)  # image_id: the sidecar the edit wrote
    edit_id: int | None = None  # its row in caption_edits
    made_at: object = None
    sidecars_left: list[str] = field(default_factory=list)  # sidecars not written: edited in another tool since ingest

    @property
    def changed(self) -> int:
        return self.previous.num_rows


@dataclass
class UndoOutcome:
    """What undo_bulk did: images put back, and images left alone because their caption changed after the edit."""

    restored: int
    skipped: int
    sidecars_left: int = 0  # sidecar files not put back: changed since the edit wrote them


def _checked_pattern(cur: duckdb.DuckDBPyConnection, pattern: str) -> None:
    """Refuse a regular expression DuckDB (RE2) cannot compile, by its own words."""
    try:
        cur.execute("SELECT regexp_matches('', ?)", [pattern]).fetchall()
    except duckdb.Error as error:
        reason = str(error).split("\n")[0].split(": ", 1)[-1]
        raise CatalogError(f"Not a regular expression (RE2 syntax) {pattern!r}: {reason}") from None


def _bulk_expression(cur: duckdb.DuckDBPyConnection, find: str | None = None, replace: str | None = None,
                     add_token: str | None = None, remove_token: str | None = None, *, regex: bool = False,
                     set_text: str | None = None, at_end: bool = False) -> tuple[str, list, str]:
    """(SQL for the new caption from `caption`, its parameters, a description)."""
    edits = [x for x in (find, add_token, remove_token, set_text) if x]
    if len(edits) != 1:
        raise CatalogError("Give exactly one bulk edit: find/replace, add a token, remove a token, or set a caption.")
    if set_text:
        text = one_line_caption(set_text)
        if not text:
            raise CatalogError("A caption cannot be empty; reject it instead to fall back to another source.")
        return "?", [text], f"set the caption to {text!r}"
    if find and regex:
        _checked_pattern(cur, find)
        # every match ('g'); \1 in the replacement is the first group, as in re.sub; the result trimmed, as a typed one is
        return ("trim(regexp_replace(coalesce(caption, ''), ?, ?, 'g'))", [find, replace or ""],
                f"replace /{find}/ with \"{replace or ''}\"")
    if find:
        return "replace(coalesce(caption, ''), ?, ?)", [find, replace or ""], f"replace {find!r} with {replace or ''!r}"
    # a caption's tags: split at commas (also Japanese 、 and full-width ，) and line breaks (a line break joined two
    # tags into one), trimmed of any white space (tabs, the full-width space: trim() takes ASCII spaces only)
    tags = (f"list_filter(list_transform(regexp_split_to_array(coalesce(caption, ''), '{TAG_SEPARATORS}'), "
            "lambda t: regexp_replace(t, '^[\\s\\pZ]+|[\\s\\pZ]+$', '', 'g')), lambda t: t != '')")
    # the token box may hold several tags ("sks, woman"): each is one (as one, it was never found, and added twice)
    token = (add_token or remove_token).strip()
    given = list(dict.fromkeys(t.strip() for t in re.split(TAG_SEPARATORS, token) if t.strip()))  # "sks, sks": one tag
    if add_token and at_end:  # after the caption's own tags, where it lacks them (the trigger stays first)
        missing = f"list_filter(?::VARCHAR[], lambda w: NOT list_contains({tags}, w))"
        return (
            f"CASE WHEN len({missing}) = 0 THEN caption ELSE array_to_string(list_concat({tags}, {missing}), ', ') END",
            [given, given],
            f"add token {token!r} at the end",
        )
    if add_token:
        # first, in the order given: a trigger must lead for --keep-tokens to keep it; one the caption has elsewhere
        # moves to the front (added in front of it, a second tag pushed the trigger out of first place)
        # in front already, and nowhere again: unchanged (a copy further on went on being shuffled as a tag of its own)
        return (
            f"CASE WHEN list_slice({tags}, 1, ?) = ?::VARCHAR[] AND NOT list_has_any(list_slice({tags}, ?, len({tags})), ?::VARCHAR[]) "
            f"THEN caption "
            f"ELSE array_to_string(list_concat(?::VARCHAR[], list_filter({tags}, lambda t: NOT list_contains(?::VARCHAR[], t))), ', ') END",
            [len(given), given, len(given) + 1, given, given, given],
            f"add token {token!r}",
        )
    # only captions that hold the tag change (a removal of a tag no caption has rewrote them all, normalised)
    return (f"CASE WHEN list_has_any({tags}, ?::VARCHAR[]) "
            f"THEN array_to_string(list_filter({tags}, lambda t: NOT list_contains(?::VARCHAR[], t)), ', ') ELSE caption END",
            [given, given], f"remove token {token!r}")


def _changes(cur: duckdb.DuckDBPyConnection, image_ids: list[str], expression: str, params: list) -> pa.Table:
    """(image_id, old_text, new_text) for each image in `image_ids` whose current caption the edit changes,
    in `image_ids` order; new_text is empty where the edit would leave no caption (those are not applied)."""
    cur.register("bulk_ids", pa.table({"image_id": pa.array(image_ids, pa.string()), "position": pa.array(range(len(image_ids)), pa.int64())}))
    try:
        # a caption the edit changes is written on one line (a replacement or a tag may hold a line break): its lines
        # joined as tags
        one_line = ("array_to_string(list_filter(list_transform(string_split_regex(raw_text, '\\r?\\n'), "
                    "lambda l: trim(l)), lambda l: l <> ''), ', ')")
        return cur.sql(
            f"SELECT image_id, caption AS old_text, new_text FROM (SELECT image_id, position, caption, "
            f"CASE WHEN raw_text IS NOT DISTINCT FROM caption OR raw_text IS NULL THEN raw_text ELSE {one_line} END AS new_text "
            f"FROM (SELECT b.image_id, b.position, cc.caption, {expression} AS raw_text "
            "FROM bulk_ids b LEFT JOIN current_captions cc ON cc.image_id = b.image_id)) "
            "WHERE new_text IS DISTINCT FROM caption AND NOT (trim(new_text) = '' AND coalesce(trim(caption), '') = '') ORDER BY position",
            params=params,
        ).to_arrow_table()
    finally:
        cur.unregister("bulk_ids")


@dataclass
class BulkPreview:
    """What a bulk edit would do: its description, the captions it changes (image_id, old_text, new_text),
    and how many of those it would leave empty (not applied: an empty caption is a rejection, not an edit)."""

    description: str
    changes: pa.Table  # the ones applied: without those left empty
    emptied: int

    @property
    def changed(self) -> int:
        return self.changes.num_rows


def _preview(cur: duckdb.DuckDBPyConnection, image_ids: list[str], edit: dict) -> BulkPreview:
    """What an edit changes (BulkPreview); `edit` holds _bulk_expression's options."""
    if isinstance(image_ids, str):
        raise CatalogError("image_ids is a list of image ids, not one id as a string: give [image_id].")
    unknown = [row[0] for row in cur.execute(
        "SELECT id FROM (SELECT unnest(?::VARCHAR[]) AS id) WHERE id NOT IN (SELECT image_id FROM images)", [list(image_ids)]
    ).fetchall()]
    if unknown:  # they became captions of no image (a prefix stored as an id)
        raise CatalogError(f"No image {unknown[0][:16]} in the catalog" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                           + ": give full image ids (pipelines.concepts.resolve_image_ids turns prefixes into them).")
    expression, params, description = _bulk_expression(cur, **edit)
    try:
        found = _changes(cur, image_ids, expression, params)
    except duckdb.Error as error:  # a replacement naming a group the pattern lacks (\2), a lone backslash
        reason = str(error).split("\n")[0].split(": ", 1)[-1]
        raise CatalogError(f"The edit {description} cannot be applied: {reason}") from None
    kept = pc.invert(pc.equal(pc.utf8_trim_whitespace(found.column("new_text")), ""))
    applied = found.filter(kept)
    return BulkPreview(description, applied, found.num_rows - applied.num_rows)


class EditOptions(TypedDict, total=False):
    """One bulk edit, as `preview_bulk_edit` and `bulk_edit` take it: find/replace (literal, or `regex`), a token
    added (first, or `at_end`) or removed, or a caption set."""

    find: str | None
    replace: str | None
    add_token: str | None
    remove_token: str | None
    regex: bool
    set_text: str | None
    at_end: bool


def preview_bulk_edit(con: duckdb.DuckDBPyConnection, image_ids: list[str], **edit: Unpack[EditOptions]) -> BulkPreview:
    """What bulk_edit would change, without changing it: a dry run, to ask before editing."""
    cur = con.cursor()
    try:
        return _preview(cur, image_ids, dict(edit))
    finally:
        cur.close()


def bulk_edit(con: duckdb.DuckDBPyConnection, image_ids: list[str], *, sidecars: bool = False,
              **edit: Unpack[EditOptions]) -> BulkUndo:
    """Apply one edit to the current caption of each image in `image_ids`; changed ones become manual captions.
    The edit is recorded with what it replaced (`last_bulk_edit` finds it again for undo)."""
    cur = con.cursor()
    try:
        _finish_sidecar_writes(cur)  # of an edit stopped while it wrote its files: this one starts after that one
        preview = _preview(cur, image_ids, dict(edit))
        # sidecars edited in another tool since ingest read them are left as they are (overwriting them lost that
        # work): found now, against the captions before this edit, which a file this tool wrote still says
        edited_outside = _edited_outside(cur, preview.changes.column("image_id").to_pylist()) if sidecars else set()
        cur.register("bulk_changes", preview.changes)
        try:
            previous = cur.sql(
                "SELECT c.image_id, m.text AS manual_text, m.created_at AS manual_created_at, ch.source AS choice, "
                "c.new_text AS written_text "
                "FROM bulk_changes c LEFT JOIN captions m ON m.image_id = c.image_id AND m.source = 'manual' "
                "LEFT JOIN caption_choice ch ON ch.image_id = c.image_id"
            ).to_arrow_table()
            with transaction(cur):
                cur.execute(
                    "INSERT OR REPLACE INTO captions (image_id, source, text, created_at) "
                    "SELECT image_id, 'manual', new_text, now() FROM bulk_changes"
                )
                cur.execute("INSERT OR REPLACE INTO caption_choice (image_id, source) SELECT image_id, 'manual' FROM bulk_changes")
                edit_id, made_at = None, None
                if previous.num_rows:  # an edit that changed nothing has nothing to undo
                    edit_id, made_at = cur.execute(
                        "INSERT INTO caption_edits (description) VALUES (?) RETURNING edit_id, made_at", [preview.description]
                    ).fetchall()[0]
                    cur.register("bulk_previous", previous)
                    cur.execute(
                        "INSERT INTO caption_edit_rows (edit_id, image_id, manual_text, manual_created_at, choice, written_text) "
                        "SELECT ?, image_id, manual_text, manual_created_at, choice, written_text FROM bulk_previous", [edit_id])
                    cur.unregister("bulk_previous")
                    # the files it will write, recorded with the captions, before any is written: an edit stopped
                    # part way (Ctrl+C, kill -9) left files edited that neither undo nor a rerun knew of
                    planned, refused = (planned_sidecars(cur, preview.changes.column("image_id").to_pylist(), leave=edited_outside)
                                        if sidecars else ([], []))
                    if planned:  # the path as bytes too: a name that is not UTF-8 has no text form (paths.path_bytes)
                        cur.execute("UPDATE caption_edits SET sidecars_pending = true WHERE edit_id = ?", [edit_id])
                        cur.executemany(
                            "UPDATE caption_edit_rows SET sidecar_path = ?, sidecar_path_bytes = ?, sidecar_previous = ?, "
                            "sidecar_written = ? WHERE edit_id = ? AND image_id = ?",
                            [(path_text(w.path), os.fsencode(w.path), w.previous, w.written, edit_id, w.image_id)
                             for w in planned])
                else:
                    planned, refused = [], []
        finally:
            cur.unregister("bulk_changes")
        files, failed = _write_planned(planned)
        if failed:  # an undo puts back only files this edit really wrote
            cur.executemany(
                "UPDATE caption_edit_rows SET sidecar_path = NULL, sidecar_path_bytes = NULL, sidecar_previous = NULL, "
                "sidecar_written = NULL WHERE edit_id = ? AND sidecar_path_bytes = ?",
                [(edit_id, os.fsencode(path)) for path, _ in failed])
        if planned:
            cur.execute("UPDATE caption_edits SET sidecars_pending = false WHERE edit_id = ?", [edit_id])
        written = {w.image_id: w for w in files}
        if refused or failed:
            raise SidecarsNotWritten(refused + failed, files)
        return BulkUndo(description=preview.description, previous=previous, sidecars=written, edit_id=edit_id, made_at=made_at,
                        sidecars_left=sorted(edited_outside))
    finally:
        cur.close()


def _finish_sidecar_writes(cur: duckdb.DuckDBPyConnection) -> int:
    """The sidecar files the newest edit (not undone) recorded but had not written when it was stopped: written now,
    where a file still holds what it held before that edit. Returns files written."""
    found = cur.execute("SELECT edit_id, sidecars_pending FROM caption_edits WHERE undone_at IS NULL "
                        "ORDER BY edit_id DESC LIMIT 1").fetchall()
    if not found or not found[0][1]:
        return 0  # none, or its files were all written (a large edit's files are not read again by every later one)
    finished = 0
    for write in _recorded_sidecars(cur, found[0][0]).values():
        try:
            if _read_own_file(Path(write.path)) != write.previous or write.previous == write.written:
                continue  # written, or changed since by another hand
            _write_own_file(Path(write.path), write.written)
            finished += 1
        except OSError:
            continue  # a link or folder there now, or not writable: left as it is
    cur.execute("UPDATE caption_edits SET sidecars_pending = false WHERE edit_id = ?", [found[0][0]])
    return finished


def _recorded_sidecars(cur: duckdb.DuckDBPyConnection, edit_id: int) -> dict[str, SidecarWrite]:
    """image → the sidecar write an edit recorded for it."""
    return {
        image_id: SidecarWrite(image_id, os.fsdecode(bytes(path)), None if before is None else bytes(before), bytes(written))
        for image_id, path, before, written in cur.execute(
            "SELECT image_id, sidecar_path_bytes, sidecar_previous, sidecar_written FROM caption_edit_rows "
            "WHERE edit_id = ? AND sidecar_path_bytes IS NOT NULL", [edit_id]).fetchall()
    }


def last_bulk_edit(con: duckdb.DuckDBPyConnection) -> BulkUndo | None:
    """The newest recorded bulk edit not undone yet (None when there is none), ready for undo_bulk."""
    cur = con.cursor()
    try:
        found = cur.execute(
            "SELECT edit_id, description, made_at FROM caption_edits WHERE undone_at IS NULL ORDER BY edit_id DESC LIMIT 1"
        ).fetchall()
        if not found:
            return None
        edit_id, description, made_at = found[0]
        previous = cur.sql(
            "SELECT image_id, manual_text, manual_created_at, choice, written_text FROM caption_edit_rows WHERE edit_id = ?",
            params=[edit_id],
        ).to_arrow_table()
        return BulkUndo(description=description, previous=previous, sidecars=_recorded_sidecars(cur, edit_id), edit_id=edit_id,
                        made_at=made_at)
    finally:
        cur.close()


# the rows of an edit (registered as undo_rows) whose caption in use is still the manual text the edit wrote
_STILL_AS_WRITTEN = (
    "SELECT u.image_id, u.manual_text, u.manual_created_at, u.choice FROM undo_rows u "
    "JOIN captions m ON m.image_id = u.image_id AND m.source = 'manual' AND m.text = u.written_text "
    "JOIN caption_choice ch ON ch.image_id = u.image_id AND ch.source = 'manual'"
)


def undo_preview(con: duckdb.DuckDBPyConnection, undo: BulkUndo) -> UndoOutcome:
    """What undo_bulk would do, without doing it: captions it would put back, and those edited since that it keeps."""
    cur = con.cursor()
    try:
        cur.register("undo_rows", undo.previous)
        try:
            still = cur.sql(_STILL_AS_WRITTEN).to_arrow_table().num_rows
        finally:
            cur.unregister("undo_rows")
        return UndoOutcome(restored=still, skipped=undo.changed - still)
    finally:
        cur.close()


def undo_bulk(con: duckdb.DuckDBPyConnection, undo: BulkUndo) -> UndoOutcome:
    """Put back the manual captions and choices a bulk edit replaced, and the sidecar files it wrote.

    Only images whose caption in use is still the manual text the edit wrote are put back: one saved,
    accepted or rejected since keeps that later edit (and is counted as skipped). A sidecar is put back
    (its earlier text, or removed if the edit created it) when it still holds what the edit wrote.
    """
    cur = con.cursor()
    try:
        if undo.edit_id is not None and cur.execute(
            "SELECT count(*) FROM caption_edits WHERE edit_id = ? AND undone_at IS NOT NULL", [undo.edit_id]
        ).fetchall()[0][0]:
            raise CatalogError(f"The edit \"{undo.description}\" was undone already.")
        cur.register("undo_rows", undo.previous)
        try:
            with transaction(cur):
                still = cur.sql(_STILL_AS_WRITTEN).to_arrow_table()
                cur.register("undo_still", still)
                cur.execute("DELETE FROM captions WHERE source = 'manual' AND image_id IN (SELECT image_id FROM undo_still)")
                cur.execute(
                    "INSERT INTO captions (image_id, source, text, created_at) "
                    "SELECT image_id, 'manual', manual_text, manual_created_at FROM undo_still WHERE manual_text IS NOT NULL"
                )
                cur.execute("DELETE FROM caption_choice WHERE image_id IN (SELECT image_id FROM undo_still)")
                cur.execute("INSERT INTO caption_choice (image_id, source) SELECT image_id, choice FROM undo_still WHERE choice IS NOT NULL")
                cur.unregister("undo_still")
                if undo.edit_id is not None:
                    cur.execute("UPDATE caption_edits SET undone_at = now() WHERE edit_id = ?", [undo.edit_id])
        finally:
            cur.unregister("undo_rows")
        # every file the edit wrote goes back while it holds what the edit wrote, whatever became of the caption since
        writes = list(undo.sidecars.values())
        restored = _restore_sidecars(writes)
        return UndoOutcome(restored=still.num_rows, skipped=undo.changed - still.num_rows, sidecars_left=len(writes) - restored)
    finally:
        cur.close()
