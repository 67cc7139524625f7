"""Filters: reasons per rule, clean recompute, dry run, manual include/exclude, config, thresholds on real photos."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.filter import FilterRules, filtered_dataset, manual_exclusions, manual_inclusions

SAMPLE_PHOTOS = Path(__file__).resolve().parents[1] / "sample_data" / "photos"


def _add_image(con, n: int, width: int, height: int, **stats) -> str:
    image_id = f"{n:02x}" * 32
    values = {"brightness": 120.0, "contrast": 50.0, "blur": 500.0, "entropy": 7.0, **stats}
    con.execute(
        "INSERT INTO images (image_id, width, height, status, brightness, contrast, blur, entropy)"
        " VALUES (?, ?, ?, 'ok', ?, ?, ?, ?)",
        [image_id, width, height, values["brightness"], values["contrast"], values["blur"], values["entropy"]],
    )
    path = f"/data/img{n}.jpg"
    con.execute("INSERT INTO paths (path, path_bytes, image_id, seq) VALUES (?, ?, ?, ?)", [path, path.encode(), image_id, n])
    return image_id


def _reasons(con) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for image_id, step, reason in con.execute("SELECT image_id, step, reason FROM exclusions ORDER BY step").fetchall():
        out.setdefault(image_id, []).append((step, reason))
    return out


def test_each_rule_writes_a_human_reason(con):
    small = _add_image(con, 1, 180, 400)
    wide = _add_image(con, 2, 1600, 400)
    blurry = _add_image(con, 3, 512, 512, blur=3.0)
    dark = _add_image(con, 4, 512, 512, brightness=8.0, contrast=3.0)
    bright = _add_image(con, 5, 512, 512, brightness=250.0, contrast=4.0)
    flat = _add_image(con, 6, 512, 512, entropy=0.2)
    good = _add_image(con, 7, 512, 512)
    rules = FilterRules(blurry=True, dark=True, overexposed=True, low_information=True)
    summary = filtered_dataset(con, rules)
    reasons = _reasons(con)
    assert reasons[small] == [("filter:min_side", "short side 180 px < 256")]
    assert reasons[wide] == [("filter:max_aspect", "aspect ratio 4.00 > 3")]
    assert reasons[blurry] == [("filter:blurry", "blurry: variance of Laplacian 3.0 < 25")]
    assert reasons[dark][0][0] == "filter:dark" and "< 56" in reasons[dark][0][1]
    assert reasons[bright][0][0] == "filter:overexposed" and "> 170" in reasons[bright][0][1]
    assert reasons[flat] == [("filter:low_information", "low information: entropy 0.20 bits < 1.5")]
    assert good not in reasons
    assert summary["excluded"] == 6 and summary["kept"] == 1 and summary["rule min_side"] == 1
    excluded = dict(con.execute("SELECT image_id, exclusion_reason FROM images_view WHERE excluded").fetchall())
    assert excluded[small] == "short side 180 px < 256"
    assert con.execute("SELECT count(*) FROM dataset").fetchone()[0] == 1


def test_rerun_with_other_thresholds_recomputes_cleanly(con):
    a = _add_image(con, 1, 300, 300)
    b = _add_image(con, 2, 500, 500)
    filtered_dataset(con, FilterRules(min_side=400))
    assert set(_reasons(con)) == {a}
    filtered_dataset(con, FilterRules(min_side=600))
    assert _reasons(con)[a] == [("filter:min_side", "short side 300 px < 600")]
    assert _reasons(con)[b] == [("filter:min_side", "short side 500 px < 600")]
    messages = []
    summary = filtered_dataset(con, FilterRules(min_side=None, max_aspect=None), progress=lambda **kw: messages.append(kw.get("message")))
    assert _reasons(con) == {}
    # a rerun lets the earlier rule's images back: said, not silent (a curator's review)
    assert summary["back in the dataset (excluded by the last filter run)"] == 2
    assert any(m and m.startswith("2 image(s) excluded by the last filter run pass these rules and come back") for m in messages)
    runs = con.execute("SELECT count(*) FROM runs WHERE step = 'filter' AND status = 'ok'").fetchone()[0]
    assert runs == 3


def test_dry_run_counts_without_writing(con):
    _add_image(con, 1, 100, 100)
    _add_image(con, 2, 900, 100)
    _add_image(con, 3, 600, 600)
    summary = filtered_dataset(con, FilterRules(), dry_run=True)
    assert summary["rule min_side"] == 2 and summary["rule max_aspect"] == 1
    assert summary["excluded"] == 2 and summary["kept"] == 1 and summary["dry_run"] is True
    assert con.execute("SELECT count(*) FROM exclusions").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM runs WHERE step = 'filter'").fetchone()[0] == 0


def test_other_steps_exclusions_are_kept_and_not_counted(con):
    dup = _add_image(con, 1, 100, 100)
    con.execute("INSERT INTO exclusions (image_id, step, reason) VALUES (?, 'dedup', 'duplicate of x')", [dup])
    summary = filtered_dataset(con, FilterRules())
    assert summary["checked"] == 0 and summary["excluded"] == 0
    assert [s for s, _ in _reasons(con)[dup]] == ["dedup", "filter:min_side"]
    filtered_dataset(con, FilterRules(min_side=None))
    assert _reasons(con)[dup] == [("dedup", "duplicate of x")]


def test_manual_include_overrides_filters_and_manual_exclude_has_reason(con):
    small = _add_image(con, 1, 100, 100)
    fine = _add_image(con, 2, 600, 600)
    filtered_dataset(con, FilterRules())
    result = manual_inclusions(con, [small[:8]])
    assert result == {"in_dataset_now": 1, "exclusions_removed": 1, "still_excluded_by_other_steps": 0, "unreadable_files": 0}
    summary = filtered_dataset(con, FilterRules(min_side=1000))
    assert small not in _reasons(con) and fine in _reasons(con)
    assert summary["manually_included"] == 1
    assert manual_exclusions(con, [small], "watermark") == 1
    assert _reasons(con)[small] == [("manual", "manual: watermark")]
    assert con.execute("SELECT count(*) FROM manual_includes").fetchone()[0] == 0
    # a filter rerun keeps manual rows
    filtered_dataset(con, FilterRules(min_side=None))
    assert _reasons(con) == {small: [("manual", "manual: watermark")]}
    with pytest.raises(ValueError, match="reason"):
        manual_exclusions(con, [fine], "  ")
    with pytest.raises(ValueError, match="no image"):
        manual_inclusions(con, ["abcdef0123"])


def test_clip_rule_excludes_low_scores_and_skips_unscored_images(con):
    low = _add_image(con, 1, 600, 600)
    high = _add_image(con, 2, 600, 600)
    unscored = _add_image(con, 3, 600, 600)
    stale = _add_image(con, 4, 600, 600)
    for image_id in (low, high, unscored, stale):
        con.execute("INSERT INTO captions (image_id, source, text) VALUES (?, 'manual', 'a photo of a dog')", [image_id])
    for image_id, score, caption in ((low, 0.213, "a photo of a dog"), (high, 0.31, "a photo of a dog"),
                                     (stale, 0.1, "an older caption")):
        con.execute("INSERT INTO clip_scores (image_id, model, caption_md5, score) VALUES (?, 'ViT-B-32', md5(?), ?)",
                    [image_id, caption, score])
    messages = []
    summary = filtered_dataset(con, FilterRules(min_clip_score=0.28), progress=lambda **kw: messages.append(kw.get("message")))
    assert _reasons(con) == {low: [("filter:min_clip_score", "CLIP score 0.213 < 0.28")]}
    assert summary["rule min_clip_score"] == 1  # unscored and stale-caption scores are not judged
    # and the summary says so, rather than passing them in silence
    assert summary["without CLIP score (rule not applied)"] == 2
    assert any(m and m.startswith("2 image(s) have no CLIP score yet") and "workbench score" in m for m in messages)


def test_clip_rule_on_scores_of_the_random_tiny_clip_says_they_mean_nothing(con):
    image = _add_image(con, 1, 600, 600)
    con.execute("INSERT INTO captions (image_id, source, text) VALUES (?, 'manual', 'a dog')", [image])
    said = {}
    for model in ("tiny", "ViT-B-32"):  # the newest score is the one the rule reads
        con.execute("INSERT INTO clip_scores (image_id, model, caption_md5, score) VALUES (?, ?, md5('a dog'), 0.1)", [image, model])
        messages = []
        filtered_dataset(con, FilterRules(min_clip_score=0.2), progress=lambda **kw: messages.append(kw.get("message") or ""))
        said[model] = any("tiny CLIP (random weights) mean nothing" in m for m in messages)
    assert said == {"tiny": True, "ViT-B-32": False}


def test_clip_rule_is_skipped_with_a_message_without_a_clip_score_column(con):
    from pipelines.filter import _rule_checks

    checks, skipped = _rule_checks(FilterRules(min_clip_score=0.28), has_clip=False)
    assert "min_clip_score" in skipped and "score" in skipped["min_clip_score"]
    assert [name for name, _ in checks] == ["min_side", "max_aspect"]


def test_rules_from_config_table_and_bad_values():
    rules = FilterRules.from_mapping({"min-side": 384, "blurry": True}).with_overrides(min_side=None, max_aspect=2.0)
    assert (rules.min_side, rules.blurry, rules.max_aspect) == (384, True, 2.0)
    for bad, message in [({"min_side": "big"}, "number"), ({"blurry": "yes"}, "true or false"),
                         ({"nope": 1}, "unknown"), ({"max_aspect": 0.5}, "at least 1"), ({"min_side": -5}, "negative"),
                         ({"min_clip_score": 5}, "between -1 and 1")]:
        with pytest.raises(ValueError, match=message):
            FilterRules.from_mapping(bad)
    assert FilterRules(min_clip_score=-0.1).min_clip_score == -0.1  # cosines can be negative


def test_filter_cli_reads_config_and_flags_override(catalog_path, con, tmp_path):
    from workbench.cli import app

    a = _add_image(con, 1, 300, 300)
    con.close()
    (catalog_path.parent / "workbench.toml").write_text("[filter]\nmin_side = 400\n")
    runner = CliRunner()
    cat = ["--catalog", str(catalog_path)]
    result = runner.invoke(app, ["filter", "--dry-run", *cat])
    assert result.exit_code == 0, result.output
    assert "dry run" in result.output
    result = runner.invoke(app, ["filter", "--min-side", "200", *cat])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["filter", *cat])
    assert result.exit_code == 0
    result = runner.invoke(app, ["sql", "SELECT exclusion_reason FROM images_view", "--format", "csv", *cat])
    assert "short side 300 px < 400" in result.output
    bad = tmp_path / "bad.toml"
    bad.write_text("[filter]\nmin_sidez = 1\n")
    result = runner.invoke(app, ["filter", "--config", str(bad), *cat])
    assert result.exit_code == 2 and "unknown filter setting" in result.output
    # a misspelt table or rules at top level did nothing without a word; a [train] table beside [filter] is fine
    for text, named in (("[filtr]\nmin_side = 1\n", "'filtr'"), ("min_side = 1\n", "'min_side'")):
        bad.write_text(text)
        result = runner.invoke(app, ["filter", "--config", str(bad), *cat])
        assert result.exit_code == 2 and named in result.output and "[filter] table" in " ".join(result.output.split()), result.output
    for text in ("[filter]\nmin_side = 400\n[train]\nrank = 8\n", "rank = 8\nprior-preservation = true\n[filter]\nmin_side = 400\n"):
        bad.write_text(text)  # training options beside [filter], in a table or at top level, as `train --config` reads them
        assert runner.invoke(app, ["filter", "--config", str(bad), "--dry-run", *cat]).exit_code == 0, text
    result = runner.invoke(app, ["exclude", a, "--reason", "blurry face", *cat])
    assert result.exit_code == 0
    result = runner.invoke(app, ["include", a, *cat])
    assert result.exit_code == 0 and "exclusions removed" in result.output
    result = runner.invoke(app, ["exclude", "zz", "--reason", "x", *cat])
    assert result.exit_code == 2


def test_default_quality_thresholds_on_real_photos(con, tmp_path):
    """sample photos pass the quality rules; the same photos blurred / darkened / blown out / flattened fail.

    The statistics come from ingest's small decode, so this fails if that decode changes enough to need
    new thresholds (see the table in pipelines/filter.py).
    """
    from PIL import Image, ImageEnhance, ImageFilter

    from pipelines.ingest import ingested_images

    folder = tmp_path / "photos"
    folder.mkdir()
    names = ["astronaut.jpg", "hubble.jpg", "clock.jpg", "coffee.jpg"]
    for name in names:
        shutil.copy(SAMPLE_PHOTOS / name, folder / name)
        image = Image.open(SAMPLE_PHOTOS / name).convert("RGB")
        radius = max(image.size) / 128 * 3  # 3 px at the 128 px stats decode: clearly out of focus
        image.filter(ImageFilter.GaussianBlur(radius)).save(folder / f"blurred_{name}")
        ImageEnhance.Brightness(image).enhance(0.15).save(folder / f"dark_{name}")
    Image.new("RGB", (512, 512), (250, 250, 250)).save(folder / "white.png")
    ingested_images(con, [folder], workers=1)
    rules = FilterRules(min_side=None, max_aspect=None, blurry=True, dark=True, overexposed=True, low_information=True)
    filtered_dataset(con, rules)
    steps = {
        Path(path).name: set(steps or [])
        for path, steps in con.execute(
            "SELECT v.path, list(e.step) FILTER (WHERE e.step IS NOT NULL) FROM images_view v"
            " LEFT JOIN exclusions e USING (image_id) GROUP BY v.path"
        ).fetchall()
    }
    for name in names:
        assert steps[name] == set(), name
        assert "filter:blurry" in steps[f"blurred_{name}"], name
        assert "filter:dark" in steps[f"dark_{name}"], name
    assert {"filter:overexposed", "filter:low_information"} <= steps["white.png"]


def test_rules_leave_class_priors_alone(con):
    """Priors are the base model's own output at its size: a size rule excluded them in the catalog while training and
    export (which drop a prior only by hand) still used them, so the catalog said otherwise than what trained."""
    small = _add_image(con, 1, 64, 64)
    prior = _add_image(con, 2, 64, 64)
    con.execute("UPDATE images SET role = 'class_prior' WHERE image_id = ?", [prior])
    summary = filtered_dataset(con, FilterRules())
    assert summary["checked"] == 1 and summary["excluded"] == 1
    assert con.execute("SELECT image_id, role FROM dataset").fetchall() == [(prior, "class_prior")]
    assert small in _reasons(con)


def test_x_excludes_then_includes_and_never_lifts_a_duplicates_exclusion(con):
    """The TUI's x on Browse and Duplicates: one rule for both screens."""
    from pipelines.filter import toggled_exclusion

    plain = _add_image(con, 1, 512, 512)
    small = _add_image(con, 2, 100, 100)
    copy = _add_image(con, 3, 512, 512)
    filtered_dataset(con, FilterRules())
    con.execute("INSERT INTO exclusions (image_id, step, reason) VALUES (?, 'dedup', 'duplicate of x')", [copy])
    assert toggled_exclusion(con, plain, "by hand")["action"] == "excluded"
    assert toggled_exclusion(con, plain, "by hand") == {"action": "included", "was_keeper": False, "still_excluded_by": [],
                                                        "unreadable": None}
    assert toggled_exclusion(con, small, "by hand")["action"] == "included"  # a filter exclusion is lifted
    assert toggled_exclusion(con, copy, "by hand") == {"action": "unchanged", "was_keeper": False, "still_excluded_by": ["dedup"],
                                                       "unreadable": None}
    assert sorted(r[0] for r in con.execute("SELECT image_id FROM dataset").fetchall()) == sorted([plain, small])


