"""Tags (`workbench tag`): labels of the user's own that neither exclude an image nor put it in a concept."""

from __future__ import annotations

from typer.testing import CliRunner

from train_fixtures import ingest_images
from workbench.catalog import connect
from workbench.cli import app

runner = CliRunner()


def test_tags_mark_and_find_images_without_changing_what_trains(catalog_path, tmp_path):
    """A FiftyOne user's review: there was no way to mark images "to review" but to exclude them or put them in a
    concept, which changes what trains."""
    con = connect(catalog_path)
    paths = ingest_images(con, tmp_path / "images", 3)
    ids = dict(con.execute("SELECT path, image_id FROM images_view").fetchall())
    before = con.execute("SELECT image_id, caption, concept FROM dataset ORDER BY image_id").fetchall()
    con.close()
    first, second = ids[str(paths[0])], ids[str(paths[1])]
    options = ["-c", str(catalog_path)]
    done = runner.invoke(app, ["tag", "to review", first[:8], *options])
    assert done.exit_code == 0 and "tagged 1 image(s) 'to review'" in done.output, done.output
    again = runner.invoke(app, ["tag", "to review", "--where", f"image_id IN ('{first}', '{second}')", *options])
    assert again.exit_code == 0 and "tagged 1 image(s) 'to review' (1 had it already)" in again.output, again.output
    assert runner.invoke(app, ["tag", "maybe", "--folder", str(tmp_path / "images"), *options]).exit_code == 0
    con = connect(catalog_path)
    tags = dict(con.execute("SELECT image_id, tags FROM images_view").fetchall())
    assert tags[first] == ["maybe", "to review"] and tags[ids[str(paths[2])]] == ["maybe"]
    assert con.execute("SELECT image_id, caption, concept FROM dataset ORDER BY image_id").fetchall() == before
    con.close()
    off = runner.invoke(app, ["tag", "to review", "--remove", *options])
    assert off.exit_code == 0 and "took the tag 'to review' off 2 image(s)" in off.output
    for bad, said in ((["tag", "  ", first[:8]], "must not be empty"), (["tag", "x"], "Name the images to tag"),
                      (["tag", "a\nb", first[:8]], "one line"), (["tag", "x", "--where", "no_such = 1"], "--where")):
        refused = runner.invoke(app, [*bad, *options])
        assert refused.exit_code == 2 and said in refused.output, (bad, refused.output)
    con = connect(catalog_path)
    assert dict(con.execute("SELECT image_id, tags FROM images_view").fetchall())[first] == ["maybe"]
    con.close()


def test_a_where_that_matches_nothing_is_nothing_to_do_not_a_failure(catalog_path, tmp_path):
    """A scripting review: `tag`, `exclude` (even --dry-run), `include` and `edit-captions` with a --where that
    matched nothing exited 2, as a failure does, where `concept add`, `search` and the edits that changed nothing
    exited 0: a weekly job under `set -e` could not tell "no blurry images this week" from a typo in its SQL."""
    con = connect(catalog_path)
    ingest_images(con, tmp_path / "images", 2)
    first = con.execute("SELECT image_id FROM images ORDER BY image_id LIMIT 1").fetchall()[0][0]
    con.close()
    nothing = ["--where", "width > 99999", "-c", str(catalog_path)]
    for command in (["tag", "x"], ["exclude", "--reason", "r"], ["exclude", "--reason", "r", "--dry-run"], ["include"],
                    ["include", "--only-manual"], ["edit-captions", "--add-token", "sks"]):
        done = runner.invoke(app, [*command, *nothing])
        assert done.exit_code == 0 and "No image matches --where 'width > 99999'" in done.output, (command, done.output)
    # with images named besides, those are taken
    both = runner.invoke(app, ["tag", "x", first[:8], *nothing])
    assert both.exit_code == 0 and "tagged 1 image(s) 'x'" in both.output and "only the other images named" in both.output
    # a condition that does not bind is still a failure
    assert runner.invoke(app, ["tag", "x", "--where", "no_such = 1", "-c", str(catalog_path)]).exit_code == 2
    off = runner.invoke(app, ["tag", "y", "--remove", *nothing])
    assert off.exit_code == 0 and "no tag was taken off" in off.output
    # a folder's rule ended by include is done, whatever --where matches (it said "nothing was included")
    ruled = runner.invoke(app, ["exclude", "--folder", str(tmp_path / "images"), "--reason", "later", "-c", str(catalog_path)])
    assert ruled.exit_code == 0, ruled.output
    lifted = runner.invoke(app, ["include", "--folder", str(tmp_path / "images"), *nothing])
    assert lifted.exit_code == 0 and "only the other images named" in lifted.output, lifted.output
    con = connect(catalog_path)
    assert con.execute("SELECT count(*) FROM excluded_folders").fetchall() == [(0,)]
    assert con.execute("SELECT count(*) FROM exclusions").fetchall() == [(0,)]
    con.close()
    con = connect(catalog_path)
    assert con.execute("SELECT count(*) FROM exclusions").fetchall() == [(0,)]
    con.close()
