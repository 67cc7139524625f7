"""Ingest: idempotent re-runs, changed and vanished files, unreadable files, kill and rerun."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import pipelines.ingest as ingest_mod
from pipelines.ingest import PILLOW_READS_AVIF, ingested_images, read_image_file


def make_images(folder: Path, count: int, size=(96, 64), seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
        path = folder / f"img_{i:04d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def deny_open(monkeypatch, path) -> None:
    """Opening `path` from the ingest step fails with EACCES (tests run as root in CI, where chmod 000 stops nothing)."""
    real_open = open

    def deny(file, *args, **kwargs):
        if os.fsencode(file) == os.fsencode(path):
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)

    import workbench.images as images_mod

    monkeypatch.setattr(ingest_mod, "open", deny, raising=False)
    monkeypatch.setattr(images_mod, "open", deny, raising=False)  # where ingest reads caption files


def table_counts(con) -> dict:
    return {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in ("images", "paths", "hashes", "captions")}


def test_second_run_changes_nothing(con, tmp_path):
    """Nothing but the time each path was last seen, which every walk that finds a file records."""
    make_images(tmp_path / "imgs", 12)
    first = ingested_images(con, [tmp_path / "imgs"], workers=2)
    assert (first.new, first.errors) == (12, 0)
    paths_sql = "SELECT * EXCLUDE (last_seen) FROM paths ORDER BY path"
    before = con.sql("SELECT * FROM images ORDER BY image_id").fetchall(), con.sql(paths_sql).fetchall()
    seen_before = con.execute("SELECT max(last_seen) FROM paths").fetchone()[0]
    second = ingested_images(con, [tmp_path / "imgs"], workers=2)
    assert (second.new, second.changed, second.unchanged, second.marked_missing) == (0, 0, 12, 0)
    after = con.sql("SELECT * FROM images ORDER BY image_id").fetchall(), con.sql(paths_sql).fetchall()
    assert before == after
    # paths.last_seen stayed equal to first_seen for unchanged files, however many ingests found them
    assert con.execute("SELECT count(*) FROM paths WHERE last_seen > ? AND last_seen > first_seen", [seen_before]).fetchone()[0] == 12
    steps = con.execute("SELECT step, status FROM runs ORDER BY run_id").fetchall()
    assert steps == [("ingest", "ok"), ("ingest", "ok")]


def test_changed_file_is_reread_and_vanished_is_missing(con, tmp_path):
    paths = make_images(tmp_path / "imgs", 3)
    ingested_images(con, [tmp_path / "imgs"], workers=1)
    old_id = con.execute("SELECT image_id FROM paths WHERE path = ?", [str(paths[0])]).fetchall()[0][0]
    Image.new("RGB", (50, 40), (200, 10, 10)).save(paths[0])
    os.utime(paths[0], ns=(1, 1))  # a different mtime even on coarse clocks
    paths[1].unlink()
    summary = ingested_images(con, [tmp_path / "imgs"], workers=1)
    assert (summary.changed, summary.marked_missing) == (1, 1)
    new = con.execute("SELECT image_id, width, height FROM images_view WHERE path = ?", [str(paths[0])]).fetchall()[0]
    assert new[0] != old_id and new[1:] == (50, 40)
    status = con.execute("SELECT status FROM images_view WHERE path = ?", [str(paths[1])]).fetchall()[0][0]
    assert status == "missing"
    # Nothing is silently dropped: the vanished image keeps its row and path.
    assert con.execute("SELECT count(*) FROM paths").fetchall()[0][0] == 3


def test_a_file_edited_in_place_keeps_its_manual_caption_and_concept(con, tmp_path):
    """Cropping or retouching a file gives new bytes, so a new image: what people gave the file by hand (its
    manual caption, its concept) goes with it, and the old content's row says it was replaced, by what."""
    from pipelines.concepts import added_concept

    paths = make_images(tmp_path / "imgs", 2)
    ingested_images(con, [tmp_path / "imgs"], workers=1)
    old_id = con.execute("SELECT image_id FROM paths WHERE path = ?", [str(paths[0])]).fetchone()[0]
    con.execute("INSERT INTO captions (image_id, source, text) VALUES (?, 'manual', 'my careful caption')", [old_id])
    con.execute("INSERT INTO caption_choice (image_id, source) VALUES (?, 'manual')", [old_id])
    added_concept(con, "sks", trigger="sks", where=f"image_id = '{old_id}'")

    Image.new("RGB", (50, 40), (200, 10, 10)).save(paths[0])  # edited in place
    os.utime(paths[0], ns=(1, 1))
    assert ingested_images(con, [tmp_path / "imgs"], workers=1).changed == 1
    new_id, caption, concept = con.execute(
        "SELECT image_id, caption, concept FROM images_view WHERE path = ?", [str(paths[0])]).fetchone()
    assert new_id != old_id and caption == "my careful caption" and concept == "sks"
    status, error, path = con.execute("SELECT status, error, path FROM images_view WHERE image_id = ?", [old_id]).fetchone()
    assert status == "replaced" and error == f"edited in place: {paths[0]} now holds image {new_id[:12]}" and path is None
    assert con.execute("SELECT count(*) FROM dataset").fetchone()[0] == 2

    make_images(tmp_path / "imgs", 1)  # the edit undone: the old bytes are back at the path
    os.utime(paths[0], ns=(2, 2))
    ingested_images(con, [tmp_path / "imgs"], workers=1)
    assert con.execute("SELECT status, caption FROM images_view WHERE image_id = ?", [old_id]).fetchone() == ("ok", "my careful caption")
    assert con.execute("SELECT status FROM images_view WHERE image_id = ?", [new_id]).fetchone()[0] == "replaced"


def test_missing_file_that_comes_back_is_ok_again(con, tmp_path):
    paths = make_images(tmp_path / "imgs", 2)
    ingested_images(con, [tmp_path / "imgs"], workers=1)
    moved = tmp_path / "elsewhere.jpg"
    paths[0].rename(moved)
    ingested_images(con, [tmp_path / "imgs"], workers=1)
    moved.rename(paths[0])
    summary = ingested_images(con, [tmp_path / "imgs"], workers=1)
    assert summary.reappeared == 1
    assert con.execute("SELECT status FROM images_view WHERE path = ?", [str(paths[0])]).fetchall()[0][0] == "ok"


def test_sidecar_edit_is_picked_up_without_rereading_the_image(con, tmp_path):
    (path,) = make_images(tmp_path / "imgs", 1)
    sidecar = path.with_suffix(".txt")
    sidecar.write_text("first caption")
    ingested_images(con, [tmp_path / "imgs"], workers=1)
    sidecar.write_text("second caption")
    os.utime(sidecar, ns=(2, 2))
    summary = ingested_images(con, [tmp_path / "imgs"], workers=1)
    assert summary.changed == 0
    assert con.execute("SELECT caption FROM images_view").fetchall() == [("second caption",)]


def test_a_sidecar_emptied_or_deleted_since_the_last_ingest_is_said(catalog_path, tmp_path):
    """A review: a caption file emptied or deleted dropped the image's caption at the next ingest without a word (the
    image then trained as "sks dog")."""
    from typer.testing import CliRunner

    from workbench.catalog import connect
    from workbench.cli import app

    emptied, deleted, kept = make_images(tmp_path / "imgs", 3)
    for path, text in ((emptied, "one"), (deleted, "two"), (kept, "three")):
        path.with_suffix(".txt").write_text(text)
    con = connect(catalog_path)
    ingested_images(con, [tmp_path / "imgs"], workers=1)
    con.close()
    emptied.with_suffix(".txt").write_text("")
    os.utime(emptied.with_suffix(".txt"), ns=(2, 2))
    deleted.with_suffix(".txt").unlink()
    again = CliRunner().invoke(app, ["ingest", str(tmp_path / "imgs"), "-c", str(catalog_path)], env={"COLUMNS": "300"})
    said = " ".join(again.output.split())
    assert again.exit_code == 0 and "2 image(s) lost their sidecar caption" in said and "2 of them have no caption now" in said
    assert str(emptied) in said and str(deleted) in said and str(kept) not in said


def test_a_concept_folder_moved_away_is_said_at_the_next_ingest(con, tmp_path):
    """A review: after `mv data/cat data/cats`, a new photo put in cats/ joined no concept, and nothing said why until
    a DreamBooth run failed on it."""
    from pipelines.concepts import added_concept

    make_images(tmp_path / "data" / "cat", 2, seed=1)
    ingested_images(con, [tmp_path / "data"], workers=1)
    added_concept(con, "ohwx cat", trigger="ohwx", class_noun="cat", folder=str(tmp_path / "data" / "cat"))
    quiet = []
    ingested_images(con, [tmp_path / "data"], workers=1, progress=lambda **kw: quiet.append(kw.get("message") or ""))
    assert not any("which is gone" in m for m in quiet)
    (tmp_path / "data" / "cat").rename(tmp_path / "data" / "cats")
    make_images(tmp_path / "data" / "cats", 1, seed=9)  # a new picture there (as img_0000.jpg, over the old one)
    said = []
    ingested_images(con, [tmp_path / "data"], workers=1, progress=lambda **kw: said.append(kw.get("message") or ""))
    assert any(f"concept 'ohwx cat' takes the images of {tmp_path / 'data' / 'cat'}, which is gone" in m
               and "concept add 'ohwx cat' --folder NEW_PLACE" in m for m in said), said


def test_only_paths_under_the_ingested_roots_are_marked_missing(con, tmp_path):
    make_images(tmp_path / "a", 2, seed=1)
    make_images(tmp_path / "b", 2, seed=2)
    ingested_images(con, [tmp_path / "a", tmp_path / "b"], workers=1)
    summary = ingested_images(con, [tmp_path / "a"], workers=1)
    assert summary.marked_missing == 0


