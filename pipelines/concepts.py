"""Concepts: trigger token, class noun and repeat count for groups of images (kohya `N_trigger class` folders).

An image belongs to at most one concept, the way a file sits in one kohya subset folder.
Assignments have a source; a later assignment replaces an earlier one except that a
manual one (`assign_images_to_concept`, the TUI) is only replaced by another manual one,
and folder names read at ingest (`concepts_from_folder_names`) never replace anything.
"""

from __future__ import annotations

import os
import re
import shlex
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import duckdb
import pyarrow as pa

from workbench.catalog import is_read_only_sql, record_run, transaction
from workbench.images import catalog_path_text, path_text
from workbench.progress import ProgressHook, null_progress
from workbench.text import caption_has_trigger, concept_caption, shell_text, sql_text

# kohya: the folder name split at "_": int(tokens[0]) is the repeat count, the rest (joined
# back with "_") the class tokens; folders without a number are ignored, repeats < 1 too.
MIN_ID_PREFIX = 6
REPEATS_TASK = "concept repeats"  # the progress task that says a folder name changed a concept's repeats
KEPT_REPEATS_TASK = "concept repeats kept"  # ... or that a concept kept its repeats against a folder name's
MAX_FOLDER_REPEATS = 1000  # more than this in a folder name at ingest is a year or a number, not repeats


@dataclass(frozen=True)
class Concept:
    """One concept as stored in the catalog, with how many images it has."""

    name: str
    trigger: str
    class_noun: str | None
    repeats: int
    images: int = 0
    in_dataset: int = 0
    where_sql: str | None = None
    folder: str | None = None

    @property
    def class_tokens(self) -> str:
        """What kohya calls class_tokens: "trigger class" (the caption of an image without a caption file)."""
        return concept_caption(self.trigger, self.class_noun) or ""


def parse_kohya_folder_name(name: str) -> tuple[int, str, str | None] | None:
    """(repeats, trigger, class) from a kohya folder name like `10_sks dog`; None if it is not one.

    In NFC: macOS names files decomposed (`a` + combining umlaut), and a trigger must match the captions typed."""
    tokens = unicodedata.normalize("NFC", name).split("_")
    try:
        repeats = int(tokens[0])
    except ValueError:
        return None
    if repeats < 1:
        return None
    words = "_".join(tokens[1:]).split()
    if not words:
        return None
    return repeats, words[0], " ".join(words[1:]) or None


def concept_of_folder_name(name: str) -> str | None:
    """The concept a kohya folder name puts its images in (`10_sks dog`: "sks dog"), or None."""
    parsed = parse_kohya_folder_name(name)
    if parsed is None:
        return None
    _, trigger, class_noun = parsed
    return concept_caption(trigger, class_noun)


def folder_concept_names(name: str) -> tuple[str, ...]:
    """The concepts a kohya folder puts its images in: "sks dog" for `10_sks dog`, or "10_sks dog" where a folder of
    the same tokens with other repeats holds concept "sks dog" (kohya trains each folder with its own repeats)."""
    parsed = parse_kohya_folder_name(name)
    if parsed is None:
        return ()
    plain = concept_of_folder_name(name)
    return (plain, f"{parsed[0]}_{plain}")


def plain_subset_repeats(name: str) -> int | None:
    """The repeat count of a kohya subset folder without class tokens (`1_`, where the export puts images without
    a concept); None for any other name. kohya trains on such a folder (empty class_tokens); its images join no
    concept. (`parse_kohya_folder_name` reads only `N_trigger [class]` folders, and rightly finds no concept here.)
    """
    match = re.fullmatch(r"([0-9]+)_", name)
    return int(match.group(1)) if match and int(match.group(1)) >= 1 else None


def plain_folder_note(folder: str, repeats: int) -> str:
    """What to say about a `3_` folder: its repeats are lost unless the user names a concept for it."""
    return (f"folder {Path(folder).name!r} has no class tokens: its images join no concept, so its {repeats} repeats "
            f"are not kept. To keep them: workbench concept add NAME --trigger WORD --folder {shlex.quote(folder)} "
            f"--repeats {repeats}")


def kohya_skipped_folder_note(folder: str) -> str:
    """What to say about a folder kohya would not train beside concept folders: `0_name` (0 repeats, how kohya users
    switch a subset off) or a name without a repeat count. Here its images stay in the dataset, with no concept."""
    name = Path(folder).name
    why = "has 0 repeats" if re.fullmatch(r"0+_.*", name) else "has no repeat count"
    return (f"folder {name!r} {why}: kohya leaves it out of training, but here its images train once, in no concept. "
            f"To leave them out: workbench exclude --folder {shlex.quote(folder)} --reason {shlex.quote(why)}")


