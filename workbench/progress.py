"""One small progress hook: steps report through it, the CLI renders with rich, the TUI with messages."""

from __future__ import annotations

import re
import threading
import time
from typing import Protocol


class StepCancelled(Exception):
    """Raised inside a step when the user asked it to stop; the step leaves the catalog consistent."""


class ProgressHook(Protocol):
    """What a step calls as it works. All arguments are keyword-only.

    `completed`/`total` count items of `task` (total None = unknown); `message` is a log line.
    A hook may raise StepCancelled to stop the step at the next item.
    """

    def __call__(self, *, task: str, completed: int = 0, total: int | None = None, message: str | None = None) -> None: ...


def null_progress(*, task: str, completed: int = 0, total: int | None = None, message: str | None = None) -> None:
    """A hook that ignores everything."""


class CancellableProgress:
    """Wraps a hook with a cancel flag another thread can set (used by the TUI's Cancel button)."""

    def __init__(self, hook: ProgressHook) -> None:
        self._hook = hook
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __call__(self, *, task: str, completed: int = 0, total: int | None = None, message: str | None = None) -> None:
        # what was done is shown before the stop: a step that ends as it is cancelled was done (and is kept)
        self._hook(task=task, completed=completed, total=total, message=message)
        if self._cancel.is_set():
            raise StepCancelled(f"{task} cancelled")


class RichProgress:
    """Renders hook calls as rich progress bars (one per task) and log lines; use as a context manager.

    Where stderr is not a terminal (a log file, CI), bars cannot redraw: each task is a plain line when it starts,
    every `log_every` seconds and when it completes, so a long step shows it is alive."""

    def __init__(self, *, console=None, transient: bool = False, log_every: float = 30.0) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        # log_path: no `progress.py:77` (where the line was logged from) at the end of every message
        self.console = console or Console(stderr=True, emoji=False, log_path=False)
        self._plain = not self.console.is_terminal
        self._log_every = log_every
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=transient,
            disable=self._plain,
        )
        self._tasks: dict[str, int] = {}
        self._logged: dict[str, tuple[float, int]] = {}  # plain lines: task -> (when, completed) of its last line

    def __enter__(self) -> "RichProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def __call__(self, *, task: str, completed: int = 0, total: int | None = None, message: str | None = None) -> None:
        if message:
            from rich.text import Text

            if self._plain:  # one line each, not padded to a width nor cut at one: a log file reads it whole
                self.console.print(Text(f"{time.strftime('%H:%M:%S')} {printable(message)}"), soft_wrap=True)
            else:
                self._progress.console.log(Text(printable(message)))  # a step's message is plain text: paths may hold '[', captions ':x:'
            if not completed and total is None:  # a message alone: no bar that never moves, no reset of a running one
                return
        if self._plain:
            self._log_line(task, completed, total)
            return
        if task not in self._tasks:
            self._tasks[task] = self._progress.add_task(task, total=total)
        self._progress.update(self._tasks[task], completed=completed, total=total)

    def _log_line(self, task: str, completed: int, total: int | None) -> None:
        from rich.text import Text

        now = time.monotonic()
        last = self._logged.get(task)
        finished = total is not None and completed >= total
        if last is not None and (last[1] == completed or (now - last[0] < self._log_every and not finished)):
            return
        self._logged[task] = (now, completed)
        self.console.print(Text(f"{time.strftime('%H:%M:%S')} {printable(task)}: {completed:,}"
                                + (f"/{total:,}" if total is not None else "")), soft_wrap=True)


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def printable(text: str, *, keep: str = "\t\n") -> str:
    """Text as a terminal may show it: control characters (ESC in a file name would restyle or retitle the
    terminal), but those in `keep`, written as escapes (\\x1b, \\r); line breaks and tabs kept unless `keep` says."""
    def shown(match: re.Match) -> str:
        char = match.group()
        return char if char in keep else _NAMED.get(char, f"\\x{ord(char):02x}")

    return _CONTROL.sub(shown, text)


def named_few(names: list[str], limit: int = 3) -> str:
    """The first `limit` names, then how many more: for messages about many files."""
    shown = ", ".join(printable(name) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
