"""Declarative filters: each failing rule is an `exclusions` row (step `filter:<rule>`) with a human reason.

Default thresholds and why (all can be changed by flags or the `[filter]` table of workbench.toml):

- `min_side` 256 px: LAION's basic filter keeps short side >= 200 px; SD 1.x trains at 512, where
  kohya's smallest bucket side is 256 (`min_bucket_reso`), so a short side under 256 is upscaled
  more than 2x in a 512-area bucket, which shows as softness. 0 turns the rule off.
- `max_aspect` 3.0: the same basic filter's aspect <= 3; kohya's most extreme 512 bucket is
  1024x256 (4:1), and anything past 3:1 loses most of its long side to the crop. 0 turns it off.
- `min_clip_score` off by default: the threshold depends on the CLIP model. LAION-2B kept
  ViT-B/32 cosine >= 0.28 (DataComp: B/32 > 0.25); use 0.28 with ViT-B/32 scores.
- quality flags (off unless asked; cleanvision-like issue types, from the statistics ingest measures
  on its small decode; thresholds checked on sample_data/photos, see tests/test_filter.py):
  - `blurry`: variance of the 4-neighbour Laplacian < `blur_threshold` 25, on ingest's ~96 px decode
    (pipelines/ingest.py STATS_SIDE; recalibrate if that changes: tests/test_filter.py checks it).
    Sharp photos in sample_data/photos score 32..3900; the same photos Gaussian-blurred by 3 px at
    128 px scale (about 12 px at 512: clearly out of focus) score 2..23 (line art 41); a mild 2 px blur
    scores 3..73. So the rule flags clearly soft images, not slightly soft ones.
  - `dark`: mean + 2.33 std of luminance < `dark_threshold` 56, i.e. roughly the 99th-percentile
    luminance below 22% of white (cleanvision's dark score is a high percentile of brightness).
    Sample photos score 66..354 (hubble.jpg, a night sky with stars, mean 20: 66); the same photos
    at 15% exposure score 10..53.
  - `overexposed`: mean - 1.64 std > `bright_threshold` 170, i.e. roughly the 5th percentile
    already light grey (cleanvision's "light" looks at the dark end of the histogram).
  - `low_information`: histogram entropy < `entropy_threshold` 1.5 bits (cleanlab Datalab's
    low_information threshold 0.15 x normalizing factor 10); a flat or near-flat image scores
    about 0, a black-on-white silhouette about 2, photos 4..8.
- duplicates are already excluded by `workbench dedup` (step 'dedup'); filters do not touch them, but an
  image already excluded (a duplicate, or by hand) that fails a rule gets its filter row all the same, so the
  rule still holds if that copy is kept instead (`workbench keep`). The summary counts such images apart
  ("failing but already excluded"), so the rule counts say what each rule takes out of the dataset.
- manual: `manual_exclusions` (step 'manual', with a reason) and `manual_inclusions`, which win
  over every `filter:*` rule (an included image gets no filter rows).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Iterable, Mapping

import duckdb

from workbench.catalog import first_row, last_run, record_run, transaction
from workbench.images import catalog_path_text
from workbench.progress import ProgressHook, null_progress

FILTER_STEP_PREFIX = "filter:"
MANUAL_STEP = "manual"


# a quality rule's threshold and the rule it sets
THRESHOLD_RULES = {"blur_threshold": "blurry", "dark_threshold": "dark", "bright_threshold": "overexposed",
                   "entropy_threshold": "low_information"}


@dataclass(frozen=True)
class FilterRules:
    """Which rules run and their thresholds; None / False / 0 turns a rule off."""

    min_clip_score: float | None = None
    min_side: int | None = 256
    max_aspect: float | None = 3.0
    blurry: bool = False
    blur_threshold: float = 25.0
    dark: bool = False
    dark_threshold: float = 56.0
    overexposed: bool = False
    bright_threshold: float = 170.0
    low_information: bool = False
    entropy_threshold: float = 1.5
    grayscale: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool":
                if not isinstance(value, bool):
                    raise ValueError(f"filter.{f.name} must be true or false, not {value!r}")
                continue
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"filter.{f.name} must be a number, not {value!r}")
            if f.name == "min_clip_score":
                if not -1 <= value <= 1:
                    raise ValueError(f"filter.min_clip_score is a cosine similarity, between -1 and 1 (got {value})")
            elif value < 0:
                raise ValueError(f"filter.{f.name} must not be negative ({value})")
        if self.max_aspect is not None and 0 < self.max_aspect < 1:
            raise ValueError(f"filter.max_aspect is long side / short side, at least 1 (got {self.max_aspect})")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, base: "FilterRules | None" = None) -> "FilterRules":
        """Rules from a mapping such as the `[filter]` TOML table; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown filter setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        for threshold, rule in THRESHOLD_RULES.items():  # a threshold given turns its rule on (as cleanvision's do);
            if values.get(threshold) is not None and rule not in values:  # it did nothing, silently, without the flag
                values[rule] = True
        return replace(base or cls(), **dict(values))

    def with_overrides(self, **overrides: Any) -> "FilterRules":
        """A copy with the given settings replaced; None values mean "not given" and are skipped."""
        return self.from_mapping({k: v for k, v in overrides.items() if v is not None}, base=self)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(value: float) -> str:
    return f"{value:g}" if float(value).is_integer() else f"{value:.3g}"


