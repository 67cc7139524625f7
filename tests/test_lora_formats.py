"""The two LoRA files (`pipelines/train/lora_formats.py`): both load with diffusers' `load_lora_weights` and
reproduce the trained model for any target modules; the kohya file carries sd-scripts' metadata and hashes."""

from __future__ import annotations

import hashlib
import json
from io import BytesIO
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipelines.train import lora_formats
from pipelines.train.data import TrainImage
from train_fixtures import fast_config, one_thread  # noqa: F401 (fixture)

DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
EXTENDED_TARGETS = DEFAULT_TARGETS + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "time_emb_proj"]
TEXT_DEFAULT = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_EXTENDED = TEXT_DEFAULT + ["fc1", "fc2"]


def _pipe():
    from workbench.models import load_sd_pipeline

    return load_sd_pipeline("tiny", device="cpu", dtype="float32")


def _trained_pipe(unet_targets, text_targets=None, rank=4, alpha=8.0):
    """A tiny pipeline with peft LoRA added as the training loop adds it, and non-zero B so the LoRA acts."""
    from peft import LoraConfig

    from pipelines.train.loop import _add_text_encoder_lora

    pipe = _pipe()
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(unet_targets)))
    if text_targets:
        _add_text_encoder_lora(pipe.text_encoder, LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(text_targets)))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in (pipe.unet, pipe.text_encoder):
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return pipe


def _lora_modules(module: torch.nn.Module) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {name for name, m in module.named_modules() if isinstance(m, LoraLayer) and m.lora_A}


