"""Evaluation of a training run: CLIP score of its samples and CMMD between samples and training images.

- CLIP score: 100 × max(cosine(image, prompt), 0), averaged over the final sample images (the
  torchmetrics / Hessel et al. definition), with the CLIP model of the run's preset.
- CMMD (Jayasumana et al. 2024, google-research/cmmd): squared MMD between the CLIP image
  embeddings (L2-normalised) of the samples and of the training images, Gaussian RBF kernel with
  σ = 10, scaled by 1000. Lower is closer. Works with any number of images and needs no Inception.
- FID: torchmetrics' FrechetInceptionDistance (2048-d pool features) when torchmetrics and
  torch-fidelity are installed (`pip install 'workbench[eval]'`) and the Inception weights are on this
  machine: $WORKBENCH_INCEPTION_WEIGHTS, or torch-fidelity's file in the torch hub cache. Nothing is
  downloaded; without them FID is recorded as skipped, with the reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import duckdb
import numpy as np
import torch
from PIL import Image, ImageOps

from workbench.catalog import first_row, transaction
from workbench.images import as_rgb, open_image
from workbench.progress import ProgressHook, null_progress

CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0
MAX_REFERENCE_IMAGES = 500
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's, as torchmetrics' FID loads it


def cmmd(x: torch.Tensor, y: torch.Tensor, sigma: float = CMMD_SIGMA) -> float:
    """CMMD between two sets of embeddings (rows), after L2 normalisation."""
    x = torch.nn.functional.normalize(x.double(), dim=-1)
    y = torch.nn.functional.normalize(y.double(), dim=-1)
    gamma = 1.0 / (2 * sigma**2)

    def kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-gamma * torch.cdist(a, b).pow(2)).mean()

    return float(CMMD_SCALE * (kernel_mean(x, x) + kernel_mean(y, y) - 2 * kernel_mean(x, y)))


def _image_embeddings(bundle, images: Sequence[Image.Image], device) -> torch.Tensor:
    out = []
    for start in range(0, len(images), 32):
        batch = torch.stack([bundle.preprocess(img.convert("RGB")) for img in images[start : start + 32]]).to(device)
        with torch.inference_mode():
            out.append(bundle.model.encode_image(batch).float().cpu())
    return torch.cat(out)


def _text_embeddings(bundle, prompts: Sequence[str], device) -> torch.Tensor:
    with torch.inference_mode():
        return bundle.model.encode_text(bundle.tokenizer(list(prompts)).to(device)).float().cpu()


def clip_score(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> float:
    """Mean of 100 × max(cosine, 0) over matched (image, prompt) rows."""
    cosine = torch.nn.functional.cosine_similarity(image_embeddings, text_embeddings, dim=-1)
    return float((100 * cosine.clamp(min=0)).mean())


def _default_clip(model: str) -> str:
    """The CLIP that scores a run's samples: its preset's; the tiny one for a model inside the tiny preset's folder
    (as the benchmarks and tests name it); else sd15's, the CLIP of the SD 1.x family."""
    from workbench.models import PRESETS, tiny_root

    if model in PRESETS:
        return model
    try:
        Path(model).expanduser().resolve().relative_to(tiny_root().resolve())
        return "tiny"
    except (ValueError, OSError):
        return "sd15"


def _open(path: str) -> Image.Image:
    with open_image(path) as opened:
        return as_rgb(ImageOps.exif_transpose(opened))


def inception_weights() -> Path:
    """The Inception weights FID uses: $WORKBENCH_INCEPTION_WEIGHTS, else torch-fidelity's file in the torch hub cache."""
    explicit = os.environ.get("WORKBENCH_INCEPTION_WEIGHTS")
    path = Path(explicit).expanduser() if explicit else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no Inception weights at {path} (put torch-fidelity's {INCEPTION_WEIGHTS_FILE} there, or set "
            "WORKBENCH_INCEPTION_WEIGHTS); CMMD is used instead"
        )
    return path


