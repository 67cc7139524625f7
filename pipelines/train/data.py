"""Training data: dataset rows from the catalog, kohya-style bucketed batches, and the on-disk caches.

Randomness is decided up front in an epoch *plan* (seeded by seed + epoch): which images go into
which batch, flip, crop offset, colour jitter and the caption variant of every item. Loading an
item is then a pure function of its `ItemSpec`, which is what makes resume exact and lets workers
load in any order.

Caches (under `cache_dir`, safetensors files named by a SHA-256 key):
- latents: key = (content id, VAE fingerprint, bucket, resized size, crop box, flip). The VAE's
  posterior mean and std are stored, and the latent is sampled at train time with the step's own
  generator, so a cached run trains like an uncached one: the same draws, and the same values up to float
  rounding above batch 1 (the cache encodes one image at a time, the uncached step its whole batch; a review
  measured 7e-7 on the tiny model; bitwise at batch 1). Random crop and colour jitter
  change the pixels every time and so BYPASS the latent cache; flip does not (both variants are
  cached).
- text: key = (final caption text, tokenizer + text-encoder fingerprint). Used only while the text
  encoder is frozen; tag shuffling still works (each shuffled caption is its own entry, so it just
  misses more often). Caption dropout uses the cached empty caption.
A changed image (new content id), caption, bucket or model gives a new key: exactly the affected
entries are recomputed, nothing stale is ever read. Entries read or written during a run are also
kept in RAM up to `cache_memory_mb`, so later epochs do not reopen the files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shlex
import unicodedata
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import duckdb
import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file

from pipelines.buckets import default_bucket_settings as buckets_defaults
from workbench.text import add_token_command, caption_has_trigger, concept_caption, sql_text
from pipelines.priors import PRIOR_IN_USE_SQL
from pipelines.train.config import SNAPSHOT_FILE, TrainConfig
from workbench.files import is_disk_full, written_whole
from workbench.images import as_rgb, open_image, openable_paths, sidecars_changed_since_ingest
from workbench.progress import ProgressHook, null_progress


class DataError(ValueError):
    """The dataset cannot be trained on as it is; the message says what to run or change."""


@dataclass(frozen=True)
class TrainImage:
    """One catalog image as the trainer sees it."""

    image_id: str
    path: str
    caption: str
    bucket: tuple[int, int]  # (width, height) in pixels
    resized: tuple[int, int]  # size the image is scaled to before cropping to the bucket
    crop: tuple[int, int]  # (left, top) of the centre crop in the resized image
    concept: str | None = None
    repeats: int = 1
    class_prompt: str | None = None  # dreambooth: the prompt of this image's class priors


@dataclass(frozen=True)
class ItemSpec:
    """Everything random about one training item, decided by the epoch plan."""

    image: int  # index into the image list
    pool: str  # 'instance' or 'prior'
    flip: bool
    crop: tuple[int, int]  # (left, top) in the resized image
    jitter: tuple[float, float, float] | None  # brightness, contrast, saturation factors
    caption: str


def default_bucket_settings(resolution: int) -> dict:
    """The bucket settings `workbench buckets` uses by default at this resolution."""
    return {"resolution": resolution, **buckets_defaults(resolution), "no_upscale": False}


def _has_column(con: duckdb.DuckDBPyConnection, view: str, column: str) -> bool:
    return bool(
        con.execute(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = ? AND column_name = ?", [view, column]
        ).fetchall()[0][0]
    )


def _stored_bucket_settings(con: duckdb.DuckDBPyConnection) -> dict | None:
    """Settings of the last `workbench buckets` run, when there is exactly one set of them."""
    try:
        rows = con.execute(
            "SELECT DISTINCT resolution_width, resolution_height, min_bucket_reso, max_bucket_reso, bucket_reso_steps, no_upscale "
            "FROM aspect_buckets"
        ).fetchall()
    except duckdb.Error:
        return None
    if len(rows) != 1:
        return None
    width, height, low, high, steps, no_upscale = rows[0]
    return {"resolution": width if width == height else (width, height), "min_bucket_reso": low, "max_bucket_reso": high,
            "bucket_reso_steps": steps, "no_upscale": bool(no_upscale)}


def describe_bucket_settings(settings: dict) -> str:
    """Bucket settings as `workbench buckets` options."""
    resolution = settings["resolution"]
    size = f"{resolution[0]},{resolution[1]}" if isinstance(resolution, tuple) else str(resolution)
    return (f"--resolution {size} --min-bucket-reso {settings['min_bucket_reso']} --max-bucket-reso "
            f"{settings['max_bucket_reso']} --bucket-reso-steps {settings['bucket_reso_steps']}"
            + (" --no-upscale" if settings["no_upscale"] else ""))


def bucket_settings(config: TrainConfig, stored: dict | None = None) -> dict:
    """Explicit options win; else the stored `workbench buckets` settings at this resolution; else defaults."""
    base = stored if stored and stored["resolution"] == config.resolution else default_bucket_settings(config.resolution)
    explicit = {"min_bucket_reso": config.min_bucket_reso, "max_bucket_reso": config.max_bucket_reso,
                "bucket_reso_steps": config.bucket_reso_steps, "no_upscale": config.bucket_no_upscale}
    return {**base, **{k: v for k, v in explicit.items() if v is not None}}


def run_bucket_settings(con: duckdb.DuckDBPyConnection, config: TrainConfig) -> dict:
    """The bucket settings a new run trains with: its options, else the last `workbench buckets` run's, else defaults."""
    have_buckets = _has_column(con, "dataset", "bucket_width")
    return bucket_settings(config, _stored_bucket_settings(con) if have_buckets else None)


