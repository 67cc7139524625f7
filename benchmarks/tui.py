"""TUI speed on a synthetic 100k-image catalog: first screen and page moves, side by side with the naive way.

Targets (issue 5): opening a 100k-image catalog shows the first screen in < 1 s; moving a page < 50 ms.
"Naive" is what a browser without the snapshot/line table would do: LIMIT/OFFSET over images_view for
every page, drawn with Textual's DataTable.

    .venv/bin/python benchmarks/tui.py --images 100000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

# This file is named tui.py: keep its folder off sys.path so `import tui` finds the package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def query_figures(path: Path, repeat: int) -> dict[str, float]:
    from tui import queries
    from workbench.catalog import connect

    con = connect(path)
    figures = {}
    started = time.perf_counter()
    result = queries.browse(con, queries.Filter(sort_column="path"))
    figures["snapshot (filter+sort into temp table)"] = time.perf_counter() - started
    total = result.total
    offsets = [random.Random(i).randrange(0, total - 100) for i in range(repeat)]
    it = iter(offsets * 2)
    figures["page fetch: keyset on snapshot"] = median_time(lambda: result.page(next(it)), repeat)
    columns = ", ".join(f'"{c}"' for c in result.columns)
    it = iter(offsets * 2)
    figures["page fetch: naive LIMIT/OFFSET on images_view"] = median_time(
        lambda: con.execute(f"SELECT {columns} FROM images_view ORDER BY path, image_id LIMIT 100 OFFSET ?", [next(it)]).fetchall(),
        max(3, repeat // 5),
    )
    started = time.perf_counter()
    queries.browse(con, queries.Filter(text="width > 1000 AND format = 'PNG'", sort_column="bytes", descending=True))
    figures["SQL filter + sort by bytes (snapshot)"] = time.perf_counter() - started
    started = time.perf_counter()
    queries.browse(con, queries.Filter(text="mountain", sort_column="caption"))
    figures["text search + sort by caption (snapshot)"] = time.perf_counter() - started
    result.close()
    con.close()
    return figures


async def ui_figures(path: Path, repeat: int) -> dict[str, float]:
    from textual.app import App
    from textual.widgets import DataTable

    from tui.app import WorkbenchApp
    from tui.page_table import PageTable

    figures: dict[str, float] = {}
    started = time.perf_counter()
    cpu = time.process_time()
    app = WorkbenchApp(catalog_path=path)
    async with app.run_test(size=(160, 48)) as pilot:
        table = None
        while True:
            await asyncio.sleep(0.002)
            try:
                app.screen.query_one("#table-status")
                break
            except Exception:
                pass
        figures["open catalog → browser screen drawn, rows loading"] = time.perf_counter() - started
        while True:
            await pilot.pause(0.005)
            try:
                table = app.screen.query_one("#rows", PageTable)
                if table.row_count:
                    break
            except Exception:
                pass
        figures["open catalog → first page on screen (wall)"] = time.perf_counter() - started
        figures["open catalog → first page on screen (CPU)"] = time.process_time() - cpu
        await pilot.pause(0.5)
        image_table = app.screen.query_one("#browser-table")
        end_to_end = []
        for i in range(repeat):
            await pilot.pause(0.3)  # let the details pane of the last page settle
            target = image_table.page_offset + 100
            started = time.perf_counter()
            image_table.action_page(1)  # what PgDn runs; pilot.press would also wait for unrelated idle work
            while image_table.page_offset != target:
                await asyncio.sleep(0)
            # draw every visible line, as the compositor will
            for y in range(table.size.height):
                table.render_line(y)
            end_to_end.append(time.perf_counter() - started)
        figures["page move end to end (key → rows drawn)"] = statistics.median(end_to_end)
        rows = [list(r) for r in table.rows]
        columns = list(table.columns)

    # The widget alone: new rows in, every visible line drawn.
    class Bench(App):
        def compose(self):
            yield PageTable(id="fast")
            yield DataTable(id="stock")

    bench = Bench()
    async with bench.run_test(size=(160, 48)) as pilot:
        fast = bench.query_one("#fast", PageTable)
        stock = bench.query_one("#stock", DataTable)
        stock.add_columns(*columns)
        await pilot.pause()

        def draw_fast():
            fast.set_rows(columns, rows)
            for y in range(40):
                fast.render_line(y)

        def draw_stock():
            stock.clear()
            stock.add_rows(rows)
            stock._clear_caches()
            for y in range(40):
                stock.render_line(y)

        figures["draw a page: PageTable"] = median_time(draw_fast, repeat)
        figures["draw a page: Textual DataTable"] = median_time(draw_stock, max(3, repeat // 4))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--catalog", type=Path, help="reuse this catalog instead of building a synthetic one")
    parser.add_argument("--ui-json", action="store_true", help=argparse.SUPPRESS)  # internal: UI figures as JSON
    args = parser.parse_args()
    if args.ui_json:
        import json

        started = time.perf_counter()
        import tui.app  # noqa: F401  (imports are part of a real start)

        imports = time.perf_counter() - started
        print(json.dumps({"python imports of the TUI": imports, **asyncio.run(ui_figures(args.catalog, args.repeat))}))
        return

    from tui.synthetic import synthetic_catalog

    with tempfile.TemporaryDirectory() as folder:
        path = args.catalog or Path(folder) / "bench.duckdb"
        if args.catalog is None:
            started = time.perf_counter()
            synthetic_catalog(path, args.images)
            print(f"built a synthetic catalog of {args.images:,} images in {time.perf_counter() - started:.1f} s")
        # UI figures in a fresh process, like a real `workbench` start on this catalog.
        import json
        import subprocess

        out = subprocess.run([sys.executable, __file__, "--ui-json", "--catalog", str(path), "--repeat", str(args.repeat)],
                             check=True, capture_output=True, text=True).stdout
        u = json.loads(out.strip().splitlines()[-1])
        q = query_figures(path, args.repeat)

    print()
    for name, value in {**q, **u}.items():
        print(f"{name:<56}{ms(value)}")
    print()
    print("side by side (ours vs naive):")
    naive_fetch, fast_fetch = q["page fetch: naive LIMIT/OFFSET on images_view"], q["page fetch: keyset on snapshot"]
    print(f"  page fetch   {ms(fast_fetch)} vs {ms(naive_fetch)}   {naive_fetch / fast_fetch:6.1f}× faster")
    stock, fast = u["draw a page: Textual DataTable"], u["draw a page: PageTable"]
    print(f"  page draw    {ms(fast)} vs {ms(stock)}   {stock / fast:6.1f}× faster")
    print()
    drawn = u["open catalog → browser screen drawn, rows loading"]
    first = u["open catalog → first page on screen (wall)"]
    print(f"target: first screen < 1 s      → screen {drawn:.2f} s, first rows {first:.2f} s  {'OK' if first < 1 else 'rows MISSED'}")
    move = u["page move end to end (key → rows drawn)"]
    print(f"target: page move    < 50 ms    → {move * 1000:.1f} ms  {'OK' if move < 0.05 else 'MISSED'}")


if __name__ == "__main__":
    main()
