"""Tags: the user's own labels on images ("to review", "maybe", "hands wrong"), to mark and find images while curating.

A tag neither excludes an image nor puts it in a concept (FiftyOne's tags, where exclusions and concepts here are
what trains). They are rows of `image_tags`, shown as `images_view.tags`; files on disk are not touched.
"""

from __future__ import annotations

import re
from typing import Iterable

import duckdb

from pipelines.concepts import resolve_image_ids

MAX_TAG_CHARS = 100


def _checked_tag(tag: str) -> str:
    tag = (tag or "").strip()
    if not tag:
        raise ValueError("a tag must not be empty")
    if len(tag) > MAX_TAG_CHARS or re.search(r"[\x00-\x1f\x7f]", tag):
        raise ValueError(f"a tag is one line of at most {MAX_TAG_CHARS} characters")
    return tag


def tagged_images(con: duckdb.DuckDBPyConnection, image_ids: Iterable[str], tag: str) -> dict[str, int]:
    """Give these images (full ids or unique prefixes) the tag; returns how many got it and how many had it."""
    tag = _checked_tag(tag)
    ids = resolve_image_ids(con, image_ids)
    if not ids:
        raise ValueError("give at least one image id")
    had = con.execute("SELECT count(*) FROM image_tags WHERE tag = ? AND image_id IN (SELECT unnest(?::VARCHAR[]))",
                      [tag, ids]).fetchall()[0][0]
    con.execute("INSERT INTO image_tags (image_id, tag) SELECT unnest(?::VARCHAR[]), ? ON CONFLICT DO NOTHING", [ids, tag])
    return {"tagged": len(ids) - had, "had_it_already": had}


def untagged_images(con: duckdb.DuckDBPyConnection, image_ids: Iterable[str] | None, tag: str) -> int:
    """Take the tag off these images (None: off every image that has it); returns how many had it."""
    tag = _checked_tag(tag)
    ids = None if image_ids is None else resolve_image_ids(con, image_ids)
    return con.execute("DELETE FROM image_tags WHERE tag = ? AND (?::VARCHAR[] IS NULL OR image_id IN (SELECT unnest(?::VARCHAR[])))",
                       [tag, ids, ids]).fetchall()[0][0]
