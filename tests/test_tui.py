"""Pilot tests of the Textual workbench: each screen driven like a person would, checked against the catalog."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tui.app import WorkbenchApp
from tui.confirm import Confirm
from tui.image_table import ImageTable
from workbench.catalog import CatalogError, connect

SIZE = (160, 48)


async def wait_for(pilot, predicate, timeout: float = 30.0, what: str = "condition"):
    """Let the app work until `predicate()` is true (workers run in threads, so poll)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await pilot.pause(0.05)
        try:
            if predicate():
                return
        except Exception:  # widgets may not be mounted yet
            pass
    raise AssertionError(f"timed out waiting for {what}")


def text_of(app, selector: str) -> str:
    return str(app.screen.query_one(selector).render())


@pytest.fixture
def sample_catalog(catalog_path, sample_copy) -> Path:
    """sample_data ingested and deduplicated (real files, so previews and keepers are real)."""
    from pipelines.dedup import duplicate_groups
    from pipelines.ingest import ingested_images

    con = connect(catalog_path)
    ingested_images(con, [sample_copy], workers=1)
    duplicate_groups(con)
    con.close()
    return catalog_path


def query(path: Path, sql: str, params=None):
    con = connect(path)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


# --- browser ------------------------------------------------------------------


def test_browser_shows_tags_and_finds_them_by_text(synthetic_catalog):
    """A review: `workbench tag` labels were only reachable by typing list_contains(...) in the filter; the table
    showed no tags column and a text search did not look at them."""
    from pipelines.tags import tagged_images
    from tui.browser_screen import BROWSER_COLUMNS
    from workbench.catalog import connect

    con = connect(synthetic_catalog)
    marked = [row[0] for row in con.execute("SELECT image_id FROM images ORDER BY image_id LIMIT 3").fetchall()]
    tagged_images(con, marked, "to review")
    tagged_images(con, marked[:1], "hands")
    con.close()

    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: "of 250" in text_of(app, "#table-status"), what="first page")
            app.screen.query_one("#filter").value = "to review"
            await pilot.press("ctrl+f", "enter")
            await wait_for(pilot, lambda: "of 3 · text search" in text_of(app, "#table-status"), what="text search over tags")
            table = app.screen.query_one("#browser-table")
            assert sorted(table.page_ids) == sorted(marked)
            tags = BROWSER_COLUMNS.index("tags")
            shown = sorted(row[tags] for row in app.screen.query_one("#rows").rows)
            assert shown == ["hands, to review", "to review", "to review"], shown
            # a filter that matches nothing clears the details (a review: the last image's stayed, read as the filter's)
            await wait_for(pilot, lambda: app.screen.shown_details, what="a row's details")
            app.screen.query_one("#filter").value = "no such words anywhere"
            await pilot.press("ctrl+f", "enter")
            await wait_for(pilot, lambda: "of 0 · text search" in text_of(app, "#table-status"), what="no rows")
            await wait_for(pilot, lambda: "No image matches the filter" in text_of(app, "#details"), what="details cleared")
            assert app.screen.shown_details is None

    asyncio.run(scenario())


def test_browser_filters_by_sql_and_text_sorts_and_pages(synthetic_catalog):
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: "of 250" in text_of(app, "#table-status"), what="first page")
            table = app.screen.query_one("#browser-table")
            assert app.screen.query_one("#rows").row_count == 100

            await pilot.press("pagedown")
            await wait_for(pilot, lambda: table.page_offset == 100, what="next page")
            assert "rows 101–200 of 250" in text_of(app, "#table-status")
            app.screen.query_one("#rows").cursor_row = 7  # a filter applied now starts at its first row, not row 8

            filter_box = app.screen.query_one("#filter")
            filter_box.value = "width > 1000 AND format = 'PNG'"
            await pilot.click("#filter")
            await pilot.press("enter")
            con = app.con
            expected = con.execute("SELECT count(*) FROM images_view WHERE width > 1000 AND format = 'PNG'").fetchone()[0]
            await wait_for(pilot, lambda: f"of {expected:,} · SQL filter" in text_of(app, "#table-status"), what="SQL filter")
            await wait_for(pilot, lambda: app.screen.query_one("#rows").cursor_row == 0, what="the first row of the new filter")
            assert app.focused is app.screen.query_one("#rows")  # Enter applies the filter and moves on to the rows

            filter_box.value = "mountain lake"
            await pilot.press("ctrl+f", "enter")
            expected = con.execute("SELECT count(*) FROM images_view WHERE caption ILIKE '%mountain lake%'").fetchone()[0]
            await wait_for(pilot, lambda: f"of {expected:,} · text search" in text_of(app, "#table-status"), what="text search")
            from tui.browser_screen import BROWSER_COLUMNS

            caption = BROWSER_COLUMNS.index("caption")
            assert all("mountain lake" in row[caption] for row in app.screen.query_one("#rows").rows)

            # Mouse: a click picks a row; a click on a header sorts by it (again: reverses).
            await pilot.click("#rows", offset=(5, 3))
            assert app.screen.query_one("#rows").cursor_row == 2
            filter_box.value = ""
            await pilot.click("#rows", offset=(5, 0))
            await wait_for(pilot, lambda: "sorted by path ↓" in text_of(app, "#table-status"), what="header click")
            app.screen.query_one("#descending").value = False
            app.screen.query_one("#sort").value = "bytes"
            app.screen.query_one("#descending").value = True
            await wait_for(pilot, lambda: "sorted by bytes ↓" in text_of(app, "#table-status"), what="sort")
            await wait_for(pilot, lambda: table.result.filter.sort_column == "bytes" and table.page_ids, what="rows")
            largest = con.execute("SELECT image_id FROM images_view ORDER BY bytes DESC, image_id LIMIT 1").fetchone()[0]
            await wait_for(pilot, lambda: table.page_ids[0] == largest, what="largest first")

    asyncio.run(scenario())


def test_browse_keys_act_on_the_rows_from_the_start(synthetic_catalog):
    """The filter box had the focus when Browse opened: `down down x` typed "x" into it and excluded nothing."""
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="browser")
        async with app.run_test(size=SIZE) as pilot:
            table = app.screen.query_one("#browser-table")
            await wait_for(pilot, lambda: "of 250" in text_of(app, "#table-status"), what="rows")
            await pilot.press("down", "down", "x")
            await wait_for(pilot, lambda: query_count(app, "SELECT count(*) FROM exclusions WHERE step = 'manual'") == 1, what="exclude")
            assert app.screen.query_one("#filter").value == ""
            assert query_count(app, f"SELECT count(*) FROM exclusions WHERE image_id = '{table.page_ids[2]}'") == 1

    asyncio.run(scenario())


def test_browser_bad_filter_is_a_message_not_a_crash(synthetic_catalog):
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: "of 250" in text_of(app, "#table-status"))
            box = app.screen.query_one("#filter")
            # A statement smuggled in after the condition is refused, and nothing is dropped.
            box.value = "true; DROP TABLE images"
            await pilot.click("#filter")
            await pilot.press("enter")
            await wait_for(pilot, lambda: "not a valid WHERE clause" in text_of(app, "#table-status"))
            assert query_count(app, "SELECT count(*) FROM images") == 250
            # A misspelt column is reported, not searched for as text.
            box.value = "widht > 1000"
            await pilot.press("enter")
            await wait_for(pilot, lambda: "not a valid WHERE clause" in text_of(app, "#table-status") and "widht" in text_of(app, "#table-status"))
            # shown whole, over lines of its own: on one line its end, which names the problem, was cut off
            status = app.screen.query_one("#table-status")
            await wait_for(pilot, lambda: status.size.height > 1, what="the whole error")
            # A filter that fails as it runs: an action over "the filtered rows" says so (not "still loading")
            box.value = "CAST(format AS INTEGER) > 0"
            await pilot.press("enter")
            await wait_for(pilot, lambda: "Conversion Error" in text_of(app, "#table-status"), what="runtime error")
            assert "The filter failed" in app.screen.query_one("#browser-table").not_applied()
            assert app.focused is box  # kept there, to mend it
            # Words without SQL are a text search.
            box.value = "in the red car"
            await pilot.press("enter")
            await wait_for(pilot, lambda: "text search" in text_of(app, "#table-status"))
            assert status.size.height == 1  # back to one line once the rows come
            # a keyboard review: Escape left the focus in the box (the screen's keys dead), and the next ctrl+f
            # appended what was typed to the old filter, into a parse error
            await focus_on(pilot, box)
            await pilot.press("escape")
            assert app.focused is app.screen.query_one("#rows")
            await pilot.press("ctrl+f", *"red")
            assert box.value == "red"

    asyncio.run(scenario())


def test_a_pipeline_run_gives_the_focus_back_and_errors_say_so_without_colour(synthetic_catalog):
    """A keyboard review: a step's Run, disabled while it ran, lost the focus for good (keys went nowhere, Tab
    started over at the top); with NO_COLOR an error toast looked like any other."""
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="pipeline")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            run = screen.query_one("#run-dedup")
            await focus_on(pilot, run)
            await pilot.press("enter")
            await wait_for(pilot, lambda: screen.running is None and query_count(app, "SELECT count(*) FROM runs") == 1,
                           what="dedup run")
            await wait_for(pilot, lambda: app.focused is run, what="the focus back on Run")
            screen.query_one("#set-dedup-threshold").value = "six"
            await pilot.press("enter")
            await wait_for(pilot, lambda: any(n.severity == "error" for n in app._notifications), what="an error")
            assert [n.title for n in app._notifications if n.severity == "error"] == ["Error: Settings"]

    asyncio.run(scenario())


def query_count(app, sql: str) -> int:
    return app.con.execute(sql).fetchone()[0]


def test_browser_details_show_metadata_captions_and_preview(sample_catalog):
    async def scenario():
        app = WorkbenchApp(catalog_path=sample_catalog)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: "of " in text_of(app, "#table-status"))
            box = app.screen.query_one("#filter")
            box.value = "path LIKE '%photos/coffee.jpg'"
            await pilot.click("#filter")
            await pilot.press("enter")
            await wait_for(pilot, lambda: "of 1 · SQL filter" in text_of(app, "#table-status"))
            app.screen.query_one("#rows").focus()
            await wait_for(pilot, lambda: "coffee.jpg" in _details_text(app), what="details")
            details = _details_text(app)
            for expected in ("width", "duplicate_group", "captions by source", "sidecar", "is_keeper"):
                assert expected in details
            from textual_image.widget._base import Image as BaseImage

            await wait_for(pilot, lambda: len(app.screen.query_one("#preview").query(BaseImage)) == 1, what="preview")

    asyncio.run(scenario())


def _details_text(app) -> str:
    from rich.console import Console

    from tui.browser_screen import details_table

    console = Console(width=120, record=True, file=open(os.devnull, "w"))
    console.print(details_table(app.screen.shown_details))
    return console.export_text()


# --- captions -------------------------------------------------------------------


def test_an_80x24_terminal_keeps_the_inputs_usable(synthetic_catalog):
    """At 80x24 (a common default) the Captions bulk bar takes two rows, the Pipeline columns and the filter bars'
    sort boxes narrow, so every input keeps room to type in (before: find/replace/token were 4 cells wide, the
    captions table 16, the Browse filter 6, and the Duplicates buttons off the screen)."""
    con = connect(synthetic_catalog)
    con.execute("UPDATE paths SET path = '/home/someone/datasets/2026 portrait session/selects' || path")
    con.close()

    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="captions")
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: app.screen.query_one("#captions-table #rows").row_count > 0, what="rows")
            screen = app.screen
            assert screen.has_class("-narrow") and screen.has_class("-short")
            for field in ("#find", "#replace", "#token", "#captions-table #filter"):
                assert screen.query_one(field).outer_size.width >= 12, field
            assert screen.query_one("#captions-table").size.width >= 35
            # the first image's path is cut at its start to the editor's width, so its file name shows
            await wait_for(pilot, lambda: text_of(app, "#caption-path").startswith("…"), what="path cut to the label")
            line = text_of(app, "#caption-path")
            assert ".jpg" in line and len(line) <= screen.query_one("#caption-path").size.width, line
            await pilot.resize_terminal(110, 24)  # and cut again to the new width
            await wait_for(pilot, lambda: len(text_of(app, "#caption-path")) > len(line), what="path cut to the wider label")
            assert len(text_of(app, "#caption-path")) <= screen.query_one("#caption-path").size.width
            await pilot.resize_terminal(80, 24)
            await pilot.press("f2")
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "PipelineScreen", what="pipeline")
            await pilot.pause()
            inputs = [i for i in app.screen.query(".setting Input")]
            assert inputs and min(i.outer_size.width for i in inputs) >= 8
            app.screen.query_one("#step-buckets").scroll_visible(animate=False)  # four settings: two lines of two
            await pilot.pause()
            regions = [i.region for i in app.screen.query("#step-buckets .setting Input")]
            assert len(regions) == 4 and all(r.width >= 8 and r.right <= 80 for r in regions), regions
            await pilot.press("f3")
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "BrowserScreen", what="browser")
            await pilot.pause()
            assert app.screen.query_one("#filter").outer_size.width >= 12
            await pilot.press("f5")  # Duplicates: each card's facts and buttons stay on the screen
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "DuplicatesScreen" and app.screen.query("MemberCard Button"), what="cards")
            await pilot.pause()
            buttons = list(app.screen.query("MemberCard Button"))
            assert all(b.region.bottom <= 23 and b.region.right <= 80 for b in buttons), [b.region for b in buttons]
            await pilot.press("f7")  # Train: Train, Stop and Resume all on screen
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "TrainScreen", what="train")
            await pilot.pause()
            for button in ("#train", "#stop", "#resume"):
                region = app.screen.query_one(button).region
                assert region.width >= 5 and region.right <= 80, (button, region)
        async with WorkbenchApp(catalog_path=synthetic_catalog, start="captions").run_test(size=(150, 42)) as pilot:
            assert not pilot.app.screen.has_class("-narrow")  # a large terminal keeps the wide layout

    asyncio.run(scenario())