def test_x_on_an_unreadable_file_says_it_stays_out_of_the_dataset(con):
    """Before, including an image whose file could not be read said "included", and it was not in the dataset."""
    from pipelines.filter import toggled_exclusion
    from tui.workers import toggle_message

    broken = _add_image(con, 1, 512, 512)
    con.execute("UPDATE images SET status = 'error', error = 'truncated JPEG' WHERE image_id = ?", [broken])
    assert toggled_exclusion(con, broken, "by hand")["action"] == "excluded"
    outcome = toggled_exclusion(con, broken, "by hand")
    assert outcome["action"] == "included" and outcome["unreadable"] == "truncated JPEG"
    text, severity = toggle_message(outcome, broken, keep_hint="press k")
    assert "could not be read" in text and "truncated JPEG" in text and severity == "warning"
    assert con.execute("SELECT count(*) FROM dataset").fetchone()[0] == 0
    assert manual_inclusions(con, [broken])["unreadable_files"] == 1  # `workbench include` says it stays out


def test_a_bad_value_is_named_as_the_option_or_the_config_key_it_came_from(catalog_path):
    """`--min-side -5` was reported as "filter.min_side", the workbench.toml key the user never typed."""
    from typer.testing import CliRunner

    from workbench.catalog import connect
    from workbench.cli import app

    connect(catalog_path).close()
    runner = CliRunner()
    typed = runner.invoke(app, ["filter", "--catalog", str(catalog_path), "--min-side", "-5"], env={"COLUMNS": "200"})
    assert typed.exit_code == 2 and "--min-side must not be negative" in typed.output
    (catalog_path.parent / "workbench.toml").write_text("[filter]\nmax_aspect = 0.5\n")
    from_file = runner.invoke(app, ["filter", "--catalog", str(catalog_path), "--min-side", "300"], env={"COLUMNS": "200"})
    assert from_file.exit_code == 2 and "filter.max_aspect is long side / short side" in from_file.output


