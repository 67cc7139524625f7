"""`workbench edit-captions`: bulk caption edits from the command line (find/replace, regex, tags, a set caption),
recorded in the catalog so `--undo` puts them back from a later process, sidecar files included."""

from __future__ import annotations

from PIL import Image
from typer.testing import CliRunner

from pipelines import caption_edits
from pipelines.ingest import ingested_images
from workbench.catalog import connect
from workbench.cli import app


def _folder(tmp_path):
    """Four images with sidecar captions (kohya-style tags), one without a caption."""
    folder = tmp_path / "img"
    folder.mkdir()
    texts = {"a": "sks dog, blurry, on grass", "b": "a dog on a sofa", "c": "dogs running, blurry", "d": "blurry"}
    for i, (name, text) in enumerate(texts.items()):
        Image.new("RGB", (64, 64), (50 * i, 90, 200)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(folder / "e.png")
    return folder


def _ingested(catalog_path, tmp_path):
    """The folder of `_folder`, ingested into the catalog."""
    folder = _folder(tmp_path)
    con = connect(catalog_path)
    ingested_images(con, [folder], workers=1)
    con.close()
    return folder


def _captions(catalog_path) -> dict[str, str | None]:
    con = connect(catalog_path)
    try:
        return dict(con.execute(
            "SELECT regexp_extract(v.path, '(\\w)\\.png$', 1), v.caption FROM images_view v ORDER BY 1").fetchall())
    finally:
        con.close()


def _run(catalog_path, *args):
    return CliRunner().invoke(app, ["edit-captions", "-c", str(catalog_path), *args])


def test_edit_captions_regex_tags_set_and_undo_from_later_processes(catalog_path, tmp_path):
    folder = _ingested(catalog_path, tmp_path)
    before = _captions(catalog_path)

    dry = _run(catalog_path, "--find", r",?\s*blurry\b", "--regex", "--dry-run")
    assert dry.exit_code == 0, dry.output
    said = " ".join(dry.output.split())
    assert "would change 2 of 5 caption(s)" in said  # a, c; d would be left empty: not changed, and said
    assert "1 caption(s) the edit would leave empty are not changed" in said
    assert _captions(catalog_path) == before and "Undo with" not in dry.output

    done = _run(catalog_path, "--find", r",?\s*blurry\b", "--regex")
    assert done.exit_code == 0, done.output
    after_regex = {**before, "a": "sks dog, on grass", "c": "dogs running"}
    assert _captions(catalog_path) == after_regex

    tagged = _run(catalog_path, "--add-token", "sks dog", "--where", "caption ILIKE '%dog%'")
    assert tagged.exit_code == 0 and "changed 2 of 3 caption(s)" in " ".join(tagged.output.split()), tagged.output
    assert _captions(catalog_path) == {**after_regex, "b": "sks dog, a dog on a sofa", "c": "sks dog, dogs running"}

    con = connect(catalog_path)
    e_id = con.execute("SELECT image_id FROM images_view WHERE path LIKE '%e.png'").fetchall()[0][0]
    con.close()
    assert _run(catalog_path, "--set", "a plain square").exit_code == 2  # every image the same caption: refused
    assert _run(catalog_path, e_id[:10], "--set", "a plain square").exit_code == 0
    assert _captions(catalog_path)["e"] == "a plain square"

    # three edits, undone newest first, each by a process of its own; a caption typed after an edit is kept
    con = connect(catalog_path)
    b_id = con.execute("SELECT image_id FROM images_view WHERE path LIKE '%b.png'").fetchall()[0][0]
    caption_edits.save_manual_caption(con, b_id, "typed by hand after the tag edit")
    con.close()
    assert _run(catalog_path, "--undo").exit_code == 0
    assert _captions(catalog_path)["e"] is None
    would = _run(catalog_path, "--undo", "--dry-run")  # says what the undo will do (it said the edit's count)
    assert "1 caption(s) put back, 1 kept (edited since)" in " ".join(would.output.split()), would.output
    undone = _run(catalog_path, "--undo")
    assert undone.exit_code == 0 and "1 image(s) kept the caption they were given after that edit" in " ".join(undone.output.split())
    assert _captions(catalog_path) == {**after_regex, "b": "typed by hand after the tag edit", "e": None}
    assert _run(catalog_path, "--undo").exit_code == 0
    assert _captions(catalog_path) == {**before, "b": "typed by hand after the tag edit"}
    nothing = _run(catalog_path, "--undo")
    assert nothing.exit_code == 2 and "No caption edit to undo" in nothing.output
    assert {p.name for p in folder.iterdir()} == {f"{n}.{e}" for n in "abcd" for e in ("png", "txt")} | {"e.png"}


def test_edit_captions_refuses_bad_input_without_changing_anything(catalog_path, tmp_path):
    folder = _ingested(catalog_path, tmp_path)
    before = _captions(catalog_path)
    for args, words in [
        (["--find", "(", "--regex"], "Not a regular expression"),
        (["--find", "a", "--add-token", "b"], "You gave --find and --add-token"),
        (["--replace", "x"], "Give one edit"),
        (["--add-token", "x", "--regex"], "--regex applies to --find"),
        (["--add-token", " "], "--add-token is empty"),
        (["--undo", "--add-token", "x"], "--undo takes no other edit"),
        (["--add-token", "x", "--where", "no_such_column = 1"], "--where failed"),
        (["--add-token", "x", "ffffffffff"], "ffffffffff"),
        (["--find", "dog", "--replace", "\\2", "--regex"], "cannot be applied"),  # a group the pattern lacks
        (["--undo", "--regex"], "--undo takes no other edit"),
    ]:
        result = _run(catalog_path, *args)
        assert result.exit_code == 2 and words in " ".join(result.output.split()), (args, result.output)
    assert _captions(catalog_path) == before


def test_sidecars_written_by_an_edit_are_put_back_by_undo_in_a_later_process(catalog_path, tmp_path):
    folder = _ingested(catalog_path, tmp_path)
    done = _run(catalog_path, "--remove-token", "blurry", "--sidecars")
    assert done.exit_code == 0, done.output
    assert (folder / "a.txt").read_text() == "sks dog, on grass\n"
    assert (folder / "c.txt").read_text() == "dogs running\n"
    assert (folder / "d.txt").read_text() == "blurry\n"  # would be empty: not changed
    (folder / "c.txt").write_text("edited in another tool\n")
    con = connect(catalog_path)  # a's caption changes since (not its file): the caption stays, the file goes back
    a_id = con.execute("SELECT image_id FROM images_view WHERE path LIKE '%a.png'").fetchall()[0][0]
    caption_edits.save_manual_caption(con, a_id, "typed after the edit")
    con.close()
    undone = _run(catalog_path, "--undo")
    assert undone.exit_code == 0, undone.output
    assert "1 sidecar file(s) changed since the edit wrote them are left" in " ".join(undone.output.split())
    assert (folder / "a.txt").read_text() == "sks dog, blurry, on grass\n"
    assert _captions(catalog_path)["a"] == "typed after the edit"
    assert (folder / "c.txt").read_text() == "edited in another tool\n"  # changed since the edit: left alone


def test_a_sidecar_that_cannot_be_written_is_named_and_undo_still_puts_back_the_others(catalog_path, tmp_path):
    """A review: a sidecar that could not be written (a folder in its place) ended the edit with a traceback, after
    the captions were saved and some files written, and undo never learnt of the files written."""
    folder = _ingested(catalog_path, tmp_path)
    (folder / "a.txt").unlink()
    (folder / "a.txt").mkdir()  # where a's sidecar would go
    done = _run(catalog_path, "--remove-token", "blurry", "--sidecars")
    said = " ".join(done.output.split())
    assert done.exit_code == 2 and "1 sidecar file(s) could not be written" in said and "a.txt" in said, done.output
    assert (folder / "c.txt").read_text() == "dogs running\n"
    undone = _run(catalog_path, "--undo")
    assert undone.exit_code == 0, undone.output
    assert (folder / "c.txt").read_text() == "dogs running, blurry\n"
    assert _captions(catalog_path)["c"] == "dogs running, blurry"


def test_a_sidecar_write_that_fails_part_way_leaves_the_file_as_it_was(catalog_path, tmp_path, monkeypatch):
    """A review: with the disk full, the sidecar was cut off in mid-tag (written in place), undo had nothing to put
    back, and the next ingest took the cut text as the caption: the user's tags were gone everywhere."""
    import errno
    import stat
    from pathlib import Path

    folder = _ingested(catalog_path, tmp_path)
    before = (folder / "a.txt").read_bytes()
    (folder / "a.txt").chmod(0o640)
    real_write_bytes = Path.write_bytes

    def half_written(self, data):
        real_write_bytes(self, data[:5])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_written)
    done = _run(catalog_path, "--add-token", "extra", "--sidecars")
    said = " ".join(done.output.split())
    assert done.exit_code == 2 and "No space left on device" in said, done.output
    monkeypatch.undo()
    assert (folder / "a.txt").read_bytes() == before  # whole, as it was
    assert not [p.name for p in folder.iterdir() if ".tmp" in p.name]
    written = _run(catalog_path, "--add-token", "more", "--sidecars")
    assert written.exit_code == 0, written.output
    assert "more" in (folder / "a.txt").read_text() and stat.S_IMODE((folder / "a.txt").stat().st_mode) == 0o640


