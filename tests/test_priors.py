"""DreamBooth class-prior generation (issue 4): fixed per-image seeds, ingest as class_prior, resumable."""

from __future__ import annotations

import json

import re

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipelines.priors import class_priors, default_prior_count
from train_fixtures import ingest_images, one_thread  # noqa: F401
from workbench.cli import app
from workbench.progress import StepCancelled

pytestmark = pytest.mark.slow


@pytest.fixture
def pipe():
    from diffusers import DDIMScheduler

    from workbench.models import load_sd_pipeline

    pipeline = load_sd_pipeline("tiny", device="cpu", dtype="float32")
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    return pipeline


def _generate(con, pipe, out, **kwargs):
    options = dict(class_prompt="a photo of a dog", model_name="tiny", out_dir=out, batch_size=2, seed=10,
                   num_inference_steps=2, resolution=32)
    options.update(kwargs)
    return class_priors(con, pipe, **options)


def test_priors_are_ingested_with_role_prompt_and_seed_and_resume_only_the_missing(con, tmp_path, pipe, one_thread):
    ingest_images(con, tmp_path / "instances", 2)
    first = _generate(con, pipe, tmp_path / "priors", num_images=3)
    assert (first.generated, first.existing) == (3, 0)
    rows = con.execute(
        "SELECT c.seed, i.role, c.class_prompt, c.model FROM class_priors c JOIN images i USING (image_id) ORDER BY c.seed"
    ).fetchall()
    assert rows == [(s, "class_prior", "a photo of a dog", "tiny") for s in (10, 11, 12)]
    assert con.execute("SELECT count(*) FROM dataset WHERE role = 'instance'").fetchone()[0] == 2  # instances untouched

    more = _generate(con, pipe, tmp_path / "priors", num_images=5)
    assert (more.generated, more.existing) == (2, 3)
    assert sorted(s for (s,) in con.execute("SELECT seed FROM class_priors").fetchall()) == [10, 11, 12, 13, 14]
    assert len(more.image_ids) == 5

    # image i depends only on seed + i, not on the batch it was made in
    files = sorted((tmp_path / "priors").glob("a-photo-of-a-dog-*/*.png"))
    alone = pipe(["a photo of a dog"], num_inference_steps=2, height=32, width=32,
                 generator=[torch.Generator().manual_seed(11)]).images[0]
    with Image.open(files[1]) as batched:
        assert np.abs(np.asarray(batched, np.int16) - np.asarray(alone, np.int16)).max() <= 1


def test_an_interrupted_run_keeps_its_images_and_the_rerun_finishes(con, tmp_path, pipe, one_thread):
    def stop_after_first_batch(*, task, completed=0, total=None, message=None):
        if task == "class priors" and completed >= 2:
            raise StepCancelled("stop")

    with pytest.raises(StepCancelled):
        _generate(con, pipe, tmp_path / "priors", num_images=4, progress=stop_after_first_batch)
    assert con.execute("SELECT count(*) FROM class_priors").fetchone()[0] == 2
    assert con.execute("SELECT status FROM runs WHERE step = 'priors'").fetchone() == ("cancelled",)
    rest = _generate(con, pipe, tmp_path / "priors", num_images=4)
    assert (rest.existing, rest.generated) == (2, 2)


def test_a_stop_in_mid_save_leaves_no_temporary_file(con, tmp_path, pipe, one_thread, monkeypatch):
    """Ctrl+C while a PNG was being written left `*.tmp.png` beside the class images (CI caught it by chance)."""
    saves = []
    real_save = Image.Image.save

    def stopped_in_the_second_save(self, fp, *args, **kwargs):
        saves.append(fp)
        real_save(self, fp, *args, **kwargs)
        if len(saves) == 2:
            raise KeyboardInterrupt  # the signal lands after bytes were written, before the rename

    monkeypatch.setattr(Image.Image, "save", stopped_in_the_second_save)
    with pytest.raises(KeyboardInterrupt):
        _generate(con, pipe, tmp_path / "priors", num_images=3)
    monkeypatch.undo()
    assert not list((tmp_path / "priors").glob("*/*.tmp.png"))
    assert len(list((tmp_path / "priors").glob("*/*-seed*.png"))) == 1
    rerun = _generate(con, pipe, tmp_path / "priors", num_images=3)
    assert rerun.generated == 2 and con.execute("SELECT count(*) FROM class_priors").fetchone()[0] == 3


def test_a_set_of_other_settings_is_named_when_a_new_one_is_made(con, tmp_path, pipe, one_thread):
    """A review: `priors --steps 10` then a DreamBooth run (30 steps) said "0 of 6 exist; generating 6", and not that a
    10-step set of the same prompt was there."""
    ingest_images(con, tmp_path / "instances", 2)
    _generate(con, pipe, tmp_path / "priors", num_images=2, num_inference_steps=1)
    said = []
    _generate(con, pipe, tmp_path / "priors", num_images=2, num_inference_steps=2,
              progress=lambda **kw: said.append(kw.get("message") or ""))
    assert any("other sets of this prompt and model, not used: 2 at 32 px, 1 step" in m for m in said), said


