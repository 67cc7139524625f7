"""kohya-ss sd-scripts aspect-ratio buckets, reproduced exactly, and the step that stores them.

The arithmetic follows sd-scripts `library/model_util.py:make_bucket_resolutions` and
`library/train_util.py:BucketManager.select_bucket` / `trim_and_resize_if_required`
(read from upstream; re-written here, not copied): the same integer/float operations in
the same order, so an image lands in the same bucket with the same resized size and the
same centre crop as when sd-scripts trains on the exported folder.

sd-scripts reads the stored pixel size of a file (it ignores EXIF orientation), while the
catalog's width/height are after EXIF orientation (what the picture looks like), which
`aspect_buckets` uses. The exporter writes an EXIF-rotated image upright, so kohya reads
the same size and puts it in the same bucket. One difference in the pixels, not the
geometry: the training loader resizes with Pillow's LANCZOS, where sd-scripts shrinks
with OpenCV's INTER_AREA.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import NamedTuple, Sequence

import duckdb

from workbench.catalog import record_run, transaction
from workbench.progress import ProgressHook, null_progress

Resolution = int | tuple[int, int]


class BucketChoice(NamedTuple):
    """Where one image goes: its bucket, the size it is resized to, and the crop into the bucket."""

    bucket_width: int
    bucket_height: int
    resized_width: int
    resized_height: int
    crop_left: int
    crop_top: int


def as_resolution(resolution: Resolution | str) -> tuple[int, int]:
    """(width, height) from 512, (768, 512), "512" or "768,512" (kohya's --resolution syntax)."""
    if isinstance(resolution, str):
        parts = [p.strip() for p in resolution.split(",")]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"resolution {resolution!r} must be N or W,H (integers)") from None
        resolution = values[0] if len(values) == 1 else tuple(values)  # type: ignore[assignment]
    if isinstance(resolution, int):
        width = height = resolution
    else:
        if len(resolution) != 2:
            raise ValueError(f"resolution {resolution!r} must be N or W,H")
        width, height = (int(v) for v in resolution)
    if width <= 0 or height <= 0:
        raise ValueError(f"resolution {width}x{height} must be positive")
    return width, height