def choose_bucket(width: int, height: int, settings: dict):
    from pipelines.buckets import select_bucket

    return select_bucket(
        width, height, resolution=settings["resolution"], min_bucket_reso=settings["min_bucket_reso"],
        max_bucket_reso=settings["max_bucket_reso"], bucket_reso_steps=settings["bucket_reso_steps"],
        no_upscale=settings["no_upscale"],
    )


def _default_class_prompt(row: dict) -> str | None:
    from pipelines.priors import default_class_prompt

    noun = row.get("concept_class")
    return default_class_prompt(noun) if noun else None  # the prompt `workbench priors` makes the set for


def training_images(con: duckdb.DuckDBPyConnection, config: TrainConfig, *, progress: ProgressHook = null_progress) -> list[TrainImage]:
    """The instance images to train on: the `dataset` view (role 'instance'), with caption, concept and bucket."""
    have_concepts = _has_column(con, "dataset", "concept")
    have_buckets = _has_column(con, "dataset", "bucket_width")
    columns = ["image_id", "path", "width", "height", "caption", "caption_source"]
    if have_concepts:
        columns += ["concept", "concept_trigger", "concept_class", "concept_repeats"]
    if have_buckets:
        columns += ["bucket_width", "bucket_height", "bucket_resized_width", "bucket_resized_height", "bucket_crop_left", "bucket_crop_top"]
    where = "role = 'instance'"
    params: list = []
    if config.concepts:
        if not have_concepts:
            raise DataError("--concepts needs concepts in the catalog; run `workbench concept add` first.")
        known = {row[0] for row in con.execute("SELECT name FROM concepts").fetchall()}
        stored = {unicodedata.normalize("NFC", name): name for name in known}  # a name typed on macOS: decomposed
        unknown = [name for name in config.concepts if unicodedata.normalize("NFC", name) not in stored]
        if unknown:
            raise DataError(f"No concept named {', '.join(repr(n) for n in unknown)} in the catalog: "
                            f"`workbench concept list` shows them ({', '.join(sorted(known)) or 'none yet'}).")
        where += " AND concept IN (SELECT unnest(?))"
        params.append([stored[unicodedata.normalize("NFC", name)] for name in config.concepts])
    rows = con.execute(f"SELECT {', '.join(columns)} FROM dataset WHERE {where} ORDER BY image_id", params).fetchall()
    if config.concepts:
        # a concept named with no image in the dataset: said, whether or not the others have some (it was silently
        # skipped beside others, and alone was told to ingest a folder)
        held = {row[columns.index("concept")] for row in rows}
        empty = [name for name in params[0] if name not in held]
        if empty and rows:
            progress(task="dataset", message=(
                f"concept {', '.join(repr(n) for n in empty)} has no image in the dataset, so it trains nothing: "
                "`workbench concept list` shows its images and how many are in the dataset"))
        elif empty:
            raise DataError(
                f"Concept {', '.join(repr(n) for n in empty)} has no image in the dataset (0 train images): "
                "`workbench concept list` shows its images and how many are in the dataset (excluded ones are not); "
                "put images in it with `workbench concept add NAME --folder …` or `concept assign`.")
    if not rows:
        what = f" in concepts {', '.join(config.concepts)}" if config.concepts else ""
        raise DataError(
            f"The dataset has no instance images{what} to train on (0 train images). "
            "Run `workbench ingest FOLDER` and check exclusions with `workbench sql \"SELECT * FROM images_view WHERE excluded\"`."
        )
    stored = _stored_bucket_settings(con) if have_buckets else None
    settings = bucket_settings(config, stored)
    from pipelines.buckets import adjusted_bucket_bounds

    try:  # settings that fit no image at all: said as such, not as the first image that did not fit
        adjusted_bucket_bounds(settings["resolution"], settings["min_bucket_reso"], settings["max_bucket_reso"],
                               settings["bucket_reso_steps"])
    except ValueError as error:
        raise DataError(f"The bucket settings do not work together ({describe_bucket_settings(settings)}): {error}. Give "
                        "min_bucket_reso, max_bucket_reso and bucket_reso_steps that fit this resolution "
                        "(`--set min_bucket_reso=…`), or leave them out for the defaults.") from None
    use_stored = stored is not None and stored == settings
    if stored is not None and not use_stored:  # the dataset view, the TUI and a kohya export show the stored buckets
        progress(task="dataset", message=(
            f"The catalog's buckets were made with `workbench buckets {describe_bucket_settings(stored)}`; this run "
            f"buckets its images with `{describe_bucket_settings(settings)}` instead. The dataset view and a kohya export "
            f"show the catalog's: `workbench buckets {describe_bucket_settings(settings)}` makes them this run's"))
    denied: list[str] = []
    files = openable_paths(con, [r[0] for r in rows], unreadable=denied)
    if denied:  # found before minutes of model loading, not at the first batch that reads one
        shown = ", ".join(denied[:3]) + (f" and {len(denied) - 3} more" if len(denied) > 3 else "")
        raise DataError(f"{len(denied)} image(s) to train on may not be read (permission denied): {shown}. Make them "
                        "readable, or leave them out (`workbench exclude --folder FOLDER` or `exclude ID`, --reason unreadable).")
    gone = [r[1] for r in rows if r[0] not in files]
    if gone:
        # as export does: a changed file's caption and bucket belong to its old pixels, a vanished one has none
        shown = ", ".join(str(p) for p in gone[:3]) + (f" and {len(gone) - 3} more" if len(gone) > 3 else "")
        if len(gone) == len(rows):
            raise DataError(f"Every image to train on changed or went away since it was ingested ({shown}): "
                            "run `workbench ingest` on their folders again.")
        progress(task="dataset", message=f"{len(gone)} image(s) left out: changed or gone since ingest ({shown}); "
                 "`workbench ingest` on their folders reads them again")
        rows = [r for r in rows if r[0] in files]
    edited = sidecars_changed_since_ingest(con, [r[0] for r in rows])
    if edited:  # kohya users edit .txt files and retrain: here the catalog holds the captions, read at ingest
        folders = " ".join(sorted({shlex.quote(os.path.dirname(path)) for path in edited})[:3])
        manual = sum(1 for r in rows if r[columns.index("caption_source")] == "manual")
        progress(task="dataset", message=(
            f"{len(edited)} caption file(s) changed since they were ingested (e.g. {edited[0]}): this run trains on the "
            f"captions the catalog holds. To train on the edits, stop and run `workbench ingest {folders}` first"
            + ("; an image with a caption edited here keeps that one (ingest then says which, and how to use the file's)."
               if manual else ".")))
    captioned = sum(1 for r in rows if r[columns.index("caption")])
    if config.instance_prompt:  # diffusers' DreamBooth meaning: the one prompt of every instance image
        triggers = sorted({t for t in (dict(zip(columns, r)).get("concept_trigger") for r in rows)
                           if t and not caption_has_trigger(config.instance_prompt, t)})
        progress(task="dataset", message=(
            f"every image trains on the instance prompt {config.instance_prompt!r}"
            + (f"; the captions of {captioned} of them are not used (leave --instance-prompt out to train on them)"
               if captioned else "")
            + (f"; it does not hold the concept trigger{'s' if len(triggers) > 1 else ''} {', '.join(map(repr, triggers))}, "
               "which it trains without" if triggers else "")))
    elif captioned < len(rows):  # kohya warns per image; one line says the same
        progress(task="dataset", message=(
            f"{len(rows) - captioned} of {len(rows)} image(s) have no caption and train on their concept's trigger and "
            "class where they have one, else an empty caption (`workbench caption` writes captions)"))
    images, no_bucket = [], []
    given_trigger: Counter = Counter()  # captions of a concept's image that lacked its trigger: (concept, trigger) -> count
    shuffled_trigger: Counter = Counter()  # those holding it past the first keep_tokens tags, which tag shuffle moves
    for values in rows:
        row = dict(zip(columns, values))
        if use_stored and row.get("bucket_width"):
            bucket = (row["bucket_width"], row["bucket_height"])
            resized = (row["bucket_resized_width"], row["bucket_resized_height"])
            crop = (row["bucket_crop_left"], row["bucket_crop_top"])
        else:  # no `workbench buckets` run for these settings: compute the same kohya bucket here
            try:
                choice = choose_bucket(row["width"], row["height"], settings)
            except ValueError as error:  # smaller than a bucket step with no upscaling, say: left out, as `buckets` does
                no_bucket.append((row, str(error)))
                continue
            bucket = (choice.bucket_width, choice.bucket_height)
            resized = (choice.resized_width, choice.resized_height)
            crop = (choice.crop_left, choice.crop_top)
        trigger = row.get("concept_trigger")
        # no caption: the concept's "trigger class" (kohya's class_tokens, DreamBooth's "sks dog"), not the bare trigger
        class_tokens = concept_caption(trigger, row["concept_class"]) if row.get("concept_class") else None
        caption = config.instance_prompt or row["caption"] or class_tokens or ""
        if config.caption_prefix:  # "sks" + "photo of x" → "sks, photo of x" (kohya-style tags); a prefix ending in a separator is kept as is
            prefix = config.caption_prefix
            caption = f"{prefix}{caption}" if not caption or prefix[-1] in " ,;" else f"{prefix}, {caption}"
        # after the prefix, which may hold it (no "sks, sks, ..."); in front, where --keep-tokens keeps it. A
        # whole-word test, as kohya's comma/space separated tags: trigger `cat` is not in "cathedral"
        # not into --instance-prompt: the one prompt the user wrote trains as written, as in diffusers' DreamBooth
        if trigger and not config.instance_prompt and not caption_has_trigger(caption, trigger):
            if caption:
                given_trigger[(row.get("concept"), trigger)] += 1
            caption = f"{trigger}, {caption}" if caption else trigger
        elif trigger and config.shuffle_tags and config.keep_tokens and not caption_has_trigger(
                ", ".join(caption.split(",")[: config.keep_tokens]), trigger):
            shuffled_trigger[(row.get("concept"), trigger)] += 1  # in the caption, but among the tags shuffled
        images.append(
            TrainImage(
                image_id=row["image_id"], path=files[row["image_id"]], caption=caption, bucket=bucket, resized=resized, crop=crop,
                concept=row.get("concept"), repeats=int(row.get("concept_repeats") or 1),
                class_prompt=config.class_prompt or _default_class_prompt(row),
            )
        )
    if given_trigger:  # kohya trains captions as written: said, with how to make it their own text
        (concept, trigger), _ = given_trigger.most_common(1)[0]
        progress(task="dataset", message=(
            f"{sum(given_trigger.values())} caption(s) lack their concept's trigger word and train with it in front "
            f"('{trigger}, …'), so the LoRA learns the word (kohya trains captions as written). To make it part of "
            f"the captions themselves: {add_token_command(trigger, concept)}"))
    if shuffled_trigger:  # keep_tokens pins the first tags: a trigger after them is shuffled like any tag
        (concept, trigger), _ = shuffled_trigger.most_common(1)[0]
        progress(task="dataset", message=(
            f"{sum(shuffled_trigger.values())} caption(s) hold their concept's trigger word after the first "
            f"{config.keep_tokens} tag(s) --keep-tokens pins, so tag shuffle moves it like any other tag. To pin it: "
            f"{add_token_command(trigger, concept)} (moves it to the front)"))
    if no_bucket:
        ids = " ".join(row["image_id"][:12] for row, _ in no_bucket)
        first, reason = no_bucket[0]
        if not images:
            raise DataError(f"No image to train on fits a bucket: {first['path']}: {reason}. Lower --resolution or allow "
                            "upscaling (bucket_no_upscale = false).")
        progress(task="dataset", message=(
            f"{len(no_bucket)} image(s) left out: no bucket fits them ({first['path']}: {reason}). To train on them, "
            f"allow upscaling (bucket_no_upscale = false); to leave them out for good: workbench exclude {ids} "
            "--reason 'too small'"))
    return images


