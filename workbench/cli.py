"""The one front door: a thin typer layer over the library functions in pipelines/."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Iterator, NoReturn, Optional

import duckdb
import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from workbench import catalog as catalog_mod
from workbench.catalog import CatalogError, CatalogLockedError, first_row
from workbench.files import is_disk_full, written_whole
from workbench.images import catalog_path_text, path_text
from workbench.progress import CancellableProgress, RichProgress, StepCancelled, named_few, printable

if TYPE_CHECKING:  # the steps load when a command runs them (a fast --help)
    from pipelines.ingest import IngestSummary

app = typer.Typer(
    help="Curate an image set in a DuckDB catalog and train Stable Diffusion on it.\n\n"
    "Example: workbench ingest ./photos && workbench dedup && workbench sql \"SELECT count(*) FROM dataset\"",
    no_args_is_help=False,
    add_completion=False,
    rich_markup_mode="rich",
    # the diffusers examples and kohya spell options with underscores (--train_batch_size): commands pasted from
    # their docs run as they are. click applies this to option and command names and choice values, never to
    # what an option is given
    context_settings={"token_normalize_func": lambda token: token.replace("_", "-"), "help_option_names": ["-h", "--help"]},
)
# user text (captions, paths, SQL results) is never read as markup or :emoji: codes: cells go in as Text, and
# strings with our own markup escape what they quote


class _WholeLinesConsole(Console):
    """Rich output fits a terminal's width; piped or redirected (and no COLUMNS given), lines stay whole: rich's
    default of 80 columns cut paths, model ids and the commands notes suggest in two, where scripts read them."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self._width is None and not self.is_terminal and not os.environ.get("COLUMNS"):
            return ConsoleDimensions(100_000, size.height)
        return size


console = _WholeLinesConsole(emoji=False)
err_console = _WholeLinesConsole(stderr=True, emoji=False)


def _root_catalog_first(ctx: typer.Context, value: Optional[Path]) -> Optional[Path]:
    """`workbench --catalog X ingest …` means `workbench ingest --catalog X …` (the command's own flag still wins)."""

    def from_command_line(context) -> bool:
        source = context.get_parameter_source("catalog")
        return source is not None and source.name == "COMMANDLINE"  # by name: typer vendors its own click

    root = ctx.find_root()
    if root is not ctx and from_command_line(root) and not from_command_line(ctx):
        return root.params["catalog"]
    return value


CatalogOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--catalog",
        "-c",
        help="Catalog file (default: $WORKBENCH_CATALOG or ./workbench.duckdb).",
        envvar=catalog_mod.CATALOG_ENV,
        show_default=False,
        callback=_root_catalog_first,
    ),
]


EXIT_CATALOG_BUSY = 75  # sysexits' EX_TEMPFAIL: another process holds the catalog; the same command may pass later


def fail(message: str, code: int = 2) -> None:
    """Print a short error for people and exit (2 = usage or input error)."""
    err_console.print(f"[bold red]Error:[/] {escape(printable(message))}")  # paths in it may hold terminal escapes
    raise typer.Exit(code)


def open_catalog(path: Optional[Path], *, read_only: bool = False, create: bool = False, wait_seconds: float = 0.0,
                 reads_only: bool = False):
    """Open the catalog; only commands that add images (create=True) may start a new one. A command that `reads_only`
    opens it read-only where it may not be written (a read-only disk, another user's folder)."""
    resolved = Path(path).expanduser() if path is not None else catalog_mod.default_catalog_path()
    if not create and not resolved.exists():
        fail(f"No catalog at {resolved}. Start one with `workbench ingest FOLDER`, or pass --catalog PATH.")
    wait = max(wait_seconds, _WAIT_SECONDS)

    def say_waiting(holder: str) -> None:  # a silent wait read as a hang in a cron log
        err_console.print(Text(f"Waiting up to {wait:g} s for the catalog {resolved}: {holder} holds it.", style="yellow"))

    try:
        con = catalog_mod.connect(path, read_only=read_only, wait_seconds=wait, on_wait=say_waiting)
    except CatalogLockedError as error:
        # its own exit status (EX_TEMPFAIL), so a script can retry a busy catalog and not a real failure
        fail(str(error) + ("" if wait else " (`workbench --wait SECONDS COMMAND` waits for it)"), code=EXIT_CATALOG_BUSY)
    except CatalogError as error:
        if reads_only and not read_only and _not_writable(error):
            return open_catalog(path, read_only=True, wait_seconds=wait_seconds)
        fail(str(error), code=1 if _not_writable(error) else 2)  # a read-only disk stopped it: 1, as README says
    _OPENED.append(con)
    return con


_WAIT_SECONDS = 0.0  # the root's --wait: how long any command waits for a catalog another process holds


# The catalog connections the command opened, closed when it ends, by an error too (`_root` arranges it): a command
# called in-process (the tests, a script) left its connection open, and DuckDB's instance cache then served that
# database, even deleted, to the next connect of the same path.
_OPENED: list[duckdb.DuckDBPyConnection] = []


def _close_opened() -> None:
    while _OPENED:
        _OPENED.pop().close()


@contextmanager
def _stopped_says(what_is_kept: str) -> Iterator[None]:
    """Ctrl+C in a long step: one line saying what is kept and how to go on (exit 130), not a bare stop."""
    try:
        yield
    except KeyboardInterrupt:
        err_console.print(f"[bold]Stopped[/]: {escape(what_is_kept)}.")
        raise typer.Exit(130)


def counts_table(title: str, counts: dict, value_column: str = "count") -> Table:
    # at least as wide as its title: a table of short rows wrapped its title (an export's path) to its own width
    table = Table(title=Text(title), show_header=True, min_width=Text(title).cell_len)
    table.add_column("what")
    # numbers align right; a column of values that may be sentences (an evaluation's notes) reads left to right
    table.add_column(value_column, justify="right" if value_column == "count" else "left")
    for key, value in counts.items():
        table.add_row(Text(printable(str(key)).replace("_", " ")), Text(printable(str(value))))
    return table


def _older_catalog_note(con) -> str:
    """For an SQL error on a catalog an older workbench wrote and no command has upgraded yet (`sql` reads it as it
    is): its tables and views lack what newer ones have, which the error alone does not say."""
    pending = catalog_mod.pending_migrations(con) if con is not None else []
    return (f" (Note: this catalog predates {len(pending)} migration(s) of this workbench, from {pending[0]}: its tables "
            "and views are an older version's until a command that writes it, or `sql --write`, upgrades it.)" if pending else "")


def _list_images(con, ids: list[str], what: str, shown: int = 20) -> None:
    """The images `ids` names, a line each (id, path, and any exclusion they have), the first `shown` of them."""
    rows = con.execute(
        "SELECT image_id, path, exclusion_reason FROM images_view WHERE image_id IN (SELECT unnest(?::VARCHAR[])) ORDER BY path",
        [ids]).fetchall()
    console.print(f"{len(rows)} image(s) {what}")
    for image_id, path, reason in rows[:shown]:
        console.print(Text(f"  {image_id[:12]}  {printable(str(path))}" + (f"  (now: {printable(reason)})" if reason else "")))
    if len(rows) > shown:
        console.print(Text(f"  and {len(rows) - shown} more (list them all with workbench sql and the same condition)", style="dim"))


def _selected_images(con, image_ids: list[str] | None, folders: list[Path] | None, where: str | None,
                     nothing_done: str) -> list[str]:
    """The images a command names: ids (or prefixes), every image with a file under each --folder, and those its
    --where matches, in that order, each once. ValueError for a bad id or condition."""
    from pipelines.concepts import images_in_folder, resolve_image_ids

    ids = resolve_image_ids(con, image_ids) if image_ids else []
    for path in folders or []:
        found = images_in_folder(con, str(path))
        if not found:
            fail(f"No image in the catalog has a file under {path}.")
        ids += [i for i in found if i not in ids]
    if where is not None:
        ids = list(dict.fromkeys(ids + _images_matching(con, where, nothing_done, others_named=bool(ids))))
    return ids


def _images_matching(con, where: str, nothing_done: str, *, others_named: bool = False) -> list[str]:
    """The images a --where CONDITION on images_view names (ValueError for a bad one). None matched is nothing to do,
    not a failure (a weekly `--where "blur < 25"` that finds nothing): said on stderr, and with nothing else named
    (image ids, folders: `others_named`), the command ends there with status 0."""
    from pipelines.concepts import images_where

    matched = images_where(con, where)
    if not matched:
        if others_named:
            _note(f"no image matches --where {where!r}; only the other images named are taken.")
            return []
        err_console.print(Text(f"No image matches --where {where!r}: {nothing_done}.", style="yellow"))
        raise typer.Exit(0)
    return matched


def _print_version(value: bool) -> None:
    if value:
        from workbench import __version__

        console.print(f"workbench {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    catalog: CatalogOpt = None,
    version: Annotated[bool, typer.Option("--version", "-V", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
    wait: Annotated[float, typer.Option("--wait", min=0, help="Any command: seconds to wait while another process holds the catalog (the TUI, an ingest), e.g. `workbench --wait 600 caption`; default: say so at once.")] = 0,
) -> None:
    """Open the terminal UI when no command is given."""
    global _WAIT_SECONDS
    _WAIT_SECONDS = wait
    ctx.call_on_close(_close_opened)
    if ctx.invoked_subcommand is None:
        tui(catalog=catalog)


# --- foundation: ingest, dedup, sql ------------------------------------------


@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Folders or image files to add.", show_default=False)],
    catalog: CatalogOpt = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Worker processes (default: all cores).")] = None,
    max_pixels: Annotated[int, typer.Option(help="Images with more pixels are recorded as errors (decompression bombs); raising it later re-reads them.")] = 178_956_970,
    rehash: Annotated[bool, typer.Option("--rehash", help="Hash every file again, not only those whose size or modification time changed: finds new bytes a tool wrote under the old time (touch -r, rsync --times).")] = False,
) -> None:
    """Walk folders, hash and measure every image, and record it in the catalog.

    Example: workbench ingest ./photos ./more --catalog project.duckdb   (again after edits: only changed files are read)
    """
    from pipelines.ingest import ingested_images

    missing = [str(p) for p in paths if not os.path.lexists(p)]
    resolved = Path(catalog).expanduser() if catalog is not None else catalog_mod.default_catalog_path()
    if missing and not resolved.exists():  # a typo makes no empty catalog (a gone folder the catalog knows is synced)
        fail(f"No such file or folder: {', '.join(missing)}")
    if max_pixels < 1:
        fail(f"--max-pixels must be at least 1, got {max_pixels}")
    con = open_catalog(catalog, create=True)
    try:
        with RichProgress() as progress:
            summary = ingested_images(con, paths, workers=workers, max_pixels=max_pixels, rehash=rehash, progress=progress)
    except FileNotFoundError as error:  # not a folder the catalog holds files of either
        fail(f"No such file or folder: {', '.join(missing) or error}")
    except KeyboardInterrupt as interrupt:
        # one line, no traceback: every batch is its own transaction, so what was written stays and is consistent.
        # Another Ctrl+C while it exits just ends the process (raised there, it would only print a traceback).
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        kept = getattr(interrupt, "summary", None)
        if kept is None:  # stopped before the run began
            what = "what was recorded before it stopped is kept"
        else:
            to_read = kept.new + kept.changed + kept.reappeared + kept.errors_retried
            what = f"{kept.recorded} of {to_read} new or changed file(s) were read and recorded in the catalog"
        err_console.print(f"[bold]Ingest interrupted[/]: {what}; run the same command again to continue where it stopped.")
        raise typer.Exit(130)
    console.print(counts_table("ingest", summary.as_dict()))
    _ingest_notes(con, summary, paths)


def _note(*parts) -> None:
    """A note after a step's counts, on stderr: "Note:" in yellow, then its text as is (paths in it are never markup)."""
    err_console.print(Text.assemble(("Note: ", "yellow"), *parts))


def _ingest_notes(con, summary: IngestSummary, paths: list[Path]) -> None:
    """What an ingest found that the user should know, after its counts (ingest and import-kohya)."""
    from pipelines.ingest import PILLOW_READS_AVIF
    if summary.errors_by_reason:
        table = Table(title="files recorded as errors")
        table.add_column("reason")
        table.add_column("files", justify="right")
        table.add_column("e.g.", overflow="fold")  # a reason alone left the user to find the file
        for reason, n in summary.errors_by_reason.items():
            table.add_row(Text(printable(reason)), str(n), Text(printable(summary.error_examples.get(reason, ""))))
        console.print(table)
    if summary.kohya_reg_folders_skipped:
        _note("left out kohya regularisation folder(s) (reg/ beside img/): they hold class "
              "images, not photos to train on. `workbench import-kohya FOLDER` reads a kohya dataset with its "
              "class images; `workbench priors --from reg/1_dog` adds one folder of them.")
    if summary.output_roots_skipped:
        _note(
            f"left out {named_few(summary.output_roots_skipped)}: folder(s) the workbench wrote (a "
            "training run's samples and loss plot, class priors, an export), not photos to train on. To train on generated "
            "images, copy them to a folder of their own and ingest that; class images go in with `workbench priors --from "
            "FOLDER`, an export comes back with `workbench import-kohya`.")
    if summary.sidecars_left_out:
        _note(f"{summary.sidecars_left_out} caption sidecar(s) were left out (listed above: not "
              "UTF-8 text, unreadable, or too long to be a caption); each image keeps the caption it had. Mend "
              "them as said there (re-save as UTF-8, shorten) and ingest again to read them.")
    if summary.heic_avif_paths:  # left out by name, or recorded as errors when named like another format
        _note(
            f"{len(summary.heic_avif_paths)} {'HEIC' if PILLOW_READS_AVIF else 'HEIC/AVIF'} photo(s) left out: this Pillow cannot decode "
            f"them ({named_few(sorted(summary.heic_avif_paths))}). Convert them to JPEG or PNG (e.g. `heif-convert`, or Photos' "
            "export) and ingest again.")
    if summary.sidecars_misnamed:
        _note(
            f"{len(summary.sidecars_misnamed)} caption file(s) are not read: named other than the "
            f"image's name with .txt or .caption in lower case ({named_few(summary.sidecars_misnamed)}), which is what kohya "
            "reads on Linux too (Windows and macOS disks ignore case). Rename them (IMG_1.TXT or IMG_1.jpg.txt to "
            "IMG_1.txt) and ingest again.")
    if summary.animated:
        _note(
            f"{len(summary.animated)} animated image(s) ({named_few(summary.animated)}): every step "
            "(captions, training, export) sees their first frame only. Extract the frames you want as images of their "
            "own to train on them.")
    if summary.multi_line_sidecars:
        _note(
            f"{len(summary.multi_line_sidecars)} caption sidecar(s) hold several lines "
            f"({named_few(summary.multi_line_sidecars)}): the first line with text is the caption, as kohya reads them; "
            "the other lines are not used. If they are tags of one caption, join them with commas; alternative "
            "captions, one per line (OneTrainer picks one at random each epoch), have no counterpart here.")
    if summary.both_sidecars:
        _note(
            f"{len(summary.both_sidecars)} image(s) have both a .txt and a .caption sidecar "
            f"({named_few(summary.both_sidecars)}): the .txt is read (kohya's --caption_extension defaults to .caption, "
            "the kohya GUI's and WD14's to .txt). Remove the one you do not want and ingest again.")
    if summary.sidecar_conflicts:
        conflicts = [f"{used} (not {', '.join(others)})" for used, others in summary.sidecar_conflicts.items()]
        _note(
            f"{len(conflicts)} image(s) have byte-identical copies whose caption sidecars differ; "
            f"each takes the sidecar of the first of its paths (in sorted order) that has one: {named_few(conflicts)}. Make the sidecars agree "
            "(or delete the ones you do not want) and ingest again.")
    if summary.sidecar_texts_changed:
        # a sidecar edited in another tool, read now, of an image whose caption was typed or edited here (manual wins):
        # read and stored, yet nothing trains on it, and nothing said so (one touched but saying the same is no edit)
        overridden = con.execute(
            "SELECT v.image_id, v.path, v.caption_source FROM captions c JOIN images_view v USING (image_id) "
            "WHERE c.source = 'sidecar' AND c.image_id IN (SELECT unnest(?::VARCHAR[])) AND v.caption_source <> 'sidecar' "
            "AND v.caption IS DISTINCT FROM c.text ORDER BY v.path", [sorted(summary.sidecar_texts_changed)]).fetchall()
        if overridden:
            ids = [row[0] for row in overridden]
            # exactly the images whose sidecar says something else (`caption_source = 'manual'` took every manual one)
            where = (f"image_id IN ({', '.join(repr(i) for i in ids)})" if len(ids) <= 5 else
                     "image_id IN (SELECT c.image_id FROM captions c JOIN current_captions cc USING (image_id) WHERE "
                     "c.source = 'sidecar' AND cc.caption_source <> 'sidecar' AND cc.caption IS DISTINCT FROM c.text)")
            sources = sorted({row[2] for row in overridden})
            _note(
                f"{len(ids)} image(s) have a sidecar saying something other than the caption they "
                f"train with, which comes from {', '.join(sources)} ({'typed or edited here' if sources == ['manual'] else 'chosen or edited here'}): "
                f"{named_few([row[1] for row in overridden])}. To train on the sidecars: "
                f"workbench caption --use-source sidecar --where \"{where}\"")
    if summary.files_seen == 0 and not summary.heic_avif_paths:  # HEIC left out is said above, and is an image file
        _note(f"no image files in {', '.join(str(p) for p in paths)}.")
    elif con.execute("SELECT count(*) FROM runs WHERE step = 'dedup'").fetchall()[0][0]:
        stale = _stale_dedup(summary)
        if stale:
            _note(f"{stale}: run `workbench dedup` (and the later steps you use) again.")


def _stale_dedup(summary: IngestSummary) -> str:
    """What an ingest changed that the last dedup's groups do not cover ('' when nothing)."""
    parts = []
    # a moved or copied file holds an image dedup saw; an unreadable one (a link whose target went) is nothing to group
    fresh = summary.new - summary.moved_or_copied + summary.changed - summary.new_or_changed_errors
    if fresh:
        parts.append(f"{fresh} new or changed image(s) are not in duplicate groups yet")
    if summary.returned_ungrouped:
        parts.append(f"{summary.returned_ungrouped} image(s) back from missing are not in duplicate groups")
    if summary.grouped_missing:
        kept = summary.kept_copies_missing
        parts.append(f"{summary.grouped_missing} image(s) in duplicate groups went missing" + (
            f", {kept} of them kept copies (the dataset has no copy of {'that picture' if kept == 1 else 'those pictures'} "
            "until dedup keeps another)" if kept else ""))
    return "; ".join(parts)


@app.command()
def status(catalog: CatalogOpt = None) -> None:
    """Where each step stands on the catalog, and the command for what is left.

    Example: workbench status   (after an ingest of new photos: which steps have not seen them yet)
    """
    from pipelines.status import pipeline_status

    con = open_catalog(catalog, reads_only=True)
    table = Table(title="status", show_header=True)
    for column in ("step", "done", "to do"):
        table.add_column(column)
    for state in pipeline_status(con):
        table.add_row(state.step, Text(printable(state.done)), Text(printable(state.todo or ""), style="yellow"))
    console.print(table)


@app.command()
def dedup(
    catalog: CatalogOpt = None,
    threshold: Annotated[int, typer.Option(help="Largest pHash Hamming distance (0-16, of 64 bits) that counts as a near duplicate; 0 keeps only identical hashes. Distances are nearly always even (a pHash sets the 32 of its 64 bits above their median), so an odd threshold acts as the even one below.")] = 6,
    drop_embedding_pairs: Annotated[bool, typer.Option("--drop-embedding-pairs", help="Forget the CLIP pairs `score --dedup` added (undoes them).")] = False,
    mirrored: Annotated[bool, typer.Option("--mirrored/--no-mirrored", help="Also count left-right flipped copies as duplicates (their mirrored pHash is compared).")] = True,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what this threshold would group and exclude, against what is excluded now; change nothing.")] = False,
) -> None:
    """Group exact and near-duplicate images; keep the best copy of each group, exclude the rest.

    Example: workbench dedup --threshold 10 --dry-run   (then without --dry-run; --no-mirrored keeps flipped copies, --drop-embedding-pairs undoes `score --dedup`)
    """
    from pipelines.dedup import MAX_THRESHOLD, duplicate_groups, duplicate_groups_preview

    if not 0 <= threshold <= MAX_THRESHOLD:
        fail(f"--threshold must be between 0 and {MAX_THRESHOLD} bits.")
    con = open_catalog(catalog)
    options = dict(threshold=threshold, drop_embedding_pairs=drop_embedding_pairs, mirrored=mirrored)
    with _stopped_says("the duplicate groups and exclusions are as they were (written at the end, in one transaction): "
                       "run the same command again"), RichProgress() as progress:
        summary = (duplicate_groups_preview if dry_run else duplicate_groups)(con, **options, progress=progress)
    console.print(counts_table("dedup (--dry-run: nothing changed)" if dry_run else "dedup", summary))


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="SQL to run against the catalog; - reads it from stdin (a .sql file: `< query.sql`).")],
    catalog: CatalogOpt = None,
    format: Annotated[Optional[str], typer.Option("--format", "-f", help="table, csv, json or parquet (default: table; with --output, from its extension).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the result to this .csv, .json or .parquet file (`-` with --format csv or json: stdout).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --output file.")] = False,
    write: Annotated[bool, typer.Option("--write", help="Allow statements that change the catalog.")] = False,
    limit: Annotated[int, typer.Option(help="Rows shown in table format.")] = 100,
    wait: Annotated[float, typer.Option(min=0, help="Seconds to wait while another process holds the catalog (an ingest, the TUI); default: say so at once.")] = 0,
) -> None:
    """Query the catalog with DuckDB SQL (read-only unless --write).

    Views: dataset (what training uses), images_view (every image), duplicate_groups; what each holds:
    SELECT view_name, comment FROM duckdb_views() WHERE NOT internal (columns: duckdb_columns()).

    Example: workbench sql "SELECT path, width, height FROM dataset ORDER BY width DESC LIMIT 5" --format json
    (or from a file: workbench sql - < report.sql)
    """
    if query == "-":  # the SQL from stdin: a file of it, or a heredoc (a query starting with -- read as an option)
        query = sys.stdin.read()
    if output is not None and str(output) == "-":  # the usual name for stdout (it wrote a file named "-")
        if format not in {"csv", "json"}:
            fail("-o - writes to stdout: give --format csv or json with it (or leave -o out).")
        output = None
    if output is not None and output.is_dir():
        fail(f"{output} is a folder; give a file name.")
    if format is None:
        format = output.suffix.lower().lstrip(".") if output is not None else "table"
        if output is not None and format not in {"csv", "json", "parquet"}:
            fail(f"Cannot tell the format of {output}: give it a .csv, .json or .parquet name, or pass --format.")
    if format not in {"table", "csv", "json", "parquet"}:
        fail("--format must be table, csv, json or parquet.")
    if format == "parquet" and output is None:
        fail("--format parquet needs --output FILE.parquet")
    if format == "table" and output is not None:
        fail("--output writes csv, json or parquet; the table format is for the terminal.")
    named = output.suffix.lower().lstrip(".") if output is not None else None
    if named in {"csv", "json", "parquet"} and named != format:
        fail(f"{output} names {named} but --format is {format}: give the file a .{format} name, or leave --format out.")
    if limit < 1:
        fail("--limit must be at least 1 (the table shows that many rows; csv, json and parquet hold them all).")
    if output is not None:
        if output.exists() and not overwrite:
            fail(f"{output} already exists; pass --overwrite to replace it.")
        if not output.parent.is_dir():
            fail(f"The folder {output.parent} does not exist.")
    con = None
    try:
        if not write and not catalog_mod.is_read_only_sql(query):
            catalog_mod.run_sql(None, query)  # raises the refusal message
        con = open_catalog(catalog, read_only=not write, wait_seconds=wait)
        protected = catalog_mod.protected_file(con, output) if output is not None else None
        if protected:
            fail(f"Refused: {protected}; writing the result there would destroy it. Give another --output file.")
        relation = catalog_mod.run_sql(con, query, write=write)
        ran = len(catalog_mod.statement_kinds(query))
    except CatalogError as error:
        note = _older_catalog_note(con)
        if con is not None:  # closed now, not when the error's traceback goes (a caller in this process opens it next)
            con.close()
        fail(str(error) + note)
    if ran > 1:  # as harlequin's last tab: the others ran, their results are not shown
        err_console.print(Text(f"{ran} statements ran; the result below is the last one's", style="dim"))
    if relation is None:
        console.print("OK")
        return
    streamed = False  # rows already written to stdout
    try:  # errors raised while the rows are computed (a bad cast, say) come here, not from run_sql
        if format == "parquet":
            written_whole(output, lambda path: relation.write_parquet(str(path)))
            err_console.print(Text(f"wrote {output}"))
            return
        if format in ("csv", "json"):
            # written as the rows come, a few thousand at a time: a result of millions of rows was built whole in
            # memory first (1 GB for 3 million short rows as CSV, twice that as JSON)
            names, types, batches = _result_batches(con, query, relation)
            chunks = _csv_chunks(names, batches) if format == "csv" else _json_chunks(names, types, batches)
            if output:
                def write(path: Path) -> None:
                    with open(path, "w", encoding="utf-8") as handle:
                        handle.writelines(chunks)

                written_whole(output, write)
                err_console.print(Text(f"wrote {output}"))
            else:
                for chunk in chunks:
                    sys.stdout.write(chunk)
                    streamed = True
            return
        else:
            names, _, batches = _result_batches(con, query, relation, limit + 1)
            rows = next(batches, [])
            more = len(rows) > limit
            rows = rows[:limit]
            cells = [[Text("NULL", style="dim") if v is None else Text(printable(str(v))) for v in row] for row in rows]
            # piped or redirected, rows stay whole lines (a terminal's 80 columns would wrap every cell); to a terminal,
            # the table fits the window, with the columns that fit it readably
            shown = _columns_that_fit(names, cells, console.width)
            table = Table(show_lines=False)
            for name in names[:shown]:
                table.add_column(name, overflow="fold")
            for row in cells:
                table.add_row(*row[:shown])
            console.print(table)
            if shown < len(names):
                err_console.print(Text(f"{shown} of {len(names)} columns shown (to {names[shown - 1]}) in {console.width} "
                                       "columns of terminal: SELECT fewer, or --format csv or json for all", style="dim"))
            if more:
                err_console.print(Text(f"first {limit} rows shown: --limit N shows more; --format csv or json, or -o FILE, "
                                       "gives them all", style="dim"))
            return
    except duckdb.Error as error:
        note = _older_catalog_note(con)
        con.close()
        if streamed:  # rows went out as they came: what a pipe got is not the whole result (with -o, no file is left)
            sys.stdout.flush()
            note += " The rows written to stdout before the error are an incomplete result."
        fail(f"SQL error: {error}{note}")


