"""Catalog: migrations, bad catalog files, the lock message, the friendly views."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from workbench import catalog
from workbench.catalog import CatalogError, CatalogLockedError, connect


def test_migrations_are_recorded_once(catalog_path):
    con = connect(catalog_path)
    versions = [r[0] for r in con.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()]
    assert versions[0] == 1 and versions == sorted(set(versions))
    con.close()
    con = connect(catalog_path)
    assert [r[0] for r in con.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()] == versions
    assert catalog.migrate(con) == []


def test_catalog_from_a_newer_workbench_is_refused(catalog_path):
    con = connect(catalog_path)
    con.execute("INSERT INTO schema_migrations (version, name) VALUES (999, 'm999_future.sql')")
    con.close()
    with pytest.raises(CatalogError, match="newer workbench"):
        connect(catalog_path)


def test_not_a_catalog(tmp_path):
    junk = tmp_path / "junk.duckdb"
    junk.write_text("hello, not a database")
    with pytest.raises(CatalogError, match="not a readable workbench catalog"):
        connect(junk)
    with pytest.raises(CatalogError, match="No catalog"):
        connect(tmp_path / "absent.duckdb", read_only=True)


def test_another_tools_duckdb_file_is_refused_untouched(tmp_path):
    import duckdb
    from typer.testing import CliRunner

    from workbench.cli import app

    for tables in (["images(x INT)"], ["sales(amount INT)", "customers(name VARCHAR)"]):
        theirs = tmp_path / f"theirs-{len(tables)}.duckdb"
        con = duckdb.connect(str(theirs))
        for table in tables:
            con.execute(f"CREATE TABLE {table}")
        con.close()
        with pytest.raises(CatalogError, match="not a workbench catalog"):
            connect(theirs)
        (tmp_path / "photos").mkdir(exist_ok=True)
        result = CliRunner().invoke(app, ["ingest", str(tmp_path / "photos"), "--catalog", str(theirs)])
        assert result.exit_code != 0 and "not a workbench catalog" in " ".join(result.output.split())
        assert "Traceback" not in result.output
        con = duckdb.connect(str(theirs))
        assert sorted(r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()) == sorted(
            t.split("(")[0] for t in tables)
        con.close()
    empty = tmp_path / "empty.duckdb"
    duckdb.connect(str(empty)).close()  # a DuckDB file with nothing in it becomes a catalog
    connect(empty).close()


def test_lock_held_by_another_process_names_it(catalog_path):
    connect(catalog_path).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(catalog_path)!r}); print('ready', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(CatalogLockedError) as info:
            connect(catalog_path, wait_seconds=0.3)
        assert f"process {holder.pid}" in str(info.value)
        assert "retry" in str(info.value)
    finally:
        holder.kill()
        holder.wait()


def test_record_run_marks_failures(con):
    with pytest.raises(RuntimeError):
        with catalog.record_run(con, "demo", {"x": 1}) as run:
            run.counts["done"] = 3
            raise RuntimeError("boom")
    status, error, counts = con.execute("SELECT status, error, counts FROM runs").fetchall()[0]
    assert status == "failed" and "boom" in error and '"done": 3' in counts


def test_runs_of_processes_that_are_gone_are_marked_interrupted(con):
    import os
    import socket

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid is free now: a process killed while its step ran
    host = socket.gethostname()
    for step, pid, where in (("ingest", gone.pid, host), ("caption", os.getpid(), host), ("dedup", None, None),
                             ("score", gone.pid, "another-machine")):
        con.execute("INSERT INTO runs (step, started_at, status, pid, host) VALUES (?, now(), 'running', ?, ?)", [step, pid, where])
    catalog.start_run(con, "filter", {})
    status = dict(con.execute("SELECT step, status FROM runs").fetchall())
    assert status == {"ingest": "interrupted", "caption": "running", "dedup": "running", "score": "running", "filter": "running"}
    assert "killed" in con.execute("SELECT error FROM runs WHERE step = 'ingest'").fetchone()[0]
    mine = con.execute("SELECT pid, host FROM runs WHERE step = 'filter'").fetchone()
    assert mine == (os.getpid(), host)
    # killed and not reaped yet (`timeout -s KILL` dies with it; a container's init reaps late): a zombie is gone too
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    import time

    while open(f"/proc/{zombie.pid}/stat", "rb").read().rsplit(b")", 1)[1].split()[0] != b"Z":
        time.sleep(0.01)
    con.execute("INSERT INTO runs (step, started_at, status, pid, host) VALUES ('buckets', now(), 'running', ?, ?)", [zombie.pid, host])
    catalog.start_run(con, "tag", {})
    assert con.execute("SELECT status FROM runs WHERE step = 'buckets'").fetchone()[0] == "interrupted"
    zombie.wait()


def test_sigterm_stops_a_command_as_ctrl_c_does():
    import os
    import signal

    from workbench.cli import _terminate_as_ctrl_c

    previous = signal.signal(signal.SIGTERM, _terminate_as_ctrl_c), signal.getsignal(signal.SIGINT)
    pressed = []
    try:
        signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))  # a step's own graceful Ctrl+C
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert pressed == [signal.SIGINT]
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C ignored (a script's background job): SIGTERM still stops it
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def test_views_dropped_by_hand_come_back_and_say_what_they_hold(catalog_path):
    con = connect(catalog_path)
    con.execute("INSERT INTO images (image_id, status, width, height) VALUES ('a', 'ok', 10, 20), ('b', 'ok', 10, 20)")
    con.execute("INSERT INTO paths (path, path_bytes, image_id, seq) VALUES ('/p/a.png', '/p/a.png'::BLOB, 'a', 1), "
                "('/p/b.jpg', '/p/b.jpg'::BLOB, 'b', 2)")
    con.execute("INSERT INTO duplicates VALUES ('a', 1, 'a', true, 'exact', 0, 'larger'), ('b', 1, 'a', false, 'phash', 3, NULL)")
    con.execute("INSERT INTO exclusions (image_id, step, reason) VALUES ('b', 'dedup', 'duplicate of a')")
    con.execute("DROP VIEW dataset")
    con.execute("DROP VIEW duplicate_groups")
    con.close()
    con = connect(catalog_path)  # every step opens the catalog this way: the views are back
    assert con.execute("SELECT image_id FROM dataset").fetchall() == [("a",)]
    assert con.execute("SELECT image_id, path, keeper_path, keep_reason, method, distance, excluded FROM duplicate_groups "
                       "ORDER BY image_id").fetchall() == [("a", "/p/a.png", "/p/a.png", "larger", "exact", 0.0, False),
                                                            ("b", "/p/b.jpg", "/p/a.png", "larger", "phash", 3.0, True)]
    con.execute("CREATE OR REPLACE VIEW images_view AS SELECT 1 AS one")  # replaced by hand (in DuckDB's own shell, say)
    con.close()
    con = connect(catalog_path)
    assert con.execute("SELECT count(*) FROM images_view").fetchall() == [(2,)]
    comments = dict(con.execute("SELECT view_name, comment FROM duckdb_views() WHERE NOT internal").fetchall())
    assert set(comments) >= {"dataset", "images_view", "duplicate_groups"} and all(comments.values())
    column = con.execute("SELECT comment FROM duckdb_columns() WHERE table_name = 'images_view' AND column_name = 'status'").fetchone()
    assert "missing" in column[0]
    # every column says what it holds (a FiftyOne user's review: 21 of 39 said nothing, path_bytes among them)
    assert con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'images_view' AND comment IS NULL"
                       ).fetchall() == []
    con.close()


@pytest.mark.parametrize(
    "sql, read_only",
    [
        ("SELECT 1", True),
        ("WITH x AS (SELECT 1) SELECT * FROM x", True),
        ("DESCRIBE images", True),
        ("FROM dataset LIMIT 3", True),
        ("INSERT INTO exclusions VALUES ('a', 'manual', 'x', now())", False),
        ("SELECT 1; DROP TABLE images", False),
        ("COPY images TO 'x.csv'", False),
        ("ATTACH 'other.duckdb'", False),
        ("UPDATE images SET width = 1", False),
    ],
)
def test_read_only_sql_detection(sql, read_only):
    assert catalog.is_read_only_sql(sql) is read_only


def test_caption_rule_prefers_choice_then_manual_then_sidecar_then_newest_model(con):
    con.execute("INSERT INTO images (image_id, status) VALUES ('a', 'ok')")
    con.execute("INSERT INTO paths (path, path_bytes, image_id, seq) VALUES ('/x/a.jpg', '/x/a.jpg'::BLOB, 'a', 1)")
    con.execute("INSERT INTO captions VALUES ('a', 'model:tiny', 'model text', '2026-01-01')")
    assert con.execute("SELECT caption_source FROM images_view").fetchall() == [("model:tiny",)]
    con.execute("INSERT INTO captions VALUES ('a', 'sidecar', 'sidecar text', '2025-01-01')")
    assert con.execute("SELECT caption_source FROM images_view").fetchall() == [("sidecar",)]
    con.execute("INSERT INTO captions VALUES ('a', 'manual', 'manual text', '2024-01-01')")
    assert con.execute("SELECT caption FROM images_view").fetchall() == [("manual text",)]
    con.execute("INSERT INTO caption_choice VALUES ('a', 'model:tiny')")
    assert con.execute("SELECT caption FROM images_view").fetchall() == [("model text",)]


def test_library_calls_leave_the_connection_usable_and_say_what_is_wrong(tmp_path, monkeypatch):
    """A Python-API review: after `choose_keeper`, `manual_inclusions` (and others) `con.sql(...)` failed with
    "unfinished result"; a str path made ingest walk "/" letter by letter; a missing folder was an ingest of nothing
    recorded 'ok'; `~` made a folder named "~"; a write step on a read-only connection failed with DuckDB's words,
    and a second connection of the other mode read as a damaged catalog."""
    from PIL import Image

    from pipelines.dedup import choose_keeper, duplicate_groups
    from pipelines.filter import manual_inclusions
    from pipelines.ingest import ingested_images

    folder = tmp_path / "photos"
    folder.mkdir()
    from pathlib import Path

    with Image.open(Path(__file__).resolve().parents[1] / "sample_data" / "photos" / "coffee.jpg") as picture:
        picture.save(folder / "a.png")
        picture.resize((picture.width // 2, picture.height // 2)).save(folder / "a_small.png")
    path = tmp_path / "cat.duckdb"
    con = connect(path)
    assert ingested_images(con, str(folder), workers=1).new == 2  # a lone str is one path
    with pytest.raises(FileNotFoundError, match=r"No such file or folder to ingest: .*nothere"):
        ingested_images(con, [folder, tmp_path / "nothere"], workers=1)
    assert con.execute("SELECT count(*) FROM runs WHERE step = 'ingest'").fetchall() == [(1,)]
    duplicate_groups(con, threshold=6)
    small = con.execute("SELECT image_id FROM paths WHERE path LIKE '%a_small.png'").fetchall()[0][0]
    for step in (lambda: choose_keeper(con, small), lambda: manual_inclusions(con, [small])):
        step()
        assert con.sql("SELECT count(*) FROM images").fetchall() == [(2,)]
    con.close()

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    connect("~/by_tilde.duckdb").close()
    assert (tmp_path / "home" / "by_tilde.duckdb").is_file() and not (tmp_path / "~").exists()

    reader = connect(path, read_only=True)
    with pytest.raises(CatalogError, match="this connection is read-only: open it with connect"):
        duplicate_groups(reader, threshold=6)
    with pytest.raises(CatalogError, match="open in this process already read-only"):
        connect(path)
    reader.close()


def test_a_tilde_in_workbench_catalog_or_catalog_is_the_home_folder(tmp_path, monkeypatch):
    """A code review: WORKBENCH_CATALOG=~/d.duckdb made a folder named "~" beside the command, and `--catalog
    ~/c.duckdb` (quoted) said there was no catalog although the file was there."""
    from typer.testing import CliRunner

    from workbench.cli import app

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORKBENCH_CATALOG", "~/d.duckdb")
    catalog.connect().close()
    assert (tmp_path / "home" / "d.duckdb").is_file() and not (tmp_path / "~").exists()
    monkeypatch.delenv("WORKBENCH_CATALOG")
    result = CliRunner().invoke(app, ["sql", "SELECT count(*) FROM images", "--catalog", "~/d.duckdb"])
    assert result.exit_code == 0, result.output


def test_a_folder_that_may_not_be_written_is_said_in_a_line_not_a_traceback(catalog_path, monkeypatch, capsys):
    """A review: with the catalog's folder not writable, dedup (and ingest, exclude, train) ended in a traceback from
    DuckDB's write-ahead log; a read-only disk was called "not a readable workbench catalog"."""
    import duckdb

    import pipelines.dedup
    from workbench import cli

    connect(catalog_path).close()

    def no_wal(*args, **kwargs):
        raise duckdb.TransactionException(f'Cannot open file "{catalog_path}.wal": Permission denied')

    monkeypatch.setattr(pipelines.dedup, "duplicate_groups", no_wal)
    monkeypatch.setattr(sys, "argv", ["workbench", "dedup", "--catalog", str(catalog_path)])
    with pytest.raises(SystemExit) as done:
        cli.main()
    said = " ".join(capsys.readouterr().err.split())
    assert done.value.code == 1 and "Traceback" not in said, said
    assert 'wal": Permission denied' in said and "may not be read or written here" in said

    def read_only_disk(*args, **kwargs):
        raise duckdb.IOException(f'IO Error: Cannot open file "{catalog_path}": Read-only file system')

    monkeypatch.setattr(catalog.duckdb, "connect", read_only_disk)
    with pytest.raises(CatalogError, match="cannot be written here \\(a read-only file system\\).*`workbench sql`"):
        connect(catalog_path)


