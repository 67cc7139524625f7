"""BLIP captioning: resumable, batch-size independent, templated, stored beside other caption sources."""

from __future__ import annotations

import re

import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from pipelines.caption import apply_template, check_template, chosen_caption_source, model_captions
from pipelines.ingest import ingested_images
from workbench.cli import app
from workbench.models import load_blip


def make_images(folder, count: int) -> None:
    """Small distinct PNGs (different colours, sizes and shapes), one unreadable file, one sidecar caption."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (40 + 6 * i, 32 + 3 * i), (30 * i % 256, 90, 220 - 20 * i))
        ImageDraw.Draw(image).ellipse((4, 4, 20 + i, 24), fill=(250, 240 - 25 * i, 10 * i))
        image.save(folder / f"img_{i}.png")
    (folder / "broken.jpg").write_text("not an image")
    (folder / "img_0.txt").write_text("a sidecar caption")


@pytest.fixture(scope="module")
def blip():
    return load_blip("tiny", device="cpu")


@pytest.fixture
def catalog(con, tmp_path):
    make_images(tmp_path / "images", 5)
    ingested_images(con, [tmp_path / "images"], workers=1)
    return con


def _captions(con, source: str) -> dict[str, str]:
    return dict(con.execute("SELECT image_id, text FROM captions WHERE source = ?", [source]).fetchall())


def test_captions_only_ok_images_and_resumes(catalog, blip):
    processor, model = blip
    first = model_captions(catalog, processor, model, model_name="tiny", batch_size=2, max_length=8, workers=0)
    assert first["images_ok"] == 4 and first["captioned"] == 4 and first["own_captions_kept"] == 1
    stored = _captions(catalog, "model:tiny")
    ok_ids = {r[0] for r in catalog.execute("SELECT image_id FROM images_view WHERE status = 'ok'").fetchall()}
    assert set(stored) == ok_ids - _sidecar_ids(catalog)  # the broken file got no caption, the sidecar one keeps its own
    assert all(text.strip() for text in stored.values())
    assert len(set(stored.values())) > 1  # captions depend on the image

    again = model_captions(catalog, processor, model, model_name="tiny", batch_size=2, max_length=8, workers=0)
    assert again["captioned"] == 0 and again["already_captioned"] == 4
    before = dict(catalog.execute("SELECT image_id, created_at FROM captions WHERE source = 'model:tiny'").fetchall())

    redo = model_captions(catalog, processor, model, model_name="tiny", batch_size=2, max_length=8,
                          overwrite=True, workers=0)
    assert redo["captioned"] == 4
    after = dict(catalog.execute("SELECT image_id, created_at FROM captions WHERE source = 'model:tiny'").fetchall())
    assert all(after[i] > before[i] for i in before)
    assert _captions(catalog, "sidecar") == {next(iter(_sidecar_ids(catalog))): "a sidecar caption"}
    runs = catalog.execute("SELECT count(*) FROM runs WHERE step = 'caption' AND status = 'ok'").fetchone()[0]
    assert runs == 3


def test_images_with_a_caption_of_their_own_are_captioned_only_when_asked(catalog, blip):
    """A sidecar or a typed caption is what the image trains with: BLIP is not spent on it unless asked, and a
    caption the model writes for it later does not replace it."""
    processor, model = blip
    typed = sorted(({r[0] for r in catalog.execute("SELECT image_id FROM images_view WHERE status = 'ok'").fetchall()}
                    - _sidecar_ids(catalog)))[0]
    catalog.execute("INSERT INTO captions (image_id, source, text) VALUES (?, 'manual', 'typed by hand')", [typed])
    counts = model_captions(catalog, processor, model, model_name="tiny", max_length=6, workers=0)
    assert counts["captioned"] == 3 and counts["own_captions_kept"] == 2
    assert not ({typed} | _sidecar_ids(catalog)) & set(_captions(catalog, "model:tiny"))
    counts = model_captions(catalog, processor, model, model_name="tiny", max_length=6, workers=0, own_captioned=True)
    assert counts["captioned"] == 2 and counts["already_captioned"] == 3 and counts["own_captions_kept"] == 0
    current = dict(catalog.execute("SELECT image_id, caption FROM current_captions").fetchall())
    assert current[typed] == "typed by hand" and current[next(iter(_sidecar_ids(catalog)))] == "a sidecar caption"


def _sidecar_ids(con):
    return {r[0] for r in con.execute("SELECT image_id FROM captions WHERE source = 'sidecar'").fetchall()}


def test_a_new_image_is_the_only_one_captioned_on_resume(catalog, blip, tmp_path):
    processor, model = blip
    model_captions(catalog, processor, model, model_name="tiny", max_length=6, workers=0)
    extra = tmp_path / "images" / "new.png"
    Image.new("RGB", (50, 30), (1, 200, 3)).save(extra)
    ingested_images(catalog, [tmp_path / "images"], workers=1)
    counts = model_captions(catalog, processor, model, model_name="tiny", max_length=6, workers=0)
    assert counts["captioned"] == 1 and counts["already_captioned"] == 4


def test_batched_and_single_captioning_agree(catalog, blip):
    processor, model = blip
    model_captions(catalog, processor, model, model_name="batched", batch_size=4, max_length=10, workers=2)
    model_captions(catalog, processor, model, model_name="single", batch_size=1, max_length=10, workers=0)
    batched, single = _captions(catalog, "model:batched"), _captions(catalog, "model:single")
    assert len(batched) == 4 and batched == single


def test_prompt_is_continued(catalog, blip):
    processor, model = blip
    model_captions(catalog, processor, model, model_name="prompted", max_length=12, prompt="a photo of", workers=0)
    assert all(text.startswith("a photo of") for text in _captions(catalog, "model:prompted").values())


def test_template_uses_the_concept_trigger_when_there_is_one(catalog, blip):
    processor, model = blip
    ids = [r[0] for r in catalog.execute("SELECT image_id FROM images_view WHERE status = 'ok' ORDER BY image_id").fetchall()]
    catalog.execute("INSERT INTO concepts (name, trigger_token, class_noun) VALUES ('rex', 'sks', 'dog')")
    catalog.execute("INSERT INTO concept_images (image_id, concept, source) VALUES (?, 'rex', 'manual')", [ids[0]])
    counts = model_captions(catalog, processor, model, own_captioned=True, model_name="t", max_length=8, workers=0,
                            template="photo of {trigger} {class}, {caption}")
    assert counts["without_trigger"] == 4
    plain = model_captions(catalog, processor, model, own_captioned=True, model_name="plain", max_length=8, workers=0)
    assert plain["captioned"] == 5
    # without a template, the concept image's caption lacks its trigger: counted (a review read "without trigger 0"
    # while concept images had been captioned without theirs)
    assert plain["concept_images_captioned_without_their_trigger"] == 1 and "without_trigger" not in plain
    assert plain["add_token_commands"] == ["workbench edit-captions --add-token sks --where \"concept = 'rex'\""]
    templated, raw = _captions(catalog, "model:t"), _captions(catalog, "model:plain")
    assert templated[ids[0]] == f"photo of sks dog, {raw[ids[0]]}"
    assert templated[ids[1]] == f"photo of, {raw[ids[1]]}"


def test_template_errors_and_filling():
    check_template("photo of {trigger} dog, {caption}")
    with pytest.raises(ValueError, match="Unknown field"):
        check_template("{captoin}")
    with pytest.raises(ValueError, match="needs a \\{caption\\}"):
        check_template("photo of {trigger}")
    with pytest.raises(ValueError, match="Bad caption template"):
        check_template("photo of {caption")
    assert apply_template("photo of {trigger} dog, {caption}", "on grass", trigger=None, class_noun=None) == "photo of dog, on grass"


def test_current_caption_rule_and_choice(catalog, blip):
    processor, model = blip
    model_captions(catalog, processor, model, own_captioned=True, model_name="tiny", max_length=6, workers=0)
    (sidecar_id,) = _sidecar_ids(catalog)
    current = dict(catalog.execute("SELECT image_id, caption_source FROM images_view WHERE status = 'ok'").fetchall())
    assert current[sidecar_id] == "sidecar"  # sidecar beats a model caption
    assert {v for k, v in current.items() if k != sidecar_id} == {"model:tiny"}

    catalog.execute("INSERT INTO captions (image_id, source, text) VALUES (?, 'manual', 'typed by hand')", [sidecar_id])
    assert catalog.execute("SELECT caption FROM images_view WHERE image_id = ?", [sidecar_id]).fetchone()[0] == "typed by hand"

    counts = chosen_caption_source(catalog, "model:tiny")
    assert counts["images_using_source"] == 5
    assert counts["images_without_that_source"] == 0  # the broken file is not one of them: it has no captions at all
    assert catalog.execute("SELECT caption_source FROM images_view WHERE image_id = ?", [sidecar_id]).fetchone()[0] == "model:tiny"
    chosen_caption_source(catalog, None)
    assert catalog.execute("SELECT caption_source FROM images_view WHERE image_id = ?", [sidecar_id]).fetchone()[0] == "manual"
    with pytest.raises(ValueError, match="No caption has source"):
        chosen_caption_source(catalog, "model:nope")


def test_cli_caption_and_use_source(catalog_path, tmp_path):
    from workbench.catalog import connect

    make_images(tmp_path / "cli_images", 3)
    con = connect(catalog_path)
    ingested_images(con, [tmp_path / "cli_images"], workers=1)
    con.close()
    runner = CliRunner()
    result = runner.invoke(app, ["caption", "-c", str(catalog_path), "--batch-size", "2", "--max-length", "6",
                                 "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "1 image(s) with a caption of their own" in " ".join(result.output.split())  # img_0.txt
    assert "tiny BLIP has random weights" in " ".join(result.output.split())  # the default model: said, not silent
    own = runner.invoke(app, ["caption", "-c", str(catalog_path), "--max-length", "6", "--workers", "0", "--own-captioned"])
    assert own.exit_code == 0 and "caption of their own" not in own.output, own.output
    again = runner.invoke(app, ["caption", "-c", str(catalog_path), "--batch-size", "2", "--max-length", "6",
                                "--workers", "0", "--template", "photo of {trigger}, {caption}"])
    assert again.exit_code == 0 and "applies to new captions only" in " ".join(again.output.split())
    # nothing left to caption: said before the model loads (a scripting review: a nightly run on an unchanged set
    # loaded BLIP, seconds to minutes, to caption nothing)
    import workbench.models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    original, workbench.models.load_blip = workbench.models.load_blip, no_loading
    try:
        idle = runner.invoke(app, ["caption", "-c", str(catalog_path), "--own-captioned"])
    finally:
        workbench.models.load_blip = original
    assert idle.exit_code == 0 and "Nothing to caption" in idle.output and "not loaded" in " ".join(idle.output.split()), idle.output
    fresh = runner.invoke(app, ["caption", "-c", str(catalog_path), "--max-length", "6", "--workers", "0", "--overwrite",
                                "--template", "photo of {trigger}, {caption}"])
    # images in no concept got "photo of, …": the count of them is explained, with the command that gives a trigger
    said = " ".join(fresh.output.split())
    assert fresh.exit_code == 0 and "in no concept with a trigger word" in said and "concept add" in said, fresh.output
    bad = runner.invoke(app, ["caption", "-c", str(catalog_path), "--template", "{nope}"])
    assert bad.exit_code == 2 and "Unknown field" in bad.output
    fp16 = runner.invoke(app, ["caption", "-c", str(catalog_path), "--dtype", "fp16", "--device", "cpu"])
    assert fp16.exit_code == 2 and "fp16 needs a GPU" in fp16.output
    chosen = runner.invoke(app, ["caption", "-c", str(catalog_path), "--use-source", "model:tiny"])
    assert chosen.exit_code == 0, chosen.output
    con = connect(catalog_path, read_only=True)
    sources = {r[0] for r in con.execute("SELECT caption_source FROM images_view WHERE status = 'ok'").fetchall()}
    con.close()
    assert sources == {"model:tiny"}
    # --where chooses for some images only; captions typed by hand that no longer train are said (all-or-nothing
    # took them over without a word)
    from pipelines import caption_edits

    con = connect(catalog_path)
    typed, other = [r[0] for r in con.execute("SELECT image_id FROM images WHERE status = 'ok' ORDER BY image_id LIMIT 2").fetchall()]
    caption_edits.save_manual_caption(con, typed, "typed by hand")
    con.close()
    over = runner.invoke(app, ["caption", "-c", str(catalog_path), "--use-source", "model:tiny", "--where", f"image_id = '{typed}'"])
    assert over.exit_code == 0 and "1 image(s) with a caption typed by hand now use another source" in " ".join(over.output.split()), over.output
    back = runner.invoke(app, ["caption", "-c", str(catalog_path), "--use-source", "auto", "--where", f"image_id = '{other}'"])
    assert back.exit_code == 0 and "typed by hand" not in back.output, back.output  # none in what it changed
    con = connect(catalog_path, read_only=True)
    chosen_now = dict(con.execute("SELECT image_id, source FROM caption_choice").fetchall())
    con.close()
    assert other not in chosen_now and chosen_now.get(typed) == "model:tiny"  # only the matched image went back to the rule
    # --where also chooses what is captioned (a review: recaptioning one concept meant recaptioning everything)
    one = runner.invoke(app, ["caption", "-c", str(catalog_path), "--max-length", "6", "--workers", "0", "--overwrite",
                              "--own-captioned", "--where", f"image_id = '{other}'"])
    assert one.exit_code == 0 and re.search(r"captioned\s+│\s+1\b", one.output), one.output
    bad = runner.invoke(app, ["caption", "-c", str(catalog_path), "--where", "no_such_column = 1"])
    assert bad.exit_code == 2 and "--where failed" in bad.output


def test_a_file_unreadable_since_ingest_is_named(catalog, blip, tmp_path):
    """An edited file is left out before any reading; one that fails to decode anyway (bit rot keeps size and mtime)
    is named as it fails. Neither gets a caption."""
    import os

    processor, model = blip
    edited, rotten = tmp_path / "images" / "img_3.png", tmp_path / "images" / "img_2.png"
    edited.write_bytes(b"overwritten since ingest")
    before = os.stat(rotten)
    rotten.write_bytes(b"\0" * before.st_size)
    os.utime(rotten, ns=(before.st_atime_ns, before.st_mtime_ns))
    messages = []
    counts = model_captions(catalog, processor, model, own_captioned=True, model_name="tiny", batch_size=2, max_length=6, workers=0,
                            progress=lambda **kw: messages.append(kw.get("message")))
    assert (counts["captioned"], counts["changed_since_ingest"], counts["unreadable"]) == (3, 1, 1)
    assert any(m and m.startswith("1 image(s) left out") and str(edited) in m for m in messages), messages
    assert any(m and m.startswith(f"could not read {rotten}") for m in messages), messages


def test_cancelling_keeps_the_batches_already_written(catalog, blip):
    from workbench.progress import StepCancelled

    processor, model = blip

    def cancel_after_first_batch(*, task, completed=0, total=None, message=None):
        if completed >= 2:
            raise StepCancelled("stop")

    with pytest.raises(StepCancelled):
        model_captions(catalog, processor, model, own_captioned=True, model_name="tiny", batch_size=2, max_length=6, workers=0,
                       progress=cancel_after_first_batch)
    assert len(_captions(catalog, "model:tiny")) == 2
    assert catalog.execute("SELECT status FROM runs WHERE step = 'caption'").fetchone()[0] == "cancelled"
    resumed = model_captions(catalog, processor, model, own_captioned=True, model_name="tiny", batch_size=2, max_length=6, workers=0)
    assert resumed["captioned"] == 3 and resumed["already_captioned"] == 2


def test_class_priors_are_not_captioned(catalog, blip):
    """A class prior trains (and exports) with its class prompt: BLIP time on 1,000 of them would be wasted."""
    processor, model = blip
    prior = catalog.execute("SELECT image_id FROM images_view WHERE status = 'ok' ORDER BY image_id LIMIT 1").fetchone()[0]
    catalog.execute("UPDATE images SET role = 'class_prior' WHERE image_id = ?", [prior])
    counts = model_captions(catalog, processor, model, own_captioned=True, model_name="tiny", batch_size=2, max_length=6, workers=0)
    assert counts["images_ok"] == 4 and prior not in _captions(catalog, "model:tiny")


def test_ctrl_c_in_caption_says_what_is_kept(catalog_path, tmp_path, monkeypatch):
    import pipelines.caption

    from workbench.catalog import connect

    make_images(tmp_path / "cli_images", 1)
    con = connect(catalog_path)
    ingested_images(con, [tmp_path / "cli_images"], workers=1)
    con.close()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipelines.caption, "model_captions", interrupted)
    # --own-captioned: its one image has a sidecar caption, and a run with nothing to caption ends before the model loads
    result = CliRunner().invoke(app, ["caption", "-c", str(catalog_path), "--workers", "0", "--own-captioned"])
    assert result.exit_code == 130 and "run the same command again" in " ".join(result.output.split())


def test_a_stopped_overwrite_run_goes_on_where_it_stopped_when_run_again(catalog, blip):
    """`caption --overwrite` said "run the same command again to caption the rest" and then did all of them again."""
    from workbench.progress import StepCancelled

    processor, model = blip
    model_captions(catalog, processor, model, own_captioned=True, model_name="tiny", batch_size=2, max_length=6, workers=0)

    def stop_after_a_batch(*, task, completed=0, total=None, message=None):
        if task == "caption" and completed >= 2:
            raise StepCancelled("stopped")

    options = dict(model_name="tiny", batch_size=2, max_length=6, workers=0, overwrite=True)
    with pytest.raises(StepCancelled):
        model_captions(catalog, processor, model, own_captioned=True, progress=stop_after_a_batch, **options)
    rest = model_captions(catalog, processor, model, own_captioned=True, **options)
    assert (rest["captioned"], rest["already_captioned"]) == (3, 2)
    assert model_captions(catalog, processor, model, own_captioned=True, **options)["captioned"] == 5  # after a finished run: all again
    other = model_captions(catalog, processor, model, own_captioned=True, **{**options, "max_length": 7})  # another command: all again
    assert other["captioned"] == 5


def test_copies_dedup_excluded_are_not_captioned_unless_asked(catalog, blip):
    """A curator's review: every excluded duplicate was captioned too (hours of a real BLIP on a large set)."""
    processor, model = blip
    ids = sorted(r[0] for r in catalog.execute("SELECT image_id FROM images_view WHERE status = 'ok'").fetchall())
    catalog.execute("INSERT INTO exclusions (image_id, step, reason) VALUES (?, 'dedup', 'duplicate of x'), "
                    "(?, 'manual', 'manual: ugly')", [ids[0], ids[1]])
    counts = model_captions(catalog, processor, model, own_captioned=True, model_name="tiny", batch_size=2, max_length=8, workers=0)
    assert counts["duplicates_skipped"] == 1 and counts["captioned"] == len(ids) - 1
    assert ids[0] not in _captions(catalog, "model:tiny") and ids[1] in _captions(catalog, "model:tiny")
    asked = model_captions(catalog, processor, model, own_captioned=True, model_name="tiny", batch_size=2, max_length=8, workers=0, duplicates=True)
    assert asked["captioned"] == 1 and ids[0] in _captions(catalog, "model:tiny")


