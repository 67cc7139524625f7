"""LoRA files: diffusers `pytorch_lora_weights.safetensors` and kohya-keyed `lora_kohya.safetensors`.

kohya / A1111 / ComfyUI keys are `lora_unet_<diffusers module path, dots as underscores>` (and
`lora_te_<text-encoder path>`) + `.lora_down.weight`, `.lora_up.weight`, `.alpha`; `ss_*` strings in
the safetensors header describe the training (sd-scripts `networks/lora.py`). diffusers'
`load_lora_weights` recognises these keys and converts them.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_LORA_FILE = "lora_kohya.safetensors"


def peft_lora_state(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a peft-adapted model, keyed by module path + `.lora_A.weight`/`.lora_B.weight`."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in get_peft_model_state_dict(model).items()}


def save_diffusers_lora(output_dir: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None,
                        dtype: torch.dtype = torch.float32) -> Path:
    """Write `pytorch_lora_weights.safetensors`: peft's own keys (`unet.<module>.lora_A.weight` / `.lora_B.weight`,
    `text_encoder.…`) with the adapter configs in the header, via `StableDiffusionPipeline.save_lora_weights`.

    The state dict is deliberately *not* passed through `convert_state_dict_to_diffusers`: that renames only the
    attention projections (`to_q.lora_A` → `to_q.lora.down`) and leaves every other target (`conv1`, `proj_in`,
    `ff.net.0.proj`, …) in peft style, and `load_lora_weights` decides the whole file's style from its first key,
    so a mixed file silently loses one of the two halves. peft keys are what `load_lora_weights` loads natively.
    """
    from diffusers import StableDiffusionPipeline

    # the adapter config (rank, alpha, targets) travels in the header, or loaders assume alpha = rank
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(output_dir), unet_lora_layers=peft_lora_state(unet, dtype),
        text_encoder_lora_layers=peft_lora_state(text_encoder, dtype) if text_encoder is not None else None,
        weight_name=DIFFUSERS_LORA_FILE, safe_serialization=True,
        unet_lora_adapter_metadata=adapter_metadata(unet.peft_config["default"]),
        text_encoder_lora_adapter_metadata=adapter_metadata(text_encoder.peft_config["default"]) if text_encoder is not None else None,
    )
    return output_dir / DIFFUSERS_LORA_FILE


def adapter_metadata(lora_config) -> dict:
    """peft's adapter config for the file header, its sets sorted: a set's order changes with each process's hash
    seed, and two runs that trained the same weights should write the same bytes (`sha256sum` says equal)."""
    return {key: sorted(value) if isinstance(value, (set, frozenset)) else value for key, value in lora_config.to_dict().items()}


def kohya_state_dict(
    unet_state: dict[str, torch.Tensor], alpha: float, text_encoder_state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """peft LoRA tensors renamed to kohya keys, with one `.alpha` scalar per module."""
    out: dict[str, torch.Tensor] = {}
    for prefix, state in (("lora_unet_", unet_state), ("lora_te_", text_encoder_state or {})):
        for key, tensor in state.items():
            for peft_suffix, kohya_suffix in ((".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight")):
                if key.endswith(peft_suffix):
                    module = key[: -len(peft_suffix)]
                    if prefix == "lora_te_" and not module.startswith("text_model."):
                        module = "text_model." + module  # kohya names CLIPTextModel's modules from the outer model
                    name = prefix + module.replace(".", "_")
                    out[name + kohya_suffix] = tensor.to(torch.float16 if tensor.dtype == torch.bfloat16 else tensor.dtype).contiguous()
                    out[name + ".alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
                    break
            else:
                raise ValueError(f"unexpected LoRA tensor {key!r} (only lora_A/lora_B weights are supported)")
    return out


_MODEL_HASHES: dict[tuple[str, int, int], tuple[str, str]] = {}  # a run writes many files: the model is read once


def model_file_hashes(path: Path) -> tuple[str, str]:
    """sd-scripts' `ss_sd_model_hash` (`train_util.model_hash`: the first 8 hex digits of the SHA-256 of the 0x10000
    bytes at offset 0x100000) and `ss_new_sd_model_hash` (`calculate_sha256`: the SHA-256 of the whole file)."""
    info = path.stat()
    key = (str(path.resolve()), info.st_size, info.st_mtime_ns)
    if key not in _MODEL_HASHES:
        whole = hashlib.sha256()
        with open(path, "rb") as handle:
            handle.seek(0x100000)
            legacy = hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]
            handle.seek(0)
            for block in iter(lambda: handle.read(1 << 20), b""):
                whole.update(block)
        _MODEL_HASHES[key] = (legacy, whole.hexdigest())
    return _MODEL_HASHES[key]


def kohya_model_name(base_model: str) -> str:
    """`ss_sd_model_name` as sd-scripts writes it: a local file or folder by its basename (never the full path, which
    would leak into shared LoRAs), a Hub id as given; a workbench preset as the Hub id it stands for."""
    from workbench.models import PRESETS

    preset = PRESETS.get(base_model)
    if preset is not None:
        return preset.sd
    text = base_model.strip()
    looks_local = (
        text.startswith(("/", "~", ".", "\\")) or "\\" in text or re.match(r"^[A-Za-z]:", text) is not None
        or text.lower().endswith((".safetensors", ".ckpt", ".bin", ".pt", ".pth")) or Path(text).expanduser().exists()
    )
    if not looks_local:
        return text
    parts = [part for part in re.split(r"[\\/]", text) if part]
    return parts[-1] if parts else text


def _dataset_dir(image: Any) -> str:
    """The folder name kohya would have for an image: `<repeats>_<concept>` for a concept, else the image's folder."""
    if getattr(image, "concept", None):
        prefix = f"{getattr(image, 'repeats', 1)}_"
        # a concept named by its folder already (`3_ohwx woman`, beside `10_ohwx woman`'s "ohwx woman") keeps that name
        return image.concept if image.concept.startswith(prefix) else prefix + image.concept
    return Path(str(image.path)).parent.name or "images"