def _columns_that_fit(names: list[str], cells: list[list[Text]], width: int, readable: int = 10) -> int:
    """How many of the first columns fit `width` with each at least `readable` characters wide (or its whole
    header and values, if narrower), as the DuckDB CLI leaves out the columns past the window's edge."""
    used, shown = 1, 0  # the table's left border
    for index, name in enumerate(names):
        natural = max([len(name), *(row[index].cell_len for row in cells)])
        used += min(natural, readable) + 3  # padding either side and the border
        if used > width and shown:
            break
        shown += 1
    return shown


def _unique_names(columns: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for name in columns:
        count = seen.get(name, 0)
        seen[name] = count + 1
        names.append(name if count == 0 else f"{name}_{count}")
    return names


def _json_safe(value):
    """JSON has no Infinity or NaN: they become null, as in pandas' to_json."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


_ROWS_AT_A_TIME = 10_000


def _result_batches(con, query: str, relation, size: int = _ROWS_AT_A_TIME) -> tuple[list[str], list[str], Iterator[list[tuple]]]:
    """(column names, their types, the rows `size` at a time) of the last statement's result. A query's own rows are
    fetched as they come: no wrapping query (its errors keep their line numbers), no conversion that some types lack
    (INTERVAL, UNION), and never all in memory at once. A write's rows (RETURNING) are already there."""
    last = duckdb.extract_statements(query)[-1]
    if not catalog_mod.is_read_only_sql(last.query):
        return relation.columns, [str(kind) for kind in relation.types], iter([relation.fetchall()])
    cursor = con.cursor()
    cursor.execute(last)

    def batches() -> Iterator[list[tuple]]:
        while rows := cursor.fetchmany(size):
            yield rows

    return [c[0] for c in cursor.description], [str(c[1]) for c in cursor.description], batches()


def _csv_chunks(names: list[str], batches: Iterator[list[tuple]]) -> Iterator[str]:
    """The result as CSV text, a batch at a time (the header first; every line ends with a newline)."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")  # the csv module's default is CRLF
    writer.writerow(names)
    for rows in batches:
        writer.writerows([_csv_value(v) for v in row] for row in rows)
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()


def _json_chunks(names: list[str], types: list[str], batches: Iterator[list[tuple]]) -> Iterator[str]:
    """The result as one JSON array of row objects, a batch at a time, ending with a newline. JSON columns
    (runs.counts, training_runs.config, ...) nest as objects, not as strings of JSON; names are matched by position,
    and a repeated one gets _1, _2 (as polars and pandas name them)."""
    names = _unique_names(names)
    nested = [kind == "JSON" for kind in types]
    first = True
    yield "["
    for rows in batches:
        objects = [json.dumps({name: json.loads(v) if is_json and isinstance(v, str) else _json_safe(v)
                               for name, is_json, v in zip(names, nested, row)},
                              default=_json_default, ensure_ascii=False, allow_nan=False) for row in rows]
        yield ("" if first else ", ") + ", ".join(objects)
        first = False
    yield "]\n"


def _csv_value(value):
    """A cell as DuckDB's own CSV writer (and the TUI's export) writes it: true/false, a BLOB as text with \\xHH
    escapes; lists and structs as JSON."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (bytes, bytearray)):
        return "".join(chr(b) if 32 <= b < 127 and b != 92 else f"\\x{b:02X}" for b in value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=_json_default)
    return value


def _json_default(value):
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    return str(value)


# --- models, caption, score, filter, buckets, concepts, export (issue 3) -----

models_app = typer.Typer(help="Model presets and where their weights live.\n\nExample: workbench models list", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list() -> None:
    """Show each preset's BLIP, CLIP and Stable Diffusion models and whether they are on this machine.

    Example: workbench models list
    """
    from workbench.models import PRESETS, describe_presets

    table = Table(title="model presets")
    for column in ("preset", "component", "source", "local"):
        table.add_column(column, overflow="fold")
    for row in describe_presets():
        missing = "not built yet (built offline on first use)" if row["preset"] == "tiny" else "not downloaded"
        table.add_row(Text(row["preset"]), Text(row["component"]), Text(row["source"]), Text(row["path"] or missing, style="" if row["path"] else "dim"))
    console.print(table)
    for preset in PRESETS.values():
        console.print(f"[bold]{preset.name}[/]: {preset.description}")


@models_app.command("path")
def models_path(
    preset: Annotated[str, typer.Argument(help="Preset (tiny, sd15, sd15-large), Hugging Face id or path.")],
    component: Annotated[str, typer.Option("--component", help="sd, blip or clip.")] = "sd",
) -> None:
    """Print the local folder of one model component (building the tiny models on first use).

    Example: workbench models path tiny --component sd
    """
    from workbench.models import ModelError, component_path

    try:
        sys.stdout.write(component_path(preset, component) + "\n")
    except ModelError as error:
        fail(str(error))


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Preset (tiny, sd15, sd15-large), Hugging Face id or local folder.")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:N or mps (default: the best available).")]
DtypeOpt = Annotated[Optional[str], typer.Option(help="fp32 (default), fp16 (GPU only) or bf16.")]