def test_a_catalog_from_before_m021_keeps_its_runs_evaluations(catalog_path):
    """Evaluations got a table of their own (m021); the one each older run kept in training_runs moves in with it."""
    from workbench.catalog import connect

    con = connect(catalog_path)
    con.execute("INSERT INTO training_runs (mode, model, status, clip_score, cmmd, metrics, finished_at) VALUES "
                "('lora', 'tiny', 'ok', 31.5, 0.25, '{\"clip_model\": \"sd15\", \"clip_score\": 31.5}', TIMESTAMP '2026-01-02 03:04:05'), "
                "('lora', 'tiny', 'failed', NULL, NULL, NULL, NULL), "
                "('lora', 'tiny', 'ok', NULL, NULL, '{\"error\": \"ValueError: no CLIP\"}', NULL)")  # its evaluation failed
    con.execute("DROP TABLE evaluations")
    con.execute("DROP SEQUENCE evaluations_seq")
    con.execute("DELETE FROM schema_migrations WHERE version = 21")
    con.close()
    con = connect(catalog_path)
    try:
        rows = con.execute("SELECT train_id, clip_model, clip_score, cmmd, fid, evaluated_at::VARCHAR FROM evaluations").fetchall()
        assert rows == [(1, "sd15", 31.5, 0.25, None, "2026-01-02 03:04:05")]
        con.execute("INSERT INTO evaluations (train_id) VALUES (1)")  # the sequence goes on after the moved row
        assert con.execute("SELECT count(DISTINCT evaluation_id) FROM evaluations").fetchall() == [(2,)]
    finally:
        con.close()


