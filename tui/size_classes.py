"""Screens that lay out for small terminals: CSS classes from the terminal size."""

from __future__ import annotations

from textual import events

NARROW_WIDTH = 120  # below this a screen lays out for a small terminal (80x24 is a common default)
SHORT_HEIGHT = 36


class SizeClasses:
    """Mixin for a Screen: sets `-narrow` and `-short` from its size, for its .tcss to use."""

    def on_resize(self, event: events.Resize) -> None:
        self.set_class(event.size.width < NARROW_WIDTH, "-narrow")
        self.set_class(event.size.height < SHORT_HEIGHT, "-short")