def test_a_stop_while_class_images_are_recorded_never_makes_them_training_photos(con, tmp_path, pipe, one_thread, monkeypatch):
    """Ctrl+C between the ingest of generated images and their class-prior rows left them 'instance' images: a LoRA
    then trained on 314 images, 97 of them generated birds. Now they are class images from the moment they are in."""
    import pipelines.ingest as ingest_module

    ingest_images(con, tmp_path / "instances", 2)
    real = ingest_module.ingested_images

    def stopped_after_ingest(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt  # the stop lands after the ingest, before the class_priors rows

    monkeypatch.setattr(ingest_module, "ingested_images", stopped_after_ingest)
    with pytest.raises(KeyboardInterrupt):
        _generate(con, pipe, tmp_path / "priors", num_images=3)
    roles = dict(con.execute("SELECT role, count(*) FROM images GROUP BY role").fetchall())
    assert roles == {"instance": 2, "class_prior": 2}  # the first batch of two, stopped before its rows
    assert con.execute("SELECT count(*) FROM class_priors").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM dataset WHERE role = 'instance'").fetchone()[0] == 2  # the photos alone train
    monkeypatch.undo()
    rerun = _generate(con, pipe, tmp_path / "priors", num_images=3)  # the next run gives them their rows
    assert rerun.generated == 1 and con.execute("SELECT count(*) FROM class_priors").fetchone()[0] == 3


def test_default_count_follows_the_dreambooth_recipe(con, tmp_path):
    ingest_images(con, tmp_path / "instances", 3)
    assert default_prior_count(con, max_images=1000) == 600  # 200 x 3 instance images
    assert default_prior_count(con, max_images=250) == 250  # capped


def test_priors_cli(catalog_path, tmp_path, one_thread):
    from workbench.catalog import connect

    connect(catalog_path).close()
    runner = CliRunner()
    result = runner.invoke(app, ["priors", "--class-prompt", "a photo of a cat", "--num", "2", "--steps", "2", "--resolution", "32",
                                 "--out-dir", str(tmp_path / "p"), "--catalog", str(catalog_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "p").glob("a-photo-of-a-cat-*/*.png"))) == 2
    # the run's seconds count the making of the images (done before its row, with the catalog closed): they said ~0.1 s
    con = connect(catalog_path, read_only=True)
    seconds, params = con.execute("SELECT seconds, params FROM runs WHERE step = 'priors' ORDER BY run_id DESC LIMIT 1").fetchone()
    con.close()
    assert seconds >= json.loads(params)["generation_seconds"] > 0
    no_prompt = runner.invoke(app, ["priors", "--catalog", str(catalog_path)])
    assert no_prompt.exit_code == 2 and "--class-prompt" in no_prompt.output



def test_priors_cli_lets_the_catalog_go_while_it_generates_and_a_stop_keeps_the_images(catalog_path, tmp_path):
    """`workbench priors` closes the catalog while the model samples; Ctrl+C keeps the PNGs made so far, and the
    rerun adds them without making them again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from workbench.catalog import connect

    connect(catalog_path).close()
    out = tmp_path / "p"
    command = [sys.executable, "-m", "workbench.cli", "priors", "--class-prompt", "a photo of a cat", "--num", "400",
               "--batch-size", "1", "--steps", "2", "--resolution", "32", "--out-dir", str(out), "--catalog", str(catalog_path),
               "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Ctrl+C as in a terminal, even when this suite runs as a background job (which starts with SIGINT ignored)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*/*-seed*.png")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert list(out.glob("*/*-seed*.png")), "no class image was made"
        other = connect(catalog_path)  # another process can write the catalog meanwhile
        other.execute("CREATE TABLE notes (x INT)")
        other.close()
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 130, output
    assert "run the same command again" in " ".join(output.split())
    made = sorted(out.glob("*/*-seed*.png"))
    assert made and not list(out.glob("*/*.tmp.png"))
    rerun = CliRunner().invoke(app, ["priors", "--class-prompt", "a photo of a cat", "--num", str(len(made) + 1), "--steps", "2",
                                     "--resolution", "32", "--out-dir", str(out), "--catalog", str(catalog_path), "--device", "cpu"])
    assert rerun.exit_code == 0, rerun.output
    import re

    assert re.search(r"generated\W+1\W", rerun.output) and re.search(rf"ingested from disk\W+{len(made)}\W", rerun.output), rerun.output
    check = connect(catalog_path)
    try:
        assert check.execute("SELECT count(*) FROM class_priors").fetchone()[0] == len(made) + 1
        assert check.execute("SELECT count(*) FROM notes").fetchone()[0] == 0  # the other process's table survived
    finally:
        check.close()


def test_a_prior_set_belongs_to_its_model_and_exact_prompt_and_replaces_what_is_gone(con, tmp_path, pipe, one_thread):
    """PNGs on disk were taken by any model or by a prompt with the same slug ('a photo of a Dog!'); a prior
    excluded by hand was not replaced; a deleted PNG was never made again."""
    import os

    from pipelines.filter import manual_exclusions
    from pipelines.priors import prior_plan

    out = tmp_path / "priors"
    made = _generate(con, pipe, out, num_images=3)
    assert made.generated == 3
    for prompt, model in (("a photo of a Dog!", "tiny"), ("a photo of a dog", str(tmp_path / "other-model"))):
        other = prior_plan(con, class_prompt=prompt, model_name=model, out_dir=out, num_images=3, seed=10)
        assert (other.existing, len(other.on_disk), len(other.to_generate)) == (0, 0, 3), (prompt, model)

    seed_of = dict(con.execute("SELECT seed, image_id FROM class_priors").fetchall())
    manual_exclusions(con, [seed_of[11]], "ugly")
    plan = prior_plan(con, class_prompt="a photo of a dog", model_name="tiny", out_dir=out, num_images=3, seed=10)
    assert plan.seeds == [10, 12, 13] and list(plan.to_generate) == [13]

    path = con.execute("SELECT path FROM paths WHERE image_id = ?", [seed_of[12]]).fetchone()[0]
    os.remove(path)
    plan = prior_plan(con, class_prompt="a photo of a dog", model_name="tiny", out_dir=out, num_images=3, seed=10)
    assert sorted(plan.to_generate) == [12, 13]
    again = _generate(con, pipe, out, num_images=3)
    assert (again.generated, len(again.image_ids)) == (2, 3)  # the set: 10, 12 (made again) and 13 in place of 11
    assert os.path.isfile(path)
    # no seed given (training, `workbench priors` without --seed): the set grows from where it starts, not from 0
    grown = prior_plan(con, class_prompt="a photo of a dog", model_name="tiny", out_dir=out, num_images=5)
    assert grown.seeds == [10, 12, 13, 14, 15] and sorted(grown.to_generate) == [14, 15]


def test_the_same_weights_under_another_model_name_give_that_name_its_set(con, tmp_path, pipe, one_thread):
    """A review: `priors --model tiny` then `--model <the tiny folder>` (a Hub id and its local snapshot) made
    byte-identical images that kept their first rows: the second name never had a set, and its DreamBooth run failed
    with "No class-prior images" after generating them."""
    first = _generate(con, pipe, tmp_path / "priors", num_images=2)
    second = _generate(con, pipe, tmp_path / "priors", num_images=2, model_name=str(tmp_path / "tiny-snapshot"))
    assert second.generated == 2 and sorted(second.image_ids) == sorted(first.image_ids)  # the same bytes
    assert {m for (m,) in con.execute("SELECT model FROM class_priors").fetchall()} == {str(tmp_path / "tiny-snapshot")}


def test_concepts_of_one_class_share_one_prior_set_sized_by_all_their_images(con, tmp_path):
    from pipelines.concepts import added_concept
    from pipelines.priors import prior_jobs

    paths = ingest_images(con, tmp_path / "instances", 3)
    added_concept(con, "sks dog", trigger="sks", class_noun="dog", where=f"path = '{paths[0]}'")
    added_concept(con, "abc dog", trigger="abc", class_noun="dog", where=f"path IN ('{paths[1]}', '{paths[2]}')")
    assert prior_jobs(con, max_images=1000) == [("a photo of a dog", 600, None)]  # not two sets of the same pictures
    assert prior_jobs(con, class_prompt="a photo of a cat", num_images=5) == [("a photo of a cat", 5, None)]
    # a review: `--class-prompt` of a concept's class was sized by every instance image, cats included
    ingest_images(con, tmp_path / "cats", 2, sizes=[(40, 40)])
    added_concept(con, "wbk cat", trigger="wbk", class_noun="cat", where="concept IS NULL")
    assert prior_jobs(con, class_prompt="a photo of a dog") == [("a photo of a dog", 600, None)]
    assert prior_jobs(con, class_prompt="a photo of a cat") == [("a photo of a cat", 400, "wbk cat")]
    assert prior_jobs(con, class_prompt="a painting") == [("a painting", 1000, None)]  # of no concept: every image
    for bad in ("", "   "):
        with pytest.raises(ValueError, match="class prompt is empty"):
            prior_jobs(con, class_prompt=bad)


# --- a prior set is (prompt, model, how its images are made) ------------------------------------------------------


def _cli(*args):
    return CliRunner().invoke(app, ["priors", *map(str, args)])


def _stop_before_adding(monkeypatch):
    """The next `workbench priors` stops after sampling, before adding: its PNGs stay on disk, not in the catalog
    (as a run stopped by Ctrl+C, SIGTERM or `timeout` leaves them)."""
    import pipelines.priors

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipelines.priors, "ingested_priors", stop)


def _training_pipe():
    """The pipeline `train dreambooth` makes its missing priors with: DDIM on the model's own noise schedule."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from pipelines.train.loop import inference_scheduler
    from train_fixtures import tiny_components

    parts = tiny_components()
    pipeline = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=inference_scheduler(DDIMScheduler, parts.noise_scheduler), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _seeds_used(con, train_id):
    return sorted(s for (s,) in con.execute(
        "SELECT c.seed FROM class_priors c WHERE c.image_id IN (SELECT unnest(class_image_ids) FROM training_runs WHERE train_id = ?)",
        [train_id]).fetchall())


def _dreambooth_after_32px_priors(con, tmp_path, *, instances: int, **options):
    """(result, progress messages) of a one-step DreamBooth run after two 32 px, 1-step priors of its class were made."""
    from pipelines.priors import class_priors
    from pipelines.train import trained_model
    from train_fixtures import fast_config, tiny_components

    ingest_images(con, tmp_path / "images", instances, sizes=[(32, 32)])
    class_priors(con, _training_pipe(), class_prompt="a photo of a square", model_name="tiny", out_dir=tmp_path / "project" / "class_priors",
                 num_images=2, resolution=32, num_inference_steps=1)
    messages = []
    config = fast_config(tmp_path / "db", mode="dreambooth", class_prompt="a photo of a square", prior_inference_steps=1,
                         max_train_steps=1, num_validation_images=0, **options)
    result = trained_model(con, config, components=tiny_components(), progress=lambda **kw: messages.append(kw.get("message") or ""))
    return result, messages


def test_dreambooth_prior_seeds_do_not_follow_the_training_seed(con, tmp_path, one_thread):
    """`train dreambooth --seed 50` with seeds 0-1 made said "0 of 3 exist; generating 3", made 50-52 and trained on
    0, 1 and 50: the training seed was the set's first seed."""
    result, messages = _dreambooth_after_32px_priors(con, tmp_path, instances=2, num_class_images=3, seed=50)
    assert "2 of 3 class images for 'a photo of a square' (32 px, 1 step) by tiny exist; generating 1" in messages
    assert _seeds_used(con, result.train_id) == [0, 1, 2]


def test_png_files_of_other_settings_are_never_ingested(catalog_path, tmp_path, monkeypatch, one_thread):
    """A `priors --steps 1` stopped before adding left 1-step PNGs; a later `priors --steps 2` (same prompt and
    model) ingested them as its own ("ingested from disk 2") without a word."""
    from workbench.catalog import connect

    connect(catalog_path).close()
    common = ["--class-prompt", "a photo of a dog", "--num", 2, "--resolution", 32, "--out-dir", tmp_path / "p",
              "--catalog", catalog_path, "--device", "cpu"]
    with monkeypatch.context() as patch:
        _stop_before_adding(patch)
        assert _cli(*common, "--steps", 1).exit_code == 130
    result = _cli(*common, "--steps", 2)
    assert result.exit_code == 0, result.output
    assert re.search(r"ingested from disk\W+0\W", result.output) and re.search(r"generated\W+2\W", result.output), result.output
    con = connect(catalog_path)
    try:
        assert con.execute("SELECT list(steps ORDER BY seed) FROM class_priors").fetchone()[0] == [2, 2]
    finally:
        con.close()
    assert len(list((tmp_path / "p").glob("*/*.png"))) == 4  # two sets, two folders


def test_dreambooth_makes_its_own_set_at_its_resolution(con, tmp_path, one_thread):
    """Priors made at 32 px were taken by a 64 px run (upscaled, with a warning whose advice made more of the same)."""
    result, messages = _dreambooth_after_32px_priors(con, tmp_path, instances=1, num_class_images=2, resolution=64)
    (made,) = [m for m in messages if m.startswith("0 of 2 class images for 'a photo of a square' (64 px, 1 step) by tiny exist; generating 2")]
    assert "(other sets of this prompt and model, not used: 2 at 32 px, 1 step;" in made  # the 32 px set, said
    assert not any("smaller than" in m for m in messages)
    sizes = con.execute("SELECT list(DISTINCT i.width) FROM images i WHERE image_id IN "
                        "(SELECT unnest(class_image_ids) FROM training_runs WHERE train_id = ?)", [result.train_id]).fetchone()[0]
    assert sizes == [64]


def test_priors_from_before_settings_were_recorded_still_count_and_the_advice_for_small_ones_works(con, tmp_path, one_thread):
    """Rows from before m010 (settings NULL) count for every set of their prompt and model, so upgrading regenerates
    nothing; one smaller than the run is named with the command that has it made anew at the run's size."""
    from PIL import Image

    from pipelines.filter import manual_exclusions
    from pipelines.priors import ingested_priors, prior_plan
    from pipelines.train import trained_model
    from pipelines.train.data import class_prior_images
    from train_fixtures import fast_config, tiny_components

    ingest_images(con, tmp_path / "images", 1, sizes=[(32, 32)])
    old = prior_plan(con, class_prompt="a photo of a square", model_name="tiny", out_dir=tmp_path / "project" / "class_priors", num_images=2)
    for shade, path in enumerate(old.to_generate.values()):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (shade * 90, 80, 80)).save(path)
    ingested_priors(con, old, dict(old.to_generate))
    legacy = [i for (i,) in con.execute("SELECT image_id FROM class_priors ORDER BY seed").fetchall()]

    config = fast_config(tmp_path / "db", mode="dreambooth", class_prompt="a photo of a square", num_class_images=2, resolution=64,
                         prior_inference_steps=1, max_train_steps=1, num_validation_images=0)
    messages = []
    pools = class_prior_images(con, config, {"a photo of a square": 2}, "tiny", progress=lambda **kw: messages.append(kw.get("message") or ""))
    assert [p.image_id for p in pools["a photo of a square"]] == legacy  # counted: not made again on upgrade
    advice = [m for m in messages if "smaller than 64 px" in m]
    assert advice and f"workbench exclude {legacy[0][:12]} {legacy[1][:12]}" in advice[0], messages

    manual_exclusions(con, legacy, "smaller than 64 px")  # what the advice says; then the run makes them anew at 64 px
    result = trained_model(con, config, components=tiny_components())
    sizes = con.execute("SELECT list(i.width) FROM images i WHERE image_id IN "
                        "(SELECT unnest(class_image_ids) FROM training_runs WHERE train_id = ?)", [result.train_id]).fetchone()[0]
    assert sizes == [64, 64]