def _check_text(label: str, value: str | None, *, required: bool, composed: bool = True) -> str | None:
    """`value` stripped (None when empty and not required), refused with control characters. `composed`: in NFC, as
    names, triggers and classes are kept (typed on macOS, or pasted from a file name, they may come decomposed); a
    --where condition stays as typed, to match decomposed paths."""
    if value is None:
        if required:
            raise ValueError(f"{label} is required")
        return None
    value = value.strip()
    if composed:
        value = unicodedata.normalize("NFC", value)
    if not value:
        if required:
            raise ValueError(f"{label} must not be empty")
        return None
    if any(ord(ch) < 32 for ch in value):
        raise ValueError(f"{label} {value!r} must not contain control characters or line breaks")
    return value


def _one_select(condition: str) -> str:
    """The query selecting image_ids by `condition`, refused unless it is exactly one SELECT."""
    # the outer query keeps only real image ids, whatever the condition's text does
    query = f"SELECT image_id FROM images WHERE image_id IN (SELECT image_id FROM images_view WHERE ({condition}))"
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as error:
        raise ValueError(f"--where is not a valid SQL condition: {error}") from None
    if len(statements) != 1 or not is_read_only_sql(query):
        raise ValueError("--where must be a single SQL condition on images_view (no ';' or other statements)")
    return query


def images_where(con: duckdb.DuckDBPyConnection, condition: str) -> list[str]:
    """The image ids whose images_view row matches the SQL `condition` (`--where`), in image id order."""
    condition = _check_text("where", condition, required=True, composed=False)
    try:
        return [row[0] for row in con.execute(_one_select(condition) + " ORDER BY image_id").fetchall()]
    except duckdb.Error as error:
        raise ValueError(f"--where failed on images_view: {error}") from None


def resolve_image_ids(con: duckdb.DuckDBPyConnection, ids: Iterable[str]) -> list[str]:
    """Full image_ids from full ids or unique prefixes (at least 6 hex characters); errors name every bad one."""
    resolved, problems = [], []
    ids = list(ids)
    # full ids are checked in one query (the TUI may pass thousands); prefixes one by one
    full = [raw.strip().lower() for raw in ids if re.fullmatch(r"[0-9a-f]{64}", raw.strip().lower())]
    known_full: set[str] = set()
    if full:
        wanted_ids = pa.table({"image_id": pa.array(full, pa.string())})
        known_full = {row[0] for row in con.execute(
            "SELECT image_id FROM images WHERE image_id IN (SELECT image_id FROM wanted_ids)").fetchall()}
    for raw in ids:
        key = raw.strip().lower()
        if key in known_full:
            resolved.append(key)
            continue
        if len(key) < MIN_ID_PREFIX or not re.fullmatch(r"[0-9a-f]+", key):
            problems.append(f"{raw!r} is not an image id (hex, at least {MIN_ID_PREFIX} characters)")
            continue
        rows = con.execute("SELECT image_id FROM images WHERE starts_with(image_id, ?) LIMIT 2", [key]).fetchall()
        if not rows:
            problems.append(f"no image {raw}")
        elif len(rows) > 1:
            problems.append(f"{raw} matches several images; give more characters")
        else:
            resolved.append(rows[0][0])
    if problems:
        raise ValueError("; ".join(problems))
    return list(dict.fromkeys(resolved))


def get_concept(con: duckdb.DuckDBPyConnection, name: str) -> Concept | None:
    """The concept called `name` (compared in NFC: one stored from a macOS folder name is found as typed), or None."""
    wanted = unicodedata.normalize("NFC", name)
    for concept in list_concepts(con):
        if unicodedata.normalize("NFC", concept.name) == wanted:
            return concept
    return None


def list_concepts(con: duckdb.DuckDBPyConnection) -> list[Concept]:
    """Every concept with its image counts (all images, and those in `dataset`)."""
    rows = con.execute(
        """
        SELECT c.name, c.trigger_token, c.class_noun, c.repeats,
               count(ci.image_id) AS images,
               count(d.image_id) AS in_dataset,
               c.where_sql, c.folder
        FROM concepts c
        LEFT JOIN concept_images ci ON ci.concept = c.name
        LEFT JOIN dataset d ON d.image_id = ci.image_id
        GROUP BY ALL ORDER BY c.name
        """
    ).fetchall()
    return [Concept(*row) for row in rows]