def test_a_file_changed_since_ingest_is_captioned_from_an_unchanged_copy_or_left_out(con, tmp_path, blip):
    """BLIP must see the pixels ingest read: a caption of an edited file was stored under the old image, for good
    (it counted as captioned), and trained with the old pixels of its other copy."""
    import shutil

    from workbench.catalog import connect

    processor, model = blip
    make_images(tmp_path / "ref", 4)
    reference = connect(tmp_path / "ref.duckdb")  # what the model says of each picture, read as it is
    ingested_images(reference, [tmp_path / "ref"], workers=1)
    model_captions(reference, processor, model, model_name="tiny", max_length=8, workers=0, own_captioned=True)
    said = {row[0]: row[1] for row in reference.execute(
        "SELECT v.path, c.text FROM images_view v JOIN captions c USING (image_id) WHERE c.source = 'model:tiny'").fetchall()}
    caption_of = {name: said[str(tmp_path / "ref" / name)] for name in ("img_1.png", "img_2.png", "img_3.png")}
    assert len(set(caption_of.values())) == 3

    (tmp_path / "set" / "a").mkdir(parents=True)
    (tmp_path / "set" / "b").mkdir()
    shutil.copy(tmp_path / "ref" / "img_1.png", tmp_path / "set" / "a" / "pic.png")
    shutil.copy(tmp_path / "ref" / "img_1.png", tmp_path / "set" / "b" / "pic_copy.png")
    shutil.copy(tmp_path / "ref" / "img_2.png", tmp_path / "set" / "a" / "other.png")
    ingested_images(con, [tmp_path / "set"], workers=1)
    ids = dict(con.execute("SELECT path, image_id FROM images_view").fetchall())
    # edited in place after ingest, no ingest since: the first path of img_1, and the only one of img_2
    shutil.copy(tmp_path / "ref" / "img_3.png", tmp_path / "set" / "a" / "pic.png")
    shutil.copy(tmp_path / "ref" / "img_3.png", tmp_path / "set" / "a" / "other.png")
    messages = []
    counts = model_captions(con, processor, model, model_name="tiny", max_length=8, workers=0,
                            progress=lambda **kw: messages.append(kw.get("message") or ""))
    assert counts["captioned"] == 1 and counts["changed_since_ingest"] == 1
    stored = _captions(con, "model:tiny")
    assert stored == {ids[str(tmp_path / "set" / "a" / "pic.png")]: caption_of["img_1.png"]}  # read from b/pic_copy.png
    assert any("1 image(s) left out" in m and "other.png" in m for m in messages)


