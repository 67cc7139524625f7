"""Every model the workbench uses, in one place: presets, devices, dtypes, and loaders.

A *model name* is a preset (`tiny`, `sd15`, `sd15-large`), a Hugging Face id, a local folder, or (for Stable
Diffusion) a single-file `.safetensors`/`.ckpt` checkpoint. For CLIP it may also be an open_clip
`ARCH/PRETRAINED_TAG` pair (`ViT-B-32/laion2b_s34b_b79k`) or `hf-hub:org/repo`.

The `tiny` preset needs no download: small BLIP, open_clip and Stable Diffusion models are built from config with a
fixed seed, saved once under `workbench_home()/models/tiny/{sd,blip,clip}` in the standard formats, and loaded back
through exactly the code real weights use (`from_pretrained`, `open_clip.create_model_and_transforms`). Its weights
are random: captions are gibberish and CLIP scores carry no meaning, but every code path runs.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import pickle
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch

from workbench.config import workbench_home

Component = Literal["sd", "blip", "clip"]
COMPONENTS: tuple[str, ...] = ("sd", "blip", "clip")
TINY = "tiny"
TINY_SEED = 1234
# Bump when a tiny recipe changes, so stale folders built by an older recipe are rebuilt, not reused.
TINY_VERSION = 2


class ModelError(Exception):
    """A model problem with a short message meant for people."""


class ModelNotAvailableError(ModelError):
    """The weights are not on this machine and cannot (or may not) be downloaded."""


@dataclass(frozen=True)
class Preset:
    """One named set of models: a captioner, a CLIP scorer and a Stable Diffusion base."""

    name: str
    description: str
    blip: str
    clip: str  # open_clip 'ARCH/pretrained_tag', 'hf-hub:org/repo', or 'tiny'
    sd: str

    def source(self, component: str) -> str:
        return getattr(self, component)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            TINY,
            "small random-weight models built from config (offline; for tests and dry runs)",
            blip=TINY,
            clip=TINY,
            sd=TINY,
        ),
        Preset(
            "sd15",
            "BLIP base, CLIP ViT-B/32 (LAION-2B), Stable Diffusion 1.5",
            blip="Salesforce/blip-image-captioning-base",
            clip="ViT-B-32/laion2b_s34b_b79k",
            sd="stable-diffusion-v1-5/stable-diffusion-v1-5",
        ),
        Preset(
            "sd15-large",
            "BLIP large, CLIP ViT-L/14 (OpenAI), Stable Diffusion 1.5",
            blip="Salesforce/blip-image-captioning-large",
            clip="ViT-L-14/openai",
            sd="stable-diffusion-v1-5/stable-diffusion-v1-5",
        ),
    )
}


# --- devices and dtypes --------------------------------------------------------

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """`cpu`, `cuda[:N]` or `mps`; None picks cuda, then mps, then cpu. Unavailable devices raise ModelError."""
    if isinstance(name, torch.device):
        name = str(name)
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ModelError(f"Unknown device {name!r}: use cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"Device {name!r} was asked for, but no CUDA GPU is available here (use --device cpu).")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelError(f"Device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s).")
    elif device.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise ModelError("Device 'mps' was asked for, but Apple's Metal backend is not available here (use --device cpu).")
    elif device.type != "cpu":
        raise ModelError(f"Unsupported device {name!r}: use cpu, cuda, cuda:N or mps.")
    return device


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | str | None = None) -> torch.dtype:
    """fp32 (the default), fp16 or bf16; fp16 needs a GPU, since CPU kernels for it are missing or very slow."""
    if isinstance(name, torch.dtype):
        dtype = name
    elif name is None:
        dtype = torch.float32
    else:
        key = str(name).lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise ModelError(f"Unknown dtype {name!r}: use fp32, fp16 or bf16.")
        dtype = _DTYPES[key]
    device_type = torch.device(device).type if device is not None else "cpu"
    if dtype == torch.float16 and device_type == "cpu":
        raise ModelError("fp16 needs a GPU (--device cuda); on the CPU use fp32 (default) or bf16.")
    return dtype


def _open_clip_precision(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


# --- naming: what a model name refers to ---------------------------------------


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _not_available(
    model_id: str, component: str, cause: BaseException | str | None = None, *, fetch_id: str | None = None
) -> ModelNotAvailableError:
    fetch_id = fetch_id or model_id
    local = Path(model_id).expanduser()
    if local.exists():  # a file or folder here that failed to load: no Hub download mends it
        if component != "Stable Diffusion" and (local / "model_index.json").is_file():
            return ModelNotAvailableError(f"{component} model {str(local)!r} is a Stable Diffusion model, not a {component} model.")
        return ModelNotAvailableError(
            f"{component} model {str(local)!r} could not be loaded" + (f" ({_short(cause)})" if cause else "")
            + ". A truncated or damaged file, a missing part or another kind of model fails this way.")
    if _offline():
        why, detail = "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache", ""
    else:
        why, detail = "it could not be loaded or downloaded", f" ({_short(cause)})" if cause else ""
    if "/" in model_id and Path(model_id).expanduser().parent.is_dir():  # `models/typo`: meant as a path, perhaps
        detail += f"; nor is there a local file or folder {Path(model_id).expanduser().absolute()}"
    return ModelNotAvailableError(
        f"{component} model {model_id!r} is not available: {why}{detail}. Fetch it with `hf download {fetch_id}` "
        "on a machine with internet (then copy ~/.cache/huggingface), or name a local folder or file instead; "
        "the `tiny` preset works offline (`--model tiny`; `--clip-model tiny` for evaluate)."
    )


def _short(cause: BaseException | str) -> str:
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else cause.__class__.__name__
    return text if len(text) <= 160 else text[:157].rsplit(" ", 1)[0] + "..."


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or source.lower().endswith((".safetensors", ".ckpt", ".bin", ".pt"))


def _source_for(model: str, component: str) -> str:
    """The concrete source a model name means for one component (preset → its entry; anything else as given)."""
    if component not in COMPONENTS:
        raise ModelError(f"Unknown component {component!r}: use one of {', '.join(COMPONENTS)}.")
    if not model:
        raise ModelError("Empty model name: use a preset (" + ", ".join(PRESETS) + "), a Hugging Face id or a path.")
    preset = PRESETS.get(model)
    near = model.strip().lower()
    if preset is None and near in PRESETS and not Path(model).expanduser().exists():
        raise ModelNotAvailableError(f"Unknown model {model!r}: did you mean the preset {near!r}? (presets: {', '.join(PRESETS)})")
    source = preset.source(component) if preset else model
    if source != TINY and _looks_like_path(source) and not Path(source).expanduser().exists():
        raise ModelNotAvailableError(f"No such model file or folder: {source}")
    return source


def model_id(model: str) -> str:
    """`model` as runs and class priors record it: a local file or folder as its absolute path (so it means the same
    from any working folder), a preset or Hub id as given."""
    if model in PRESETS or not model:
        return model
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def _refuse_a_lora_file(path: Path) -> None:
    """A LoRA file passed where a checkpoint belongs fails deep in diffusers with a config message; say what it is."""
    if path.suffix.lower() != ".safetensors":
        return
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception:
        return
    if keys and all(("lora" in key.lower()) or key.endswith(".alpha") for key in keys):
        raise ModelError(f"{path} is a LoRA, not a model checkpoint: give the base model it was trained on as --model "
                         "(and load the LoRA on top of it, e.g. diffusers' pipe.load_lora_weights).")


def model_label(model: str, component: Component) -> str:
    """A short stable name for what `model` means for `component` (used in caption sources and score rows).

    Presets resolve to their entry, so `sd15` and `Salesforce/blip-image-captioning-base` label alike;
    local paths are labelled by their folder or file name.
    """
    source = _source_for(model, component)
    if source != TINY and Path(source).expanduser().exists():
        return Path(source).expanduser().resolve().name
    return source


def _openclip_pair(source: str) -> tuple[str, str | None] | None:
    """('ViT-B-32', 'laion2b_s34b_b79k') for an open_clip 'ARCH/TAG' name, else None."""
    import open_clip

    arch, _, tag = source.partition("/")
    if arch in open_clip.list_models():
        return arch, (tag or None)
    return None


def _hub_snapshot(repo_id: str) -> str | None:
    """The local snapshot folder of a Hugging Face repo if it is in the cache, without touching the network."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached, or not a valid repo id
        return None


