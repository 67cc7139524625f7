"""The DuckDB catalog: one file per project, schema evolved by numbered migrations."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

import duckdb

from workbench.progress import ProgressHook, StepCancelled, null_progress

DEFAULT_CATALOG = "workbench.duckdb"
CATALOG_ENV = "WORKBENCH_CATALOG"


class CatalogError(Exception):
    """A catalog problem with a message meant for people."""


class CatalogLockedError(CatalogError):
    """Another process holds the catalog file open for writing (`holder` says which, for people)."""

    def __init__(self, message: str, holder: str = "another process") -> None:
        super().__init__(message)
        self.holder = holder


def default_catalog_path() -> Path:
    """The catalog path from $WORKBENCH_CATALOG, else ./workbench.duckdb."""
    return Path(os.environ.get(CATALOG_ENV) or DEFAULT_CATALOG).expanduser()


def _migration_files() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every numbered migration, in order."""
    folder = resources.files("workbench") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"m(\d{3})_(\w+)\.sql", entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text()))
    return sorted(found)


def first_row(result: duckdb.DuckDBPyConnection) -> tuple | None:
    """The first row of an executed query, or None. Fetches it all: `fetchone()` leaves the result open, and the
    connection then refuses `con.sql(...)` ("unfinished result"), the next thing a notebook user types."""
    rows = result.fetchall()
    return rows[0] if rows else None


def _views_sql() -> str:
    return (resources.files("workbench") / "migrations" / "views.sql").read_text()


def _lock_holder(error: Exception) -> str:
    """'process 123 (its command line)' from DuckDB's lock error, or 'another process'."""
    holder = re.search(r"\(PID (\d+)\)", str(error))
    if not holder:
        return "another process"
    try:
        raw = Path(f"/proc/{holder.group(1)}/cmdline").read_bytes()
        return f"process {holder.group(1)} (" + raw.replace(b"\0", b" ").decode(errors="replace").strip() + ")"
    except OSError:
        return f"process {holder.group(1)}"


def _lock_message(path: Path, holder: str, *, read_only: bool) -> str:
    if read_only:  # readers share a catalog: the holder writes
        return (f"The catalog {path} is in use by {holder}. While one process has a catalog open to write (the TUI, an "
                "ingest), DuckDB lets no other open it, not even to read: wait for it to finish (or close it), then retry.")
    # the holder may only read (a long `workbench sql` query, another DuckDB client): that blocks a writer too
    return (f"The catalog {path} is in use by {holder}. DuckDB lets a process write a catalog only while no other has "
            "it open, to write or to read (a long query blocks writers too): wait for it to finish (or close it), "
            "then retry.")


# A new catalog is written in DuckDB's 1.x storage format, not the newest the installed DuckDB writes: a DuckDB 1.x
# shell (or harlequin, a notebook) could not open a catalog DuckDB 2 had made (1.2 and later read this one; 1.0 cannot
# read its schema). A catalog's format is fixed when the file is made; its tables are small, so the newer format's
# compression gains nothing.
STORAGE_COMPATIBILITY = "v1.0.0"


def _create_readable_by_older_duckdb(path: Path) -> None:
    """Make an empty database file at `path` in the STORAGE_COMPATIBILITY format (later opens keep its format)."""
    try:
        duckdb.connect(str(path), config={"storage_compatibility_version": STORAGE_COMPATIBILITY}).close()
    except duckdb.Error:
        pass  # another process made it first, or it cannot be made here: the open below says what it finds


