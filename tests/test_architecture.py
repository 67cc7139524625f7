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


def test_the_trainer_loads_no_curation_libraries():
    """A training process pays for every library it imports in resident memory; polars (pulled in through the ingest
    step) once cost the trainer 48 MiB of peak RSS in benchmarks/train.py. Training needs the catalog, not curation."""
    import subprocess
    import sys

    probe = (
        "import sys, tempfile, pathlib; import pipelines.train.run as run, pipelines.train.loop, pipelines.train.data, pipelines.priors\n"
        "with run._run_folder_lock(pathlib.Path(tempfile.mkdtemp()) / 'run'): pass\n"  # the run folder's setup, as a run does it
        "print(sorted(m for m in ('polars', 'pipelines.ingest', 'pipelines.dedup', 'imagehash', 'open_clip') if m in sys.modules))"
    )
    found = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert found == "[]", found