def _has_column(con: duckdb.DuckDBPyConnection, view: str, column: str) -> bool:
    return bool(
        con.execute(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = ? AND column_name = ?", [view, column]
        ).fetchall()[0][0]
    )


def _rule_checks(rules: FilterRules, has_clip: bool) -> tuple[list[tuple[str, Any]], dict[str, str]]:
    """(rule name, function row -> reason or None) for each active rule, and skipped rules with why."""
    checks: list[tuple[str, Any]] = []
    skipped: dict[str, str] = {}

    def min_side(r, n=rules.min_side):
        side = min(r["width"], r["height"])
        return f"short side {side} px < {n}" if side < n else None

    def max_aspect(r, limit=rules.max_aspect):
        ratio = max(r["width"], r["height"]) / min(r["width"], r["height"])
        shown = f"{ratio:.2f}" if round(ratio, 2) > limit else f"{ratio:.4f}"  # never "3.00 > 3"
        return f"aspect ratio {shown} > {_fmt(limit)}" if ratio > limit else None

    def min_clip_score(r, low=rules.min_clip_score):
        score = r["clip_score"]
        return f"CLIP score {score:.3f} < {_fmt(low)}" if score is not None and score < low else None

    def blurry(r, t=rules.blur_threshold):
        return f"blurry: variance of Laplacian {r['blur']:.1f} < {_fmt(t)}" if r["blur"] is not None and r["blur"] < t else None

    def dark(r, t=rules.dark_threshold):
        if r["brightness"] is None or r["contrast"] is None:
            return None
        top = r["brightness"] + 2.33 * r["contrast"]  # ~99th percentile luminance
        return f"dark: bright end of luminance ~{top:.0f} < {_fmt(t)} (mean {r['brightness']:.0f})" if top < t else None

    def overexposed(r, t=rules.bright_threshold):
        if r["brightness"] is None or r["contrast"] is None:
            return None
        bottom = r["brightness"] - 1.64 * r["contrast"]  # ~5th percentile luminance
        return (f"overexposed: dark end of luminance ~{bottom:.0f} > {_fmt(t)} (mean {r['brightness']:.0f})"
                if bottom > t else None)

    def low_information(r, t=rules.entropy_threshold):
        entropy = r["entropy"]
        return f"low information: entropy {entropy + 0.0:.2f} bits < {_fmt(t)}" if entropy is not None and entropy < t else None

    if rules.min_side:
        checks.append(("min_side", min_side))
    if rules.max_aspect:
        checks.append(("max_aspect", max_aspect))
    if rules.min_clip_score is not None:
        if has_clip:
            checks.append(("min_clip_score", min_clip_score))
        else:
            skipped["min_clip_score"] = "no clip_score column yet: run `workbench score` first; rule skipped"

    def grayscale(r):
        return "grayscale (no colour)" if r["is_grayscale"] else None

    for name, check in (("blurry", blurry), ("dark", dark), ("overexposed", overexposed),
                        ("low_information", low_information), ("grayscale", grayscale)):
        if getattr(rules, name):
            checks.append((name, check))
    return checks, skipped


