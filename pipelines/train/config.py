"""Every training option in one dataclass, loadable from TOML; names follow the diffusers examples."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

MODES = ("lora", "dreambooth", "finetune")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)
# the learning-rate schedules each schedule setting applies to (diffusers' get_scheduler)
SCHEDULE_OPTIONS = {
    "lr_warmup_steps": ("constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"),
    "lr_num_cycles": ("cosine_with_restarts",),
    "lr_power": ("polynomial",),
}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "v_prediction")
MIXED_PRECISION = ("no", "fp16", "bf16")
SAVE_PRECISIONS = {"float": "float32", "fp16": "float16", "bf16": "bfloat16"}  # sd-scripts' names → torch dtypes
DEVICES = ("cpu", "cuda", "mps")
SNAPSHOT_FILE = "dataset.json"  # a run's own copy of its options and dataset, in its folder
# what --resume may change: how long, how often to save and sample, where and how to log and cache, and how the
# same computation runs (memory and speed: a run that ran out of memory must be able to resume with
# --gradient-checkpointing). Fused and unfused AdamW, channels-last and compiled kernels may differ in the last
# bits, as cached and uncached latents do; nothing here changes what is trained. Anything else would make the
# continued run a different run than the one its checkpoint belongs to.
RESUME_MAY_CHANGE = frozenset({
    "resume", "output_dir", "max_train_steps", "num_train_epochs", "checkpointing_steps", "checkpointing_epochs", "checkpoints_total_limit",
    "validation_prompt", "validation_steps", "num_validation_images", "validation_seed", "validation_inference_steps",
    "validation_guidance_scale", "report_to", "evaluate", "clip_model", "device", "dataloader_num_workers",
    "cache_dir", "cache_memory_mb", "cache_latents", "cache_text_embeddings", "torch_compile",
    "gradient_checkpointing", "fused_adam", "channels_last", "cudnn_benchmark", "save_precision",
})
# learning rate when none is given: a LoRA trains new low-rank weights (diffusers' LoRA examples: 1e-4); a full
# UNet is the real model, which 1e-4 wrecks (diffusers' train_dreambooth.py: 5e-6; fine-tunes use ~1e-5); a UNet
# from scratch has nothing to keep and needs the high rate
DEFAULT_LEARNING_RATES = {"lora": 1e-4, "dreambooth": 5e-6, "finetune": 1e-5, "from_scratch": 1e-4}
# options only some runs use: given where they are not used they would be silently ignored, so validate() refuses
# them. "Given" is "not the default" (a TOML shared between modes may keep defaults; the TUI sends its rank).
LORA_OPTIONS = ("rank", "lora_alpha", "lora_target_modules", "text_encoder_target_modules")  # lora mode only
EMA_OPTIONS = ("use_ema", "ema_decay")  # full-UNet modes (dreambooth, finetune)
TEXT_ENCODER_OPTIONS = ("text_encoder_lr", "text_encoder_target_modules")  # with train_text_encoder only
PRIOR_OPTIONS = ("class_prompt", "num_class_images", "prior_loss_weight", "max_class_images", "sample_batch_size",
                 "prior_inference_steps")  # with_prior_preservation only
SHUFFLE_OPTIONS = ("keep_tokens",)  # with shuffle_tags only: the tags kept in front of the shuffled ones
OPTION_FLAGS = {  # how messages name an option: its flag where `workbench train` has one, else its --set key
    "rank": "--rank", "lora_alpha": "--lora-alpha", "use_ema": "--use-ema", "class_prompt": "--class-prompt",
    "num_class_images": "--num-class-images", "prior_loss_weight": "--prior-loss-weight", "keep_tokens": "--keep-tokens",
    "lr_warmup_steps": "--lr-warmup-steps",
}
# list options whose items never hold a comma (layer names): a plain "to_q, to_k" (as --set gives it) is split on
# commas. validation_prompt (sentences) and concepts (concept names) may hold commas: text there is one item, a
# list gives several (--set 'validation_prompt=["a dog, sitting", "a cat"]', or the repeatable flags).
COMMA_LIST_OPTIONS = ("lora_target_modules", "text_encoder_target_modules")
ONE_ITEM_LIST_OPTIONS = ("validation_prompt", "concepts")
LIST_OPTIONS = COMMA_LIST_OPTIONS + ONE_ITEM_LIST_OPTIONS  # options that take several values: given twice, they add up
# kohya-ss sd-scripts option → the workbench option that does the same (a kohya train.toml is refused with these
# names, not read: the values do not all mean the same). sd-scripts options of the same name (train_batch_size,
# max_train_steps, learning_rate, text_encoder_lr, lr_scheduler, lr_warmup_steps, mixed_precision, seed,
# gradient_checkpointing, gradient_accumulation_steps, max_grad_norm, keep_tokens, random_crop, noise_offset,
# prior_loss_weight, output_dir, resume, cache_latents, use_8bit_adam, caption_prefix, min_bucket_reso,
# max_bucket_reso, bucket_reso_steps, bucket_no_upscale, resolution, save_precision, max_token_length) are workbench
# options already.
KOHYA_OPTIONS = {
    "pretrained_model_name_or_path": "model",
    "network_dim": "rank",
    "network_alpha": "lora_alpha",
    "shuffle_caption": "shuffle_tags",
    "caption_dropout_rate": "caption_dropout",
    "save_every_n_steps": "checkpointing_steps",
    "save_every_n_epochs": "checkpointing_epochs",
    "max_train_epochs": "num_train_epochs",
    "unet_lr": "learning_rate",
    "lr_scheduler_num_cycles": "lr_num_cycles",
    "lr_scheduler_power": "lr_power",
    "min_snr_gamma": "snr_gamma",
    "flip_aug": "random_flip",
    "color_aug": "color_jitter",
    "max_data_loader_n_workers": "dataloader_num_workers",
    "cache_latents_to_disk": "cache_latents",
    "cache_text_encoder_outputs": "cache_text_embeddings",
    "sample_every_n_steps": "validation_steps",
    "sample_prompts": "validation_prompt",
    "log_with": "report_to",
    "v_parameterization": "prediction_type",
    "optimizer_type": "use_8bit_adam",
    "network_train_unet_only": "train_text_encoder",
}
KOHYA_NOTES = {  # what differs where the workbench option is not the same value under another name
    "color_aug": "a strength such as 0.1, not true/false",
    "network_dim": "with lora_alpha = 1 for kohya's default scale (without it, alpha is the rank here)",
    "cache_latents_to_disk": "its latent cache is on disk, in cache_dir",
    "sample_prompts": "the prompts themselves, not a file; one prompt as text, several as a list",
    "log_with": "tensorboard or none",
}
# said where kohya's LoRA options come without network_train_unet_only (a config file, or pasted on the command line)
KOHYA_TEXT_ENCODER_NOTE = ("kohya's train_network.py trains the text encoder's LoRA as well (without "
                           "network_train_unet_only); the workbench trains the UNet's alone unless train_text_encoder = true.")
KOHYA_NONE = {  # sd-scripts options with no workbench counterpart, and why
    "output_name": "a run is named by its output_dir",
    "debug_dataset": "`--show-batches N` prints the first N steps' images, buckets and captions as they will train, and exits",
    "network_module": "`workbench train lora` trains its own LoRA",
    "network_args": "", "network_dropout": "", "network_weights": "", "network_train_text_encoder_only": "",
    "train_data_dir": "images come from the catalog (`workbench ingest`)",
    "reg_data_dir": "class images come from `workbench priors` (with_prior_preservation)",
    "dataset_config": "images come from the catalog (`workbench import-kohya dataset.toml` reads its subsets)", "caption_extension": "captions are in the catalog",
    "num_repeats": "repeats are per concept: `workbench concept add NAME --repeats N`",
    "enable_bucket": "training always uses buckets",
    "keep_tokens_separator": "", "secondary_separator": "", "caption_separator": "", "enable_wildcard": "",
    "caption_suffix": "", "caption_tag_dropout_rate": "", "caption_dropout_every_n_epochs": "",
    "weighted_captions": "", "token_warmup_min": "", "token_warmup_step": "", "face_crop_aug_range": "",
    "save_last_n_steps": "checkpoints_total_limit keeps the newest N checkpoints",
    "save_last_n_epochs": "checkpoints_total_limit keeps the newest N checkpoints",
    "save_state": "every checkpoint holds the training state",
    "save_model_as": "", "training_comment": "",
    "logging_dir": "logs go in the run's output_dir",
    "optimizer_args": "", "lr_scheduler_args": "", "full_fp16": "use mixed_precision", "full_bf16": "use mixed_precision",
    "xformers": "diffusers picks the attention", "sdpa": "diffusers picks the attention", "mem_eff_attn": "diffusers picks the attention",
    "clip_skip": "", "v2": "the model's own config says", "vae": "the model's own VAE is used",
    "sample_sampler": "", "sample_every_n_epochs": "samples are made every validation_steps steps (kohya's sample_every_n_steps)",
    "persistent_data_loader_workers": "", "lowram": "", "highvram": "",
    "noise_offset_random_strength": "", "adaptive_noise_scale": "", "multires_noise_iterations": "",
    "multires_noise_discount": "", "ip_noise_gamma": "", "zero_terminal_snr": "", "min_timestep": "", "max_timestep": "",
    "loss_type": "", "huber_c": "", "huber_schedule": "", "scale_v_pred_loss_like_noise_pred": "",
    "debiased_estimation_loss": "",
}


class ConfigError(ValueError):
    """A training option is missing, unknown or out of range; the message says which."""


@dataclass
class TrainConfig:
    """All options of `workbench train`. Field names are the diffusers example flags with '_' for '-'."""

    mode: str = "lora"
    model: str = "tiny"  # preset (tiny, sd15), HF id, local diffusers folder or single-file checkpoint
    output_dir: str | None = None  # default: <project>/runs/<mode>-<timestamp>
    device: str | None = None  # None = accelerate's choice (cuda when present)

    # data
    resolution: int = 512  # bucket target area is resolution²
    train_batch_size: int = 1
    dataloader_num_workers: int = 0
    concepts: list[str] = field(default_factory=list)  # train only these concepts (empty = whole dataset)
    instance_prompt: str | None = None  # the caption of every instance image (diffusers' DreamBooth), in place of theirs
    caption_dropout: float = 0.0  # probability of training on the empty caption
    shuffle_tags: bool = False  # shuffle comma-separated tags after the first keep_tokens
    keep_tokens: int = 0
    caption_prefix: str = ""  # e.g. a trigger word, prepended to every caption
    random_crop: bool = False  # bypasses the latent cache (a new crop every time)
    random_flip: bool = False  # exact: both flip variants are cached
    color_jitter: float = 0.0  # brightness/contrast/saturation strength; bypasses the latent cache
    min_bucket_reso: int | None = None  # None: as the last `workbench buckets` run at this resolution, else kohya's 256
    max_bucket_reso: int | None = None  # else 1024
    bucket_reso_steps: int | None = None  # else 64
    bucket_no_upscale: bool | None = None  # else False
    cache_latents: bool = True
    cache_text_embeddings: bool = True  # only used while the text encoder is frozen and tags are not shuffled
    cache_dir: str | None = None  # default: $WORKBENCH_HOME/cache/train
    cache_memory_mb: int = 1024  # cached latents/text kept in RAM during a run (0: read from disk every time)

    # steps
    max_train_steps: int | None = None
    num_train_epochs: int = 1  # used when max_train_steps is not set
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    allow_tf32: bool = True  # CUDA: TF32 matmuls/convs where fp32 is used (diffusers' --allow_tf32)
    cudnn_benchmark: bool = True  # CUDA: let cuDNN pick the fastest conv kernels (buckets keep shapes few)
    # UNet in channels-last memory format. None: on CUDA (an H100 ran 6.85 steps/s with it, 5.16-6.45 without, at
    # SD-1.5 size), off on CPU, where the exact-resume tests run in the standard layout
    channels_last: bool | None = None
    torch_compile: bool = False  # compile the UNet's transformer blocks: faster steps after a one-time compile
    mixed_precision: str = "no"
    # the dtype of the files A1111 and ComfyUI load (both LoRA files, model.safetensors); None: float32, as trained.
    # fp16 halves an SD 1.5 checkpoint (4.3 to 2.1 GB); pipeline/ and the checkpoints stay float32, to train on
    save_precision: str | None = None
    seed: int = 0

    # optimiser
    learning_rate: float | None = None  # None: the mode's (DEFAULT_LEARNING_RATES), filled in by validate()
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    use_8bit_adam: bool = False
    fused_adam: bool = True  # torch's fused AdamW kernel (CPU and CUDA); off: the per-tensor loop
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0

    # loss and noise
    snr_gamma: float | None = None  # min-SNR weighting; 5.0 is the paper's recommendation
    noise_offset: float = 0.0
    beta_schedule: str | None = None  # None keeps the model's schedule
    prediction_type: str | None = None  # None keeps the model's

    # captions: kohya's long captions, read in windows of the text encoder's 75 tokens (150 or 225); None: 75
    max_token_length: int | None = None

    # LoRA
    rank: int = 4
    lora_alpha: float | None = None  # default: rank (scale 1)
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None
    text_encoder_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])

    # DreamBooth
    # None: on for dreambooth, off for lora (on: DreamBooth-LoRA, diffusers' train_dreambooth_lora.py); never finetune
    with_prior_preservation: bool | None = None
    prior_loss_weight: float = 1.0
    class_prompt: str | None = None  # default: per concept from its class noun
    num_class_images: int | None = None  # default: 200 × instance images, capped by max_class_images
    max_class_images: int = 1000
    sample_batch_size: int = 4  # class images generated per batch
    prior_inference_steps: int = 30  # sampling steps per generated class image

    # fine-tune
    use_ema: bool = False
    ema_decay: float = 0.9999
    from_scratch: bool = False

    # checkpoints, validation, logging
    checkpointing_steps: int = 500
    checkpointing_epochs: int | None = None  # also a checkpoint at the end of every N epochs (kohya's save_every_n_epochs)
    checkpoints_total_limit: int | None = None
    resume: str | None = None  # "latest" or a checkpoint folder
    validation_prompt: list[str] = field(default_factory=list)
    validation_steps: int = 100
    num_validation_images: int = 2  # per prompt; 0 turns sample grids (and evaluation) off
    validation_seed: int = 0
    validation_inference_steps: int = 25
    validation_guidance_scale: float = 7.5
    report_to: str = "tensorboard"  # or "none"
    evaluate: bool = True  # CLIP score and CMMD of the final samples, stored with the run
    clip_model: str | None = None  # CLIP for evaluation; default: the --model preset's CLIP

    def validate(self) -> "TrainConfig":
        """Check ranges and choices, refuse given options this run would ignore, and fill in the mode's learning rate
        when none was given; return self so calls chain."""
        for name in ONE_ITEM_LIST_OPTIONS:  # one text (as from Python): one item, not a list of its letters
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        for name in ONE_ITEM_LIST_OPTIONS + COMMA_LIST_OPTIONS:  # a tuple is a list
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        wrong = _type_errors({f.name: getattr(self, f.name) for f in fields(self)})
        if wrong:  # as a TOML file's: a TypeError deep in the run otherwise, or "false" taken as true
            raise ConfigError("; ".join(wrong))
        # defaults an earlier validate filled in are filled in again: a config reused for another mode (a notebook)
        # trained DreamBooth at LoRA's learning rate and without prior preservation
        for name, value in getattr(self, "_filled_defaults", {}).items():
            if getattr(self, name) == value:
                setattr(self, name, None)
        filled = {}
        if self.learning_rate is None and self.mode in MODES:
            self.learning_rate = filled["learning_rate"] = DEFAULT_LEARNING_RATES["from_scratch" if self.from_scratch else self.mode]
        if self.with_prior_preservation is None:
            self.with_prior_preservation = filled["with_prior_preservation"] = self.mode == "dreambooth"
        self._filled_defaults = filled
        # given options this run would ignore (the full-UNet modes have no adapters, lora no EMA, ...)
        ignored = _ignored_by_group(self)
        unused_lora = self._given(ignored["lora"])
        unused_ema = self._given(ignored["ema"])
        unused_text = [n for n in self._given(ignored["text"]) if n not in unused_lora]
        unused_prior = self._given(ignored["prior"])
        unused_shuffle = self._given(ignored["shuffle"])
        unused_schedule = self._given(ignored["schedule"])
        checks = [
            (self.mode in MODES, f"mode must be one of {', '.join(MODES)}"),
            # before ranges: an option this run ignores is to be removed, whatever its value
            (not unused_lora, f"{self.mode} trains the full UNet, not a LoRA: remove {_named(unused_lora)}, "
                              "or use `workbench train lora`"),
            (not unused_ema, f"EMA is for dreambooth and finetune, not lora: remove {_named(unused_ema)}" if self.mode == "lora"
             else "ema_decay is only used with --use-ema: add --use-ema, or remove ema_decay"),
            (not unused_text, f"The text encoder only trains with --train-text-encoder: add it, or remove {_named(unused_text)}"),
            (not unused_prior, f"This {self.mode} run has no class priors: remove {_named(unused_prior)}, or "
             + ("leave out --no-prior-preservation" if self.mode == "dreambooth" else
                "use `workbench train dreambooth` (or `workbench train lora --prior-preservation`)")),
            (not unused_shuffle, f"{_named(unused_shuffle)} only applies when tags are shuffled (the tags kept in "
                                 f"front): add --shuffle-tags, or remove {_named(unused_shuffle)}"),
            (not unused_schedule, "; ".join(
                f"--lr-scheduler {self.lr_scheduler} does not use {_named([name])}, which applies to "
                f"{_named(list(SCHEDULE_OPTIONS[name])).replace(' and ', ' or ')}: pick one of those, or remove {_named([name])}"
                for name in unused_schedule)),
            (self.max_train_steps is None or self.lr_warmup_steps == 0 or self.lr_warmup_steps < self.max_train_steps,
             f"--lr-warmup-steps {self.lr_warmup_steps} is not below --max-train-steps {self.max_train_steps}: the "
             "learning rate would never reach --learning-rate"),
            # an empty list (e.g. --set lora_target_modules=) would give the LoRA no layers to train
            (self.mode != "lora" or bool(self.lora_target_modules),
             "lora_target_modules is empty: name the layers to train, e.g. to_q,to_k,to_v,to_out.0"),
            (self.mode != "lora" or not self.train_text_encoder or bool(self.text_encoder_target_modules),
             "text_encoder_target_modules is empty: name the layers to train, e.g. q_proj,k_proj,v_proj,out_proj"),
            (self.resolution >= 8 and self.resolution % 8 == 0, "--resolution must be a positive multiple of 8"),
            (self.train_batch_size >= 1, "--train-batch-size must be at least 1"),
            # numpy and accelerate take 32-bit seeds; a run records its seed, so -1 ("random") is not one to take
            (0 <= self.seed < 2**32, f"--seed must be between 0 and {2**32 - 1} (got {self.seed}): pick any number, "
                                     "the run records it"),
            (self.with_prior_preservation is False or self.prior_loss_weight > 0,
             f"--prior-loss-weight {self.prior_loss_weight:g} is not above 0, so it trains without the class images it "
             "makes: use --no-prior-preservation instead"),
            (self.max_train_steps is None or self.max_train_steps >= 1, "--max-train-steps must be at least 1"),
            (self.num_train_epochs >= 1, "--num-train-epochs must be at least 1"),
            (self.gradient_accumulation_steps >= 1, "--gradient-accumulation-steps must be at least 1"),
            (self.learning_rate is None or self.learning_rate > 0, "--learning-rate must be positive"),
            (self.lr_scheduler in LR_SCHEDULERS, f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}"),
            (self.mixed_precision in MIXED_PRECISION, "--mixed-precision must be no, fp16 or bf16"),
            (self.save_precision is None or self.save_precision in SAVE_PRECISIONS, "save_precision must be float, fp16 or bf16"),
            (self.max_token_length in (None, 75, 150, 225), "max_token_length must be 75, 150 or 225 (kohya's values)"),
            (self.beta_schedule is None or self.beta_schedule in BETA_SCHEDULES, f"--beta-schedule must be one of {', '.join(BETA_SCHEDULES)}"),
            (self.prediction_type is None or self.prediction_type in PREDICTION_TYPES, "--prediction-type must be epsilon or v_prediction"),
            (self.rank >= 1, "--rank must be at least 1"),
            (self.lora_alpha is None or self.lora_alpha > 0, "--lora-alpha must be positive"),
            (self.device is None or self.device.split(":")[0] in DEVICES, f"--device must be one of {', '.join(DEVICES)} (cuda:N for one GPU)"),
            (self.prior_inference_steps >= 1, "prior_inference_steps must be at least 1"),
            (0.0 <= self.caption_dropout <= 1.0, "--caption-dropout must be between 0 and 1"),
            (self.keep_tokens >= 0, "--keep-tokens must be 0 or more"),
            (self.color_jitter >= 0, "--color-jitter must be 0 or more"),
            (self.cache_memory_mb >= 0, "--cache-memory-mb must be 0 or more"),
            (self.checkpointing_steps >= 1, "--checkpointing-steps must be at least 1"),
            (self.checkpointing_epochs is None or self.checkpointing_epochs >= 1, "checkpointing_epochs must be at least 1"),
            (self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
             "--checkpoints-total-limit must be at least 1 (leave it out to keep every checkpoint)"),
            (self.validation_steps >= 1, "--validation-steps must be at least 1"),
            (self.num_validation_images >= 0, "--num-validation-images must be 0 or more"),
            (self.prior_loss_weight >= 0, "--prior-loss-weight must be positive"),
            (self.class_prompt is None or bool(self.class_prompt.strip()), "--class-prompt is empty: give e.g. \"a photo of a dog\", or leave it out for each concept's class"),
            (self.num_class_images is None or self.num_class_images >= 1, "--num-class-images must be at least 1"),
            (not (self.with_prior_preservation and self.mode == "finetune"),
             "--prior-preservation is for dreambooth and lora (DreamBooth-LoRA), not finetune"),
            (self.max_class_images >= 1, "max_class_images must be at least 1"),
            (self.sample_batch_size >= 1, "sample_batch_size must be at least 1"),
            (self.snr_gamma is None or self.snr_gamma > 0, "--snr-gamma must be positive"),
            (self.noise_offset >= 0, "--noise-offset must be 0 or more"),
            (not (self.from_scratch and self.mode != "finetune"), "--from-scratch only applies to finetune"),
            # diffusers' EMAModel caps its warm-up decay at this: 1 or more leaves no cap (the EMA freezes as the
            # decay creeps to 1), 0 or less averages nothing; both would run without a word
            (0 < self.ema_decay < 1, "ema_decay must be between 0 and 1 (e.g. 0.9999), both excluded"),
            # 0 would silently fall back to --learning-rate
            (self.text_encoder_lr is None or self.text_encoder_lr > 0, "text_encoder_lr must be positive (leave it out for --learning-rate)"),
            (self.lr_warmup_steps >= 0, "--lr-warmup-steps must be 0 or more"),
            (self.lr_num_cycles >= 1, "lr_num_cycles must be at least 1"),
            (self.lr_power > 0, "lr_power must be positive"),  # 0 is a constant rate; below 0 divides by 0 at the end
            # torch's AdamW refuses these only once the model is loaded (and class images made)
            (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam_beta1 and adam_beta2 must be at least 0 and below 1"),
            (self.adam_weight_decay >= 0, "adam_weight_decay must be 0 or more"),
            (self.adam_epsilon > 0, "adam_epsilon must be positive (e.g. 1e-8)"),
            # below 0 clipping would flip the gradients' sign
            (self.max_grad_norm >= 0, "max_grad_norm must be 0 or more (0 turns clipping off)"),
            (self.dataloader_num_workers >= 0, "dataloader_num_workers must be 0 or more"),
            (self.validation_inference_steps >= 1, "validation_inference_steps must be at least 1"),
            (self.report_to in ("tensorboard", "none"), "report_to must be tensorboard or none"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def _given(self, names: tuple[str, ...]) -> list[str]:
        """Those of `names` not at their default: set by the user (a default is never refused)."""
        return [name for name in names if getattr(self, name) != _default(name)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def effective_lora_alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.rank)


FIELD_NAMES = {f.name for f in dataclasses.fields(TrainConfig)}


def _default(name: str) -> Any:
    spec = TrainConfig.__dataclass_fields__[name]
    return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default


def _named(names: list[str]) -> str:
    """'--rank, lora_alpha and lora_target_modules': options as messages name them (OPTION_FLAGS)."""
    named = [OPTION_FLAGS.get(name, name) for name in names]
    return " and ".join(filter(None, [", ".join(named[:-1]), named[-1]])) if named else ""


OTHER_STEP_TABLES = ("filter",)  # tables of workbench.toml a training config may hold, for other commands

# the command's flags whose option is named otherwise (`--concept`, `--prior-preservation`): the same in a file
FLAG_NAMES = {"concept": "concepts", "prior_preservation": "with_prior_preservation"}


def _normalise_keys(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Accept TOML keys written with '-' or '_' (or as the command's flag); refuse unknown keys, all in one message
    (typos should not be silent, and a kohya file should not take a run per key), naming the workbench option where
    there is one."""
    out, keys, unknown, problems = {}, {}, [], []
    for key, value in values.items():
        name = key.replace("-", "_")
        name = FLAG_NAMES.get(name, name)
        if name in keys:  # learning-rate and learning_rate: one of the two would be dropped
            raise ConfigError(f"'{keys[name]}' and '{key}' in {where} are the same option: keep one.")
        keys[name] = key
        if name not in FIELD_NAMES:
            unknown.append((key, _unknown_hint(name, value)))
            continue
        if name in COMMA_LIST_OPTIONS and isinstance(value, str):
            value = _comma_list(value)
        elif name in ONE_ITEM_LIST_OPTIONS and isinstance(value, str):
            value = [value]
        elif name == "resolution" and isinstance(value, str):
            value = _resolution(value)
            if isinstance(value, tuple):  # a width and a height: told with the unknown keys, in one message
                given = (f"--resolution {values[key].strip()}" if where == "the command line"
                         else f'resolution = "{values[key].strip()}" in {where}')
                use = f"--resolution {_one_side(*value)}" if where == "the command line" else f"resolution = {_one_side(*value)}"
                problems.append(f"{given} is a width and a height, but workbench trains at one size: resolution is the "
                                "side of the bucket area (resolution²), and each image keeps its aspect ratio in its "
                                f"bucket. Use {use}, the nearest square area ({_one_side(*value)}² = {_one_side(*value) ** 2:,} px against "
                                f"{value[0] * value[1]:,}): some of its buckets differ from kohya's at {value[0]},{value[1]}.")
                continue
        out[name] = value
    if len(unknown) == 1:
        problems.insert(0, f"Unknown training option '{unknown[0][0]}' in {where} ({unknown[0][1]}).")
    elif unknown:
        named = "; ".join(f"'{key}' ({hint})" for key, hint in unknown)
        problems.insert(0, f"Unknown training options in {where}: {named}. Rename or remove them "
                           "(every option: pipelines/train/config.py).")
    kohya_lora = {"network_dim", "network_alpha", "network_module"} & {key.replace("-", "_") for key, _ in unknown}
    if kohya_lora and not {"network_train_unet_only", "train_text_encoder"} & set(keys):
        # kohya's train_network trains a text-encoder LoRA too unless told not to: a converted config would drop it
        problems.append("Note: " + KOHYA_TEXT_ENCODER_NOTE)
    if problems:
        raise ConfigError(" ".join(problems))
    return out


