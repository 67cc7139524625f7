"""Messages workers post to screens (workers never touch widgets; screens render what arrives)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.message import Message


@dataclass
class CatalogChanged(Message):
    """Something wrote to the catalog; screens reload their data when next shown."""

    what: str = ""


@dataclass
class WorkFailed(Message):
    """A worker hit an error meant for people (shown as a notification, never a traceback)."""

    title: str
    error: str


@dataclass
class StepProgress(Message):
    """A progress hook call from a running step, forwarded from its worker thread."""

    step: str
    task: str
    completed: int = 0
    total: int | None = None
    message: str | None = None


@dataclass
class StepFinished(Message):
    """A pipeline step ended: status is 'ok', 'failed' or 'cancelled'; summary holds its counts."""

    step: str
    status: str
    summary: Any = None
    error: str | None = None
    seconds: float = 0.0


@dataclass
class ImagePicked(Message):
    """The cursor moved onto an image row."""

    image_id: str