def _filter_records(con: duckdb.DuckDBPyConnection, has_clip: bool, image_ids: list[str] | None = None) -> list[dict]:
    """The instance images the rules judge (or those of `image_ids`), with the values the rules read."""
    clip_col = "v.clip_score" if has_clip else "NULL::DOUBLE AS clip_score"
    only = "AND v.image_id IN (SELECT unnest($ids))" if image_ids is not None else ""
    rows = con.execute(
        f"""
        SELECT v.image_id, v.width, v.height, v.brightness, v.contrast, v.blur, v.entropy, v.is_grayscale, {clip_col},
               EXISTS (SELECT 1 FROM manual_includes m WHERE m.image_id = v.image_id) AS included,
               EXISTS (SELECT 1 FROM exclusions e WHERE e.image_id = v.image_id
                       AND NOT starts_with(e.step, '{FILTER_STEP_PREFIX}')) AS excluded_elsewhere
        FROM images_view v
        WHERE v.status = 'ok' AND v.role = 'instance' AND v.width > 0 AND v.height > 0 {only}
        ORDER BY v.image_id
        """,
        {"ids": image_ids} if image_ids is not None else None,
    )
    names = [d[0] for d in rows.description]
    return [dict(zip(names, row)) for row in rows.fetchall()]


def _recheck_new_keepers(con: duckdb.DuckDBPyConnection, checks, has_clip: bool, kept_before: set[str]) -> int:
    """Copies that took their group over are judged again, with the caption they now carry (the CLIP score rule):
    as an excluded copy they had none, passed, and kept a picture whose caption fails the rule. Returns how many."""
    from pipelines.dedup import regroup_duplicates  # not at the top: `workbench train` imports this module (polars: ~45 MiB)
    caption_rules = [(rule, check) for rule, check in checks if rule == "min_clip_score"]
    failed = 0
    judged: set[str] = set()
    while caption_rules:  # each round excludes at least one more copy, so it ends
        kept = {row[0] for row in con.execute("SELECT image_id FROM duplicates WHERE is_keeper").fetchall()}
        fresh = sorted(kept - kept_before - judged)
        judged.update(fresh)
        rows = [(record["image_id"], FILTER_STEP_PREFIX + rule, reason)
                for record in _filter_records(con, has_clip, fresh) if not record["included"]
                for rule, check in caption_rules if (reason := check(record))]
        if not rows:
            return failed
        con.executemany("INSERT INTO exclusions (image_id, step, reason) VALUES (?, ?, ?) ON CONFLICT DO NOTHING", rows)
        failed += len({image_id for image_id, _, _ in rows})
        regroup_duplicates(con)
    return failed