def test_a_catalog_from_before_m010_gets_the_settings_columns(catalog_path):
    from workbench.catalog import connect

    con = connect(catalog_path)
    con.execute("INSERT INTO class_priors (image_id, class_prompt, seed, model) VALUES ('x', 'a photo of a dog', 0, 'tiny')")
    for column in ("resolution", "steps", "guidance_scale", "sampler"):
        con.execute(f"ALTER TABLE class_priors DROP COLUMN {column}")
    con.execute("DELETE FROM schema_migrations WHERE version = 10")
    con.close()
    con = connect(catalog_path)
    try:
        assert con.execute("SELECT resolution, steps, guidance_scale, sampler FROM class_priors").fetchall() == [(None,) * 4]
    finally:
        con.close()


def test_the_priors_command_samples_as_training_does(catalog_path, tmp_path, one_thread):
    """`workbench priors` sampled with the model's own scheduler (DDPM for tiny), training with DDIM: one set, two ways."""
    from workbench.catalog import connect

    connect(catalog_path).close()
    result = _cli("--class-prompt", "a photo of a dog", "--num", 1, "--steps", 2, "--resolution", 32, "--out-dir", tmp_path / "p",
                  "--catalog", catalog_path, "--device", "cpu")
    assert result.exit_code == 0, result.output
    (made,) = list((tmp_path / "p").glob("*/*.png"))
    same = _training_pipe()(["a photo of a dog"], num_inference_steps=2, height=32, width=32,
                            generator=[torch.Generator().manual_seed(0)]).images[0]
    with Image.open(made) as image:
        assert np.abs(np.asarray(image, np.int16) - np.asarray(same, np.int16)).max() <= 1
    con = connect(catalog_path)
    try:
        assert con.execute("SELECT resolution, steps, guidance_scale, sampler FROM class_priors").fetchall() == [(32, 2, 7.5, "DDIMScheduler")]
    finally:
        con.close()