@app.command()
def caption(
    catalog: CatalogOpt = None,
    model: ModelOpt = "tiny",
    batch_size: Annotated[int, typer.Option(help="Images per BLIP batch.")] = 8,
    overwrite: Annotated[bool, typer.Option(help="Caption again images this model already captioned (its earlier captions of them are replaced; other sources' stay).")] = False,
    max_length: Annotated[int, typer.Option(help="Longest caption, in tokens.")] = 30,
    beams: Annotated[int, typer.Option(help="Beam search width (1 = greedy).")] = 1,
    prompt: Annotated[Optional[str], typer.Option(help="Text BLIP continues, e.g. 'a photography of'.")] = None,
    template: Annotated[Optional[str], typer.Option(help="Wrap each caption: {caption}, {trigger} and {class} of the image's concept.")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    workers: Annotated[Optional[int], typer.Option(min=0, help="Image decoding processes (default: up to 4; 0 = none).")] = None,
    use_source: Annotated[Optional[str], typer.Option("--use-source", help="Instead of captioning: make this caption source (sidecar, manual, duplicate, model:NAME) current for every image that has it; 'auto' goes back to the rule.")] = None,
    duplicates: Annotated[bool, typer.Option("--duplicates", help="Also caption the copies dedup excluded (left out by default: they do not train).")] = False,
    own_captioned: Annotated[bool, typer.Option("--own-captioned", help="Also caption images with a caption of their own: a sidecar .txt, one typed, or one carried from a duplicate (left out by default: they train with theirs).")] = False,
    where: Annotated[Optional[str], typer.Option("--where", help="Only the images whose images_view row matches this SQL condition (captioned, or given --use-source).", show_default=False)] = None,
) -> None:
    """Caption every usable image with BLIP (resumable), or choose which caption source images use.

    Current caption rule: your --use-source choice, else manual, else sidecar, else duplicate (a kept copy's caption
    from the copy dedup excluded), else the newest model caption.

    Example: workbench caption --model tiny --batch-size 8 --template "photo of {trigger} dog, {caption}"
    (again for one concept: --overwrite --where "concept = 'sks dog'"; or choose a source:
    --use-source model:tiny --where "caption_source = 'sidecar' AND concept = 'sks dog'")
    """
    from pipelines.caption import (caption_sources, check_template, chosen_caption_source, images_to_caption, model_captions,
                                   same_name_note)
    from workbench.models import TINY, ModelError, load_blip, model_id, model_label, resolve_device, resolve_dtype

    if use_source is not None:
        con = open_catalog(catalog)
        try:
            ids = _images_matching(con, where, "no caption source was chosen") if where is not None else None
            counts = chosen_caption_source(con, None if use_source == "auto" else use_source, image_ids=ids)
        except ValueError as error:
            fail(str(error))
        console.print(counts_table("caption source", {**counts, **{f"captions from {k}": v for k, v in caption_sources(con).items()}}))
        # captions typed by hand that no longer train: said, as choosing a model's captions for all took them over
        # and so are captions from the images' own sidecar files
        overridden = dict(con.execute(
            "SELECT c.source, count(*) FROM captions c JOIN current_captions cc USING (image_id) "
            "WHERE c.source IN ('manual', 'sidecar') AND cc.caption_source NOT IN ('manual', c.source) "
            "AND (? IS NULL OR c.image_id IN (SELECT unnest(?::VARCHAR[]))) GROUP BY 1",
            [ids, ids]).fetchall())
        if overridden.get("manual"):
            _note(f"{overridden['manual']} image(s) with a caption typed by hand now use another source. "
                  "`--use-source manual` (with --where, for some) or `--use-source auto` brings those back.")
        if overridden.get("sidecar"):
            _note(f"{overridden['sidecar']} image(s) with a caption file of their own (a sidecar .txt "
                  "or .caption) now train with another source, not their file. `--use-source sidecar` "
                  "(with --where, for some) or `--use-source auto` brings those back.")
        return
    if batch_size < 1 or max_length < 2 or beams < 1:
        fail("--batch-size and --beams must be at least 1, --max-length at least 2.")
    try:
        check_template(template)
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        label = model_label(model, "blip")
    except (ValueError, ModelError) as error:
        fail(str(error))
    model_path = model_id(model) if Path(model_id(model)).is_absolute() else None  # a local model's folder
    con = open_catalog(catalog)
    try:  # before minutes of model loading: a bad condition, one that matches nothing, or nothing left to caption
        if where is not None:
            _images_matching(con, where, "nothing was captioned")
        if not overwrite and not images_to_caption(con, label, where=where, duplicates=duplicates, own_captioned=own_captioned):
            note = same_name_note(con, label, model_path, overwrite)
            if note:
                err_console.print(Text(note, style="yellow"))
            again = ("the template applies to new captions only: `--overwrite` captions them again with it" if template else
                     "`--overwrite` captions them again")
            err_console.print(Text(f"Nothing to caption: every image this run takes has a model:{label} caption already, "
                                   f"so the model is not loaded ({again}; images with a caption of their own are left out "
                                   "unless `--own-captioned`).", style="yellow"))
            return
    except ValueError as error:
        fail(str(error))
    try:
        processor, captioner = load_blip(model, device=torch_device, dtype=torch_dtype)
    except ModelError as error:
        fail(str(error))
    with _stopped_says("the captions written so far are kept; run the same command again to caption the rest"):
        with RichProgress() as progress:
            try:
                counts = model_captions(
                    con, processor, captioner, model_name=label, batch_size=batch_size, max_length=max_length,
                    num_beams=beams, prompt=prompt, template=template, overwrite=overwrite, device=torch_device,
                    workers=workers, duplicates=duplicates, own_captioned=own_captioned, progress=progress,
                    model_path=model_path,
                    where=where,
                )
            except ValueError as error:
                fail(str(error))
    add_token_commands = counts.pop("add_token_commands", [])
    console.print(counts_table(f"caption (source model:{label})", counts))
    # a model's captions chosen with --use-source stay current: a new model's captions then trained nowhere, unsaid
    others = con.execute(
        "SELECT cc.caption_source, count(*) FROM captions c JOIN current_captions cc USING (image_id) WHERE c.source = ? "
        "AND starts_with(cc.caption_source, 'model:') AND cc.caption_source <> ? GROUP BY 1 ORDER BY 2 DESC",
        [f"model:{label}", f"model:{label}"]).fetchall()
    if others:
        _note(f"{sum(n for _, n in others)} image(s) captioned by model:{label} train with another model's caption "
              f"({', '.join(f'{source}: {n}' for source, n in others)}), chosen with --use-source. `workbench caption "
              f"--use-source model:{label}` makes this model's current (or `--use-source auto`: the newest).")
    if counts.get("own_captions_kept"):
        _note(f"{counts['own_captions_kept']} image(s) with a caption of their own (a sidecar "
              "file, one typed, or one carried from a duplicate) were not captioned: they train with theirs. "
              "--own-captioned captions them too (then `--use-source model:NAME` makes the model's captions "
              "current).")
    if counts.get("without_trigger"):
        _note(f"{counts['without_trigger']} image(s) are in no concept with a trigger word: the "
              "template's {trigger} (and {class}) were left empty in their captions. `workbench concept add NAME "
              "--trigger WORD --folder DIR` gives them one; then caption again with --overwrite.")
    if counts.get("concept_images_captioned_without_their_trigger"):
        _note(f"{counts['concept_images_captioned_without_their_trigger']} concept image(s) got captions without their "
              "trigger word: training puts it in front of them (and says so). To have it in the captions, caption with "
              f"--template \"{{trigger}} {{class}}, {{caption}}\" --overwrite, or add it: {'; '.join(add_token_commands)}")
    if label == TINY:
        _note("the tiny BLIP has random weights (the offline test preset): its captions are "
              "nonsense words. --model sd15 (BLIP base, downloaded once) or a BLIP folder captions for real.")
    if template and counts.get("already_captioned") and not overwrite:
        _note(f"the template applies to new captions only; {counts['already_captioned']} image(s) "
              "already captioned by this model kept theirs (add --overwrite to caption them again with it).")


@app.command("edit-captions")
def edit_captions(
    image_ids: Annotated[Optional[list[str]], typer.Argument(help="Image ids or unique prefixes (6+ hex characters); default: every image (or --where's).", show_default=False)] = None,
    find: Annotated[Optional[str], typer.Option("--find", help="Text to replace in each caption (with --replace; every occurrence).", show_default=False)] = None,
    replace: Annotated[Optional[str], typer.Option("--replace", help="What --find becomes (default: nothing, i.e. removed).", show_default=False)] = None,
    regex: Annotated[bool, typer.Option("--regex", help="--find is a regular expression (RE2 syntax; \\1 in --replace is its first group).")] = False,
    add_token: Annotated[Optional[str], typer.Option("--add-token", help="Put these comma-separated tags first, in this order (moved there where a caption has them elsewhere): a trigger for --keep-tokens.", show_default=False)] = None,
    at_end: Annotated[bool, typer.Option("--at-end", help="With --add-token: add the tags a caption lacks after its own instead (the first tags stay first).")] = False,
    remove_token: Annotated[Optional[str], typer.Option("--remove-token", help="Remove these comma-separated tags (whole tags only).", show_default=False)] = None,
    set_text: Annotated[Optional[str], typer.Option("--set", help="Make this the caption (of the images named).", show_default=False)] = None,
    where: Annotated[Optional[str], typer.Option("--where", help="Only the images whose images_view row matches this SQL condition.", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="Show what would change; change nothing.")] = False,
    sidecars: Annotated[bool, typer.Option("--sidecars", help="Also write each changed caption to the image's sidecar .txt (or its .caption), replacing what it held; --undo puts them back.")] = False,
    undo: Annotated[bool, typer.Option("--undo", help="Undo the newest edit not undone yet (this command's or the TUI's bulk edits); again for the one before.")] = False,
    show: Annotated[int, typer.Option("--show", min=0, help="Changes to show as before → after.")] = 5,
    catalog: CatalogOpt = None,
) -> None:
    """Edit captions by hand: find/replace (also regex), add or remove tags, or set one; each edit can be undone.

    Edited captions become the images' 'manual' captions, which win over sidecar and model captions. Captions that an
    edit would leave empty are not changed (`workbench caption --use-source` falls back to another source).

    Example: workbench edit-captions --add-token "sks dog" --where "concept = 'sks dog'" --dry-run
    (or: --remove-token "blurry, jpeg artifacts"; --find "\\bwoman\\b" --replace "ohwx woman" --regex; 3fa9c2d1e0 --set "sks dog on grass"; --undo)
    """
    from pipelines.caption_edits import bulk_edit, last_bulk_edit, preview_bulk_edit, undo_bulk, undo_preview
    from pipelines.concepts import resolve_image_ids

    edits = [name for name, value in (("--find", find), ("--add-token", add_token), ("--remove-token", remove_token),
                                      ("--set", set_text)) if value is not None]
    if undo:
        if edits or image_ids or where is not None or sidecars or regex or replace is not None:
            fail("--undo takes no other edit, images or --where: it puts back the newest edit as it was made.")
        con = open_catalog(catalog)
        last = last_bulk_edit(con)
        if last is None:
            fail("No caption edit to undo.")
        if dry_run:
            would = undo_preview(con, last)
            console.print(Text(printable(
                f"would undo: {last.description} (made {last.made_at:%Y-%m-%d %H:%M}): {would.restored} caption(s) put back"
                + (f", {would.skipped} kept (edited since)" if would.skipped else ""))))
            return
        outcome = undo_bulk(con, last)
        console.print(Text(f"undid {last.description}: {outcome.restored} caption(s) put back"))
        if outcome.skipped:
            _note(f"{outcome.skipped} image(s) kept the caption they were given after that edit.")
        if outcome.sidecars_left:
            _note(f"{outcome.sidecars_left} sidecar file(s) changed since the edit wrote them are left "
                  "as they are.")
        return
    if len(edits) != 1:
        fail("Give one edit: --find TEXT [--replace TEXT], --add-token TAGS, --remove-token TAGS or --set TEXT (or --undo)."
             + (f" You gave {' and '.join(edits)}." if edits else ""))
    if replace is not None and find is None:
        fail("--replace goes with --find.")
    if regex and find is None:
        fail("--regex applies to --find.")
    if at_end and add_token is None:
        fail("--at-end applies to --add-token.")
    if set_text is not None and not image_ids and where is None:
        fail("--set gives every image the same caption: name the images (ids, or --where).")
    for name, value in (("--find", find), ("--add-token", add_token), ("--remove-token", remove_token), ("--set", set_text)):
        if value is not None and not value.strip():
            fail(f"{name} is empty.")
    con = open_catalog(catalog)
    try:
        ids = resolve_image_ids(con, image_ids) if image_ids else []
        if where is not None:
            ids = list(dict.fromkeys(ids + _images_matching(con, where, "no caption was changed", others_named=bool(ids))))
        elif not image_ids:
            ids = [row[0] for row in con.execute("SELECT image_id FROM images WHERE status = 'ok' ORDER BY image_id").fetchall()]
        # class priors train on their class prompt, whatever caption they hold: an edit of theirs would change nothing
        instance = {row[0] for row in con.execute(
            "SELECT image_id FROM images WHERE role = 'instance' AND image_id IN (SELECT unnest(?::VARCHAR[]))", [ids]).fetchall()}
        if len(instance) < len(ids):
            _note(f"{len(ids) - len(instance)} class prior image(s) left out: they train on their "
                  "class prompt, not a caption.")
            ids = [i for i in ids if i in instance]
        edit = dict(find=find, replace=replace, add_token=add_token, remove_token=remove_token, regex=regex, set_text=set_text,
                    at_end=at_end)
        preview = preview_bulk_edit(con, ids, **edit)
        if not dry_run and preview.changed:
            done = bulk_edit(con, ids, sidecars=sidecars, **edit)
    except (ValueError, CatalogError) as error:
        fail(str(error))
    shown = preview.changes.slice(0, show).to_pylist()
    if shown:
        table = Table(title=Text(printable(preview.description)), show_header=True)
        for column in ("image", "before", "after"):
            table.add_column(column)
        for row in shown:
            table.add_row(Text(row["image_id"][:12]), Text(printable(row["old_text"] or "")), Text(printable(row["new_text"])))
        console.print(table)
    verb = "would change" if dry_run else "changed"
    changed = preview.changed if dry_run or not preview.changed else done.changed
    console.print(Text(f"{preview.description}: {verb} {changed} of {len(ids)} caption(s)"
                       + (f" ({preview.changed - len(shown)} more not shown)" if preview.changed > len(shown) else "")))
    if preview.emptied:
        _note(f"{preview.emptied} caption(s) the edit would leave empty are not changed.")
    if not dry_run and preview.changed and done.sidecars_left:
        _note(f"{len(done.sidecars_left)} sidecar file(s) were edited in another tool since ingest and "
              f"are left as they are (e.g. {printable(done.sidecars_left[0])}): `workbench ingest` reads them, and "
              "`workbench caption --use-source sidecar --where …` makes their captions current.")
    if not dry_run and preview.changed:
        err_console.print(Text("Undo with: workbench edit-captions --undo" + (" (the sidecar files too)" if sidecars else ""), style="dim"))


@app.command()
def score(
    catalog: CatalogOpt = None,
    model: ModelOpt = "tiny",
    batch_size: Annotated[int, typer.Option(help="Images per CLIP batch.")] = 32,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    workers: Annotated[Optional[int], typer.Option(min=0, help="Image decoding processes (default: up to 4; 0 = none).")] = None,
    dedup: Annotated[bool, typer.Option("--dedup", help="Also merge CLIP near-duplicates into the duplicate groups.")] = False,
    dedup_threshold: Annotated[float, typer.Option(help="Cosine similarity at or above which images count as duplicates.")] = 0.95,
) -> None:
    """Embed every usable image with CLIP and score it against its current caption (cosine, -1..1).

    Scores are redone only for images whose caption changed; see images_view.clip_score.

    Example: workbench score --model sd15 --dedup --dedup-threshold 0.95
    """
    from pipelines.score import clip_scores, embedding_duplicates
    from workbench.models import ModelError, load_clip, resolve_device, resolve_dtype

    if batch_size < 1:
        fail("--batch-size must be at least 1.")
    if not 0.0 < dedup_threshold <= 1.0:
        fail("--dedup-threshold is a cosine similarity in (0, 1].")
    if dedup and model == "tiny":  # its random embeddings are all alike: it would group unrelated images
        fail("--dedup needs a real CLIP (e.g. --model sd15): the tiny preset's random weights make every image look alike.")
    try:
        torch_device = resolve_device(device)
        bundle = load_clip(model, device=torch_device, dtype=resolve_dtype(dtype, torch_device))
    except ModelError as error:
        fail(str(error))
    con = open_catalog(catalog)
    with _stopped_says("the embeddings and scores written so far are kept; run the same command again for the rest"), \
            RichProgress() as progress:
        counts = clip_scores(con, bundle, batch_size=batch_size, device=torch_device, workers=workers, progress=progress)
        if dedup:
            counts.update({f"dedup {k}": v for k, v in embedding_duplicates(
                con, threshold=dedup_threshold, model=bundle.name, progress=progress).items()})
    console.print(counts_table(f"score (CLIP {bundle.name})", counts))
    if bundle.name == "tiny":
        _note("the tiny CLIP has random weights: its scores and duplicates mean nothing.")


@app.command()
def search(
    text: Annotated[str, typer.Argument(help="What to look for, in words.")],
    catalog: CatalogOpt = None,
    model: ModelOpt = "tiny",
    limit: Annotated[int, typer.Option(help="How many images to show.")] = 20,
    device: DeviceOpt = None,
    format: Annotated[str, typer.Option("--format", "-f", help="table or json.")] = "table",
    where: Annotated[Optional[str], typer.Option("--where", help="Only images whose images_view row matches this SQL condition (e.g. \"NOT excluded\": the dataset's).", show_default=False)] = None,
) -> None:
    """Find images by text: CLIP similarity of the text to each image's stored embedding.

    Example: workbench search "a red car" --limit 20 --model sd15 --where "NOT excluded"
    """
    from pipelines.score import embedding_models, search_images
    from workbench.models import ModelError, load_clip, model_label, resolve_device

    if format not in {"table", "json"}:
        fail("--format must be table or json.")
    if limit < 1:
        fail("--limit must be at least 1.")
    if not text.strip():
        fail("Search text is empty.")
    con = open_catalog(catalog, read_only=True)
    try:
        label = model_label(model, "clip")
        known = embedding_models(con)
        if label not in known:
            con.close()
            fail(f"No CLIP embeddings from {label!r} in this catalog (have: {', '.join(known) or 'none'}): "
                 f"run `workbench score --model {model}` first.")
        bundle = load_clip(model, device=resolve_device(device))
        hits = search_images(con, bundle, text, limit=limit, where=where)
    except (ModelError, ValueError) as error:
        con.close()
        fail(str(error))
    con.close()
    if format == "json":
        sys.stdout.write(json.dumps(hits, ensure_ascii=False) + "\n")
        return
    table = Table(title=Text(f"search: {text}"))
    for column in ("similarity", "id", "path", "caption", "excluded"):  # the id: for `exclude`, `keep`, `include`
        table.add_column(column, overflow="fold")
    for hit in hits:
        table.add_row(f"{hit['similarity']:.3f}", hit["image_id"][:12], Text(printable(hit["path"] or "")),
                      Text(printable(hit["caption"] or "")), "yes" if hit["excluded"] else "")
    console.print(table)



# concepts, filter, include/exclude, buckets, export, import-kohya (issue 3, curation)

concept_app = typer.Typer(
    help="Concepts: trigger token, class noun and repeat count for groups of images.\n\n"
    "Example: workbench concept add \"sks dog\" --trigger sks --class dog --repeats 10 --folder ./dog_photos",
    no_args_is_help=True,
)
app.add_typer(concept_app, name="concept")


@concept_app.command("add")
def concept_add(
    name: Annotated[str, typer.Argument(help="Concept name (e.g. 'sks dog').")],
    trigger: Annotated[Optional[str], typer.Option("--trigger", help="Trigger token the model learns (one word); needed for a new concept.")] = None,
    class_noun: Annotated[Optional[str], typer.Option("--class", help="Class noun for DreamBooth priors (e.g. dog); \"\" removes it.")] = None,
    repeats: Annotated[Optional[int], typer.Option(help="Times each image is repeated per epoch (kohya num_repeats; new concepts: 1).")] = None,
    where: Annotated[Optional[str], typer.Option(help="SQL condition on images_view selecting the images (kept: new matches join at ingest).")] = None,
    folder: Annotated[Optional[Path], typer.Option(help="Assign the images under this folder (kept: new files there join at ingest).")] = None,
    catalog: CatalogOpt = None,
) -> None:
    """Create or update a concept and assign images to it by SQL condition and/or folder.

    An update changes only the options given. Images already in another concept stay there (move them
    with `workbench concept assign`). --where and --folder stay with the concept: images ingested later
    that match them join it.

    Example: workbench concept add "sks dog" --trigger sks --class dog --repeats 10 --folder ./dog_photos
    """
    from pipelines.concepts import added_concept, images_in_folder

    con = open_catalog(catalog)
    # a folder as ingest names it (a name that is not UTF-8, with \xNN escapes) is known by the images under it
    if folder is not None and not folder.is_dir() and not images_in_folder(con, str(folder)):
        fail(f"No such folder: {folder}")
    try:
        summary = added_concept(con, name, trigger=trigger, class_noun=class_noun, repeats=repeats, where=where, folder=folder)
    except ValueError as error:
        fail(str(error))
    console.print(counts_table(f"concept {name}", {k: v for k, v in summary.items() if k not in ("concept", "note")}))
    if summary.get("note"):
        _note(summary["note"])


@concept_app.command("list")
def concept_list(catalog: CatalogOpt = None) -> None:
    """List concepts with trigger, class, repeats and image counts.

    Example: workbench concept list
    """
    from pipelines.concepts import list_concepts

    con = open_catalog(catalog, read_only=True)  # it only reads: a catalog on a read-only disk lists too
    table = Table(title="concepts")
    for column in ("name", "trigger", "class", "repeats", "images", "in dataset", "where", "folder"):
        table.add_column(column, overflow="fold")
    for c in list_concepts(con):
        table.add_row(*(Text(str(v)) for v in (c.name, c.trigger, c.class_noun or "", c.repeats, c.images, c.in_dataset,
                                              c.where_sql or "", c.folder or "")))
    console.print(table)


@concept_app.command("remove")
def concept_remove(
    name: Annotated[str, typer.Argument(help="Concept to delete (its images stay in the catalog).")],
    catalog: CatalogOpt = None,
) -> None:
    """Delete a concept; its images stay in the catalog without a concept.

    Example: workbench concept remove "sks dog"
    """
    from pipelines.concepts import removed_concept

    con = open_catalog(catalog)
    try:
        released, rejoined = removed_concept(con, name)
    except ValueError as error:
        fail(str(error))
    console.print(Text(f"removed concept {name!r}; {released - rejoined} image(s) no longer in a concept"
                       + (f", {rejoined} joined another concept whose --where or --folder takes them" if rejoined else "")))


@concept_app.command("assign")
def concept_assign(
    name: Annotated[str, typer.Argument(help="Concept to put the images in.")],
    image_ids: Annotated[list[str], typer.Argument(help="Image ids or unique prefixes (6+ hex characters).")],
    catalog: CatalogOpt = None,
) -> None:
    """Put images in a concept by hand (wins over --where/--folder assignments).

    Example: workbench concept assign "sks dog" 3fa9c2d1e0 77b01c9e4a
    """
    from pipelines.concepts import assign_images_to_concept

    con = open_catalog(catalog)
    try:
        changed = assign_images_to_concept(con, name, image_ids)
    except ValueError as error:
        fail(str(error))
    console.print(Text(f"{changed} image(s) moved into concept {name!r}"))


@concept_app.command("unassign")
def concept_unassign(
    image_ids: Annotated[list[str], typer.Argument(help="Image ids or unique prefixes (6+ hex characters).")],
    catalog: CatalogOpt = None,
) -> None:
    """Take images out of whatever concept they are in (they stay in the catalog and the dataset).

    They stay out: a concept's saved --where or --folder takes only new files at ingest (`workbench concept add NAME`
    alone applies it to every image in no concept); `workbench concept assign` puts them in another.

    Example: workbench concept unassign 3fa9c2d1e0 77b01c9e4a
    """
    from pipelines.concepts import unassigned_images

    con = open_catalog(catalog)
    try:
        taken = unassigned_images(con, image_ids)
    except ValueError as error:
        fail(str(error))
    console.print(Text(f"{taken} image(s) taken out of their concept"))


@app.command("filter")
def filter_(
    min_clip_score: Annotated[Optional[float], typer.Option(help="Exclude CLIP score below this (0.28 suits ViT-B/32).")] = None,
    min_side: Annotated[Optional[int], typer.Option(help="Exclude short side below N px (default 256; 0 = off).")] = None,
    max_aspect: Annotated[Optional[float], typer.Option(help="Exclude long/short side above R (default 3; 0 = off).")] = None,
    blurry: Annotated[Optional[bool], typer.Option("--no-blurry/--allow-blurry", help="Exclude blurry images.")] = None,
    dark: Annotated[Optional[bool], typer.Option("--no-dark/--allow-dark", help="Exclude dark images.")] = None,
    overexposed: Annotated[Optional[bool], typer.Option("--no-overexposed/--allow-overexposed", help="Exclude overexposed images.")] = None,
    low_information: Annotated[Optional[bool], typer.Option("--no-low-information/--allow-low-information", help="Exclude near-flat images.")] = None,
    grayscale: Annotated[Optional[bool], typer.Option("--no-grayscale/--allow-grayscale", help="Exclude grayscale images (also colour files holding grey).")] = None,
    blur_threshold: Annotated[Optional[float], typer.Option(help="Blurry below this variance of Laplacian (default 25); turns --no-blurry on.")] = None,
    dark_threshold: Annotated[Optional[float], typer.Option(help="Dark when mean+2.33 std luminance is below (default 56); turns --no-dark on.")] = None,
    bright_threshold: Annotated[Optional[float], typer.Option(help="Overexposed when mean-1.64 std luminance is above (default 170); turns --no-overexposed on.")] = None,
    entropy_threshold: Annotated[Optional[float], typer.Option(help="Low information below this entropy in bits (default 1.5); turns --no-low-information on.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count what each rule would drop.")] = False,
    config: Annotated[Optional[Path], typer.Option(help="TOML config with a \\[filter] table (default: workbench.toml beside the catalog).")] = None,
    catalog: CatalogOpt = None,
) -> None:
    """Exclude images by rules (size, aspect, CLIP score, quality); reruns replace earlier filter exclusions.

    Example: workbench filter --min-side 384 --max-aspect 2.5 --no-blurry --dry-run
    """
    from pipelines.filter import FilterRules, filtered_dataset
    from workbench.config import load_config

    given = dict(
        min_clip_score=min_clip_score, min_side=min_side, max_aspect=max_aspect, blurry=blurry, dark=dark,
        overexposed=overexposed, low_information=low_information, grayscale=grayscale, blur_threshold=blur_threshold,
        dark_threshold=dark_threshold, bright_threshold=bright_threshold, entropy_threshold=entropy_threshold,
    )
    try:
        settings = load_config(config, catalog_path=catalog or catalog_mod.default_catalog_path())
        from pipelines.train.config import FIELD_NAMES, FLAG_NAMES

        # training options may sit at top level beside [filter] (`workbench train --config` reads them there)
        training = FIELD_NAMES | set(FLAG_NAMES)
        stray = sorted(key for key, value in settings.items() if key not in ("filter", "train")
                       and (isinstance(value, dict) or key.replace("-", "_") not in training))
        if stray:  # a misspelt [filtr] or rules at top level did nothing, without a word
            raise ValueError(f"The config holds {', '.join(repr(k) for k in stray)}, which `workbench filter` does not "
                             "read: rules go in its [filter] table (and training options in [train]).")
        table = settings.get("filter", {})
        if not isinstance(table, dict):
            raise ValueError("[filter] in the config must be a table")
        from_file = FilterRules.from_mapping(table)  # the config file's own mistakes are named as its keys
        rules = from_file.with_overrides(**given)
    except (ValueError, FileNotFoundError) as error:
        # a value typed on the command line is named as the option typed, not as its workbench.toml key
        fail(re.sub(r"\bfilter\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-") if given.get(m.group(1)) is not None
                    else m.group(0), str(error)))
    con = open_catalog(catalog)
    with RichProgress(transient=True) as progress:
        summary = filtered_dataset(con, rules, dry_run=dry_run, progress=progress)
    for rule, why in summary.pop("skipped_rules", {}).items():
        err_console.print(f"[yellow]skipped {escape(rule)}:[/] {escape(why)}")
    title = "filter (dry run: nothing written)" if summary.pop("dry_run") else "filter"
    console.print(counts_table(title, summary))


