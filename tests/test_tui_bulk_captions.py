"""Bulk caption edits in the Captions screen: they ask first, only over the filter the table shows,
and their undo keeps captions edited after them."""

from __future__ import annotations

import asyncio

import pytest

from test_tui import SIZE, captions_loaded, focus_on, manual_caption, query_count, text_of, wait_for

from pipelines import caption_edits
from tui.app import WorkbenchApp
from tui.confirm import Confirm
from workbench.catalog import connect


def captions(app) -> dict[str, str]:
    return dict(app.con.execute("SELECT image_id, caption FROM current_captions").fetchall())


def counted(preview: caption_edits.BulkPreview) -> tuple[str, int]:
    return preview.description, preview.changed


def notified(app, words: str) -> bool:
    return any(words in str(n.message) for n in app._notifications)


async def apply_filter(pilot, app, where: str, rows: int) -> None:
    app.screen.query_one("#captions-table #filter").value = where
    await pilot.click("#captions-table #filter")
    await pilot.press("enter")
    await wait_for(pilot, lambda: f"of {rows} · SQL filter" in text_of(app, "#table-status"), what=f"filter {where}")


async def ask(pilot, app, button: str) -> str:
    """Click a bulk button and wait for its question; returns the question's text."""
    await pilot.click(button)
    await wait_for(pilot, lambda: isinstance(app.screen, Confirm), what="the confirmation")
    return text_of(app, "#confirm-question")


def test_bulk_edits_ask_with_the_count_and_no_changes_nothing(synthetic_catalog):
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="captions")
        async with app.run_test(size=SIZE) as pilot:
            screen, *_ = await captions_loaded(app, pilot)
            pngs = query_count(app, "SELECT count(*) FROM images WHERE format = 'PNG'")
            await apply_filter(pilot, app, "format = 'PNG'", pngs)
            before = captions(app)

            screen.query_one("#token").value = "sks"
            question = await ask(pilot, app, "#bulk-add")
            assert "add token 'sks'" in question and f"{pngs} captions" in question and "format = 'PNG'" in question
            await pilot.press("n")
            await wait_for(pilot, lambda: app.screen is screen, what="back from the question")
            question = await ask(pilot, app, "#bulk-add")
            await pilot.press("escape")
            await wait_for(pilot, lambda: app.screen is screen, what="back from the question")
            await pilot.pause(0.5)  # a write, had one started, would have landed by now
            assert captions(app) == before
            assert query_count(app, "SELECT count(*) FROM captions WHERE source = 'manual'") == 0
            assert screen.query_one("#bulk-undo").disabled

            await ask(pilot, app, "#bulk-add")
            await pilot.press("y")
            await wait_for(pilot, lambda: query_count(app, "SELECT count(*) FROM captions WHERE source = 'manual' AND text LIKE 'sks, %'") == pngs, what="bulk add")
            await wait_for(pilot, lambda: notified(app, f"{pngs} captions changed"), what="toast")

            # find/replace asks too, with the number of captions that hold the text
            lakes = query_count(app, "SELECT count(*) FROM current_captions JOIN images USING (image_id) "
                                     "WHERE format = 'PNG' AND caption LIKE '%mountain lake%'")
            assert 0 < lakes < pngs
            screen.query_one("#find").value = "mountain lake"
            screen.query_one("#replace").value = "alpine tarn"
            question = await ask(pilot, app, "#bulk-replace")
            assert "replace 'mountain lake' with 'alpine tarn'" in question and f"{lakes} captions" in question
            await pilot.press("n")
            await wait_for(pilot, lambda: app.screen is screen)
            await pilot.pause(0.5)
            assert query_count(app, "SELECT count(*) FROM captions WHERE source = 'manual' AND text LIKE '%alpine tarn%'") == 0
            await ask(pilot, app, "#bulk-replace")
            await pilot.press("y")
            await wait_for(pilot, lambda: query_count(app, "SELECT count(*) FROM captions WHERE source = 'manual' AND text LIKE '%alpine tarn%'") == lakes, what="replace")

            # an edit that would change nothing says so and does not ask
            screen.query_one("#token").value = "not-there"
            await pilot.click("#bulk-remove")
            await wait_for(pilot, lambda: notified(app, "0 captions changed"), what="no-op")
            assert app.screen is screen

    asyncio.run(scenario())


