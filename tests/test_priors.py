"""DreamBooth class-prior generation (issue 4): fixed per-image seeds, ingest as class_prior, resumable."""

from __future__ import annotations

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


def test_default_count_follows_the_dreambooth_recipe(con, tmp_path):
    ingest_images(con, tmp_path / "instances", 3)
    assert default_prior_count(con, max_images=1000) == 600  # 200 x 3 instance images
    assert default_prior_count(con, max_images=250) == 250  # capped


def test_priors_cli(catalog_path, tmp_path, one_thread):
    runner = CliRunner()
    result = runner.invoke(app, ["priors", "--class-prompt", "a photo of a cat", "--num", "2", "--steps", "2", "--resolution", "32",
                                 "--out-dir", str(tmp_path / "p"), "--catalog", str(catalog_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "p").glob("a-photo-of-a-cat-*/*.png"))) == 2
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
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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


def test_concepts_of_one_class_share_one_prior_set_sized_by_all_their_images(con, tmp_path):
    from pipelines.concepts import added_concept
    from pipelines.priors import prior_jobs

    paths = ingest_images(con, tmp_path / "instances", 3)
    added_concept(con, "sks dog", trigger="sks", class_noun="dog", where=f"path = '{paths[0]}'")
    added_concept(con, "abc dog", trigger="abc", class_noun="dog", where=f"path IN ('{paths[1]}', '{paths[2]}')")
    assert prior_jobs(con, max_images=1000) == [("a photo of a dog", 600, None)]  # not two sets of the same pictures
    assert prior_jobs(con, class_prompt="a photo of a cat", num_images=5) == [("a photo of a cat", 5, None)]
    for bad in ("", "   "):
        with pytest.raises(ValueError, match="class prompt is empty"):
            prior_jobs(con, class_prompt=bad)
