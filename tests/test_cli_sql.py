"""`workbench sql`: read-only by default, machine-readable formats, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
from typer.testing import CliRunner

from workbench.cli import app

runner = CliRunner()


def seeded_catalog(path):
    from workbench.catalog import connect

    con = connect(path)
    con.execute("INSERT INTO images (image_id, status, width, height) VALUES ('a', 'ok', 10, 20), ('b', 'error', NULL, NULL)")
    con.execute("INSERT INTO paths (path, path_bytes, image_id, seq) VALUES ('/p/a.jpg', '/p/a.jpg'::BLOB, 'a', 1), ('/p/b.jpg', '/p/b.jpg'::BLOB, 'b', 2)")
    con.close()


def test_json_is_an_array_of_row_objects(catalog_path):
    seeded_catalog(catalog_path)
    result = runner.invoke(app, ["sql", "SELECT image_id, width, paths FROM images_view ORDER BY image_id", "--format", "json", "--catalog", str(catalog_path)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert rows == [{"image_id": "a", "width": 10, "paths": ["/p/a.jpg"]}, {"image_id": "b", "width": None, "paths": ["/p/b.jpg"]}]


def test_csv_and_parquet(catalog_path, tmp_path):
    seeded_catalog(catalog_path)
    result = runner.invoke(app, ["sql", "SELECT image_id, status FROM images_view ORDER BY 1", "-f", "csv", "-c", str(catalog_path)])
    assert result.stdout.splitlines() == ["image_id,status", "a,ok", "b,error"]
    assert "\r" not in result.stdout  # Unix line endings, as DuckDB's own COPY writes
    out = tmp_path / "rows.parquet"
    result = runner.invoke(app, ["sql", "SELECT * FROM dataset", "-f", "parquet", "-o", str(out), "-c", str(catalog_path)])
    assert result.exit_code == 0, result.output
    assert pl.read_parquet(out)["image_id"].to_list() == ["a"]


def test_output_takes_its_format_from_the_name_and_never_overwrites_silently(catalog_path, tmp_path):
    seeded_catalog(catalog_path)
    query = ["sql", "SELECT image_id FROM images ORDER BY 1", "-c", str(catalog_path)]
    out = tmp_path / "ids.csv"
    first = runner.invoke(app, [*query, "-o", str(out)])
    assert first.exit_code == 0, first.output
    assert out.read_text().splitlines() == ["image_id", "a", "b"]
    out.write_text("my notes")
    again = runner.invoke(app, [*query, "-o", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output and "--overwrite" in again.output
    assert out.read_text() == "my notes"
    replaced = runner.invoke(app, [*query, "-o", str(out), "--overwrite"])
    assert replaced.exit_code == 0 and out.read_text().splitlines()[0] == "image_id"
    as_json = runner.invoke(app, [*query, "-o", str(tmp_path / "ids.json")])
    assert as_json.exit_code == 0 and json.loads((tmp_path / "ids.json").read_text()) == [{"image_id": "a"}, {"image_id": "b"}]
    unknown = runner.invoke(app, [*query, "-o", str(tmp_path / "ids.txt")])
    assert unknown.exit_code == 2 and "Cannot tell the format" in " ".join(unknown.output.split())
    table = runner.invoke(app, [*query, "-f", "table", "-o", str(tmp_path / "t.csv")])
    assert table.exit_code == 2 and not (tmp_path / "t.csv").exists()
    nowhere = runner.invoke(app, [*query, "-o", str(tmp_path / "missing" / "ids.csv")])
    assert nowhere.exit_code == 2 and "does not exist" in " ".join(nowhere.output.split())
    # a name and a --format that disagree: it wrote JSON into ds.csv
    mixed = runner.invoke(app, [*query, "-f", "json", "-o", str(tmp_path / "ds.csv")])
    assert mixed.exit_code == 2 and "names csv but --format is json" in " ".join(mixed.output.split())
    assert not (tmp_path / "ds.csv").exists()
    # `-o -` is stdout, as the usual tools read it (it wrote a file named "-"); a file ends with a line break too
    dash = runner.invoke(app, [*query, "-o", "-", "-f", "csv"])
    assert dash.exit_code == 0 and dash.stdout.splitlines() == ["image_id", "a", "b"] and not Path("-").exists()
    assert runner.invoke(app, [*query, "-o", "-"]).exit_code == 2
    assert (tmp_path / "ids.json").read_text().endswith("]\n")


def test_errors_while_rows_are_computed_are_messages_and_json_stays_json(catalog_path, tmp_path):
    seeded_catalog(catalog_path)
    for extra in ([], ["-f", "json"], ["-o", str(tmp_path / "x.csv")], ["-o", str(tmp_path / "x.parquet")]):
        result = runner.invoke(app, ["sql", "SELECT CAST(path AS INTEGER) FROM paths", "-c", str(catalog_path), *extra])
        assert result.exit_code == 2 and "SQL error" in result.output and "Traceback" not in result.output, extra
    infinite = runner.invoke(app, ["sql", "SELECT 1 / 0 AS x, 0.5::DOUBLE AS y", "-f", "json", "-c", str(catalog_path)])
    assert json.loads(infinite.stdout) == [{"x": None, "y": 0.5}]
    folder = runner.invoke(app, ["sql", "SELECT 1", "-o", str(tmp_path), "-c", str(catalog_path)])
    assert folder.exit_code == 2 and "is a folder" in " ".join(folder.output.split())


def test_writes_are_refused_without_write(catalog_path):
    seeded_catalog(catalog_path)
    result = runner.invoke(app, ["sql", "DELETE FROM images", "-c", str(catalog_path)])
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "read-only by default" in message and "--write" in message
    count = runner.invoke(app, ["sql", "SELECT count(*) AS n FROM images", "-f", "json", "-c", str(catalog_path)])
    assert json.loads(count.stdout) == [{"n": 2}]
    result = runner.invoke(app, ["sql", "UPDATE images SET status = 'error' WHERE image_id = 'b'", "--write", "-c", str(catalog_path)])
    assert result.exit_code == 0, result.output
    count = runner.invoke(app, ["sql", "SELECT count(*) AS n FROM images WHERE status = 'ok'", "-f", "json", "-c", str(catalog_path)])
    assert json.loads(count.stdout) == [{"n": 1}]


def test_write_refuses_to_edit_the_schema_record_or_delete_the_file_record(catalog_path):
    """A SQL user's review: `DELETE FROM schema_migrations … --write` made every later command fail on a migration run
    again, with a traceback; a deleted `images` row (or TRUNCATE) was lost for good, since ingest read its path as
    unchanged."""
    seeded_catalog(catalog_path)
    for sql in ("DELETE FROM schema_migrations WHERE version = 22", "INSERT INTO schema_views VALUES (1, 'x')",
                "UPDATE \"schema_migrations\" SET version = 0"):
        refused = runner.invoke(app, ["sql", sql, "--write", "-c", str(catalog_path)])
        assert refused.exit_code == 2 and "where the catalog records its own schema" in " ".join(refused.output.split()), sql
    for sql in ("DELETE FROM images WHERE image_id = 'b'", "delete from main.images", 'TRUNCATE "paths"',
                "TRUNCATE TABLE images", "CREATE TABLE mine (a INT); DELETE FROM images",
                "WITH gone AS (DELETE FROM paths RETURNING *) SELECT count(*) FROM gone"):
        refused = runner.invoke(app, ["sql", sql, "--write", "-c", str(catalog_path)])
        assert refused.exit_code == 2 and "record of your image files" in refused.output and "Exclude images instead" in " ".join(refused.output.split()), sql
    kept = runner.invoke(app, ["sql", "SELECT (SELECT count(*) FROM images) AS i, (SELECT count(*) FROM paths) AS p, "
                                      "(SELECT count(*) FROM schema_migrations) AS m, "
                                      "(SELECT count(*) FROM information_schema.tables WHERE table_name = 'mine') AS mine",
                               "-f", "json", "-c", str(catalog_path)])
    found = json.loads(kept.stdout)[0]
    assert found["i"] == 2 and found["p"] >= 2 and found["m"] == len(list((Path(__file__).resolve().parents[1] / "workbench" / "migrations").glob("m0*.sql"))) and found["mine"] == 0
    # what stays allowed: reading them, and deleting rows of other tables (a regression hunt found these refused: a
    # column named delete, a copy of the schema record, a column named after it)
    assert runner.invoke(app, ["sql", "SELECT * FROM schema_migrations", "-c", str(catalog_path)]).exit_code == 0
    for sql in ("DELETE FROM exclusions WHERE image_id = 'b'", "CREATE TABLE review AS SELECT image_id, false AS delete FROM images",
                "CREATE TABLE mig_backup AS SELECT * FROM schema_migrations", "CREATE TABLE t3 (schema_views INT)",
                "INSERT INTO exclusions (image_id, step, reason) SELECT image_id, 'manual', 'x' FROM images "
                "WHERE false AND (SELECT count(*) FROM schema_migrations) > 0", "DELETE FROM images_backup WHERE false"):
        if "images_backup" in sql:
            runner.invoke(app, ["sql", "CREATE TABLE images_backup AS SELECT * FROM images", "--write", "-c", str(catalog_path)])
        allowed = runner.invoke(app, ["sql", sql, "--write", "-c", str(catalog_path)])
        assert allowed.exit_code == 0, (sql, allowed.output)


def test_a_catalog_whose_schema_record_lost_rows_is_said_not_a_traceback(catalog_path):
    """Edited in another DuckDB client, schema_migrations that lost a row made the next command run that migration
    again and fail with a traceback."""
    import duckdb

    seeded_catalog(catalog_path)
    with duckdb.connect(str(catalog_path)) as raw:
        raw.execute("DELETE FROM schema_migrations WHERE version = (SELECT max(version) FROM schema_migrations)")
    result = runner.invoke(app, ["dedup", "-c", str(catalog_path)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "could not be brought up to date" in text and "schema_migrations" in text, result.output
    assert "Traceback" not in result.output


def test_looking_pragmas_run_and_a_refusal_names_only_what_writes(catalog_path):
    """`PRAGMA table_info(...)` was refused as a write, and `SELECT 1; DELETE ...` was refused as "(DELETE, SELECT)"."""
    seeded_catalog(catalog_path)
    columns = runner.invoke(app, ["sql", "PRAGMA table_info('images')", "-f", "json", "-c", str(catalog_path)])
    assert columns.exit_code == 0 and {"name": "image_id"}.items() <= json.loads(columns.stdout)[0].items(), columns.output
    mixed = runner.invoke(app, ["sql", "SELECT 1; DELETE FROM images", "-c", str(catalog_path)])
    assert mixed.exit_code == 2 and "(DELETE)" in mixed.output
    for writing in ("PRAGMA enable_profiling", "CALL pragma_version()", "SET threads = 1"):
        assert runner.invoke(app, ["sql", writing, "-c", str(catalog_path)]).exit_code == 2


def test_sql_errors_are_messages_not_tracebacks(catalog_path):
    seeded_catalog(catalog_path)
    result = runner.invoke(app, ["sql", "SELECT nope FROM images", "-c", str(catalog_path)])
    assert result.exit_code == 2 and "SQL error" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["sql", "SELECT 1", "-c", str(catalog_path.parent / "absent.duckdb")])
    assert result.exit_code == 2 and "No catalog" in result.output
    result = runner.invoke(app, ["sql", " ; ", "-c", str(catalog_path)])
    assert result.exit_code == 2 and "the query is empty" in result.output  # not "refused: it writes"


def test_catalog_from_environment(catalog_path, monkeypatch):
    seeded_catalog(catalog_path)
    monkeypatch.setenv("WORKBENCH_CATALOG", str(catalog_path))
    result = runner.invoke(app, ["sql", "SELECT count(*) AS n FROM dataset", "-f", "json"])
    assert json.loads(result.stdout) == [{"n": 1}]


def test_catalog_given_before_the_command(catalog_path, tmp_path, monkeypatch):
    """`workbench --catalog X sql …` uses X, over $WORKBENCH_CATALOG; the command's own --catalog still wins."""
    seeded_catalog(catalog_path)
    other = tmp_path / "other.duckdb"
    seeded_catalog(other)
    from workbench.catalog import connect

    con = connect(other)
    con.execute("DELETE FROM paths WHERE image_id = 'a'")
    con.execute("DELETE FROM images WHERE image_id = 'a'")
    con.close()
    query = ["sql", "SELECT count(*) AS n FROM images", "-f", "json"]
    assert json.loads(runner.invoke(app, ["--catalog", str(catalog_path), *query]).stdout) == [{"n": 2}]
    monkeypatch.setenv("WORKBENCH_CATALOG", str(other))
    assert json.loads(runner.invoke(app, [*query]).stdout) == [{"n": 1}]
    assert json.loads(runner.invoke(app, ["--catalog", str(catalog_path), *query]).stdout) == [{"n": 2}]
    assert json.loads(runner.invoke(app, ["--catalog", str(catalog_path), *query, "--catalog", str(other)]).stdout) == [{"n": 1}]
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(images / "red.png")
    fresh = tmp_path / "fresh.duckdb"
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(app, ["--catalog", str(fresh), "ingest", str(images), "--workers", "1"]).exit_code == 0
    assert fresh.is_file() and not (tmp_path / "workbench.duckdb").exists()