def test_caption_editor_saves_a_manual_caption_and_accepts_a_model_caption(synthetic_catalog):
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="captions")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            await wait_for(pilot, lambda: screen.image_id is not None, what="first image loaded")
            image_id = screen.image_id
            editor = screen.query_one("#caption-text")
            current = app.con.execute("SELECT caption FROM current_captions WHERE image_id = ?", [image_id]).fetchall()
            # The caption loads in a worker after the image: clear the editor only once it has arrived.
            await wait_for(pilot, lambda: editor.text == (current[0][0] if current else ""), what="caption loaded")
            editor.load_text("")
            await focus_on(pilot, editor)
            await pilot.press(*"a hand written caption")
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: query_count(app, "SELECT count(*) FROM captions WHERE source = 'manual'") == 1, what="save")
            row = app.con.execute("SELECT caption, caption_source FROM current_captions WHERE image_id = ?", [image_id]).fetchone()
            assert row == ("a hand written caption", "manual")
            # ctrl+down moves to the next image while typing; ctrl+up comes back.
            await pilot.press("ctrl+down")
            await wait_for(pilot, lambda: screen.image_id not in (None, image_id), what="next image")
            await pilot.press("ctrl+up")
            await wait_for(pilot, lambda: screen.image_id == image_id, what="back")

            # Accept the model caption: it becomes the caption in use.
            await wait_for(pilot, lambda: any(o.id == "model:blip" for o in screen.query_one("#sources").options), what="sources")
            sources = screen.query_one("#sources")
            # the list opens on the caption in use (it opened on the first source: ctrl+a replaced the manual one)
            assert sources.get_option_at_index(sources.highlighted).id == "manual"
            sources.highlighted = [o.id for o in sources.options].index("model:blip")
            # with unsaved typing in the editor, accepting asks first; "no" keeps the typing
            await focus_on(pilot, editor)
            await pilot.press("end", *" unsaved words")
            await pilot.press("ctrl+a")
            await wait_for(pilot, lambda: isinstance(app.screen, Confirm), what="discard question")
            await pilot.press("n")
            await pilot.pause()
            assert editor.text.endswith(" unsaved words") and screen.edited
            # ctrl+f reaches the filter from the editor (the table's own binding does not)
            await pilot.press("ctrl+f")
            await pilot.pause()
            assert app.focused is screen.query_one("#captions-table #filter")
            await pilot.click("#accept")
            await wait_for(pilot, lambda: isinstance(app.screen, Confirm), what="discard question")
            await pilot.press("y")
            await wait_for(pilot, lambda: app.con.execute("SELECT caption_source FROM current_captions WHERE image_id = ?", [image_id]).fetchone()[0] == "model:blip", what="accept")

    asyncio.run(scenario())


def test_caption_bulk_add_token_over_filtered_rows_and_undo(synthetic_catalog):
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="captions")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            await wait_for(pilot, lambda: "of 250" in text_of(app, "#table-status"))
            box = screen.query_one("#filter")
            box.value = "format = 'PNG'"
            await pilot.click("#filter")
            await pilot.press("enter")
            pngs = query_count(app, "SELECT count(*) FROM images WHERE format = 'PNG'")
            await wait_for(pilot, lambda: f"of {pngs} · SQL filter" in text_of(app, "#table-status"))
            before = dict(app.con.execute("SELECT image_id, caption FROM current_captions").fetchall())

            screen.query_one("#token").value = "sks"
            await pilot.click("#bulk-add")
            await wait_for(pilot, lambda: isinstance(app.screen, Confirm), what="bulk question")
            await pilot.press("y")
            await wait_for(pilot, lambda: query_count(app, "SELECT count(*) FROM captions WHERE source = 'manual' AND text LIKE 'sks, %'") == pngs, what="bulk add")
            # (a kept copy that trains with an edited PNG copy's caption follows it: carried, source 'duplicate')
            assert query_count(app, "SELECT count(*) FROM current_captions c JOIN images i USING (image_id) WHERE i.format <> 'PNG' "
                                    "AND c.caption LIKE 'sks%' AND c.caption_source <> 'duplicate'") == 0

            await pilot.press("f8")
            await wait_for(pilot, lambda: query_count(app, "SELECT count(*) FROM captions WHERE source = 'manual' AND text LIKE 'sks, %'") == 0, what="undo")
            assert dict(app.con.execute("SELECT image_id, caption FROM current_captions").fetchall()) == before
            assert query_count(app, "SELECT count(*) FROM captions WHERE source = 'manual'") == 0

            # Find/replace over the same filtered rows.
            lakes = query_count(app, "SELECT count(*) FROM current_captions JOIN images USING (image_id) WHERE format = 'PNG' AND caption LIKE '%mountain lake%'")
            assert lakes > 0
            screen.query_one("#find").value = "mountain lake"
            screen.query_one("#replace").value = "alpine tarn"
            await pilot.click("#bulk-replace")
            await wait_for(pilot, lambda: isinstance(app.screen, Confirm), what="bulk question")
            await pilot.press("y")
            await wait_for(pilot, lambda: query_count(app, "SELECT count(*) FROM captions WHERE source = 'manual' AND text LIKE '%alpine tarn%'") == lakes, what="replace")
            assert query_count(app, "SELECT count(*) FROM current_captions JOIN images USING (image_id) WHERE format <> 'PNG' AND caption LIKE '%alpine%'") == 0

    asyncio.run(scenario())


def test_caption_saved_with_sidecar_writes_the_txt_beside_the_image(sample_catalog, sample_copy):
    async def scenario():
        app = WorkbenchApp(catalog_path=sample_catalog, start="captions")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            await wait_for(pilot, lambda: "of " in text_of(app, "#table-status"))
            screen.query_one("#filter").value = "path LIKE '%photos/horse.png'"
            await pilot.click("#filter")
            await pilot.press("enter")
            await wait_for(pilot, lambda: "of 1 · SQL filter" in text_of(app, "#table-status"))
            await wait_for(pilot, lambda: screen.image_id is not None and "horse" in text_of(app, "#caption-path"), what="horse")
            screen.query_one("#caption-text").load_text("a horse standing in a field")
            screen.query_one("#sidecars").value = True
            await pilot.click("#save")
            sidecar = sample_copy / "photos" / "horse.txt"
            await wait_for(pilot, lambda: sidecar.exists(), what="sidecar")
            assert sidecar.read_text().strip() == "a horse standing in a field"

    asyncio.run(scenario())


def test_an_edited_caption_is_saved_when_another_screen_is_opened(synthetic_catalog):
    """F3 or F7 with an edited caption kept it unsaved: Browse, and a training run started then, used the old one."""
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="captions")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            await wait_for(pilot, lambda: screen.image_id is not None and screen.loaded_text, what="an image in the editor")
            image_id, editor = screen.image_id, screen.query_one("#caption-text")
            await focus_on(pilot, editor)
            await pilot.press("end", *" seen at dusk")
            await pilot.press("f3")
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "BrowserScreen", what="browse")
            await wait_for(pilot, lambda: (app.con.execute(
                "SELECT caption, caption_source FROM current_captions WHERE image_id = ?", [image_id]).fetchone() or ("", ""))[0].endswith(" seen at dusk"),
                what="saved")
            assert app.con.execute("SELECT caption_source FROM current_captions WHERE image_id = ?", [image_id]).fetchone()[0] == "manual"

    asyncio.run(scenario())


async def focus_on(pilot, widget) -> None:
    """Focus `widget` and wait until it has it: Widget.focus() only schedules it, and keys pressed before go elsewhere."""
    widget.focus()
    await wait_for(pilot, lambda: widget.has_focus, timeout=5, what=f"focus on {widget.id}")


def manual_caption(app, image_id: str):
    row = app.con.execute("SELECT text FROM captions WHERE image_id = ? AND source = 'manual'", [image_id]).fetchone()
    return row and row[0]


async def table_reloaded(pilot, app, table, old_result):
    """Wait until the table has a new snapshot and has shown a page of it."""
    await wait_for(pilot, lambda: table.result is not old_result and text_of(app, "#table-status").startswith("rows "), what="reload")


async def captions_loaded(app, pilot):
    """(screen, table, its rows, the caption editor) of the Captions screen once the synthetic catalog's 250 rows show."""
    screen = app.screen
    await wait_for(pilot, lambda: "of 250" in text_of(app, "#table-status"), what="rows")
    return screen, screen.query_one("#captions-table"), screen.query_one("#rows"), screen.query_one("#caption-text")


def test_caption_save_on_a_later_page_keeps_the_same_image_selected(synthetic_catalog):
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="captions")
        async with app.run_test(size=SIZE) as pilot:
            screen, table, rows, editor = await captions_loaded(app, pilot)
            rows.focus()
            await pilot.press("pagedown")
            await wait_for(pilot, lambda: table.page_offset == 100, what="page 2")
            await pilot.press(*["down"] * 5)
            target = table.page_ids[5]
            await wait_for(pilot, lambda: screen.image_id == target, what="row 6 of page 2 loaded")

            for edit in ("edited on page two", "a second edit"):
                old_result = table.result
                editor.load_text(edit)
                await focus_on(pilot, editor)
                await pilot.press("ctrl+s")
                await wait_for(pilot, lambda: manual_caption(app, target) == edit, what="save")
                await table_reloaded(pilot, app, table, old_result)
                assert (table.page_offset, rows.cursor_row, table.current_image_id) == (100, 5, target)
                await wait_for(pilot, lambda: screen.image_id == target and editor.text == edit, what="editor on the same image")
            assert query_count(app, "SELECT count(*) FROM captions WHERE source = 'manual'") == 1

            # Sorted by caption, an edit moves the image to another page: the cursor follows it there.
            screen.query_one("#sort").value = "caption"
            await wait_for(pilot, lambda: table.result.filter.sort_column == "caption" and table.page_offset == 0 and table.page_ids, what="sorted")
            rows.focus()
            target = table.current_image_id
            await wait_for(pilot, lambda: screen.image_id == target, what="first row loaded")
            old_result = table.result
            editor.load_text("zzz sorts last")
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: manual_caption(app, target) == "zzz sorts last", what="save")
            await table_reloaded(pilot, app, table, old_result)
            assert table.page_offset == 200 and table.current_image_id == target
            await wait_for(pilot, lambda: screen.image_id == target, what="editor followed the image")

    asyncio.run(scenario())


def test_an_edit_keeps_the_rows_shown_when_the_filter_box_holds_text_not_applied(synthetic_catalog):
    """Text typed in the filter box without Enter was applied by the reload after a save: the rows changed, the
    cursor went to row 1 and the next keystrokes edited another image's caption. Browse's `x` excluded another image
    the same way."""
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="captions")
        async with app.run_test(size=SIZE) as pilot:
            screen, table, rows, editor = await captions_loaded(app, pilot)
            screen.query_one("#filter").value = "zzz no such text"  # typed, not applied
            rows.focus()
            await pilot.press(*["down"] * 3)
            target = table.page_ids[3]
            await wait_for(pilot, lambda: screen.image_id == target, what="row 4 loaded")
            old_result = table.result
            editor.load_text("edited with a filter typed")
            await focus_on(pilot, editor)
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: manual_caption(app, target) == "edited with a filter typed", what="save")
            await table_reloaded(pilot, app, table, old_result)
            assert "of 250" in text_of(app, "#table-status") and (rows.cursor_row, table.current_image_id) == (3, target)
            assert table.not_applied() is not None  # the typed text still waits for Enter

        app = WorkbenchApp(catalog_path=synthetic_catalog, start="browser")
        async with app.run_test(size=SIZE) as pilot:
            table = app.screen.query_one(ImageTable)
            await wait_for(pilot, lambda: "of 250" in text_of(app, "#table-status"), what="rows")
            app.screen.query_one("#filter").value = "zzz no such text"
            table.query_one("#rows").focus()
            await pilot.press(*["down"] * 2)
            target = table.page_ids[2]
            await wait_for(pilot, lambda: table.current_image_id == target, what="row 3")
            old_result = table.result
            await pilot.press("x")
            await wait_for(pilot, lambda: query_count(app, "SELECT count(*) FROM exclusions WHERE step = 'manual'") == 1, what="exclude")
            await table_reloaded(pilot, app, table, old_result)
            assert table.current_image_id == target
            old_result = table.result
            await pilot.press("x")  # the same image back in, not another one out
            await wait_for(pilot, lambda: query_count(app, "SELECT count(*) FROM exclusions WHERE step = 'manual'") == 0, what="include")

    asyncio.run(scenario())


def test_caption_edits_are_saved_when_moving_to_another_image(synthetic_catalog):
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="captions")
        async with app.run_test(size=SIZE) as pilot:
            screen, table, _, editor = await captions_loaded(app, pilot)
            first, second, third = table.page_ids[:3]
            await wait_for(pilot, lambda: screen.image_id == first and editor.text == screen.loaded_text != "", what="first caption")
            original = editor.text
            await focus_on(pilot, editor)
            await pilot.press("end", *" edited")
            await pilot.press("ctrl+down")  # leaves the first image with its edit unsaved
            await wait_for(pilot, lambda: manual_caption(app, first) == original + " edited", what="autosave")
            await wait_for(pilot, lambda: screen.image_id == second and editor.text == screen.loaded_text, what="second image")
            assert screen.query_one("#rows").cursor_row == 1

            # Quick edits while moving on: each lands on its own image, in order.
            await pilot.press("end", *" two", "ctrl+down", "end", *" three", "ctrl+up")
            await wait_for(pilot, lambda: manual_caption(app, second) and manual_caption(app, third), what="two more autosaves")
            assert manual_caption(app, second).endswith(" two") and manual_caption(app, third).endswith(" three")
            await wait_for(pilot, lambda: screen.image_id == second and editor.text.endswith(" two"), what="back on the second")

            # Unchanged text is not saved; an emptied caption is not saved but said so.
            await pilot.press("ctrl+down")
            await wait_for(pilot, lambda: screen.image_id == third, what="third")
            editor.load_text("   ")
            await pilot.press("ctrl+down")
            await wait_for(pilot, lambda: any("emptied caption was not saved" in n.message for n in app._notifications), what="warning")
            assert manual_caption(app, third).endswith(" three")
            assert query_count(app, "SELECT count(*) FROM captions WHERE source = 'manual'") == 3

            # Quitting with an edit in the editor saves it too.
            await pilot.press("ctrl+up")  # back from the fourth image to the third
            await wait_for(pilot, lambda: screen.image_id == third and editor.text == screen.loaded_text, what="third again")
            await focus_on(pilot, editor)
            await pilot.press("end", *" at quit")
            await pilot.press("ctrl+q")

    asyncio.run(scenario())
    con = connect(synthetic_catalog, read_only=True)
    saved = con.execute("SELECT text FROM captions WHERE source = 'manual' ORDER BY text").fetchall()
    con.close()
    assert any(text.endswith(" three at quit") for (text,) in saved)


def test_caption_bulk_edits_skip_broken_images_and_a_no_op_keeps_the_undo(synthetic_catalog):
    con = connect(synthetic_catalog)
    broken = con.execute("SELECT image_id FROM images WHERE status = 'error'").fetchall()
    assert broken
    con.execute("DELETE FROM captions WHERE image_id IN (SELECT image_id FROM images WHERE status = 'error')")
    con.close()

    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="captions")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            await wait_for(pilot, lambda: "of 250" in text_of(app, "#table-status"), what="rows")
            ok = query_count(app, "SELECT count(*) FROM images WHERE status = 'ok'")
            screen.query_one("#token").value = "sks"
            await pilot.click("#bulk-add")
            await wait_for(pilot, lambda: isinstance(app.screen, Confirm), what="bulk question")
            await pilot.press("y")
            await wait_for(pilot, lambda: query_count(app, "SELECT count(*) FROM current_captions WHERE caption LIKE 'sks, %'") == ok, what="bulk add")
            assert query_count(app, "SELECT count(*) FROM captions c JOIN images i USING (image_id) WHERE i.status = 'error'") == 0
            await wait_for(pilot, lambda: not screen.query_one("#bulk-undo").disabled, what="undo offered")

            # A bulk edit that changes nothing must not replace the undo of the one that did.
            screen.query_one("#token").value = "not-there"
            await pilot.click("#bulk-remove")
            await wait_for(pilot, lambda: any("0 captions changed" in n.message for n in app._notifications), what="no-op")
            assert not screen.query_one("#bulk-undo").disabled
            await pilot.press("f8")
            await wait_for(pilot, lambda: query_count(app, "SELECT count(*) FROM captions WHERE source = 'manual'") == 0, what="undo of the add")
            await wait_for(pilot, lambda: screen.query_one("#bulk-undo").disabled, what="nothing left to undo")

    asyncio.run(scenario())