def test_a_stopped_overwrite_resumes_with_another_batch_size_and_a_too_long_max_length_is_refused(catalog, blip):
    """A review: lowering --batch-size after running out of memory made the rerun caption everything again; and
    --max-length 75 (kohya's default) ended in an IndexError from deep inside generate()."""
    from workbench.progress import StepCancelled

    processor, model = blip
    model_captions(catalog, processor, model, model_name="tiny", batch_size=2, max_length=8, workers=0)

    def stop_after_two(*, task, completed=0, total=None, message=None):
        if completed >= 2:
            raise StepCancelled("stop")

    with pytest.raises(StepCancelled):
        model_captions(catalog, processor, model, model_name="tiny", batch_size=2, max_length=8, workers=0,
                       overwrite=True, progress=stop_after_two)
    rerun = model_captions(catalog, processor, model, model_name="tiny", batch_size=1, max_length=8, workers=0, overwrite=True)
    assert (rerun["already_captioned"], rerun["captioned"]) == (2, 2)
    longest = model.config.text_config.max_position_embeddings
    with pytest.raises(ValueError, match=f"more than this model's text decoder takes \\({longest} tokens\\)"):
        model_captions(catalog, processor, model, model_name="tiny", max_length=longest + 1, workers=0)


def test_use_source_names_sidecar_captions_it_overrides_and_a_new_models_captions_say_a_chosen_one_wins(catalog_path, tmp_path):
    """A review: `--use-source model:X` replaced the captions of the users' own .txt files without a word, and a new
    model's captions then trained nowhere (the chosen model's stayed current), also without a word."""
    import shutil

    from workbench.catalog import connect
    from workbench.models import ensure_tiny

    make_images(tmp_path / "cli_images", 3)
    con = connect(catalog_path)
    ingested_images(con, [tmp_path / "cli_images"], workers=1)
    con.close()
    runner = CliRunner()
    options = ["-c", str(catalog_path), "--max-length", "6", "--workers", "0"]
    assert runner.invoke(app, ["caption", *options, "--own-captioned"]).exit_code == 0
    chosen = runner.invoke(app, ["caption", "-c", str(catalog_path), "--use-source", "model:tiny"])
    said = " ".join(chosen.output.split())
    assert chosen.exit_code == 0 and "1 image(s) with a caption file of their own" in said and "--use-source sidecar" in said
    shutil.copytree(ensure_tiny("blip"), tmp_path / "better-blip")
    newer = runner.invoke(app, ["caption", *options, "--own-captioned", "--model", str(tmp_path / "better-blip")])
    said = " ".join(newer.output.split())
    assert newer.exit_code == 0 and "3 image(s) captioned by model:better-blip train with another model's caption" in said
    assert "model:tiny: 3" in said and "--use-source model:better-blip" in said