def test_bulk_edit_refuses_a_filter_typed_but_not_applied(synthetic_catalog):
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="captions")
        async with app.run_test(size=SIZE) as pilot:
            screen, *_ = await captions_loaded(app, pilot)
            pngs = query_count(app, "SELECT count(*) FROM images WHERE format = 'PNG'")
            grays = query_count(app, "SELECT count(*) FROM images WHERE is_grayscale AND status = 'ok'")
            await apply_filter(pilot, app, "format = 'PNG'", pngs)
            before = captions(app)

            # typed, no Enter: the table still shows the PNGs
            screen.query_one("#captions-table #filter").value = "is_grayscale"
            screen.query_one("#token").value = "sks"
            await pilot.click("#bulk-add")
            await wait_for(pilot, lambda: notified(app, "press Enter"), what="refusal")
            await pilot.pause(0.5)
            assert app.screen is screen  # no question, no edit
            assert captions(app) == before

            await pilot.click("#captions-table #filter")
            await pilot.press("enter")
            await wait_for(pilot, lambda: "· SQL filter" in text_of(app, "#table-status")
                           and screen.query_one("#captions-table").result.filter.text == "is_grayscale", what="gray filter")
            question = await ask(pilot, app, "#bulk-add")
            assert f"{grays} captions" in question and "is_grayscale" in question
            await pilot.press("y")
            await wait_for(pilot, lambda: query_count(app, "SELECT count(*) FROM captions WHERE source = 'manual' AND text LIKE 'sks, %'") == grays, what="bulk add")
            assert query_count(app, "SELECT count(*) FROM current_captions c JOIN images i USING (image_id) "
                                    "WHERE NOT i.is_grayscale AND c.caption LIKE 'sks%' AND c.caption_source <> 'duplicate'") == 0

    asyncio.run(scenario())


def test_undo_of_a_bulk_edit_keeps_a_caption_saved_after_it(synthetic_catalog):
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="captions")
        async with app.run_test(size=SIZE) as pilot:
            screen, _, _, editor = await captions_loaded(app, pilot)
            pngs = query_count(app, "SELECT count(*) FROM images WHERE format = 'PNG'")
            await apply_filter(pilot, app, "format = 'PNG'", pngs)
            before = captions(app)
            screen.query_one("#token").value = "sks"
            await ask(pilot, app, "#bulk-add")
            await pilot.press("y")
            await wait_for(pilot, lambda: query_count(app, "SELECT count(*) FROM captions WHERE source = 'manual' AND text LIKE 'sks, %'") == pngs, what="bulk add")
            await wait_for(pilot, lambda: not screen.query_one("#bulk-undo").disabled, what="undo offered")

            # a manual edit of one of the PNGs after the bulk edit
            target = app.con.execute("SELECT image_id FROM images WHERE format = 'PNG' ORDER BY image_id LIMIT 1").fetchone()[0]
            await apply_filter(pilot, app, f"image_id = '{target}'", 1)
            await wait_for(pilot, lambda: screen.image_id == target and editor.text.startswith("sks, "), what="the image in the editor")
            editor.load_text("my own caption")
            await focus_on(pilot, editor)
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: manual_caption(app, target) == "my own caption", what="save")

            await pilot.press("f8")
            await wait_for(pilot, lambda: notified(app, "1 image left alone"), what="undo toast")
            after = captions(app)
            assert after[target] == "my own caption"
            assert {k: v for k, v in after.items() if k != target} == {k: v for k, v in before.items() if k != target}
            assert query_count(app, "SELECT count(*) FROM captions WHERE source = 'manual'") == 1
            toast = next(str(n.message) for n in app._notifications if "left alone" in str(n.message))
            assert f"on {pngs - 1} images" in toast and "edited after the bulk edit" in toast, toast
            await wait_for(pilot, lambda: screen.query_one("#bulk-undo").disabled, what="nothing left to undo")

    asyncio.run(scenario())


def test_undo_bulk_restores_only_captions_still_as_the_edit_wrote_them(synthetic_catalog):
    con = connect(synthetic_catalog)
    try:
        ids = [r[0] for r in con.execute("SELECT image_id FROM images WHERE status = 'ok' ORDER BY image_id LIMIT 6").fetchall()]
        saved_before, untouched, saved_after, accepted, rejected, same_text = ids
        caption_edits.save_manual_caption(con, saved_before, "an older manual caption")
        before = dict(con.execute("SELECT image_id, caption FROM current_captions").fetchall())

        undo = caption_edits.bulk_edit(con, ids, add_token="sks")
        assert undo.changed == 6
        caption_edits.save_manual_caption(con, saved_after, "written by hand after the bulk edit")
        caption_edits.choose_caption(con, accepted, "model:blip")
        caption_edits.reject_caption(con, rejected, "manual")
        written = con.execute("SELECT text FROM captions WHERE image_id = ? AND source = 'manual'", [same_text]).fetchone()[0]
        caption_edits.save_manual_caption(con, same_text, written)  # saved again unchanged: still the edit's text

        outcome = caption_edits.undo_bulk(con, undo)
        after = dict(con.execute("SELECT image_id, caption FROM current_captions").fetchall())
        for image_id in (saved_before, untouched, same_text):
            assert after[image_id] == before[image_id]
        assert after[saved_after] == "written by hand after the bulk edit"
        assert con.execute("SELECT caption_source FROM current_captions WHERE image_id = ?", [accepted]).fetchone()[0] == "model:blip"
        assert con.execute("SELECT count(*) FROM captions WHERE image_id = ? AND source = 'manual'", [rejected]).fetchone()[0] == 0
        assert con.execute("SELECT text FROM captions WHERE image_id = ? AND source = 'manual'", [saved_before]).fetchone()[0] == "an older manual caption"
        assert (outcome.restored, outcome.skipped) == (3, 3)
    finally:
        con.close()