def test_class_priors_are_left_out_of_caption_edits(catalog_path, tmp_path):
    folder = _folder(tmp_path)
    con = connect(catalog_path)
    ingested_images(con, [folder], workers=1)
    con.execute("UPDATE images SET role = 'class_prior' WHERE image_id IN (SELECT image_id FROM paths WHERE path LIKE '%b.png')")
    con.close()
    done = _run(catalog_path, "--add-token", "sks")
    said = " ".join(done.output.split())
    assert done.exit_code == 0 and "1 class prior image(s) left out" in said and "changed 4 of 4 caption(s)" in said, done.output


def test_add_token_puts_the_tags_first_or_at_the_end_and_a_caption_is_one_line(con):
    """A review: --add-token "mkchan, solo" gave "solo, mkchan, …" when the caption had mkchan (a tag added later went
    in front of the trigger, which --keep-tokens then shuffled); a caption typed on two lines meant a tag break to tag
    edits, a space to export and part of one tag to the trainer."""
    from tui.synthetic import synthetic_rows

    synthetic_rows(con, 5)
    ids = [r[0] for r in con.execute("SELECT image_id FROM images WHERE status = 'ok' ORDER BY image_id LIMIT 4").fetchall()]
    texts = ["mkchan, 1girl, solo", "1girl, mkchan, solo", "1girl", "mkchan, solo, 1girl"]
    for image_id, text in zip(ids, texts):
        caption_edits.save_manual_caption(con, image_id, text)

    def captions():
        return [con.execute("SELECT caption FROM current_captions WHERE image_id = ?", [i]).fetchall()[0][0] for i in ids]

    assert caption_edits.bulk_edit(con, ids, add_token="mkchan, solo").changed == 3  # the last one leads with them
    assert captions() == ["mkchan, solo, 1girl", "mkchan, solo, 1girl", "mkchan, solo, 1girl", "mkchan, solo, 1girl"]
    # in front already but there again further on: the copy goes, as when the tags move (a booru review)
    caption_edits.save_manual_caption(con, ids[1], "mkchan, solo, 1girl, mkchan")
    assert caption_edits.bulk_edit(con, [ids[1]], add_token="mkchan, solo").changed == 1
    assert captions()[1] == "mkchan, solo, 1girl"
    assert caption_edits.bulk_edit(con, [ids[1]], add_token="mkchan, solo").changed == 0  # and then nothing to do
    assert caption_edits.bulk_edit(con, ids[:2], add_token="smile, solo", at_end=True).changed == 2
    assert captions()[:2] == ["mkchan, solo, 1girl, smile", "mkchan, solo, 1girl, smile"]
    caption_edits.save_manual_caption(con, ids[2], "microphone\n  second line tag \n")
    assert captions()[2] == "microphone, second line tag"
    caption_edits.bulk_edit(con, [ids[3]], set_text="a\nb")
    assert captions()[3] == "a, b"