async def _captions_with_the_blip_source_picked(pilot):
    """The Captions screen once its first image's sources show, with its model:blip caption highlighted."""
    screen = pilot.app.screen
    await wait_for(pilot, lambda: screen.image_id is not None and screen.query_one("#sources").option_count, what="sources")
    sources = screen.query_one("#sources")
    sources.highlighted = [o.id for o in sources.options].index("model:blip")
    return screen, screen.image_id, sources


def test_caption_reject_asks_first(synthetic_catalog):
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="captions")
        async with app.run_test(size=SIZE) as pilot:
            screen, image_id, sources = await _captions_with_the_blip_source_picked(pilot)
            blip = lambda: query_count(app, f"SELECT count(*) FROM captions WHERE image_id = '{image_id}' AND source = 'model:blip'")  # noqa: E731
            screen.query_one("#caption-text").focus()

            await pilot.press("ctrl+r")
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "Confirm", what="question")
            assert "model:blip" in text_of(app, "#confirm-question") and "no undo" in text_of(app, "#confirm-question")
            await pilot.press("enter")  # "No" has the focus
            await wait_for(pilot, lambda: app.screen is screen)
            await pilot.press("ctrl+r")
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "Confirm")
            await pilot.press("escape")
            await wait_for(pilot, lambda: app.screen is screen)
            await pilot.pause(0.2)
            assert blip() == 1

            await pilot.press("ctrl+r")
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "Confirm")
            await pilot.press("y")
            await wait_for(pilot, lambda: blip() == 0, what="rejected")
            await wait_for(pilot, lambda: "model:blip" not in [o.id for o in sources.options], what="sources redrawn")

    asyncio.run(scenario())


def test_rejecting_the_model_caption_keeps_the_caption_being_typed(synthetic_catalog):
    """Type my own caption, then reject the model's: the typed text was lost and the image left with no caption."""
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="captions")
        async with app.run_test(size=SIZE) as pilot:
            screen, image_id, _ = await _captions_with_the_blip_source_picked(pilot)
            editor = screen.query_one("#caption-text")
            editor.focus()
            editor.load_text("")
            await pilot.press(*"my", "space", *"own")
            await pilot.press("ctrl+r")
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "Confirm", what="question")
            assert "typed caption is saved first" in text_of(app, "#confirm-question")
            await pilot.press("y")
            sql = f"SELECT source, text FROM captions WHERE image_id = '{image_id}' ORDER BY source"
            await wait_for(pilot, lambda: app.con.cursor().execute(sql).fetchall() == [("manual", "my own"), ("sidecar", "sidecar caption 0")],
                           what="saved, then rejected")
            await wait_for(pilot, lambda: editor.text == "my own" and not screen.edited, what="the editor keeps it")

    asyncio.run(scenario())


def test_a_confirm_question_wraps_to_show_all_its_words(synthetic_catalog):
    """The question before an action with no undo was one line cut at the dialog's edge, at 120 columns too."""
    from tui.sql_screen import ConfirmWrite

    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="sql")
        async with app.run_test(size=(120, 40)) as pilot:
            app.push_screen(ConfirmWrite())
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmWrite), what="question")
            await pilot.pause(0.1)
            question = app.screen.query_one("#confirm-question")
            box = app.screen.query_one("Vertical")
            assert question.size.height >= 3 and question.region.right <= box.region.right  # wrapped inside the box

    asyncio.run(scenario())


# --- SQL console ----------------------------------------------------------------------


async def sql_results(pilot, app, sql: str, rows: int):
    """Run `sql` in the SQL console (F9) and wait for its `rows` result rows; returns the results table."""
    app.screen.query_one("#editor").load_text(sql)
    await pilot.press("f9")
    table = app.screen.query_one("#results")
    await wait_for(pilot, lambda: table.row_count == rows, what="results")
    return table


def test_sql_console_runs_a_query_refuses_writes_and_exports(synthetic_catalog):
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="sql")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            editor = screen.query_one("#editor")
            editor.load_text("SELECT format, count(*) AS n FROM images GROUP BY format ORDER BY format")
            await pilot.press("f9")
            await wait_for(pilot, lambda: screen.query_one("#results").row_count == 3, what="results")
            expected = app.con.execute("SELECT format, count(*) FROM images GROUP BY format ORDER BY format").fetchall()
            assert screen.query_one("#results").rows == [[f, str(n)] for f, n in expected]
            assert screen.query_one("#history").option_count == 1
            assert "statements" not in text_of(app, "#sql-status")
            # ctrl+a selects the whole query, so typing replaces it (a review: it was line start, and text typed
            # went in front of a long query scrolled out of sight)
            editor.focus()
            await pilot.press("ctrl+a")
            assert editor.selected_text == editor.text
            await pilot.press("9")
            assert editor.text == "9"
            editor.load_text("SELECT 1 AS a; SELECT 2 AS b")  # both run; the result shown says it is the last one's
            await pilot.press("f9")
            await wait_for(pilot, lambda: "of the last of 2 statements" in text_of(app, "#sql-status"), what="two statements")
            assert screen.query_one("#results").rows == [["2"]]
            editor.load_text("SELECT format, count(*) AS n FROM images GROUP BY format ORDER BY format")
            await pilot.press("f9")
            await wait_for(pilot, lambda: screen.query_one("#results").row_count == 3, what="results again")

            screen.query_one("#export-path").value = "out.parquet"
            await pilot.click("#export-parquet")
            target = synthetic_catalog.parent / "out.parquet"
            await wait_for(pilot, lambda: target.exists() and "exported" in text_of(app, "#sql-status"), what="export")
            import duckdb

            assert duckdb.sql(f"SELECT sum(n) FROM '{target}'").fetchall() == [(250,)]

            # an existing file is replaced only after a yes
            target.write_text("my notes")
            await pilot.press("ctrl+t")  # the key, not a click: the first export's toast may cover the button
            await wait_for(pilot, lambda: isinstance(app.screen, Confirm), what="replace question")
            await pilot.press("n")
            await pilot.pause()
            assert target.read_text() == "my notes"
            await pilot.press("ctrl+t")
            await wait_for(pilot, lambda: isinstance(app.screen, Confirm), what="replace question")
            await pilot.press("y")
            await wait_for(pilot, lambda: target.read_bytes()[:4] == b"PAR1", what="replaced export")

            editor.load_text("DELETE FROM images")
            await pilot.press("f9")
            await wait_for(pilot, lambda: "Refused" in text_of(app, "#sql-status"), what="refusal")
            assert query_count(app, "SELECT count(*) FROM images") == 250
            # writes typed as reads ran on the app's read-write connection: EXPLAIN ANALYZE runs what it explains
            for sneaky in ("EXPLAIN ANALYZE DELETE FROM images", "WITH gone AS (DELETE FROM images RETURNING *) SELECT count(*) FROM gone"):
                editor.load_text("SELECT 1")
                await pilot.press("f9")
                await wait_for(pilot, lambda: "Refused" not in text_of(app, "#sql-status"), what="a query between")
                editor.load_text(sneaky)
                await pilot.press("f9")
                await wait_for(pilot, lambda: "Refused" in text_of(app, "#sql-status"), what=f"refusal of {sneaky}")
                assert query_count(app, "SELECT count(*) FROM images") == 250

            # Write mode asks first; "No" keeps it read-only, "Yes" allows the write.
            await pilot.press("ctrl+w")
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "ConfirmWrite")
            await pilot.click("#no")
            await wait_for(pilot, lambda: app.screen is screen and not screen.write_mode)
            await pilot.press("ctrl+w")
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "ConfirmWrite")
            await pilot.click("#yes")
            await wait_for(pilot, lambda: app.screen is screen and screen.write_mode)
            editor.load_text("DELETE FROM captions WHERE source = 'sidecar'")
            await pilot.press("f9")
            await wait_for(pilot, lambda: query_count(app, "SELECT count(*) FROM captions WHERE source = 'sidecar'") == 0, what="write")
            # refused in write mode too, and said why (a review: it said to switch on the write mode that was on)
            editor.load_text("DROP VIEW dataset")
            await pilot.press("f9")
            await wait_for(pilot, lambda: "Refused" in text_of(app, "#sql-status"), what="refusal in write mode")
            assert "a view the workbench defines" in text_of(app, "#sql-status") and "Switch on write mode" not in text_of(app, "#sql-status")
            editor.load_text("COPY images TO $$x.csv$$")
            await pilot.press("f9")
            await wait_for(pilot, lambda: "$-quoting" in text_of(app, "#sql-status"), what="a COPY refusal")
            assert "--write" not in text_of(app, "#sql-status") and "write mode" in text_of(app, "#sql-status")

    asyncio.run(scenario())



def test_sql_export_writes_the_result_shown_or_nothing(synthetic_catalog):
    """After a failed query, or with the editor changed but not run, export wrote the earlier query's rows."""
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="sql")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            editor = screen.query_one("#editor")
            screen.query_one("#export-path").value = "shown.csv"
            target = synthetic_catalog.parent / "shown.csv"
            editor.load_text("SELECT image_id FROM images ORDER BY 1")
            await pilot.press("f9")
            await wait_for(pilot, lambda: screen.query_one("#results").row_count == 250, what="results")
            editor.load_text("SELECT bogus FROM images")
            await pilot.press("f9")
            await wait_for(pilot, lambda: "bogus" in text_of(app, "#sql-status"), what="error")
            await pilot.press("ctrl+e")
            await pilot.pause(0.5)
            assert not target.exists()
            editor.load_text("SELECT format FROM images")  # typed, not run
            await pilot.press("ctrl+e")
            await pilot.pause(0.5)
            assert not target.exists()
            await pilot.press("f9")
            await wait_for(pilot, lambda: screen.query_one("#results").row_count == 250 and screen.last_sql is not None, what="run")
            await pilot.press("ctrl+e")
            await wait_for(pilot, lambda: target.exists() and "exported" in text_of(app, "#sql-status"), what="export")
            assert target.read_text().splitlines()[0] == "format"

    asyncio.run(scenario())



def test_enter_on_a_sql_result_row_shows_every_value_whole(synthetic_catalog):
    """Cells are cut to fit (an image_id to 12 characters): a harlequin user could not read or copy a whole value."""
    from tui.row_detail import RowDetail

    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="sql")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            results = await sql_results(pilot, app, "SELECT image_id, repeat('long text ', 20) AS note, [1, 2] AS ids "
                                        "FROM images ORDER BY 1 LIMIT 3", 3)
            assert "Enter on a row" in text_of(app, "#sql-status")
            first = app.con.execute("SELECT image_id FROM images ORDER BY 1 LIMIT 2").fetchall()[1][0]
            results.focus()
            await pilot.press("down", "enter")
            await wait_for(pilot, lambda: isinstance(app.screen, RowDetail), what="row view")
            text = app.screen.query_one("#row-text").text
            assert f"image_id: {first}" in text and "note: " + "long text " * 19 + "long text" in text and "ids: [1, 2]" in text
            await pilot.press("escape")
            await wait_for(pilot, lambda: app.screen is screen, what="closed")

    asyncio.run(scenario())


CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def screen_lines(app) -> list[str]:
    """Every line of the screen as it goes to the terminal."""
    return [strip.text for strip in app.screen._compositor.render_strips()]


def rendered_lines(table) -> list[str]:
    """What a PageTable sends to the terminal, line by line (header first)."""
    return [table.render_line(y).text for y in range(min(table.row_count + 1, table.size.height))]


def test_long_paths_keep_their_end_and_other_text_its_start():
    """Files in one deep folder differ at the end of their paths: a cut path keeps the file name."""
    from tui.image_table import TEXT_WIDTH, cell

    deep = "/data/" + "nested/" * 10 + "5_wbk cat/img1.jpg"
    shown = cell("path", deep)
    assert len(shown) == TEXT_WIDTH and shown.startswith("…") and shown.endswith("5_wbk cat/img1.jpg")
    caption = "a photo of " + "a very long caption " * 5
    assert cell("caption", caption) == caption[: TEXT_WIDTH - 1] + "…"
    assert cell("path", "/short.jpg") == "/short.jpg"


def test_sql_results_draw_null_apart_from_any_text(synthetic_catalog):
    """A NULL is a dim mark of its own: the strings '·', 'NULL' and '' beside it are drawn as they are, undimmed."""
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="sql")
        async with app.run_test(size=SIZE) as pilot:
            table = await sql_results(pilot, app, "SELECT NULL AS missing, '·' AS dot, 'NULL' AS word, '' AS empty", 1)
            assert table.rows == [[None, "·", "NULL", ""]]
            line = table.render_line(1)
            cells = [s for s in line if s.text.strip() and s.text.strip() != "│"]
            assert [s.text.strip() for s in cells] == ["∅", "·", "NULL"]
            dim = table.get_component_rich_style("page-table--dim").color
            assert cells[0].style.color == dim
            assert all(s.style.color != dim for s in cells[1:])
    asyncio.run(scenario())


def test_notifications_show_catalog_text_as_text(synthetic_catalog):
    """Toasts carry paths, captions and SQL errors: no control character reaches the terminal, no markup is read."""
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="sql")
        async with app.run_test(size=SIZE) as pilot:
            app.screen.notify("cannot read /x/evil\x1b]2;PWNED\x07[b].jpg", title="Bell\x07")
            await pilot.pause()
            toast = list(app._notifications)[-1]
            assert toast.message == "cannot read /x/evil\\x1b]2;PWNED\\x07[b].jpg" and toast.title == "Bell\\x07"
            assert toast.markup is False
            app.screen.notify("Binder Error: no column x\nCandidate bindings: y")  # DuckDB's errors have line breaks
            await pilot.pause()
            assert list(app._notifications)[-1].message == "Binder Error: no column x\nCandidate bindings: y"

    asyncio.run(scenario())


