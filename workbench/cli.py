"""The one front door: a thin typer layer over the library functions in pipelines/."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from workbench import catalog as catalog_mod
from workbench.catalog import CatalogError
from workbench.progress import RichProgress

app = typer.Typer(
    help="Curate an image set in a DuckDB catalog and train Stable Diffusion on it.\n\n"
    "Example: workbench ingest ./photos && workbench dedup && workbench sql \"SELECT count(*) FROM dataset\"",
    no_args_is_help=False,
    add_completion=False,
    rich_markup_mode="rich",
)
console = Console()
err_console = Console(stderr=True)

CatalogOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--catalog",
        "-c",
        help="Catalog file (default: $WORKBENCH_CATALOG or ./workbench.duckdb).",
        envvar=catalog_mod.CATALOG_ENV,
        show_default=False,
    ),
]


def fail(message: str, code: int = 2) -> None:
    """Print a short error for people and exit (2 = usage or input error)."""
    err_console.print(f"[bold red]Error:[/] {message}")
    raise typer.Exit(code)


def open_catalog(path: Optional[Path], *, read_only: bool = False):
    try:
        return catalog_mod.connect(path, read_only=read_only)
    except CatalogError as error:
        fail(str(error))


def counts_table(title: str, counts: dict) -> Table:
    table = Table(title=title, show_header=True)
    table.add_column("what")
    table.add_column("count", justify="right")
    for key, value in counts.items():
        table.add_row(str(key).replace("_", " "), str(value))
    return table


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context, catalog: CatalogOpt = None) -> None:
    """Open the terminal UI when no command is given."""
    if ctx.invoked_subcommand is None:
        tui(catalog=catalog)


# --- foundation: ingest, dedup, sql ------------------------------------------


@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Folders or image files to add.", show_default=False)],
    catalog: CatalogOpt = None,
    workers: Annotated[Optional[int], typer.Option(help="Worker processes (default: all cores).")] = None,
    max_pixels: Annotated[int, typer.Option(help="Images with more pixels are recorded as errors (decompression bombs).")] = 178_956_970,
) -> None:
    """Walk folders, hash and measure every image, and record it in the catalog.

    Example: workbench ingest ./photos ./more --catalog project.duckdb
    """
    from pipelines.ingest import ingested_images

    missing = [str(p) for p in paths if not os.path.lexists(p)]
    if missing:
        fail(f"No such file or folder: {', '.join(missing)}")
    con = open_catalog(catalog)
    with RichProgress() as progress:
        summary = ingested_images(con, paths, workers=workers, max_pixels=max_pixels, progress=progress)
    console.print(counts_table("ingest", summary.as_dict()))
    if summary.errors_by_reason:
        table = Table(title="files recorded as errors")
        table.add_column("reason")
        table.add_column("files", justify="right")
        for reason, n in summary.errors_by_reason.items():
            table.add_row(reason, str(n))
        console.print(table)


@app.command()
def dedup(
    catalog: CatalogOpt = None,
    threshold: Annotated[int, typer.Option(help="Largest pHash Hamming distance (of 64 bits) that counts as a near duplicate; 0 keeps only identical hashes.")] = 6,
) -> None:
    """Group exact and near-duplicate images; keep the best copy of each group, exclude the rest.

    Example: workbench dedup --threshold 6
    """
    from pipelines.dedup import duplicate_groups

    if not 0 <= threshold <= 16:
        fail("--threshold must be between 0 and 16 bits.")
    con = open_catalog(catalog)
    with RichProgress() as progress:
        summary = duplicate_groups(con, threshold=threshold, progress=progress)
    console.print(counts_table("dedup", summary))


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="SQL to run against the catalog.")],
    catalog: CatalogOpt = None,
    format: Annotated[str, typer.Option("--format", "-f", help="table, csv, json or parquet.")] = "table",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the result here (required for parquet).")] = None,
    write: Annotated[bool, typer.Option("--write", help="Allow statements that change the catalog.")] = False,
    limit: Annotated[int, typer.Option(help="Rows shown in table format.")] = 100,
) -> None:
    """Query the catalog with DuckDB SQL (read-only unless --write).

    Example: workbench sql "SELECT path, width, height FROM dataset ORDER BY width DESC LIMIT 5" --format json
    """
    if format not in {"table", "csv", "json", "parquet"}:
        fail("--format must be table, csv, json or parquet.")
    if format == "parquet" and output is None:
        fail("--format parquet needs --output FILE.parquet")
    try:
        if not write and not catalog_mod.is_read_only_sql(query):
            catalog_mod.run_sql(None, query)  # raises the refusal message
        con = open_catalog(catalog, read_only=not write)
        relation = catalog_mod.run_sql(con, query, write=write)
    except CatalogError as error:
        fail(str(error))
    if relation is None:
        console.print("OK")
        return
    if format == "parquet":
        relation.write_parquet(str(output))
        err_console.print(f"wrote {output}")
        return
    if format == "csv":
        text = _csv_text(relation)
    elif format == "json":
        frame = relation.pl()
        text = json.dumps(frame.to_dicts(), default=_json_default, ensure_ascii=False)
    else:
        frame = relation.limit(limit).pl()
        table = Table(show_lines=False)
        for name in frame.columns:
            table.add_column(name, overflow="fold")
        for row in frame.iter_rows():
            table.add_row(*("NULL" if v is None else str(v) for v in row))
        console.print(table)
        return
    if output:
        output.write_text(text)
        err_console.print(f"wrote {output}")
    else:
        sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))


def _csv_text(relation) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(relation.columns)
    for row in relation.fetchall():
        writer.writerow(["" if v is None else json.dumps(v, default=_json_default) if isinstance(v, (list, dict)) else v for v in row])
    return buffer.getvalue()


def _json_default(value):
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    return str(value)


# --- models, caption, score, filter, buckets, concepts, export (issue 3) -----

models_app = typer.Typer(help="Model presets and where their weights live.", no_args_is_help=True)
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
        table.add_row(row["preset"], row["component"], row["source"], row["path"] or "[dim]not downloaded[/]")
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



# --- priors and training (issue 4) -------------------------------------------


# --- the terminal UI (issue 5) -----------------------------------------------


@app.command()
def tui(catalog: CatalogOpt = None) -> None:
    """Open the Textual workbench on a catalog.

    Example: workbench tui --catalog project.duckdb
    """
    try:
        from tui.app import WorkbenchApp
    except ImportError as error:
        fail(f"The terminal UI is not available: {error}")
    WorkbenchApp(catalog_path=catalog or catalog_mod.default_catalog_path()).run()


def main() -> None:
    try:
        app()
    except CatalogError as error:
        err_console.print(f"[bold red]Error:[/] {error}")
        sys.exit(2)


if __name__ == "__main__":
    main()
