"""Glue between worker threads and the UI: a progress hook that posts messages, and safe error text."""

from __future__ import annotations

import time
import traceback
from typing import Callable

from textual.message import Message

from tui.messages import StepProgress
from workbench.progress import CancellableProgress


class MessageProgress:
    """A progress hook that posts StepProgress messages, at most ~20 per second per task (logs always)."""

    def __init__(self, post: Callable[[Message], object], step: str, min_interval: float = 0.05) -> None:
        self._post = post
        self._step = step
        self._min_interval = min_interval
        self._last: dict[str, float] = {}

    def __call__(self, *, task: str, completed: int = 0, total: int | None = None, message: str | None = None) -> None:
        now = time.monotonic()
        finished = total is not None and completed >= total
        if message is None and not finished and now - self._last.get(task, 0.0) < self._min_interval:
            return
        self._last[task] = now
        self._post(StepProgress(step=self._step, task=task, completed=completed, total=total, message=message))


def cancellable_progress(post: Callable[[Message], object], step: str) -> CancellableProgress:
    """The hook a step started from the TUI gets: posts progress, raises StepCancelled after cancel()."""
    return CancellableProgress(MessageProgress(post, step))


def people_message(error: BaseException) -> str:
    """Short text for an error: our own errors as they are, anything else with its type and last frame."""
    ours = error.__class__.__module__.split(".")[0] in ("workbench", "pipelines", "tui")  # CatalogError, TrainingError, …
    if ours or isinstance(error, (ValueError, FileNotFoundError, ImportError)):
        return str(error) or error.__class__.__name__
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""
    return f"{error.__class__.__name__}: {error}{where}"


def toggle_message(outcome: dict, image_id: str, *, keep_hint: str) -> tuple[str, str]:
    """(text, severity) for what `pipelines.filter.toggled_exclusion` did; `keep_hint` says how to keep a duplicate."""
    short, still = image_id[:12], outcome["still_excluded_by"]
    if outcome["action"] == "excluded":
        text = f"excluded {short}"
        if outcome["was_keeper"]:
            text += "; its copies stay excluded as duplicates (keep one of them instead to bring the picture back)"
        return text, "information"
    if outcome["action"] == "unchanged":
        if "dedup" in still:
            return f"{short} is excluded as a duplicate of the kept image: {keep_hint}.", "warning"
        return f"{short} is excluded by {', '.join(still)}; x only lifts manual and filter exclusions.", "warning"
    if "dedup" in still:
        return f"lifted the manual or filter exclusion of {short}; it stays excluded as a duplicate: {keep_hint}", "warning"
    if still:
        return f"lifted the manual or filter exclusion of {short}; it stays excluded by {', '.join(still)}", "warning"
    if outcome.get("unreadable"):
        return f"lifted the exclusion of {short}, but its file could not be read, so it stays out of the dataset: {outcome['unreadable']}", "warning"
    return f"included {short}", "information"
