"""The model presets: tiny models build offline, reload deterministically and run; missing weights fail clearly."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from workbench import models
from workbench.cli import app


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_components_are_built_once_in_standard_formats(workbench_home):
    sd = models.component_path("tiny", "sd")
    blip = models.component_path("tiny", "blip")
    clip = models.component_path("tiny", "clip")
    assert sd.startswith(str(workbench_home / "models" / "tiny"))
    assert os.path.isfile(os.path.join(sd, "model_index.json"))
    assert os.path.isfile(os.path.join(sd, "unet", "diffusion_pytorch_model.safetensors"))
    assert os.path.isfile(os.path.join(sd, "tokenizer", "vocab.json"))
    assert os.path.isfile(os.path.join(blip, "config.json"))
    assert os.path.isfile(os.path.join(clip, "open_clip_config.json"))
    mtime = os.stat(os.path.join(sd, "model_index.json")).st_mtime_ns
    assert models.component_path("tiny", "sd") == sd
    assert os.stat(os.path.join(sd, "model_index.json")).st_mtime_ns == mtime  # not rebuilt


def test_tiny_models_reload_with_identical_weights():
    _, blip_a = models.load_blip("tiny", device="cpu")
    _, blip_b = models.load_blip("tiny", device="cpu")
    assert _same_weights(_state(blip_a), _state(blip_b))
    clip_a = models.load_clip("tiny", device="cpu")
    clip_b = models.load_clip("tiny", device="cpu")
    assert _same_weights(_state(clip_a.model), _state(clip_b.model))
    assert clip_a.embed_dim == 32


def test_tiny_build_is_reproducible_from_the_seed(tmp_path, monkeypatch):
    first = _state(models.load_clip("tiny", device="cpu").model)
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "other_home"))
    rebuilt = _state(models.load_clip("tiny", device="cpu").model)
    assert models.component_path("tiny", "clip").startswith(str(tmp_path / "other_home"))
    assert _same_weights(first, rebuilt)


def test_building_a_tiny_model_leaves_the_random_state_a_run_seeded(tmp_path, monkeypatch):
    """A review found the first `--seed 1` and `--seed 2` runs in a new home with the same LoRA start weights: the
    build reseeded torch between the run's set_seed and the LoRA's initialisation."""
    import random

    def draws():
        return torch.rand(4).tolist(), np.random.rand(2).tolist(), random.random()

    def seed():
        torch.manual_seed(1234)
        np.random.seed(1234)
        random.seed(1234)

    seed()
    expected = draws()
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "new_home"))
    seed()
    models.component_path("tiny", "clip")  # built here, for the first time
    assert (tmp_path / "new_home").exists()
    assert draws() == expected


def _build_clip_in(home: str, queue) -> None:
    os.environ["WORKBENCH_HOME"] = home
    queue.put(models.component_path("tiny", "clip"))


def test_two_processes_building_at_once_share_one_folder(tmp_path):
    home = str(tmp_path / "race_home")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_build_clip_in, args=(home, queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    paths = {queue.get(timeout=5), queue.get(timeout=5)}
    assert len(paths) == 1
    leftovers = [p for p in os.listdir(os.path.join(home, "models", "tiny")) if not p.endswith(".lock")]
    assert leftovers == ["clip"]


def test_tiny_blip_captions_and_clip_embeds():
    from PIL import Image

    processor, blip = models.load_blip("tiny", device="cpu")
    inputs = processor(images=[Image.new("RGB", (48, 40), "red")], return_tensors="pt")
    with torch.inference_mode():
        tokens = blip.generate(**inputs, max_length=12)
    text = processor.batch_decode(tokens, skip_special_tokens=True)[0]
    assert text.strip() and "[DEC]" not in text

    bundle = models.load_clip("tiny", device="cpu")
    image = bundle.preprocess(Image.new("RGB", (80, 60), "blue")).unsqueeze(0)
    with torch.inference_mode():
        assert bundle.model.encode_image(image).shape == (1, bundle.embed_dim)
        assert bundle.model.encode_text(bundle.tokenizer(["a blue square"])).shape == (1, bundle.embed_dim)


def test_tiny_pipeline_generates_an_image():
    pipe = models.load_sd_pipeline("tiny", device="cpu")
    assert pipe.safety_checker is None
    result = pipe("a photo of a dog", num_inference_steps=2, height=64, width=64,
                  generator=torch.Generator().manual_seed(0))
    image = result.images[0]
    assert image.size == (64, 64)
    assert np.asarray(image).std() > 0  # not a blank frame


def test_sd_components_for_training_have_sd_shapes():
    parts = models.load_sd_components("tiny", device="cpu")
    assert type(parts.noise_scheduler).__name__ == "DDPMScheduler"
    ids = parts.tokenizer("a photo of a dog", padding="max_length", max_length=parts.tokenizer.model_max_length,
                          return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and ids[0, 0].item() == 49406  # CLIP's <|startoftext|>
    with torch.inference_mode():
        latents = parts.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.sample()
        hidden = parts.text_encoder(ids)[0]
        noise = parts.unet(latents, torch.tensor([10]), encoder_hidden_states=hidden).sample
    assert latents.shape == (1, 4, 8, 8)
    assert hidden.shape[-1] == parts.unet.config.cross_attention_dim == 32
    assert noise.shape == latents.shape
    assert 1_000_000 <= sum(p.numel() for p in parts.unet.parameters()) <= 2_000_000


@pytest.mark.parametrize("loader", [models.load_blip, models.load_clip, models.load_sd_pipeline])
def test_missing_weights_say_which_model_and_how_to_fetch_it(loader, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_cache"))
    with pytest.raises(models.ModelNotAvailableError) as caught:
        loader("sd15", device="cpu")
    message = str(caught.value)
    assert "hf download" in message and "HF_HUB_OFFLINE" in message
    assert any(part in message for part in ("blip-image-captioning-base", "ViT-B-32", "stable-diffusion-v1-5"))


@pytest.mark.parametrize("loader", [models.load_blip, models.load_clip, models.load_sd_pipeline, models.load_sd_components])
def test_a_hub_model_that_cannot_be_had_fails_at_once_without_download_retries(loader, monkeypatch, tmp_path):
    """A misspelt id, or `sd15` without a network, spent minutes in huggingface_hub's hidden retries (five per file)
    before saying anything; in the TUI, Cancel could not stop it."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_cache"))
    asked = []

    def no_network(self, repo_id, **kwargs):
        asked.append((repo_id, kwargs.get("timeout")))
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "model_info", no_network)
    with pytest.raises(models.ModelNotAvailableError, match="the Hugging Face Hub cannot be reached"):
        loader("sd15", device="cpu")
    assert len(asked) == 1 and asked[0][1] == models.HUB_PROBE_TIMEOUT  # one short request, then the message

    def no_such_model(self, repo_id, **kwargs):
        error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # as the Hub's 404 raises it, without a response
        Exception.__init__(error, "404 Client Error: Repository Not Found")
        raise error

    monkeypatch.setattr(HfApi, "model_info", no_such_model)
    with pytest.raises(models.ModelNotAvailableError, match="there is no model 'sd15-typo/x' on the Hugging Face Hub"):
        loader("hf-hub:sd15-typo/x" if loader is models.load_clip else "sd15-typo/x", device="cpu")


