"""Near-duplicate search at scale: N random 64-bit pHashes with planted near duplicates.

Prints seconds, peak memory (RSS of this process) and exactness against brute force on a sample of
queries checked against all N hashes. With imagededup installed, also runs its BK-tree search on
the largest N it can handle in the same run, for the side-by-side figure.

    python benchmarks/dedup_scale.py                 # 1,000,000 hashes, threshold 6
    python benchmarks/dedup_scale.py --n 200000 --imagededup-n 100000
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.dedup import hamming_pairs, hamming_pairs_between  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def planted(n: int, threshold: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, np.iinfo(np.int64).max, size=n, dtype=np.int64).astype(np.uint64)
    hashes |= rng.integers(0, 2, size=n).astype(np.uint64) << np.uint64(63)
    # 2% of the rows are near duplicates of another row, at distances 0..threshold+2.
    copies = n // 50
    sources = rng.integers(0, n, size=copies)
    targets = rng.integers(0, n, size=copies)
    for s, t in zip(sources, targets):
        value = int(hashes[s])
        for bit in rng.choice(64, size=int(rng.integers(0, threshold + 3)), replace=False):
            value ^= 1 << int(bit)
        hashes[t] = np.uint64(value)
    return hashes, targets


def verify(hashes: np.ndarray, i: np.ndarray, j: np.ndarray, threshold: int, queries: int, planted_rows: np.ndarray, seed: int = 1) -> tuple[int, int]:
    """Brute force sample rows (half random, half planted copies) against all rows; return (pairs expected, pairs missing or extra)."""
    rng = np.random.default_rng(seed)
    sample = np.unique(np.concatenate([
        rng.choice(len(hashes), size=queries // 2, replace=False),
        rng.choice(planted_rows, size=queries - queries // 2, replace=False),
    ]))
    found = set(zip(i.tolist(), j.tolist()))
    expected = wrong = 0
    for q in sample:
        close = np.nonzero(np.bitwise_count(hashes ^ hashes[q]) <= threshold)[0]
        truth = {(min(q, c), max(q, c)) for c in close.tolist() if c != q}
        ours = {p for p in found if p[0] == q or p[1] == q}
        expected += len(truth)
        wrong += len(truth ^ ours)
    return expected, wrong


def imagededup_seconds(hashes: np.ndarray, threshold: int, method: str) -> tuple[float, int] | str:
    try:
        from imagededup.handlers.search.retrieval import HashEval
    except ImportError:
        return "imagededup not installed (pip install imagededup)"
    encodings = {str(k): format(int(h), "016x") for k, h in enumerate(hashes)}
    from imagededup.methods.hashing import Hashing

    start = time.perf_counter()
    try:
        result = HashEval(test=encodings, queries=encodings, distance_function=Hashing.hamming_distance,
                          threshold=threshold, search_method=method, num_dist_workers=2).retrieve_results(scores=False)
    except RecursionError:
        return "imagededup failed: RecursionError in its BK-tree"
    seconds = time.perf_counter() - start
    pairs = sum(len(v) for v in result.values()) // 2
    return seconds, pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--threshold", type=int, default=6)
    parser.add_argument("--queries", type=int, default=1000, help="rows brute-forced against all N for exactness")
    parser.add_argument("--imagededup-n", type=int, default=10_000, help="size for the imagededup side (0 = skip)")
    parser.add_argument("--imagededup-method", default="brute_force_cython", help="brute_force_cython (its default), brute_force or bktree")
    args = parser.parse_args()

    hashes, planted_rows = planted(args.n, args.threshold)
    base = peak_rss_mb()
    start = time.perf_counter()
    unique, inverse = np.unique(hashes, return_inverse=True)
    i, j, _ = hamming_pairs(unique, args.threshold)
    seconds = time.perf_counter() - start
    # Map unique-value pairs back to rows for the check (rows sharing a value are distance 0).
    rows_i, rows_j = [], []
    by_value: dict[int, list[int]] = {}
    for row, u in enumerate(inverse.tolist()):
        by_value.setdefault(u, []).append(row)
    for a, b in zip(i.tolist(), j.tolist()):
        for ra in by_value[a]:
            for rb in by_value[b]:
                rows_i.append(min(ra, rb)); rows_j.append(max(ra, rb))
    for rows in by_value.values():
        for x in range(len(rows)):
            for y in range(x + 1, len(rows)):
                rows_i.append(rows[x]); rows_j.append(rows[y])
    expected, wrong = verify(hashes, np.array(rows_i), np.array(rows_j), args.threshold, args.queries, planted_rows)

    print(f"workbench multi-index search: {args.n:,} hashes, threshold {args.threshold}")
    print(f"  seconds            {seconds:8.1f}")
    print(f"  pairs found        {len(rows_i):8,d}")
    print(f"  peak RSS (MB)      {peak_rss_mb():8.0f}  (before the search: {base:.0f})")
    print(f"  exactness check    {args.queries} sample rows (half planted) brute-forced vs all {args.n:,}: "
          f"{expected} true pairs, {wrong} missing or extra")
    # The mirrored search (`dedup` default): the mirrored pHashes searched against the pHashes.
    rng = np.random.default_rng(2)
    mirrors = rng.integers(0, np.iinfo(np.int64).max, size=args.n, dtype=np.int64).astype(np.uint64)
    flipped_rows = rng.integers(0, args.n, size=args.n // 100)  # 1% are flipped copies of another row
    mirrors[flipped_rows] = hashes[rng.integers(0, args.n, size=len(flipped_rows))] ^ np.uint64(0b101)
    start = time.perf_counter()
    mi, _, _ = hamming_pairs_between(np.unique(mirrors), unique, args.threshold)
    mirror_seconds = time.perf_counter() - start
    across = len(mi)
    print(f"  + mirrored search  {mirror_seconds:8.1f} s  ({across:,} hash/mirror pairs, {len(flipped_rows):,} planted); "
          f"peak RSS now {peak_rss_mb():.0f} MB")
    if args.imagededup_n:
        small = hashes[: args.imagededup_n]
        start = time.perf_counter()
        su, _ = np.unique(small, return_inverse=True)
        hamming_pairs(su, args.threshold)
        ours = time.perf_counter() - start
        theirs = imagededup_seconds(small, args.threshold, args.imagededup_method)
        print(f"side by side at {args.imagededup_n:,} hashes, threshold {args.threshold}:")
        print(f"  workbench          {ours:8.2f} s")
        if isinstance(theirs, str):
            print(f"  imagededup         {theirs}")
        else:
            print(f"  imagededup         {theirs[0]:8.2f} s   ({args.imagededup_method}; workbench is {theirs[0] / ours:.0f}x faster)")


if __name__ == "__main__":
    main()