def test_the_summary_counts_every_image_it_writes_rows_for(con, catalog_path):
    """filter printed "rule min side 0, excluded 0" and wrote a min_side row for a copy dedup had excluded. Such images
    are counted apart, so excluded + failing but already excluded = the images with filter rows; the rows stay, so a
    copy kept instead of its original later is still held to the rules."""
    import re

    from pipelines.dedup import choose_keeper, duplicate_groups
    from workbench.cli import app

    original = _add_image(con, 1, 600, 400)
    resized = _add_image(con, 2, 300, 200)  # a duplicate of the original, and under min_side
    by_hand = _add_image(con, 3, 100, 2000)  # excluded by hand; fails both rules
    tiny = _add_image(con, 4, 100, 100)
    for image_id, phash in ((original, 0), (resized, 0), (by_hand, 0xFFFF_FFFF_0000_0000), (tiny, 0xFFFF_FFFF)):
        con.execute("INSERT INTO hashes VALUES (?, ?, 0, ?)", [image_id, phash, phash])  # 32+ bits apart, flipped too
    duplicate_groups(con)
    manual_exclusions(con, [by_hand], "watermark")
    key = "failing but already excluded (duplicate or by hand)"

    summary = filtered_dataset(con, FilterRules())
    assert (summary["checked"], summary["rule min_side"], summary["rule max_aspect"]) == (2, 1, 0)
    assert (summary["excluded"], summary["kept"], summary[key]) == (1, 1, 2)
    with_rows = con.execute("SELECT count(DISTINCT image_id) FROM exclusions WHERE starts_with(step, 'filter:')").fetchone()[0]
    assert with_rows == summary["excluded"] + summary[key] == 3
    assert [s for s, _ in _reasons(con)[resized]] == ["dedup", "filter:min_side"]
    # the steps, to group by (the reasons name a keeper or a value each)
    assert con.execute("SELECT exclusion_steps FROM images_view WHERE image_id = ?", [resized]).fetchone()[0] == [
        "dedup", "filter:min_side"]

    printed = CliRunner().invoke(app, ["filter", "--dry-run", "--catalog", str(catalog_path)], env={"COLUMNS": "200"})
    assert printed.exit_code == 0, printed.output
    assert re.search(r"failing but already excluded \(duplicate or by hand\)\s*│\s*2\s*│", printed.output), printed.output

    choose_keeper(con, resized)  # the small copy kept instead: the rule still keeps it out of the dataset
    assert con.execute("SELECT exclusion_reason FROM images_view WHERE image_id = ?", [resized]).fetchone()[0] == (
        "short side 200 px < 256")
    assert con.execute("SELECT count(*) FROM dataset").fetchone()[0] == 0


