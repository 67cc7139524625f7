"""Catalog queries behind the screens: plain functions over a DuckDB cursor (no Textual here)."""

from __future__ import annotations

import itertools
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import duckdb

from workbench.catalog import CatalogError, is_read_only_sql

# Columns of images_view that are lists or raw hashes: shown in details, not in the table.
HIDDEN_COLUMNS = ("paths", "missing_paths", "phash", "dhash", "path_bytes")
PAGE_SIZE = 100
_table_ids = itertools.count(1)


@dataclass
class Filter:
    """What the user typed: a SQL WHERE clause over images_view, or plain text searched in path, caption and tags."""

    text: str = ""
    sort_column: str = "path"
    descending: bool = False

    def where(self, cur: duckdb.DuckDBPyConnection) -> tuple[str, list[Any], str]:
        """(SQL condition, parameters, kind) where kind is 'all', 'sql' or 'text'."""
        text = self.text.strip()
        if not text:
            return "true", [], "all"
        quoted = len(text) > 2 and text[0] == text[-1] == '"' and '"' not in text[1:-1]
        if quoted:  # "…": always a text search, whatever the words
            return _text_search(text[1:-1])
        problem = _where_clause_problem(cur, text)
        if problem is None:
            return f"({text})", [], "sql"
        if _SQL_LOOKING.search(text):
            # Meant as SQL but wrong: say why rather than silently searching for the text.
            raise CatalogError(f"Filter is not a valid WHERE clause over images_view: {problem}")
        return _text_search(text)


def _text_search(words: str) -> tuple[str, list[Any], str]:
    """Plain text found in the path, caption or tags, or an image id starting with it."""
    return ("(path ILIKE ? OR caption ILIKE ? OR array_to_string(tags, ', ') ILIKE ? OR image_id LIKE ?)",
            [f"%{words}%", f"%{words}%", f"%{words}%", f"{words}%"], "text")

# Operators and SQL-only phrases: text with these was meant as a WHERE clause. Written as SQL writes them, so
# ordinary words ("cats like milk", "wow!", "coffee; tea", "in (the) box") stay a text search.
_SQL_LOOKING = re.compile(
    r"[<>=]|!=|;\s*(DROP|DELETE|INSERT|UPDATE|CREATE|ALTER|SELECT|ATTACH|COPY|PRAGMA|SET)\b"
    r"|\w\s+IS\s+(NOT\s+)?NULL\b|\b(I?LIKE|GLOB|SIMILAR TO)\s+'|\bBETWEEN\s+\S+\s+AND\b|\bIN\s*\(\s*('|\d|SELECT\b)",
    re.IGNORECASE,
)


def _where_clause_problem(cur: duckdb.DuckDBPyConnection, text: str) -> str | None:
    """None when `text` binds as one read-only WHERE condition over images_view, else why not."""
    sql = f"SELECT 1 FROM images_view WHERE ({text}) LIMIT 0"
    try:
        if len(duckdb.extract_statements(sql)) != 1 or not is_read_only_sql(sql):
            return "only one condition is allowed, no further statements"
        cur.execute(sql)
        # WHERE casts any value to true/false, so a lone column name or number binds too: `caption` would then
        # fail on the first row that is not 'true'. A word that is no condition is a plain-text search.
        kind = cur.execute(f"DESCRIBE SELECT ({text}) AS condition FROM images_view").fetchall()[0][1]
    except (duckdb.Error, CatalogError) as error:
        return str(error).split("\n")[0]
    if kind not in ("BOOLEAN", '"NULL"', "NULL"):
        return f"it is a {kind} value, not a true/false condition"
    return None


def view_columns(cur: duckdb.DuckDBPyConnection, view: str = "images_view") -> list[str]:
    """Column names of a view or table, in order."""
    return [row[0] for row in cur.execute(f"DESCRIBE {view}").fetchall()]


def table_columns(cur: duckdb.DuckDBPyConnection) -> list[str]:
    """The images_view columns the browser table shows (everything but lists and raw hashes)."""
    return [c for c in view_columns(cur) if c not in HIDDEN_COLUMNS]


