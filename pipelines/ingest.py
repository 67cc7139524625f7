"""Ingest: walk folders, hash and measure every image in parallel, record it in the catalog."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shlex
import signal
import stat
import sys
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import duckdb
import numpy as np
import polars as pl

from pipelines.concepts import (
    concept_rules_applied,
    concepts_from_folder_names,
    images_out_of_their_concept_folders,
    parse_kohya_folder_name,
)
from pipelines.filter import excluded_folder_rules_applied
from workbench import config
from workbench.catalog import first_row, last_run_params, record_run, transaction
from workbench.images import SIDECAR_EXTENSIONS, as_rgb, path_text, read_caption_file, sidecar_beside
from workbench.progress import ProgressHook, StepCancelled, named_few, null_progress

OUTPUT_MARKER = os.fsencode(config.OUTPUT_MARKER)  # folders the workbench writes: walks from above leave them out
# an export (kohya, imagefolder) holds copies of catalog images with the current captions as sidecars: read back in,
# those captions would override the model's as "sidecar" ones, and the export could not be replaced any more
EXPORT_MARKER = os.fsencode(config.EXPORT_MANIFEST)
IMAGE_EXTENSIONS = {
    b".jpg", b".jpeg", b".jpe", b".jfif", b".png", b".webp", b".bmp", b".dib", b".gif",
    b".tif", b".tiff",
}
# Leading bytes of the formats we read; a file with one of these is an image whatever its name.
MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own decompression-bomb limit (2x its warning level)
STATS_SIDE = 96  # quality statistics and hashes come from one decode shrunk to fit this square
CHUNK = 32  # files per task sent to a worker process
BATCH = 2048  # rows per catalog transaction
FLUSH_SECONDS = 10.0  # ...or fewer, once this long has passed: a killed ingest of large files keeps what it read


def sniff_format(head: bytes) -> str | None:
    """The image format the leading bytes announce (AVIF only where this Pillow decodes it), or None."""
    for magic, name in MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if PILLOW_READS_AVIF and any(brand in AVIF_BRANDS for brand in _ftyp_brands(head)):
        return "AVIF"
    return None


# ISO-BMFF brands of HEIC/HEIF and AVIF files, in the `ftyp` box that starts them
HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif", b"avis"}
AVIF_BRANDS = {b"avif", b"avis"}  # an AVIF also names mif1, as a HEIC does: only these tell them apart
HEIF_HEAD = 64  # bytes to read for is_heif: the ftyp box's major brand and its first compatible brands
HEIF_ERROR = "HEIC/AVIF image"  # the reason of such a file met under an image name (first part: the summary's key)


def _pillow_reads_avif() -> bool:
    """Pillow 11.2 and later decode AVIF when built with libavif (the wheels are)."""
    from PIL import features

    try:
        return bool(features.check("avif"))
    except ValueError:  # a Pillow that does not know the feature
        return False


PILLOW_READS_AVIF = _pillow_reads_avif()


def _ftyp_brands(head: bytes) -> list[bytes]:
    """The major and compatible brands of an ISO-BMFF `ftyp` box at the start of `head` (none if it has none)."""
    if head[4:8] != b"ftyp":
        return []
    end = min(len(head), max(int.from_bytes(head[:4], "big"), 16))
    return [head[8:12]] + [head[i : i + 4] for i in range(16, end - 3, 4)]  # bytes 12-16 are a version


def is_heif(head: bytes) -> bool:
    """Whether the leading bytes are a HEIC/HEIF or AVIF file (its major or a compatible brand), whatever its name."""
    return any(brand in HEIF_BRANDS for brand in _ftyp_brands(head))


@dataclass
class IngestSummary:
    """What one ingest run found and did."""

    files_seen: int = 0
    new: int = 0
    moved_or_copied: int = 0  # of the new files, those holding an image the catalog had (moved, renamed or copied)
    changed: int = 0
    unchanged: int = 0
    errors: int = 0  # files this run found unreadable
    errors_in_catalog: int = 0  # every file the catalog holds as unreadable after this run (a rerun reads none anew)
    marked_missing: int = 0  # images now missing at every path they were found at
    paths_marked_missing: int = 0  # paths gone: a file moved (or a copy deleted) leaves its image present elsewhere
    reappeared: int = 0
    errors_retried: int = 0
    sidecar_captions: int = 0
    sidecars_left_out: int = 0
    images_joined_concepts: int = 0
    images_left_concepts: int = 0  # kohya folder members none of whose files is in that folder any more
    excluded_by_folder: int = 0  # read under a folder excluded by hand (`workbench exclude --folder`)
    new_or_changed_errors: int = 0  # new or changed files that turned out unreadable: nothing for dedup to group
    skipped_not_images: int = 0
    skipped_heic_avif: int = 0  # iPhone HEIC and AVIF photos: Pillow here cannot decode them
    directory_cycles_skipped: int = 0  # links back to a folder above them (a folder reached twice is walked twice)
    output_folders_skipped: int = 0  # the workbench's own outputs: training runs, class priors, exports
    kohya_reg_folders_skipped: int = 0  # reg/ beside img/: regularisation images, not training photos
    hidden_files_and_folders_skipped: int = 0  # names starting with "." (.thumbnails, AppleDouble ._ files) and __MACOSX folders
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    error_examples: dict[str, str] = field(default_factory=dict)  # reason -> the first file recorded with it
    sidecar_problems: dict[str, str] = field(default_factory=dict)  # sidecar path -> why it was left out
    recorded: int = 0  # files read and written to the catalog so far (what an interrupted run kept)
    heic_avif_paths: list[str] = field(default_factory=list)  # left out by name, or recorded as errors by content
    # byte-identical copies whose sidecars say different things: the sidecar used -> the others
    sidecar_conflicts: dict[str, list[str]] = field(default_factory=dict)
    # what makes the last dedup's groups stale besides new files: images back from missing that are in no group,
    # and grouped images (kept copies among them) whose every file went missing
    returned_ungrouped: int = 0
    grouped_missing: int = 0
    kept_copies_missing: int = 0
    sidecar_image_ids: set[str] = field(default_factory=set)  # images whose sidecar caption this run stored
    sidecar_texts_changed: set[str] = field(default_factory=set)  # of those, the ones whose text is new or changed
    read_by_kind: Counter = field(default_factory=Counter)  # files read and recorded so far: new, changed, ...
    output_roots_skipped: list[str] = field(default_factory=list)  # output folders named as roots (a `runs/*` glob)
    unreadable_folders: list[str] = field(default_factory=list)  # "path (why)": not walked, their files not marked missing
    sidecar_captions_removed: set[str] = field(default_factory=set)  # images whose sidecar was emptied or deleted
    multi_line_sidecars: list[str] = field(default_factory=list)  # read this run: only their first line is the caption
    both_sidecars: list[str] = field(default_factory=list)  # images with name.txt and name.caption: .txt is read
    animated: list[str] = field(default_factory=list)  # read this run, of several frames: every step sees the first
    sidecars_misnamed: list[str] = field(default_factory=list)  # IMG_1.TXT, IMG_1.jpg.txt: not read as captions

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if k not in _NOT_COUNTS}


# IngestSummary fields that are details for notes, not rows of the summary table
_NOT_COUNTS = ("errors_by_reason", "error_examples", "sidecar_problems", "recorded", "heic_avif_paths", "sidecar_conflicts",
               "returned_ungrouped", "grouped_missing", "kept_copies_missing", "sidecar_image_ids", "sidecar_texts_changed", "read_by_kind",
               "output_roots_skipped", "unreadable_folders", "sidecar_captions_removed", "multi_line_sidecars", "both_sidecars", "new_or_changed_errors", "animated", "sidecars_misnamed")
# what the walk finds to read; an interrupted run records how many of each it read, not how many it found
_READ_KINDS = ("new", "changed", "reappeared", "errors_retried")


class IngestInterrupted(KeyboardInterrupt):
    """Ctrl+C during an ingest, after it kept what it had read; `summary` says how far it got."""

    def __init__(self, summary: IngestSummary) -> None:
        super().__init__("ingest interrupted")
        self.summary = summary


# --- reading one file (runs in worker processes) ------------------------------

_ORIENTATION_TRANSPOSE = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}  # EXIF value -> Image.Transpose


def _error_row(path_bytes: bytes, reason: str, data: bytes | None) -> dict:
    if data is None:
        image_id = hashlib.sha256(b"unreadable:" + path_bytes).hexdigest()
    else:
        image_id = hashlib.sha256(data).hexdigest()
    return {"image_id": image_id, "status": "error", "error": reason, "bytes": None if data is None else len(data)}


def _to_small_rgb(img, side: int):
    """Decode once, small: JPEG uses draft() (DCT scaling, a no-op once decoded); others decode fully then shrink."""
    from PIL import Image

    if img.format == "JPEG":
        img.draft("RGB", (side, side))
    img = as_rgb(img)  # 16-bit scaled, transparency over white: the pixels every later step sees
    img.thumbnail((side, side), Image.Resampling.BILINEAR, reducing_gap=None)
    return img


def _quality(rgb) -> dict:
    array = np.asarray(rgb, dtype=np.float32)
    gray = array @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    laplacian = (
        gray[1:-1, 2:] + gray[1:-1, :-2] + gray[2:, 1:-1] + gray[:-2, 1:-1] - 4.0 * gray[1:-1, 1:-1]
    )
    histogram = np.bincount(gray.astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    p = histogram[histogram > 0] / histogram.sum()
    chroma = np.abs(array[..., 0] - array[..., 1]).mean() + np.abs(array[..., 1] - array[..., 2]).mean()
    return {
        "brightness": float(gray.mean()),
        "contrast": float(gray.std()),
        "blur": float(laplacian.var()) if laplacian.size else None,  # under 3 px across: no verdict, not "blurry"
        "entropy": float(-(p * np.log2(p)).sum()) + 0.0,  # + 0.0: a flat image has 0 bits, not -0.0
        "is_grayscale": bool(chroma < 2.0),
    }


# Rows 0..7 of the 32-point DCT-II basis: the low frequencies pHash keeps (scale does not matter,
# bits compare against the median).
_DCT8 = np.cos(np.pi * np.arange(8)[:, None] * (2 * np.arange(32)[None, :] + 1) / 64)
_BIT_WEIGHTS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def _bits_to_int(bits: np.ndarray) -> int:
    return int((bits.ravel().astype(np.uint64) * _BIT_WEIGHTS).sum())


# A left-right mirror reverses each row, which multiplies DCT column v by (-1)^v: the mirrored copy's
# pHash comes from the same coefficients, no second resize or transform.
_MIRROR_SIGNS = np.where(np.arange(8) % 2, -1.0, 1.0)[None, :]


def _phash_bits(low: np.ndarray) -> int:
    ordered = np.sort(low, axis=None)
    return _bits_to_int(low > (ordered[31] + ordered[32]) / 2)  # the median, without np.median's overhead


def _hashes(rgb) -> tuple[int, int, int]:
    """64-bit pHash, dHash and the pHash of the left-right mirrored image, bit-for-bit imagehash's definitions (tested)."""
    from PIL import Image

    gray = rgb.convert("L")
    pixels = np.asarray(gray.resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = _DCT8 @ pixels @ _DCT8.T
    small = np.asarray(gray.resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    dhash = _bits_to_int(small[:, 1:] > small[:, :-1])
    return _phash_bits(low), dhash, _phash_bits(low * _MIRROR_SIGNS)


def read_image_file(path_bytes: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, expect: str | None = None) -> dict:
    """Hash, measure and fingerprint one file; never raises for bad input (returns an error row).

    `expect`: the image id the catalog holds for this path. When the bytes still hash to it (a file touched, or
    restored with the same bytes), the row says so (status 'same') without decoding anything again.
    """
    from PIL import Image, UnidentifiedImageError

    from workbench.images import open_image

    try:
        with open(path_bytes, "rb") as handle:
            data = handle.read()
    except PermissionError:
        return _error_row(path_bytes, "permission denied: the file cannot be read", None)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return _error_row(path_bytes, "symbolic link loop: the link never reaches a file", None)
        if error.errno == errno.ENOENT:
            return _error_row(path_bytes, "broken symbolic link or file vanished while reading", None)
        if error.errno == errno.EISDIR:
            return _error_row(path_bytes, "is a folder, not a file", None)
        return _error_row(path_bytes, f"cannot read the file: {error.strerror}", None)
    if expect is not None and hashlib.sha256(data).hexdigest() == expect:
        return {"image_id": expect, "status": "same", "error": None, "bytes": len(data)}
    if not data:
        return _error_row(path_bytes, "empty file (0 bytes)", data)
    sniffed = sniff_format(data[:HEIF_HEAD])
    if sniffed is None and is_heif(data[:HEIF_HEAD]):
        return _error_row(path_bytes, f"{HEIF_ERROR}: this Pillow cannot decode it; convert it to JPEG or PNG", data)
    if sniffed is None:
        kind = "text" if _looks_like_text(data[:1024]) else "unknown binary data"
        return _error_row(path_bytes, f"not an image: the content is {kind}", data)
    row = _error_row(path_bytes, "", data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = open_image(io.BytesIO(data))  # PIL's own cap lifted: ours (max_pixels) is applied below, before decoding
            width, height = img.size
            if width * height > max_pixels:
                row["error"] = (
                    f"{width}x{height} = {width * height:,} pixels is over the {max_pixels:,}-pixel cap "
                    "(possible decompression bomb); raise --max-pixels to read it"
                )
                row.update(width=width, height=height, format=img.format, mode=img.mode)
                return row
            fmt, mode = img.format, img.mode
            n_frames = int(getattr(img, "n_frames", 1) or 1)
            if fmt == "JPEG":
                img.draft("RGB", (STATS_SIDE, STATS_SIDE))  # DCT scaling: decode small
            # decode here, so that corrupt pixel data fails here: a PNG's getexif() decodes the pixels, and its
            # error, taken for bad EXIF below, left a half-decoded image that was measured and recorded 'ok'
            img.load()
            orientation = 1
            try:
                orientation = int(img.getexif().get(0x0112, 1) or 1)
            except Exception:  # corrupt EXIF should not hide a good image
                orientation = 1
            small = _to_small_rgb(img, STATS_SIDE)
            if orientation in _ORIENTATION_TRANSPOSE:
                small = small.transpose(Image.Transpose(_ORIENTATION_TRANSPOSE[orientation]))
            if orientation in (5, 6, 7, 8):
                width, height = height, width
    except UnidentifiedImageError:
        row["error"] = f"not a readable image: {sniffed} signature but Pillow cannot identify it"
        return row
    except Image.DecompressionBombError as error:
        row["error"] = f"decompression bomb: {error}"
        return row
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, IndexError, TypeError) as error:
        message = str(error) or error.__class__.__name__
        if "truncated" in message:
            row["error"] = f"truncated image: {message}"
        else:
            row["error"] = f"corrupt image data: {message}"
        row.update(format=sniffed)
        return row
    phash, dhash, phash_mirror = _hashes(small)
    row.update(
        status="ok",
        error=None,
        width=width,
        height=height,
        format=fmt,
        mode=mode,
        n_frames=n_frames,
        exif_orientation=orientation,
        phash=phash,
        dhash=dhash,
        phash_mirror=phash_mirror,
        **_quality(small),
    )
    return row


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _read_chunk(chunk: list[bytes], max_pixels: int, expect: dict[bytes, str]) -> list[dict]:
    return [read_image_file(p, max_pixels, expect=expect.get(p)) for p in chunk]


# --- walking ---------------------------------------------------------------------


@dataclass
class FileEntry:
    path_bytes: bytes
    size: int | None
    mtime_ns: int | None
    sidecar: bytes | None  # path of the caption sidecar beside it, if any
    sidecar_mtime_ns: int | None


def _walk(roots: Sequence[bytes], summary: IngestSummary, skipped: list[bytes]) -> Iterator[FileEntry]:
    """Yield candidate image files under `roots`, following links but never looping; the workbench's own
    output folders, met on the way or named as roots, are left out and listed in `skipped`.

    Only a link back to a folder above it (a cycle) is not followed. A folder reached by two paths (a link to a
    folder walked elsewhere, a kohya `10_sks dog` link to a photo folder) is walked under each: every path of its
    files is seen, so none is marked missing, and each folder name counts for concepts.
    """
    walked: set[bytes] = set()  # folder paths, so overlapping roots walk a folder once

    def unreadable(folder: bytes, error: OSError) -> None:
        # not walked is not gone: its files are not marked missing (an unmounted share, a folder made private); a path
        # longer than the system takes cannot even be asked whether it exists
        if error.errno == errno.ENAMETOOLONG or os.path.lexists(folder):
            summary.unreadable_folders.append(f"{display_path(folder)} ({error.strerror or error})")
            skipped.append(folder)

    def entries_of(folder: bytes, above: frozenset[tuple[int, int]]) -> Iterator[FileEntry]:
        if folder in walked:
            return
        try:
            info = os.stat(folder)
        except OSError as error:
            unreadable(folder, error)
            return
        key = (info.st_dev, info.st_ino)
        if key in above:
            summary.directory_cycles_skipped += 1
            return
        walked.add(folder)
        above = above | {key}
        try:
            with os.scandir(folder) as scan:
                items = sorted(scan, key=lambda e: e.name)
        except OSError as error:
            unreadable(folder, error)
            return
        names = {e.name for e in items}
        lowered = {name.lower(): name for name in names}  # once per folder: caption files named other than kohya reads
        subfolders = []
        for item in items:
            if item.name.startswith(b".") or item.name == b"__MACOSX":
                # thumbnails (.thumbnails), macOS's AppleDouble files (._IMG_1.jpg, __MACOSX/ in a zip), a notebook's
                # .ipynb_checkpoints: copies and metadata, not photos (kohya's glob skips dot files too). Not kept
                # from being marked missing: one an older workbench ingested leaves the dataset
                summary.hidden_files_and_folders_skipped += 1
                continue
            try:
                is_dir = item.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                subfolders.append(item.path)
                continue
            yield from _candidate(item.path, item.name, names, lowered, summary)
        for sub in subfolders:
            if _is_output_folder(sub):
                summary.output_folders_skipped += 1
                skipped.append(sub)
                continue
            if _is_kohya_reg_folder(sub, names):
                summary.kohya_reg_folders_skipped += 1  # its N_class folders would become instance concepts
                skipped.append(sub)
                continue
            yield from entries_of(sub, above)

    # a folder's names (and by lower case), listed once for all the files named in it
    siblings_of: dict[bytes, tuple[set[bytes], dict[bytes, bytes]]] = {}
    for root in roots:
        if not os.path.lexists(root):
            continue  # gone (a folder or file the catalog knows, deleted since): its files are marked missing
        if os.path.isdir(root) and _is_output_folder(root):
            # named all the same (`ingest runs/*`): a run's sample grids and loss plot, class priors or an export
            # are no photos to train on, and took the dataset over without a word
            summary.output_folders_skipped += 1
            summary.output_roots_skipped.append(display_path(root))
            skipped.append(root)
        elif os.path.isdir(root):
            yield from entries_of(root, frozenset())
        else:
            folder, name = os.path.split(root)
            if folder not in siblings_of:
                names = set(os.listdir(folder or b"."))
                siblings_of[folder] = names, {sibling.lower(): sibling for sibling in names}
            yield from _candidate(root, name, *siblings_of[folder], summary)


def _is_output_folder(folder: bytes) -> bool:
    """A folder the workbench wrote: a training run or class priors (their marker), or an export (its manifest,
    written before its first image, so an export stopped part way carries it too). Older versions wrote no markers:
    their kohya exports are known by their dataset.toml's first line, their runs by checkpoints/ beside loss.csv."""
    if any(os.path.exists(os.path.join(folder, marker)) for marker in (OUTPUT_MARKER, EXPORT_MARKER)):
        return True
    if os.path.isdir(os.path.join(folder, b"checkpoints")) and os.path.isfile(os.path.join(folder, b"loss.csv")):
        return True
    try:
        with open(os.path.join(folder, b"dataset.toml"), "rb") as handle:
            return handle.readline().startswith(b"# sd-scripts dataset config written by `workbench export")
    except OSError:
        return False


def _is_kohya_reg_folder(folder: bytes, siblings: set[bytes]) -> bool:
    """kohya's layout, as `workbench export` writes it: `img/` and `reg/` side by side, `reg/` holding `N_class`
    folders of regularisation images. Those are class priors for another model, not photos to train on."""
    if os.path.basename(folder).lower() != b"reg" or not any(name.lower() == b"img" for name in siblings):
        return False
    try:
        return any(entry.is_dir() and parse_kohya_folder_name(os.fsdecode(entry.name)) for entry in os.scandir(folder))
    except OSError:
        return False


def _candidate(path: bytes, name: bytes, siblings: set[bytes], lowered: dict[bytes, bytes],
               summary: IngestSummary) -> Iterator[FileEntry]:
    """The file `name` of a folder holding `siblings` (`lowered`: them by lower case), if it may be an image."""
    stem, ext = os.path.splitext(name)
    ext = ext.lower()
    if ext in SIDECAR_EXTENSIONS:
        return
    try:
        info = os.stat(path)
    except OSError:
        # Broken link or link loop: keep a row only when it claims to be an image.
        if ext in IMAGE_EXTENSIONS:
            yield FileEntry(path, None, None, None, None)
        return
    if not stat.S_ISREG(info.st_mode):
        return
    if ext not in IMAGE_EXTENSIONS:
        # Sniff content, not names: an image under a wrong extension still counts.
        try:
            with open(path, "rb") as handle:
                head = handle.read(HEIF_HEAD)
        except OSError:
            return
        if sniff_format(head) is None:
            if is_heif(head):
                summary.skipped_heic_avif += 1
                summary.heic_avif_paths.append(display_path(path))
            else:
                summary.skipped_not_images += 1
            return
    sidecar = sidecar_mtime = None
    if all(stem + sidecar_ext in siblings for sidecar_ext in SIDECAR_EXTENSIONS):
        summary.both_sidecars.append(display_path(os.path.join(os.path.dirname(path), stem + SIDECAR_EXTENSIONS[0])))
    for sidecar_ext in SIDECAR_EXTENSIONS:
        candidate = stem + sidecar_ext
        if candidate in siblings:
            sidecar = os.path.join(os.path.dirname(path), candidate)
            try:
                sidecar_mtime = os.stat(sidecar).st_mtime_ns
            except OSError:
                sidecar = None
                continue
            break
    if sidecar is None:
        # `IMG_1.TXT` (Windows tools) or `IMG_1.jpg.txt`: kohya on Linux reads neither (name.txt exactly), nor does ingest; said,
        # as a caption silently not read is a caption the model captions over
        # (a case variant only: one named exactly that could not be stat'ed, a dangling link, is not misnamed)
        near = [lowered[(stem + ext).lower()] for ext in SIDECAR_EXTENSIONS
                if lowered.get((stem + ext).lower(), stem + ext) != stem + ext]
        near += [name + ext for ext in SIDECAR_EXTENSIONS if name + ext in siblings]
        summary.sidecars_misnamed += [display_path(os.path.join(os.path.dirname(path), other)) for other in near]
    yield FileEntry(path, info.st_size, info.st_mtime_ns, sidecar, sidecar_mtime)


def display_path(path_bytes: bytes) -> str:
    """A printable path: undecodable bytes become \\xNN escapes (`path_text`, as the catalog stores paths)."""
    return path_text(path_bytes)


def _read_sidecar(path: bytes, summary: IngestSummary | None = None) -> tuple[str | None, str | None]:
    """(caption or None when empty, None), or (None, why the sidecar was left out). The caption is the first line
    with text (`sidecar_caption`); a file with more is named in `summary`."""
    caption, lines, problem = read_caption_file(path)
    if problem is not None:
        return None, problem
    if lines > 1 and summary is not None:
        summary.multi_line_sidecars.append(display_path(path))
    return caption or None, None


def _sidecar_left_out(path: bytes, problem: str, summary: IngestSummary) -> str:
    """Count a sidecar that could not be read; return the line that tells the user."""
    summary.sidecars_left_out += 1
    summary.sidecar_problems[display_path(path)] = problem
    return f"caption sidecar left out: {display_path(path)} {problem} (the image keeps any caption it had)"


# --- writing to the catalog ---------------------------------------------------------

# One batch travels to DuckDB as a polars frame (Arrow underneath). Not pyarrow directly: its first
# pa.array() call imports pandas, 0.4 s per process.
_IMAGE_SCHEMA = {
    "image_id": pl.String, "bytes": pl.Int64, "width": pl.Int32, "height": pl.Int32,
    "format": pl.String, "mode": pl.String, "n_frames": pl.Int32, "exif_orientation": pl.Int32,
    "status": pl.String, "error": pl.String, "brightness": pl.Float64, "contrast": pl.Float64,
    "blur": pl.Float64, "entropy": pl.Float64, "is_grayscale": pl.Boolean,
    "phash": pl.UInt64, "dhash": pl.UInt64, "phash_mirror": pl.UInt64,
    "path": pl.String, "path_bytes": pl.Binary, "size": pl.Int64, "mtime_ns": pl.Int64,
    "sidecar_mtime_ns": pl.Int64, "caption": pl.String, "sidecar_unread": pl.Boolean,
}


def _write_batch(con: duckdb.DuckDBPyConnection, rows: list[dict], role: str = "instance") -> None:
    """Upsert one batch of images (new ones with `role`), hashes, paths and sidecar captions in a single transaction."""
    if not rows:
        return
    table = pl.DataFrame({name: [row.get(name) for row in rows] for name in _IMAGE_SCHEMA}, schema=_IMAGE_SCHEMA)
    con.register("ingest_batch", table)
    try:
        with transaction(con):
            _upsert_batch(con, role)
    finally:
        con.unregister("ingest_batch")


def _upsert_batch(con: duckdb.DuckDBPyConnection, role: str) -> None:
    # a file edited in place (same path, new bytes) keeps what people gave it by hand: its manual caption, concept,
    # tags and exclusion or include; the old content's row stays and says what replaced it. Only onto a content new to
    # the catalog (found before this batch's images go in): a file overwritten with the bytes of an image the
    # catalog knows (a copy of another photo, an edit undone) is that image, with what it was given itself
    con.execute(
        "CREATE OR REPLACE TEMP TABLE ingest_edits AS SELECT DISTINCT p.image_id AS old_id, b.image_id AS new_id, "
        "b.image_id NOT IN (SELECT image_id FROM images) AS fresh, p.path AS edited_path "
        "FROM paths p JOIN ingest_batch b ON p.path_bytes = b.path_bytes WHERE p.image_id <> b.image_id AND b.status = 'ok'"
    )
    # a file that could not be read at all before (permission denied: no bytes, no content) and now gives bytes
    # was not edited: its row of that error goes, once no path holds it, and what was given to it by hand (an
    # exclusion, a concept) passes to the content read now, as for an edit
    con.execute(
        "CREATE OR REPLACE TEMP TABLE ingest_unread AS SELECT DISTINCT p.image_id AS old_id FROM paths p "
        "JOIN ingest_batch b ON p.path_bytes = b.path_bytes JOIN images o ON o.image_id = p.image_id "
        "WHERE p.image_id <> b.image_id AND o.status = 'error' AND o.bytes IS NULL"
    )
    con.execute(
        """
        INSERT INTO images (image_id, bytes, width, height, format, mode, n_frames, exif_orientation,
                            status, error, brightness, contrast, blur, entropy, is_grayscale, role)
        SELECT DISTINCT ON (image_id) image_id, bytes, width, height, format, mode, n_frames, exif_orientation,
               status, error, brightness, contrast, blur, entropy, is_grayscale,
               CASE WHEN status = 'ok' THEN ? ELSE 'instance' END  -- an unreadable file is nobody's class image
        FROM ingest_batch WHERE status <> 'same'  -- bytes already recorded: only their path row changes
        ON CONFLICT (image_id) DO UPDATE SET
            bytes = excluded.bytes, width = excluded.width, height = excluded.height,
            format = excluded.format, mode = excluded.mode, n_frames = excluded.n_frames,
            exif_orientation = excluded.exif_orientation, status = excluded.status,
            error = excluded.error, brightness = excluded.brightness, contrast = excluded.contrast,
            blur = excluded.blur, entropy = excluded.entropy, is_grayscale = excluded.is_grayscale,
            updated_at = now()
        """,
        [role],
    )
    con.execute(
        """
        INSERT INTO hashes (image_id, phash, dhash, phash_mirror)
        SELECT DISTINCT ON (image_id) image_id, phash, dhash, phash_mirror FROM ingest_batch WHERE phash IS NOT NULL
        ON CONFLICT (image_id) DO UPDATE SET phash = excluded.phash, dhash = excluded.dhash, phash_mirror = excluded.phash_mirror
        """
    )
    con.execute(
        "INSERT INTO captions (image_id, source, text, created_at) SELECT e.new_id, 'manual', c.text, c.created_at "
        "FROM ingest_edits e JOIN captions c ON c.image_id = e.old_id AND c.source = 'manual' WHERE e.fresh "
        "ON CONFLICT DO NOTHING"
    )
    con.execute(
        "INSERT INTO caption_choice (image_id, source) SELECT e.new_id, 'manual' FROM ingest_edits e "
        "JOIN caption_choice ch ON ch.image_id = e.old_id AND ch.source = 'manual' WHERE e.fresh ON CONFLICT DO NOTHING"
    )
    con.execute(
        "INSERT INTO concept_images (image_id, concept, source, created_at) SELECT e.new_id, ci.concept, ci.source, ci.created_at "
        "FROM ingest_edits e JOIN concept_images ci ON ci.image_id = e.old_id WHERE e.fresh ON CONFLICT DO NOTHING"
    )
    # its tags, the user's own labels ("to review"): they were left on the old content's row, which no file holds
    con.execute(
        "INSERT INTO image_tags (image_id, tag, created_at) SELECT e.new_id, t.tag, t.created_at FROM ingest_edits e "
        "JOIN image_tags t ON t.image_id = e.old_id WHERE e.fresh ON CONFLICT DO NOTHING"
    )
    # and its hand-made exclusion or include: an edited photo does not slip back into the dataset unseen
    con.execute(
        "INSERT INTO exclusions (image_id, step, reason) SELECT e.new_id, 'manual', x.reason || ' (from before the file was edited)' "
        "FROM ingest_edits e JOIN exclusions x ON x.image_id = e.old_id AND x.step = 'manual' WHERE e.fresh "
        "ON CONFLICT DO NOTHING"
    )
    con.execute(
        "INSERT INTO manual_includes (image_id) SELECT e.new_id FROM ingest_edits e JOIN manual_includes m ON m.image_id = e.old_id "
        "WHERE e.fresh ON CONFLICT DO NOTHING"
    )
    # an edited file whose sidecar cannot be read now keeps the sidecar caption read from it before (a new content
    # only, as above)
    con.execute(
        "INSERT INTO captions (image_id, source, text, created_at) SELECT DISTINCT ON (b.image_id) b.image_id, 'sidecar', c.text, c.created_at "
        "FROM ingest_batch b JOIN ingest_edits e ON e.new_id = b.image_id AND e.fresh "
        "JOIN paths p ON p.path_bytes = b.path_bytes AND p.image_id = e.old_id "
        "JOIN captions c ON c.image_id = p.image_id AND c.source = 'sidecar' WHERE b.sidecar_unread AND b.status = 'ok' "
        "ON CONFLICT DO NOTHING"
    )
    con.execute(
        """
        INSERT INTO paths (path, path_bytes, image_id, size, mtime_ns, sidecar_mtime_ns, seq, missing)
        SELECT path, path_bytes, image_id, size, mtime_ns, sidecar_mtime_ns, nextval('path_seq'), false
        FROM ingest_batch
        ON CONFLICT (path) DO UPDATE SET
            image_id = excluded.image_id, size = excluded.size, mtime_ns = excluded.mtime_ns,
            sidecar_mtime_ns = excluded.sidecar_mtime_ns, missing = false, last_seen = now()
        """
    )
    con.execute(
        "UPDATE images SET replaced_by = e.new_id, replaced_path = e.edited_path FROM ingest_edits e "
        "WHERE images.image_id = e.old_id AND NOT EXISTS (SELECT 1 FROM paths WHERE paths.image_id = e.old_id)"
    )
    con.execute(
        "UPDATE images SET replaced_by = NULL, replaced_path = NULL WHERE replaced_by IS NOT NULL "
        "AND image_id IN (SELECT image_id FROM ingest_batch)"
    )
    con.execute("DELETE FROM ingest_unread WHERE old_id IN (SELECT image_id FROM paths)")
    if con.execute("SELECT count(*) FROM ingest_unread").fetchall()[0][0]:
        for (table,) in con.execute(
            "SELECT table_name FROM duckdb_columns() WHERE column_name = 'image_id' AND table_name <> 'images' "
            "AND table_name IN (SELECT table_name FROM duckdb_tables() WHERE NOT temporary)"
        ).fetchall():
            con.execute(f'DELETE FROM "{table}" WHERE image_id IN (SELECT old_id FROM ingest_unread)')
        con.execute("DELETE FROM images WHERE image_id IN (SELECT old_id FROM ingest_unread)")
    con.execute("DROP TABLE ingest_unread")
    con.execute("DROP TABLE ingest_edits")
    con.execute(
        """
        INSERT INTO captions (image_id, source, text)
        SELECT DISTINCT ON (image_id) image_id, 'sidecar', caption FROM ingest_batch WHERE caption IS NOT NULL
        ON CONFLICT (image_id, source) DO UPDATE SET text = excluded.text, created_at = now()
        """
    )


def _known_paths(con: duckdb.DuckDBPyConnection) -> dict[bytes, tuple]:
    """path -> (size, mtime_ns, sidecar_mtime_ns, missing, image status, image id, never read: an error before
    any byte could be read, such as a permission denied)."""
    rows = con.execute(
        "SELECT p.path_bytes, p.size, p.mtime_ns, p.sidecar_mtime_ns, p.missing, i.status, p.image_id, "
        "coalesce(i.status = 'error' AND i.bytes IS NULL, false) "
        "FROM paths p LEFT JOIN images i USING (image_id)"
    ).fetchall()
    return {bytes(r[0]): tuple(r[1:]) for r in rows}


def _under(path: bytes, roots: Sequence[bytes] | frozenset[bytes]) -> bool:
    """Whether `path` is one of `roots` or inside one. For many roots (an ingest of thousands of files named one by
    one) pass a frozenset: the path's parents are looked up in it instead of each root tried in turn."""
    if isinstance(roots, frozenset):
        while True:
            if path in roots:
                return True
            parent = os.path.dirname(path)
            if parent == path:
                return False
            path = parent
    for root in roots:
        if path == root or path.startswith(root.rstrip(b"/") + b"/"):
            return True
    return False


def _chunks(items: Sequence, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def ingested_images(
    con: duckdb.DuckDBPyConnection,
    paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    folder_concepts: bool = True,
    role: str = "instance",
    rehash: bool = False,
    progress: ProgressHook = null_progress,
) -> IngestSummary:
    """Walk `paths`, read new and changed files in parallel, and record every image in the catalog.

    A file whose size and modification time are as recorded is taken as unchanged; `rehash` hashes every file again
    (new bytes under an old size and time: a tool that put the time back), and reads those that changed.

    `folder_concepts`: the kohya folder names of the files read become concepts, and concepts' stored rules take
    the new images (False for class images, which are in no concept). `role`: what an image new to the catalog is
    ('class_prior' for generated class images: written with it, they are never training photos for a moment)."""
    if role not in ("instance", "class_prior"):
        raise ValueError(f"role must be 'instance' or 'class_prior', not {role!r}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1, got {max_pixels}")
    if isinstance(paths, (str, bytes, os.PathLike)):  # one path: iterated, a string walked "/" and every letter
        paths = [paths]
    given = [os.path.expanduser(p) for p in paths]
    roots = [os.path.abspath(os.fsencode(p)) for p in given]
    gone = [(p, root) for p, root in zip(given, roots) if not os.path.lexists(p)]
    if gone:
        # a folder (or file) the catalog holds files of, deleted since: walked as empty, so its files are marked
        # missing (and any moved elsewhere are found there by content when that folder is ingested)
        known = [path for path, meta in _known_paths(con).items() if not meta[3]]
        missing = [path_text(p) for p, root in gone if not any(_under(path, [root]) for path in known)]
        if missing:  # before the run is recorded: an ingest of nothing is no success
            raise FileNotFoundError(errno.ENOENT, f"No such file or folder to ingest: {', '.join(missing)}", missing[0])
        for p, _ in gone:
            progress(task="scan", message=f"{path_text(p)} is gone: the files the catalog knows there are marked missing")
    workers = (os.cpu_count() or 1) if workers is None else workers
    summary = IngestSummary()
    # files that failed under a lower pixel cap are read again once it is raised (the error says to raise it)
    retry_errors = max_pixels > last_run_params(con, "ingest").get("max_pixels", DEFAULT_MAX_PIXELS)
    # an ingest stopped after it read everything has not joined concepts yet, and its rerun reads nothing
    last = first_row(con.execute("SELECT status FROM runs WHERE step = 'ingest' ORDER BY run_id DESC LIMIT 1"))
    last_unfinished = last is not None and last[0] != "ok"
    params = {"paths": [display_path(r) for r in roots], "workers": workers, "max_pixels": max_pixels, "rehash": rehash}
    for root in roots:  # left out when met in a walk from above; named as a root, it is read: say what that means
        if os.path.isdir(root) and _is_kohya_reg_folder(root, set(os.listdir(os.path.dirname(root)))):
            progress(task="ingest", message=(
                f"{display_path(root)} holds kohya regularisation images (reg/ beside img/): they join the dataset as "
                "instance images, each folder's class as a concept. To use them as DreamBooth class images instead: "
                "`workbench priors --from FOLDER --including-training-photos` for each N_class folder (or `workbench "
                "import-kohya` of the folder above)"))
    with _CtrlC() as ctrl_c, record_run(con, "ingest", params) as run:
        try:
            _ingest(con, roots, run, summary, workers=workers, max_pixels=max_pixels, retry_errors=retry_errors, rehash=rehash,
                    join_concepts=last_unfinished, folder_concepts=folder_concepts, progress=progress, ctrl_c=ctrl_c,
                    role=role)
        except KeyboardInterrupt as interrupt:
            # every write is its own transaction, so the catalog is consistent; say how far this run got. The run's
            # counts are what it stored (the summary's, what it found to read, say how much of it that was)
            run.counts.update(summary.as_dict())
            run.counts.update({kind: summary.read_by_kind[kind] for kind in _READ_KINDS})
            run.counts["not_read"] = sum(getattr(summary, kind) - summary.read_by_kind[kind] for kind in _READ_KINDS)
            raise IngestInterrupted(summary) from interrupt
    return summary


class _CtrlC:
    """Ctrl+C (and SIGTERM: `kill`, `timeout`, a service manager) as a flag that the ingest checks at safe points
    (between files, batches and steps): either stops it as Ctrl+C does, keeping what was read.

    Raised by a signal handler, KeyboardInterrupt could land inside a DuckDB query, which turns it into
    RuntimeError('Query interrupted') (during COMMIT: an aborted transaction), and a second Ctrl+C could cut
    the stop short; SIGTERM's default action ends the process with nothing of the current batch kept. Only where
    signals arrive: the main thread, and for each signal only with its usual handler in place (Python's for SIGINT,
    the default for SIGTERM), so a handler someone else installed is left alone.
    """

    _USUAL = ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL))

    def __init__(self) -> None:
        self.pressed = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_CtrlC":
        if threading.current_thread() is threading.main_thread():
            for signum, usual in self._USUAL:
                if signal.getsignal(signum) is usual:
                    self._previous[signum] = signal.signal(signum, self._press)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _press(self, signum, frame) -> None:
        self.pressed = True  # a second press while the ingest stops changes nothing

    def check(self) -> None:
        """Stop here (KeyboardInterrupt) if Ctrl+C was pressed."""
        if self.pressed:
            raise KeyboardInterrupt


def _ingest(con, roots: list[bytes], run, summary: IngestSummary, *, workers: int, max_pixels: int,
            retry_errors: bool, rehash: bool, join_concepts: bool, folder_concepts: bool, progress: ProgressHook, ctrl_c: _CtrlC,
            role: str = "instance") -> None:
    """The body of one ingest run (see ingested_images)."""
    progress(task="scan", completed=0, total=None, message=f"scanning {len(roots)} path(s)")
    known = _known_paths(con)
    seen: set[bytes] = set()
    to_read: list[FileEntry] = []
    plan: dict[bytes, str] = {}  # path to read -> what the walk takes it for: new, changed, reappeared, errors_retried
    expect: dict[bytes, str] = {}  # path to read -> the image the catalog holds there, when its bytes may be the same
    sidecar_only: list[FileEntry] = []
    skipped_folders: list[bytes] = []
    for entry in _walk(roots, summary, skipped_folders):
        ctrl_c.check()
        if entry.path_bytes in seen:
            continue
        seen.add(entry.path_bytes)
        summary.files_seen += 1
        previous = known.get(entry.path_bytes)
        if previous is None:
            kind = "new"
        elif entry.size is None and previous[0] is None and not previous[3]:
            kind = "unchanged"  # still cannot be stat'ed (a link loop, say), as recorded last time
        elif entry.size is None or (previous[0], previous[1]) != (entry.size, entry.mtime_ns) or rehash:
            kind = "changed"  # (--rehash: the bytes are hashed first, and the same ones stay "unchanged")
        elif previous[3]:  # unchanged size and time, but it was marked missing: it came back
            kind = "reappeared"
        elif previous[6] or (retry_errors and previous[4] == "error"):
            # a file never read (permission denied, say) is tried again each time: its size and time say nothing
            # of whether it can be read now (a chmod changes neither)
            kind = "errors_retried"
        else:
            kind = "unchanged"
            if previous[2] != entry.sidecar_mtime_ns:
                sidecar_only.append(entry)
        setattr(summary, kind, getattr(summary, kind) + 1)
        if kind == "unchanged":
            continue
        plan[entry.path_bytes] = kind
        to_read.append(entry)
        # the same size (a `touch`, a file restored from a backup): the worker hashes the bytes first, and when they
        # are the image already recorded, the file is unchanged (or back), not a new content to decode and dedup
        # (an unreadable file too, unless it is to be tried again, or --rehash asks: a decoder installed since)
        if (entry.size is not None and previous is not None and previous[0] == entry.size and previous[5] is not None
                and (previous[4] != "error" or not (retry_errors or rehash or previous[6]))):
            expect[entry.path_bytes] = previous[5]
    run.counts["files_seen"] = summary.files_seen
    _mark_seen(con, [p for p in seen if p in known])
    # of the images at paths missing until now, those in no duplicate group and missing everywhere: the ones of them
    # that come back are as new to the last dedup as a new file (found before the read marks them present again)
    back = [p for p in plan if p in known and known[p][3]]
    gone_ungrouped = set(_returned_ungrouped(con, _image_ids_of(con, back))) if back else set()
    sidecars: dict[bytes, tuple[str, bytes, str | None]] = {}  # image path -> (image, its sidecar, caption) read now
    recheck: set[str] = set()  # images whose sidecar caption may have come from a file that no longer gives it
    outcome: dict[bytes, tuple[str, str, str]] = {}  # path read -> (what it turned out to be, its image, its status)
    _read_all(con, to_read, workers=workers, max_pixels=max_pixels, summary=summary, progress=progress, ctrl_c=ctrl_c, role=role,
              sidecars=sidecars, plan=plan, expect=expect, known=known, outcome=outcome, sidecar_only=sidecar_only)
    known_images = {previous[5] for previous in known.values() if previous[5] is not None}
    moved = [path for path, kind in plan.items() if kind == "new" and path in outcome and outcome[path][1] in known_images]
    summary.moved_or_copied = len(moved)
    # an unreadable file moved is an image dedup never grouped either way: counted once, as moved
    summary.new_or_changed_errors -= sum(1 for path in moved if outcome[path][2] == "error")
    summary.returned_ungrouped = len({image_id for kind, image_id, _ in outcome.values() if kind == "reappeared"}
                                     & gone_ungrouped)
    _refresh_sidecars(con, sidecar_only, summary, progress, ctrl_c, sidecars=sidecars, recheck=recheck)
    ctrl_c.check()
    # not walked is not gone: files in the output folders left out (class priors, say) keep their rows as they are
    walked_roots = frozenset(roots)  # looked up by each path's parents: thousands of files named one by one
    vanished = [p for p, meta in known.items()
                if not meta[3] and p not in seen and _under(p, walked_roots) and not _under(p, skipped_folders)]
    # a folder moved or renamed as a whole: its images turn up at new paths, and their old ones, outside the folders
    # walked now, are looked at (a stat each); those gone are missing, or `path` would name files that are not there
    moved_images = {outcome[path][1] for path in moved}
    vanished += [p for p, meta in known.items()
                 if meta[5] in moved_images and not meta[3] and p not in seen and not _under(p, walked_roots)
                 and not os.path.lexists(p)]
    vanished_ids: list[str] = []
    if vanished:
        with transaction(con):
            con.executemany("UPDATE paths SET missing = true WHERE path_bytes = ?", [[p] for p in vanished])
        vanished_ids = _image_ids_of(con, vanished)
        summary.grouped_missing, summary.kept_copies_missing = _grouped_now_missing(con, vanished_ids)
        summary.marked_missing = _missing_everywhere(con, vanished_ids)  # a file moved leaves no image missing
        recheck.update(vanished_ids)
    summary.paths_marked_missing = len(vanished)
    _settle_shared_sidecars(con, summary, sidecars, recheck)
    # what was read, less the files found to hold the bytes recorded before (touched): those changed nothing
    read = [entry.path_bytes for entry in to_read if outcome.get(entry.path_bytes, ("",))[0] != "unchanged"]
    # (without folder_concepts, a stopped ingest's pending join still runs, over every path)
    concepts_now = folder_concepts or join_concepts
    if concepts_now and (read or vanished or join_concepts):
        # kohya users manage concepts by folder: an image moved out of its `10_sks dog` folder leaves the concept it
        # joined by that folder's name (a concept given by hand stays), and can join the one of the folder it is in
        moved = None if join_concepts else read + vanished
        left = images_out_of_their_concept_folders(con, paths=moved, progress=progress)
        summary.images_left_concepts = len(left)
        # an image that left one concept folder may have a copy in another (`5_ohwx cat/brick_copy.jpg`, unread
        # because unchanged): that folder's name is read too, or the image trained in no concept for good
        left_paths = [row[0] for row in con.execute(
            "SELECT path_bytes FROM paths WHERE NOT missing AND image_id IN (SELECT unnest(?))", [left]).fetchall()] if left else []
    else:
        left_paths = []
    if concepts_now and (read or join_concepts or left_paths):
        # kohya-style folder names ("10_sks dog") of the files read now become concepts, as sd-scripts reads
        # them (not of files read before: a concept removed since stays removed); after a stopped run, of all of
        # them. Then the stored --where / --folder rules of concepts take the new images they match
        read_now = None if join_concepts else read + [bytes(path) for path in left_paths]
        summary.images_joined_concepts = concepts_from_folder_names(con, paths=read_now, progress=progress)
        # of the images read now (an image taken out of a concept by hand, read before, stays out)
        read_ids = None if join_concepts else [outcome[path][1] for path in read] + left
        summary.images_joined_concepts += concept_rules_applied(con, ids=read_ids)
    # a concept's --folder moved or renamed: new images put in it (at its new place) joined no concept, unsaid
    for name, folder in con.execute(
        "SELECT c.name, c.folder FROM concepts c WHERE c.folder IS NOT NULL AND NOT EXISTS "
        "(SELECT 1 FROM paths p WHERE NOT p.missing AND starts_with(p.path, c.folder || ?)) ORDER BY c.name", [os.sep]
    ).fetchall():
        if not os.path.isdir(folder) and _under(os.fsencode(folder), roots):
            progress(task="concepts", message=(
                f"Note: concept {name!r} takes the images of {folder}, which is gone: images added where it went join no "
                f"concept. If it moved, `workbench concept add {shlex.quote(name)} --folder NEW_PLACE` points it there."))
    if read or join_concepts:  # files added under a folder excluded by hand (`exclude --folder`) stay out, as the
        # folder's others; after a stopped run (which may have written them and stopped before this), over all paths
        summary.excluded_by_folder = excluded_folder_rules_applied(con, paths=None if join_concepts else read)
    _say_what_went_unread(con, summary, progress)
    # a monitor alerting on `errors` went quiet after the first run, which recorded them: this count stays
    summary.errors_in_catalog = con.execute("SELECT count(*) FROM images WHERE status = 'error'").fetchall()[0][0]
    run.counts.update(summary.as_dict())


def _say_what_went_unread(con, summary: IngestSummary, progress: ProgressHook) -> None:
    """Folders the walk could not read, and sidecar captions gone since the last ingest: said through `progress`, so
    the TUI's log shows them as the CLI does."""
    if summary.unreadable_folders:
        progress(task="ingest", message=(
            f"Note: {len(summary.unreadable_folders)} folder(s) could not be read: {named_few(summary.unreadable_folders)}. "
            "Their images were not checked, and those the catalog has stay as they were (not marked missing). Make them "
            "readable (or mount the share) and ingest again."))
    if summary.sidecar_captions_removed:
        rows = con.execute("SELECT path, caption IS NULL FROM images_view WHERE image_id IN (SELECT unnest(?::VARCHAR[])) "
                           "ORDER BY path", [sorted(summary.sidecar_captions_removed)]).fetchall()
        bare = sum(1 for _, uncaptioned in rows if uncaptioned)
        progress(task="ingest", message=(
            f"Note: {len(rows)} image(s) lost their sidecar caption (the file emptied or deleted since the last ingest): "
            f"{named_few([row[0] for row in rows])}. "
            + (f"{bare} of them have no caption now: `workbench caption` gives them one." if bare else
               "They train with another caption they have.")))


def _image_ids_of(con: duckdb.DuckDBPyConnection, paths: list[bytes]) -> list[str]:
    """The images at these known paths (one query, however many paths)."""
    if not paths:
        return []
    con.register("ingest_paths", pl.DataFrame({"path_bytes": paths}, schema={"path_bytes": pl.Binary}))
    try:
        return [row[0] for row in con.execute(
            "SELECT DISTINCT image_id FROM paths WHERE path_bytes IN (SELECT path_bytes FROM ingest_paths) ORDER BY 1"
        ).fetchall()]
    finally:
        con.unregister("ingest_paths")


def _mark_seen(con: duckdb.DuckDBPyConnection, paths: list[bytes]) -> None:
    """paths.last_seen of every known path the walk found, read or not (one statement)."""
    if not paths:
        return
    con.register("ingest_seen", pl.DataFrame({"path_bytes": paths}, schema={"path_bytes": pl.Binary}))
    try:
        with transaction(con):
            con.execute("UPDATE paths SET last_seen = now() FROM ingest_seen s WHERE paths.path_bytes = s.path_bytes")
    finally:
        con.unregister("ingest_seen")


def _returned_ungrouped(con: duckdb.DuckDBPyConnection, image_ids: list[str]) -> list[str]:
    """Of these images, those missing at every path (until this run) and in no duplicate group: a dedup run while
    they were gone grouped their copies without them, so they are as new to dedup as a new file."""
    return [row[0] for row in con.execute(
        "SELECT image_id FROM unnest(?::VARCHAR[]) t(image_id) WHERE image_id NOT IN (SELECT image_id FROM duplicates) "
        "AND NOT EXISTS (SELECT 1 FROM paths p WHERE p.image_id = t.image_id AND NOT p.missing)",
        [image_ids],
    ).fetchall()]


def _missing_everywhere(con: duckdb.DuckDBPyConnection, image_ids: list[str]) -> int:
    """How many of these images are now missing at every path they were found at."""
    return con.execute(
        "SELECT count(*) FROM unnest(?::VARCHAR[]) t(image_id) "
        "WHERE NOT EXISTS (SELECT 1 FROM paths p WHERE p.image_id = t.image_id AND NOT p.missing)",
        [image_ids],
    ).fetchall()[0][0]


def _grouped_now_missing(con: duckdb.DuckDBPyConnection, image_ids: list[str]) -> tuple[int, int]:
    """(members of duplicate groups, kept copies among them) of these images now missing at every path: a kept
    copy gone leaves its picture with no copy in the dataset until dedup runs again."""
    return con.execute(
        "SELECT count(*), count(*) FILTER (WHERE d.is_keeper) FROM duplicates d "
        "WHERE d.image_id IN (SELECT unnest(?::VARCHAR[])) "
        "AND NOT EXISTS (SELECT 1 FROM paths p WHERE p.image_id = d.image_id AND NOT p.missing)",
        [image_ids],
    ).fetchall()[0]


def _read_all(con, to_read: list[FileEntry], *, workers: int, max_pixels: int, summary: IngestSummary, role: str,
              progress: ProgressHook, ctrl_c: _CtrlC, sidecars: dict[bytes, tuple[str, bytes, str | None]],
              plan: dict[bytes, str], expect: dict[bytes, str], known: dict[bytes, tuple],
              outcome: dict[bytes, tuple[str, str, str]], sidecar_only: list[FileEntry]) -> None:
    """Read `to_read` and record it, in batches. `plan` says what the walk took each file for; a file whose bytes
    are still its `expect`ed image turns out unchanged (or reappeared, when it was missing): only its size, time and
    presence are recorded, and its sidecar joins `sidecar_only`. `outcome` gets what each file turned out to be."""
    total = len(to_read)
    progress(task="ingest", completed=0, total=total)
    if not total:
        return
    entries = {e.path_bytes: e for e in to_read}
    reasons: Counter[str] = Counter()
    pending: list[dict] = []
    pending_read: Counter[str] = Counter()  # of `pending`, by what each turned out to be
    done = 0
    flushed_at = time.monotonic()

    def flush() -> None:
        nonlocal flushed_at
        flushed_at = time.monotonic()
        _write_batch(con, pending, role)
        summary.read_by_kind.update(pending_read)
        # "recorded" is of the files the walk counted to read: not those that turned out unchanged
        summary.recorded += len(pending) - pending_read["unchanged"]
        pending.clear()
        pending_read.clear()

    def same_bytes(entry: FileEntry, result: dict) -> str:
        """A file read again whose bytes are the image recorded at its path: what it is, with its path row."""
        previous = known[entry.path_bytes]
        kind = "reappeared" if previous[3] else "unchanged"
        planned = plan[entry.path_bytes]
        if kind != planned:
            setattr(summary, planned, getattr(summary, planned) - 1)
            setattr(summary, kind, getattr(summary, kind) + 1)
        # its sidecar, as for an unchanged file: read again when it changed, or when the file was missing (a copy's
        # sidecar may give the image its caption meanwhile). Until then its old time stays, so a stop here leaves
        # it to the next run
        if previous[3] or previous[2] != entry.sidecar_mtime_ns:
            sidecar_only.append(entry)
        result.update(path=display_path(entry.path_bytes), path_bytes=entry.path_bytes, size=entry.size,
                      mtime_ns=entry.mtime_ns, sidecar_mtime_ns=None if previous[3] else previous[2],
                      caption=None, sidecar_unread=False)
        return kind

    def collect(results: list[dict], chunk: list[bytes]) -> None:
        nonlocal done
        for path_bytes, result in zip(chunk, results):
            entry = entries[path_bytes]
            if result["status"] == "same":
                kind = same_bytes(entry, result)
                outcome[path_bytes] = (kind, result["image_id"], "same")
                pending_read[kind] += 1
                pending.append(result)
                continue
            outcome[path_bytes] = (plan[path_bytes], result["image_id"], result["status"])
            pending_read[plan[path_bytes]] += 1
            if result["status"] == "error":
                summary.errors += 1
                if plan[path_bytes] in ("new", "changed"):
                    summary.new_or_changed_errors += 1
                reasons[result["error"].split(":")[0]] += 1
                summary.error_examples.setdefault(result["error"].split(":")[0], display_path(path_bytes))
                if result["error"].startswith(HEIF_ERROR):
                    summary.heic_avif_paths.append(display_path(path_bytes))
            if result["status"] == "ok" and (result.get("n_frames") or 1) > 1:
                summary.animated.append(display_path(path_bytes))
            caption = problem = None
            if entry.sidecar and result["status"] == "ok":
                caption, problem = _read_sidecar(entry.sidecar, summary)
                if not problem:
                    sidecars[path_bytes] = (result["image_id"], entry.sidecar, caption)
            if caption:
                summary.sidecar_image_ids.add(result["image_id"])
                summary.sidecar_captions = len(summary.sidecar_image_ids)  # images, not files: copies share one
            if problem:
                progress(task="ingest", completed=done, total=total, message=_sidecar_left_out(entry.sidecar, problem, summary))
            result.update(
                path=display_path(path_bytes),
                path_bytes=path_bytes,
                size=entry.size,
                mtime_ns=entry.mtime_ns,
                # no mtime for an unread sidecar: the next ingest reads it again (and reports it until it is fixed)
                sidecar_mtime_ns=None if problem else entry.sidecar_mtime_ns,
                caption=caption,
                sidecar_unread=problem is not None,
            )
            pending.append(result)
        done += len(chunk)
        ctrl_c.check()
        if len(pending) >= BATCH or (pending and time.monotonic() - flushed_at >= FLUSH_SECONDS):
            flush()
        progress(task="ingest", completed=done, total=total)

    chunks = list(_chunks([e.path_bytes for e in to_read], CHUNK))
    try:
        if workers <= 1:
            for chunk in chunks:
                results = []
                for path_bytes in chunk:
                    ctrl_c.check()
                    results.append(read_image_file(path_bytes, max_pixels, expect=expect.get(path_bytes)))
                collect(results, chunk)
        else:
            _read_in_pool(chunks, workers=workers, max_pixels=max_pixels, expect=expect, collect=collect, ctrl_c=ctrl_c)
    except (KeyboardInterrupt, StepCancelled):
        # keep what was read before the stop: one short transaction
        flush()
        raise
    flush()
    summary.errors_by_reason = dict(reasons.most_common())


def _read_in_pool(chunks: list[list[bytes]], *, workers: int, max_pixels: int, expect: dict[bytes, str],
                  collect: Callable[[list[dict], list[bytes]], None], ctrl_c: _CtrlC) -> None:
    """Read chunks in worker processes, in order; any stop (Ctrl+C, a cancel, an error) ends the workers at once."""
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_worker_init, initargs=(os.getpid(),))
    try:
        futures = [pool.submit(_read_chunk, chunk, max_pixels, {p: expect[p] for p in chunk if p in expect})
                   for chunk in chunks]
        for chunk, future in zip(chunks, futures):
            # in short slices, to notice Ctrl+C while a chunk of large images is read
            while not wait([future], timeout=0.25).done:
                ctrl_c.check()
            try:
                results = future.result()
            except BrokenProcessPool:
                # a SIGTERM sent to the whole process group (`timeout`, a service manager) ends the workers too: the
                # pool breaks as the signal reaches this process, which then stops as it would for Ctrl+C
                for _ in range(10):
                    ctrl_c.check()
                    time.sleep(0.02)
                raise
            collect(results, chunk)
    except BaseException:
        _stop_workers(pool)
        raise
    pool.shutdown()


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _worker_init(parent_pid: int) -> None:
    """Worker initializer. Ctrl+C signals the terminal's whole process group, and only the parent should act on it
    (a worker interrupted while waiting for work prints a traceback of its own), so workers ignore SIGINT. SIGTERM
    ends a worker at once, as by default: the parent's handler (forked with it: the CLI's makes SIGTERM a Ctrl+C)
    would make the parent's stop (`terminate()`) a KeyboardInterrupt and a traceback in a worker.

    And workers die with their parent: killed (SIGKILL, an out-of-memory kill, a crash) it cannot stop them, and
    they would wait on their queue forever. On Linux the kernel sends them SIGKILL when it goes (PR_SET_PDEATHSIG);
    elsewhere nothing changes.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    # the parent may have died before the prctl call: then no signal comes (its pid is gone, or not our parent)
    if os.getppid() != parent_pid:
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(1)
        except OSError:
            pass


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """End the workers mid-chunk and drop the queued chunks: they only read files, so there is nothing to undo,
    and waiting for their chunks (up to CHUNK large images each) would make Ctrl+C slow."""
    # ProcessPoolExecutor has no public way to stop running workers before Python 3.14 (terminate_workers).
    # No join: the pool's own thread reaps them; a KeyboardInterrupt between a waitpid here and its bookkeeping
    # would leave that thread waiting forever for a child that is gone.
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def _refresh_sidecars(con, entries: list[FileEntry], summary: IngestSummary, progress: ProgressHook, ctrl_c: _CtrlC,
                      *, sidecars: dict[bytes, tuple[str, bytes, str | None]], recheck: set[str]) -> None:
    """Re-read caption sidecars that changed beside unchanged images."""
    for done, entry in enumerate(entries, 1):
        ctrl_c.check()
        image_id = con.execute("SELECT image_id FROM paths WHERE path_bytes = ?", [entry.path_bytes]).fetchall()[0][0]
        caption, problem = _read_sidecar(entry.sidecar, summary) if entry.sidecar else (None, None)
        message = _sidecar_left_out(entry.sidecar, problem, summary) if problem else None
        progress(task="sidecars", completed=done, total=len(entries), message=message)
        if problem:
            continue  # the caption read before stays; its old mtime makes the next ingest try again
        if entry.sidecar:
            sidecars[entry.path_bytes] = (image_id, entry.sidecar, caption)
        if not caption:
            recheck.add(image_id)  # a copy elsewhere may still have a sidecar that gives the image its caption
        with transaction(con):
            _store_sidecar(con, image_id, caption, entry, summary)


def _store_sidecar(con, image_id: str, caption: str | None, entry: FileEntry, summary: IngestSummary) -> None:
    if caption:
        stored = con.execute(  # a file touched but saying what it said is read again: its row stays as it was
            "INSERT INTO captions (image_id, source, text) VALUES (?, 'sidecar', ?) "
            "ON CONFLICT (image_id, source) DO UPDATE SET text = excluded.text, created_at = now() "
            "WHERE captions.text <> excluded.text",
            [image_id, caption],
        ).fetchall()[0][0]
        if stored:
            summary.sidecar_texts_changed.add(image_id)
        summary.sidecar_image_ids.add(image_id)
        summary.sidecar_captions_removed.discard(image_id)
    else:
        if con.execute("DELETE FROM captions WHERE image_id = ? AND source = 'sidecar'", [image_id]).fetchall()[0][0]:
            summary.sidecar_captions_removed.add(image_id)  # its file emptied or deleted: said, the image is uncaptioned
        summary.sidecar_image_ids.discard(image_id)
    summary.sidecar_captions = len(summary.sidecar_image_ids)
    con.execute("UPDATE paths SET sidecar_mtime_ns = ? WHERE path_bytes = ?", [entry.sidecar_mtime_ns, entry.path_bytes])


def _settle_shared_sidecars(con, summary: IngestSummary, sidecars: dict[bytes, tuple[str, bytes, str | None]],
                            recheck: set[str]) -> None:
    """One content at several paths has one sidecar caption: that of its first path (in sorted order) whose sidecar
    holds text, whichever was read last or in which run. Copies whose sidecars disagree are listed in the summary.

    Looks at the images whose sidecars this run read, and at `recheck` (their caption may have come from a file
    gone or emptied since); of the first, only those with more than one present path with a sidecar.
    """
    touched = {image_id for image_id, _, _ in sidecars.values()}
    if not touched and not recheck:
        return
    ids = sorted(touched | recheck)
    con.register("ingest_touched", pl.DataFrame({"image_id": ids, "recheck": [i in recheck for i in ids]},
                                                schema={"image_id": pl.String, "recheck": pl.Boolean}))
    try:
        rows = con.execute(
            "SELECT p.image_id, list(p.path_bytes ORDER BY p.path_bytes) FROM paths p JOIN ingest_touched t USING (image_id) "
            "WHERE NOT p.missing AND p.sidecar_mtime_ns IS NOT NULL GROUP BY p.image_id HAVING count(*) > 1 OR bool_or(t.recheck)"
        ).fetchall()
    finally:
        con.unregister("ingest_touched")
    for image_id, paths in rows:
        read = []  # (sidecar, caption) of each path whose sidecar reads, in path order
        for path in map(bytes, paths):
            if path in sidecars:
                read.append(sidecars[path][1:])
                continue
            sidecar = sidecar_beside(path)
            caption, problem = _read_sidecar(sidecar) if sidecar else (None, "gone")
            if not problem:  # an unreadable one is named when its own folder is ingested
                read.append((sidecar, caption))
        with_text = [(sidecar, caption) for sidecar, caption in read if caption]
        if with_text:
            first, caption = with_text[0]
            changed = con.execute(
                "INSERT INTO captions (image_id, source, text) VALUES (?, 'sidecar', ?) ON CONFLICT (image_id, source) "
                "DO UPDATE SET text = excluded.text, created_at = now() WHERE captions.text <> excluded.text",
                [image_id, caption],
            ).fetchall()[0][0]
            if changed or image_id in touched:
                summary.sidecar_image_ids.add(image_id)
            if changed:
                summary.sidecar_texts_changed.add(image_id)
            summary.sidecar_captions_removed.discard(image_id)  # another copy's sidecar gives it its caption
            others = [display_path(sidecar) for sidecar, text in with_text[1:] if text != caption]
            if others:
                summary.sidecar_conflicts[display_path(first)] = others
        elif len(read) == len(paths):  # every sidecar read, all empty: as for an image with one path
            if con.execute("DELETE FROM captions WHERE image_id = ? AND source = 'sidecar'", [image_id]).fetchall()[0][0]:
                summary.sidecar_captions_removed.add(image_id)
            summary.sidecar_image_ids.discard(image_id)
    summary.sidecar_captions = len(summary.sidecar_image_ids)
