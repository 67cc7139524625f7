"""Opening image files the catalog has accepted, and reading their caption sidecars."""

from __future__ import annotations

import codecs
import hashlib
import os
import stat
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import duckdb


def open_image(path: str | bytes | os.PathLike):
    """A PIL image of a file the catalog holds as readable.

    Ingest applies the pixel cap (`--max-pixels`, raised by the user for a large scan or panorama) before it
    decodes anything; PIL's own, lower default would refuse those images again in every later step (caption,
    training, evaluation, export) as "decompression bombs". So that default is lifted here, as ingest lifts it.
    """
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    return Image.open(path)


WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # grey with more than 8 bits, or float


def as_rgb(image):
    """An opened image as the 8-bit RGB that every step sees (ingest's hashes and measures, captions, CLIP,
    training, evaluation). Pillow's own `convert("RGB")` clips 16-bit grey to white and shows whatever colour
    hides under transparency (black, in most cut-outs): here 16-bit grey is scaled by its full range, 32-bit
    and float grey by their maximum, and transparency is composited over white."""
    import numpy as np
    from PIL import Image

    mode = image.mode
    if mode in WIDE_MODES:
        array = np.asarray(image, dtype=np.float32)
        top = 65535.0 if mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), "L")
    elif image.has_transparency_data:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def as_ingested(info: os.stat_result, size: int | None, mtime_ns: int | None) -> bool:
    """Whether a file (its `os.stat`) still holds what ingest read: the size and mtime ingest recorded. A file
    edited or replaced since holds other pixels, which its caption and bucket do not describe. Rows from before
    sizes were recorded (None) count as unchanged."""
    return size is None or (info.st_size, info.st_mtime_ns) == (size, mtime_ns)


def holds_image(path: str | bytes | os.PathLike, image_id: str, size: int | None, mtime_ns: int | None) -> bool:
    """Whether the file at `path` still holds the image ingest read there. The size and mtime it recorded say so at
    once; a new mtime alone (`touch`, a copy restored from a backup) is settled by the bytes' SHA-256, which is the
    image id. FileNotFoundError when the file is gone."""
    info = os.stat(path)
    if as_ingested(info, size, mtime_ns):
        return True
    if info.st_size != size:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == image_id


SIDECAR_EXTENSIONS = (b".txt", b".caption")  # kohya's caption files beside an image, in the order they are looked for


def sidecar_beside(path: bytes) -> bytes | None:
    """The caption sidecar of an image file (`name.txt`, else `name.caption`), as the walk finds it, or None."""
    stem = os.path.splitext(path)[0]
    for ext in SIDECAR_EXTENSIONS:
        if os.path.isfile(stem + ext):
            return stem + ext
    return None


# --- the catalog's files as they are now --------------------------------------------------


def openable_paths(con: duckdb.DuckDBPyConnection, image_ids: Sequence[str],
                   unreadable: list[str] | None = None) -> dict[str, str]:
    """image_id → the file to open: its first path that still holds what ingest read (`holds_image`, as export
    checks), from the exact bytes (non-UTF-8 names work). An image with no such file is left out: its
    file was edited, replaced or deleted since ingest, and its caption and bucket belong to the old pixels. With
    `unreadable`, files are also opened (a chmod since ingest leaves size and time as they were): the paths of
    images left out because none of their files may be read go in it."""
    rows = con.execute(
        "SELECT image_id, path_bytes, size, mtime_ns FROM paths WHERE NOT missing AND image_id IN (SELECT unnest(?)) "
        "ORDER BY image_id, seq",
        [list(image_ids)],
    ).fetchall()
    found: dict[str, str] = {}
    denied: dict[str, str] = {}
    for image_id, raw, size, mtime_ns in rows:
        if image_id in found:
            continue
        path = os.fsdecode(bytes(raw))
        try:
            if holds_image(path, image_id, size, mtime_ns):  # a new mtime alone (`touch`) is checked by the bytes
                if unreadable is not None:
                    with open(path, "rb"):
                        pass
                found[image_id] = path
        except PermissionError:
            denied.setdefault(image_id, path)
        except OSError:
            continue
    if unreadable is not None:
        unreadable.extend(path for image_id, path in denied.items() if image_id not in found)
    return found


def sidecars_changed_since_ingest(con: duckdb.DuckDBPyConnection, image_ids: Sequence[str]) -> list[str]:
    """The caption sidecars (`name.txt`, `name.caption`) beside these images' files that were edited, added or
    removed since ingest read them, so that the caption in the catalog is not what they say until the next ingest.
    One that says the catalog's caption (the Captions screen's "write sidecar" box wrote it) is not one of them,
    nor one ingest left out as unreadable (not UTF-8): no ingest takes it until it is re-saved, and every ingest
    names it."""
    rows = con.execute(
        "SELECT p.path_bytes, p.sidecar_mtime_ns, c.caption, s.text FROM paths p LEFT JOIN current_captions c USING (image_id) "
        "LEFT JOIN captions s ON s.image_id = p.image_id AND s.source = 'sidecar' "
        "WHERE NOT p.missing AND p.image_id IN (SELECT unnest(?)) ORDER BY p.seq",
        [list(image_ids)],
    ).fetchall()
    changed = []
    for raw, recorded, caption, read_at_ingest in rows:
        path = bytes(raw)
        if not os.path.exists(path):  # the image moved away from here (not walked since): its caption went with it
            continue
        sidecar = sidecar_beside(path)
        try:
            now = os.stat(sidecar).st_mtime_ns if sidecar else None
        except OSError:
            now = None
        if now == recorded:
            continue
        said = _sidecar_says(sidecar) if now is not None else None
        # touched (or written back by an undo) but saying what ingest read, or what the catalog holds: not changed
        # (a review: a `touch`, or an edit and its undo, was said to be an edit, with advice that undid real ones)
        if now is not None and (said is None or said in {caption or "", read_at_ingest}):
            continue  # unreadable, or it says what the catalog holds or held
        changed.append(os.fsdecode(sidecar or os.path.splitext(path)[0] + b".txt"))
    return changed