def connect(
    path: str | os.PathLike[str] | None = None,
    *,
    read_only: bool = False,
    wait_seconds: float = 0.0,
    on_wait: Callable[[str], None] | None = None,
) -> duckdb.DuckDBPyConnection:
    """Open (creating and migrating if needed) the catalog at `path`; `on_wait(holder)` is called once when it
    starts waiting (`wait_seconds`) for another process that holds it."""
    # ~ as a shell would: DuckDB expands it itself, and mkdir below made a folder named "~" beside it
    path = Path(path).expanduser() if path is not None else default_catalog_path()
    if read_only and not path.exists():
        raise CatalogError(f"No catalog at {path}. Run `workbench ingest FOLDER` first.")
    if path.exists() and path.is_dir():
        raise CatalogError(f"{path} is a folder, not a catalog file.")
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            _create_readable_by_older_duckdb(path)
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except duckdb.IOException as error:
            if (not read_only and any(cause in str(error) for cause in ("Read-only file system", "Permission denied"))
                    and os.access(path, os.R_OK)):  # readable, not writable here (else it is "not readable", below)
                raise CatalogError(  # the file is fine: its folder (or the file) cannot be written here
                    f"{path} cannot be written here ({'a read-only file system' if 'Read-only' in str(error) else 'permission denied'}): "
                    "`workbench sql`, `status`, `search` and `concept list` still read it; for the other commands, make its folder "
                    "writable or copy it (and its .wal, if there is one) to a folder that is") from error
            if "lock" not in str(error).lower():
                raise CatalogError(f"{path} is not a readable workbench catalog: {error}") from error
            if time.monotonic() >= deadline:
                holder = _lock_holder(error)
                raise CatalogLockedError(_lock_message(path, holder, read_only=read_only), holder) from error
            if on_wait is not None:
                on_wait(_lock_holder(error))
                on_wait = None
            time.sleep(0.25)
        except duckdb.Error as error:
            if "different configuration" in str(error):  # not a damaged file: this process has it open another way
                raise CatalogError(
                    f"{path} is open in this process already{' to write' if read_only else ' read-only'}: DuckDB opens "
                    "a file one way per process, so close that connection first (or use it)") from error
            raise CatalogError(f"{path} is not a readable workbench catalog: {error}") from error
    try:
        if not read_only:
            _refuse_a_foreign_database(con, path)
            migrate(con)
        else:
            _check_version(con, path)
    except BaseException:
        con.close()
        raise
    return con


def _refuse_a_foreign_database(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """A DuckDB file that holds tables but no schema_migrations belongs to someone else: migrating it would
    add the workbench's tables to the user's own database (or fail half way on a table of the same name)."""
    tables = [row[0] for row in con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_catalog = current_database() ORDER BY 1"
    ).fetchall()]
    if tables and "schema_migrations" not in tables:
        shown = ", ".join(tables[:5]) + (", …" if len(tables) > 5 else "")
        raise CatalogError(
            f"{path} is a DuckDB database but not a workbench catalog (it holds {shown} and no schema_migrations "
            "table): nothing was changed in it. Give another --catalog file (a new name makes a new catalog)."
        )


def refuse_read_only(con: duckdb.DuckDBPyConnection, what: str) -> None:
    """CatalogError when `con` was opened read-only: said before a step writes anything (files included)."""
    if con.execute("SELECT readonly FROM duckdb_databases() WHERE database_name = current_database()").fetchall()[0][0]:
        raise CatalogError(f"{what} writes to the catalog, and this connection is read-only: "
                           "open it with connect(path) (read_only=False).")


def connect_when_free(
    path: str | os.PathLike[str],
    *,
    progress: ProgressHook = null_progress,
    task: str,
    waiting: str,
    stopped: str,
) -> duckdb.DuckDBPyConnection:
    """Open the catalog again after long model work let it go, waiting while another process holds it.

    The first wait reports `waiting` (with the holder put in place of `{holder}`); each retry calls the
    hook, so a cancel gets through; a stop while waiting reports `stopped` before it propagates.
    """
    told = False
    try:
        while True:
            try:
                con = connect(path, wait_seconds=5)
                if told:
                    progress(task=task, completed=1, total=1)
                return con
            except CatalogLockedError as error:
                if not told:
                    progress(task=task, message=waiting.replace("{holder}", error.holder))
                    told = True
                progress(task=task)
    except (KeyboardInterrupt, StepCancelled):
        if told:
            progress(task=task, message=stopped)
        raise


