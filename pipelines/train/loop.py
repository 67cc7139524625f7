"""The training loop shared by `lora`, `dreambooth` and `finetune`, in the shape of diffusers' examples.

`main(config, images, ...)` is the whole run, top to bottom: accelerate setup, models, optimizer,
caches, the step loop, checkpoints, samples and outputs. `trained_model(con, config)` wraps it
with the catalog (dataset in, run record out).

Randomness: every random draw of a step comes from a generator seeded by (seed, micro-batch,
process), and every random choice about data from the epoch plan (seed, epoch). Nothing depends
on how many steps ran before in this process, which is what makes `--resume` bitwise exact.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gc
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from pipelines.train import checkpoint as ckpt
from pipelines.train import data as train_data
from pipelines.train.config import TrainConfig, save_dtype
from pipelines.train.data import ItemSpec, LatentCache, TextCache, TrainImage
from workbench.files import current_umask
from workbench.models import quiet_model_io
from workbench.progress import ProgressHook, StepCancelled, null_progress

MEMORY_ADVICE = (
    "settings that save memory: --train-batch-size 1 with --gradient-accumulation-steps N, "
    "--gradient-checkpointing, --mixed-precision bf16 (or fp16), --use-8bit-adam, a lower --resolution, "
    "a lower --rank (LoRA), and keeping the latent cache on (no --random-crop / --color-jitter)"
)


NO_BITSANDBYTES = (
    "--use-8bit-adam needs bitsandbytes, which is not installed: pip install 'workbench[bnb]', or leave the option off."
)
FP16_ON_CPU = "--mixed-precision fp16 needs a CUDA GPU; on CPU train with no (or bf16)."


class TrainingError(RuntimeError):
    """Training stopped for a reason people can act on; the message says what to change."""


class RunRefused(TrainingError):
    """Refused before anything trained: these settings, this machine or this run folder do not allow the run."""


class NothingToResume(RunRefused):
    """`--resume` of a run that finished every step asked for: nothing to train (the CLI says so and exits 0)."""


@dataclass
class TrainResult:
    """What a finished (or resumed-and-finished) run produced."""

    output_dir: Path
    steps: int
    final_loss: float | None
    losses: list[float]
    outputs: dict[str, str]
    seconds: float
    train_seconds: float  # the step loop alone (no model loading, caching, sampling, saving)
    images: int
    class_images: int = 0  # DreamBooth class priors used (prior preservation)
    train_id: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, int] = field(default_factory=dict)
    steps_this_session: int = 0  # steps run by this call (fewer than `steps` after a resume)
    seconds_before: float = 0.0  # the earlier sessions' time up to the checkpoint this one resumed from

    @property
    def steps_per_second(self) -> float:
        return self.steps_this_session / self.train_seconds if self.train_seconds else 0.0

    def evaluation_failure(self) -> str | None:
        """What to say when the run finished but scoring its samples failed (the CLI and the TUI say the same)."""
        if "error" not in self.metrics:
            return None
        return (f"evaluating the samples failed ({self.metrics['error']}); the run is recorded. Score it later with: "
                f"workbench evaluate {self.train_id} --clip-model tiny (or a CLIP you have)")


# --- loss -----------------------------------------------------------------------


def per_sample_loss(model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, noise_scheduler, snr_gamma: float | None) -> torch.Tensor:
    """MSE per sample, min-SNR weighted when snr_gamma is set (Hang et al. 2023, as in diffusers' examples)."""
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=list(range(1, model_pred.ndim)))
    if snr_gamma is None:
        return loss
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.stack([snr, snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    if noise_scheduler.config.prediction_type == "epsilon":
        weights = weights / snr
    elif noise_scheduler.config.prediction_type == "v_prediction":
        weights = weights / (snr + 1)
    return loss * weights


def combined_loss(per_sample: torch.Tensor, is_prior: torch.Tensor, prior_loss_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """DreamBooth prior preservation: mean instance loss + prior_loss_weight × mean prior loss."""
    # which samples are priors is known on the host: deciding there keeps the step free of GPU syncs
    # (a boolean mask on the GPU would make the CPU wait for the forward pass)
    is_prior = is_prior.cpu()
    if not bool(is_prior.any()):
        instance = per_sample.mean()
        return instance, instance, None
    instance = per_sample.index_select(0, to_device(torch.nonzero(~is_prior).flatten(), per_sample.device)).mean()
    prior = per_sample.index_select(0, to_device(torch.nonzero(is_prior).flatten(), per_sample.device)).mean()
    return instance + prior_loss_weight * prior, instance, prior


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """Host to device; on CUDA through pinned memory without waiting, so the CPU queues the next kernels while
    the GPU still runs (a copy from ordinary memory waits for every kernel queued before it)."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def training_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise TrainingError(f"Unknown prediction type {kind!r}")


LOSS_READ_EVERY = 10  # CUDA: steps between read-backs of the loss; each read-back waits for the GPU


LOSS_PARTS = ("instance_loss", "prior_loss")  # loss.csv's extra columns under prior preservation


class LossLog:
    """The loss of each step, read back from the device a few steps at a time. Reading a CUDA loss makes the CPU
    wait for the GPU; without that wait the CPU queues the next step while the GPU still runs this one. The
    values written (loss.csv, TensorBoard) are the same as with a read-back every step."""

    def __init__(self, accelerator, csv_path: Path, rows: list, read_every: int):
        self.accelerator, self.csv_path, self.rows, self.read_every = accelerator, csv_path, rows, read_every
        # (step, its micro-batch losses, lr, their [instance, prior] parts under prior preservation, else [])
        self.pending: list[tuple[int, list[torch.Tensor], float, list[torch.Tensor]]] = []

    @contextlib.contextmanager
    def written_when_stopped(self):
        """A run stopped part way (Ctrl+C, an error) still writes the losses of the steps it finished."""
        try:
            yield
        except BaseException as error:
            # not after a non-finite loss (found by reading them), nor across processes that may be gone
            if not isinstance(error, TrainingError) and self.accelerator.num_processes == 1:
                with contextlib.suppress(Exception):
                    self.read(None)
            raise

    def add(self, step: int, micro_losses: list[torch.Tensor], lr: float, micro_parts: list[torch.Tensor] | None = None) -> None:
        self.pending.append((step, micro_losses, lr, micro_parts or []))

    def read_due(self) -> bool:
        return len(self.pending) >= self.read_every

    def read(self, last_good: Path | None) -> None:
        """Read the pending losses back: stop on a non-finite one, else append them to loss.csv and the trackers."""
        if not self.pending:
            return
        losses = [loss.float().reshape(1) for _, micro, _, _ in self.pending for loss in micro]
        parts = [part.float().reshape(2) for _, _, _, micro in self.pending for part in micro]
        values = torch.cat(losses + parts).tolist()  # the one wait
        part_values = values[len(losses):]
        step_losses, step_parts, at, part_at = [], [], 0, 0
        for step, micro, _, micro_parts in self.pending:
            chunk, at = values[at:at + len(micro)], at + len(micro)
            if micro_parts:  # the mean over the update's micro-batches, as the loss
                pairs, part_at = part_values[part_at:part_at + 2 * len(micro_parts)], part_at + 2 * len(micro_parts)
                step_parts.append([sum(pairs[0::2]) / len(micro_parts), sum(pairs[1::2]) / len(micro_parts)])
            bad = next((value for value in chunk if not math.isfinite(value)), None)
            if bad is not None:
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                fp16 = self.accelerator.mixed_precision == "fp16"  # its range is what overflows, when it is used
                raise TrainingError(
                    f"The loss became {bad} at step {step}; training stopped and {where}. "
                    + ("Lower --learning-rate, use --mixed-precision bf16 instead of fp16, or check the images." if fp16
                       else "Lower --learning-rate, or check the images.")
                )
            step_losses.append(sum(chunk) / len(chunk))  # the mean over the update's micro-batches
        accelerator = self.accelerator
        if accelerator.num_processes > 1:  # every process reads at the same steps, so the gather lines up
            gathered = accelerator.gather(torch.tensor(step_losses, device=accelerator.device))
            step_losses = gathered.reshape(accelerator.num_processes, -1).mean(dim=0).tolist()
            if step_parts:
                gathered = accelerator.gather(torch.tensor(step_parts, device=accelerator.device).flatten())
                step_parts = gathered.reshape(accelerator.num_processes, -1, 2).mean(dim=0).tolist()
        new_rows = [(step, loss, lr, *(step_parts[i] if step_parts else ()))
                    for i, ((step, _, lr, _), loss) in enumerate(zip(self.pending, step_losses))]
        self.pending = []
        self.rows.extend(new_rows)
        if accelerator.is_main_process:
            with self.csv_path.open("a", newline="") as handle:
                csv.writer(handle, lineterminator="\n").writerows([list(row) for row in new_rows])
        for step, loss, lr, *parts in new_rows:
            accelerator.log({"loss": loss, "lr": lr, **dict(zip(LOSS_PARTS, parts))}, step=step)


def uses_channels_last(config: TrainConfig, device) -> bool:
    """The UNet's memory format: as asked, else channels-last on CUDA only (faster convolutions there)."""
    return config.channels_last if config.channels_last is not None else torch.device(device).type == "cuda"


def too_small_message(groups_batch: list[dict], config: TrainConfig, vae) -> str:
    """Why a batch cannot train: its bucket's latents are too small for the model's UNet."""
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    sizes = []
    for group in groups_batch:
        latent = group["mean"].shape[-2:] if "mean" in group else tuple(side // scale for side in group["pixels"].shape[-2:])
        sizes.append(f"{latent[1] * scale}×{latent[0] * scale} px (latents {latent[1]}×{latent[0]})")
    return (f"The model cannot train on images this small: a batch of bucket {', '.join(sizes)} is too small for its "
            f"UNet. Raise --resolution (now {config.resolution}) or min_bucket_reso (--set min_bucket_reso=…).")


def step_generator(seed: int, micro_index: int, process_index: int = 0) -> torch.Generator:
    """The CPU generator of one micro-batch: independent of everything that ran before it."""
    mixed = (seed * 1_000_003 + micro_index) * 1_009 + process_index
    return torch.Generator().manual_seed(mixed % (2**63))


# --- data loading ------------------------------------------------------------------


class PlanDataset(torch.utils.data.Dataset):
    """Loads one ItemSpec: cached latent posterior or pixels, cached text state or caption."""

    def __init__(self, images: Sequence[TrainImage], pools: dict[str, list[TrainImage]], latent_cache: LatentCache | None, text_cache: TextCache | None):
        self.images = images
        self.pools = pools
        self.latent_cache = latent_cache
        self.text_cache = text_cache

    def image_of(self, spec: ItemSpec) -> TrainImage:
        return self.images[spec.image] if spec.pool == "instance" else self.pools[spec.pool.removeprefix("prior:")][spec.image]

    def __len__(self) -> int:  # only batch_sampler access is used
        return len(self.images)

    def __getitem__(self, spec: ItemSpec) -> dict:
        image = self.image_of(spec)
        item: dict[str, Any] = {"is_prior": spec.pool != "instance", "bucket": image.bucket}
        cached = None
        if self.latent_cache is not None and spec.jitter is None:
            cached = self.latent_cache.get(self.latent_cache.key(image, spec))
        if cached is not None:
            item["mean"], item["std"] = cached
        else:
            item["pixels"] = train_data.load_pixels(image, spec)
        hidden = self.text_cache.get(spec.caption) if self.text_cache is not None else None
        if hidden is not None:
            item["hidden"] = hidden
        else:
            item["caption"] = spec.caption
        return item


def collate_groups(items: list[dict]) -> list[dict]:
    """Items grouped by bucket (one forward pass per shape), each group stacked."""
    groups: dict[tuple, list[dict]] = {}
    for item in items:
        groups.setdefault((item["bucket"], "mean" in item, "hidden" in item), []).append(item)
    out = []
    for members in groups.values():
        group: dict[str, Any] = {"is_prior": torch.tensor([m["is_prior"] for m in members])}
        if "mean" in members[0]:
            group["mean"] = torch.stack([m["mean"] for m in members])
            group["std"] = torch.stack([m["std"] for m in members])
        else:
            group["pixels"] = torch.stack([m["pixels"] for m in members])
        if "hidden" in members[0]:
            group["hidden"] = torch.stack([m["hidden"] for m in members])
        else:
            group["captions"] = [m["caption"] for m in members]
        out.append(group)
    return out


def default_sample_prompts(images: Sequence[TrainImage]) -> list[str]:
    """Without --validation-prompt: the first caption of each concept (up to 4), then the dataset's next captions, two
    at least. The first two captions alone left a concept out of every sample grid of a two-concept run."""
    first_of: dict[str | None, str] = {}
    for image in images:
        if image.caption:
            first_of.setdefault(image.concept, image.caption)
    most = max(2, min(4, len(first_of)))
    prompts = list(dict.fromkeys([*first_of.values(), *(image.caption for image in images if image.caption)]))
    return prompts[:most] or ["a photo"]


def say_long_captions(images: Sequence[TrainImage], tokenizer, progress: ProgressHook, max_token_length: int | None = None,
                       shuffled: bool = False) -> None:
    """Captions past what training reads (the text encoder's 75 tokens, or `max_token_length`) are cut: said with
    how many, not left to be found in the samples."""
    captions = sorted({image.caption for image in images if image.caption})
    encoder = tokenizer.model_max_length - 2  # less the start and end tokens
    window = max(encoder, max_token_length or 0)
    lengths = tokenizer(captions, add_special_tokens=False, truncation=False, verbose=False)["input_ids"] if captions else []
    long = [caption for caption, ids in zip(captions, lengths) if len(ids) > window]
    if long:
        first = next(image for image in images if image.caption == long[0])
        limit = f"max_token_length {window}" if window > encoder else f"the text encoder's {window} tokens"
        longer = f", or `--set max_token_length={3 * encoder}` (kohya's long captions: {3 * encoder} tokens, in windows)" if window < 3 * encoder else ""
        progress(task="dataset", message=(
            f"Note: {len(long)} caption(s) are longer than {limit}, e.g. {first.path}'s: "
            f"training reads their first {window} tokens{' (with shuffled tags, different tags are cut each step)' if shuffled else ''}. "
            f"Shorten them (`workbench edit-captions --remove-token …`){longer} to train on every tag."))


def epoch_checkpoint_due(step: int, per_epoch: int, micro_per_update: int, every: int | None) -> bool:
    """Whether optimizer step `step` ends an epoch that `checkpointing_epochs` (every N epochs) saves: epoch e ends
    with micro-batch e × per_epoch, and step s trains micro-batches (s - 1) × micro_per_update + 1 … s × micro_per_update
    (with few images and much accumulation, one step may end several epochs)."""
    if not every:
        return False
    first = (step - 1) * micro_per_update // per_epoch + 1  # the epochs whose last micro-batch falls in this step
    last = step * micro_per_update // per_epoch
    return any(epoch % every == 0 for epoch in range(first, last + 1))


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    return tokenizer(
        list(captions), padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids


def long_caption_ids(tokenizer, captions: Sequence[str], max_token_length: int) -> torch.Tensor:
    """kohya's `max_token_length` (150 or 225): each caption as `max_token_length / 75` windows of the text encoder,
    (captions, windows, 77), each window <start> + 75 tokens + <end>. Where the tokenizer pads with <end> (SD 1.x),
    the windows are cut from one padded sequence, as sd-scripts cuts them; otherwise (SD 2.x pads with another token)
    a window whose text ends inside it gets its <end>, and one with no text starts with <end>, as sd-scripts mends it."""
    window = tokenizer.model_max_length - 2
    ids = tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_token_length + 2,
                    return_tensors="pt").input_ids
    bos, eos = ids[:, :1], ids[:, -1:]
    chunks = []
    for start in range(1, max_token_length + 1, window):
        chunk = torch.cat([bos, ids[:, start : start + window], eos], dim=1)
        if tokenizer.pad_token_id != tokenizer.eos_token_id:
            pad, end = tokenizer.pad_token_id, tokenizer.eos_token_id
            full = (chunk[:, -2] != end) & (chunk[:, -2] != pad)
            chunk[full, -1] = end  # text runs to the window's end: it still ends with <end>
            chunk[chunk[:, 1] == pad, 1] = end  # a window past the text: <start><end><pad>…
        chunks.append(chunk)
    return torch.stack(chunks, dim=1)


def text_states(text_encoder, tokenizer, captions: Sequence[str], max_token_length: int | None, device) -> torch.Tensor:
    """The text encoder's hidden states for `captions`: (captions, 77, width), or with a `max_token_length` past the
    encoder's 75 tokens, sd-scripts' long-caption states (captions, max_token_length + 2, width): each window encoded
    on its own, joined as <start>, every window's 75 tokens, and the last window's <end>."""
    window = tokenizer.model_max_length - 2
    if not max_token_length or max_token_length <= window:
        return text_encoder(tokenize(tokenizer, captions).to(device))[0]
    ids = long_caption_ids(tokenizer, captions, max_token_length).to(device)
    count, windows, length = ids.shape
    hidden = text_encoder(ids.reshape(count * windows, length))[0]
    hidden = hidden.reshape(count, windows * length, hidden.shape[-1])
    parts = [hidden[:, :1]] + [hidden[:, i * length + 1 : i * length + 1 + window] for i in range(windows)] + [hidden[:, -1:]]
    return torch.cat(parts, dim=1)


# --- setup helpers -----------------------------------------------------------------------


def load_components(config: TrainConfig, progress: ProgressHook = null_progress):
    """The base model's parts, on CPU in float32 (the run places and casts them)."""
    from workbench.models import load_sd_components

    progress(task="load model", message=f"loading {config.model}")
    components = load_sd_components(config.model, device="cpu", dtype=torch.float32)
    progress(task="load model", completed=1, total=1)
    return components


def _noise_scheduler(components, config: TrainConfig):
    from diffusers import DDPMScheduler

    overrides = {}
    if config.beta_schedule:
        overrides["beta_schedule"] = config.beta_schedule
    if config.prediction_type:
        overrides["prediction_type"] = config.prediction_type
    return DDPMScheduler.from_config(components.noise_scheduler.config, **overrides)


def check_setup(config: TrainConfig) -> None:
    """Refuse settings this machine cannot train with; run before anything is written (run folder, catalog row)."""
    import importlib.util

    from workbench.models import ModelError

    try:
        on_cpu = runs_on_cpu(config)
    except ModelError as error:  # an unavailable device: accelerate would quietly train on the CPU
        raise RunRefused(str(error).replace("(use --device cpu)", "(use --device cpu, or leave --device out)")) from None
    if config.mixed_precision == "fp16" and on_cpu:
        raise RunRefused(FP16_ON_CPU)
    if config.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise RunRefused(NO_BITSANDBYTES)
    from workbench.models import refuse_a_local_model_that_is_not_one

    try:  # a run folder or a missing path named as --model: said before a run folder is made
        refuse_a_local_model_that_is_not_one(config.model)
    except ModelError as error:
        if config.resume and "No such model file or folder" in str(error):  # the run's base model moved since
            raise RunRefused(f"{error}: the run trained on it, and a resume goes on with the model it started with. Put "
                             "it back there (a link to where it is now will do), then resume.") from None
        raise RunRefused(str(error)) from None


def runs_on_cpu(config: TrainConfig) -> bool:
    """Whether the run trains on the CPU: asked for, or no --device on a machine without a GPU. Told to accelerate
    in every process, since processes left to choose on their own never met (a CPU run under torchrun crashed)."""
    from workbench.models import resolve_device

    return resolve_device(config.device).type == "cpu"


def steps_behind_message(config: TrainConfig, checkpoint: Path, done: int, total: int) -> str:
    asked = f"--max-train-steps {total}" if config.max_train_steps else f"--num-train-epochs {config.num_train_epochs} ({total} steps)"
    return (f"{checkpoint} is at step {done}, past the {asked} asked for: nothing to train. "
            f"Give a --max-train-steps above {done} (or more --num-train-epochs) to train it further.")


def planned_steps(config: TrainConfig, images: Sequence[TrainImage], num_processes: int = 1) -> int:
    """The run's optimizer steps: --max-train-steps, else --num-train-epochs of the images' batches."""
    if config.max_train_steps:
        return config.max_train_steps
    per_epoch = train_data.batches_per_epoch(images, config.train_batch_size)
    return config.num_train_epochs * max(1, math.ceil(per_epoch / (config.gradient_accumulation_steps * num_processes)))


def _optimizer(config: TrainConfig, groups: list[dict]):
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise TrainingError(NO_BITSANDBYTES) from error
        return bnb.optim.AdamW8bit(
            groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
        )
    params = [p for group in groups for p in group["params"]]
    # one fused kernel for all parameters instead of a Python loop over them (LoRA has hundreds of
    # small tensors); torch has it on CPU and CUDA for floating-point weights
    fused = config.fused_adam and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay, eps=config.adam_epsilon, fused=fused or None,
    )


def _tracker_config(config: TrainConfig) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in config.to_dict().items()}


def _smoothed(values: list[float]) -> tuple[list[float], int]:
    window = max(2, len(values) // 20)
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))], window