def test_exclude_and_include_take_a_sql_condition(catalog_path):
    """SQL users curated with `sql -f csv | tail | xargs workbench exclude`: exclude and include take --where."""
    from workbench.catalog import connect
    from workbench.cli import app

    con = connect(catalog_path)
    wide, square, small = _add_image(con, 1, 1600, 400), _add_image(con, 2, 600, 600), _add_image(con, 3, 100, 100)
    con.close()
    runner = CliRunner()
    done = runner.invoke(app, ["exclude", "--where", "width > 2 * height", "--reason", "panorama", "-c", str(catalog_path)])
    assert done.exit_code == 0 and "excluded 1" in done.output, done.output
    nothing = runner.invoke(app, ["exclude", "--where", "width > 10000", "--reason", "huge", "-c", str(catalog_path)])
    assert nothing.exit_code == 0 and "No image matches" in nothing.output  # nothing to do, not a failure
    for bad in ("width > ", "1=1; DELETE FROM images", "image_id IN (WITH d AS (DELETE FROM images RETURNING *) SELECT image_id FROM d)"):
        refused = runner.invoke(app, ["exclude", "--where", bad, "--reason", "x", "-c", str(catalog_path)])
        assert refused.exit_code == 2 and "--where" in refused.output, (bad, refused.output)
    both = runner.invoke(app, ["exclude", small[:8], "--where", "width = 600", "--reason", "test", "-c", str(catalog_path)])
    assert both.exit_code == 0 and "excluded 2" in both.output, both.output
    con = connect(catalog_path)
    assert _reasons(con) == {wide: [("manual", "manual: panorama")], square: [("manual", "manual: test")],
                             small: [("manual", "manual: test")]}
    assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 3
    con.close()
    back = runner.invoke(app, ["include", "--where", "exclusion_reason LIKE '%test%' AND width < 200", "-c", str(catalog_path)])
    assert back.exit_code == 0, back.output
    con = connect(catalog_path)
    assert set(_reasons(con)) == {wide, square}
    con.close()
    assert runner.invoke(app, ["include", "-c", str(catalog_path)]).exit_code == 2