def test_sidecars_edited_in_another_tool_since_ingest_are_left_and_ingest_names_the_overridden_ones(catalog_path, tmp_path):
    """A review: `--sidecars` wrote over a .txt edited in another tag editor since ingest; and an ingest that read
    such an edit for an image with a caption edited here stored it silently, while the manual caption kept training."""
    folder = _ingested(catalog_path, tmp_path)
    assert _run(catalog_path, "--add-token", "mkchan", "--sidecars").exit_code == 0  # every caption is manual now
    (folder / "b.txt").write_text("edited elsewhere, new tag\n")
    done = _run(catalog_path, "--add-token", "solo", "--at-end", "--sidecars")
    said = " ".join(done.output.split())
    assert done.exit_code == 0 and "1 sidecar file(s) were edited in another tool since ingest" in said, done.output
    assert (folder / "b.txt").read_text() == "edited elsewhere, new tag\n"
    assert (folder / "a.txt").read_text() == "mkchan, sks dog, blurry, on grass, solo\n"  # one this tool wrote: written
    ingest = CliRunner().invoke(app, ["ingest", str(folder), "-c", str(catalog_path)])
    said = " ".join(ingest.output.split())
    assert "1 image(s) have a sidecar saying something other than the caption they train with" in said, ingest.output
    assert "workbench caption --use-source sidecar --where" in said and "b.png" in said
    # a sidecar touched but saying what it said is no edit: not named again (a review: every touched file was, with
    # advice that would throw the hand edits away)
    import os

    for name in ("a.txt", "b.txt"):
        os.utime(folder / name, ns=(7, 7))
    again = CliRunner().invoke(app, ["ingest", str(folder), "-c", str(catalog_path)])
    assert again.exit_code == 0 and "sidecar saying something other" not in again.output, again.output


