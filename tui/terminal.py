"""Keep native libraries' stderr writes (Rust/C++ progress bars, warnings) from scribbling over the UI."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def native_stderr_to(log_path: Path) -> Iterator[None]:
    """While the app runs, Textual draws on a duplicate of the terminal's fd and fd 2 goes to `log_path`.

    Python-level writes to sys.stderr are captured by Textual already; this catches writes made
    straight to file descriptor 2 by compiled code (e.g. a tokenizers training progress bar).
    Does nothing when stderr is not a terminal.
    """
    if not os.isatty(2):
        yield
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    terminal_fd = os.dup(2)
    terminal = os.fdopen(terminal_fd, "w", encoding=sys.__stderr__.encoding or "utf-8", errors="replace")
    original = sys.__stderr__
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 2)
        sys.__stderr__ = terminal  # Textual's Linux driver draws on sys.__stderr__
        try:
            yield
        finally:
            sys.__stderr__ = original
            terminal.flush()
            os.dup2(terminal_fd, 2)
            terminal.close()
