"""Captioning: BLIP captions for every usable image, stored beside sidecar and manual captions.

Captions live side by side in `captions(image_id, source, text)`: `sidecar` (a .txt/.caption file found at
ingest), `manual` (typed in the TUI), and `model:<name>` (written here, one source per captioning model).
Which one an image trains with is the *current caption* (`current_captions` view, `images_view.caption`):

1. the source the user chose for that image (`caption_choice`, set by `workbench caption --use-source`),
2. else `manual`, 3. else `sidecar`, 4. else the newest `model:*` caption.

Captioning is resumable: images that already have a caption from the same model source are skipped unless
`overwrite`, and each batch is committed as it finishes, so a cancelled run keeps what it wrote.
"""

from __future__ import annotations

import io
import json
import os
import re
import string
import warnings
from typing import Any, Callable, Iterable, Sequence

import duckdb
import torch

from workbench.catalog import record_run, transaction
from workbench.images import openable_paths, path_text
from workbench.progress import ProgressHook, named_few, null_progress
from workbench.text import add_token_command, caption_has_trigger

MODEL_SOURCE_PREFIX = "model:"
TEMPLATE_FIELDS = {"caption", "trigger", "class"}


def model_source(model_name: str) -> str:
    """The caption source a model writes under: 'model:<name>'."""
    return MODEL_SOURCE_PREFIX + model_name


# --- reading images ---------------------------------------------------------------------


def open_rgb(path_bytes: bytes):
    """Open an image file as an upright 8-bit RGB PIL image (EXIF orientation applied, alpha on white)."""
    from PIL import ImageOps

    from workbench.images import as_rgb, open_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open(path_bytes, "rb") as handle:
            image = open_image(io.BytesIO(handle.read()))
        return as_rgb(ImageOps.exif_transpose(image))


class ImageFileDataset(torch.utils.data.Dataset):
    """(row index, transformed tensor or None) for image files; decoding runs in DataLoader workers."""

    def __init__(self, paths: Sequence[bytes], transform: Callable[[Any], torch.Tensor]) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return index, self.transform(open_rgb(self.paths[index]))
        except Exception:  # vanished or now-unreadable file: reported by the step, never fatal
            return index, None


def collate_images(items: list[tuple[int, torch.Tensor | None]]):
    """Stack the readable images of a batch; also return the indices that could not be read."""
    good = [(i, t) for i, t in items if t is not None]
    failed = [i for i, t in items if t is None]
    if not good:
        return [], None, failed
    return [i for i, _ in good], torch.stack([t for _, t in good]), failed


UNREADABLE_NAMED = 20  # files named one by one; more are only counted


def report_unreadable(progress: ProgressHook, task: str, paths: Sequence[bytes], reported_before: int) -> None:
    """Name files that could not be read this time (the first UNREADABLE_NAMED of a run; then one line)."""
    for n, path in enumerate(paths, start=reported_before + 1):
        if n <= UNREADABLE_NAMED:
            progress(task=task, message=f"could not read {path_text(path)}: skipped (if it changed, `workbench ingest` reads it again; if not, `workbench exclude` leaves it out)")
        elif n == UNREADABLE_NAMED + 1:
            progress(task=task, message="more files could not be read: the summary counts them all")