def hub_revision(path: str | Path) -> str | None:
    """The Hub commit of a cached snapshot folder (`…/models--org--name/snapshots/<commit>`), else None."""
    path = Path(path)
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.name
    return None


HUB_PROBE_TIMEOUT = 10.0  # seconds: one request, before a download huggingface_hub would retry for minutes


def _check_hub(source: str, component: str, hub_id: str) -> None:
    """Before loading a Hub model that is not in the cache: one request to the Hub, so that a misspelt id or an
    unreachable Hub fails in seconds, with a message. Left to itself, huggingface_hub retries each file five times
    with backoff (minutes, which a cancel cannot stop and the TUI cannot show). A cached model, or HF_HUB_OFFLINE
    (which fails fast from the cache), asks nothing."""
    if _offline() or _hub_snapshot(hub_id) is not None:
        return
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(hub_id, timeout=HUB_PROBE_TIMEOUT)
    except GatedRepoError:
        return  # it exists; the download says whether this token may have it
    except RepositoryNotFoundError:
        raise ModelNotAvailableError(
            f"{component} model {source!r}: there is no model {hub_id!r} on the Hugging Face Hub (misspelt? a private "
            f"one needs `hf auth login`). Presets: {', '.join(PRESETS)}; or name a local folder or file."
        ) from None
    except Exception as error:  # no network, DNS, a timeout, the Hub down
        raise _not_available(source, component, f"the Hugging Face Hub cannot be reached: {_short(error)}",
                             fetch_id=hub_id) from None