def _unknown_hint(name: str, value: Any) -> str:
    """What to use instead of an unknown option: the workbench name of a kohya one, or the closest names."""
    if name == "v_parameterization":
        return ('workbench: prediction_type = "v_prediction"' if value is True
                else "not needed: remove it, the model's own prediction type is kept")
    if name == "optimizer_type":
        kind = str(value).lower().replace("_", "").replace("-", "")
        if kind == "adamw":
            return "not needed: workbench trains with AdamW; remove it"
        if kind == "adamw8bit":
            return "workbench: use_8bit_adam = true"
        return f"no workbench counterpart for {value!r}: workbench trains with AdamW, or 8-bit AdamW with use_8bit_adam = true"
    if name == "network_train_unet_only":
        return ("not needed: remove it, the UNet alone trains unless train_text_encoder = true" if value is True
                else "workbench: train_text_encoder = true")
    if name in KOHYA_OPTIONS:
        note = KOHYA_NOTES.get(name)
        return f"workbench: {KOHYA_OPTIONS[name]}" + (f", {note}" if note else "")
    if name in KOHYA_NONE:
        return "no workbench counterpart" + (f": {KOHYA_NONE[name]}" if KOHYA_NONE[name] else "")
    close = difflib.get_close_matches(name, sorted(FIELD_NAMES), n=3, cutoff=0.7)
    close = close or sorted(n for n in FIELD_NAMES if n.startswith(name[:4]))[:3]
    return f"did you mean {', '.join(close)}?" if close else "no such option"


