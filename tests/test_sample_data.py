"""Every planted case in sample_data/README.md ends as the README says."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelines.dedup import duplicate_groups
from pipelines.ingest import ingested_images

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data"


@pytest.fixture(scope="module")
def sample_catalog(tmp_path_factory):
    from workbench.catalog import connect

    path = tmp_path_factory.mktemp("sample") / "workbench.duckdb"
    con = connect(path)
    summary = ingested_images(con, [SAMPLE_DATA], workers=2)
    dedup = duplicate_groups(con, threshold=6)
    yield con, summary, dedup
    con.close()


def row(con, suffix: str) -> dict:
    frame = con.sql("SELECT * FROM images_view WHERE list_contains(list_transform(paths, lambda p: p LIKE '%' || ?), true)", params=[suffix]).pl()
    assert frame.height == 1, f"expected one image for {suffix}, got {frame.height}"
    return frame.to_dicts()[0]


def test_distinct_photos_are_ok(sample_catalog):
    con, summary, _ = sample_catalog
    photos = con.sql("SELECT status, count(*) n FROM images_view WHERE path LIKE '%/photos/%' GROUP BY status").fetchall()
    # rocket.jpg is also at copies/ (seen first), so 16 of the 17 photos have a photos/ first path.
    assert dict(photos) == {"ok": 16}
    assert summary.directory_cycles_skipped == 1


def test_sidecars_become_sidecar_captions(sample_catalog):
    con, _, _ = sample_catalog
    assert row(con, "photos/coffee.jpg")["caption"] == "a cup of coffee on a saucer, top view"
    assert row(con, "photos/coffee.jpg")["caption_source"] == "sidecar"
    chelsea = con.sql(
        "SELECT c.text FROM captions c JOIN paths p USING (image_id) WHERE p.path LIKE '%photos/chelsea.jpg' AND c.source = 'sidecar'"
    ).fetchall()
    assert chelsea == [("a tabby cat looking at the camera",)]


def test_byte_identical_copies_are_one_image_with_two_paths(sample_catalog):
    con, _, dedup = sample_catalog
    rocket = row(con, "photos/rocket.jpg")
    assert sorted(os.path.basename(p) for p in rocket["paths"]) == ["rocket.jpg", "rocket_copy.jpg"]
    assert rocket["caption"] == "a rocket on its launch pad"
    assert dedup["extra_identical_files"] == 1


@pytest.mark.parametrize(
    "kept, dropped",
    [
        ("photos/coffee.jpg", "duplicates/coffee_small_q70.jpg"),
        ("photos/astronaut.jpg", "duplicates/astronaut_384.webp"),
        ("duplicates/chelsea_lossless.png", "photos/chelsea.jpg"),
    ],
)
def test_near_duplicates_keep_the_best_copy(sample_catalog, kept, dropped):
    con, _, _ = sample_catalog
    keeper, other = row(con, kept), row(con, dropped)
    assert keeper["duplicate_group"] is not None and keeper["duplicate_group"] == other["duplicate_group"]
    assert keeper["is_keeper"] and not keeper["excluded"]
    assert not other["is_keeper"] and other["excluded"]
    assert other["exclusion_reason"] == f"duplicate of {keeper['image_id']}"


def test_exif_orientation(sample_catalog):
    con, _, _ = sample_catalog
    gravel = row(con, "exif/gravel_orientation6.jpg")
    assert (gravel["width"], gravel["height"]) == (512, 384)
    clock_rotated, clock = row(con, "exif/clock_orientation8.jpg"), row(con, "photos/clock.jpg")
    assert clock_rotated["duplicate_group"] == clock["duplicate_group"] is not None


@pytest.mark.parametrize(
    "suffix, reason",
    [
        ("bad/zero_byte.jpg", "empty file"),
        ("bad/truncated.jpg", "truncated image"),
        ("bad/text_named_as.jpg", "not an image: the content is text"),
        ("bad/decompression_bomb.png", "pixel cap"),
        ("bad/loop_a.jpg", "symbolic link loop"),
        ("bad/loop_b.jpg", "symbolic link loop"),
    ],
)
def test_bad_input_gets_an_error_row(sample_catalog, suffix, reason):
    con, _, _ = sample_catalog
    found = row(con, suffix)
    assert found["status"] == "error"
    assert reason in found["error"]


@pytest.mark.parametrize(
    "suffix, mode, extra",
    [
        ("caf\\xe9_latin1_name.jpg", "RGB", {}),
        ("bad/sixteen_bit.png", "I;16", {"is_grayscale": True}),
        ("bad/cmyk.jpg", "CMYK", {}),
        ("bad/palette_transparency.png", "P", {}),
        ("bad/animated.gif", "P", {"n_frames": 4}),
        ("bad/png_with_wrong_extension.dat", "RGB", {"format": "PNG"}),
    ],
)
def test_unusual_but_valid_images_are_ok(sample_catalog, suffix, mode, extra):
    con, _, _ = sample_catalog
    found = row(con, suffix)
    assert found["status"] == "ok", found["error"]
    assert found["mode"] == mode
    for key, value in extra.items():
        assert found[key] == value
    assert found["phash"] is not None


def test_non_image_files_are_ignored(sample_catalog):
    con, _, _ = sample_catalog
    assert con.sql("SELECT count(*) FROM paths WHERE path LIKE '%notes.md' OR path LIKE '%.txt' OR path LIKE '%.caption'").fetchall() == [(0,)]


def test_dataset_is_ok_and_not_excluded(sample_catalog):
    con, _, _ = sample_catalog
    total_ok = con.sql("SELECT count(*) FROM images_view WHERE status = 'ok'").fetchall()[0][0]
    excluded = con.sql("SELECT count(*) FROM images_view WHERE status = 'ok' AND excluded").fetchall()[0][0]
    dataset = con.sql("SELECT count(*) FROM dataset").fetchall()[0][0]
    assert excluded == 4 and dataset == total_ok - excluded


def test_kohya_folder_becomes_a_concept(sample_catalog):
    con, summary, _ = sample_catalog
    assert summary.images_joined_concepts == 3
    concept = con.sql("SELECT name, trigger_token, class_noun, repeats FROM concepts").fetchall()
    assert concept == [("wbk cat", "wbk", "cat", 5)]


def test_second_ingest_of_the_sample_data_reads_nothing_again(tmp_path):
    """Files that cannot even be stat'ed (the link loops) stay as recorded; they are not 'changed' on every run."""
    from workbench.catalog import connect

    con = connect(tmp_path / "again.duckdb")
    first = ingested_images(con, [SAMPLE_DATA], workers=1)
    second = ingested_images(con, [SAMPLE_DATA], workers=1)
    errors = con.execute("SELECT count(*) FROM images WHERE status = 'error'").fetchone()[0]
    con.close()
    assert first.new == first.files_seen and errors == 6
    assert (second.new, second.changed, second.unchanged) == (0, 0, second.files_seen)