def loss_figure(rows: list[tuple]):
    """The loss curve of loss.csv's rows (step, loss, lr[, instance_loss, prior_loss]): the loss, its running mean,
    and with prior preservation the running means of its two parts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [r[0] for r in rows]
    losses = [r[1] for r in rows]
    axis.plot(steps, losses, linewidth=0.8, alpha=0.5, label="loss")
    if len(losses) >= 5:
        smooth, window = _smoothed(losses)
        axis.plot(steps, smooth, linewidth=1.5, label=f"mean of {window}")
        if all(len(r) >= 5 for r in rows):  # prior preservation: loss = instance + weight × prior
            for index, name in ((3, "instance"), (4, "prior")):
                axis.plot(steps, _smoothed([r[index] for r in rows])[0], linewidth=1.0, linestyle="--", label=f"{name} (mean of {window})")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend()
    figure.tight_layout()
    return figure


def _write_loss_png(rows: list[tuple], path: Path) -> None:
    import matplotlib.pyplot as plt

    figure = loss_figure(rows)
    figure.savefig(path)
    plt.close(figure)


FINAL_LOSS_STEPS = 10


def final_loss(rows: list[tuple]) -> float | None:
    """A run's final loss: the mean over its last FINAL_LOSS_STEPS steps, so runs compare by more than one noisy step
    (each step draws its own timesteps and noise)."""
    last = [row[1] for row in rows[-FINAL_LOSS_STEPS:]]
    return sum(last) / len(last) if last else None


def read_loss_csv(path: Path, up_to_step: int) -> list[tuple]:
    """(step, loss, lr[, instance_loss, prior_loss]) rows of a run's loss.csv up to `up_to_step` (a resumed run
    continues its log from there)."""
    if not path.exists():
        return []
    with path.open() as handle:
        rows = [(int(r["step"]), float(r["loss"]), float(r["lr"]), *(float(r[c]) for c in LOSS_PARTS if r.get(c)))
                for r in csv.DictReader(handle)]
    return [r for r in rows if r[0] <= up_to_step]


def inference_scheduler(cls, noise_scheduler):
    """A sampling scheduler of class `cls` on the training noise schedule. DDIM and PNDM have no 'sigmoid' (or
    other DDPM-only) schedule: they get the training betas as `trained_betas`, which also makes a saved
    pipeline's scheduler config load back with exactly those betas."""
    config = dict(noise_scheduler.config)
    if config.get("trained_betas") is None and config.get("beta_schedule") not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        config["trained_betas"] = noise_scheduler.betas.tolist()
    return cls.from_config(config)


