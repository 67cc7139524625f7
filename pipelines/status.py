"""Where each step of the pipeline stands on a catalog, and the command for what is left (`workbench status`).

Not a step: it only reads what the steps wrote, as `git status` reads a repository.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from pipelines.filter import unfiltered_images
from workbench.catalog import first_row, last_run


@dataclass(frozen=True)
class StepState:
    """One step: what it has done (`done`), and what is left with the command that does it (`todo`, or None)."""

    step: str
    done: str
    todo: str | None = None


def _new_since(con: duckdb.DuckDBPyConnection, started, where: str) -> int:
    """Images of `where` (a condition on images_view v) that came in after `started`."""
    return con.execute(f"SELECT count(*) FROM images_view v JOIN images i USING (image_id) WHERE {where} "
                       "AND i.first_seen > ?", [started]).fetchone()[0]


def pipeline_status(con: duckdb.DuckDBPyConnection) -> list[StepState]:
    """Where each step stands: what it has done, and what is left (new images it has not seen, images without a
    caption, a score or a bucket), with the command that does it."""
    states = []
    total, ok, errors, missing, priors = con.execute(
        "SELECT count(*) FILTER (role = 'instance'), count(*) FILTER (role = 'instance' AND status = 'ok'), "
        "count(*) FILTER (role = 'instance' AND status = 'error'), "
        "count(*) FILTER (role = 'instance' AND status = 'missing'), count(*) FILTER (role = 'class_prior') "
        "FROM images_view").fetchone()
    if not total:
        return [StepState("ingest", "no images yet", "workbench ingest FOLDER")]
    states.append(StepState(
        "ingest", f"{total:,} image(s): {ok:,} readable, {errors:,} unreadable, {missing:,} with no file left",
        f"{missing:,} image(s) have no file at any known path: ingest the folder they moved to (they are found there "
        "by content)" if missing else None))

    usable = "v.role = 'instance' AND v.status = 'ok'"
    dedup = last_run(con, "dedup")
    if dedup is None:
        states.append(StepState("dedup", "not run", "workbench dedup"))
    else:
        groups, copies = con.execute("SELECT count(DISTINCT group_id), count(*) FILTER (NOT is_keeper) FROM duplicates").fetchone()
        fresh = _new_since(con, dedup[0], usable)
        states.append(StepState("dedup", f"{groups:,} group(s), {copies:,} copies excluded",
                                f"{fresh:,} image(s) came in since the last dedup: workbench dedup" if fresh else None))

    dataset = "v.role = 'instance' AND v.status = 'ok' AND NOT v.excluded"
    size, captioned = con.execute(f"SELECT count(*), count(caption) FROM images_view v WHERE {dataset}").fetchone()
    sources = con.execute(
        f"SELECT CASE WHEN starts_with(caption_source, 'model:') THEN 'model' ELSE caption_source END, count(*) "
        f"FROM images_view v WHERE {dataset} AND caption IS NOT NULL GROUP BY 1 ORDER BY 2 DESC, 1").fetchall()
    states.append(StepState(
        "caption", f"{captioned:,} of {size:,} dataset image(s) captioned"
        + (f" ({', '.join(f'{source} {n:,}' for source, n in sources)})" if sources else ""),
        f"{size - captioned:,} without a caption: workbench caption" if size > captioned else None))

    scored, unscored = con.execute(
        f"SELECT count(clip_score), count(*) FILTER (clip_score IS NULL) FROM images_view v "
        f"WHERE {dataset} AND caption IS NOT NULL").fetchone()
    score = last_run(con, "score")
    states.append(StepState(
        "score", f"{scored:,} captioned dataset image(s) have a CLIP score of their current caption" if score else "not run",
        (f"{unscored:,} captioned image(s) have none (new, or their caption changed): workbench score" if score
         else "workbench score") if unscored else None))

    filtered = last_run(con, "filter")
    if filtered is None:
        states.append(StepState("filter", "not run", "workbench filter --dry-run  (then without --dry-run)"))
    else:
        out = con.execute("SELECT count(DISTINCT image_id) FROM exclusions WHERE starts_with(step, 'filter:')").fetchone()[0]
        fresh = unfiltered_images(con)
        states.append(StepState("filter", f"{out:,} image(s) excluded by its rules",
                                f"{fresh:,} dataset image(s) came in since the last filter run, unjudged by its rules: "
                                "workbench filter (with that run's rules)" if fresh else None))

    resolutions = con.execute(
        "SELECT resolution_width, resolution_height, count(*) FROM aspect_buckets GROUP BY ALL ORDER BY 3 DESC").fetchall()
    unbucketed = con.execute(f"SELECT count(*) FROM images_view v WHERE {dataset} AND bucket_width IS NULL").fetchone()[0]
    if not resolutions:
        states.append(StepState("buckets", "not run", "workbench buckets --resolution 512"))
    else:
        width, height, _ = resolutions[0]
        size_text = f"{width}" if width == height else f"{width},{height}"
        buckets = con.execute("SELECT count(DISTINCT (bucket_width, bucket_height)) FROM aspect_buckets "
                              "WHERE resolution_width = ? AND resolution_height = ?", [width, height]).fetchone()[0]
        states.append(StepState("buckets", f"{buckets:,} bucket(s) at {size_text} px",
                                f"{unbucketed:,} dataset image(s) have no bucket: workbench buckets --resolution {size_text}"
                                if unbucketed else None))

    concepts, in_concepts = con.execute(
        f"SELECT (SELECT count(*) FROM concepts), count(concept) FROM images_view v WHERE {dataset}").fetchone()
    states.append(StepState("concepts", f"{concepts:,} concept(s); {in_concepts:,} of {size:,} dataset image(s) in one",
                            None if concepts else "for DreamBooth or a trigger word: workbench concept add NAME --trigger "
                            "WORD --folder DIR"))

    prompts = con.execute("SELECT count(DISTINCT class_prompt) FROM class_priors").fetchone()[0]
    states.append(StepState("priors", f"{priors:,} class image(s) for {prompts:,} class prompt(s)"))

    runs = con.execute("SELECT count(*) FROM training_runs").fetchone()[0]
    last = first_row(con.execute("SELECT train_id, mode, status, steps, output_dir FROM training_runs "
                                 "ORDER BY train_id DESC LIMIT 1"))
    states.append(StepState(
        "train", f"{runs:,} run(s)" + (f"; the last, run {last[0]}: {last[1]}, {last[2]}, {last[3] or 0:,} step(s), "
                                         f"in {last[4]}" if last else ""),
        None if runs else "workbench train lora --show-batches 3  (then without it)"))
    return states