def filtered_dataset(
    con: duckdb.DuckDBPyConnection,
    rules: FilterRules,
    *,
    dry_run: bool = False,
    progress: ProgressHook = null_progress,
) -> dict:
    """The dataset after `rules`: replaces every `filter:*` exclusion row (or, dry run, only counts them)."""
    from pipelines.dedup import regroup_duplicates  # not at the top: `workbench train` imports this module (polars: ~45 MiB)
    has_clip = _has_column(con, "images_view", "clip_score")
    checks, skipped = _rule_checks(rules, has_clip)
    for rule, why in skipped.items():
        progress(task="filter", message=f"{rule}: {why}")
    records = _filter_records(con, has_clip)
    total = len(records)
    progress(task="filter", completed=0, total=total)
    new_rows: list[tuple[str, str, str]] = []
    per_rule = {rule: 0 for rule, _ in checks}
    dropped: set[str] = set()
    already_out: set[str] = set()  # failing a rule, but excluded by another step already: rows written, not dropped
    candidates = 0
    included = 0
    unscored = 0
    clip_rule = any(rule == "min_clip_score" for rule, _ in checks)
    for done, record in enumerate(records, 1):
        if record["included"]:
            included += 1
            continue
        if not record["excluded_elsewhere"]:
            candidates += 1
            unscored += clip_rule and record["clip_score"] is None
        for rule, check in checks:
            reason = check(record)
            if reason:
                new_rows.append((record["image_id"], FILTER_STEP_PREFIX + rule, reason))
                if record["excluded_elsewhere"]:
                    already_out.add(record["image_id"])
                else:
                    per_rule[rule] += 1
                    dropped.add(record["image_id"])
        if done % 5000 == 0 or done == total:
            progress(task="filter", completed=done, total=total)
    # out by the last filter run and by nothing else: a rerun without that rule (or with a milder one) lets them back
    earlier = {row[0] for row in con.execute(
        f"SELECT DISTINCT image_id FROM exclusions WHERE starts_with(step, '{FILTER_STEP_PREFIX}') AND image_id NOT IN "
        f"(SELECT image_id FROM exclusions WHERE NOT starts_with(step, '{FILTER_STEP_PREFIX}'))"
    ).fetchall()}
    back = earlier - dropped
    if back:
        progress(task="filter", message=(
            f"{len(back)} image(s) excluded by the last filter run pass these rules and {'would come' if dry_run else 'come'} "
            "back into the dataset (a rerun replaces the earlier filter exclusions; put lasting rules in the [filter] "
            "table of workbench.toml)"))
    if clip_rule and con.execute(  # the score an image's rule reads is its newest (images_view)
        "SELECT count(*) > 0 FROM (SELECT arg_max(model, created_at) AS model FROM clip_scores GROUP BY image_id) "
        "WHERE model = 'tiny'"
    ).fetchall()[0][0]:
        progress(task="filter", message="Note: CLIP scores from the tiny CLIP (random weights) mean nothing: the "
                 "min_clip_score rule excludes images at random; score with a real CLIP model first")
    summary: dict[str, Any] = {
        "checked": candidates,
        **{f"rule {rule}": n for rule, n in per_rule.items()},
        "excluded": len(dropped),
        "kept": candidates - len(dropped),
        "back in the dataset (excluded by the last filter run)": len(back - {r["image_id"] for r in records if r["included"]}),
        "failing but already excluded (duplicate or by hand)": len(already_out),
        "manually_included": included,
        "dry_run": dry_run,
    }
    if clip_rule:
        summary["without CLIP score (rule not applied)"] = unscored
        if unscored:
            progress(task="filter", message=(
                f"{unscored} image(s) have no CLIP score yet (not scored, or ingested since): the CLIP score rule did not "
                "apply to them; run `workbench score`, then filter again"))
    import pyarrow as pa  # here, not at the top: `workbench train` imports this module for its note, and need not carry pyarrow

    failing = pa.table({"image_id": pa.array(sorted({r[0] for r in new_rows}), pa.string())})
    # a kept copy that fails a rule hands the picture to a copy of its group that passes (dedup's keep order); a copy
    # chosen by hand (`workbench keep`) stays kept, and its picture leaves the dataset, said with what to do
    moved, hand_kept = con.execute(
        """
        SELECT count(*) FILTER (WHERE NOT hand AND passing), count(*) FILTER (WHERE hand AND passing) FROM (
            SELECT k.image_id IN (SELECT image_id FROM keeper_choice) AS hand,
                   EXISTS (SELECT 1 FROM duplicates d JOIN images i USING (image_id) WHERE d.group_id = k.group_id
                           AND i.status = 'ok' AND d.image_id NOT IN (SELECT image_id FROM failing)) AS passing
            FROM duplicates k WHERE k.is_keeper AND k.image_id IN (SELECT image_id FROM failing)
        )
        """
    ).fetchall()[0]
    if moved:
        summary["kept through another copy (the kept one fails)"] = moved
        progress(task="filter", message=(
            f"{moved} duplicate group(s) {'would keep' if dry_run else 'now keep'} a copy that passes these rules: their "
            "kept copy fails one (a thumbnail of an original, say), and the picture stays in the dataset through the other"))
    if hand_kept:
        progress(task="filter", message=(
            f"{hand_kept} copy(ies) you chose to keep (`workbench keep`) fail these rules while another copy of theirs "
            "passes: those pictures leave the dataset; `workbench keep` the other copy to keep them (listed by: "
            "workbench sql \"SELECT group_id, path, is_keeper, exclusion_reason FROM duplicate_groups WHERE group_id IN "
            "(SELECT d.group_id FROM duplicate_groups d JOIN images_view v USING (image_id) WHERE d.is_keeper "
            "AND len(list_filter(v.exclusion_steps, lambda s: starts_with(s, 'filter:'))) > 0)\")"))
    if skipped:
        summary["skipped_rules"] = skipped
    if dry_run:
        if moved and clip_rule:  # the real run's second look (_recheck_new_keepers) needs the groups rewritten
            progress(task="filter", message=(
                "Note: a real run also judges each copy that takes a group over by the CLIP score of the caption it "
                "carries once kept, which may exclude some of them: these counts leave that second look out"))
        return summary
    with record_run(con, "filter", rules.as_dict()) as run:
        with transaction(con):
            con.execute(f"DELETE FROM exclusions WHERE starts_with(step, '{FILTER_STEP_PREFIX}')")
            # one Arrow table, read by DuckDB's replacement scan (executemany is far slower at 100k rows)
            new_filter_rows = pa.table(
                {"image_id": [r[0] for r in new_rows], "step": [r[1] for r in new_rows], "reason": [r[2] for r in new_rows]},
                schema=pa.schema([("image_id", pa.string()), ("step", pa.string()), ("reason", pa.string())]),
            )
            con.execute("INSERT INTO exclusions (image_id, step, reason) SELECT * FROM new_filter_rows")
        if con.execute("SELECT count(*) FROM duplicates").fetchall()[0][0]:
            kept_before = {row[0] for row in con.execute("SELECT image_id FROM duplicates WHERE is_keeper").fetchall()}
            regroup_duplicates(con)  # kept copies the filter excludes hand over to ones it lets through, and back
            taken_over = _recheck_new_keepers(con, checks, has_clip, kept_before)
            if taken_over:
                summary["copies failing once kept (the caption they carry)"] = taken_over
                progress(task="filter", message=(
                    f"{taken_over} copy(ies) that took a duplicate group over fail the CLIP score rule with the caption "
                    "they carry once kept: those pictures leave the dataset"))
            kept_now = {row[0] for row in con.execute("SELECT image_id FROM duplicates WHERE is_keeper").fetchall()}
            changed = len(kept_now - kept_before)
            summary.pop("kept through another copy (the kept one fails)", None)
            if changed:  # either way: to a copy that passes, or back to a better one the rules let through again
                summary["duplicate groups keeping another copy now"] = changed
                if changed != moved:
                    progress(task="filter", message=(
                        f"{changed} duplicate group(s) keep another copy now: a better copy passes these rules again, "
                        "or the kept one fails them"))
        run.counts = {k: v for k, v in summary.items() if k not in ("dry_run", "skipped_rules")}
    return summary