@app.command()
def exclude(
    image_ids: Annotated[Optional[list[str]], typer.Argument(help="Image ids or unique prefixes (6+ hex characters).", show_default=False)] = None,
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the catalog).")] = ...,
    folder: Annotated[Optional[list[Path]], typer.Option("--folder", help="Also every image with a file under this folder (repeatable).", show_default=False)] = None,
    where: Annotated[Optional[str], typer.Option("--where", help="Also every image whose images_view row matches this SQL condition.", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the images it would exclude; change nothing.")] = False,
    catalog: CatalogOpt = None,
) -> None:
    """Exclude images by hand, with a reason; files on disk are not touched. `include --only-manual` undoes it.

    Example: workbench exclude 3fa9c2d1e0 --reason "watermark"   (or: --folder "img/0_old drafts" --reason "0 repeats";
    --where "width > 4000 AND caption ILIKE '%watermark%'" --reason "watermarked scans" --dry-run)
    """
    from pipelines.dedup import preferred_copy
    from pipelines.filter import folder_kept_out, manual_exclusions

    if not image_ids and not folder and where is None:
        fail("Name the images to exclude: image ids, --folder PATH or --where CONDITION.")
    con = open_catalog(catalog)
    try:
        ids = _selected_images(con, image_ids, folder, where, "nothing was excluded")
        if dry_run:
            _list_images(con, ids, "would be excluded (--dry-run: nothing changed)")
            return
        n = manual_exclusions(con, ids, reason)
        for path in folder or []:  # a standing rule: files added to the folder later are excluded when ingested
            folder_kept_out(con, str(path), reason)
    except ValueError as error:
        fail(str(error))
    console.print(f"excluded {n} image(s)" + (" (and any file ingest reads under the folder later: `workbench include "
                                               "--folder` lets them in)" if folder else ""))
    # by the reason, not the selection: a --where on `excluded` matches other images once they are
    err_console.print(Text(f"undo: workbench include --only-manual --reason {shlex.quote(reason.strip())}"
                           + "".join(f" --folder {shlex.quote(path_text(path))}" for path in folder or []), style="dim"))
    if folder:  # an image is its content: a byte-identical copy in another folder is the same image, now out too
        prefixes = {p.rstrip("/\\") + os.sep for path in folder  # as the catalog's path text holds them
                    for p in (path_text(path), catalog_path_text(path))}
        elsewhere: dict[str, str] = {}
        for image_id, path in con.execute(
            "SELECT image_id, path FROM paths WHERE image_id IN (SELECT unnest(?::VARCHAR[])) AND NOT missing ORDER BY seq",
            [ids],
        ).fetchall():
            if not path.startswith(tuple(prefixes)):
                elsewhere.setdefault(image_id, path)
        if elsewhere:
            _note(f"{len(elsewhere)} of them also {'has' if len(elsewhere) == 1 else 'have'} a file outside the "
                  f"folder, which is the same image and is excluded too: {named_few(list(elsewhere.values()))}")
    # excluding a kept copy excludes the picture: its other copies stay excluded as duplicates unless one is kept
    keepers = con.execute(
        "SELECT k.image_id, list(d.image_id ORDER BY d.image_id) FROM duplicates k JOIN duplicates d "
        "ON d.group_id = k.group_id AND NOT d.is_keeper WHERE k.is_keeper AND k.image_id IN (SELECT unnest(?::VARCHAR[])) "
        "GROUP BY k.image_id ORDER BY k.image_id", [ids],
    ).fetchall()
    for keeper, others in keepers[:3]:
        _note(f"{keeper[:12]} was the kept copy of a duplicate group; its {len(others)} other cop"
              f"{'y stays' if len(others) == 1 else 'ies stay'} excluded as duplicates. To keep one of them instead: "
              f"workbench keep {preferred_copy(con, others)[:12]}")
    if len(keepers) > 3:  # an --where over thousands printed three lines for each of hundreds of kept copies
        _note(f"and {len(keepers) - 3} more kept copies of duplicate groups, whose other copies stay excluded too; "
              "they are listed by: workbench sql \"SELECT group_id, image_id, path FROM duplicate_groups WHERE group_id IN "
              "(SELECT group_id FROM duplicate_groups WHERE is_keeper AND excluded)\"")


@app.command()
def tag(
    name: Annotated[str, typer.Argument(help="The tag, e.g. \"to review\".", show_default=False)],
    image_ids: Annotated[Optional[list[str]], typer.Argument(help="Image ids or unique prefixes (6+ hex characters).", show_default=False)] = None,
    folder: Annotated[Optional[list[Path]], typer.Option("--folder", help="Also every image with a file under this folder (repeatable).", show_default=False)] = None,
    where: Annotated[Optional[str], typer.Option("--where", help="Also every image whose images_view row matches this SQL condition.", show_default=False)] = None,
    remove: Annotated[bool, typer.Option("--remove", help="Take the tag off instead (no images named: off every image).")] = False,
    catalog: CatalogOpt = None,
) -> None:
    """Tag images with a label of your own: it neither excludes them nor puts them in a concept (images_view.tags).

    Example: workbench tag "to review" --where "clip_score < 0.2"   (find them: workbench sql "SELECT path FROM
    images_view WHERE list_contains(tags, 'to review')"; done: workbench tag "to review" --remove)
    """
    from pipelines.tags import tagged_images, untagged_images

    named = bool(image_ids or folder or where is not None)
    if not named and not remove:
        fail("Name the images to tag: image ids, --folder PATH or --where CONDITION.")
    con = open_catalog(catalog)
    try:
        ids = _selected_images(con, image_ids, folder, where, "no tag was taken off" if remove else "nothing was tagged")
        if remove:
            n = untagged_images(con, ids if named else None, name)
            console.print(Text(f"took the tag {name!r} off {n} image(s)"))
            return
        counts = tagged_images(con, ids, name)
    except ValueError as error:
        fail(str(error))
    console.print(Text(f"tagged {counts['tagged']} image(s) {name!r}" + (f" ({counts['had_it_already']} had it already)"
                                                                       if counts["had_it_already"] else "")))


@app.command()
def keep(
    image_id: Annotated[str, typer.Argument(help="Image id or unique prefix (6+ hex characters) of a duplicate group member.")],
    alone: Annotated[bool, typer.Option("--alone", help="Not a duplicate: a picture of its own, out of its group (both stay in).")] = False,
    rejoin: Annotated[bool, typer.Option("--rejoin", help="Undo --alone: back into the group dedup found for it.")] = False,
    auto: Annotated[bool, typer.Option("--auto", help="Undo a hand choice in this image's group: the keep policy chooses again.")] = False,
    catalog: CatalogOpt = None,
) -> None:
    """Keep this copy of its duplicate group (a hand choice beats the keep policy; the others are excluded).

    Example: workbench keep 3fa9c2d1e0   (--alone: it is no duplicate at all, dedup got it wrong; --auto: let the
    keep policy choose in its group again)
    """
    from pipelines.concepts import resolve_image_ids
    from pipelines.dedup import AlreadySo, choose_keeper, image_set_apart, keeper_choice_dropped, kept_but_excluded

    if sum((alone, rejoin, auto)) > 1:
        fail("--alone, --rejoin and --auto are different things: give one.")
    con = open_catalog(catalog)
    try:
        (found,) = resolve_image_ids(con, [image_id])
        if auto:
            was_chosen, kept = keeper_choice_dropped(con, found)
            if not was_chosen:  # a rerun: what was asked for holds, so a script's `set -e` goes on
                raise AlreadySo(f"No copy of {found[:12]}'s group was kept by hand: the keep policy chooses there already.")
            if kept is None:  # the hand choice held a chain together: without it this copy pairs with no keeper
                console.print(Text(f"the keep policy chooses again: {found[:12]} is in no duplicate group now (the copy kept "
                                   "by hand was what joined it to the others), so it stays in"))
                return
            reason = con.execute("SELECT keep_reason FROM duplicates WHERE image_id = ?", [kept]).fetchall()[0][0]
            console.print(Text(f"the keep policy chooses again: {kept[:12]} is kept ({reason})"))
            return
        if alone or rejoin:
            counts = image_set_apart(con, found, apart=alone)
            console.print(Text(f"{found[:12]} is {'a picture of its own now, in no duplicate group' if alone else 'back among its duplicates'}; "
                               f"{counts['groups']} duplicate group(s), {counts['excluded_as_duplicates']} copies excluded"))
            return
        choose_keeper(con, found)
    except AlreadySo as already:
        err_console.print(Text(f"Nothing to do: {already}", style="yellow"))
        return
    except ValueError as error:
        fail(str(error))
    group = con.execute("SELECT count(*) FROM duplicates WHERE group_id = (SELECT group_id FROM duplicates WHERE image_id = ?)",
                        [found]).fetchall()[0][0]
    others = "its other copy is excluded as a duplicate" if group == 2 else f"its {group - 1} other copies are excluded as duplicates"
    console.print(Text(f"kept {found[:12]}; {others}"))
    reason = kept_but_excluded(con, found)
    if reason:
        _note(f"{found[:12]} is itself excluded ({reason}), so the dataset has no copy of this picture: "
              f"`workbench include {found[:12]}` brings it in, or keep another copy.")


@app.command()
def include(
    image_ids: Annotated[Optional[list[str]], typer.Argument(help="Image ids or unique prefixes (6+ hex characters).", show_default=False)] = None,
    folder: Annotated[Optional[list[Path]], typer.Option("--folder", help="Also every image with a file under this folder, and no more exclusion of files added to it (undoes exclude --folder; repeatable).", show_default=False)] = None,
    where: Annotated[Optional[str], typer.Option("--where", help="Also every image whose images_view row matches this SQL condition.", show_default=False)] = None,
    only_manual: Annotated[bool, typer.Option("--only-manual", help="Undo `exclude`: lift only the exclusions made by hand; the filter's stay, and later filter runs still judge these images.")] = False,
    reason: Annotated[Optional[str], typer.Option("--reason", help="With --only-manual: only the exclusions made with this reason (no images named: every such one).", show_default=False)] = None,
    catalog: CatalogOpt = None,
) -> None:
    """Include images by hand: removes manual and filter exclusions; later filter runs skip them.

    Example: workbench include 3fa9c2d1e0   (or: --folder "img/0_old drafts"; --where "exclusion_reason LIKE 'blurry%' AND concept = 'sks dog'";
    undo an exclude: --only-manual --reason "watermarked scans")
    """
    from pipelines.concepts import images_in_folder, resolve_image_ids
    from pipelines.filter import folder_let_in, manual_exclusions_lifted, manual_inclusions

    if reason is not None and not only_manual:
        fail("--reason chooses which exclusions made by hand --only-manual lifts: give --only-manual too.")
    if not image_ids and not folder and where is None and reason is None:
        fail("Name the images to include: image ids, --folder PATH or --where CONDITION.")
    con = open_catalog(catalog)
    try:
        image_ids = list(image_ids or [])
        for path in folder or []:
            ruled = folder_let_in(con, str(path))
            found = images_in_folder(con, str(path))
            if not found and not ruled:
                fail(f"No image in the catalog has a file under {path}.")
            image_ids += [i for i in found if i not in image_ids]
            inside = con.execute("SELECT folder FROM excluded_folders WHERE starts_with(?, folder || ?) ORDER BY folder",
                                 [catalog_path_text(path), os.sep]).fetchall()
            if inside:  # the rule of a folder above still holds for files added here later
                _note(f"files added to {path} later are still excluded by the rule on {inside[0][0]} "
                      f"(`workbench include --folder {shlex.quote(inside[0][0])}` ends it).")
        if where is not None:
            # a folder named ended its rule above: that is done, whatever --where matches
            image_ids = list(dict.fromkeys(image_ids + _images_matching(con, where, "nothing was included",
                                                                        others_named=bool(image_ids or folder))))
        chosen = image_ids if image_ids or folder or where is not None else None  # --reason alone: every such exclusion
        summary = manual_exclusions_lifted(con, chosen, reason=reason) if only_manual else manual_inclusions(con, image_ids)
    except ValueError as error:
        fail(str(error))
    console.print(counts_table("include", summary))
    if only_manual:
        if summary["still_excluded_by_other_steps"]:
            _note(f"{summary['still_excluded_by_other_steps']} stay out by the filter or as duplicates, "
                  "as before the exclude (`workbench include` without --only-manual brings them in for good).")
        return
    if summary["still_excluded_by_other_steps"]:
        # what an include leaves is a duplicate's exclusion: keeping that copy is the way in, so name the command
        rows = con.execute(
            "SELECT x.image_id, d.keeper_id FROM exclusions x LEFT JOIN duplicates d USING (image_id) "
            "WHERE x.image_id IN (SELECT unnest(?::VARCHAR[])) ORDER BY x.image_id",
            [resolve_image_ids(con, image_ids)]).fetchall()
        for image_id, keeper in rows[:3]:
            _note(f"{image_id[:12]} stays excluded as a duplicate of {(keeper or '?')[:12]}; to keep "
                  f"it instead: workbench keep {image_id[:12]} (or, if it is no duplicate at all: "
                  f"workbench keep {image_id[:12]} --alone)")
        if len(rows) > 3:
            _note(f"and {len(rows) - 3} more stay excluded as duplicates (`workbench keep ID` keeps one).")
    if summary["unreadable_files"]:
        err_console.print("[yellow]some files could not be read at ingest (status error), so they stay out of the dataset: "
                          "`workbench sql \"SELECT path, error FROM images_view WHERE status <> 'ok'\"` says why.[/]")


@app.command()
def buckets(
    resolution: Annotated[str, typer.Option(help="Training resolution: N or W,H (kohya --resolution).")] = "512",
    no_upscale: Annotated[bool, typer.Option("--no-upscale", help="kohya bucket_no_upscale: never enlarge images.")] = False,
    min_bucket_reso: Annotated[Optional[int], typer.Option(help="Smallest bucket side, rounded down to the step (default: kohya's 256; half the resolution below 256 px).", show_default=False)] = None,
    max_bucket_reso: Annotated[Optional[int], typer.Option(help="Largest bucket side, rounded up to the step (default: kohya's 1024; twice the resolution below 256 px).", show_default=False)] = None,
    bucket_reso_steps: Annotated[Optional[int], typer.Option(help="Bucket sides are multiples of this (default: kohya's 64; an eighth of the resolution, at least 8, below 256 px).", show_default=False)] = None,
    catalog: CatalogOpt = None,
) -> None:
    """Assign every dataset image to a kohya-ss aspect-ratio bucket and show the histogram.

    Example: workbench buckets --resolution 512 --bucket-reso-steps 64
    """
    from pipelines.buckets import aspect_buckets

    if bucket_reso_steps is not None and bucket_reso_steps % 8:  # sd-scripts warns the same
        _note(f"--bucket-reso-steps {bucket_reso_steps} is not a multiple of 8: bucket sides will not be "
              "either, and the VAE works in 8-pixel blocks (the edge pixels are lost to it).")
    con = open_catalog(catalog)
    try:
        with RichProgress(transient=True) as progress:
            summary = aspect_buckets(
                con, resolution=resolution, min_bucket_reso=min_bucket_reso, max_bucket_reso=max_bucket_reso,
                bucket_reso_steps=bucket_reso_steps, no_upscale=no_upscale, progress=progress,
            )
    except ValueError as error:
        fail(str(error))
    histogram = summary.pop("histogram")
    table = Table(title="aspect buckets (width x height)")
    table.add_column("bucket")
    table.add_column("images", justify="right")
    table.add_column("")
    top = max(histogram.values(), default=1)
    for bucket, n in histogram.items():
        table.add_row(bucket, str(n), "█" * max(1, round(30 * n / top)))
    console.print(table)
    console.print(counts_table("buckets", summary))
    enlarged, most = first_row(con.execute(
        "SELECT count(*), max(b.resized_width / i.width) FROM aspect_buckets b JOIN images i USING (image_id) "
        "WHERE b.resized_width > i.width"))
    if enlarged:  # kohya enlarges them without a word; their softness is what trains
        _note(f"{enlarged} image(s) are smaller than their bucket and are enlarged to fill it (up to {most:.1f}x). "
              "--no-upscale keeps them at their own size (kohya's bucket_no_upscale); `workbench filter --min-side N` "
              "leaves them out.")


@app.command()
def export(
    out: Annotated[Path, typer.Argument(help="Output folder (or FILE.parquet for --format parquet).")],
    format: Annotated[str, typer.Option("--format", "-f", help="kohya, imagefolder or parquet.")] = "kohya",
    link: Annotated[str, typer.Option(help="copy or hardlink the image files.")] = "copy",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a non-empty folder.")] = False,
    where: Annotated[Optional[str], typer.Option("--where", help="Only the images (of the dataset and its class images) whose images_view row matches this SQL condition: a subset, without excluding the rest.", show_default=False)] = None,
    catalog: CatalogOpt = None,
) -> None:
    """Export the curated dataset: kohya folders + dataset.toml, HF imagefolder, or parquet rows.

    Example: workbench export --format kohya ./kohya_dataset   (a subset: --where "concept = 'sks dog' AND clip_score > 0.3")
    """
    from pipelines.export import ExportError, exported_dataset

    con = open_catalog(catalog)
    _note_unfiltered(con)
    again = (f"workbench export {shlex.quote(str(out))} --format {format} --overwrite" + (f" --link {link}" if link != "copy" else "")
             + (f" --where {shlex.quote(where)}" if where is not None else "")
             + (f" --catalog {shlex.quote(str(catalog))}" if catalog is not None else ""))  # the same catalog, copied as is
    try:
        with _stopped_says(f"the export in {out} is unfinished; {again} writes it again (replacing what this one wrote)"), \
                RichProgress(transient=True) as progress:
            summary = exported_dataset(con, out, format=format, link=link, overwrite=overwrite, where=where, progress=progress)
    except ExportError as error:
        fail(str(error))
    except OSError as error:  # said in words, with the file it met (it printed "[Errno 13] Permission denied: 'out'")
        at_file = f" at {error.filename}" if error.filename else ""
        fail(f"The export stopped{at_file}: {error.strerror or error}. Give an OUT folder you may write to, on a disk "
             "with room (or make the file it names readable).",
             # a full disk or a folder it may not write stopped it (1, as every command says those); a path through a
             # file is a mistake in OUT (2)
             code=1 if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS) else 2)
    console.print(counts_table(f"export {summary.pop('format')} → {summary.pop('out')}", summary))
    if summary.get("copied_not_hardlinked"):
        _note(f"{summary['copied_not_hardlinked']} image(s) were copied, not hard-linked: OUT is on "
              "another disk than they are, and a hard link cannot cross disks. Export to a folder on "
              "their disk to save the space.")


