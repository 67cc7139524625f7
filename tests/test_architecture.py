"""Dependencies point one way: tui -> pipelines -> workbench; the core never imports textual."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def python_files(folder: str) -> list[Path]:
    files = sorted((REPO / folder).rglob("*.py"))
    assert files, f"no Python files under {folder}/"
    return files


def test_core_and_pipelines_never_import_textual():
    for folder in ("workbench", "pipelines"):
        for path in python_files(folder):
            forbidden = {"textual", "textual_plotext", "textual_image"}
            if path.name != "cli.py":  # the front door may open the TUI lazily for `workbench tui`
                forbidden.add("tui")
            bad = imported_modules(path) & forbidden
            assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_only_the_cli_reaches_into_pipelines():
    for path in python_files("workbench"):
        if path.name == "cli.py":
            continue
        assert "pipelines" not in imported_modules(path), f"{path.relative_to(REPO)} imports pipelines"


def test_pipelines_never_import_the_tui():
    for path in python_files("pipelines"):
        assert "tui" not in imported_modules(path)


# pyarrow: the caption edits' and filter's tables; the trainer's record of its images once built one (26 MiB of RSS)
CURATION_MODULES = "('polars', 'pyarrow', 'pipelines.ingest', 'pipelines.dedup', 'pipelines.caption_edits', 'imagehash', 'open_clip')"


def test_the_trainer_loads_no_curation_libraries():
    """A training process pays for every library it imports in resident memory; polars (pulled in through the ingest
    step) once cost the trainer 48 MiB of peak RSS in benchmarks/train.py. Training needs the catalog, not curation."""
    import subprocess
    import sys

    probe = (
        "import sys, tempfile, pathlib; import pipelines.train.run as run, pipelines.train.loop, pipelines.train.data, pipelines.priors\n"
        "with run._run_folder_lock(pathlib.Path(tempfile.mkdtemp()) / 'run'): pass\n"  # the run folder's setup, as a run does it
        f"print(sorted(m for m in {CURATION_MODULES} if m in sys.modules))"
    )
    found = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert found == "[]", found
    # `workbench train` checks the dataset against the last filter run first, in the process that then trains
    # (its note's module imported dedup, and polars, at the top)
    probe = (
        "import sys, tempfile, pathlib; from workbench.catalog import connect; from workbench.cli import _note_unfiltered\n"
        "import pipelines.train.run, pipelines.train.loop, pipelines.train.data\n"
        "_note_unfiltered(connect(pathlib.Path(tempfile.mkdtemp()) / 'c.duckdb'))\n"
        f"print(sorted(m for m in {CURATION_MODULES} if m in sys.modules))"
    )
    found = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert found == "[]", found


def test_a_training_run_loads_no_curation_libraries(tmp_path):
    """The same, over a whole run: the caption-file check once imported the ingest step (and polars with it) while
    training, 43 MiB more peak RSS. The catalog is made beforehand, as `workbench ingest` makes it."""
    import os
    import subprocess
    import sys

    from pipelines.ingest import ingested_images
    from train_fixtures import write_images
    from workbench.catalog import connect

    from workbench.models import component_path

    component_path("tiny", "sd")  # built beforehand: building the tiny preset makes its CLIP too
    write_images(tmp_path / "images", 2)
    con = connect(tmp_path / "catalog.duckdb")
    ingested_images(con, [tmp_path / "images"], workers=1)
    con.close()
    probe = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from pipelines.train import load_train_config, trained_model\nfrom workbench.catalog import connect\n"
        f"config = load_train_config(None, dict(mode='lora', model='tiny', resolution=32, max_train_steps=1, "
        f"num_validation_images=0, report_to='none', evaluate=False, device='cpu', output_dir={str(tmp_path / 'run')!r}))\n"
        f"trained_model(connect({str(tmp_path / 'catalog.duckdb')!r}), config, release_catalog=True)\n"
        f"print(sorted(m for m in {CURATION_MODULES} if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout


def test_python_dash_m_workbench_is_the_cli():
    """A packaging review: `python -m workbench` said "No module named workbench.__main__"."""
    import subprocess
    import sys

    from workbench import __version__

    done = subprocess.run([sys.executable, "-m", "workbench", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"workbench {__version__}", done.stderr[-2000:]