def test_missing_local_file_is_named():
    with pytest.raises(models.ModelNotAvailableError, match="No such model file"):
        models.load_sd_pipeline("./nowhere/model.safetensors", device="cpu")


def test_device_and_dtype_errors_are_clear():
    assert models.resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert models.resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(models.ModelError, match="fp16 needs a GPU"):
        models.resolve_dtype("fp16", "cpu")
    with pytest.raises(models.ModelError, match="Unknown dtype"):
        models.resolve_dtype("int3", "cpu")
    assert models.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(models.ModelError, match="Unknown device|Unsupported device"):
        models.resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(models.ModelError, match="no CUDA GPU"):
            models.resolve_device("cuda")


def test_cli_models_list_and_path(monkeypatch, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["models", "path", "tiny", "--component", "blip"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == models.component_path("tiny", "blip")
    listing = runner.invoke(app, ["models", "list"], env={"COLUMNS": "200"})
    assert listing.exit_code == 0, listing.output
    assert "sd15-large" in listing.output and "Salesforce/blip-image-captioning-base" in listing.output
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_cache"))
    missing = runner.invoke(app, ["models", "path", "sd15", "--component", "sd"])
    assert missing.exit_code == 2
    assert "stable-diffusion-v1-5" in missing.output and "Traceback" not in missing.output


def test_a_lora_file_given_as_the_model_says_so(tmp_path):
    from safetensors.torch import save_file

    lora = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"unet.down.lora_A.weight": torch.zeros(2, 2), "unet.down.lora_B.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(models.ModelError, match="is a LoRA, not a model checkpoint"):
        models.load_sd_components(str(lora), device="cpu", dtype="float32")


def test_model_id_makes_local_paths_absolute_and_leaves_presets_and_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "tiny").mkdir()  # a folder named like a preset: the preset still wins
    assert models.model_id("mine") == str(tmp_path / "mine")
    assert models.model_id("tiny") == "tiny"
    assert models.model_id("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"


def test_loading_and_building_print_no_library_progress_bars(tmp_path, monkeypatch, capfd):
    """transformers' "Loading weights" / "Writing model shards" and diffusers' pipeline bars would break into the
    CLI's own progress display; huggingface_hub's download bars must stay on (a first run of a Hub model)."""
    from huggingface_hub.utils import are_progress_bars_disabled

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))  # builds the tiny models afresh: "Writing model shards"
    models.load_blip("tiny")
    models.load_sd_components("tiny")
    models.load_sd_pipeline("tiny")
    printed = capfd.readouterr()
    for bar in ("Loading weights", "Writing model shards", "Loading pipeline components", "it/s]"):
        assert bar not in printed.err + printed.out
    assert printed.out == ""  # the tokenizer trainer's bar wrote blank lines to a piped stdout: `caption | head` saw them
    assert not are_progress_bars_disabled()


