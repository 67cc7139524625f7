"""kohya-ss aspect buckets: exact bucket lists and selections (hand-checked), properties, the catalog step, CLI."""

from __future__ import annotations

import itertools
import random

import pytest
from typer.testing import CliRunner

from pipelines.buckets import (
    BucketChoice,
    adjusted_bucket_bounds,
    aspect_buckets,
    default_bucket_settings,
    make_bucket_resolutions,
    select_bucket,
)

# Worked out by hand from sd-scripts model_util.make_bucket_resolutions with max_area 512*512 = 262144:
# w=256: 262144//256 = 1024 -> 1024; w=320: 819 -> 768; w=384: 682 -> 640; w=448: 585 -> 576;
# w=512: 512; w=576: 455 -> 448; w=640: 409 -> 384; w=704: 372 -> 320; w=768: 341 -> 320;
# w=832/896/960/1024: 315/292/273/256 -> 256; plus both orientations and the 512 square.
KOHYA_512_BUCKETS = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]

# (width, height) -> (bucket_w, bucket_h, resized_w, resized_h, crop_left, crop_top), upscaling allowed.
# Each worked by hand: nearest bucket AR (first on ties), scale to cover (int(x*scale+0.5)), centre trim (floor).
UPSCALE_CASES = {
    # AR 1.333: 576x448 (1.286) is nearest; wider than bucket -> scale = 448/768; 1024*0.5833 = 597.3 -> 597
    (1024, 768): (576, 448, 597, 448, 10, 0),
    (800, 600): (576, 448, 597, 448, 10, 0),
    # portrait mirror: 448x576, scale = 448/768, height 597, trim (597-576)//2 = 10 from the top
    (768, 1024): (448, 576, 448, 597, 0, 10),
    # exact predefined size: kept as is
    (512, 512): (512, 512, 512, 512, 0, 0),
    (576, 448): (576, 448, 576, 448, 0, 0),
    # AR 0.25 equals 256x1024 exactly -> not wider -> scale = 256/300
    (300, 1200): (256, 1024, 256, 1024, 0, 0),
    # AR 4 equals 1024x256; scale = 1024/2000
    (2000, 500): (1024, 256, 1024, 256, 0, 0),
    # AR 1.778: 640x384 (1.667) nearest; scale = 384/1080; 1920*0.3556 = 682.7 -> 683; trim 21
    (1920, 1080): (640, 384, 683, 384, 21, 0),
    # small images are upscaled: 100x100 -> 512x512
    (100, 100): (512, 512, 512, 512, 0, 0),
}

# Same, with bucket_no_upscale (buckets made on the fly; min/max bucket reso ignored as in kohya).
NO_UPSCALE_CASES = {
    # fits in 512*512 already: no resize; bucket floors to 64: 256x192; trims 22 and 4
    (300, 200): (256, 192, 300, 200, 22, 4),
    # too big, AR 1: both roundings give 512x512
    (1024, 1024): (512, 512, 512, 512, 0, 0),
    # AR 1.778: width-rounded 640x320 (AR 2.0) loses to height-rounded 640x384 (1.667);
    # resized (int(384*1.778+0.5), 384) = (683, 384) -> bucket 640x384, trim 21
    (1920, 1080): (640, 384, 683, 384, 21, 0),
    # AR 6: sqrt(262144*6) = 1254.1 -> 1216 wide gives 1216x192 (6.33); height 209 -> 192 gives 1152x192 (6.0) -> wins.
    # The bucket is wider than max_bucket_reso 1024: no_upscale ignores it, as kohya does.
    (6000, 1000): (1152, 192, 1152, 192, 0, 0),
    # AR 1.4: 605.8 -> 576 wide gives 576x384 (1.5, err .1); 432.7 -> 384 high gives 512x384 (1.333, err .067)
    # -> resized (int(537.6+0.5), 384) = (538, 384), bucket 512x384, trim 13
    (700, 500): (512, 384, 538, 384, 13, 0),
}


def test_seventeen_buckets_for_512_between_256_and_1024():
    buckets = make_bucket_resolutions((512, 512), 256, 1024, 64)
    assert buckets == KOHYA_512_BUCKETS
    assert len(buckets) == 17