def test_exclude_has_a_dry_run_and_include_only_manual_undoes_it_without_overriding_the_filter(catalog_path):
    """A review: a mistaken `exclude --where` could only be undone by `include`, which also lifted the filter's
    exclusions of those images and kept them in against every later filter run; nor could it be previewed."""
    from workbench.catalog import connect
    from workbench.cli import app

    con = connect(catalog_path)
    strip, wide, square = _add_image(con, 1, 2400, 100), _add_image(con, 2, 1600, 800), _add_image(con, 3, 600, 600)
    filtered_dataset(con, FilterRules(max_aspect=3.0))  # the strip is out by the filter
    before = _reasons(con)
    assert set(before) == {strip}
    con.close()
    runner = CliRunner()
    where = ["--where", "width > height", "-c", str(catalog_path)]
    preview = runner.invoke(app, ["exclude", *where, "--reason", "oops", "--dry-run"])
    said = " ".join(preview.output.split())
    assert preview.exit_code == 0 and "2 image(s) would be excluded" in said and strip[:12] in said and wide[:12] in said
    assert "now: aspect" in said and square[:12] not in said
    con = connect(catalog_path)
    assert _reasons(con) == before  # nothing changed
    con.close()
    con = connect(catalog_path)
    manual_exclusions(con, [square], "kept out before")  # an earlier exclusion by hand, which the undo leaves
    con.close()
    done = runner.invoke(app, ["exclude", *where, "--reason", "oops"])
    assert done.exit_code == 0 and "undo: workbench include --only-manual --reason oops" in " ".join(done.output.split())
    # by the reason: the exclude's own --where (here: on width) may match other images by now
    undone = runner.invoke(app, ["include", "--only-manual", "--reason", "oops", "-c", str(catalog_path)])
    assert undone.exit_code == 0, undone.output
    con = connect(catalog_path)
    assert _reasons(con)[square] == [("manual", "manual: kept out before")]
    con.execute("DELETE FROM exclusions WHERE image_id = ?", [square])  # (the rest of the test is about the others)
    con.close()
    con = connect(catalog_path)
    assert _reasons(con) == before
    assert con.execute("SELECT count(*) FROM manual_includes").fetchall()[0][0] == 0
    filtered_dataset(con, FilterRules(max_aspect=3.0))  # a later filter run still judges them
    assert strip in _reasons(con) and wide not in _reasons(con)
    con.close()


