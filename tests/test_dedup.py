"""Dedup: the multi-index search finds exactly the brute-force pairs; the keep policy; regrouping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.dedup import (
    _keep_reason,
    brute_force_pairs,
    choose_keeper,
    duplicate_groups,
    hamming_pairs,
    keep_order_key,
    largest_pixels,
)


def planted_hashes(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**63, size=n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + rng.integers(0, 2, size=n).astype(np.uint64)
    # Plant near duplicates at every distance 0..12 and clusters sharing a prefix (skewed buckets).
    for k in range(0, n // 4):
        source = hashes[rng.integers(0, n)]
        flips = rng.choice(64, size=k % 13, replace=False)
        value = int(source)
        for bit in flips:
            value ^= 1 << int(bit)
        hashes[rng.integers(0, n)] = np.uint64(value)
    hashes[: n // 20] &= np.uint64(0xFFFFFFFF00000000)
    return hashes


@pytest.mark.parametrize("threshold", [0, 1, 3, 6, 8, 10])
def test_search_finds_exactly_the_brute_force_pairs(threshold, monkeypatch):
    import pipelines.dedup

    monkeypatch.setattr(pipelines.dedup, "SMALL_N", 0)  # exercise the multi-index search, not the small-N path
    hashes = planted_hashes(3000, seed=threshold)
    i, j, d = hamming_pairs(hashes, threshold)
    found = set(zip(i.tolist(), j.tolist()))
    expected = brute_force_pairs(hashes, threshold)
    assert len(expected) > 0
    assert found == expected
    assert (d <= threshold).all()


def test_small_inputs_take_the_direct_path_with_the_same_answer():
    hashes = planted_hashes(500, seed=7)
    i, j, d = hamming_pairs(hashes, 6)
    assert set(zip(i.tolist(), j.tolist())) == brute_force_pairs(hashes, 6)
    assert (d <= 6).all()


def member(image_id, width, height, fmt, size, seq, mode="RGB", grey=False):
    return {"image_id": image_id, "width": width, "height": height, "format": fmt, "bytes": size, "first_seq": seq,
            "mode": mode, "is_grayscale": grey}


def test_keep_policy_order():
    big_jpeg = member("a", 1000, 800, "JPEG", 10, 5)
    small_png = member("b", 500, 400, "PNG", 99, 1)
    same_png = member("c", 1000, 800, "PNG", 5, 9)
    bigger_file = member("d", 1000, 800, "PNG", 6, 10)
    first_path = member("e", 1000, 800, "PNG", 6, 2)
    ranked = sorted([big_jpeg, small_png, same_png, bigger_file, first_path], key=keep_order_key)
    assert [m["image_id"] for m in ranked] == ["e", "d", "c", "a", "b"]


def test_a_copy_a_border_larger_does_not_beat_its_lossless_original():
    """A large-set review: a letterboxed JPEG (398x398, black bars padded on) was kept over its 395x398 PNG original
    for "highest resolution". Within 3% of the largest copy's pixels, the rest of the policy decides."""
    original = member("original", 395, 398, "PNG", 300_000, 2)
    padded = member("padded", 398, 398, "JPEG", 40_000, 1)
    largest = largest_pixels([original, padded])
    assert min([original, padded], key=lambda m: keep_order_key(m, largest))["image_id"] == "original"
    assert _keep_reason(original, padded, largest) == "lossless PNG over lossy JPEG"
    # more than a border: resolution still wins (a 5% larger JPEG is the better source)
    larger = member("larger", 405, 408, "JPEG", 40_000, 1)
    largest = largest_pixels([original, larger])
    assert min([original, larger], key=lambda m: keep_order_key(m, largest))["image_id"] == "larger"
    assert _keep_reason(larger, original, largest) == "highest resolution (405x408)"


def test_setting_apart_the_hub_of_a_hash_keeps_a_flipped_copy_in_the_group(con):
    """A code review: mirrored pairs hang on one image per hash value too, and setting that image apart took the
    flipped copy out of the group with it (a, b identical; c a flipped copy, paired with a)."""
    from pipelines.dedup import image_set_apart

    plain, flipped = 0x0F0F_F0F0_1234_5678, 0x3333_3333_3333_3333
    insert_image(con, "a" * 64, plain, 300, 200, seq=1, mirror=flipped)
    insert_image(con, "b" * 64, plain, 300, 200, seq=2, mirror=flipped)
    insert_image(con, "c" * 64, flipped, 300, 200, seq=3)  # its pHash is a's and b's mirrored one
    duplicate_groups(con)
    assert con.execute("SELECT image_a, image_b FROM duplicate_pairs WHERE method = 'mirror'").fetchall() == [("a" * 64, "c" * 64)]
    image_set_apart(con, "a" * 64)
    assert {row[0] for row in con.execute("SELECT image_id FROM duplicates").fetchall()} == {"b" * 64, "c" * 64}