def _load_assign_table(con: duckdb.DuckDBPyConnection, image_ids: Sequence[str]) -> None:
    """Temp table `concept_assign` of image ids, loaded from Arrow (executemany is slow at 100k rows)."""
    assign_ids = pa.table({"image_id": pa.array(list(image_ids), pa.string())})
    con.execute("CREATE OR REPLACE TEMP TABLE concept_assign AS SELECT image_id FROM assign_ids")


def _assign(con: duckdb.DuckDBPyConnection, name: str, image_ids: Sequence[str], source: str) -> int:
    """Assign images in one statement; a non-manual source does not replace manual assignments."""
    if not image_ids:
        return 0
    _load_assign_table(con, image_ids)
    keep_manual = "" if source == "manual" else "WHERE concept_images.source <> 'manual'"
    before = con.execute("SELECT count(*) FROM concept_images WHERE concept = ?", [name]).fetchall()[0][0]
    con.execute(
        f"""
        INSERT INTO concept_images (image_id, concept, source)
        SELECT DISTINCT image_id, ?, ? FROM concept_assign
        ON CONFLICT (image_id) DO UPDATE SET concept = excluded.concept, source = excluded.source,
            created_at = now() {keep_manual}
        """,
        [name, source],
    )
    con.execute("DROP TABLE concept_assign")
    after = con.execute("SELECT count(*) FROM concept_images WHERE concept = ?", [name]).fetchall()[0][0]
    return after - before


def _in_other_concepts(con: duckdb.DuckDBPyConnection, name: str, image_ids: Sequence[str]) -> list[str]:
    """Those of `image_ids` that are in a concept other than `name`."""
    if not image_ids:
        return []
    return [row[0] for row in con.execute(  # in SQL: the catalog may hold a million assignments
        "SELECT DISTINCT image_id FROM concept_images WHERE concept <> ? AND image_id IN (SELECT unnest(?::VARCHAR[]))",
        [name, list(image_ids)],
    ).fetchall()]


def _class_images(con: duckdb.DuckDBPyConnection, image_ids: Sequence[str]) -> set[str]:
    if not image_ids:
        return set()
    return {row[0] for row in con.execute(
        "SELECT image_id FROM images WHERE role = 'class_prior' AND image_id IN (SELECT unnest(?::VARCHAR[]))",
        [list(image_ids)]).fetchall()}


def images_in_folder(con: duckdb.DuckDBPyConnection, folder: str) -> list[str]:
    """Images with any known path under `folder` (as given, or made absolute)."""
    # as text the catalog's paths hold: a folder named in bytes that are not UTF-8 failed here with a traceback
    prefixes = {path_text(folder).rstrip("/\\")}
    prefixes.add(catalog_path_text(folder).rstrip("/\\"))
    ids: list[str] = []
    for prefix in prefixes:
        ids += [
            row[0]
            for row in con.execute(
                "SELECT DISTINCT image_id FROM paths WHERE starts_with(path, ?)", [prefix + os.sep]
            ).fetchall()
        ]
    return list(dict.fromkeys(ids))