def _note_retrain_drift(con, train_config, config_file: Path) -> None:
    """`--config RUN/config.toml` trains that run's options on the catalog's dataset as it is now: how it differs from
    the dataset that run trained on (its snapshot beside the file) is said, not found in the weights."""
    from pipelines.train import data as train_data

    snapshot = Path(config_file).parent / train_data.SNAPSHOT_FILE
    if not snapshot.is_file():
        return
    try:
        saved, _ = train_data.read_snapshot(snapshot)
        now = train_data.training_images(con, train_config)
    except (OSError, ValueError, train_data.DataError):
        return  # the run's own checks say what is wrong, in their words
    changes = ", ".join(f"{count} {what}" for what, count in train_data.snapshot_drift(saved, now).items() if count)
    if changes:
        _note(f"the catalog's dataset changed since the run of {config_file} trained ({changes}): this "
              "run trains on the dataset as it is now, so its weights will differ from that run's.")


def _note_unfiltered(con) -> None:
    """Export and train say when the dataset holds images the last filter run never judged (ingested since)."""
    from pipelines.filter import unfiltered_note

    note = unfiltered_note(con)
    if note:
        _note(note)


@app.command("import-kohya")
def import_kohya(
    folder: Annotated[Path, typer.Argument(
        help="kohya train folder with `N_trigger class` subfolders, or a kohya dataset config (.toml or .json).")],
    workers: Annotated[Optional[int], typer.Option(min=1, help="Worker processes (default: all cores).")] = None,
    catalog: CatalogOpt = None,
) -> None:
    """Import a kohya-style folder: its images, caption files and concepts (repeats, trigger, class), and the
    class images of reg/N_class/ beside img/ (as supplied class priors). Or a kohya dataset config (sd-scripts'
    --dataset_config): each subset's image_dir with its class_tokens and num_repeats, is_reg subsets as class images.

    Example: workbench import-kohya ./train/img   (or: workbench import-kohya ./dataset.toml)
    """
    from pipelines.export import ExportError, imported_kohya_dataset_config, imported_kohya_folder

    config_file = folder.is_file() and folder.suffix.lower() in (".toml", ".json")
    if not folder.is_dir() and not config_file:  # before the catalog is made: a typo leaves no empty catalog behind
        fail(f"{folder} is neither a folder nor a kohya dataset config (.toml or .json)")
    read_from = [folder]
    if config_file:
        from pipelines.export import kohya_dataset_subsets

        try:  # a bad config is refused before the catalog is made
            read_from = [subset.image_dir for subset in kohya_dataset_subsets(folder)[0] if not subset.is_reg]
        except ExportError as error:
            fail(str(error))
    con = open_catalog(catalog, create=True)
    try:
        with RichProgress(transient=True) as progress:
            read: list = []
            imported = imported_kohya_dataset_config if config_file else imported_kohya_folder
            summary = imported(con, folder, workers=workers, progress=progress, ingest_summary=read)
    except ExportError as error:
        fail(str(error))
    console.print(counts_table("import-kohya", summary))
    if read:  # the notes ingest gives (error reasons, sidecar conflicts, several-line captions), as `ingest` says them
        _ingest_notes(con, read[0], read_from)


# --- priors and training (issue 4) -------------------------------------------


train_app = typer.Typer(
    help="Train on the curated dataset: lora, dreambooth (with prior preservation) or finetune.\n\n"
    "Every option can also come from --config train.toml (same names, '-' or '_'); options given here win.\n\n"
    "Example: workbench train lora --model tiny --resolution 64 --max-train-steps 50",
    no_args_is_help=True,
)
app.add_typer(train_app, name="train")


def _set_values(pairs: list[str]) -> dict:
    """--set key=value pairs, values read as TOML (numbers, true/false, [lists]) or else as text."""
    import tomllib

    values = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            fail(f"--set needs KEY=VALUE, got {pair!r}")
        try:
            values[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key.strip()] = raw
    return values


def _relaunch(num_processes: int, *, new_run: bool = False) -> None:
    """Run this same command in `num_processes` processes (torch.distributed.run); accelerate does the rest.

    `new_run`: --resume latest found nothing to resume, so the processes start a new run (without --resume, and told
    so in WORKBENCH_NEW_RUN for a resume given in --config or --set: one process would otherwise find the snapshot
    another just wrote, and resume while the others start). A SIGTERM is passed on to torchrun, which
    passes them to the processes (each in a session of its own): every one stops when its step ends; torchrun kills
    those still running 30 s later. (Ctrl+C reaches torchrun from the terminal by itself.)"""
    import subprocess

    args, skip = [], False
    for arg in sys.argv[1:]:
        name = arg.partition("=")[0].replace("_", "-")
        dropped = name == "--num-processes" or (new_run and name in ("--resume", "--resume-from-checkpoint"))
        if skip:
            skip = False
        elif dropped:
            skip = "=" not in arg
        else:
            args.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes), "-m", "workbench.cli", *args]
    err_console.print(Text(f"launching {num_processes} processes: {' '.join(command)}"))
    stopped: list[int] = []
    launched: list[subprocess.Popen] = []

    def pass_on(signum, frame) -> None:
        stopped.append(signum)
        # SIGTERM came to this command alone (`kill`, a job scheduler); a Ctrl+C reached torchrun from the terminal
        # too, and a second one from here would make the processes stop at once, losing the step in progress
        if signum == signal.SIGTERM:
            for launcher in launched:
                launcher.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):  # before the start: a stop in between is not lost
        signal.signal(signum, pass_on)
    # PYTHONSAFEPATH: `-m workbench.cli` must not find a `pipelines/` or `tui/` package of the folder it runs in
    # first (the workbench is installed: `make` installs it, editable)
    env = {**os.environ, "PYTHONSAFEPATH": "1", **({"WORKBENCH_NEW_RUN": "1"} if new_run else {})}
    launched.append(subprocess.Popen(command, env=env))
    if signal.SIGTERM in stopped:  # came before torchrun started
        launched[0].send_signal(signal.SIGTERM)
    code = launched[0].wait()
    raise typer.Exit(128 + stopped[0] if stopped else code)


# a training run's CLIP score is torchmetrics' 100 x cosine; `workbench score` stores the bare cosine (-1..1)
METRIC_LABELS = {"clip_score": "clip score (100 x cosine)"}

# defaults shown in `workbench train … --help`; the options themselves default to None ("not given", which
# --resume needs), and tests/test_train_cli.py checks these against TrainConfig
TRAIN_HELP_DEFAULTS = {
    "model": "tiny", "resolution": "512", "train_batch_size": "1", "num_train_epochs": "1",
    "lr_scheduler": "constant", "lr_warmup_steps": "0", "rank": "4", "seed": "0", "mixed_precision": "no",
    "gradient_accumulation_steps": "1", "checkpointing_steps": "500", "validation_steps": "100",
    "caption_dropout": "0", "keep_tokens": "0", "color_jitter": "0", "noise_offset": "0", "prior_loss_weight": "1.0",
    "cache_memory_mb": "1024",
}