def test_a_local_model_of_the_same_name_from_another_folder_is_said(catalog_path, tmp_path):
    """A review: `--model /y/myblip` after `--model /x/myblip` skipped every image as already captioned, silently
    (the caption source is the folder's name)."""
    import shutil

    from workbench.catalog import connect
    from workbench.models import ensure_tiny

    make_images(tmp_path / "cli_images", 2)
    con = connect(catalog_path)
    ingested_images(con, [tmp_path / "cli_images"], workers=1)
    con.close()
    for place in ("x", "y"):
        shutil.copytree(ensure_tiny("blip"), tmp_path / place / "myblip")
    runner = CliRunner()
    options = ["caption", "-c", str(catalog_path), "--max-length", "6", "--workers", "0"]
    first = runner.invoke(app, [*options, "--model", str(tmp_path / "x" / "myblip")])
    assert first.exit_code == 0 and "came from" not in first.output
    same = runner.invoke(app, [*options, "--model", str(tmp_path / "x" / "myblip")])
    assert same.exit_code == 0 and "came from" not in same.output
    other = runner.invoke(app, [*options, "--model", str(tmp_path / "y" / "myblip")], env={"COLUMNS": "500"})
    said = " ".join(other.output.split())
    assert other.exit_code == 0 and f"came from {tmp_path / 'x' / 'myblip'}" in said and "--overwrite captions them again" in said