def test_the_tui_step_makes_the_set_training_uses(con, tmp_path, one_thread):
    """The Pipeline screen's priors step sampled with the model's own scheduler too (DDPM for tiny)."""
    from pipelines.train.data import class_prior_images
    from train_fixtures import fast_config
    from tui.steps import run_priors

    ingest_images(con, tmp_path / "instances", 1)
    settings = {"class_prompt": "a photo of a dog", "num": 1, "model": "tiny", "steps": 1, "resolution": 32}
    assert run_priors(con, settings, lambda **kw: None, tmp_path / "project")["generated"] == 1
    assert con.execute("SELECT resolution, steps, sampler FROM class_priors").fetchall() == [(32, 1, "DDIMScheduler")]
    config = fast_config(tmp_path / "db", mode="dreambooth", class_prompt="a photo of a dog", num_class_images=1, prior_inference_steps=1)
    assert len(class_prior_images(con, config, {"a photo of a dog": 1}, "tiny")["a photo of a dog"]) == 1


@pytest.fixture
def no_model_loads(monkeypatch):
    """A model load fails the test: what is refused must be refused before minutes of loading."""
    import workbench.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    for name in ("load_sd_pipeline", "load_sd_components"):
        monkeypatch.setattr(workbench.models, name, refuse)


@pytest.mark.parametrize("options,message", [
    (["--resolution", 63], "--resolution must be a positive multiple of 8 (got 63)"),
    (["--max-images", 0], "--max-images must be at least 1"),
    (["--num", 0], "number of class images must be at least 1"),
    (["--seed", -1], "--seed must be between 0 and 4294967295 (got -1)"),  # a set then "started" at -1
    (["--out-dir", "FILE"], "is a file, not a folder"),  # a NotADirectoryError traceback once it had images to make
])
def test_bad_priors_options_are_refused_before_the_model_loads(con, catalog_path, tmp_path, no_model_loads, options, message):
    """--resolution 63 failed in diffusers after the model loaded; --max-images 0 silently became 1."""
    ingest_images(con, tmp_path / "instances", 1)
    con.close()
    (tmp_path / "a-file").write_text("z")
    options = [tmp_path / "a-file" if option == "FILE" else option for option in options]
    out_dir = [] if "--out-dir" in options else ["--out-dir", tmp_path / "p"]
    result = _cli("--class-prompt", "a photo of a dog", *options, *out_dir, "--catalog", catalog_path)
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_a_resumed_priors_run_starts_its_progress_at_what_exists(catalog_path, tmp_path, monkeypatch, one_thread):
    """16 of 40 made (4 in the catalog, 12 on disk): the bar started at 4/40."""
    import pipelines.priors
    from workbench.catalog import connect

    connect(catalog_path).close()
    common = ["--class-prompt", "a photo of a dog", "--steps", 1, "--resolution", 32, "--out-dir", tmp_path / "p",
              "--catalog", catalog_path, "--device", "cpu"]
    assert _cli(*common, "--num", 1).exit_code == 0
    with monkeypatch.context() as patch:
        _stop_before_adding(patch)
        assert _cli(*common, "--num", 3).exit_code == 130  # seeds 1 and 2 on disk, not in the catalog
    real, seen = pipelines.priors.generated_prior_files, []

    def recorded(pipeline, plan, **kwargs):
        inner = kwargs["progress"]

        def hook(**update):
            seen.append(update)
            inner(**update)

        return real(pipeline, plan, **{**kwargs, "progress": hook})

    monkeypatch.setattr(pipelines.priors, "generated_prior_files", recorded)
    result = _cli(*common, "--num", 4)
    assert result.exit_code == 0, result.output
    assert (seen[0]["completed"], seen[0]["total"]) == (3, 4) and seen[-1]["completed"] == 4


