"""Concepts: kohya folder names, assignment by SQL / folder / hand, precedence, views, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.concepts import (
    added_concept,
    concept_rules_applied,
    assign_images_to_concept,
    concepts_from_folder_names,
    get_concept,
    list_concepts,
    parse_kohya_folder_name,
    removed_concept,
    resolve_image_ids,
    unassigned_images,
)


def _add_image(con, n: int, path: str, width: int = 512, height: int = 512, role: str = "instance") -> str:
    image_id = f"{n:02x}" * 32
    con.execute(
        "INSERT INTO images (image_id, width, height, status, role) VALUES (?, ?, ?, 'ok', ?)",
        [image_id, width, height, role],
    )
    con.execute("INSERT INTO paths (path, path_bytes, image_id, seq) VALUES (?, ?, ?, ?)", [path, path.encode(), image_id, n])
    return image_id


@pytest.mark.parametrize(
    "name,expected",
    [
        ("10_sks dog", (10, "sks", "dog")),
        ("1_images", (1, "images", None)),
        ("3_ohwx  golden   retriever", (3, "ohwx", "golden retriever")),
        ("5_a_b c", (5, "a_b", "c")),  # kohya joins everything after the first "_" back with "_"
        ("sks dog", None),  # no repeat count: kohya ignores the folder
        ("0_sks dog", None),  # repeats < 1 are skipped by kohya
        ("10_", None),
        ("x_sks dog", None),
    ],
)
def test_parse_kohya_folder_name(name, expected):
    assert parse_kohya_folder_name(name) == expected


def test_concepts_from_folder_names_reads_parent_folders_once(con):
    a = _add_image(con, 1, "/data/10_sks dog/a.jpg")
    b = _add_image(con, 2, "/data/10_sks dog/b.jpg")
    c = _add_image(con, 3, "/data/other/c.jpg")
    d = _add_image(con, 4, "/data/2_zwx/d.jpg")
    prior = _add_image(con, 5, "/data/1_dog/p.jpg", role="class_prior")
    holiday = _add_image(con, 6, "/photos/2023_holiday/h.jpg")  # a year, not 2023 repeats
    messages = []
    assert concepts_from_folder_names(con, progress=lambda **kw: messages.append(kw.get("message"))) == 3
    assert any(m and "2023_holiday" in m for m in messages)
    assert concepts_from_folder_names(con) == 0  # idempotent
    concepts = {c.name: c for c in list_concepts(con)}
    assert set(concepts) == {"sks dog", "zwx"}
    assert (concepts["sks dog"].trigger, concepts["sks dog"].class_noun, concepts["sks dog"].repeats) == ("sks", "dog", 10)
    assert concepts["sks dog"].class_tokens == "sks dog"
    assert (concepts["zwx"].class_noun, concepts["zwx"].repeats, concepts["zwx"].images) == (None, 2, 1)
    rows = dict(con.execute("SELECT image_id, concept FROM images_view").fetchall())
    assert rows[a] == rows[b] == "sks dog" and rows[d] == "zwx"
    assert rows[c] is None and rows[prior] is None and rows[holiday] is None


def test_folder_names_do_not_override_existing_concepts_or_assignments(con):
    a = _add_image(con, 1, "/data/10_sks dog/a.jpg")
    added_concept(con, "sks dog", trigger="sks", class_noun="dog", repeats=4)
    added_concept(con, "mine", trigger="zz", where=f"image_id = '{a}'")
    concepts_from_folder_names(con)
    assert get_concept(con, "sks dog").repeats == 4
    assert con.execute("SELECT concept FROM concept_images WHERE image_id = ?", [a]).fetchone()[0] == "mine"


def test_add_by_where_and_folder_and_views_expose_the_concept(con, tmp_path):
    big = _add_image(con, 1, "/data/a/big.jpg", 1024, 1024)
    small = _add_image(con, 2, "/data/a/small.jpg", 256, 256)
    other = _add_image(con, 3, "/data/b/other.jpg", 300, 300)
    summary = added_concept(con, "sks dog", trigger="sks", class_noun="dog", repeats=10, where="width >= 1024")
    assert summary["newly_assigned"] == 1 and summary["created"] == 1
    summary = added_concept(con, "sks dog", trigger="sks", class_noun="dog", repeats=12, folder="/data/b")
    assert summary["updated"] == 1 and summary["newly_assigned"] == 1
    row = con.execute(
        "SELECT concept, concept_trigger, concept_class, concept_repeats FROM dataset WHERE image_id = ?", [big]
    ).fetchone()
    assert row == ("sks dog", "sks", "dog", 12)
    assert con.execute("SELECT concept FROM dataset WHERE image_id = ?", [small]).fetchone()[0] is None
    assert con.execute("SELECT concept FROM dataset WHERE image_id = ?", [other]).fetchone()[0] == "sks dog"
    # the folder prefix is a folder, not a string prefix: /data/bb is not under /data/b
    _add_image(con, 4, "/data/bb/x.jpg")
    assert added_concept(con, "sks dog", trigger="sks", folder="/data/b")["matched_folder"] == 1


def test_manual_assignment_wins_over_later_rules_and_remove_releases(con):
    a = _add_image(con, 1, "/data/a.jpg")
    b = _add_image(con, 2, "/data/b.jpg")
    added_concept(con, "first", trigger="aaa")
    assert assign_images_to_concept(con, "first", [a[:10]]) == 1  # a unique prefix is enough
    added_concept(con, "second", trigger="bbb", where="true")
    assigned = dict(con.execute("SELECT image_id, concept FROM concept_images").fetchall())
    assert assigned == {a: "first", b: "second"}
    assert assign_images_to_concept(con, "second", [a]) == 1  # manual moves it
    assert unassigned_images(con, [b]) == 1
    assert removed_concept(con, "second") == (1, 0)
    assert get_concept(con, "second") is None
    assert con.execute("SELECT count(*) FROM concept_images").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 2  # images untouched


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"trigger": "two words"}, "one token"),
        ({"trigger": ""}, "empty"),
        ({"trigger": "sks", "repeats": 0}, "repeats"),
        ({"trigger": "sks", "where": "1=1; DROP TABLE images"}, "where"),
        ({"trigger": "sks", "where": "1=1) UNION SELECT 'x' --"}, "where"),
        ({"trigger": "sks", "where": "no_such_column > 1"}, "where"),
        ({"trigger": "sks\nx"}, "control"),
    ],
)
def test_bad_concepts_are_refused_and_nothing_changes(con, kwargs, message):
    _add_image(con, 1, "/data/a.jpg")
    with pytest.raises(ValueError, match=message):
        added_concept(con, "c", **kwargs)
    assert list_concepts(con) == []
    assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 1


def test_resolve_image_ids_reports_unknown_short_and_ambiguous(con):
    a = _add_image(con, 1, "/data/a.jpg")
    con.execute("INSERT INTO images (image_id, status) VALUES (?, 'ok')", ["0101010101ff" + "0" * 52])
    assert resolve_image_ids(con, [a.upper()]) == [a]
    with pytest.raises(ValueError, match="several"):
        resolve_image_ids(con, ["01010101"])
    with pytest.raises(ValueError, match="no image"):
        resolve_image_ids(con, ["abcdef12"])
    with pytest.raises(ValueError, match="not an image id"):
        resolve_image_ids(con, ["../x"])


def test_concept_cli(catalog_path, con, tmp_path):
    from workbench.cli import app

    a = _add_image(con, 1, "/data/a.jpg", 1024, 768)
    con.close()
    runner = CliRunner()
    cat = ["--catalog", str(catalog_path)]
    result = runner.invoke(app, ["concept", "add", "sks dog", "--trigger", "sks", "--class", "dog", "--repeats", "10",
                                 "--where", "width > 1000", *cat])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["concept", "list", *cat])
    assert result.exit_code == 0 and "sks dog" in result.output and "10" in result.output
    result = runner.invoke(app, ["concept", "add", "bad", "--trigger", "two words", *cat])
    assert result.exit_code == 2 and "one token" in result.output
    result = runner.invoke(app, ["concept", "add", "nowhere", "--trigger", "nw", "--folder", str(tmp_path / "absent"), *cat])
    assert result.exit_code == 2 and "No such folder" in result.output
    result = runner.invoke(app, ["concept", "assign", "sks dog", "ffffff", *cat])
    assert result.exit_code == 2 and "no image" in result.output
    result = runner.invoke(app, ["concept", "unassign", a[:8], *cat])  # a review: only the TUI could do this
    assert result.exit_code == 0 and "1 image(s) taken out of their concept" in result.output
    result = runner.invoke(app, ["concept", "assign", "sks dog", a[:8], *cat])
    assert result.exit_code == 0 and "1 image(s) moved" in result.output
    result = runner.invoke(app, ["concept", "remove", "sks dog", *cat])
    assert result.exit_code == 0 and "1 image" in result.output
    result = runner.invoke(app, ["concept", "remove", "sks dog", *cat])
    assert result.exit_code == 2 and "no concept" in result.output
    assert a


def test_an_update_changes_only_what_is_given_and_rules_stay_with_the_concept(con, tmp_path, monkeypatch):
    """Re-running `concept add` with only --trigger kept class and repeats? It reset them to none and 1. And a
    photo added later to the concept's folder joins it at the next ingest (before: the folder was shown but unused)."""
    from pipelines.concepts import concept_rules_applied

    monkeypatch.chdir(tmp_path)
    first = _add_image(con, 1, str(tmp_path / "dogs" / "a.jpg"))
    added_concept(con, "sks dog", trigger="sks", class_noun="dog", repeats=4, folder="dogs")  # relative to here
    added_concept(con, "sks dog", repeats=6)
    concept = get_concept(con, "sks dog")
    assert (concept.trigger, concept.class_noun, concept.repeats) == ("sks", "dog", 6)
    assert concept.folder == str(tmp_path / "dogs")  # stored absolute: it must not depend on where a command runs
    with pytest.raises(ValueError, match="new concept needs its trigger word: workbench concept add 'new one' --trigger WORD"):
        added_concept(con, "new one", repeats=2)
    added_concept(con, "sks dog", class_noun="")
    assert get_concept(con, "sks dog").class_noun is None

    added_concept(con, "big", trigger="bg", where="width > 600")
    later = _add_image(con, 2, str(tmp_path / "dogs" / "b.jpg"))  # ingested after the rules were set
    elsewhere = _add_image(con, 3, str(tmp_path / "cats" / "c.jpg"), width=1000)
    moved = _add_image(con, 4, str(tmp_path / "dogs" / "d.jpg"), width=1000)
    assign_images_to_concept(con, "big", [moved])  # already in a concept: stays there
    assert concept_rules_applied(con) == 2
    rows = dict(con.execute("SELECT image_id, concept FROM concept_images").fetchall())
    assert rows == {first: "sks dog", later: "sks dog", elsewhere: "big", moved: "big"}