def test_a_kept_copy_the_filter_excludes_hands_its_picture_to_a_copy_that_passes(con):
    """A review found `filter --min-side 256` removing pictures from the dataset altogether: dedup had kept a tinted
    thumbnail (colour over grey) and excluded its 512 px original as a duplicate, and the filter excluded the thumbnail."""
    from pipelines.dedup import choose_keeper, duplicate_groups

    ids = {name: f"{n:02x}" * 32 for n, name in enumerate(("tinted_thumb", "grey_original", "other_thumb", "other_original"), 1)}
    names = {image_id: name for name, image_id in ids.items()}

    def insert(name, width, seq, mode, phash):
        name = ids[name]
        con.execute("INSERT INTO images (image_id, status, width, height, format, bytes, mode, brightness, contrast, blur, "
                    "entropy) VALUES (?, 'ok', ?, ?, 'JPEG', 1000, ?, 120, 50, 500, 7)", [name, width, width, mode])
        con.execute("INSERT INTO hashes VALUES (?, ?, 0, ?)", [name, phash, phash ^ (2**64 - 1)])
        con.execute("INSERT INTO paths (path, path_bytes, image_id, seq) VALUES (?, ?::BLOB, ?, ?)", [f"/d/{name}", f"/d/{name}", name, seq])

    base, other = 0x0F0F_F0F0_1234_5678, 0x0F0F_F0F0_1234_5678 ^ 0xFFFF_FFFF_0000
    insert("tinted_thumb", 170, 1, "RGB", base)
    insert("grey_original", 512, 2, "L", base ^ 1)
    insert("other_thumb", 170, 3, "RGB", other)
    insert("other_original", 512, 4, "L", other ^ 1)

    def dataset():
        return {names[r[0]] for r in con.execute("SELECT image_id FROM dataset").fetchall()}

    duplicate_groups(con, threshold=6)
    assert dataset() == {"tinted_thumb", "other_thumb"}  # colour over grey
    choose_keeper(con, ids["other_thumb"])  # a hand choice stays kept, whatever the filter says
    summary = filtered_dataset(con, FilterRules(min_side=256), dry_run=True)
    assert summary["kept through another copy (the kept one fails)"] == 1 and dataset() == {"tinted_thumb", "other_thumb"}
    said: list[str] = []
    summary = filtered_dataset(con, FilterRules(min_side=256), progress=lambda **kw: said.append(kw.get("message") or ""))
    assert summary["duplicate groups keeping another copy now"] == 1
    assert dataset() == {"grey_original"}
    # the hand-kept copy the filter excludes is named, with a query that lists its group (it listed nothing)
    import re

    (listing,) = [m for m in said if "you chose to keep" in m]
    query = re.search(r'workbench sql "(.*)"\)', listing).group(1)
    listed = {names[image_id] for (image_id,) in con.execute(
        f"SELECT image_id FROM ({query}) q JOIN duplicates USING (group_id)").fetchall()}
    assert listed == {"other_thumb", "other_original"}
    reason = con.execute("SELECT keep_reason FROM duplicates WHERE is_keeper AND image_id = ?", [ids["grey_original"]]).fetchall()[0][0]
    assert reason.startswith("passes the filter") and "short side 170 px < 256" in reason
    # dedup run again keeps the copy that passes; a filter without the rule gives the picture back to the thumbnail
    duplicate_groups(con, threshold=6)
    assert dataset() == {"grey_original"}
    back = filtered_dataset(con, FilterRules(min_side=0))
    assert dataset() == {"tinted_thumb", "other_thumb"}
    assert back["duplicate groups keeping another copy now"] == 1  # the move back is counted too (a README check)
    # including a filtered kept copy by hand puts it first again
    filtered_dataset(con, FilterRules(min_side=256))
    manual_inclusions(con, [ids["tinted_thumb"]])
    assert dataset() == {"tinted_thumb"}