def test_tables_show_control_characters_as_escapes_never_send_them(synthetic_catalog):
    con = connect(synthetic_catalog)
    hostile_id = con.execute("SELECT image_id FROM images_view ORDER BY path LIMIT 1").fetchone()[0]
    con.execute("INSERT INTO captions VALUES (?, 'manual', 'bell\x07 tab\t cr\r csi\x9b esc\x1b[2J', now())", [hostile_id])
    con.execute("INSERT INTO caption_choice VALUES (?, 'manual')", [hostile_id])
    con.execute("UPDATE paths SET path = '/synthetic/evil\x1b]2;X\x1b\\[b].jpg' WHERE image_id = ?", [hostile_id])
    con.close()

    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="sql")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            screen.query_one("#editor").load_text("SELECT chr(27) || ']2;PWNED' || chr(7) || 'x' AS \"col\x1bumn\", 'a' || chr(10) || 'b' AS nl")
            await pilot.press("f9")
            results = screen.query_one("#results")
            await wait_for(pilot, lambda: results.row_count == 1, what="results")
            header, row = rendered_lines(results)
            assert not CONTROL.search(header + row)
            assert "col\\x1bumn" in header and "\\x1b]2;PWNED\\x07x" in row and "a b" in row

            await pilot.press("f4")  # an image table: captions come from files and models
            await wait_for(pilot, lambda: "of 250" in text_of(app, "#table-status"), what="captions table")
            table = app.screen.query_one("#rows")
            await wait_for(pilot, lambda: "bell" in rendered_lines(table)[1], what="hostile caption shown")
            lines = rendered_lines(table)
            assert not any(CONTROL.search(line) for line in lines)
            assert "bell\\x07 tab\\t cr\\r csi\\x9b esc\\x1b[2J" in lines[1]

            # Everything else drawn from the catalog: path label, caption editor, sources, details pane.
            screen = app.screen
            await wait_for(pilot, lambda: screen.image_id == hostile_id and screen.query_one("#sources").option_count, what="hostile image")
            drawn = screen_lines(app)
            assert not any(CONTROL.search(line) for line in drawn)
            drawn = "\n".join(drawn)
            assert "evil\\x1b]2;X\\x1b\\[b].jpg" in drawn and "esc\\x1b[2J" in screen.query_one("#caption-text").text
            await pilot.press("f3")
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "BrowserScreen" and getattr(app.screen, "shown_details", None), what="details")
            drawn = screen_lines(app)
            assert not any(CONTROL.search(line) for line in drawn) and "csi\\x9b" in "\n".join(drawn)

    asyncio.run(scenario())


SLOW_SQL = "SELECT count(*) FROM range(100000) a, range(100000) b WHERE (a.range * b.range) % 7 = 3"  # minutes


def test_sql_long_query_is_stopped_by_a_new_query_escape_and_quit(synthetic_catalog):
    quit_at = []

    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="sql")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            editor = screen.query_one("#editor")
            results = screen.query_one("#results")

            # Queries start by the Run action, not a key: Pilot.press waits up to 2 s for a busy process to go idle.
            editor.load_text(SLOW_SQL)
            screen.action_run()
            await wait_for(pilot, lambda: screen.running_query is not None and screen.running_query._cursors, what="slow query started")
            slow = screen.running_query
            await pilot.pause(0.3)
            editor.load_text("SELECT 42 AS answer")
            screen.action_run()  # a new query stops the old one
            await wait_for(pilot, lambda: results.rows == [["42"]], timeout=5, what="second query")
            await wait_for(pilot, lambda: slow.finished, timeout=5, what="first query interrupted")
            assert "rows" in text_of(app, "#sql-status")

            editor.load_text(SLOW_SQL)
            await focus_on(pilot, editor)
            screen.action_run()
            await wait_for(pilot, lambda: screen.running_query is not None and screen.running_query._cursors, what="slow query again")
            slow = screen.running_query
            await pilot.pause(0.3)
            await pilot.press("escape")  # cancels, even from the editor
            await wait_for(pilot, lambda: slow.finished, timeout=5, what="cancelled by escape")
            assert "cancelled" in text_of(app, "#sql-status") and app.focused is editor
            await pilot.pause(0.2)
            assert "cancelled" in text_of(app, "#sql-status") and not app._notifications  # no error shown for it
            await pilot.press("escape")  # nothing running: the editor's own escape (focus moves on)
            assert app.focused is not editor

            editor.load_text(SLOW_SQL)
            screen.action_run()
            await wait_for(pilot, lambda: screen.running_query is not None and screen.running_query._cursors, what="slow query a third time")
            await pilot.pause(0.3)
            quit_at.append(time.monotonic())
            await pilot.press("ctrl+q")

    asyncio.run(scenario())  # returns only once every worker thread has ended
    assert time.monotonic() - quit_at[0] < 5


# --- duplicates -------------------------------------------------------------------------


async def open_duplicate_group(pilot, app, group_id) -> None:
    """Press n on the Duplicates screen until `group_id` is shown, each group's members loaded before the next."""
    screen = app.screen
    await wait_for(pilot, lambda: screen.group_ids and screen.members, what="groups")
    while screen.group_ids[screen.position] != group_id:
        await pilot.press("n")
        await wait_for(pilot, lambda: screen.members and screen.members[0]["image_id"] in
                       {r[0] for r in app.con.execute("SELECT image_id FROM duplicates WHERE group_id = ?", [screen.group_ids[screen.position]]).fetchall()})


def test_duplicates_review_changes_the_kept_member(sample_catalog):
    coffee_keeper = query(sample_catalog, "SELECT d.group_id, d.image_id FROM duplicates d JOIN images_view v USING (image_id) "
                                          "WHERE v.path LIKE '%photos/coffee.jpg'")[0]
    group_id, old_keeper = coffee_keeper

    async def scenario():
        app = WorkbenchApp(catalog_path=sample_catalog, start="duplicates")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            await open_duplicate_group(pilot, app, group_id)
            await wait_for(pilot, lambda: len(screen.query("MemberCard")) == 2, what="cards")
            assert screen.members[0]["image_id"] == old_keeper and screen.members[0]["is_keeper"]
            other = screen.members[1]["image_id"]
            await pilot.press("right")
            await pilot.press("k")
            await wait_for(pilot, lambda: app.con.execute("SELECT keeper_id FROM duplicates WHERE image_id = ?", [other]).fetchone()[0] == other, what="keeper")
            excluded = {r[0] for r in app.con.execute("SELECT image_id FROM exclusions WHERE step = 'dedup'").fetchall()}
            assert old_keeper in excluded and other not in excluded
            assert app.con.execute("SELECT image_id FROM keeper_choice").fetchall() == [(other,)]
            await wait_for(pilot, lambda: screen.members and screen.members[0]["image_id"] == other, what="redraw")
            card = str(screen.query("MemberCard")[1].query_one(".member-facts").render())
            assert f"duplicate of {other[:12]}" in card and other[12:] not in card  # the id cut as everywhere else

            # x excludes the selected member by hand; x again includes it back.
            screen.selected = 0
            await pilot.press("x")
            await wait_for(pilot, lambda: app.con.execute("SELECT count(*) FROM exclusions WHERE image_id = ? AND step = 'manual'", [other]).fetchone()[0] == 1, what="exclude")
            await wait_for(pilot, lambda: screen.members and screen.members[0]["excluded"], what="shown excluded")
            await pilot.press("x")
            await wait_for(pilot, lambda: app.con.execute("SELECT count(*) FROM exclusions WHERE image_id = ?", [other]).fetchone()[0] == 0, what="include")

            # a: the selected copy is no duplicate at all; its group of two dissolves and both are in the dataset
            await wait_for(pilot, lambda: screen.members and screen.members[0]["image_id"] == other, what="redraw")
            screen.selected = 1
            await pilot.press("a")
            await wait_for(pilot, lambda: app.con.execute("SELECT count(*) FROM not_duplicates").fetchone()[0] == 1, what="apart")
            in_dataset = {r[0] for r in app.con.execute("SELECT image_id FROM dataset").fetchall()}
            assert {old_keeper, other} <= in_dataset
            assert app.con.execute("SELECT count(*) FROM duplicates WHERE image_id IN (?, ?)", [old_keeper, other]).fetchone()[0] == 0

            # u undoes it: the image is back in its group (the CLI's keep --rejoin), and that group is shown
            await pilot.press("u")
            await wait_for(pilot, lambda: app.con.execute("SELECT count(*) FROM not_duplicates").fetchone()[0] == 0, what="rejoined")
            assert app.con.execute("SELECT count(*) FROM duplicates WHERE image_id IN (?, ?)", [old_keeper, other]).fetchone()[0] == 2
            await wait_for(pilot, lambda: {m["image_id"] for m in screen.members} == {old_keeper, other}, what="the group shown again")
            await pilot.press("u")  # nothing left to undo: said, and nothing changes
            await wait_for(pilot, lambda: any("Nothing to undo" in str(n.message) for n in app._notifications), what="nothing to undo")
            assert app.con.execute("SELECT count(*) FROM duplicates WHERE image_id IN (?, ?)", [old_keeper, other]).fetchone()[0] == 2

    asyncio.run(scenario())


def test_duplicates_selection_follows_the_image_and_x_on_a_duplicate_says_to_keep_it(sample_catalog):
    group_id, old_keeper = query(sample_catalog, "SELECT d.group_id, d.image_id FROM duplicates d JOIN images_view v USING (image_id) "
                                                 "WHERE v.path LIKE '%photos/coffee.jpg'")[0]

    def exclusions(app, image_id):
        return sorted(r[0] for r in app.con.execute("SELECT step FROM exclusions WHERE image_id = ?", [image_id]).fetchall())

    async def scenario():
        app = WorkbenchApp(catalog_path=sample_catalog, start="duplicates")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            await open_duplicate_group(pilot, app, group_id)
            await wait_for(pilot, lambda: len(screen.query("MemberCard")) == 2 and screen.members[0]["image_id"] == old_keeper, what="cards")
            other = screen.members[1]["image_id"]
            await pilot.press("right")
            assert screen.selected == 1

            # x on a member excluded as a duplicate changes nothing and says what would.
            await pilot.press("x")
            await wait_for(pilot, lambda: any("press k" in n.message for n in app._notifications), what="hint")
            assert exclusions(app, other) == ["dedup"]
            assert query_count(app, "SELECT count(*) FROM manual_includes") == 0
            # its Include button says the same when pressed (it was disabled: a click did nothing, without a word)
            hints = sum("press k" in n.message for n in app._notifications)
            include = next(b for b in screen.query("MemberCard")[1].query("Button") if b.name == "include")
            assert not include.disabled
            include.press()
            await wait_for(pilot, lambda: sum("press k" in n.message for n in app._notifications) > hints, what="button hint")
            assert exclusions(app, other) == ["dedup"]

            # After k the keeper moves to the front: the selection moves with it, so x acts on it.
            await pilot.press("k")
            await wait_for(pilot, lambda: screen.members[0]["image_id"] == other and len(screen.query("MemberCard")) == 2, what="re-sorted")
            assert screen.members[screen.selected]["image_id"] == other
            assert [c.index for c in screen.query("MemberCard") if c.has_class("-selected")] == [screen.selected]
            await pilot.press("x")
            await wait_for(pilot, lambda: exclusions(app, other) == ["manual"], what="the kept image excluded")
            assert exclusions(app, old_keeper) == ["dedup"]

            # Excluded by hand and as a duplicate: x lifts the manual exclusion and says the duplicate one stays.
            await pilot.press("left")
            await wait_for(pilot, lambda: screen.members[screen.selected]["image_id"] == old_keeper)
            await pilot.press("k")
            await wait_for(pilot, lambda: screen.members[0]["image_id"] == old_keeper and screen.members[screen.selected]["image_id"] == old_keeper, what="keeper back")
            await pilot.press("right")
            await wait_for(pilot, lambda: screen.members[screen.selected]["image_id"] == other and exclusions(app, other) == ["dedup", "manual"])
            await pilot.press("x")
            await wait_for(pilot, lambda: exclusions(app, other) == ["dedup"], what="manual exclusion lifted")
            await wait_for(pilot, lambda: any("stays excluded as a duplicate" in n.message for n in app._notifications), what="said so")

            # Excluding the kept copy says its copies stay out; keeping a copy that is itself excluded warns that
            # the picture then has no copy in the dataset.
            await pilot.press("left")
            await wait_for(pilot, lambda: screen.members[screen.selected]["image_id"] == old_keeper)
            await pilot.press("x")
            await wait_for(pilot, lambda: any("its copies stay excluded as duplicates" in n.message for n in app._notifications), what="copies stay")
            await pilot.press("right")
            await wait_for(pilot, lambda: screen.members[screen.selected]["image_id"] == other)
            await pilot.press("k")
            await wait_for(pilot, lambda: screen.members[0]["image_id"] == other, what="the other copy kept")
            assert not any("is itself excluded" in n.message for n in app._notifications)
            await wait_for(pilot, lambda: screen.members[screen.selected]["image_id"] == other)
            await pilot.press("right")
            await wait_for(pilot, lambda: screen.members[screen.selected]["image_id"] == old_keeper)
            await pilot.press("k")  # the copy excluded by hand
            await wait_for(pilot, lambda: any("is itself excluded" in n.message and n.severity == "warning" for n in app._notifications), what="warned")

    asyncio.run(scenario())


# --- pipeline -------------------------------------------------------------------------------


def test_the_ingest_box_offers_sample_data_only_to_a_catalog_never_ingested(catalog_path):
    """The box held `sample_data` whenever such a folder sat beside the catalog: Run all then ingested it into a
    catalog of other photos, where an empty box means "the last ingest's folders"."""
    from PIL import Image

    from pipelines.ingest import ingested_images

    (catalog_path.parent / "sample_data").mkdir(parents=True)
    photos = catalog_path.parent / "photos"
    photos.mkdir()
    Image.new("RGB", (64, 64), "red").save(photos / "red.png")

    async def ingest_box(counts: str) -> str:
        app = WorkbenchApp(catalog_path=catalog_path, start="pipeline")
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: counts in text_of(app, "#counts-ingest"), what="counts")
            await pilot.pause(1.0)  # the last run's settings load beside the counts
            return app.screen.query_one("#set-ingest-folders").value

    assert asyncio.run(ingest_box("not run yet")) == "sample_data"
    con = connect(catalog_path)
    ingested_images(con, [photos], workers=1)
    con.close()
    assert asyncio.run(ingest_box("images 1")) == ""


def test_pipeline_runs_ingest_and_dedup_on_sample_data_and_counts_change(catalog_path, sample_copy):
    async def scenario():
        app = WorkbenchApp(catalog_path=catalog_path, start="pipeline")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            await wait_for(pilot, lambda: "not run yet" in text_of(app, "#counts-ingest"), what="counts")
            screen.query_one("#set-ingest-folders").value = str(sample_copy)
            screen.query_one("#set-ingest-workers").value = "1"
            await pilot.click("#run-ingest")
            await wait_for(pilot, lambda: screen.running is None and "done" in text_of(app, "#state-ingest"), timeout=120, what="ingest")
            images = query_count(app, "SELECT count(*) FROM images")
            assert images > 20
            await wait_for(pilot, lambda: f"images {images}" in text_of(app, "#counts-ingest"), what="ingest counts")
            await pilot.click("#run-dedup")
            await wait_for(pilot, lambda: screen.running is None and "done" in text_of(app, "#state-dedup"), timeout=120, what="dedup")
            groups = query_count(app, "SELECT count(DISTINCT group_id) FROM duplicates")
            assert groups >= 3
            await wait_for(pilot, lambda: f"groups {groups}" in text_of(app, "#counts-dedup"), what="dedup counts")
            log = "\n".join(line.text for line in screen.query_one("#log").lines)
            assert "ingest finished" in log and "dedup finished" in log
            assert "dedup: started" in log and "[b]" not in log  # its markup was shown as text

            # with the folders box emptied, ingest (as in Run all) rescans the last ingest's folders
            (sample_copy / "photos" / "rocket.jpg").unlink()
            screen.query_one("#set-ingest-folders").value = ""
            await pilot.click("#run-ingest")
            await wait_for(pilot, lambda: screen.running is None and "done" in text_of(app, "#state-ingest"), timeout=120, what="rescan")
            assert query_count(app, "SELECT count(*) FROM paths WHERE missing") == 1

    asyncio.run(scenario())