def catalog_file(con: duckdb.DuckDBPyConnection) -> Path | None:
    """The file behind a catalog connection (None for an in-memory catalog)."""
    row = first_row(con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()"))
    return Path(row[0]).resolve() if row and row[0] else None


def catalog_files(con: duckdb.DuckDBPyConnection) -> tuple[Path, Path] | None:
    """The catalog's database file and its write-ahead log (None for an in-memory catalog)."""
    catalog = catalog_file(con)
    return (catalog, catalog.with_name(catalog.name + ".wal")) if catalog is not None else None


def protected_file(con: duckdb.DuckDBPyConnection, target: str | os.PathLike[str]) -> str | None:
    """Why `target` must never be overwritten by a query result written to a file: it is the catalog itself,
    its write-ahead log, or a file the catalog reads an image or caption from (a copy that may be the only one),
    by any name: a link to one, a path through a linked folder, a hard link. None when it is none of these."""
    given = Path(target).expanduser()
    target = given.resolve()
    catalog, wal = catalog_files(con) or (None, None)
    for own, what in ((catalog, "the catalog"), (wal, "the catalog write-ahead log")):
        if own is not None and (target == own or _same_file(target, own)):
            return f"{target} is {what} this query reads"
    if os.path.isdir(target):
        # a folder (EXPORT DATABASE writes files into it): one the catalog reads images from, or holding the catalog
        inside = str(target) + os.sep
        cursor = con.cursor()
        try:
            held = cursor.execute("SELECT count(*) FROM paths WHERE starts_with(path, ?) OR starts_with(path, ?)",
                                  [inside, str(given.absolute()) + os.sep]).fetchall()[0][0]
        finally:
            cursor.close()
        if held or (catalog is not None and str(catalog).startswith(inside)):
            return f"{target} is a folder the catalog reads images from, or holds the catalog"
        return None
    if target.is_file() and os.stat(target).st_nlink > 1:
        return f"{target} has other names (hard links), which may be an image or the catalog"
    name, (stem, extension) = target.name, os.path.splitext(target.name)
    caption = extension.lower() in (".txt", ".caption")
    cursor = con.cursor()
    try:
        # by name: the path as given or resolved, or one whose file name matches, compared by what the file is
        candidates = [path for (path,) in cursor.execute(
            "SELECT path FROM paths WHERE parse_filename(path) = ? OR (? AND parse_filename(path, true) = ?)",
            [name, caption, stem]).fetchall()]
    finally:
        cursor.close()
    for path in candidates:
        if os.path.basename(path) == name and (path in (str(target), str(given.absolute())) or _same_file(path, target)):
            return f"{target} is an image file the catalog reads"
        if caption and os.path.splitext(os.path.basename(path))[0] == stem:
            sidecar = os.path.splitext(path)[0] + extension
            if sidecar in (str(target), str(given.absolute())) or os.path.dirname(path) == str(target.parent) \
                    or _same_file(sidecar, target) or _same_file(os.path.dirname(path), target.parent):
                return f"{target} is the caption file of {path}, which the catalog reads"
    return None


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name the same file or folder (False when either is missing)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_version(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    have = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_migrations'"
    ).fetchall()[0][0]
    if not have:
        raise CatalogError(f"{path} is not a workbench catalog (no schema_migrations table).")


def applied_migrations(con: duckdb.DuckDBPyConnection) -> list[int]:
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMP DEFAULT current_timestamp)"
    )
    return [row[0] for row in con.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()]