def rules_as_options(rules: FilterRules) -> list[str]:
    """The `workbench filter` options that give `rules`: the sizes always (a [filter] table may set others), the
    rules on, and their thresholds that are not the defaults; values exactly, not rounded as reasons show them."""
    def exact(value: float) -> str:
        return str(int(value)) if float(value).is_integer() else repr(float(value))

    default = FilterRules()
    options = ["--min-side", exact(rules.min_side or 0), "--max-aspect", exact(rules.max_aspect or 0)]
    if rules.min_clip_score is not None:
        options += ["--min-clip-score", exact(rules.min_clip_score)]
    for name in ("blurry", "dark", "overexposed", "low_information", "grayscale"):
        if getattr(rules, name):
            options.append("--no-" + name.replace("_", "-"))
    for threshold, rule in THRESHOLD_RULES.items():
        if getattr(rules, rule) and getattr(rules, threshold) != getattr(default, threshold):
            options += ["--" + threshold.replace("_", "-"), exact(getattr(rules, threshold))]
    return options


def unfiltered_images(con: duckdb.DuckDBPyConnection) -> int | None:
    """How many dataset images came in after the last filter run, which its rules never judged; None: never run."""
    last = last_run(con, "filter")
    if last is None:
        return None
    return con.execute("SELECT count(*) FROM dataset d JOIN images i USING (image_id) "
                       "WHERE d.role = 'instance' AND i.first_seen > ?", [last[0]]).fetchall()[0][0]


def unfiltered_note(con: duckdb.DuckDBPyConnection) -> str | None:
    """A note when dataset images came in after the last filter run, so its rules never judged them; else None."""
    count = unfiltered_images(con)
    if not count:
        return None
    params = last_run(con, "filter")[1]
    try:
        command = " ".join(["workbench filter", *rules_as_options(FilterRules.from_mapping(json.loads(params or "{}")))])
    except ValueError:  # a run recorded by another version: the plain command
        command = "workbench filter"
    return (f"{count} image(s) of the dataset came in after the last filter run, so its rules have not judged them: "
            f"run `{command}` (that run's rules) first to apply them")


def _resolve(con: duckdb.DuckDBPyConnection, image_ids: Iterable[str]) -> list[str]:
    from pipelines.concepts import resolve_image_ids

    ids = resolve_image_ids(con, image_ids)
    if not ids:
        raise ValueError("give at least one image id")
    return ids