def test_pipeline_rejects_bad_settings_before_running(synthetic_catalog):
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="pipeline")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            screen.query_one("#set-dedup-threshold").value = "six"
            await pilot.click("#run-dedup")
            await pilot.pause(0.3)
            assert screen.running is None
            assert any("threshold must be a whole number" in n.message for n in app._notifications)
            screen.query_one("#set-dedup-threshold").value = "6"
            screen.query_one("#set-dedup-mirrored").value = "maybe"
            await pilot.click("#run-dedup")
            await pilot.pause(0.3)
            assert screen.running is None
            assert any("flipped must be yes or no, not 'maybe'" in n.message for n in app._notifications)
            assert query_count(app, "SELECT count(*) FROM runs") == 0
            screen.query_one("#set-dedup-mirrored").value = "no"
            await pilot.click("#run-dedup")
            await wait_for(pilot, lambda: screen.running is None and query_count(app, "SELECT count(*) FROM runs") == 1, what="dedup run")
            params = app.con.execute("SELECT params FROM runs WHERE step = 'dedup'").fetchone()[0]
            assert json.loads(params)["mirrored"] is False, params

    asyncio.run(scenario())


@pytest.mark.slow
def test_pipeline_caption_step_with_tiny_blip(sample_catalog):
    async def scenario():
        app = WorkbenchApp(catalog_path=sample_catalog, start="pipeline")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            await pilot.click("#run-caption")
            await wait_for(pilot, lambda: screen.running is None and "done" in text_of(app, "#state-caption"), timeout=240, what="caption")
            captioned = query_count(app, "SELECT count(DISTINCT image_id) FROM captions WHERE source LIKE 'model:%'")
            assert captioned > 10
            await wait_for(pilot, lambda: f"captioned {captioned}" in text_of(app, "#counts-caption"))

    asyncio.run(scenario())


# --- train --------------------------------------------------------------------------------


@pytest.fixture
def four_image_catalog(catalog_path, tmp_path):
    """A catalog holding four small training images."""
    sys.path.insert(0, str(Path(__file__).parent))
    from train_fixtures import write_images

    from pipelines.ingest import ingested_images

    write_images(tmp_path / "imgs", 4)
    con = connect(catalog_path)
    ingested_images(con, [tmp_path / "imgs"], workers=1)
    con.close()
    return catalog_path


@pytest.mark.slow
def test_train_screen_runs_a_tiny_lora(four_image_catalog, tmp_path):
    from pipelines.filter import FilterRules, filtered_dataset
    from pipelines.ingest import ingested_images
    from train_fixtures import write_images

    catalog_path = four_image_catalog
    con = connect(catalog_path)
    filtered_dataset(con, FilterRules(min_side=8))
    write_images(tmp_path / "later", 1, seed=5)  # in after the filter run: the screen says so, as `workbench train` does
    ingested_images(con, [tmp_path / "later"], workers=1)
    con.close()

    async def scenario():
        app = WorkbenchApp(catalog_path=catalog_path, start="train")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            await wait_for(pilot, lambda: screen.ready, what="defaults")  # they load in a worker
            screen.query_one("#field-resolution").value = "32"
            screen.query_one("#field-max_train_steps").value = "eight"
            await pilot.click("#train")
            await wait_for(pilot, lambda: "steps must be a whole number" in text_of(app, "#train-error"), what="the error")
            assert not screen.running
            await pilot.pause(0.2)  # the error line changes the layout: let it settle before clicking again
            screen.query_one("#field-max_train_steps").value = "4"
            screen.query_one("#field-validation_steps").value = "2"
            screen.query_one("#field-more").value = 'validation_inference_steps=1; num_validation_images=1; report_to="none"; evaluate=false'
            await pilot.click("#train")
            # output_dir is set when a run starts; a run that fails at once shows why in #train-state below.
            await wait_for(pilot, lambda: screen.output_dir is not None, what=f"start ({text_of(app, '#train-error')})")
            await wait_for(pilot, lambda: not screen.running, timeout=300, what="training")
            assert "finished" in text_of(app, "#train-state"), text_of(app, "#train-state")
            row = app.con.execute("SELECT status FROM training_runs").fetchall()
            assert row == [("ok",)]
            losses = screen.output_dir / "loss.csv"
            assert len(losses.read_text().splitlines()) == 5
            await wait_for(pilot, lambda: screen.shown_sample is not None, what="sample grid shown")
            log = "\n".join(str(line) for line in screen.query_one("#train-log").lines)
            assert "1 image(s) of the dataset came in after the last filter run" in log, log

    asyncio.run(scenario())


@pytest.mark.slow
def test_resume_in_the_train_screen_goes_on_with_the_runs_own_options(four_image_catalog):
    """Resuming a run made from the command line (cosine, learning rate 1e-4) was refused: the form's defaults were
    sent as if typed ("these differ: learning_rate 0.0001 (saved) vs 0.001; lr_scheduler 'cosine' (saved) vs ...")."""
    sys.path.insert(0, str(Path(__file__).parent))
    from train_fixtures import fast_config, tiny_components

    from pipelines.train import trained_model

    run = four_image_catalog.parent / "runs" / "from-cli"
    con = connect(four_image_catalog)
    trained_model(con, fast_config(run, max_train_steps=2, learning_rate=1e-4, lr_scheduler="cosine",
                                   num_validation_images=0), components=tiny_components())
    con.close()

    async def scenario():
        app = WorkbenchApp(catalog_path=four_image_catalog, start="train")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            await wait_for(pilot, lambda: screen.ready, what="defaults")
            screen.query_one("#field-output_dir").value = str(run)
            screen.query_one("#field-max_train_steps").value = "3"  # typed: one step more
            await pilot.click("#resume")
            await wait_for(pilot, lambda: "finished" in text_of(app, "#train-state") or "refused" in text_of(app, "#train-state")
                           or "failed" in text_of(app, "#train-state"), timeout=120, what="resumed run")
            assert "finished" in text_of(app, "#train-state"), text_of(app, "#train-state") + text_of(app, "#train-error")
            assert len((run / "loss.csv").read_text().splitlines()) - 1 == 3
            # what the trainer said on the way is kept in the log (the state line showed each one for a moment)
            logged = "\n".join(screen.query_one("#train-log").lines)
            assert "cosine learning-rate schedule now spans 3 steps, not 2" in logged, logged

    asyncio.run(scenario())


def test_the_train_screen_lists_past_runs_and_shows_one(four_image_catalog):
    """Reopened on a catalog with 16 runs, the Train screen said "not started": no run, no loss, no samples."""
    sys.path.insert(0, str(Path(__file__).parent))
    from train_fixtures import fast_config, tiny_components

    from pipelines.train import trained_model

    con = connect(four_image_catalog)
    runs = four_image_catalog.parent / "runs"
    trained_model(con, fast_config(runs / "first", max_train_steps=2, num_validation_images=1), components=tiny_components())
    trained_model(con, fast_config(runs / "second", max_train_steps=3, num_validation_images=0), components=tiny_components())
    con.close()

    async def scenario():
        app = WorkbenchApp(catalog_path=four_image_catalog, start="train")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            table = screen.query_one("#runs-table")
            await wait_for(pilot, lambda: table.row_count == 2, what="the runs")
            assert [row[:4] for row in table.rows] == [["2", "lora", "ok", "3"], ["1", "lora", "ok", "2"]]
            assert [row[-1] for row in table.rows] == ["second", "first"]
            table.focus()
            await pilot.press("down", "enter")  # the older run, which made a sample grid
            await wait_for(pilot, lambda: "showing run 1" in text_of(app, "#train-state"), what="run 1 shown")
            await wait_for(pilot, lambda: "latest sample grid: " in text_of(app, "#sample-label")
                           and text_of(app, "#sample-label") != "latest sample grid", what="its grid")
            assert screen.output_dir == runs / "first"
            assert "went on in its folder" not in text_of(app, "#train-state")

    asyncio.run(scenario())
    # a later run in the first run's folder (a --resume of it): what the folder shows is that run's, said (a review
    # saw a stopped run's curve run on to the later run's last step, unsaid)
    con = connect(four_image_catalog)
    con.execute("INSERT INTO training_runs (mode, model, status, steps, output_dir) VALUES ('lora', 'tiny', 'ok', 4, ?)",
                [str(runs / "first")])
    con.close()

    async def again():
        app = WorkbenchApp(catalog_path=four_image_catalog, start="train")
        async with app.run_test(size=SIZE) as pilot:
            table = app.screen.query_one("#runs-table")
            await wait_for(pilot, lambda: table.row_count == 3, what="the runs")
            table.focus()
            await pilot.press("down", "down", "enter")
            await wait_for(pilot, lambda: "showing run 1" in text_of(app, "#train-state"), what="run 1 shown")
            assert "run 3 went on in its folder" in text_of(app, "#train-state")

    asyncio.run(again())


def test_train_screen_stop_and_resume(four_image_catalog):
    catalog_path = four_image_catalog
    async def scenario():
        app = WorkbenchApp(catalog_path=catalog_path, start="train")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            await wait_for(pilot, lambda: screen.ready, what="defaults")  # they load in a worker
            for name, value in {"resolution": "32", "max_train_steps": "300", "checkpointing_steps": "2", "validation_steps": "1000"}.items():
                screen.query_one(f"#field-{name}").value = value
            screen.query_one("#field-more").value = 'num_validation_images=0; report_to="none"; evaluate=false'
            await pilot.click("#train")
            def steps_done() -> int:
                found = re.search(r"step (\d+)/300", text_of(app, "#train-state"))
                return int(found.group(1)) if found else 0

            await wait_for(pilot, lambda: steps_done() >= 2, timeout=200, what="two steps")
            await pilot.click("#stop")
            await wait_for(pilot, lambda: not screen.running, timeout=60, what="stopped")
            assert "cancelled" in text_of(app, "#train-state")
            stopped_at = len((screen.output_dir / "loss.csv").read_text().splitlines()) - 1
            assert 2 <= stopped_at < 300
            last = sorted((screen.output_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
            step = int(last.name.split("-")[1])
            assert f"Resume continues from step {step} ({last.name})" in " ".join(text_of(app, "#train-state").split())
            assert not screen.query_one("#resume").disabled
            await pilot.click("#resume")
            await wait_for(pilot, lambda: screen.running, what="resumed")
            await wait_for(pilot, lambda: not screen.running, timeout=300, what="finished")
            assert "finished" in text_of(app, "#train-state"), text_of(app, "#train-state")
            steps = [int(line.split(",")[0]) for line in (screen.output_dir / "loss.csv").read_text().splitlines()[1:]]
            assert steps == list(range(1, 301))
            assert f"outputs in {screen.output_dir}" in text_of(app, "#train-state")
            # Resume of the finished run: a refusal, shown as one (it read "failed", with an error toast)
            await pilot.click("#resume")
            await wait_for(pilot, lambda: "refused" in text_of(app, "#train-state"), timeout=60, what="refused")
            assert "nothing to resume" in text_of(app, "#train-state") and "failed" not in text_of(app, "#train-state")

            # Train again: a new run in a new folder (the finished one's folder is not reused, so not refused)
            first = screen.output_dir
            screen.query_one("#field-max_train_steps").value = "2"
            await pilot.click("#train")
            # not "wait until running": a two-step run can start and end between two polls on a busy machine
            await wait_for(pilot, lambda: screen.output_dir != first and not screen.running
                           and "finished" in text_of(app, "#train-state"), timeout=120, what="second run finished")

    asyncio.run(scenario())


# --- keys that F1 lists win over the focused widget -------------------------------------------


def test_sql_that_does_not_parse_is_an_error_line_not_the_end_of_the_app(synthetic_catalog):
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="sql")
        async with app.run_test(size=SIZE) as pilot:
            app.screen.query_one("#editor").load_text("xSELECT format FROM images")
            await pilot.press("f9")
            await wait_for(pilot, lambda: "syntax error" in text_of(app, "#sql-status"), what="the parser's message")
            assert app.is_running
            app.screen.query_one("#editor").load_text("SELECT 1 AS one")
            await pilot.press("f9")
            await wait_for(pilot, lambda: app.screen.query_one("#results").row_count == 1, what="the next query")

    asyncio.run(scenario())


def test_sql_keys_work_while_typing_in_the_editor(synthetic_catalog):
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="sql")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            editor = screen.query_one("#editor")
            editor.load_text("SELECT format FROM images")
            await focus_on(pilot, editor)
            await pilot.press("f9")
            await wait_for(pilot, lambda: screen.query_one("#results").row_count == 250, what="results")
            editor.move_cursor((0, 10))

            await pilot.press("ctrl+e")  # export, not end of line
            target = synthetic_catalog.parent / "results.csv"
            await wait_for(pilot, lambda: target.exists() and "exported" in text_of(app, "#sql-status"), what="export")
            assert editor.cursor_location == (0, 10)

            await pilot.press("ctrl+w")  # write mode, not delete word
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "ConfirmWrite", what="write confirmation")
            assert editor.text == "SELECT format FROM images"
            await pilot.press("escape")
            await wait_for(pilot, lambda: app.screen is screen and not screen.write_mode)

            await focus_on(pilot, editor)
            await pilot.press("f5")  # the editor would take F6/F7 (select line/all) for itself
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "DuplicatesScreen")
            await pilot.press("f6")
            await wait_for(pilot, lambda: app.screen is screen)
            await focus_on(pilot, editor)
            await pilot.press("f7")
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "TrainScreen", what="F7 from the editor")

    asyncio.run(scenario())