def _from_the_hub(source: str) -> bool:
    """Whether a model source is a Hub id (not the tiny preset, a path, or a file)."""
    return source != TINY and not _looks_like_path(source) and not Path(source).expanduser().exists()


def component_path(preset_or_id: str, component: Component) -> str:
    """The local folder (or file) holding a component; builds `tiny` on first use. Raises ModelNotAvailableError."""
    source = _source_for(preset_or_id, component)
    if source == TINY:
        return str(ensure_tiny(component))
    path = Path(source).expanduser()
    if path.exists():
        return str(path.resolve())
    hub_id = source
    if component == "clip":
        if source.startswith("hf-hub:"):
            hub_id = source.removeprefix("hf-hub:")
        else:
            pair = _openclip_pair(source)
            if pair is not None:
                hub_id = _openclip_hub_id(*pair)
                if hub_id is None:
                    raise ModelNotAvailableError(f"No Hugging Face copy is known for the open_clip model {source!r}.")
    folder = _hub_snapshot(hub_id)
    if folder is None:
        raise _not_available(source, component, fetch_id=hub_id)
    return folder


def _openclip_hub_id(arch: str, tag: str | None) -> str | None:
    import open_clip

    if tag is None:
        return None
    cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
    hub = (cfg.get("hf_hub") or "").strip("/")
    return hub or None


def is_available_locally(preset_or_id: str, component: Component) -> bool:
    """True when the component can be loaded without a download (tiny counts once it is built)."""
    source = _source_for(preset_or_id, component)
    if source == TINY:
        return _tiny_ready(tiny_root() / component)
    try:
        component_path(preset_or_id, component)
        return True
    except ModelError:
        return False


# --- loaders ---------------------------------------------------------------------


@dataclass
class ClipModelBundle:
    """An open_clip model ready for inference, with its image transform and tokenizer."""

    model: Any
    preprocess: Callable
    tokenizer: Callable
    name: str
    embed_dim: int


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion model a trainer needs, loaded separately."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    name: str
    source_path: str  # the folder or file loaded: for a Hub id, its cached snapshot folder

    @property
    def revision(self) -> str | None:
        """The Hub commit the weights came from (None for a preset built here, a local folder or a file)."""
        return hub_revision(self.source_path)


@contextmanager
def quiet_model_io(*, diffusers: bool = False) -> Iterator[None]:
    """transformers' (and with `diffusers`, diffusers') own tqdm bars off while a model loads or the tiny preset is
    written: "Loading weights" and the like would break into the CLI's and TUI's own progress display. Download
    bars (huggingface_hub's, a first run of a Hub model) stay on."""
    from transformers.utils import logging as transformers_logging

    set_hook = getattr(transformers_logging, "set_tqdm_hook", None)  # transformers 5; older ones keep their bars
    previous = set_hook(lambda factory, args, kwargs: transformers_logging.EmptyTqdm(*args, **kwargs)) if set_hook else None
    diffusers_bars = False
    if diffusers:
        from diffusers.utils import logging as diffusers_logging

        diffusers_bars = diffusers_logging.is_progress_bar_enabled()
        diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if set_hook:
            set_hook(previous)
        if diffusers_bars:
            diffusers_logging.enable_progress_bar()


