"""Training on the curated dataset: LoRA, DreamBooth with prior preservation, full fine-tune.

Public entry points:
- `trained_model(con, config, *, components=None, progress, release_catalog=False)` (pipelines/train/run.py): the step.
- `main(config, images, *, output_dir, priors, components, progress)` (loop.py): the loop itself.
- `TrainConfig` / `load_train_config(path, overrides)` (config.py): every option.
- `run_metrics(con, train_id, ...)` (evaluate.py): CLIP score / CMMD of a run.
"""

from pipelines.train.config import ConfigError, TrainConfig, load_train_config
from pipelines.train.loop import RunRefused, TrainingError, TrainResult, main
from pipelines.train.run import trained_model

__all__ = ["ConfigError", "RunRefused", "TrainConfig", "TrainResult", "TrainingError", "load_train_config", "main", "trained_model"]