def test_caption_keys_work_while_typing_and_enter_on_a_row_edits_it(synthetic_catalog):
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="captions")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            editor = screen.query_one("#caption-text")
            rows = screen.query_one("#rows")
            await wait_for(pilot, lambda: "of 250" in text_of(app, "#table-status"), what="rows")
            rows.focus()
            await pilot.press("down")
            image_id = screen.query_one("#captions-table").current_image_id
            await wait_for(pilot, lambda: screen.image_id == image_id and screen.query_one("#sources").option_count, what="row 2")
            await pilot.press("enter")
            assert app.focused is editor
            assert editor.cursor_location == editor.document.end  # a tag typed now goes after the caption, not before
            await pilot.press("end", "enter")  # in the editor, enter is a new line
            assert editor.text.endswith("\n") and app.focused is editor

            sources = screen.query_one("#sources")
            sources.highlighted = [o.id for o in sources.options].index("model:blip")
            await focus_on(pilot, editor)
            await pilot.press("ctrl+a")  # accept the source, not line start
            await wait_for(pilot, lambda: app.con.execute("SELECT source FROM caption_choice WHERE image_id = ?", [image_id]).fetchall() == [("model:blip",)], what="accept")

            await pilot.press("f6")  # the editor would select a line
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "SqlScreen", what="F6 from the editor")

    asyncio.run(scenario())


def test_train_stop_key_works_while_an_input_has_focus(synthetic_catalog):
    class FakeRun:
        cancelled = False

        def cancel(self):
            self.cancelled = True

    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="train")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            field = screen.query_one("#field-seed")
            await wait_for(pilot, lambda: field.value != "", what="defaults")
            seed = field.value
            run = screen._progress = FakeRun()  # stands in for a running training
            field.focus()
            field.action_select_all()
            await pilot.press("ctrl+x")  # stop, not cut
            assert run.cancelled and field.value == seed
            assert "stopping" in text_of(app, "#train-state")

    asyncio.run(scenario())


def test_train_screen_opens_at_once_and_loads_its_defaults_in_a_worker(synthetic_catalog, monkeypatch):
    """The defaults (torch imports, the first time) load in a worker: held back here until the screen is shown and
    typed into, which could not happen if loading them blocked the UI thread."""
    import threading

    from tui import train_screen

    real_defaults = train_screen.default_values
    release = threading.Event()

    def gated_defaults(preset):
        assert release.wait(30), "the test never released the defaults"
        return real_defaults(preset)

    monkeypatch.setattr(train_screen, "default_values", gated_defaults)

    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: "of 250" in text_of(app, "#table-status"), what="browser")
            await pilot.press("f7")
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "TrainScreen", what="train screen")
            screen = app.screen
            assert screen.query_one("#train").disabled and "loading" in text_of(app, "#train-state")
            await focus_on(pilot, screen.query_one("#field-seed"))
            await pilot.press("7")  # typed while the defaults load: kept
            assert screen.query_one("#field-seed").value == "7" and not screen.ready
            release.set()
            await wait_for(pilot, lambda: screen.ready, what="defaults")
            assert screen.query_one("#field-seed").value == "7"
            assert screen.query_one("#field-resolution").value == "64" and not screen.query_one("#train").disabled
            assert "tiny" in [str(option[0]) for option in screen.query_one("#preset")._options]

    asyncio.run(scenario())


def test_pipeline_steps_run_while_a_model_trains_say_whose_dataset_they_change(synthetic_catalog):
    """A TUI review: Run all during a training run filtered and re-bucketed the set without a word; the run kept its
    own snapshot, and the next run trained on 25 images where this one had 27."""
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="pipeline")
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            app.training_in = "runs/lora-1"  # as the Train screen's worker marks a run going on
            app.screen.start(["buckets"])
            await wait_for(pilot, lambda: any("A training run is going on (runs/lora-1)" in n.message for n in app._notifications),
                           what="the note")
            await wait_for(pilot, lambda: app.screen.running is None, what="the step's end")

    asyncio.run(scenario())


def test_a_finished_run_whose_evaluation_failed_says_so(synthetic_catalog):
    """A TUI review: a run on a local model finished, its evaluation failed (no CLIP offline) and the Train screen
    said only "finished"; the runs table showed an empty clip score with no word why (the CLI says it)."""
    from tui.messages import StepFinished

    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="train")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            await wait_for(pilot, lambda: screen.ready, what="train form")
            screen.post_message(StepFinished(step="train", status="ok", summary={"steps": 2}, seconds=3.0,
                                             error="evaluating the samples failed (ModelNotAvailableError: no CLIP)"))
            await wait_for(pilot, lambda: any(n.title == "Train: no scores" for n in app._notifications), what="the note")
            assert "finished" in text_of(app, "#train-state")
            assert any("evaluating the samples failed" in str(line) for line in screen.query_one("#train-log").lines)

    asyncio.run(scenario())


# --- catalog lock, help ---------------------------------------------------------------------


@contextlib.contextmanager
def catalog_held_elsewhere(catalog: Path):
    """Another process holding the catalog open (as a second workbench would), until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from workbench.catalog import connect; con = connect(sys.argv[1]); print('ready', flush=True); time.sleep(60)",
         str(catalog)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_locked_catalog_names_the_holder_and_retry_opens_it(synthetic_catalog):
    with catalog_held_elsewhere(synthetic_catalog) as holder:
        async def scenario():
            app = WorkbenchApp(catalog_path=synthetic_catalog)
            async with app.run_test(size=SIZE) as pilot:
                await wait_for(pilot, lambda: app.screen.__class__.__name__ == "LockedScreen", what="locked screen")
                message = text_of(app, "#locked-message")
                assert f"process {holder.pid}" in message and "retry" in message
                await pilot.press("r")
                await pilot.pause(0.2)
                assert app.screen.__class__.__name__ == "LockedScreen" and app.con is None
                await pilot.press("w")  # wait: retries every second by itself
                await wait_for(pilot, lambda: "waiting" in text_of(app, "#locked-state"))
                holder.kill()
                holder.wait()
                await wait_for(pilot, lambda: app.con is not None and app.screen.__class__.__name__ == "BrowserScreen", what="opened")
                await wait_for(pilot, lambda: "of 250" in text_of(app, "#table-status"), what="rows")

        asyncio.run(scenario())


def test_locked_screen_shows_a_path_with_brackets_on_retry(tmp_path):
    """A catalog in a folder named `lk[/]y` crashed the app on Retry (the message was read as markup)."""
    catalog = tmp_path / "lk[" / "]y" / "workbench.duckdb"  # the path reads …/lk[/]y/…
    catalog.parent.mkdir(parents=True)
    connect(catalog).close()
    with catalog_held_elsewhere(catalog):
        async def scenario():
            app = WorkbenchApp(catalog_path=catalog)
            async with app.run_test(size=SIZE) as pilot:
                await wait_for(pilot, lambda: app.screen.__class__.__name__ == "LockedScreen", what="locked screen")
                await pilot.press("r")
                await pilot.pause(0.3)
                assert app.screen.__class__.__name__ == "LockedScreen" and "lk[/]y" in text_of(app, "#locked-message")

        asyncio.run(scenario())


def test_every_screen_shows_the_screen_keys_at_80_columns_and_a_click_switches(synthetic_catalog):
    """The footer lists a screen's own keys first: at 80 columns it cut off F1–F7 on every screen."""
    from tui.screen_bar import ScreenBar

    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="duplicates")
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: app.con is not None)
            for key, name in (("f2", "PipelineScreen"), ("f3", "BrowserScreen"), ("f4", "CaptionsScreen"),
                              ("f5", "DuplicatesScreen"), ("f6", "SqlScreen"), ("f7", "TrainScreen")):
                await pilot.press(key)
                await wait_for(pilot, lambda: app.screen.__class__.__name__ == name, what=name)
                bar = app.screen.query_one(ScreenBar)
                line = bar.render()
                assert line.cell_length <= 80 and all(
                    label in line.plain for label in ("F1 Help", "F2 Pipeline", "F5 Duplicates", "F7 Train")), line.plain
            await pilot.click(ScreenBar, offset=(line.plain.index("F6 SQL") + 1, 0))
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "SqlScreen", what="the click")

    asyncio.run(scenario())


def test_help_lists_every_binding(synthetic_catalog):
    from tui.app import SCREENS_BY_KEY

    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.con is not None)
            await pilot.press("f1")
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "HelpScreen")
            from rich.console import Console

            console = Console(width=200, record=True, file=open(os.devnull, "w"))
            console.print(app.screen.table)
            text = console.export_text()
            for _, _, _, screen in SCREENS_BY_KEY:
                for binding in screen.BINDINGS:  # the footer's short label, or the longer tooltip where there is one
                    assert (binding.tooltip or binding.description) in text
            for label in ("Pipeline", "Browse", "Captions", "Duplicates", "SQL", "Train", "Next page"):
                assert label in text
            await pilot.press("escape")
            await wait_for(pilot, lambda: app.screen.__class__.__name__ != "HelpScreen")

    asyncio.run(scenario())


def test_pipeline_cancel_stops_a_running_step_and_errors_are_shown(synthetic_catalog, monkeypatch):
    from dataclasses import replace

    from tui import steps

    def slow_step(con, settings, progress, project):
        for i in range(2000):
            progress(task="dedup", completed=i, total=2000)
            time.sleep(0.01)
        return {"never": "reached"}

    def broken_step(con, settings, progress, project):
        raise ImportError("No module named 'pipelines.score'")

    monkeypatch.setitem(steps.STEPS_BY_NAME, "dedup", replace(steps.STEPS_BY_NAME["dedup"], run=slow_step))
    monkeypatch.setitem(steps.STEPS_BY_NAME, "score", replace(steps.STEPS_BY_NAME["score"], run=broken_step))

    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="pipeline")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            await pilot.click("#run-dedup")
            await wait_for(pilot, lambda: "dedup 2" in text_of(app, "#state-dedup") or "/2,000" in text_of(app, "#state-dedup"), what="progress")
            assert screen.query_one("#bar-dedup").total == 2000
            await pilot.press("escape")
            await wait_for(pilot, lambda: screen.running is None, what="cancelled")
            assert "cancelled" in text_of(app, "#state-dedup")
            assert not screen.query_one("#run-score").disabled

            await pilot.click("#run-score")
            await wait_for(pilot, lambda: screen.running is None and "failed" in text_of(app, "#state-score"), what="failure shown")
            log = "\n".join(line.text for line in screen.query_one("#log").lines)
            assert "No module named 'pipelines.score'" in log and "Traceback" not in log

    asyncio.run(scenario())


def test_quitting_during_a_step_records_it_cancelled(synthetic_catalog, monkeypatch):
    from dataclasses import replace

    from tui import steps
    from workbench.catalog import record_run

    def slow_step(con, settings, progress, project):
        with record_run(con, "dedup", {}):
            for i in range(100_000):
                progress(task="dedup", completed=i, total=100_000)
                time.sleep(0.01)

    monkeypatch.setitem(steps.STEPS_BY_NAME, "dedup", replace(steps.STEPS_BY_NAME["dedup"], run=slow_step))

    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="pipeline")
        async with app.run_test(size=SIZE) as pilot:
            await pilot.click("#run-dedup")
            await wait_for(pilot, lambda: "/100,000" in text_of(app, "#state-dedup"), what="progress")
            await pilot.press("ctrl+q")  # asked first (a review: it quit a training run without a word)
            await wait_for(pilot, lambda: isinstance(app.screen, Confirm), what="the question")
            assert "Stop and quit?" in str(app.screen.query_one("#confirm-question").render())
            await pilot.press("n")  # no: it runs on
            await pilot.pause(0.3)
            assert app.running_steps and not isinstance(app.screen, Confirm)
            await pilot.press("ctrl+q")
            await wait_for(pilot, lambda: isinstance(app.screen, Confirm), what="the question")
            stop_asked.append(time.monotonic())
            await pilot.press("y")
            # said while it stops (the UI froze for seconds without a word), then closed by itself
            await wait_for(pilot, lambda: any(n.title == "Quit" and "Stopping what runs" in n.message
                                              for n in app._notifications), what="the stop said")
            await wait_for(pilot, lambda: not app.running_steps, what="the step stopped")

    stop_asked: list[float] = []
    asyncio.run(scenario())
    assert time.monotonic() - stop_asked[0] < 5
    assert query(synthetic_catalog, "SELECT step, status, finished_at IS NOT NULL FROM runs") == [("dedup", "cancelled", True)]


def test_cli_tui_rejects_an_unknown_screen():
    from typer.testing import CliRunner

    from workbench.cli import app as cli

    result = CliRunner().invoke(cli, ["tui", "--screen", "gallery"])
    assert result.exit_code == 2
    assert "--screen must be one of pipeline, browser" in result.output


def test_cli_tui_refuses_a_catalog_path_that_does_not_exist(tmp_path):
    from typer.testing import CliRunner

    from workbench.cli import app as cli

    result = CliRunner().invoke(cli, ["tui", "--catalog", str(tmp_path / "typo.duckdb")], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "No catalog at" in result.output
    assert not (tmp_path / "typo.duckdb").exists()


def test_the_tui_without_a_terminal_says_so_and_leaves_the_catalog_free(catalog_path):
    """A scripting review: `workbench $STEP` with STEP empty, from cron, started a TUI no one saw; it wrote escape
    codes to the log and held the catalog, so every later command failed with "in use"."""
    from typer.testing import CliRunner

    from workbench.catalog import connect
    from workbench.cli import app as cli

    connect(catalog_path).close()
    for args in ([], ["tui"]):
        result = CliRunner().invoke(cli, [*args, "--catalog", str(catalog_path)] if args else ["--catalog", str(catalog_path)],
                                    env={"COLUMNS": "200"})
        assert result.exit_code == 2 and "The terminal UI needs a terminal" in result.output, result.output
        assert "\x1b[" not in result.output
    connect(catalog_path).close()  # not held


def test_a_folder_given_as_catalog_exits_with_a_message(tmp_path):
    async def scenario():
        app = WorkbenchApp(catalog_path=tmp_path)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause(0.2)
        return app

    app = asyncio.run(scenario())
    assert app.return_code == 2
    assert app.failure == f"{tmp_path} is a folder, not a catalog file."


def test_text_that_looks_like_markup_is_shown_as_typed_on_every_screen(synthetic_catalog):
    """Brackets in SQL, paths, messages and form fields are text: `[/]` once crashed the app from the SQL history,
    the pipeline log and the train form, and `[v1]` vanished from a path."""
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="sql")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            screen.query_one("#editor").load_text("SELECT '[b]bold[/b] [/]' AS x")
            await pilot.press("f9")
            await wait_for(pilot, lambda: screen.query_one("#history").option_count == 1, what="history")
            assert "[b]bold[/b] [/]" in str(screen.query_one("#history").get_option_at_index(0).prompt)
            screen.query_one("#editor").load_text("SELECT nope FROM images")
            await pilot.press("f9")
            await wait_for(pilot, lambda: "nope" in text_of(app, "#sql-status"), what="error")
            assert "\\n" not in text_of(app, "#sql-status") and screen.query_one("#results").row_count == 0

            await pilot.press("f2")
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "PipelineScreen", what="pipeline")
            screen = app.screen
            screen.query_one("#set-ingest-folders").value = "nope/x[/]"
            await pilot.click("#run-ingest")
            # the log wraps long lines: joined without breaks, so the temp folder's length cannot split the path
            await wait_for(pilot, lambda: screen.running is None and "nope/x[/]" in "".join(
                str(line.text) for line in screen.query_one("#log").lines), what="the error in the log")

            await pilot.press("f7")
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "TrainScreen" and app.screen.ready, what="train form")
            screen = app.screen
            screen.query_one("#field-max_train_steps").value = "[/red]"
            screen.action_train()  # not a click: the error line moves the button
            await wait_for(pilot, lambda: "[/red]" in text_of(app, "#train-error"), what="the form error")
            screen.query_one("#field-max_train_steps").value = "0"
            screen.action_train()
            await wait_for(pilot, lambda: "'steps' must be at least 1" in text_of(app, "#train-error"), what="the form's words")
            assert "--" not in text_of(app, "#train-error") and text_of(app, "#train-state") == "not started"
            screen.query_one("#field-max_train_steps").value = "2"
            screen.query_one("#field-output_dir").value = "runs/lora [v1]"
            assert screen.config().output_dir == str(synthetic_catalog.parent / "runs" / "lora [v1]")  # beside the catalog
            # a model of one's own, not only a preset (a review found it only through "model=" in more settings), a
            # local folder relative to the catalog's folder as the output folder is; a Hub id as typed
            import shutil

            from workbench.models import component_path

            shutil.copytree(component_path("tiny", "sd"), synthetic_catalog.parent / "models" / "my sd")
            screen.query_one("#field-resolution").value = "64"  # tiny's, as the preset filled it
            screen.query_one("#field-model").value = "models/my sd"
            # a model of one's own starts from the trainer's defaults (512 px), not tiny's 64 px on the CPU
            await wait_for(pilot, lambda: screen.query_one("#field-resolution").value == "512", what="the trainer's defaults")
            assert screen.query_one("#field-max_train_steps").value == "2"  # typed: kept
            assert screen.config().model == str(synthetic_catalog.parent / "models" / "my sd")
            screen.query_one("#field-model").value = "someone/their-model"
            assert screen.config().model == "someone/their-model"
            screen.query_one("#field-model").value = ""
            await wait_for(pilot, lambda: screen.query_one("#field-resolution").value == "64", what="tiny's values again")
            assert screen.config().model == "tiny"
            screen.query_one("#field-model").value = "someone/x"
            await wait_for(pilot, lambda: screen.query_one("#field-resolution").value == "512", what="the trainer's defaults")
            screen.query_one("#field-model").value = "tiny"  # a preset's name typed there: that preset, with its values
            await wait_for(pilot, lambda: screen.query_one("#field-resolution").value == "64", what="tiny's values")
            assert screen.config().model == "tiny"
            assert app.return_code is None  # still running: nothing crashed

    asyncio.run(scenario())