def test_the_tiny_preset_loads_beside_a_folder_named_tiny(tmp_path, monkeypatch):
    """The check for a folder that is no model looked at the name `tiny` itself, so a `tiny/` folder in the working
    directory made the preset refuse to load."""
    from workbench.models import load_sd_pipeline

    (tmp_path / "tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    assert type(load_sd_pipeline("tiny", device="cpu")).__name__ == "StableDiffusionPipeline"


def test_a_model_folder_with_pickled_weights_is_refused_as_such(tmp_path):
    """A security review: a diffusers folder whose UNet is a pickled .bin gave torch's UnpicklingError as a traceback,
    whose text advises loading it with weights_only=False."""
    import pickle
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(models.component_path("tiny", "sd"), folder)
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.unlink()

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo ran > " + str(tmp_path / "ran"),))

    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(models.ModelError, match=r"weights as a pickle \(.bin\) with more than plain tensors in it, which the workbench does not load"):
        models.load_sd_components(str(folder), device="cpu", dtype="float32")
    assert not (tmp_path / "ran").exists()


def _tiny_sd_copy(tmp_path, name="copy"):
    import shutil

    folder = tmp_path / name
    shutil.copytree(models.component_path("tiny", "sd"), folder)
    return folder


def _edit_json(path, **changes):
    import json

    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_model_of_another_architecture_is_refused_before_anything_loads(tmp_path):
    """A review: an SDXL folder was accepted, loaded, and training (or priors) crashed at the first step with a
    traceback, leaving a failed run behind; a single file beside an SDXL `pipeline/` raised a KeyError."""
    from safetensors.torch import save_file

    xl = _tiny_sd_copy(tmp_path, "xl")
    _edit_json(xl / "model_index.json", _class_name="StableDiffusionXLPipeline")
    for check in (models.refuse_a_local_model_that_is_not_one, lambda m: models.load_sd_components(m, device="cpu")):
        with pytest.raises(models.ModelNotAvailableError, match="is a StableDiffusionXLPipeline model .*not Stable Diffusion 1.x or 2.x"):
            check(str(xl))
    beside = tmp_path / "run"
    beside.mkdir()
    (xl).rename(beside / "pipeline")
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, str(beside / "model.safetensors"))
    with pytest.raises(models.ModelNotAvailableError, match="StableDiffusionXLPipeline"):
        models.refuse_a_local_model_that_is_not_one(str(beside / "model.safetensors"))
    inpainting = _tiny_sd_copy(tmp_path, "inpaint")
    _edit_json(inpainting / "unet" / "config.json", in_channels=9)
    with pytest.raises(models.ModelNotAvailableError, match="takes 9 input channels"):
        models.refuse_a_local_model_that_is_not_one(str(inpainting))
    models.refuse_a_local_model_that_is_not_one(str(_tiny_sd_copy(tmp_path, "fine")))  # an SD 1.x folder passes