def _comma_list(text: str) -> list[str]:
    """'to_q, to_k' (and '[to_q, to_k]', which --set cannot read as TOML) as ['to_q', 'to_k']."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return [item.strip().strip("'\"").strip() for item in text.split(",") if item.strip().strip("'\"").strip()]


def _resolution(text: str) -> int | str | tuple[int, int]:
    """kohya's resolution = "512" or "512,512" as 512, "512,768" as (512, 768) (refused by the caller); other
    text is left for the type check to refuse."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[,x]\s*(\d+)\s*)?", text)
    if match is None:
        return text
    width, height = int(match[1]), int(match[2] or match[1])
    return width if width == height else (width, height)


def _one_side(width: int, height: int) -> int:
    """The resolution whose square bucket area is width × height's, as a multiple of 8."""
    return max(8, round((width * height) ** 0.5 / 8) * 8)


def _train_table(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """The options of a TOML file: all at top level, or all in one [train] table; nothing else may be dropped
    (a project's workbench.toml may also hold the [filter] table `workbench filter` reads)."""
    data = {key: value for key, value in data.items() if not (key in OTHER_STEP_TABLES and isinstance(value, dict))}
    tables = sorted(key for key, value in data.items() if isinstance(value, dict) and key != "train")
    if tables:
        raise ConfigError(f"Unknown table {', '.join(f'[{t}]' for t in tables)} in {path}: training options go at "
                          "top level or in one [train] table.")
    if "train" not in data:
        return data
    if not isinstance(data["train"], dict):
        raise ConfigError(f"'train' in {path} must be a [train] table of options.")
    loose = [key for key in data if key != "train"]
    if loose:  # those before [train] would otherwise be dropped without a word
        raise ConfigError(f"{path} has options both at top level and in its [train] table: move {', '.join(loose)} "
                          "into [train] (or put all at top level).")
    return data["train"]


def _type_errors(values: dict[str, Any]) -> list[str]:
    """Options whose value is not of the field's type (TOML and --set values arrive untyped)."""
    hints = typing.get_type_hints(TrainConfig)
    problems = []
    for name, value in values.items():
        hint = hints[name]
        allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        ok = False
        for kind in allowed:
            origin = typing.get_origin(kind) or kind
            if kind is type(None):
                ok = value is None
            elif origin is list:
                ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            elif kind is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            elif kind is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = isinstance(value, origin)
            if ok:
                break
        if not ok:
            wanted = " or ".join("none" if k is type(None) else getattr(k, "__name__", str(k)) for k in allowed)
            how = (" (names separated by commas, e.g. to_q,to_k, or a list)" if name in COMMA_LIST_OPTIONS else
                   " (one as text, several as a list: [\"a dog, sitting\", \"a cat\"])" if name in ONE_ITEM_LIST_OPTIONS else "")
            problems.append(f"{name} must be {wanted}{how}, got {value!r}")
    return problems


RUN_CONFIG_FILE = "config.toml"  # a run's options as a --config file: what trains it again


def _ignored_by_group(config: TrainConfig) -> dict[str, tuple[str, ...]]:
    """The options this run does not use, by why: LoRA ones for the full-UNet modes, EMA for lora (or ema_decay
    without EMA), the text encoder's without training it, prior ones without prior preservation, keep_tokens without
    shuffling, and schedule settings another schedule does not take (diffusers' get_scheduler passes each schedule
    only its own: the others are dropped in silence)."""
    return {
        "lora": LORA_OPTIONS if config.mode != "lora" else (),
        "ema": EMA_OPTIONS if config.mode == "lora" else () if config.use_ema else ("ema_decay",),
        "text": () if config.train_text_encoder else TEXT_ENCODER_OPTIONS,
        "prior": () if config.with_prior_preservation else PRIOR_OPTIONS,
        "shuffle": () if config.shuffle_tags else SHUFFLE_OPTIONS,
        "schedule": tuple(name for name, schedules in SCHEDULE_OPTIONS.items() if config.lr_scheduler not in schedules),
    }


def ignored_options(config: TrainConfig) -> set[str]:
    """The options this run does not use (validate() refuses them when given), of every group of _ignored_by_group."""
    return {name for names in _ignored_by_group(config).values() for name in names}


def run_config_text(config: TrainConfig, *, max_train_steps: int, buckets: dict) -> str:
    """A run's effective options as TOML that `workbench train MODE --config` reads: the run's length in steps, the
    bucket settings it trained with, nothing unset (TOML has no null), and no output folder or resume."""
    import tomli_w

    values = {**config.to_dict(), "max_train_steps": max_train_steps, "num_train_epochs": None,
              "min_bucket_reso": buckets["min_bucket_reso"], "max_bucket_reso": buckets["max_bucket_reso"],
              "bucket_reso_steps": buckets["bucket_reso_steps"], "bucket_no_upscale": buckets["no_upscale"]}
    kept = {k: v for k, v in values.items()
            if v is not None and k not in ("output_dir", "resume") and k not in ignored_options(config)}
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    return ("# The options this run trained with. The same run again, on the catalog's dataset as it is then:\n"
            f"#   workbench train {config.mode} --config config.toml --output-dir NEW_FOLDER"
            + (f" --num-processes {processes}" if processes > 1 else "") + "\n"
            # what else decides the weights to the last bit, and no option holds
            + f"# Trained with {processes} process(es) and {_threads()} CPU thread(s) each; {_versions()}.\n"
            + tomli_w.dumps(kept))


def _threads() -> int:
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else os.cpu_count() or 1


def _versions() -> str:
    """The versions of the libraries that compute a run (the same options on others may differ in the last bits)."""
    from importlib import metadata

    from workbench import __version__

    found = [f"workbench {__version__}"]
    for package in ("torch", "diffusers", "transformers", "peft", "accelerate"):
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


BUCKET_OPTIONS = ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale")


def _run_config_values(run_dir: Path) -> dict[str, Any]:
    """The options a run's config.toml holds ({} without one, or one that cannot be read)."""
    try:
        return tomllib.loads((run_dir / RUN_CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}


def resumed_values(values: dict[str, Any]) -> dict[str, Any]:
    """For --resume: the checkpoint's saved options, with the given ones laid over those it allows to change."""
    from pipelines.train.checkpoint import resolve_resume, saved_config

    run_dir = Path(values["output_dir"])
    checkpoint = resolve_resume(run_dir / "checkpoints", values["resume"])
    try:
        saved = saved_config(checkpoint) if checkpoint is not None else None
    except ValueError as error:  # DamagedCheckpoint: a cut-off state.json, named with the checkpoint to use instead
        raise ConfigError(str(error)) from None
    source = checkpoint
    if saved is None and (run_dir / SNAPSHOT_FILE).is_file():  # stopped before its first checkpoint
        try:
            saved = json.loads((run_dir / SNAPSHOT_FILE).read_text()).get("config")
        except (OSError, ValueError) as error:
            raise ConfigError(f"{run_dir / SNAPSHOT_FILE} cannot be read ({error}); start a new run instead of resuming.") from error
        source = run_dir
    if saved is None:
        if checkpoint is None:  # 'latest' with no run there: a new run, as diffusers' --resume_from_checkpoint latest
            return {**values, "resume": None}  # (a requeued job resumes when there is something, else starts)
        return values  # a checkpoint from before options were saved: continue as given
    saved = {k: v for k, v in saved.items() if k in FIELD_NAMES}
    if values.get("lora_alpha") is not None and saved.get("lora_alpha") is None and saved.get("rank") is not None:
        saved["lora_alpha"] = saved["rank"]  # left out, alpha was the rank: the same alpha given is no difference
    if saved.get("checkpoints_total_limit") is not None and saved["checkpoints_total_limit"] < 1:
        saved["checkpoints_total_limit"] = None  # saved when 0 kept every checkpoint (and -1 deleted every one)
    # bucket settings left unset were the catalog's (or the defaults) when the run began: its config.toml spells out
    # the ones it trained with, so `--config RUN/config.toml --resume latest` (a requeue) gives no difference
    trained = _run_config_values(run_dir)
    for key in BUCKET_OPTIONS:
        if saved.get(key) is None and trained.get(key) is not None:
            saved[key] = trained[key]
    differ = [f"{k} {saved[k]!r} (saved) vs {v!r}" for k, v in values.items()
              if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != v]
    if differ:
        mode = saved.get("mode") if "mode" in values and saved.get("mode") != values["mode"] else None
        raise ConfigError(
            f"--resume continues {source} with the options it was trained with; these differ: {'; '.join(differ)}. "
            + (f"It is a {mode} run: continue it with `workbench train {mode} --resume …`" + ("; leave the other options out" if len(differ) > 1 else "")
               if mode else "Leave them out")
            + ", or start a new run in another --output-dir."
        )
    if "num_train_epochs" in values and "max_train_steps" not in values:
        # epochs count only without a step total: the saved one would silently win over the epochs given
        saved["max_train_steps"] = None
    return {**saved, **values}


def load_train_config(path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """TrainConfig from an optional TOML file (top level or a [train] table), then explicit overrides.

    With `resume`, options not given come from the checkpoint being resumed, and given ones may only change
    what RESUME_MAY_CHANGE lists. Relative output and cache folders are made absolute (the run records them).
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist.")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path} is not valid TOML: {error}") from error
        except RecursionError:
            raise ConfigError(f"{path} nests its tables or arrays too deeply to be a config file.") from None
        values.update(_normalise_keys(_train_table(data, path), str(path)))
        mode = (overrides or {}).get("mode")
        if mode is not None and values.get("mode", mode) != mode:  # `workbench train X` always passes its mode
            raise ConfigError(f"{path} sets mode = '{values['mode']}', but this is `workbench train {mode}`: "
                              f"remove mode from the file, or run `workbench train {values['mode']}`.")
    given = _normalise_keys({k: v for k, v in (overrides or {}).items() if v is not None}, "the command line")
    for length, other in (("max_train_steps", "num_train_epochs"), ("num_train_epochs", "max_train_steps")):
        if length in given and other not in given:  # the command line's run length wins over the file's other one
            values.pop(other, None)
    values.update(given)
    problems = _type_errors(values)
    if problems:
        raise ConfigError("; ".join(problems) + ".")
    if values.get("max_train_steps") is not None and values.get("num_train_epochs") is not None:
        # the peers disagree on which wins (steps in the diffusers examples, epochs in kohya): one was ignored
        raise ConfigError(f"Both max_train_steps ({values['max_train_steps']}) and num_train_epochs "
                          f"({values['num_train_epochs']}) are given: a run has one length. Give --max-train-steps "
                          "or --num-train-epochs (kohya's --max_train_epochs), not both.")
    for folder in ("output_dir", "cache_dir"):
        if values.get(folder):
            values[folder] = str(Path(values[folder]).expanduser().absolute())
    if values.get("model"):
        from workbench.models import model_id

        values["model"] = model_id(values["model"])  # a local model resumes (and matches its priors) from any folder
    if values.get("resume") and values.get("output_dir"):
        try:
            values = resumed_values(values)
        except FileNotFoundError as error:
            raise ConfigError(str(error)) from error
    try:
        config = TrainConfig(**values)
    except TypeError as error:
        raise ConfigError(str(error)) from error
    return config.validate()


def save_dtype(config: "TrainConfig"):
    """The torch dtype `save_precision` names (float32 when unset)."""
    import torch

    return getattr(torch, SAVE_PRECISIONS[config.save_precision or "float"])