def sampling_pipeline(components, unet, text_encoder, noise_scheduler):
    """A StableDiffusionPipeline around the live (training) modules, DDIM-sampled."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=text_encoder, tokenizer=components.tokenizer, unet=unet,
        scheduler=inference_scheduler(DDIMScheduler, noise_scheduler), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render_samples(pipe, prompts: Sequence[str], config: TrainConfig, device,
                   prompt_states: Mapping[str, torch.Tensor] | None = None) -> list[list]:
    """num_validation_images images per prompt, image i seeded with validation_seed + i (same every time).
    With `prompt_states` (the text encoder's output per prompt, and for "" the unconditional one) the pipeline
    needs no text encoder or tokenizer."""
    size = config.resolution
    count = config.num_validation_images
    if prompt_states is None and config.max_token_length:  # the pipeline's own encoding reads 75 tokens: as trained
        with torch.no_grad():
            prompt_states = {p: state[None] for p, state in zip(
                [*prompts, ""], text_states(pipe.text_encoder, pipe.tokenizer, [*prompts, ""], config.max_token_length, device))}
    rows = []
    for prompt in prompts:
        generators = [torch.Generator().manual_seed(config.validation_seed + i) for i in range(count)]
        if prompt_states is None:
            text: dict[str, Any] = {"prompt": [prompt] * count}
        else:
            text = {"prompt_embeds": prompt_states[prompt].expand(count, -1, -1).to(device),
                    "negative_prompt_embeds": prompt_states[""].expand(count, -1, -1).to(device)}
        result = pipe(
            **text, num_inference_steps=config.validation_inference_steps,
            guidance_scale=config.validation_guidance_scale, generator=generators, height=size, width=size,
        )
        rows.append(result.images)
    return rows


# --- the run ----------------------------------------------------------------------------


def main(
    config: TrainConfig,
    images: Sequence[TrainImage],
    *,
    output_dir: Path,
    priors: dict[str, list[TrainImage]] | None = None,
    components=None,
    progress: ProgressHook = null_progress,
    base_model: dict | None = None,
) -> TrainResult:
    """Train per `config` on `images` (and class `priors`), writing everything into `output_dir`. `base_model`, when
    given, is filled in as soon as the model is loaded (a run that fails later is recorded with it too): `model_path`
    (the folder or file loaded; a Hub id's cached snapshot folder), `model_revision` (its Hub commit) and
    `model_fingerprint` (SHA-256 of the UNet, text encoder and VAE weights as loaded)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    config.validate()  # also fills in what depends on other options (the mode's learning rate)
    check_setup(config)
    started = time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoints_dir = output_dir / "checkpoints"
    samples_dir = output_dir / "samples"
    use_tensorboard = config.report_to == "tensorboard"
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with="tensorboard" if use_tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        cpu=runs_on_cpu(config),
    )
    try:
        return _run(config, images, accelerator, output_dir, checkpoints_dir, samples_dir, priors, components, progress, started,
                    set_seed, get_scheduler, {} if base_model is None else base_model)
    except torch.OutOfMemoryError as error:
        raise TrainingError(
            f"The GPU ran out of memory ({str(error).splitlines()[0]}). Try the {MEMORY_ADVICE}. "
            "--resume takes --gradient-checkpointing; the others change the run, so they need a new one."
        ) from error
    except Exception as error:
        if config.torch_compile:  # only then is torch._dynamo loaded; other runs must not pay for importing it
            from torch._dynamo.exc import BackendCompilerFailed

            if isinstance(error, BackendCompilerFailed):
                raise TrainingError(
                    f"--torch-compile failed ({str(error).splitlines()[0][:300]}). On CPU it needs a C++ compiler (gcc), "
                    "on CUDA a working triton; or train without --torch-compile."
                ) from error
        raise
    finally:
        accelerator.end_training()
        _reset_accelerate_state()


def _reset_accelerate_state() -> None:
    """accelerate keeps process-wide singletons; reset them so the next run in this process starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def _run(config, images, accelerator, output_dir, checkpoints_dir, samples_dir, priors, components, progress, started, set_seed,
         get_scheduler, base_model: dict) -> TrainResult:
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel, cast_training_params

    set_seed(config.seed)
    use_tensorboard = config.report_to == "tensorboard"
    device = accelerator.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
        torch.backends.cudnn.allow_tf32 = config.allow_tf32
        torch.backends.cudnn.benchmark = config.cudnn_benchmark
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if components is None:
        components = load_components(config, progress)
    tokenizer, text_encoder, vae, unet = components.tokenizer, components.text_encoder, components.vae, components.unet
    noise_scheduler = _noise_scheduler(components, config)
    if accelerator.is_main_process:
        say_long_captions(images, tokenizer, progress, config.max_token_length, config.shuffle_tags)

    # fingerprints of the base as loaded, before anything trains, each part hashed once: the caches are keyed by the
    # frozen encoders', and a resume checks the whole base's, so a Hub update or a replaced folder or file under the
    # same --model cannot silently go on training other weights (a from-scratch UNet does not come from the base)
    vae_print, text_print = train_data.module_fingerprint(vae), train_data.module_fingerprint(text_encoder)
    latent_cache, text_cache = train_data.make_caches(config, vae, text_encoder, tokenizer, vae_print=vae_print, text_print=text_print)
    base_fingerprint = train_data.base_model_fingerprint(
        None if config.from_scratch else train_data.module_fingerprint(unet), text_print, vae_print)
    base_model.update(model_path=components.source_path, model_revision=components.revision, model_fingerprint=base_fingerprint)

    # --- which weights train ---
    vae.requires_grad_(False)
    train_text = config.train_text_encoder
    text_encoder.requires_grad_(False)
    if config.mode == "lora":
        for module in (unet, text_encoder) if train_text else (unet,):
            _place(module, device, weight_dtype)  # before the adapters: peft makes them on their layers' device
        _add_loras(config, unet, text_encoder if train_text else None)
    else:
        if config.from_scratch:
            torch.manual_seed(config.seed)
            unet = UNet2DConditionModel.from_config(unet.config)
        unet.requires_grad_(True)
        if train_text:
            text_encoder.requires_grad_(True)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_text:
            text_encoder.gradient_checkpointing_enable()
    if uses_channels_last(config, device):
        unet.to(memory_format=torch.channels_last)
    if config.torch_compile:
        # regional compilation (diffusers): each repeated transformer block is compiled once and reused,
        # so the one-time compile takes seconds rather than minutes; state-dict keys are unchanged
        unet.compile_repeated_blocks()
    trained_modules = [unet] + ([text_encoder] if train_text else [])
    for module in trained_modules:
        module.to(device)
    if accelerator.mixed_precision in ("fp16", "bf16"):
        cast_training_params(trained_modules, dtype=torch.float32)  # trainable weights stay fp32, as in diffusers
    _place(vae, device, weight_dtype if config.mode == "lora" else torch.float32)
    # a full model is saved with its frozen text encoder: keep its own float32 weights for that, not a copy
    # rounded to the training dtype (diffusers' train_dreambooth.py saves the base text encoder too)
    kept = config.mode != "lora" and not train_text and weight_dtype != torch.float32
    frozen_text_weights = dict(text_encoder.state_dict()) if kept else None
    if not train_text:
        _place(text_encoder, device, weight_dtype)

    ema = None
    if config.use_ema:  # of the UNet, as diffusers' train_text_to_image.py keeps it
        ema = EMAModel(unet.parameters(), decay=config.ema_decay, model_cls=UNet2DConditionModel, model_config=unet.config)
        ema.to(device)
        if train_text and accelerator.is_main_process:
            progress(task="train", message="the EMA is of the UNet: the model saved, its samples and scores pair the EMA "
                     "UNet with the text encoder as trained (each checkpoint's weights.safetensors holds both as trained)")

    unet_params = [p for p in unet.parameters() if p.requires_grad]
    text_params = [p for p in text_encoder.parameters() if p.requires_grad] if train_text else []
    learning_rate = config.learning_rate
    if config.scale_lr:
        learning_rate *= config.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes
    groups = [{"params": unet_params, "lr": learning_rate}]
    if text_params:
        groups.append({"params": text_params, "lr": config.text_encoder_lr or learning_rate})
    optimizer = _optimizer(config, groups)

    # --- the step budget ---
    micro_per_update = config.gradient_accumulation_steps * accelerator.num_processes
    max_steps = planned_steps(config, images, accelerator.num_processes)
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
        num_cycles=config.lr_num_cycles, power=config.lr_power,
    )
    if train_text:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    named_trainable = _named_trainable(accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder) if train_text else None)

    # --- resume ---
    global_step = 0
    resume_from = None
    if config.resume:
        resume_from = ckpt.resolve_resume(checkpoints_dir, config.resume)
        if resume_from is None:  # stopped before its first checkpoint was written (run.py refuses the other cases)
            progress(task="train", message=f"no checkpoint in {checkpoints_dir} yet: the run starts again from step 0")
    if resume_from is not None:
        try:
            state = ckpt.load_checkpoint(
                resume_from, model_parameters=named_trainable, optimizer=optimizer.optimizer,
                lr_scheduler=lr_scheduler.scheduler, scaler=accelerator.scaler, ema=ema,
            )
        except Exception as error:
            damaged = ckpt.damaged_files(resume_from)
            if damaged:
                raise TrainingError(ckpt.damaged_checkpoint_message(resume_from, damaged)) from error
            if isinstance(error, (ValueError, KeyError, TypeError)):  # state of another shape (written with other
                # options), or a state file edited by hand: named, not a traceback
                raise TrainingError(f"Cannot resume from {resume_from}: {type(error).__name__}: {error}") from error
            raise
        trained_on = state.get("base_fingerprint")  # absent in checkpoints of older versions
        if trained_on is not None and trained_on != base_fingerprint:
            raise TrainingError(
                f"{resume_from.name} was trained on other base weights than --model {config.model} loads now "
                f"({components.source_path}"
                + (f", Hub commit {components.revision}" if components.revision else "")
                + "): the model was updated or replaced since. Resume with the base the run started on, or start a new run.")
        global_step = int(state["step"])
        trained_by = state.get("num_processes")  # absent in checkpoints of older versions
        if trained_by is not None and trained_by != accelerator.num_processes:
            # each step took a batch from every process, and the schedule was stepped as often: with another count the
            # effective batch and the learning-rate schedule would go on wrong (a 2-process run resumed by one
            # trained its last 40 steps at a rate of 0)
            raise TrainingError(
                f"{resume_from.name} was trained by {trained_by} process(es) and this resume has {accelerator.num_processes}: "
                f"resume it with --num-processes {trained_by}, or start a new run.")
        if global_step > max_steps:  # nothing would train, and the outputs would be redone from the checkpoint
            raise TrainingError(steps_behind_message(config, resume_from, global_step, max_steps))
        progress(task="train", completed=global_step, total=max_steps, message=f"resumed from {resume_from.name} at step {global_step}")
        planned_before = state.get("max_train_steps")
        if planned_before and planned_before != max_steps and config.lr_scheduler not in ("constant", "constant_with_warmup"):
            # the schedule is a function of the total: a cosine that had decayed to 0 at its old end rises again
            progress(task="train", message=(
                f"the {config.lr_scheduler} learning-rate schedule now spans {max_steps} steps, not {planned_before}: "
                f"from step {global_step} the rate follows the longer schedule (after a decay to 0 it rises again); "
                "a new run trains with one whole schedule"))
            # the optimizer holds the rate the old schedule gave its last step: the next step takes the new schedule's
            # (it trained one step at the old end's rate, 0 after a linear decay); LambdaLR recomputes it from the step
            schedule = lr_scheduler.scheduler
            schedule.last_epoch -= 1
            schedule.step()
    start_step = global_step
    # the run's training time and start over all its sessions, for the kohya metadata (a resumed run is one run)
    seconds_before = float(state.get("seconds", 0.0)) if resume_from is not None else 0.0
    started_at = time.time() - (time.perf_counter() - started)
    if resume_from is not None:
        started_at = float(state.get("started_at", started_at))

    def seconds_so_far() -> float:
        return seconds_before + time.perf_counter() - started

    loss_rows = read_loss_csv(output_dir / "loss.csv", global_step) if resume_from is not None else []

    # --- the plan, caches ---
    total_micro = max_steps * micro_per_update
    plan = train_data.run_plan(images, config, total_micro, priors)
    start_micro = global_step * micro_per_update
    remaining = plan[start_micro:]
    pools = priors or {}
    class_image_count = len(train_data.class_image_ids(priors))
    per_epoch = max(1, train_data.batches_per_epoch(images, config.train_batch_size))  # micro-batches (kohya's epoch count)
    dataset = PlanDataset(images, pools, latent_cache, text_cache)
    prompts = list(config.validation_prompt) or default_sample_prompts(images)
    sampling = config.num_validation_images > 0
    if sampling and not config.validation_prompt and accelerator.is_main_process and resume_from is None:
        # the grids (and the CLIP score of evaluate) of two runs compare only with the same prompts and seeds
        progress(task="train", message=(
            f"sample prompts: {' | '.join(repr(_shortened(p)) for p in prompts)} (the first captions of this dataset, one per concept: a run on "
            "another dataset samples others; --validation-prompt, repeatable, keeps runs comparable)"))
    sample_captions = [*prompts, ""] if sampling else []  # "": the unconditional prompt of classifier-free guidance
    if accelerator.is_main_process:
        fill_caches(remaining, dataset, vae, text_encoder, tokenizer, device, progress, extra_captions=sample_captions,
                    max_token_length=config.max_token_length)
    accelerator.wait_for_everyone()
    prompt_states = None
    if text_cache is not None and config.mode == "lora":
        # every caption and sample prompt is encoded: the frozen text encoder and tokenizer have nothing left to do
        # in a LoRA run (its outputs hold no text encoder), so they leave memory, as with diffusers'
        # --pre_compute_text_embeddings. Samples are drawn from the cached prompt states.
        if sampling and accelerator.is_main_process:
            prompt_states = cached_prompt_states(text_cache, sample_captions)
        text_encoder = tokenizer = None
        components = dataclasses.replace(components, text_encoder=None, tokenizer=None)
        gc.collect()
    if device.type != "cpu":
        # with everything cached the frozen encoders only serve sampling: keep them out of GPU memory
        if latent_cache is not None:
            vae.to("cpu")
        if text_cache is not None and text_encoder is not None and not train_text:
            text_encoder.to("cpu")
    cache_stats_before = (latent_cache.stats.hits if latent_cache else 0, text_cache.stats.hits if text_cache else 0)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=remaining, collate_fn=collate_groups, num_workers=config.dataloader_num_workers
    )
    loader = accelerator.prepare_data_loader(loader, device_placement=False)  # _step_loss moves what it needs, without waiting

    if use_tensorboard and accelerator.is_main_process:
        # purge_step, the first step this session logs: TensorBoard drops the points a killed session logged past
        # the checkpoint resumed from (they are logged again as the steps are redone), as loss.csv is cut back to it
        accelerator.init_trackers("workbench-train", config=_tracker_config(config),
                                  init_kwargs={"tensorboard": {"purge_step": global_step + 1}} if resume_from is not None else None)

    loss_csv = output_dir / "loss.csv"
    if accelerator.is_main_process:
        with loss_csv.open("w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")  # the csv module's default is CRLF
            writer.writerow(["step", "loss", "lr", *(LOSS_PARTS if config.with_prior_preservation else ())])
            writer.writerows(loss_rows)
    last_good = ckpt.list_checkpoints(checkpoints_dir)[-1] if ckpt.list_checkpoints(checkpoints_dir) else None
    loss_log = LossLog(accelerator, loss_csv, loss_rows, read_every=LOSS_READ_EVERY if device.type == "cuda" else 1)

    # --- the loop ---
    repeated = sum(image.repeats for image in images)  # what an epoch holds, as kohya counts it
    progress(task="train", completed=global_step, total=max_steps, message=(
        f"training {config.mode} for {max_steps} steps on {len(images)} images"
        + (f" ({repeated} with repeats)" if repeated != len(images) else "")
        + f", {math.ceil(per_epoch / micro_per_update)} steps per epoch"
        + (f", with {class_image_count} class images" if class_image_count else "")
        # said, as kohya's and OneTrainer's alpha defaults to 1 where ours is the rank (diffusers'): 16x the update
        + (f"; LoRA rank {config.rank}, alpha {config.effective_lora_alpha:g}" if config.mode == "lora" else "")))
    unet.train()
    if train_text:
        text_encoder.train()
    micro_losses: list[torch.Tensor] = []
    micro_parts: list[torch.Tensor] = []

    def save_checkpoint() -> Path | None:
        """Everything a resume needs at `global_step` (None, and nothing written, when a weight is not finite)."""
        if not all(torch.isfinite(p).all() for p in named_trainable.values()):
            return None
        saved = ckpt.save_checkpoint(
            checkpoints_dir, step=global_step, trainable=named_trainable, optimizer=optimizer.optimizer,
            lr_scheduler=lr_scheduler.scheduler, scaler=accelerator.scaler, ema=ema,
            extra={"mode": config.mode, "max_train_steps": max_steps, "seed": config.seed, "config": config.to_dict(),
                   "num_processes": accelerator.num_processes, "base_fingerprint": base_fingerprint,
                   "seconds": seconds_so_far(), "started_at": started_at},
            # a LoRA at every checkpoint, in both formats (as diffusers' LoRA scripts do): an earlier, less
            # overfit one is often the one to keep. Full models are too big to write each time.
            also_write=(lambda folder: _save_model(
                config, folder, accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder) if train_text else None,
                components, noise_scheduler, len(images), global_step, seconds_so_far(), images=images,
                cache_latents=latent_cache is not None, reg_images=class_image_count, started_at=started_at,
                epoch=math.ceil(global_step * micro_per_update / per_epoch), num_processes=accelerator.num_processes,
                run_dir=output_dir,
            )) if config.mode == "lora" else None,
        )
        readable_as_umask_allows(saved)  # now: a run stopped or failed later leaves its checkpoints' LoRAs readable too
        ckpt.prune_checkpoints(checkpoints_dir, config.checkpoints_total_limit)
        return saved

    loop_started = time.perf_counter()
    micro_index = start_micro
    with loss_log.written_when_stopped():
        for groups_batch in loader:
            with accelerator.accumulate(*trained_modules_of(accelerator, unet, text_encoder if train_text else None)):
                generator = step_generator(config.seed, micro_index, accelerator.process_index)
                micro_index += accelerator.num_processes
                try:
                    loss, parts = _step_loss(groups_batch, generator, config, vae, text_encoder, tokenizer, unet, noise_scheduler, device, weight_dtype, train_text)
                except ValueError as error:  # torch's group norm, on a latent too small for the UNet's deepest level
                    if "Expected more than 1 value per channel" not in str(error):
                        raise
                    raise TrainingError(too_small_message(groups_batch, config, vae)) from None
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.max_grad_norm)
                # the rate this update takes: logged with its step (get_last_lr() after the scheduler's step, as
                # diffusers' examples log it, is the next step's: a warm-up's first step logged the full rate)
                step_lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro_losses.append(loss.detach())
            if parts is not None:
                micro_parts.append(parts)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if ema is not None:
                ema.step(accelerator.unwrap_model(unet).parameters())
            loss_log.add(global_step, micro_losses, step_lr, micro_parts)
            micro_losses, micro_parts = [], []
            checkpoint_due = (global_step % config.checkpointing_steps == 0 or global_step == max_steps
                              or epoch_checkpoint_due(global_step, per_epoch, micro_per_update, config.checkpointing_epochs))
            sample_due = sampling and global_step % config.validation_steps == 0 and global_step != max_steps
            if checkpoint_due or sample_due or loss_log.read_due():
                # a non-finite loss stops the run here, before a checkpoint or sample grid holds its weights
                loss_log.read(last_good)
            # the grid before the checkpoint: a run stopped between the two resumes from the checkpoint before, and
            # makes this step's grid again; the other way round it resumed after the step and the grid was never made
            if sample_due and accelerator.is_main_process:
                _save_grid(accelerator, components, unet, text_encoder, noise_scheduler, prompts, config, samples_dir, global_step, ema,
                           prompt_states=prompt_states)
            if accelerator.is_main_process and checkpoint_due:
                last_good = save_checkpoint() or last_good
            try:
                progress(task="train", completed=global_step, total=max_steps, message=None)
            except (StepCancelled, KeyboardInterrupt):
                # a stop asked for between steps (the TUI's Stop; Ctrl+C or SIGTERM in the CLI, which wait for the
                # step to end): the step is whole, so it is kept, and Resume goes on from here, not from the last
                # scheduled checkpoint (a stop at step 499 of 500-step checkpoints lost them all)
                if accelerator.is_main_process and not checkpoint_due and accelerator.num_processes == 1:
                    loss_log.read(last_good)  # a non-finite loss is never kept
                    save_checkpoint()
                raise
            if global_step >= max_steps:
                break
    loss_log.read(last_good)
    train_seconds = time.perf_counter() - loop_started
    accelerator.wait_for_everyone()

    # --- outputs ---
    outputs: dict[str, str] = {}
    if accelerator.is_main_process:
        unwrapped_unet = accelerator.unwrap_model(unet)
        unwrapped_text = accelerator.unwrap_model(text_encoder) if train_text else None
        if ema is not None:
            ema.copy_to(unwrapped_unet.parameters())
        progress(task="save", message="writing outputs")
        outputs.update(_save_model(
            config, output_dir, unwrapped_unet, unwrapped_text, components, noise_scheduler,
            len(images), global_step, seconds_so_far(), images=images, cache_latents=latent_cache is not None, started_at=started_at,
            epoch=math.ceil(global_step * micro_per_update / per_epoch), frozen_text_weights=frozen_text_weights,
            reg_images=class_image_count, num_processes=accelerator.num_processes, run_dir=output_dir,
        ))
        if sampling:
            grid, finals = _save_grid(accelerator, components, unet, text_encoder, noise_scheduler, prompts, config, samples_dir,
                                      global_step, None, final=True, prompt_states=prompt_states)
            outputs["samples"] = str(grid)
            outputs["final_samples"] = str(finals)
        outputs["loss_csv"] = str(loss_csv)
        if loss_rows:
            _write_loss_png(loss_rows, output_dir / "loss.png")
            outputs["loss_png"] = str(output_dir / "loss.png")
        outputs["checkpoints"] = str(checkpoints_dir)
        if use_tensorboard:
            outputs["logs"] = str(output_dir / "logs")
        readable_as_umask_allows(output_dir)
        progress(task="save", completed=1, total=1)
    cache = {}
    if latent_cache:
        cache["latent_hits"] = latent_cache.stats.hits - cache_stats_before[0]
    if text_cache:
        cache["text_hits"] = text_cache.stats.hits - cache_stats_before[1]
    return TrainResult(
        output_dir=output_dir, steps=global_step, final_loss=final_loss(loss_rows),
        losses=[r[1] for r in loss_rows], outputs=outputs, seconds=time.perf_counter() - started,
        train_seconds=train_seconds, images=len(images), cache=cache, steps_this_session=global_step - start_step,
        class_images=class_image_count, seconds_before=seconds_before,
    )


def _shortened(text: str, most: int = 120) -> str:
    """A caption as a message shows it: at most `most` characters."""
    return text if len(text) <= most else text[:most - 1] + "…"


def readable_as_umask_allows(folder: Path) -> None:
    """Give the run's .safetensors files the permissions any other file written here gets (0644 under the usual
    umask). safetensors 0.8 creates them 0600, so the ComfyUI or A1111 of another user on the machine could not
    read the LoRA."""
    wanted = 0o666 & ~current_umask()
    for path in folder.rglob("*.safetensors"):
        if path.stat().st_mode & 0o777 != wanted:
            path.chmod(wanted)


@contextlib.contextmanager
def _named_target_modules(option: str, model: torch.nn.Module):
    """peft's error for target modules the model lacks, as a short refusal naming the option and the layers there are."""
    from peft.utils.error import NoMatchingPeftModuleError

    try:
        yield
    except (NoMatchingPeftModuleError, ValueError) as error:
        if "target modules" not in str(error).lower() and not isinstance(error, NoMatchingPeftModuleError):
            raise
        linear = sorted({name.rsplit(".", 1)[-1] if not name.endswith("to_out.0") else "to_out.0"
                         for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)})
        raise RunRefused(f"No layer of the model matches {option} (--set {option}=...): its linear layers are named "
                         f"{', '.join(linear)}.") from None