@dataclass
class BrowseResult:
    """A filtered, sorted snapshot of image rows held in a temp table on its own cursor, paged by row number.

    Sorting 100k rows of images_view costs a few hundred ms once; every page after that is a
    keyset lookup on the row number, a few ms.
    """

    cursor: duckdb.DuckDBPyConnection
    table: str
    columns: list[str]
    total: int
    filter: Filter
    kind: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False

    def page(self, offset: int, limit: int = PAGE_SIZE) -> list[tuple] | None:
        """Rows offset..offset+limit-1 (0-based) of the snapshot; None once a newer snapshot replaced it."""
        with self.lock:
            if self.closed:
                return None
            return self.cursor.execute(
                f"SELECT * EXCLUDE (rn) FROM {self.table} WHERE rn > ? AND rn <= ? ORDER BY rn",
                [offset, offset + limit],
            ).fetchall()

    def position_of(self, image_id: str) -> int | None:
        """0-based position of an image in the snapshot, or None if it is not (or no longer) there."""
        with self.lock:
            if self.closed:
                return None
            row = self.cursor.execute(f"SELECT rn FROM {self.table} WHERE image_id = ?", [image_id]).fetchone()
            return None if row is None else row[0] - 1

    def image_ids(self, *, ok_only: bool = False) -> list[str]:
        """Every image_id in the snapshot, in order (for bulk edits over the filtered rows).

        ok_only: leave out images that failed to load (status 'error'): nothing to caption there.
        """
        where = "WHERE status = 'ok'" if ok_only else ""
        with self.lock:
            if self.closed:
                raise CatalogError("The filter changed meanwhile; try again.")
            return [r[0] for r in self.cursor.execute(f"SELECT image_id FROM {self.table} {where} ORDER BY rn").fetchall()]

    def close(self) -> None:
        with self.lock:
            self.closed = True
            try:
                self.cursor.close()
            except duckdb.Error:
                pass


def browse(con: duckdb.DuckDBPyConnection, flt: Filter) -> BrowseResult:
    """Snapshot the images matching `flt` in sort order into a temp table on a new cursor."""
    cur = con.cursor()
    columns = table_columns(cur)
    if flt.sort_column not in columns:
        raise CatalogError(f"No column {flt.sort_column!r} to sort by.")
    condition, params, kind = flt.where(cur)
    order = f'"{flt.sort_column}" {"DESC" if flt.descending else "ASC"} NULLS LAST, image_id'
    table = f"browse_rows_{next(_table_ids)}"
    select = ", ".join(f'"{c}"' for c in columns)
    try:
        cur.execute(
            f"CREATE TEMP TABLE {table} AS SELECT row_number() OVER (ORDER BY {order}) AS rn, {select} "
            f"FROM images_view WHERE {condition}",
            params,
        )
    except duckdb.Error as error:
        cur.close()
        raise CatalogError(f"Filter error: {error}") from error
    total = cur.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    return BrowseResult(cursor=cur, table=table, columns=columns, total=total, filter=flt, kind=kind)


def first_page(con: duckdb.DuckDBPyConnection, flt: Filter, limit: int = PAGE_SIZE) -> tuple[list[str], list[tuple]]:
    """The first `limit` rows for `flt` by a top-N query: about half the work of a snapshot, so the
    first screen fills sooner while the snapshot for paging is built."""
    cur = con.cursor()
    try:
        columns = table_columns(cur)
        condition, params, _ = flt.where(cur)
        order = f'"{flt.sort_column}" {"DESC" if flt.descending else "ASC"} NULLS LAST, image_id'
        select = ", ".join(f'"{c}"' for c in columns)
        rows = cur.execute(f"SELECT {select} FROM images_view WHERE {condition} ORDER BY {order} LIMIT ?", [*params, limit]).fetchall()
        return columns, rows
    finally:
        cur.close()


# --- details ----------------------------------------------------------------

# Tables whose rows about an image the details pane shows under their own heading.
_KNOWN_DETAIL_TABLES = ("captions", "duplicates", "exclusions", "keeper_choice", "caption_choice")
_SKIP_DETAIL_TABLES = {"images", "paths", "hashes", "schema_migrations", "runs"}


def image_details(con: duckdb.DuckDBPyConnection, image_id: str) -> dict[str, Any]:
    """Everything the catalog knows about one image: its images_view row, captions by source,
    and its rows in every other table keyed by image_id (scores, buckets, ... as peers add them)."""
    cur = con.cursor()
    try:
        relation = cur.execute("SELECT * FROM images_view WHERE image_id = ?", [image_id])
        names = [d[0] for d in relation.description]
        row = relation.fetchone()
        if row is None:
            return {}
        details: dict[str, Any] = {"row": dict(zip(names, row))}
        details["captions"] = cur.execute(
            "SELECT source, text FROM caption_candidates WHERE image_id = ? ORDER BY source", [image_id]
        ).fetchall()
        details["path_bytes"] = cur.execute(
            "SELECT path_bytes FROM paths WHERE image_id = ? AND NOT missing ORDER BY seq LIMIT 1", [image_id]
        ).fetchone()
        extra: dict[str, list[dict[str, Any]]] = {}
        tables = cur.execute(
            "SELECT DISTINCT table_name FROM information_schema.columns WHERE column_name = 'image_id' "
            "AND table_schema = 'main' AND table_name IN (SELECT table_name FROM information_schema.tables "
            "WHERE table_type = 'BASE TABLE') ORDER BY table_name"
        ).fetchall()
        for (table,) in tables:
            if table in _SKIP_DETAIL_TABLES or table == "captions":
                continue
            rel = cur.execute(f'SELECT * FROM "{table}" WHERE image_id = ? LIMIT 20', [image_id])
            cols = [d[0] for d in rel.description]
            rows = [dict(zip(cols, r)) for r in rel.fetchall()]
            if rows:
                extra[table] = [{k: v for k, v in r.items() if k != "image_id"} for r in rows]
        details["tables"] = extra
        return details
    finally:
        cur.close()


