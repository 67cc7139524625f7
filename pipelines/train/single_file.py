"""One-file Stable Diffusion 1.x and 2.x checkpoints in the original (LDM / CompVis) layout, as A1111 and ComfyUI
load them.

Keys: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE), `cond_stage_model.transformer.*` (SD 1.x's
CLIP text encoder) or `cond_stage_model.model.*` (SD 2.x's OpenCLIP). The renaming is the inverse of what diffusers'
single-file loader does (`loaders/single_file_utils.py`); the block indices are computed from the UNet's
`layers_per_block` instead of being fixed to SD 1.5's, so any SD-shaped UNet (the tiny preset included) converts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}


def _unet_prefixes(config) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) for every block of the UNet."""
    per = config.layers_per_block
    blocks = len(config.block_out_channels)
    pairs = []
    for i, kind in enumerate(config.down_block_types):
        for j in range(per):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(per + 1) * i + j + 1}.0."))
            if "CrossAttn" in kind:
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(per + 1) * i + j + 1}.1."))
        if i < blocks - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(per + 1) * (i + 1)}.0.op."))
    for i, kind in enumerate(config.up_block_types):
        for j in range(per + 1):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(per + 1) * i + j}.0."))
            if "CrossAttn" in kind:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(per + 1) * i + j}.1."))
        if i < blocks - 1:
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(per + 1) * i + per}.{2 if 'CrossAttn' in kind else 1}."))
    pairs.append(("mid_block.attentions.0.", "middle_block.1."))
    pairs.extend((f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2))
    return pairs


def ldm_unet_state(unet) -> dict[str, torch.Tensor]:
    prefixes = _unet_prefixes(unet.config)
    out = {}
    for key, tensor in unet.state_dict().items():
        new = key
        for hf, ldm in _UNET_TOP.items():
            if key.startswith(hf + "."):
                new = ldm + key[len(hf):]
                break
        else:
            for hf, ldm in prefixes:
                if key.startswith(hf):
                    rest = key[len(hf):]
                    if ".resnets." in hf:
                        for a, b in _RESNET:
                            if rest.startswith(a + "."):
                                rest = b + rest[len(a):]
                                break
                    new = ldm + rest
                    break
            else:
                raise ValueError(f"UNet key {key!r} has no SD 1.x (LDM) name: not an SD-1.x-shaped UNet")
        out["model.diffusion_model." + new] = tensor
    return out


def ldm_vae_state(vae) -> dict[str, torch.Tensor]:
    blocks = len(vae.config.block_out_channels)
    pairs = []
    for i in range(blocks):
        for j in range(vae.config.layers_per_block):
            pairs.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}."))
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        for j in range(vae.config.layers_per_block + 1):
            pairs.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{blocks - 1 - i}.block.{j}."))
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{blocks - 1 - i}.upsample."))
    for part in ("encoder", "decoder"):
        pairs.extend((f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.") for k in range(2))
        pairs.append((f"{part}.conv_norm_out.", f"{part}.norm_out."))
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, tensor in vae.state_dict().items():
        new = key
        for hf, ldm in pairs:
            if key.startswith(hf):
                new = ldm + key[len(hf):]
                break
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        for part in ("encoder", "decoder"):
            prefix = f"{part}.mid_block.attentions.0."
            if key.startswith(prefix):
                name, _, leaf = key[len(prefix):].rpartition(".")
                new = f"{part}.mid.attn_1.{attention[name]}.{leaf}"
                if leaf == "weight" and name != "group_norm":
                    tensor = tensor.reshape(*tensor.shape, 1, 1)  # LDM's attention uses 1x1 convs
        out["first_stage_model." + new] = tensor
    return out


_OPENCLIP_LAYER = [("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
                   ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")]
_OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def _text_weights(text_encoder) -> dict[str, torch.Tensor]:
    """The text encoder's weights named below `text_model.` (transformers 5 names CLIPTextModel's without that level)."""
    return {key.removeprefix("text_model."): tensor for key, tensor in text_encoder.state_dict().items()
            if not key.endswith("position_ids")}


def ldm_openclip_text_state(text_encoder) -> dict[str, torch.Tensor]:
    """An SD 2.x text encoder in the original OpenCLIP layout (`cond_stage_model.model.*`), the inverse of diffusers'
    `convert_open_clip_checkpoint`: q, k and v joined as `in_proj_weight`. OpenCLIP's last block and text projection,
    which SD 2.x never uses (it reads the penultimate layer) and diffusers drops, are not written."""
    weights, out = _text_weights(text_encoder), {}
    prefix = "cond_stage_model.model."
    for name, new in _OPENCLIP_TOP.items():
        out[prefix + new] = weights.pop(name)
    layers = sorted({int(key.split(".")[2]) for key in weights if key.startswith("encoder.layers.")})
    for i in layers:
        here, there = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{there}attn.in_proj_{leaf}"] = torch.cat([weights.pop(f"{here}self_attn.{part}_proj.{leaf}") for part in "qkv"])
        for key in [key for key in weights if key.startswith(here)]:
            rest = key[len(here):]
            for a, b in _OPENCLIP_LAYER:
                if rest.startswith(a):
                    out[there + b + rest[len(a):]] = weights.pop(key)
                    break
    if weights:
        raise ValueError(f"text encoder weights with no OpenCLIP name: {sorted(weights)[:3]}")
    return out


def is_sd_v2(unet_config) -> bool:
    """Whether a UNet is SD 2.x-shaped: its cross-attention reads OpenCLIP ViT-H's 1024-wide states (SD 1.x: 768)."""
    return getattr(unet_config, "cross_attention_dim", 768) == 1024


def save_ldm_checkpoint(path: Path, unet, vae, text_encoder, metadata: dict[str, str] | None = None,
                        dtype: torch.dtype = torch.float32) -> Path:
    """Write one safetensors file in the original layout A1111 and ComfyUI load: UNet, VAE and the text encoder, as
    SD 1.x's CLIP (`cond_stage_model.transformer.*`) or, for an SD 2.x model (1024-wide cross-attention), as its
    OpenCLIP (`cond_stage_model.model.*`)."""
    tensors = {**ldm_unet_state(unet), **ldm_vae_state(vae)}
    if is_sd_v2(unet.config):
        tensors.update(ldm_openclip_text_state(text_encoder))
    else:
        tensors.update({"cond_stage_model.transformer.text_model." + name: tensor
                        for name, tensor in _text_weights(text_encoder).items()})
    save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {})
    return path
