"""Opening image files the catalog has accepted."""

from __future__ import annotations

import os


def open_image(path: str | bytes | os.PathLike):
    """A PIL image of a file the catalog holds as readable.

    Ingest applies the pixel cap (`--max-pixels`, raised by the user for a large scan or panorama) before it
    decodes anything; PIL's own, lower default would refuse those images again in every later step (caption,
    training, evaluation, export) as "decompression bombs". So that default is lifted here, as ingest lifts it.
    """
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    return Image.open(path)


def as_ingested(info: os.stat_result, size: int | None, mtime_ns: int | None) -> bool:
    """Whether a file (its `os.stat`) still holds what ingest read: the size and mtime ingest recorded. A file
    edited or replaced since holds other pixels, which its caption and bucket do not describe. Rows from before
    sizes were recorded (None) count as unchanged."""
    return size is None or (info.st_size, info.st_mtime_ns) == (size, mtime_ns)