def pending_migrations(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The migrations this catalog lacks (a read-only connection, as `workbench sql` opens it, applies none)."""
    try:
        done = {row[0] for row in con.execute("SELECT version FROM schema_migrations").fetchall()}
    except duckdb.Error:
        return []
    return [name for version, name, _ in _migration_files() if version not in done]


def migrate(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Apply every migration not yet recorded, each in its own transaction; refresh the views."""
    done = set(applied_migrations(con))
    applied = []
    for version, name, sql in _migration_files():
        if version in done:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(sql)
            con.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", [version, name])
            con.execute("COMMIT")
        except duckdb.Error as error:
            with contextlib.suppress(duckdb.Error):  # a failed COMMIT may have ended the transaction already
                con.execute("ROLLBACK")
            why = f"migration {name} failed ({str(error).splitlines()[0]})"
            if "already exists" in str(error):
                # schema_migrations edited by hand (in another DuckDB client): a migration the catalog has ran again
                raise CatalogError(
                    f"The catalog could not be brought up to date: {why}. Its schema_migrations table may have lost rows "
                    "(edited outside the workbench). The catalog is as it was; restore it from a copy, or put the "
                    "missing rows back in schema_migrations.") from error
            raise CatalogError(f"The catalog could not be brought up to date: {why}. The catalog is as it was "
                               "(a full disk or a file that cannot be written is the usual cause).") from error
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            raise
        applied.append(name)
    known = {v for v, _, _ in _migration_files()}
    newer = done - known
    if newer:
        raise CatalogError(
            f"This catalog was written by a newer workbench (migrations {sorted(newer)}); upgrade workbench."
        )
    _refresh_views(con, force=bool(applied))
    return applied


def _refresh_views(con: duckdb.DuckDBPyConnection, *, force: bool) -> None:
    """Recreate the views when views.sql changed since they were made (or a migration ran)."""
    sql = _views_sql()
    digest = hashlib.sha256(sql.encode()).hexdigest()
    con.execute("CREATE TABLE IF NOT EXISTS schema_views (digest VARCHAR)")
    current = con.execute("SELECT digest FROM schema_views").fetchall()
    # a view dropped or replaced by hand (in the DuckDB shell or through the Python API; `sql --write` refuses both)
    # is made again: every step reads them. Replacing a view drops its comment, which is how it is told
    present = {row[0] for row in con.execute(
        "SELECT view_name FROM duckdb_views() WHERE NOT internal AND database_name = current_database() "
        "AND comment IS NOT NULL").fetchall()}
    missing = _builtin_views() - present
    if force or missing or current != [(digest,)]:
        con.execute("BEGIN TRANSACTION")
        con.execute(sql)
        con.execute("DELETE FROM schema_views")
        con.execute("INSERT INTO schema_views VALUES (?)", [digest])
        con.execute("COMMIT")


_ROLLED_BACK: set[int] = set()  # connections inside `rolled_back`: a step's own transactions join that one


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """Run the block in one transaction: committed if it finishes, rolled back if it raises (inside `rolled_back`,
    it is part of that one, which is always rolled back)."""
    if id(con) in _ROLLED_BACK:
        yield con
        return
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


@contextmanager
def rolled_back(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """Run the block, step writes and their run records included, in one transaction that is always rolled back:
    a dry run of a step that writes, which sees its own writes while it runs."""
    con.execute("BEGIN TRANSACTION")
    _ROLLED_BACK.add(id(con))
    try:
        yield con
    finally:
        _ROLLED_BACK.discard(id(con))
        con.execute("ROLLBACK")


# --- provenance -------------------------------------------------------------


@dataclass
class RunRecord:
    """A step run being recorded in the `runs` table."""

    run_id: int
    step: str
    started: float
    counts: dict[str, Any] = field(default_factory=dict)


def run_status(error: BaseException | None) -> str:
    """'ok', 'cancelled' (the user stopped it) or 'failed'."""
    if error is None:
        return "ok"
    return "cancelled" if error.__class__.__name__ == "StepCancelled" or isinstance(error, KeyboardInterrupt) else "failed"


def start_run(con: duckdb.DuckDBPyConnection, step: str, params: dict[str, Any]) -> RunRecord:
    """Insert a 'running' row for a step run (first marking those of processes now gone 'interrupted')."""
    refuse_read_only(con, f"The {step} step")
    _mark_abandoned_runs(con)
    run_id = con.execute(
        "INSERT INTO runs (step, started_at, status, params, pid, host) VALUES (?, ?, 'running', ?, ?, ?) RETURNING run_id",
        [step, datetime.now(), json.dumps(params, default=str), os.getpid(), socket.gethostname()],
    ).fetchall()[0][0]
    return RunRecord(run_id=run_id, step=step, started=time.perf_counter())


def _mark_abandoned_runs(con: duckdb.DuckDBPyConnection) -> None:
    """'running' rows whose process on this host is gone (killed by SIGKILL, a crash) say 'interrupted' instead of
    running forever. A process that is still alive keeps its row: a model training with the catalog let go, another
    TUI step in this process."""
    rows = con.execute(
        "SELECT run_id, pid FROM runs WHERE status = 'running' AND pid IS NOT NULL AND host = ?", [socket.gethostname()]
    ).fetchall()
    gone = [run_id for run_id, pid in rows if not _process_alive(pid)]
    if gone:
        con.execute(
            "UPDATE runs SET status = 'interrupted', error = coalesce(error, 'the process ended without recording the "
            "run (killed, or it crashed)') WHERE list_contains(?, run_id)",
            [gone],
        )


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    # a killed process its parent has not reaped yet (`timeout -s KILL`, a container's init) is a zombie: gone
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):  # no /proc (macOS): signal 0 is all there is to ask
        return True


def finish_run(con: duckdb.DuckDBPyConnection, record: RunRecord, error: BaseException | None = None) -> None:
    """Write a step run's counts, seconds and status (from the error that ended it, if any)."""
    con.execute(
        "UPDATE runs SET finished_at = ?, seconds = ?, status = ?, counts = ?, error = ? WHERE run_id = ?",
        [
            datetime.now(),
            time.perf_counter() - record.started,
            run_status(error),
            json.dumps(record.counts, default=str),
            None if error is None else f"{error.__class__.__name__}: {error}",
            record.run_id,
        ],
    )


def last_run(con: duckdb.DuckDBPyConnection, step: str) -> tuple[Any, str | None] | None:
    """(started_at, params as recorded) of the last finished run of `step`; None when there was none."""
    return first_row(con.execute(
        "SELECT started_at, params FROM runs WHERE step = ? AND status = 'ok' ORDER BY run_id DESC LIMIT 1", [step]
    ))


def last_run_params(con: duckdb.DuckDBPyConnection, step: str) -> dict[str, Any]:
    """The parameters the last finished run of `step` recorded; {} when there was none."""
    row = last_run(con, step)
    return json.loads(row[1]) if row and row[1] else {}


@contextmanager
def record_run(con: duckdb.DuckDBPyConnection, step: str, params: dict[str, Any]) -> Iterator[RunRecord]:
    """Record a step run: a 'running' row first, then its counts, seconds and status."""
    record = start_run(con, step, params)
    try:
        yield record
    except BaseException as error:  # record the failure, then let it propagate
        finish_run(con, record, error)
        raise
    finish_run(con, record)


# --- read-only SQL ------------------------------------------------------------

# What reads: a SELECT with no data-modifying WITH (DESCRIBE, SHOW and SUMMARIZE are SELECTs), an EXPLAIN of one
# (_reads_only), and the PRAGMAs that only look (`PRAGMA table_info('images')`, as harlequin users type). Everything
# else (INSERT, CREATE, COPY, ATTACH, SET, CALL, other PRAGMAs, ...) needs --write.
_READ_PRAGMAS = {"table_info", "show", "show_tables", "show_tables_expanded", "show_databases", "database_list",
                 "database_size", "storage_info", "version", "platform", "functions", "collations", "metadata_info"}


def _statements(sql: str) -> list:
    try:
        return duckdb.extract_statements(sql)
    except duckdb.Error as error:
        raise CatalogError(f"SQL error: {error}") from error


def statement_kinds(sql: str) -> list[str]:
    """The DuckDB statement type of each statement in `sql` (e.g. 'SELECT', 'INSERT')."""
    return [s.type.name.upper() for s in _statements(sql)]


# the query nodes of a SELECT that only reads; a data-modifying CTE (`WITH x AS (DELETE … RETURNING *) SELECT …`)
# is typed SELECT all the same, and holds a DELETE_, UPDATE_ or INSERT_QUERY_NODE
_READ_QUERY_NODES = {"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"}
# EXPLAIN ANALYZE runs the statement it explains; plain EXPLAIN is judged by it too (one rule, both front ends)
_EXPLAINED = re.compile(r"(?:\s|--[^\n]*\n?|/\*.*?\*/)*EXPLAIN\s+(?:ANALY[SZ]E\b|\([^)]*\))?(?P<statement>.*)\Z",
                        re.IGNORECASE | re.DOTALL)


_PARSERS = threading.local()


def _query_node_types(tree: Any, found: set[str]) -> set[str]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key == "type" and isinstance(value, str) and value.endswith("_NODE"):
                found.add(value)
            _query_node_types(value, found)
    elif isinstance(tree, list):
        for value in tree:
            _query_node_types(value, found)
    return found


def _select_only_reads(query: str) -> bool:
    """A SELECT statement's parse tree (DuckDB's json_serialize_sql; parsed, not run) holds no data-modifying CTE."""
    parser = getattr(_PARSERS, "connection", None)
    if parser is None:  # an in-memory one per thread: the statement is only parsed, and threads do not share connections
        parser = _PARSERS.connection = duckdb.connect()
    try:
        tree = json.loads(parser.execute("SELECT json_serialize_sql(?::VARCHAR)", [query]).fetchall()[0][0])
    except duckdb.Error:
        return False
    return not tree.get("error") and _query_node_types(tree, set()) <= _READ_QUERY_NODES


def _explained(statement) -> list:
    """The statements an EXPLAIN statement explains ([] when they do not parse: judged as no read, no file)."""
    explained = _EXPLAINED.match(statement.query)
    try:
        return duckdb.extract_statements(explained.group("statement")) if explained else []
    except duckdb.Error:
        return []


def _reads_only(statement) -> bool:
    kind = statement.type.name.upper()
    if kind == "PRAGMA":
        name = re.match(r"\s*PRAGMA\s+(\w+)", statement.query, re.IGNORECASE)
        return bool(name) and name.group(1).lower() in _READ_PRAGMAS
    if kind == "EXPLAIN":
        inner = _explained(statement)
        return len(inner) == 1 and _reads_only(inner[0])
    return kind == "SELECT" and _select_only_reads(statement.query)


def is_read_only_sql(sql: str) -> bool:
    """True when every statement in `sql` only reads (SELECT, EXPLAIN, DESCRIBE, SHOW, PRAGMA table_info...)."""
    statements = _statements(sql)
    return bool(statements) and all(_reads_only(s) for s in statements)


def run_sql(con: duckdb.DuckDBPyConnection, sql: str, *, write: bool = False) -> duckdb.DuckDBPyRelation | None:
    """Run user SQL; refuse statements that write unless `write` is set."""
    statements = _statements(sql)
    if not statements:
        raise CatalogError("No SQL to run: the query is empty.")
    if not write and not all(_reads_only(s) for s in statements):
        kinds = ", ".join(sorted({_kind(s) for s in statements if not _reads_only(s)}))
        raise CatalogError(
            f"Refused: this SQL may write to the catalog ({kinds}). SQL is read-only by default; "
            "pass --write if you mean to change the catalog."
        )
    # several statements that write run as one transaction: a failing one leaves the catalog as it was, not half
    # changed (unless the SQL handles transactions itself)
    atomic = write and len(statements) > 1 and not any(s.type.name.upper() == "TRANSACTION" for s in statements)
    for statement in statements if write else ():
        changed = _builtin_object_changed(statement)
        if changed and changed[0] == "view":
            view = changed[1]
            raise CatalogError(
                f"Refused: {view} is a view the workbench defines, and its steps read it (training and export read "
                f"dataset); changed here, they would disagree with it. Make a view of your own under another name "
                f"(CREATE VIEW my_{view} AS SELECT * FROM {view} WHERE …), or a TEMP view for this session.")
        if changed:
            raise CatalogError(
                f"Refused: {changed[1]} is a table of the workbench's catalog, which its steps and migrations rely on: it "
                "is not dropped, replaced or altered here. Change its rows (INSERT, UPDATE, DELETE; not the rows of "
                "schema_migrations or schema_views, nor a DELETE of images or paths), or keep data of your own in a table "
                "of your own.")
        refusal = _protected_rows_changed(statement)
        if refusal:
            raise CatalogError(refusal)
    # A cursor of its own: a half-fetched result elsewhere on `con` must not block the user's query.
    cursor = con.cursor()
    targets = [target for statement in statements if write for target in _copy_targets(statement)]
    if targets:
        checking = cursor.cursor()
        try:
            reasons = [protected_file(checking, target) for target in targets]
        finally:
            checking.close()
        if any(reasons):
            raise CatalogError(f"Refused: {next(filter(None, reasons))}; COPY … TO would overwrite it. Give another file.")
    ran = 0
    try:
        if atomic:
            cursor.execute("BEGIN TRANSACTION")
        for statement in statements[:-1]:  # shown is the last statement's result, as in harlequin
            cursor.execute(statement).fetchall()  # drained: an open result would block the next statement
            ran += 1
        last = statements[-1]
        if atomic and _reads_only(last):
            # a query runs when its rows are fetched, after the commit: run once here too, so that its error (a bad
            # cast, say) still undoes the writes before it
            cursor.execute(last).fetchall()
        result = cursor.sql(last.query)
        if atomic:
            cursor.execute("COMMIT")
        return result
    except duckdb.Error as error:
        if atomic:
            with contextlib.suppress(duckdb.Error):
                cursor.execute("ROLLBACK")
            raise CatalogError(f"SQL error: {error}\nNothing was changed: the {len(statements)} statements run as one "
                               "transaction.") from error
        if write and ran:  # its own BEGIN/COMMIT/ROLLBACK: what ran before the failing statement is as it left it
            raise CatalogError(f"SQL error in statement {ran + 1} of {len(statements)}: {error}\nThe {ran} before it ran, "
                               "and what they changed outside a transaction of the SQL's own stays: SQL with its own "
                               "BEGIN, COMMIT or ROLLBACK is not run as one transaction.") from error
        raise CatalogError(f"SQL error: {error}") from error


_BOOKKEEPING_TABLES = ("schema_migrations", "schema_views")  # the catalog's record of its own schema
# the record of every file the catalog knows: ingest reads a known path as unchanged, so a deleted images row was
# never ingested again, and its paths row was left pointing at nothing
_FILE_RECORD_TABLES = ("images", "paths")


def _protected_rows_changed(statement) -> str | None:
    """Why a statement that writes may not run: it writes rows of the catalog's schema record, or deletes rows of its
    file record (DELETE, TRUNCATE); None when neither. Read from the SQL's tokens: the table each INSERT, UPDATE,
    DELETE, TRUNCATE or COPY … FROM writes, at the start of the statement or of a parenthesis (a data-modifying WITH, an
    EXPLAIN ANALYZE); reading those tables, or a column named `delete`, is no write to them."""
    if _reads_only(statement):
        return None
    for verb, table in _rows_written(statement.query):
        if table in _BOOKKEEPING_TABLES:
            return (f"Refused: {table} is where the catalog records its own schema; a change to it makes the "
                    "workbench run its migrations again, which breaks the catalog. It is not written here.")
        if verb in ("delete", "truncate") and table in _FILE_RECORD_TABLES:
            return (f"Refused: the rows of {table} are the catalog's record of your image files, which every step "
                    "reads; a deleted row would leave its image unknown to the catalog, and ingest would not find it "
                    "again. Exclude images instead (`workbench exclude`, or INSERT INTO exclusions): the rows stay, out "
                    "of the dataset, and nothing on disk is touched.")
    return None


# the words that may come before a statement's verb: none, a parenthesis (WITH x AS (DELETE …)), EXPLAIN [ANALYZE]
_BEFORE_A_VERB = {None, "(", ")", "explain", "analyze"}
# verb -> the words between it and the table it writes
_VERB_LEADS = {"insert": ("into",), "update": (), "delete": ("from",), "truncate": ("table",), "copy": ()}


def _rows_written(sql: str) -> list[tuple[str, str]]:
    """(verb, table) of every INSERT, UPDATE, DELETE, TRUNCATE and COPY … FROM in `sql`, the table lower-cased and
    without its schema (a quoted name unquoted)."""
    words = [(text[1:-1].replace('""', '"') if kind == "quoted" else text).lower() if kind in ("word", "quoted") else text
             for kind, text, _ in _sql_tokens(sql) if kind != "space"]
    written = []
    for at, word in enumerate(words):
        if word not in _VERB_LEADS or (words[at - 1] if at else None) not in _BEFORE_A_VERB:
            continue
        rest = words[at + 1:]
        if word == "insert":  # INSERT OR REPLACE / OR IGNORE INTO
            while rest[:1] and rest[0] in ("or", "replace", "ignore"):
                rest = rest[1:]
        for lead in _VERB_LEADS[word]:
            if rest[:1] == [lead]:
                rest = rest[1:]
        while len(rest) > 2 and rest[1] == ".":  # catalog.schema.table: the last name is the table
            rest = rest[2:]
        if not rest:
            continue
        if word == "copy" and (len(rest) < 2 or rest[1] != "from"):  # COPY t TO …, COPY (query) TO …: a read
            continue
        written.append((word, rest[0]))
    return written


def _kind(statement) -> str:
    """A statement's kind as a refusal names it: a data-modifying WITH is typed SELECT, EXPLAIN ANALYZE EXPLAIN."""
    kind = statement.type.name.upper()
    if kind == "SELECT":
        return "WITH … DELETE/UPDATE/INSERT"
    if kind == "EXPLAIN":
        return "EXPLAIN ANALYZE of a write"
    return kind


# COPY … TO options that write a folder of files, or over what is there: not run by `--write` (a review deleted an
# image folder with PARTITION_BY … OVERWRITE)
_FOLDER_WRITING_OPTIONS = {"PARTITION_BY", "OVERWRITE", "OVERWRITE_OR_IGNORE", "FILE_PATTERN", "PER_THREAD_OUTPUT",
                           "APPEND", "FILENAME_PATTERN", "WRITE_PARTITION_COLUMNS"}


def _builtin_object_changed(statement) -> tuple[str, str] | None:
    """("view" or "table", name) of the workbench's own view (dataset, images_view, ...) or table (images, captions,
    ...) a CREATE [OR REPLACE], DROP or ALTER replaces, drops or changes, if it does; a TEMP one of that name (this
    connection's alone) is the user's."""
    if statement.type.name.upper() == "EXPLAIN":  # EXPLAIN ANALYZE runs what it explains
        return next(filter(None, map(_builtin_object_changed, _explained(statement))), None)
    if statement.type.name.upper() not in ("CREATE", "DROP", "ALTER"):
        return None
    tokens = [token for token in _sql_tokens(statement.query) if token[0] != "space"]
    words = [token[1].upper() if token[0] == "word" and token[2] == 0 else None for token in tokens]
    at = next((i for i, word in enumerate(words) if word in ("VIEW", "TABLE")), None)
    if at is None or {"TEMP", "TEMPORARY"} & set(words[:at]):
        return None
    name, part_next = None, True
    for kind, text, depth in tokens[at + 1:]:
        if kind == "word" and text.upper() in ("IF", "NOT", "EXISTS") and name is None:
            continue
        if part_next and kind in ("word", "quoted"):
            name, part_next = text[1:-1].replace('""', '"') if kind == "quoted" else text, False
        elif not part_next and kind == "other" and text == ".":  # schema.name: the last part is the object
            part_next = True
        else:
            break
    if name is None:
        return None
    # whichever keyword names it: DuckDB runs ALTER TABLE dataset RENAME TO … on a view too
    if name.lower() in {view.lower() for view in _builtin_views()}:
        return "view", name
    return ("table", name) if name.lower() in _builtin_tables() else None


@functools.cache
def _builtin_views() -> frozenset[str]:
    """The views views.sql makes (read once per process)."""
    return frozenset(re.findall(r"CREATE OR REPLACE VIEW (\w+)", _views_sql()))


@functools.cache
def _builtin_tables() -> frozenset[str]:
    """The tables the migrations make, lower-cased, and the two the catalog keeps its schema in (read once)."""
    return frozenset({"schema_migrations", "schema_views"} | {
        table.lower() for _, _, sql in _migration_files() for table in re.findall(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+)", sql)})


def _copy_targets(statement) -> list[str]:
    """The files a COPY … TO (or EXPLAIN ANALYZE of one) writes, and the folders EXPORT DATABASE writes into.

    Read from the SQL's tokens; a form the tokens cannot tell for sure ($-quoting, E'…' strings, a target that is not
    one plain quoted path, options that write folders) is refused (CatalogError) rather than trusted."""
    kind = statement.type.name.upper()
    if kind == "EXPLAIN":
        return [target for one in _explained(statement) for target in _copy_targets(one)]
    if kind not in ("COPY", "EXPORT"):
        return []
    text = statement.query
    if "$" in text or re.search(r"(?<![\w'])[eE]'", text):
        raise CatalogError(f"{kind} with $-quoting or E'…' strings is not run by --write here: write its strings as "
                           "plain 'quoted text', so that where it writes is checked against the catalog and its images.")
    tokens = [token for token in _sql_tokens(text) if token[0] != "space"]
    if kind == "EXPORT":  # EXPORT DATABASE 'folder' (…): its one string is the folder
        return [next((token[1] for token in tokens if token[0] == "string"), "")]
    options = {token[1].upper() for token in tokens if token[0] == "word"} & _FOLDER_WRITING_OPTIONS
    targets = []
    for at, (what, word, depth) in enumerate(tokens):
        if what == "word" and word.upper() == "TO" and depth == 0:
            following = tokens[at + 1] if at + 1 < len(tokens) else None
            if following is None or following[0] != "string":
                # a target in another form (a name, an expression) cannot be checked: refused, not trusted
                raise CatalogError("COPY … TO takes its file as a plain 'quoted path' here, so that it is checked "
                                   "against the catalog and its images.")
            targets.append(re.sub(r"^file://", "", following[1], flags=re.IGNORECASE))  # DuckDB reads file:// as the path
    if targets and options:
        raise CatalogError(f"COPY … TO with {', '.join(sorted(options))} writes a folder of files (or over one): not run "
                           "by --write here. Write one file, or run it in the DuckDB shell.")
    return targets


def _sql_tokens(sql: str) -> Iterator[tuple[str, str, int]]:
    """(kind, text, parenthesis depth) of the SQL's tokens: 'string' ('…', its value), 'quoted' ("…"), 'word', 'space'
    (comments too) and 'other'. Enough to find what COPY writes to ($-quoting is refused before it is read)."""
    depth, at = 0, 0
    while at < len(sql):
        char = sql[at]
        if sql.startswith("--", at):
            end = sql.find("\n", at)
            end = len(sql) if end < 0 else end
            yield "space", sql[at:end], depth
        elif sql.startswith("/*", at):
            end = sql.find("*/", at + 2)
            end = len(sql) if end < 0 else end + 2
            yield "space", sql[at:end], depth
        elif char == "'":
            match = re.compile(r"'((?:[^']|'')*)'").match(sql, at)
            end = match.end() if match else len(sql)
            yield "string", (match.group(1).replace("''", "'") if match else sql[at + 1:]), depth
        elif char == '"':
            match = re.compile(r'"((?:[^"]|"")*)"').match(sql, at)
            end = match.end() if match else len(sql)
            yield "quoted", sql[at:end], depth
        elif char.isspace():
            end = at + 1
            while end < len(sql) and sql[end].isspace():
                end += 1
            yield "space", sql[at:end], depth
        elif char.isalnum() or char == "_":
            match = re.compile(r"\w+").match(sql, at)
            end = match.end()
            yield "word", match.group(0), depth
        else:
            depth += (char == "(") - (char == ")")
            end = at + 1
            yield "other", char, depth
        at = end