def _check_device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    device = resolve_device(device)
    return device, resolve_dtype(dtype, device)


def load_blip(model: str = TINY, *, device=None, dtype=None):
    """(BlipProcessor, BlipForConditionalGeneration) in eval mode on `device`."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    device, dtype = _check_device_dtype(device, dtype)
    source = _source_for(model, "blip")
    if _from_the_hub(source):
        _check_hub(source, "BLIP", source)
    where = component_path(model, "blip") if source == TINY else source
    try:
        with quiet_model_io():
            processor = BlipProcessor.from_pretrained(where)
            captioner = BlipForConditionalGeneration.from_pretrained(where, dtype=dtype)
    except (OSError, ValueError) as error:
        raise _not_available(source, "BLIP", error) from error
    return processor, captioner.to(device).eval()


def load_clip(model: str = TINY, *, device=None, dtype=None) -> ClipModelBundle:
    """An open_clip model (eval mode), its validation transform and tokenizer, as a ClipModelBundle."""
    import open_clip

    device, dtype = _check_device_dtype(device, dtype)
    source = _source_for(model, "clip")
    pretrained = None
    if source == TINY:
        name = TINY
        model_name = "local-dir:" + component_path(model, "clip")
    elif Path(source).expanduser().is_dir():
        name = model_label(model, "clip")
        model_name = "local-dir:" + str(Path(source).expanduser().resolve())
    elif source.startswith("hf-hub:"):
        name = model_name = source
    elif (pair := _openclip_pair(source)) is not None:
        name = source
        model_name, pretrained = pair
        if pretrained is None:
            raise ModelError(f"CLIP model {source!r} has no pretrained tag: use e.g. {model_name}/openai.")
    elif "/" in source:
        name = source
        model_name = "hf-hub:" + source
    else:
        raise ModelError(
            f"Unknown CLIP model {source!r}: use a preset ({', '.join(PRESETS)}), an open_clip ARCH/TAG such as "
            "ViT-B-32/laion2b_s34b_b79k, hf-hub:org/repo, or a folder with open_clip_config.json."
        )
    if source.startswith("hf-hub:") or pretrained is not None:
        hub_id = source.removeprefix("hf-hub:") if pretrained is None else _openclip_hub_id(model_name, pretrained)
        if hub_id is not None:  # (open_clip's few URL-only tags download from elsewhere)
            _check_hub(source, "CLIP", hub_id)
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, precision=_open_clip_precision(dtype), device=device
        )
        tokenizer = open_clip.get_tokenizer(model_name)
    except (OSError, RuntimeError, ValueError) as error:
        fetch_id = source.removeprefix("hf-hub:")
        if pretrained is not None:
            fetch_id = _openclip_hub_id(model_name, pretrained) or fetch_id
        raise _not_available(source, "CLIP", error, fetch_id=fetch_id) from error
    clip.eval()
    embed_dim = int(clip.text_projection.shape[1]) if getattr(clip, "text_projection", None) is not None else None
    if embed_dim is None:  # towers without a projection matrix: ask the model
        with torch.inference_mode():
            embed_dim = int(clip.encode_text(tokenizer(["x"]).to(device)).shape[-1])
    return ClipModelBundle(model=clip, preprocess=preprocess, tokenizer=tokenizer, name=name, embed_dim=embed_dim)


def single_file_config(path: Path) -> Path | None:
    """A diffusers folder that describes a single-file checkpoint's architecture, found beside it, if any.

    Training writes `model.safetensors` next to `pipeline/`; a folder holding both the file and
    model_index.json works too. With one, the checkpoint loads offline; without, diffusers fetches
    the config of the detected architecture from the Hub.
    """
    for folder in (path.parent / "pipeline", path.with_suffix(""), path.parent):
        if (folder / "model_index.json").is_file():
            return folder
    return None


def _is_single_file(source: str) -> bool:
    return source.lower().endswith((".safetensors", ".ckpt")) and Path(source).expanduser().is_file()


def load_sd_pipeline(model: str = TINY, *, device=None, dtype=None):
    """A StableDiffusionPipeline (safety checker off) from a preset, HF id, folder or single-file checkpoint."""
    device, dtype = _check_device_dtype(device, dtype)
    source = _source_for(model, "sd")
    if _from_the_hub(source):
        _check_hub(source, "Stable Diffusion", source)
    try:
        with quiet_model_io(diffusers=True):
            pipe = _sd_pipeline_from(model, source, dtype)
    except (OSError, ValueError, EnvironmentError) as error:
        raise _not_available(source, "Stable Diffusion", error) from error
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _refuse_a_folder_that_is_not_a_model(source: str) -> None:
    """A local folder without model_index.json is no diffusers model: say where a model may be instead of pointing
    at the Hugging Face Hub (a workbench run folder holds its model in pipeline/ and model.safetensors)."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return
    if (folder / "model_index.json").is_file():
        _refuse_another_architecture(folder)
        return
    inside = [str(folder / name) for name in ("pipeline", "model.safetensors") if (folder / name).exists()]
    if inside and ((folder / "pipeline").is_dir() or (folder / "dataset.json").is_file()):  # a run's own files
        raise ModelNotAvailableError(f"{folder} is a training run's folder, not a model: name the model it wrote, "
                                     f"{' or '.join(inside)}.")
    try:  # a transformers model (a BLIP or CLIP folder): said as what it is, not as a run folder
        kind = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind:
        raise ModelNotAvailableError(f"{folder} is a {kind} model (transformers), not a Stable Diffusion model: name a "
                                     "diffusers Stable Diffusion folder, a single-file checkpoint, a preset or a Hub id.")
    if (folder / "pytorch_lora_weights.safetensors").is_file():
        raise ModelNotAvailableError(f"{folder} holds a LoRA, not a model: name the base model it was trained on "
                                     "(its training_runs row, or the LoRA's ss_sd_model_name metadata, says which).")
    raise ModelNotAvailableError(f"{folder} is a folder but not a diffusers model (no model_index.json): name a "
                                 "diffusers model folder, a single-file .safetensors checkpoint, a preset or a Hub id.")


SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")  # SD 1.x / 2.x text-to-image, as trained here


def _refuse_another_architecture(folder: Path) -> None:
    """A diffusers folder of another architecture (SDXL, SD 3, an inpainting UNet) loads as far as the first step and
    fails there with a traceback: refused by what its model_index.json says."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as error:
        raise ModelNotAvailableError(f"{folder / 'model_index.json'} is not readable JSON ({_short(error)}).") from None
    kind = index.get("_class_name") if isinstance(index, dict) else None
    if kind not in SD_PIPELINES or "text_encoder_2" in index:
        raise ModelNotAvailableError(
            f"{folder} is a {kind or 'model of an unknown kind'} model (model_index.json), not Stable Diffusion 1.x or 2.x: "
            f"the workbench trains and samples those ({', '.join(SD_PIPELINES)}); SDXL and later are not supported.")
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return  # no readable UNet config: loading says what is wrong
    if unet.get("in_channels", 4) != 4:
        raise ModelNotAvailableError(f"{folder}'s UNet takes {unet.get('in_channels')} input channels (an inpainting or "
                                     "depth model): the workbench trains text-to-image models, with 4.")


def _refuse_a_damaged_safetensors(path: Path) -> None:
    """A truncated or foreign .safetensors fails in diffusers with a message about config files; say what it is."""
    if path.suffix.lower() != ".safetensors":
        return
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            keys = list(handle.keys())
    except Exception as error:  # safetensors raises its own error types, and OSError
        raise ModelNotAvailableError(f"{path} is not a readable safetensors file ({_short(error)}): truncated or damaged "
                                     "in a copy, or not a checkpoint at all.") from None
    # a BLIP's or CLIP's model.safetensors (a review trained on one): no UNet in it, in either layout this loads
    if keys and not any(key.startswith(("model.diffusion_model.", "unet.")) for key in keys):
        raise ModelNotAvailableError(f"{path} holds no Stable Diffusion UNet (keys such as {keys[0]!r}): another kind of "
                                     "model, not a Stable Diffusion checkpoint.")


def _checked_single_file(path: Path) -> Path | None:
    """A single-file checkpoint's diffusers folder beside it (None without one), once the file is known to be a whole
    Stable Diffusion checkpoint (not a LoRA, a damaged file or another model's) and that folder SD 1.x / 2.x."""
    _refuse_a_lora_file(path)
    _refuse_a_damaged_safetensors(path)
    beside = single_file_config(path)
    if beside is not None:
        _refuse_another_architecture(beside)
    return beside


def refuse_a_local_model_that_is_not_one(model: str) -> None:
    """Raise ModelNotAvailableError for a local folder that is no diffusers model, or a path-like name with nothing
    there; presets, Hub ids and model files pass (their loading says the rest)."""
    source = _source_for(model, "sd")  # a path-like name with nothing there is refused here
    if source != TINY and Path(source).expanduser().is_dir():
        _refuse_a_folder_that_is_not_a_model(source)
    elif _is_single_file(source):
        _checked_single_file(Path(source).expanduser())
    elif _from_the_hub(source):
        snapshot = _hub_snapshot(source)
        if snapshot is not None:  # a cached Hub model of another architecture (SDXL) is refused as a folder is
            _refuse_another_architecture(Path(snapshot))
        elif _offline():
            raise _not_available(source, "Stable Diffusion")  # before a run folder is made, not after the model loads


def _sd_pipeline_from(model: str, source: str, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline

    if not _is_single_file(source):
        where = component_path(model, "sd") if source == TINY else source
        _refuse_a_folder_that_is_not_a_model(where)
        return StableDiffusionPipeline.from_pretrained(where, dtype=dtype, safety_checker=None, requires_safety_checker=False)
    path = Path(source).expanduser()
    config_folder = _checked_single_file(path)
    try:
        return StableDiffusionPipeline.from_single_file(
            str(path), dtype=dtype, safety_checker=None, requires_safety_checker=False,
            **({"config": str(config_folder)} if config_folder else {}),
        )
    except (KeyError, RuntimeError) as error:  # the weights do not fit the architecture the folder beside it describes
        raise ModelNotAvailableError(
            f"{path} does not fit the model described by {config_folder or 'its detected architecture'} "
            f"({error.__class__.__name__}: {_short(error)}): the folder beside a checkpoint must be its own model's.") from None
    except (OSError, ValueError, EnvironmentError) as error:
        if config_folder:
            raise
        raise ModelNotAvailableError(
            f"Could not load the single-file checkpoint {path}: diffusers needs the architecture's config files "
            f"and could not get them ({_short(error)}). Run once with internet access (they are fetched from the "
            "Hugging Face Hub and cached), or put the diffusers folder of the same architecture (with "
            f"model_index.json) beside it as {path.parent / 'pipeline'}."
        ) from error


def load_sd_tokenizer(model: str):
    """The tokenizer of a Stable Diffusion model, from this machine only (no download, no weights loaded), or None
    where it is not here: for what needs the tokens alone (how long captions are)."""
    from transformers import CLIPTokenizer

    try:
        source = _source_for(model, "sd")
        if source == TINY:
            folder = component_path(model, "sd")
        elif _is_single_file(source):
            folder = single_file_config(Path(source).expanduser())
        elif Path(source).expanduser().is_dir():
            folder = Path(source).expanduser()
        else:
            folder = _hub_snapshot(source)
        if folder is None:
            return None
        with quiet_model_io():
            return CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer")
    except Exception:  # not here, or not readable: the run itself says why when it loads the model
        return None


def _refused_pickle(error: BaseException) -> bool:
    """Whether torch refused to unpickle weights somewhere in this error's chain."""
    seen = 0
    while error is not None and seen < 20:
        if isinstance(error, pickle.UnpicklingError):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def load_sd_components(model: str = TINY, *, device=None, dtype=None) -> SDComponents:
    """Tokenizer, text encoder, VAE, UNet and a DDPM noise scheduler of a Stable Diffusion model, for training."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    device, dtype = _check_device_dtype(device, dtype)
    source = _source_for(model, "sd")
    if _is_single_file(source):
        pipe = load_sd_pipeline(model, device=device, dtype=dtype)
        return SDComponents(
            tokenizer=pipe.tokenizer,
            text_encoder=pipe.text_encoder,
            vae=pipe.vae,
            unet=pipe.unet,
            noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
            name=model,
            source_path=str(Path(source).expanduser().resolve()),
        )
    if _from_the_hub(source):
        _check_hub(source, "Stable Diffusion", source)
        snapshot = _hub_snapshot(source)
        if snapshot is not None:
            _refuse_another_architecture(Path(snapshot))
    where = component_path(model, "sd") if source == TINY else source
    _refuse_a_folder_that_is_not_a_model(where)
    try:
        with quiet_model_io(diffusers=True):
            tokenizer = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer")
            text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", dtype=dtype)
            vae = AutoencoderKL.from_pretrained(where, subfolder="vae", dtype=dtype)
            unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet", dtype=dtype)
            noise_scheduler = DDPMScheduler.from_pretrained(where, subfolder="scheduler")
    except (OSError, ValueError, EnvironmentError, pickle.UnpicklingError) as error:
        if _refused_pickle(error):
            # torch's weights_only load refused a pickled .bin (diffusers wraps it in an OSError): said as what it is,
            # not as a model to download, nor with torch's advice to unpickle it
            raise ModelError(f"{source} holds weights as a pickle (.bin) with more than plain tensors in it, which "
                             "the workbench does not load: such a pickle can run code when loaded (a .bin of plain "
                             "tensors loads). Use a copy saved as safetensors (diffusers' save_pretrained writes them).") from None
        raise _not_available(source, "Stable Diffusion", error) from error
    source_path = where if Path(where).exists() else (_hub_snapshot(where) or where)
    return SDComponents(
        tokenizer=tokenizer,
        text_encoder=text_encoder.to(device),
        vae=vae.to(device),
        unet=unet.to(device),
        noise_scheduler=noise_scheduler,
        name=model,
        source_path=str(source_path),
    )


# --- the tiny preset: built from config once, then loaded like real weights ------


def tiny_root() -> Path:
    return workbench_home() / "models" / TINY


def _tiny_ready(folder: Path) -> bool:
    marker = folder / ".workbench-tiny.json"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("version") == TINY_VERSION
    except (OSError, ValueError):
        return False


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so two processes do not build the same tiny model at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): the atomic rename below still keeps the folder whole
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_tiny(component: Component) -> Path:
    """Build `models/tiny/<component>` if it is missing (temp folder + rename, under a lock) and return it."""
    if component not in COMPONENTS:
        raise ModelError(f"Unknown component {component!r}: use one of {', '.join(COMPONENTS)}.")
    root = tiny_root()
    final = root / component
    if _tiny_ready(final):
        return final
    with _file_lock(root / f".{component}.lock"):
        if _tiny_ready(final):  # another process finished it while we waited
            return final
        staging = Path(tempfile.mkdtemp(prefix=f".{component}.", dir=root))
        try:
            # the builders seed torch for their fixed weights: a run that seeded first (`--seed`) must draw what it
            # would have drawn without a build on the way, or a first run in a new home differs from every later one
            with quiet_model_io(diffusers=component == "sd"), _random_state_kept():
                _TINY_BUILDERS[component](staging)
            (staging / ".workbench-tiny.json").write_text(json.dumps({"version": TINY_VERSION, "seed": TINY_SEED}))
            if final.exists():  # an old or broken build: move it aside, then drop it
                stale = Path(tempfile.mkdtemp(prefix=f".{component}.stale.", dir=root))
                os.rename(final, stale / component)
                shutil.rmtree(stale, ignore_errors=True)
            os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def _seeded() -> None:
    torch.manual_seed(TINY_SEED)


@contextmanager
def _random_state_kept() -> Iterator[None]:
    """Put back the random states (torch's CPU and CUDA generators, numpy's, Python's) the block changes."""
    import random

    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    # manual_seed seeds every GPU too (at once, or when CUDA starts): their states are kept as well
    gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=gpus):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


# Captions in the style BLIP writes; the tiny BLIP's WordPiece vocabulary is trained on these.
_CAPTION_WORDS = {
    "subjects": ["dog", "cat", "man", "woman", "child", "car", "bicycle", "house", "tree", "flower", "bird", "horse",
                 "boat", "train", "cup", "chair", "table", "mountain", "beach", "street"],
    "colors": ["red", "blue", "green", "yellow", "black", "white", "brown", "gray", "orange", "purple"],
    "scenes": ["in a field", "on a table", "on the street", "in the snow", "at the beach", "in a room",
               "under a blue sky", "next to a building", "in the water", "on a wooden floor"],
    "styles": ["a photo of", "a close up of", "a painting of", "a picture of", "a drawing of", "there is"],
}


def _caption_corpus() -> list[str]:
    words = _CAPTION_WORDS
    lines = []
    for i, subject in enumerate(words["subjects"]):
        for j, color in enumerate(words["colors"]):
            style = words["styles"][(i + j) % len(words["styles"])]
            scene = words["scenes"][(i * 3 + j) % len(words["scenes"])]
            lines.append(f"{style} a {color} {subject} {scene}")
    return lines


def _build_tiny_blip(folder: Path) -> None:
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    wordpiece = BertWordPieceTokenizer(lowercase=True)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    wordpiece.train_from_iterator(_caption_corpus(), vocab_size=600, min_frequency=1, special_tokens=special,
                                  show_progress=False)  # its bar wrote blank lines to stdout, not a terminal
    vocab_file = folder / "wordpiece-vocab.txt"
    vocab = wordpiece.get_vocab()
    vocab_file.write_text("".join(token + "\n" for token, _ in sorted(vocab.items(), key=lambda kv: kv[1])))
    tokenizer = BertTokenizer(vocab=str(vocab_file), do_lower_case=True, bos_token="[DEC]", model_max_length=64)
    vocab_file.unlink()
    dec_id = tokenizer.convert_tokens_to_ids("[DEC]")
    sep_id = tokenizer.convert_tokens_to_ids("[SEP]")
    image_size = 64
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    config = BlipConfig(
        vision_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            image_size=image_size, patch_size=8, initializer_range=0.1,
        ),
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, encoder_hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
            bos_token_id=dec_id, sep_token_id=sep_id, eos_token_id=sep_id, pad_token_id=tokenizer.pad_token_id,
            initializer_range=0.1,
        ),
        projection_dim=64,
        image_text_hidden_size=64,
        # BLIP's default init (std 0.02) makes a random decoder ignore the image: every caption comes out the
        # same. A wider init makes captions depend on the image, so tests can tell images apart.
        initializer_range=0.1,
    )
    _seeded()
    model = BlipForConditionalGeneration(config)
    model.generation_config.max_length = 20
    model.save_pretrained(folder)
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    # head_width is needed, or open_clip computes 0 vision heads for a narrow tower
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
TINY_CLIP_ARCH = "workbench-tiny-clip"