def test_a_group_split_from_a_chain_ranks_and_explains_its_keeper_against_its_own_largest_copy(con):
    """A code review: a chain A-B-C-D (2000², 1400², 1000² JPEG, 995² PNG) split into [A, B] and [C, D]; C, D were
    ranked against A's size, so the JPEG C won, and the reason read "lossless JPEG over lossy PNG"."""
    insert_image(con, "a", 0x0, 2000, 2000, seq=1)
    insert_image(con, "b", 0b1111, 1400, 1400, seq=2)  # 4 bits from a
    insert_image(con, "c", 0b11111111, 1000, 1000, seq=3)  # 4 from b, 8 from a
    insert_image(con, "d", 0b111111111111, 995, 995, fmt="PNG", seq=4)  # 4 from c, 8 from b
    duplicate_groups(con, threshold=4, mirrored=False)
    rows = con.execute("SELECT image_id, keeper_id, keep_reason FROM duplicates WHERE is_keeper ORDER BY 1").fetchall()
    assert rows == [("a", "a", "highest resolution (2000x2000)"), ("d", "d", "lossless PNG over lossy JPEG")]


def test_keep_policy_prefers_colour_and_full_colour_copies():
    """A scraped set's 16-colour PNG repost was kept over the photo ("lossless PNG over lossy JPEG"), a 16-bit grey
    copy over the colour original, and a CMYK copy for its larger file."""
    photo = member("photo", 1000, 800, "JPEG", 100, 1)
    palette = member("palette", 1000, 800, "PNG", 300, 2, mode="P")
    cmyk = member("cmyk", 1000, 800, "JPEG", 200, 3, mode="CMYK")
    grey_bigger = member("grey", 2000, 1600, "PNG", 900, 4, mode="I;16", grey=True)
    assert [m["image_id"] for m in sorted([grey_bigger, cmyk, palette, photo], key=keep_order_key)] == [
        "photo", "cmyk", "palette", "grey"]
    # a black-and-white photo is grey in every copy: resolution decides, whatever the mode
    bw_rgb = member("bw_rgb", 500, 400, "JPEG", 100, 1, grey=True)
    bw_large = member("bw_large", 1000, 800, "PNG", 100, 2, mode="L", grey=True)
    assert min([bw_rgb, bw_large], key=keep_order_key)["image_id"] == "bw_large"


def insert_image(con, image_id, phash, width, height, fmt="JPEG", size=1000, seq=1, mirror=None):
    mirror = phash ^ (2**64 - 1) if mirror is None else mirror  # by default far from every planted hash
    con.execute("INSERT INTO images (image_id, status, width, height, format, bytes) VALUES (?, 'ok', ?, ?, ?, ?)", [image_id, width, height, fmt, size])
    con.execute("INSERT INTO hashes VALUES (?, ?, 0, ?)", [image_id, phash, mirror])
    con.execute("INSERT INTO paths (path, path_bytes, image_id, seq) VALUES (?, ?::BLOB, ?, ?)", [f"/d/{image_id}", f"/d/{image_id}", image_id, seq])


def test_groups_keepers_and_rerun(con):
    base = 0x0F0F_F0F0_1234_5678
    insert_image(con, "small", base ^ 0b11, 100, 100, seq=1)
    insert_image(con, "large", base, 400, 300, seq=2)
    insert_image(con, "far", base ^ 0xFFFF, 400, 300, seq=3)
    insert_image(con, "twin", base ^ 0b1, 100, 100, seq=4)
    counts = duplicate_groups(con, threshold=6)
    assert counts["groups"] == 1 and counts["excluded_as_duplicates"] == 2
    rows = dict(con.execute("SELECT image_id, exclusion_reason FROM images_view").fetchall())
    assert rows == {"small": "duplicate of large", "twin": "duplicate of large", "large": None, "far": None}
    before = con.execute("SELECT * FROM duplicates ORDER BY image_id").fetchall()
    duplicate_groups(con, threshold=6)
    assert con.execute("SELECT * FROM duplicates ORDER BY image_id").fetchall() == before
    # A tighter threshold splits the group cleanly; exclusions follow.
    duplicate_groups(con, threshold=0)
    rows = dict(con.execute("SELECT image_id, exclusion_reason FROM images_view").fetchall())
    assert rows == {"small": None, "twin": None, "large": None, "far": None}


