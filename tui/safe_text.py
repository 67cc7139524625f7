"""Text from the catalog made safe to draw: paths, captions and SQL results can come from hostile files.

Neither Textual nor Rich drops ESC, so a caption holding an escape sequence would reach the terminal
(retitle it, clear it...). Every widget that shows catalog text passes it through `visible` first.
"""

from __future__ import annotations

import re

from textual.markup import escape

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def visible(text: str, *, keep: str = "") -> str:
    """`text` with every control character (but those in `keep`) shown as an escape: \\x1b, \\t, ..."""
    def shown(match: re.Match) -> str:
        char = match.group()
        return char if char in keep else _NAMED.get(char, f"\\x{ord(char):02x}")

    return _CONTROL.sub(shown, text)


def markup_safe(text: object) -> str:
    """Catalog text for a Label or Static that reads markup: controls shown, '[' escaped."""
    return escape(visible(str(text)))