def class_image_ids(priors: dict[str, list[TrainImage]] | None) -> set[str]:
    """The distinct class-prior images of a run's pools (one image may serve several class prompts)."""
    return {image.image_id for pool in (priors or {}).values() for image in pool}


def _supplied_prior_rows(con: duckdb.DuckDBPyConnection, prompt: str) -> list[tuple]:
    """(image_id, path, width, height) of the class images supplied for `prompt` (`workbench priors --from`), in use."""
    return con.execute(
        "SELECT d.image_id, d.path, d.width, d.height FROM images_view d JOIN class_priors c USING (image_id) "
        f"WHERE {PRIOR_IN_USE_SQL} AND c.class_prompt = ? AND c.supplied_from IS NOT NULL ORDER BY d.path, d.image_id",
        [prompt],
    ).fetchall()


def supplied_prior_counts(con: duckdb.DuckDBPyConnection, prompts: Sequence[str]) -> dict[str, int]:
    """How many supplied class images of each prompt training can open."""
    counts = {}
    for prompt in prompts:
        rows = _supplied_prior_rows(con, prompt)
        counts[prompt] = len(openable_paths(con, [r[0] for r in rows]))
    return counts


def class_prior_images(con: duckdb.DuckDBPyConnection, config: TrainConfig, wanted: dict[str, int], model: str, *,
                       progress: ProgressHook = null_progress) -> dict[str, list[TrainImage]]:
    """Up to `wanted[prompt]` class-prior images per class prompt: the ones supplied for it (`workbench priors --from`)
    first, then generated ones, lowest seeds first, of the set this run uses and makes: the same base model, made at this run's resolution with its prior_inference_steps (by `workbench priors`,
    the TUI or an earlier run); one whose file is gone is left out, so it is made again. Priors recorded before their
    settings were (m010) count for every set of their prompt and model; one smaller than this run's resolution
    trains upscaled, and is named with the command that has it made anew."""
    from pipelines.priors import prior_model_names, prior_set_where, training_prior_settings

    pools: dict[str, list[TrainImage]] = {}
    settings = bucket_settings(config, _stored_bucket_settings(con))
    prior_settings = training_prior_settings(config)
    for prompt, limit in wanted.items():
        where, params = prior_set_where(prompt, model, prior_settings)
        generated = con.execute(
            "SELECT d.image_id, d.path, d.width, d.height, c.seed FROM images_view d JOIN class_priors c USING (image_id) "
            f"WHERE {PRIOR_IN_USE_SQL} AND {where} ORDER BY c.seed, c.resolution IS NULL, c.model = ? DESC, c.image_id",
            [*params, prior_model_names(model)[0]],
        ).fetchall()
        rows = [(row, None) for row in _supplied_prior_rows(con, prompt)] + [(row[:4], row[4]) for row in generated]
        pool = []
        small = 0
        seeds_taken = set()  # one image per seed: a set recorded under two names of one model (sd15, sd15-large) may hold two
        files = openable_paths(con, [r[0] for r, _ in rows])
        for (image_id, path, width, height), seed in rows:
            supplied = seed is None
            if image_id not in files or seed in seeds_taken:  # gone or changed: a generated one is made again
                continue
            if not supplied:
                seeds_taken.add(seed)
            choice = choose_bucket(width, height, settings)
            pool.append(TrainImage(image_id, files[image_id], prompt, (choice.bucket_width, choice.bucket_height),
                                   (choice.resized_width, choice.resized_height), (choice.crop_left, choice.crop_top)))
            small += not supplied and min(width, height) < config.resolution  # photos you give are bucketed as they are
            if len(pool) == limit:
                break
        if small:
            # only priors from before m010 can be smaller (a set's own are made at its size); excluded, they are made
            # anew in this run's set. Every such prior of the prompt is named, or the next run would take the rest.
            too_small = [i for (i,) in con.execute(
                "SELECT d.image_id FROM images_view d JOIN class_priors c USING (image_id) "
                f"WHERE {PRIOR_IN_USE_SQL} AND {where} AND c.resolution IS NULL AND least(d.width, d.height) < ? "
                "ORDER BY c.seed", [*params, config.resolution]).fetchall()]
            more = ""
            if len(too_small) > 20:
                names = ", ".join(sql_text(name) for name in prior_model_names(model))
                more = (f" ({len(too_small)} in all, the first 20 named; list them with: workbench sql \"SELECT c.image_id FROM "
                        "class_priors c JOIN images i USING (image_id) WHERE c.resolution IS NULL AND least(i.width, i.height) < "
                        f"{config.resolution} AND c.class_prompt = {sql_text(prompt)} AND list_contains([{names}], c.model)\")")
            progress(task="class priors", message=(
                f"{small} class prior(s) of {prompt!r} are smaller than {config.resolution} px (made before workbench "
                f"recorded each prior's size and steps) and train upscaled. To have them made anew for this run "
                f"({prior_settings.label()}), exclude them and run again: workbench exclude "
                f"{' '.join(i[:12] for i in too_small[:20])} --reason \"smaller than {config.resolution} px\"{more}"))
        pools[prompt] = pool
    return pools