def test_sidecars_that_are_links_are_never_written_through(catalog_path, tmp_path):
    """A security review: `--sidecars` wrote the caption through a sidecar that was a symbolic link, over the catalog
    (which then no longer opened) or any file it pointed at."""
    folder = _folder(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (folder / "a.txt").unlink()
    (folder / "a.txt").symlink_to(victim)
    (folder / "c.txt").unlink()
    (folder / "c.txt").symlink_to(catalog_path)
    (folder / "d.txt").unlink()
    (folder / "d.txt").hardlink_to(folder / "d.png")  # a hard link to an image (a second review)
    image_bytes = (folder / "d.png").read_bytes()
    con = connect(catalog_path)
    ingested_images(con, [folder], workers=1)
    con.close()
    done = _run(catalog_path, "--add-token", "boom", "--sidecars")
    said = " ".join(done.output.split())
    assert done.exit_code == 2 and "3 sidecar file(s) could not be written" in said and "a symbolic link" in said, done.output
    assert victim.read_text() == "precious\n" and (folder / "a.txt").is_symlink()
    assert (folder / "d.png").read_bytes() == image_bytes
    assert _captions(catalog_path)["a"] == "boom, precious"  # the catalog opens, and holds the edit (ingest read the link)
    assert (folder / "b.txt").read_text() == "boom, a dog on a sofa\n"  # the others are written


def test_every_edit_writes_one_line_and_a_tag_given_twice_is_one(con):
    """A README check: --add-token "foo<LF>bar" and a replacement holding a line break stored two-line captions
    (--sidecars then wrote two-line files, of which kohya and ingest read the first); `--add-token "sks, sks"` added
    both."""
    from tui.synthetic import synthetic_rows

    synthetic_rows(con, 3)
    ids = [r[0] for r in con.execute("SELECT image_id FROM images WHERE status = 'ok' ORDER BY image_id LIMIT 2").fetchall()]
    caption_edits.save_manual_caption(con, ids[0], "a rocket on its pad")
    caption_edits.save_manual_caption(con, ids[1], "dog,")

    def caption(i):
        return con.execute("SELECT caption FROM current_captions WHERE image_id = ?", [ids[i]]).fetchall()[0][0]

    caption_edits.bulk_edit(con, [ids[0]], add_token="foo\nbar")
    assert caption(0) == "foo, bar, a rocket on its pad"
    caption_edits.bulk_edit(con, [ids[0]], find="rocket", replace="rocket\n")
    assert caption(0) == "foo, bar, a rocket, on its pad"
    caption_edits.bulk_edit(con, [ids[1]], add_token="sks, sks")
    assert caption(1) == "sks, dog"
    caption_edits.bulk_edit(con, [ids[1]], add_token="tag", at_end=True)
    assert caption(1) == "sks, dog, tag"  # not "sks, dog,, tag"


def test_sidecars_of_a_file_named_in_bytes_that_are_not_utf8_are_edited_and_undone(catalog_path, tmp_path):
    """A review: `--sidecars` on `bad<0xE9>name.png` wrote the .txt, then failed with a traceback recording it (the
    path has no UTF-8 text form); the catalog kept the edit, and `--undo` left the file edited."""
    import os

    folder = tmp_path / "img"
    folder.mkdir()
    image, sidecar = os.path.join(os.fsencode(folder), b"bad\xe9name.png"), os.path.join(os.fsencode(folder), b"bad\xe9name.txt")
    with open(image, "wb") as file:
        Image.new("RGB", (64, 64), (200, 10, 10)).save(file, format="PNG")
    with open(sidecar, "wb") as file:
        file.write(b"a red name square\n")
    con = connect(catalog_path)
    ingested_images(con, [folder], workers=1)
    con.close()
    done = _run(catalog_path, "--find", "name", "--replace", "NAME", "--sidecars")
    assert done.exit_code == 0, done.output
    with open(sidecar, "rb") as file:
        assert file.read() == b"a red NAME square\n"
    undone = _run(catalog_path, "--undo")
    assert undone.exit_code == 0, undone.output
    with open(sidecar, "rb") as file:
        assert file.read() == b"a red name square\n"


def test_a_sidecar_ingest_could_not_read_is_left_as_it_is(catalog_path, tmp_path):
    """A review: a Shift-JIS `.txt` (named by ingest as not UTF-8, the image captioned otherwise) was overwritten by
    `--sidecars` with the catalog's caption: the user's only copy of that caption, lost without a word."""
    folder = tmp_path / "img"
    folder.mkdir()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(folder / "sjis.png")
    original = "猫、シフトJIS".encode("shift_jis")
    (folder / "sjis.txt").write_bytes(original)
    Image.new("RGB", (64, 64), (10, 200, 10)).save(folder / "ok.png")
    (folder / "ok.txt").write_text("a green square\n", encoding="utf-8")
    con = connect(catalog_path)
    ingested_images(con, [folder], workers=1)
    con.close()
    done = _run(catalog_path, "--add-token", "mytag", "--sidecars")
    said = " ".join(done.output.split())
    assert done.exit_code != 0 and "sjis.txt: a caption file ingest cannot read (not UTF-8): left as it is" in said, said
    assert (folder / "sjis.txt").read_bytes() == original
    assert (folder / "ok.txt").read_text(encoding="utf-8") == "mytag, a green square\n"
    # one caption saved with its sidecar (the TUI's Save): saved, the file named and kept; it raised, and the TUI
    # tried the save again when it closed, and failed there
    con = connect(catalog_path)
    try:
        image_id = con.execute("SELECT image_id FROM paths WHERE path LIKE '%sjis.png'").fetchall()[0][0]
        left = caption_edits.save_manual_caption(con, image_id, "猫, typed", sidecar=True)
        assert len(left) == 1 and "sjis.txt: a caption file ingest cannot read (not UTF-8)" in left[0]
        assert con.execute("SELECT caption FROM images_view WHERE image_id = ?", [image_id]).fetchall() == [("猫, typed",)]
    finally:
        con.close()
    assert (folder / "sjis.txt").read_bytes() == original


def test_tags_split_at_japanese_commas_and_any_white_space(catalog_path, tmp_path):
    """A review: `--remove-token かわいい` changed nothing in "猫、かわいい、白背景" (nor `cute` in "cat,\\tcute\\t")
    and `--add-token 猫` put a second 猫 in front: only ASCII commas split tags and only ASCII spaces were trimmed."""
    folder = tmp_path / "img"
    folder.mkdir()
    texts = ["猫、かわいい、白背景", "猫，座っている，窓辺", "cat, 猫,\tcute\t, 🐱"]
    for i, text in enumerate(texts):
        Image.new("RGB", (64, 64), (60 * i, 10, 10)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(text + "\n", encoding="utf-8")
    con = connect(catalog_path)
    ingested_images(con, [folder], workers=1)
    con.close()

    def captions():
        con = connect(catalog_path)
        try:
            return sorted(c for (c,) in con.execute("SELECT caption FROM images_view").fetchall())
        finally:
            con.close()

    for token in ("かわいい", "座っている", "cute"):
        assert _run(catalog_path, "--remove-token", token).exit_code == 0
    assert captions() == sorted(["猫, 白背景", "猫, 窓辺", "cat, 猫, 🐱"])
    assert _run(catalog_path, "--add-token", "猫、イラスト").exit_code == 0  # two tags given with a Japanese comma
    assert captions() == sorted(["猫, イラスト, 白背景", "猫, イラスト, 窓辺", "猫, イラスト, cat, 🐱"])


def test_a_bulk_edit_of_ids_not_in_the_catalog_is_refused_and_writes_nothing(catalog_path, tmp_path):
    """A Python-API review: `bulk_edit(con, ["deadbeef"*8], set_text=…)` (or a 10-character prefix) wrote a caption
    row for an image that does not exist, and a str of one id failed with a raw DuckDB error."""
    import pytest

    from workbench.catalog import CatalogError

    _ingested(catalog_path, tmp_path)
    con = connect(catalog_path)
    try:
        real = con.execute("SELECT image_id FROM images ORDER BY image_id LIMIT 1").fetchall()[0][0]
        for ids in (["deadbeef" * 8], [real[:10]], [real, "deadbeef" * 8]):
            with pytest.raises(CatalogError, match="No image .* in the catalog"):
                caption_edits.bulk_edit(con, ids, set_text="hello")
        with pytest.raises(CatalogError, match="a list of image ids"):
            caption_edits.bulk_edit(con, real, set_text="hello")
        assert con.execute("SELECT count(*) FROM captions WHERE text = 'hello'").fetchall() == [(0,)]
        assert caption_edits.bulk_edit(con, [real], set_text="hello").changed == 1
    finally:
        con.close()