def added_concept(
    con: duckdb.DuckDBPyConnection,
    name: str,
    *,
    trigger: str | None = None,
    class_noun: str | None = None,
    repeats: int | None = None,
    where: str | None = None,
    folder: str | os.PathLike[str] | None = None,
) -> dict:
    """Create or update a concept and assign the images matched by `where` and/or `folder`.

    An update changes only what is given (class_noun "" removes the class). `where` and `folder` are
    standing rules: `concept_rules_applied` (run by ingest) puts new images that match them in the concept.
    """
    name = _check_text("concept name", name, required=True)
    found = get_concept(con, name)
    existed = found is not None
    if found is not None:
        name = found.name  # its stored form
    if trigger is None and not existed:
        raise ValueError(f"A new concept needs its trigger word: workbench concept add {shlex.quote(name)} --trigger WORD "
                         "(the token the model learns, e.g. sks)")
    trigger = _check_text("trigger", trigger, required=not existed)
    if trigger is not None and len(trigger.split()) != 1:
        raise ValueError(f"trigger {trigger!r} must be one token (no spaces)")
    if trigger is not None and set(trigger) & set(",/\\"):
        # a comma splits it into two tags (tag shuffle, --add-token, kohya's keep_tokens); a slash is a folder in the
        # kohya export's `N_trigger class`
        raise ValueError(f"trigger {trigger!r} must not hold a comma or a slash: a comma splits it into two tags, a "
                         "slash makes a folder of the kohya export")
    clear_class = class_noun is not None and not class_noun.strip()
    class_noun = _check_text("class", class_noun, required=False)
    if repeats is not None and (not isinstance(repeats, int) or repeats < 1):
        raise ValueError(f"repeats must be a whole number of at least 1, not {repeats!r}")
    where = _check_text("where", where, required=False, composed=False) if where is not None else None
    folder_text = os.fspath(folder) if folder is not None else None
    if folder_text is not None and not folder_text.strip():
        raise ValueError("folder must not be empty")
    if folder_text is not None:
        folder_text = catalog_path_text(folder_text)  # a standing rule must not depend on where the command ran

    matched_where = images_where(con, where) if where else []
    matched_folder = images_in_folder(con, folder_text) if folder_text else []
    # class images (`priors`, `priors --from`) train as priors of their class prompt, never in a concept: counted
    # in one, they showed as trainable images the run then could not find
    class_images = _class_images(con, matched_where + matched_folder)
    matched_where = [i for i in matched_where if i not in class_images]
    matched_folder = [i for i in matched_folder if i not in class_images]

    old_trigger = found.trigger if found is not None and trigger is not None and trigger != found.trigger else None
    params = {"name": name, "trigger": trigger, "class": class_noun, "repeats": repeats, "where": where, "folder": folder_text}
    with record_run(con, "concept", params) as run:
        with transaction(con):
            con.execute(
                """
                INSERT INTO concepts (name, trigger_token, class_noun, repeats, where_sql, folder)
                VALUES (?, ?, ?, coalesce(?, 1), ?, ?)
                ON CONFLICT (name) DO UPDATE SET trigger_token = coalesce(excluded.trigger_token, concepts.trigger_token),
                    class_noun = CASE WHEN ? THEN NULL ELSE coalesce(excluded.class_noun, concepts.class_noun) END,
                    repeats = coalesce(?, concepts.repeats),
                    where_sql = coalesce(excluded.where_sql, concepts.where_sql),
                    folder = coalesce(excluded.folder, concepts.folder)
                """,
                [name, trigger, class_noun, repeats, where, folder_text, clear_class, repeats],
            )
            # as at ingest, an image already in another concept stays there: moving it is `concept assign`
            held = set(_in_other_concepts(con, name, matched_where + matched_folder))
            assigned = (_assign(con, name, [i for i in matched_where if i not in held], "where")
                        + _assign(con, name, [i for i in matched_folder if i not in held], "folder"))
            if existed and all(option is None for option in (trigger, class_noun, repeats, where, folder_text)) and not clear_class:
                # `concept add NAME` alone: its stored rules take the images in no concept they match (after another
                # concept let them go), as an ingest would
                assigned += concept_rules_applied(con, only=name)
        concept = get_concept(con, name)
        run.counts = {
            "updated" if existed else "created": 1,
            "matched_where": len(matched_where),
            "matched_folder": len(matched_folder),
            "newly_assigned": assigned,
            "left_in_other_concepts": len(held),
            "class_images_left_out": len(class_images),
            "images": concept.images,
        }
        if old_trigger is not None:
            run.counts["captions_with_the_old_trigger"] = _captions_holding(con, name, old_trigger)
    result = {"concept": name, **run.counts}
    notes = []
    if old_trigger is not None and result["captions_with_the_old_trigger"]:
        # training puts the new trigger in front of a caption without it: "alyx, photo of alc woman" trains both
        notes.append(f"{result['captions_with_the_old_trigger']} caption(s) of its images still hold the old trigger "
                     f"{old_trigger!r}, which they would train beside {trigger!r}: "
                     + replace_trigger_command(old_trigger, trigger, name))
    sharing = [c.name for c in list_concepts(con) if c.name != name and trigger is not None and c.trigger.lower() == trigger.lower()]
    if sharing:  # allowed (two folders of one subject with their own repeats), but two subjects would blend into one
        notes.append(f"concept(s) {', '.join(repr(c) for c in sharing)} use the trigger {trigger!r} too: their images "
                     "train the same token (right for one subject in several folders, not for two subjects)")
    if notes:
        result["note"] = "; ".join(notes)
    return result


def _captions_holding(con: duckdb.DuckDBPyConnection, concept: str, trigger: str) -> int:
    """How many of the concept's images have a caption with `trigger` in it (as a word, as training reads it)."""
    captions = con.execute("SELECT caption FROM images_view WHERE concept = ? AND caption IS NOT NULL", [concept]).fetchall()
    return sum(caption_has_trigger(caption, trigger) for (caption,) in captions)


