"""Dedup: exact duplicates by content hash, near duplicates by pHash distance, one keeper per group.

Near-duplicate search is exact multi-index hashing: the 64 hash bits are split into m blocks so
that any pair within the threshold differs in at most r = threshold // m bits in some block
(pigeonhole). Each block is probed with every mask of at most r flipped bits against a dense
table of block values, and every candidate is verified by popcount. Memory is O(N), never N².
"""

from __future__ import annotations

import math
import os
from itertools import combinations
from collections import defaultdict
from typing import Any, Iterable, Sequence

import duckdb
import numpy as np
import polars as pl

from workbench.catalog import first_row, record_run, rolled_back, transaction
from workbench.progress import ProgressHook, null_progress

DEFAULT_THRESHOLD = 6
MAX_THRESHOLD = 16  # of 64 bits: beyond this unrelated photos pair up (benchmarks/phash_threshold.py)
SMALL_N = 3000  # up to here hamming_pairs compares every pair directly
LOSSLESS_FORMATS = {"PNG", "BMP", "TIFF", "GIF", "PPM"}
# A flat image (luminance std under one grey level on ingest's ~96 px decode, the `contrast` column) has no structure
# for a pHash to describe: its 64 bits come from rounding error or pixel noise. Plain colours then pair with each
# other (white, red and blue within 6 bits), while one near-flat image with faint noise, re-encoded, moves 14-40
# bits. Of 1,080 plain and noisy single-colour images (PNG, JPEG, WebP), 0.4-4% of the pairs of different colours
# fell within 6 bits when both scored under 0.25, none of 540,000 pairs when either scored more; sample photos
# score 10 and up, the same photos at 15% exposure 2.8 and up. So flat images are left out of the pHash and
# mirrored search, with a 4x margin over 0.25.
FLAT_CONTRAST = 1.0


# --- the pair search -----------------------------------------------------------


def _popcount(values: np.ndarray) -> np.ndarray:
    return np.bitwise_count(values)


