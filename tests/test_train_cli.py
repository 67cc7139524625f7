"""`workbench train|evaluate` end to end, and the dreambooth / finetune modes (issue 4)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil

import duckdb
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from train_fixtures import fast_config, ingest_images, one_thread, tiny_components, write_images  # noqa: F401
from workbench.cli import app
from workbench.models import component_path

pytestmark = pytest.mark.slow
runner = CliRunner()


def save_random_inception_weights(path, monkeypatch) -> None:
    """torch-fidelity's Inception v3 with random weights (seed 0), saved as a plain state dict: the file FID loads."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    class Unloaded(inception.FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # keep the random init; the real file is not on this machine
            return None

    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(Unloaded("inception-v3-compat", ["2048"]).state_dict(), path)


def test_train_lora_cli_end_to_end_on_the_sample_photos(sample_copy, catalog_path, tmp_path, one_thread, monkeypatch):
    """The README demo's last step: both LoRA files, a sample grid, a loss curve, the run in the catalog; then FID."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights there yet
    monkeypatch.delenv("WORKBENCH_INCEPTION_WEIGHTS", raising=False)
    assert runner.invoke(app, ["ingest", str(sample_copy / "photos"), "--catalog", str(catalog_path), "--workers", "1"]).exit_code == 0
    config = tmp_path / "train.toml"
    config.write_text(
        "[train]\nmax-train-steps = 4\nvalidation-steps = 2\nvalidation_inference_steps = 1\nnum_validation_images = 2\n"
        f"cache_dir = '{tmp_path / 'cache'}'\n"
    )
    out = tmp_path / "lora-run"
    result = runner.invoke(app, [
        "train", "lora", "--config", str(config), "--catalog", str(catalog_path), "--model", "tiny", "--resolution", "64",
        "--train-batch-size", "2", "--learning-rate", "1e-3", "--rank", "4", "--seed", "1", "--checkpointing-steps", "2",
        "--validation-prompt", "a photo of a rocket", "--output-dir", str(out), "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    assert "trained the tiny preset (random weights" in " ".join(result.output.split())  # the default: said
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "loss.csv", "loss.png",
                 "samples/step-000002.png", "samples/final-step-000004.png", "checkpoints/checkpoint-4/weights.safetensors"):
        assert (out / name).is_file(), name
    assert list((out / "logs").rglob("events.out.tfevents*")), "TensorBoard events"
    with Image.open(out / "samples" / "final-step-000004.png") as grid:
        assert grid.size == (2 * 64, 64)  # 1 prompt x 2 fixed seeds
    assert len((out / "loss.csv").read_text().splitlines()) == 1 + 4
    assert b"\r" not in (out / "loss.csv").read_bytes()
    from workbench.files import current_umask as _umask

    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):  # safetensors alone writes 0600
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~_umask(), name

    from workbench.catalog import connect

    con = connect(catalog_path)
    row = con.execute("SELECT mode, status, steps, final_loss, len(image_ids), outputs, clip_score, cmmd, metrics FROM training_runs").fetchone()
    instance_count = con.execute("SELECT count(*) FROM dataset WHERE role = 'instance'").fetchone()[0]
    step = con.execute("SELECT status FROM runs WHERE step = 'train:lora'").fetchone()
    con.close()
    mode, status, steps, final_loss, image_count, outputs, clip_score, cmmd, metrics = row
    assert (mode, status, steps, image_count) == ("lora", "ok", 4, instance_count)
    assert final_loss > 0 and json.loads(outputs)["lora_kohya"].endswith("lora_kohya.safetensors")
    assert clip_score is not None and cmmd is not None  # evaluated with the run
    assert step == ("ok",)

    assert "Inception weights" in json.loads(metrics)["fid_skipped"]  # none on this machine: skipped, CMMD stands

    # with Inception weights in the torch hub cache, `workbench evaluate` adds FID through torchmetrics
    from pipelines.train.evaluate import INCEPTION_WEIGHTS_FILE

    save_random_inception_weights(tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE, monkeypatch)
    again = runner.invoke(app, ["evaluate", "latest", "--catalog", str(catalog_path), "--device", "cpu"])
    assert again.exit_code == 0, again.output
    assert "clip score" in again.output and "fid" in again.output
    con = connect(catalog_path)
    fid, metrics = con.execute("SELECT fid, metrics FROM training_runs").fetchone()
    con.close()
    assert fid is not None and fid >= 0 and json.loads(metrics)["fid"] == fid
    assert "fid_skipped" not in json.loads(metrics)
    # a run is also named by its output folder (it was refused: "RUN must be a training run id")
    by_folder = runner.invoke(app, ["evaluate", str(out), "--catalog", str(catalog_path), "--device", "cpu"])
    assert by_folder.exit_code == 0 and "evaluation of run 1" in by_folder.output, by_folder.output
    # each evaluation stays in `evaluations` (a second one overwrote the first in training_runs, the only record)
    con = connect(catalog_path)
    kept = con.execute("SELECT train_id, clip_model, clip_score, fid IS NOT NULL FROM evaluations ORDER BY evaluation_id").fetchall()
    newest = con.execute("SELECT clip_score FROM training_runs WHERE train_id = 1").fetchall()
    con.close()
    assert [(train_id, model, has_fid) for train_id, model, _, has_fid in kept] == [(1, "tiny", False), (1, "tiny", True), (1, "tiny", True)]
    assert newest == [(kept[-1][2],)] and kept[0][2] == clip_score
    elsewhere = runner.invoke(app, ["evaluate", str(tmp_path), "--catalog", str(catalog_path)])
    assert elsewhere.exit_code == 2 and "No finished training run in" in elsewhere.output


def test_fid_refuses_weights_that_are_not_plain_tensors(tmp_path, monkeypatch):
    """The Inception file is unpickled in full by torch-fidelity, so it must pass the restricted unpickler first."""
    from pipelines.train.evaluate import fid, inception_weights

    monkeypatch.setenv("WORKBENCH_INCEPTION_WEIGHTS", str(tmp_path / "absent.pth"))
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        inception_weights()
    rogue = tmp_path / "rogue.pth"
    torch.save({"fc.weight": torch.zeros(1), "payload": Image.new("RGB", (1, 1))}, rogue)
    monkeypatch.setenv("WORKBENCH_INCEPTION_WEIGHTS", str(rogue))
    assert inception_weights() == rogue
    images = [Image.new("RGB", (8, 8))] * 2
    with pytest.raises(ValueError, match="not a plain tensor state dict"):
        fid(images, images, rogue)


def test_train_cli_refuses_bad_options_without_a_traceback(catalog_path, tmp_path):
    missing = runner.invoke(app, ["train", "lora", "--catalog", str(catalog_path)])
    assert missing.exit_code == 2 and "No catalog at" in " ".join(missing.output.split())
    from workbench.catalog import connect

    connect(catalog_path).close()  # an empty catalog: the trainer itself must refuse it
    bad = runner.invoke(app, ["train", "lora", "--catalog", str(catalog_path), "--mixed-precision", "fp8"])
    assert bad.exit_code == 2 and "--mixed-precision must be no, fp16 or bf16" in bad.output
    empty = runner.invoke(app, ["train", "lora", "--catalog", str(catalog_path), "--set", "report_to=none",
                                "--output-dir", str(tmp_path / "refused")])
    assert empty.exit_code == 2 and "0 train images" in empty.output
    assert not (tmp_path / "refused").exists()  # a refused run leaves no folder behind
    nope = runner.invoke(app, ["train", "lora", "--catalog", str(catalog_path), "--concept", "nope"])
    assert nope.exit_code == 2 and "No concept named 'nope'" in " ".join(nope.output.split())
    typo = runner.invoke(app, ["train", "lora", "--catalog", str(catalog_path), "--set", "lerning_rate=1"])
    assert typo.exit_code == 2 and "Unknown training option 'lerning_rate'" in typo.output
    resume = runner.invoke(app, ["train", "lora", "--catalog", str(catalog_path), "--resume", "latest"])
    assert resume.exit_code == 2 and "--output-dir" in resume.output
    typed = runner.invoke(app, ["train", "lora", "--catalog", str(catalog_path), "--set", "rank=abc", "--set", "resolution=[64]"])
    assert typed.exit_code == 2
    assert "rank must be int, got 'abc'" in typed.output and "resolution must be int, got [64]" in typed.output
    device = runner.invoke(app, ["train", "lora", "--catalog", str(catalog_path), "--device", "tpu"])
    assert device.exit_code == 2 and "--device must be one of cpu, cuda, mps" in device.output
    import torch

    if not torch.cuda.is_available():  # accelerate would train on the CPU and the run would say cuda
        cuda = runner.invoke(app, ["train", "lora", "--catalog", str(catalog_path), "--device", "cuda"])
        assert cuda.exit_code == 2 and "no CUDA GPU is available" in " ".join(cuda.output.split())


def test_an_output_dir_that_cannot_be_written_is_said_without_a_traceback(catalog_path, tmp_path):
    """A read-only or impossible --output-dir ended in a rich traceback from mark_output_folder."""
    from workbench.catalog import connect

    con = connect(catalog_path)
    ingest_images(con, tmp_path / "imgs", 2)
    con.close()
    (tmp_path / "blocker").write_text("a file, not a folder")
    result = runner.invoke(app, ["train", "lora", "--catalog", str(catalog_path), "--resolution", "32", "--max-train-steps", "1",
                                 "--output-dir", str(tmp_path / "blocker" / "run")])
    assert result.exit_code == 2 and "Not a directory" in result.output and "Traceback" not in result.output, result.output


def test_a_full_disk_while_checkpointing_names_the_last_checkpoint_and_leaves_no_half_written_one(catalog_path, tmp_path, monkeypatch, one_thread):
    """safetensors' "No space left on device" ended in a traceback, and the half-written `.checkpoint-N.tmp` stayed,
    holding the space that was short."""
    import pipelines.train.checkpoint as checkpoint_module
    from workbench.catalog import connect
    from workbench.files import is_disk_full as _disk_full

    con = connect(catalog_path)
    ingest_images(con, tmp_path / "imgs", 2)
    con.close()
    real, calls = checkpoint_module.save_file, []

    def full_on_the_second_checkpoint(tensors, path, *args, **kwargs):
        if path.endswith("weights.safetensors"):
            calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", full_on_the_second_checkpoint)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "lora", "--catalog", str(catalog_path), "--resolution", "32", "--max-train-steps", "3",
                                 "--checkpointing-steps", "1", "--output-dir", str(out), "--set", "num_validation_images=0",
                                 "--set", "report_to='none'", "--set", f"cache_dir='{tmp_path / 'cache'}'"])
    said = " ".join(result.output.split())
    # status 1, as every command says a full disk (a review: train said it as bad input, 2)
    assert result.exit_code == 1 and "No space left on device" in said and "What was written before is kept" in said, result.output
    assert "The last checkpoint, checkpoint-1, is kept" in said and "--resume latest --output-dir" in said
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1"]  # no .checkpoint-2.tmp

    def read_only(tensors, path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(checkpoint_module, "save_file", read_only)
    ro = runner.invoke(app, ["train", "lora", "--catalog", str(catalog_path), "--resolution", "32", "--max-train-steps", "1",
                             "--output-dir", str(tmp_path / "ro"), "--set", "num_validation_images=0",
                             "--set", "report_to='none'", "--set", f"cache_dir='{tmp_path / 'cache'}'"])
    said = " ".join(ro.output.split())
    assert ro.exit_code == 1 and "Read-only file system" in said and "may not be read or written here" in said, ro.output
    assert _disk_full(OSError(28, "No space left on device")) and not _disk_full(ValueError("bad value"))
    try:  # DuckDB's error for its write-ahead log, raised inside another
        try:
            raise RuntimeError('TransactionException: Could not write file "c.duckdb.wal": No space left on device')
        except RuntimeError as inner:
            raise ValueError("the ingest failed") from inner
    except ValueError as outer:
        assert _disk_full(outer)


def test_resume_keeps_the_runs_options_and_a_run_folder_holds_one_run(sample_copy, catalog_path, tmp_path, monkeypatch, one_thread):
    """`--resume latest` continues with the options the checkpoint was written with (not the defaults); options
    that would make it another run are refused, and a new run never lands in an old run's folder."""
    from workbench.catalog import connect

    assert runner.invoke(app, ["ingest", str(sample_copy / "photos"), "--catalog", str(catalog_path), "--workers", "1"]).exit_code == 0
    monkeypatch.chdir(tmp_path)
    common = ["--catalog", str(catalog_path), "--output-dir", "runs/a", "--device", "cpu", "--set", "report_to='none'",
              "--set", "num_validation_images=0", "--set", f"cache_dir='{tmp_path / 'cache'}'"]
    first = runner.invoke(app, ["train", "lora", *common, "--model", "tiny", "--resolution", "64", "--train-batch-size", "2",
                                "--rank", "2", "--max-train-steps", "2", "--checkpointing-steps", "1"])
    assert first.exit_code == 0, first.output
    fp16 = runner.invoke(app, ["train", "lora", *common, "--output-dir", "runs/b", "--resolution", "64", "--mixed-precision", "fp16"])
    assert fp16.exit_code == 2 and "fp16 needs a CUDA GPU" in " ".join(fp16.output.split())

    again = runner.invoke(app, ["train", "lora", *common, "--resolution", "64"])
    assert again.exit_code == 2 and "already holds a training run" in " ".join(again.output.split())
    other_rank = runner.invoke(app, ["train", "lora", *common, "--resume", "latest", "--rank", "8"])
    assert other_rank.exit_code == 2 and "rank 2 (saved) vs 8" in " ".join(other_rank.output.split())
    other_mode = runner.invoke(app, ["train", "finetune", *common, "--resume", "latest"])
    assert other_mode.exit_code == 2 and "mode 'lora' (saved) vs 'finetune'" in " ".join(other_mode.output.split())

    resumed = runner.invoke(app, ["train", "lora", *common, "--resume", "latest", "--max-train-steps", "3"])
    assert resumed.exit_code == 0, resumed.output
    con = connect(catalog_path)
    runs = con.execute("SELECT status, steps, config, output_dir FROM training_runs WHERE status IN ('ok', 'continued') "
                       "ORDER BY train_id").fetchall()
    # the resumed run's seconds count the first session up to its checkpoint too (they were the last session's alone)
    whole = con.execute("SELECT seconds FROM training_runs WHERE status = 'ok'").fetchone()[0]
    session = con.execute("SELECT seconds FROM runs WHERE step = 'train:lora' ORDER BY run_id DESC LIMIT 1").fetchone()[0]
    con.close()
    # the first session's row is 'continued': its weights and samples are the second's now
    assert [(status, steps) for status, steps, _, _ in runs] == [("continued", 2), ("ok", 3)]
    assert whole > session
    saved, continued = (json.loads(config) for _, _, config, _ in runs)
    assert (continued["resolution"], continued["rank"], continued["train_batch_size"]) == (64, 2, 2)  # not the defaults
    assert continued["max_train_steps"] == 3 and saved["max_train_steps"] == 2
    assert runs[1][3] == str(tmp_path / "runs" / "a")  # stored absolute: `evaluate` works from any folder