def _build_tiny_clip(folder: Path) -> None:
    import open_clip
    from open_clip import factory
    from safetensors.torch import save_file

    factory._MODEL_CONFIGS[TINY_CLIP_ARCH] = json.loads(json.dumps(TINY_CLIP_CONFIG))
    _seeded()
    # random init is the point here; open_clip would log "No pretrained weights loaded ... initialized randomly"
    root_logger = logging.getLogger()  # open_clip logs through the root logger
    previous = root_logger.level
    root_logger.setLevel(logging.ERROR)
    try:
        model = open_clip.create_model(TINY_CLIP_ARCH, pretrained=None)
    finally:
        root_logger.setLevel(previous)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    preprocess_cfg = {
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": preprocess_cfg}, indent=2)
    )


def clip_bpe_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """Write CLIP's vocab.json and merges.txt from the BPE table open_clip ships (what SD1.5's tokenizer uses)."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in merges))
    return vocab_path, merges_path


def _build_tiny_sd(folder: Path) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    bpe_dir = folder / ".bpe"
    bpe_dir.mkdir()
    vocab_path, merges_path = clip_bpe_tokenizer_files(bpe_dir)
    # model_max_length=77: without it the pipeline's tokenizer call overflows the text encoder's positions
    tokenizer = CLIPTokenizer(vocab=str(vocab_path), merges=str(merges_path), model_max_length=77)
    _seeded()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=32, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        )
    )
    _seeded()
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    _seeded()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        # four blocks = three downsamplings: 64 px images give 8x8 latents, like SD's factor 8
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(bpe_dir)
    # keep the BPE files beside tokenizer.json too, as SD1.5's tokenizer folder has them
    clip_bpe_tokenizer_files(folder / "tokenizer")


_TINY_BUILDERS: dict[str, Callable[[Path], None]] = {
    "sd": _build_tiny_sd,
    "blip": _build_tiny_blip,
    "clip": _build_tiny_clip,
}


def describe_presets() -> list[dict[str, Any]]:
    """One row per preset component: preset, component, source, present locally, local path (or None)."""
    rows = []
    for preset in PRESETS.values():
        for component in COMPONENTS:
            source = preset.source(component)
            present = is_available_locally(preset.name, component)
            path = None
            if present:
                path = str(tiny_root() / component) if source == TINY else component_path(preset.name, component)
            rows.append(
                {"preset": preset.name, "component": component, "source": source, "present": present, "path": path}
            )
    return rows