def replace_trigger_command(old: str, new: str, concept: str) -> str:
    """The command that replaces a concept's old trigger by its new one in its images' captions (whole words)."""
    # as caption_has_trigger counts it: any case, and a whole word by Unicode letters and digits (RE2's \b knows
    # ASCII only, so "émile" or "<s1>" kept the old trigger the note had counted)
    pattern = r"(?i)(^|[^\pL\pN_])" + re.escape(old) + r"([^\pL\pN_]|$)"
    replacement = "\\1" + new + "\\2"  # the separators the pattern took, put back
    return (f"workbench edit-captions --regex --find {shlex.quote(pattern)} --replace {shlex.quote(replacement)} "
            f"--where {shell_text(f'concept = {sql_text(concept)}')}")


def concept_rules_applied(con: duckdb.DuckDBPyConnection, *, only: str | None = None,
                          ids: Sequence[str] | None = None) -> int:
    """Images in no concept yet that match a concept's stored --where or --folder (of every concept, or of `only`;
    of every image, or of `ids`), put in it; returns how many.

    Ingest runs this, so photos added later to a concept's folder join it; so does removing a concept, for the images it
    let go. Images already in a concept stay where they are; an image matching several concepts joins the first by name.
    """
    among = None if ids is None else set(ids)
    rules = con.execute("SELECT name, where_sql, folder FROM concepts WHERE (where_sql IS NOT NULL OR folder IS NOT NULL) "
                        "AND (? IS NULL OR name = ?) ORDER BY name", [only, only]).fetchall()
    total = 0
    for name, where, folder in rules:
        for source, found in (("where", _rule_matches(con, where) if where else []),
                              ("folder", images_in_folder(con, folder) if folder else [])):
            if among is not None:
                found = [image_id for image_id in found if image_id in among]
            if not found:
                continue
            free = [row[0] for row in con.execute(  # in SQL: the catalog may hold a million assignments
                "SELECT image_id FROM unnest(?::VARCHAR[]) t(image_id) WHERE image_id NOT IN (SELECT image_id FROM concept_images) "
                "AND image_id NOT IN (SELECT image_id FROM images WHERE role = 'class_prior')",
                [found],
            ).fetchall()]
            total += _assign(con, name, free, source)
    return total


def _rule_matches(con: duckdb.DuckDBPyConnection, where: str) -> list[str]:
    try:
        return [row[0] for row in con.execute(_one_select(where)).fetchall()]
    except (ValueError, duckdb.Error):
        return []  # a stored condition the catalog has outgrown (a column gone) assigns nothing


def assign_images_to_concept(con: duckdb.DuckDBPyConnection, name: str, image_ids: Iterable[str]) -> int:
    """Put images (full ids or unique prefixes) in concept `name` by hand; returns how many changed concept."""
    concept = get_concept(con, name)
    if concept is None:
        raise ValueError(f"no concept {name!r}; add it first with `workbench concept add`")
    name = concept.name
    ids = resolve_image_ids(con, image_ids)
    class_images = _class_images(con, ids)
    if class_images:
        # they train as priors of their class prompt, never as a concept's photos: in one, they were counted as its
        # images (concept list, the dataset) while training drew them only as class images and export put them in reg/
        shown = ", ".join(sorted(i[:12] for i in class_images)[:5]) + (" …" if len(class_images) > 5 else "")
        raise ValueError(f"{len(class_images)} of these are class images ({shown}): they train as priors of their class "
                         "prompt, never in a concept. Leave them out (or exclude them, `workbench exclude`, to train "
                         "without them).")
    with transaction(con):
        changed = con.execute(
            "SELECT count(*) FROM (SELECT unnest(?::VARCHAR[]) AS image_id) a"
            " LEFT JOIN concept_images ci USING (image_id) WHERE ci.concept IS DISTINCT FROM ?",
            [ids, name],
        ).fetchall()[0][0]
        _assign(con, name, ids, "manual")
    return changed


def unassigned_images(con: duckdb.DuckDBPyConnection, image_ids: Iterable[str]) -> int:
    """Take images out of whatever concept they are in; returns how many were in one."""
    ids = resolve_image_ids(con, image_ids)
    return con.execute(
        "DELETE FROM concept_images WHERE image_id IN (SELECT unnest(?::VARCHAR[]))", [ids]
    ).fetchall()[0][0]