def test_a_dry_run_says_what_a_threshold_would_exclude_and_changes_nothing(con, catalog_path):
    """A large-set review: trying a threshold rewrote the groups and exclusions (filter and exclude had --dry-run)."""
    from typer.testing import CliRunner

    from workbench.catalog import connect
    from workbench.cli import app

    base = 0x0F0F_F0F0_1234_5678
    insert_image(con, "small", base ^ 0b11, 100, 100, seq=1)
    insert_image(con, "large", base, 400, 300, seq=2)
    insert_image(con, "near", base ^ 0xFF, 400, 300, seq=3)  # 8 bits from large: out at 6, in at 10
    duplicate_groups(con, threshold=6)
    tables = ("duplicates", "duplicate_pairs", "exclusions", "runs", "hashes")
    before = {table: con.execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall() for table in tables}
    con.close()
    result = CliRunner().invoke(app, ["dedup", "--threshold", "10", "--dry-run", "--catalog", str(catalog_path)],
                                env={"COLUMNS": "200"})
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and "--dry-run: nothing changed" in said, result.output
    assert "newly excluded as duplicates │ 1" in said and "no longer excluded │ 0" in said, said
    assert "dataset images now │ 2" in said and "dataset images after │ 1" in said, said
    with connect(catalog_path) as after:
        assert {table: after.execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall() for table in tables} == before
    # stopped (Ctrl+C): a line saying what is kept, status 130 (a reliability review: it stopped without a word)
    import pipelines.dedup as dedup_module

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dedup_module, "regroup_duplicates", stop)
        result = CliRunner().invoke(app, ["dedup", "--catalog", str(catalog_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 130 and "Stopped: the duplicate groups and exclusions are as they were" in result.output, result.output


def test_keeper_chosen_by_hand_wins_and_survives_rerun(con):
    insert_image(con, "a", 7, 800, 600, seq=1)
    insert_image(con, "b", 7, 200, 150, seq=2)
    duplicate_groups(con)
    choose_keeper(con, "b")
    duplicate_groups(con)
    keeper, reason = con.execute("SELECT image_id, keep_reason FROM duplicates WHERE is_keeper").fetchall()[0]
    assert (keeper, reason) == ("b", "chosen by hand")
    assert con.execute("SELECT exclusion_reason FROM images_view WHERE image_id = 'a'").fetchall() == [("duplicate of b",)]


def test_dedup_never_touches_files(sample_copy, con):
    import hashlib

    from pipelines.ingest import ingested_images

    def fingerprint():
        return sorted(
            (str(p), hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sample_copy.rglob("*")
            if p.is_file() and not p.is_symlink()
        )

    before = fingerprint()
    ingested_images(con, [sample_copy], workers=1)
    duplicate_groups(con)
    assert fingerprint() == before


def _phash(con, image_id) -> int:
    return con.execute("SELECT phash FROM hashes WHERE image_id = ?", [image_id]).fetchone()[0]


def test_a_chain_of_close_frames_keeps_every_frame_that_is_far_from_all_keepers(con):
    """Burst frames each 3 bits from the next chain into one connected set although the first and last are 27 bits
    apart: only members within the threshold of their keeper are excluded (before: all but one of the ten)."""
    value = 0x0123_4567_89AB_CDEF
    for frame in range(10):
        insert_image(con, f"f{frame}", value, 400, 300, seq=frame)
        value ^= 0b111 << (3 * frame)  # three new bits each frame
    counts = duplicate_groups(con, threshold=6)
    rows = con.execute("SELECT image_id, keeper_id, is_keeper FROM duplicates").fetchall()
    for image_id, keeper_id, is_keeper in rows:
        assert bin(_phash(con, image_id) ^ _phash(con, keeper_id)).count("1") <= 6, (image_id, keeper_id)
    kept = {i for (i,) in con.execute("SELECT image_id FROM dataset").fetchall()}
    assert kept == {"f0", "f3", "f6", "f9"}  # each keeper takes the two frames after it
    assert counts["excluded_as_duplicates"] == 6


def test_identical_hashes_group_around_the_best_copy_whichever_is_stored_first(con):
    insert_image(con, "a", 7, 100, 100, seq=1)
    insert_image(con, "b", 7, 800, 600, seq=2)
    insert_image(con, "c", 7, 100, 100, seq=3)
    assert duplicate_groups(con)["excluded_as_duplicates"] == 2
    assert con.execute("SELECT image_id FROM dataset").fetchall() == [("b",)]



def _three_copies(con) -> tuple[str, str, str]:
    """(big, small, medium): one picture at three sizes, grouped by dedup (identical pHash)."""
    big, small, medium = "b" * 64, "a" * 64, "d" * 64
    insert_image(con, big, 7, 800, 600, seq=1)
    insert_image(con, small, 7, 200, 150, seq=2)
    insert_image(con, medium, 7, 400, 300, seq=3)
    duplicate_groups(con)
    return big, small, medium


def test_keep_and_exclude_from_the_cli(con, catalog_path):
    """`workbench keep` chooses the kept copy (the TUI's k); excluding a kept copy excludes the picture and says how
    to keep another copy instead."""
    from typer.testing import CliRunner

    from workbench.cli import app

    big, small, medium = _three_copies(con)
    runner = CliRunner()
    excluded = runner.invoke(app, ["exclude", big[:8], "--reason", "bad crop", "--catalog", str(catalog_path)], env={"COLUMNS": "300"})
    assert excluded.exit_code == 0, excluded.output
    assert f"workbench keep {medium[:12]}" in excluded.output  # the copy the keep policy picks (it named the first id)
    assert con.execute("SELECT count(*) FROM dataset").fetchall() == [(0,)]
    kept = runner.invoke(app, ["keep", small[:8], "--catalog", str(catalog_path)], env={"COLUMNS": "300"})
    assert kept.exit_code == 0, kept.output
    assert con.execute("SELECT image_id FROM dataset").fetchall() == [(small,)]
    excluded_keep = runner.invoke(app, ["keep", big[:8], "--catalog", str(catalog_path)], env={"COLUMNS": "300"})
    assert excluded_keep.exit_code == 0 and "is itself excluded (manual: bad crop)" in excluded_keep.output
    assert f"workbench include {big[:12]}" in excluded_keep.output
    alone = runner.invoke(app, ["keep", "c" * 8, "--catalog", str(catalog_path)])
    assert alone.exit_code == 2 and "c" * 8 in alone.output
    # --auto drops the hand choice: the policy keeps the largest copy again (excluded by hand: the picture stays out)
    auto = runner.invoke(app, ["keep", medium[:8], "--auto", "--catalog", str(catalog_path)], env={"COLUMNS": "300"})
    assert auto.exit_code == 0 and f"{big[:12]} is kept (highest resolution" in auto.output, auto.output
    assert con.execute("SELECT image_id FROM duplicates WHERE is_keeper").fetchall() == [(big,)]
    assert con.execute("SELECT count(*) FROM keeper_choice").fetchall() == [(0,)]
    again = runner.invoke(app, ["keep", medium[:8], "--auto", "--catalog", str(catalog_path)])
    assert again.exit_code == 0 and "kept by hand" in again.output  # done already: nothing to do, not a failure


def test_an_image_dedup_got_wrong_is_set_apart_and_can_rejoin(con, catalog_path):
    """A curator's review: a panorama grouped with an unrelated photo could only be kept instead of it, never both;
    `include` said "included 1" while it stayed out."""
    from typer.testing import CliRunner

    from workbench.cli import app

    big, small, medium = _three_copies(con)
    from pipelines.filter import manual_inclusions

    counts = manual_inclusions(con, [small])  # said "included 1" while it stayed out as a duplicate
    assert counts["in_dataset_now"] == 0 and counts["still_excluded_by_other_steps"] == 1
    runner = CliRunner()
    apart = runner.invoke(app, ["keep", small[:8], "--alone", "--catalog", str(catalog_path)], env={"COLUMNS": "300"})
    assert apart.exit_code == 0 and "a picture of its own" in apart.output, apart.output
    assert {r[0] for r in con.execute("SELECT image_id FROM dataset").fetchall()} == {big, small}
    assert con.execute("SELECT image_id FROM duplicates ORDER BY 1").fetchall() == [(big,), (medium,)]
    duplicate_groups(con)  # a rerun of dedup keeps it apart
    assert small in {r[0] for r in con.execute("SELECT image_id FROM dataset").fetchall()}
    rejoin = runner.invoke(app, ["keep", small[:8], "--rejoin", "--catalog", str(catalog_path)])
    assert rejoin.exit_code == 0, rejoin.output
    assert {r[0] for r in con.execute("SELECT image_id FROM dataset").fetchall()} == {big}
    # a rerun finds what it asks for done already: said, with status 0, so a script under `set -e` goes on (it was 2,
    # as for a failure)
    again = runner.invoke(app, ["keep", small[:8], "--rejoin", "--catalog", str(catalog_path)])
    assert again.exit_code == 0 and "Nothing to do" in again.output and "nothing to undo" in again.output
    insert_image(con, "e" * 64, 0xFFFF, 100, 100, seq=4)  # unique
    alone = runner.invoke(app, ["keep", "e" * 8, "--alone", "--catalog", str(catalog_path)])
    assert alone.exit_code == 0 and "not in a duplicate group" in alone.output
    auto = runner.invoke(app, ["keep", small[:8], "--auto", "--catalog", str(catalog_path)])  # in a group, none kept by hand
    assert auto.exit_code == 0 and "the keep policy chooses there already" in " ".join(auto.output.split())


def test_setting_apart_the_hub_of_a_hash_keeps_its_twins_linked_to_the_close_hashes(con):
    """A TUI review: `keep --alone` on one burst frame took a second frame (its identical-hash twin, kept by hand) out
    of the group as well, and with it into the dataset beside a copy 2 bits away: identical hashes hang on one hub,
    and close hash values are linked hub to hub, so the twins lost their link through the image set apart."""
    from pipelines.dedup import choose_keeper, image_set_apart, regroup_duplicates

    base = 0x0F0F_F0F0_1234_5678
    insert_image(con, "wide" + "0" * 60, base, 900, 100, seq=1)
    insert_image(con, "burst0" + "0" * 58, base, 300, 200, seq=2)
    insert_image(con, "burst2" + "0" * 58, base ^ 0b11, 300, 200, seq=3)  # 2 bits from the others
    insert_image(con, "burst3" + "0" * 58, base ^ 0b11, 300, 200, seq=4)  # burst2's twin
    duplicate_groups(con)
    ids = {row[0][:6].rstrip("0"): row[0] for row in con.execute("SELECT image_id FROM images").fetchall()}
    assert con.execute("SELECT count(DISTINCT group_id), count(*) FROM duplicates").fetchone() == (1, 4)
    choose_keeper(con, ids["burst3"])
    link = con.execute("SELECT image_a, image_b FROM duplicate_pairs WHERE method = 'phash' AND distance > 0").fetchall()
    assert len(link) == 1  # one link between the two hash values, hub to hub
    (apart,) = set(link[0]) & {ids["burst2"], ids["burst3"]}  # the hub of the twins' hash
    image_set_apart(con, apart)
    grouped = {row[0] for row in con.execute("SELECT image_id FROM duplicates").fetchall()}
    assert grouped == set(ids.values()) - {apart}
    assert {row[0] for row in con.execute("SELECT image_id FROM dataset").fetchall()} == {apart, con.execute(
        "SELECT keeper_id FROM duplicates LIMIT 1").fetchone()[0]}
    # the same when the hub's file goes (regrouped by a later keep, before any dedup rerun finds new pairs)
    image_set_apart(con, apart, apart=False)
    con.execute("UPDATE paths SET missing = true WHERE image_id = ?", [apart])
    regroup_duplicates(con)
    assert {row[0] for row in con.execute("SELECT image_id FROM duplicates").fetchall()} == set(ids.values()) - {apart}


def test_flipped_copies_are_duplicates_and_the_mirror_search_can_be_turned_off(con, tmp_path, catalog_path):
    """A left-right flipped repost (here also shrunk and re-encoded) is 30 or so pHash bits from its original, so only
    the mirrored hash finds it; a symmetric image never pairs with itself, and distinct photos stay apart."""
    from PIL import Image, ImageOps
    from typer.testing import CliRunner

    from pipelines.ingest import ingested_images
    from workbench.cli import app

    photos = Path(__file__).resolve().parents[1] / "sample_data" / "photos"
    folder = tmp_path / "set"
    folder.mkdir()
    with Image.open(photos / "chelsea.jpg") as cat:
        cat.convert("RGB").save(folder / "cat.png")
        ImageOps.mirror(cat.convert("RGB")).resize((cat.width // 2, cat.height // 2)).save(folder / "cat_flipped.jpg", quality=85)
        half = cat.convert("RGB").crop((0, 0, cat.width // 2, cat.height))
    symmetric = Image.new("RGB", (2 * half.width, half.height))
    symmetric.paste(half, (0, 0))
    symmetric.paste(ImageOps.mirror(half), (half.width, 0))
    symmetric.save(folder / "symmetric.png")
    for name in ("astronaut.jpg", "brick.jpg", "clock.jpg"):
        (folder / name).write_bytes((photos / name).read_bytes())
    ingested_images(con, [folder], workers=1)

    counts = duplicate_groups(con)
    assert counts["mirrored_pairs"] == 1 and counts["excluded_as_duplicates"] == 1
    rows = con.execute(
        "SELECT regexp_extract(v.path, '[^/]+$'), d.is_keeper, d.method, d.distance FROM images_view v "
        "JOIN duplicates d USING (image_id) ORDER BY 2"
    ).fetchall()
    assert [(name, keeper, method) for name, keeper, method, _ in rows] == [("cat_flipped.jpg", False, "mirror"), ("cat.png", True, "keeper")]
    assert rows[0][3] <= 6
    reason = con.execute("SELECT exclusion_reason FROM images_view WHERE path LIKE '%cat_flipped.jpg'").fetchone()[0]
    assert reason.startswith("flipped duplicate of ")
    assert con.execute("SELECT count(*) FROM duplicate_pairs WHERE method = 'phash'").fetchone()[0] == 0

    result = CliRunner().invoke(app, ["dedup", "--no-mirrored", "--catalog", str(catalog_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert con.execute("SELECT count(*) FROM duplicate_pairs").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM dataset").fetchone()[0] == 6


def test_catalogs_from_before_mirror_hashes_get_them_from_the_files_once(con, tmp_path):
    from PIL import Image, ImageOps

    from pipelines.ingest import ingested_images

    photos = Path(__file__).resolve().parents[1] / "sample_data" / "photos"
    folder = tmp_path / "set"
    folder.mkdir()
    with Image.open(photos / "astronaut.jpg") as image:
        image.save(folder / "a.png")
        ImageOps.mirror(image).save(folder / "b.png")
    with Image.open(photos / "brick.jpg") as image:
        image.save(folder / "c.png")
    ingested_images(con, [folder], workers=1)
    expected = dict(con.execute("SELECT image_id, phash_mirror FROM hashes").fetchall())
    con.execute("UPDATE hashes SET phash_mirror = NULL")  # as m007 leaves a catalog ingested before it
    with Image.open(photos / "clock.jpg") as image:
        image.save(folder / "c.png")  # changed since ingest: its hashes belong to the old content, not this file

    counts = duplicate_groups(con)
    assert counts["older_images_given_mirror_hashes"] == 2 and counts["older_images_changed_since_ingest"] == 1
    assert counts["mirrored_pairs"] == 1
    filled = dict(con.execute("SELECT image_id, phash_mirror FROM hashes WHERE phash_mirror IS NOT NULL").fetchall())
    assert filled == {k: v for k, v in expected.items() if k in filled} and len(filled) == 2
    again = duplicate_groups(con)
    assert "older_images_given_mirror_hashes" not in again and again["mirrored_pairs"] == 1


def test_between_two_images_the_closest_pair_of_the_best_method_is_shown():
    from pipelines.dedup import _edge_rank

    assert _edge_rank("phash", 6) < _edge_rank("mirror", 0) < _edge_rank("embedding", 0.99)
    assert _edge_rank("mirror", 2) < _edge_rank("mirror", 5)
    assert _edge_rank("embedding", 0.99) < _edge_rank("embedding", 0.96)  # a cosine: higher is closer


@pytest.mark.parametrize("sizes", [(40, 60), (5000, 4000)])  # the direct comparison, then the block search
def test_searching_one_set_against_another_finds_exactly_the_brute_force_pairs(sizes):
    from pipelines.dedup import hamming_pairs_between

    hashes = planted_hashes(sizes[1], seed=3)
    rng = np.random.default_rng(4)
    queries = rng.integers(0, 2**63, size=sizes[0], dtype=np.int64).astype(np.uint64)
    close = rng.choice(sizes[0], size=sizes[0] // 4, replace=False)
    queries[close] = hashes[rng.integers(0, sizes[1], size=len(close))] ^ np.uint64(0b1011)  # 3 bits away
    i, j, distance = hamming_pairs_between(queries, hashes, 6)
    truth = {(int(q), int(h)) for q, h in zip(*np.nonzero(np.bitwise_count(queries[:, None] ^ hashes[None, :]) <= 6))}
    assert set(zip(i.tolist(), j.tolist())) == truth and len(i) == len(truth) >= len(close)
    assert (distance == np.bitwise_count(queries[i] ^ hashes[j])).all()


def test_a_kept_copy_without_a_caption_takes_the_excluded_copys_caption(con, tmp_path):
    """The lossless copy wins the keep policy but the .txt caption was written beside the JPEG: that caption must not
    drop out of training with the excluded copy, and it follows the copy's sidecar as that changes."""
    from PIL import Image

    from pipelines.dedup import choose_keeper
    from pipelines.ingest import ingested_images

    photos = Path(__file__).resolve().parents[1] / "sample_data" / "photos"
    folder = tmp_path / "set"
    folder.mkdir()
    with Image.open(photos / "chelsea.jpg") as image:
        image.save(folder / "cat_lossless.png")
        image.save(folder / "cat.jpg", quality=90)
    (folder / "cat.txt").write_text("a tabby cat looking at the camera")
    ingested_images(con, [folder], workers=1)

    def current(name):
        return con.execute("SELECT caption, caption_source, excluded FROM images_view WHERE path LIKE ?", [f"%/{name}"]).fetchone()

    counts = duplicate_groups(con)
    assert counts["kept_copies_captioned_from_a_duplicate"] == 1
    assert current("cat_lossless.png") == ("a tabby cat looking at the camera", "duplicate", False)
    assert current("cat.jpg") == ("a tabby cat looking at the camera", "sidecar", True)
    assert con.execute("SELECT caption FROM dataset").fetchall() == [("a tabby cat looking at the camera",)]

    (folder / "cat.txt").write_text("an edited caption")  # the copy's sidecar changes: the kept copy follows at once
    ingested_images(con, [folder], workers=1)
    assert current("cat_lossless.png")[:2] == ("an edited caption", "duplicate")
    (folder / "cat.txt").unlink()
    ingested_images(con, [folder], workers=1)
    assert current("cat_lossless.png")[:2] == (None, None)

    (folder / "cat.txt").write_text("a tabby cat looking at the camera")
    ingested_images(con, [folder], workers=1)
    png = con.execute("SELECT image_id FROM images_view WHERE path LIKE '%/cat_lossless.png'").fetchone()[0]
    con.execute("INSERT INTO captions (image_id, source, text) VALUES (?, 'manual', 'my own words')", [png])
    assert current("cat_lossless.png")[:2] == ("my own words", "manual")  # a person's caption of the kept copy comes first
    con.execute("DELETE FROM captions WHERE image_id = ? AND source = 'manual'", [png])

    jpg = con.execute("SELECT image_id FROM images_view WHERE path LIKE '%/cat.jpg'").fetchone()[0]
    choose_keeper(con, jpg)  # the copy with its own caption kept: nothing to carry
    assert current("cat.jpg") == ("a tabby cat looking at the camera", "sidecar", False)
    assert con.execute("SELECT count(*) FROM carried_captions").fetchone()[0] == 0


def test_of_several_copies_the_closest_ones_caption_is_carried(con):
    """A manual caption first, then pHash over mirrored over CLIP pairs, then the closest in each: for CLIP the highest
    cosine (it is a similarity), not the lowest."""
    insert_image(con, "keep", 0, 1000, 1000, fmt="PNG", seq=1)
    far_in_phash = {"far_clip": 0x0F0F_0F0F_0F0F_0F0F, "near_clip": 0x00FF_00FF_00FF_00FF}  # 32 bits from all else
    for n, (image_id, method, distance) in enumerate([("far_clip", "embedding", 0.951), ("near_clip", "embedding", 0.99)], start=2):
        insert_image(con, image_id, far_in_phash[image_id], 100, 100, seq=n)  # joined by the CLIP pair only
        con.execute("INSERT INTO duplicate_pairs VALUES ('keep', ?, ?, ?)", [image_id, method, distance])
        con.execute("INSERT INTO captions (image_id, source, text) VALUES (?, 'sidecar', ?)", [image_id, f"caption of {image_id}"])
    duplicate_groups(con)
    assert con.execute("SELECT caption FROM current_captions WHERE image_id = 'keep'").fetchone()[0] == "caption of near_clip"
    insert_image(con, "phash_copy", 0b1, 200, 200, seq=9)  # one bit from the keeper: a pHash pair beats any CLIP pair
    con.execute("INSERT INTO captions (image_id, source, text) VALUES ('phash_copy', 'sidecar', 'caption of phash_copy')")
    duplicate_groups(con)
    assert con.execute("SELECT caption FROM current_captions WHERE image_id = 'keep'").fetchone()[0] == "caption of phash_copy"
    con.execute("INSERT INTO captions (image_id, source, text) VALUES ('far_clip', 'manual', 'typed by a person')")
    assert con.execute("SELECT caption FROM current_captions WHERE image_id = 'keep'").fetchone()[0] == "typed by a person"


def test_threshold_range_is_the_same_for_the_library_the_cli_and_the_tui(con):
    """The CLI refused 17-32 bits while the library (and so the TUI) ran them."""
    with pytest.raises(ValueError, match="between 0 and 16 bits"):
        duplicate_groups(con, threshold=17)


def test_a_stop_while_older_images_get_mirror_hashes_keeps_those_done(con, tmp_path):
    """They were written in one transaction at the end: a Ctrl+C at 224 of 400 kept none."""
    import numpy as np
    from PIL import Image

    from pipelines.ingest import ingested_images

    rng = np.random.default_rng(0)
    for n in range(100):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"noise_{n:03d}.png")
    ingested_images(con, [tmp_path], workers=1)
    con.execute("UPDATE hashes SET phash_mirror = NULL")

    def stop_after_a_batch(*, task="", completed=None, total=None, message=None):
        if task.startswith("mirrored") and completed and completed >= 64:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        duplicate_groups(con, progress=stop_after_a_batch)
    assert con.execute("SELECT count(*) FROM hashes WHERE phash_mirror IS NOT NULL").fetchone()[0] == 64
    assert duplicate_groups(con)["older_images_given_mirror_hashes"] == 36  # the rest, next time


def test_flat_images_are_no_near_duplicates_of_each_other_or_of_anything(con, tmp_path):
    """Plain colours get pHashes from rounding error: red.png was excluded as a "duplicate of" white.png. Flat and
    near-flat images (faint noise) are left out of the pHash search; a byte-identical copy is still the same image,
    and real near duplicates next to them are still found."""
    from PIL import Image

    from pipelines.dedup import FLAT_CONTRAST
    from pipelines.ingest import ingested_images

    photos = Path(__file__).resolve().parents[1] / "sample_data" / "photos"
    folder = tmp_path / "set"
    folder.mkdir()
    for colour in ("white", "black", "red", "blue"):
        Image.new("RGB", (512, 512), colour).save(folder / f"{colour}.png")
    (folder / "white_copy.png").write_bytes((folder / "white.png").read_bytes())
    Image.new("RGB", (512, 512), "white").save(folder / "white.jpg", quality=90)  # the same white, another encoding
    rng = np.random.default_rng(0)
    for name, colour in (("noisy_beige.png", (230, 220, 200)), ("noisy_grey.png", (128, 128, 128))):
        noise = rng.normal(0, 2, (512, 512, 1))
        Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(folder / name)
    with Image.open(photos / "coffee.jpg") as image:
        image.save(folder / "coffee.jpg", quality=95)
        image.resize((300, 200)).save(folder / "coffee_small.jpg", quality=90)
    (folder / "astronaut.jpg").write_bytes((photos / "astronaut.jpg").read_bytes())
    ingested_images(con, [folder], workers=1)
    flat = con.execute("SELECT count(*) FROM images WHERE contrast < ?", [FLAT_CONTRAST]).fetchone()[0]
    assert flat == 7  # white.png and white_copy.png are one image

    counts = duplicate_groups(con)
    assert counts["flat_images_not_compared"] == 7 and counts["images_compared"] == 3
    assert counts["contents_at_several_paths"] == 1
    grouped = con.execute(
        "SELECT regexp_extract(v.path, '[^/]+$'), d.is_keeper FROM duplicates d JOIN images_view v USING (image_id) ORDER BY 2"
    ).fetchall()
    assert grouped == [("coffee_small.jpg", False), ("coffee.jpg", True)]
    assert con.execute("SELECT count(*) FROM dataset").fetchone()[0] == 9  # every flat image stays, and two photos


def test_sample_photos_and_dark_copies_are_far_from_flat(tmp_path):
    """The flat cut-off leaves real photos alone: they score 10x it and more, and even copies at 15% exposure 2x."""
    from PIL import Image, ImageEnhance

    from pipelines.dedup import FLAT_CONTRAST
    from pipelines.ingest import read_image_file

    photos = Path(__file__).resolve().parents[1] / "sample_data" / "photos"
    for path in sorted(photos.glob("*.jpg")) + sorted(photos.glob("*.png")):
        assert read_image_file(bytes(path))["contrast"] >= 10 * FLAT_CONTRAST, path.name
        with Image.open(path) as image:
            ImageEnhance.Brightness(image.convert("RGB")).enhance(0.15).save(tmp_path / "dark.png")
        assert read_image_file(bytes(tmp_path / "dark.png"))["contrast"] >= 2 * FLAT_CONTRAST, path.name


def test_excluding_many_kept_copies_says_it_in_a_few_lines(con, catalog_path):
    """`exclude --where` over 1,527 images printed three lines for each of 168 kept copies (505 lines)."""
    from typer.testing import CliRunner

    from workbench.cli import app

    import hashlib

    for group in range(6):  # six pictures (random hashes: ~32 bits apart), two copies each: six kept copies
        phash = int.from_bytes(hashlib.sha256(str(group).encode()).digest()[:8], "big") >> 1
        insert_image(con, f"{group}a" * 32, phash, 800, 600, seq=2 * group)
        insert_image(con, f"{group}b" * 32, phash, 200, 150, seq=2 * group + 1)
    duplicate_groups(con)
    assert con.execute("SELECT count(*) FROM duplicates WHERE is_keeper").fetchone()[0] == 6
    result = CliRunner().invoke(app, ["exclude", "--where", "width = 800", "--reason", "test", "--catalog", str(catalog_path)],
                                env={"COLUMNS": "300"})
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and "excluded 6" in said, result.output
    assert said.count("was the kept copy of a duplicate group") == 3 and "and 3 more kept copies" in said
    listing = said[said.index("workbench sql"):].split('"')[1]  # the query it gives lists every such group's copies
    assert len(con.execute(listing).fetchall()) == 12


def test_the_keep_reason_names_a_better_copy_the_filter_excludes(con):
    """Three copies at 300, 200 and 100 px, the 300 px one blurry: the 200 px copy is kept because the filter
    excludes the better one (the reason said "highest resolution (200x200)", beside the 100 px copy)."""
    base = 0x0F0F_F0F0_1234_5678
    insert_image(con, "big", base, 300, 300, seq=1)
    insert_image(con, "mid", base ^ 1, 200, 200, seq=2)
    insert_image(con, "small", base ^ 2, 100, 100, seq=3)
    con.execute("INSERT INTO exclusions (image_id, step, reason) VALUES ('big', 'filter:blurry', 'blurry: 3.1 < 25')")
    duplicate_groups(con, threshold=6)
    keeper, reason = con.execute("SELECT image_id, keep_reason FROM duplicates WHERE is_keeper").fetchall()[0]
    assert keeper == "mid" and reason == "passes the filter (a copy ranked above it does not: blurry: 3.1 < 25)"
    con.execute("DELETE FROM exclusions")
    duplicate_groups(con, threshold=6)
    assert con.execute("SELECT image_id, keep_reason FROM duplicates WHERE is_keeper").fetchall() == [("big", "highest resolution (300x300)")]


def test_keep_auto_where_the_hand_choice_held_a_chain_together(con):
    """A–B and B–C are pairs, A–C is not: with B kept by hand, C is in B's group; `keep C --auto` left C in no group
    and then failed reading its keeper (a traceback after the catalog had changed)."""
    from pipelines.dedup import keeper_choice_dropped

    insert_image(con, "a", 0b0, 400, 400, seq=1)
    insert_image(con, "b", 0b1111, 300, 300, seq=2)
    insert_image(con, "c", 0b1111_1111, 200, 200, seq=3)
    duplicate_groups(con, threshold=4)
    choose_keeper(con, "b")
    assert {r[0] for r in con.execute("SELECT image_id FROM duplicates").fetchall()} == {"a", "b", "c"}
    assert keeper_choice_dropped(con, "c") == (True, None)  # a keeps b; c is close to no keeper now
    assert con.execute("SELECT image_id, is_keeper FROM duplicates ORDER BY 1").fetchall() == [("a", True), ("b", False)]
    assert keeper_choice_dropped(con, "b") == (False, None)


def test_a_copy_in_a_concept_is_kept_over_a_better_copy_in_none(con):
    """A SQL user's review: a 300 px copy in a loose folder was kept over the 200 px photo in `10_sks dog`, so the
    picture left its concept (trigger, repeats) without a word."""
    base = 0x0F0F_F0F0_1234_5678
    insert_image(con, "loose", base, 300, 300, seq=1)
    insert_image(con, "dog", base ^ 1, 200, 200, seq=2)
    insert_image(con, "cat", base ^ 2, 250, 250, seq=3)
    con.execute("INSERT INTO concepts (name, trigger_token, class_noun) VALUES ('sks dog', 'sks', 'dog'), ('ohwx cat', 'ohwx', 'cat')")
    con.execute("INSERT INTO concept_images (image_id, concept, source) VALUES ('dog', 'sks dog', 'folder_name')")
    counts = duplicate_groups(con, threshold=6)
    assert con.execute("SELECT image_id, keep_reason FROM duplicates WHERE is_keeper").fetchall() == [
        ("dog", "in concept sks dog (a copy ranked above it is in none)")]
    assert "concept_images_excluded_for_a_copy_outside_their_concept" not in counts
    # copies in two concepts: the better one is kept, and the count says a concept lost one
    con.execute("INSERT INTO concept_images (image_id, concept, source) VALUES ('cat', 'ohwx cat', 'folder_name')")
    counts = duplicate_groups(con, threshold=6)
    assert con.execute("SELECT image_id, keep_reason FROM duplicates WHERE is_keeper").fetchall() == [
        ("cat", "in concept ohwx cat (a copy ranked above it is in none)")]
    assert counts["concept_images_excluded_for_a_copy_outside_their_concept"] == 1
    # with none in a concept, the best copy as before
    con.execute("DELETE FROM concept_images")
    duplicate_groups(con, threshold=6)
    assert con.execute("SELECT image_id, keep_reason FROM duplicates WHERE is_keeper").fetchall() == [("loose", "highest resolution (300x300)")]
