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