def train_command(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML file with training options (at top level or in a train table).", rich_help_panel='Run')] = None,
    model: Annotated[Optional[str], typer.Option(help="Preset (tiny, sd15), HF id, local folder or single-file checkpoint.", show_default=TRAIN_HELP_DEFAULTS["model"], rich_help_panel='Run')] = None,
    output_dir: Annotated[Optional[Path], typer.Option(help="Where outputs go (default: runs/<mode>-<time> beside the catalog).", rich_help_panel='Run')] = None,
    resolution: Annotated[Optional[str], typer.Option(help="Training resolution; buckets have about resolution² pixels (kohya's 512,512 reads as 512).", show_default=TRAIN_HELP_DEFAULTS["resolution"], rich_help_panel='Steps and learning rate')] = None,
    train_batch_size: Annotated[Optional[int], typer.Option(help="Images per batch (one bucket per batch).", show_default=TRAIN_HELP_DEFAULTS["train_batch_size"], rich_help_panel='Steps and learning rate')] = None,
    max_train_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (default: --num-train-epochs worth).", rich_help_panel='Steps and learning rate')] = None,
    num_train_epochs: Annotated[Optional[int], typer.Option(help="Epochs when --max-train-steps is not given (on --resume: the new total, in place of the run's step count).", show_default=TRAIN_HELP_DEFAULTS["num_train_epochs"], rich_help_panel='Steps and learning rate')] = None,
    learning_rate: Annotated[Optional[float], typer.Option(help="Peak learning rate.", show_default="1e-4 lora, 5e-6 dreambooth, 1e-5 finetune (1e-4 with --from-scratch)", rich_help_panel='Steps and learning rate')] = None,
    lr_scheduler: Annotated[Optional[str], typer.Option(help="constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial.", show_default=TRAIN_HELP_DEFAULTS["lr_scheduler"], rich_help_panel='Steps and learning rate')] = None,
    lr_warmup_steps: Annotated[Optional[int], typer.Option(help="Warm-up steps of the scheduler.", show_default=TRAIN_HELP_DEFAULTS["lr_warmup_steps"], rich_help_panel='Steps and learning rate')] = None,
    rank: Annotated[Optional[int], typer.Option(help="LoRA rank.", show_default=TRAIN_HELP_DEFAULTS["rank"], rich_help_panel='LoRA')] = None,
    lora_alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha (default: the rank).", rich_help_panel='LoRA')] = None,
    train_text_encoder: Annotated[Optional[bool], typer.Option("--train-text-encoder/--no-train-text-encoder", metavar="", help="Also train the text encoder (LoRA or full).", rich_help_panel='Run')] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of data order, noise and LoRA init.", show_default=TRAIN_HELP_DEFAULTS["seed"], rich_help_panel='Steps and learning rate')] = None,
    mixed_precision: Annotated[Optional[str], typer.Option(help="no, fp16 or bf16 (GPU).", show_default=TRAIN_HELP_DEFAULTS["mixed_precision"], rich_help_panel='Run')] = None,
    gradient_accumulation_steps: Annotated[Optional[int], typer.Option(help="Micro-batches per optimizer step.", show_default=TRAIN_HELP_DEFAULTS["gradient_accumulation_steps"], rich_help_panel='Steps and learning rate')] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", metavar="", help="Recompute activations to save memory.", rich_help_panel='Memory and speed')] = None,
    use_8bit_adam: Annotated[Optional[bool], typer.Option("--use-8bit-adam/--no-use-8bit-adam", metavar="", help="8-bit AdamW from bitsandbytes.", rich_help_panel='Memory and speed')] = None,
    fused_adam: Annotated[Optional[bool], typer.Option("--fused-adam/--no-fused-adam", metavar="", help="torch's fused AdamW kernel (default on).", rich_help_panel='Memory and speed')] = None,
    torch_compile: Annotated[Optional[bool], typer.Option("--torch-compile/--no-torch-compile", metavar="", help="Compile the UNet's transformer blocks: faster steps after a one-time compile (needs gcc on CPU).", rich_help_panel='Memory and speed')] = None,
    cache_memory_mb: Annotated[Optional[int], typer.Option(help="Cached latents/text kept in RAM during the run, in MB (0: always read from disk).", show_default=TRAIN_HELP_DEFAULTS["cache_memory_mb"], rich_help_panel='Run')] = None,
    checkpointing_steps: Annotated[Optional[int], typer.Option(help="Save a resumable checkpoint every N steps.", show_default=TRAIN_HELP_DEFAULTS["checkpointing_steps"], rich_help_panel='Checkpoints and samples')] = None,
    checkpoints_total_limit: Annotated[Optional[int], typer.Option(help="Keep only the newest N checkpoints.", rich_help_panel='Checkpoints and samples')] = None,
    resume: Annotated[Optional[str], typer.Option(help="'latest' or a checkpoint folder; needs --output-dir of the run ('latest' with no run there starts one, as in diffusers).", rich_help_panel='Run')] = None,
    validation_prompt: Annotated[Optional[list[str]], typer.Option(help="Prompt for the sample grids (repeatable).", rich_help_panel='Checkpoints and samples')] = None,
    validation_steps: Annotated[Optional[int], typer.Option(help="Sample grid every N steps.", show_default=TRAIN_HELP_DEFAULTS["validation_steps"], rich_help_panel='Checkpoints and samples')] = None,
    caption_dropout: Annotated[Optional[float], typer.Option(help="Probability of training on an empty caption.", show_default=TRAIN_HELP_DEFAULTS["caption_dropout"], rich_help_panel='Captions and augmentation')] = None,
    shuffle_tags: Annotated[Optional[bool], typer.Option("--shuffle-tags/--no-shuffle-tags", metavar="", help="Shuffle comma-separated tags.", rich_help_panel='Captions and augmentation')] = None,
    keep_tokens: Annotated[Optional[int], typer.Option(help="Tags kept in front when shuffling.", show_default=TRAIN_HELP_DEFAULTS["keep_tokens"], rich_help_panel='Captions and augmentation')] = None,
    random_crop: Annotated[Optional[bool], typer.Option("--random-crop/--no-random-crop", metavar="", help="Random instead of centre crop (bypasses the latent cache).", rich_help_panel='Captions and augmentation')] = None,
    random_flip: Annotated[Optional[bool], typer.Option("--random-flip/--no-random-flip", metavar="", help="Horizontal flip half the time (cached exactly).", rich_help_panel='Captions and augmentation')] = None,
    color_jitter: Annotated[Optional[float], typer.Option(help="Colour jitter strength (bypasses the latent cache).", show_default=TRAIN_HELP_DEFAULTS["color_jitter"], rich_help_panel='Captions and augmentation')] = None,
    snr_gamma: Annotated[Optional[float], typer.Option(help="Min-SNR loss weighting gamma (5 is usual).", rich_help_panel='Steps and learning rate')] = None,
    noise_offset: Annotated[Optional[float], typer.Option(help="Noise offset (e.g. 0.05).", show_default=TRAIN_HELP_DEFAULTS["noise_offset"], rich_help_panel='Steps and learning rate')] = None,
    beta_schedule: Annotated[Optional[str], typer.Option(help="linear, scaled_linear, squaredcos_cap_v2 or sigmoid.", rich_help_panel='Steps and learning rate')] = None,
    prediction_type: Annotated[Optional[str], typer.Option(help="epsilon or v_prediction.", rich_help_panel='Steps and learning rate')] = None,
    prior_preservation: Annotated[Optional[bool], typer.Option("--prior-preservation/--no-prior-preservation", metavar="", help="DreamBooth prior-preservation loss with generated class images (default: on for dreambooth; lora: DreamBooth-LoRA).", rich_help_panel='DreamBooth and full UNet')] = None,
    prior_loss_weight: Annotated[Optional[float], typer.Option(help="Weight of the prior loss (DreamBooth).", show_default=TRAIN_HELP_DEFAULTS["prior_loss_weight"], rich_help_panel='DreamBooth and full UNet')] = None,
    class_prompt: Annotated[Optional[str], typer.Option(help="Class prompt for all images (default: per concept class noun).", rich_help_panel='DreamBooth and full UNet')] = None,
    # the diffusers examples' names for two options, accepted as they are but kept out of --help (one name each there)
    resume_from_checkpoint: Annotated[Optional[str], typer.Option("--resume-from-checkpoint", hidden=True)] = None,
    with_prior_preservation: Annotated[bool, typer.Option("--with-prior-preservation", hidden=True)] = False,
    instance_prompt: Annotated[Optional[str], typer.Option(help="One prompt for every instance image, in place of its caption, as diffusers' DreamBooth (default: each image's caption; one without trains on its concept's trigger and class).", rich_help_panel='Captions and augmentation')] = None,
    num_class_images: Annotated[Optional[int], typer.Option(help="Class images per class prompt (default 200 × instances, capped).", rich_help_panel='DreamBooth and full UNet')] = None,
    use_ema: Annotated[Optional[bool], typer.Option("--use-ema/--no-use-ema", metavar="", help="Keep an EMA of the UNet's weights: the model saved, its samples and scores use it (dreambooth, finetune).", rich_help_panel='DreamBooth and full UNet')] = None,
    from_scratch: Annotated[Optional[bool], typer.Option("--from-scratch/--no-from-scratch", metavar="", help="finetune: initialise the UNet from its config.", rich_help_panel='DreamBooth and full UNet')] = None,
    concepts: Annotated[Optional[list[str]], typer.Option("--concept", help="Train only this concept (repeatable).", rich_help_panel='Run')] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: accelerate's choice).", rich_help_panel='Run')] = None,
    num_processes: Annotated[int, typer.Option(min=1, help="Data-parallel processes (GPUs); >1 relaunches this command with torch.distributed.run, as accelerate launch does.", rich_help_panel='Run')] = 1,
    show_batches: Annotated[Optional[int], typer.Option(min=1, help="Print the first N steps' batches (image, bucket, flip, caption as trained) and exit: no model loads, nothing is written (kohya's --debug_dataset).", rich_help_panel='Run')] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any other option as KEY=VALUE (repeatable), e.g. instance_prompt='photo of sks dog', text_encoder_lr=5e-5, num_validation_images=4, validation_seed=1, max_grad_norm=1.0, ema_decay=0.9999, lr_num_cycles=3, lora_target_modules=to_q,to_k (README: every key).", rich_help_panel='Run')] = None,
    catalog: CatalogOpt = None,
) -> None:
    mode = ctx.info_name
    if show_batches is not None and (resume or resume_from_checkpoint):
        fail("--show-batches shows a new run's plan; a resumed run goes on with the plan it started with.")
    launching = num_processes > 1 and "WORLD_SIZE" not in os.environ  # this process starts the others, then waits
    from pipelines.train import ConfigError, TrainingError, load_train_config, trained_model
    from pipelines.train.loop import NothingToResume
    from pipelines.train.data import DataError
    from workbench.models import ModelError

    overrides = dict(
        # absolute: the run row, the resume hint and a resume from another folder all name the same place
        mode=mode, model=model, output_dir=os.path.abspath(output_dir) if output_dir else None, resolution=resolution,
        train_batch_size=train_batch_size, max_train_steps=max_train_steps, num_train_epochs=num_train_epochs,
        learning_rate=learning_rate, lr_scheduler=lr_scheduler, lr_warmup_steps=lr_warmup_steps, rank=rank,
        lora_alpha=lora_alpha, train_text_encoder=train_text_encoder, seed=seed, mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps, gradient_checkpointing=gradient_checkpointing,
        use_8bit_adam=use_8bit_adam, fused_adam=fused_adam, torch_compile=torch_compile, cache_memory_mb=cache_memory_mb,
        checkpointing_steps=checkpointing_steps, checkpoints_total_limit=checkpoints_total_limit,
        resume=resume, validation_prompt=validation_prompt or None, validation_steps=validation_steps,
        caption_dropout=caption_dropout, shuffle_tags=shuffle_tags, keep_tokens=keep_tokens, random_crop=random_crop,
        random_flip=random_flip, color_jitter=color_jitter, snr_gamma=snr_gamma, noise_offset=noise_offset,
        beta_schedule=beta_schedule, prediction_type=prediction_type, with_prior_preservation=prior_preservation,
        prior_loss_weight=prior_loss_weight, class_prompt=class_prompt, instance_prompt=instance_prompt, num_class_images=num_class_images,
        use_ema=use_ema, from_scratch=from_scratch, concepts=concepts or None, device=device,
    )
    if resume_from_checkpoint is not None:
        if resume is not None:
            fail("--resume and --resume-from-checkpoint are the same option: keep one.")
        overrides["resume"] = resume_from_checkpoint
    if with_prior_preservation:
        if prior_preservation is False:
            fail("--with-prior-preservation and --no-prior-preservation contradict each other: keep one.")
        overrides["with_prior_preservation"] = True
    given = {k: v for k, v in overrides.items() if v is not None}
    set_values = _set_values(set_ or [])
    for key in set_values:  # a flag would silently win over the same option in --set
        name = key.replace("-", "_")
        if name == "mode":
            fail(f"--set {key}=… cannot change the mode: run `workbench train {set_values[key]}` instead.")
        if name in given:
            fail(f"--set {key}=… and --{name.replace('_', '-')} both give {name}: keep one.")
    try:
        overrides = {**set_values, **given}
        train_config = load_train_config(config, overrides)
    except ConfigError as error:
        fail(str(error))
    from pipelines.train.run import default_output_dir, is_main_process

    if os.environ.get("WORKBENCH_NEW_RUN") == "1":  # the launching process found nothing to resume: a new run
        train_config.resume = None
    resume_asked = bool(overrides.get("resume")) or _config_resumes(config)
    if resume_asked and not train_config.resume and is_main_process() and "WORKBENCH_NEW_RUN" not in os.environ:
        _note(f"there is no run to resume in {train_config.output_dir}: a new run starts there "
              "(as diffusers' --resume_from_checkpoint latest does).")
    if show_batches is not None:  # the plan of the whole run, shown once (before any processes start)
        import importlib.util

        from pipelines.train.loop import NO_BITSANDBYTES

        # a preview of a GPU run on a CPU machine without the weights is fine (no model loads, no device is used);
        # an option the run cannot have at all is said here (a review's dry run passed 8-bit AdamW without bitsandbytes)
        if train_config.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
            fail(NO_BITSANDBYTES)
        _show_batches(catalog, train_config, show_batches)
        if num_processes > 1:
            _note(f"with --num-processes {num_processes}, the processes take these batches in order, "
                  f"{num_processes} at a time: each step trains {num_processes} of them, one per process.")
        return
    if launching:
        # what the processes would each refuse, refused once here, before they start
        from pipelines.train.loop import check_setup

        try:
            check_setup(train_config)
            _enough_devices(num_processes, train_config)
        except TrainingError as error:
            fail(str(error))
        _relaunch(num_processes, new_run=resume_asked and not train_config.resume)
    from pipelines.train.checkpoint import list_checkpoints

    # one catalog writer under accelerate launch; another `workbench train` may hold it for a few seconds of setup
    con = open_catalog(catalog, wait_seconds=30) if is_main_process() else None
    if con is not None and not train_config.resume:  # a resume trains on its run's snapshot
        _note_unfiltered(con)
        if config is not None:
            _note_retrain_drift(con, train_config, config)
    if con is not None and not train_config.output_dir and not train_config.resume:
        train_config.output_dir = str(default_output_dir(con, mode))  # named up front, for the stop message
    try:  # Ctrl+C, or `kill`/`timeout` (main() makes SIGTERM a Ctrl+C): recorded 'cancelled', with the resume hint
        with RichProgress() as progress, _StopWhenTheStepEnds(progress) as stoppable:
            # the catalog is free for other commands while the model trains (hours, on real models)
            result = trained_model(con, train_config, progress=stoppable, release_catalog=True)
    except NothingToResume as finished:  # a requeued job's `--resume latest` after the run finished: not a failure
        err_console.print(Text(f"Nothing to do: {finished}", style="yellow"))
        return
    except (ConfigError, DataError, TrainingError, ModelError) as error:
        fail(str(error))
    except (KeyboardInterrupt, StepCancelled):  # StepCancelled: the first Ctrl+C, at the end of a step
        from pipelines.train.config import SNAPSHOT_FILE

        if train_config.output_dir and not train_config.resume and not (Path(train_config.output_dir) / SNAPSHOT_FILE).exists():
            err_console.print("[bold]Stopped[/] before training started (class images made so far are kept): run the same "
                              "command again.")
        elif train_config.output_dir:  # extra accelerate processes may not know it; the main one says it
            kept = list_checkpoints(Path(train_config.output_dir) / "checkpoints")
            where = f"the last checkpoint is {kept[-1].name}" if kept else "no checkpoint was written yet"
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun stops every process when one fails
                where += " (if you did not stop it, another training process failed: its error is above)"
            on_catalog = f" --catalog {shlex.quote(os.path.abspath(catalog))}" if catalog is not None else ""
            processes = int(os.environ.get("WORLD_SIZE", "1"))
            on_processes = f" --num-processes {processes}" if processes > 1 else ""  # a resume needs as many
            if is_main_process():  # every process gets the stop; one says it
                err_console.print(
                    f"[bold]Stopped[/]: {where}. Continue with: workbench train {mode} --resume latest --output-dir "
                    f"{escape(shlex.quote(train_config.output_dir) + on_catalog + on_processes)}",
                    soft_wrap=True,  # a command to copy: never broken inside a path
                )
        raise typer.Exit(130)
    except Exception as error:  # after the stop clause (StepCancelled is an Exception): an output folder it may
        # not write, a full disk: said, not a traceback
        if not isinstance(error, OSError) and not is_disk_full(error):  # safetensors says a full disk in its own error
            raise
        kept = list_checkpoints(Path(train_config.output_dir) / "checkpoints") if train_config.output_dir else []
        resume = (f" The last checkpoint, {kept[-1].name}, is kept: once that is mended, `workbench train {mode} "
                  f"--resume latest --output-dir {shlex.quote(train_config.output_dir)}` goes on from it." if kept else "")
        # the machine stopped it (exit 1, as every command says these): not an input to correct
        if is_disk_full(error):
            fail(f"no space left on the disk: {error}. What was written before is kept: free some space." + resume, code=1)
        if _not_writable(error):
            fail(f"{error}. A file or folder may not be read or written here (its permissions, or a read-only disk). "
                 "What was written before is kept: mend that, or give another --output-dir." + resume, code=1)
        fail(f"{error}." + resume)
    if con is None:
        return
    summary = {"train id": result.train_id, "steps": result.steps, "images": result.images,
               **({"class images": result.class_images} if result.class_images else {}),
               "final loss": f"{result.final_loss:.4f}" if result.final_loss is not None else "-",
               "steps/s": f"{result.steps_per_second:.2f}", "seconds": f"{result.seconds:.1f}"}
    for key in ("clip_score", "cmmd", "fid"):
        if key in result.metrics:
            summary[METRIC_LABELS.get(key, key)] = f"{result.metrics[key]:.3f}"
    console.print(counts_table(f"train {mode}", summary))
    if result.evaluation_failure():  # the run is fine; only its scores are missing
        _note(f"{result.evaluation_failure()}")
    for name, path in result.outputs.items():
        console.print(Text(f"{name}: {path}"))
    if train_config.model == "tiny":  # the default: a newcomer who left --model out should know what they trained
        _note("this trained the tiny preset (random weights, the offline test model): its outputs "
              "work with it alone. --model sd15, a Hub id, a local folder or a .safetensors trains a real one.")


def _config_resumes(path: Path | None) -> bool:
    """Whether a --config file asks for a resume (`resume = "latest"`, at top level or in [train])."""
    import tomllib

    if path is None:
        return False
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):
        return False
    table = data.get("train") if isinstance(data.get("train"), dict) else data
    return bool(table.get("resume"))


def _enough_devices(num_processes: int, config) -> None:
    """--num-processes beyond the GPUs there are (each process takes one), or far beyond the CPU's cores, refused."""
    import torch

    from pipelines.train import TrainingError
    from pipelines.train.loop import runs_on_cpu

    if runs_on_cpu(config):
        cores = os.cpu_count() or 1
        if num_processes > cores:
            raise TrainingError(f"--num-processes {num_processes} on a CPU with {cores} core(s): each process trains "
                                f"its own share on the same cores, slower than one. Use at most {cores}, or 1.")
    elif num_processes > torch.cuda.device_count():
        raise TrainingError(f"--num-processes {num_processes}, but this machine has {torch.cuda.device_count()} GPU(s): "
                            "one process trains on each.")


def _show_batches(catalog: Path | None, config, steps: int) -> None:
    from pipelines.train import ConfigError, TrainingError
    from pipelines.train.data import DataError
    from pipelines.train.run import planned_batches

    con = open_catalog(catalog)
    if not config.resume:
        _note_unfiltered(con)
    try:
        with RichProgress(transient=True) as progress:
            items = planned_batches(con, config, steps, progress=progress)
    except (ConfigError, DataError, TrainingError) as error:
        fail(str(error))
    table = Table(title=Text(f"the first {steps} step(s) of a new {config.mode} run (seed {config.seed})"))
    for column in ("step", "image", "bucket", "flip", "caption as trained"):
        table.add_column(column, overflow="fold")
    for item in items:
        image = Text(os.path.basename(item.path) or "?")
        if item.pool != "instance":
            image.append(" (class image)", style="dim")
        table.add_row(str(item.step), image, f"{item.bucket[0]}×{item.bucket[1]}", "yes" if item.flip else "",
                      Text(item.caption) if item.caption
                      else Text("(empty: caption dropout)" if item.dropped else "(empty: no caption)", style="dim"))
    console.print(table)


