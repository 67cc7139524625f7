"""Shared fixtures: every test gets its own workbench home and catalog in a temp dir."""

from __future__ import annotations

import os

# Tiny models run faster on one thread than on two contended ones (and CI has 2 cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "sample_data"


@pytest.fixture(scope="session")
def workbench_home(tmp_path_factory) -> Path:
    """One home per test session, so the tiny models are built once and shared by tests."""
    home = tmp_path_factory.mktemp("workbench_home")
    os.environ["WORKBENCH_HOME"] = str(home)
    os.environ["HF_HUB_OFFLINE"] = "1"
    return home


@pytest.fixture(autouse=True)
def _isolated_env(workbench_home, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(workbench_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WORKBENCH_CATALOG", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def catalog_path(tmp_path) -> Path:
    return tmp_path / "project" / "workbench.duckdb"


@pytest.fixture
def con(catalog_path):
    from workbench.catalog import connect

    connection = connect(catalog_path)
    yield connection
    connection.close()


@pytest.fixture
def sample_copy(tmp_path) -> Path:
    """A private copy of sample_data/ (symlinks kept as links) that a test may change."""
    target = tmp_path / "sample_data"
    shutil.copytree(SAMPLE_DATA, target, symlinks=True)
    return target


@pytest.fixture
def synthetic_catalog(catalog_path) -> Path:
    """250 made-up image rows (no files): fast for the TUI's tables, filters and bulk edits."""
    from tui.synthetic import synthetic_rows
    from workbench.catalog import connect

    con = connect(catalog_path)
    synthetic_rows(con, 250)
    con.close()
    return catalog_path