def test_ingest_cli_summary_and_usage_errors(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(folder / "a.png")
    (folder / "b.jpg").write_bytes(b"")
    catalog_path = tmp_path / "c.duckdb"
    result = runner.invoke(app, ["ingest", str(folder), "-c", str(catalog_path), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "empty file" in result.output and "files seen" in result.output
    result = runner.invoke(app, ["ingest", str(tmp_path / "nope"), "-c", str(catalog_path)])
    assert result.exit_code == 2 and "No such file or folder" in result.output


def test_every_command_help_has_an_example():
    import typer.main

    def walk(command, prefix):
        yield prefix, command  # groups too: `workbench concept --help` is where people look first
        for name, sub in getattr(command, "commands", {}).items():  # duck-typed: typer vendors its own click
            yield from walk(sub, prefix + [name])

    found = list(walk(typer.main.get_command(app), []))
    assert {"ingest", "train lora", "concept add", "models list"} <= {" ".join(path) for path, _ in found}
    for path, _ in found:
        result = runner.invoke(app, path + ["--help"])
        assert result.exit_code == 0, path
        assert "Example" in result.output, f"`workbench {' '.join(path)} --help` has no example"


def test_commands_other_than_ingest_never_create_a_catalog(tmp_path):
    typo = tmp_path / "wrokbench.duckdb"
    for command in (["dedup"], ["filter", "--dry-run"], ["buckets"], ["concept", "list"]):
        result = runner.invoke(app, command + ["--catalog", str(typo)])
        assert result.exit_code == 2, (command, result.output)
        assert "No catalog at" in " ".join(result.output.split())
    assert not typo.exists()


def test_text_from_the_catalog_is_shown_as_it_is_never_as_markup(catalog_path, tmp_path):
    """Captions, triggers and paths hold '[' and ':x:': they print as typed (before: '[/]' crashed the command,
    '[sks]' vanished and ':x:' became an emoji)."""
    seeded_catalog(catalog_path)
    shown = runner.invoke(app, ["sql", "SELECT 'photo of [sks] dog :x:' AS caption, '[/]' AS odd", "--catalog", str(catalog_path)],
                          env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "photo of [sks] dog :x:" in shown.output and "[/]" in shown.output
    added = runner.invoke(app, ["concept", "add", "x [/]", "--trigger", "[sks]", "--where", "false", "--catalog", str(catalog_path)],
                          env={"COLUMNS": "200"})
    assert added.exit_code == 0, added.output
    listed = runner.invoke(app, ["concept", "list", "--catalog", str(catalog_path)], env={"COLUMNS": "200"})
    assert listed.exit_code == 0 and "x [/]" in listed.output and "[sks]" in listed.output, listed.output
    missing = runner.invoke(app, ["ingest", str(tmp_path / "[raw] photos"), "--catalog", str(catalog_path)], env={"COLUMNS": "300"})
    assert missing.exit_code != 0 and "[raw] photos" in missing.output, missing.output


def test_several_statements_run_in_order_and_the_last_one_is_shown(catalog_path):
    seeded_catalog(catalog_path)
    result = runner.invoke(app, ["sql", "SELECT 1 AS a; SELECT 2 AS b", "--catalog", str(catalog_path), "-f", "csv"])
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == ["b", "2"]
    assert "2 statements ran; the result below is the last one's" in result.stderr  # not silently the last only


def test_progress_messages_print_as_plain_text():
    from io import StringIO

    from rich.console import Console

    from workbench.progress import RichProgress

    out = StringIO()
    with RichProgress(console=Console(file=out, width=200)) as progress:
        progress(task="export", message="skipped /data/[raw] photos/a[/]b.png: file no longer there")
    assert "/data/[raw] photos/a[/]b.png" in out.getvalue()


def test_progress_messages_do_not_end_with_the_source_line_that_logged_them(monkeypatch):
    """Every CLI log line ended with `progress.py:77`, rich's column for where it was logged from."""
    import io

    import rich.console

    from workbench.progress import RichProgress

    out = io.StringIO()
    made = rich.console.Console
    monkeypatch.setattr(rich.console, "Console", lambda **options: made(**{**options, "file": out, "width": 200}))
    with RichProgress() as progress:
        progress(task="ingest", message="scanning 1 path(s)")
    assert "scanning 1 path(s)" in out.getvalue() and "progress.py" not in out.getvalue()


def test_a_stopped_step_shows_its_last_update_before_it_stops():
    """Ctrl+C in training froze the bar at 20/200 while the run kept (and named) checkpoint-21: the cancel raised
    before the update that said step 21 was done reached the bar."""
    import pytest

    from workbench.progress import CancellableProgress, StepCancelled

    seen = []
    progress = CancellableProgress(lambda **update: seen.append(update["completed"]))
    progress(task="train", completed=20, total=200)
    progress.cancel()
    with pytest.raises(StepCancelled):
        progress(task="train", completed=21, total=200)
    assert seen == [20, 21]


def test_help_has_h_and_the_version_is_shown():
    from workbench import __version__

    assert runner.invoke(app, ["-h"]).exit_code == 0 and "Usage" in runner.invoke(app, ["-h"]).output
    assert "workbench ingest" in " ".join(runner.invoke(app, ["ingest", "-h"]).output.split())
    assert runner.invoke(app, ["train", "lora", "-h"]).exit_code == 0
    for flag in ("--version", "-V"):
        shown = runner.invoke(app, [flag])
        assert shown.exit_code == 0 and shown.output.strip() == f"workbench {__version__}"


def test_a_message_alone_neither_adds_a_bar_that_never_moves_nor_resets_a_running_one():
    """A training run's 'dataset' messages left a 'dataset 0/?' bar that never moved."""
    from io import StringIO

    from rich.console import Console

    from workbench.progress import RichProgress

    with RichProgress(console=Console(file=StringIO(), width=200, force_terminal=True)) as progress:  # bars: a terminal's
        progress(task="dataset", message="3 of 8 image(s) have no caption")
        progress(task="train", completed=5, total=10)
        progress(task="train", message="a note mid-run")
        bars = {task.description: task for task in progress._progress.tasks}
    assert "dataset" not in bars and bars["train"].completed == 5 and bars["train"].total == 10


def test_table_says_when_rows_are_left_out_and_json_columns_nest(catalog_path):
    seeded_catalog(catalog_path)
    cat = ["--catalog", str(catalog_path)]
    cut = runner.invoke(app, ["sql", "SELECT * FROM range(500)", "--limit", "10", *cat], env={"COLUMNS": "200"})
    assert cut.exit_code == 0 and "first 10 rows shown" in cut.output
    whole = runner.invoke(app, ["sql", "SELECT * FROM range(5)", "--limit", "10", *cat], env={"COLUMNS": "200"})
    assert "rows shown" not in whole.output
    assert runner.invoke(app, ["sql", "SELECT 1", "--limit", "-5", *cat]).exit_code == 2
    nested = runner.invoke(app, ["sql", """SELECT '{"new": 3, "paths": ["a"]}'::JSON AS counts, 'x' AS plain""", "-f", "json", *cat])
    assert json.loads(nested.stdout) == [{"counts": {"new": 3, "paths": ["a"]}, "plain": "x"}]
    same_name = runner.invoke(app, ["sql", """SELECT '123' AS info, '{"a": 1}'::JSON AS info""", "-f", "json", *cat])
    assert same_name.exit_code == 0, same_name.output  # matched by name, the JSON column's string went through json.loads
    assert json.loads(same_name.stdout) == [{"info": "123", "info_1": {"a": 1}}]


def test_keep_and_include_of_a_duplicate_say_the_command_that_brings_it_in(catalog_path):
    """`keep` said "its other copy is excluded as duplicates"; `include` of a duplicate said only "some images stay
    excluded by another step (e.g. dedup: choose them as keeper)", not the command (as `exclude` of a kept copy does)."""
    from pipelines.dedup import duplicate_groups
    from workbench.catalog import connect

    big, small, tiny = "b" * 64, "a" * 64, "c" * 64
    con = connect(catalog_path)
    for seq, (image_id, side) in enumerate(((big, 800), (small, 400), (tiny, 200)), 1):
        con.execute("INSERT INTO images (image_id, status, width, height, format, bytes) VALUES (?, 'ok', ?, ?, 'JPEG', 1000)",
                    [image_id, side, side])
        con.execute("INSERT INTO hashes VALUES (?, 7, 0, 0)", [image_id])
        con.execute("INSERT INTO paths (path, path_bytes, image_id, seq) VALUES (?, ?::BLOB, ?, ?)",
                    [f"/d/{image_id}", f"/d/{image_id}", image_id, seq])
    duplicate_groups(con)
    con.close()
    cat = ["--catalog", str(catalog_path)]
    included = runner.invoke(app, ["include", small[:8], *cat], env={"COLUMNS": "300"})
    assert included.exit_code == 0, included.output
    text = " ".join(included.output.split())
    assert f"{small[:12]} stays excluded as a duplicate of {big[:12]}; to keep it instead: workbench keep {small[:12]}" in text
    kept = runner.invoke(app, ["keep", small[:8], *cat], env={"COLUMNS": "300"})
    assert f"kept {small[:12]}; its 2 other copies are excluded as duplicates" in " ".join(kept.output.split())
    con = connect(catalog_path)
    con.execute("DELETE FROM paths WHERE image_id = ?", [tiny])  # a group of two
    con.close()
    runner.invoke(app, ["dedup", *cat])
    kept = runner.invoke(app, ["keep", small[:8], *cat], env={"COLUMNS": "300"})
    assert f"kept {small[:12]}; its other copy is excluded as a duplicate" in " ".join(kept.output.split())


def _an_image_the_catalog_reads(catalog_path, folder, name: str):
    """A seeded catalog whose image 'a' is also read from folder/NAME.jpg, with its caption file NAME.txt beside it:
    (image, caption file)."""
    from workbench.catalog import connect

    seeded_catalog(catalog_path)
    image = folder / f"{name}.jpg"
    image.write_bytes(b"the only copy")
    con = connect(catalog_path)
    con.execute("INSERT INTO paths (path, path_bytes, image_id, seq) VALUES (?, ?::BLOB, 'a', 3)", [str(image), str(image)])
    con.close()
    sidecar = folder / f"{name}.txt"  # its caption file, which ingest reads
    sidecar.write_text("a caption")
    return image, sidecar


def test_a_result_is_never_written_over_the_catalog_its_log_or_an_image_it_reads(catalog_path, tmp_path):
    image, sidecar = _an_image_the_catalog_reads(catalog_path, tmp_path, "photo")
    before = catalog_path.read_bytes()
    wal = catalog_path.with_name(catalog_path.name + ".wal")
    for target in (catalog_path, wal, image, sidecar):
        for fmt in ("csv", "json"):
            result = runner.invoke(app, ["sql", "SELECT 1 AS x", "-f", fmt, "-o", str(target), "--overwrite", "-c", str(catalog_path)])
            assert result.exit_code == 2 and "Refused" in result.output, (target, fmt, result.output)
    assert catalog_path.read_bytes() == before and not wal.exists() and image.read_bytes() == b"the only copy"
    assert sidecar.read_text() == "a caption"
    other = tmp_path / "photo.v2.txt"  # the caption file of no image the catalog reads
    assert runner.invoke(app, ["sql", "SELECT 1 AS x", "-f", "csv", "-o", str(other), "-c", str(catalog_path)]).exit_code == 0
    still = runner.invoke(app, ["sql", "SELECT count(*) AS n FROM images", "-f", "csv", "-c", str(catalog_path)])
    assert still.stdout.splitlines() == ["n", "2"]


def test_a_piped_table_keeps_each_row_on_one_line(catalog_path, monkeypatch):
    """Piped, the table wrapped every cell at 80 columns (a curator's review)."""
    monkeypatch.delenv("COLUMNS", raising=False)
    seeded_catalog(catalog_path)
    long = "a very long caption " * 12
    result = runner.invoke(app, ["sql", f"SELECT image_id, '{long.strip()}' AS caption FROM images ORDER BY 1", "-c", str(catalog_path)])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if "a very long caption" in line]
    assert len(rows) == 2 and all(long.strip() in line for line in rows)


def test_writes_typed_as_reads_are_refused_and_change_nothing(catalog_path, tmp_path):
    """`EXPLAIN ANALYZE` runs the statement it explains, and `WITH x AS (DELETE … RETURNING *) SELECT …` is typed
    SELECT: both passed the read-only check. On the TUI's read-write connection they deleted rows and dropped a table;
    through the CLI, `EXPLAIN ANALYZE COPY … TO` wrote over any file."""
    from workbench.catalog import CatalogError, connect, is_read_only_sql, run_sql

    seeded_catalog(catalog_path)
    leak = tmp_path / "leak.csv"
    writes = [
        "EXPLAIN ANALYZE DELETE FROM images",
        "explain (analyze) UPDATE images SET status = 'error'",
        "-- a comment first\nEXPLAIN ANALYZE DROP TABLE exclusions",
        "WITH gone AS (DELETE FROM images WHERE width IS NULL RETURNING *) SELECT count(*) FROM gone",
        "WITH added AS (INSERT INTO images (image_id, status) VALUES ('c', 'ok') RETURNING *) SELECT * FROM added",
        f"EXPLAIN ANALYZE COPY images TO '{leak}'",
        "SELECT 1; EXPLAIN ANALYZE DELETE FROM images",
    ]
    con = connect(catalog_path)  # read-write, as the TUI holds it
    for sql in writes:
        assert not is_read_only_sql(sql), sql
        try:
            run_sql(con, sql)
        except CatalogError as refused:
            assert "Refused" in str(refused), sql
        else:
            raise AssertionError(f"ran: {sql}")
    assert con.execute("SELECT image_id, status FROM images ORDER BY 1").fetchall() == [("a", "ok"), ("b", "error")]
    assert con.execute("SELECT count(*) FROM exclusions").fetchone() == (0,)
    con.close()
    for sql in writes:
        result = runner.invoke(app, ["sql", "-c", str(catalog_path), "--", sql])  # `--`: a query may start with a comment
        assert result.exit_code == 2 and "Refused" in result.output, (sql, result.output)
    assert not leak.exists()
    # what only reads still runs, EXPLAIN ANALYZE of a query included
    for sql in ("EXPLAIN ANALYZE SELECT * FROM images", "EXPLAIN SELECT 1", "WITH x AS (SELECT 1 AS n) SELECT n FROM x",
                "SELECT 'EXPLAIN ANALYZE DELETE' AS text", "SUMMARIZE images", "SHOW TABLES"):
        assert is_read_only_sql(sql), sql
        assert runner.invoke(app, ["sql", sql, "-f", "csv", "-c", str(catalog_path)]).exit_code == 0, sql


def test_copy_to_with_write_never_overwrites_an_image_its_caption_or_the_catalog(catalog_path, tmp_path):
    """`--write` (and the TUI's write mode, whose dialog said "nothing on disk is touched") let
    `COPY … TO 'photo.jpg'` replace an ingested image with a CSV."""
    image, sidecar = _an_image_the_catalog_reads(catalog_path, tmp_path, "it's a photo")
    quoted = lambda path: str(path).replace("'", "''")  # noqa: E731
    for target in (image, sidecar, catalog_path):
        for sql in (f"COPY (SELECT 'oops' AS a) TO '{quoted(target)}' (FORMAT csv)",
                    f"EXPLAIN ANALYZE COPY images TO '{quoted(target)}'",
                    # a security review wrote over images past the check with a comment or a dollar-quoted target
                    f"COPY (SELECT 'oops' AS a) TO/**/'{quoted(target)}' (FORMAT csv)",
                    f"COPY (SELECT 'oops' AS a) TO $x${target}$x$ (FORMAT csv)",
                    f"COPY (SELECT 'oops' AS a) -- a comment\n TO\n'{quoted(target)}' (FORMAT csv)",
                    # and past the tokens, as a second review found: an E-string, $ in a name, file://, a folder write
                    f"COPY (SELECT E'\\' -- ' AS a) TO '{quoted(target)}' (FORMAT csv)",
                    f"COPY (SELECT 'x' AS x$a$) TO '{quoted(target)}' (FORMAT csv) -- $a$",
                    f"COPY (SELECT 'oops' AS a) TO 'file://{quoted(target)}' (FORMAT csv)",
                    f"COPY (SELECT 1 AS a) TO '{quoted(target.parent)}' (FORMAT csv, PARTITION_BY (a), OVERWRITE)",
                    f"EXPORT DATABASE '{quoted(target.parent)}'"):
            result = runner.invoke(app, ["sql", sql, "--write", "-c", str(catalog_path)])
            said = " ".join(result.output.split())
            assert result.exit_code == 2 and any(words in said for words in ("Refused", "plain 'quoted", "not run by --write")), (sql, result.output)
    assert image.read_bytes() == b"the only copy" and sidecar.read_text() == "a caption"
    # the same files by other names: a path through a linked folder, a hard link
    (tmp_path / "linked").symlink_to(tmp_path)
    (tmp_path / "hard.csv").hardlink_to(image)
    for target in (tmp_path / "linked" / image.name, tmp_path / "linked" / sidecar.name, tmp_path / "hard.csv"):
        result = runner.invoke(app, ["sql", f"COPY (SELECT 'oops' AS a) TO '{quoted(target)}' (FORMAT csv)", "--write", "-c", str(catalog_path)])
        assert result.exit_code == 2 and "Refused" in result.output, (target, result.output)
    assert image.read_bytes() == b"the only copy" and sidecar.read_text() == "a caption"
    elsewhere = tmp_path / "out.csv"
    result = runner.invoke(app, ["sql", f"COPY images TO '{elsewhere}'", "--write", "-c", str(catalog_path)])
    assert result.exit_code == 0 and elsewhere.read_text().startswith("image_id"), result.output


def test_several_statements_with_write_change_all_or_nothing(catalog_path):
    """`UPDATE …; SELECT nope …` with --write said only the SQL error, and the UPDATE had been committed."""
    seeded_catalog(catalog_path)
    for failing in ("SELECT nope FROM images", "SELECT 'x'::INT AS n"):  # a bind error, and one raised as rows are made
        result = runner.invoke(app, ["sql", f"UPDATE images SET status = 'missing'; {failing}", "--write", "-c", str(catalog_path)])
        assert result.exit_code == 2 and "Nothing was changed" in " ".join(result.output.split()), result.output
    statuses = runner.invoke(app, ["sql", "SELECT status FROM images ORDER BY image_id", "-f", "csv", "-c", str(catalog_path)])
    assert statuses.stdout.splitlines() == ["status", "ok", "error"]
    done = runner.invoke(app, ["sql", "UPDATE images SET status = 'missing' WHERE image_id = 'b'; SELECT count(*) AS n FROM images "
                                      "WHERE status = 'missing'", "--write", "-f", "csv", "-c", str(catalog_path)])
    assert done.exit_code == 0 and done.stdout.splitlines() == ["n", "1"], done.output


def test_table_shows_every_type_fits_the_terminal_and_keeps_error_lines(catalog_path, monkeypatch):
    """The table crashed on INTERVAL and UNION columns (a polars conversion), gave each of 39 columns no width in a
    120-column terminal, and put errors two lines below where they were (it wrapped the query)."""
    seeded_catalog(catalog_path)
    monkeypatch.setenv("COLUMNS", "120")
    typed = runner.invoke(app, ["sql", "SELECT INTERVAL 3 DAY AS took, union_value(k := 1) AS u", "-c", str(catalog_path)])
    assert typed.exit_code == 0 and "3 days" in typed.stdout, typed.output
    wide = runner.invoke(app, ["sql", "SELECT * FROM images_view", "-c", str(catalog_path)])
    assert wide.exit_code == 0, wide.output
    header = next(line for line in wide.stdout.splitlines() if "image_id" in line)
    assert "path" in header and len(header) <= 120
    said = " ".join(wide.output.split())
    counted = runner.invoke(app, ["sql", "SELECT count(*) AS n FROM duckdb_columns() WHERE table_name = 'images_view'",
                                  "-f", "csv", "-c", str(catalog_path)])
    total = int(counted.stdout.splitlines()[1])
    assert total > 30 and f"of {total} columns shown" in said and "--format csv or json" in said
    error = runner.invoke(app, ["sql", "SELECT 1 AS one,\n'a'::INT AS two", "-c", str(catalog_path)])
    assert error.exit_code == 2 and "LINE 2" in error.output, error.output


def test_csv_writes_booleans_and_blobs_as_duckdb_does(catalog_path):
    seeded_catalog(catalog_path)
    result = runner.invoke(app, ["sql", "SELECT path_bytes, status = 'ok' AS fine, '\\xE9'::BLOB AS odd FROM images_view "
                                        "WHERE image_id = 'a'", "-f", "csv", "-c", str(catalog_path)])
    assert result.stdout.splitlines() == ["path_bytes,fine,odd", "/p/a.jpg,true,\\xE9"], result.output


def test_sql_waits_for_a_catalog_another_process_holds_when_asked(catalog_path):
    """While an ingest or the TUI held the catalog, `sql` could only fail at once; --wait N waits for it."""
    import subprocess
    import sys

    seeded_catalog(catalog_path)
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(catalog_path)!r}); "
                               "print('ready', flush=True); time.sleep(2); c.close(); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        at_once = runner.invoke(app, ["sql", "SELECT count(*) AS n FROM images", "-f", "csv", "-c", str(catalog_path)])
        said = " ".join(at_once.output.split())
        # a busy catalog has an exit status of its own (EX_TEMPFAIL), so a cron wrapper can retry just that
        assert at_once.exit_code == 75 and f"process {holder.pid}" in said and "not even to read" in said, at_once.output
        waited = runner.invoke(app, ["sql", "SELECT count(*) AS n FROM images", "-f", "csv", "--wait", "20", "-c", str(catalog_path)])
        assert waited.exit_code == 0 and waited.stdout.splitlines() == ["n", "2"], waited.output
        # the wait is said on stderr (it was silent: a gap in a log that read as a hang)
        assert "Waiting up to 20 s for the catalog" in " ".join(waited.stderr.split()) and f"process {holder.pid}" in waited.stderr
    finally:
        holder.kill()
        holder.wait()


def test_any_command_waits_for_a_catalog_another_process_holds_when_asked(catalog_path, tmp_path):
    """Only `sql` could wait: with the TUI open, `caption` or `filter` could only fail (and said nothing of waiting)."""
    import subprocess
    import sys

    seeded_catalog(catalog_path)
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(catalog_path)!r}); "
                               "print('ready', flush=True); time.sleep(2); c.close(); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        at_once = runner.invoke(app, ["filter", "--min-side", "5", "-c", str(catalog_path)])
        said = " ".join(at_once.output.split())
        assert at_once.exit_code == 75 and "`workbench --wait SECONDS COMMAND` waits for it" in said, at_once.output
        waited = runner.invoke(app, ["--wait", "20", "filter", "--min-side", "5", "-c", str(catalog_path)])
        assert waited.exit_code == 0 and "checked" in waited.output, waited.output
    finally:
        holder.kill()
        holder.wait()


