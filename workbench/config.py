"""Where things live (workbench home, catalog) and the project's TOML config."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

HOME_ENV = "WORKBENCH_HOME"
CONFIG_FILE = "workbench.toml"
# In the workbench's own output folders (training runs, generated class priors): an ingest walking from a folder
# above them (`workbench ingest .` beside the catalog) leaves them out, so samples, loss plots and priors never
# become instance images. Given as a root, such a folder is read all the same.
OUTPUT_MARKER = ".workbench-output"
# What an export wrote (so an --overwrite export replaces exactly that); written before its first image, so it also
# marks an export folder, even one stopped part way, for walks from above to leave out like OUTPUT_MARKER.
EXPORT_MANIFEST = ".workbench-export.json"


def mark_output_folder(folder: str | os.PathLike[str]) -> None:
    """Mark a folder the workbench writes (a training run, a set of class priors): walks from a parent leave it out."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    marker = path / OUTPUT_MARKER
    if not marker.exists():
        marker.write_text("Written by workbench: `workbench ingest` of a folder above this one leaves it out.\n")


def workbench_home() -> Path:
    """Shared per-user folder for models and caches: $WORKBENCH_HOME or ~/.cache/workbench."""
    home = os.environ.get(HOME_ENV)
    path = Path(home) if home else Path.home() / ".cache" / "workbench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def project_dir(catalog_path: str | os.PathLike[str]) -> Path:
    """The project folder: the folder that holds the catalog file."""
    return Path(catalog_path).resolve().parent


def load_config(path: str | os.PathLike[str] | None = None, *, catalog_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Read the project's TOML config (explicit path, else workbench.toml beside the catalog)."""
    if path is None and catalog_path is not None:
        candidate = project_dir(catalog_path) / CONFIG_FILE
        path = candidate if candidate.exists() else None
    if path is None:
        return {}
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path} is not valid TOML: {error}") from error
    except RecursionError:
        raise ValueError(f"{path} nests its tables or arrays too deeply to be a config file.") from None