def manual_exclusions(con: duckdb.DuckDBPyConnection, image_ids: Iterable[str], reason: str) -> int:
    """Exclude images by hand with a reason (step 'manual'); also drops any manual include. Returns count."""
    reason = (reason or "").strip()
    if not reason:
        raise ValueError("a manual exclusion needs a reason (--reason)")
    import pyarrow as pa

    ids = _resolve(con, image_ids)
    with transaction(con):
        manual_ids = pa.table({"image_id": pa.array(ids, pa.string())})
        con.execute(
            "INSERT INTO exclusions (image_id, step, reason) SELECT image_id, ?, ? FROM manual_ids"
            " ON CONFLICT (image_id, step) DO UPDATE SET reason = excluded.reason, created_at = now()",
            [MANUAL_STEP, f"manual: {reason}"],
        )
        con.execute("DELETE FROM manual_includes WHERE image_id IN (SELECT unnest(?::VARCHAR[]))", [ids])
    return len(ids)


def folder_kept_out(con: duckdb.DuckDBPyConnection, folder: str, reason: str) -> None:
    """Record `folder` (made absolute) as excluded with `reason`: files ingest reads under it later are excluded too."""
    con.execute(
        "INSERT INTO excluded_folders (folder, reason) VALUES (?, ?) ON CONFLICT (folder) DO UPDATE SET reason = excluded.reason",
        [catalog_path_text(folder).rstrip("/\\"), (reason or "").strip()],
    )


def folder_let_in(con: duckdb.DuckDBPyConnection, folder: str) -> bool:
    """Drop the standing exclusion of `folder` (and of folders under it); returns whether there was one."""
    folder = catalog_path_text(folder).rstrip("/\\")
    return bool(con.execute(
        "DELETE FROM excluded_folders WHERE folder = ? OR starts_with(folder, ?)", [folder, folder + os.sep]
    ).fetchall()[0][0])


def excluded_folder_rules_applied(con: duckdb.DuckDBPyConnection, paths: Iterable[bytes] | None = None) -> int:
    """Exclude the images with a file under an excluded folder (`folder_kept_out`) among these paths (ingest: the
    files it read; None: every path), unless included by hand since. Returns how many were newly excluded."""
    rules = con.execute("SELECT folder, reason FROM excluded_folders ORDER BY folder").fetchall()
    if not rules:
        return 0
    wanted = None if paths is None else set(paths)
    rows = con.execute("SELECT image_id, path, path_bytes FROM paths WHERE NOT missing").fetchall()
    excluded = 0
    for folder, reason in rules:
        prefix = folder + os.sep
        ids = list(dict.fromkeys(image_id for image_id, path, raw in rows
                                 if path.startswith(prefix) and (wanted is None or bytes(raw) in wanted)))
        if not ids:
            continue
        excluded += con.execute(
            "INSERT INTO exclusions (image_id, step, reason) SELECT image_id, ?, ? FROM unnest(?::VARCHAR[]) t(image_id) "
            "WHERE image_id NOT IN (SELECT image_id FROM manual_includes) ON CONFLICT DO NOTHING",  # excluded by hand: kept
            [MANUAL_STEP, f"manual: {reason}", ids],
        ).fetchall()[0][0]
    return excluded


def manual_inclusions(con: duckdb.DuckDBPyConnection, image_ids: Iterable[str]) -> dict:
    """Include images by hand: removes their manual and filter exclusions; later filters skip them."""
    import pyarrow as pa

    ids = _resolve(con, image_ids)
    with transaction(con):
        include_ids = pa.table({"image_id": pa.array(ids, pa.string())})
        con.execute("INSERT INTO manual_includes (image_id) SELECT image_id FROM include_ids ON CONFLICT DO NOTHING")
        removed = con.execute(
            f"DELETE FROM exclusions WHERE image_id IN (SELECT unnest(?::VARCHAR[]))"
            f" AND (step = '{MANUAL_STEP}' OR starts_with(step, '{FILTER_STEP_PREFIX}'))",
            [ids],
        ).fetchall()[0][0]
    unreadable = con.execute(  # files ingest could not read are never in the dataset, included or not
        "SELECT count(*) FROM images WHERE status <> 'ok' AND image_id IN (SELECT unnest(?::VARCHAR[]))", [ids]
    ).fetchall()[0][0]
    return {**_after_lifting(con, ids, removed), "unreadable_files": unreadable}