def _add_loras(config: TrainConfig, unet, text_encoder=None) -> None:
    """A LoRA run's adapters on the frozen UNet (and text encoder, when given), as training and
    `exported_checkpoint` build them; target modules the model lacks are refused by name."""
    unet.requires_grad_(False)
    with _named_target_modules("lora_target_modules", unet):
        unet.add_adapter(_lora_config(config, config.lora_target_modules))
    if text_encoder is not None:
        text_encoder.requires_grad_(False)
        with _named_target_modules("text_encoder_target_modules", text_encoder):
            _add_text_encoder_lora(text_encoder, _lora_config(config, config.text_encoder_target_modules))


def _add_text_encoder_lora(text_encoder, lora_config) -> None:
    """peft LoRA on the text encoder through peft itself: transformers 5's own `add_adapter` insists on a
    newer peft than the one diffusers supports, so it is bypassed; `peft_config` is set the same way."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(lora_config, text_encoder, adapter_name="default")
    text_encoder.peft_config = {"default": lora_config}
    for name, param in text_encoder.named_parameters():
        param.requires_grad_("lora_" in name)


def _on(module: torch.nn.Module, device) -> None:
    """Move a module to `device` unless it is already there."""
    want, have = torch.device(device), next(module.parameters()).device
    if want.type != have.type or (want.index is not None and want.index != have.index):
        module.to(want)


def _place(module: torch.nn.Module, device, dtype: torch.dtype) -> None:
    """Move a module; cast only when the dtype really changes (diffusers warns on no-op casts)."""
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(device, dtype=dtype)
    else:
        module.to(device)


def trained_modules_of(accelerator, unet, text_encoder) -> list:
    return [unet] + ([text_encoder] if text_encoder is not None else [])


def _named_trainable(unet, text_encoder) -> dict[str, torch.nn.Parameter]:
    """The trainable weights by the names checkpoints store them under (`unet.…`, `text_encoder.…`)."""
    named = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
    if text_encoder is not None:
        named.update({f"text_encoder.{n}": p for n, p in text_encoder.named_parameters() if p.requires_grad})
    return named


def _lora_config(config: TrainConfig, target_modules):
    """The peft LoRA of a run (UNet or text encoder), as training and `exported_checkpoint` build it."""
    from peft import LoraConfig

    return LoraConfig(r=config.rank, lora_alpha=config.effective_lora_alpha, init_lora_weights="gaussian",
                      target_modules=list(target_modules))


@torch.no_grad()
def fill_caches(plan: list[list[ItemSpec]], dataset: PlanDataset, vae, text_encoder, tokenizer, device, progress: ProgressHook,
                extra_captions: Sequence[str] = (), max_token_length: int | None = None) -> None:
    """Encode every latent and caption the remaining plan needs (and `extra_captions`: the sample prompts) that is
    not on disk yet.

    Latents are encoded one image at a time: a batched VAE encode differs in the last bits with the batch
    it ran in, and a cache entry must be the same whichever run (and batch size) wrote it, or a resumed
    run would not match an uninterrupted one. One image at a time also keeps caching's memory small.
    """
    latent_cache, text_cache = dataset.latent_cache, dataset.text_cache
    if latent_cache is not None:
        todo: dict[str, tuple[TrainImage, ItemSpec]] = {}
        for specs in plan:
            for spec in specs:
                if spec.jitter is None:
                    image = dataset.image_of(spec)
                    key = latent_cache.key(image, spec)
                    if key not in todo and not latent_cache.path(key).exists():
                        todo[key] = (image, spec)
        for done, (key, (image, spec)) in enumerate(todo.items(), start=1):
            pixels = train_data.load_pixels(image, spec)[None].to(device, vae.dtype)
            posterior = vae.encode(pixels).latent_dist
            latent_cache.put(key, posterior.mean[0].float(), posterior.std[0].float())
            progress(task="cache latents", completed=done, total=len(todo))
    if text_cache is not None:
        captions = list(dict.fromkeys([*(spec.caption for specs in plan for spec in specs), *extra_captions]))
        missing = [c for c in captions if not text_cache.path(text_cache.key(c)).exists()]
        for i in range(0, len(missing), 32):
            chunk = missing[i : i + 32]
            hidden = text_states(text_encoder, tokenizer, chunk, max_token_length, device).float()
            for caption, state in zip(chunk, hidden):
                text_cache.put(caption, state)
            progress(task="cache text", completed=min(i + 32, len(missing)), total=len(missing))


def _step_loss(groups_batch, generator, config, vae, text_encoder, tokenizer, unet, noise_scheduler, device, weight_dtype,
               train_text) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The loss of one micro-batch (all its bucket groups), prior-preservation weighted, and its [instance, prior]
    parts (detached; None without class priors in the batch)."""
    per_sample_all, is_prior_all = [], []
    scaling = vae.config.scaling_factor
    for group in groups_batch:
        if "mean" in group:
            mean, std = to_device(group["mean"], device), to_device(group["std"], device)
        else:
            _on(vae, device)
            with torch.no_grad():
                posterior = vae.encode(to_device(group["pixels"], device).to(vae.dtype)).latent_dist
                mean, std = posterior.mean.float(), posterior.std.float()
        sample_noise = to_device(torch.randn(mean.shape, generator=generator), device)
        latents = (mean.float() + std.float() * sample_noise) * scaling
        noise = to_device(torch.randn(latents.shape, generator=generator), device)
        if config.noise_offset:
            noise = noise + config.noise_offset * to_device(torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator), device)
        timesteps = to_device(torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator), device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if "hidden" in group:
            hidden = to_device(group["hidden"], device)
        else:
            if text_encoder is None:  # released once every caption was cached (a LoRA run): the entry went missing since
                raise TrainingError(f"The text cache lost the entry of the caption {group['captions'][0]!r} during the run "
                                    "(was the cache folder cleaned?): run again with --resume latest.")
            _on(text_encoder, device)
            with torch.set_grad_enabled(train_text):
                hidden = text_states(text_encoder, tokenizer, group["captions"], config.max_token_length, device)
        model_pred = unet(noisy, timesteps, hidden.to(noisy.dtype)).sample  # accelerate autocasts under mixed precision
        target = training_target(noise_scheduler, latents, noise, timesteps)
        per_sample_all.append(per_sample_loss(model_pred, target, timesteps, noise_scheduler, config.snr_gamma))
        is_prior_all.append(group["is_prior"])  # stays on the host (combined_loss)
    loss, instance, prior = combined_loss(torch.cat(per_sample_all), torch.cat(is_prior_all), config.prior_loss_weight)
    return loss, None if prior is None else torch.stack([instance, prior]).detach()