# --- the run's own copy of its dataset ------------------------------------------------

def write_snapshot(path: Path, images: Sequence[TrainImage], priors: dict[str, list[TrainImage]] | None, config: dict | None = None) -> None:
    """Save the options and the exact images, captions, buckets and class priors of a run (what `--resume` reads back)."""
    from dataclasses import asdict

    # folder_id: this life of the run folder, recorded with each training row (a folder deleted and used again gets a
    # new one, so the rows of the deleted run do not count when a resume there is judged)
    def entry(image: TrainImage) -> dict:
        row = asdict(image)
        if _strict_json(image.path) != image.path:  # a name that is not UTF-8: its exact bytes too, for the round trip
            row["path_hex"] = os.fsencode(image.path).hex()
        return row

    # strict JSON, which DuckDB's read_json (and any other reader) takes (`_strict_json`)
    payload = _strict_json({"version": 1, "folder_id": uuid.uuid4().hex, "config": config, "images": [entry(i) for i in images],
                            "priors": None if priors is None else {p: [entry(i) for i in pool] for p, pool in priors.items()}})
    written_whole(path, lambda tmp: tmp.write_text(json.dumps(payload)))


def _strict_json(value: Any) -> Any:
    """`value` with any text that holds surrogate escapes (a non-UTF-8 path: output_dir, a local model) as \\xNN
    text: JSON cannot carry them, and DuckDB's read_json refused the file."""
    if isinstance(value, str):
        return os.fsencode(value).decode("utf-8", "backslashreplace") if any("\udc80" <= c <= "\udcff" for c in value) else value
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    return value