def removed_concept(con: duckdb.DuckDBPyConnection, name: str) -> tuple[int, int]:
    """Delete a concept and its assignments (images stay in the catalog); returns (images released, of those, how
    many joined another concept whose --where or --folder matches them)."""
    concept = get_concept(con, name)
    if concept is None:
        raise ValueError(f"no concept {name!r}")
    name = concept.name
    with transaction(con):
        released = [row[0] for row in con.execute(
            "DELETE FROM concept_images WHERE concept = ? RETURNING image_id", [name]).fetchall()]
        con.execute("DELETE FROM concepts WHERE name = ?", [name])
        if not released:
            return 0, 0
        # the images it held now are in no concept: those another concept's standing rule matches join it now, not
        # at some later ingest (a concept renamed by adding the new name, then removing the old, kept none)
        # (those alone: an image taken out of a concept by hand stays out)
        rejoined = concept_rules_applied(con, ids=released)
    return len(released), rejoined


def concepts_from_folder_names(
    con: duckdb.DuckDBPyConnection,
    *,
    paths: Iterable[bytes] | None = None,
    max_repeats: int | None = MAX_FOLDER_REPEATS,
    zero_padded: bool = False,
    folder_repeats: bool = False,
    progress: ProgressHook = null_progress,
) -> int:
    """Concepts from kohya folder names (`10_sks dog`: 10 repeats, trigger sks, class dog) of image paths.

    The folder is the image's parent folder, as kohya reads subset folders (not recursively).
    `paths` (exact path bytes) limits this to those files, the ones an ingest has just read, so a
    concept the user removed does not come back from files read before; None reads every path.
    Existing concepts keep their settings and images already in a concept stay there. Folder names
    with more than `max_repeats` are left alone: ingest sees ordinary photo folders too, and
    `2023_holiday` is a year, not 2023 repeats (kohya itself would read it as repeats). Likewise a zero-padded
    `01_January` numbers photo folders; `zero_padded` reads it as kohya would (import-kohya: the user says so).
    An existing concept keeps its repeats unless `folder_repeats` (import-kohya: renaming `10_sks dog` to
    `20_sks dog` is how kohya users change them). Returns the number of images newly assigned.
    """
    rows = con.execute(
        """
        SELECT p.image_id, p.path, p.path_bytes FROM paths p JOIN images i USING (image_id)
        WHERE NOT p.missing AND i.role = 'instance' ORDER BY p.seq
        """
    ).fetchall()
    every_row = rows
    if paths is not None:
        wanted = set(paths)
        rows = [row for row in rows if row[2] in wanted]
    # (concept name from the tokens, repeats) -> (trigger, class, member ids), in the order first seen
    found: dict[tuple[str, int], tuple[str, str | None, list[str]]] = {}
    folders_of: dict[tuple[str, int], set[str]] = {}  # the folders each was read from
    seen_images: dict[str, str] = {}  # image -> the folder it joined from
    ignored: set[str] = set()
    noted: set[str] = set()
    concept_folders: set[Path] = set()
    other_folders: set[Path] = set()  # folders kohya would not read as a subset: told about beside concept folders
    for image_id, path, path_bytes in rows:
        folder_name = Path(path).parent.name
        parsed = parse_kohya_folder_name(folder_name)
        if parsed is None:
            # `3_`: kohya trains it 3 times, but no concept here holds the count (`1_` loses nothing)
            plain, folder = plain_subset_repeats(folder_name) or 1, str(Path(path).parent)
            if (plain > 1 and folder not in noted and (zero_padded or not folder_name.startswith("0"))
                    and (max_repeats is None or plain <= max_repeats)):
                noted.add(folder)
                progress(task="concepts", message=plain_folder_note(folder, plain))
            elif plain_subset_repeats(folder_name) is None:
                other_folders.add(Path(path).parent)
            continue
        if not zero_padded and folder_name.startswith("0"):
            if folder_name not in ignored:
                ignored.add(folder_name)
                progress(task="concepts", message=f"folder {folder_name!r} not read as a kohya concept: a zero-padded "
                         "number orders folders (`workbench import-kohya` reads it as kohya does)")
            continue
        if max_repeats is not None and parsed[0] > max_repeats:
            if folder_name not in ignored:
                ignored.add(folder_name)
                progress(task="concepts", message=f"folder {folder_name!r} not read as a kohya concept: "
                         f"{parsed[0]} repeats is more than {max_repeats} (a year or a number, not a repeat count)")
            continue
        concept_folders.add(Path(path).parent)
        folder_bytes = os.path.basename(os.path.dirname(bytes(path_bytes)))
        if folder_name not in noted and not _is_utf8(folder_bytes):
            noted.add(folder_name)  # kohya (Python) would read these bytes another way: said, not left to surprise
            progress(task="concepts", message=f"folder '{folder_name}' is not named in UTF-8: its concept's trigger and "
                     "class are the text shown, with \\xNN escapes, which is no word a model knows; rename the folder "
                     "in UTF-8 and ingest again (or set the trigger with `workbench concept add NAME --trigger WORD`)")
        if image_id in seen_images:  # one image (byte-identical copies) is in one concept: the first folder's
            if seen_images[image_id] != folder_name:
                progress(task="concepts", message=f"{path}: the same image is also in folder {seen_images[image_id]!r} "
                         "and joins that one's concept (kohya would train each copy in its own folder)")
            continue
        seen_images[image_id] = folder_name
        key = (concept_of_folder_name(folder_name), parsed[0])
        found.setdefault(key, (parsed[1], parsed[2], []))[2].append(image_id)
        folders_of.setdefault(key, set()).add(os.path.dirname(path))
    beside_concepts = {folder.parent for folder in concept_folders}
    for folder in sorted(other_folders):
        if folder.parent in beside_concepts:
            progress(task="concepts", message=kohya_skipped_folder_note(str(folder)))
    if not found:
        return 0
    existing = {c.name: c for c in list_concepts(con)}
    # a concept kept decomposed (NFD, by a catalog from before names were composed) is the one its folder names
    stored = {unicodedata.normalize("NFC", name): name for name in existing}
    found = {(stored.get(name, name), repeats): value for (name, repeats), value in found.items()}
    chosen: dict[tuple[str, int], str] = {}  # (tokens, repeats) -> the concept its images join
    for (name, repeats) in found:
        holder = existing.get(name)
        taken = next((r for (n, r), c in chosen.items() if c == name and r != repeats), None)
        if holder is None and taken is None:
            chosen[name, repeats] = name
        elif holder is not None and holder.repeats == repeats:
            chosen[name, repeats] = name
        elif taken is not None or _folder_of_concept_remains(con, name, holder.repeats):
            # a second folder of the same tokens (`5_sks dog` beside `20_sks dog`: close-ups and full-body shots):
            # kohya trains each with its own repeats, so it is a concept of its own, named as the folder
            chosen[name, repeats] = f"{repeats}_{name}"
            had = taken if taken is not None else holder.repeats
            progress(task="concepts", message=f"folder '{repeats}_{name}': concept {name!r} has {had} repeats from another "
                     f"folder, so these images form concept '{repeats}_{name}' with {repeats} (kohya trains each folder "
                     "with its own repeats)")
        else:  # the concept's folder is gone and this one names it with other repeats: a renamed folder
            chosen[name, repeats] = name
            if folder_repeats:
                con.execute("UPDATE concepts SET repeats = ? WHERE name = ?", [repeats, name])
                progress(task=REPEATS_TASK, message=f"concept {name!r}: {repeats} repeats, as its folder now says "
                         f"(it had {holder.repeats})")
            else:
                progress(task=KEPT_REPEATS_TASK, message=f"a folder names concept {name!r} with {repeats} repeats; it has "
                         f"{holder.repeats}, which it keeps (`workbench concept add {name!r} --repeats N` or "
                         "`workbench import-kohya FOLDER` changes it)")
    made_anew = [key for key in found if chosen[key] not in existing]
    if paths is not None and made_anew:
        # a concept made anew by a file just read (one removed, then a photo added to its folder) takes every image of
        # its folder, as import-kohya would, not that file alone: the folder's other images trained in no concept
        in_a_concept = {row[0] for row in con.execute("SELECT image_id FROM concept_images").fetchall()}
        wanted_folders = set().union(*(folders_of[key] for key in made_anew))
        in_folder: dict[str, list[str]] = defaultdict(list)  # one pass over the catalog's paths, whatever the count
        for image_id, path, _ in every_row:
            folder = os.path.dirname(path)
            if folder in wanted_folders and image_id not in in_a_concept:
                in_folder[folder].append(image_id)
        for key in made_anew:
            members = found[key][2]
            have = set(members)
            for folder in sorted(folders_of[key]):
                for image_id in in_folder[folder]:
                    if image_id not in have:
                        have.add(image_id)
                        members.append(image_id)
    assigned = 0
    created = 0
    with transaction(con):
        for (tokens, repeats), (trigger, class_noun, members) in found.items():
            name = chosen[tokens, repeats]
            if name not in existing:
                con.execute(
                    "INSERT INTO concepts (name, trigger_token, class_noun, repeats) VALUES (?, ?, ?, ?)",
                    [name, trigger, class_noun, repeats],
                )
                existing[name] = get_concept(con, name)
                created += 1
            _load_assign_table(con, members)
            assigned += con.execute(
                "INSERT INTO concept_images (image_id, concept, source)"
                " SELECT image_id, ?, 'folder_name' FROM concept_assign ON CONFLICT DO NOTHING",
                [name],
            ).fetchall()[0][0]
            con.execute("DROP TABLE concept_assign")
    progress(task="concepts", message=f"{created} concept(s) from folder names, {assigned} image(s) assigned")
    return assigned