def image_loader(paths: Sequence[bytes], transform, *, batch_size: int, workers: int | None) -> torch.utils.data.DataLoader:
    """A DataLoader decoding `paths` with `transform` in `workers` processes (None: up to 4, 0: in-process)."""
    if workers is None:
        workers = min(4, os.cpu_count() or 1) if len(paths) > batch_size else 0
    return torch.utils.data.DataLoader(
        ImageFileDataset(paths, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_images,
        persistent_workers=False,
    )


def usable_images(con: duckdb.DuckDBPyConnection, *, where: str = "TRUE") -> list[tuple[str, bytes]]:
    """(image_id, path_bytes of its first present path) of every image whose status is ok, in path order."""
    return con.execute(
        f"""
        SELECT v.image_id, arg_min(p.path_bytes, p.seq) AS path_bytes
        FROM images_view v JOIN paths p ON p.image_id = v.image_id AND NOT p.missing
        WHERE v.status = 'ok' AND ({where})
        GROUP BY v.image_id
        ORDER BY min(p.seq)
        """
    ).fetchall()


def files_as_ingested(con: duckdb.DuckDBPyConnection, todo: list[tuple[str, bytes]], progress: ProgressHook,
                      task: str) -> tuple[list[tuple[str, bytes]], int]:
    """The images of `todo` at a file that still holds what ingest read (another copy's, if the first changed), and
    how many have none. A file edited or replaced since holds other pixels: what a model says of them would be
    stored under the old image (and kept, since that image counts as done), as training and export refuse to."""
    files = openable_paths(con, [image_id for image_id, _ in todo])
    gone = [path_text(path) for image_id, path in todo if image_id not in files]
    if gone:
        progress(task=task, message=(f"{len(gone)} image(s) left out: their files changed or went away since ingest "
                                     f"({named_few(gone)}); `workbench ingest` on their folders reads them again"))
    return [(image_id, os.fsencode(files[image_id])) for image_id, _ in todo if image_id in files], len(gone)


# --- templates --------------------------------------------------------------------------


def check_template(template: str | None) -> None:
    """Raise ValueError for a template with unknown or malformed {fields}."""
    if template is None:
        return
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise ValueError(f"Bad caption template {template!r}: {error} (write literal braces as {{{{ and }}}})") from None
    unknown = fields - TEMPLATE_FIELDS
    if unknown:
        raise ValueError(
            f"Unknown field(s) {', '.join('{' + f + '}' for f in sorted(unknown))} in caption template; "
            "use {caption}, {trigger} and {class}."
        )
    if "caption" not in fields:
        raise ValueError("The caption template needs a {caption} field, e.g. \"photo of {trigger} dog, {caption}\".")


def apply_template(template: str | None, caption: str, *, trigger: str | None, class_noun: str | None) -> str:
    """Fill a template; a missing trigger/class leaves no doubled spaces or stray commas behind."""
    if template is None:
        return caption
    text = template.format_map({"caption": caption, "trigger": trigger or "", "class": class_noun or ""})
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:])", r"\1", text)
    return text.strip(" ,")