def _pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """Images as one float batch in [0, 1] at Inception's 299 px."""
    arrays = [np.asarray(image.resize((299, 299), Image.Resampling.BICUBIC)) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def fid(references: Sequence[Image.Image], samples: Sequence[Image.Image], weights: Path) -> float:
    """FID between two image sets with torchmetrics (2048-d Inception features)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    # torch-fidelity unpickles the file in full; the restricted unpickler checks first that it holds only tensors
    try:
        torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{weights} is not a plain tensor state dict, so it is not loaded: {error}") from error
    metric = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(weights))
    metric.update(_pixels(references), real=True)
    metric.update(_pixels(samples), real=False)
    return float(metric.compute())


def finished_sessions(con: duckdb.DuckDBPyConnection, train_id: int) -> list[int]:
    """The finished runs ('ok') in the folder of `train_id` and its life there (folder_id), in order: a run and the
    sessions that continued it with --resume, each rewriting the folder's outputs."""
    row = first_row(con.execute(
        "SELECT list(other.train_id ORDER BY other.train_id) FROM training_runs run JOIN training_runs other "
        "ON other.output_dir = run.output_dir AND other.folder_id IS NOT DISTINCT FROM run.folder_id "
        "AND other.status IN ('ok', 'continued') "
        "WHERE run.train_id = ?",
        [train_id],
    ))
    return list(row[0] or []) if row else []


def continued_by(con: duckdb.DuckDBPyConnection, train_id: int) -> int | None:
    """The later finished run that continued `train_id` in its folder (--resume) and so rewrote its outputs, if any."""
    sessions = finished_sessions(con, train_id)
    later = [other for other in sessions if other > train_id]
    return later[-1] if train_id in sessions and later else None  # the last: the folder's outputs are its


def run_metrics(
    con: duckdb.DuckDBPyConnection,
    train_id: int,
    *,
    clip_model: str | None = None,
    device: str | None = None,
    progress: ProgressHook = null_progress,
) -> dict:
    """CLIP score, CMMD (and FID when possible) of a training run's final samples, stored in training_runs."""
    from workbench.models import load_clip, resolve_device

    row = first_row(con.execute("SELECT model, outputs, image_ids, status, steps, output_dir FROM training_runs WHERE train_id = ?",
                      [train_id]))
    if row is None:
        raise ValueError(f"No training run {train_id}; list them with `workbench sql \"SELECT * FROM training_runs\"`.")
    model, outputs, image_ids, status, steps, output_dir = row
    later = continued_by(con, train_id)
    kept_samples = json.loads(outputs or "{}").get("final_samples")
    # a run continued by another keeps its final samples in exports/finished-step-N (older versions left them to be
    # written over, and those runs cannot be evaluated again)
    if later is not None and not (kept_samples and Path(output_dir or "") / "exports" in Path(kept_samples).parents):
        raise ValueError(f"Run {train_id}'s samples are now those of run {later}, which continued it in the same folder "
                         f"(its finished model is kept in exports/): evaluate run {later}.")
    if status not in ("ok", "continued"):
        after = con.execute("SELECT min(train_id) FROM training_runs WHERE train_id > ? AND output_dir = ? AND status = 'ok'",
                            [train_id, output_dir]).fetchall()[0][0]
        raise ValueError(f"Training run {train_id} did not finish ({status} at step {steps or 0}): it has no final samples. "
                         + (f"Run {after} went on in its folder: evaluate run {after}." if after is not None else
                            f"`workbench train … --resume latest --output-dir {output_dir}` finishes it."))
    if output_dir and not Path(output_dir).is_dir():
        raise ValueError(f"Training run {train_id}'s folder {output_dir} is gone (moved or deleted): its samples are read "
                         "where it trained; move it back to evaluate it.")
    outputs = json.loads(outputs) if outputs else {}
    final_dir = Path(outputs.get("final_samples", ""))
    index_file = final_dir / "samples.json"
    if not index_file.is_file():
        raise ValueError(f"Training run {train_id} has no final samples to evaluate (looked for {index_file}; runs with "
                         "--set num_validation_images=0 make none).")
    index = json.loads(index_file.read_text())
    samples = [_open(str(final_dir / entry["file"])) for entry in index]
    prompts = [entry["prompt"] for entry in index]
    device = resolve_device(device)
    name = clip_model or _default_clip(model)
    progress(task="evaluate", message=f"evaluating run {train_id} with CLIP {name}")
    bundle = load_clip(name, device=device)
    sample_emb = _image_embeddings(bundle, samples, device)
    metrics: dict = {"clip_model": name, "samples": len(samples)}
    metrics["clip_score"] = clip_score(sample_emb, _text_embeddings(bundle, prompts, device))
    ids = list(image_ids or [])[:MAX_REFERENCE_IMAGES]
    from pipelines.train.data import openable_paths

    files = openable_paths(con, ids)
    references = [_open(files[i]) for i in sorted(files)]
    if references:
        metrics["cmmd"] = cmmd(sample_emb, _image_embeddings(bundle, references, device))
        metrics["reference_images"] = len(references)
    if len(references) < 2 or len(samples) < 2:
        metrics["fid_skipped"] = "FID needs at least 2 sample and 2 training images"
    else:
        try:
            weights = inception_weights()
            progress(task="evaluate", message=f"FID with Inception weights {weights}")
            metrics["fid"] = fid(references, samples, weights)
        except ImportError as error:
            metrics["fid_skipped"] = f"{error.name or error} is not installed: pip install 'workbench[eval]' for FID"
        except Exception as error:  # a missing or refused weights file, too few features: CMMD still stands
            metrics["fid_skipped"] = str(error)
    figures = [metrics.get("clip_score"), metrics.get("cmmd"), metrics.get("fid"), json.dumps(metrics)]
    with transaction(con):  # the run's row holds the newest; `evaluations` keeps each one (another CLIP model, FID later)
        con.execute("UPDATE training_runs SET clip_score = ?, cmmd = ?, fid = ?, metrics = ? WHERE train_id = ?", [*figures, train_id])
        con.execute("INSERT INTO evaluations (train_id, clip_model, clip_score, cmmd, fid, metrics) VALUES (?, ?, ?, ?, ?, ?)",
                    [train_id, name, *figures])
    fid_note = f", FID {metrics['fid']:.2f}" if "fid" in metrics else ""
    progress(task="evaluate", message=f"CLIP score {metrics['clip_score']:.2f}, CMMD {metrics.get('cmmd', float('nan')):.3f}{fid_note}")
    return metrics