def test_resume_before_the_first_checkpoint_keeps_the_runs_options_and_a_dead_runs_row_is_closed(con, catalog_path, tmp_path, one_thread):
    """A run ended before its first checkpoint (a stop keeps its step as one: killed, then) resumes with its own
    options (from dataset.json), not the defaults; a row left 'running' by a killed process becomes 'interrupted';
    a finished run is not redone; and --resume into a folder with no run says so instead of training a new default run."""
    from pipelines.train import trained_model

    ingest_images(con, tmp_path / "images", 2)
    out = tmp_path / "run"
    config = fast_config(out, max_train_steps=3, checkpointing_steps=10, num_validation_images=0, rank=2, learning_rate=5e-4)

    class Killed(BaseException):
        pass

    def killed_after_first_step(*, task, completed=0, total=None, message=None):
        if task == "train" and completed == 1:
            raise Killed

    with pytest.raises(Killed):
        trained_model(con, config, components=tiny_components(), progress=killed_after_first_step)
    assert con.execute("SELECT status, steps FROM training_runs").fetchall() == [("failed", 0)]
    con.execute("INSERT INTO training_runs (mode, model, status, output_dir) VALUES ('lora', 'tiny', 'running', ?)", [str(out)])  # a killed process
    # and one of an older workbench, which kept the folder as typed (relative): it stayed 'running' for ever
    con.execute("INSERT INTO training_runs (mode, model, status, output_dir) VALUES ('lora', 'tiny', 'running', ?)",
                [os.path.relpath(out)])

    common = ["--catalog", str(catalog_path), "--output-dir", str(out), "--resume", "latest"]
    resumed = runner.invoke(app, ["train", "lora", *common])
    assert resumed.exit_code == 0, resumed.output
    rows = con.execute("SELECT status, steps, config FROM training_runs ORDER BY train_id").fetchall()
    assert [r[:2] for r in rows] == [("failed", 0), ("interrupted", 0), ("interrupted", 0), ("ok", 3)]  # steps: where a resume starts
    options = json.loads(rows[3][2])
    assert (options["resolution"], options["rank"], options["learning_rate"], options["max_train_steps"]) == (32, 2, 5e-4, 3)

    again = runner.invoke(app, ["train", "lora", *common])  # a requeued job after the run finished: done, not failed
    assert again.exit_code == 0 and "Nothing to do" in again.output and "nothing to resume" in " ".join(again.output.split())
    # nothing to resume: a new run starts, said (a requeued job's script passes --resume latest every time, as with
    # diffusers' --resume_from_checkpoint latest)
    fresh = runner.invoke(app, ["train", "lora", "--catalog", str(catalog_path), "--output-dir", str(tmp_path / "fresh"),
                                "--resume", "latest", "--resolution", "32", "--max-train-steps", "2", "--set", "num_validation_images=0"])
    assert fresh.exit_code == 0 and "there is no run to resume in" in " ".join(fresh.output.split()), fresh.output
    assert (tmp_path / "fresh" / "pytorch_lora_weights.safetensors").is_file()