def _is_utf8(name: bytes) -> bool:
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _folder_of_concept_remains(con: duckdb.DuckDBPyConnection, name: str, repeats: int) -> bool:
    """Whether a file of concept `name` still sits in a folder that names it with its own repeats. On disk, not as
    the catalog last saw it: import-kohya reads files, not the folders a renamed one left."""
    paths = con.execute(
        "SELECT p.path, p.path_bytes FROM concept_images ci JOIN paths p USING (image_id) WHERE ci.concept = ? AND NOT p.missing",
        [name],
    ).fetchall()
    for path, path_bytes in paths:
        folder = Path(path).parent.name
        parsed = parse_kohya_folder_name(folder)
        if parsed is not None and parsed[0] == repeats and concept_of_folder_name(folder) == name and os.path.exists(bytes(path_bytes)):
            return True
    return False


def images_out_of_their_concept_folders(
    con: duckdb.DuckDBPyConnection,
    *,
    paths: Iterable[bytes] | None = None,
    progress: ProgressHook = null_progress,
) -> list[str]:
    """Take images that joined a concept by a kohya folder name out of it once none of their files is in such a
    folder any more (moved to `rejects/`, say): kohya users manage a concept's images by folder. Returns their ids
    (a copy of one may sit in another concept's folder: the caller lets it join that one).

    Only memberships read from folder names (`concepts_from_folder_names`, source 'folder_name') go; those given
    by hand, by --where or by --folder stay. An image missing at every path keeps its concept (not found is not
    moved). `paths` (exact path bytes: files read or gone in an ingest) limits this to their images; None: all.
    """
    if not con.execute("SELECT count(*) FROM concept_images WHERE source = 'folder_name'").fetchall()[0][0]:
        return []
    only = ""
    if paths is not None:
        paths = list(paths)
        if not paths:
            return []
        changed_paths = pa.table({"path_bytes": pa.array(paths, pa.binary())})  # the query reads it by name
        only = "AND ci.image_id IN (SELECT image_id FROM paths WHERE path_bytes IN (SELECT path_bytes FROM changed_paths))"
    rows = con.execute(
        f"""
        SELECT ci.image_id, ci.concept, list(p.path) FROM concept_images ci JOIN paths p USING (image_id)
        WHERE ci.source = 'folder_name' AND NOT p.missing {only} GROUP BY ci.image_id, ci.concept
        """
    ).fetchall()
    repeats = dict(con.execute("SELECT name, repeats FROM concepts").fetchall())
    remains: dict[str, bool] = {}

    def keeps(concept: str, folder: str) -> bool:
        """Whether a file in `folder` keeps an image in `concept`: its own folder name, or one of the same tokens with
        other repeats while the concept's own folder is gone (renamed, `10_sks dog` to `20_sks dog`). A second folder
        of those tokens (`5_sks dog` beside a `20_sks dog` that is still there) is another concept's."""
        parsed = parse_kohya_folder_name(folder)
        if parsed is None or concept not in folder_concept_names(folder):
            return False
        if concept != concept_of_folder_name(folder) or parsed[0] == repeats.get(concept):
            return True
        if concept not in remains:
            remains[concept] = _folder_of_concept_remains(con, concept, repeats.get(concept))
        return not remains[concept]

    gone = [(image_id, concept) for image_id, concept, present in rows
            if not any(keeps(concept, Path(path).parent.name) for path in present)]
    if not gone:
        return []
    with transaction(con):
        _load_assign_table(con, [image_id for image_id, _ in gone])
        con.execute("DELETE FROM concept_images WHERE source = 'folder_name' AND image_id IN (SELECT image_id FROM concept_assign)")
        con.execute("DROP TABLE concept_assign")
    for concept, n in sorted(Counter(concept for _, concept in gone).items()):
        progress(task="concepts", message=f"{n} image(s) left concept {concept!r}: none of their files is in a folder "
                 f"named for it any more (`workbench concept assign {shlex.quote(concept)} ID` keeps one in it by hand)")
    return [image_id for image_id, _ in gone]


__all__ = [
    "Concept",
    "added_concept",
    "assign_images_to_concept",
    "concepts_from_folder_names",
    "get_concept",
    "images_out_of_their_concept_folders",
    "list_concepts",
    "parse_kohya_folder_name",
    "removed_concept",
    "resolve_image_ids",
    "unassigned_images",
]