def test_preview_bulk_edit_counts_what_the_edit_changes(synthetic_catalog):
    con = connect(synthetic_catalog)
    try:
        ids = [r[0] for r in con.execute("SELECT image_id FROM images WHERE status = 'ok' ORDER BY image_id LIMIT 20").fetchall()]
        caption_edits.bulk_edit(con, ids[:5], add_token="sks")
        before = dict(con.execute("SELECT image_id, caption FROM current_captions").fetchall())
        assert counted(caption_edits.preview_bulk_edit(con, ids, add_token="sks")) == ("add token 'sks'", 15)  # 5 have it already
        assert dict(con.execute("SELECT image_id, caption FROM current_captions").fetchall()) == before  # a dry run
        lakes = con.execute("SELECT count(*) FROM current_captions WHERE image_id IN (SELECT unnest(?)) AND caption LIKE '%mountain lake%'", [ids]).fetchone()[0]
        assert counted(caption_edits.preview_bulk_edit(con, ids, find="mountain lake", replace="tarn")) == ("replace 'mountain lake' with 'tarn'", lakes)
        assert caption_edits.bulk_edit(con, ids, add_token="sks").changed == 15
    finally:
        con.close()


def test_bulk_edit_writes_each_images_own_sidecar_and_undo_puts_the_files_back(con, tmp_path):
    """Before, a bulk edit with "write sidecar .txt" made chelsea.txt beside chelsea.caption, and F8 left the .txt
    files it had created (holding the model's caption, which the next ingest read as the person's)."""
    from PIL import Image

    from pipelines.ingest import ingested_images

    for i, name in enumerate(("plain", "captioned", "latin")):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(tmp_path / f"{name}.png")
    (tmp_path / "captioned.caption").write_text("a dog on a sofa\n", encoding="utf-8")
    latin = "un chien sur le canapé\n".encode("latin-1")  # not UTF-8: ingest leaves it out, and so does the edit
    (tmp_path / "latin.txt").write_bytes(latin)
    ingested_images(con, [tmp_path], workers=1)
    ids = dict(con.execute("SELECT regexp_extract(path, '(\\w+)\\.png', 1), image_id FROM paths").fetchall())
    for name in ("plain", "latin"):
        con.execute("INSERT INTO captions (image_id, source, text) VALUES (?, 'model:tiny', 'a model caption')", [ids[name]])

    # the user's only copy of a caption ingest could not read is not written over (a review: it was), and named
    with pytest.raises(caption_edits.SidecarsNotWritten, match="latin.txt: a caption file ingest cannot read"):
        caption_edits.bulk_edit(con, list(ids.values()), add_token="sks", sidecars=True)
    undo = caption_edits.last_bulk_edit(con)
    assert undo.changed == 3
    assert (tmp_path / "plain.txt").read_text() == "sks, a model caption\n"
    assert (tmp_path / "captioned.caption").read_text() == "sks, a dog on a sofa\n"
    assert not (tmp_path / "captioned.txt").exists()
    assert (tmp_path / "latin.txt").read_bytes() == latin
    undo_again = caption_edits.bulk_edit(con, [ids["plain"]], add_token="zwx", sidecars=True)
    assert (tmp_path / "plain.txt").read_text() == "zwx, sks, a model caption\n"

    caption_edits.undo_bulk(con, undo_again)  # the file the first edit created holds its text again
    assert (tmp_path / "plain.txt").read_text() == "sks, a model caption\n"
    (tmp_path / "captioned.caption").write_text("edited by hand since\n")  # a later edit of a file stays
    outcome = caption_edits.undo_bulk(con, undo)
    assert outcome.restored == 3
    assert not (tmp_path / "plain.txt").exists()
    assert (tmp_path / "captioned.caption").read_text() == "edited by hand since\n"
    assert (tmp_path / "latin.txt").read_bytes() == latin