def default_bucket_settings(resolution: Resolution | str) -> dict:
    """kohya's defaults (sides 256–1024, step 64), scaled down below 256 px (the tiny model trains at 64)."""
    width, height = as_resolution(resolution)
    side = min(width, height)
    if side >= 256:
        return {"min_bucket_reso": 256, "max_bucket_reso": max(1024, width, height), "bucket_reso_steps": 64}
    step = max(8, side // 8 // 8 * 8)
    return {"min_bucket_reso": max(step, side // 2 // step * step), "max_bucket_reso": 2 * max(width, height),
            "bucket_reso_steps": step}


def adjusted_bucket_bounds(
    resolution: Resolution, min_bucket_reso: int, max_bucket_reso: int, bucket_reso_steps: int
) -> tuple[int, int]:
    """kohya's adjust_min_max_bucket_reso_by_steps: min rounded down, max rounded up to the step, then checked."""
    width, height = as_resolution(resolution)
    if bucket_reso_steps < 1:
        raise ValueError("bucket_reso_steps must be at least 1")
    if min_bucket_reso % bucket_reso_steps:
        min_bucket_reso -= min_bucket_reso % bucket_reso_steps
    if max_bucket_reso % bucket_reso_steps:
        max_bucket_reso += bucket_reso_steps - max_bucket_reso % bucket_reso_steps
    if min_bucket_reso < bucket_reso_steps:
        raise ValueError(f"min_bucket_reso must be at least bucket_reso_steps ({bucket_reso_steps}) once rounded down to it")
    if min(width, height) < min_bucket_reso:
        raise ValueError(f"min_bucket_reso {min_bucket_reso} must not exceed the resolution {width}x{height}")
    if max(width, height) > max_bucket_reso:
        raise ValueError(f"max_bucket_reso {max_bucket_reso} must not be below the resolution {width}x{height}")
    if max_bucket_reso < min_bucket_reso:
        raise ValueError("max_bucket_reso must be at least min_bucket_reso")
    return min_bucket_reso, max_bucket_reso


def make_bucket_resolutions(
    max_reso: Resolution, min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[tuple[int, int]]:
    """The sorted (width, height) buckets of about max_reso's area, sides multiples of `divisible`."""
    max_width, max_height = as_resolution(max_reso)
    max_area = max_width * max_height
    resos = {(int(math.sqrt(max_area) // divisible) * divisible,) * 2}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def _round_to_steps(value: float, steps: int) -> int:
    rounded = int(value + 0.5)
    return rounded - rounded % steps


def _centre_crop(bucket: tuple[int, int], resized: tuple[int, int]) -> tuple[int, int]:
    # trim_and_resize_if_required trims only the side that overflows, by half the excess (floor)
    left = (resized[0] - bucket[0]) // 2 if resized[0] > bucket[0] else 0
    top = (resized[1] - bucket[1]) // 2 if resized[1] > bucket[1] else 0
    return left, top


def select_bucket(
    width: int,
    height: int,
    *,
    resolution: Resolution = 512,
    min_bucket_reso: int = 256,
    max_bucket_reso: int = 1024,
    bucket_reso_steps: int = 64,
    no_upscale: bool = False,
    resos: Sequence[tuple[int, int]] | None = None,
) -> BucketChoice:
    """kohya's BucketManager.select_bucket plus its centre crop, for one image of width x height.

    `resos` may pass precomputed `make_bucket_resolutions` output (min/max already adjusted).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} must be positive")
    res_w, res_h = as_resolution(resolution)
    aspect_ratio = width / height
    if not no_upscale:
        if resos is None:
            low, high = adjusted_bucket_bounds((res_w, res_h), min_bucket_reso, max_bucket_reso, bucket_reso_steps)
            resos = make_bucket_resolutions((res_w, res_h), low, high, bucket_reso_steps)
        if (width, height) in resos:
            reso = (width, height)
        else:
            # first bucket with the smallest |AR error|, as numpy's argmin picks it
            errors = [abs(w / h - aspect_ratio) for w, h in resos]
            reso = resos[errors.index(min(errors))]
        if aspect_ratio > reso[0] / reso[1]:
            scale = reso[1] / height  # wider than the bucket: match heights, trim width
        else:
            scale = reso[0] / width
        resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    else:
        max_area = res_w * res_h
        if width * height > max_area:
            # shrink to the target area keeping AR; round one side to steps, derive the other,
            # and keep whichever rounding distorts the aspect ratio less
            resized_width = math.sqrt(max_area * aspect_ratio)
            resized_height = max_area / resized_width
            steps = bucket_reso_steps
            b_width_rounded = _round_to_steps(resized_width, steps)
            b_height_in_wr = _round_to_steps(b_width_rounded / aspect_ratio, steps)
            ar_width_rounded = b_width_rounded / b_height_in_wr if b_height_in_wr else math.inf
            b_height_rounded = _round_to_steps(resized_height, steps)
            b_width_in_hr = _round_to_steps(b_height_rounded * aspect_ratio, steps)
            ar_height_rounded = b_width_in_hr / b_height_rounded if b_height_rounded else math.inf
            if abs(ar_width_rounded - aspect_ratio) < abs(ar_height_rounded - aspect_ratio):
                resized = (b_width_rounded, int(b_width_rounded / aspect_ratio + 0.5))
            else:
                resized = (int(b_height_rounded * aspect_ratio + 0.5), b_height_rounded)
        else:
            resized = (width, height)
        # the bucket is the resized size floored to the step: crop, never pad
        reso = (resized[0] - resized[0] % bucket_reso_steps, resized[1] - resized[1] % bucket_reso_steps)
        if reso[0] == 0 or reso[1] == 0:
            raise ValueError(
                f"image {width}x{height} is smaller than one bucket step ({bucket_reso_steps} px) on a side"
            )
    crop_left, crop_top = _centre_crop(reso, resized)
    return BucketChoice(reso[0], reso[1], resized[0], resized[1], crop_left, crop_top)


def aspect_buckets(
    con: duckdb.DuckDBPyConnection,
    *,
    resolution: Resolution = 512,
    min_bucket_reso: int | None = None,
    max_bucket_reso: int | None = None,
    bucket_reso_steps: int | None = None,
    no_upscale: bool = False,
    progress: ProgressHook = null_progress,
) -> dict:
    """kohya bucket, resized size and crop of every dataset image, stored in `aspect_buckets`.

    Bucket bounds left as None take `default_bucket_settings(resolution)`.
    """
    res_w, res_h = as_resolution(resolution)
    defaults = default_bucket_settings((res_w, res_h))
    min_bucket_reso = defaults["min_bucket_reso"] if min_bucket_reso is None else min_bucket_reso
    max_bucket_reso = defaults["max_bucket_reso"] if max_bucket_reso is None else max_bucket_reso
    bucket_reso_steps = defaults["bucket_reso_steps"] if bucket_reso_steps is None else bucket_reso_steps
    if no_upscale:
        # kohya ignores min/max bucket reso with bucket_no_upscale; keep them only for the record
        low, high = min_bucket_reso, max_bucket_reso
        if bucket_reso_steps < 1:
            raise ValueError("bucket_reso_steps must be at least 1")
        resos = None
    else:
        low, high = adjusted_bucket_bounds((res_w, res_h), min_bucket_reso, max_bucket_reso, bucket_reso_steps)
        resos = make_bucket_resolutions((res_w, res_h), low, high, bucket_reso_steps)
    params = {
        "resolution": [res_w, res_h],
        "min_bucket_reso": low,
        "max_bucket_reso": high,
        "bucket_reso_steps": bucket_reso_steps,
        "no_upscale": no_upscale,
    }
    with record_run(con, "buckets", params) as run:
        images = con.execute(
            "SELECT image_id, width, height FROM dataset WHERE width > 0 AND height > 0 ORDER BY image_id"
        ).fetchall()
        total = len(images)
        progress(task="buckets", completed=0, total=total)
        rows, skipped, ar_errors = [], {}, []
        histogram: Counter[tuple[int, int]] = Counter()
        for done, (image_id, width, height) in enumerate(images, 1):
            try:
                choice = select_bucket(
                    width, height, resolution=(res_w, res_h), min_bucket_reso=low, max_bucket_reso=high,
                    bucket_reso_steps=bucket_reso_steps, no_upscale=no_upscale, resos=resos,
                )
            except ValueError as error:
                skipped[image_id] = str(error)
                continue
            rows.append((image_id, *choice, res_w, res_h, low, high, bucket_reso_steps, no_upscale))
            histogram[(choice.bucket_width, choice.bucket_height)] += 1
            ar_errors.append(abs(choice.bucket_width / choice.bucket_height - width / height))
            if done % 1000 == 0 or done == total:
                progress(task="buckets", completed=done, total=total)
        columns = ["image_id", "bucket_width", "bucket_height", "resized_width", "resized_height", "crop_left",
                   "crop_top", "resolution_width", "resolution_height", "min_bucket_reso", "max_bucket_reso",
                   "bucket_reso_steps", "no_upscale"]
        # one Arrow table, read by DuckDB's replacement scan: executemany is ~1000x slower for 100k rows.
        # Imported here: the trainer imports this module for select_bucket and need not carry pyarrow.
        import pyarrow as pa

        new_bucket_rows = pa.table(
            {name: [row[i] for row in rows] for i, name in enumerate(columns)},
            schema=pa.schema([(name, pa.string() if name == "image_id" else pa.bool_() if name == "no_upscale"
                               else pa.int32()) for name in columns]),
        )
        with transaction(con):
            con.execute("DELETE FROM aspect_buckets")
            con.execute(f"INSERT INTO aspect_buckets ({', '.join(columns)}) SELECT * FROM new_bucket_rows")
        for image_id, reason in list(skipped.items())[:20]:
            progress(task="buckets", completed=total, total=total, message=f"no bucket for {image_id[:12]}: {reason}")
        summary = {
            "images": len(rows),
            "buckets": len(histogram),
            "skipped": len(skipped),
            "mean_ar_error": round(sum(ar_errors) / len(ar_errors), 6) if ar_errors else 0.0,
            "histogram": {f"{w}x{h}": n for (w, h), n in sorted(histogram.items())},
        }
        run.counts = {k: v for k, v in summary.items() if k != "histogram"}
    return summary