def test_a_folder_that_cannot_be_read_is_named_and_its_images_are_not_marked_missing(con, tmp_path, monkeypatch):
    """A review: a subfolder made unreadable (an unmounted share looks the same) was skipped without a word, and its
    images were marked missing, so they left the dataset as if deleted."""
    make_images(tmp_path / "root" / "open", 1, seed=1)
    locked = tmp_path / "root" / "locked"
    make_images(locked, 2, seed=2)
    ingested_images(con, [tmp_path / "root"], workers=1)
    real_scandir = os.scandir

    def denied(path):
        if os.fsdecode(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real_scandir(path)

    monkeypatch.setattr(ingest_mod.os, "scandir", denied)
    said = []
    summary = ingested_images(con, [tmp_path / "root"], workers=1, progress=lambda **kw: said.append(kw.get("message") or ""))
    assert summary.marked_missing == 0 and summary.paths_marked_missing == 0
    assert summary.unreadable_folders == [f"{locked} (Permission denied)"]
    # said through progress: the TUI's log shows it as the CLI does
    assert any(f"1 folder(s) could not be read: {locked} (Permission denied)" in m for m in said), said
    assert con.execute("SELECT count(*) FROM dataset").fetchall()[0][0] == 3
    monkeypatch.undo()
    (locked / sorted(os.listdir(locked))[0]).unlink()  # readable again, a file really gone: marked missing as before
    assert ingested_images(con, [tmp_path / "root"], workers=1).marked_missing == 1


def test_unreadable_file_gets_an_error_row(con, tmp_path, monkeypatch):
    paths = make_images(tmp_path / "imgs", 2)
    deny_open(monkeypatch, paths[0])
    summary = ingested_images(con, [tmp_path / "imgs"], workers=1)
    assert summary.errors == 1
    status, error = con.execute("SELECT status, error FROM images_view WHERE path = ?", [str(paths[0])]).fetchall()[0]
    assert status == "error" and "permission denied" in error
    assert con.execute("SELECT count(*) FROM images_view WHERE status = 'ok'").fetchall()[0][0] == 1
    # a broken file is not read anew by a rerun (errors 0), which says the catalog still holds both as errors (a
    # scripting review: a monitor alerting on `errors` went quiet after the first run)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a whole image")
    first = ingested_images(con, [tmp_path / "imgs"], workers=1)
    again = ingested_images(con, [tmp_path / "imgs"], workers=1)
    assert (summary.errors_in_catalog, first.errors_in_catalog) == (1, 2)
    assert again.errors == 1 and again.errors_in_catalog == 2  # the unreadable one is tried again; the broken one is not


def test_a_file_that_could_not_be_read_is_read_once_it_can_be(con, tmp_path, monkeypatch):
    """A file recorded 'permission denied' stayed so after a chmod (same size and time: 'unchanged'), and a `touch`
    then made its old row say it was "edited in place"; what was given to it by hand must not be lost."""
    from pipelines.filter import manual_exclusions

    paths = make_images(tmp_path / "imgs", 2)
    deny_open(monkeypatch, paths[0])
    ingested_images(con, [tmp_path / "imgs"], workers=1)
    (unread,) = con.execute("SELECT image_id FROM images_view WHERE status = 'error'").fetchone()
    manual_exclusions(con, [unread], "look at it later")
    monkeypatch.undo()  # the permission is fixed; size and time are as they were
    summary = ingested_images(con, [tmp_path / "imgs"], workers=1)
    assert summary.errors_retried == 1 and summary.unchanged == 1
    rows = con.execute("SELECT status, excluded, exclusion_reason FROM images_view ORDER BY path").fetchall()
    assert [r[0] for r in rows] == ["ok", "ok"]  # no 'missing' or 'replaced' row left of the error
    assert rows[0][1] and "look at it later" in rows[0][2]
    assert con.execute("SELECT count(*) FROM exclusions WHERE image_id = ?", [unread]).fetchone()[0] == 0
    assert ingested_images(con, [tmp_path / "imgs"], workers=1).unchanged == 2  # read once, then left alone


def test_read_image_file_never_raises_on_garbage(tmp_path):
    rng = np.random.default_rng(3)
    for i in range(20):
        junk = tmp_path / f"junk_{i}.jpg"
        header = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP", b"BM"][i % 5]
        junk.write_bytes(header + rng.integers(0, 255, size=200 + i * 37, dtype=np.uint8).tobytes())
        row = read_image_file(os.fsencode(junk))
        assert row["status"] == "error" and row["error"]


def test_a_png_whose_pixel_data_is_corrupt_is_an_error_not_a_half_decoded_image(tmp_path):
    """A PNG with one flipped byte in its image data was recorded 'ok' (measured from a half-black decode), and the
    first step to read it in full was training, which stopped with a traceback: the error of the decode that
    getexif() ran was taken for bad EXIF."""
    rng = np.random.default_rng(5)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[len(data) // 2] ^= 0xFF
    path = tmp_path / "bad.png"
    path.write_bytes(bytes(data))
    with pytest.raises(Exception):
        Image.open(path).load()  # Pillow cannot decode it in full
    row = read_image_file(os.fsencode(path))
    assert row["status"] == "error" and row["error"].startswith("corrupt image data")


def test_image_under_wrong_extension_and_max_pixels(con, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (300, 200), (1, 2, 3)).save(folder / "picture.bin", format="PNG")
    summary = ingested_images(con, [folder], workers=1, max_pixels=10_000)
    assert summary.errors == 1
    status, error, fmt = con.execute("SELECT status, error, format FROM images_view").fetchall()[0]
    assert status == "error" and "60,000 pixels is over the 10,000-pixel cap" in error and fmt == "PNG"


def test_kill_during_ingest_then_rerun_completes_without_duplicates(tmp_path):
    folder = tmp_path / "imgs"
    make_images(folder, 120)
    catalog = tmp_path / "killed.duckdb"
    script = textwrap.dedent(
        f"""
        import os, signal
        from workbench.catalog import connect
        from pipelines import ingest
        ingest.BATCH = 16
        def hook(*, task, completed=0, total=None, message=None):
            if task == "ingest" and completed >= 64:
                os.kill(os.getpid(), signal.SIGKILL)  # die mid-run, no cleanup
        con = connect({str(catalog)!r})
        ingest.ingested_images(con, [{str(folder)!r}], workers=1, progress=hook)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1])
    assert result.returncode == -9
    from workbench.catalog import connect

    con = connect(catalog)
    partial = con.execute("SELECT count(*) FROM paths").fetchall()[0][0]
    assert 0 < partial < 120
    ingested_images(con, [folder], workers=2)
    assert con.execute("SELECT count(*), count(DISTINCT path) FROM paths").fetchall()[0] == (120, 120)
    assert con.execute("SELECT count(*) FROM images_view WHERE status = 'ok'").fetchall()[0][0] == 120
    assert con.execute("SELECT count(*) FROM images").fetchall()[0][0] == 120


def test_hashes_match_the_imagehash_definitions():
    import imagehash

    from pipelines.ingest import _hashes

    root = Path(__file__).resolve().parents[1] / "sample_data"
    files = sorted(p for p in (root / "photos").iterdir() if p.suffix in {".jpg", ".png"})
    assert len(files) >= 10
    for path in files:
        image = Image.open(path).convert("RGB")
        phash, dhash, phash_mirror = _hashes(image)
        assert phash == int(str(imagehash.phash(image)), 16), path.name
        assert dhash == int(str(imagehash.dhash(image)), 16), path.name
        assert phash_mirror == int(str(imagehash.phash(ImageOps.mirror(image))), 16), path.name
        assert bin(phash ^ phash_mirror).count("1") > 6, path.name  # a photo and its mirror are far apart in pHash


def test_raising_the_pixel_cap_rereads_the_files_it_rejected(con, tmp_path):
    """The cap error says "raise --max-pixels to read it": doing so must read them, once."""
    make_images(tmp_path / "imgs", 3, size=(96, 64))
    capped = ingested_images(con, [tmp_path / "imgs"], workers=1, max_pixels=1000)
    assert capped.errors == 3
    assert con.execute("SELECT count(*) FROM images WHERE status = 'error' AND error LIKE '%pixel cap%'").fetchone()[0] == 3
    raised = ingested_images(con, [tmp_path / "imgs"], workers=1)
    assert (raised.errors_retried, raised.errors, raised.unchanged) == (3, 0, 0)
    assert con.execute("SELECT count(*) FROM images WHERE status = 'ok' AND width = 96").fetchone()[0] == 3
    again = ingested_images(con, [tmp_path / "imgs"], workers=1)
    assert (again.errors_retried, again.unchanged) == (0, 3)
    with pytest.raises(ValueError, match="max_pixels must be at least 1"):
        ingested_images(con, [tmp_path / "imgs"], workers=1, max_pixels=0)


def sidecar_captions(con) -> dict[str, str]:
    rows = con.execute(
        "SELECT p.path, c.text FROM captions c JOIN paths p USING (image_id) WHERE c.source = 'sidecar'").fetchall()
    return {Path(path).stem: text for path, text in rows}


def test_sidecars_in_other_encodings_are_decoded_or_left_out_and_named(con, tmp_path):
    """UTF-8 (with or without a BOM) and UTF-16/32 with a BOM are read; a file that is not UTF-8 is left out and
    named in the report instead of becoming a caption full of U+FFFD or NUL characters."""
    folder = tmp_path / "imgs"
    sidecars = {
        "brick": "brick wall".encode("utf-16"),
        "camera": "\ufeffa camera man".encode("utf-8"),
        "horse": "a horse, café".encode("utf-32"),
        "dog": b"a dog\r\non grass  \r\n\r\n",
        "caballo": "caballo café, niño".encode("latin-1"),
        "mule": "a mule".encode("utf-16-le"),  # no BOM: valid UTF-8 bytes, but full of NULs
        # no caption: a file of megabytes (a review's 300 MB one hung training), a line of 20,000 characters
        "huge": b"tag, " * 300_000,
        "long": b"x" * 20_000 + b"\n",
    }
    folder.mkdir()
    for i, (stem, data) in enumerate(sidecars.items()):
        Image.new("RGB", (32, 24), (i * 30, 0, 0)).save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_bytes(data)
    messages = []
    summary = ingested_images(con, [folder], workers=1, progress=lambda **kw: messages.append(kw.get("message")))
    # several lines: the first is the caption, as kohya reads it (joined, they made a caption no peer trains on)
    assert sidecar_captions(con) == {"brick": "brick wall", "camera": "a camera man", "horse": "a horse, café",
                                     "dog": "a dog"}
    assert summary.multi_line_sidecars == [str(folder / "dog.txt")]
    assert (summary.sidecar_captions, summary.sidecars_left_out) == (4, 4)
    assert sorted(Path(p).name for p in summary.sidecar_problems) == ["caballo.txt", "huge.txt", "long.txt", "mule.txt"]
    assert "not a caption" in summary.sidecar_problems[str(folder / "huge.txt")]
    assert "20,000 characters" in summary.sidecar_problems[str(folder / "long.txt")]
    assert "not UTF-8" in summary.sidecar_problems[str(folder / "caballo.txt")]
    told = [m for m in messages if m and "caballo.txt" in m]
    assert len(told) == 1 and str(folder / "caballo.txt") in told[0] and "not UTF-8" in told[0] and "re-save" in told[0]
    assert any(m and "mule.txt" in m for m in messages)
    # the images themselves are in, whatever their sidecars hold
    assert con.execute("SELECT count(*) FROM images_view WHERE status = 'ok'").fetchone()[0] == 8
    # and none of the sidecars left out reads as edited since ingest, to training's and --sidecars' check (the
    # 20,000-character one did: that check read sidecars by rules of its own, without the caption length cap)
    from workbench.images import sidecars_changed_since_ingest

    ids = [i for (i,) in con.execute("SELECT image_id FROM images").fetchall()]
    assert sidecars_changed_since_ingest(con, ids) == []


def test_an_unreadable_sidecar_never_loses_a_caption_already_in_the_catalog(con, tmp_path, monkeypatch):
    paths = make_images(tmp_path / "imgs", 3)
    first, second, third = (p.with_suffix(".txt") for p in paths)
    first.write_text("first caption")
    second.write_text("second caption")
    ingested_images(con, [tmp_path / "imgs"], workers=1)
    second_id = con.execute("SELECT image_id FROM paths WHERE path = ?", [str(paths[1])]).fetchone()[0]
    con.execute("INSERT INTO captions (image_id, source, text) VALUES (?, 'manual', 'my manual caption')", [second_id])

    first.write_bytes("première légende".encode("latin-1"))  # re-saved in another encoding
    os.utime(first, ns=(2, 2))
    second.write_bytes("segunda leyenda, niño".encode("cp1252"))
    Image.new("RGB", (50, 40), (200, 10, 10)).save(paths[1])  # and the image edited in place: a new image id
    os.utime(paths[1], ns=(2, 2))
    third.write_bytes(b"ok")
    os.utime(third, ns=(2, 2))
    deny_open(monkeypatch, third)
    summary = ingested_images(con, [tmp_path / "imgs"], workers=1)
    assert sidecar_captions(con) == {"img_0000": "first caption", "img_0001": "second caption"}
    assert summary.sidecars_left_out == 3 and "cannot be read" in summary.sidecar_problems[str(third)]
    new_second = con.execute("SELECT image_id, caption FROM images_view WHERE path = ?", [str(paths[1])]).fetchone()
    assert new_second[0] != second_id and new_second[1] == "my manual caption"
    assert con.execute("SELECT caption_source FROM images_view WHERE path = ?", [str(paths[0])]).fetchone()[0] == "sidecar"

    # until the files are fixed, each ingest reports them again (and still keeps the captions)
    again = ingested_images(con, [tmp_path / "imgs"], workers=1)
    assert again.sidecars_left_out == 3 and sidecar_captions(con)["img_0000"] == "first caption"
    monkeypatch.undo()
    first.write_text("première légende", encoding="utf-8")
    os.utime(first, ns=(3, 3))
    fixed = ingested_images(con, [tmp_path / "imgs"], workers=1)
    assert fixed.sidecars_left_out == 1 and not fixed.sidecar_problems.get(str(third))
    assert sidecar_captions(con) == {"img_0000": "première légende", "img_0001": "second caption", "img_0002": "ok"}


def test_interrupted_ingest_keeps_what_it_read_and_the_rerun_finishes(con, tmp_path):
    """An interrupt after the last file was read but before the end (the concept step) still leaves the rerun
    with something to do: join the kohya folder's concept."""
    folder = tmp_path / "3_sks dog"
    make_images(folder, 5)

    def hook(*, task, completed=0, total=None, message=None):
        if task == "ingest" and total and completed == total:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as stopped:
        ingested_images(con, [folder], workers=1, progress=hook)
    assert con.execute("SELECT count(*) FROM images_view WHERE status = 'ok'").fetchone()[0] == 5
    assert con.execute("SELECT status FROM runs WHERE step = 'ingest'").fetchall() == [("cancelled",)]
    assert isinstance(stopped.value, ingest_mod.IngestInterrupted) and stopped.value.summary.recorded == 5
    rerun = ingested_images(con, [folder], workers=1)
    assert (rerun.unchanged, rerun.images_joined_concepts) == (5, 5)
    assert con.execute("SELECT count(*) FROM images_view WHERE concept = 'sks dog'").fetchone()[0] == 5


def test_ctrl_c_during_cli_ingest_stops_cleanly_and_the_rerun_completes(tmp_path):
    """Ctrl+C reaches every process of the terminal's process group: the workers must not print tracebacks,
    the command says what it kept and exits 130, and the rerun reads the rest."""
    import re
    import signal
    import time

    folder, marks = tmp_path / "imgs", tmp_path / "marks"
    marks.mkdir()
    folder.mkdir()
    for i, name in enumerate(["fast_0.png", "fast_1.png", "slow_2.png"]):
        Image.new("RGB", (40, 30), (i * 60, 0, 0)).save(folder / name)
    catalog = tmp_path / "interrupted.duckdb"
    # Workers fork from this script, so they read through its patch: chunk 1 (two fast files) is read at once
    # and its worker waits for more, chunk 2 stands for a huge image that is still being read at Ctrl+C.
    script = textwrap.dedent(
        f"""
        import os, sys, time
        import pipelines.ingest as ingest
        ingest.CHUNK = 2
        real_read = ingest.read_image_file
        def read(path_bytes, max_pixels=ingest.DEFAULT_MAX_PIXELS, **options):
            name = os.path.basename(path_bytes).decode()
            if name.startswith("slow"):
                open(os.path.join({str(marks)!r}, name), "w").close()
                time.sleep(60)
            row = real_read(path_bytes, max_pixels, **options)
            open(os.path.join({str(marks)!r}, name), "w").close()
            return row
        ingest.read_image_file = read
        sys.argv = ["workbench", "ingest", {str(folder)!r}, "--workers", "2", "--catalog", {str(catalog)!r}]
        from workbench.cli import main
        main()
        """
    )
    # Ctrl+C as in a terminal, even when this suite runs as a background job (which starts with SIGINT ignored)
    process = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[1], start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 30
        while len(list(marks.iterdir())) < 3 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(list(marks.iterdir())) == 3, "ingest never reached its workers"
        time.sleep(0.3)  # the fast worker has a few lines left before it waits on its queue
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl+C does: the whole foreground process group
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert "Traceback" not in output and "Process ForkProcess" not in output, output
    assert process.returncode == 130, output
    kept = re.search(r"interrupted.*?(\d+) of 3", " ".join(output.split()))
    assert kept, output
    assert "again" in output
    from workbench.catalog import connect

    rerun_con = connect(catalog)
    try:
        assert rerun_con.execute("SELECT count(*) FROM paths").fetchone()[0] == int(kept.group(1))
        summary = ingested_images(rerun_con, [folder], workers=1)
        assert summary.new == 3 - int(kept.group(1))
        assert rerun_con.execute("SELECT count(*) FROM images_view WHERE status = 'ok'").fetchone()[0] == 3
    finally:
        rerun_con.close()


def test_ingest_of_a_parent_folder_leaves_the_workbench_outputs_out(con, tmp_path):
    """`workbench ingest .` beside the catalog took run samples, loss plots and class priors as instance photos."""
    from workbench.config import mark_output_folder

    project = tmp_path / "project"
    make_images(project, 2)
    make_images(project / "runs" / "lora-1" / "samples", 2, seed=1)
    mark_output_folder(project / "runs" / "lora-1")
    make_images(project / "class_priors" / "a-photo-of-a-cat-1a2b3c4d", 2, seed=2)
    mark_output_folder(project / "class_priors" / "a-photo-of-a-cat-1a2b3c4d")
    summary = ingested_images(con, [project], workers=1)
    assert (summary.new, summary.output_folders_skipped) == (2, 2)
    # named as a root (`ingest runs/*`), it is left out too: its samples and loss plot took the dataset over
    named = ingested_images(con, [project / "runs" / "lora-1"], workers=1)
    assert (named.new, named.output_folders_skipped, named.output_roots_skipped) == (0, 1, [str(project / "runs" / "lora-1")])
    assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 2
    # walking the parent again leaves those files alone: not walked is not gone (class priors were marked missing)
    again = ingested_images(con, [project], workers=1)
    assert again.marked_missing == 0
    assert con.execute("SELECT count(*) FROM paths WHERE missing").fetchone()[0] == 0


def test_images_ingested_later_join_the_concept_whose_folder_they_are_in(con, tmp_path):
    from pipelines.concepts import added_concept

    make_images(tmp_path / "dog", 1)
    ingested_images(con, [tmp_path], workers=1)
    added_concept(con, "sks dog", trigger="sks", class_noun="dog", folder=tmp_path / "dog")
    make_images(tmp_path / "dog", 3, seed=5)  # more photos of the dog, later
    summary = ingested_images(con, [tmp_path], workers=1)
    assert summary.images_joined_concepts >= 2
    rows = con.execute("SELECT count(*) FILTER (concept = 'sks dog'), count(*) FROM images_view WHERE status = 'ok'").fetchone()
    assert rows[0] == rows[1]


def test_a_removed_kohya_folder_concept_stays_removed_when_other_files_are_ingested(con, tmp_path):
    """Before, every ingest that read any file read all folder names again, so `concept remove` of a
    concept made from a `10_sks dog` folder was undone by the next ingest of unrelated photos."""
    from pipelines.concepts import get_concept, removed_concept

    make_images(tmp_path / "10_sks dog", 2)
    ingested_images(con, [tmp_path], workers=1)
    assert get_concept(con, "sks dog").images == 2
    removed_concept(con, "sks dog")
    make_images(tmp_path / "holiday", 2, seed=3)  # new photos elsewhere
    summary = ingested_images(con, [tmp_path], workers=1)
    assert summary.new == 2 and get_concept(con, "sks dog") is None
    make_images(tmp_path / "10_sks dog", 3, seed=9)  # a file added to (or changed in) the folder names it again
    ingested_images(con, [tmp_path], workers=1)
    assert get_concept(con, "sks dog").images == 3  # one new file, two rewritten: all three read


def test_a_file_excluded_by_hand_and_then_edited_in_place_stays_excluded(con, tmp_path):
    """Before, the edited file's new content was back in the dataset with no word: a hand exclusion goes with the
    file, as its manual caption does (include it again if the edit fixed it)."""
    from pipelines.filter import manual_exclusions

    from pipelines.tags import tagged_images

    paths = make_images(tmp_path / "imgs", 2)
    ingested_images(con, [tmp_path / "imgs"], workers=1)
    old_id = con.execute("SELECT image_id FROM paths WHERE path = ?", [str(paths[0])]).fetchone()[0]
    manual_exclusions(con, [old_id], "watermark")
    tagged_images(con, [old_id], "to review")
    Image.new("RGB", (50, 40), (10, 200, 10)).save(paths[0])  # rotated, retouched...
    os.utime(paths[0], ns=(1, 1))
    ingested_images(con, [tmp_path / "imgs"], workers=1)
    new_id, reason, tags = con.execute("SELECT image_id, exclusion_reason, tags FROM images_view WHERE path = ?", [str(paths[0])]).fetchone()
    assert new_id != old_id and reason.startswith("manual: watermark") and "edited" in reason
    assert tags == ["to review"]  # an odd-files review: the tags stayed on the old content's row, which no file holds
    assert con.execute("SELECT count(*) FROM dataset").fetchone()[0] == 1


def test_an_image_let_in_above_pils_pixel_cap_stays_readable_in_later_steps(tmp_path, monkeypatch):
    """`ingest --max-pixels` lets a large scan in; caption and evaluate then refused it as a decompression bomb
    (evaluate with a traceback) because PIL applies its own, lower cap in every other process."""
    from PIL import Image as PILImage

    from pipelines.caption import open_rgb
    from pipelines.train.evaluate import _open

    path = tmp_path / "scan.png"
    Image.new("RGB", (100, 100), (200, 30, 30)).save(path)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels is over twice this: a "bomb" to PIL
    with pytest.raises(PILImage.DecompressionBombError):
        PILImage.open(path)
    assert open_rgb(bytes(path)).size == (100, 100)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)
    assert _open(str(path)).size == (100, 100)
    from pipelines.train.data import ItemSpec, TrainImage, load_pixels

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)
    image = TrainImage("a" * 64, str(path), "", bucket=(64, 64), resized=(64, 64), crop=(0, 0))
    assert load_pixels(image, ItemSpec(0, "instance", False, (0, 0), None, "")).shape == (3, 64, 64)


def test_files_that_are_not_images_are_counted_as_skipped(con, tmp_path):
    """The summary's "skipped not images" stayed 0; a non-image file named on purpose was passed over in silence."""
    make_images(tmp_path / "set", 1)
    (tmp_path / "set" / "notes.json").write_text("{}")
    (tmp_path / "set" / "image_0.txt").write_text("a caption")  # a sidecar is no skipped file
    (tmp_path / "mk.py").write_text("print('hi')")
    assert ingested_images(con, [tmp_path / "set"], workers=1).skipped_not_images == 1
    named = ingested_images(con, [tmp_path / "mk.py"], workers=1)
    assert (named.skipped_not_images, named.files_seen) == (1, 0)


def test_a_kohya_reg_folder_beside_img_is_left_out(con, tmp_path, catalog_path):
    """`workbench ingest` of a kohya dataset (or a workbench export) took reg/1_a photo of a cat as an instance concept
    "a photo of a cat" with trigger "a", and its class images as training photos."""
    from typer.testing import CliRunner

    from workbench.catalog import connect
    from workbench.cli import app

    make_images(tmp_path / "set" / "img" / "10_sks cat", 2)
    make_images(tmp_path / "set" / "reg" / "1_a photo of a cat", 2, seed=1)
    make_images(tmp_path / "other" / "reg", 1, seed=2)  # a folder named reg without kohya's layout is read
    con.close()
    result = CliRunner().invoke(app, ["ingest", str(tmp_path), "--catalog", str(catalog_path), "--workers", "1"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "import-kohya" in result.output
    check = connect(catalog_path)
    assert check.execute("SELECT count(*) FROM images").fetchone()[0] == 3
    assert [r[0] for r in check.execute("SELECT name FROM concepts").fetchall()] == ["sks cat"]
    check.close()
    # named as a root, it is read (the user asked), and the run says what its images become
    direct = CliRunner().invoke(app, ["ingest", str(tmp_path / "set" / "reg"), "--catalog", str(catalog_path), "--workers", "1"],
                                env={"COLUMNS": "200"})
    assert direct.exit_code == 0 and "holds kohya regularisation images" in " ".join(direct.output.split()), direct.output
    assert "workbench priors" in " ".join(direct.output.split())


def test_heic_photos_no_images_and_a_stale_dedup_are_each_named(tmp_path, catalog_path):
    """HEIC/AVIF photos only added to "skipped not images"; a folder without images said nothing; new images after a
    dedup stayed ungrouped without a word."""
    from typer.testing import CliRunner

    from workbench.cli import app

    runner = CliRunner()
    make_images(tmp_path / "photos", 2)
    (tmp_path / "photos" / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)
    (tmp_path / "photos" / "IMG_0002.heif").write_bytes(b"\x00\x00\x00\x1cftypheix" + b"\x00" * 64)
    common = ["--catalog", str(catalog_path), "--workers", "1"]
    first = runner.invoke(app, ["ingest", str(tmp_path / "photos"), *common], env={"COLUMNS": "200"})
    assert first.exit_code == 0, first.output
    text = " ".join(first.output.split())
    heic = "HEIC" if PILLOW_READS_AVIF else "HEIC/AVIF"  # AVIF is read where Pillow decodes it
    assert f"2 {heic} photo(s) left out" in text and "not in duplicate groups" not in text
    assert runner.invoke(app, ["dedup", "--catalog", str(catalog_path)]).exit_code == 0
    make_images(tmp_path / "photos" / "more", 1, seed=4)
    again = runner.invoke(app, ["ingest", str(tmp_path / "photos"), *common], env={"COLUMNS": "200"})
    assert "1 new or changed image(s) are not in duplicate groups yet" in " ".join(again.output.split())
    assert runner.invoke(app, ["dedup", "--catalog", str(catalog_path)]).exit_code == 0
    moved = tmp_path / "photos" / "moved"
    moved.mkdir()
    next((tmp_path / "photos" / "more").iterdir()).rename(moved / "here.png")  # a move: no image dedup has not seen
    after_move = runner.invoke(app, ["ingest", str(tmp_path / "photos"), *common], env={"COLUMNS": "200"})
    assert after_move.exit_code == 0 and "not in duplicate groups" not in after_move.output, after_move.output
    notes = tmp_path / "[notes]"  # brackets, as in "[2019] holiday": rich markup had eaten them from the note
    notes.mkdir()
    (notes / "todo.txt").write_text("nothing")
    empty = runner.invoke(app, ["ingest", str(notes), *common], env={"COLUMNS": "400"})
    assert f"no image files in {notes}." in " ".join(empty.output.split())
    # a HEIC named alone: its own note, not also "no image files in" it (a review found the two side by side)
    alone = runner.invoke(app, ["ingest", str(tmp_path / "photos" / "IMG_0001.HEIC"), *common], env={"COLUMNS": "200"})
    said = " ".join(alone.output.split())
    assert f"1 {heic} photo(s) left out" in said and "no image files in" not in said, alone.output


def test_an_export_inside_an_ingested_folder_is_left_out_by_the_next_ingest(con, tmp_path):
    """The export's caption files came back as sidecar captions that overrode the model's (and its image took the
    export's path), and the next `export --overwrite` was refused as the catalog now read images from it."""
    from pipelines.export import exported_dataset

    data = tmp_path / "data"
    make_images(data, 2)
    ingested_images(con, [data], workers=1)
    con.execute("INSERT INTO captions (image_id, source, text) SELECT image_id, 'model:tiny', 'v1 a photo' FROM images")
    exported_dataset(con, data / "kohya_export", format="kohya")
    exported_dataset(con, data / "hf_export", format="imagefolder")
    again = ingested_images(con, [data], workers=1)
    assert (again.new, again.sidecar_captions, again.output_folders_skipped, again.marked_missing) == (0, 0, 2, 0)
    assert {r for (r,) in con.execute("SELECT caption_source FROM images_view").fetchall()} == {"model:tiny"}
    assert con.execute("SELECT count(*) FROM paths WHERE regexp_matches(path, '/(kohya|hf)_export/')").fetchone()[0] == 0
    assert exported_dataset(con, data / "kohya_export", format="kohya", overwrite=True)["images"] == 2



def _coffee_and_smaller_copy(folder: Path) -> Path:
    """`folder` with coffee.png (a sample photo) and coffee_q70.jpg, its half-size JPEG copy: one duplicate group."""
    folder.mkdir()
    with Image.open(Path(__file__).resolve().parents[1] / "sample_data" / "photos" / "coffee.jpg") as photo:
        photo.save(folder / "coffee.png")
        photo.resize((photo.width // 2, photo.height // 2)).save(folder / "coffee_q70.jpg", quality=70)
    return folder

def test_a_dedup_made_stale_by_a_kept_copy_going_and_coming_back_is_named(tmp_path, catalog_path):
    """When the kept copy of a group went missing the dataset had no copy of the picture, and when it came back after
    another dedup, two; ingest said nothing of running dedup again, as it does for new files."""
    from typer.testing import CliRunner

    from workbench.cli import app

    runner = CliRunner()
    data = _coffee_and_smaller_copy(tmp_path / "data")
    common = ["--catalog", str(catalog_path), "--workers", "1"]

    def ingest() -> str:
        result = runner.invoke(app, ["ingest", str(data), *common], env={"COLUMNS": "300"})
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    def dedup() -> None:
        assert runner.invoke(app, ["dedup", "--catalog", str(catalog_path)]).exit_code == 0

    ingest()
    dedup()
    (data / "coffee.png").rename(tmp_path / "coffee.png")
    gone = ingest()
    assert "1 image(s) in duplicate groups went missing, 1 of them kept copies" in gone and "run `workbench dedup`" in gone
    dedup()
    (tmp_path / "coffee.png").rename(data / "coffee.png")
    back = ingest()
    assert "1 image(s) back from missing are not in duplicate groups" in back and "run `workbench dedup`" in back
    dedup()
    assert "Note" not in ingest()  # nothing changed since the last dedup


def test_a_link_to_a_folder_walked_through_another_path_is_walked_there_too(con, tmp_path):
    """A link to a folder the walk also reached directly was counted as a "directory cycle" and not walked, so the
    files recorded under the link (from an ingest of the link's folder) were marked missing though they exist."""
    data = tmp_path / "data"
    make_images(data / "photos", 1)
    (data / "shortcuts").mkdir()
    (data / "shortcuts" / "photos_link").symlink_to(data / "photos")
    (data / "train").mkdir()
    (data / "train" / "10_sks dog").symlink_to(data / "photos")  # kohya users link photo folders into subset folders
    ingested_images(con, [data / "shortcuts"], workers=1)
    summary = ingested_images(con, [data], workers=1)
    assert (summary.marked_missing, summary.directory_cycles_skipped) == (0, 0)
    assert con.execute("SELECT count(*) FROM paths WHERE NOT missing").fetchone()[0] == 3
    assert con.execute("SELECT concept FROM images_view").fetchall() == [("sks dog",)]
    (data / "photos" / "up").symlink_to(data)  # a link to a folder above it is a cycle, and is not followed
    assert ingested_images(con, [data], workers=1).directory_cycles_skipped == 3  # met under each path of photos/


@pytest.mark.parametrize("history", ["together", "sidecars_later", "a_then_b", "b_then_a"])
def test_copies_with_different_sidecars_take_the_first_paths_whatever_the_history(con, tmp_path, history):
    """Byte-identical copies whose sidecars differ stored the caption of whichever was read last (a fresh catalog:
    a; sidecars added later: b), with no word, and counted two sidecar captions where one was stored."""
    first, second = make_images(tmp_path / "t" / "a", 1)[0], make_images(tmp_path / "t" / "b", 1)[0]
    assert first.read_bytes() == second.read_bytes()
    captions = {first.with_suffix(".txt"): "caption from a", second.with_suffix(".txt"): "caption from b"}
    if history != "sidecars_later":
        for path, text in captions.items():
            path.write_text(text)
    if history == "together":
        summary = ingested_images(con, [tmp_path / "t"], workers=1)
    elif history == "sidecars_later":
        ingested_images(con, [tmp_path / "t"], workers=1)
        for path, text in captions.items():
            path.write_text(text)
        summary = ingested_images(con, [tmp_path / "t"], workers=1)
    else:
        order = ["a", "b"] if history == "a_then_b" else ["b", "a"]
        ingested_images(con, [tmp_path / "t" / order[0]], workers=1)
        summary = ingested_images(con, [tmp_path / "t" / order[1]], workers=1)
    assert con.execute("SELECT text FROM captions WHERE source = 'sidecar'").fetchall() == [("caption from a",)]
    assert summary.sidecar_captions == 1
    assert summary.sidecar_conflicts == {str(first.with_suffix(".txt")): [str(second.with_suffix(".txt"))]}
    first.with_suffix(".txt").unlink()  # the first copy's sidecar gone: the other copy's gives the caption
    ingested_images(con, [tmp_path / "t"], workers=1)
    assert con.execute("SELECT text FROM captions WHERE source = 'sidecar'").fetchall() == [("caption from b",)]


HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 100


def test_heic_photos_are_named_and_known_by_content_whatever_their_name(tmp_path, catalog_path):
    """The note counted HEIC/AVIF photos but named none, and HEIC content under a .jpg name was "not an image:
    unknown binary data" with no word of HEIC."""
    from typer.testing import CliRunner

    from workbench.cli import app

    photos = tmp_path / "photos"
    make_images(photos, 1)
    for name in ("IMG_0001.HEIC", "IMG_0002.heic", "IMG_0003.heif", "IMG_0004.avif"):
        (photos / name).write_bytes(HEIC)
    (photos / "IMG_0005.jpg").write_bytes(HEIC)  # an iPhone photo renamed, or saved by an app under a .jpg name
    (photos / "samsung.dat").write_bytes(b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00heicmif1" + b"\x00" * 100)  # brand 2nd
    result = CliRunner().invoke(app, ["ingest", str(photos), "--catalog", str(catalog_path), "--workers", "1"],
                                env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    heic = "HEIC" if PILLOW_READS_AVIF else "HEIC/AVIF"
    assert f"6 {heic} photo(s) left out: this Pillow cannot decode them ({photos / 'IMG_0001.HEIC'}, " in text
    assert "and 3 more)" in text
    assert read_image_file(bytes(photos / "IMG_0005.jpg"))["error"].startswith("HEIC/AVIF image: this Pillow cannot decode it")


@pytest.mark.skipif(not PILLOW_READS_AVIF, reason="this Pillow has no AVIF decoder")
def test_avif_photos_are_read_where_pillow_decodes_them(con, tmp_path):
    """AVIF files were refused by their brand as "this Pillow cannot decode it", though Pillow (libavif) reads them."""
    folder = tmp_path / "photos"
    folder.mkdir()
    picture = Image.new("RGB", (48, 32), (200, 60, 20))
    picture.save(folder / "a.avif", quality=90)
    picture.transpose(Image.Transpose.ROTATE_90).save(folder / "renamed.jpg", format="AVIF")  # an AVIF under a .jpg name
    (folder / "IMG_0001.HEIC").write_bytes(HEIC)  # still refused by name, with the note
    summary = ingested_images(con, [folder], workers=1)
    rows = con.execute("SELECT path, status, format, width, height FROM images_view ORDER BY path").fetchall()
    assert rows == [(str(folder / "a.avif"), "ok", "AVIF", 48, 32), (str(folder / "renamed.jpg"), "ok", "AVIF", 32, 48)]
    assert summary.heic_avif_paths == [str(folder / "IMG_0001.HEIC")]


def test_a_plain_colour_has_an_entropy_of_zero_bits_not_minus_zero(tmp_path):
    import math

    path = tmp_path / "white.png"
    Image.new("RGB", (64, 64), (255, 255, 255)).save(path)
    entropy = read_image_file(os.fsencode(path))["entropy"]
    assert entropy == 0 and math.copysign(1.0, entropy) == 1.0  # SQL and the TUI printed "-0.0"


def test_a_file_overwritten_with_another_known_images_bytes_gives_that_image_none_of_its_state(con, tmp_path):
    """`cp p1.jpg p0.jpg` after p0 was excluded by hand: the exclusion (and manual caption, caption choice and
    concept) of p0's old content moved onto p1's image, which the user never excluded, and it left the dataset.
    What an edited file carries goes only to a content new to the catalog."""
    import shutil

    from pipelines.concepts import added_concept
    from pipelines.filter import manual_exclusions

    paths = make_images(tmp_path / "imgs", 3)
    ingested_images(con, [tmp_path / "imgs"], workers=1)
    ids = {p.name: con.execute("SELECT image_id FROM paths WHERE path = ?", [str(p)]).fetchone()[0] for p in paths}
    old, other = ids["img_0000.jpg"], ids["img_0001.jpg"]
    manual_exclusions(con, [old], "ugly")
    con.execute("INSERT INTO captions (image_id, source, text) VALUES (?, 'manual', 'not this one')", [old])
    con.execute("INSERT INTO caption_choice (image_id, source) VALUES (?, 'manual')", [old])
    added_concept(con, "sks", trigger="sks", where=f"image_id = '{old}'")

    shutil.copyfile(paths[1], paths[0])
    os.utime(paths[0], ns=(1, 1))
    ingested_images(con, [tmp_path / "imgs"], workers=1)
    assert con.execute("SELECT image_id FROM paths WHERE path = ?", [str(paths[0])]).fetchone()[0] == other
    row = con.execute("SELECT status, excluded, exclusion_reason, caption_source, concept FROM images_view "
                      "WHERE image_id = ?", [other]).fetchone()
    assert row == ("ok", False, None, None, None)
    assert con.execute("SELECT count(*) FROM caption_choice WHERE image_id = ?", [other]).fetchone()[0] == 0
    assert sorted(r[0] for r in con.execute("SELECT image_id FROM dataset").fetchall()) == sorted([other, ids["img_0002.jpg"]])
    # the old content keeps its own state, and says what replaced it
    assert con.execute("SELECT status, excluded, caption FROM images_view WHERE image_id = ?", [old]).fetchone() == (
        "replaced", True, "not this one")
    # naming the file that was edited, not the first path of the image now in it (img_0001.jpg)
    error = con.execute("SELECT error FROM images_view WHERE image_id = ?", [old]).fetchone()[0]
    assert error == f"edited in place: {paths[0]} now holds image {other[:12]}"

    # an edit to bytes new to the catalog still carries the hand-made state, as before
    Image.new("RGB", (50, 40), (10, 200, 10)).save(paths[2])
    os.utime(paths[2], ns=(1, 1))
    manual_exclusions(con, [ids["img_0002.jpg"]], "blurry")
    ingested_images(con, [tmp_path / "imgs"], workers=1)
    reason = con.execute("SELECT exclusion_reason FROM images_view WHERE path = ?", [str(paths[2])]).fetchone()[0]
    assert reason.startswith("manual: blurry") and "edited" in reason


def test_a_touched_or_restored_file_with_the_same_bytes_is_not_changed(tmp_path, catalog_path):
    """A new mtime alone (`touch`, a file deleted and restored from a backup) counted as `changed`, was decoded
    again, made ingest say to run dedup though the image was in its group, and a restored file was not `reappeared`."""
    import json

    from typer.testing import CliRunner

    from pipelines.concepts import removed_concept
    from workbench.catalog import connect
    from workbench.cli import app

    runner = CliRunner()
    folder = _coffee_and_smaller_copy(tmp_path / "10_sks dog")
    kept, copy = folder / "coffee.png", folder / "coffee_q70.jpg"
    common = ["--catalog", str(catalog_path), "--workers", "1"]

    def ingest() -> tuple[str, dict]:
        result = runner.invoke(app, ["ingest", str(folder), *common], env={"COLUMNS": "300"})
        assert result.exit_code == 0, result.output
        con = connect(catalog_path)
        try:
            counts = con.execute("SELECT counts FROM runs WHERE step = 'ingest' ORDER BY run_id DESC LIMIT 1").fetchone()[0]
        finally:
            con.close()
        return " ".join(result.output.split()), json.loads(counts)

    ingest()
    assert runner.invoke(app, ["dedup", "--catalog", str(catalog_path)]).exit_code == 0
    con = connect(catalog_path)
    assert con.execute("SELECT count(*) FROM duplicates").fetchone()[0] == 2
    removed_concept(con, "sks dog")  # removed: stays removed until a file in its folder is added or changed
    con.close()

    os.utime(kept, ns=(1_000_000_000, 1_000_000_000))  # touched
    out, counts = ingest()
    assert "Note" not in out and "from folder names" not in out, out
    assert (counts["changed"], counts["unchanged"], counts["new"]) == (0, 2, 0)
    con = connect(catalog_path)
    assert con.execute("SELECT mtime_ns FROM paths WHERE path = ?", [str(kept)]).fetchone()[0] == 1_000_000_000
    assert con.execute("SELECT count(*) FROM concepts").fetchone()[0] == 0
    con.close()

    saved = copy.read_bytes()
    copy.unlink()
    ingest()
    copy.write_bytes(saved)  # restored, with a new mtime
    out, counts = ingest()
    assert "Note" not in out, out  # still in its group: nothing for dedup to do
    assert (counts["changed"], counts["unchanged"], counts["reappeared"], counts["new"]) == (0, 1, 1, 0)
    con = connect(catalog_path)
    assert con.execute("SELECT mtime_ns, missing FROM paths WHERE path = ?", [str(copy)]).fetchone() == (
        copy.stat().st_mtime_ns, False)
    con.close()
    out, counts = ingest()  # the new mtimes were recorded: nothing to read
    assert "Note" not in out and counts["unchanged"] == 2


def test_a_file_edited_to_the_same_size_is_still_read_as_changed(con, tmp_path):
    """Same size, new time: the worker hashes first, and other bytes are decoded as a new content."""
    path = tmp_path / "imgs" / "flat.bmp"
    path.parent.mkdir()
    Image.new("RGB", (32, 24), (10, 20, 30)).save(path)
    ingested_images(con, [path.parent], workers=2)
    old_id = con.execute("SELECT image_id FROM paths").fetchone()[0]
    size = path.stat().st_size
    Image.new("RGB", (32, 24), (200, 20, 30)).save(path)
    os.utime(path, ns=(1, 1))
    assert path.stat().st_size == size
    summary = ingested_images(con, [path.parent], workers=2)
    assert (summary.changed, summary.unchanged) == (1, 0)
    new_id, brightness = con.execute("SELECT image_id, brightness FROM images_view WHERE path = ?", [str(path)]).fetchone()
    assert new_id != old_id and brightness > 60


def test_moved_and_deleted_files_count_missing_images_and_paths_apart(con, tmp_path):
    """After moving 3 files and deleting 2, the summary said `marked missing 5`: only 2 images were missing."""
    paths = make_images(tmp_path / "imgs", 6)
    ingested_images(con, [tmp_path], workers=1)
    (tmp_path / "imgs" / "moved").mkdir()
    for path in paths[:3]:
        path.rename(path.parent / "moved" / path.name)
    paths[3].unlink()
    paths[4].unlink()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(tmp_path / "imgs" / "really_new.png")
    (tmp_path / "imgs" / "copy.png").write_bytes(paths[5].read_bytes())
    summary = ingested_images(con, [tmp_path], workers=1)
    # the 3 moved files and the copy are new paths of images the catalog had: said apart from the one new picture
    assert (summary.new, summary.moved_or_copied, summary.marked_missing, summary.paths_marked_missing) == (5, 4, 2, 5)
    assert con.execute("SELECT count(*) FROM images_view WHERE status = 'missing'").fetchone()[0] == 2
    # a moved image: its old path is named as gone, beside the path it is at now
    moved = con.execute("SELECT path, missing_paths FROM images_view WHERE path LIKE '%/moved/%' ORDER BY path").fetchall()
    assert [(os.path.basename(p), [os.path.basename(m) for m in gone]) for p, gone in moved] == [
        (path.name, [path.name]) for path in paths[:3]]
    assert con.execute("SELECT missing_paths FROM images_view WHERE image_id = (SELECT image_id FROM paths "
                       "WHERE path LIKE '%copy.png')").fetchone()[0] == []  # both its files are there


def test_a_stopped_ingest_records_in_its_run_what_it_stored(con, tmp_path):
    """A cancelled run's counts said `"new": 120` (what the walk found) while 64 files had been read and kept."""
    import json

    make_images(tmp_path / "imgs", 120)

    def hook(*, task, completed=0, total=None, message=None):
        if task == "ingest" and completed >= 64:
            raise KeyboardInterrupt

    with pytest.raises(ingest_mod.IngestInterrupted) as stopped:
        ingested_images(con, [tmp_path / "imgs"], workers=1, progress=hook)
    kept = con.execute("SELECT count(*) FROM paths").fetchone()[0]
    assert kept == stopped.value.summary.recorded == 64
    status, counts = con.execute("SELECT status, counts FROM runs WHERE step = 'ingest'").fetchone()
    counts = json.loads(counts)
    assert status == "cancelled" and (counts["new"], counts["not_read"], counts["files_seen"]) == (64, 56, 120)
    assert ingested_images(con, [tmp_path / "imgs"], workers=1).new == 56


def _slow_ingest_script(folder: Path, catalog: Path, marks: Path, *, cli: bool) -> str:
    """A script that ingests `folder` with 2 workers whose every read marks `marks/<worker pid>-<file>` and takes
    10 ms (workers fork from it, so they read through its patch): through the CLI, or ingested_images itself."""
    head = textwrap.dedent(
        f"""
        import os, sys, time
        import pipelines.ingest as ingest
        ingest.CHUNK = 4
        real_read = ingest.read_image_file
        def read(path_bytes, max_pixels=ingest.DEFAULT_MAX_PIXELS, **options):
            open(os.path.join({str(marks)!r}, f"{{os.getpid()}}-{{os.path.basename(path_bytes).decode()}}"), "w").close()
            time.sleep(0.01)
            return real_read(path_bytes, max_pixels, **options)
        ingest.read_image_file = read
        """
    )
    if cli:
        return head + textwrap.dedent(
            f"""
            sys.argv = ["workbench", "ingest", {str(folder)!r}, "--workers", "2", "--catalog", {str(catalog)!r}]
            from workbench.cli import main
            main()
            """
        )
    return head + textwrap.dedent(
        f"""
        from workbench.catalog import connect
        con = connect({str(catalog)!r})
        try:
            ingest.ingested_images(con, [{str(folder)!r}], workers=2)
        except ingest.IngestInterrupted as stop:
            print(f"stopped: kept {{stop.summary.recorded}}")
            sys.exit(3)
        """
    )


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie, dead but not yet reaped by whoever inherited it, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _start_slow_ingest(tmp_path: Path, *, cli: bool, files: int = 300):
    import time

    folder, marks, catalog = tmp_path / "imgs", tmp_path / "marks", tmp_path / "signalled.duckdb"
    make_images(folder, files, size=(32, 24))
    marks.mkdir()
    process = subprocess.Popen([sys.executable, "-c", _slow_ingest_script(folder, catalog, marks, cli=cli)],
                               cwd=Path(__file__).parents[1], start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while len(os.listdir(marks)) < 60 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(os.listdir(marks)) >= 60, "the ingest never got its workers reading"
    return process, folder, catalog, marks


def _worker_pids(marks: Path) -> set[int]:
    return {int(name.split("-", 1)[0]) for name in os.listdir(marks)}


def _end(process, marks: Path) -> None:
    """Clean up, whatever the test found: the ingest, and its workers if they outlived it."""
    import signal

    if process.poll() is None:
        process.kill()
    process.wait()
    for pid in _worker_pids(marks):
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the workers")
@pytest.mark.parametrize("how", ["cli_process", "cli_group", "library_process"])
def test_sigterm_stops_an_ingest_as_ctrl_c_does_and_leaves_no_worker(tmp_path, how):
    """SIGTERM (`kill PID`; `timeout`, which signals the whole process group) ended an ingest with nothing kept (the
    rows of its batch were not written) where Ctrl+C at the same moment kept what was read; workers printed
    tracebacks, or lived on."""
    import re
    import signal
    import time

    process, folder, catalog, marks = _start_slow_ingest(tmp_path, cli=how.startswith("cli"))
    try:
        if how == "cli_group":
            os.killpg(process.pid, signal.SIGTERM)
        else:
            os.kill(process.pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
        workers = _worker_pids(marks)
        deadline = time.monotonic() + 5
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = [pid for pid in workers if _alive(pid)]
    finally:
        _end(process, marks)
    assert "Traceback" not in output, output
    if how.startswith("cli"):
        assert process.returncode == 143, output  # 128 + SIGTERM, as shells and job schedulers read it (Ctrl+C: 130)
        kept = re.search(r"interrupted.*?(\d+) of 300", " ".join(output.split()))
    else:
        assert process.returncode == 3, output
        kept = re.search(r"stopped: kept (\d+)", output)
    assert kept, output
    assert len(workers) == 2 and not survivors
    from workbench.catalog import connect

    con = connect(catalog)
    try:
        assert 0 < con.execute("SELECT count(*) FROM paths").fetchone()[0] == int(kept.group(1)) < 300
        assert con.execute("SELECT status FROM runs WHERE step = 'ingest'").fetchall() == [("cancelled",)]
        assert ingested_images(con, [folder], workers=1).new == 300 - int(kept.group(1))
    finally:
        con.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_with_a_killed_ingest(tmp_path):
    """SIGKILL of `workbench ingest` left its worker processes waiting on their queue forever (PPID 1)."""
    import signal
    import time

    process, _, _, marks = _start_slow_ingest(tmp_path, cli=True)
    try:
        workers = _worker_pids(marks)
        assert len(workers) == 2 and all(map(_alive, workers))
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        deadline = time.monotonic() + 5
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_alive, workers)), "workers outlived their parent"
    finally:
        _end(process, marks)


def test_an_output_folder_named_to_ingest_is_left_out_and_said(tmp_path, catalog_path):
    """`workbench ingest runs/*` read a run's sample grids and loss.png as training photos, without a note."""
    from typer.testing import CliRunner

    from workbench.cli import app
    from workbench.config import mark_output_folder

    make_images(tmp_path / "photos", 2)
    make_images(tmp_path / "runs" / "db1" / "samples", 2, seed=1)
    mark_output_folder(tmp_path / "runs" / "db1")
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "photos"), str(tmp_path / "runs" / "db1"), "--catalog",
                                      str(catalog_path), "--workers", "1"], env={"COLUMNS": "200"})
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and f"left out {tmp_path / 'runs' / 'db1'}" in said and "not photos to train on" in said, result.output
    from workbench.catalog import connect

    check = connect(catalog_path, read_only=True)
    assert check.execute("SELECT count(*) FROM images").fetchone()[0] == 2
    check.close()


def test_outputs_of_older_versions_without_markers_are_left_out(con, tmp_path):
    """An upgrader's review: `ingest .` over an older project read its kohya export (no manifest then) as photos,
    whose caption files then outranked every model caption, and a run folder's images too."""
    make_images(tmp_path / "project" / "photos", 2)
    export = tmp_path / "project" / "exp_kohya"
    make_images(export / "img" / "10_sks dog", 2, seed=1)
    (export / "dataset.toml").write_text("# sd-scripts dataset config written by `workbench export --format kohya`.\n[general]\n")
    run = tmp_path / "project" / "runs" / "db"
    make_images(run / "pipeline", 1, seed=2)
    (run / "checkpoints").mkdir()
    (run / "loss.csv").write_text("step,loss\n")
    mine = tmp_path / "project" / "my_kohya_set"  # a dataset.toml of the user's own: a folder of photos still
    make_images(mine, 1, seed=3)
    (mine / "dataset.toml").write_text("[general]\nenable_bucket = true\n")
    summary = ingested_images(con, [tmp_path / "project"], workers=1)
    assert summary.output_folders_skipped == 2
    assert con.execute("SELECT count(*) FROM images").fetchall()[0][0] == 3


def test_an_image_with_both_a_txt_and_a_caption_sidecar_is_named(con, tmp_path):
    """kohya's --caption_extension defaults to .caption, its GUI's and WD14's to .txt: with both, .txt won silently."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (32, 24), (200, 0, 0)).save(folder / "dog.png")
    (folder / "dog.txt").write_text("from the txt")
    (folder / "dog.caption").write_text("from the caption file")
    Image.new("RGB", (32, 24), (0, 200, 0)).save(folder / "cat.png")
    (folder / "cat.caption").write_text("a cat")
    summary = ingested_images(con, [folder], workers=1)
    assert summary.both_sidecars == [str(folder / "dog.txt")]
    assert sidecar_captions(con) == {"dog": "from the txt", "cat": "a cat"}


def test_a_file_that_cannot_be_read_does_not_make_dedup_stale(tmp_path, catalog_path):
    """A link whose target was removed became an error row, and ingest said "1 new or changed image(s) are not in
    duplicate groups yet: run `workbench dedup`", for nothing dedup could group."""
    from typer.testing import CliRunner

    from workbench.cli import app

    runner = CliRunner()
    make_images(tmp_path / "photos", 2)
    common = ["--catalog", str(catalog_path), "--workers", "1"]
    assert runner.invoke(app, ["ingest", str(tmp_path / "photos"), *common]).exit_code == 0
    assert runner.invoke(app, ["dedup", "--catalog", str(catalog_path)]).exit_code == 0
    (tmp_path / "photos" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "photos" / "notes.jpg").write_text("not a picture")
    again = runner.invoke(app, ["ingest", str(tmp_path / "photos"), *common], env={"COLUMNS": "200"})
    assert again.exit_code == 0 and "files recorded as errors" in again.output
    assert "not in duplicate groups" not in again.output, again.output


def test_a_slow_ingest_commits_what_it_read_every_few_seconds(con, tmp_path, monkeypatch):
    """A review: an ingest killed (kill -9) 15 s into large PNGs had committed nothing: rows went to the catalog
    2,048 at a time, so up to that many files' work was lost. Now also once FLUSH_SECONDS have passed."""
    make_images(tmp_path / "set", 2 * ingest_mod.CHUNK + 1, size=(16, 16))
    batches: list[int] = []
    write = ingest_mod._write_batch
    monkeypatch.setattr(ingest_mod, "_write_batch", lambda con, rows, role="instance": (batches.append(len(rows)), write(con, rows, role)))
    ingested_images(con, [tmp_path / "set"], workers=1)
    assert [n for n in batches if n] == [2 * ingest_mod.CHUNK + 1]  # quick: one transaction
    batches.clear()
    monkeypatch.setattr(ingest_mod, "FLUSH_SECONDS", 0.0)  # every chunk counts as slow
    make_images(tmp_path / "more", 2 * ingest_mod.CHUNK + 1, size=(16, 16), seed=1)
    ingested_images(con, [tmp_path / "more"], workers=1)
    assert [n for n in batches if n] == [ingest_mod.CHUNK, ingest_mod.CHUNK, 1]
    assert con.execute("SELECT count(*) FROM images").fetchall() == [(4 * ingest_mod.CHUNK + 2,)]


def test_a_caption_file_touched_but_saying_what_ingest_read_is_not_changed(con, tmp_path):
    """A review: after a caption was edited by hand, a `touch` of its sidecar (or an edit written to it and undone)
    was said to be an edit made elsewhere, with advice that would have thrown the hand edit away."""
    from pipelines.caption_edits import save_manual_caption
    from workbench.images import sidecars_changed_since_ingest

    paths = make_images(tmp_path / "imgs", 2)
    for path in paths:
        path.with_suffix(".txt").write_text("1girl, solo, smile")
    ingested_images(con, [tmp_path / "imgs"], workers=1)
    ids = dict(con.execute("SELECT path, image_id FROM images_view").fetchall())
    for path in paths:
        save_manual_caption(con, ids[str(path)], "mychar, 1girl, solo")  # the catalog's caption now differs from the file
    for path in paths:
        os.utime(path.with_suffix(".txt"), ns=(5, 5))  # touched: its text is what ingest read
    assert sidecars_changed_since_ingest(con, list(ids.values())) == []
    paths[1].with_suffix(".txt").write_text("1girl, solo, frown")  # edited elsewhere: said
    assert sidecars_changed_since_ingest(con, list(ids.values())) == [str(paths[1].with_suffix(".txt"))]


def test_a_kohya_folder_concept_made_again_by_a_new_file_takes_the_whole_folder(con, tmp_path):
    """A multi-concept review: a removed `3_sks dog` concept came back with only the file just added to its folder;
    the folder's other four images stayed in no concept and trained with no trigger."""
    from pipelines.concepts import get_concept, removed_concept

    make_images(tmp_path / "3_sks dog", 4)
    ingested_images(con, [tmp_path], workers=1)
    removed_concept(con, "sks dog")
    extra = make_images(tmp_path / "new", 1, seed=5)[0]
    extra.rename(tmp_path / "3_sks dog" / "added.jpg")
    ingested_images(con, [tmp_path], workers=1)
    concept = get_concept(con, "sks dog")
    assert (concept.images, concept.repeats) == (5, 3)


def test_hidden_files_and_folders_are_skipped_and_counted(con, tmp_path):
    """An odd-files review: `.thumbnails/thumb.jpg`, `__MACOSX/photo.jpg` and `.hidden.jpg` were ingested as training
    photos, and macOS's AppleDouble `._photo.jpg` was recorded as an error on every run."""
    make_images(tmp_path / "photos", 2)
    make_images(tmp_path / "photos" / ".thumbnails", 1, seed=1)
    make_images(tmp_path / "photos" / "__MACOSX", 1, seed=2)
    make_images(tmp_path / "nested", 1, seed=3)[0].rename(tmp_path / "photos" / ".hidden.jpg")
    (tmp_path / "photos" / "._img_0000.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble metadata")
    summary = ingested_images(con, [tmp_path / "photos"], workers=1)
    assert (summary.new, summary.hidden_files_and_folders_skipped) == (2, 4)
    assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 2
    again = ingested_images(con, [tmp_path / "photos"], workers=1)
    assert again.marked_missing == 0 and again.paths_marked_missing == 0
    # one ingested before hidden files were skipped (a code review: it stayed in the dataset for good) leaves it
    con.execute("INSERT INTO images (image_id, width, height, status) VALUES ('old', 96, 64, 'ok')")
    con.execute("INSERT INTO paths (path, path_bytes, image_id, seq) VALUES (?, ?, 'old', 99)",
                [str(tmp_path / "photos" / ".thumbnails" / "img_0000.jpg"), bytes(tmp_path / "photos" / ".thumbnails" / "img_0000.jpg")])
    later = ingested_images(con, [tmp_path / "photos"], workers=1)
    assert later.marked_missing == 1
    assert con.execute("SELECT count(*) FROM dataset WHERE image_id = 'old'").fetchone()[0] == 0


def test_a_named_pipe_as_a_caption_sidecar_is_left_out_not_waited_on(con, tmp_path):
    """An odd-files review: a FIFO named `a.txt` beside `a.jpg` hung the ingest for good (open() of a pipe waits for a
    writer), with the catalog held; only kill -9 ended it."""
    import os

    (image,) = make_images(tmp_path / "ff", 1)
    os.mkfifo(image.with_suffix(".txt"))
    summary = ingested_images(con, [tmp_path / "ff"], workers=1)  # returns (the test would hang otherwise)
    assert summary.new == 1 and summary.sidecars_left_out == 1
    assert "not a regular file" in next(iter(summary.sidecar_problems.values()))


def test_a_folder_past_the_path_length_limit_is_named_as_unread(con, tmp_path):
    """An odd-files review: folders deeper than PATH_MAX (4,096 bytes) were skipped without a word, unlike a folder
    that denies reading."""
    import os

    make_images(tmp_path / "vdeep", 1)
    deep = tmp_path / "vdeep"
    fd = os.open(deep, os.O_RDONLY)
    try:  # made relative to an open folder, a step at a time, as no single path may be that long
        for _ in range(18):
            os.mkdir("d" * 240, dir_fd=fd)
            inner = os.open("d" * 240, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        with open(os.open("deep.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as handle:
            handle.write(make_images(tmp_path / "src", 1, seed=4)[0].read_bytes())
    finally:
        os.close(fd)
    summary = ingested_images(con, [deep], workers=1)
    assert summary.new == 1
    assert len(summary.unreadable_folders) == 1 and "too long" in summary.unreadable_folders[0].lower()


def test_new_bytes_under_the_old_size_and_time_are_found_with_rehash(con, tmp_path):
    """An odd-files review: `cat b1.bmp > b0.bmp; touch -r ref0 b0.bmp` (same size, the old mtime put back) was never
    read again: the new pixels kept b0's image id and caption. Size and time cannot tell; --rehash hashes every file."""
    import os

    first, second = make_images(tmp_path / "sw", 2)  # the same size: 96x64 random JPEGs at one quality
    ingested_images(con, [tmp_path / "sw"], workers=1)
    old_id = con.execute("SELECT image_id FROM paths WHERE path = ?", [str(first)]).fetchone()[0]
    before = first.stat()
    data = second.read_bytes() + b"\0" * (before.st_size - second.stat().st_size)  # padded to b0's size: JPEG ignores the tail
    first.write_bytes(data)
    os.utime(first, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (first.stat().st_size, first.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert ingested_images(con, [tmp_path / "sw"], workers=1).unchanged == 2  # as rsync: size and time say unchanged
    summary = ingested_images(con, [tmp_path / "sw"], workers=1, rehash=True)
    assert (summary.changed, summary.unchanged) == (1, 1)
    assert con.execute("SELECT image_id FROM paths WHERE path = ?", [str(first)]).fetchone()[0] != old_id


def test_an_animated_image_is_said_to_train_on_its_first_frame(con, tmp_path):
    """An odd-files review: an animated GIF went in as its first frame (and out of export as a one-frame PNG) without a
    word."""
    frames = [Image.new("RGB", (64, 64), (i * 60, 20, 20)) for i in range(4)]
    (tmp_path / "anim").mkdir()
    frames[0].save(tmp_path / "anim" / "a.gif", save_all=True, append_images=frames[1:], duration=100)
    make_images(tmp_path / "anim", 1)
    summary = ingested_images(con, [tmp_path / "anim"], workers=1)
    assert summary.animated == [str(tmp_path / "anim" / "a.gif")]


def test_caption_files_named_other_than_kohya_reads_are_said(con, tmp_path):
    """An odd-files review: `UPPER2.PNG` with `UPPER2.TXT` (Windows tools) and `withext.jpg.txt` got model captions, and
    their caption files were not named as unread."""
    upper, withext, fine = make_images(tmp_path / "cap", 3)
    upper = upper.rename(tmp_path / "cap" / "UPPER2.JPG")
    (tmp_path / "cap" / "UPPER2.TXT").write_text("a caption")
    (tmp_path / "cap" / (withext.name + ".txt")).write_text("another")
    fine.with_suffix(".txt").write_text("read")
    summary = ingested_images(con, [tmp_path / "cap"], workers=1)
    assert sorted(summary.sidecars_misnamed) == sorted([str(tmp_path / "cap" / "UPPER2.TXT"), str(tmp_path / "cap" / (withext.name + ".txt"))])
    assert summary.sidecar_captions == 1


def test_a_folder_moved_as_a_whole_leaves_no_path_to_a_file_that_is_gone(tmp_path, catalog_path):
    """A large-set review: `mv photos photos_2024` and an ingest of the new name kept every image's `path` (and the
    duplicate review's keeper_path) at the old folder, and `ingest photos` was refused, so nothing could say it went."""
    from typer.testing import CliRunner

    from pipelines.dedup import duplicate_groups
    from workbench.catalog import connect
    from workbench.cli import app

    old = tmp_path / "photos"
    make_images(old / "x", 2)
    Image.open(old / "x" / "img_0000.jpg").resize((48, 32)).save(old / "small.jpg", quality=80)  # a copy: keeper img_0000
    (old / "x" / "empty.jpg").write_bytes(b"")  # unreadable: moved too
    with connect(catalog_path) as con:
        ingested_images(con, [old], workers=1)
        duplicate_groups(con)
        keeper = con.execute("SELECT keeper_path FROM duplicate_groups LIMIT 1").fetchone()[0]
        assert keeper == str(old / "x" / "img_0000.jpg")
    new = tmp_path / "photos_2024"
    old.rename(new)
    runner = CliRunner()
    moved = runner.invoke(app, ["ingest", str(new), "--catalog", str(catalog_path), "--workers", "1"], env={"COLUMNS": "200"})
    assert moved.exit_code == 0, moved.output
    said = " ".join(moved.output.split())
    # nothing new for dedup: no "-1 new or changed image(s)" (the unreadable file moved was taken off twice)
    assert "not in duplicate groups" not in said and "moved or copied │ 4" in said, said
    with connect(catalog_path) as con:
        paths = con.execute("SELECT path, missing_paths FROM images_view ORDER BY path").fetchall()
        assert all(path.startswith(str(new)) and len(gone) == 1 and gone[0].startswith(str(old)) for path, gone in paths), paths
        assert con.execute("SELECT DISTINCT keeper_path FROM duplicate_groups").fetchall() == [(str(new / "x" / "img_0000.jpg"),)]
    # a folder deleted outright: an ingest of its name marks its files missing; a name the catalog never knew is a typo
    import shutil

    shutil.rmtree(new)
    gone = runner.invoke(app, ["ingest", str(new), "--catalog", str(catalog_path), "--workers", "1"], env={"COLUMNS": "200"})
    assert gone.exit_code == 0 and "is gone: the files the catalog knows there are marked missing" in " ".join(gone.output.split()), gone.output
    with connect(catalog_path) as con:
        assert con.execute("SELECT DISTINCT status FROM images_view").fetchall() == [("missing",)]
    typo = runner.invoke(app, ["ingest", str(tmp_path / "fotos"), "--catalog", str(catalog_path)])
    assert typo.exit_code == 2 and "No such file or folder" in typo.output


def test_a_touched_unreadable_file_is_unchanged(con, tmp_path):
    """A `touch` of a file that cannot be decoded counted it as changed and as a new error; readable ones were
    unchanged already."""
    make_images(tmp_path / "imgs", 1)
    broken = tmp_path / "imgs" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    first = ingested_images(con, [tmp_path / "imgs"], workers=1)
    assert (first.new, first.errors) == (2, 1)
    for path in (tmp_path / "imgs").iterdir():
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    again = ingested_images(con, [tmp_path / "imgs"], workers=1)
    assert (again.changed, again.unchanged, again.errors) == (0, 2, 0)
    broken.write_bytes(b"\xff\xd8\xff still not a jpeg, and longer")  # new bytes are read (and fail) again
    third = ingested_images(con, [tmp_path / "imgs"], workers=1)
    assert (third.changed, third.errors) == (1, 1)


def test_an_ingest_of_a_deleted_file_or_a_folder_whose_parent_went_marks_them_missing(con, tmp_path):
    """A code review: a deleted file named directly became an error image ("file vanished") that took its path, and
    a deleted folder whose parent went too failed the run; a gone root is now walked as empty."""
    import shutil

    make_images(tmp_path / "top" / "sub", 2)
    make_images(tmp_path / "loose", 1, seed=5)
    ingested_images(con, [tmp_path / "top", tmp_path / "loose"], workers=1)
    (tmp_path / "loose" / "img_0000.jpg").unlink()
    shutil.rmtree(tmp_path / "top")
    said: list[str] = []
    summary = ingested_images(con, [tmp_path / "loose" / "img_0000.jpg", tmp_path / "top" / "sub"], workers=1,
                              progress=lambda **kw: said.append(kw.get("message") or ""))
    assert (summary.errors, summary.new, summary.paths_marked_missing, summary.marked_missing) == (0, 0, 3, 3)
    assert con.execute("SELECT DISTINCT status FROM images_view").fetchall() == [("missing",)]
    assert sum("is gone: the files the catalog knows there are marked missing" in m for m in said) == 2
    with pytest.raises(FileNotFoundError, match="No such file or folder to ingest"):  # never known: a typo
        ingested_images(con, [tmp_path / "top" / "other"], workers=1)


def test_rehash_reads_an_unreadable_file_again(con, tmp_path, monkeypatch):
    """A touch leaves an unreadable file as it was (its bytes are the same error); --rehash reads it again, for a
    decoder installed since."""
    make_images(tmp_path / "imgs", 1)
    broken = tmp_path / "imgs" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    ingested_images(con, [tmp_path / "imgs"], workers=1)
    again = ingested_images(con, [tmp_path / "imgs"], workers=1, rehash=True)
    assert (again.changed, again.errors) == (1, 1)  # read again (and still unreadable here)