def _concept_fields(con: duckdb.DuckDBPyConnection) -> dict[str, tuple[str | None, str | None, str | None]]:
    """image_id → (trigger, class noun, concept) from the concepts tables when they exist (m003), else empty."""
    tables = {row[0] for row in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    if not {"concepts", "concept_images"} <= tables:
        return {}
    rows = con.execute(
        "SELECT ci.image_id, c.trigger_token, c.class_noun, c.name FROM concept_images ci JOIN concepts c ON c.name = ci.concept"
    ).fetchall()
    return {image_id: (trigger, class_noun, concept) for image_id, trigger, class_noun, concept in rows}


def _unfinished_since(con: duckdb.DuckDBPyConnection, run_id: int, params: dict):
    """When the caption runs just before `run_id` are stopped runs of the same command, when the first of them
    started (what they wrote since is done); else None."""
    since = None
    for started_at, status, recorded in con.execute(
        "SELECT started_at, status, params FROM runs WHERE step = 'caption' AND run_id < ? ORDER BY run_id DESC", [run_id]
    ).fetchall():
        if status == "ok" or _same_command(json.loads(recorded or "{}")) != _same_command(params):
            break
        since = started_at
    return since


def _same_command(params: dict) -> dict:
    """What makes two caption runs the same command for a resume: all but the batch size, which changes only how
    many images go through at once (lowered after running out of memory, the usual reason to run it again)."""
    return {key: value for key, value in params.items() if key != "batch_size"}


# --- the step -------------------------------------------------------------------------


def _caption_candidates(con: duckdb.DuckDBPyConnection, chosen: set[str] | None, duplicates: bool,
                        own_captioned: bool) -> tuple[list[tuple[str, str]], int, int]:
    """(image id, path) of the images a caption run takes (before those captioned already), and how many copies
    dedup excluded and images with a caption of their own it leaves out."""
    candidates = usable_images(con, where="v.role = 'instance'")  # a class prior's caption is its prompt
    if chosen is not None:
        candidates = [(image_id, path) for image_id, path in candidates if image_id in chosen]
    copies = set() if duplicates else {row[0] for row in con.execute(
        "SELECT image_id FROM exclusions WHERE step = 'dedup'").fetchall()}
    skipped_copies = sum(image_id in copies for image_id, _ in candidates)
    candidates = [(image_id, path) for image_id, path in candidates if image_id not in copies]
    own = set() if own_captioned else {row[0] for row in con.execute(
        "SELECT image_id FROM current_captions WHERE caption_source IN ('sidecar', 'manual', 'duplicate')").fetchall()}
    skipped_own = sum(image_id in own for image_id, _ in candidates)
    return [(image_id, path) for image_id, path in candidates if image_id not in own], skipped_copies, skipped_own


def same_name_note(con: duckdb.DuckDBPyConnection, model_name: str, model_path: str | None, overwrite: bool) -> str | None:
    """A local model named like the one whose captions the catalog holds, from another folder: said, not silently
    taken for it."""
    if not model_path:
        return None
    before = [json.loads(row[0] or "{}").get("model_path") for row in con.execute(
        "SELECT params FROM runs WHERE step = 'caption' AND json_extract_string(params, '$.model') = ? "
        "ORDER BY run_id DESC LIMIT 1", [model_name]).fetchall()]
    if not before or not before[0] or before[0] == model_path:
        return None
    return (f"Note: the catalog's {model_source(model_name)} captions came from {before[0]}; this model is {model_path}, of "
            f"the same name: {'every image is captioned again' if overwrite else 'the images those captioned are skipped as already captioned (--overwrite captions them again with this one)'}")


def images_to_caption(con: duckdb.DuckDBPyConnection, model_name: str, *, where: str | None = None,
                      duplicates: bool = False, own_captioned: bool = False) -> int:
    """How many images a `model_captions` run without `overwrite` would caption: none means the model need not load."""
    from pipelines.concepts import images_where

    chosen = set(images_where(con, where)) if where is not None else None
    candidates, _, _ = _caption_candidates(con, chosen, duplicates, own_captioned)
    done = {row[0] for row in con.execute("SELECT image_id FROM captions WHERE source = ?", [model_source(model_name)]).fetchall()}
    return sum(image_id not in done for image_id, _ in candidates)


def model_captions(
    con: duckdb.DuckDBPyConnection,
    processor,
    model,
    *,
    model_name: str,
    batch_size: int = 8,
    max_length: int = 30,
    num_beams: int = 1,
    prompt: str | None = None,
    template: str | None = None,
    overwrite: bool = False,
    device: torch.device | str | None = None,
    workers: int | None = None,
    duplicates: bool = False,
    own_captioned: bool = False,
    model_path: str | None = None,
    where: str | None = None,
    progress: ProgressHook = null_progress,
) -> dict[str, int]:
    """Caption every image with status ok using BLIP, stored as source 'model:<model_name>'; resumable.

    `model_path`, the folder a local model was loaded from, is recorded with the run: a model of the same name from
    another folder is then said, not silently taken for the one whose captions the catalog holds. `where` (an SQL
    condition on images_view) captions only the images it matches.

    Copies dedup excluded are left out unless `duplicates`: they do not train, and a set with many copies would spend
    hours of a real BLIP on them (a copy kept later is captioned by the next run). Images whose current caption is
    their own (a sidecar file, one typed by hand, or one a kept copy carries from the copy dedup excluded) are left
    out unless `own_captioned`: they train with theirs."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if max_length < 2:
        raise ValueError("max_length must be at least 2 tokens")
    if num_beams < 1:
        raise ValueError("num_beams must be at least 1")
    longest = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", None)
    if isinstance(longest, int) and max_length > longest:  # else an IndexError deep in generate()
        raise ValueError(f"max_length {max_length} is more than this model's text decoder takes ({longest} tokens): "
                         f"give --max-length {longest} or less")
    check_template(template)
    source = model_source(model_name)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    params = {"model": model_name, "batch_size": batch_size, "max_length": max_length, "num_beams": num_beams,
              "prompt": prompt, "template": template, "overwrite": overwrite, "duplicates": duplicates,
              "own_captioned": own_captioned, **({"model_path": model_path} if model_path else {}),
              **({"where": where} if where is not None else {})}
    chosen = None
    if where is not None:
        from pipelines.concepts import images_where

        chosen = set(images_where(con, where))  # ValueError for a bad condition, before anything is recorded
    note = same_name_note(con, model_name, model_path, overwrite)
    if note:
        progress(task="caption", message=note)
    with record_run(con, "caption", params) as run:
        candidates, skipped_copies, skipped_own = _caption_candidates(con, chosen, duplicates, own_captioned)
        if overwrite:  # again for every image, except those a stopped run of this same command already did
            since = _unfinished_since(con, run.run_id, params)
            done = set() if since is None else {row[0] for row in con.execute(
                "SELECT image_id FROM captions WHERE source = ? AND created_at >= ?", [source, since]).fetchall()}
        else:
            done = {row[0] for row in con.execute("SELECT image_id FROM captions WHERE source = ?", [source]).fetchall()}
        todo = [(image_id, path) for image_id, path in candidates if image_id not in done]
        already = len(candidates) - len(todo)
        todo, changed = files_as_ingested(con, todo, progress, "caption")
        concept_of = _concept_fields(con)
        triggerless: dict[str, str] = {}  # concept -> its trigger, of the images captioned without it
        counts = {"images_ok": len(candidates), "already_captioned": already,
                  "captioned": 0, "unreadable": 0, "changed_since_ingest": changed,
                  "duplicates_skipped": skipped_copies, "own_captions_kept": skipped_own}
        # with {trigger} in the template: the images in no concept with one, whose {trigger} is left empty; without it:
        # concept images captioned without their trigger, which training puts in front (a review read "without
        # trigger 0" beside 42 such captions)
        trigger_count = "without_trigger" if template and "{trigger}" in template else "concept_images_captioned_without_their_trigger"
        counts[trigger_count] = 0
        run.counts.update(counts)
        progress(task="caption", completed=0, total=len(todo))
        if todo:
            prompt_ids = None
            if prompt:
                prompt_ids = processor.tokenizer([prompt], return_tensors="pt").to(device)
            loader = image_loader([path for _, path in todo], _blip_transform(processor),
                                  batch_size=batch_size, workers=workers)
            finished = 0
            with torch.inference_mode():
                for indices, pixels, failed in loader:
                    report_unreadable(progress, "caption", [todo[i][1] for i in failed], counts["unreadable"])
                    counts["unreadable"] += len(failed)
                    rows = []
                    if indices:
                        inputs = {"pixel_values": pixels.to(device, dtype=dtype)}
                        if prompt_ids is not None:
                            inputs["input_ids"] = prompt_ids["input_ids"].repeat(len(indices), 1)
                            inputs["attention_mask"] = prompt_ids["attention_mask"].repeat(len(indices), 1)
                        tokens = model.generate(**inputs, max_length=max_length, num_beams=num_beams)
                        texts = processor.batch_decode(tokens, skip_special_tokens=True)
                        for index, text in zip(indices, texts):
                            image_id = todo[index][0]
                            trigger, class_noun, concept = concept_of.get(image_id, (None, None, None))
                            caption = apply_template(template, " ".join(text.split()),
                                                     trigger=trigger, class_noun=class_noun)
                            if trigger_count == "without_trigger" and not trigger:
                                counts["without_trigger"] += 1
                            elif trigger_count != "without_trigger" and trigger and not caption_has_trigger(caption, trigger):
                                counts[trigger_count] += 1
                                triggerless[concept] = trigger
                            rows.append((image_id, source, caption))
                    _store_captions(con, rows)
                    counts["captioned"] += len(rows)
                    finished += len(indices) + len(failed)
                    run.counts.update(counts)
                    progress(task="caption", completed=finished, total=len(todo))
        run.counts.update(counts)
    if triggerless:  # the command that puts each concept's trigger in its captions, for the note that counts them
        counts["add_token_commands"] = [add_token_command(trigger, concept) for concept, trigger in sorted(triggerless.items())]
    return counts


def _blip_transform(processor) -> Callable:
    """Image → pixel tensor with the processor's own resize/normalise (picklable for worker processes)."""
    return _ImageProcessorTransform(processor.image_processor)


class _ImageProcessorTransform:
    def __init__(self, image_processor) -> None:
        self.image_processor = image_processor

    def __call__(self, image) -> torch.Tensor:
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


def _store_captions(con: duckdb.DuckDBPyConnection, rows: list[tuple[str, str, str]]) -> None:
    if not rows:
        return
    with transaction(con):
        con.executemany(
            """
            INSERT INTO captions (image_id, source, text, created_at) VALUES (?, ?, ?, current_timestamp)
            ON CONFLICT (image_id, source) DO UPDATE SET text = excluded.text, created_at = excluded.created_at
            """,
            rows,
        )


# --- choosing which caption an image uses --------------------------------------------------


def caption_sources(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Every caption source with how many images have a caption from it."""
    return dict(con.execute("SELECT source, count(*) FROM caption_candidates GROUP BY source ORDER BY source").fetchall())


def chosen_caption_source(
    con: duckdb.DuckDBPyConnection, source: str | None, *, image_ids: Iterable[str] | None = None
) -> dict[str, int]:
    """Make `source` the current caption of every image (or of `image_ids`) that has one; None restores the rule."""
    try:
        with transaction(con):
            con.execute("CREATE OR REPLACE TEMP TABLE chosen_ids (image_id VARCHAR)")
            if image_ids is not None:
                con.executemany("INSERT INTO chosen_ids VALUES (?)", [(i,) for i in image_ids])
            else:
                con.execute("INSERT INTO chosen_ids SELECT image_id FROM images")
            if source is None:
                cleared = con.execute(
                    "DELETE FROM caption_choice WHERE image_id IN (SELECT image_id FROM chosen_ids)"
                ).fetchall()[0][0]
                return {"choices_cleared": int(cleared)}
            if not con.execute("SELECT count(*) FROM caption_candidates WHERE source = ?", [source]).fetchall()[0][0]:
                known = ", ".join(caption_sources(con)) or "none yet"
                raise ValueError(f"No caption has source {source!r} (sources: {known}).")
            chosen = con.execute(
                """
                INSERT INTO caption_choice (image_id, source)
                SELECT c.image_id, c.source FROM caption_candidates c
                WHERE c.source = ? AND c.image_id IN (SELECT image_id FROM chosen_ids)
                ON CONFLICT (image_id) DO UPDATE SET source = excluded.source
                """,
                [source],
            ).fetchall()[0][0]
            without = con.execute(  # of the readable images: a file that failed to load has no caption of any source
                "SELECT count(*) FROM chosen_ids JOIN images USING (image_id) WHERE images.status = 'ok' "
                "AND image_id NOT IN (SELECT image_id FROM caption_candidates WHERE source = ?)",
                [source],
            ).fetchall()[0][0]
    finally:
        con.execute("DROP TABLE IF EXISTS chosen_ids")
    return {"images_using_source": int(chosen), "images_without_that_source": int(without)}