def test_priors_refuses_a_missing_catalog(tmp_path, no_model_loads):
    """A mistyped --catalog started a new, empty catalog in silence (`train` refuses it)."""
    typo = tmp_path / "typo" / "path.duckdb"
    result = _cli("--class-prompt", "a photo of a dog", "--num", 1, "--catalog", typo)
    assert result.exit_code == 2 and "No catalog at" in result.output and "workbench ingest FOLDER" in result.output, result.output
    assert not typo.exists()


def test_a_class_noun_with_a_vowel_gets_an(con, tmp_path):
    from pipelines.concepts import added_concept
    from pipelines.priors import class_prompts_by_concept, prior_jobs

    paths = ingest_images(con, tmp_path / "instances", 3)
    for i, (name, noun) in enumerate((("sks elephant", "elephant"), ("abc dog", "dog"), ("xyz owl", "Owl"))):
        added_concept(con, name, trigger=name.split()[0], class_noun=noun, where=f"path = '{paths[i]}'")
    assert class_prompts_by_concept(con) == {"abc dog": "a photo of a dog", "sks elephant": "a photo of an elephant",
                                             "xyz owl": "a photo of an Owl"}
    assert ("a photo of an elephant", 200, "sks elephant") in prior_jobs(con)


def test_training_asks_for_the_class_prompt_that_priors_makes(con, tmp_path):
    from pipelines.concepts import added_concept
    from pipelines.priors import class_prompts_by_concept
    from pipelines.train.data import training_images
    from train_fixtures import fast_config

    paths = ingest_images(con, tmp_path / "instances", 1)
    added_concept(con, "sks elephant", trigger="sks", class_noun="elephant", where=f"path = '{paths[0]}'")
    (image,) = training_images(con, fast_config(tmp_path / "out", mode="dreambooth"))
    assert image.class_prompt == class_prompts_by_concept(con)["sks elephant"]


