"""The pipeline steps as the Pipeline screen runs them: settings, how to call each step, and its catalog counts.

Each runner imports its step lazily, so a step that is missing or broken shows a message, not a crash.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import duckdb

from workbench.catalog import last_run_params
from workbench.progress import ProgressHook


@dataclass(frozen=True)
class Setting:
    """One editable setting of a step; `kind` is int, float, str, 'paths', 'optional_int', 'optional_float' or 'yes_no'."""

    name: str
    label: str
    default: str
    kind: Any = str
    help: str = ""
    minimum: int | None = None  # the least a number may be (as the CLI's option says it)


@dataclass(frozen=True)
class StepSpec:
    name: str
    label: str
    run: Callable[[duckdb.DuckDBPyConnection, dict[str, Any], ProgressHook, Path], Any]
    counts_sql: str  # one row of named counts
    settings: tuple[Setting, ...] = field(default_factory=tuple)
    in_run_all: bool = True


def parse_settings(spec: StepSpec, raw: dict[str, str]) -> dict[str, Any]:
    """Typed settings from what the user typed; a ValueError names the bad field."""
    values: dict[str, Any] = {}
    for setting in spec.settings:
        text = (raw.get(setting.name, setting.default) or "").strip()
        try:
            if setting.kind == "paths":
                values[setting.name] = shlex.split(text)
            elif setting.kind == "optional_float":
                values[setting.name] = float(text) if text else None
            elif setting.kind == "optional_int":
                values[setting.name] = int(text) if text else None
            elif setting.kind == "yes_no":
                answer = {"yes": True, "y": True, "no": False, "n": False}.get(text.lower())
                if answer is None:
                    raise ValueError(text)
                values[setting.name] = answer
            elif setting.kind is int:
                values[setting.name] = int(text)
            elif setting.kind is float:
                values[setting.name] = float(text)
            else:
                values[setting.name] = text or None
        except ValueError:
            kind = {int: "a whole number", float: "a number", "yes_no": "yes or no"}.get(setting.kind, "a number")
            raise ValueError(f"{spec.label}: {setting.label} must be {kind}, not {text!r}.") from None
        value = values[setting.name]
        if setting.minimum is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and value < setting.minimum:
            # refused here, as the CLI refuses it: a step that ran on nothing recorded it, and the form brought it back
            raise ValueError(f"{spec.label}: {setting.label} must be at least {setting.minimum}, not {text!r}.")
    return values


def _summary(result: Any) -> dict[str, Any]:
    if hasattr(result, "as_dict"):
        return result.as_dict()
    if isinstance(result, dict):
        return result
    return {"result": result}


def run_ingest(con, s, progress, project: Path):
    from pipelines.ingest import ingested_images

    def located(name: str) -> Path:
        return Path(name) if Path(name).is_absolute() else project / name

    folders = [located(p) for p in s["folders"]]
    whole = located(" ".join(s["folders"])) if len(s["folders"]) > 1 else None
    if whole is not None and whole.exists() and not any(p.exists() for p in folders):
        folders = [whole]  # `5_wbk cat`, a kohya folder, typed without quotes
    folders = folders or [Path(p) for p in last_run_params(con, "ingest").get("paths", [])]  # Run all on a catalog: rescan
    if not folders:
        raise ValueError("Ingest: type one or more folders or image files.")
    try:  # a folder deleted since, that the catalog knows, is synced: its files are marked missing
        return _summary(ingested_images(con, folders, workers=s["workers"], progress=progress))
    except FileNotFoundError:
        missing = [str(p) for p in folders if not os.path.lexists(p)]
        if not missing:
            raise
        raise ValueError(f"Ingest: no such file or folder: {', '.join(missing)}"
                         + (" (a name with spaces goes in quotes: \"5_sks dog\")" if len(folders) > 1 else "")) from None


def run_dedup(con, s, progress, project):
    from pipelines.dedup import duplicate_groups

    return _summary(duplicate_groups(con, threshold=s["threshold"], mirrored=s["mirrored"], progress=progress))


def run_caption(con, s, progress, project):
    from pipelines.caption import check_template, model_captions
    from workbench.models import load_blip, model_label

    check_template(s["template"])
    processor, model = load_blip(s["model"])
    counts = model_captions(con, processor, model, model_name=model_label(s["model"], "blip"), batch_size=s["batch_size"],
                            template=s["template"], workers=0, progress=progress)
    for command in counts.pop("add_token_commands", []):  # a line of the log each, not a list in the summary
        progress(task="caption", message=f"concept images captioned without their trigger: {command}")
    return _summary(counts)


def run_score(con, s, progress, project):
    from pipelines.score import clip_scores
    from workbench.models import load_clip

    return _summary(clip_scores(con, load_clip(s["model"]), batch_size=s["batch_size"], workers=0, progress=progress))


def run_filter(con, s, progress, project):
    """The form's three rules (an empty one is off) over the last filter run's other rules (blur, exposure, ...),
    so a run from here repeats one from the CLI."""
    from dataclasses import replace

    from pipelines.filter import FilterRules, filtered_dataset

    base = FilterRules.from_mapping(last_run_params(con, "filter"))
    rules = replace(base, min_side=s["min_side"], max_aspect=s["max_aspect"], min_clip_score=s["min_clip_score"])
    summary = _summary(filtered_dataset(con, rules, progress=progress))
    return {k: v for k, v in summary.items() if not isinstance(v, dict)}


def run_buckets(con, s, progress, project):
    from pipelines.buckets import aspect_buckets

    return _summary(aspect_buckets(con, resolution=s["resolution"], min_bucket_reso=s["min_bucket_reso"],
                                   max_bucket_reso=s["max_bucket_reso"], bucket_reso_steps=s["bucket_reso_steps"], progress=progress))


def run_priors(con, s, progress, project):
    from pipelines.priors import check_prior_options, class_priors, prior_jobs, prior_pipeline
    from workbench.models import load_sd_components, model_id

    # before the model loads: a size it cannot sample failed only after loading
    check_prior_options(num_images=s["num"], resolution=s["resolution"], steps=s["steps"])
    jobs = prior_jobs(con, class_prompt=s["class_prompt"] or None, num_images=s["num"])
    if not jobs:
        return {"skipped": "no class prompt and no concept with a class noun"}
    for prompt, count, concept in jobs:
        if not count:  # no instance images to size it by: said, not made as a set of 1
            progress(task="priors", message=f"skipped {prompt!r}: no instance images to size it by; give a count")
    jobs = [job for job in jobs if job[1]]
    if not jobs:
        return {"skipped": "no instance images to size a class set by: give a count"}
    model = model_id(s["model"])  # recorded as training records it
    # DDIM on the model's noise schedule, as `workbench priors` and training sample: one set, one sampler
    pipe = prior_pipeline(load_sd_components(model))
    totals: dict[str, Any] = {}
    for prompt, count, concept in jobs:
        summary = _summary(class_priors(con, pipe, class_prompt=prompt, model_name=model, out_dir=project / "class_priors",
                                        num_images=count, concept=concept, num_inference_steps=s["steps"],
                                        resolution=s["resolution"], progress=progress))
        for key, value in summary.items():
            if isinstance(value, int):
                totals[key] = totals.get(key, 0) + value
    return totals


def run_train(con, s, progress, project):
    raise ValueError("Training runs from the Train screen (F7), where its settings are.")


STEPS: tuple[StepSpec, ...] = (
    StepSpec("ingest", "Ingest", run_ingest,
             "SELECT count(*) AS images, count(*) FILTER (status = 'error') AS errors FROM images WHERE role = 'instance'",
             (Setting("folders", "folders", "", "paths", "empty: the last ingest's folders (relative: to the catalog's folder)"),
              Setting("workers", "workers", "", "optional_int", minimum=1))),
    StepSpec("dedup", "Dedup", run_dedup,
             "SELECT count(DISTINCT group_id) AS groups, count(*) FILTER (NOT is_keeper) AS duplicates FROM duplicates",
             (Setting("threshold", "threshold", "6", int, "pHash bits", minimum=0),
              Setting("mirrored", "flipped", "yes", "yes_no", "yes/no"))),
    StepSpec("caption", "Caption", run_caption,
             "SELECT count(DISTINCT image_id) AS captioned FROM captions WHERE source LIKE 'model:%'",
             (Setting("model", "model", "tiny"), Setting("batch_size", "batch", "8", int, minimum=1), Setting("template", "template", ""))),
    StepSpec("score", "CLIP score", run_score,
             "SELECT count(*) AS scored, round(avg(score), 3) AS mean FROM clip_scores",
             (Setting("model", "model", "tiny"), Setting("batch_size", "batch", "32", int, minimum=1))),
    StepSpec("filter", "Filter", run_filter,
             "SELECT count(DISTINCT image_id) AS failing_a_rule, (SELECT count(*) FROM dataset) AS dataset FROM exclusions WHERE step LIKE 'filter:%'",
             (Setting("min_side", "min side", "256", "optional_int", "empty: off"),
              Setting("max_aspect", "max aspect", "3.0", "optional_float", "empty: off"),
              Setting("min_clip_score", "min CLIP", "", "optional_float", "empty: off"))),
    StepSpec("buckets", "Buckets", run_buckets,
             "SELECT count(*) AS bucketed, count(DISTINCT (bucket_width, bucket_height)) AS buckets FROM aspect_buckets",
             (Setting("resolution", "resolution", "512", int, minimum=8),
              Setting("min_bucket_reso", "min", "", "optional_int", "empty: kohya"),
              Setting("max_bucket_reso", "max", "", "optional_int", "empty: kohya"),
              Setting("bucket_reso_steps", "steps", "", "optional_int", "empty: kohya"))),
    StepSpec("priors", "Class priors", run_priors,
             "SELECT count(*) AS class_images FROM images WHERE role = 'class_prior'",
             (Setting("class_prompt", "class prompt", ""), Setting("num", "count", "4", "optional_int", minimum=0),
              Setting("model", "model", "tiny"), Setting("steps", "steps", "4", int, minimum=1), Setting("resolution", "size", "", "optional_int", minimum=8)),
             # DreamBooth's alone: Run all (curation) made class images a LoRA never uses, with settings off screen
             in_run_all=False),
    StepSpec("train", "Train", run_train,
             "SELECT count(*) AS runs, count(*) FILTER (status IN ('ok', 'continued')) AS finished FROM training_runs", (), in_run_all=False),
)
STEPS_BY_NAME = {step.name: step for step in STEPS}


# The settings a step's form takes from its last run (from the TUI or the CLI), so Run all repeats what was done
# rather than the defaults (buckets at 512 over a set bucketed at 64). Only those a run records as they were
# asked for: buckets record the bounds they worked out (kept, they would block a new resolution) and caption and
# score a model's label, not a loadable id. Ingest has its own rule (empty folders: the last ingest's) and class
# priors depend on the concepts.
RESTORED_SETTINGS = {
    "dedup": ("threshold", "mirrored"),
    "caption": ("batch_size", "template"),
    "score": ("batch_size",),
    "filter": ("min_side", "max_aspect", "min_clip_score"),
    "buckets": ("resolution",),
}


def setting_text(setting: Setting, value: Any) -> str | None:
    """A recorded parameter as the form's text, or None when the form cannot show it."""
    if isinstance(value, list):  # buckets record their resolution as [width, height]
        if len(set(value)) != 1:
            return None
        value = value[0]
    if value is None:
        return "" if str(setting.kind).startswith("optional") or setting.kind is str else None
    if setting.kind == "yes_no":
        return "yes" if value else "no"
    return None if setting.kind == "paths" or isinstance(value, dict) else str(value)


