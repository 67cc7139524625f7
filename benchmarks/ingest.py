"""Ingest throughput: `workbench ingest` vs a plain imagehash loop vs imagededup, same files, same run.

Makes N photo-like JPEGs (640-1024 px; random crops, scales and colour shifts of the sample photos),
then prints images/s for:
  - workbench: pipelines.ingest.ingested_images (SHA-256, size, pHash, dHash, quality stats, catalog writes)
    across all cores, and its incremental second run;
  - plain loop: one process, SHA-256 + full decode + imagehash.phash per file;
  - imagededup: PHash().encode_images + find_duplicates (if installed: pip install imagededup).

    python benchmarks/ingest.py --n 1000
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_corpus(folder: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    sources = [Image.open(p).convert("RGB") for p in sorted((REPO / "sample_data" / "photos").glob("*.jpg"))]
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        src = sources[k % len(sources)]
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        side = int(rng.integers(640, 1025))
        scale = side / max(cw, ch)
        img = src.crop((x, y, x + cw, y + ch)).resize((max(1, int(cw * scale)), max(1, int(ch * scale))), Image.Resampling.BILINEAR)
        shift = rng.integers(-30, 31, size=3)
        array = np.clip(np.asarray(img, dtype=np.int16) + shift, 0, 255).astype(np.uint8)
        Image.fromarray(array).save(folder / f"photo_{k:05d}.jpg", quality=int(rng.integers(80, 95)))


def plain_loop(files: list[Path]) -> float:
    import imagehash

    start = time.perf_counter()
    for path in files:
        data = path.read_bytes()
        hashlib.sha256(data).hexdigest()
        with Image.open(path) as img:
            imagehash.phash(img)
    return time.perf_counter() - start


def imagededup_run(folder: Path) -> float | str:
    try:
        from imagededup.methods import PHash
    except ImportError:
        return "not installed (pip install imagededup)"
    start = time.perf_counter()
    hasher = PHash(verbose=False)
    encodings = hasher.encode_images(image_dir=str(folder), num_enc_workers=os.cpu_count())
    hasher.find_duplicates(encoding_map=encodings, max_distance_threshold=6, num_dist_workers=os.cpu_count())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--keep", action="store_true", help="keep the generated folder")
    args = parser.parse_args()

    from pipelines.dedup import duplicate_groups
    from pipelines.ingest import ingested_images
    from workbench.catalog import connect

    work = Path(tempfile.mkdtemp(prefix="wb-ingest-bench-"))
    folder = work / "photos"
    make_corpus(folder, args.n)
    files = sorted(folder.glob("*.jpg"))
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    print(f"{args.n} JPEGs, 640-1024 px, {megabytes:.1f} MB, {os.cpu_count()} cores")

    con = connect(work / "bench.duckdb")
    start = time.perf_counter()
    ingested_images(con, [folder], workers=args.workers)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    duplicate_groups(con, threshold=6)
    dedup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    again = ingested_images(con, [folder], workers=args.workers)
    rerun = time.perf_counter() - start
    assert again.unchanged == args.n
    con.close()

    loop = plain_loop(files)
    theirs = imagededup_run(folder)

    rate = lambda seconds: args.n / seconds  # noqa: E731
    both = ours + dedup_seconds
    print(f"{'workbench ingest':34s} {rate(ours):8.0f} img/s   ({ours:.2f} s: SHA-256, size, pHash, dHash, quality, catalog rows)")
    print(f"{'workbench ingest + dedup':34s} {rate(both):8.0f} img/s   ({both:.2f} s)")
    print(f"{'workbench re-ingest (unchanged)':34s} {rate(rerun):8.0f} img/s   ({rerun:.2f} s, {rerun / ours:.0%} of the first run)")
    print(f"{'plain loop sha256+phash, 1 proc':34s} {rate(loop):8.0f} img/s   ({loop:.2f} s)   workbench ingest is {loop / ours:.1f}x")
    if isinstance(theirs, str):
        print(f"{'imagededup PHash':34s} {theirs}")
    else:
        print(f"{'imagededup PHash encode+find':34s} {rate(theirs):8.0f} img/s   ({theirs:.2f} s)   "
              f"workbench ingest + dedup is {theirs / both:.1f}x")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