def image_file(details: dict[str, Any]) -> str | None:
    """The file to open for an image: its first existing path, decoded from the exact bytes."""
    import os

    raw = details.get("path_bytes")
    if raw and raw[0] is not None:
        return os.fsdecode(bytes(raw[0]))
    row = details.get("row") or {}
    return row.get("path")


# --- counts -----------------------------------------------------------------


def table_exists(cur: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(
        cur.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'main' AND table_name = ?", [name]
        ).fetchone()[0]
    )


def catalog_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Headline counts for the pipeline screen, each from the catalog."""
    cur = con.cursor()
    try:
        one = lambda sql: cur.execute(sql).fetchone()[0]  # noqa: E731
        counts = {
            "images": one("SELECT count(*) FROM images"),
            "paths": one("SELECT count(*) FROM paths"),
            "errors": one("SELECT count(*) FROM images WHERE status = 'error'"),
            "duplicate groups": one("SELECT count(DISTINCT group_id) FROM duplicates"),
            "excluded": one("SELECT count(DISTINCT image_id) FROM exclusions"),
            "captioned": one("SELECT count(DISTINCT image_id) FROM captions"),
            "model captions": one("SELECT count(DISTINCT image_id) FROM captions WHERE source LIKE 'model:%'"),
            "dataset": one("SELECT count(*) FROM dataset"),
            "class priors": one("SELECT count(*) FROM images WHERE role = 'class_prior'"),
            "runs": one("SELECT count(*) FROM runs"),
        }
        for table in ("scores", "clip_scores", "buckets", "aspect_buckets", "training_runs"):
            if table_exists(cur, table):
                counts[table.replace("_", " ")] = one(f'SELECT count(*) FROM "{table}"')
        return counts
    finally:
        cur.close()


def last_runs(con: duckdb.DuckDBPyConnection) -> dict[str, tuple]:
    """The latest run of each step: step -> (status, finished_at, seconds, counts JSON)."""
    cur = con.cursor()
    try:
        rows = cur.execute(
            "SELECT step, status, finished_at, seconds, counts FROM runs "
            "QUALIFY row_number() OVER (PARTITION BY step ORDER BY run_id DESC) = 1"
        ).fetchall()
        return {r[0]: r[1:] for r in rows}
    finally:
        cur.close()


HISTORY_KEPT = 500  # console queries the catalog keeps (the newest)


def saved_history(con: duckdb.DuckDBPyConnection, limit: int = HISTORY_KEPT) -> list[str]:
    """The SQL console's past queries, oldest first, a query run twice in a row once."""
    cur = con.cursor()
    try:
        rows = cur.execute("SELECT sql FROM (SELECT sql, id FROM sql_history ORDER BY id DESC LIMIT ?) ORDER BY id",
                           [limit]).fetchall()
    finally:
        cur.close()
    history: list[str] = []
    for (sql,) in rows:
        if not history or history[-1] != sql:
            history.append(sql)
    return history


def save_to_history(con: duckdb.DuckDBPyConnection, sql: str, *, ok: bool) -> None:
    """Keep a console query (one that failed too, to be mended); only the newest HISTORY_KEPT stay."""
    cur = con.cursor()
    try:
        cur.execute("INSERT INTO sql_history (sql, ok) VALUES (?, ?)", [sql, ok])
        cur.execute("DELETE FROM sql_history WHERE id <= (SELECT max(id) FROM sql_history) - ?", [HISTORY_KEPT])
    finally:
        cur.close()


RUN_COLUMNS = ["run", "mode", "status", "steps", "final loss", "seconds", "clip score", "folder"]


def training_runs(con: duckdb.DuckDBPyConnection, limit: int = 200) -> tuple[list[list], list[str]]:
    """The newest training runs as rows of RUN_COLUMNS (the folder by its name), and each one's output folder."""
    import os

    cur = con.cursor()
    try:
        rows = cur.execute(
            "SELECT train_id, mode, status, steps, final_loss, seconds, clip_score, output_dir FROM training_runs "
            "ORDER BY train_id DESC LIMIT ?", [limit]).fetchall()
    finally:
        cur.close()
    return [[*row[:7], os.path.basename(row[7] or "")] for row in rows], [row[7] or "" for row in rows]