def last_settings(con: duckdb.DuckDBPyConnection) -> dict[str, dict[str, str]]:
    """Per step, the form text of the settings its last finished run used."""
    cur = con.cursor()
    try:
        rows = cur.execute(
            "SELECT step, params FROM runs WHERE run_id IN (SELECT max(run_id) FROM runs WHERE status = 'ok' GROUP BY step)"
        ).fetchall()
    finally:
        cur.close()
    found: dict[str, dict[str, str]] = {}
    for step, params in rows:
        if step not in RESTORED_SETTINGS or not params:
            continue
        recorded = json.loads(params)
        texts = {s.name: setting_text(s, recorded[s.name]) for s in STEPS_BY_NAME[step].settings
                 if s.name in recorded and s.name in RESTORED_SETTINGS[step]}
        found[step] = {name: text for name, text in texts.items() if text is not None}
    return found


def step_counts(con: duckdb.DuckDBPyConnection) -> dict[str, dict[str, Any]]:
    """Each step's counts from the catalog (a step whose tables do not exist yet gets an empty dict)."""
    cur = con.cursor()
    try:
        counts = {}
        for step in STEPS:
            try:
                relation = cur.execute(step.counts_sql)
                names = [d[0] for d in relation.description]
                counts[step.name] = dict(zip(names, relation.fetchone()))
            except duckdb.Error:
                counts[step.name] = {}
        return counts
    finally:
        cur.close()