def _block_layout(threshold: int) -> tuple[list[tuple[int, int]], int]:
    """Blocks (shift, bits) and the per-block radius r, chosen so each probe stays cheap (r <= 2)."""
    blocks = max(3, math.ceil((threshold + 1) / 3))  # at least 3, so a block table has at most 2^22 entries
    radius = threshold // blocks
    widths = [64 // blocks + (1 if i < 64 % blocks else 0) for i in range(blocks)]
    layout, shift = [], 0
    for width in widths:
        layout.append((shift, width))
        shift += width
    return layout, radius


def _flip_masks(bits: int, radius: int) -> np.ndarray:
    masks = [0]
    for r in range(1, radius + 1):
        for positions in combinations(range(bits), r):
            mask = 0
            for p in positions:
                mask |= 1 << p
            masks.append(mask)
    return np.array(masks, dtype=np.int64)


def _block_pairs(
    query_hashes: np.ndarray, query_block: np.ndarray, sorted_hashes: np.ndarray, starts: np.ndarray, masks: np.ndarray,
    threshold: int, same_set: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Verified pairs (query position, position in the block-sorted table) for one block and a set of flip masks.

    With `same_set` the queries are the table itself and each unordered pair is kept once (p < k).
    """
    counts = np.diff(starts).astype(np.int32)
    found_p, found_k = [], []
    for mask in masks:
        probe = query_block ^ np.int32(mask)
        hits = np.take(counts, probe)  # block-sorted order keeps this gather cache-friendly
        rows = (hits > 0).nonzero()[0]
        if not rows.size:
            continue
        reps = hits[rows].astype(np.int64)
        total = int(reps.sum())
        first = np.cumsum(reps) - reps
        k = np.repeat(starts[probe[rows]] - first, reps) + np.arange(total)
        p = np.repeat(rows, reps)
        if same_set:
            keep = p < k  # each unordered pair is met from both ends; verify it once
            p, k = p[keep], k[keep]
        close = np.bitwise_count(query_hashes[p] ^ sorted_hashes[k]) <= threshold
        found_p.append(p[close])
        found_k.append(k[close])
    if not found_p:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(found_p), np.concatenate(found_k)


def _multi_index_search(
    hashes: np.ndarray, queries: np.ndarray | None, threshold: int, progress: ProgressHook, threads: int
) -> tuple[np.ndarray, np.ndarray]:
    """(query row, hash row) of every pair within `threshold`; queries None: pairs within `hashes`, i < j."""
    from concurrent.futures import ThreadPoolExecutor

    layout, radius = _block_layout(threshold)
    found_i, found_j = [], []
    total_probes = sum(len(_flip_masks(bits, radius)) for _, bits in layout)
    probes_done = 0
    # numpy releases the GIL in these array operations, so threads share the probe work.
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for shift, bits in layout:
            block_of = lambda values: ((values >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.int32)  # noqa: E731
            block = block_of(hashes)
            order = np.argsort(block, kind="stable")
            sorted_block = block[order]
            sorted_hashes = hashes[order]
            starts = np.zeros((1 << bits) + 1, dtype=np.int64)
            np.cumsum(np.bincount(sorted_block, minlength=1 << bits), out=starts[1:])
            if queries is None:
                query_order, query_hashes, query_block = order, sorted_hashes, sorted_block
            else:
                asked = block_of(queries)
                query_order = np.argsort(asked, kind="stable")
                query_hashes, query_block = queries[query_order], asked[query_order]
            masks = _flip_masks(bits, radius)
            chunks = [masks[c : c + 32] for c in range(0, len(masks), 32)]
            jobs = [pool.submit(_block_pairs, query_hashes, query_block, sorted_hashes, starts, chunk, threshold, queries is None)
                    for chunk in chunks]
            for job, chunk in zip(jobs, chunks):
                p, k = job.result()
                a, b = query_order[p], order[k]
                if queries is None:
                    a, b = np.minimum(a, b), np.maximum(a, b)
                found_i.append(a)
                found_j.append(b)
                probes_done += len(chunk)
                progress(task="near-duplicate search", completed=probes_done, total=total_probes)
    i = np.concatenate(found_i)
    j = np.concatenate(found_j)
    unique = np.unique(i * len(hashes) + j)  # a pair close in several blocks is found in each
    return unique // len(hashes), unique % len(hashes)


def hamming_pairs(
    hashes: np.ndarray, threshold: int, progress: ProgressHook = null_progress, *, threads: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All index pairs (i < j) of `hashes` (uint64) within Hamming distance `threshold`, with distances."""
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(hashes)
    if n < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64)
    if n <= SMALL_N:
        # Below this size a direct popcount over all pairs beats setting up the block tables.
        pairs = sorted(brute_force_pairs(hashes, threshold))
        i = np.array([p[0] for p in pairs], dtype=np.int64)
        j = np.array([p[1] for p in pairs], dtype=np.int64)
    else:
        i, j = _multi_index_search(hashes, None, threshold, progress, threads)
    return i, j, np.bitwise_count(hashes[i] ^ hashes[j]).astype(np.int64)


def hamming_pairs_between(
    queries: np.ndarray, hashes: np.ndarray, threshold: int, progress: ProgressHook = null_progress, *, threads: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (query index, hash index) within Hamming distance `threshold`, with distances: one set searched
    against another (mirrored pHashes against pHashes), without the pairs inside either set."""
    queries = np.ascontiguousarray(queries, dtype=np.uint64)
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    if not len(queries) or not len(hashes):
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64)
    if len(queries) * len(hashes) <= SMALL_N * SMALL_N // 2:
        found = [], []
        for start in range(0, len(queries), 2048):
            rows, cols = np.nonzero(_popcount(queries[start : start + 2048, None] ^ hashes[None, :]) <= threshold)
            found[0].append(rows + start)
            found[1].append(cols)
        i, j = np.concatenate(found[0]).astype(np.int64), np.concatenate(found[1]).astype(np.int64)
    else:
        i, j = _multi_index_search(hashes, queries, threshold, progress, threads)
    return i, j, np.bitwise_count(queries[i] ^ hashes[j]).astype(np.int64)


def brute_force_pairs(hashes: np.ndarray, threshold: int, chunk: int = 2048) -> set[tuple[int, int]]:
    """Reference answer for tests and benchmarks: every pair by direct comparison (O(N²) time, O(N·chunk) memory)."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    pairs = set()
    for start in range(0, len(hashes), chunk):
        block = hashes[start : start + chunk]
        distances = _popcount(block[:, None] ^ hashes[None, :])
        rows, cols = np.nonzero(distances <= threshold)
        for r, c in zip(rows + start, cols):
            if r < c:
                pairs.add((int(r), int(c)))
    return pairs


# --- grouping and the keep policy ----------------------------------------------------


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


# an image's filter exclusions (`workbench filter`), joined: a copy the filter lets through is kept before one it excludes
FILTERED_OUT_SQL = ("SELECT string_agg(e.reason, '; ' ORDER BY e.step) FROM exclusions e "
                    "WHERE e.image_id = i.image_id AND starts_with(e.step, 'filter:')")

GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# at the same resolution, a full-colour copy over these: CMYK, which Pillow turns into RGB without a colour profile
# (its colours shift), and a palette of at most 256 colours (a photo quantised to a GIF or a small PNG)
_FEWER_COLOURS = {"CMYK": (1, "CMYK"), "P": (2, "palette"), "PA": (2, "palette")}


def _grey(member: dict) -> bool:
    """A grey copy: a grey mode, or colour channels holding grey (ingest's is_grayscale)."""
    return (member.get("mode") or "") in GREY_MODES or bool(member.get("is_grayscale"))


# copies within this share of the largest copy's pixels count as its resolution: a border padded on or a few pixels
# cropped off are no more picture, and a letterboxed JPEG 0.75% larger had won over its lossless original
SAME_RESOLUTION_WITHIN = 0.03


def _pixels(member: dict) -> int:
    return (member["width"] or 0) * (member["height"] or 0)


def largest_pixels(members: Iterable[dict]) -> int:
    """The pixels of the largest of `members`: what `keep_order_key` compares the others with."""
    return max((_pixels(member) for member in members), default=0)


def _resolution(member: dict, largest: int) -> int:
    """A copy's pixels, or `largest` when it is within SAME_RESOLUTION_WITHIN of it (0: no largest given)."""
    pixels = _pixels(member)
    return largest if pixels <= largest <= pixels * (1 + SAME_RESOLUTION_WITHIN) else pixels


def keep_order_key(member: dict, largest: int = 0) -> tuple:
    """Sort key of the keep policy (after a hand choice, then a copy the filter lets through): colour over grey, then
    highest resolution (within 3% of `largest`, the largest copy's pixels, counts as it), then full colour over CMYK
    and palette, then lossless over lossy, then larger file, then path order."""
    # Colour first: a grey copy of a colour photo has lost what no resolution gives back (a LoRA trained on it
    # learns grey). A grey original (a black-and-white photo) is grey in every copy, and resolution decides.
    # Pixels, not detail: an upscale of a thumbnail wins over its original, and no stored column can tell it. Blur,
    # contrast and entropy come from a ~96 px decode (the upscale even scores sharper there), and file size fails
    # both ways: q90 upscales outweigh their originals, and q75 originals weigh less than their copies 1.5x smaller
    # at q95 (6 and 12 of the 14 sample photos).
    fewer_colours = _FEWER_COLOURS.get(member.get("mode") or "", (0, ""))[0]
    lossless = (member["format"] or "").upper() in LOSSLESS_FORMATS
    return (_grey(member), -_resolution(member, largest), fewer_colours, not lossless, -(member["bytes"] or 0),
            member["first_seq"])


def keeper_rank(member: dict, largest: int = 0) -> tuple:
    """Which copy of a group to keep, after a hand choice: one the filter lets through (a kept copy the filter excludes
    took the picture out of the dataset), then one in a concept over one in none (keeping a copy in a loose folder took
    the picture out of its concept, its trigger and repeats), then the keep policy (`keep_order_key`)."""
    return member.get("filtered_out") is not None, member.get("concept") is None, keep_order_key(member, largest)


# the columns the keep policy reads, of `images i` joined to its `paths p`
MEMBER_COLUMNS_SQL = (
    "i.image_id, i.width, i.height, i.format, i.bytes, i.mode, i.is_grayscale, min(p.seq) AS first_seq, "
    f"({FILTERED_OUT_SQL}) AS filtered_out, (SELECT ci.concept FROM concept_images ci WHERE ci.image_id = i.image_id) AS concept"
)


def preferred_copy(con: duckdb.DuckDBPyConnection, image_ids: Sequence[str]) -> str:
    """Of `image_ids`, the copy the keep policy would choose (what to suggest keeping when the kept one goes)."""
    cursor = con.execute(
        f"SELECT {MEMBER_COLUMNS_SQL} FROM images i "
        "JOIN paths p USING (image_id) WHERE i.image_id IN (SELECT unnest(?::VARCHAR[])) GROUP BY ALL", [list(image_ids)],
    )
    names = [column[0] for column in cursor.description]
    members = [dict(zip(names, row)) for row in cursor.fetchall()]
    largest = largest_pixels(members)
    return min(members, key=lambda m: keeper_rank(m, largest))["image_id"] if members else image_ids[0]


def _keep_reason(keeper: dict, runner_up: dict, largest: int) -> str:
    """Why the keeper ranks above the runner-up (`largest`: the group's largest pixels): the first part of the keep
    policy that tells them apart."""
    if (runner_up.get("filtered_out") is not None and keeper.get("filtered_out") is None
            and keep_order_key(runner_up, largest) < keep_order_key(keeper, largest)):
        return f"passes the filter (a copy ranked above it does not: {runner_up['filtered_out']})"
    if (keeper.get("concept") is not None and runner_up.get("concept") is None
            and keep_order_key(runner_up, largest) < keep_order_key(keeper, largest)):
        return f"in concept {keeper['concept']} (a copy ranked above it is in none)"
    if _grey(keeper) != _grey(runner_up):
        return f"colour over greyscale ({runner_up.get('mode')})"
    if _resolution(keeper, largest) != _resolution(runner_up, largest):
        return f"highest resolution ({keeper['width']}x{keeper['height']})"
    fewer = _FEWER_COLOURS.get(runner_up.get("mode") or "", (0, ""))
    if _FEWER_COLOURS.get(keeper.get("mode") or "", (0, ""))[0] < fewer[0]:
        mode = runner_up.get("mode")
        return f"full colour {keeper.get('mode')} over " + (fewer[1] if fewer[1] == mode else f"{fewer[1]} {mode}")
    keeper_lossless = (keeper["format"] or "").upper() in LOSSLESS_FORMATS
    if keeper_lossless != ((runner_up["format"] or "").upper() in LOSSLESS_FORMATS):
        return f"lossless {keeper['format']} over lossy {runner_up['format']}"
    if keeper["bytes"] != runner_up["bytes"]:
        return f"larger file ({keeper['bytes']:,} bytes)"
    return "first in path order"


_METHOD_ORDER = {"phash": 0, "mirror": 1, "embedding": 2}


def _edge_rank(method: str, distance: float) -> tuple[int, float]:
    """Which of two pairs between the same images to show: pHash before mirrored before CLIP, then the closest
    (fewest bits; for CLIP, whose distance is a cosine similarity, the highest)."""
    return _METHOD_ORDER.get(method, len(_METHOD_ORDER)), -distance if method == "embedding" else distance


def _keeper_groups(info: list[dict], usable: list[tuple], chosen: set[str]) -> list[tuple[int, list[int], dict, int]]:
    """(keeper, members, edge to the keeper by member, the largest pixels the keeper was ranked against) for every
    group, each member within the threshold of its keeper.

    Pairs chain: frames of a burst each close to the next would join into one connected group although the
    first and the last are far apart. So each connected set is split around keepers: the best member keeps its
    own pairs, the best of the rest keeps theirs, and so on; a member close to no keeper is no duplicate.
    Identical hashes are stored as a star around one of them, so members joined at distance 0 count as one node.
    """
    position = {member["image_id"]: k for k, member in enumerate(info)}
    same, linked = _UnionFind(len(info)), _UnionFind(len(info))
    for a, b, method, distance in usable:
        linked.union(position[a], position[b])
        if method == "phash" and distance == 0:
            same.union(position[a], position[b])
    node = [same.find(k) for k in range(len(info))]
    best_edge: dict[tuple[int, int], tuple[str, float]] = {}  # between nodes: pHash, then mirrored, then CLIP; the closest
    for a, b, method, distance in usable:
        na, nb = node[position[a]], node[position[b]]
        if na == nb:
            continue
        for key in ((na, nb), (nb, na)):
            current = best_edge.get(key)
            if current is None or _edge_rank(method, distance) < _edge_rank(*current):
                best_edge[key] = (method, distance)
    connected: dict[int, list[int]] = {}
    for k in range(len(info)):
        connected.setdefault(linked.find(k), []).append(k)
    groups = []
    for members in connected.values():
        remaining, ranked_by = members, -1
        while remaining:
            # each keeper is ranked among the images left, against the largest of them (within 3% of it counts as
            # its size); the order changes only when that largest does
            largest = largest_pixels(info[k] for k in remaining)
            if largest != ranked_by:
                remaining = sorted(remaining, key=lambda k: (info[k]["image_id"] not in chosen, keeper_rank(info[k], largest)))
                ranked_by = largest
            keeper = remaining[0]
            edges = {k: ("phash", 0.0) if node[k] == node[keeper] else best_edge.get((node[k], node[keeper]))
                     for k in remaining[1:]}
            edges = {k: edge for k, edge in edges.items() if edge is not None}
            if edges:
                groups.append((keeper, [keeper, *edges], edges, largest))
            remaining = [k for k in remaining[1:] if k not in edges]
    return sorted(groups, key=lambda g: min(info[k]["first_seq"] for k in g[1]))


def regroup_duplicates(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Recompute duplicate groups, keepers and 'dedup' exclusions from every pair method and keeper choice."""
    members = con.sql(
        f"""
        SELECT {MEMBER_COLUMNS_SQL}
        FROM images i JOIN paths p USING (image_id)
        WHERE i.status = 'ok' AND NOT p.missing
          AND i.image_id IN (SELECT image_a FROM duplicate_pairs UNION SELECT image_b FROM duplicate_pairs)
        GROUP BY ALL
        """
    ).pl()
    pairs = con.sql("SELECT image_a, image_b, method, distance FROM duplicate_pairs").pl()
    chosen = {row[0] for row in con.execute("SELECT image_id FROM keeper_choice").fetchall()}
    alone = {row[0] for row in con.execute("SELECT image_id FROM not_duplicates").fetchall()}  # said by hand: no duplicate
    info = members.to_dicts()
    present = set(members["image_id"].to_list()) - alone
    usable = [row for row in pairs.iter_rows() if row[0] in present and row[1] in present]
    # identical hashes are stored as a star, and close hash values hub to hub: an image out of the groups now (set
    # apart by hand; gone or unreadable since dedup found its pairs) may be the hub its twins hang on, and the one link
    # of their hash to the others. A twin stands for that hash instead (same hash: same distances), or the twins
    # would leave the group with it
    rows = list(pairs.iter_rows())
    absent = ({a for a, _, _, _ in rows} | {b for _, b, _, _ in rows}) - present
    twins_of: dict[str, set[str]] = defaultdict(set)
    for a, b, method, distance in rows:
        if method == "phash" and distance == 0 and (a in absent or b in absent):
            twins_of[a].add(b)
            twins_of[b].add(a)
    stands_for: dict[str, str] = {}
    for image_id in absent:
        twins = sorted(twins_of.get(image_id, set()) & present)
        usable += [(twins[0], twin, "phash", 0.0) for twin in twins[1:]]  # identical to each other, through it
        if twins:
            stands_for[image_id] = twins[0]
    for a, b, method, distance in rows:
        # (mirrored pairs hang on one image per hash value too)
        if method in ("phash", "mirror") and (distance > 0 or method == "mirror") and (a in stands_for or b in stands_for):
            a, b = stands_for.get(a, a), stands_for.get(b, b)
            if a in present and b in present:
                usable.append((a, b, method, distance))
    groups = _keeper_groups(info, usable, chosen)
    rows, exclusions, other_concept = [], [], []
    for group_number, (keeper_k, group, edges, largest) in enumerate(groups, start=1):
        keeper = info[keeper_k]
        if keeper["image_id"] in chosen:
            reason = "chosen by hand"
        else:
            # beside the best copy the filter excludes (or, next, the best in no concept) when that one ranks higher
            # (the policy skipped it), else the next; against the largest copy the keeper was ranked with
            def order(member: dict) -> tuple:
                return keep_order_key(member, largest)

            filtered = [info[k] for k in group if info[k].get("filtered_out") is not None]
            loose = [info[k] for k in group if info[k].get("filtered_out") is None and info[k].get("concept") is None]
            best_skipped = [best for best in (min(filtered, key=order) if filtered else None,
                                              min(loose, key=order) if loose else None)
                            if best is not None and order(best) < order(keeper)]
            reason = _keep_reason(keeper, best_skipped[0] if best_skipped else info[group[1]], largest)
        for k in group:
            member = info[k]
            is_keeper = k == keeper_k
            method, distance = ("keeper", None) if is_keeper else edges[k]
            rows.append(
                {
                    "image_id": member["image_id"],
                    "group_id": group_number,
                    "keeper_id": keeper["image_id"],
                    "is_keeper": is_keeper,
                    "method": method,
                    "distance": distance,
                    "keep_reason": reason if is_keeper else None,
                }
            )
            if not is_keeper:
                what = "flipped duplicate" if method == "mirror" else "duplicate"  # the reason says which kind of copy
                exclusions.append({"image_id": member["image_id"], "reason": f"{what} of {keeper['image_id']}"})
                if member.get("concept") is not None and member["concept"] != keeper.get("concept"):
                    other_concept.append(member["image_id"])
    frame = pl.DataFrame(
        rows,
        schema={"image_id": pl.String, "group_id": pl.Int64, "keeper_id": pl.String, "is_keeper": pl.Boolean,
                "method": pl.String, "distance": pl.Float64, "keep_reason": pl.String},
    )
    excluded_rows = pl.DataFrame(exclusions, schema={"image_id": pl.String, "reason": pl.String})
    con.register("new_duplicates", frame)
    con.register("new_exclusions", excluded_rows)
    try:
        with transaction(con):
            con.execute("DELETE FROM duplicates")
            con.execute("DELETE FROM exclusions WHERE step = 'dedup'")
            con.execute("INSERT INTO duplicates SELECT * FROM new_duplicates")
            con.execute("INSERT INTO exclusions (image_id, step, reason) SELECT image_id, 'dedup', reason FROM new_exclusions")
    finally:
        con.unregister("new_duplicates")
        con.unregister("new_exclusions")
    counts = {"groups": len(groups), "images_in_groups": len(rows), "excluded_as_duplicates": len(exclusions)}
    if other_concept:  # copies in two concepts (or a hand choice out of one): the picture trains in the keeper's only
        counts["concept_images_excluded_for_a_copy_outside_their_concept"] = len(other_concept)
    carried = _carried_captions(con)
    if carried:
        counts["kept_copies_captioned_from_a_duplicate"] = carried
    return counts


def _carried_captions(con: duckdb.DuckDBPyConnection) -> int:
    """Kept copies that train with the caption of a copy they excluded (the `carried_captions` view)."""
    return con.execute("SELECT count(*) FROM current_captions WHERE caption_source = 'duplicate'").fetchall()[0][0]


def replace_pairs(con: duckdb.DuckDBPyConnection, method: str, pairs: pl.DataFrame) -> None:
    """Replace every stored pair of `method` with `pairs` (columns image_a, image_b, distance; a < b)."""
    with transaction(con):
        con.execute("DELETE FROM duplicate_pairs WHERE method = ?", [method])
        if pairs.height:
            con.register("new_pairs", pairs)
            con.execute(
                "INSERT INTO duplicate_pairs SELECT least(image_a, image_b), greatest(image_a, image_b), ?, distance "
                "FROM new_pairs",
                [method],
            )
            con.unregister("new_pairs")


def choose_keeper(con: duckdb.DuckDBPyConnection, image_id: str) -> dict[str, int]:
    """Make `image_id` the kept member of its group (a hand choice beats the policy) and regroup."""
    group = con.execute("SELECT group_id FROM duplicates WHERE image_id = ?", [image_id]).fetchall()
    if not group:
        raise ValueError(f"{image_id} is not in a duplicate group.")
    con.execute(
        "DELETE FROM keeper_choice WHERE image_id IN (SELECT image_id FROM duplicates WHERE group_id = ?)",
        [group[0][0]],
    )
    con.execute("INSERT INTO keeper_choice VALUES (?)", [image_id])
    return regroup_duplicates(con)


def keeper_choice_dropped(con: duckdb.DuckDBPyConnection, image_id: str) -> tuple[bool, str | None]:
    """Undo a hand choice in `image_id`'s group: the keep policy chooses again. Returns (whether a hand choice was
    there, the copy of `image_id` now kept: None when it is in no group any more, a chain the choice held together)."""
    group = con.execute("SELECT group_id FROM duplicates WHERE image_id = ?", [image_id]).fetchall()
    if not group:
        raise ValueError(f"{image_id} is not in a duplicate group.")
    dropped = con.execute(
        "DELETE FROM keeper_choice WHERE image_id IN (SELECT image_id FROM duplicates WHERE group_id = ?)", [group[0][0]]
    ).fetchall()[0][0]
    if not dropped:
        return False, None
    regroup_duplicates(con)
    kept = con.execute("SELECT keeper_id FROM duplicates WHERE image_id = ?", [image_id]).fetchall()
    return True, kept[0][0] if kept else None


class AlreadySo(ValueError):
    """What was asked for holds already (the same command run again): nothing to do, and no failure."""


def image_set_apart(con: duckdb.DuckDBPyConnection, image_id: str, *, apart: bool = True) -> dict[str, int]:
    """Say an image is a picture of its own, not a duplicate (`apart`), or undo that; then regroup. Its pairs stay
    stored, so undoing it restores its group as dedup found it."""
    if apart:
        if not con.execute("SELECT count(*) FROM duplicates WHERE image_id = ?", [image_id]).fetchall()[0][0]:
            raise AlreadySo(f"{image_id[:12]} is not in a duplicate group: it is on its own already.")
        with transaction(con):
            con.execute("INSERT INTO not_duplicates (image_id) VALUES (?) ON CONFLICT DO NOTHING", [image_id])
            con.execute("DELETE FROM keeper_choice WHERE image_id = ?", [image_id])
    elif not con.execute("DELETE FROM not_duplicates WHERE image_id = ? RETURNING image_id", [image_id]).fetchall():
        raise AlreadySo(f"{image_id[:12]} was not set apart from its duplicates: nothing to undo.")
    return regroup_duplicates(con)


def kept_but_excluded(con: duckdb.DuckDBPyConnection, image_id: str) -> str | None:
    """Why a copy kept by hand is out of the dataset all the same (a filter or a manual exclusion), else None:
    its group then gives the dataset no copy of the picture."""
    row = first_row(con.execute("SELECT exclusion_reason FROM images_view WHERE image_id = ? AND excluded", [image_id]))
    return row[0] if row else None


_PAIR_SCHEMA = {"image_a": pl.String, "image_b": pl.String, "distance": pl.Float64}
_NO_PAIRS = pl.DataFrame(schema=_PAIR_SCHEMA)


def _mirror_pairs(frame: pl.DataFrame, threshold: int, progress: ProgressHook) -> pl.DataFrame:
    """Flipped copies: pairs whose one pHash is within `threshold` of the other's mirrored pHash (and not of its pHash).

    The distinct mirrored values are searched against the distinct pHash values. Images that share a pHash are
    already one group, so one image per value stands for them.
    """
    frame = frame.filter(pl.col("phash_mirror").is_not_null())
    if frame.height < 2:
        return _NO_PAIRS
    ids = frame["image_id"].to_numpy()
    hashes = frame["phash"].to_numpy().astype(np.uint64)
    mirrors = frame["phash_mirror"].to_numpy().astype(np.uint64)
    plain, plain_row = np.unique(hashes, return_index=True)
    flipped, flipped_row = np.unique(mirrors, return_index=True)
    f, p, distance = hamming_pairs_between(flipped, plain, threshold, progress)
    a, b = plain_row[p], flipped_row[f]
    # an image close to its own mirror is symmetric, and a pair close without the flip is a pHash pair already
    keep = (ids[a] != ids[b]) & (np.bitwise_count(hashes[a] ^ hashes[b]) > threshold)
    pairs = pl.DataFrame({"image_a": ids[a[keep]].tolist(), "image_b": ids[b[keep]].tolist(),
                          "distance": distance[keep].astype(np.float64).tolist()}, schema=_PAIR_SCHEMA)
    ordered = pairs.select(pl.min_horizontal("image_a", "image_b").alias("image_a"),
                           pl.max_horizontal("image_a", "image_b").alias("image_b"), "distance")
    return ordered.group_by("image_a", "image_b").agg(pl.col("distance").min()).sort("image_a", "image_b")


def _fill_missing_mirror_hashes(con: duckdb.DuckDBPyConnection, progress: ProgressHook) -> dict[str, int]:
    """Mirrored pHashes for images ingested before catalogs stored them: each such file is read once, here."""
    from pipelines.ingest import read_image_file

    todo = con.execute(
        """
        SELECT h.image_id, arg_min(p.path_bytes, p.seq) FROM hashes h JOIN images i USING (image_id)
        JOIN paths p USING (image_id)
        WHERE h.phash_mirror IS NULL AND i.status = 'ok' AND i.role = 'instance' AND NOT p.missing
        GROUP BY h.image_id
        """
    ).fetchall()
    from concurrent.futures import ThreadPoolExecutor

    def measured(item: tuple[str, bytes]) -> tuple[str, int | None]:
        image_id, path_bytes = item
        row = read_image_file(bytes(path_bytes), max_pixels=2**62)  # it was read before, under whatever cap was set then
        return image_id, row.get("phash_mirror") if row["image_id"] == image_id else None  # else changed since ingest

    added = unread = 0
    # decoding and hashing release the GIL; batches are committed as they finish, so a Ctrl+C keeps what was read
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for start in range(0, len(todo), 64):
            results = list(pool.map(measured, todo[start : start + 64]))
            found = [(mirror, image_id) for image_id, mirror in results if mirror is not None]
            if found:
                with transaction(con):
                    con.executemany("UPDATE hashes SET phash_mirror = ? WHERE image_id = ?", found)
            added += len(found)
            unread += len(results) - len(found)
            progress(task="mirrored hashes of older images", completed=start + len(results), total=len(todo))
    counts = {"older_images_given_mirror_hashes": added} if added else {}
    if unread:  # the next ingest reads them again, mirrored hash included
        counts["older_images_changed_since_ingest"] = unread
    return counts


def duplicate_groups(
    con: duckdb.DuckDBPyConnection,
    *,
    threshold: int = DEFAULT_THRESHOLD,
    drop_embedding_pairs: bool = False,
    mirrored: bool = True,
    progress: ProgressHook = null_progress,
) -> dict[str, int]:
    """Find near-duplicate pairs by pHash, group them with any other method's pairs, and exclude all but keepers.

    `mirrored` also pairs left-right flipped copies (method 'mirror'); `drop_embedding_pairs` forgets the
    CLIP pairs of `workbench score --dedup` first (to undo them).
    """
    if not 0 <= threshold <= MAX_THRESHOLD:
        raise ValueError(f"threshold must be between 0 and {MAX_THRESHOLD} bits")
    params = {"threshold": threshold, "drop_embedding_pairs": drop_embedding_pairs, "mirrored": mirrored}
    with record_run(con, "dedup", params) as run:
        if drop_embedding_pairs:
            con.execute("DELETE FROM duplicate_pairs WHERE method = 'embedding'")
        exact = con.execute(
            """
            SELECT count(*), coalesce(sum(n - 1), 0) FROM (
                SELECT image_id, count(*) AS n FROM paths WHERE NOT missing GROUP BY image_id HAVING n > 1)
            """
        ).fetchall()[0]
        mirror_counts = _fill_missing_mirror_hashes(con, progress) if mirrored else {}
        # Flat images (FLAT_CONTRAST) are never near duplicates, of each other or of anything else. Byte-identical
        # copies are still one image (the sha256 is the id), but a white PNG and a white JPEG stay two images: the
        # hash cannot tell white from red and the catalog holds no mean colour, only luminance. Both are empty to a
        # trainer: `workbench filter --no-low-information` drops them (a plain colour has an entropy of 0 bits).
        frame = con.sql(
            f"""
            SELECT h.image_id, h.phash, h.phash_mirror, coalesce(i.contrast < {FLAT_CONTRAST}, false) AS flat
            FROM hashes h JOIN images i USING (image_id)
            WHERE i.status = 'ok' AND i.role = 'instance'
              AND EXISTS (SELECT 1 FROM paths p WHERE p.image_id = h.image_id AND NOT p.missing)
            ORDER BY h.image_id
            """
        ).pl()
        flat_images = int(frame["flat"].sum())
        frame = frame.filter(~pl.col("flat"))
        ids = frame["image_id"].to_numpy()
        hashes = frame["phash"].to_numpy().astype(np.uint64)
        # Search unique hash values only: identical hashes are distance 0 by construction.
        unique, inverse = np.unique(hashes, return_inverse=True)
        ui, uj, ud = hamming_pairs(unique, threshold, progress)
        # Edges only need to connect each group (a star per hash value, one edge per close pair of
        # values), so many images sharing one hash never blow up into k² rows.
        first_of = np.full(len(unique), -1, dtype=np.int64)
        for row in range(len(inverse) - 1, -1, -1):
            first_of[inverse[row]] = row
        same_rows = np.nonzero(first_of[inverse] != np.arange(len(inverse)))[0]
        left = np.concatenate([ids[first_of[inverse[same_rows]]], ids[first_of[ui]]]) if len(ids) else np.array([], dtype=object)
        right = np.concatenate([ids[same_rows], ids[first_of[uj]]]) if len(ids) else np.array([], dtype=object)
        dist = np.concatenate([np.zeros(len(same_rows)), ud.astype(np.float64)])
        pairs = pl.DataFrame({"image_a": left.tolist(), "image_b": right.tolist(), "distance": dist.tolist()},
                             schema={"image_a": pl.String, "image_b": pl.String, "distance": pl.Float64})
        replace_pairs(con, "phash", pairs)
        flipped = _mirror_pairs(frame, threshold, progress) if mirrored else _NO_PAIRS
        replace_pairs(con, "mirror", flipped)
        counts = regroup_duplicates(con)
        counts = {
            "images_compared": len(ids),
            **({"flat_images_not_compared": flat_images} if flat_images else {}),
            "contents_at_several_paths": int(exact[0]),
            "extra_identical_files": int(exact[1]),
            "near_duplicate_pairs": pairs.height,
            **({"mirrored_pairs": flipped.height, **mirror_counts} if mirrored else {}),
            **counts,
        }
        run.counts.update(counts)
    return counts


def duplicate_groups_preview(con: duckdb.DuckDBPyConnection, **options: Any) -> dict[str, int]:
    """What `duplicate_groups(con, **options)` would do, with nothing changed: its counts, the images it would newly
    exclude as duplicates or let back in, and the dataset's size before and after."""
    def dedup_excluded() -> set[str]:
        return {row[0] for row in con.execute("SELECT image_id FROM exclusions WHERE step = 'dedup'").fetchall()}

    def dataset_size() -> int:
        return con.execute("SELECT count(*) FROM dataset").fetchone()[0]

    before, size_before = dedup_excluded(), dataset_size()
    with rolled_back(con):  # every write of the step, its run record too, is undone
        counts = duplicate_groups(con, **options)
        after, size_after = dedup_excluded(), dataset_size()
    return {**counts, "newly_excluded_as_duplicates": len(after - before), "no_longer_excluded": len(before - after),
            "dataset_images_now": size_before, "dataset_images_after": size_after}
