"""Exports of the curated `dataset` (kohya folders + dataset TOML, HF imagefolder, parquet) and kohya import.

Every written path is built from sanitized single components and checked to stay inside OUT.
Files on disk are read, never changed: images are copied (or hardlinked) into OUT.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection

import duckdb

from pipelines.priors import PRIOR_IN_USE_SQL, default_class_prompt
from workbench.catalog import first_row, record_run
from workbench.images import holds_image, one_line_caption, path_text, sidecars_changed_since_ingest
from workbench.text import add_token_command, caption_has_trigger, concept_caption
from workbench.config import EXPORT_MANIFEST
from workbench.progress import ProgressHook, named_few, null_progress

FORMATS = ("kohya", "imagefolder", "parquet")
LINK_MODES = ("copy", "hardlink")
# Formats sd-scripts loads without plugins (train_util.IMAGE_EXTENSIONS); others are converted to PNG.
KOHYA_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp"}
# Images without a concept go to `1_/`: kohya reads it as 1 repeat with empty class_tokens (config_util's
# extract_dreambooth_params: int(tokens[0]), "_".join(tokens[1:])), and import-kohya as "no concept". A named folder
# (`1_images`) came back from import-kohya as a concept whose trigger training then prepended to every caption.
PLAIN_FOLDER = ""
CONCEPT_FOLDER_FALLBACK = "concept"  # a concept whose "trigger class" sanitizes to nothing (never an empty name)
REG_CLASS_FALLBACK = "class"
MAX_COMPONENT_BYTES = 120
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')


class ExportError(ValueError):
    """An export that cannot be written as asked; the message says why."""


def safe_component(text: str | None, *, fallback: str = "_") -> str:
    """One harmless path component: no separators, control or Windows-reserved characters, no leading dots."""
    text = unicodedata.normalize("NFC", text or "")
    text = _UNSAFE.sub("_", text)
    text = re.sub(r"\s+", " ", text).strip().lstrip(".").strip()
    encoded = text.encode("utf-8")[:MAX_COMPONENT_BYTES]
    text = encoded.decode("utf-8", errors="ignore").rstrip(" .")
    return text or fallback


def _inside(root: Path, *parts: str) -> Path:
    """root/parts..., refused if it would resolve outside root."""
    path = root.joinpath(*parts)
    resolved_root = root.resolve()
    if not path.resolve().is_relative_to(resolved_root) or path.resolve() == resolved_root:
        raise ExportError(f"refusing to write {path}: outside {root}")
    return path


def one_line(caption: str | None) -> str | None:
    """The caption on one line (kohya reads only the first line of a caption file): its lines joined as tags."""
    if caption is None:
        return None
    return one_line_caption(caption) or None


def training_text(caption: str | None, trigger: str | None, class_noun: str | None) -> str:
    """An instance image's text for trainers that need one: its caption, else the text training here gives an image
    without one (`concept_caption`), else "" (never null: diffusers' scripts raise on a caption that is not text)."""
    return caption or concept_caption(trigger, class_noun) or ""


@dataclass
class _Row:
    image_id: str
    source: bytes
    name: str
    format: str | None
    mode: str | None
    width: int
    height: int
    orientation: int | None
    caption: str | None
    concept: str | None
    trigger: str | None
    class_noun: str | None
    repeats: int | None
    role: str
    class_prompt: str | None = None  # class priors: the prompt that generated them
    size: int | None = None  # the source file as ingest saw it: a file changed since is not exported
    mtime_ns: int | None = None
    prior_seed: int | None = None  # generated class priors: image i of a set has seed + i
    supplied: bool = False  # class images supplied with `priors --from` (training takes them before generated ones)
    prior_set: tuple | None = None  # generated class priors: (model, resolution, steps, guidance, sampler) of their set


def _say_mixed_prior_models(con: duckdb.DuckDBPyConnection, prior_ids: list[str], progress: ProgressHook) -> None:
    """A class prompt whose exported class images are several generated sets (by several models: the base model, and
    a trained one given to `priors --model`; or at several sizes or step counts): kohya regularises with all of them,
    where training here takes the one set of its model, resolution and steps."""
    if not prior_ids:
        return
    mixed = con.execute(
        "SELECT class_prompt, list_sort(list(DISTINCT model || coalesce(' at ' || resolution || ' px, ' || steps || ' steps', ''))) "
        "FROM class_priors WHERE supplied_from IS NULL AND image_id IN (SELECT unnest(?::VARCHAR[])) "
        "GROUP BY class_prompt HAVING count(DISTINCT (model, resolution, steps)) > 1 ORDER BY 1",
        [prior_ids]).fetchall()
    for prompt, sets in mixed:
        progress(task="export", message=(
            f"the class images of {prompt!r} are {len(sets)} generated sets ({'; '.join(sets)}): kohya regularises with "
            "all of them in one reg folder, where training here takes the one set of its model, resolution and steps. "
            "To export one set, exclude the others first: workbench exclude --where \"image_id IN (SELECT image_id FROM "
            "class_priors WHERE model = 'MODEL' AND resolution = N)\" --reason \"another set's class images\""))


class SourceChanged(Exception):
    """The source file differs from what ingest recorded (edited or replaced since): its caption and bucket may not fit."""


class SourceUnreadable(Exception):
    """The source file may not be read now (its permissions changed since ingest): skipped, as a missing one is."""


def _dataset_rows(con: duckdb.DuckDBPyConnection, only: Collection[str] | None = None) -> list[_Row]:
    """The rows an export writes: the dataset and the class images training uses. With `only` (the ids --where
    chose): those, and the class images of the chosen photos' concept classes (a DreamBooth set of one concept
    keeps its regularisation images)."""
    rows = con.execute(
        f"""
        WITH src AS (
            SELECT image_id, list({{'path_bytes': path_bytes, 'path': path, 'size': size, 'mtime_ns': mtime_ns}} ORDER BY seq) AS sources
            FROM paths WHERE NOT missing GROUP BY image_id
        )
        SELECT d.image_id, src.sources[1].path_bytes, src.sources[1].path, d.format, d.mode, d.width, d.height, i.exif_orientation,
               CASE WHEN d.role = 'class_prior' THEN coalesce(d.caption, cp.class_prompt) ELSE d.caption END,
               d.concept, d.concept_trigger, d.concept_class, d.concept_repeats, d.role, cp.class_prompt,
               src.sources[1].size, src.sources[1].mtime_ns, cp.seed, coalesce(cp.supplied_from IS NOT NULL, false),
               [cp.model, cp.resolution::VARCHAR, cp.steps::VARCHAR, cp.guidance_scale::VARCHAR, cp.sampler], src.sources
        FROM images_view d JOIN src USING (image_id) JOIN images i USING (image_id)
        LEFT JOIN class_priors cp USING (image_id)
        WHERE (d.status = 'ok' AND NOT d.excluded) OR ({PRIOR_IN_USE_SQL})  -- the dataset, and the priors training uses
        ORDER BY d.role, d.concept NULLS LAST, src.sources[1].path
        """
    ).fetchall()
    found = []
    for image_id, path_bytes, path, *rest, prior_set, sources in rows:
        row = _Row(image_id, bytes(path_bytes), Path(path).stem, *rest, prior_set=tuple(prior_set))
        # the first path that is there: one the last ingest did not walk (a folder moved and ingested at its new
        # place) is still listed, and was skipped as gone although the image was at its other path (training opens that)
        there = next((source for source in sources if os.path.exists(bytes(source["path_bytes"]))), None)
        if there is not None and bytes(there["path_bytes"]) != row.source:
            row.source, row.name = bytes(there["path_bytes"]), Path(there["path"]).stem
            row.size, row.mtime_ns = there["size"], there["mtime_ns"]
        found.append(row)
    if only is None:
        return found
    classes = {default_class_prompt(row.class_noun) for row in found
               if row.role != "class_prior" and row.image_id in only and row.class_noun}
    return [row for row in found if row.image_id in only or (row.role == "class_prior" and row.class_prompt in classes)]


def _prepare_out(out: Path, *, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    # the manifest alone is not content: an export stopped before its first image left only that
    if out.exists() and any(p.name != EXPORT_MANIFEST for p in out.iterdir()) and not overwrite:
        raise ExportError(f"{out} is not empty; choose an empty folder or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _has_transparency(source: str) -> bool:
    """Whether a palette image has a transparent entry (its mode alone does not say)."""
    from workbench.images import open_image

    with open_image(source) as img:
        return img.has_transparency_data


def _write_image(row: _Row, target_dir: Path, stem: str, *, link: str, kohya_only: bool) -> Path:
    """Copy/hardlink the source file; re-encode when the format needs it or EXIF rotates it.

    Trainers (sd-scripts, diffusers) read stored pixels without applying EXIF orientation, so an
    image the catalog measured after rotation is written already rotated (as PNG, lossless).
    """
    source = os.fsdecode(row.source)
    try:
        if not holds_image(source, row.image_id, row.size, row.mtime_ns):  # FileNotFoundError when gone since ingest
            raise SourceChanged(source)
        with open(source, "rb"):  # may it be read? (a chmod since ingest leaves size and time as they were)
            pass
    except PermissionError as error:
        raise SourceUnreadable(error.strerror or str(error)) from error
    ext = KOHYA_EXTENSIONS.get(row.format or "")
    rotate = row.orientation not in (None, 1)
    # Trainers (sd-scripts, diffusers) read pixels with Pillow's convert("RGB"), which clips 16-bit and float grey
    # to white and shows the colour under transparency (black in most cut-outs): such images are written as the
    # 8-bit, flattened-on-white pixels the catalog measured and captioned
    wide = (row.mode or "").startswith("I") or row.mode == "F"
    transparent = row.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (row.mode == "P" and _has_transparency(source))
    if ext is None and not kohya_only:
        ext = Path(source).suffix.lower() if re.fullmatch(r"\.[a-z0-9]{2,5}", Path(source).suffix.lower()) else ".png"
    if rotate or wide or transparent or ext is None:
        from PIL import ImageOps

        from workbench.images import as_rgb, open_image

        target = _inside(target_dir, f"{stem}.png")
        with open_image(source) as img:
            img = ImageOps.exif_transpose(img)
            if wide:
                img = as_rgb(img).convert("L")  # grey stays one channel
            elif transparent or img.mode not in ("RGB", "L"):
                img = as_rgb(img)
            img.save(target, format="PNG")
        return target
    target = _inside(target_dir, f"{stem}{ext}")
    if target.exists():
        target.unlink()
    if link == "hardlink":
        try:
            os.link(source, target)
            return target
        except OSError:
            pass  # other filesystem or no permission: copy instead
    shutil.copyfile(source, target)
    return target


def _copied_not_linked(row: _Row, image_path: Path, link: str) -> bool:
    """With --link hardlink, an image written as a copy because OUT is on another disk than it (a hard link cannot
    cross disks): counted, so that a user who asked for links to save space is told. (An image re-encoded on the way,
    rotated or 16-bit, is a new file on any disk; on another disk it is counted too.)"""
    if link != "hardlink":
        return False
    try:
        written = image_path.stat()
        return written.st_nlink == 1 and os.stat(row.source).st_dev != written.st_dev
    except OSError:
        return False


def _skip_reason(error: Exception) -> str:
    if isinstance(error, SourceUnreadable):
        return "unreadable_files_skipped"
    return "changed_files_skipped" if isinstance(error, SourceChanged) else "missing_files_skipped"


def _skip_message(row: _Row, error: Exception) -> str:
    if isinstance(error, SourceUnreadable):
        return f"skipped {path_text(row.source)}: it may not be read ({error}); make it readable and export again"
    why = "changed since it was ingested" if isinstance(error, SourceChanged) else "file no longer there"
    return f"skipped {path_text(row.source)}: {why} (run ingest again)"


@dataclass
class _Folder:
    """One kohya subset folder, and the concepts (or class prompts) whose images go into it."""

    top: str  # img or reg
    name: str  # `N_class tokens`: all that kohya (and import-kohya) reads of it
    repeats: int
    class_tokens: str
    is_reg: bool
    members: list[_Row]
    groups: list[str]


def _prior_prompt(row: _Row) -> str | None:
    """The class prompt a class image serves: its own, else (one made a class image by hand) its concept class's."""
    return row.class_prompt or (default_class_prompt(row.class_noun) if row.class_noun else None)


def _generated_priors_training_takes(instances: int) -> int:
    """How many generated class images of a set training takes, by its defaults, for a prompt of `instances` instance
    images."""
    from pipelines.priors import class_images_wanted
    from pipelines.train.config import TrainConfig

    return class_images_wanted(instances, max_class_images=TrainConfig.max_class_images)


def _counted(counts: Counter[str]) -> str:
    """'a photo of a horse' (1), 'a photo of a person' (2): for notes about class prompts (one prompt: its name alone,
    the note gives the count)."""
    if len(counts) == 1:
        return repr(next(iter(counts)))
    return named_few([f"{prompt!r} ({n})" for prompt, n in sorted(counts.items())])


def _file_stem(row: _Row) -> str:
    # the original name helps people; the id prefix keeps names unique across folders and reruns. One an earlier
    # export gave (imported back, exported again) is replaced, not followed by another on every round trip
    suffix = f"-{row.image_id[:12]}"
    name = safe_component(row.name, fallback="image")
    name = name.removesuffix(suffix) or "image"  # the bytes are the id: a round trip keeps it (not `scan-202301011230`)
    return f"{name[:60]}{suffix}"


def _bucket_settings(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """Settings of the last `workbench buckets` run, else kohya's defaults for SD 1.x at 512."""
    row = first_row(con.execute(
        "SELECT resolution_width, resolution_height, min_bucket_reso, max_bucket_reso, bucket_reso_steps, no_upscale"
        " FROM aspect_buckets LIMIT 1"
    ))
    if row is None:
        return {"resolution": 512, "min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64,
                "bucket_no_upscale": False}
    width, height, low, high, steps, no_upscale = row
    return {"resolution": width if width == height else [width, height], "min_bucket_reso": low,
            "max_bucket_reso": high, "bucket_reso_steps": steps, "bucket_no_upscale": bool(no_upscale)}


def kohya_export(
    con: duckdb.DuckDBPyConnection,
    out: str | os.PathLike[str],
    *,
    link: str = "copy",
    caption_extension: str = ".txt",
    only: Collection[str] | None = None,
    progress: ProgressHook = null_progress,
) -> dict:
    """kohya sd-scripts layout: img/N_trigger class/ (img/1_/ for images without a concept, + reg/ for class
    priors), .txt captions, dataset.toml. OUT was prepared by `exported_dataset`."""
    import tomli_w

    out = Path(out)
    rows = _dataset_rows(con, only)
    settings = _bucket_settings(con)
    if not con.execute("SELECT count(*) FROM aspect_buckets").fetchall()[0][0]:
        progress(task="export", message="dataset.toml takes kohya's bucket defaults (512 px, 256–1024, step 64): no "
                 "`workbench buckets` run set them; run it with your training resolution first")
    elif settings["bucket_reso_steps"] % 64:  # sd-scripts asserts it: train_network.py / train_db.py on SD 1.x/2.x
        progress(task="export", message=(
            f"bucket_reso_steps is {settings['bucket_reso_steps']}: sd-scripts' SD 1.x/2.x trainers refuse a step that "
            "is not a multiple of 64 (SDXL's, of 32); `workbench buckets --bucket-reso-steps 64` before exporting"))
    unbucketable = 0
    if settings["bucket_no_upscale"]:
        # sd-scripts divides by zero on an image smaller than one bucket step with bucket_no_upscale
        from pipelines.buckets import select_bucket

        def fits(row: _Row) -> bool:
            try:
                select_bucket(row.width, row.height, resolution=settings["resolution"], no_upscale=True,
                              bucket_reso_steps=settings["bucket_reso_steps"])
                return True
            except ValueError:
                return False

        kept = [row for row in rows if fits(row)]
        unbucketable = len(rows) - len(kept)
        if unbucketable:
            progress(task="export", message=f"left out {unbucketable} image(s) smaller than one bucket step "
                     f"({settings['bucket_reso_steps']} px): sd-scripts fails on them with bucket_no_upscale")
        rows = kept
    groups: dict[tuple[str, str | None], list[_Row]] = defaultdict(list)
    for row in rows:  # class priors: one reg folder per class prompt, instances: one img folder per concept
        groups[(row.role, row.class_prompt if row.role == "class_prior" else row.concept)].append(row)
    folders: dict[tuple[str, str], _Folder] = {}
    for (role, concept), members in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        first = members[0]
        is_reg = role == "class_prior"
        if is_reg:
            # each class image also gets its prompt as caption file; class_tokens covers any without one
            class_tokens = first.class_prompt or first.class_noun or REG_CLASS_FALLBACK
            repeats = 1
        elif concept is None:
            class_tokens, repeats = PLAIN_FOLDER, 1
        else:
            class_tokens = concept_caption(first.trigger, first.class_noun) or ""
            repeats = first.repeats or 1
        top = "reg" if is_reg else "img"
        if not is_reg and concept is None:
            name = f"{repeats}_{PLAIN_FOLDER}"  # `1_`: one such group, concept folders are `N_x`
        else:
            fallback = REG_CLASS_FALLBACK if is_reg else CONCEPT_FOLDER_FALLBACK
            name = f"{repeats}_{safe_component(class_tokens, fallback=fallback)}"
        # the folder name is all kohya (and import-kohya) reads of a subset: concepts of one trigger, class and
        # repeats share one folder (a `3_zkx man-2` beside `3_zkx man` read as class "man-2"); files are named by
        # their ids, so none collide. Lower case: one folder on a disk that ignores case, and to CLIP's tokenizer
        folder = folders.setdefault((top, name.lower()), _Folder(top, name, repeats, class_tokens, is_reg, [], []))
        folder.members.extend(members)
        folder.groups.append(concept or "")
    for folder in folders.values():
        if not folder.is_reg and len(folder.groups) > 1:
            progress(task="export", message=(
                f"concepts {', '.join(map(repr, folder.groups))} export into one folder, img/{folder.name}: they have one "
                "trigger, class and repeats, all that kohya reads of a folder (import-kohya reads them back as one concept)"))
    # instance folders first: a class prompt gets its reg folder only if an exported concept has its class, and as
    # many class images as training takes for the instance images exported (kohya regularises with all it finds)
    ordered = sorted(folders.values(), key=lambda folder: folder.is_reg)
    instances: Counter[str] = Counter()  # class prompt -> instance images written of concepts of that class
    taken: Counter[tuple] = Counter()  # (class prompt, set) -> class images written
    unused: Counter[str] = Counter()  # class prompt -> class images left out: no exported concept has that class
    surplus: Counter[str] = Counter()  # ... more than training takes
    chosen = only or set()  # class images --where named themselves: exported as chosen
    written_priors: list[str] = []
    subsets: list[dict[str, Any]] = []
    counts: Counter[str] = Counter({key: 0 for key in (
        "images", "folders", "captions", "without_caption", "captions_joined_to_one_line",
        "captions_without_trigger", "missing_files_skipped", "changed_files_skipped", "unreadable_files_skipped",
        "copied_not_hardlinked", "unused_class_images_left_out", "surplus_class_images_left_out")})
    without_trigger: list[str] = []  # caption files, relative to OUT
    triggerless: dict[str, str] = {}  # concept -> its trigger, of those captions
    done = 0
    progress(task="export", completed=0, total=len(rows))
    for folder in ordered:
        members, is_reg = folder.members, folder.is_reg
        if is_reg:
            for row in members:
                if row.image_id not in chosen and not instances[_prior_prompt(row) or ""]:
                    unused[_prior_prompt(row) or REG_CLASS_FALLBACK] += 1
                    done += 1
            members = [row for row in members if row.image_id in chosen or instances[_prior_prompt(row) or ""]]
            if not members:
                continue
            # as training takes them: the class images supplied for a prompt first, then generated ones by seed
            members.sort(key=lambda row: (not row.supplied, row.prior_seed is None, row.prior_seed or 0))
        target_dir = _inside(out, folder.top, folder.name)
        target_dir.mkdir(parents=True, exist_ok=True)
        for row in members:
            done += 1
            if is_reg and row.image_id not in chosen:
                prompt = _prior_prompt(row) or ""
                # training takes a prompt's supplied class images (all of them), or else 200 per instance image of
                # the one generated set its settings make; which one a kohya run is, the export cannot know, so each
                # set keeps that many (mixed sets are said); a file gone is skipped and the next one taken, as in training
                if not row.supplied and (taken[(prompt, "supplied")] or taken[(prompt, row.prior_set)]
                                         >= _generated_priors_training_takes(instances[prompt])):
                    surplus[prompt] += 1
                    continue
            try:
                image_path = _write_image(row, target_dir, _file_stem(row), link=link, kohya_only=True)
            except (FileNotFoundError, SourceChanged, SourceUnreadable) as error:
                counts[_skip_reason(error)] += 1
                progress(task="export", completed=done, total=len(rows), message=_skip_message(row, error))
                continue
            if is_reg:
                taken[(_prior_prompt(row) or "", "supplied" if row.supplied else row.prior_set)] += 1
                written_priors.append(row.image_id)
            elif row.class_noun:
                instances[default_class_prompt(row.class_noun)] += 1
            counts["copied_not_hardlinked"] += _copied_not_linked(row, image_path, link)
            caption = one_line(row.caption)
            if caption:
                caption_path = _inside(target_dir, image_path.stem + caption_extension)
                caption_path.write_text(caption + "\n", encoding="utf-8")
                counts["captions"] += 1
                if caption != row.caption.strip():  # lines joined (not spaces tidied: a caption keeps its own)
                    counts["captions_joined_to_one_line"] += 1
                # with a caption file kohya never uses class_tokens: a caption without the trigger
                # trains nothing into the trigger, the most common silent DreamBooth-LoRA mistake
                if row.trigger and not is_reg and not caption_has_trigger(caption, row.trigger):
                    counts["captions_without_trigger"] += 1
                    without_trigger.append(caption_path.relative_to(out).as_posix())
                    triggerless.setdefault(row.concept, row.trigger)
            else:
                counts["without_caption"] += 1
            counts["images"] += 1
            if done % 200 == 0:
                progress(task="export", completed=done, total=len(rows))
        subset: dict[str, Any] = {
            "image_dir": str(target_dir.resolve()),
            "num_repeats": folder.repeats,
            "class_tokens": folder.class_tokens,
            "caption_extension": caption_extension,
        }
        if is_reg:
            subset["is_reg"] = True
        subsets.append(subset)
        counts["folders"] += 1
    progress(task="export", completed=done, total=len(rows))
    _say_mixed_prior_models(con, written_priors, progress)
    counts["unused_class_images_left_out"], counts["surplus_class_images_left_out"] = unused.total(), surplus.total()
    if unused:
        progress(task="export", message=(
            f"left out {unused.total()} class image(s) of {_counted(unused)}: no exported concept has that class, so "
            "training here does not use them, and kohya regularises with every reg/ folder (to export them anyway, "
            "name them in --where, as `role = 'class_prior'` does)"))
    if surplus:
        from pipelines.priors import PRIORS_PER_INSTANCE
        from pipelines.train.config import TrainConfig

        progress(task="export", message=(
            f"left out {surplus.total()} class image(s) of {_counted(surplus)}: more than training takes (the class "
            f"images supplied for a prompt, else {PRIORS_PER_INSTANCE} generated per instance image exported, at most "
            f"{TrainConfig.max_class_images}), and kohya regularises with all it finds"))
    # no batch_size or shuffle_caption: in sd-scripts the file's values beat the command line's, and these
    # (--train_batch_size, --shuffle_caption) are chosen there, per training run
    config = {
        "general": {"enable_bucket": True, "caption_extension": caption_extension},
        "datasets": [{**settings, "subsets": subsets}],
    }
    header = (
        "# sd-scripts dataset config written by `workbench export --format kohya`.\n"
        "# Use: accelerate launch train_network.py --dataset_config dataset.toml ...\n"
        "# image_dir paths are absolute; re-export if you move this folder.\n"
    )
    (out / "dataset.toml").write_text(header + tomli_w.dumps(config), encoding="utf-8")
    if counts["captions_without_trigger"]:
        progress(task="export", completed=done, total=len(rows), message=(
            f"{counts['captions_without_trigger']} caption(s) in concept folders lack their trigger word "
            f"({named_few(without_trigger)}); kohya uses the caption file instead of class_tokens, so those images "
            "do not teach the trigger: add it to their captions and export again ("
            + "; ".join(add_token_command(trigger, concept) for concept, trigger in sorted(triggerless.items())) + ")"))
    return {"format": "kohya", "out": str(out), **counts, "too_small_for_no_upscale": unbucketable}


def imagefolder_export(
    con: duckdb.DuckDBPyConnection,
    out: str | os.PathLike[str],
    *,
    link: str = "copy",
    only: Collection[str] | None = None,
    progress: ProgressHook = null_progress,
) -> dict:
    """Hugging Face imagefolder: images + metadata.jsonl (file_name, text, concept...) under OUT/train/, and the class
    images training uses under OUT/class_images/ (diffusers' --class_data_dir; their prompts in OUT/class_images.jsonl):
    in train/ they would train as photos (a diffusers train_text_to_image run on it). OUT was prepared by
    `exported_dataset`."""
    out = Path(out)
    target_dir = _inside(out, "train")
    target_dir.mkdir(exist_ok=True)
    rows = _dataset_rows(con, only)
    _say_mixed_prior_models(con, [row.image_id for row in rows if row.role == "class_prior"], progress)  # as kohya's says it
    progress(task="export", completed=0, total=len(rows))
    lines, class_lines = [], []
    skipped: Counter[str] = Counter({"missing_files_skipped": 0, "changed_files_skipped": 0, "unreadable_files_skipped": 0,
                                     "copied_not_hardlinked": 0})
    texts, textless = _text_counts(), []  # textless: files, relative to OUT
    for done, row in enumerate(rows, 1):
        prior = row.role == "class_prior"
        folder = _inside(out, "class_images") if prior else target_dir
        folder.mkdir(exist_ok=True)
        try:
            image_path = _write_image(row, folder, _file_stem(row), link=link, kohya_only=False)
        except (FileNotFoundError, SourceChanged, SourceUnreadable) as error:
            skipped[_skip_reason(error)] += 1
            progress(task="export", completed=done, total=len(rows), message=_skip_message(row, error))
            continue
        skipped["copied_not_hardlinked"] += _copied_not_linked(row, image_path, link)
        text = row.caption
        if not prior:  # without a caption: the text training here gives it, not null (diffusers' scripts raise on it)
            text = training_text(row.caption, row.trigger, row.class_noun)
            _count_text(texts, textless, row.caption, text, image_path.relative_to(out).as_posix())
        (class_lines if prior else lines).append(json.dumps({
            "file_name": image_path.name,
            "text": text,
            "image_id": row.image_id,
            "concept": row.concept,
            "trigger": row.trigger,
            "class_noun": row.class_noun,
            "repeats": row.repeats,
            "role": row.role,
        }, ensure_ascii=False))
        if done % 200 == 0 or done == len(rows):
            progress(task="export", completed=done, total=len(rows))
    (target_dir / "metadata.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    if class_lines:  # beside the folder, not in it: diffusers' DreamBooth opens every file in --class_data_dir as an image
        (out / "class_images.jsonl").write_text("".join(line + "\n" for line in class_lines), encoding="utf-8")
    _say_textless(len(textless), named_few(textless), progress)
    return {"format": "imagefolder", "out": str(out), "images": len(lines), **texts, "class_images": len(class_lines),
            **skipped}


def _text_counts() -> Counter[str]:
    """What an export counts of its instance images' text (`_count_text`), every kind shown, 0 or not."""
    return Counter({"captions": 0, "uncaptioned_given_concept_text": 0, "uncaptioned_without_text": 0})


def _count_text(texts: Counter[str], textless: list[str], caption: str | None, text: str, where: str) -> None:
    """Count an instance image's text by where it came from; one with none at all is listed (`where`) for the note."""
    texts["captions" if caption else "uncaptioned_given_concept_text" if text else "uncaptioned_without_text"] += 1
    if not text:
        textless.append(where)


def _say_textless(count: int, shown: str, progress: ProgressHook) -> None:
    """Images with no caption and no concept go out with the empty text they train on here: said, not left null."""
    if count:
        progress(task="export", message=(
            f"{count} image(s) have no caption and no concept ({shown}): their text is empty, as training here trains "
            "them (unconditioned). `workbench caption` writes captions; a concept gives its trigger and class"))


def parquet_export(con: duckdb.DuckDBPyConnection, out: str | os.PathLike[str], *, overwrite: bool = False,
                   only: Collection[str] | None = None, progress: ProgressHook = null_progress) -> dict:
    """The `dataset` view's rows as one parquet file (OUT itself if it ends in .parquet, else OUT/dataset.parquet),
    with `text`: the caption, else what an uncaptioned image trains on here (`training_text`); `caption` is the
    catalog's, null where an image has none."""
    out = Path(out)
    if out.suffix.lower() == ".parquet":
        target = out
        target.parent.mkdir(parents=True, exist_ok=True)
    else:
        if out.exists() and not out.is_dir():
            raise ExportError(f"{out} exists and is not a folder")
        out.mkdir(parents=True, exist_ok=True)
        target = out / "dataset.parquet"
    if target.exists() and not overwrite:
        raise ExportError(f"{target} exists; pass --overwrite to replace it")
    chosen = "" if only is None else "WHERE image_id IN (SELECT unnest($ids))"
    ids = None if only is None else {"ids": sorted(only)}
    rows = con.execute(
        "SELECT image_id, d.role, d.caption, d.concept_trigger, d.concept_class, c.class_prompt, d.path FROM dataset d "
        f"LEFT JOIN class_priors c USING (image_id) {chosen} ORDER BY image_id", ids).fetchall()
    texts, textless = _text_counts(), []
    text_of: dict[str, str] = {}
    for image_id, role, caption, trigger, class_noun, class_prompt, path in rows:
        if role == "class_prior":  # as the other exports caption it: its prompt
            text_of[image_id] = caption or class_prompt or ""
            continue
        text_of[image_id] = training_text(caption, trigger, class_noun)
        _count_text(texts, textless, caption, text_of[image_id], path)
    con.sql("SELECT d.*, t.text FROM dataset d JOIN (SELECT unnest($ids::VARCHAR[]) AS image_id, "
            "unnest($texts::VARCHAR[]) AS text) t USING (image_id) ORDER BY image_id",
            params={"ids": list(text_of), "texts": list(text_of.values())}).write_parquet(str(target))
    _say_textless(len(textless), named_few(textless), progress)
    return {"format": "parquet", "out": str(target), "rows": len(rows), **texts}


def exported_dataset(
    con: duckdb.DuckDBPyConnection,
    out: str | os.PathLike[str],
    *,
    format: str = "kohya",
    link: str = "copy",
    overwrite: bool = False,
    where: str | None = None,
    progress: ProgressHook = null_progress,
) -> dict:
    """Write the curated dataset to OUT in `format` (kohya, imagefolder or parquet); with `where` (an SQL
    condition on images_view), only the images of it that the condition matches."""
    from pipelines.concepts import images_where

    if format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    if link not in LINK_MODES:
        raise ExportError(f"link must be one of {', '.join(LINK_MODES)}, not {link!r}")
    only = None
    if where is not None:
        try:
            only = set(images_where(con, where))
        except ValueError as error:
            raise ExportError(str(error)) from None
        exportable = f"SELECT image_id FROM dataset UNION SELECT d.image_id FROM images_view d WHERE {PRIOR_IN_USE_SQL}"
        if not only & {row[0] for row in con.execute(exportable).fetchall()}:
            raise ExportError(f"no image of the dataset (or class image in use) matches --where {where!r}: nothing to export")
    if format != "parquet" and not con.execute("SELECT count(*) FROM dataset").fetchall()[0][0]:
        raise ExportError("the dataset is empty (every image is excluded or missing): nothing to export")
    if format != "parquet" and overwrite and Path(out).is_dir():
        _refuse_to_overwrite_image_sources(con, Path(out))
    if format != "parquet":
        ids = [row[0] for row in con.execute("SELECT image_id FROM dataset").fetchall() if only is None or row[0] in only]
        edited = sidecars_changed_since_ingest(con, ids)
        if edited:  # as training says it: the export writes the captions the catalog holds
            progress(task="export", message=(
                f"{len(edited)} caption file(s) changed since they were ingested ({named_few(edited)}): the export "
                "writes the captions the catalog holds. To export the edits, stop and run `workbench ingest` on their "
                "folders first."))
    params = {"format": format, "out": str(out), "link": link, **({"where": where} if where is not None else {})}
    with record_run(con, "export", params) as run:
        if format == "parquet":
            summary = parquet_export(con, out, overwrite=overwrite, only=only, progress=progress)
        else:
            # an export over an earlier one replaces it: the earlier files (its manifest) go first, so concepts
            # or images curated out since are not left behind for a trainer to pick up; other files stay
            out_path = Path(out)
            removed = _removed_previous_export(out_path, _catalog_files(con, out_path)) if overwrite and out_path.is_dir() else 0
            _prepare_out(out_path, overwrite=overwrite)  # a refused folder gets no manifest
            before = _files_under(out_path)
            # the manifest is also the marker that keeps `workbench ingest` of a folder above out of the export (its
            # caption files would come back as sidecar captions): written before the first image, so an export
            # killed outright carries it too
            _write_manifest(out_path, format, [], finished=False, before=sorted(before))
            exporter = kohya_export if format == "kohya" else imagefolder_export
            finished = False
            try:
                summary = exporter(con, out, link=link, only=only, progress=progress)
                finished = True
            finally:  # also when stopped part way (Ctrl+C, a full disk): `--overwrite` then replaces exactly that
                if out_path.is_dir():
                    _write_manifest(out_path, format, sorted(_files_under(out_path) - before - {EXPORT_MANIFEST}), finished=finished)
            summary["earlier_export_files_removed"] = removed
        run.counts = {k: v for k, v in summary.items() if isinstance(v, int)}
    return summary


def _write_manifest(out: Path, format: str, files: list[str], *, finished: bool, before: list[str] | None = None) -> None:
    """OUT's manifest: the files this export wrote (for `--overwrite`), and whether it finished. One not finished
    also lists the files OUT held `before` it began: if the export is killed outright, every other file is its own."""
    manifest = {"format": format, "files": files}
    if not finished:
        manifest.update(finished=False, **({"files_before": before} if before is not None else {}))
    (out / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=0))


def _refuse_to_overwrite_image_sources(con: duckdb.DuckDBPyConnection, out: Path) -> None:
    """An --overwrite export deletes its earlier files and replaces same-named ones: never when the catalog reads
    images from OUT (an export ingested back, `import-kohya OUT`), where those files may be the only copies."""
    prefixes = sorted({str(out.absolute()).rstrip(os.sep) + os.sep, str(out.resolve()).rstrip(os.sep) + os.sep})
    rows = con.execute(
        "SELECT count(*), min(path) FROM paths WHERE NOT missing AND (" + " OR ".join(["starts_with(path, ?)"] * len(prefixes)) + ")",
        prefixes,
    ).fetchall()[0]
    if not rows[0]:  # the same folder reached through a link (the catalog's paths are as ingest was given them)
        inside = str(out.resolve())
        for (folder,) in con.execute(
            "SELECT DISTINCT regexp_replace(path, '[/\\\\][^/\\\\]*$', '') FROM paths WHERE NOT missing").fetchall():
            real = os.path.realpath(folder or os.sep)
            if real == inside or real.startswith(inside.rstrip(os.sep) + os.sep):
                rows = con.execute("SELECT count(*), min(path) FROM paths WHERE NOT missing AND starts_with(path, ?)",
                                   [folder.rstrip(os.sep) + os.sep]).fetchall()[0]
                break
    if rows[0]:
        raise ExportError(
            f"{out} holds {rows[0]} file(s) the catalog reads images from (e.g. {rows[1]}): an --overwrite "
            "export there would delete or replace them. Export to another folder."
        )


def _files_under(folder: Path) -> set[str]:
    """Every file (or link) below `folder`, as POSIX paths relative to it; links to folders are not followed."""
    found = set()
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            found.add(Path(os.path.relpath(os.path.join(root, name), folder)).as_posix())
    return found


def _catalog_files(con: duckdb.DuckDBPyConnection, out: Path) -> frozenset[Path]:
    """Files under OUT no export may delete: the catalog's database and write-ahead log, and image files it reads."""
    from workbench.catalog import catalog_files

    files = {path.resolve() for path in catalog_files(con) or ()}
    inside = str(out.resolve()) + os.sep
    files.update(Path(p) for (p,) in con.execute("SELECT path FROM paths WHERE starts_with(path, ?)", [inside]).fetchall())
    return frozenset(files)


_EXPORT_FILE = re.compile(r"(-[0-9a-f]{12}\.[A-Za-z0-9]+|(^|/)dataset\.toml|(^|/)metadata\.jsonl)$")


def _removed_previous_export(out: Path, keep: frozenset[Path] = frozenset()) -> int:
    """Delete the files an earlier export listed in its manifest (and folders left empty); returns how many.

    Only files an export writes (`_EXPORT_FILE`) inside OUT itself are deleted: the manifest is a file in OUT, and
    a folder in OUT may be a link elsewhere (a review deleted a catalog image and other files that way, and the
    catalog itself by listing it). `keep` (the catalog's files) is never deleted."""
    manifest = out / EXPORT_MANIFEST
    if not manifest.is_file():
        return 0
    try:
        written = json.loads(manifest.read_text())
        listed = written["files"]
        if written.get("finished") is False and isinstance(written.get("files_before"), list):
            # killed before it could list its files (kill -9, a power cut): they are those not there before that an
            # export writes (an image named `<name>-<id>`, its caption file, the dataset files), not a file put
            # there since (a model trained into OUT/model)
            listed = sorted(f for f in _files_under(out) - set(written["files_before"]) - {EXPORT_MANIFEST}
                            if _EXPORT_FILE.search(f))
    except (ValueError, KeyError, TypeError):
        return 0
    removed, emptied = 0, set()
    inside = out.resolve()
    for relative in listed:
        if not isinstance(relative, str) or Path(relative).is_absolute() or ".." in Path(relative).parts:
            continue  # a manifest never points outside the export
        if not _EXPORT_FILE.search(Path(relative).as_posix()):
            continue  # not a file an export writes
        target = out / relative
        try:
            where = target.parent.resolve()
        except OSError:
            continue
        if not where.is_relative_to(inside) or (not target.is_symlink() and target.resolve() in keep):
            continue  # through a folder that links out of OUT, or the catalog
        if target.is_symlink() or target.is_file():
            target.unlink()
            removed += 1
            emptied.update(parent for parent in target.parents if parent.is_relative_to(out) and parent != out)
    manifest.unlink()
    for folder in sorted(emptied, key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            folder.rmdir()
    return removed


def _repeats_only(progress: ProgressHook) -> ProgressHook:
    """The second pass over the imported files' folder names says only what it changed: a concept's repeats."""
    from pipelines.concepts import REPEATS_TASK

    def hook(*, task: str, completed: int = 0, total: int | None = None, message: str | None = None) -> None:
        if message and task == REPEATS_TASK:
            progress(task=task, message=message)
    return hook


def _without_kept_repeats(progress: ProgressHook) -> ProgressHook:
    """The import's ingest pass, less its "the concept keeps its repeats": the import's own pass then takes the
    folder's (a kohya user renames `10_sks dog` to `20_sks dog` to change them), and says so."""
    from pipelines.concepts import KEPT_REPEATS_TASK

    def hook(*, task: str, completed: int = 0, total: int | None = None, message: str | None = None) -> None:
        if task != KEPT_REPEATS_TASK:
            progress(task=task, completed=completed, total=total, message=message)
    return hook


def _each_message_once(progress: ProgressHook) -> ProgressHook:
    """`progress`, passing each message on only the first time it is given."""
    said: set[str] = set()

    def hook(*, task: str, completed: int = 0, total: int | None = None, message: str | None = None) -> None:
        if message in said:
            message = None
        elif message:
            said.add(message)
        progress(task=task, completed=completed, total=total, message=message)

    return hook


def imported_kohya_folder(
    con: duckdb.DuckDBPyConnection,
    folder: str | os.PathLike[str],
    *,
    workers: int | None = None,
    progress: ProgressHook = null_progress,
    ingest_summary: list | None = None,
) -> dict:
    """Ingest a kohya-style folder (`N_trigger class/` subfolders, .txt/.caption sidecars) with its concepts.
    `ingest_summary` gets the ingest's IngestSummary (for its notes)."""
    from pipelines.concepts import (
        concepts_from_folder_names,
        list_concepts,
        parse_kohya_folder_name,
        plain_folder_note,
        plain_subset_repeats,
    )
    from pipelines.ingest import ingested_images
    from pipelines.priors import class_prompt_of_folder, image_files_in, supplied_priors

    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder")
    subfolders = [p for p in folder.iterdir() if p.is_dir()]

    def is_subset(name: str) -> bool:  # `N_trigger class` (a concept) or `N_` (images without one)
        return parse_kohya_folder_name(name) is not None or plain_subset_repeats(name) is not None

    # accept the folder itself, its img/ (our export layout), or a folder of N_name subfolders
    if (folder / "img").is_dir() and not any(is_subset(p.name) for p in subfolders):
        roots = [folder / "img"]
    else:
        roots = [folder]
    concept_dirs = [p for root in roots for p in root.iterdir() if p.is_dir() and is_subset(p.name)]
    if is_subset(folder.name):
        concept_dirs = [folder]  # FOLDER is itself one subset folder
    if not concept_dirs:
        raise ExportError(f"{folder} has no kohya subset folders named like `10_sks dog`")
    plain_dirs = [p for p in concept_dirs if parse_kohya_folder_name(p.name) is None]
    progress = _each_message_once(progress)  # ingest's pass over the files it reads says the same of a `3_` folder
    for plain in plain_dirs:
        repeats = plain_subset_repeats(plain.name)
        if repeats > 1:
            progress(task="import", message=plain_folder_note(os.path.abspath(plain), repeats))
    # what kohya trains on: the files directly in each subset folder (it reads them non-recursively)
    files = sorted(p for d in concept_dirs for p in d.iterdir()
                   if p.is_file() and p.suffix.lower() not in (".txt", ".caption") and not p.name.startswith("."))
    from PIL import Image

    image_suffixes = set(Image.registered_extensions())
    left_out = sum(1 for root in roots for p in root.rglob("*")
                   if p.suffix.lower() in image_suffixes and p.parent not in concept_dirs and p.is_file())
    if left_out:
        progress(task="import", message=f"left out {left_out} image(s) outside kohya subset folders (`N_trigger class/`, "
                 "files directly inside): kohya does not train on them either; `workbench ingest` adds them if you want them")
    summary = ingested_images(con, files, workers=workers, progress=_without_kept_repeats(progress))
    if ingest_summary is not None:
        ingest_summary.append(summary)
    counts = summary.as_dict()
    # ingest read the folder names of the files it read (and said so); importing the folder again asks for its
    # concepts, so this pass covers the imported files it found unchanged
    imported = [os.path.abspath(os.fsencode(f)) for f in files]
    assigned = counts.pop("images_joined_concepts", 0) + concepts_from_folder_names(
        con, paths=imported, zero_padded=True, folder_repeats=True, progress=_repeats_only(progress))
    # regularisation images (reg/N_class/) are the class images kohya trains beside the subject: supplied class
    # priors of that class, which DreamBooth training takes before generating any
    # reg/ beside img/: given the dataset folder (our export) or its img/ (the folder kohya's train_data_dir names,
    # as the kohya GUI lays a project out: img/, reg/, model/, log/)
    if roots == [folder / "img"]:
        reg = folder / "reg"
    elif folder.name == "img" and roots == [folder] and (folder.parent / "reg").is_dir():
        reg = folder.parent / "reg"
        progress(task="import", message=f"class images: reading {reg}, beside {folder.name}/ (kohya's reg_data_dir)")
    else:
        reg = None
    reg_dirs = sorted(p for p in reg.iterdir() if p.is_dir()) if reg is not None and reg.is_dir() else []
    reg_images, reg_left_out = 0, 0
    for sub in reg_dirs:
        prompt, found = class_prompt_of_folder(con, sub), len(image_files_in(sub))
        if prompt is None:
            reg_left_out += found
            continue
        if not found:
            continue
        # reg/ holds class images by kohya's layout, whatever an earlier ingest of it took them for
        supplied = supplied_priors(con, sub, class_prompt=prompt, including_training_photos=True, workers=workers,
                                   progress=progress)
        reg_images += supplied.added + supplied.already
        progress(task="import", message=f"{sub.name}: {supplied.added + supplied.already} class image(s) of {prompt!r} "
                 "(kohya regularisation images: DreamBooth training takes them before generating any)")
    if reg_left_out:
        progress(task="import", message=f"left out {reg_left_out} image(s) in reg/ folders not named like `1_dog`: kohya "
                 "reads regularisation images from `N_class` folders; `workbench priors --from FOLDER --class-prompt …` adds them")
    return {
        **counts,
        "files_outside_subset_folders": left_out,
        "concept_folders": len(concept_dirs) - len(plain_dirs),
        "folders_without_concept": len(plain_dirs),
        "images_assigned_to_concepts": assigned,
        "concepts": len(list_concepts(con)),
        "reg_class_images": reg_images,
        "reg_images_left_out": reg_left_out,
    }


# sd-scripts' dataset config (`--dataset_config`, library/config_util.py): [general] settings, then [[datasets]],
# each with [[datasets.subsets]]; a subset inherits what its dataset and [general] set. These keys say which images
# a subset holds and how they count; every other key is a training setting.
KOHYA_SUBSET_KEYS = frozenset({"image_dir", "num_repeats", "class_tokens", "is_reg", "caption_extension"})
KOHYA_CAPTION_EXTENSIONS = (".txt", ".caption")  # the sidecars ingest reads (kohya's default is ".caption")


@dataclass(frozen=True)
class KohyaSubset:
    """One DreamBooth-style subset of a kohya dataset config, with the settings it inherits."""

    image_dir: Path
    num_repeats: int
    class_tokens: str | None
    is_reg: bool
    caption_extension: str


def kohya_dataset_subsets(config_file: str | os.PathLike[str]) -> tuple[list[KohyaSubset], list[str]]:
    """The subsets of a kohya dataset config (TOML or JSON) and the training settings it also holds (their names);
    anything import-kohya cannot read as kohya would is refused here, before the catalog changes."""
    import tomllib

    path = Path(config_file)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (OSError, UnicodeDecodeError) as error:
        raise ExportError(f"{path} could not be read: {error}. Nothing was imported.") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ExportError(f"{path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'}: {error}. "
                          "Nothing was imported.") from None
    general = data.get("general", {}) if isinstance(data, dict) else None
    datasets = data.get("datasets") if isinstance(data, dict) else None
    if not isinstance(general, dict) or not isinstance(datasets, list) or not datasets or not all(
            isinstance(d, dict) and isinstance(d.get("subsets"), list) and d["subsets"] for d in datasets):
        raise ExportError(f"{path} is not a kohya dataset config: it needs [[datasets]] with [[datasets.subsets]] "
                          "(sd-scripts' --dataset_config; a folder of `N_trigger class` subfolders is imported by its path). Nothing was imported.")
    subsets: list[KohyaSubset] = []
    settings = {key for key in general if key not in KOHYA_SUBSET_KEYS}
    for d, dataset in enumerate(datasets, 1):
        settings |= {key for key in dataset if key not in KOHYA_SUBSET_KEYS | {"subsets"}}
        for s, subset in enumerate(dataset["subsets"], 1):
            if not isinstance(subset, dict):
                raise ExportError(f"{path}: dataset {d}, subset {s} is not a table of settings. Nothing was imported.")
            merged = {**general, **{k: v for k, v in dataset.items() if k != "subsets"}, **subset}
            where = f"{path}: dataset {d}, subset {s}"
            if "metadata_file" in merged:
                raise ExportError(f"{where} is a fine-tuning subset (metadata_file): import-kohya reads DreamBooth-style "
                                  "subsets (image_dir with caption files); `workbench ingest DIR` reads its images and any "
                                  "caption files beside them. Nothing was imported.")
            if "conditioning_data_dir" in merged:
                raise ExportError(f"{where} is a ControlNet subset (conditioning_data_dir): not read here. Nothing was imported.")
            image_dir = merged.get("image_dir")
            if not isinstance(image_dir, str) or not image_dir.strip():
                raise ExportError(f"{where} has no image_dir. Nothing was imported.")
            folder = Path(os.path.expanduser(image_dir))  # relative: to the folder the command runs in, as sd-scripts reads it
            if not folder.is_dir():
                raise ExportError(f"{where}: image_dir {image_dir!r} is not a folder"
                                  + (" (a relative path is read from the folder the command runs in, as sd-scripts "
                                     "reads it)" if not folder.is_absolute() else "") + ". Nothing was imported.")
            repeats = merged.get("num_repeats", 1)
            if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
                raise ExportError(f"{where}: num_repeats must be a whole number of at least 1, not {repeats!r}. "
                                  "Nothing was imported.")
            tokens = merged.get("class_tokens")
            if tokens is not None and not isinstance(tokens, str):
                raise ExportError(f"{where}: class_tokens must be text, not {tokens!r}. Nothing was imported.")
            tokens = unicodedata.normalize("NFC", " ".join(tokens.split())) if tokens else None
            is_reg = merged.get("is_reg", False)
            if not isinstance(is_reg, bool):
                raise ExportError(f"{where}: is_reg must be true or false, not {is_reg!r}. Nothing was imported.")
            if is_reg and not tokens:
                raise ExportError(f"{where} is a regularisation subset without class_tokens: its class images need the "
                                  "class prompt they stand for (class_tokens = \"dog\"). Nothing was imported.")
            if tokens and set(tokens.split()[0]) & set(",/\\") and not is_reg:
                raise ExportError(f"{where}: the trigger of class_tokens {tokens!r} (its first word) must not hold a "
                                  "comma or a slash. Nothing was imported.")
            subsets.append(KohyaSubset(folder, repeats, tokens, is_reg, str(merged.get("caption_extension", ".caption"))))
    return subsets, sorted(settings)


def imported_kohya_dataset_config(
    con: duckdb.DuckDBPyConnection,
    config_file: str | os.PathLike[str],
    *,
    workers: int | None = None,
    progress: ProgressHook = null_progress,
    ingest_summary: list | None = None,
) -> dict:
    """Ingest the subsets of a kohya dataset config: image_dir subsets with their concepts (class_tokens "trigger
    class", num_repeats), is_reg subsets as supplied class priors of their class_tokens.
    `ingest_summary` gets the ingest's IngestSummary (for its notes)."""
    from pipelines.concepts import added_concept, get_concept, list_concepts, plain_folder_note
    from pipelines.ingest import ingested_images
    from pipelines.priors import class_prompt_of_tokens, supplied_priors

    subsets, settings = kohya_dataset_subsets(config_file)
    instance = [subset for subset in subsets if not subset.is_reg]
    regs = [subset for subset in subsets if subset.is_reg]
    from PIL import Image

    image_suffixes = set(Image.registered_extensions())
    # what sd-scripts trains on: the images directly in each image_dir (it reads them non-recursively)
    # (not hidden files: macOS `._img.jpg` companions, which a folder ingest and sd-scripts leave out too)
    files = sorted({p for subset in instance for p in subset.image_dir.iterdir()
                    if p.suffix.lower() in image_suffixes and not p.name.startswith(".") and p.is_file()})
    for extension in sorted({subset.caption_extension for subset in subsets} - set(KOHYA_CAPTION_EXTENSIONS)):
        progress(task="import", message=f"caption_extension {extension!r} is not read: ingest reads captions from "
                 f"{' and '.join(KOHYA_CAPTION_EXTENSIONS)} files beside the images; rename them to import their captions")
    for subset in instance:  # ingest reads both kinds of caption file; sd-scripts reads the config's one alone
        if subset.caption_extension not in KOHYA_CAPTION_EXTENSIONS:
            continue
        other = next(ext for ext in KOHYA_CAPTION_EXTENSIONS if ext != subset.caption_extension)
        only_other = [p for p in files if p.parent == subset.image_dir and p.with_suffix(other).is_file()
                      and not p.with_suffix(subset.caption_extension).is_file()]
        if only_other:
            progress(task="import", message=(
                f"{len(only_other)} image(s) in {subset.image_dir} have a {other} caption file and no "
                f"{subset.caption_extension}: sd-scripts with this config (caption_extension = "
                f"'{subset.caption_extension}') would not read it; here it is their caption"))
    counts: dict[str, Any] = {}
    if files:  # (a config of is_reg subsets alone ingests no photos)
        # the config says each subset's concept: a folder named like `10_sks dog` is not read as one as well
        summary = ingested_images(con, files, workers=workers, folder_concepts=False, progress=progress)
        if ingest_summary is not None:
            ingest_summary.append(summary)
        counts = summary.as_dict()
        counts.pop("images_joined_concepts", None)
    assigned = concepts_made = 0
    named: dict[str, tuple[int, Path]] = {}  # concept name -> the repeats and folder of the subset that made it here
    for subset in instance:
        if not subset.class_tokens:
            if subset.num_repeats > 1:
                progress(task="import", message=plain_folder_note(os.path.abspath(subset.image_dir), subset.num_repeats))
            continue
        trigger, *class_words = subset.class_tokens.split()
        name = subset.class_tokens
        if name in named and named[name] != (subset.num_repeats, subset.image_dir):
            # sd-scripts trains each subset with its own repeats: one concept each (as `10_sks dog` beside `5_sks dog`)
            name = (f"{subset.num_repeats}_{name}" if named[name][0] != subset.num_repeats
                    else f"{name} ({subset.image_dir.name})")
        named.setdefault(name, (subset.num_repeats, subset.image_dir))
        concepts_made += get_concept(con, name) is None
        try:
            result = added_concept(con, name, trigger=trigger, class_noun=" ".join(class_words) or "",
                                   repeats=subset.num_repeats, folder=subset.image_dir)
        except ValueError as error:  # its images are ingested: a rerun after the fix finds them unchanged
            raise ExportError(f"subset {subset.image_dir}: {error}") from None
        assigned += result["newly_assigned"]
        if result.get("left_in_other_concepts"):
            progress(task="import", message=f"{result['left_in_other_concepts']} image(s) of {subset.image_dir} stay "
                     f"in the concept they were in, not {name!r}: `workbench concept assign` moves them")
    reg_images = 0
    for subset in regs:
        # the prompt the concepts of that class train their priors with ("woman": 'a photo of a woman'), as the
        # folder import reads `reg/1_woman`: under the bare tokens no concept's training would take them
        prompt = class_prompt_of_tokens(con, subset.class_tokens)
        supplied = supplied_priors(con, subset.image_dir, class_prompt=prompt, including_training_photos=True,
                                   workers=workers, progress=progress)
        reg_images += supplied.added + supplied.already
        progress(task="import", message=f"{subset.image_dir}: {supplied.added + supplied.already} class image(s) of "
                 f"{prompt!r} (kohya regularisation images: DreamBooth training takes them before generating any)")
        if subset.num_repeats > 1:
            progress(task="import", message=f"{subset.image_dir}: num_repeats {subset.num_repeats} of a regularisation "
                     "subset is not kept: training takes as many class images as the DreamBooth recipe asks")
    if settings:
        progress(task="import", message=f"training settings in {Path(config_file).name} are not imported "
                 f"({', '.join(settings)}): give them to `workbench train` (kohya's names are answered with the "
                 "workbench's own)")
    return {
        **counts,
        "subsets": len(instance),
        "concepts_created": concepts_made,
        "concepts": len(list_concepts(con)),
        "images_assigned_to_concepts": assigned,
        "reg_subsets": len(regs),
        "reg_class_images": reg_images,
    }