def test_sigterm_stops_priors_as_ctrl_c_does(catalog_path, tmp_path):
    """`kill` or `timeout` kept the PNGs but said nothing (Ctrl+C says where they are and to run again)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from workbench.catalog import connect

    connect(catalog_path).close()
    out = tmp_path / "p"
    command = [sys.executable, "-m", "workbench.cli", "priors", "--class-prompt", "a photo of a cat", "--num", "400",
               "--batch-size", "1", "--steps", "1", "--resolution", "32", "--out-dir", str(out), "--catalog", str(catalog_path),
               "--device", "cpu"]
    proc = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*/*-seed*.png")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert list(out.glob("*/*-seed*.png")), "no class image was made"
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    said = " ".join(output.split())
    assert proc.returncode == 143, output  # 128 + SIGTERM (Ctrl+C gives 130)
    assert "Stopped" in said and "class images made so far are in" in said and "run the same command again" in said, output


# --- class images you supply (`priors --from`, kohya reg/ folders) ------------------------


def _photos(folder, count: int, size=(40, 32), colour=0) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"photo{i}.png"
        Image.new("RGB", size, ((colour + 50 * i) % 256, 120, 200 - 30 * i)).save(path)
        paths.append(path)
    return paths


def test_supplied_class_images_join_as_class_priors_and_leave_training_photos_alone(con, tmp_path):
    from pipelines.priors import supplied_priors

    ingest_images(con, tmp_path / "instances", 2)
    reg = tmp_path / "reg" / "1_dog"
    _photos(reg, 3)
    (reg / "broken.jpg").write_bytes(b"not a picture")
    (reg / "photo0.txt").write_text("dog")  # a kohya caption: kept, not used (a class image trains with its prompt)
    twin = next((tmp_path / "instances").glob("*.png"))
    (reg / "twin.png").write_bytes(twin.read_bytes())  # the subject's own photo inside the class folder
    messages = []
    summary = supplied_priors(con, reg, class_prompt="a photo of a dog", progress=lambda **kw: messages.append(kw.get("message") or ""))
    assert (summary.files, summary.added, summary.unreadable, len(summary.training_photos)) == (5, 3, 1, 1)
    assert any("also training photos" in m and twin.name in m for m in messages)
    rows = con.execute("SELECT c.class_prompt, c.seed, c.model, c.supplied_from, i.role FROM class_priors c "
                       "JOIN images i USING (image_id)").fetchall()
    assert rows == [("a photo of a dog", None, None, str(reg), "class_prior")] * 3
    # a class image trains with its prompt, and the catalog says so, whatever caption file came with it
    assert con.execute("SELECT DISTINCT caption, caption_source FROM images_view WHERE role = 'class_prior'").fetchall() == [
        ("a photo of a dog", "class_prompt")]
    roles = dict(con.execute("SELECT role, count(*) FROM images WHERE status = 'ok' GROUP BY role").fetchall())
    assert roles == {"instance": 2, "class_prior": 3}  # the twin stays a training photo
    # `1_dog` read by ingest as a kohya concept folder: class images are in no concept, and the concept is gone
    assert con.execute("SELECT count(*) FROM concepts").fetchone()[0] == 0

    again = supplied_priors(con, reg, class_prompt="a photo of a dog")
    assert (again.added, again.already) == (0, 3)
    other = supplied_priors(con, reg, class_prompt="a photo of a cat")
    assert (other.added, len(other.other_class_images)) == (0, 3)


def test_training_takes_supplied_class_images_first_and_generates_only_what_is_missing(con, tmp_path, one_thread):
    from pipelines.priors import supplied_priors
    from pipelines.train import trained_model
    from train_fixtures import fast_config, tiny_components

    ingest_images(con, tmp_path / "images", 1, sizes=[(32, 32)])
    reg = tmp_path / "reg"
    _photos(reg, 2, size=(48, 32))
    supplied_priors(con, reg, class_prompt="a photo of a square")
    supplied = {r[0] for r in con.execute("SELECT image_id FROM class_priors").fetchall()}
    assert len(supplied) == 2
    messages = []

    def run(name, **options):
        config = fast_config(tmp_path / name, mode="dreambooth", class_prompt="a photo of a square", prior_inference_steps=1,
                             max_train_steps=1, num_validation_images=0, **options)
        return trained_model(con, config, components=tiny_components(), progress=lambda **kw: messages.append(kw.get("message") or ""))

    first = run("db1")  # the default count would be 200 per instance image: the supplied set is used as it is
    used = set(con.execute("SELECT class_image_ids FROM training_runs WHERE train_id = ?", [first.train_id]).fetchone()[0])
    assert used == supplied and "2 supplied class image(s) of 'a photo of a square'" in messages
    assert con.execute("SELECT count(*) FROM class_priors WHERE supplied_from IS NULL").fetchone()[0] == 0  # none generated
    second = run("db2", num_class_images=3)
    used = set(con.execute("SELECT class_image_ids FROM training_runs WHERE train_id = ?", [second.train_id]).fetchone()[0])
    generated = con.execute("SELECT list(seed) FROM class_priors WHERE supplied_from IS NULL").fetchone()[0]
    assert generated == [0] and supplied < used and len(used) == 3
    assert "2 supplied class image(s) of 'a photo of a square', and 1 generated" in messages


def test_priors_from_a_folder_on_the_command_line(catalog_path, tmp_path):
    from workbench.catalog import connect

    con = connect(catalog_path)
    con.execute("INSERT INTO concepts (name, trigger_token, class_noun) VALUES ('sks dog', 'sks', 'dog')")
    con.close()
    _photos(tmp_path / "reg" / "1_dog", 2)
    _photos(tmp_path / "plain", 1, colour=7)
    added = _cli("--from", tmp_path / "reg" / "1_dog", "--catalog", catalog_path)
    assert added.exit_code == 0 and "class images you supplied: a photo of a dog" in " ".join(added.output.split()), added.output
    assert "concept" not in added.output  # `1_dog` is read as no concept
    unnamed = _cli("--from", tmp_path / "plain", "--catalog", catalog_path)
    assert unnamed.exit_code == 2 and "--class-prompt" in unnamed.output
    mixed = _cli("--from", tmp_path / "plain", "--class-prompt", "a photo of a cat", "--num", 5, "--catalog", catalog_path)
    assert mixed.exit_code == 2 and "--num only set(s) how images are generated" in " ".join(mixed.output.split())
    named = _cli("--from", tmp_path / "plain", "--class-prompt", "a photo of a cat", "--catalog", catalog_path)
    assert named.exit_code == 0, named.output
    alone = _cli("--including-training-photos", "--class-prompt", "x", "--catalog", catalog_path)
    assert alone.exit_code == 2 and "goes with --from FOLDER" in alone.output
    missing = _cli("--from", tmp_path / "nowhere", "--class-prompt", "x", "--catalog", catalog_path)
    assert missing.exit_code == 2 and "is not a folder" in " ".join(missing.output.split())
    generated = _cli("--class-prompt", "a photo of a dog", "--num", 1, "--resolution", 32, "--steps", 1,
                     "--out-dir", tmp_path / "p", "--catalog", catalog_path, "--device", "cpu")
    assert generated.exit_code == 0 and "2 class image(s) you supplied serve 'a photo of a dog'" in " ".join(generated.output.split())
    con = connect(catalog_path)
    try:
        assert dict(con.execute("SELECT class_prompt, count(*) FROM class_priors WHERE supplied_from IS NOT NULL GROUP BY 1").fetchall()) == {
            "a photo of a dog": 2, "a photo of a cat": 1}
    finally:
        con.close()
    # a review: the parent reg/ of kohya class folders took the cats as dog priors; a reg folder's captions and
    # repeats were dropped without a word
    _photos(tmp_path / "reg" / "1_cat", 1, colour=40)
    parent = _cli("--from", tmp_path / "reg", "--class-prompt", "a photo of a dog", "--catalog", catalog_path)
    said = " ".join(parent.output.split())
    assert parent.exit_code == 2 and "holds kohya class folders (1_cat, 1_dog), each a class of its own" in said, said
    _photos(tmp_path / "reg2" / "10_dog", 1, colour=90)
    (next((tmp_path / "reg2" / "10_dog").iterdir())).with_suffix(".txt").write_text("a dog lying on grass\n")
    noted = _cli("--from", tmp_path / "reg2" / "10_dog", "--catalog", catalog_path)
    said = " ".join(noted.output.split())
    assert noted.exit_code == 0 and "repeat count (10) is not used" in said and "1 caption file(s)" in said, said


def test_the_class_prompt_of_a_kohya_regularisation_folder(con, tmp_path):
    from pipelines.priors import class_prompt_of_folder

    con.execute("INSERT INTO concepts (name, trigger_token, class_noun) VALUES ('sks elephant', 'sks', 'elephant')")
    assert class_prompt_of_folder(con, tmp_path / "1_elephant") == "a photo of an elephant"  # the concept's own
    assert class_prompt_of_folder(con, tmp_path / "1_a photo of an elephant") == "a photo of an elephant"
    assert class_prompt_of_folder(con, tmp_path / "1_woman") == "a photo of a woman"
    assert class_prompt_of_folder(con, tmp_path / "1_a photo of a cat") == "a photo of a cat"  # as `workbench export` names it
    assert class_prompt_of_folder(con, tmp_path / "woman") is None


def test_the_folder_of_the_training_photos_is_refused_untouched(con, tmp_path):
    """`priors --from data/dog` (the subject's own folder, given by mistake) made all 12 training photos class
    priors, emptied their concept and replaced their captions by the class prompt."""
    from pipelines.concepts import added_concept
    from pipelines.priors import supplied_priors

    ingest_images(con, tmp_path / "dog", 3)
    added_concept(con, "sks dog", trigger="sks", class_noun="dog", folder=str(tmp_path / "dog"))
    before = con.execute("SELECT image_id, role FROM images ORDER BY 1").fetchall()
    with pytest.raises(ValueError, match=r"holds 3 training photo\(s\).*concept 'sks dog'.*nothing was changed.*--including-training-photos"):
        supplied_priors(con, tmp_path / "dog", class_prompt="a photo of a dog")
    assert con.execute("SELECT image_id, role FROM images ORDER BY 1").fetchall() == before
    assert con.execute("SELECT count(*) FROM class_priors").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM concept_images WHERE concept = 'sks dog'").fetchone()[0] == 3
    # a kohya reg/ folder an ingest took as photos: asked for, its images become class images and leave the concept
    summary = supplied_priors(con, tmp_path / "dog", class_prompt="a photo of a dog", including_training_photos=True)
    assert summary.added == 3
    assert con.execute("SELECT count(*) FROM dataset WHERE role = 'instance'").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM concept_images").fetchone()[0] == 0


def test_show_batches_of_a_dreambooth_run_pairs_each_photo_with_a_class_image(con, tmp_path):
    """`train dreambooth --show-batches`: no model loads, the class images are the ones there are."""
    from pipelines.priors import supplied_priors
    from pipelines.train.run import planned_batches
    from train_fixtures import fast_config

    ingest_images(con, tmp_path / "images", 2, sizes=[(32, 32)])
    _photos(tmp_path / "reg", 3, size=(32, 32))
    supplied_priors(con, tmp_path / "reg", class_prompt="a photo of a square")
    config = fast_config(tmp_path / "db", mode="dreambooth", class_prompt="a photo of a square", train_batch_size=1)
    items = planned_batches(con, config, 2)
    assert [(item.step, item.pool) for item in items] == [(1, "instance"), (1, "a photo of a square"),
                                                          (2, "instance"), (2, "a photo of a square")]
    assert {item.caption for item in items if item.pool != "instance"} == {"a photo of a square"}
    assert all("reg" in item.path for item in items if item.pool != "instance")


def test_a_class_set_with_no_instance_images_to_size_it_is_skipped_and_said(catalog_path, tmp_path, no_model_loads):
    """A concept with no photos yet (and an empty dataset) made a set of 1 class image, without a word."""
    from pipelines.concepts import added_concept
    from workbench.catalog import connect

    con = connect(catalog_path)
    added_concept(con, "qrt bird", trigger="qrt", class_noun="bird")
    con.close()
    result = _cli("--catalog", catalog_path, "--out-dir", tmp_path / "p", "--steps", 1, "--resolution", 32)
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "skipped 'a photo of a bird'" in said and "concept 'qrt bird' has no instance images" in said, result.output
    given = _cli("--catalog", catalog_path, "--class-prompt", "a photo of a dog", "--out-dir", tmp_path / "p", "--steps", 1)
    assert given.exit_code == 2 and "the dataset has no instance images" in " ".join(given.output.split()) and "--num N" in given.output
    assert not (tmp_path / "p").exists()


def test_class_images_from_a_folder_named_in_bytes_that_are_not_utf8(con, tmp_path):
    """A code review: `priors --from caf<0xE9>` failed with a traceback (the name has no UTF-8 text form)."""
    import os

    from pipelines.priors import supplied_priors

    folder = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    os.makedirs(folder)
    with open(os.path.join(folder, b"a.png"), "wb") as file:
        Image.new("RGB", (40, 32), (5, 120, 200)).save(file, format="PNG")
    summary = supplied_priors(con, os.fsdecode(folder), class_prompt="a photo of a dog")
    assert summary.added == 1 and summary.folder.endswith("caf\\xe9")
    assert con.execute("SELECT supplied_from FROM class_priors").fetchall() == [(summary.folder,)]


def test_one_base_model_under_its_names_is_one_prior_set_and_other_models_sets_are_said(con, tmp_path):
    """A review: `sd15`, `sd15-large` and their Hub id (one Stable Diffusion 1.5) each generated a set of their own,
    hours of the same images with a real model, and each took the catalog rows of the one before; a set made by another
    model was left out without a word."""
    from pipelines.priors import PriorSettings, prior_model_names, prior_plan

    hub_id = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert prior_model_names("sd15") == prior_model_names("sd15-large") == prior_model_names(hub_id) == [hub_id, "sd15", "sd15-large"]
    assert prior_model_names("tiny") == ["tiny"]
    ingest_images(con, tmp_path / "images", 3)
    ids = [row[0] for row in con.execute("SELECT image_id FROM images ORDER BY image_id").fetchall()]
    settings = PriorSettings(512, 30, 7.5, "DDIMScheduler")
    for image_id, seed, model in ((ids[0], 0, "sd15"), (ids[1], 1, hub_id), (ids[2], 0, "tiny")):  # sd15: as older versions recorded it
        con.execute("INSERT INTO class_priors (image_id, class_prompt, seed, model, resolution, steps, guidance_scale, sampler) "
                    "VALUES (?, 'a photo of a dog', ?, ?, 512, 30, 7.5, 'DDIMScheduler')", [image_id, seed, model])
    for name in ("sd15", "sd15-large", hub_id):
        plan = prior_plan(con, class_prompt="a photo of a dog", model_name=name, out_dir=tmp_path / "priors", settings=settings, num_images=3)
        assert (plan.model_name, plan.existing, sorted(plan.to_generate)) == (hub_id, 2, [2]), name
        assert plan.other_models == [("tiny", 1)]
    # a PNG an interrupted run of an older version left in the folder of the name it recorded is found, not made again
    from pipelines.priors import prior_folder, prompt_slug

    older = prior_folder(tmp_path / "priors", "a photo of a dog", "sd15", settings)
    older.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(older / f"{prompt_slug('a photo of a dog')}-seed0000002.png")
    found = prior_plan(con, class_prompt="a photo of a dog", model_name="sd15-large", out_dir=tmp_path / "priors", settings=settings, num_images=3)
    assert found.to_generate == {} and found.on_disk == {2: older / f"{prompt_slug('a photo of a dog')}-seed0000002.png"}
    said = []
    made = generated_prior_files_said(plan, said)
    assert made and f"2 of 3 class images for 'a photo of a dog' (512 px, 30 steps) by {hub_id} exist" in said[0]
    assert "made by other base models, which a set never mixes in: 1 by tiny" in said[0]


def generated_prior_files_said(plan, said):
    """What generating the plan says first (the pipeline stops it there: no model is needed to see the message)."""
    from pipelines.priors import generated_prior_files

    class Stop(Exception):
        pass

    class Pipeline:
        class DDIMScheduler:
            pass

        scheduler = DDIMScheduler()

        def __call__(self, *args, **kwargs):
            raise Stop

    try:
        generated_prior_files(Pipeline(), plan, progress=lambda **kw: said.append(kw.get("message") or ""))
    except Stop:
        return True
    return False


def test_a_set_recorded_under_two_names_of_one_model_trains_each_seed_once(con, tmp_path):
    """A code review: sets made alike under `sd15` and `sd15-large` (older versions kept them apart) are one set now,
    and both held a seed 0: training took both seed-0 images and half the seeds it asked for."""
    from pipelines.priors import training_prior_settings
    from pipelines.train.data import class_prior_images
    from train_fixtures import fast_config

    config = fast_config(tmp_path / "run", resolution=32)
    settings = training_prior_settings(config)
    ingest_images(con, tmp_path / "images", 3, sizes=[(32, 32)])
    ids = [row[0] for row in con.execute("SELECT image_id FROM images ORDER BY image_id").fetchall()]
    con.execute("UPDATE images SET role = 'class_prior'")
    for image_id, seed, model in ((ids[0], 0, "sd15"), (ids[1], 0, "sd15-large"), (ids[2], 1, "sd15")):
        con.execute("INSERT INTO class_priors (image_id, class_prompt, seed, model, resolution, steps, guidance_scale, sampler) "
                    "VALUES (?, 'a photo of a dog', ?, ?, ?, ?, ?, ?)",
                    [image_id, seed, model, settings.resolution, settings.steps, settings.guidance_scale, settings.sampler])
    pools = class_prior_images(con, config, {"a photo of a dog": 2}, "sd15-large")
    assert [image.image_id for image in pools["a photo of a dog"]] == [ids[0], ids[2]]  # seeds 0 and 1, one each
