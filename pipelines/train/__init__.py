"""Training on the curated dataset: LoRA, DreamBooth with prior preservation, full fine-tune.

Public entry points:
- `trained_model(con, config, *, components=None, progress, release_catalog=False)` (pipelines/train/run.py): the step.
- `main(config, images, *, output_dir, priors, components, progress)` (loop.py): the loop itself.
- `TrainConfig` / `load_train_config(path, overrides)` (config.py): every option.
- `run_metrics(con, train_id, ...)` (evaluate.py): CLIP score / CMMD of a run.
"""

from pipelines.train.config import ConfigError, TrainConfig, load_train_config

__all__ = ["ConfigError", "RunRefused", "TrainConfig", "TrainResult", "TrainingError", "load_train_config", "main", "trained_model"]

# the loop and the step import torch (seconds, and hundreds of MB): loaded when first named, so that what reads only
# the options (the CLI's help, pipelines.train.config) does not pay for them
_LAZY = {"RunRefused": "loop", "TrainingError": "loop", "TrainResult": "loop", "main": "loop", "trained_model": "run"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"pipelines.train.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'pipelines.train' has no attribute {name!r}")