@pytest.mark.parametrize("size,expected", sorted(UPSCALE_CASES.items()))
def test_select_bucket_matches_hand_checked_kohya_values(size, expected):
    assert tuple(select_bucket(*size)) == expected


@pytest.mark.parametrize("size,expected", sorted(NO_UPSCALE_CASES.items()))
def test_select_bucket_no_upscale_matches_hand_checked_kohya_values(size, expected):
    assert tuple(select_bucket(*size, no_upscale=True)) == expected


def test_min_max_bucket_reso_are_rounded_to_the_step_like_kohya():
    assert adjusted_bucket_bounds(512, 250, 1000, 64) == (192, 1024)
    assert adjusted_bucket_bounds((768, 512), 256, 1024, 64) == (256, 1024)
    with pytest.raises(ValueError, match="min_bucket_reso"):
        adjusted_bucket_bounds(512, 640, 1024, 64)
    with pytest.raises(ValueError, match="max_bucket_reso"):
        adjusted_bucket_bounds(1024, 256, 768, 64)


def test_no_upscale_refuses_images_smaller_than_one_step():
    with pytest.raises(ValueError, match="smaller than one bucket step"):
        select_bucket(50, 50, no_upscale=True)


def _sizes():
    rng = random.Random(7)
    sizes = [(rng.randint(16, 4000), rng.randint(16, 4000)) for _ in range(400)]
    sizes += [(w, h) for w, h in itertools.product([64, 255, 256, 511, 512, 513, 1023, 1024, 3000], repeat=2)]
    return sizes


@pytest.mark.parametrize("resolution,steps", [((512, 512), 64), ((768, 512), 32), ((1024, 1024), 64)])
def test_upscale_properties(resolution, steps):
    low, high = adjusted_bucket_bounds(resolution, 256, 2048, steps)
    resos = make_bucket_resolutions(resolution, low, high, steps)
    area = resolution[0] * resolution[1]
    assert resos == sorted(set(resos))
    for w, h in resos:
        assert w % steps == 0 and h % steps == 0 and low <= w <= high and low <= h <= high
        assert w * h <= area
        assert (h, w) in resos or (w == h)
    for width, height in _sizes():
        choice = select_bucket(width, height, resolution=resolution, min_bucket_reso=256, max_bucket_reso=2048,
                               bucket_reso_steps=steps)
        bucket = (choice.bucket_width, choice.bucket_height)
        assert bucket in resos
        if (width, height) not in resos:
            best = min(abs(w / h - width / height) for w, h in resos)
            assert abs(bucket[0] / bucket[1] - width / height) == best
        # the resized image covers the bucket and matches it on one side
        assert choice.resized_width >= bucket[0] and choice.resized_height >= bucket[1]
        assert choice.resized_width == bucket[0] or choice.resized_height == bucket[1]
        assert choice.crop_left == (choice.resized_width - bucket[0]) // 2
        assert choice.crop_top == (choice.resized_height - bucket[1]) // 2


def test_no_upscale_properties():
    for width, height in _sizes():
        if width < 64 or height < 64:
            continue
        choice = select_bucket(width, height, no_upscale=True)
        assert isinstance(choice, BucketChoice)
        assert choice.bucket_width % 64 == 0 and choice.bucket_height % 64 == 0
        # never enlarged, never padded
        assert choice.resized_width <= width + 1 and choice.resized_height <= height + 1
        assert choice.bucket_width <= choice.resized_width and choice.bucket_height <= choice.resized_height
        if width * height <= 512 * 512:
            assert (choice.resized_width, choice.resized_height) == (width, height)
        assert 0 <= choice.crop_left < 64 and 0 <= choice.crop_top < 64


def _add_image(con, n: int, width: int, height: int) -> str:
    image_id = f"{n:064x}"
    con.execute("INSERT INTO images (image_id, width, height, status) VALUES (?, ?, ?, 'ok')", [image_id, width, height])
    path = f"/data/img{n}.png"
    con.execute("INSERT INTO paths (path, path_bytes, image_id, seq) VALUES (?, ?, ?, ?)", [path, path.encode(), image_id, n])
    return image_id