def snapshot_folder_id(path: Path) -> str | None:
    """The folder id `write_snapshot` gave the run folder (None: no snapshot, or one written before ids)."""
    try:
        return json.loads(path.read_text()).get("folder_id")
    except (OSError, ValueError, AttributeError):
        return None


def read_snapshot(path: Path) -> tuple[list[TrainImage], dict[str, list[TrainImage]] | None]:
    """The images and class priors saved by `write_snapshot`."""
    try:
        payload = json.loads(path.read_text())
        if payload.get("version") != 1:
            raise ValueError(f"unknown version {payload.get('version')!r}")

        def image(row: dict) -> TrainImage:
            raw = row.pop("path_hex", None)
            if raw is not None:
                row["path"] = os.fsdecode(bytes.fromhex(raw))
            return TrainImage(**{**row, "bucket": tuple(row["bucket"]), "resized": tuple(row["resized"]), "crop": tuple(row["crop"])})

        images = [image(r) for r in payload["images"]]
        priors = None if payload["priors"] is None else {p: [image(r) for r in pool] for p, pool in payload["priors"].items()}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"The run's dataset snapshot {path} cannot be read ({error}); start a new run instead of resuming.") from error
    return images, priors


def snapshot_drift(saved: Sequence[TrainImage], current: Sequence[TrainImage]) -> dict[str, int]:
    """How the catalog's dataset differs from a run's snapshot: images added, removed, re-captioned, re-bucketed, in
    another concept (or none), or repeated another number of times (their concept's repeats changed)."""
    before = {i.image_id: i for i in saved}
    now = {i.image_id: i for i in current}
    common = before.keys() & now.keys()
    moved = {k for k in common if before[k].concept != now[k].concept}
    return {
        "added": len(now.keys() - before.keys()),
        "removed": len(before.keys() - now.keys()),
        "captions changed": sum(before[k].caption != now[k].caption for k in common),
        "buckets changed": sum((before[k].bucket, before[k].crop) != (now[k].bucket, now[k].crop) for k in common),
        "in another concept or none": len(moved),
        "repeats changed": sum(before[k].repeats != now[k].repeats for k in common - moved),
    }