def test_a_new_catalog_is_written_in_a_format_older_duckdb_reads(catalog_path):
    """A SQL user's review: a DuckDB 1.x shell could not open a catalog made with DuckDB 2 ("version number 69")."""
    import duckdb

    connect(catalog_path).close()
    with duckdb.connect(str(catalog_path), read_only=True) as raw:
        tags = raw.execute("SELECT tags FROM duckdb_databases() WHERE path = ?", [str(catalog_path)]).fetchall()[0][0]
    assert tags["storage_version"] == f"{catalog.STORAGE_COMPATIBILITY}+"
    assert catalog_path.read_bytes()[8:12] == b"DUCK" and catalog_path.read_bytes()[12] == 64  # DuckDB 1.0's version number


def test_a_damaged_catalog_found_by_a_later_read_is_said_in_a_line(monkeypatch, capsys):
    """A reliability review: a catalog with a damaged block past its header opens, and the query that meets the block
    (`status`, `dedup`: DuckDB's "Corrupt database file" then) ended in a traceback and status 1."""
    import duckdb
    import pytest

    from workbench import cli

    def damaged():
        raise duckdb.IOException("Corrupt database file: computed checksum 1 does not match stored checksum 2 in block")

    monkeypatch.setattr(cli, "app", damaged)
    monkeypatch.setattr(sys, "argv", ["workbench", "status"])
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert stopped.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "the catalog file is damaged (Corrupt database file" in err and "Restore it from a backup" in err, err
