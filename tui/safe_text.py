"""Text from the catalog made safe to draw: paths, captions and SQL results can come from hostile files.

Neither Textual nor Rich drops ESC, so a caption holding an escape sequence would reach the terminal
(retitle it, clear it...). Every widget that shows catalog text passes it through `visible` first.
"""

from __future__ import annotations

from textual.markup import escape

from workbench.progress import printable


def visible(text: str, *, keep: str = "") -> str:
    """`text` with every control character (but those in `keep`) shown as an escape: \\x1b, \\t, ..."""
    return printable(text, keep=keep)


def markup_safe(text: object) -> str:
    """Catalog text for a Label or Static that reads markup: controls shown, '[' escaped."""
    return escape(visible(str(text)))