# --- captions -----------------------------------------------------------------


def caption_variant(caption: str, rng: np.random.Generator, config: TrainConfig) -> str:
    """Caption after dropout and tag shuffle (the first keep_tokens tags stay in place)."""
    if config.caption_dropout and rng.random() < config.caption_dropout:
        return ""
    if config.shuffle_tags:
        tags = [t.strip() for t in caption.split(",") if t.strip()]
        head, tail = tags[: config.keep_tokens], tags[config.keep_tokens :]
        order = rng.permutation(len(tail))
        return ", ".join(head + [tail[i] for i in order])
    return caption


# --- the epoch plan ----------------------------------------------------------------


def epoch_plan(
    images: Sequence[TrainImage], config: TrainConfig, epoch: int, priors: dict[str, list[TrainImage]] | None = None
) -> list[list[ItemSpec]]:
    """Batches of one epoch: each image `repeats` times, one bucket per batch, shuffled with seed + epoch.

    With class priors, every instance item is followed in its batch by one prior item of its
    concept's class, so a batch is [instances..., priors...] of equal halves (the diffusers layout).
    """
    rng = np.random.default_rng([config.seed, epoch])
    by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, image in enumerate(images):
        by_bucket[image.bucket].extend([index] * image.repeats)
    batches: list[list[int]] = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        order = rng.permutation(len(members))
        shuffled = [members[i] for i in order]
        size = config.train_batch_size
        batches.extend(shuffled[i : i + size] for i in range(0, len(shuffled), size))
    batches = [batches[i] for i in rng.permutation(len(batches))]
    prior_cursor: dict[str, int] = defaultdict(int)
    prior_orders = {p: rng.permutation(len(pool)) for p, pool in (priors or {}).items()}
    plan = []
    for batch in batches:
        items = [_item(images[i], i, "instance", rng, config) for i in batch]
        if priors:
            for i in batch:
                prompt = images[i].class_prompt
                pool = priors.get(prompt) or []
                if not pool:
                    raise DataError(f"No class-prior images for '{prompt}'. Run `workbench priors --class-prompt \"{prompt}\"`.")
                k = prior_cursor[prompt]
                prior_cursor[prompt] += 1
                index = int(prior_orders[prompt][k % len(pool)])
                items.append(_item(pool[index], index, "prior:" + prompt, rng, config, caption=prompt))
        plan.append(items)
    return plan