def test_a_new_rule_leaves_images_in_their_concepts_and_says_how_many(con):
    """`concept add big --where ...` took images out of a kohya folder concept, though the help says they stay."""
    dog = _add_image(con, 1, "/data/10_sks dog/a.jpg", 1024, 1024)
    free = _add_image(con, 2, "/data/other/b.jpg", 1024, 1024)
    concepts_from_folder_names(con)
    summary = added_concept(con, "big", trigger="bg", where="width >= 1024")
    assert (summary["matched_where"], summary["newly_assigned"], summary["left_in_other_concepts"]) == (2, 1, 1)
    rows = dict(con.execute("SELECT image_id, concept FROM concept_images").fetchall())
    assert rows == {dog: "sks dog", free: "big"}
    assert assign_images_to_concept(con, "big", [dog]) == 1  # moving one is explicit
    assert get_concept(con, "sks dog").images == 0


def test_zero_padded_photo_folders_are_no_concepts_and_a_repeat_conflict_is_named(con):
    """`01_January`/`02_February` became concepts with 1 and 2 repeats (February trained twice as often)."""
    _add_image(con, 1, "/photos/01_January/a.jpg")
    _add_image(con, 2, "/photos/5_sks dog/b.jpg")
    added_concept(con, "sks dog", trigger="sks", class_noun="dog", repeats=10)
    messages = []
    concepts_from_folder_names(con, progress=lambda **kw: messages.append(kw.get("message") or ""))
    assert set(c.name for c in list_concepts(con)) == {"sks dog"} and get_concept(con, "sks dog").repeats == 10
    assert any("01_January" in m and "zero-padded" in m for m in messages)
    assert any("5 repeats" in m and "10" in m for m in messages)
    assert concepts_from_folder_names(con, zero_padded=True) == 1  # import-kohya reads it as kohya does
    assert get_concept(con, "January").repeats == 1


