"""Synthetic catalogs for the TUI's tests and benchmark: rows inserted straight with SQL."""

from __future__ import annotations

from pathlib import Path

import duckdb


def synthetic_rows(con: duckdb.DuckDBPyConnection, n: int, *, folder: str = "/synthetic", duplicate_every: int = 50) -> None:
    """Insert `n` fake images (with paths, hashes, captions and some duplicate groups) into a migrated catalog.

    Every `duplicate_every`-th image forms a two-member duplicate group with its successor,
    so the duplicates screen and exclusions have data. No files are written.
    """
    con.execute(
        """
        INSERT INTO images (image_id, bytes, width, height, format, mode, n_frames, status, role,
                            brightness, contrast, blur, entropy, is_grayscale)
        SELECT sha256(i::VARCHAR), 10000 + (i * 7919) % 500000,
               256 + (i * 37) % 1793, 256 + (i * 53) % 1537,
               CASE i % 3 WHEN 0 THEN 'JPEG' WHEN 1 THEN 'PNG' ELSE 'WEBP' END, 'RGB', 1,
               CASE WHEN i % 997 = 5 THEN 'error' ELSE 'ok' END, 'instance',
               (i * 13) % 255, (i * 7) % 80, (i * 31) % 900, 4 + (i % 40) / 10.0, i % 17 = 0
        FROM range(?) t(i)
        """,
        [n],
    )
    con.execute(
        """
        INSERT INTO paths (path, path_bytes, image_id, size, mtime_ns, seq)
        SELECT ? || '/img_' || lpad(i::VARCHAR, 6, '0') || '.jpg',
               encode(? || '/img_' || lpad(i::VARCHAR, 6, '0') || '.jpg'),
               sha256(i::VARCHAR), 10000 + (i * 7919) % 500000, 0, i
        FROM range(?) t(i)
        """,
        [folder, folder, n],
    )
    con.execute(
        "INSERT INTO hashes SELECT sha256(i::VARCHAR), hash(i)::UBIGINT, hash(i + 1)::UBIGINT, hash(i + 2)::UBIGINT FROM range(?) t(i)",
        [n],
    )
    words = ["a photo of a dog", "a cat on a sofa", "a red car", "a mountain lake", "a bowl of fruit"]
    con.execute(
        """
        INSERT INTO captions (image_id, source, text)
        SELECT sha256(i::VARCHAR), 'model:blip', (?)[1 + i % 5] || ' number ' || i FROM range(?) t(i)
        """,
        [words, n],
    )
    con.execute(
        """
        INSERT INTO captions (image_id, source, text)
        SELECT sha256(i::VARCHAR), 'sidecar', 'sidecar caption ' || i FROM range(?) t(i) WHERE i % 4 = 0
        """,
        [n],
    )
    # Two-member duplicate groups: i (kept) and i+1 (excluded).
    con.execute(
        """
        INSERT INTO duplicates
        SELECT sha256(j::VARCHAR), g, sha256(g::VARCHAR), j = g, 'phash', CASE WHEN j = g THEN 0 ELSE 3 END,
               CASE WHEN j = g THEN 'largest' END
        FROM (SELECT i AS g FROM range(?) t(i) WHERE i % ? = 0 AND i + 1 < ?) groups,
             LATERAL (SELECT unnest([g, g + 1]) AS j)
        """,
        [n, duplicate_every, n],
    )
    con.execute(
        """
        INSERT INTO exclusions (image_id, step, reason)
        SELECT image_id, 'dedup', 'near duplicate of ' || keeper_id[:12] FROM duplicates WHERE NOT is_keeper
        """
    )


def synthetic_catalog(path: str | Path, n: int) -> Path:
    """Create (or replace) a catalog file at `path` holding `n` synthetic images."""
    from workbench.catalog import connect

    path = Path(path)
    for leftover in (path, path.with_name(path.name + ".wal")):
        leftover.unlink(missing_ok=True)
    con = connect(path)
    synthetic_rows(con, n)
    con.execute("CHECKPOINT")
    con.close()
    return path