def _item(image: TrainImage, index: int, pool: str, rng: np.random.Generator, config: TrainConfig, caption: str | None = None) -> ItemSpec:
    # draw every random number whether or not the option is on, so toggling one option does not reshuffle the others
    flip_draw, crop_x, crop_y = rng.random(), rng.random(), rng.random()
    jitter_draw = rng.uniform(-1.0, 1.0, size=3)
    flip = bool(config.random_flip and flip_draw < 0.5)
    if config.random_crop:
        crop = (int(crop_x * (image.resized[0] - image.bucket[0] + 1)), int(crop_y * (image.resized[1] - image.bucket[1] + 1)))
    else:
        crop = image.crop
    jitter = tuple(float(1.0 + config.color_jitter * d) for d in jitter_draw) if config.color_jitter else None
    text = caption if caption is not None else caption_variant(image.caption, rng, config)
    return ItemSpec(index, pool, flip, crop, jitter, text)


def run_plan(
    images: Sequence[TrainImage], config: TrainConfig, total_batches: int, priors: dict[str, list[TrainImage]] | None = None
) -> list[list[ItemSpec]]:
    """The flat sequence of `total_batches` micro-batches across as many epochs as needed."""
    plan: list[list[ItemSpec]] = []
    epoch = 0
    while len(plan) < total_batches:
        plan.extend(epoch_plan(images, config, epoch, priors))
        epoch += 1
    return plan[:total_batches]