def test_ctrl_c_says_where_the_run_stopped_and_how_to_continue(sample_copy, catalog_path, tmp_path, monkeypatch):
    import pipelines.train

    assert runner.invoke(app, ["ingest", str(sample_copy / "photos"), "--catalog", str(catalog_path), "--workers", "1"]).exit_code == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-8"
    checkpoint.mkdir(parents=True)
    (tmp_path / "run" / "dataset.json").write_text("{}")  # written before training starts

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipelines.train, "trained_model", interrupted)
    monkeypatch.chdir(tmp_path)  # the hint works from anywhere: absolute paths, and the catalog named
    result = runner.invoke(app, ["train", "lora", "--catalog", str(catalog_path), "--output-dir", "elsewhere/../run"])
    assert result.exit_code == 130
    text = " ".join(result.output.split())
    assert "the last checkpoint is checkpoint-8" in text
    assert f"workbench train lora --resume latest --output-dir {tmp_path / 'run'} --catalog {catalog_path}" in text
    # stopped before training began (while class priors were made, say): --resume would find no run
    fresh = runner.invoke(app, ["train", "lora", "--catalog", str(catalog_path), "--output-dir", str(tmp_path / "fresh")])
    assert fresh.exit_code == 130 and "before training started" in fresh.output and "--resume" not in fresh.output


def test_dreambooth_generates_class_priors_and_writes_a_diffusers_pipeline(con, tmp_path, one_thread):
    from diffusers import StableDiffusionPipeline

    from pipelines.train import trained_model

    ingest_images(con, tmp_path / "images", 2, sizes=[(32, 32)])
    config = fast_config(tmp_path / "db", mode="dreambooth", class_prompt="a photo of a square", num_class_images=2,
                         prior_inference_steps=1, sample_batch_size=2, max_train_steps=2, prior_loss_weight=0.5)
    result = trained_model(con, config, components=tiny_components())
    priors = con.execute("SELECT count(*) FROM class_priors c JOIN images i USING (image_id) WHERE i.role = 'class_prior'").fetchone()[0]
    assert priors == 2
    class_ids = con.execute("SELECT len(class_image_ids), len(image_ids) FROM training_runs WHERE train_id = ?", [result.train_id]).fetchone()
    assert class_ids == (2, 2)  # priors are recorded apart from the instance images they do not join
    trained = con.execute("SELECT role, caption FROM training_images WHERE train_id = ? AND role = 'class_prior'",
                          [result.train_id]).fetchall()
    assert trained == [("class_prior", "a photo of a square")] * 2  # class images with their prompt, as trained
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "db" / "pipeline"))
    trained_unet = {k: v for k, v in pipe.unet.state_dict().items()}
    assert any(not torch.equal(v, tiny_components().unet.state_dict()[k]) for k, v in trained_unet.items())
    # the single file is in the original SD layout: `--model runs/…/model.safetensors` reads it back exactly,
    # offline, through diffusers' from_single_file with the pipeline folder beside it as the config
    from workbench.models import ModelNotAvailableError, load_sd_components

    single = load_sd_components(str(tmp_path / "db" / "model.safetensors"), device="cpu", dtype="float32")
    assert all(torch.equal(v, single.unet.state_dict()[k]) for k, v in trained_unet.items())
    # alone, without its config folder and offline, it is a clear error rather than a Hub traceback
    lone = tmp_path / "lone" / "model.safetensors"
    lone.parent.mkdir()
    lone.write_bytes((tmp_path / "db" / "model.safetensors").read_bytes())
    with pytest.raises(ModelNotAvailableError, match="config files.*model_index.json"):
        load_sd_components(str(lone), device="cpu", dtype="float32")