def test_a_kohya_folder_with_repeats_but_no_name_says_how_to_keep_them(con, tmp_path):
    """`3_/` silently lost its repeats: no concept, no message, and the export then wrote its images to `1_/`."""
    _add_image(con, 1, "/data/3_/a.jpg")
    _add_image(con, 2, "/data/3_/b.jpg")
    _add_image(con, 3, "/data/1_/c.jpg")  # the export's folder for images without a concept: nothing is lost
    _add_image(con, 4, "/data/2023_/d.jpg")  # a year
    messages = []
    assert concepts_from_folder_names(con, progress=lambda **kw: messages.append(kw.get("message") or "")) == 0
    named = [m for m in messages if "has no class tokens" in m]
    assert named == ["folder '3_' has no class tokens: its images join no concept, so its 3 repeats are not kept. To keep "
                     "them: workbench concept add NAME --trigger WORD --folder /data/3_ --repeats 3"]
    # what the note says to run keeps them
    added_concept(con, "sks dog", trigger="sks", class_noun="dog", folder="/data/3_", repeats=3)
    assert get_concept(con, "sks dog").images == 2


def test_folders_kohya_would_not_train_beside_concept_folders_are_named_with_the_exclude_command(con, catalog_path):
    """`0_zero thing` (0 repeats: switched off in kohya) and `abc_x` (no repeat count: kohya ignores it) trained here
    with repeats 1 and an empty caption, and nothing said so."""
    from typer.testing import CliRunner

    from workbench.cli import app

    zero = _add_image(con, 1, "/ds/img/0_zero thing/a.jpg")
    other = _add_image(con, 2, "/ds/img/abc_x/b.jpg")
    _add_image(con, 3, "/ds/img/10_sks dog/c.jpg")
    _add_image(con, 4, "/photos/holiday/d.jpg")  # no kohya folder beside it: an ordinary photo folder, nothing to say
    messages = []
    concepts_from_folder_names(con, progress=lambda **kw: messages.append(kw.get("message") or ""))
    notes = [m for m in messages if "kohya leaves it out of training" in m]
    assert len(notes) == 2 and "'0_zero thing' has 0 repeats" in notes[0] and "'abc_x' has no repeat count" in notes[1]
    assert not any("holiday" in m for m in messages)
    # what the note says to run leaves them out
    con.execute("INSERT INTO paths (path, path_bytes, image_id, seq) VALUES (?, ?, ?, 9)",  # a copy in another folder
                ["/photos/keep/a.jpg", b"/photos/keep/a.jpg", zero])
    con.close()
    result = CliRunner().invoke(app, ["exclude", "--folder", "/ds/img/0_zero thing", "--folder", "/ds/img/abc_x",
                                      "--reason", "0 repeats", "--catalog", str(catalog_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "excluded 2 image(s)" in result.output, result.output
    # the copy outside is the same image, out too: said, not left to be found later
    assert "1 of them also has a file outside the folder" in result.output and "/photos/keep/a.jpg" in result.output
    from workbench.catalog import connect

    with connect(catalog_path) as again:
        dataset = {row[0] for row in again.execute("SELECT image_id FROM dataset").fetchall()}
    assert zero not in dataset and other not in dataset and len(dataset) == 2
    nothing = CliRunner().invoke(app, ["exclude", "--folder", "/nowhere", "--reason", "x", "--catalog", str(catalog_path)])
    assert nothing.exit_code == 2 and "No image in the catalog has a file under /nowhere" in " ".join(nothing.output.split())


def test_images_moved_out_of_their_kohya_folder_leave_its_concept_and_hand_added_ones_stay(con, tmp_path):
    """An image moved from `10_mydog/` to `rejects/` stayed in concept mydog, and export put it back in `10_mydog`:
    kohya users manage a concept's images by folder."""
    import numpy as np
    from PIL import Image

    from pipelines.ingest import ingested_images

    root = tmp_path / "k"
    (root / "10_mydog").mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = {}
    for name in "abcde":
        files[name] = root / "10_mydog" / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)).save(files[name])
    ingested_images(con, [root], workers=1)
    ids = {Path(path).stem: image_id for path, image_id in con.execute("SELECT path, image_id FROM paths").fetchall()}
    assert get_concept(con, "mydog").images == 5
    assign_images_to_concept(con, "mydog", [ids["e"]])  # by hand: it stays wherever its file goes
    for name, folder in (("a", "rejects"), ("b", "5_mydog"), ("c", "10_mycat"), ("e", "rejects")):
        (root / folder).mkdir(exist_ok=True)
        files[name].rename(root / folder / files[name].name)
    messages = []
    summary = ingested_images(con, [root], workers=1, progress=lambda **kw: messages.append(kw.get("message") or ""))
    concept = dict(con.execute("SELECT image_id, concept FROM images_view").fetchall())
    assert concept[ids["a"]] is None
    # a folder of the same tokens with other repeats, beside 10_mydog still there: its own concept, as kohya trains
    # each folder with its own repeats (it stayed in mydog at 10 before)
    assert concept[ids["b"]] == "5_mydog"
    assert concept[ids["c"]] == "mycat"  # left mydog, joined the concept of its new folder
    assert concept[ids["d"]] == concept[ids["e"]] == "mydog"
    assert summary.images_left_concepts == 3  # a, b and c (e was given by hand)
    assert any(m.startswith("3 image(s) left concept 'mydog'") for m in messages)
    files["d"].rename(tmp_path / "d.png")  # out of the walk: missing at every path is not moved, it keeps its concept
    assert ingested_images(con, [root], workers=1).images_left_concepts == 0
    assert con.execute("SELECT status, concept FROM images_view WHERE image_id = ?", [ids["d"]]).fetchone() == ("missing", "mydog")


def test_class_images_never_join_a_concept(con):
    """`concept add --folder` over class images (`priors --from`) counted them in the concept, and training then
    found "no instance images" in it; a standing rule took new class images at ingest too."""
    photo = _add_image(con, 1, "/data/mixed/photo.jpg")
    prior = _add_image(con, 2, "/data/mixed/prior.jpg", role="class_prior")
    summary = added_concept(con, "q6", trigger="q6", folder="/data/mixed")
    assert (summary["matched_folder"], summary["class_images_left_out"], summary["images"]) == (1, 1, 1)
    where = added_concept(con, "q7", trigger="q7", where="path LIKE '/data/mixed/%'")
    assert (where["matched_where"], where["class_images_left_out"], where["images"]) == (1, 1, 0)  # the photo stays in q6
    later = _add_image(con, 3, "/data/mixed/prior2.jpg", role="class_prior")
    concept_rules_applied(con)
    assigned = dict(con.execute("SELECT image_id, concept FROM concept_images").fetchall())
    assert assigned == {photo: "q6"} and prior not in assigned and later not in assigned


def test_a_folder_excluded_by_hand_keeps_out_files_added_to_it_later(con, catalog_path, tmp_path):
    """Ingest suggests `exclude --folder` for a `0_` folder, yet a photo added there later trained, without a word."""
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from pipelines.ingest import ingested_images
    from workbench.catalog import connect
    from workbench.cli import app

    rng = np.random.default_rng(3)

    def photo(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path)

    root = tmp_path / "data"
    photo(root / "10_sks dog" / "a.png")
    photo(root / "0_old dog" / "b.png")
    ingested_images(con, [root], workers=1)
    con.close()
    run = CliRunner().invoke
    result = run(app, ["exclude", "--folder", str(root / "0_old dog"), "--reason", "zero repeats", "--catalog", str(catalog_path)])
    assert result.exit_code == 0, result.output

    def out_of_dataset() -> set[str]:
        with connect(catalog_path) as again:
            return {row[0] for row in again.execute(
                "SELECT v.path FROM images_view v WHERE v.excluded AND v.exclusion_reason = 'manual: zero repeats'").fetchall()}

    photo(root / "0_old dog" / "c.png")
    with connect(catalog_path) as again:
        summary = ingested_images(again, [root], workers=1)
    assert summary.excluded_by_folder == 1
    assert out_of_dataset() == {str(root / "0_old dog" / "b.png"), str(root / "0_old dog" / "c.png")}
    # include --folder lets the folder's images in and ends the rule
    result = run(app, ["include", "--folder", str(root / "0_old dog"), "--catalog", str(catalog_path)])
    assert result.exit_code == 0, result.output
    photo(root / "0_old dog" / "d.png")
    with connect(catalog_path) as again:
        assert ingested_images(again, [root], workers=1).excluded_by_folder == 0
    assert out_of_dataset() == set()


def test_including_a_subfolder_of_an_excluded_folder_says_the_rule_above_holds(con, catalog_path, tmp_path):
    """`include --folder data/old/sub` under `exclude --folder data/old` promised no more exclusion there, yet files
    added to sub/ later were excluded by the rule on data/old."""
    from PIL import Image
    from typer.testing import CliRunner

    from pipelines.ingest import ingested_images
    from workbench.cli import app

    (tmp_path / "old" / "sub").mkdir(parents=True)
    Image.new("RGB", (24, 16), (1, 2, 3)).save(tmp_path / "old" / "a.png")
    Image.new("RGB", (24, 16), (200, 2, 3)).save(tmp_path / "old" / "sub" / "b.png")
    ingested_images(con, [tmp_path / "old"], workers=1)
    con.close()
    catalog = ["--catalog", str(catalog_path)]
    assert CliRunner().invoke(app, ["exclude", "--folder", str(tmp_path / "old"), "--reason", "old", *catalog]).exit_code == 0
    result = CliRunner().invoke(app, ["include", "--folder", str(tmp_path / "old" / "sub"), *catalog], env={"COLUMNS": "250"})
    assert result.exit_code == 0 and f"still excluded by the rule on {tmp_path / 'old'}" in " ".join(result.output.split())


def test_a_concept_from_a_macos_folder_name_matches_what_is_typed(con, tmp_path):
    """A review: `5_Bär bear` named on macOS (decomposed: a + combining umlaut) made concept and trigger in that form;
    the typed caption "Bär, teddy" (composed) lacked its trigger to export and training (which put it in front again),
    and `concept remove "Bär bear"` found no such concept."""
    import unicodedata

    from PIL import Image

    from pipelines.concepts import removed_concept
    from workbench.text import caption_has_trigger
    from pipelines.ingest import ingested_images
    from pipelines.train.data import training_images
    from train_fixtures import fast_config

    folder = tmp_path / unicodedata.normalize("NFD", "5_Bär bear")
    folder.mkdir()
    Image.new("RGB", (64, 64), (120, 60, 20)).save(folder / "teddy.png")
    (folder / "teddy.txt").write_text("Bär, teddy\n", encoding="utf-8")
    ingested_images(con, [tmp_path], workers=1)
    assert con.execute("SELECT name, trigger_token FROM concepts").fetchall() == [("Bär bear", "Bär")]  # composed
    assert caption_has_trigger("Bär, teddy", unicodedata.normalize("NFD", "Bär"))
    (image,) = training_images(con, fast_config(tmp_path / "run", resolution=64))
    assert image.caption == "Bär, teddy"  # the trigger was put in front a second time
    assert removed_concept(con, unicodedata.normalize("NFD", "Bär bear")) == (1, 0)


def test_a_folder_named_in_bytes_that_are_not_utf8_works_in_every_folder_option(catalog_path, tmp_path):
    """A review: `concept add/exclude --folder` with the real name of `caf<0xE9>` failed with a traceback (the name
    has no UTF-8 text form), and `concept add` refused the \\xNN form that ingest prints and exclude takes."""
    import os

    from PIL import Image

    from pipelines.ingest import ingested_images
    from workbench.catalog import connect
    from workbench.cli import app

    data = os.fsencode(tmp_path / "data")
    folder = os.path.join(data, b"caf\xe9")
    os.makedirs(folder)
    with open(os.path.join(folder, b"a.png"), "wb") as file:
        Image.new("RGB", (300, 300), (200, 10, 10)).save(file, format="PNG")
    con = connect(catalog_path)
    ingested_images(con, [tmp_path / "data"], workers=1)
    con.close()
    runner = CliRunner()
    real, escaped = os.fsdecode(folder), str(tmp_path / "data" / "caf\\xe9")
    cat = ["--catalog", str(catalog_path)]
    for name, given in (("real", real), ("escaped", escaped)):
        added = runner.invoke(app, ["concept", "add", f"c {name}", "--trigger", name, "--folder", given, *cat])
        assert added.exit_code == 0, added.output
        out = runner.invoke(app, ["exclude", "--folder", given, "--reason", "drafts", *cat], env={"COLUMNS": "400"})
        assert out.exit_code == 0 and "outside the folder" not in out.output, out.output
        # the undo it prints works pasted: the \xNN form, not Python's \udcNN (a review: that matched no image)
        undo = next(line for line in out.output.splitlines() if line.startswith("undo: "))
        assert "\\udc" not in undo and f"--folder '{escaped}'" in undo, undo
        back = runner.invoke(app, ["include", "--folder", given, *cat])
        assert back.exit_code == 0, back.output
        runner.invoke(app, ["concept", "remove", f"c {name}", *cat])
    # the standing rule holds for a file added to the folder later
    assert runner.invoke(app, ["exclude", "--folder", real, "--reason", "drafts", *cat]).exit_code == 0
    with open(os.path.join(folder, b"b.png"), "wb") as file:
        Image.new("RGB", (300, 300), (10, 200, 10)).save(file, format="PNG")
    con = connect(catalog_path)
    ingested_images(con, [tmp_path / "data"], workers=1)
    assert con.execute("SELECT count(*) FROM images_view WHERE NOT excluded").fetchall() == [(0,)]
    con.close()


def test_a_where_condition_stays_as_typed_and_an_old_decomposed_concept_keeps_its_images(con, tmp_path):
    """A code review: NFC for concept names also composed every --where, so `path LIKE '%Bär%'` typed decomposed no
    longer found decomposed paths; and a concept stored decomposed (a catalog from before) got a composed twin at
    the next ingest of its folder."""
    import unicodedata

    from PIL import Image

    from pipelines.concepts import images_where
    from pipelines.ingest import ingested_images

    nfd = unicodedata.normalize("NFD", "5_Bär bear")
    folder = tmp_path / nfd
    folder.mkdir()
    Image.new("RGB", (64, 64), (120, 60, 20)).save(folder / "a.png")
    con.execute("INSERT INTO concepts (name, trigger_token, class_noun, repeats) VALUES (?, ?, 'bear', 5)",
                [unicodedata.normalize("NFD", "Bär bear"), unicodedata.normalize("NFD", "Bär")])
    ingested_images(con, [tmp_path], workers=1)
    assert len(images_where(con, f"path LIKE '%{nfd}%'")) == 1
    Image.new("RGB", (64, 64), (20, 60, 120)).save(folder / "b.png")
    ingested_images(con, [tmp_path], workers=1)
    assert con.execute("SELECT name, count(*) FROM concepts JOIN concept_images ON concept = name GROUP BY name").fetchall() == [
        (unicodedata.normalize("NFD", "Bär bear"), 2)]


def test_a_class_image_is_not_put_in_a_concept_by_hand(con):
    """A multi-concept review: `concept assign bob <a class image>` said it moved it, and the concept counted it, while
    training drew it only as a class image and export put it in reg/."""
    photo = _add_image(con, 1, "/data/bob/a.jpg")
    prior = _add_image(con, 2, "/data/reg/1_man/p.jpg", role="class_prior")
    added_concept(con, "bob", trigger="zkx", class_noun="man")
    with pytest.raises(ValueError, match=f"1 of these are class images \\({prior[:12]}\\).*never in a concept"):
        assign_images_to_concept(con, "bob", [photo, prior])
    assert con.execute("SELECT count(*) FROM concept_images").fetchone()[0] == 0  # nothing half done
    assert assign_images_to_concept(con, "bob", [photo]) == 1


def test_images_a_removed_concept_lets_go_join_the_concept_whose_folder_rule_takes_them(con):
    """A multi-concept review, renaming a subject: `concept add "Alice Smith" --folder photos/alice` left the 4 photos in
    concept alice, and `concept remove alice` left them in none for good: no ingest or `concept add` applied the new
    concept's saved --folder to them again."""
    photos = [_add_image(con, n, f"/photos/alice/{n}.jpg") for n in range(1, 5)]
    added_concept(con, "alice", trigger="alc", class_noun="woman", folder="/photos/alice")
    summary = added_concept(con, "Alice Smith", trigger="als", class_noun="woman", folder="/photos/alice")
    assert summary["left_in_other_concepts"] == 4 and get_concept(con, "Alice Smith").images == 0
    loose = _add_image(con, 9, "/photos/alice/9.jpg")  # in no concept yet (no ingest since): not one alice let go
    assert removed_concept(con, "alice") == (4, 4)
    assert get_concept(con, "Alice Smith").images == 4 and loose
    # an image taken out by hand stays out when another concept is removed, or this one's repeats change
    unassigned_images(con, photos[:2])
    added_concept(con, "bob", trigger="bb", where=f"image_id = '{photos[3]}'")  # (empty: photos[3] is Alice's)
    other = _add_image(con, 10, "/photos/bob/10.jpg")
    assign_images_to_concept(con, "bob", [other])
    assert removed_concept(con, "bob") == (1, 0)
    added_concept(con, "Alice Smith", repeats=3)
    assert get_concept(con, "Alice Smith").images == 2
    # `concept add NAME` alone applies its own saved rule to images in no concept (taken out by hand, say)
    summary = added_concept(con, "Alice Smith")
    assert summary["newly_assigned"] == 3 and get_concept(con, "Alice Smith").images == 5


def test_a_changed_trigger_says_which_captions_hold_the_old_one(con):
    """A multi-concept review: after `concept add NAME --trigger alyx`, captions written with the old trigger trained
    "alyx, photo of alc woman", and nothing said so."""
    a = _add_image(con, 1, "/data/a.jpg")
    b = _add_image(con, 2, "/data/b.jpg")
    added_concept(con, "Alice", trigger="alc", class_noun="woman", where="true")
    con.execute("INSERT INTO captions (image_id, source, text) VALUES (?, 'manual', 'photo of alc woman, smiling'), "
                "(?, 'manual', 'a portrait of alcove')", [a, b])
    summary = added_concept(con, "Alice", trigger="alyx")
    assert summary["captions_with_the_old_trigger"] == 1  # "alcove" is another word
    assert "still hold the old trigger 'alc'" in summary["note"]
    assert "workbench edit-captions --regex --find '(?i)(^|[^\\pL\\pN_])alc([^\\pL\\pN_]|$)' --replace '\\1alyx\\2' --where \"concept = 'Alice'\"" in summary["note"]
    assert "note" not in added_concept(con, "Alice", repeats=3)  # no trigger change: no note


def test_a_trigger_with_a_comma_or_slash_is_refused_and_a_shared_one_is_said(con):
    """A multi-concept review: `--trigger "sks,"` broke tag shuffle and --add-token, `x/y` became a folder on export,
    and a second concept took another's trigger without a word."""
    for bad in ("sks,", "x/y", "a\\b"):
        with pytest.raises(ValueError, match="must not hold a comma or a slash"):
            added_concept(con, "bad", trigger=bad)
    assert "note" not in added_concept(con, "bob close", trigger="zkx", class_noun="man")
    summary = added_concept(con, "bob full", trigger="ZKX", class_noun="man")
    assert "concept(s) 'bob close' use the trigger 'ZKX' too" in summary["note"]


def test_a_kohya_folder_name_that_is_not_utf8_is_said(con):
    """An odd-files review: a `5_caf<0xE9> dog` folder made trigger 'caf\\xe9' (the escape as text) without a word."""
    _add_image(con, 1, "/data/5_caf\\xe9 dog/a.jpg")
    con.execute("UPDATE paths SET path_bytes = ? WHERE seq = 1", [b"/data/5_caf\xe9 dog/a.jpg"])
    said = []
    concepts_from_folder_names(con, progress=lambda **kw: said.append(kw.get("message") or ""))
    assert any("folder '5_caf\\xe9 dog' is not named in UTF-8" in m for m in said), said  # as pasted: one backslash
    said.clear()
    _add_image(con, 2, "/data/5_café dog/b.jpg")
    concepts_from_folder_names(con, paths=["/data/5_café dog/b.jpg".encode()], progress=lambda **kw: said.append(kw.get("message") or ""))
    assert said and not any("UTF-8" in m for m in said)


def test_the_suggested_trigger_replacement_changes_every_caption_the_note_counted(catalog_path, con):
    """A code review: the suggested `edit-captions --regex` used RE2's ASCII, case-sensitive \\b, so "Alc, photo" and a
    trigger such as <s1> kept the old trigger the note had counted."""
    import shlex

    from workbench.catalog import connect
    from workbench.cli import app

    a, b, c = (_add_image(con, n, f"/data/{n}.jpg") for n in (1, 2, 3))
    for trigger, new in (("alc", "alyx"), ("<s1>", "<s2>")):
        con.execute("DELETE FROM concepts; DELETE FROM concept_images; DELETE FROM captions; DELETE FROM caption_choice")
        added_concept(con, "Alice", trigger=trigger, where="true")
        con.execute("INSERT INTO captions (image_id, source, text) VALUES (?, 'manual', ?), (?, 'manual', ?), (?, 'manual', ?)",
                    [a, f"{trigger.upper()}, photo of {trigger} woman", b, f"a portrait of {trigger}ove", c, f"émile {trigger}"])
        summary = added_concept(con, "Alice", trigger=new)
        assert summary["captions_with_the_old_trigger"] == 2
        command = summary["note"].split(": ", 1)[1]
        con.close()
        result = CliRunner().invoke(app, [*shlex.split(command)[1:], "--catalog", str(catalog_path)])
        assert result.exit_code == 0, result.output
        con = connect(catalog_path)
        captions = dict(con.execute("SELECT image_id, caption FROM images_view").fetchall())
        assert captions == {a: f"{new}, photo of {new} woman", b: f"a portrait of {trigger}ove", c: f"émile {new}"}, captions
    con.close()


def test_an_image_taken_out_by_hand_stays_out_when_ingest_reads_new_files(catalog_path, tmp_path):
    """A README check: `concept unassign` said a concept's saved rule would take the images back at the next ingest; an
    ingest that read any new file took every unassigned image back. Only the files it reads now join by the rules."""
    from PIL import Image

    from pipelines.ingest import ingested_images
    from workbench.catalog import connect

    folder = tmp_path / "loose"
    folder.mkdir()
    for n in range(2):
        Image.new("RGB", (64, 64), (n * 90, 10, 10)).save(folder / f"{n}.png")
    con = connect(catalog_path)
    ingested_images(con, [folder], workers=1)
    added_concept(con, "rex", trigger="rex", folder=str(folder))
    out = con.execute("SELECT image_id FROM concept_images ORDER BY image_id LIMIT 1").fetchone()[0]
    unassigned_images(con, [out])
    Image.new("RGB", (64, 64), (10, 200, 10)).save(folder / "new.png")
    summary = ingested_images(con, [folder], workers=1)
    assert summary.images_joined_concepts == 1  # the new file
    assert get_concept(con, "rex").images == 2 and out not in {r[0] for r in con.execute("SELECT image_id FROM concept_images").fetchall()}
    con.close()
