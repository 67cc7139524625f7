"""Curation steps at catalog scale: buckets, filter, concepts and parquet export on N synthetic rows.

No image files are needed: rows with random sizes and quality stats are written straight into a fresh
catalog, the way ingest leaves them. Each step's seconds and rows/s are printed, and next to the bucket
step the same writes done row by row with DuckDB `executemany` (what the first version did) on a slice
of the rows, as a per-row ratio. kohya itself computes buckets in memory at training start (no catalog),
so there is no peer figure to put beside these: the arithmetic is the same (see tests/test_buckets.py).

    python benchmarks/curation_scale.py              # 100,000 rows
    python benchmarks/curation_scale.py --n 1000000 --baseline-n 5000
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.buckets import aspect_buckets, make_bucket_resolutions, select_bucket  # noqa: E402
from pipelines.concepts import added_concept, concepts_from_folder_names  # noqa: E402
from pipelines.export import parquet_export  # noqa: E402
from pipelines.filter import FilterRules, filtered_dataset  # noqa: E402
from workbench.catalog import connect  # noqa: E402


def synthetic_catalog(path: Path, n: int, seed: int = 0):
    con = connect(path)
    rng = random.Random(seed)
    ids = [f"{i:064x}" for i in range(n)]
    image_rows = pa.table({
        "image_id": ids,
        "width": [rng.randint(100, 3000) for _ in ids],
        "height": [rng.randint(100, 3000) for _ in ids],
        "status": ["ok"] * n,
        "brightness": [rng.uniform(0, 255) for _ in ids],
        "contrast": [rng.uniform(0, 80) for _ in ids],
        "blur": [rng.uniform(0, 500) for _ in ids],
        "entropy": [rng.uniform(0, 8) for _ in ids],
    })
    con.execute("INSERT INTO images (image_id, width, height, status, brightness, contrast, blur, entropy)"
                " SELECT * FROM image_rows")
    paths = [f"/data/{i % 50 + 1}_c{i % 50} thing/{i}.jpg" for i in range(n)]
    path_rows = pa.table({"path": paths, "path_bytes": [p.encode() for p in paths], "image_id": ids, "seq": list(range(n))})
    con.execute("INSERT INTO paths (path, path_bytes, image_id, seq) SELECT * FROM path_rows")
    return con


def timed(label: str, n: int, fn) -> float:
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    print(f"{label:<44} {seconds:8.2f} s {n / seconds:12,.0f} rows/s")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--baseline-n", type=int, default=5_000, help="rows for the row-by-row executemany baseline")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        con = synthetic_catalog(Path(tmp) / "bench.duckdb", args.n)
        print(f"{args.n:,} synthetic catalog rows")
        bucket_s = timed("aspect_buckets (512, 256-1024/64)", args.n, lambda: aspect_buckets(con))
        timed("filtered_dataset (size, aspect, quality)", args.n,
              lambda: filtered_dataset(con, FilterRules(blurry=True, dark=True, overexposed=True, low_information=True)))
        timed("concepts_from_folder_names (50 folders)", args.n, lambda: concepts_from_folder_names(con))
        timed("concept add --where 'width > 1000'", args.n,
              lambda: added_concept(con, "wide", trigger="wide", where="width > 1000"))
        timed("parquet export of dataset", args.n, lambda: parquet_export(con, Path(tmp) / "d.parquet"))

        # the same bucket rows written one by one, on a slice
        resos = make_bucket_resolutions(512, 256, 1024, 64)
        sizes = con.execute("SELECT image_id, width, height FROM images LIMIT ?", [args.baseline_n]).fetchall()
        con.execute("CREATE TEMP TABLE slow_buckets AS SELECT * FROM aspect_buckets LIMIT 0")
        start = time.perf_counter()
        rows = [(i, *select_bucket(w, h, resos=resos), 512, 512, 256, 1024, 64, False, None) for i, w, h in sizes]
        con.executemany("INSERT INTO slow_buckets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        slow_s = time.perf_counter() - start
        per_row_fast = bucket_s / args.n
        per_row_slow = slow_s / len(sizes)
        print(f"{'buckets row-by-row executemany (baseline)':<44} {slow_s:8.2f} s {len(sizes) / slow_s:12,.0f} rows/s"
              f"  ({len(sizes):,} rows)")
        print(f"Arrow bulk write vs executemany, per row: {per_row_slow / per_row_fast:.0f}x faster")
        con.close()


if __name__ == "__main__":
    main()