def cached_prompt_states(text_cache: TextCache, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """The text encoder's output for each prompt, read from the cache `fill_caches` filled."""
    states = {}
    for prompt in prompts:
        state = text_cache.get(prompt)
        if state is None:
            raise TrainingError(f"The text cache lost the entry of the sample prompt {prompt!r} ({text_cache.folder}): run again.")
        states[prompt] = state
    return states


def _save_grid(accelerator, components, unet, text_encoder, noise_scheduler, prompts, config, samples_dir: Path, step: int, ema,
               final: bool = False, prompt_states: Mapping[str, torch.Tensor] | None = None):
    from diffusers.utils import make_image_grid

    samples_dir.mkdir(parents=True, exist_ok=True)
    unwrapped = accelerator.unwrap_model(unet)
    if ema is not None:  # sample with the EMA weights, then put the training weights back
        ema.store(unwrapped.parameters())
        ema.copy_to(unwrapped.parameters())
    unwrapped.eval()
    text = accelerator.unwrap_model(text_encoder) if text_encoder is not None else None  # None: sampled from prompt_states
    homes = [(module, module.device) for module in (components.vae, text) if module is not None]
    try:
        for module, _ in homes:
            _on(module, accelerator.device)
        pipe = sampling_pipeline(components, unwrapped, text, noise_scheduler)
        # a few sample images are not worth compiling the inference graphs for: compiled blocks run eagerly here
        stance = torch.compiler.set_stance("force_eager") if config.torch_compile else contextlib.nullcontext()
        with accelerator.autocast(), stance:
            rows = render_samples(pipe, prompts, config, accelerator.device, prompt_states)
    finally:
        for module, home in homes:
            _on(module, home)
        unwrapped.train()
        if ema is not None:
            ema.restore(unwrapped.parameters())
    grid = make_image_grid([img for row in rows for img in row], rows=len(rows), cols=len(rows[0]))
    path = samples_dir / (f"final-step-{step:06d}.png" if final else f"step-{step:06d}.png")
    # how the grid was made, in the PNG (A1111's PNG Info and ComfyUI read "parameters"): row r is prompts[r], column i
    # seed validation_seed + i (the "workbench" text says so; A1111 reads one number as the seed)
    grid.save(path, pnginfo=_png_text({
        "parameters": " | ".join(prompts) + "\n" + _sampling_settings(config, config.validation_seed),  # the first column's
        "workbench": json.dumps({"step": step, "prompts": list(prompts), **_sampling_record(config)}),
    }))
    if not final:
        return path
    final_dir = samples_dir / "final"
    final_dir.mkdir(exist_ok=True)
    index = []
    for p, (prompt, row) in enumerate(zip(prompts, rows)):
        for i, img in enumerate(row):
            name = f"{p:02d}-{i:02d}.png"
            seed = config.validation_seed + i
            img.save(final_dir / name, pnginfo=_png_text({"parameters": f"{prompt}\n{_sampling_settings(config, seed)}"}))
            index.append({"file": name, "prompt": prompt, "seed": seed, "step": step, **_sampling_record(config)})
    (final_dir / "samples.json").write_text(json.dumps(index, indent=1))
    return path, final_dir


def _sampling_record(config: TrainConfig) -> dict:
    """How sample images are made, beside their prompt and seed (samples.json, the grids' text)."""
    return {"sampler": "DDIM", "steps": config.validation_inference_steps, "guidance_scale": config.validation_guidance_scale,
            "width": config.resolution, "height": config.resolution, "negative_prompt": ""}


def _sampling_settings(config: TrainConfig, seed) -> str:
    """The settings line of A1111's `parameters` text, which its PNG Info shows and "send to txt2img" reads."""
    from pipelines.train.lora_formats import kohya_model_name

    return (f"Steps: {config.validation_inference_steps}, Sampler: DDIM, CFG scale: {config.validation_guidance_scale}, "
            f"Seed: {seed}, Size: {config.resolution}x{config.resolution}, Model: {kohya_model_name(config.model)}")


def _png_text(texts: Mapping[str, str]):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in texts.items():
        info.add_itxt(key, value)  # iTXt: UTF-8, as a prompt may be in any script
    return info


def _save_model(config, output_dir: Path, unet, text_encoder, components, noise_scheduler, image_count: int, steps: int, seconds: float,
                *, images=None, epoch: int | None = None, cache_latents: bool | None = None, reg_images: int = 0,
                started_at: float | None = None, frozen_text_weights: dict[str, torch.Tensor] | None = None,
                num_processes: int = 1, run_dir: Path | None = None) -> dict[str, str]:
    from pipelines.train import lora_formats

    outputs = {}
    if config.mode == "lora":
        outputs["lora_diffusers"] = str(lora_formats.save_diffusers_lora(output_dir, unet, text_encoder, save_dtype(config)))
        outputs["lora_kohya"] = str(lora_formats.save_kohya_lora(
            output_dir, unet, config, text_encoder=text_encoder, base_model=config.model,
            image_count=image_count, steps=steps, seconds=seconds, images=images, epoch=epoch, cache_latents=cache_latents,
            reg_images=reg_images, started_at=started_at, num_processes=num_processes, buckets=trained_bucket_settings(config, run_dir),
            prediction_type=noise_scheduler.config.prediction_type,
        ))
        return outputs
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=text_encoder or components.text_encoder,
        tokenizer=components.tokenizer, unet=unet, scheduler=_inference_scheduler(noise_scheduler),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    for module in (pipe.vae, pipe.text_encoder):
        _place(module, module.device, torch.float32)  # frozen parts may have run in fp16/bf16
    if frozen_text_weights is not None:
        pipe.text_encoder.load_state_dict(frozen_text_weights)  # exact, not the fp16/bf16 copy cast back
    pipeline_dir = output_dir / "pipeline"
    with quiet_model_io(diffusers=True):
        pipe.save_pretrained(str(pipeline_dir), safe_serialization=True)
    outputs["pipeline"] = str(pipeline_dir)
    outputs["single_file"] = str(_save_single_file(pipe, output_dir / "model.safetensors", config))
    return outputs


def trained_bucket_settings(config: TrainConfig, run_dir: Path | None = None) -> dict:
    """The bucket settings the run in `run_dir` (default: config.output_dir) trained with: its config.toml's (which
    `workbench train` writes, with the catalog's `workbench buckets` settings filled in), else its options' and the
    defaults."""
    import tomllib

    from pipelines.train.config import RUN_CONFIG_FILE

    settings = train_data.bucket_settings(config)
    run_dir = run_dir or (Path(config.output_dir) if config.output_dir else None)
    try:
        saved = tomllib.loads((run_dir / RUN_CONFIG_FILE).read_text()) if run_dir else {}
    except (OSError, tomllib.TOMLDecodeError):
        saved = {}
    for key, name in (("min_bucket_reso", "min_bucket_reso"), ("max_bucket_reso", "max_bucket_reso"),
                      ("bucket_reso_steps", "bucket_reso_steps"), ("no_upscale", "bucket_no_upscale")):
        if saved.get(name) is not None:
            settings[key] = saved[name]
    return settings


def _inference_scheduler(noise_scheduler):
    from diffusers import PNDMScheduler

    return inference_scheduler(PNDMScheduler, noise_scheduler)


def _save_single_file(pipe, path: Path, config) -> Path:
    """All weights in one safetensors file in the SD 1.x / 2.x original (LDM) layout that A1111/ComfyUI load; a UNet
    of another shape falls back to diffusers names prefixed unet./vae./text_encoder (`layout = diffusers`)."""
    from safetensors.torch import save_file

    from pipelines.train.lora_formats import kohya_model_name, model_spec
    from pipelines.train.single_file import is_sd_v2, save_ldm_checkpoint

    # the base model as the LoRA names it: a local one by its basename (a full path would leak into a shared file)
    metadata = {"format": "pt", "mode": config.mode, "base_model": kohya_model_name(config.model), "trained_with": "workbench",
                **model_spec(v2=is_sd_v2(pipe.unet.config), prediction_type=pipe.scheduler.config.prediction_type,
                             resolution=config.resolution, lora=False,
                             title=Path(config.output_dir).name if config.output_dir else "Checkpoint")}
    try:
        return save_ldm_checkpoint(path, pipe.unet, pipe.vae, pipe.text_encoder, {**metadata, "layout": "ldm"}, dtype=save_dtype(config))
    except ValueError:
        tensors = {}
        for prefix, module in (("unet", pipe.unet), ("vae", pipe.vae), ("text_encoder", pipe.text_encoder)):
            for name, tensor in module.state_dict().items():
                tensors[f"{prefix}.{name}"] = tensor.detach().to("cpu", save_dtype(config)).contiguous()
        metadata["modelspec.implementation"] = "diffusers"  # not the original layout the ModelSpec value would claim
        save_file(tensors, str(path), metadata={**metadata, "layout": "diffusers"})
        return path


def exported_checkpoint(checkpoint: Path, out_dir: Path, *, components=None, save_precision: str | None = None,
                        progress: ProgressHook = null_progress) -> dict[str, str]:
    """A checkpoint's weights written as a finished run writes its model: both LoRA files, or a diffusers pipeline and
    one single-file checkpoint (with the EMA weights when the run kept an EMA), so an earlier step can be used.
    `save_precision` (float, fp16, bf16) writes them in another dtype than the run's."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from pipelines.train.lora_formats import DIFFUSERS_LORA_FILE, KOHYA_LORA_FILE

    try:
        saved = ckpt.saved_config(checkpoint)
    except ckpt.DamagedCheckpoint as error:
        raise TrainingError(str(error)) from None
    if ckpt.damaged_files(checkpoint):
        raise TrainingError(f"{checkpoint} is not a whole checkpoint written by this workbench (its state.json or weights are missing).")
    if saved is None:  # its weights are there, but not what they are (mode, LoRA rank and targets) to write them as
        raise TrainingError(f"{checkpoint} was written by an older workbench, which kept no options with it, so its model "
                            "cannot be written on its own: resume the run to a later step (`workbench train MODE --resume "
                            "…`), whose checkpoints and outputs hold them.")
    config = TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})
    asked = save_precision is not None and save_precision != (config.save_precision or "float")
    if save_precision is not None:
        config = dataclasses.replace(config, save_precision=save_precision)
        try:
            config.validate()
        except ValueError as error:
            raise TrainingError(str(error)) from None
    written = {"lora_diffusers": checkpoint / DIFFUSERS_LORA_FILE, "lora_kohya": checkpoint / KOHYA_LORA_FILE}
    if config.mode == "lora" and all(path.is_file() for path in written.values()) and not asked:
        # the files the run wrote at that step: bitwise its LoRA, with its own metadata (epoch, training time)
        out_dir.mkdir(parents=True, exist_ok=True)
        progress(task="export", message=f"copying step {ckpt.checkpoint_step(checkpoint)}'s LoRA files to {out_dir}")
        return {name: str(shutil.copy2(path, out_dir / path.name)) for name, path in written.items()}
    components = components or load_components(config, progress)
    unet, text_encoder = components.unet, components.text_encoder
    train_text = config.train_text_encoder
    # the trainable weights the run had, as it built them
    if config.mode == "lora":
        _add_loras(config, unet, text_encoder if train_text else None)
    elif config.from_scratch:
        unet = UNet2DConditionModel.from_config(unet.config)
    try:
        ckpt.load_weights(checkpoint, _named_trainable(unet, text_encoder if train_text else None))
    except ValueError as error:
        raise TrainingError(str(error)) from None
    with torch.no_grad():
        if (checkpoint / "ema.safetensors").is_file():  # a finished run saves its EMA weights: so does its checkpoint
            shadow = load_file(str(checkpoint / "ema.safetensors"))
            for i, param in enumerate(unet.parameters()):
                param.copy_(shadow[str(i)])
    step, run_dir = ckpt.checkpoint_step(checkpoint), checkpoint.parent.parent
    images, priors = [], None  # for the kohya metadata: the run's own dataset, when its snapshot is there
    if (run_dir / train_data.SNAPSHOT_FILE).is_file():
        images, priors = train_data.read_snapshot(run_dir / train_data.SNAPSHOT_FILE)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress(task="export", message=f"writing step {step} of {run_dir} to {out_dir}")
    outputs = _save_model(config, out_dir, unet, text_encoder if train_text else None, components,
                          _noise_scheduler(components, config), len(images), step, 0.0, images=images or None,
                          reg_images=len(train_data.class_image_ids(priors)), run_dir=run_dir)
    readable_as_umask_allows(out_dir)  # as the run's own outputs: a UI run by another user reads them
    return outputs