def path_text(path: str | os.PathLike[str]) -> str:
    """`path` as text the catalog stores (`paths.path`): bytes that are not UTF-8 as \\xNN escapes (a name given as
    such escapes, as ingest prints it, stays as it is)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def catalog_path_text(path: str | os.PathLike[str]) -> str:
    """`path` made absolute, as `path_text`."""
    return path_text(os.path.abspath(path))


SIDECAR_READ_LIMIT = 256 * 1024  # bytes: a larger sidecar is no caption (ingest leaves it out)


# Captions run to a few hundred characters (CLIP reads 77 tokens; kohya's --max_token_length 225); long VLM
# descriptions to a few thousand. Past these (and past SIDECAR_READ_LIMIT bytes) a file is no caption (a review's
# 300 MB one hung training).
MAX_CAPTION_CHARS = 10_000


def read_caption_file(path: bytes | str) -> tuple[str, int, None] | tuple[None, int, str]:
    """(the caption, its lines with text, None) as ingest reads a sidecar (`sidecar_caption`: the first line with
    text), or (None, 0, why it is no caption): unreadable, over SIDECAR_READ_LIMIT bytes, not UTF-8, or a caption
    over MAX_CAPTION_CHARS. A file of hundreds of MB is not read whole."""
    try:
        # a named pipe under a caption's name blocked the open (and the ingest, or the run, that held the catalog) for
        # good: only a regular file is opened
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None, 0, "is not a regular file (a pipe or a device): not read"
        with open(path, "rb") as handle:
            data = handle.read(SIDECAR_READ_LIMIT + 1)
    except OSError as error:
        return None, 0, f"cannot be read ({error.strerror or error})"
    if len(data) > SIDECAR_READ_LIMIT:
        return None, 0, f"is over {SIDECAR_READ_LIMIT // 1024} KiB: not a caption"
    try:
        caption, lines = sidecar_caption(decode_caption(data))
    except ValueError as error:
        return None, 0, f"{error}; re-save it as UTF-8"
    if caption and len(caption) > MAX_CAPTION_CHARS:
        return None, 0, f"holds a caption of {len(caption):,} characters (over {MAX_CAPTION_CHARS:,}: not a caption)"
    return caption, lines, None


def _sidecar_says(sidecar: bytes) -> str | None:
    """The caption a sidecar gives as ingest reads it, or None when ingest leaves it out (`read_caption_file`)."""
    return read_caption_file(sidecar)[0]


# --- caption sidecars: their text -----------------------------------------------------


_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8-sig", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16", "UTF-16"),
)


def sidecar_caption(text: str) -> tuple[str, int]:
    """The caption a decoded sidecar gives: its first line with text, as kohya reads only the first line (OneTrainer
    picks one at random); and how many lines hold text. Joined, the lines made one caption no peer trains on."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    return (lines[0] if lines else ""), len(lines)


def one_line_caption(text: str) -> str:
    """A caption on one line: its lines with text joined as tags (", "). A caption file holds one line (kohya reads the
    first; so does ingest), and a line break inside a caption meant a tag break to tag edits, a space to export and
    part of a tag to the trainer."""
    return ", ".join(line.strip() for line in text.splitlines() if line.strip())


def decode_caption(data: bytes) -> str:
    """A sidecar's text: UTF-8, or UTF-8/16/32 with a byte-order mark; ValueError (saying why) for anything else.

    No guessing at legacy encodings: Latin-1 decodes any bytes, so a wrong guess would be a silently wrong caption.
    """
    for bom, codec, name in _BOMS:
        if data.startswith(bom):
            try:
                text = data.decode(codec)
            except UnicodeDecodeError as error:
                raise ValueError(f"starts with a {name} byte-order mark but is not valid {name} "
                                 f"(bad bytes at offset {error.start})") from None
            break
    else:
        name = "UTF-8"
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}; "
                             "Latin-1 or Windows-1252, perhaps)") from None
    if "\x00" in text:
        # UTF-16 without a byte-order mark is valid UTF-8 when it is ASCII, one NUL after each letter
        raise ValueError(f"is not {name} text (it holds NUL bytes: UTF-16 without a byte-order mark, perhaps)")
    # universal newlines, as text-mode open() reads them: no stray \r from Windows editors
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()