def test_aspect_buckets_step_stores_buckets_for_the_dataset_and_reruns_cleanly(con):
    sizes = {1: (1024, 768), 2: (800, 600), 3: (512, 512), 4: (1920, 1080), 5: (40, 40)}
    ids = {n: _add_image(con, n, *size) for n, size in sizes.items()}
    con.execute("INSERT INTO exclusions VALUES (?, 'manual', 'manual: test', now())", [ids[3]])
    summary = aspect_buckets(con)
    assert summary["histogram"] == {"512x512": 1, "576x448": 2, "640x384": 1}
    assert summary["images"] == 4 and summary["skipped"] == 0
    rows = dict(con.execute("SELECT image_id, [bucket_width, bucket_height, bucket_crop_left] FROM dataset").fetchall())
    assert rows[ids[1]] == [576, 448, 10]
    assert rows[ids[4]] == [640, 384, 21]
    assert ids[3] not in rows  # excluded images get no bucket
    # a second run with other settings replaces the first; the tiny image has no bucket without upscaling
    summary = aspect_buckets(con, no_upscale=True)
    assert summary["skipped"] == 1
    assert con.execute("SELECT count(*) FROM aspect_buckets").fetchone()[0] == 3
    assert con.execute("SELECT bool_and(no_upscale) FROM aspect_buckets").fetchone()[0] is True
    run = con.execute("SELECT status, params FROM runs WHERE step = 'buckets' ORDER BY run_id DESC LIMIT 1").fetchone()
    assert run[0] == "ok" and '"no_upscale": true' in run[1]


def test_buckets_cli_prints_histogram_and_rejects_bad_input(catalog_path, con):
    from workbench.cli import app

    _add_image(con, 1, 1024, 768)
    con.close()
    runner = CliRunner()
    result = runner.invoke(app, ["buckets", "--catalog", str(catalog_path), "--resolution", "512"])
    assert result.exit_code == 0, result.output
    assert "576x448" in result.output and "Note" not in result.output
    odd = runner.invoke(app, ["buckets", "--catalog", str(catalog_path), "--resolution", "64", "--bucket-reso-steps", "7"])
    assert odd.exit_code == 0 and "not a multiple of 8" in " ".join(odd.output.split())
    bad = runner.invoke(app, ["buckets", "--catalog", str(catalog_path), "--resolution", "big"])
    assert bad.exit_code == 2 and "resolution" in bad.output
    bad = runner.invoke(app, ["buckets", "--catalog", str(catalog_path), "--min-bucket-reso", "1024"])
    assert bad.exit_code == 2 and "min_bucket_reso" in bad.output
    bad = runner.invoke(app, ["buckets", "--catalog", str(catalog_path), "--resolution", "64", "--min-bucket-reso", "32",
                              "--bucket-reso-steps", "64"])  # 32 rounds down to 0 at step 64: an error, not a crash
    assert bad.exit_code == 2 and "at least bucket_reso_steps (64)" in " ".join(bad.output.split())
    small = runner.invoke(app, ["buckets", "--catalog", str(catalog_path), "--resolution", "64"])
    assert small.exit_code == 0, small.output  # the defaults scale down below 256 px, as the trainer's do
    assert "72x56" in small.output  # 1024x768 at 64 px with step 8
    # images smaller than their bucket are enlarged by kohya without a word: said, with the options that avoid it
    import duckdb

    con = duckdb.connect(str(catalog_path))
    _add_image(con, 2, 128, 128)
    con.close()
    enlarged = runner.invoke(app, ["buckets", "--catalog", str(catalog_path), "--resolution", "512"], env={"COLUMNS": "200"})
    said = " ".join(enlarged.output.split())
    assert enlarged.exit_code == 0 and "1 image(s) are smaller than their bucket" in said and "(up to 4.0x)" in said, said
    assert "--no-upscale" in said
    kept = runner.invoke(app, ["buckets", "--catalog", str(catalog_path), "--resolution", "512", "--no-upscale"])
    assert kept.exit_code == 0 and "smaller than their bucket" not in kept.output


def test_default_bucket_settings_are_kohyas_from_256_px_and_scaled_below():
    assert default_bucket_settings(512) == {"min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64}
    assert default_bucket_settings(1280)["max_bucket_reso"] == 1280
    assert default_bucket_settings(64) == {"min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 8}
    for resolution in (64, 128, 200, (96, 64), 512, 768):
        settings = default_bucket_settings(resolution)
        adjusted_bucket_bounds(resolution, settings["min_bucket_reso"], settings["max_bucket_reso"], settings["bucket_reso_steps"])
