"""CLIP: image embeddings in the catalog, CLIP scores of images against their captions, near-duplicates by
embedding, and text search.

Scale of `clip_score`: the cosine similarity of the L2-normalised open_clip image and text embeddings, in
[-1, 1] (torchmetrics' CLIPScore reports 100 x max(cosine, 0) instead). Typical values for a matching pair
with ViT-B/32 are 0.25-0.35; LAION-2B kept pairs with ViT-B/32 cosine >= 0.28, DataComp used > 0.25. Values
are only comparable between images scored by the same CLIP model (`clip_scores.model`). The `tiny` preset's
random weights make its scores meaningless (every code path runs, nothing else).

Embeddings are stored in `clip_embeddings(image_id, model, dim, embedding FLOAT[])`, usable from SQL:

    SELECT v.path, array_cosine_similarity(e.embedding::FLOAT[512], ?::FLOAT[512]) AS similarity
    FROM clip_embeddings e JOIN images_view v USING (image_id)
    WHERE e.model = 'ViT-B-32/laion2b_s34b_b79k' ORDER BY similarity DESC LIMIT 20

and, on a connection where `register_text_embedding_function` ran (the `workbench search` command, or your
own Python), with a text query written in SQL:

    ... ORDER BY array_cosine_similarity(e.embedding::FLOAT[512], clip_text_embedding('a red car')) DESC
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable

import duckdb
import numpy as np
import polars as pl
import torch

from pipelines.caption import files_as_ingested, image_loader, report_unreadable, usable_images
from workbench.catalog import record_run, transaction
from workbench.progress import ProgressHook, null_progress

# Cosine similarity at or above which two images count as the same picture. 0.95 is deliberately strict:
# CLIP embeddings are invariant to what near-duplicates differ by (resizing, re-encoding, small crops,
# colour tweaks), which keeps such copies close to 1, while distinct photos of one subject (a burst, the
# same dog in two poses) share most of their semantics and commonly land around 0.85-0.93 with ViT-B/32.
# A lower threshold starts merging those, which dedup should not do silently. Tune it per model with
# `workbench sql` over `duplicate_pairs` (method 'embedding', distance = cosine) before lowering it.
DEFAULT_EMBEDDING_THRESHOLD = 0.95
SEARCH_FUNCTION = "clip_text_embedding"


def caption_md5(text: str) -> str:
    """md5 hex of a caption, as DuckDB's md5() computes it (the views compare them)."""
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def _normalised(vectors: torch.Tensor) -> np.ndarray:
    vectors = vectors.float()
    return (vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu().numpy().astype(np.float32)


def encode_texts(clip_bundle, texts: list[str], *, device=None, batch_size: int = 256) -> np.ndarray:
    """L2-normalised text embeddings (float32, one row per text)."""
    model = clip_bundle.model
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rows = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            tokens = clip_bundle.tokenizer(texts[start : start + batch_size]).to(device)
            rows.append(_normalised(model.encode_text(tokens)))
    return np.concatenate(rows) if rows else np.zeros((0, clip_bundle.embed_dim), np.float32)


# --- embeddings ------------------------------------------------------------------------


def image_embeddings(
    con: duckdb.DuckDBPyConnection,
    clip_bundle,
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: ProgressHook = null_progress,
) -> dict[str, int]:
    """Store the CLIP image embedding of every image with status ok that this model has not embedded yet."""
    model = clip_bundle.model
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    candidates = usable_images(con)
    done = set() if overwrite else {
        r[0] for r in con.execute("SELECT image_id FROM clip_embeddings WHERE model = ?", [clip_bundle.name]).fetchall()
    }
    todo = [(image_id, path) for image_id, path in candidates if image_id not in done]
    already = len(candidates) - len(todo)
    todo, changed = files_as_ingested(con, todo, progress, "embed images")
    counts = {"images_ok": len(candidates), "already_embedded": already, "embedded": 0, "unreadable": 0,
              "changed_since_ingest": changed}
    progress(task="embed images", completed=0, total=len(todo))
    if not todo:
        return counts
    loader = image_loader([p for _, p in todo], clip_bundle.preprocess, batch_size=batch_size, workers=workers)
    finished = 0
    with torch.inference_mode():
        for indices, pixels, failed in loader:
            report_unreadable(progress, "embed images", [todo[i][1] for i in failed], counts["unreadable"])
            counts["unreadable"] += len(failed)
            if indices:
                vectors = _normalised(model.encode_image(pixels.to(device, dtype=dtype)))
                frame = pl.DataFrame(
                    {"image_id": [todo[i][0] for i in indices], "embedding": list(vectors)},
                    schema={"image_id": pl.String, "embedding": pl.List(pl.Float32)},
                )
                _store_embeddings(con, clip_bundle.name, clip_bundle.embed_dim, frame)
                counts["embedded"] += len(indices)
            finished += len(indices) + len(failed)
            progress(task="embed images", completed=finished, total=len(todo))
    return counts


def _store_embeddings(con: duckdb.DuckDBPyConnection, model: str, dim: int, frame: pl.DataFrame) -> None:
    con.register("new_embeddings", frame)
    try:
        with transaction(con):
            con.execute(
                """
                INSERT INTO clip_embeddings (image_id, model, dim, embedding, created_at)
                SELECT image_id, ?, ?, embedding, current_timestamp FROM new_embeddings
                ON CONFLICT (image_id, model) DO UPDATE
                SET dim = excluded.dim, embedding = excluded.embedding, created_at = excluded.created_at
                """,
                [model, dim],
            )
    finally:
        con.unregister("new_embeddings")


def _embedding_matrix(con: duckdb.DuckDBPyConnection, model: str, where: str = "TRUE") -> tuple[list[str], np.ndarray]:
    rows = con.execute(
        f"""
        SELECT e.image_id, e.embedding FROM clip_embeddings e JOIN images i USING (image_id)
        WHERE e.model = ? AND ({where}) ORDER BY e.image_id
        """,
        [model],
    ).fetchall()
    if not rows:
        return [], np.zeros((0, 0), np.float32)
    return [r[0] for r in rows], np.asarray([r[1] for r in rows], dtype=np.float32)


# --- CLIP scores -------------------------------------------------------------------------


def clip_scores(
    con: duckdb.DuckDBPyConnection,
    clip_bundle,
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    workers: int | None = None,
    progress: ProgressHook = null_progress,
) -> dict[str, int]:
    """CLIP score (cosine, -1..1) of every captioned ok image against its current caption; rescored when it changes."""
    if batch_size < 1:  # before the run is recorded: a run on nothing recorded it `ok`, and a form brought it back
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    params = {"model": clip_bundle.name, "batch_size": batch_size}
    with record_run(con, "score", params) as run:
        counts = image_embeddings(con, clip_bundle, batch_size=batch_size, device=device, workers=workers,
                                  progress=progress)
        rows = con.execute(
            """
            SELECT v.image_id, v.caption, v.caption_source
            FROM images_view v
            JOIN clip_embeddings e ON e.image_id = v.image_id AND e.model = ?
            LEFT JOIN clip_scores s ON s.image_id = v.image_id AND s.model = e.model
            WHERE v.status = 'ok' AND v.caption IS NOT NULL
              AND (s.caption_md5 IS NULL OR s.caption_md5 <> md5(v.caption))
            ORDER BY v.image_id
            """,
            [clip_bundle.name],
        ).fetchall()
        captioned = con.execute(
            "SELECT count(*) FROM images_view WHERE status = 'ok' AND caption IS NOT NULL"
        ).fetchall()[0][0]
        counts.update(scored=0, score_up_to_date=captioned - len(rows),
                      without_caption=counts["images_ok"] - captioned)
        progress(task="clip score", completed=0, total=len(rows))
        step = max(batch_size, 256)
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            ids = [r[0] for r in chunk]
            texts = encode_texts(clip_bundle, [r[1] for r in chunk], device=device, batch_size=step)
            stored = dict(zip(*_embedding_rows(con, clip_bundle.name, ids)))
            images = np.stack([stored[i] for i in ids])
            scores = (images * texts).sum(axis=1)
            frame = pl.DataFrame(
                {
                    "image_id": ids,
                    "caption_md5": [caption_md5(r[1]) for r in chunk],
                    "caption_source": [r[2] for r in chunk],
                    "score": scores.astype(np.float64),
                }
            )
            _store_scores(con, clip_bundle.name, frame)
            counts["scored"] += len(chunk)
            progress(task="clip score", completed=start + len(chunk), total=len(rows))
        run.counts.update(counts)
    return counts


def _embedding_rows(con: duckdb.DuckDBPyConnection, model: str, ids: list[str]) -> tuple[list[str], list[np.ndarray]]:
    rows = con.execute(
        "SELECT image_id, embedding FROM clip_embeddings WHERE model = ? AND list_contains(?, image_id)",
        [model, ids],
    ).fetchall()
    return [r[0] for r in rows], [np.asarray(r[1], dtype=np.float32) for r in rows]


def _store_scores(con: duckdb.DuckDBPyConnection, model: str, frame: pl.DataFrame) -> None:
    con.register("new_scores", frame)
    try:
        with transaction(con):
            con.execute(
                """
                INSERT INTO clip_scores (image_id, model, caption_md5, caption_source, score, created_at)
                SELECT image_id, ?, caption_md5, caption_source, score, current_timestamp FROM new_scores
                ON CONFLICT (image_id, model) DO UPDATE SET caption_md5 = excluded.caption_md5,
                    caption_source = excluded.caption_source, score = excluded.score, created_at = excluded.created_at
                """,
                [model],
            )
    finally:
        con.unregister("new_scores")


# --- near-duplicates by embedding ------------------------------------------------------------


def embedding_models(con: duckdb.DuckDBPyConnection) -> list[str]:
    """CLIP models with stored embeddings, most recently used first."""
    return [r[0] for r in con.execute(
        "SELECT model FROM clip_embeddings GROUP BY model ORDER BY max(created_at) DESC, model"
    ).fetchall()]


def similar_pairs(ids: list[str], vectors: np.ndarray, threshold: float, *, chunk: int | None = None,
                  progress: ProgressHook = null_progress) -> pl.DataFrame:
    """Every pair (image_a < image_b) with cosine similarity >= threshold; O(N·chunk) memory, O(N²) time."""
    found_a, found_b, found_s = [], [], []
    n = len(ids)
    if chunk is None:  # rows per block so one block of similarities stays near 32M floats (128 MB)
        chunk = int(min(4096, max(16, 32_000_000 // max(n, 1))))
    for start in range(0, n, chunk):
        block = vectors[start : start + chunk] @ vectors[start:].T  # only pairs (i, j) with j >= i
        rows, cols = np.nonzero(block >= threshold)
        cols = cols + start
        rows = rows + start
        keep = cols > rows
        found_a.append(rows[keep])
        found_b.append(cols[keep])
        found_s.append(block[rows[keep] - start, cols[keep] - start])
        progress(task="embedding near-duplicates", completed=min(start + chunk, n), total=n)
    if not found_a:
        return pl.DataFrame(schema={"image_a": pl.String, "image_b": pl.String, "distance": pl.Float64})
    a, b, s = np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_s)
    names = np.asarray(ids, dtype=object)
    return pl.DataFrame(
        {"image_a": names[a].tolist(), "image_b": names[b].tolist(), "distance": s.astype(np.float64).tolist()},
        schema={"image_a": pl.String, "image_b": pl.String, "distance": pl.Float64},
    )


def embedding_duplicates(
    con: duckdb.DuckDBPyConnection,
    *,
    threshold: float = DEFAULT_EMBEDDING_THRESHOLD,
    model: str | None = None,
    progress: ProgressHook = null_progress,
) -> dict[str, Any]:
    """Merge images whose CLIP embeddings have cosine >= threshold into the duplicate groups (keep policy applies)."""
    from pipelines.dedup import regroup_duplicates, replace_pairs

    if not 0.0 < threshold <= 1.0:
        raise ValueError("threshold must be a cosine similarity in (0, 1]")
    models = embedding_models(con)
    if model is None:
        if not models:
            raise ValueError("No CLIP embeddings yet: run `workbench score` first.")
        model = models[0]
    elif model not in models:
        raise ValueError(f"No embeddings from CLIP model {model!r} (have: {', '.join(models) or 'none'}).")
    with record_run(con, "dedup:embedding", {"threshold": threshold, "model": model}) as run:
        # Same population as pHash dedup: readable instance images with a file still present.
        ids, vectors = _embedding_matrix(
            con, model,
            "i.status = 'ok' AND i.role = 'instance' AND EXISTS "
            "(SELECT 1 FROM paths p WHERE p.image_id = i.image_id AND NOT p.missing)",
        )
        pairs = similar_pairs(ids, vectors, threshold, progress=progress) if ids else similar_pairs([], np.zeros((0, 1)), threshold)
        replace_pairs(con, "embedding", pairs)
        counts = {"model": model, "images_compared": len(ids), "embedding_pairs": pairs.height,
                  **regroup_duplicates(con)}
        run.counts.update(counts)
    return counts


# --- search --------------------------------------------------------------------------------


def search_images(con: duckdb.DuckDBPyConnection, clip_bundle, text: str, *, limit: int = 20,
                  where: str | None = None) -> list[dict]:
    """Images ranked by cosine similarity of their CLIP embedding to `text` (this model's embeddings only); with
    `where`, only those whose images_view row matches that SQL condition (`NOT excluded`: the dataset's)."""
    from pipelines.concepts import images_where

    if not text.strip():
        raise ValueError("Search text is empty.")
    if limit < 1:
        raise ValueError("limit must be at least 1")
    among = images_where(con, where) if where is not None else None
    query = encode_texts(clip_bundle, [text])[0]
    dim = int(clip_bundle.embed_dim)
    rows = con.execute(
        f"""
        SELECT v.image_id, v.path, v.caption, v.excluded,
               array_cosine_similarity(e.embedding::FLOAT[{dim}], ?::FLOAT[{dim}]) AS similarity
        FROM clip_embeddings e JOIN images_view v USING (image_id)
        WHERE e.model = ? AND v.status = 'ok' AND (?::VARCHAR[] IS NULL OR v.image_id IN (SELECT unnest(?::VARCHAR[])))
        ORDER BY similarity DESC, v.image_id
        LIMIT ?
        """,
        [query.tolist(), clip_bundle.name, among, among, limit],
    ).fetchall()
    return [
        {"image_id": r[0], "path": r[1], "caption": r[2], "excluded": r[3], "similarity": float(r[4])} for r in rows
    ]


def register_text_embedding_function(con: duckdb.DuckDBPyConnection, clip_bundle, name: str = SEARCH_FUNCTION) -> str:
    """Add SQL function `clip_text_embedding(text) -> FLOAT[dim]` (this model's text embedding) to `con`."""
    dim = int(clip_bundle.embed_dim)

    def embed(text: str) -> list[float]:
        return encode_texts(clip_bundle, [text])[0].tolist()

    try:
        con.remove_function(name)
    except (duckdb.InvalidInputException, duckdb.CatalogException):
        pass
    con.create_function(name, embed, [duckdb.sqltype("VARCHAR")], duckdb.array_type(duckdb.sqltype("FLOAT"), dim))
    return name


def scored_models(con: duckdb.DuckDBPyConnection) -> Iterable[tuple[str, int]]:
    """(model, number of scores) for every CLIP model that scored images."""
    return con.execute("SELECT model, count(*) FROM clip_scores GROUP BY model ORDER BY model").fetchall()