def test_a_damaged_local_model_is_said_as_such_not_as_one_to_download(tmp_path, monkeypatch):
    """A review: a truncated UNet file, a cut single file or a text file named .safetensors were all said to be
    missing from the Hugging Face cache, with `hf download <the local path>` as the way out."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    broken = _tiny_sd_copy(tmp_path, "broken")
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(models.ModelNotAvailableError) as caught:
        models.load_sd_components(str(broken), device="cpu")
    assert "could not be loaded" in str(caught.value) and str(broken) in str(caught.value)
    assert "hf download" not in str(caught.value) and "HF_HUB_OFFLINE" not in str(caught.value)
    for content in (b"hello", (broken / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()[:5000]):
        single = tmp_path / "model.safetensors"
        single.write_bytes(content)
        for check in (models.refuse_a_local_model_that_is_not_one, lambda m: models.load_sd_pipeline(m, device="cpu")):
            with pytest.raises(models.ModelNotAvailableError, match="is not a readable safetensors file"):
                check(str(single))
    # a Stable Diffusion folder named where a captioner belongs says so
    with pytest.raises(models.ModelNotAvailableError, match="is a Stable Diffusion model, not a BLIP model"):
        models.load_blip(str(_tiny_sd_copy(tmp_path, "sd")), device="cpu")
    # and a captioner where a Stable Diffusion model belongs (a review: the BLIP folder was "a training run's folder",
    # and its model.safetensors then started a run that failed)
    blip = models.component_path("tiny", "blip")
    with pytest.raises(models.ModelNotAvailableError, match="is a blip model \\(transformers\\), not a Stable Diffusion model"):
        models.refuse_a_local_model_that_is_not_one(blip)
    with pytest.raises(models.ModelNotAvailableError, match="holds no Stable Diffusion UNet"):
        models.refuse_a_local_model_that_is_not_one(str(Path(blip) / "model.safetensors"))


def test_a_near_miss_or_a_missing_name_says_what_it_may_have_meant(tmp_path, monkeypatch):
    """`--model Tiny` was sent to the Hub (`hf download Tiny`); `models/typo`, a relative path with nothing there, too,
    without a word that no such folder exists; an uncached Hub id offline was found out only once a run had begun."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_cache"))
    monkeypatch.chdir(tmp_path)
    for name in ("Tiny", "tiny "):
        with pytest.raises(models.ModelNotAvailableError, match="did you mean the preset 'tiny'"):
            models.refuse_a_local_model_that_is_not_one(name)
    (tmp_path / "models").mkdir()
    with pytest.raises(models.ModelNotAvailableError, match=f"nor is there a local file or folder {tmp_path / 'models' / 'typo'}"):
        models.refuse_a_local_model_that_is_not_one("models/typo")
    with pytest.raises(models.ModelNotAvailableError, match="HF_HUB_OFFLINE is set and it is not in the Hugging Face cache"):
        models.refuse_a_local_model_that_is_not_one("someone/not-cached")


def test_a_cached_hub_model_of_another_architecture_is_refused_too(tmp_path, monkeypatch):
    """A code review: the SDXL refusal looked at local folders only; a cached `stabilityai/…-xl-…` loaded and failed
    at the first training step."""
    import shutil

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))  # read once, at import
    repo = tmp_path / "hf" / "hub" / "models--someone--xl"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(models.component_path("tiny", "sd"), snapshot)
    _edit_json(snapshot / "model_index.json", _class_name="StableDiffusionXLPipeline")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for check in (models.refuse_a_local_model_that_is_not_one, lambda m: models.load_sd_components(m, device="cpu")):
        with pytest.raises(models.ModelNotAvailableError, match="StableDiffusionXLPipeline model"):
            check("someone/xl")