def _inputs(pipe):
    generator = torch.Generator().manual_seed(1)
    config = pipe.unet.config
    latents = torch.randn(2, config.in_channels, 16, 16, generator=generator)
    context = torch.randn(2, 77, config.cross_attention_dim, generator=generator)
    ids = pipe.tokenizer(["a red square", "blue, green"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    return latents, context, ids


def _outputs(pipe, latents, context, ids):
    with torch.no_grad():
        return pipe.unet(latents, 10, context).sample, pipe.text_encoder(ids)[0]


@pytest.mark.parametrize(
    "unet_targets, text_targets",
    [(DEFAULT_TARGETS, None), (EXTENDED_TARGETS, None), (DEFAULT_TARGETS, TEXT_DEFAULT), (EXTENDED_TARGETS, TEXT_EXTENDED)],
    ids=["default", "extended", "default+text", "extended+text"],
)
def test_both_files_load_every_module_and_reproduce_the_trained_model(tmp_path, one_thread, unet_targets, text_targets):
    trained = _trained_pipe(unet_targets, text_targets)
    text_encoder = trained.text_encoder if text_targets else None
    config = fast_config(tmp_path / "out", rank=4, lora_alpha=8.0, lora_target_modules=list(unet_targets),
                         train_text_encoder=bool(text_targets))
    out = tmp_path / "out"
    out.mkdir()
    diffusers_file = lora_formats.save_diffusers_lora(out, trained.unet, text_encoder)
    kohya_file = lora_formats.save_kohya_lora(out, trained.unet, config, text_encoder=text_encoder, base_model="tiny",
                                              image_count=2, steps=3, seconds=1.0)
    inputs = _inputs(trained)
    want_unet, want_text = _outputs(trained, *inputs)
    base_unet, base_text = _outputs(_pipe(), *inputs)
    assert (want_unet - base_unet).abs().max() > 1e-2  # the LoRA really changes the model
    if text_targets:
        assert (want_text - base_text).abs().max() > 1e-2

    # one key style throughout: peft's lora_A / lora_B under unet. / text_encoder.
    keys = list(load_file(str(diffusers_file)))
    assert all(k.startswith(("unet.", "text_encoder.")) and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys), keys[:5]
    trained_unet_modules, trained_text_modules = _lora_modules(trained.unet), _lora_modules(trained.text_encoder)
    if unet_targets is EXTENDED_TARGETS:
        assert any(".conv1" in m for m in trained_unet_modules) and any(m.endswith("to_q") for m in trained_unet_modules)
    assert len(keys) == 2 * (len(trained_unet_modules) + len(trained_text_modules))

    for path in (diffusers_file, kohya_file):
        pipe = _pipe()
        pipe.load_lora_weights(str(out), weight_name=path.name)
        assert _lora_modules(pipe.unet) == trained_unet_modules, path.name
        assert _lora_modules(pipe.text_encoder) == trained_text_modules, path.name
        got_unet, got_text = _outputs(pipe, *inputs)
        assert torch.allclose(got_unet, want_unet, atol=1e-5, rtol=0), (path.name, (got_unet - want_unet).abs().max())
        assert torch.allclose(got_text, want_text, atol=1e-5, rtol=0), (path.name, (got_text - want_text).abs().max())


# --- kohya metadata ------------------------------------------------------------------


def _sd_scripts_addnet_hash_legacy(b: BytesIO) -> str:
    """sd-scripts `library/train_util.py` addnet_hash_legacy."""
    m = hashlib.sha256()
    b.seek(0x100000)
    m.update(b.read(0x10000))
    return m.hexdigest()[0:8]


def _sd_scripts_addnet_hash_safetensors(b: BytesIO) -> str:
    """sd-scripts `library/train_util.py` addnet_hash_safetensors."""
    hash_sha256 = hashlib.sha256()
    blksize = 1024 * 1024
    b.seek(0)
    header = b.read(8)
    n = int.from_bytes(header, "little")
    b.seek(n + 8)
    for chunk in iter(lambda: b.read(blksize), b""):
        hash_sha256.update(chunk)
    return hash_sha256.hexdigest()


def _sd_scripts_hashes(tensors, metadata) -> tuple[str, str]:
    """sd-scripts `train_util.precalculate_safetensors_hashes`, as `networks/lora.py` save_weights calls it."""
    import safetensors.torch

    metadata = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = BytesIO(safetensors.torch.save(tensors, metadata))
    return _sd_scripts_addnet_hash_safetensors(b), _sd_scripts_addnet_hash_legacy(b)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    return load_file(str(path)), metadata


@pytest.mark.parametrize("rank", [4, 64], ids=["small-file", "over-1MiB"])
def test_kohya_hashes_are_sd_scripts_addnet_hashes_of_the_written_file(tmp_path, one_thread, rank):
    trained = _trained_pipe(EXTENDED_TARGETS, rank=rank)
    config = fast_config(tmp_path / "out", rank=rank, lora_target_modules=EXTENDED_TARGETS)
    path = lora_formats.save_kohya_lora(tmp_path, trained.unet, config, base_model="tiny", image_count=2, steps=3, seconds=1.0)
    tensors, metadata = _read(path)
    model_hash, legacy_hash = _sd_scripts_hashes(tensors, metadata)
    assert metadata["sshs_model_hash"] == model_hash
    assert metadata["sshs_legacy_hash"] == legacy_hash and len(legacy_hash) == 8
    # A1111 / additional-networks hash the file on disk: the tensor bytes after the header are the same
    assert _sd_scripts_addnet_hash_safetensors(BytesIO(path.read_bytes())) == model_hash
    if rank == 64:  # the legacy window (0x100000..0x110000) lies inside the tensor data, not past the end
        assert path.stat().st_size > 0x110000 and legacy_hash != hashlib.sha256(b"").hexdigest()[:8]
    # non-ss_ metadata does not take part in the hashes
    metadata_plus = dict(metadata, modelspec_title="x")
    assert lora_formats.addnet_hashes(tensors, metadata_plus) == (model_hash, legacy_hash)


def test_kohya_model_name_is_a_basename_or_hub_id(tmp_path):
    (tmp_path / "models" / "my-sd15").mkdir(parents=True)
    single = tmp_path / "models" / "dream.safetensors"
    single.write_bytes(b"")
    assert lora_formats.kohya_model_name(str(tmp_path / "models" / "my-sd15")) == "my-sd15"
    assert lora_formats.kohya_model_name(str(tmp_path / "models" / "my-sd15") + "/") == "my-sd15"
    assert lora_formats.kohya_model_name(str(single)) == "dream.safetensors"
    assert lora_formats.kohya_model_name("/gone/elsewhere/model.ckpt") == "model.ckpt"
    assert lora_formats.kohya_model_name("C:\\sd\\models\\v1-5-pruned.safetensors") == "v1-5-pruned.safetensors"
    assert lora_formats.kohya_model_name("runwayml/stable-diffusion-v1-5") == "runwayml/stable-diffusion-v1-5"
    assert lora_formats.kohya_model_name("sd15") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert lora_formats.kohya_model_name("tiny") == "tiny"


def _image(i: int, folder: str, caption: str, concept=None, repeats=1) -> TrainImage:
    return TrainImage(image_id=str(i), path=f"/home/someone/data/{folder}/img{i}.png", caption=caption, bucket=(32, 32),
                      resized=(32, 32), crop=(0, 0), concept=concept, repeats=repeats)


def test_kohya_metadata_counts_repeats_tags_epoch_and_cache(tmp_path, one_thread):
    images = [
        _image(0, "dogs", "sks, Dog, grass", concept="sks dog", repeats=4),
        _image(1, "dogs", "sks, dog, sofa", concept="sks dog", repeats=4),
        _image(2, "misc", "a cat,  grass ,"),
    ]
    model = tmp_path / "private" / "my-base-model"
    model.mkdir(parents=True)
    config = fast_config(tmp_path / "out", model=str(model), random_flip=True, rank=4)
    trained = _trained_pipe(DEFAULT_TARGETS)
    path = lora_formats.save_kohya_lora(tmp_path, trained.unet, config, base_model=config.model, image_count=len(images),
                                        steps=12, seconds=3.0, images=images, epoch=2)
    _, metadata = _read(path)
    assert all(isinstance(v, str) for v in metadata.values())
    assert str(tmp_path) not in json.dumps(metadata) and "/home/someone" not in json.dumps(metadata)  # no local paths
    assert metadata["ss_sd_model_name"] == "my-base-model"
    assert metadata["ss_num_train_images"] == "9"  # 2 images × 4 repeats + 1
    assert metadata["ss_epoch"] == "2" and metadata["ss_v2"] == "False" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["ss_flip_aug"] == "True" and metadata["ss_color_aug"] == "False" and metadata["ss_cache_latents"] == "True"
    assert json.loads(metadata["ss_tag_frequency"]) == {
        "4_sks dog": {"sks": 2, "dog": 2, "grass": 1, "sofa": 1},
        "misc": {"a cat": 1, "grass": 1},
    }
    assert json.loads(metadata["ss_dataset_dirs"]) == {"4_sks dog": {"n_repeats": 4, "img_count": 2}, "misc": {"n_repeats": 1, "img_count": 1}}
    # a concept named by its folder (`3_sks dog`, beside `4_sks dog`'s "sks dog") is that folder, not `3_3_sks dog`
    assert lora_formats.kohya_dataset_info([_image(3, "close", "sks", concept="3_sks dog", repeats=3)])[0] == {
        "3_sks dog": {"n_repeats": 3, "img_count": 1}}
    assert metadata["ss_optimizer"].startswith("torch.optim.adamw.AdamW(")
    # keys A1111's and sd-scripts' tools read that were missing: the name a LoRA is shown by, its buckets, its epoch
    assert metadata["ss_output_name"] == "out" and metadata["ss_session_id"].isdigit()
    assert json.loads(metadata["ss_bucket_info"]) == {"buckets": {"0": {"resolution": [32, 32], "count": 9}}, "mean_img_ar_error": 0.0}
    assert metadata["ss_num_batches_per_epoch"] == "5"  # 9 with repeats, in batches of 2
    assert (metadata["ss_batch_size_per_device"], metadata["ss_total_batch_size"]) == ("2", "2")
    # two processes share the epoch's batches out, as sd-scripts' len(train_dataloader) counts them; the total batch
    # is every process's (a review found a 2-process run saying 18 batches per epoch for its 9 steps)
    shared = lora_formats.kohya_metadata(config, base_model="tiny", image_count=3, steps=1, seconds=1.0, images=images,
                                         num_processes=2)
    assert (shared["ss_num_batches_per_epoch"], shared["ss_total_batch_size"]) == ("3", "4")
    # ss_max_train_steps is the run's length, ss_steps the steps trained when the file was written (a checkpoint's
    # LoRA said ss_max_train_steps=15 of a 20-step run)
    assert (metadata["ss_max_train_steps"], metadata["ss_steps"]) == (str(config.max_train_steps), "12")

    # an explicit count wins; without images or count the plain image count is written
    explicit = lora_formats.kohya_metadata(config, base_model="tiny", image_count=3, steps=1, seconds=1.0, num_train_images=30)
    assert explicit["ss_num_train_images"] == "30" and "ss_epoch" not in explicit and "ss_tag_frequency" not in explicit
    assert lora_formats.kohya_metadata(config, base_model="tiny", image_count=3, steps=1, seconds=1.0)["ss_num_train_images"] == "3"

    # what the base model is and how it samples: ModelSpec keys and sd-scripts' v2 / v-parameterization flags (an
    # output consumer's review: a v-prediction run on an SD 2.x base said sd_v1, epsilon, so a UI sampled it wrong)
    assert (metadata["modelspec.architecture"], metadata["modelspec.prediction_type"]) == ("stable-diffusion-v1/lora", "epsilon")
    assert metadata["ss_v_parameterization"] == "False" and metadata["modelspec.title"] == "out"
    assert metadata["modelspec.resolution"] == "32x32" and metadata["modelspec.sai_model_spec"] == "1.0.1"
    v2 = lora_formats.kohya_metadata(config, base_model="tiny", image_count=1, steps=1, seconds=1.0, v2=True, prediction_type="v_prediction")
    assert (v2["ss_v2"], v2["ss_base_model_version"], v2["ss_v_parameterization"]) == ("True", "sd_v2", "True")
    assert (v2["modelspec.architecture"], v2["modelspec.prediction_type"]) == ("stable-diffusion-v2-768-v/lora", "v")


@pytest.mark.parametrize(
    "overrides, cached",
    [({}, "True"), ({"random_crop": True}, "False"), ({"color_jitter": 0.1}, "False"), ({"cache_latents": False}, "False")],
)
def test_kohya_cache_latents_follows_what_the_loop_really_cached(tmp_path, overrides, cached):
    config = fast_config(tmp_path / "out", **overrides)
    metadata = lora_formats.kohya_metadata(config, base_model="tiny", image_count=1, steps=1, seconds=1.0)
    assert metadata["ss_cache_latents"] == cached
    assert metadata["ss_color_aug"] == str("color_jitter" in overrides)
    # the caller's word wins when it says what happened
    assert lora_formats.kohya_metadata(config, base_model="tiny", image_count=1, steps=1, seconds=1.0,
                                       cache_latents=False)["ss_cache_latents"] == "False"


def test_the_adapter_config_in_the_file_header_lists_targets_in_one_order():
    """peft keeps target_modules as a set, whose order follows the process's hash seed: two runs that trained the
    same weights wrote files with different bytes."""
    from peft import LoraConfig

    from pipelines.train.lora_formats import adapter_metadata

    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_v", "to_q", "to_out.0", "to_k"])
    assert adapter_metadata(config)["target_modules"] == ["to_k", "to_out.0", "to_q", "to_v"]
    assert adapter_metadata(config)["r"] == 4


def test_a_single_file_base_model_is_identified_by_sd_scripts_hashes(tmp_path):
    """A reproducibility review: the LoRA named its base model by file name only; sd-scripts also writes the model's
    hashes (`ss_sd_model_hash`, `ss_new_sd_model_hash`), which A1111 shows and matches."""
    model = tmp_path / "my-model.safetensors"
    data = bytes(range(256)) * (0x120000 // 256)
    model.write_bytes(data)
    config = fast_config(tmp_path / "out")
    metadata = lora_formats.kohya_metadata(config, base_model=str(model), image_count=1, steps=1, seconds=1.0)
    assert metadata["ss_sd_model_name"] == "my-model.safetensors"
    assert metadata["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert metadata["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert "ss_sd_model_hash" not in lora_formats.kohya_metadata(config, base_model="tiny", image_count=1, steps=1, seconds=1.0)


def test_an_sd2_checkpoint_is_written_with_its_openclip_text_encoder_and_loads_back(tmp_path):
    """An output consumer's review: a DreamBooth of an SD 2.x base wrote its text encoder in SD 1.x's CLIP layout,
    which A1111 and ComfyUI cannot read as SD 2.x. Now the OpenCLIP layout (`cond_stage_model.model.*`, q/k/v joined),
    read back here by diffusers' own single-file loader, weight for weight."""
    import json

    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from pipelines.train.single_file import save_ldm_checkpoint
    from workbench.models import component_path

    tiny = Path(component_path("tiny", "sd"))
    torch.manual_seed(0)
    unet_config = {**json.loads((tiny / "unet" / "config.json").read_text()), "cross_attention_dim": 1024, "use_linear_projection": True}
    unet = UNet2DConditionModel.from_config({k: v for k, v in unet_config.items() if not k.startswith("_")})
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=1024, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu"))
    vae = AutoencoderKL.from_pretrained(tiny, subfolder="vae")
    scheduler = StableDiffusionPipeline.from_pretrained(tiny).scheduler
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(tiny, subfolder="tokenizer"),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "pipeline")
    path = save_ldm_checkpoint(tmp_path / "model.safetensors", unet, vae, text_encoder)
    keys = load_file(str(path)).keys()
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert not any(key.startswith("cond_stage_model.transformer.") for key in keys)
    back = StableDiffusionPipeline.from_single_file(str(path), config=str(tmp_path / "pipeline"), safety_checker=None,
                                                    requires_safety_checker=False)
    for ours, theirs in ((unet, back.unet), (text_encoder, back.text_encoder)):
        expected, loaded = ours.state_dict(), theirs.state_dict()
        assert all(torch.equal(expected[k], loaded[k]) for k in expected if not k.endswith("position_ids")), type(ours).__name__
