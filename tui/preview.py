"""An image preview: textual-image (Kitty/Sixel where the terminal supports it, half-cell blocks otherwise)."""

from __future__ import annotations

import logging
import os

from PIL import Image as PILImage
from PIL import ImageOps
from textual.app import ComposeResult
from textual.containers import Container
from textual.widgets import Static

from pipelines.ingest import DEFAULT_MAX_PIXELS
from workbench.images import as_rgb, open_image

# textual-image asks the terminal for its cell size at import (that must happen before the app starts);
# a terminal that does not answer gets default sizes, which needs no traceback on the screen.
logging.getLogger("textual_image").addHandler(logging.NullHandler())
try:
    from textual_image.widget import HalfcellImage
    from textual_image.widget import Image as AutoImage
except Exception:  # e.g. a pseudo-terminal that reports 0×0 cells: draw half cells through a Static instead
    HalfcellImage = AutoImage = None

PREVIEW_ENV = "WORKBENCH_TUI_IMAGES"  # auto (default), halfcell, or off


def preview_kind() -> str:
    kind = os.environ.get(PREVIEW_ENV, "auto").lower()
    return kind if kind in {"auto", "halfcell", "off"} else "auto"


def load_preview(path: str | None, max_side: int = 384) -> PILImage.Image | str:
    """Decode an image for the preview (in a worker thread): a small RGB copy, or why it cannot be shown."""
    if not path:
        return "no file"
    try:
        with open_image(path) as image:  # reads the header only: the size is known before any decoding
            if image.width * image.height > DEFAULT_MAX_PIXELS:  # a decompression bomb (ingest refused it), or a
                # scan taken with a raised --max-pixels: decoding it whole would take gigabytes for a thumbnail
                return (f"{image.width}×{image.height} is over {DEFAULT_MAX_PIXELS / 1e6:.0f} megapixels: "
                        "not decoded for a preview")
            image.draft("RGB", (max_side, max_side))
            # upright, 16-bit scaled and transparency on white: as the catalog measured it and training sees it
            small = as_rgb(ImageOps.exif_transpose(image))
            small.thumbnail((max_side, max_side))
            return small
    except FileNotFoundError:
        return f"file not found: {path}"
    except Exception as error:  # any decoder error is shown, not raised
        return f"cannot show {os.path.basename(path)}: {error.__class__.__name__}"


class ImagePreview(Container):
    """Shows one decoded image, or a short note when there is none."""

    DEFAULT_CSS = """
    ImagePreview { height: 16; border: round $primary-darken-2; }
    ImagePreview > .preview-image { width: auto; height: 100%; }
    ImagePreview > Static { color: $text-muted; content-align: center middle; height: 100%; }
    """

    def compose(self) -> ComposeResult:
        yield Static("no image", classes="preview-note")

    def show(self, picture: PILImage.Image | str | None) -> None:
        """Replace what is shown with a picture or a note."""
        self.remove_children()
        if isinstance(picture, PILImage.Image) and preview_kind() != "off":
            widget_class = HalfcellImage if preview_kind() == "halfcell" else AutoImage
            if widget_class is None:
                from textual_image.renderable.halfcell import Image as HalfcellRenderable

                self.mount(Static(HalfcellRenderable(picture, width="auto"), classes="preview-image"))
            else:
                self.mount(widget_class(picture, classes="preview-image"))
        else:
            note = picture if isinstance(picture, str) else "no image"
            if isinstance(picture, PILImage.Image):
                note = f"{picture.width}×{picture.height} preview off"
            self.mount(Static(note, classes="preview-note"))
