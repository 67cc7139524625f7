"""Evaluation of a training run: CLIP score of its samples and CMMD between samples and training images.

- CLIP score: 100 × max(cosine(image, prompt), 0), averaged over the final sample images (the
  torchmetrics / Hessel et al. definition), with the CLIP model of the run's preset.
- CMMD (Jayasumana et al. 2024, google-research/cmmd): squared MMD between the CLIP image
  embeddings (L2-normalised) of the samples and of the training images, Gaussian RBF kernel with
  σ = 10, scaled by 1000. Lower is closer. Works with any number of images and needs no Inception.
- FID: through torchmetrics only when its Inception weights are already on this machine
  (nothing is downloaded); otherwise recorded as skipped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import duckdb
import torch
from PIL import Image, ImageOps

from workbench.progress import ProgressHook, null_progress

CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0
MAX_REFERENCE_IMAGES = 500


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
    from workbench.models import PRESETS

    return model if model in PRESETS else "sd15"


def _open(path: str) -> Image.Image:
    with Image.open(path) as opened:
        return ImageOps.exif_transpose(opened).convert("RGB")


def _inception_weights_present() -> bool:
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    return any(hub.glob("pt_inception-2015-12-05*.pth")) if hub.is_dir() else False


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

    row = con.execute("SELECT model, outputs, image_ids FROM training_runs WHERE train_id = ?", [train_id]).fetchone()
    if row is None:
        raise ValueError(f"No training run {train_id}; list them with `workbench sql \"SELECT * FROM training_runs\"`.")
    model, outputs, image_ids = row
    outputs = json.loads(outputs) if outputs else {}
    final_dir = Path(outputs.get("final_samples", ""))
    index_file = final_dir / "samples.json"
    if not index_file.is_file():
        raise ValueError(f"Training run {train_id} has no final samples to evaluate (looked for {index_file}).")
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
    if references and _inception_weights_present():
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance

            fid = FrechetInceptionDistance(normalize=True)
            to_tensor = lambda imgs: torch.stack([torch.from_numpy(__import__("numpy").asarray(i.resize((299, 299)))).permute(2, 0, 1) for i in imgs]).float() / 255
            fid.update(to_tensor(references), real=True)
            fid.update(to_tensor(samples), real=False)
            metrics["fid"] = float(fid.compute())
        except Exception as error:  # FID needs torch-fidelity and ≥ 2 images per side
            metrics["fid_skipped"] = f"{error.__class__.__name__}: {error}"
    else:
        metrics["fid_skipped"] = "Inception weights are not on this machine (CMMD is used instead)"
    con.execute(
        "UPDATE training_runs SET clip_score = ?, cmmd = ?, fid = ?, metrics = ? WHERE train_id = ?",
        [metrics.get("clip_score"), metrics.get("cmmd"), metrics.get("fid"), json.dumps(metrics), train_id],
    )
    progress(task="evaluate", message=f"CLIP score {metrics['clip_score']:.2f}, CMMD {metrics.get('cmmd', float('nan')):.3f}")
    return metrics