class _TrainModeCommand(typer.core.TyperCommand):
    """`workbench train MODE`: its --help leaves out the options of the other modes (given, they are refused by
    name); one function serves the three modes, so their shared options stay one list."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from pipelines.train.config import EMA_OPTIONS, LORA_OPTIONS

        other_modes = {"lora": {*EMA_OPTIONS, "from_scratch"}, "dreambooth": {*LORA_OPTIONS, "from_scratch"},
                       "finetune": set(LORA_OPTIONS)}.get(self.name, set())
        for param in self.params:
            if param.name in other_modes:
                param.hidden = True


for _mode, _help in (
    ("lora", "Train a LoRA (peft, UNet attention) and write it in diffusers and kohya formats.\n\n"
     "Example: workbench train lora --model tiny --resolution 64 --max-train-steps 50 --output-dir runs/demo-lora"),
    ("dreambooth", "DreamBooth: train the UNet with the prior-preservation loss over generated class images.\n\n"
     "Example: workbench train dreambooth --model sd15 --class-prompt \"a photo of a dog\" --max-train-steps 400"),
    ("finetune", "Full fine-tune of the UNet (optional EMA); --from-scratch starts from the UNet's config.\n\n"
     "Example: workbench train finetune --model tiny --from-scratch --resolution 64 --max-train-steps 2000"),
):
    train_app.command(_mode, help=_help, cls=_TrainModeCommand)(train_command)


@train_app.command("export")
def train_export(
    run_dir: Annotated[Path, typer.Argument(help="The run's --output-dir.")],
    checkpoint: Annotated[str, typer.Option(help="Step number, checkpoint folder, or 'latest'.")] = "latest",
    to: Annotated[Optional[Path], typer.Option(help="Where the model goes (default: RUN_DIR/exports/checkpoint-N); a FILE.safetensors: just the file A1111 and ComfyUI load, named so.")] = None,
    save_precision: Annotated[Optional[str], typer.Option("--save-precision", help="float, fp16 or bf16 (default: the run's save_precision).", show_default=False)] = None,
) -> None:
    """Write a checkpoint's weights as a finished run writes its model (LoRA files, or a diffusers folder and one file).

    Example: workbench train export runs/dreambooth-dog --checkpoint 400
    (or straight into a UI's folder, named, in half precision: --to ~/webui/models/Lora/dog-step400.safetensors
    --save-precision fp16)
    """
    from pipelines.train import TrainingError
    from pipelines.train.checkpoint import list_checkpoints, resolve_resume
    from pipelines.train.loop import exported_checkpoint
    from workbench.models import ModelError

    if not run_dir.is_dir():
        fail(f"No run folder {run_dir}: give the --output-dir of a training run.")
    folder = run_dir / "checkpoints"
    try:
        found = resolve_resume(folder, f"checkpoint-{checkpoint}" if checkpoint.isdigit() else checkpoint)
    except FileNotFoundError as error:
        fail(f"{error} Its checkpoints: {', '.join(p.name for p in list_checkpoints(folder)) or 'none'}.")
    if found is None:
        fail(f"{run_dir} has no checkpoints (looked in {folder}).")
    out = to or run_dir / "exports" / found.name
    one_file = out.suffix.lower() == ".safetensors"  # every run's files have the same names: a UI's folder needs its own
    if one_file:
        if out.exists():
            fail(f"{out} exists: give another --to, or delete it first.")
        if not out.parent.is_dir():
            fail(f"No folder {out.parent} to write {out.name} in.")
        # made in the run's own exports/ (a DreamBooth export also writes a diffusers folder: gigabytes a UI's models
        # folder need not see), then only the file goes there
        (run_dir / "exports").mkdir(exist_ok=True)
        final, out = out, Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=run_dir / "exports"))
    elif out.exists() and not out.is_dir():
        fail(f"{out} is a file: --to takes a folder for the model, or a new FILE.safetensors.")
    elif out.exists() and any(out.iterdir()):
        fail(f"{out} is not empty: give another --to, or delete it first.")
    try:
        with RichProgress() as progress:
            outputs = exported_checkpoint(found, out, save_precision=save_precision, progress=progress)
        if one_file:  # the file A1111 and ComfyUI load: the kohya-keyed LoRA, or the original-layout checkpoint
            name = "lora_kohya" if "lora_kohya" in outputs else "single_file"
            written_whole(final, lambda path: shutil.copyfile(outputs[name], path))  # whole or not at all, on any disk
            outputs = {name: str(final)}
    except (TrainingError, ModelError) as error:
        fail(str(error))
    finally:
        if one_file:
            shutil.rmtree(out, ignore_errors=True)
    for name, path in outputs.items():
        console.print(Text(f"{name}: {path}"), soft_wrap=True)


@app.command()
def priors(
    class_prompt: Annotated[Optional[str], typer.Option(help="Class prompt (default: 'a photo of a(n) <class>' for each concept with a class noun).")] = None,
    num: Annotated[Optional[int], typer.Option("--num", help="Class images per prompt (default: 200 × instance images, capped by --max-images).")] = None,
    max_images: Annotated[int, typer.Option(help="Cap on the default count.")] = 1000,
    model: Annotated[str, typer.Option(help="Base model; must be the model you will train.")] = "tiny",
    batch_size: Annotated[int, typer.Option(min=1, help="Images generated per batch.")] = 4,
    seed: Annotated[Optional[int], typer.Option(help="Image i uses seed + i (default: where the set starts, 0 for a new one).", show_default=False)] = None,
    resolution: Annotated[Optional[int], typer.Option(help="Image size, a multiple of 8 (default: the model's); training uses the set made at its --resolution.")] = None,
    steps: Annotated[int, typer.Option(help="Sampling steps per image; training uses the set made with its prior_inference_steps (default 30).")] = 30,
    out_dir: Annotated[Optional[Path], typer.Option(help="Folder for the PNGs (default: class_priors/ beside the catalog).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when present).")] = None,
    from_folder: Annotated[Optional[Path], typer.Option("--from", help="Add your own class images from this folder (real photos, a kohya reg/1_dog folder) instead of generating; training takes them first.")] = None,
    including_training_photos: Annotated[bool, typer.Option("--including-training-photos", help="With --from: also take images of the folder that are training photos now (a reg/ folder an ingest took as photos); they leave the dataset.")] = False,
    catalog: CatalogOpt = None,
) -> None:
    """Generate DreamBooth class-prior images with the base model and add them to the catalog (resumable),
    or add class images you have (--from).

    A set is one prompt, model, size and step count (DDIM sampling, as training makes its priors). Class images
    you supply serve their class prompt for any model and size; training generates none while they suffice.
    Example: workbench priors --class-prompt "a photo of a dog" --num 200 --model sd15 --resolution 512
    Example: workbench priors --from ./reg/1_dog     (the class prompt from a kohya folder name, else --class-prompt)
    """
    if including_training_photos and from_folder is None:
        fail("--including-training-photos goes with --from FOLDER.")
    if from_folder is not None:
        _supplied_priors_command(from_folder, class_prompt, catalog, including_training_photos, given={
            "--num": num is not None, "--resolution": resolution is not None, "--out-dir": out_dir is not None,
            "--device": device is not None, "--seed": seed is not None, "--steps": steps != 30, "--batch-size": batch_size != 4,
            "--max-images": max_images != 1000, "--model": model != "tiny"})
        return
    from pipelines.priors import (PriorSettings, check_prior_options, generated_prior_files, ingested_priors,
                                  model_resolution, pipeline_resolution, prior_jobs, prior_pipeline, prior_plan)
    from workbench.models import ModelError, load_sd_components, model_id

    try:  # before anything opens or loads: a size the model cannot sample failed only once it had loaded
        check_prior_options(num_images=num, max_images=max_images, resolution=resolution, steps=steps, batch_size=batch_size,
                            seed=seed)
    except ValueError as error:
        fail(str(error))
    model = model_id(model)  # a local model is recorded by its absolute path, as training records it
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        fail(f"--out-dir {out_dir} is a file, not a folder.")
    con = open_catalog(catalog)  # as `train`: a mistyped --catalog must not start a new, empty catalog
    folder = (out_dir or (catalog_mod.default_catalog_path() if catalog is None else catalog).parent / "class_priors").resolve()
    try:
        jobs = prior_jobs(con, class_prompt=class_prompt, num_images=num, max_images=max_images)
    except ValueError as error:
        con.close()
        fail(str(error))
    if not jobs:
        con.close()
        fail("Give --class-prompt, or add a concept with a class noun: workbench concept add NAME --trigger T --class dog")
    from pipelines.priors import NO_INSTANCES

    for prompt, count, concept in jobs:
        if not count:  # a concept with no photos yet (or an empty dataset): 200 × 0 class images
            _note(f"skipped {prompt!r}: " + NO_INSTANCES.format(
                whose=f"concept {concept!r}" if concept else "the dataset" if class_prompt else "its concepts"))
    jobs = [job for job in jobs if job[1]]
    if not jobs:
        con.close()
        fail("No class image set to make (see above).")
    from pipelines.train.data import supplied_prior_counts

    for prompt, count in supplied_prior_counts(con, [job[0] for job in jobs]).items():
        if count:
            _note(f"{count} class image(s) you supplied serve {prompt!r}: training takes "
                  "them first, and these generated ones only when --num-class-images asks for more.")
    size = resolution or model_resolution(model)  # the size a set is made at is part of the set
    # the model loads and samples with the catalog closed (minutes to hours on real models), so the TUI,
    # `workbench sql` and curation steps can use it meanwhile; what lands on disk is added at the end
    path = catalog_mod.catalog_file(con)
    components = None
    stopped = (f"the class images made so far are in {folder}; run the same command again to add them to the catalog "
               "and make the rest")
    try:  # Ctrl+C, or `kill`/`timeout` (main() makes SIGTERM a Ctrl+C): the PNGs made so far are kept, and it says so
        with _stopped_says(stopped), RichProgress() as progress:
            if size is None:  # a single-file checkpoint: its size is known once it is loaded
                con.close()
                components = load_sd_components(model, device=device)
                size = pipeline_resolution(components)
                con = catalog_mod.connect_when_free(path, progress=progress, task="plan",
                                                    waiting=f"Waiting for the catalog {path}, which {{holder}} has open.",
                                                    stopped="Stopped before any class image was made.")
            settings = PriorSettings(resolution=size, steps=steps)
            plans = [prior_plan(con, class_prompt=prompt, model_name=model, out_dir=folder, settings=settings, num_images=count,
                                seed=seed, concept=concept) for prompt, count, concept in jobs]
            con.close()
            made: dict[str, dict] = {}
            if any(plan.to_generate for plan in plans):
                # DDIM on the model's noise schedule, as training makes its priors: one set, one sampler
                pipe = prior_pipeline(components or load_sd_components(model, device=device), device)
                for plan in plans:
                    made[plan.class_prompt] = generated_prior_files(pipe, plan, batch_size=batch_size, progress=progress)
            con = catalog_mod.connect_when_free(
                path, progress=progress, task="add to catalog",
                waiting=f"Waiting to add the class images to the catalog {path}, which {{holder}} has open.",
                stopped=f"Stopped before the class images were added: they are in {folder}; run the same command again to add them.",
            )
            for plan in plans:
                summary = ingested_priors(con, plan, made.get(plan.class_prompt, {}))
                console.print(counts_table(f"class priors: {plan.class_prompt} ({settings.label()})",
                                           {k: v for k, v in summary.as_dict().items() if k != "class_prompt"}))
    except (ModelError, ValueError, CatalogError) as error:
        fail(str(error))


def _supplied_priors_command(folder: Path, class_prompt: str | None, catalog: Path | None, including_training_photos: bool, *,
                             given: dict[str, bool]) -> None:
    from pipelines.priors import class_prompt_of_folder, supplied_priors

    generating = [name for name, was_given in given.items() if was_given]
    if generating:
        fail(f"--from adds the class images you have; {', '.join(generating)} only set(s) how images are generated: leave "
             f"{'it' if len(generating) == 1 else 'them'} out.")
    if not folder.is_dir():  # before the catalog is opened
        fail(f"{folder} is not a folder.")
    con = open_catalog(catalog)
    prompt = class_prompt or class_prompt_of_folder(con, folder)
    if prompt is None:
        fail(f"Give the class prompt of the images in {folder}: --class-prompt \"a photo of a dog\" (a kohya folder "
             "named like 1_dog gives its own).")
    try:
        with RichProgress(transient=True) as progress:
            summary = supplied_priors(con, folder, class_prompt=prompt, including_training_photos=including_training_photos,
                                      progress=progress)
    except ValueError as error:
        fail(str(error))
    console.print(counts_table(f"class images you supplied: {prompt}", summary.as_dict()))


def _run_moved_here(con, folder: Path) -> str | None:
    """What to say of a run folder the catalog has elsewhere (moved): its dataset.json names the folder's life."""
    from pipelines.train.config import SNAPSHOT_FILE
    from pipelines.train.data import snapshot_folder_id

    folder_id = snapshot_folder_id(folder / SNAPSHOT_FILE)
    if folder_id is None:
        return None
    row = first_row(con.execute("SELECT max(train_id), any_value(output_dir) FROM training_runs WHERE folder_id = ?", [folder_id]))
    if row[0] is None:
        return None
    return (f"it holds training run {row[0]}, which trained in {row[1]}: the folder was moved since. Runs are found in "
            "the folder they trained in: move it back to evaluate it.")


@app.command()
def evaluate(
    run: Annotated[str, typer.Argument(help="Training run id (training_runs.train_id), a run's output folder, or 'latest'.")] = "latest",
    clip_model: Annotated[Optional[str], typer.Option(help="CLIP model (default: the run's preset's CLIP).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda.")] = None,
    catalog: CatalogOpt = None,
) -> None:
    """Score a training run's samples: CLIP score vs prompts and CMMD vs its training images; stored with the run.

    The run's row in training_runs holds the newest evaluation; every one is kept in the evaluations table.

    Example: workbench evaluate latest   (or: workbench evaluate runs/my-lora)
    """
    from pipelines.train.evaluate import run_metrics
    from workbench.models import ModelError

    con = open_catalog(catalog)
    if run == "latest":
        row = first_row(con.execute("SELECT max(train_id) FROM training_runs WHERE status = 'ok'"))
        if row[0] is None:
            fail("No finished training run yet: run `workbench train lora` first.")
        train_id = int(row[0])
    elif run.isdigit():
        train_id = int(run)
    elif Path(run).expanduser().is_dir():  # a run's output folder: its last finished run there
        folder = str(Path(run).expanduser().resolve())
        row = first_row(con.execute("SELECT max(train_id) FILTER (WHERE status = 'ok'), string_agg(DISTINCT status, ', ') "
                          "FROM training_runs WHERE output_dir = ?", [folder]))
        if row[0] is None:
            moved = _run_moved_here(con, Path(folder))
            fail(f"No finished training run in {run}" + (f" (its runs: {row[1]}; `workbench train … --resume latest "
                 f"--output-dir {run}` finishes it)" if row[1] else f": {moved}" if moved else ": is it a run's output folder?"))
        train_id = int(row[0])
    else:
        gone = con.execute("SELECT list(train_id ORDER BY train_id) FROM training_runs WHERE output_dir = ?",
                           [str(Path(run).expanduser().absolute())]).fetchall()[0][0]
        if gone:
            fail(f"{run} is gone (moved or deleted); the catalog has training run(s) {', '.join(map(str, gone))} there. "
                 "Runs are found in the folder they trained in: move it back to evaluate it.")
        if os.sep in run or run.startswith((".", "~")) or (os.altsep and os.altsep in run):  # meant as a folder
            fail(f"No folder {run}: RUN is a training run id, a run's output folder or 'latest' "
                 "(`workbench sql \"SELECT train_id, status, output_dir FROM training_runs\"` lists them).")
        fail(f"RUN must be a training run id, a run's output folder or 'latest', got {run!r}")
    try:
        with RichProgress(transient=True) as progress:
            metrics = run_metrics(con, train_id, clip_model=clip_model, device=device, progress=progress)
    except (ModelError, ValueError) as error:
        fail(str(error))
    shown = {METRIC_LABELS.get(k, k): (f"{v:.4f}" if isinstance(v, float) else v) for k, v in metrics.items()}
    console.print(counts_table(f"evaluation of run {train_id}", shown, value_column="value"))



# --- the terminal UI (issue 5) -----------------------------------------------


TUI_SCREENS = ("pipeline", "browser", "captions", "duplicates", "sql", "train")


@app.command()
def tui(
    catalog: CatalogOpt = None,
    screen: Annotated[Optional[str], typer.Option("--screen", help=f"Screen to open first: {', '.join(TUI_SCREENS)} (default: browser, or pipeline for an empty catalog).")] = None,
) -> None:
    """Open the Textual workbench on a catalog (F1 inside lists every key).

    Example: workbench tui --catalog project.duckdb --screen duplicates
    """
    if screen is not None and screen not in TUI_SCREENS:
        fail(f"--screen must be one of {', '.join(TUI_SCREENS)}.")
    catalog = catalog.expanduser() if catalog is not None else None
    if catalog is not None and not catalog.exists():  # a typo must not open a new, empty catalog in silence
        fail(f"No catalog at {catalog}. `workbench ingest FOLDER --catalog {catalog}` starts one there; `workbench` "
             "alone opens (or starts) ./workbench.duckdb.")
    drawn_on = sys.__stderr__  # where Textual draws (its driver writes to the real stderr, not stdout)
    if not (sys.stdin.isatty() and drawn_on is not None and drawn_on.isatty()):
        # a cron line with an empty step (`workbench $STEP`) started a TUI no one saw, which held the catalog for good
        fail("The terminal UI needs a terminal, and stdin or stderr (where it draws) is not one here: give a command "
             "(`workbench --help` lists them).")
    try:
        from tui.app import WorkbenchApp
    except ImportError as error:
        fail(f"The terminal UI is not available: {error}")
    workbench_app = WorkbenchApp(catalog_path=catalog or catalog_mod.default_catalog_path(), start=screen)
    workbench_app.run()
    if workbench_app.failure:
        fail(workbench_app.failure)
    if workbench_app.crash_report is not None:
        if workbench_app.crash_report:
            err_console.print(escape(workbench_app.crash_report), highlight=False)
        fail(f"The terminal UI stopped on an unexpected error (above; also in {workbench_app.stderr_log}).",
             code=1)
    # a run stopped by quitting may still be writing its checkpoint: the process ends when it has, so say so (the
    # terminal sat blank for seconds)
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        err_console.print("Waiting for the stopped work to record how it ended (a training run: its checkpoint)…")


