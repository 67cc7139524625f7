"""Text rules the steps share: whether a caption holds a trigger, the text of a concept image without a caption, and
the commands that notes suggest (SQL and shell quoting)."""

from __future__ import annotations

import re
import shlex
import unicodedata


def caption_has_trigger(caption: str, trigger: str) -> bool:
    """Whether `trigger` is in `caption` as a whole word (a multi-word trigger: as whole consecutive words).

    As kohya's comma/space separated tags: trigger `cat` is in "a cat, grass", "cat" and "cat's toy", not in
    "cathedral" or "bobcat". Case and spacing do not count (CLIP's tokenizer lowercases): "SKS dog" has `sks`.
    The export's missing-trigger count and training's trigger prepending both use this one test.
    """
    words = unicodedata.normalize("NFC", trigger).lower().split()
    if not words:
        return True  # no trigger: nothing missing
    pattern = r"\s+".join(re.escape(word) for word in words)
    # NFC on both sides: "Bär" from a macOS folder name is decomposed, the one typed in a caption composed
    return re.search(rf"(?<!\w){pattern}(?!\w)", unicodedata.normalize("NFC", caption).lower()) is not None


def concept_caption(trigger: str | None, class_noun: str | None) -> str | None:
    """The text an image of a concept trains on without a caption: "trigger class" (kohya's class_tokens, DreamBooth's
    "sks dog"), the trigger alone for a concept without a class; None outside a concept (it trains on "")."""
    if not trigger:
        return None
    return f"{trigger} {class_noun}" if class_noun else trigger


def sql_text(value: str) -> str:
    """`value` as an SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def shell_text(value: str) -> str:
    """`value` as one shell word, in double quotes where that needs no escapes (SQL's own quotes read better)."""
    return f'"{value}"' if not set(value) & set('"$`\\!') else shlex.quote(value)


def add_token_command(trigger: str, concept: str) -> str:
    """The command that puts a concept's trigger in front of its images' captions (moved there where they hold it)."""
    return f"workbench edit-captions --add-token {shlex.quote(trigger)} --where {shell_text(f'concept = {sql_text(concept)}')}"
