"""`workbench status`: where each step stands, and the command for what is left."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from pipelines.status import pipeline_status


def _images(folder: Path, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def _todo(con) -> dict[str, str | None]:
    return {state.step: state.todo for state in pipeline_status(con)}


def test_status_names_what_each_step_has_not_done_yet(con, tmp_path):
    from pipelines.buckets import aspect_buckets
    from pipelines.dedup import duplicate_groups
    from pipelines.ingest import ingested_images

    assert _todo(con) == {"ingest": "workbench ingest FOLDER"}
    _images(tmp_path / "photos", 3, seed=1)
    (tmp_path / "photos" / "img0.txt").write_text("a red noise field")
    ingested_images(con, [tmp_path / "photos"], workers=1)
    todo = _todo(con)
    assert todo["dedup"] == "workbench dedup" and todo["buckets"] == "workbench buckets --resolution 512"
    assert todo["caption"] == "2 without a caption: workbench caption"
    duplicate_groups(con)
    aspect_buckets(con, resolution=256)
    todo = _todo(con)
    assert todo["dedup"] is None and todo["buckets"] is None
    # new photos: the steps that have not seen them say so, with their command
    _images(tmp_path / "more", 2, seed=2)
    ingested_images(con, [tmp_path / "more"], workers=1)
    todo = _todo(con)
    assert todo["dedup"] == "2 image(s) came in since the last dedup: workbench dedup"
    assert todo["buckets"] == "2 dataset image(s) have no bucket: workbench buckets --resolution 256"
    assert todo["caption"] == "4 without a caption: workbench caption"
    done = {state.step: state.done for state in pipeline_status(con)}
    assert done["ingest"] == "5 image(s): 5 readable, 0 unreadable, 0 with no file left"
    assert done["caption"] == "1 of 5 dataset image(s) captioned (sidecar 1)"


def test_status_command_prints_the_table(catalog_path, tmp_path):
    from workbench.cli import app

    _images(tmp_path / "photos", 2, seed=3)
    runner = CliRunner()
    assert runner.invoke(app, ["ingest", str(tmp_path / "photos"), "--catalog", str(catalog_path), "--workers", "1"]).exit_code == 0
    result = runner.invoke(app, ["status", "--catalog", str(catalog_path)], env={"COLUMNS": "200"})
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and "2 image(s): 2 readable" in said and "│ workbench dedup" in said, result.output
    missing = runner.invoke(app, ["status", "--catalog", str(tmp_path / "none.duckdb")])
    assert missing.exit_code == 2 and "No catalog at" in missing.output


def test_status_reads_a_catalog_it_may_not_write_and_writers_exit_1(catalog_path, tmp_path, monkeypatch):
    """A reliability review: `status` (which only reads) refused a catalog on a read-only disk, and every command
    said such a disk with status 2, where the README says 1 (the machine stopped it, not the input)."""
    from workbench import catalog as catalog_mod
    from workbench.catalog import CatalogError
    from workbench.cli import app

    _images(tmp_path / "photos", 1, seed=4)
    runner = CliRunner()
    assert runner.invoke(app, ["ingest", str(tmp_path / "photos"), "--catalog", str(catalog_path), "--workers", "1"]).exit_code == 0
    real = catalog_mod.connect

    def read_only_disk(path, *, read_only=False, **kwargs):
        if not read_only:
            raise CatalogError(f"{path} cannot be written here (a read-only file system)") from OSError(30, "Read-only file system")
        return real(path, read_only=True, **kwargs)

    monkeypatch.setattr(catalog_mod, "connect", read_only_disk)
    shown = runner.invoke(app, ["status", "--catalog", str(catalog_path)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "1 image(s): 1 readable" in " ".join(shown.output.split()), shown.output
    tagged = runner.invoke(app, ["tag", "x", "--where", "true", "--catalog", str(catalog_path)])
    assert tagged.exit_code == 1 and "cannot be written here" in tagged.output, tagged.output