def test_token_edits_change_only_the_captions_that_hold_the_tags(synthetic_catalog):
    """Removing a tag no caption had rewrote captions (normalised) and said so; adding "sks, woman" twice gave
    "sks, woman, sks, woman, …" (a token with a comma was never found); a line break joined two tags into one."""
    con = connect(synthetic_catalog)
    try:
        ids = [r[0] for r in con.execute("SELECT image_id FROM images WHERE status = 'ok' ORDER BY image_id LIMIT 4").fetchall()]
        texts = ["1girl,red hair,smile", "1girl,  red hair , smile,", "1girl, smile\nsecond line, extra", "sks, 1girl"]
        for image_id, text in zip(ids, texts):
            caption_edits.save_manual_caption(con, image_id, text)

        def captions():
            return [con.execute("SELECT caption FROM current_captions WHERE image_id = ?", [i]).fetchone()[0] for i in ids]

        assert counted(caption_edits.preview_bulk_edit(con, ids, remove_token="hat")) == ("remove token 'hat'", 0)
        assert caption_edits.bulk_edit(con, ids, add_token="sks, woman").changed == 4
        # the tags go first, in the order given (sks was first already in the last one: woman goes after it, not
        # before); the captions they change are written as tags, ", " apart
        assert captions() == ["sks, woman, 1girl, red hair, smile", "sks, woman, 1girl, red hair, smile",
                              "sks, woman, 1girl, smile, second line, extra", "sks, woman, 1girl"]
        assert caption_edits.bulk_edit(con, ids, add_token="sks, woman").changed == 0  # all there now
        assert caption_edits.bulk_edit(con, ids, remove_token="smile").changed == 3
        assert captions() == ["sks, woman, 1girl, red hair", "sks, woman, 1girl, red hair",
                              "sks, woman, 1girl, second line, extra", "sks, woman, 1girl"]
    finally:
        con.close()


def test_regex_box_makes_find_a_regular_expression_and_a_bad_one_is_said(synthetic_catalog):
    async def scenario(size, before, after):
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="captions")
        async with app.run_test(size=size) as pilot:
            screen, *_ = await captions_loaded(app, pilot)
            box = screen.query_one("#regex")
            # the box is on screen and clear of its neighbours, in the wide and the narrow layout
            regions = {name: screen.query_one(name).region for name in ("#find", "#replace", "#regex", "#bulk-replace")}
            assert all(r.width > 0 and r.height > 0 for r in regions.values()), regions
            assert not any(a.overlaps(b) for i, a in enumerate(regions.values()) for b in list(regions.values())[i + 1:]), regions
            pngs = query_count(app, "SELECT count(*) FROM images WHERE format = 'PNG'")
            await apply_filter(pilot, app, "format = 'PNG'", pngs)
            lakes = query_count(app, "SELECT count(*) FROM current_captions JOIN images USING (image_id) "
                                     f"WHERE format = 'PNG' AND regexp_matches(caption, '{before} (lake|view)')")
            assert lakes > 0
            screen.query_one("#find").value = f"{before} (lake|view)"
            screen.query_one("#replace").value = after + r" \1"
            await pilot.click("#bulk-replace")  # unticked: the text is literal, and no caption holds it
            await wait_for(pilot, lambda: notified(app, "0 captions changed"), what="the literal find")
            assert app.screen is screen
            app.clear_notifications()  # at 80x24 the toast sits over the button: gone before the click
            await pilot.pause(0.5)
            box.value = True
            question = await ask(pilot, app, "#bulk-replace")
            assert f"replace /{before} (lake|view)/" in question and f"{lakes} caption" in question, question
            await pilot.press("y")
            await wait_for(pilot, lambda: query_count(
                app, f"SELECT count(*) FROM captions WHERE source = 'manual' AND regexp_matches(text, '{after} (lake|view)')") == lakes,
                what="regex replace")
            screen.query_one("#find").value = "mountain ("
            await pilot.click("#bulk-replace")
            await wait_for(pilot, lambda: notified(app, "Not a regular expression"), what="the refusal")
            assert app.screen is screen

    asyncio.run(scenario(SIZE, "mountain", "alpine"))
    asyncio.run(scenario((80, 24), "alpine", "mountain"))  # the narrow layout, on what the first one wrote


