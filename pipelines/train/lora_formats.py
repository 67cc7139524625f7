"""LoRA files: diffusers `pytorch_lora_weights.safetensors` and kohya-keyed `lora_kohya.safetensors`.

kohya / A1111 / ComfyUI keys are `lora_unet_<diffusers module path, dots as underscores>` (and
`lora_te_<text-encoder path>`) + `.lora_down.weight`, `.lora_up.weight`, `.alpha`; `ss_*` strings in
the safetensors header describe the training (sd-scripts `networks/lora.py`). diffusers'
`load_lora_weights` recognises these keys and converts them.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_LORA_FILE = "lora_kohya.safetensors"


def peft_lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a peft-adapted model, keyed by module path + `.lora_A.weight`/`.lora_B.weight`."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in get_peft_model_state_dict(model).items()}


def save_diffusers_lora(output_dir: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None) -> Path:
    """Write `pytorch_lora_weights.safetensors` the way diffusers' own training examples do."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    unet_layers = convert_state_dict_to_diffusers(peft_lora_state(unet))
    text_layers = convert_state_dict_to_diffusers(peft_lora_state(text_encoder)) if text_encoder is not None else None
    # the adapter config (rank, alpha, targets) travels in the header, or loaders assume alpha = rank
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(output_dir), unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers,
        weight_name=DIFFUSERS_LORA_FILE, safe_serialization=True,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=text_encoder.peft_config["default"].to_dict() if text_encoder is not None else None,
    )
    return output_dir / DIFFUSERS_LORA_FILE


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


def kohya_metadata(config: Any, *, base_model: str, image_count: int, steps: int, seconds: float) -> dict[str, str]:
    """`ss_*` training metadata (all strings), as sd-scripts writes it."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.effective_lora_alpha),
        "ss_base_model_version": "sd_v1",
        "ss_sd_model_name": base_model,
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_num_train_images": str(image_count),
        "ss_max_train_steps": str(steps),
        "ss_steps": str(steps),
        "ss_learning_rate": str(config.learning_rate),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_train_batch_size": str(config.train_batch_size),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_mixed_precision": config.mixed_precision,
        "ss_seed": str(config.seed),
        "ss_min_snr_gamma": str(config.snr_gamma),
        "ss_noise_offset": str(config.noise_offset),
        "ss_caption_dropout_rate": str(config.caption_dropout),
        "ss_shuffle_caption": str(config.shuffle_tags),
        "ss_keep_tokens": str(config.keep_tokens),
        "ss_enable_bucket": "True",
        "ss_flip_aug": str(config.random_flip),
        "ss_random_crop": str(config.random_crop),
        "ss_cache_latents": str(config.cache_latents),
        "ss_text_encoder_lr": str(config.text_encoder_lr if config.train_text_encoder else None),
        "ss_training_finished_at": str(time.time()),
        "ss_training_seconds": f"{seconds:.1f}",
        "ss_training_comment": "trained with workbench",
        "ss_network_args": json.dumps({"target_modules": list(config.lora_target_modules)}),
    }


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
) -> Path:
    """Write `lora_kohya.safetensors` (kohya keys, `ss_*` metadata with sd-scripts' model hashes)."""
    tensors = kohya_state_dict(
        peft_lora_state(unet), config.effective_lora_alpha, peft_lora_state(text_encoder) if text_encoder is not None else None
    )
    metadata = kohya_metadata(config, base_model=base_model, image_count=image_count, steps=steps, seconds=seconds)
    # sd-scripts' sshs_model_hash: SHA-256 of the tensors (A1111 uses it to identify the network)
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].numpy().tobytes())
    metadata["sshs_model_hash"] = digest.hexdigest()
    path = output_dir / KOHYA_LORA_FILE
    save_file(tensors, str(path), metadata=metadata)
    return path