def _after_lifting(con: duckdb.DuckDBPyConnection, ids: list[str], removed: int) -> dict:
    """Once exclusions of `ids` are lifted: duplicate groups regrouped (a copy no longer excluded takes its place in
    the keep order again), and what the command says: how many are in the dataset now (first: "included 1" read as
    done when a duplicate stayed out), how many rows went, how many are still out by other steps."""
    from pipelines.dedup import regroup_duplicates  # not at the top: `workbench train` imports this module (polars: ~45 MiB)

    if removed and con.execute("SELECT count(*) FROM duplicates WHERE image_id IN (SELECT unnest(?::VARCHAR[]))", [ids]).fetchall()[0][0]:
        regroup_duplicates(con)
    still = con.execute(
        "SELECT count(DISTINCT image_id) FROM exclusions WHERE image_id IN (SELECT unnest(?::VARCHAR[]))", [ids]
    ).fetchall()[0][0]
    in_dataset = con.execute("SELECT count(*) FROM dataset WHERE image_id IN (SELECT unnest(?::VARCHAR[]))", [ids]).fetchall()[0][0]
    return {"in_dataset_now": in_dataset, "exclusions_removed": removed, "still_excluded_by_other_steps": still}


def manual_exclusions_lifted(con: duckdb.DuckDBPyConnection, image_ids: Iterable[str] | None, *,
                             reason: str | None = None) -> dict:
    """Undo `exclude`: removes only the images' exclusions made by hand (with `reason`, only those given that reason;
    image_ids None: any image's). Unlike an include, the filter's and dedup's stay, and later filter runs still judge
    the images. Returns counts."""
    if image_ids is None and reason is None:
        raise ValueError("name the images, or the --reason they were excluded with")
    label = None if reason is None else f"manual: {reason.strip()}"
    # the reason as `exclude` stores it ("manual: blurry"), or as a row written with SQL holds it ("blurry")
    labels = [] if reason is None else [label, reason.strip()]
    if image_ids is None:
        ids = [row[0] for row in con.execute("SELECT image_id FROM exclusions WHERE step = ? AND reason IN (SELECT unnest(?::VARCHAR[]))",
                                             [MANUAL_STEP, labels]).fetchall()]
        if not ids:
            raise ValueError(f"no image is excluded by hand with the reason {reason.strip()!r}")
    else:
        ids = _resolve(con, image_ids)
    removed = con.execute(f"DELETE FROM exclusions WHERE step = '{MANUAL_STEP}' AND image_id IN (SELECT unnest(?::VARCHAR[])) "
                          "AND (?::VARCHAR IS NULL OR reason IN (SELECT unnest(?::VARCHAR[])))", [ids, label, labels]).fetchall()[0][0]
    return _after_lifting(con, ids, removed)


def lifted_by_include(step: str) -> bool:
    """Whether including by hand lifts an exclusion of this step: manual and filter ones, never a duplicate's."""
    return step == MANUAL_STEP or step.startswith(FILTER_STEP_PREFIX)


def toggled_exclusion(con: duckdb.DuckDBPyConnection, image_id: str, reason: str) -> dict:
    """Exclude an image by hand, or include it if it is excluded (the TUI's x).

    Including lifts manual and filter exclusions, never a duplicate's: keeping that copy is the way in. Returns
    {"action": "excluded" | "included" | "unchanged", "was_keeper": bool, "still_excluded_by": [steps],
    "unreadable": the ingest error of a file that could not be read (never in the dataset), else None}.
    """
    def steps() -> list[str]:
        return [r[0] for r in con.execute("SELECT DISTINCT step FROM exclusions WHERE image_id = ? ORDER BY step", [image_id]).fetchall()]

    was_keeper = bool((first_row(con.execute("SELECT is_keeper FROM duplicates WHERE image_id = ?", [image_id])) or [False])[0])
    status, error = first_row(con.execute("SELECT status, error FROM images WHERE image_id = ?", [image_id])) or ("ok", None)
    outcome = {"was_keeper": was_keeper, "unreadable": (error or "unreadable") if status != "ok" else None}
    before = steps()
    if not before:
        manual_exclusions(con, [image_id], reason)
        return {"action": "excluded", **outcome, "still_excluded_by": []}
    if not any(lifted_by_include(step) for step in before):
        return {"action": "unchanged", **outcome, "still_excluded_by": before}
    manual_inclusions(con, [image_id])
    return {"action": "included", **outcome, "still_excluded_by": steps()}