def test_ctrl_a_in_a_bulk_box_is_line_start_not_accept(synthetic_catalog):
    """A TUI review: ctrl+a typed in the trigger-token box accepted the selected caption source, silently."""
    async def scenario():
        app = WorkbenchApp(catalog_path=synthetic_catalog, start="captions")
        async with app.run_test(size=SIZE) as pilot:
            screen, *_ = await captions_loaded(app, pilot)
            await wait_for(pilot, lambda: len(screen.query_one("#sources").options) > 0, what="sources")
            before = app.con.execute("SELECT count(*) FROM caption_choice").fetchall()[0][0]
            token = screen.query_one("#token")
            await pilot.click("#token")
            await pilot.press(*"abc", "ctrl+a")
            await pilot.pause(0.5)
            assert token.cursor_position == 0 and token.value == "abc"
            assert app.con.execute("SELECT count(*) FROM caption_choice").fetchall()[0][0] == before
            assert not notified(app, "using the")

    asyncio.run(scenario())


def test_an_edit_writes_the_sidecar_the_caption_came_from_not_a_new_one_beside_a_copy(con, tmp_path):
    """A TUI review: the rocket photo is also at copies/rocket_copy.jpg (ingested first); its caption came from
    photos/rocket.txt, but a save wrote a new copies/rocket_copy.txt, and photos/rocket.txt (what a kohya run over
    photos/ reads) kept the old caption."""
    from PIL import Image

    from pipelines.ingest import ingested_images

    (tmp_path / "copies").mkdir()
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (64, 64), (10, 90, 200)).save(tmp_path / "photos" / "rocket.png")
    (tmp_path / "copies" / "rocket_copy.png").write_bytes((tmp_path / "photos" / "rocket.png").read_bytes())
    (tmp_path / "photos" / "rocket.txt").write_text("a rocket\n", encoding="utf-8")
    ingested_images(con, [tmp_path / "copies"], workers=1)  # the copy's path is the image's first
    ingested_images(con, [tmp_path / "photos"], workers=1)
    (image_id,) = con.execute("SELECT DISTINCT image_id FROM paths").fetchone()
    assert con.execute("SELECT caption FROM images_view").fetchone()[0] == "a rocket"
    caption_edits.bulk_edit(con, [image_id], add_token="sks", sidecars=True)
    assert (tmp_path / "photos" / "rocket.txt").read_text() == "sks, a rocket\n"
    assert not (tmp_path / "copies" / "rocket_copy.txt").exists()


def test_an_edit_stopped_while_it_writes_sidecars_is_finished_by_a_rerun_or_put_back_by_undo(con, tmp_path, monkeypatch):
    """A reliability review: Ctrl+C or kill -9 while an edit wrote its sidecar files left files edited that neither a
    rerun ("changed 0") nor --undo (the files were recorded only after all were written) knew of."""
    from PIL import Image

    from pipelines.ingest import ingested_images

    for i in range(4):
        Image.new("RGB", (32, 32), (50 * i, 9, 9)).save(tmp_path / f"img{i}.png")
        (tmp_path / f"img{i}.txt").write_text(f"photo {i}\n", encoding="utf-8")
    ingested_images(con, [tmp_path], workers=1)
    ids = [row[0] for row in con.execute("SELECT image_id FROM images_view ORDER BY path").fetchall()]
    real, calls = caption_edits._write_own_file, []

    def stop_after_two(path, data):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process stopped here: nothing after this line of bulk_edit ran
        calls.append(path)
        real(path, data)

    monkeypatch.setattr(caption_edits, "_write_own_file", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        caption_edits.bulk_edit(con, ids, add_token="sks", sidecars=True)
    monkeypatch.setattr(caption_edits, "_write_own_file", real)
    texts = sorted(p.read_text() for p in tmp_path.glob("*.txt"))
    assert sum(t.startswith("sks, ") for t in texts) == 2  # two of four written when it stopped
    # undo: the catalog's captions and the two files written are put back, the other two were never changed
    outcome = caption_edits.undo_bulk(con, caption_edits.last_bulk_edit(con))
    assert outcome.sidecars_left == 0
    assert sorted(p.read_text() for p in tmp_path.glob("*.txt")) == [f"photo {i}\n" for i in range(4)]
    # the same stop, then the same edit again: it writes the files the stopped one had left
    calls.clear()
    monkeypatch.setattr(caption_edits, "_write_own_file", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        caption_edits.bulk_edit(con, ids, add_token="sks", sidecars=True)
    monkeypatch.setattr(caption_edits, "_write_own_file", real)
    again = caption_edits.bulk_edit(con, ids, add_token="sks", sidecars=True)
    assert again.changed == 0
    assert sorted(p.read_text() for p in tmp_path.glob("*.txt")) == [f"sks, photo {i}\n" for i in range(4)]