def batches_per_epoch(images: Sequence[TrainImage], batch_size: int) -> int:
    counts: dict[tuple[int, int], int] = defaultdict(int)
    for image in images:
        counts[image.bucket] += image.repeats
    return sum(-(-n // batch_size) for n in counts.values())


# --- pixels -----------------------------------------------------------------------


def load_pixels(image: TrainImage, spec: ItemSpec) -> torch.Tensor:
    """The bucket-sized crop of an image as a CHW tensor in [-1, 1], with flip and jitter applied."""
    try:
        if not image.path:  # a resumed run's image at no known path (see run._run_dataset)
            raise FileNotFoundError
        with open_image(image.path) as opened:
            picture = as_rgb(ImageOps.exif_transpose(opened))  # the pixels the catalog measured and captioned
    except FileNotFoundError as error:
        raise DataError(
            f"Image {image.image_id[:12]} of this run is no longer at {image.path or 'any known path'} (moved, deleted or "
            "edited since the run started): put it back and ingest again, or start a new run on the current dataset."
        ) from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:  # what Pillow raises on data it cannot decode
        raise DataError(
            f"Image {image.image_id[:12]} ({image.path}) cannot be decoded: {error}. Leave it out with `workbench exclude "
            f"{image.image_id[:12]} --reason corrupt`, or, if the file changed, `workbench ingest` its folder again."
        ) from error
    picture = picture.resize(image.resized, Image.Resampling.LANCZOS)
    left, top = spec.crop
    picture = picture.crop((left, top, left + image.bucket[0], top + image.bucket[1]))
    if spec.flip:
        picture = ImageOps.mirror(picture)
    if spec.jitter:
        from PIL import ImageEnhance

        brightness, contrast, saturation = spec.jitter
        picture = ImageEnhance.Brightness(picture).enhance(brightness)
        picture = ImageEnhance.Contrast(picture).enhance(contrast)
        picture = ImageEnhance.Color(picture).enhance(saturation)
    array = np.asarray(picture, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# --- fingerprints and caches -----------------------------------------------------


def module_fingerprint(*modules: torch.nn.Module, extra: str = "") -> str:
    """SHA-256 over config and every weight's bytes: any change to the model changes it. Not where it was loaded from,
    nor the library versions that saved it (`_name_or_path`, `_diffusers_version`, `transformers_version`): the same
    weights moved to another folder are the same model (a resume from there was refused, its caches made anew)."""
    digest = hashlib.sha256(extra.encode())
    for module in modules:
        config = getattr(module, "config", None)
        if config is not None:
            as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            as_dict = {key: value for key, value in as_dict.items() if not key.startswith("_") and not key.endswith("_version")}
            digest.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
            digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy())  # hashed in place, no copy
    return digest.hexdigest()


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0


class MemoryTier:
    """Cache entries already read or written this run, kept in RAM up to a byte budget (first come, kept).

    A training run reads every cached entry once per epoch; without this each read is a file open and
    a safetensors parse. Entries are keyed by content, so a copy in memory can never be stale.
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.entries: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        return self.entries.get(key)

    def keep(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if key not in self.entries and self.used_bytes + size <= self.budget_bytes:
            self.entries[key] = tensors
            self.used_bytes += size


@dataclass
class _DiskCache:
    folder: Path
    fingerprint: str
    memory: MemoryTier = field(default_factory=lambda: MemoryTier(0))
    stats: CacheStats = field(default_factory=CacheStats)
    kind = ""

    def path(self, key: str) -> Path:
        return self.folder / self.kind / key[:2] / f"{key}.safetensors"

    def _read(self, key: str) -> dict[str, torch.Tensor] | None:
        tensors = self.memory.get(key)
        if tensors is None:
            path = self.path(key)
            if not path.exists():
                self.stats.misses += 1
                return None
            try:
                tensors = load_file(str(path))
            except Exception:  # a torn write: recompute it
                self.stats.misses += 1
                return None
            self.memory.keep(key, tensors)
        self.stats.hits += 1
        return tensors

    def _write(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
        try:
            _atomic_save(tensors, self.path(key))
        except Exception as error:  # safetensors says a full disk in an error of its own, naming no file
            if not is_disk_full(error):
                raise
            raise OSError(errno.ENOSPC, f"the training cache in {self.folder} is out of disk space ({error}): free space "
                          "there, give it another disk (--set cache_dir=PATH), or train without it (--set cache_latents=false "
                          "--set cache_text_embeddings=false)") from error
        self.memory.keep(key, tensors)


class LatentCache(_DiskCache):
    """VAE posterior (mean, std) per (content, VAE, bucket, resized, crop, flip) on disk."""

    kind = "latents"

    def key(self, image: TrainImage, spec: ItemSpec) -> str:
        return _key("latent-v2", image.image_id, self.fingerprint, image.bucket, image.resized, spec.crop, spec.flip)

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        tensors = self._read(key)
        return None if tensors is None else (tensors["mean"], tensors["std"])

    def put(self, key: str, mean: torch.Tensor, std: torch.Tensor) -> None:
        self._write(key, {"mean": mean, "std": std})


class TextCache(_DiskCache):
    """Text-encoder hidden states per (caption, tokenizer + text encoder) on disk."""

    kind = "text"

    def key(self, caption: str) -> str:
        return _key("text-v1", caption, self.fingerprint)

    def get(self, caption: str) -> torch.Tensor | None:
        tensors = self._read(self.key(caption))
        return None if tensors is None else tensors["hidden"]

    def put(self, caption: str, hidden: torch.Tensor) -> None:
        self._write(self.key(caption), {"hidden": hidden})


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    written_whole(path, lambda tmp: save_file(tensors, str(tmp)))  # Ctrl+C or a full disk leaves no stray file


def uses_latent_cache(config: TrainConfig) -> bool:
    """Random crop and colour jitter give new pixels every time, so they bypass the latent cache."""
    return config.cache_latents and not config.random_crop and not config.color_jitter


def uses_text_cache(config: TrainConfig) -> bool:
    """A trained text encoder changes its outputs every step, so its outputs are not cached."""
    return config.cache_text_embeddings and not config.train_text_encoder


def make_caches(config: TrainConfig, vae, text_encoder, tokenizer, *, vae_print: str | None = None,
                text_print: str | None = None) -> tuple[LatentCache | None, TextCache | None]:
    """The caches this run may use, keyed by fingerprints of the (still frozen) encoders (`module_fingerprint`; given,
    when the caller has them already)."""
    from workbench.config import workbench_home

    root = Path(config.cache_dir) if config.cache_dir else workbench_home() / "cache" / "train"
    memory = MemoryTier(config.cache_memory_mb * 2**20)  # one budget for both caches
    latent_cache = None
    if uses_latent_cache(config):
        latent_cache = LatentCache(root, _key("vae", vae_print or module_fingerprint(vae)), memory)
    text_cache = None
    if uses_text_cache(config):
        vocab = hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()
        tokenizer_id = f"{type(tokenizer).__name__}:{vocab}:{tokenizer.model_max_length}"
        if config.max_token_length and config.max_token_length > tokenizer.model_max_length - 2:  # another encoding
            tokenizer_id += f":windows-{config.max_token_length}"
        text_cache = TextCache(root, _key("text", tokenizer_id, text_print or module_fingerprint(text_encoder)), memory)
    return latent_cache, text_cache


def base_model_fingerprint(unet_print: str | None, text_print: str, vae_print: str) -> str:
    """One fingerprint of a run's base model from its parts' `module_fingerprint`s (the UNet's None when it is made
    from scratch, not taken from the base): what a resume checks."""
    return _key("base-v1", unet_print, text_print, vae_print)
