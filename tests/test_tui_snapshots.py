"""Snapshot tests of the main screens (pytest-textual-snapshot); update with --snapshot-update after a deliberate change."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tui.synthetic import synthetic_rows
from workbench.catalog import connect

SIZE = (150, 42)
CATALOG = Path("project/workbench.duckdb")  # relative: the snapshots must not show a temp path


@pytest.fixture
def snapshot_catalog(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORKBENCH_TUI_IMAGES", "halfcell")
    con = connect(CATALOG)
    synthetic_rows(con, 120)
    con.close()
    return CATALOG


def until(condition, timeout: float = 30.0):
    async def wait(pilot):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await pilot.pause(0.05)
            try:
                if condition(pilot.app):
                    break
            except Exception:
                pass
        pilot.app.set_focus(None)  # no blinking cursor in the picture
        await pilot.pause(0.3)
    return wait


def app_for(start: str):
    from tui.app import WorkbenchApp

    return WorkbenchApp(catalog_path=CATALOG, start=start)


def test_browser_snapshot(snapshot_catalog, snap_compare):
    assert snap_compare(app_for("browser"), terminal_size=SIZE,
                        run_before=until(lambda app: getattr(app.screen, "shown_details", None)))


def test_captions_snapshot(snapshot_catalog, snap_compare):
    assert snap_compare(app_for("captions"), terminal_size=SIZE,
                        run_before=until(lambda app: app.screen.image_id is not None and app.screen.query_one("#sources").option_count))


def test_duplicates_snapshot(snapshot_catalog, snap_compare):
    assert snap_compare(app_for("duplicates"), terminal_size=SIZE,
                        run_before=until(lambda app: len(app.screen.query("MemberCard")) == 2))


def test_sql_snapshot(snapshot_catalog, snap_compare):
    async def run_query(pilot):
        pilot.app.screen.show_timings = False
        await pilot.press("f9")
        await until(lambda app: app.screen.query_one("#results").row_count == 3)(pilot)

    assert snap_compare(app_for("sql"), terminal_size=SIZE, run_before=run_query)


def test_pipeline_snapshot(snapshot_catalog, snap_compare):
    assert snap_compare(app_for("pipeline"), terminal_size=SIZE,
                        run_before=until(lambda app: "images 120" in str(app.screen.query_one("#counts-ingest").render())))


def test_train_snapshot(snapshot_catalog, snap_compare):
    assert snap_compare(app_for("train"), terminal_size=SIZE, run_before=until(lambda app: app.screen.query_one("#field-resolution").value))


def test_help_snapshot(snapshot_catalog, snap_compare):
    async def open_help(pilot):
        await until(lambda app: getattr(app.screen, "shown_details", None))(pilot)
        await pilot.press("f1")
        await pilot.pause(0.3)

    assert snap_compare(app_for("browser"), terminal_size=SIZE, run_before=open_help)