def kohya_dataset_info(images: Sequence[Any]) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """sd-scripts' `ss_dataset_dirs` ({dir: {n_repeats, img_count}}) and `ss_tag_frequency` ({dir: {tag: count}}):
    tags are the comma-separated caption parts, stripped and lower-cased, counted once per image (not per repeat)."""
    dirs: dict[str, dict[str, int]] = {}
    tags: dict[str, dict[str, int]] = {}
    for image in images:
        name = _dataset_dir(image)
        info = dirs.setdefault(name, {"n_repeats": int(getattr(image, "repeats", 1)), "img_count": 0})
        info["img_count"] += 1
        frequency = tags.setdefault(name, {})
        for tag in (getattr(image, "caption", "") or "").split(","):
            tag = tag.strip().lower()
            if tag:
                frequency[tag] = frequency.get(tag, 0) + 1
    return dirs, tags


def _optimizer_name(config: Any) -> str:
    """`ss_optimizer` as sd-scripts writes it: the optimizer class's module path and name, then its arguments."""
    name = "bitsandbytes.optim.adamw.AdamW8bit" if getattr(config, "use_8bit_adam", False) else "torch.optim.adamw.AdamW"
    args = f"betas=({config.adam_beta1}, {config.adam_beta2}),weight_decay={config.adam_weight_decay},eps={config.adam_epsilon}"
    return f"{name}({args})"


def model_spec(*, v2: bool, prediction_type: str, resolution: int, title: str, lora: bool) -> dict[str, str]:
    """Stability AI's ModelSpec (`modelspec.*`) keys, as sd-scripts writes them: model managers and UIs (SwarmUI, ComfyUI
    tools) read the architecture and the prediction type from these, not from the `ss_*` keys."""
    v = prediction_type == "v_prediction"
    architecture = ("stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512") if v2 else "stable-diffusion-v1"
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture + ("/lora" if lora else ""),
        # sd-scripts' values: an SD 1/2 LoRA is "diffusers", a whole checkpoint Stability AI's layout
        "modelspec.implementation": "diffusers" if lora else "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": "v" if v else "epsilon",
    }


