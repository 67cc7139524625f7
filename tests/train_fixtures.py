"""Helpers shared by the training tests (issue 4): tiny images in a catalog, a fast config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SIZES = [(32, 32), (48, 32), (32, 48), (40, 40)]


def write_images(folder: Path, count: int = 3, *, sizes=SIZES, seed: int = 0) -> list[Path]:
    """`count` small, distinct PNGs with caption sidecars (a coloured square on a coloured field)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        array = np.zeros((height, width, 3), np.uint8)
        array[:, :, i % 3] = 200
        array[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = rng.integers(0, 255, 3)
        path = folder / f"img{i}.png"
        Image.fromarray(array).save(path)
        path.with_suffix(".txt").write_text(f"square {i}, red, blue, green")
        paths.append(path)
    return paths


def ingest_images(con, folder: Path, count: int = 3, **kwargs) -> list[Path]:
    from pipelines.ingest import ingested_images

    paths = write_images(folder, count, **kwargs)
    ingested_images(con, [folder], workers=1)
    return paths


def fast_config(output_dir: Path, **overrides):
    """A TrainConfig that trains `tiny` at 32 px in a few seconds on one CPU thread."""
    from pipelines.train import load_train_config

    values = dict(
        mode="lora", model="tiny", resolution=32, train_batch_size=2, max_train_steps=4, checkpointing_steps=2,
        validation_steps=1000, validation_inference_steps=1, num_validation_images=1, output_dir=str(output_dir),
        device="cpu", learning_rate=1e-3, report_to="none", evaluate=False, cache_dir=str(output_dir.parent / "cache"),
    )
    values.update(overrides)
    return load_train_config(None, values)


def tiny_components():
    """Fresh tiny SD parts (training changes them in place, so every run loads its own)."""
    from workbench.models import load_sd_components

    return load_sd_components("tiny", device="cpu", dtype="float32")


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine two spinning threads make tiny models 100× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def deny_opening(monkeypatch, path) -> None:
    """Opening `path` (builtins.open) fails with EACCES, as for a file made unreadable since ingest: tests run as root
    in CI, where chmod 000 stops nothing."""
    import builtins

    real_open = builtins.open

    def denied(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