def test_a_copy_that_takes_its_group_over_is_judged_with_the_caption_it_carries(con):
    """A review: `filter --min-clip-score` handed a failing kept copy's picture to a copy with no caption of its own,
    hence no score, which passed; once kept it carried the same caption, with a failing score, and stayed in the
    dataset (the kept copy changed at every rerun)."""
    from pipelines.dedup import duplicate_groups

    ids = {}
    for n, (name, width) in enumerate((("original", 512), ("copy", 400)), 1):
        image_id = ids[name] = f"{n:02x}" * 32
        con.execute("INSERT INTO images (image_id, status, width, height, format, bytes, mode, brightness, contrast, blur, "
                    "entropy) VALUES (?, 'ok', ?, ?, 'PNG', 1000, 'RGB', 120, 50, 500, 7)", [image_id, width, width])
        con.execute("INSERT INTO hashes VALUES (?, ?, 0, 0)", [image_id, 0x0F0F_F0F0_1234_5678 ^ (n - 1)])
        con.execute("INSERT INTO paths (path, path_bytes, image_id, seq) VALUES (?, ?::BLOB, ?, ?)",
                    [f"/d/{name}.png", f"/d/{name}.png", image_id, n])
    con.execute("INSERT INTO captions (image_id, source, text) VALUES (?, 'sidecar', 'a tabby cat')", [ids["original"]])
    for name, score in (("original", 0.013), ("copy", 0.012)):  # the copy's: scored while it was the kept one
        con.execute("INSERT INTO clip_scores (image_id, model, caption_md5, score) VALUES (?, 'ViT-B-32', md5('a tabby cat'), ?)",
                    [ids[name], score])
    duplicate_groups(con, threshold=6)
    kept = lambda: con.execute("SELECT image_id FROM duplicates WHERE is_keeper").fetchall()  # noqa: E731
    assert kept() == [(ids["original"],)]
    assert con.execute("SELECT clip_score FROM images_view WHERE image_id = ?", [ids["copy"]]).fetchall() == [(None,)]
    said = []  # a dry run cannot take that second look: it says so, not a count that the real run then contradicts
    filtered_dataset(con, FilterRules(min_side=0, min_clip_score=0.3), dry_run=True,
                     progress=lambda **kw: said.append(kw.get("message") or ""))
    assert any("these counts leave that second look out" in m for m in said), said
    for _ in range(2):  # and stays so on a rerun
        summary = filtered_dataset(con, FilterRules(min_side=0, min_clip_score=0.3))
        assert con.execute("SELECT count(*) FROM dataset").fetchall() == [(0,)], summary
    assert summary["copies failing once kept (the caption they carry)"] == 1
    assert "CLIP score 0.012 < 0.3" in _reasons(con)[ids["copy"]][-1][1]