def kohya_metadata(
    config: Any,
    *,
    base_model: str,
    image_count: int,
    steps: int,
    seconds: float,
    num_train_images: int | None = None,
    images: Sequence[Any] | None = None,
    epoch: int | None = None,
    cache_latents: bool | None = None,
    reg_images: int = 0,
    started_at: float | None = None,
    num_processes: int = 1,
    buckets: dict | None = None,
    v2: bool = False,
    prediction_type: str = "epsilon",
) -> dict[str, str]:
    """`ss_*` training metadata (all strings), as sd-scripts writes it, and its `modelspec.*` keys.

    `num_train_images` is kohya's count (images × repeats); without it, it comes from `images` (sum of their
    repeats), else `image_count`. `images` (the run's TrainImages) also gives `ss_dataset_dirs` and
    `ss_tag_frequency`. `cache_latents` is whether latents really were cached (random crop and colour jitter bypass
    the cache); without it, it is decided from `config` as the training loop decides it. `seconds` is the training
    time (over all the sessions of a resumed run), `started_at` when its first session began (else now − seconds).
    `buckets` (min_bucket_reso, max_bucket_reso, no_upscale) are the bucket settings the run trained with. `v2` (an SD
    2.x base) and `prediction_type` (the scheduler's, as trained) say how a UI must sample with the LoRA.
    """
    from pipelines.train.data import uses_latent_cache

    if num_train_images is None:
        num_train_images = sum(int(getattr(im, "repeats", 1)) for im in images) if images is not None else image_count
    if cache_latents is None:
        cache_latents = uses_latent_cache(config)
    finished = time.time()
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.effective_lora_alpha),
        "ss_base_model_version": "sd_v2" if v2 else "sd_v1",
        "ss_v2": str(v2),
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "ss_sd_model_name": kohya_model_name(base_model),
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_num_train_images": str(num_train_images),
        # the run's length; ss_steps the steps trained so far (a checkpoint's LoRA is written part of the way)
        "ss_max_train_steps": str(getattr(config, "max_train_steps", None) or steps),
        "ss_steps": str(steps),
        "ss_learning_rate": str(config.learning_rate),
        # the rate the text encoder really trained at ("None", as sd-scripts writes it, when it did not train)
        "ss_text_encoder_lr": str(config.text_encoder_lr or config.learning_rate if config.train_text_encoder else None),
        "ss_num_reg_images": str(reg_images),  # DreamBooth class images (sd-scripts' regularisation images)
        "ss_network_train_unet_only": str(not config.train_text_encoder),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_optimizer": _optimizer_name(config),
        "ss_max_grad_norm": str(config.max_grad_norm),
        "ss_train_batch_size": str(config.train_batch_size),
        "ss_batch_size_per_device": str(config.train_batch_size),
        "ss_total_batch_size": str(config.train_batch_size * num_processes * config.gradient_accumulation_steps),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_mixed_precision": config.mixed_precision,
        "ss_seed": str(config.seed),
        "ss_clip_skip": "None",
        "ss_max_token_length": str(getattr(config, "max_token_length", None)),
        "ss_min_snr_gamma": str(config.snr_gamma),
        "ss_noise_offset": str(config.noise_offset),
        "ss_caption_dropout_rate": str(config.caption_dropout),
        "ss_shuffle_caption": str(config.shuffle_tags),
        "ss_keep_tokens": str(config.keep_tokens),
        "ss_enable_bucket": "True",
        "ss_flip_aug": str(config.random_flip),
        "ss_color_aug": str(bool(config.color_jitter)),
        "ss_random_crop": str(config.random_crop),
        "ss_cache_latents": str(bool(cache_latents)),
        "ss_prior_loss_weight": str(config.prior_loss_weight),
        "ss_training_started_at": str(finished - seconds if started_at is None else started_at),
        "ss_training_finished_at": str(finished),
        "ss_training_seconds": f"{seconds:.1f}",
        "ss_training_comment": "trained with workbench",
        "ss_network_args": json.dumps({"target_modules": list(config.lora_target_modules)}),
    }
    model_file = Path(base_model).expanduser()
    if model_file.is_file():  # as sd-scripts identifies a local checkpoint: A1111 shows and matches these hashes
        metadata["ss_sd_model_hash"], metadata["ss_new_sd_model_hash"] = model_file_hashes(model_file)
    if buckets is not None:
        metadata["ss_min_bucket_reso"] = str(buckets["min_bucket_reso"])
        metadata["ss_max_bucket_reso"] = str(buckets["max_bucket_reso"])
        metadata["ss_bucket_no_upscale"] = str(bool(buckets["no_upscale"]))
    if epoch is not None:
        metadata["ss_epoch"] = str(epoch)
        metadata["ss_num_epochs"] = str(epoch)
    if getattr(config, "output_dir", None):
        # A1111 and ComfyUI show a LoRA by its output name; sd-scripts draws a random session id, derived here from
        # the run (its folder and start), so every file a run writes, checkpoints included, says the same
        metadata["ss_output_name"] = Path(config.output_dir).name
        session = f"{config.output_dir}|{metadata['ss_training_started_at']}".encode()
        metadata["ss_session_id"] = str(int.from_bytes(hashlib.sha256(session).digest()[:4], "big"))
    metadata.update(model_spec(v2=v2, prediction_type=prediction_type, resolution=config.resolution, lora=True,
                               title=metadata.get("ss_output_name", "LoRA")))
    if images is not None:
        dirs, tags = kohya_dataset_info(images)
        metadata["ss_dataset_dirs"] = json.dumps(dirs)
        metadata["ss_tag_frequency"] = json.dumps(tags)
        info = kohya_bucket_info(images)
        metadata["ss_bucket_info"] = json.dumps(info)
        # as sd-scripts counts an epoch: each bucket's images with repeats, in batches, shared out among the
        # processes (its len(train_dataloader) after accelerate's prepare)
        batches = sum(-(-bucket["count"] // config.train_batch_size) for bucket in info["buckets"].values())
        metadata["ss_num_batches_per_epoch"] = str(-(-batches // num_processes))
    return metadata


def kohya_bucket_info(images: Sequence[Any]) -> dict:
    """sd-scripts' `ss_bucket_info`: each bucket's resolution and image count (with repeats), and the mean
    difference between an image's aspect ratio and its bucket's."""
    counts: dict[tuple[int, int], int] = {}
    errors = []
    for image in images:
        bucket = tuple(image.bucket)
        counts[bucket] = counts.get(bucket, 0) + int(getattr(image, "repeats", 1))
        width, height = image.resized
        errors.append(abs(bucket[0] / bucket[1] - width / height))
    buckets = {str(i): {"resolution": list(bucket), "count": n}
               for i, (bucket, n) in enumerate(sorted(counts.items()))}  # sd-scripts sorts its resolutions
    return {"buckets": buckets, "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}


def addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """sd-scripts' `train_util.precalculate_safetensors_hashes`: (`sshs_model_hash`, `sshs_legacy_hash`).

    The file is serialized with only the `ss_*` metadata (so later user metadata cannot change the hashes);
    `addnet_hash_safetensors` is the SHA-256 of everything after the 8-byte header length and the header (the tensor
    data), `addnet_hash_legacy` the first 8 hex digits of the SHA-256 of the 0x10000 bytes at offset 0x100000.
    sd-webui-additional-networks and A1111 use them to identify the network.
    """
    from safetensors.torch import save

    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_length = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_length :]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def save_kohya_lora(
    output_dir: Path,
    unet: torch.nn.Module,
    config: Any,
    *,
    text_encoder: torch.nn.Module | None = None,
    base_model: str,
    image_count: int,
    steps: int,
    seconds: float,
    num_train_images: int | None = None,
    images: Sequence[Any] | None = None,
    epoch: int | None = None,
    cache_latents: bool | None = None,
    reg_images: int = 0,
    started_at: float | None = None,
    num_processes: int = 1,
    buckets: dict | None = None,
    prediction_type: str = "epsilon",
) -> Path:
    """Write `lora_kohya.safetensors` (kohya keys, `ss_*` metadata with sd-scripts' model hashes).

    The optional arguments refine the metadata (see `kohya_metadata`); leaving them out still writes a valid file.
    """
    from pipelines.train.config import save_dtype
    from pipelines.train.single_file import is_sd_v2

    tensors = kohya_state_dict(
        peft_lora_state(unet), config.effective_lora_alpha, peft_lora_state(text_encoder) if text_encoder is not None else None
    )
    tensors = {key: tensor.to(save_dtype(config)) for key, tensor in tensors.items()}  # alphas too, as sd-scripts saves
    metadata = kohya_metadata(
        config, base_model=base_model, image_count=image_count, steps=steps, seconds=seconds,
        num_train_images=num_train_images, images=images, epoch=epoch, cache_latents=cache_latents, reg_images=reg_images,
        started_at=started_at, num_processes=num_processes, buckets=buckets, v2=is_sd_v2(unet.config),
        prediction_type=prediction_type,
    )
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = addnet_hashes(tensors, metadata)
    path = output_dir / KOHYA_LORA_FILE
    save_file(tensors, str(path), metadata=metadata)
    return path