class _StopWhenTheStepEnds(CancellableProgress):
    """Ctrl+C (or SIGTERM) while a model trains: the run stops when the step in progress ends, which it keeps as a
    checkpoint for --resume, instead of at once, losing the steps since the last scheduled checkpoint. A second Ctrl+C
    stops at once. The signal cancels the progress hook, as the TUI's Stop does; the trainer calls it between steps."""

    active: list["_StopWhenTheStepEnds"] = []  # the one running now (SIGTERM asks it too, even with Ctrl+C ignored)

    def ask(self) -> None:
        if self.cancelled:  # the second time: now
            raise KeyboardInterrupt
        self.cancel()
        # also met while class images are made, before training: what is done is kept, whichever it is
        if int(os.environ.get("RANK", "0")) == 0:  # every process of a multi-process run gets the stop; one says it
            err_console.print("[bold]Stopping[/] when the step in progress ends (what is done is kept); Ctrl+C again stops at once.")

    def __enter__(self) -> "_StopWhenTheStepEnds":
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.getsignal(signal.SIGINT)
            if self.previous is not signal.SIG_IGN:  # a background job's ignored Ctrl+C stays ignored
                signal.signal(signal.SIGINT, lambda signum, frame: self.ask())
        self.active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        self.active.remove(self)
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


_TERMINATED: list[int] = []  # the SIGTERM received, if any: the exit status says it (143), not Ctrl+C's 130


def _terminate_as_ctrl_c(signum, frame) -> None:
    """SIGTERM (`kill`, `timeout`, job schedulers) stops a command as Ctrl+C does: through whatever handles Ctrl+C
    now (a step's own graceful stop, or KeyboardInterrupt), so what is done is kept, recorded and said."""
    _TERMINATED.append(signum)
    if _StopWhenTheStepEnds.active:
        _StopWhenTheStepEnds.active[-1].ask()
        return
    handler = signal.getsignal(signal.SIGINT)
    if handler is signal.default_int_handler:
        # a real SIGINT: C code that polls for Ctrl+C (DuckDB running a query) stops too, which a KeyboardInterrupt
        # raised here reached only when DuckDB next ran Python code (a long query ran on)
        signal.raise_signal(signal.SIGINT)
    elif callable(handler):
        handler(signal.SIGINT, frame)
    else:  # Ctrl+C ignored (a background job of a script): SIGTERM must still stop it
        raise KeyboardInterrupt


# diffusers example options that have no workbench option, and what does the job here
DIFFUSERS_ELSEWHERE = {
    "instance_data_dir": "images come from the catalog: `workbench ingest DIR` first",
    "class_data_dir": "class images you have go in with `workbench priors --from DIR`",
    "validation_epochs": "samples are made every --validation-steps steps",
    "logging_dir": "logs go in the run's --output-dir",
    "push_to_hub": "", "hub_token": "", "hub_model_id": "",
}


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _kohya_prompt_file(value: str, notes: list[str] | None = None) -> list[str]:
    """The prompts of a kohya --sample_prompts file (.txt: one per line, # comments; its per-prompt settings such
    as `--n negative --w 512` are cut off, as the sample grids use the run's, and said in `notes`). ValueError for
    anything else."""
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"--sample_prompts takes a prompt file, as in kohya, and there is no file {value!r}: give a prompt "
                         "itself with --validation-prompt 'TEXT' (repeatable).")
    if path.suffix.lower() != ".txt":
        raise ValueError(f"--sample_prompts {value}: only kohya's .txt prompt files (one prompt per line) are read; give "
                         "the prompts with --validation-prompt 'TEXT' (repeatable).")
    # utf-8-sig: a byte-order mark (Notepad writes one) was kept at the start of the first prompt
    lines = [line.strip() for line in path.read_text(encoding="utf-8-sig", errors="replace").splitlines()]
    # `a dog --n lowres --w 512 --ss euler_a`: one line's own settings, cut at the first " --" as sd-scripts cuts them
    prompts = [line.split(" --", 1)[0].strip() for line in lines if line and not line.startswith("#")]
    if not any(prompts):
        raise ValueError(f"--sample_prompts {value}: the file holds no prompt.")
    settings = sorted({f"--{match}" for line in lines if line and not line.startswith("#")
                       for match in re.findall(r" --(\w+)", line)})
    if settings and notes is not None:
        notes.append(f"--sample_prompts {value}: the prompts' own settings ({', '.join(settings)}) are left out: the sample "
                     "grids have no negative prompt and use the run's size, steps, guidance and seeds "
                     "(--validation-* options).")
    return [prompt for prompt in prompts if prompt]


def _kohya_meaning(name: str, value: str, notes: list[str] | None = None) -> list[tuple[str, str]]:
    """A kohya option whose value means something else here, as (our key, value) pairs (none: nothing to set).
    ValueError where there is no counterpart; what it leaves out goes in `notes`."""
    truthy = value.lower() not in _FALSE
    if name == "v_parameterization":
        return [("prediction_type", "v_prediction")] if truthy else []
    if name == "network_train_unet_only":  # kohya trains the text encoder's LoRA too unless this is set
        return [("train_text_encoder", "false" if truthy else "true")]
    if name == "optimizer_type":
        kind = value.lower().replace("_", "").replace("-", "")
        if kind in ("adamw", "adamw8bit"):
            return [("use_8bit_adam", "true" if kind == "adamw8bit" else "false")]
        raise ValueError(f"--optimizer_type {value} has no workbench counterpart: it trains with AdamW, or 8-bit AdamW "
                         "(--optimizer_type AdamW8bit, or --use-8bit-adam).")
    if name == "color_aug":
        raise ValueError("--color_aug (kohya's on/off colour augmentation) has no on/off here: --color-jitter STRENGTH "
                         "(e.g. 0.1) jitters brightness, contrast and saturation by up to that much.")
    if name == "sample_prompts":
        return [("validation_prompt", prompt) for prompt in _kohya_prompt_file(value, notes)]
    raise KeyError(name)


def _config_sets_alpha(args: list[str]) -> bool:
    """Whether the --config TOML of a train command gives an alpha (unreadable: taken as yes, and left to it)."""
    import tomllib

    for i, token in enumerate(args):
        name, sep, value = token.partition("=")
        if name != "--config":
            continue
        value = value if sep else (args[i + 1] if i + 1 < len(args) else "")
        try:
            data = tomllib.loads(Path(value).expanduser().read_text())
        except (OSError, ValueError):
            return True
        table = data.get("train") if isinstance(data.get("train"), dict) else data
        return any(key.replace("-", "_") in ("lora_alpha", "network_alpha") for key in table)
    return False


_KOHYA_MEANINGS = ("v_parameterization", "network_train_unet_only", "optimizer_type", "color_aug", "sample_prompts")


def pasted_train_options(args: list[str], notes: list[str] | None = None) -> list[str]:
    """`workbench train MODE …` as the diffusers examples and kohya write their options: one the train command has
    no flag for, but that is a training option (`--max_grad_norm 1.0`, `--report_to none`), becomes `--set KEY=VALUE`,
    their names for ours (`--pretrained_model_name_or_path` → `--model`) become ours, and a kohya option whose value
    means something else here is translated (`--v_parameterization` → `--prediction-type v_prediction`,
    `--sample_prompts FILE` → a `--validation-prompt` per line). Anything else is left to the command's own errors;
    other commands are left alone. ValueError for an option with no counterpart; `notes` gets what a user of the
    peer should know (kohya's LoRA alpha default)."""
    start = 0  # the workbench's own options may come first: `workbench -c cat.duckdb train lora …`
    while start < len(args) and args[start] != "train":
        if args[start] in ("-c", "--catalog", "--wait"):
            start += 2
        elif args[start].startswith(("--catalog=", "--wait=")):
            start += 1
        else:
            return args
    if len(args) < start + 2:
        return args
    head, args = args[:start], args[start:]
    from pipelines.train.config import FIELD_NAMES, KOHYA_NONE, KOHYA_OPTIONS

    command = typer.main.get_command(app).commands["train"].commands.get(args[1])
    if command is None:
        return head + args
    params = {opt: param for param in command.params for opt in param.opts + param.secondary_opts}

    def ours(key: str, value: str) -> list[str]:
        flag = "--" + key.replace("_", "-")
        param = params.get(flag)
        if param is None:
            return ["--set", f"{key}={value}"]
        if getattr(param, "is_flag", False):  # `--shuffle-tags`, not `--shuffle-tags true` (an extra argument)
            return [flag] if value.lower() not in _FALSE else param.secondary_opts[:1] or ["--set", f"{key}=false"]
        return [flag, value]

    spelled = {token.partition("=")[0].replace("-", "_") for token in args}
    # the options given in the workbench's own words (a flag, or --set KEY=…): a kohya or diffusers name for one of
    # them as well would be two values for one option, of which one silently won
    given: dict[str, str] = {}
    for i, token in enumerate(args[2:], start=2):
        if token.startswith("--set="):
            key = token[len("--set="):].partition("=")[0].strip()
            given.setdefault(key, f"--set {key}=…")
        elif token == "--set" and i + 1 < len(args):
            key = args[i + 1].partition("=")[0].strip()
            given.setdefault(key, f"--set {key}=…")
        else:  # ours in any spelling: `--learning_rate` (kohya's) is `--learning-rate`, beside `--unet_lr` too
            flag = token.partition("=")[0]
            dashed = "--" + flag[2:].replace("_", "-") if flag.startswith("--") else flag
            if dashed in params and params[dashed].name:
                given.setdefault(params[dashed].name, flag)
    from pipelines.train.config import KOHYA_TEXT_ENCODER_NOTE, LIST_OPTIONS

    if notes is not None and {"__network_dim", "__network_alpha", "__network_module"} & spelled and not (
            {"__network_train_unet_only", "__train_text_encoder", "__no_train_text_encoder"} & spelled):
        notes.append(KOHYA_TEXT_ENCODER_NOTE.replace("train_text_encoder = true", "--train-text-encoder"))

    def given_as_is(tokens: list[str]) -> bool:
        """Whether the translation is already in the command as typed (the same value twice is no conflict)."""
        rest = args[2:]
        return any(rest[i : i + len(tokens)] == tokens for i in range(len(rest)))

    def translated(name: str, pairs: list[tuple[str, str]]) -> list[str]:
        out = []
        for key, value in pairs:
            tokens = ours(key, value)
            # a list option (the sample prompts) takes both; anything else would have two values, one silently lost
            if key in given and key not in LIST_OPTIONS and not given_as_is(tokens):
                raise ValueError(f"{name} and {given[key]} both give {key}: keep one.")
            out += tokens
        return out

    out, rest = list(args[:2]), list(args[2:])
    while rest:
        token = rest.pop(0)
        if token == "--":
            out += [token, *rest]
            break
        name, sep, value = token.partition("=")
        dashed = name.replace("_", "-")
        if name == "--cache_dir" and notes is not None:  # diffusers' flag of that name is the Hub download cache
            notes.append("--cache_dir here is the workbench's latent and text cache, not the Hugging Face download cache "
                         "of diffusers' flag of that name (HF_HUB_CACHE or HF_HOME sets that one)")
        if not name.startswith("--") or dashed in params:
            out.append(token)
            continue
        kohya = name[2:].replace("-", "_")
        key = KOHYA_OPTIONS.get(kohya, kohya)
        if kohya == "center_crop":  # diffusers' flag for what is the workbench's default (theirs is a random crop)
            if not sep and rest and rest[0].lower() in _TRUE + _FALSE:
                value = rest.pop(0)
            if (value or "true").lower() in _FALSE:
                out += ["--random-crop"]
            elif notes is not None:
                notes.append("--center_crop: the centre crop is the workbench's default (within each image's bucket); "
                             "--random-crop gives diffusers' default.")
            continue
        if key in DIFFUSERS_ELSEWHERE:
            raise ValueError(f"{name} has no workbench counterpart" + (f": {DIFFUSERS_ELSEWHERE[key]}." if DIFFUSERS_ELSEWHERE[key] else "."))
        if kohya in KOHYA_NONE:  # said as a --config file says it, not typer's bare "No such option"
            raise ValueError(f"{name} (kohya) has no workbench counterpart" + (f": {KOHYA_NONE[kohya]}." if KOHYA_NONE[kohya] else "."))
        if key not in FIELD_NAMES:
            out.append(token)
            continue
        if not sep:  # a flag with no value (`--scale_lr`) is true; else its value is the next word
            boolean = (kohya in ("v_parameterization", "network_train_unet_only", "color_aug") if kohya in _KOHYA_MEANINGS
                       else getattr(params.get("--" + key.replace("_", "-")), "is_flag", False))
            takes_next = rest and not rest[0].startswith("--") and (not boolean or rest[0].lower() in _TRUE + _FALSE)
            value = rest.pop(0) if takes_next else "true"
        if kohya in _KOHYA_MEANINGS:
            out += translated(name, list(_kohya_meaning(kohya, value, notes)))
            continue
        alpha_given = ({"__network_alpha", "__lora_alpha"} & spelled or _config_sets_alpha(args)
                       or any(re.match(r"(lora|network)[-_]alpha\s*=", item) for item in args))  # --set KEY=…
        produced = translated(name, [(key, value)])
        if kohya == "network_dim" and not alpha_given:
            # kohya's alpha defaults to 1 (the update scaled by 1/dim), diffusers' and ours to the rank
            out += ours("lora_alpha", "1")
            (notes if notes is not None else []).append(f"--network_dim {value} without --network_alpha: alpha is 1, as kohya's default (the update "
                         "scaled by 1/dim); --lora-alpha sets another, and without either the workbench's default is the rank.")
        out += produced
    return head + out


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate_as_ctrl_c)
    try:
        notes: list[str] = []
        sys.argv[1:] = pasted_train_options(sys.argv[1:], notes)
    except ValueError as error:
        err_console.print(f"[bold red]Error:[/] {escape(str(error))}")
        sys.exit(2)
    for note in notes:
        _note(note)
    try:
        app()
    except SystemExit as done:
        if _TERMINATED and done.code == 130:  # stopped by SIGTERM: 128 + 15, as a shell or job scheduler expects
            sys.exit(128 + signal.SIGTERM)
        raise
    except CatalogError as error:
        err_console.print(f"[bold red]Error:[/] {escape(printable(str(error)))}")
        sys.exit(1 if _not_writable(error) else 2)  # a catalog on a read-only disk: the machine, not the input
    except Exception as error:
        if _query_interrupted(error):  # Ctrl+C or SIGTERM while DuckDB ran a query: the stop it is, not a bug
            err_console.print("[bold]Stopped[/]: what was written before is kept (every step writes in transactions); "
                              "the same command goes on.")
            sys.exit(128 + signal.SIGTERM if _TERMINATED else 130)
        if isinstance(error, duckdb.Error) and "Corrupt database file" in str(error):
            # found by a later read, not on opening (which says "not a readable workbench catalog"): a traceback
            # only hid that the file is damaged
            err_console.print(f"[bold red]Error:[/] the catalog file is damaged ({escape(printable(str(error).splitlines()[0]))}). "
                              "Restore it from a backup, or ingest the folders again into a new catalog.")
            sys.exit(2)
        if isinstance(error, OSError) and error.errno == errno.ENAMETOOLONG:  # a path past the system's limit, wherever given
            err_console.print(f"[bold red]Error:[/] a path is too long for this system: {escape(str(error.filename or error)[:200])}…")
            sys.exit(2)
        if is_disk_full(error):
            # the catalog (DuckDB's write-ahead log) or an output on a full disk: each step's writes are transactions,
            # so what was written before is kept; a traceback only hid that
            err_console.print(f"[bold red]Error:[/] no space left on the disk: {escape(str(error))}. What was written before "
                              "is kept: free some space and run the same command again.")
            sys.exit(1)
        if _not_writable(error):
            _say_not_writable(error)
        raise


def _query_interrupted(error: BaseException) -> bool:
    """Whether DuckDB stopped a query because the process was asked to stop (it raises its own error, not
    KeyboardInterrupt, when Ctrl+C or SIGTERM comes while it runs)."""
    while error is not None:
        if isinstance(error, getattr(duckdb, "InterruptException", ())) or (
                isinstance(error, RuntimeError) and str(error).strip() == "Query interrupted"):
            return True
        error = error.__cause__ or error.__context__
    return False


def _not_writable(error: BaseException) -> bool:
    """Whether an error (OSError, DuckDB's), or the one it was raised from, is a file or folder that may not be read
    or written: permissions, a read-only file system. Not one that merely happened while such an error was handled
    (__context__): that is a bug of its own, whose traceback must show."""
    import errno

    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return True
        if "Permission denied" in str(error) or "Read-only file system" in str(error):
            return True
        error = error.__cause__
    return False


def _say_not_writable(error: BaseException) -> NoReturn:
    """A file or folder that may not be read or written (the catalog's folder, for its .wal; an output's) said in a
    line, not a traceback."""
    text = str(error).strip().splitlines()[-1] if str(error).strip() else error.__class__.__name__
    err_console.print(f"[bold red]Error:[/] {escape(printable(text))}. A file or folder may not be read or written here "
                      "(its permissions, or a read-only disk). What was written before is kept: mend that, or give "
                      "another path, and run the same command again.")
    sys.exit(1)


if __name__ == "__main__":
    main()