def test_a_threshold_given_turns_its_rule_on_and_grayscale_is_a_rule(con):
    """A review: `filter --blur-threshold 500` (or `blur_threshold = 40` in [filter]) without `--no-blurry` ran no blur
    rule, silently, and let the last run's blur exclusions back in; grayscale (ingest's is_grayscale) had no rule."""
    sharp = _add_image(con, 1, 512, 512, blur=800.0)
    soft = _add_image(con, 2, 512, 512, blur=300.0)
    grey = _add_image(con, 3, 512, 512)
    con.execute("UPDATE images SET is_grayscale = (image_id = ?)", [grey])
    assert FilterRules.from_mapping({"blur_threshold": 400}).blurry
    assert not FilterRules.from_mapping({"blur_threshold": 400, "blurry": False}).blurry  # said off: stays off
    assert FilterRules().with_overrides(dark_threshold=90).dark
    filtered_dataset(con, FilterRules().with_overrides(blur_threshold=400, grayscale=True))
    reasons = _reasons(con)
    assert set(reasons) == {soft, grey} and sharp not in reasons
    assert reasons[soft] == [("filter:blurry", "blurry: variance of Laplacian 300.0 < 400")]
    assert reasons[grey] == [("filter:grayscale", "grayscale (no colour)")]


def test_an_aspect_just_over_the_limit_is_not_shown_as_equal_to_it(con):
    wide = _add_image(con, 1, 901, 300)
    filtered_dataset(con, FilterRules(max_aspect=3))
    assert _reasons(con)[wide] == [("filter:max_aspect", "aspect ratio 3.0033 > 3")]


def test_export_and_train_name_images_the_last_filter_run_never_judged(catalog_path, con, tmp_path):
    """A review: images ingested after `filter --no-dark` went into export and training, dark or not, without a word."""
    from PIL import Image

    from pipelines.ingest import ingested_images
    from workbench.cli import app

    first, later = tmp_path / "first", tmp_path / "later"
    for folder, colour in ((first, (200, 120, 40)), (later, (3, 3, 3))):
        folder.mkdir()
        Image.new("RGB", (300, 300), colour).save(folder / "a.png")
    ingested_images(con, [first], workers=1)
    filtered_dataset(con, FilterRules(dark=True, min_clip_score=0.2675))
    ingested_images(con, [later], workers=1)
    con.close()
    runner = CliRunner()
    export = runner.invoke(app, ["export", str(tmp_path / "out"), "--format", "parquet", "--catalog", str(catalog_path)])
    said = " ".join(export.output.split())
    assert export.exit_code == 0, export.output
    assert "1 image(s) of the dataset came in after the last filter run" in said
    assert "`workbench filter --min-side 256 --max-aspect 3 --min-clip-score 0.2675 --no-dark`" in said  # exactly
    shown = runner.invoke(app, ["train", "lora", "--model", "tiny", "--resolution", "64", "--show-batches", "1",
                                "--catalog", str(catalog_path)])
    assert "came in after the last filter run" in " ".join(shown.output.split()), shown.output
    assert runner.invoke(app, ["filter", "--min-clip-score", "0.2675", "--no-dark", "--catalog", str(catalog_path)]).exit_code == 0
    export = runner.invoke(app, ["export", str(tmp_path / "out2"), "--format", "parquet", "--catalog", str(catalog_path)])
    assert export.exit_code == 0 and "after the last filter run" not in export.output


def test_include_only_manual_finds_an_exclusion_written_with_sql_by_its_reason(con):
    """A SQL user's review: a manual exclusion inserted with SQL (reason 'by sql') was not found by `include
    --only-manual --reason "by sql"`, which looked only for the stored form 'manual: by sql'."""
    from pipelines.filter import manual_exclusions_lifted

    square = _add_image(con, 1, 600, 600)
    con.execute("INSERT INTO exclusions (image_id, step, reason) VALUES (?, 'manual', 'by sql')", [square])
    assert manual_exclusions_lifted(con, None, reason="by sql")["exclusions_removed"] == 1
    assert _reasons(con) == {}