def test_trainer_messages_use_the_forms_words():
    from tui.train_screen import form_message

    assert form_message("the `tiny` preset works offline (`--model tiny`; `--clip-model tiny` for evaluate).") == (
        "the `tiny` preset works offline (the preset tiny).")

    assert form_message("--max-train-steps must be at least 1") == "'steps' must be at least 1"
    assert form_message("x already holds a training run: continue it with --resume latest, or give another --output-dir.") == (
        "x already holds a training run: continue it with Resume, or give another 'output folder'.")
    assert form_message("--num-class-images must be 1 or more") == "num_class_images must be 1 or more"
    # a command to run in a shell keeps its options (`concept add NAME class NOUN` was no command)
    assert form_message("set one (`workbench concept add NAME --class NOUN`), or pass --no-prior-preservation.") == (
        "set one (`workbench concept add NAME --class NOUN`), or pass no_prior_preservation.")


def test_a_word_that_names_a_column_is_a_text_search_not_a_condition(synthetic_catalog):
    """`caption` or `error` bind as SQL (WHERE casts any value to true/false) and then failed on the first row."""
    from tui.queries import Filter

    con = connect(synthetic_catalog)
    for word in ("caption", "error", "format", "512"):
        condition, params, kind = Filter(word).where(con)
        assert kind == "text", word
        con.execute(f"SELECT count(*) FROM images_view WHERE {condition}", params).fetchall()  # runs on every row
    assert Filter("is_grayscale").where(con)[2] == "sql" and Filter("width > 5").where(con)[2] == "sql"
    # ordinary words that contain SQL's words or signs are a text search too; they were refused as broken SQL
    for words in ("cats like milk", "wow!", "coffee; tea", "in (the) box", "is null"):
        condition, params, kind = Filter(words).where(con)
        assert kind == "text" and params[1] == f"%{words}%", words
    # quotes make anything a text search, even a valid condition
    assert Filter('"true"').where(con) == ("(path ILIKE ? OR caption ILIKE ? OR array_to_string(tags, ', ') ILIKE ? OR image_id LIKE ?)",
                                            ["%true%", "%true%", "%true%", "true%"], "text")
    for sql in ("caption ILIKE '%lake%'", "caption IS NULL", "width BETWEEN 5 AND 9", "format IN ('PNG')", "width != 3"):
        assert Filter(sql).where(con)[2] == "sql", sql
    for broken in ("captoin IS NULL", "widht != 3", "true; DROP TABLE images"):
        with pytest.raises(CatalogError, match="not a valid WHERE clause"):
            Filter(broken).where(con)
    con.close()


def test_the_screen_in_view_shows_a_change_made_in_the_background(synthetic_catalog):
    """A pipeline step or a training run ends while Browse is shown: its rows reload then, not on the next visit."""
    from tui.messages import CatalogChanged

    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: "of 250" in text_of(app, "#table-status"), what="first page")
            box = app.screen.query_one("#filter")
            box.value = "excluded"
            await pilot.click("#filter")
            await pilot.press("enter")
            before = query_count(app, "SELECT count(*) FROM images_view WHERE excluded")
            await wait_for(pilot, lambda: f"of {before:,} · SQL filter" in text_of(app, "#table-status"), what="filtered")
            app.con.execute("INSERT INTO exclusions (image_id, step, reason) SELECT image_id, 'manual', 'test' FROM images "
                            "WHERE image_id NOT IN (SELECT image_id FROM exclusions) LIMIT 7")
            app.post_message(CatalogChanged("pipeline"))  # as a step's worker does when it ends
            await wait_for(pilot, lambda: f"of {before + 7:,} · SQL filter" in text_of(app, "#table-status"), what="reloaded")

    asyncio.run(scenario())


def test_pipeline_settings_start_from_what_each_step_last_ran_with(synthetic_catalog):
    """Run all must repeat the curation done from the CLI, not the defaults (buckets at 512 over a set bucketed at 64)."""
    from pipelines.buckets import aspect_buckets
    from pipelines.dedup import duplicate_groups
    from pipelines.filter import FilterRules, filtered_dataset

    con = connect(synthetic_catalog)
    aspect_buckets(con, resolution=64)
    filtered_dataset(con, FilterRules().with_overrides(min_side=100, max_aspect=2.5, min_clip_score=None, blurry=True))
    duplicate_groups(con, threshold=4, mirrored=False)
    con.close()

    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="pipeline")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            value = lambda box: screen.query_one(f"#set-{box}").value  # noqa: E731
            await wait_for(pilot, lambda: value("buckets-resolution") == "64", what="restored settings")
            assert (value("filter-min_side"), value("filter-max_aspect"), value("filter-min_clip_score")) == ("100", "2.5", "")
            assert (value("dedup-threshold"), value("dedup-mirrored")) == ("4", "no")
            assert value("caption-model") == "tiny"  # never run: the default
            # bounds worked out for 64 px are not restored: they would block buckets at another resolution
            assert (value("buckets-min_bucket_reso"), value("buckets-max_bucket_reso")) == ("", "")

            # Run from here repeats the last filter run, rules the form does not show (blur) included; empty is off
            screen.query_one("#set-filter-max_aspect").value = ""
            await pilot.click("#run-filter")
            await wait_for(pilot, lambda: query_count(app, "SELECT count(*) FROM runs WHERE step = 'filter'") == 2
                           and screen.running is None, what="filter run")
            params = json.loads(app.con.execute("SELECT params FROM runs WHERE step = 'filter' ORDER BY run_id DESC LIMIT 1").fetchone()[0])
            assert (params["min_side"], params["max_aspect"], params["blurry"]) == (100, None, True)

    asyncio.run(scenario())


@pytest.mark.parametrize("width", [40, 41])
def test_captions_screen_lays_out_at_40_columns(synthetic_catalog, width):
    """At 40-41 columns a grid cell of the bulk bar was squeezed to nothing and Textual crashed wrapping a label."""
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="captions")
        async with app.run_test(size=(width, 24)) as pilot:
            await wait_for(pilot, lambda: "of 250" in text_of(app, "#table-status"), what="rows")
            await pilot.resize_terminal(80, 24)
            await pilot.resize_terminal(width, 24)
            await pilot.pause(0.2)
        assert app.return_code in (None, 0)

    asyncio.run(scenario())


def test_browse_puts_images_in_a_concept_and_excludes_or_includes_one(synthetic_catalog):
    """c: the image under the cursor or all filtered rows into a concept (or out of theirs); x: exclude, x again: include."""
    from pipelines.concepts import added_concept
    from tui.concept_dialog import NEW_CONCEPT, NO_CONCEPT, ConceptDialog

    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: "of 250" in text_of(app, "#table-status"), what="first page")
            screen = app.screen

            box = screen.query_one("#filter")
            box.value = "format = 'PNG'"
            await pilot.click("#filter")
            await pilot.press("enter")
            pngs = query_count(app, "SELECT count(*) FROM images WHERE format = 'PNG'")
            await wait_for(pilot, lambda: f"of {pngs} · SQL filter" in text_of(app, "#table-status"), what="filtered")
            box.value = "format = 'JPEG'"  # typed, not applied: "all filtered" would mean other rows than shown
            await pilot.click("#rows", offset=(5, 2))
            await pilot.press("c")
            await wait_for(pilot, lambda: isinstance(app.screen, ConceptDialog), what="dialog")
            assert app.screen.query_one("#concept-all").disabled and not app.screen.query_one("#concept-one").disabled
            assert "press Enter to apply it first" in str(app.screen.query_one("#concept-filter").render())
            await pilot.press("escape")
            box.value = "format = 'PNG'"
            await pilot.press("c")
            await wait_for(pilot, lambda: isinstance(app.screen, ConceptDialog), what="dialog")
            # no concept yet: a new one, made here (a class noun could only be set from the command line)
            dialog = app.screen
            assert dialog.query_one("#concept-choice").value == NEW_CONCEPT
            for field, value in (("name", "sks dog"), ("trigger", "sks"), ("class", "dog"), ("repeats", "3")):
                dialog.query_one(f"#concept-{field}").value = value
            await pilot.click("#concept-all")
            await wait_for(pilot, lambda: query_count(app, "SELECT count(*) FROM concept_images WHERE concept = 'sks dog'") == pngs, what="assigned")
            assert query_count(app, "SELECT count(*) FROM images_view WHERE concept = 'sks dog' AND format <> 'PNG'") == 0
            assert app.con.execute("SELECT trigger_token, class_noun, repeats FROM concepts").fetchall() == [("sks", "dog", 3)]
            # an existing concept's settings show, and a change applies to the concept
            await pilot.press("c")
            await wait_for(pilot, lambda: isinstance(app.screen, ConceptDialog), what="dialog")
            assert app.screen.query_one("#concept-class").value == "dog" and app.screen.query_one("#concept-repeats").value == "3"
            app.screen.query_one("#concept-repeats").value = "5"
            await pilot.click("#concept-one")
            await wait_for(pilot, lambda: query_count(app, "SELECT repeats FROM concepts WHERE name = 'sks dog'") == 5, what="changed")
            assert app.con.execute("SELECT trigger_token, class_noun FROM concepts").fetchall() == [("sks", "dog")]

            target = screen.query_one(ImageTable).current_image_id
            added_concept(app.con, "aaa first by name", trigger="aaa")
            await pilot.press("c")
            await wait_for(pilot, lambda: isinstance(app.screen, ConceptDialog), what="dialog")
            assert app.screen.query_one("#concept-choice").value == "sks dog"  # the image's concept, not the first by name
            app.screen.query_one("#concept-choice").value = NO_CONCEPT
            await pilot.click("#concept-one")
            await wait_for(pilot, lambda: query_count(app, "SELECT count(*) FROM concept_images") == pngs - 1, what="taken out")
            assert app.con.execute("SELECT concept FROM images_view WHERE image_id = ?", [target]).fetchone()[0] is None

            await pilot.press("x")
            await wait_for(pilot, lambda: app.con.execute("SELECT excluded FROM images_view WHERE image_id = ?", [target]).fetchone()[0], what="excluded")
            await pilot.press("x")
            await wait_for(pilot, lambda: not app.con.execute("SELECT excluded FROM images_view WHERE image_id = ?", [target]).fetchone()[0], what="included")

    asyncio.run(scenario())


def test_a_carried_caption_cannot_be_rejected_since_it_is_not_stored(catalog_path):
    """Rejecting a 'duplicate' caption deleted nothing lasting: the next dedup brought it back. It is refused, saying why."""
    from pipelines.caption_edits import reject_caption
    from workbench.catalog import CatalogError

    con = connect(catalog_path)
    with pytest.raises(CatalogError, match="carried from a duplicate copy"):
        reject_caption(con, "a" * 64, "duplicate")
    con.close()


def test_at_80_columns_a_path_leaves_room_for_the_caption(synthetic_catalog):
    """At 80x24 the Captions table showed only the path column (48 wide in a 38-wide pane)."""
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="captions")
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: "of 250" in text_of(app, "#table-status"), what="rows")
            table = app.screen.query_one("#rows")
            await wait_for(pilot, lambda: table.row_count and "caption" in rendered_lines(table)[0], what="caption column in view")
            header, first = rendered_lines(table)[:2]
            caption = app.con.execute("SELECT caption FROM images_view WHERE path = '/synthetic/img_000000.jpg'").fetchone()[0]
            assert first.startswith(" …/img_000000.jpg") and caption[:12] in first
            await pilot.resize_terminal(200, 40)  # wider: the whole path again, without a page reload
            await wait_for(pilot, lambda: rendered_lines(table)[1].startswith(" /synthetic/img_000000.jpg"), what="full path")

    asyncio.run(scenario())


def test_at_80_columns_browse_shows_the_caption_beside_the_path(synthetic_catalog):
    """The caption was Browse's eighth column: at 80x24 it was only seen by scrolling right."""
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="browser")
        async with app.run_test(size=(80, 24)) as pilot:
            table = app.screen.query_one("#rows")
            await wait_for(pilot, lambda: table.row_count and "caption" in rendered_lines(table)[0], what="caption column in view")
            header, first = rendered_lines(table)[:2]
            assert header.index("caption") > header.index("path") and "img_000000" in first

    asyncio.run(scenario())