def test_curation_commands_and_help_do_not_load_torch(catalog_path):
    """Building the command tree imported the trainer (and torch: ~2 s and ~600 MB) for every command, `sql` and
    `--help` included, through the train commands' list of mode options."""
    import subprocess
    import sys

    seeded_catalog(catalog_path)
    probe = ("import sys; from typer.testing import CliRunner; from workbench.cli import app; "
             "runner = CliRunner(); "
             f"assert runner.invoke(app, ['sql', 'SELECT 1', '-c', {str(catalog_path)!r}]).exit_code == 0; "
             "assert runner.invoke(app, ['train', 'dreambooth', '--help']).exit_code == 0; "
             "assert runner.invoke(app, ['--help']).exit_code == 0; "
             "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_a_path_too_long_for_the_system_is_said_not_a_traceback(catalog_path, tmp_path):
    """A security review: a path over the system's limit gave an OSError traceback (`sql -o`, `priors --from`,
    `train --output-dir`)."""
    import subprocess
    import sys

    seeded_catalog(catalog_path)
    done = subprocess.run([sys.executable, "-m", "workbench.cli", "sql", "SELECT 1", "-c", str(catalog_path),
                           "-o", str(tmp_path / ("a" * 300 + ".csv"))], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "a path is too long for this system" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_control_characters_in_values_never_reach_the_terminal_raw(catalog_path, tmp_path):
    """A security review: a file name holding ESC[31m or ESC]0;… restyled or retitled the terminal through the
    ingest error table and `workbench sql`'s table."""
    seeded_catalog(catalog_path)
    shown = runner.invoke(app, ["sql", "SELECT chr(27) || ']0;owned' || chr(7) || chr(27) || '[31mred' AS name", "-c", str(catalog_path)])
    assert shown.exit_code == 0 and "\x1b" not in shown.output and "\\x1b]0;owned" in shown.output, shown.output
    as_csv = runner.invoke(app, ["sql", "SELECT chr(27) AS name", "-c", str(catalog_path), "--format", "csv"])
    assert "\x1b" in as_csv.output  # data formats keep the value as it is


def test_an_output_that_fails_part_way_leaves_no_cut_off_file(catalog_path, tmp_path, monkeypatch):
    """A review: `-o` on a full disk left a 0-byte file, and the same command again, as the error advised, was refused
    because that file existed."""
    import workbench.cli

    seeded_catalog(catalog_path)
    real = workbench.cli._csv_chunks

    def full_disk(*args, **kwargs):  # the header is written, then the disk is full
        yield next(real(*args, **kwargs))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(workbench.cli, "_csv_chunks", full_disk)
    out = tmp_path / "ids.csv"
    failed = runner.invoke(app, ["sql", "SELECT image_id FROM images", "-o", str(out), "-c", str(catalog_path)])
    assert failed.exit_code != 0 and not out.exists() and list(tmp_path.glob("*.tmp")) == []
    monkeypatch.undo()
    again = runner.invoke(app, ["sql", "SELECT image_id FROM images", "-o", str(out), "-c", str(catalog_path)])
    assert again.exit_code == 0 and out.read_text().splitlines()[0] == "image_id"


def test_the_workbenchs_own_views_and_tables_cannot_be_replaced_dropped_or_renamed(catalog_path):
    """A review: `sql --write "CREATE OR REPLACE VIEW dataset AS …"` was taken as a saved view; `sql` and the TUI then
    counted 13 images while export, which has its own definition, wrote 143."""
    seeded_catalog(catalog_path)
    for statement in ("CREATE OR REPLACE VIEW dataset AS SELECT * FROM images_view WHERE width > 100",
                      'DROP VIEW IF EXISTS main."images_view"', "ALTER VIEW duplicate_groups RENAME TO old_groups",
                      "ALTER TABLE dataset RENAME TO old_dataset",  # DuckDB runs it on a view
                      "SELECT 1; create or replace view Dataset as select 1"):
        refused = runner.invoke(app, ["sql", "--write", statement, "-c", str(catalog_path)])
        said = " ".join(refused.output.split())
        assert refused.exit_code == 2 and "is a view the workbench defines" in said and "CREATE VIEW my_" in said, statement
    # and its tables: dropped or replaced, the catalog was broken for good (migrations do not make them again)
    for statement in ("DROP TABLE images", "CREATE OR REPLACE TABLE captions AS SELECT 1 AS x",
                      "ALTER TABLE runs RENAME TO old_runs", "EXPLAIN ANALYZE DROP TABLE IF EXISTS main.exclusions"):
        refused = runner.invoke(app, ["sql", "--write", statement, "-c", str(catalog_path)])
        said = " ".join(refused.output.split())
        assert refused.exit_code == 2 and "is a table of the workbench's catalog" in said, statement
    for statement in ("CREATE VIEW my_dataset AS SELECT * FROM dataset WHERE width > 5",
                      "CREATE TEMP VIEW dataset AS SELECT 1 AS one", "DROP VIEW my_dataset",
                      "CREATE TABLE my_notes (x INT)", "ALTER TABLE my_notes ADD COLUMN y INT", "DROP TABLE my_notes",
                      "CREATE TEMP TABLE images AS SELECT 1 AS one"):
        assert runner.invoke(app, ["sql", "--write", statement, "-c", str(catalog_path)]).exit_code == 0, statement
    rows = runner.invoke(app, ["sql", "SELECT image_id FROM dataset", "-f", "csv", "-c", str(catalog_path)])
    assert rows.stdout.splitlines() == ["image_id", "a"]


def test_an_sql_error_on_a_catalog_not_yet_upgraded_says_so(catalog_path):
    """An upgrader's review: `sql` (read-only: it upgrades nothing) on an older catalog failed with "column folder_id
    not found", and nothing said the catalog was an older version's."""
    from workbench.catalog import connect

    seeded_catalog(catalog_path)
    con = connect(catalog_path)
    con.execute("DROP TABLE training_images")  # as before m019
    con.execute("DELETE FROM schema_migrations WHERE version = 19")
    con.close()
    failed = runner.invoke(app, ["sql", "SELECT * FROM training_images", "-c", str(catalog_path)])
    said = " ".join(failed.output.split())
    assert failed.exit_code == 2 and "this catalog predates 1 migration(s) of this workbench, from m019_training_images" in said
    fine = runner.invoke(app, ["sql", "SELECT no_such_column FROM images", "-c", str(catalog_path)])
    assert "predates" in fine.output  # any error on such a catalog: it may be why
    connect(catalog_path).close()  # a command that writes upgrades it; then the note is gone
    upgraded = runner.invoke(app, ["sql", "SELECT no_such_column FROM images", "-c", str(catalog_path)])
    assert upgraded.exit_code == 2 and "predates" not in upgraded.output


def test_progress_to_a_log_file_is_plain_lines_that_show_a_long_step_is_alive():
    """A scripting review: redirected to a file, a step wrote nothing until it ended (rich bars redraw only on a
    terminal), and its log lines were padded with spaces to 80 columns and cut there."""
    from io import StringIO

    from rich.console import Console

    from workbench.progress import RichProgress

    out = StringIO()
    long_message = "skipped " + "/very/long/folder" * 10 + "/a.png"
    with RichProgress(console=Console(file=out), log_every=3600) as progress:
        progress(task="ingest", message=long_message)
        for done in range(11):
            progress(task="ingest", completed=done, total=10)
        progress(task="cache", completed=0, total=None)
    lines = out.getvalue().splitlines()
    # the step's first and last counts (no bar, no escape codes, nothing padded); the rest waits for `log_every`
    assert [line.split(" ", 1)[1] for line in lines] == [long_message, "ingest: 0/10", "ingest: 10/10", "cache: 0"]
    assert all(line == line.rstrip() and "\x1b" not in line for line in lines)
    out = StringIO()
    with RichProgress(console=Console(file=out), log_every=0) as progress:
        for done in (1, 1, 2):
            progress(task="train", completed=done, total=5)
    assert [line.split(" ", 1)[1] for line in out.getvalue().splitlines()] == ["train: 1/5", "train: 2/5"]


def test_piped_output_keeps_long_lines_whole(tmp_path):
    """A scripting review: piped to a file, `exclude --dry-run` listed long paths cut over two lines at 80 columns,
    and notes broke the commands they suggest in two."""
    from PIL import Image

    from pipelines.ingest import ingested_images
    from workbench.catalog import connect

    folder = tmp_path / ("a-folder-with-a-long-name-" * 4)
    folder.mkdir()
    Image.new("RGB", (40, 30), "red").save(folder / "a-photo-of-a-thing-with-a-long-name-seed0000000.png")
    catalog_path = tmp_path / "c.duckdb"
    con = connect(catalog_path)
    ingested_images(con, [folder], workers=1)
    con.close()
    listed = runner.invoke(app, ["exclude", "--where", "width < 400", "--reason", "small", "--dry-run", "-c", str(catalog_path)])
    assert listed.exit_code == 0, listed.output
    path = str(folder / "a-photo-of-a-thing-with-a-long-name-seed0000000.png")
    assert len(path) > 120 and any(line.rstrip().endswith(path) for line in listed.output.splitlines()), listed.output


def test_write_with_its_own_transactions_says_what_ran_before_a_failure(catalog_path):
    """A SQL user's review: `insert 6; rollback; insert 7` failed on the ROLLBACK (no transaction was open) with only
    DuckDB's error, and row 6 stayed, against the README's "nothing is changed"."""
    seeded_catalog(catalog_path)
    assert runner.invoke(app, ["sql", "CREATE TABLE mine (a INT)", "--write", "-c", str(catalog_path)]).exit_code == 0
    failed = runner.invoke(app, ["sql", "INSERT INTO mine VALUES (6); ROLLBACK; INSERT INTO mine VALUES (7)", "--write",
                                 "-c", str(catalog_path)])
    text = " ".join(failed.output.split())
    assert failed.exit_code == 2 and "statement 2 of 3" in text and "The 1 before it ran" in text, failed.output
    rows = runner.invoke(app, ["sql", "SELECT a FROM mine", "-f", "json", "-c", str(catalog_path)])
    assert json.loads(rows.stdout) == [{"a": 6}]  # as said
    atomic = runner.invoke(app, ["sql", "INSERT INTO mine VALUES (8); INSERT INTO mine VALUES ('x')", "--write", "-c", str(catalog_path)])
    assert atomic.exit_code == 2 and "Nothing was changed" in " ".join(atomic.output.split())
    rows = runner.invoke(app, ["sql", "SELECT a FROM mine", "-f", "json", "-c", str(catalog_path)])
    assert json.loads(rows.stdout) == [{"a": 6}]


def test_a_writer_blocked_by_a_reader_is_told_so(catalog_path):
    """A SQL user's review: while a long read-only `workbench sql` held the catalog, `dedup` said the holder had it
    "open to write (the TUI, an ingest)"."""
    import subprocess
    import sys

    seeded_catalog(catalog_path)
    reader = subprocess.Popen([sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(catalog_path)!r}, read_only=True); "
                               "print('ready', flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "ready"
        blocked = runner.invoke(app, ["dedup", "-c", str(catalog_path)])
        said = " ".join(blocked.output.split())
        assert blocked.exit_code == 75 and f"process {reader.pid}" in said and "to write or to read" in said, blocked.output
        assert "open to write (the TUI" not in said
    finally:
        reader.kill()
        reader.wait()


def test_concept_list_only_reads(catalog_path):
    """A SQL user's review: `concept list` opened the catalog to write, so a read-only disk (or another process
    reading it) refused a command that only lists."""
    import subprocess
    import sys

    seeded_catalog(catalog_path)
    assert runner.invoke(app, ["concept", "add", "rex", "--trigger", "sks", "--class", "dog", "--where", "image_id = 'a'",
                               "-c", str(catalog_path)]).exit_code == 0
    reader = subprocess.Popen([sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(catalog_path)!r}, read_only=True); "
                               "print('ready', flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "ready"
        listed = runner.invoke(app, ["concept", "list", "-c", str(catalog_path)], env={"COLUMNS": "200"})
        assert listed.exit_code == 0 and "rex" in listed.output and "sks" in listed.output, listed.output
    finally:
        reader.kill()
        reader.wait()


def test_sql_reads_the_query_from_stdin_with_a_dash(catalog_path):
    """A SQL user's review: `echo "select 42" | workbench sql -` was a parser error at "-", and a file of SQL (which
    may start with a -- comment) could not be given."""
    seeded_catalog(catalog_path)
    result = runner.invoke(app, ["sql", "-", "-f", "json", "-c", str(catalog_path)],
                           input="-- how many\nSELECT count(*) AS n\nFROM images;\n")
    assert result.exit_code == 0 and json.loads(result.stdout) == [{"n": 2}], result.output


def test_a_count_tables_title_is_not_cut_when_piped(catalog_path, tmp_path):
    """An odd-files review: `workbench export --format parquet out | cat` printed the title "export parquet → …" wrapped
    over three lines, the path cut, though piped output keeps lines whole."""
    seeded_catalog(catalog_path)
    out = tmp_path / "a_rather_long_folder_name_for_the_export" / "dataset.parquet"
    result = runner.invoke(app, ["export", "--format", "parquet", str(out), "-c", str(catalog_path)])
    assert result.exit_code == 0, result.output
    assert any(f"export parquet → {out}" in line for line in result.stdout.splitlines()), result.stdout


def test_csv_and_json_cross_batches_whole_and_an_error_part_way_is_said(catalog_path):
    """A code review: no test crossed the 10,000-row batches the output is now written in; a regression hunt: an error
    part way left a cut-off result on stdout with only the error beside it."""
    seeded_catalog(catalog_path)
    rows = runner.invoke(app, ["sql", "SELECT range AS n, range % 7 = 0 AS seventh FROM range(25000)", "-f", "csv", "-c", str(catalog_path)])
    lines = rows.stdout.splitlines()
    assert rows.exit_code == 0 and lines[0] == "n,seventh" and len(lines) == 25001 and lines[-1] == "24999,false"
    as_json = runner.invoke(app, ["sql", "SELECT range AS n FROM range(25000)", "-f", "json", "-c", str(catalog_path)])
    assert [row["n"] for row in json.loads(as_json.stdout)] == list(range(25000))
    broken = runner.invoke(app, ["sql", "SELECT CASE WHEN range < 900000 THEN range ELSE error('boom') END AS x FROM range(1000000)",
                                 "-f", "json", "-c", str(catalog_path)])  # json: its "[" is out before any row
    said = " ".join(broken.stderr.split())
    assert broken.exit_code == 2 and "boom" in said and "incomplete result" in said, broken.output


def test_sigterm_during_a_long_query_stops_with_a_line_and_status_143(catalog_path):
    """A reliability review: Ctrl+C or SIGTERM while DuckDB ran a query ended in a traceback and status 1 (DuckDB
    raises its own "Query interrupted", not KeyboardInterrupt); and with Ctrl+C not ignored (a process started from
    a script, not a shell's background job), a SIGTERM never reached the running query."""
    import signal
    import subprocess
    import sys
    import time

    from workbench.catalog import connect

    connect(catalog_path).close()
    query = subprocess.Popen([sys.executable, "-m", "workbench", "sql", "SELECT sum(i) FROM range(200000000000) t(i)",
                              "--catalog", str(catalog_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)  # the interpreter, the catalog open, the query running
    query.send_signal(signal.SIGTERM)  # once: DuckDB polls for a real SIGINT, which a KeyboardInterrupt was not
    try:
        _, err = query.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        query.kill()
        raise AssertionError("the query ran on after SIGTERM") from None
    assert query.returncode == 143 and "Stopped" in err and "Traceback" not in err, err