def test_lora_with_prior_preservation_is_dreambooth_lora(con, tmp_path, one_thread):
    """`train lora --prior-preservation` was refused ("no LoRA variant"): it is diffusers' train_dreambooth_lora.py
    recipe. Priors are generated and trained on; lora stays without them unless asked, finetune refuses them."""
    from pipelines.train import ConfigError, trained_model

    ingest_images(con, tmp_path / "images", 2, sizes=[(32, 32)])
    config = fast_config(tmp_path / "dbl", with_prior_preservation=True, class_prompt="a photo of a square", num_class_images=2,
                         prior_inference_steps=1, sample_batch_size=2, max_train_steps=2, num_validation_images=0)
    result = trained_model(con, config, components=tiny_components())
    assert result.class_images == 2 and (tmp_path / "dbl" / "pytorch_lora_weights.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "dbl" / "lora_kohya.safetensors"), "pt") as handle:
        assert handle.metadata()["ss_num_reg_images"] == "2"  # sd-scripts' count of regularisation (class) images
    import csv

    with (tmp_path / "dbl" / "loss.csv").open() as handle:  # the two parts of the loss, to tell them apart
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and all(float(r["loss"]) == pytest.approx(float(r["instance_loss"]) + float(r["prior_loss"]), rel=1e-5)
                                  for r in rows)
    assert con.execute("SELECT len(class_image_ids) FROM training_runs WHERE train_id = ?", [result.train_id]).fetchone()[0] == 2
    assert fast_config(tmp_path / "plain").with_prior_preservation is False
    with pytest.raises(ConfigError, match="not finetune"):
        fast_config(tmp_path / "ft", mode="finetune", with_prior_preservation=True)


def test_finetune_from_scratch_with_ema(con, tmp_path, one_thread):
    from safetensors.torch import load_file

    from pipelines.train import main
    from pipelines.train.data import training_images

    ingest_images(con, tmp_path / "images", 2, sizes=[(32, 32)])
    from safetensors import safe_open

    ingest_images(con, tmp_path / "images", 2, sizes=[(32, 32)])
    private = tmp_path / "home" / "someone" / "my-base"  # a local base model, named by path
    shutil.copytree(component_path("tiny", "sd"), private)
    config = fast_config(tmp_path / "ft", mode="finetune", from_scratch=True, use_ema=True, ema_decay=0.9,
                         max_train_steps=3, checkpointing_steps=3, model=str(private), prediction_type="v_prediction")
    components = tiny_components()
    base = {k: v.clone() for k, v in components.unet.state_dict().items()}
    result = main(config, training_images(con, config), output_dir=tmp_path / "ft", components=components)
    assert result.steps == 3
    assert (tmp_path / "ft" / "checkpoints" / "checkpoint-3" / "ema.safetensors").is_file()
    single = load_file(str(tmp_path / "ft" / "model.safetensors"))
    assert not torch.equal(single["model.diffusion_model.input_blocks.0.0.weight"], base["conv_in.weight"])  # from config, not the base
    # an output consumer's review: the file named its local base model by full path (a shared file leaked it), and
    # said nothing of the v-prediction it was trained for, so a UI sampled it as epsilon
    with safe_open(str(tmp_path / "ft" / "model.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["base_model"] == "my-base" and str(tmp_path) not in json.dumps(metadata)
    assert metadata["modelspec.prediction_type"] == "v" and metadata["modelspec.architecture"] == "stable-diffusion-v1"
    assert metadata["modelspec.title"] == "ft" and metadata["modelspec.resolution"] == "32x32" and metadata["layout"] == "ldm"


def test_an_ema_with_a_trained_text_encoder_says_what_the_saved_model_pairs(con, tmp_path, one_thread):
    """A fine-tune review: with --use-ema --train-text-encoder the saved model paired the EMA UNet with the text
    encoder as trained, and nothing said so."""
    from pipelines.train import main
    from pipelines.train.data import training_images

    ingest_images(con, tmp_path / "images", 2, sizes=[(32, 32)])
    config = fast_config(tmp_path / "ft", mode="finetune", use_ema=True, train_text_encoder=True, max_train_steps=1,
                         num_validation_images=0)
    said: list[str] = []
    main(config, training_images(con, config), output_dir=tmp_path / "ft", components=tiny_components(),
         progress=lambda **kw: said.append(kw.get("message") or ""))
    assert any("the EMA is of the UNet" in m and "text encoder as trained" in m for m in said), said


def test_two_process_data_parallel_run(catalog_path, tmp_path):
    """--num-processes 2 relaunches through torch.distributed.run (gloo on CPU): one catalog writer, DDP training.
    Without --device on a machine with no CUDA (each process chose on its own before, and the run crashed)."""
    import os
    import subprocess
    import sys

    import torch

    from workbench.catalog import connect

    con = connect(catalog_path)
    ingest_images(con, tmp_path / "images", 4, sizes=[(32, 32)])
    con.close()  # the training processes open it themselves
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "workbench.cli"]
    out = tmp_path / "ddp"
    # run in a project folder with a `pipelines` package of its own (a review: the relaunched processes, started
    # with `-m workbench.cli`, imported it instead of workbench's and failed); -P: this command itself does not
    project = tmp_path / "project"
    (project / "pipelines").mkdir(parents=True)
    (project / "pipelines" / "__init__.py").write_text("")
    done = subprocess.run(
        [sys.executable, "-P", "-m", "workbench.cli", "train", "lora", "--catalog", str(catalog_path), "--resolution", "32",
         "--max-train-steps", "2", "--train-batch-size", "1", "--output-dir", str(out),
         *(["--device", "cpu"] if torch.cuda.is_available() else []), "--num-processes", "2",
         "--set", "num_validation_images=0", "--set", "report_to=none"],
        env=env, capture_output=True, text=True, timeout=300, cwd=project,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "lora_kohya.safetensors").is_file()
    assert len((out / "loss.csv").read_text().splitlines()) == 3
    con = connect(catalog_path, read_only=True)
    assert con.execute("SELECT status, steps FROM training_runs").fetchall() == [("ok", 2)]  # recorded once, by rank 0
    con.close()

    # a resume with another process count is refused: the effective batch and the learning-rate schedule depend on it
    # (a review found a 2-process run resumed by one training its last 40 steps at a rate of 0)
    one = subprocess.run([*base, "train", "lora", "--catalog", str(catalog_path), "--output-dir", str(out), "--resume", "latest",
                          "--max-train-steps", "4"], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 2 and "trained by 2 process(es) and this resume has 1: resume it with --num-processes 2" in " ".join(one.stderr.split()), one.stderr[-2000:]
    # what every process would refuse is refused once, before they start; the plan is shown once
    fp16 = subprocess.run([*base, "train", "lora", "--catalog", str(catalog_path), "--output-dir", str(tmp_path / "fp16"),
                           "--mixed-precision", "fp16", "--device", "cpu", "--num-processes", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert fp16.returncode == 2 and fp16.stderr.count("needs a CUDA GPU") == 1 and "launching" not in fp16.stderr, fp16.stderr[-2000:]
    many = subprocess.run([*base, "train", "lora", "--catalog", str(catalog_path), "--output-dir", str(tmp_path / "many"),
                           "--device", "cpu", "--num-processes", "10000"], env=env, capture_output=True, text=True, timeout=300)
    assert many.returncode == 2 and "--num-processes 10000 on a CPU with" in many.stderr, many.stderr[-2000:]
    plan = subprocess.run([*base, "train", "lora", "--catalog", str(catalog_path), "--resolution", "32", "--show-batches", "1",
                           "--num-processes", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0 and "launching" not in plan.stderr and "in use by process" not in plan.stderr, plan.stderr[-2000:]


def test_sigterm_to_a_multi_process_run_stops_every_process(catalog_path, tmp_path):
    """A review: `kill -TERM` of `workbench train … --num-processes 2` ended the command at once and left both
    training processes running to the end (orphans, on a cluster holding the GPUs)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from workbench.catalog import connect

    con = connect(catalog_path)
    ingest_images(con, tmp_path / "images", 4, sizes=[(32, 32)])
    con.close()
    out = tmp_path / "long"
    run = subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", "train", "lora", "--catalog", str(catalog_path), "--resolution", "32",
         "--max-train-steps", "100000", "--train-batch-size", "1", "--output-dir", str(out), "--device", "cpu",
         "--num-processes", "2", "--checkpointing-steps", "5", "--set", "num_validation_images=0", "--set", "report_to=none"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (out / "checkpoints" / "checkpoint-5").is_dir():
        time.sleep(0.5)
    assert (out / "checkpoints" / "checkpoint-5").is_dir(), "the run did not get going"
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=180)
    assert run.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    time.sleep(2)
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert not left, f"training processes still running: {left}"
    con = connect(catalog_path, read_only=True)
    status, steps, seconds = con.execute("SELECT status, steps, seconds FROM training_runs").fetchall()[0]
    con.close()
    assert status == "cancelled" and 5 <= steps < 100000
    assert seconds is not None and seconds > 0  # up to the checkpoint a resume goes on from (it was NULL)
    assert "--num-processes 2" in " ".join(stderr.split())  # the resume command it prints keeps the process count


def test_train_help_shows_the_trainers_real_defaults():
    """The CLI options default to None (so --resume can tell what was given); the help shows TrainConfig's defaults."""
    import dataclasses

    from pipelines.train.config import TrainConfig
    from workbench.cli import TRAIN_HELP_DEFAULTS

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for name, shown in TRAIN_HELP_DEFAULTS.items():
        assert type(defaults[name])(shown) == defaults[name], name
    result = runner.invoke(app, ["train", "lora", "--help"], env={"COLUMNS": "200"})
    assert "LoRA rank. [default: (4)]" in result.output


def test_evaluation_scores_a_run_of_the_tiny_models_folder_with_the_tiny_clip(tmp_path):
    """A run trained from the tiny preset's folder (as the benchmarks name it) defaulted to sd15's CLIP, which needs a
    download, so an offline `workbench evaluate` only said it failed."""
    from pipelines.train.evaluate import _default_clip
    from workbench.models import tiny_root

    assert _default_clip(str(tiny_root() / "sd")) == "tiny" and _default_clip("tiny") == "tiny"
    assert _default_clip(str(tmp_path / "my-model")) == "sd15" and _default_clip("runwayml/stable-diffusion-v1-5") == "sd15"


def test_train_help_at_80_columns_shows_every_option_that_takes_a_value_in_full():
    """The train options come in panels, so long names such as --gradient-accumulation-steps are not cut to
    "--gradient-accu…" on an 80-column terminal (rich shares one table's width among all its rows)."""
    import typer.main

    command = typer.main.get_command(app).commands["train"].commands["lora"]
    result = runner.invoke(app, ["train", "lora", "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    assert max(len(line) for line in result.output.splitlines()) <= 80
    names = [param.opts[0] for param in command.params if param.opts and not getattr(param, "is_flag", False) and not param.hidden]
    assert "--gradient-accumulation-steps" in names and len(names) > 30
    cut = [name for name in names if f"{name} " not in result.output]
    assert not cut, f"cut at 80 columns: {cut}"
    assert "Memory and speed" in result.output and "Steps and learning rate" in result.output


def test_set_cannot_change_the_mode_or_repeat_a_flag_and_the_diffusers_names_are_accepted(catalog_path, tmp_path):
    """`--set mode=finetune` on `train lora` and `--set rank=8 --rank 4` were silently overridden by the command and
    the flag; --with-prior-preservation and --resume-from-checkpoint (the diffusers examples' names) were unknown."""
    from workbench.catalog import connect

    connect(catalog_path).close()
    base = ["train", "lora", "--catalog", str(catalog_path), "--set", "report_to=none", "--output-dir", str(tmp_path / "run")]
    mode = runner.invoke(app, [*base, "--set", "mode=finetune"])
    assert mode.exit_code == 2 and "cannot change the mode: run `workbench train finetune`" in " ".join(mode.output.split())
    twice = runner.invoke(app, [*base, "--set", "rank=8", "--rank", "4"])
    assert twice.exit_code == 2 and "--set rank=… and --rank both give rank: keep one" in " ".join(twice.output.split())
    # without the alias, --class-prompt would be refused as an option of a run with no class priors
    priors = runner.invoke(app, [*base, "--with-prior-preservation", "--class-prompt", "a photo of a dog", "--instance-prompt", "a photo of sks dog"])
    assert priors.exit_code == 2 and "0 train images" in priors.output, priors.output
    no_priors = runner.invoke(app, [*base, "--class-prompt", "a photo of a dog"])
    assert no_priors.exit_code == 2 and "has no class priors" in " ".join(no_priors.output.split())
    resume = runner.invoke(app, ["train", "lora", "--catalog", str(catalog_path), "--resume-from-checkpoint", "latest",
                                 "--output-dir", str(tmp_path / "nothing")])
    said = " ".join(resume.output.split())  # the alias means --resume: nothing there, a new run (of no images here)
    assert "there is no run to resume" in said and "0 train images" in said, resume.output


def test_train_export_writes_a_checkpoint_as_the_finished_run_writes_its_model(con, tmp_path, one_thread):
    """DreamBooth users keep an earlier, less overfit step; full-model checkpoints held only internal weight names."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from pipelines.train import trained_model

    ingest_images(con, tmp_path / "images", 2, sizes=[(32, 32)])
    config = fast_config(tmp_path / "ft", mode="finetune", use_ema=True, max_train_steps=4, checkpointing_steps=2, num_validation_images=0)
    trained_model(con, config, components=tiny_components())
    last = runner.invoke(app, ["train", "export", str(tmp_path / "ft"), "--checkpoint", "4"])
    assert last.exit_code == 0, last.output
    final = UNet2DConditionModel.from_pretrained(str(tmp_path / "ft" / "pipeline"), subfolder="unet").state_dict()
    exported = UNet2DConditionModel.from_pretrained(str(tmp_path / "ft" / "exports" / "checkpoint-4" / "pipeline"), subfolder="unet").state_dict()
    assert all(torch.equal(final[k], exported[k]) for k in final)  # the EMA weights, as the finished run saved them
    assert (tmp_path / "ft" / "exports" / "checkpoint-4" / "model.safetensors").is_file()
    earlier = runner.invoke(app, ["train", "export", str(tmp_path / "ft"), "--checkpoint", "2", "--to", str(tmp_path / "step2")])
    assert earlier.exit_code == 0, earlier.output
    step2 = UNet2DConditionModel.from_pretrained(str(tmp_path / "step2" / "pipeline"), subfolder="unet").state_dict()
    assert not all(torch.equal(final[k], step2[k]) for k in final)
    again = runner.invoke(app, ["train", "export", str(tmp_path / "ft"), "--checkpoint", "2", "--to", str(tmp_path / "step2")])
    assert again.exit_code == 2 and "is not empty" in " ".join(again.output.split())
    missing = runner.invoke(app, ["train", "export", str(tmp_path / "ft"), "--checkpoint", "3"])
    assert missing.exit_code == 2 and "checkpoint-2, checkpoint-4" in " ".join(missing.output.split())

    lora = fast_config(tmp_path / "lora", max_train_steps=2, checkpointing_steps=2, num_validation_images=0)
    trained_model(con, lora, components=tiny_components())
    assert runner.invoke(app, ["train", "export", str(tmp_path / "lora")]).exit_code == 0
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        ours, written = load_file(str(tmp_path / "lora" / "exports" / "checkpoint-2" / name)), load_file(str(tmp_path / "lora" / name))
        assert ours.keys() == written.keys() and all(torch.equal(ours[k], written[k]) for k in ours)
    written_kohya = written
    # the kohya metadata is the run's own at that step (it said epoch None and 0 s of training)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "lora" / "exports" / "checkpoint-2" / "lora_kohya.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_epoch"] == "2" and float(metadata["ss_training_seconds"]) > 0
    nowhere = runner.invoke(app, ["train", "export", str(tmp_path / "no-such-run"), "--checkpoint", "2"])
    assert nowhere.exit_code == 2 and "No run folder" in " ".join(nowhere.output.split())
    # straight into a UI's folder under a name of its own (an output consumer's review: `--to mylora.safetensors`
    # made a folder of that name, holding the two files every run names alike)
    ui = tmp_path / "webui" / "models" / "Lora"
    ui.mkdir(parents=True)
    named = runner.invoke(app, ["train", "export", str(tmp_path / "lora"), "--to", str(ui / "my-lora-step2.safetensors")])
    assert named.exit_code == 0 and f"lora_kohya: {ui / 'my-lora-step2.safetensors'}" in named.output, named.output
    assert sorted(p.name for p in ui.iterdir()) == ["my-lora-step2.safetensors"]  # no staging folder left, here
    assert not [p for p in (tmp_path / "lora" / "exports").iterdir() if p.name.startswith(".")]  # nor in the run's exports/
    one = load_file(str(ui / "my-lora-step2.safetensors"))
    assert one.keys() == written_kohya.keys() and all(torch.equal(one[k], written_kohya[k]) for k in one)
    taken = runner.invoke(app, ["train", "export", str(tmp_path / "lora"), "--to", str(ui / "my-lora-step2.safetensors")])
    assert taken.exit_code == 2 and "exists" in taken.output
    # in another precision than the run's (a code review: an export could not be had in fp16)
    half = runner.invoke(app, ["train", "export", str(tmp_path / "lora"), "--to", str(ui / "half.safetensors"), "--save-precision", "fp16"])
    assert half.exit_code == 0, half.output
    halved = load_file(str(ui / "half.safetensors"))
    assert {t.dtype for t in halved.values()} == {torch.float16} and halved.keys() == written_kohya.keys()
    assert all(torch.equal(halved[k], written_kohya[k].half()) for k in halved)
    (ui / "half.safetensors").unlink()
    bad = runner.invoke(app, ["train", "export", str(tmp_path / "lora"), "--to", str(ui / "x.safetensors"), "--save-precision", "fp8"])
    assert bad.exit_code == 2 and "save_precision must be float, fp16 or bf16" in bad.output
    checkpoint = runner.invoke(app, ["train", "export", str(tmp_path / "ft"), "--checkpoint", "2", "--to", str(ui / "ft.safetensors")])
    assert checkpoint.exit_code == 0 and "single_file:" in checkpoint.output
    assert "model.diffusion_model.input_blocks.0.0.weight" in load_file(str(ui / "ft.safetensors"))
    # readable as any file written here (safetensors makes them 0600: a UI run by another user could not read them)
    from workbench.files import current_umask

    for written in (ui / "ft.safetensors", tmp_path / "step2" / "model.safetensors", ui / "my-lora-step2.safetensors"):
        assert written.stat().st_mode & 0o777 == 0o666 & ~current_umask(), written


@pytest.mark.parametrize("layout, expected", [
    ({"pipeline": None, "model.safetensors": b"x"}, "is a training run's folder, not a model: name the model it wrote"),
    ({"pytorch_lora_weights.safetensors": b"x"}, "holds a LoRA, not a model: name the base model"),
    ({"notes.txt": b"x"}, "is a folder but not a diffusers model (no model_index.json)"),
])
def test_a_model_folder_that_is_no_model_is_refused_before_the_run_starts(catalog_path, tmp_path, layout, expected):
    """`--model runs/db1` (a run folder) said to fetch it with `hf download /…/runs/db1`, after writing the new run's
    dataset.json."""
    from workbench.catalog import connect

    con = connect(catalog_path)
    ingest_images(con, tmp_path / "images", 1)
    con.close()
    folder = tmp_path / "runs" / "db1"
    folder.mkdir(parents=True)
    for name, content in layout.items():
        if content is None:
            (folder / name).mkdir()
        else:
            (folder / name).write_bytes(content)
    result = runner.invoke(app, ["train", "lora", "--catalog", str(catalog_path), "--model", str(folder), "--resolution", "32",
                                 "--max-train-steps", "1", "--output-dir", str(tmp_path / "new")])
    assert result.exit_code == 2 and expected in " ".join(result.output.split()), result.output
    assert not (tmp_path / "new").exists()
    # the refused command let the catalog go: a connection it left open made DuckDB's instance cache serve this
    # database (writable) to the next connect of its path in the process, and refuse a read-only one
    duckdb.connect(str(catalog_path), read_only=True).close()


def test_options_pasted_from_the_diffusers_examples_run(catalog_path, tmp_path):
    """`--pretrained_model_name_or_path`, `--report_to`, `--max_grad_norm` (flags of diffusers' scripts that are
    --set keys here) were each refused as "No such option", without a hint."""
    from workbench.catalog import connect
    from workbench.cli import pasted_train_options

    pasted = ["train", "lora", "--pretrained_model_name_or_path", "tiny", "--report_to=none", "--max_grad_norm", "0.5",
              "--scale_lr", "--train_batch_size", "1", "--resolution", "32"]
    assert pasted_train_options(pasted) == [
        "train", "lora", "--model", "tiny", "--set", "report_to=none", "--set", "max_grad_norm=0.5", "--set", "scale_lr=true",
        "--train_batch_size", "1", "--resolution", "32"]  # a flag of ours (any spelling) stays as it is
    assert pasted_train_options(["sql", "--max_grad_norm", "1"]) == ["sql", "--max_grad_norm", "1"]  # train only
    notes: list[str] = []  # --center_crop was a bare "No such option": it names the default here (diffusers': random)
    assert pasted_train_options(["train", "lora", "--center_crop", "--rank", "4"], notes) == ["train", "lora", "--rank", "4"]
    assert len(notes) == 1 and "centre crop is the workbench's default" in notes[0]
    notes.clear()  # a review: diffusers' --cache_dir (the Hub download cache) silently became the latent cache
    assert pasted_train_options(["train", "lora", "--cache_dir", "/hf"], notes) == ["train", "lora", "--set", "cache_dir=/hf"]
    assert len(notes) == 1 and "not the Hugging Face download cache" in notes[0]
    with pytest.raises(ValueError, match=r"--instance_data_dir has no workbench counterpart: images come from the catalog"):
        pasted_train_options(["train", "dreambooth", "--instance_data_dir", "./dog"])
    connect(catalog_path).close()
    out = tmp_path / "run"
    result = runner.invoke(app, pasted_train_options([*pasted, "--catalog", str(catalog_path), "--output-dir", str(out)]))
    # the options were taken: the run goes as far as the empty catalog, which has nothing to train on
    assert result.exit_code == 2 and "0 train images" in result.output, result.output


def test_kohya_flags_pasted_mean_what_they_mean_in_kohya(tmp_path):
    """kohya's on/off flags became `--shuffle-tags true` (an extra argument), --network_train_unet_only turned the
    text encoder's training on, --sample_prompts FILE sampled the file's name as a prompt, and --network_dim alone
    trained with alpha = dim, 32 times kohya's default update at dim 32."""
    from workbench.cli import pasted_train_options

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# kohya prompt file\nmasterpiece, a dog --n lowres --w 512 --h 768 --d 1\n\na cat, sitting --ss euler_a --W 256\n")
    notes: list[str] = []
    pasted = pasted_train_options(
        ["train", "lora", "--shuffle_caption", "--flip_aug", "--v_parameterization", "--network_train_unet_only",
         "--optimizer_type", "AdamW8bit", "--sample_prompts", str(prompts), "--network_dim", "32", "--resolution", "64"], notes)
    assert pasted == ["train", "lora", "--shuffle-tags", "--random-flip", "--prediction-type", "v_prediction",
                      "--no-train-text-encoder", "--use-8bit-adam", "--validation-prompt", "masterpiece, a dog",
                      "--validation-prompt", "a cat, sitting", "--lora-alpha", "1", "--rank", "32", "--resolution", "64"]
    assert len(notes) == 2 and "alpha is 1, as kohya's default" in notes[1]
    # the prompts' own settings are said to be left out (a review: negative prompts were dropped without a word)
    assert "(--W, --d, --h, --n, --ss, --w) are left out: the sample grids have no negative prompt" in notes[0]
    # a file saved with a byte-order mark and Windows line ends (Notepad): the mark was part of the first prompt
    prompts.write_bytes("\ufeff猫 cat, 窓辺 --n 低品質\r\nBär bear\r\n".encode("utf-8"))
    assert pasted_train_options(["train", "lora", "--sample_prompts", str(prompts)]) == [
        "train", "lora", "--validation-prompt", "猫 cat, 窓辺", "--validation-prompt", "Bär bear"]
    notes: list[str] = []
    assert pasted_train_options(["train", "lora", "--network_dim", "8", "--network_alpha", "4"], notes) == [
        "train", "lora", "--rank", "8", "--lora-alpha", "4"]
    # kohya trains the text encoder's LoRA too: said, as a config file says it (a review: pasted, nothing was said)
    assert any("trains the text encoder's LoRA as well" in note for note in notes), notes
    notes.clear()
    pasted_train_options(["train", "lora", "--network_dim", "8", "--network_train_unet_only"], notes)
    assert not any("text encoder's LoRA" in note for note in notes), notes
    # a kohya name and the workbench's for one option: two values, of which one silently won (a review: --network_dim 8
    # --rank 4 trained rank 4 at alpha 1; --max_token_length 225 --set max_token_length=150 took 150)
    for both, said in ((["--network_dim", "8", "--rank", "4"], "--network_dim and --rank both give rank"),
                       (["--max_token_length", "225", "--set", "max_token_length=150"],
                        "--max_token_length and --set max_token_length=… both give max_token_length"),
                       (["--caption_dropout_rate", "0.1", "--caption-dropout", "0.2"], "both give caption_dropout"),
                       # ours in kohya's spelling too (a review: the last of --unet_lr and --learning_rate won)
                       (["--unet_lr", "2e-4", "--learning_rate", "1e-4"], "--unet_lr and --learning_rate both give learning_rate"),
                       (["--learning_rate", "1e-4", "--unet_lr", "2e-4"], "--unet_lr and --learning_rate both give learning_rate")):
        with pytest.raises(ValueError, match=re.escape(said)):
            pasted_train_options(["train", "lora", *both])
    # not a conflict: a list option takes both (the sample prompts), and one value given twice is one value
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("photo of wbk cat --n blurry\n")
    assert pasted_train_options(["train", "lora", "--sample_prompts", str(prompts), "--validation-prompt", "wbk cat on grass"]) == [
        "train", "lora", "--validation-prompt", "photo of wbk cat", "--validation-prompt", "wbk cat on grass"]
    assert pasted_train_options(["train", "lora", "--optimizer_type", "AdamW", "--no-use-8bit-adam"])[-1] == "--no-use-8bit-adam"
    with pytest.raises(ValueError, match=re.escape("--network_dim and --set rank=… both give rank")):
        pasted_train_options(["train", "lora", "--set=rank=4", "--network_dim", "8"])
    # the workbench's own options before the command, --wait among them (pasted options were left untranslated)
    assert pasted_train_options(["--wait", "5", "train", "lora", "--network_dim", "8", "--network_alpha", "4"]) == [
        "--wait", "5", "train", "lora", "--rank", "8", "--lora-alpha", "4"]
    # an alpha given another way (--set, a --config file) is left to win: kohya's default is for no alpha at all
    assert pasted_train_options(["train", "lora", "--network_dim", "8", "--set", "lora_alpha=4"]) == [
        "train", "lora", "--rank", "8", "--set", "lora_alpha=4"]
    with_alpha, without = tmp_path / "alpha.toml", tmp_path / "seed.toml"
    with_alpha.write_text("[train]\nlora_alpha = 16\n")
    without.write_text("seed = 1\n")
    assert pasted_train_options(["train", "lora", "--config", str(with_alpha), "--network_dim", "8"]) == [
        "train", "lora", "--config", str(with_alpha), "--rank", "8"]
    assert pasted_train_options(["train", "lora", "--config", str(without), "--network_dim", "8"]) == [
        "train", "lora", "--config", str(without), "--lora-alpha", "1", "--rank", "8"]
    # the workbench's own options may come before the command
    assert pasted_train_options(["-c", "cat.duckdb", "train", "lora", "--v_parameterization"]) == [
        "-c", "cat.duckdb", "train", "lora", "--prediction-type", "v_prediction"]
    assert pasted_train_options(["train", "lora", "--network_train_unet_only", "false"]) == ["train", "lora", "--train-text-encoder"]
    for bad, said in ((["--color_aug"], "--color-jitter STRENGTH"), (["--optimizer_type", "Lion"], "no workbench counterpart"),
                      (["--sample_prompts", str(tmp_path / "none.txt")], "there is no file"),
                      (["--caption_suffix", "x"], "--caption_suffix (kohya) has no workbench counterpart.")):
        with pytest.raises(ValueError, match=re.escape(said)):
            pasted_train_options(["train", "lora", *bad])


def test_one_run_length_and_kohyas_square_resolution(catalog_path, tmp_path):
    """--max_train_steps 3 --max_train_epochs 2 trained 3 steps without a word (kohya lets the epochs win);
    kohya's --resolution 512,512 was not an integer."""
    from workbench.catalog import connect

    connect(catalog_path).close()
    both = runner.invoke(app, ["train", "lora", "--catalog", str(catalog_path), "--max-train-steps", "3",
                               "--num-train-epochs", "2", "--show-batches", "1"])
    assert both.exit_code == 2 and "a run has one length" in " ".join(both.output.split()), both.output
    wide = runner.invoke(app, ["train", "lora", "--catalog", str(catalog_path), "--resolution", "768,512", "--show-batches", "1"])
    assert wide.exit_code == 2 and "Use --resolution 624" in " ".join(wide.output.split()), wide.output
    square = runner.invoke(app, ["train", "lora", "--catalog", str(catalog_path), "--resolution", "64,64", "--show-batches", "1"])
    assert "0 train images" in square.output, square.output  # taken as 64: the run goes as far as the empty catalog


def test_a_lora_run_says_when_imported_class_images_go_unused(con, tmp_path, one_thread):
    """After import-kohya of img/ and reg/, `train lora` trained on the photos alone and said nothing of the reg
    images, which kohya's train_network.py trains whenever it is given them."""
    from pipelines.export import imported_kohya_folder
    from pipelines.train import trained_model

    write_images(tmp_path / "set" / "img" / "10_sks dog", 2)
    write_images(tmp_path / "set" / "reg" / "1_dog", 2, seed=7)
    imported_kohya_folder(con, tmp_path / "set", workers=1)
    said = []
    config = fast_config(tmp_path / "run", max_train_steps=1, num_validation_images=0)
    trained_model(con, config, components=tiny_components(), progress=lambda **kw: said.append(kw.get("message") or ""))
    assert any("2 class image(s) of 'a photo of a dog' are in the catalog but not used: --prior-preservation" in m
               for m in said), said


def test_prior_preservation_says_which_class_images_no_concept_of_the_run_takes(con, tmp_path):
    """A kohya review: reg/1_person beside a dog concept was never used, and DreamBooth asked for generated dog
    images without a word of the person images (kohya regularises with every reg folder)."""
    from pipelines.export import imported_kohya_folder
    from pipelines.train.data import training_images
    from pipelines.train.run import _say_class_images_of_other_classes

    write_images(tmp_path / "set" / "img" / "10_sks dog", 2)
    write_images(tmp_path / "set" / "reg" / "1_dog", 1, seed=7)
    write_images(tmp_path / "set" / "reg" / "1_person", 2, seed=8)
    imported_kohya_folder(con, tmp_path / "set", workers=1)
    config = fast_config(tmp_path / "run", mode="dreambooth", with_prior_preservation=True)
    said: list[str] = []
    _say_class_images_of_other_classes(con, training_images(con, config), lambda **kw: said.append(kw.get("message") or ""))
    assert len(said) == 1 and "class images of 'a photo of a person' (2) are in the catalog, but no concept" in said[0], said


def test_ctrl_c_stops_the_run_when_its_step_ends_and_keeps_that_step(catalog_path, tmp_path):
    """Ctrl+C stopped at once: the steps since the last scheduled checkpoint were lost (all of them, before the first
    of the default 500-step cadence). Now the run stops when the step ends and keeps it; the hint resumes from it."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from workbench.catalog import connect

    con = connect(catalog_path)
    ingest_images(con, tmp_path / "images", 2, sizes=[(32, 32)])
    con.close()
    out = tmp_path / "run"
    command = [sys.executable, "-m", "workbench.cli", "train", "lora", "--catalog", str(catalog_path), "--model", "tiny",
               "--resolution", "32", "--train-batch-size", "2", "--max-train-steps", "5000", "--checkpointing-steps", "1000",
               "--device", "cpu", "--output-dir", str(out), "--set", "report_to=none", "--set", "evaluate=false",
               "--set", "num_validation_images=0"]
    # Ctrl+C as in a terminal, even when this suite runs as a background job (which starts with SIGINT ignored)
    process = subprocess.Popen(command, cwd=Path(__file__).parents[1], start_new_session=True, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            if (out / "loss.csv").is_file() and len((out / "loss.csv").read_text().splitlines()) > 3:
                break
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    text = " ".join(output.split())
    assert process.returncode == 130 and "Traceback" not in output, output
    assert "Stopping when the step in progress ends" in text, output
    kept = re.search(r"the last checkpoint is checkpoint-(\d+)", text)
    assert kept and int(kept.group(1)) >= 3, output  # the step it stopped after, not none (the first is at 1000)
    step = int(kept.group(1))
    assert len((out / "loss.csv").read_text().splitlines()) == 1 + step  # the loss log ends where the checkpoint is
    assert f"--resume latest --output-dir {out}" in text


def test_each_modes_help_leaves_out_the_options_of_the_others():
    """`train dreambooth --help` listed --rank in a LoRA panel, which the run then refused."""
    shown = {mode: " ".join(runner.invoke(app, ["train", mode, "--help"], env={"COLUMNS": "200"}).output.split())
             for mode in ("lora", "dreambooth", "finetune")}
    assert "--rank" in shown["lora"] and "--rank" not in shown["dreambooth"] and "--rank" not in shown["finetune"]
    assert "--use-ema" not in shown["lora"] and "--use-ema" in shown["dreambooth"] and "--use-ema" in shown["finetune"]
    assert "--no-from-scratch" in shown["finetune"] and "--no-from-scratch" not in shown["dreambooth"]
    assert all("--train-text-encoder" in text and "--learning-rate" in text for text in shown.values())
    refused = runner.invoke(app, ["train", "dreambooth", "--rank", "8", "--max-train-steps", "1"])
    assert refused.exit_code == 2 and "not a LoRA" in " ".join(refused.output.split())  # hidden, still understood


def test_a_runs_config_toml_trains_the_same_run_again(con, catalog_path, tmp_path, one_thread):
    """A review: the options recorded with a run could not be given back (both a step count and epochs, nulls TOML
    has no word for), and the bucket settings it trained with came from the last `workbench buckets`, not the record."""
    from safetensors.torch import load_file

    from pipelines.buckets import aspect_buckets
    from workbench.catalog import connect

    ingest_images(con, tmp_path / "images", 4)
    aspect_buckets(con, resolution=32, min_bucket_reso=16, max_bucket_reso=64, bucket_reso_steps=16)
    con.close()
    runner = CliRunner()
    first = runner.invoke(app, ["train", "lora", "--catalog", str(catalog_path), "--output-dir", str(tmp_path / "first"),
                                "--resolution", "32", "--num-train-epochs", "2", "--train-batch-size", "2", "--rank", "2",
                                "--learning-rate", "1e-3", "--set", "num_validation_images=0", "--set", "report_to=none", "--set", "evaluate=false"])
    assert first.exit_code == 0, first.output
    text = (tmp_path / "first" / "config.toml").read_text()
    assert re.search(r"^max_train_steps = \d+$", text, re.M) and "num_train_epochs" not in text and "bucket_reso_steps = 16" in text, text
    # options the run does not use are left out (a review: a dreambooth run's file listed rank, so editing it was refused)
    assert not re.search(r"^(ema_decay|use_ema|class_prompt|keep_tokens|lr_num_cycles) =", text, re.M), text
    assert re.search(r"^rank = 2$", text, re.M), text
    # what else decides the weights to the last bit (a review: retrained with other thread or process counts, unsaid)
    assert re.search(r"^# Trained with 1 process\(es\) and \d+ CPU thread\(s\) each; workbench [\d.]+, torch [^,]+, diffusers ", text, re.M), text
    from safetensors import safe_open

    with safe_open(str(tmp_path / "first" / "lora_kohya.safetensors"), "pt") as handle:
        metadata = handle.metadata()  # the catalog's bucket settings, as sd-scripts records its own (not its defaults)
    assert (metadata["ss_min_bucket_reso"], metadata["ss_max_bucket_reso"], metadata["ss_bucket_no_upscale"]) == ("16", "64", "False")
    con = connect(catalog_path)  # and the catalog's record of the run says them too (they were NULL: options not given)
    assert con.execute("SELECT config->>'min_bucket_reso', config->>'bucket_reso_steps' FROM training_runs").fetchall() == [("16", "16")]
    aspect_buckets(con, resolution=32, bucket_reso_steps=8)  # the catalog's buckets change: the recorded run keeps its own
    con.close()
    again = runner.invoke(app, ["train", "lora", "--catalog", str(catalog_path), "--config", str(tmp_path / "first" / "config.toml"),
                                "--output-dir", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    before = load_file(str(tmp_path / "first" / "pytorch_lora_weights.safetensors"))
    after = load_file(str(tmp_path / "again" / "pytorch_lora_weights.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert "dataset changed since the run" not in again.output
    # a caption edited since: said (a review: the retrain's weights differed without a word)
    from pipelines.caption_edits import save_manual_caption

    con = connect(catalog_path)
    save_manual_caption(con, con.execute("SELECT min(image_id) FROM dataset").fetchall()[0][0], "a brick wall")
    con.close()
    edited = runner.invoke(app, ["train", "lora", "--catalog", str(catalog_path), "--config", str(tmp_path / "first" / "config.toml"),
                                 "--output-dir", str(tmp_path / "edited"), "--max-train-steps", "1"])
    said = " ".join(edited.output.split())
    assert edited.exit_code == 0 and "the catalog's dataset changed since the run of" in said and "1 captions changed" in said, edited.output
    # the requeue pattern: the run's own file with --resume (a review: refused, as its bucket settings were saved unset
    # in the checkpoint and spelled out in config.toml)
    steps = int(re.search(r"^max_train_steps = (\d+)$", text, re.M).group(1))
    longer = runner.invoke(app, ["train", "lora", "--catalog", str(catalog_path), "--config", str(tmp_path / "first" / "config.toml"),
                                 "--output-dir", str(tmp_path / "first"), "--resume", "latest", "--max-train-steps", str(steps + 1)])
    assert longer.exit_code == 0 and "these differ" not in longer.output, longer.output
    assert re.search(rf"^max_train_steps = {steps + 1}$", (tmp_path / "first" / "config.toml").read_text(), re.M)


def test_save_precision_writes_the_files_a_ui_loads_in_half_precision(con, tmp_path, one_thread):
    """An output consumer's review: every file was float32 whatever was asked (`--save_precision fp16`, sd-scripts'
    option, had no counterpart), so an SD 1.5 DreamBooth checkpoint would be 4.3 GB where UIs share 2.1 GB ones."""
    from safetensors.torch import load_file

    from pipelines.train import main
    from pipelines.train.data import training_images

    ingest_images(con, tmp_path / "images", 2, sizes=[(32, 32)])
    lora = fast_config(tmp_path / "lora", max_train_steps=1, num_validation_images=0, save_precision="fp16")
    main(lora, training_images(con, lora), output_dir=tmp_path / "lora", components=tiny_components())
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        assert {tensor.dtype for tensor in load_file(str(tmp_path / "lora" / name)).values()} == {torch.float16}, name
    full = fast_config(tmp_path / "ft", mode="finetune", max_train_steps=1, num_validation_images=0, save_precision="bf16")
    main(full, training_images(con, full), output_dir=tmp_path / "ft", components=tiny_components())
    assert {tensor.dtype for tensor in load_file(str(tmp_path / "ft" / "model.safetensors")).values()} == {torch.bfloat16}
    unet = load_file(str(tmp_path / "ft" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {tensor.dtype for tensor in unet.values()} == {torch.float32}  # the folder to train on stays full precision
    with pytest.raises(Exception, match="save_precision must be float, fp16 or bf16"):
        fast_config(tmp_path / "x", save_precision="fp8")


def test_resuming_a_run_whose_base_model_moved_says_where_it_must_be(con, catalog_path, tmp_path, one_thread):
    """A review: after `mv models/base models/elsewhere`, `--resume latest` said only "No such model file or folder",
    and `--model models/elsewhere --resume latest` was refused as another model."""
    from pipelines.train import trained_model

    ingest_images(con, tmp_path / "images", 2, sizes=[(32, 32)])
    base = tmp_path / "models" / "base"
    shutil.copytree(component_path("tiny", "sd"), base)
    config = fast_config(tmp_path / "run", model=str(base), max_train_steps=2, checkpointing_steps=1, num_validation_images=0)
    trained_model(con, config, components=tiny_components())
    con.close()
    base.rename(tmp_path / "models" / "elsewhere")
    resumed = runner.invoke(app, ["train", "lora", "--resume", "latest", "--output-dir", str(tmp_path / "run"),
                                  "--max-train-steps", "3", "--catalog", str(catalog_path)])
    said = " ".join(resumed.output.split())
    assert resumed.exit_code == 2 and f"No such model file or folder: {base}" in said, resumed.output
    assert "a resume goes on with the model it started with. Put it back there" in said


def test_a_run_records_its_hub_commit_and_a_resume_on_updated_weights_is_refused(con, tmp_path, monkeypatch, one_thread):
    """Leftover of a review: a Hub model's revision was not recorded, and a resume after the Hub model (or a local
    folder, or a file) was updated went on training other base weights without a word."""
    import dataclasses

    import huggingface_hub.constants
    from safetensors.torch import load_file, save_file

    from pipelines.train import TrainingError, trained_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))  # read once, at import
    repo = tmp_path / "hf" / "hub" / "models--someone--sd"
    (repo / "refs").mkdir(parents=True)

    def publish(commit: str, nudge: float) -> None:
        snapshot = repo / "snapshots" / commit
        shutil.copytree(component_path("tiny", "sd"), snapshot)
        weights = snapshot / "unet" / "diffusion_pytorch_model.safetensors"
        unet = load_file(weights)
        unet["conv_in.bias"] = unet["conv_in.bias"] + nudge
        save_file(unet, weights)
        (repo / "refs" / "main").write_text(commit)

    publish("a" * 40, 0.0)
    ingest_images(con, tmp_path / "images", 2, sizes=[(32, 32)])
    config = fast_config(tmp_path / "run", model="someone/sd", max_train_steps=2, checkpointing_steps=1, num_validation_images=0)
    result = trained_model(con, config)
    row = con.execute("SELECT model, model_path, model_revision, model_fingerprint FROM training_runs WHERE train_id = ?",
                      [result.train_id]).fetchone()
    assert row[:3] == ("someone/sd", str(repo / "snapshots" / ("a" * 40)), "a" * 40)
    assert re.fullmatch("[0-9a-f]{64}", row[3])

    publish("b" * 40, 0.01)  # the Hub model was updated, and the cache now holds the new commit
    with pytest.raises(TrainingError, match=f"checkpoint-2 was trained on other base weights than --model someone/sd loads now .*Hub commit {'b' * 40}"):
        trained_model(con, dataclasses.replace(config, resume="latest", max_train_steps=3))
    # the failed run is recorded with the model it loaded (a code review: only finished runs were)
    failed = con.execute("SELECT status, model_revision, model_fingerprint FROM training_runs ORDER BY train_id DESC LIMIT 1").fetchone()
    assert failed[:2] == ("failed", "b" * 40) and failed[2] != row[3]
    (repo / "refs" / "main").write_text("a" * 40)  # the commit the run started on: the resume goes on
    resumed = trained_model(con, dataclasses.replace(config, resume="latest", max_train_steps=3))
    assert resumed.steps == 3
    assert con.execute("SELECT model_revision, model_fingerprint FROM training_runs WHERE train_id = ?",
                       [resumed.train_id]).fetchone() == ("a" * 40, row[3])


def test_a_run_asked_to_stop_that_fails_on_the_way_is_recorded_as_cancelled(con, tmp_path, monkeypatch):
    """A flaky multi-process SIGTERM test: one process stopped a step before the other, whose next collective broke, so
    the run the user stopped was recorded 'failed'. Asked to stop, it is 'cancelled', with the error that followed."""
    import pipelines.train.run as run_mod
    from pipelines.train import trained_model
    from workbench.progress import CancellableProgress

    ingest_images(con, tmp_path / "images", 2, sizes=[(32, 32)])
    stop = CancellableProgress(lambda **kw: None)

    def broken_on_the_way(*args, **kwargs):
        stop.cancel()  # SIGTERM arrives
        raise RuntimeError("Connection closed by peer")  # gloo, as the other process left

    monkeypatch.setattr(run_mod, "main", broken_on_the_way)
    with pytest.raises(RuntimeError):
        trained_model(con, fast_config(tmp_path / "run"), progress=stop)
    status, error = con.execute("SELECT status, error FROM training_runs").fetchone()
    assert status == "cancelled" and "while stopping: RuntimeError: Connection closed by peer" in error
    monkeypatch.setattr(run_mod, "main", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("a real failure")))
    with pytest.raises(RuntimeError):
        trained_model(con, fast_config(tmp_path / "run2"), progress=CancellableProgress(lambda **kw: None))
    assert con.execute("SELECT status FROM training_runs ORDER BY train_id DESC LIMIT 1").fetchone()[0] == "failed"