def test_the_preview_shows_an_image_as_the_catalog_measured_it(tmp_path):
    """The preview showed EXIF-rotated photos on their side, and cut-outs on black (Pillow's convert("RGB"))."""
    import numpy as np
    from PIL import Image

    from tui.preview import load_preview

    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    Image.new("RGB", (64, 32), (50, 60, 70)).save(tmp_path / "rotated.jpg", exif=exif)
    assert load_preview(str(tmp_path / "rotated.jpg")).size == (32, 64)
    cutout = np.zeros((32, 32, 4), np.uint8)
    cutout[8:24, 8:24] = (200, 30, 30, 255)
    Image.fromarray(cutout, "RGBA").save(tmp_path / "cutout.png")
    assert load_preview(str(tmp_path / "cutout.png")).getpixel((0, 0)) == (255, 255, 255)


def test_the_preview_does_not_decode_a_decompression_bomb():
    """Selecting the sample bomb's error row (48 KB of PNG, 20000×20000 pixels) took the TUI from 154 MB to 2.4 GB."""
    import subprocess

    bomb = Path(__file__).resolve().parents[1] / "sample_data" / "bad" / "decompression_bomb.png"
    # in a process of its own: a peak of this one (the high-water mark of every test before) would hide the decode
    # VmHWM, the peak of this process's memory: getrusage's ru_maxrss keeps the parent's peak across fork and exec
    probe = ("import sys; from tui.preview import load_preview; print(load_preview(sys.argv[1])); "
             "print(next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM')))")
    out = subprocess.run([sys.executable, "-c", probe, str(bomb)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.splitlines()
    assert out[0] == "20000×20000 is over 179 megapixels: not decoded for a preview"
    assert int(out[1]) < 700_000  # KiB of peak memory: decoding it took 2.4 GB


def test_the_ingest_step_takes_a_folder_with_spaces_typed_without_quotes(tmp_path):
    """`data/concepts/5_wbk cat` in the Ingest box failed as two paths, "…/5_wbk, …/cat", with no hint."""
    from PIL import Image

    from tui import steps
    from workbench.catalog import connect

    folder = tmp_path / "data" / "5_wbk cat"
    folder.mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / "a.png")
    con = connect(tmp_path / "workbench.duckdb")
    spec = steps.STEPS_BY_NAME["ingest"]
    settings = steps.parse_settings(spec, {"folders": "data/5_wbk cat", "workers": "1"})
    steps.run_ingest(con, settings, lambda **kw: None, tmp_path)
    assert con.execute("SELECT count(*) FROM images_view WHERE status = 'ok'").fetchone()[0] == 1
    with pytest.raises(ValueError, match=r"no such file or folder: .*/data/5_wbk, .*/dog \(a name with spaces goes in quotes"):
        steps.run_ingest(con, steps.parse_settings(spec, {"folders": "data/5_wbk dog", "workers": "1"}), lambda **kw: None, tmp_path)
    con.close()
    # a number the CLI refuses is refused by the form too (a review: a score batch of -1 ran on nothing, was recorded
    # `ok`, and came back in the form every session, to fail once there was something to score)
    with pytest.raises(ValueError, match=r"CLIP score: batch must be at least 1, not '-1'"):
        steps.parse_settings(steps.STEPS_BY_NAME["score"], {"model": "tiny", "batch_size": "-1"})
    with pytest.raises(ValueError, match=r"Ingest: workers must be at least 1, not '0'"):
        steps.parse_settings(spec, {"folders": "", "workers": "0"})
    assert steps.parse_settings(spec, {"folders": "", "workers": ""})["workers"] is None  # empty: the default


def test_another_preset_keeps_what_was_typed_in_the_train_form(four_image_catalog):
    """Switching tiny → sd15 wiped the typed output folder, prompt, steps and rank."""
    async def scenario():
        app = WorkbenchApp(catalog_path=four_image_catalog, start="train")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            await wait_for(pilot, lambda: screen.ready, what="defaults")
            assert screen.query_one("#field-validation_prompt").value == ""  # not "a photo of sks": the trainer's default
            assert screen.query_one("#field-resolution").value == "64"  # the tiny preset's
            screen.query_one("#field-output_dir").value = "runs/mine"
            screen.query_one("#field-rank").value = "16"
            screen.query_one("#preset").value = "sd15"
            await wait_for(pilot, lambda: screen.query_one("#field-resolution").value == "512", what="sd15's values")
            assert screen.query_one("#field-output_dir").value == "runs/mine" and screen.query_one("#field-rank").value == "16"

    asyncio.run(scenario())


def test_a_catalog_the_tui_creates_is_announced(tmp_path):
    """`workbench` in a folder with no catalog made one without a word (every other command refuses one that is not there)."""
    catalog = tmp_path / "fresh.duckdb"

    async def scenario():
        app = WorkbenchApp(catalog_path=catalog)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: any("A new catalog" in n.message for n in app._notifications), what="notice")
            assert app.screen.__class__.__name__ == "PipelineScreen"  # where an empty catalog starts: ingest
        again = WorkbenchApp(catalog_path=catalog)  # the second time it is there: nothing to say
        async with again.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: again.con is not None and again.screen.__class__.__name__ == "PipelineScreen")
            await pilot.pause(0.2)
            assert not any("A new catalog" in n.message for n in again._notifications)

    asyncio.run(scenario())


def test_the_sql_history_outlives_the_app_and_keeps_failed_queries(synthetic_catalog):
    """The console's history was lost when the app closed, a query that failed never entered it, and the editor
    started from the example query again."""
    good, bad = "SELECT count(*) AS n FROM images", "SELECT nope FROM images"

    async def first_visit():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="sql")
        async with app.run_test(size=SIZE) as pilot:
            screen, editor = app.screen, app.screen.query_one("#editor")
            for sql in (good, bad):
                editor.load_text(sql)
                await pilot.press("f9")
                await wait_for(pilot, lambda: screen.history and screen.history[-1] == sql, what=sql)
            assert screen.query_one("#history").option_count == 2

    async def second_visit():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="sql")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            await wait_for(pilot, lambda: screen.history == [good, bad], what="the saved history")
            assert screen.query_one("#history").option_count == 2
            assert screen.query_one("#editor").text == bad  # where the last visit stopped, to mend it
            assert app.con.execute("SELECT sql, ok FROM sql_history ORDER BY id").fetchall() == [(good, True), (bad, False)]

    async def many_queries():  # a TUI review: after 7 queries the 6-line box showed the oldest, not the newest
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="sql")
        async with app.run_test(size=SIZE) as pilot:
            screen, editor = app.screen, app.screen.query_one("#editor")
            await wait_for(pilot, lambda: len(screen.history) == 2, what="the saved history")
            for n in range(12):
                editor.load_text(f"SELECT {n} AS n")
                await pilot.press("f9")
                await wait_for(pilot, lambda: screen.history[-1] == f"SELECT {n} AS n", what=f"query {n}")
            await pilot.pause(0.3)
            history = screen.query_one("#history")
            assert history.max_scroll_y > 0 and history.scroll_y == history.max_scroll_y

    asyncio.run(first_visit())
    asyncio.run(second_visit())
    asyncio.run(many_queries())


def test_the_selected_duplicate_card_scrolls_into_view(sample_catalog):
    """A TUI review: → selected a card past the screen's edge and `k` kept that image, which was never shown."""
    group_id = query(sample_catalog, "SELECT group_id FROM duplicates GROUP BY 1 HAVING count(*) >= 2 ORDER BY 1 LIMIT 1")[0][0]

    async def scenario():
        app = WorkbenchApp(catalog_path=sample_catalog, start="duplicates")
        async with app.run_test(size=(60, 40)) as pilot:  # room for one 40-column card
            screen = app.screen
            await open_duplicate_group(pilot, app, group_id)
            await wait_for(pilot, lambda: len(screen.query("MemberCard")) >= 2, what="cards")
            box = screen.query_one("#members")
            assert box.scroll_x == 0
            await pilot.press("right")
            await pilot.pause()
            second = screen.query("MemberCard")[1]
            await wait_for(pilot, lambda: box.scroll_x > 0 and second.region.right <= box.region.right, what="scrolled")

    asyncio.run(scenario())


def test_duplicates_can_be_reviewed_closest_calls_first(sample_catalog):
    """1,617 groups could only be walked in id order with n/p; the doubtful ones (farthest members) were anywhere."""
    import duckdb

    con = duckdb.connect(str(sample_catalog))  # the sample's copies are all 0 bits apart: make the last group a close call
    con.execute("UPDATE duplicates SET distance = 5 WHERE NOT is_keeper AND group_id = (SELECT max(group_id) FROM duplicates)")
    con.close()
    expected = [row[0] for row in query(sample_catalog,
        "SELECT group_id FROM duplicates GROUP BY group_id "
        "ORDER BY max(distance) FILTER (WHERE method IN ('phash', 'mirror')) DESC NULLS LAST, group_id")]
    in_id_order = sorted(expected)
    assert len(expected) > 1 and expected[0] == in_id_order[-1] and expected != in_id_order

    async def scenario():
        app = WorkbenchApp(catalog_path=sample_catalog, start="duplicates")
        async with app.run_test(size=SIZE) as pilot:
            screen = app.screen
            await wait_for(pilot, lambda: screen.group_ids == in_id_order and screen.members, what="groups in id order")
            await pilot.press("o")
            await wait_for(pilot, lambda: screen.group_ids == expected and screen.position == 0, what="closest calls first")
            await wait_for(pilot, lambda: "closest calls first" in text_of(app, "#group-label"), what="the label")
            await pilot.press("o")
            await wait_for(pilot, lambda: screen.group_ids == in_id_order and "closest" not in text_of(app, "#group-label"))

    asyncio.run(scenario())


def test_a_bulk_edit_applies_to_the_caption_being_typed(synthetic_catalog):
    """Text typed and not saved, then a bulk Add token: the edit's reload put the typed text back without the token,
    and leaving the row saved it over the edit (for that one image, F8 then said it was edited after)."""
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="captions")
        async with app.run_test(size=SIZE) as pilot:
            screen, table, _, editor = await captions_loaded(app, pilot)
            first = table.page_ids[0]
            await wait_for(pilot, lambda: screen.image_id == first and editor.text == screen.loaded_text != "", what="caption")
            original = editor.text
            await focus_on(pilot, editor)
            await pilot.press("end", *" unsaved")
            screen.query_one("#token").value = "sks"
            await pilot.click("#bulk-add")
            await wait_for(pilot, lambda: isinstance(app.screen, Confirm), what="bulk question")
            await pilot.press("y")
            wanted = "sks, " + original + " unsaved"
            await wait_for(pilot, lambda: query_count(app, f"SELECT count(*) FROM current_captions WHERE image_id = '{first}' "
                                                           f"AND caption = '{wanted}'") == 1, what="the edit over the typed text")
            await wait_for(pilot, lambda: editor.text == wanted, what="the editor shows it")
            await pilot.press("ctrl+down")  # leaving keeps it: nothing unsaved is left to write over it
            await wait_for(pilot, lambda: screen.image_id == table.page_ids[1], what="next image")
            assert manual_caption(app, first) == wanted

    asyncio.run(scenario())


def test_saves_asked_for_are_written_even_when_the_app_quits_before_their_worker_runs(synthetic_catalog):
    """ctrl+s and ctrl+q in one read: the queued save never ran and quitting thought it was saved; a quit just after
    moving on wrote the left image's caption onto the next one (the editor text it kept was the old image's)."""
    ids = {}

    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="captions")
        async with app.run_test(size=SIZE) as pilot:
            screen, table, _, editor = await captions_loaded(app, pilot)
            ids["first"], ids["second"] = table.page_ids[:2]
            await wait_for(pilot, lambda: screen.image_id == ids["first"] and editor.text == screen.loaded_text != "", what="caption")
            ids["original"] = editor.text
            ids["second_before"] = app.con.execute("SELECT caption FROM current_captions WHERE image_id = ?", [ids["second"]]).fetchone()[0]
            await focus_on(pilot, editor)
            await pilot.press("end", *" Q1")
            screen._save(screen.image_id, editor.text, "caption saved")  # as ctrl+s does: its worker is queued ...
            app.exit()  # ... and the app quits in the same event-loop turn

    asyncio.run(scenario())
    con = connect(synthetic_catalog, read_only=True)
    first = con.execute("SELECT caption FROM current_captions WHERE image_id = ?", [ids["first"]]).fetchone()[0]
    second = con.execute("SELECT caption FROM current_captions WHERE image_id = ?", [ids["second"]]).fetchone()[0]
    con.close()
    assert first == ids["original"] + " Q1" and second == ids["second_before"]


def test_a_reload_keeps_the_row_the_cursor_moved_to_meanwhile(synthetic_catalog):
    """ctrl+down pressed while the table reloaded after a save jumped back a row: the reload put the cursor on the
    image it was on when the reload began (held ctrl+down landed on unpredictable rows)."""
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="captions")
        async with app.run_test(size=SIZE) as pilot:
            _, table, rows, _ = await captions_loaded(app, pilot)
            await wait_for(pilot, lambda: table.current_image_id == table.page_ids[0], what="first row")
            second = table.page_ids[1]
            old_result = table.result
            table.reload(keep_position=True)  # as after a save
            rows.action_cursor(1)  # ctrl+down pressed while the snapshot is built
            await table_reloaded(pilot, app, table, old_result)
            await pilot.pause(0.2)
            assert table.current_image_id == second and rows.cursor_row == 1

    asyncio.run(scenario())


def test_run_all_runs_the_curation_steps_not_class_priors_or_training():
    """A TUI review: Run all made class priors (settings off screen at 120 columns) that a LoRA never uses."""
    from tui.steps import STEPS

    assert [step.name for step in STEPS if step.in_run_all] == ["ingest", "dedup", "caption", "score", "filter", "buckets"]
    assert {step.name for step in STEPS} >= {"priors", "train"}  # still there, each with its own Run


def test_an_error_that_stops_the_tui_is_printed_and_exits_1(catalog_path, tmp_path):
    """A SQL user's review: a crash of the TUI only flashed the screen and exited 0; its traceback went to a log the
    user was never told of. Run in a real pseudo-terminal, as a user starts it."""
    import os
    import pty
    import select
    import subprocess
    import sys
    import time

    from workbench.catalog import connect

    connect(catalog_path).close()
    script = (
        "import sys\n"
        "from tui.app import WorkbenchApp\n"
        "def planted(self):\n"
        "    raise RuntimeError('a planted failure in the TUI')\n"
        "WorkbenchApp.on_mount = planted\n"
        "from workbench.cli import app\n"
        f"app(['tui', '--catalog', {str(catalog_path)!r}])\n"
    )
    controller, terminal = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "30", "NO_COLOR": "1", "WORKBENCH_HOME": str(tmp_path / "home")}
    child = subprocess.Popen([sys.executable, "-c", script], stdin=terminal, stdout=terminal, stderr=terminal, env=env,
                             cwd=str(Path(__file__).resolve().parents[1]), start_new_session=True)
    os.close(terminal)
    seen, deadline = b"", time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif child.poll() is not None:
            break
    os.close(controller)
    assert child.wait(timeout=30) == 1
    text = " ".join(seen.decode("utf-8", "replace").split())
    assert "a planted failure in the TUI" in text and "stopped on an unexpected error" in text
    assert str(tmp_path / "home" / "logs" / "tui-stderr.log") in text
