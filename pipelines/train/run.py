"""The training step: dataset from the catalog in, a trained model and a run record out."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Iterator

import duckdb

from pipelines.train import checkpoint as ckpt
from pipelines.train import data as train_data
from pipelines.train.config import RUN_CONFIG_FILE, SNAPSHOT_FILE, TrainConfig, run_config_text
from pipelines.train.loop import (
    NothingToResume,
    PlanDataset,
    RunRefused,
    TrainingError,
    TrainResult,
    check_setup,
    load_components,
    main,
    planned_steps,
    runs_on_cpu,
    steps_behind_message,
)
from workbench.catalog import catalog_file, connect_when_free, finish_run, first_row, refuse_read_only, run_status, start_run
from workbench.files import current_umask
from workbench.progress import ProgressHook, StepCancelled, named_few, null_progress


def catalog_project_dir(con: duckdb.DuckDBPyConnection) -> Path:
    """The folder holding the catalog file (the current folder for an in-memory catalog)."""
    path = catalog_file(con)
    return path.parent if path else Path.cwd()


def default_output_dir(con: duckdb.DuckDBPyConnection, mode: str) -> Path:
    return catalog_project_dir(con) / "runs" / f"{mode}-{datetime.now():%Y%m%d-%H%M%S}"


class _RunCatalog:
    """The run's catalog connection. With `release`, it is let go while the model works (DuckDB lets one
    process write a catalog; this work takes minutes to hours) and opened again to write the results."""

    def __init__(self, con: duckdb.DuckDBPyConnection, release: bool) -> None:
        self.con: duckdb.DuckDBPyConnection | None = con  # None while let go, and after a stop while waiting to reopen
        self.path = catalog_file(con) if release else None

    @contextmanager
    def released(self, progress: ProgressHook, *, task: str, waiting: str, stopped: str, reopen_after_error: bool) -> Iterator[None]:
        if self.path is None:
            yield
            return
        self.con.close()
        self.con = None
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            if not failed or reopen_after_error:
                self.con = connect_when_free(self.path, progress=progress, task=task, waiting=waiting, stopped=stopped)

    def close_if_released(self) -> None:
        if self.path is not None and self.con is not None:
            self.con.close()


def _ensure_priors(catalog: _RunCatalog, config: TrainConfig, images, components, progress: ProgressHook):
    """(class-prior pools per class prompt, components): the missing priors of this run's set (its resolution and
    prior_inference_steps) are generated with the base model (DreamBooth recipe), with the catalog let go meanwhile
    when the run releases it."""
    from pipelines.priors import generated_prior_files, ingested_priors, prior_pipeline, prior_plan, training_prior_settings

    prompts, supplied, wanted = _class_images_wanted(catalog.con, config, images)
    for prompt in prompts:
        if supplied[prompt]:
            more = wanted[prompt] - supplied[prompt]
            progress(task="class priors", message=(
                f"{min(supplied[prompt], wanted[prompt])} supplied class image(s) of {prompt!r}"
                + (f", and {more} generated" if more > 0 else "")))
    pools = train_data.class_prior_images(catalog.con, config, wanted, config.model, progress=progress)
    short = {p: n for p, n in prompts.items() if len(pools[p]) < wanted[p]}
    if not short:
        return pools, components
    folder = catalog_project_dir(catalog.con) / "class_priors"
    settings = training_prior_settings(config)
    # a set's seeds are its own, whatever the training --seed: the set is shared with other runs and `workbench
    # priors`, so its missing images are the next seeds after the ones it has (from where it starts: 0, or the
    # `workbench priors --seed` it was made with), not a new run of seeds beside them
    plans = [prior_plan(catalog.con, class_prompt=prompt, model_name=config.model, out_dir=folder, settings=settings,
                        num_images=wanted[prompt] - supplied[prompt]) for prompt in short]
    made = {}
    with catalog.released(progress, task="class priors", reopen_after_error=False,
                          waiting=f"Waiting to add the class images to the catalog {catalog.path}, which {{holder}} has open.",
                          stopped=f"Stopped before the class images were added: they are in {folder}; the next run adds them."):
        if components is None:
            components = load_components(config, progress)
        pipe = prior_pipeline(components, config.device)  # the sampler `workbench priors` makes its sets with too
        for plan in plans:
            made[plan.class_prompt] = generated_prior_files(pipe, plan, batch_size=config.sample_batch_size, progress=progress)
        pipe.to("cpu")
    for plan in plans:
        ingested_priors(catalog.con, plan, made[plan.class_prompt])
    return train_data.class_prior_images(catalog.con, config, wanted, config.model), components


def _class_images_wanted(con: duckdb.DuckDBPyConnection, config: TrainConfig, images) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(instance images, supplied class images, class images wanted) per class prompt of a prior-preservation run."""
    prompts: dict[str, int] = {}
    for image in images:
        if not image.class_prompt:
            raise RunRefused(
                f"Image {image.path or image.image_id[:12]} ({f'concept {image.concept!r}, which has no class noun' if image.concept else 'in no concept'}) "
                "has no class prompt for prior preservation: give --class-prompt, "
                "set a class noun on its concept (`workbench concept add NAME --class NOUN`), or pass --no-prior-preservation."
            )
        prompts[image.class_prompt] = prompts.get(image.class_prompt, 0) + 1
    supplied = train_data.supplied_prior_counts(con, list(prompts))
    return prompts, supplied, {p: _wanted(config, n, supplied[p]) for p, n in prompts.items()}


def _wanted(config: TrainConfig, instance_count: int, supplied: int = 0) -> int:
    """--num-class-images, else the class images supplied for the prompt when there are any (kohya's way: your
    regularisation set as it is), else 200 × the instance images of a class prompt, capped by max_class_images (as
    `workbench priors` counts)."""
    from pipelines.priors import class_images_wanted

    return class_images_wanted(instance_count, max_class_images=config.max_class_images, supplied=supplied,
                               num_class_images=config.num_class_images)


def _refuse_a_finished_or_started_run(output_dir: Path, config: TrainConfig) -> None:
    """A new run never writes into another run's folder: its checkpoints would be what `--resume latest` finds."""
    if config.resume:
        return
    if _trained_a_step(output_dir) or ckpt.list_checkpoints(output_dir / "checkpoints"):
        raise RunRefused(
            f"{output_dir} already holds a training run: continue it with --resume latest, or give another --output-dir."
        )


def _trained_a_step(output_dir: Path) -> bool:
    """Whether a run in this folder trained a step (its loss.csv has a row). One that failed before its first step (a
    resolution too small for the model, found once the model loaded) leaves nothing to resume: a new run may take the
    folder (it was stuck: a resume with other options was refused, and so was a new run)."""
    try:
        with (output_dir / "loss.csv").open() as handle:
            return sum(1 for line in handle if line.strip()) > 1
    except OSError:
        return False


def _refuse_a_foreign_or_older_checkpoint(output_dir: Path, config: TrainConfig) -> None:
    """`--resume CHECKPOINT` continues the run in --output-dir from its latest checkpoint. Another folder's checkpoint
    would write that run's weights and options over this run's outputs; an older one of this folder would overwrite
    the later checkpoints, the outputs and the loss log past its step. A later checkpoint that cannot be read does not
    count: resuming from the one before it is the way on."""
    if not config.resume or config.resume == "latest":
        return
    own = output_dir / "checkpoints"
    checkpoint = ckpt.resolve_resume(own, config.resume)
    if checkpoint.resolve().parent != own.resolve():
        raise RunRefused(
            f"{checkpoint} is not a checkpoint of {output_dir}: --resume continues the run in --output-dir from one of "
            f"its own. To continue that run, give its folder: --output-dir {checkpoint.resolve().parent.parent}."
        )
    step = ckpt.checkpoint_step(checkpoint)
    later = [c for c in ckpt.list_checkpoints(own) if ckpt.checkpoint_step(c) > step and not ckpt.damaged_files(c)]
    if later:
        raise RunRefused(
            f"{checkpoint.name} is older than {later[-1].name} in {own}: resuming from it would overwrite "
            f"{', '.join(c.name for c in later)}, the run's outputs and its loss.csv past step {step}. Resume the latest "
            f"(--resume latest); to go back to {checkpoint.name}, first move the later checkpoints out of {own}. "
            f"`workbench train export {output_dir} --checkpoint {step}` writes its model without training."
        )


# what a finished run leaves beside its checkpoints (LoRA files; DreamBooth and fine-tune: a pipeline and one file)
FINISHED_OUTPUTS = ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "pipeline", "model.safetensors")
FINAL_SAMPLES = os.path.join("samples", "final")  # a finished run's last samples, one file each, and samples.json
# every name a run writes in its folder
RUN_WRITES = frozenset({*FINISHED_OUTPUTS, "checkpoints", "samples", "logs", "loss.csv", "loss.png", SNAPSHOT_FILE, RUN_CONFIG_FILE})


def _refuse_a_resume_without_checkpoints(con, config: TrainConfig, output_dir: Path, folder_id: str | None) -> None:
    """`--resume latest` with no checkpoint starts again at step 0: right for a run stopped before its first
    checkpoint was written (or while it was written), wrong for one that wrote outputs or recorded a checkpoint
    whose files are gone (it would train over them). Only what says a checkpoint existed counts: the loss log
    does not, since the checkpoint cadence may change on resume."""
    if config.resume != "latest" or ckpt.list_checkpoints(output_dir / "checkpoints"):
        return
    outputs = [name for name in FINISHED_OUTPUTS if (output_dir / name).exists()]
    # steps of a recorded session of this run: the step it finished at, or the checkpoint a resume would continue from
    recorded = con.execute(
        "SELECT coalesce(max(steps), 0) FROM training_runs WHERE output_dir = ? AND folder_id IS NOT DISTINCT FROM ?",
        [str(output_dir), folder_id],
    ).fetchall()[0][0]
    if outputs or recorded > 0:
        reached = f"got to step {recorded}" + (" and wrote its outputs" if outputs else "") if recorded else "wrote its outputs"
        raise RunRefused(
            f"There is no checkpoint to resume from in {output_dir / 'checkpoints'}, but the run there {reached}: "
            "its checkpoints were deleted. Resuming would train it again from step 0 over them. Start a new run with "
            f"another --output-dir (or delete {output_dir} to start again there)."
        )


def _refuse_an_old_resume_with_other_options(con, config: TrainConfig, output_dir: Path) -> None:
    """A checkpoint of an older workbench holds no options (nor a dataset.json beside it): the resume took whatever was
    given, the defaults (512 px, batch 1) for what was not, and trained on. The catalog's record of the run says
    what it trained with: options that differ from it are refused, named with their values."""
    from pipelines.train.config import RESUME_MAY_CHANGE

    if not config.resume or (output_dir / SNAPSHOT_FILE).is_file():
        return
    checkpoint = ckpt.resolve_resume(output_dir / "checkpoints", config.resume)
    if checkpoint is None or ckpt.saved_config(checkpoint) is not None:
        return
    runs = _runs_of_folder(con, output_dir)
    recorded = json.loads(runs[0][1] or "{}") if runs else None
    if not recorded:
        return
    now = config.to_dict()
    differ = {key: value for key, value in recorded.items()
              # an option left unset here (None) is filled in later, as the run's was (bucket settings)
              if key in now and key not in RESUME_MAY_CHANGE and value is not None and now[key] is not None
              and now[key] != value}
    if differ:
        options = " ".join(f"--set {key}={json.dumps(value)}" for key, value in sorted(differ.items()))
        raise RunRefused(
            f"{checkpoint} was written by an older workbench, which kept no options with it; the catalog records that the "
            f"run trained with {', '.join(f'{k} {v!r}' for k, v in sorted(differ.items()))}, not "
            f"{', '.join(f'{k} {now[k]!r}' for k in sorted(differ))}. Resume it with those: {options}")


def _refuse_a_folder_of_catalog_images(con, output_dir: Path) -> None:
    """A run folder is marked as output, which `ingest` leaves out: made in a folder of photos, it would hide them from
    the next ingest, and its samples would sit among them."""
    row = first_row(con.execute(
        "SELECT count(*), min(path) FROM paths WHERE NOT missing AND starts_with(path, ?)", [str(output_dir).rstrip(os.sep) + os.sep],
    ))
    if row[0]:
        raise RunRefused(f"{output_dir} holds {row[0]} image(s) of the catalog (e.g. {row[1]}): a run folder there would hide "
                         "them from the next `workbench ingest`. Give another --output-dir.")


def _folder_id(output_dir: Path) -> str | None:
    """This life of the run folder (its dataset.json's id): rows of a run deleted before it and started again there
    belong to another run."""
    return train_data.snapshot_folder_id(output_dir / SNAPSHOT_FILE)


def _refuse_a_finished_resume(con, config: TrainConfig, output_dir: Path, images, folder_id: str | None) -> None:
    """`--resume` from a checkpoint at or past the steps asked for would train nothing and only redo the outputs:
    refused when the run is recorded finished at that step, or is past it (a resume after a crash while saving
    the outputs still writes them)."""
    if not config.resume:
        return
    checkpoint = ckpt.resolve_resume(output_dir / "checkpoints", config.resume)
    if checkpoint is None:
        return
    step = ckpt.checkpoint_step(checkpoint)
    total = planned_steps(config, images, int(os.environ.get("WORLD_SIZE", "1")))
    if step > total:
        raise RunRefused(steps_behind_message(config, checkpoint, step, total))
    row = first_row(con.execute(
        "SELECT steps FROM training_runs WHERE output_dir = ? AND folder_id IS NOT DISTINCT FROM ? AND status = 'ok' "
        "ORDER BY train_id DESC LIMIT 1",
        [str(output_dir), folder_id],
    ))
    if step == total and row is not None and row[0] == step:
        raise NothingToResume(
            f"{output_dir} finished at step {step} and is recorded: nothing to resume. "
            "Give a larger --max-train-steps (or --num-train-epochs) to train it further."
        )


def _put_back_unfinished_moves(output_dir: Path, exports: Path) -> None:
    """A continuation killed while it moved the finished outputs (kill -9, a power cut: no `except` ran) left some in
    a staging folder: they go back, so the move starts over whole."""
    for staging in sorted(exports.glob(".finished-step-*")) if exports.is_dir() else []:
        for name in (*FINISHED_OUTPUTS, FINAL_SAMPLES):
            if (staging / name).exists() and not (output_dir / name).exists():
                (output_dir / name).parent.mkdir(parents=True, exist_ok=True)
                os.rename(staging / name, output_dir / name)
        if not any(path.is_file() for path in staging.rglob("*")):
            shutil.rmtree(staging, ignore_errors=True)


def _keep_finished_outputs(con, config: TrainConfig, output_dir: Path, folder_id: str | None, progress: ProgressHook) -> None:
    """A resume that trains a finished run further would write its outputs over the finished ones, and the
    checkpoint limit may already have pruned the checkpoint they came from: the finished model would be gone. Its
    files move to exports/finished-step-N first (where `workbench train export` puts a checkpoint's model), and the
    catalog's row of that session says where they are now."""
    if not config.resume:
        return
    row = first_row(con.execute(
        "SELECT train_id, steps, outputs FROM training_runs WHERE output_dir = ? AND folder_id IS NOT DISTINCT FROM ? "
        "AND status = 'ok' ORDER BY train_id DESC LIMIT 1", [str(output_dir), folder_id]))
    if row is None:
        return  # never finished: nothing finished to keep
    train_id, steps, outputs = row
    kept = output_dir / "exports" / f"finished-step-{steps}"
    _put_back_unfinished_moves(output_dir, kept.parent)
    present = [name for name in FINISHED_OUTPUTS if (output_dir / name).exists()]
    if (output_dir / FINAL_SAMPLES).is_dir() and present:  # its final samples go with it: the run ahead writes its own
        present.append(FINAL_SAMPLES)
    if not kept.exists():
        if not present:
            return  # its outputs are gone: nothing finished to keep
        kept.parent.mkdir(parents=True, exist_ok=True)
        # moved (renames: no copy of gigabytes), all or none: into a staging folder, which then takes the final name
        staging = Path(tempfile.mkdtemp(prefix=f".{kept.name}.", dir=kept.parent))
        moved_now: list[str] = []
        try:
            for name in present:
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                os.rename(output_dir / name, staging / name)
                moved_now.append(name)
            os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp made it 0700: a UI run by another user reads it
            os.rename(staging, kept)
        except BaseException:
            for name in moved_now:  # put back what moved: the run folder stays as it was
                os.rename(staging / name, output_dir / name)
            shutil.rmtree(staging, ignore_errors=True)
            raise
        progress(task="resume", message=f"The run's finished model (step {steps}) is kept in {kept}: training on writes "
                                        "the run's outputs anew.")

    # the row says where its files are: also when kept already (a continuation stopped between the move and this)
    def now_at(path: str) -> str:
        relative = os.path.relpath(path, output_dir)
        if relative.startswith(os.pardir) or not (kept / relative).exists() or (output_dir / relative).exists():
            return path
        return str(kept / relative)

    recorded = json.loads(outputs or "{}")
    moved = {key: now_at(path) for key, path in recorded.items()}
    if moved != recorded:
        con.execute("UPDATE training_runs SET outputs = ? WHERE train_id = ?", [json.dumps(moved), train_id])


def _last_checkpoint(output_dir: Path) -> tuple[int, float | None]:
    """The step of the last checkpoint (0 without one), where a resume goes on from, and the training time up to it
    (all sessions; None without one or when its state.json does not say), which a stopped run keeps."""
    kept = ckpt.list_checkpoints(output_dir / "checkpoints")
    if not kept:
        return 0, None
    try:
        seconds = float(json.loads((kept[-1] / "state.json").read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        seconds = None
    return ckpt.checkpoint_step(kept[-1]), seconds


def _runs_of_folder(con, output_dir: Path, where: str = "TRUE") -> list[tuple[int, str | None]]:
    """(train_id, config) of the training_runs rows of this run folder, newest first: by its path, or as older rows
    hold it, relative to where the command ran (here, or beside the catalog)."""
    here = output_dir.resolve()
    catalog_dir = Path(first_row(con.execute(
        "SELECT path FROM duckdb_databases() WHERE database_name = current_database()"))[0] or ".").parent
    return [(train_id, config) for train_id, folder, config in con.execute(
        f"SELECT train_id, output_dir, config FROM training_runs WHERE {where} ORDER BY train_id DESC").fetchall()
        if folder and (folder == str(output_dir) or any((base / folder).resolve() == here for base in (Path.cwd(), catalog_dir)))]


def _mark_interrupted_runs(con, output_dir: Path) -> None:
    """Rows of earlier runs in this folder still 'running' belong to processes that died (the folder lock says
    no other process trains here now): say so instead of leaving them 'running' forever."""
    ids = [train_id for train_id, _ in _runs_of_folder(con, output_dir, "status = 'running'")]
    con.execute(
        "UPDATE training_runs SET status = 'interrupted', finished_at = current_timestamp, steps = coalesce(steps, ?), "
        "error = coalesce(error, 'the training process ended without recording the run (killed, or stopped while waiting for the catalog)') "
        "WHERE train_id IN (SELECT unnest(?::INTEGER[])) AND status = 'running'",
        [_last_checkpoint(output_dir)[0], ids],  # steps: where a --resume continues from
    )
    con.execute(
        "UPDATE runs SET status = 'interrupted', error = coalesce(error, 'the training process ended without recording the run') "
        "WHERE status = 'running' AND step LIKE 'train:%' AND json_extract_string(params, '$.output_dir') = ?",
        [str(output_dir)],
    )


def _run_dataset(catalog: _RunCatalog, config: TrainConfig, output_dir: Path, components, progress: ProgressHook):
    """(images, priors, components): a new run reads the catalog and saves its snapshot; a resumed run trains on
    the snapshot it saved. Components are loaded here only when class priors must be generated.

    The snapshot is what makes `--resume` exact when the catalog changed in between (a caption
    edited, an image excluded or added): the run continues on the data it started with.
    """
    con = catalog.con
    snapshot = output_dir / train_data.SNAPSHOT_FILE
    if config.resume and not snapshot.exists():
        progress(task="dataset", message=(
            f"{output_dir} has no {snapshot.name} (it was started by an older workbench): the run goes on with the "
            "catalog's current dataset, which may differ from the one it started with."
        ))
    if config.resume and snapshot.exists():
        images, priors = train_data.read_snapshot(snapshot)
        try:
            current = train_data.training_images(con, config)
        except train_data.DataError:
            current = []
        changes = ", ".join(f"{count} {what}" for what, count in train_data.snapshot_drift(images, current).items() if count)
        if changes:
            progress(task="dataset", message=(
                f"The catalog's dataset changed since this run started ({changes}). The run goes on with the "
                f"images and captions it started with ({snapshot.name}); start a new run to train on the current data."
            ))
        # files found where the catalog now has them; one at no known path (deleted, or edited in place so its
        # path holds other bytes) can only come from the latent cache: an empty path makes a cache miss say so
        present = train_data.openable_paths(con, [i.image_id for i in images] + [i.image_id for p in (priors or {}).values() for i in p])
        images = [replace(i, path=present.get(i.image_id, "")) for i in images]
        if priors is not None:
            priors = {p: [replace(i, path=present.get(i.image_id, "")) for i in pool] for p, pool in priors.items()}
        _run_config_resumed(output_dir, config, images)
        return images, priors, components
    images = train_data.training_images(con, config, progress=progress)
    buckets = train_data.run_bucket_settings(con, config)  # now: making class priors lets the catalog go (con closes)
    priors = None
    if config.with_prior_preservation:  # dreambooth, or lora asked for it (validate() leaves finetune out)
        _say_class_images_of_other_classes(con, images, progress)  # before _ensure_priors lets the catalog go
        priors, components = _ensure_priors(catalog, config, images, components, progress)
    elif config.mode == "lora":
        _say_unused_class_images(con, images, progress)
    output_dir.mkdir(parents=True, exist_ok=True)
    train_data.write_snapshot(snapshot, images, priors, config.to_dict())
    if is_main_process():
        steps = planned_steps(config, images, int(os.environ.get("WORLD_SIZE", "1")))
        (output_dir / RUN_CONFIG_FILE).write_text(
            run_config_text(config, max_train_steps=steps, buckets=buckets))
    return images, priors, components


def _run_config_resumed(output_dir: Path, config: TrainConfig, images) -> None:
    """A resume that lengthens the run: its config.toml says the new length (the rest is the run's, unchanged)."""
    import tomllib

    path = output_dir / RUN_CONFIG_FILE
    if not path.is_file() or not is_main_process():
        return
    try:
        saved = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return
    steps = planned_steps(config, images, int(os.environ.get("WORLD_SIZE", "1")))
    if saved.get("max_train_steps") != steps:
        buckets = {"min_bucket_reso": saved.get("min_bucket_reso"), "max_bucket_reso": saved.get("max_bucket_reso"),
                   "bucket_reso_steps": saved.get("bucket_reso_steps"), "no_upscale": saved.get("bucket_no_upscale")}
        path.write_text(run_config_text(config, max_train_steps=steps, buckets=buckets))


def _say_unused_class_images(con, images, progress: ProgressHook) -> None:
    """Class images of these images' classes are in the catalog (a kohya reg/ folder imported, a `priors` run), but
    a LoRA trains without them unless asked: kohya's train_network.py trains its reg images whenever it is given
    some, so an imported project would silently train without them."""
    prompts = sorted({image.class_prompt for image in images if image.class_prompt})
    if not prompts:
        return
    counts = con.execute("SELECT c.class_prompt, count(*) FROM class_priors c JOIN images i USING (image_id) WHERE i.status = 'ok' "
                         "AND c.class_prompt IN (SELECT unnest(?::VARCHAR[])) GROUP BY 1 ORDER BY 1", [prompts]).fetchall()
    if counts:
        named = named_few([repr(prompt) for prompt, _ in counts])
        progress(task="dataset", message=(
            f"{sum(n for _, n in counts)} class image(s) of {named} are in the catalog but not used: "
            "--prior-preservation trains with them (DreamBooth-LoRA, as kohya trains its reg images)"))


def _say_class_images_of_other_classes(con, images, progress: ProgressHook) -> None:
    """Class images of a prompt no image of this run has (a kohya `reg/1_person` beside a dog concept): kohya
    regularises with every reg folder it is given; prior preservation here takes each concept's own class only."""
    prompts = sorted({image.class_prompt for image in images if image.class_prompt})
    others = con.execute(
        "SELECT c.class_prompt, count(*) FROM class_priors c JOIN images i USING (image_id) WHERE i.status = 'ok' "
        "AND c.image_id NOT IN (SELECT image_id FROM exclusions) AND NOT list_contains(?::VARCHAR[], c.class_prompt) "
        "GROUP BY 1 ORDER BY 1", [prompts]).fetchall()
    if others:
        named = named_few([f"{prompt!r} ({n})" for prompt, n in others])
        progress(task="dataset", message=(
            f"class images of {named} are in the catalog, but no concept of this run has that class, so they are not "
            "used (kohya regularises with every reg folder): give a concept that class (`workbench concept add NAME "
            "--class NOUN`) to train with them"))


def is_main_process() -> bool:
    """False only in the extra processes of `accelerate launch` / torchrun (RANK > 0)."""
    return int(os.environ.get("RANK", "0")) == 0


def trained_model(
    con: duckdb.DuckDBPyConnection | None,
    config: TrainConfig,
    *,
    components=None,
    progress: ProgressHook = null_progress,
    release_catalog: bool = False,
) -> TrainResult:
    """A LoRA, DreamBooth or fine-tuned model trained on the `dataset` view, recorded in `runs` and `training_runs`.

    The run trains on a snapshot of the dataset saved in its folder (`dataset.json`), which a resume
    reads back. With `release_catalog`, `con` is closed while the model trains, so other workbench
    commands can use the catalog meanwhile (DuckDB lets one process write it); the catalog is
    opened again to record the result, and `con` stays closed afterwards.

    Under `accelerate launch` (several processes), only the main process opens the catalog (DuckDB
    allows one writer); the others get `con=None` and receive the dataset snapshot from it through
    accelerate's `broadcast_object_list`, then all train together.
    """
    started = time.perf_counter()
    config.validate()
    if config.resume and not config.output_dir:
        raise RunRefused("--resume needs the --output-dir of the run to continue.")
    check_setup(config)  # a device not here, fp16 on a CPU, 8-bit AdamW without bitsandbytes: before anything is written
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if con is None:
        if world_size == 1:
            raise TrainingError("trained_model needs a catalog connection (only extra accelerate processes run without one).")
        images, priors, output_dir = _shared_dataset(config, None)
        return main(config, images, output_dir=Path(output_dir), priors=priors, components=components, progress=progress)
    refuse_read_only(con, "Training")  # before its folder and snapshot are written
    output_dir = Path(config.output_dir) if config.output_dir else default_output_dir(con, config.mode)
    catalog = _RunCatalog(con, release_catalog)
    try:
        if not config.resume:
            _refuse_a_folder_of_catalog_images(con, output_dir)
        with _run_folder_lock(output_dir, resuming=bool(config.resume)):  # refusals come first, before minutes of model loading
            _refuse_a_finished_or_started_run(output_dir, config)
            _refuse_a_foreign_or_older_checkpoint(output_dir, config)
            folder_id = _folder_id(output_dir) if config.resume else None  # a resume keeps its folder's snapshot
            _refuse_a_resume_without_checkpoints(con, config, output_dir, folder_id)
            _refuse_an_old_resume_with_other_options(con, config, output_dir)
            images, priors, components = _run_dataset(catalog, config, output_dir, components, progress)
            _refuse_a_finished_resume(con, config, output_dir, images, folder_id)
            _keep_finished_outputs(con, config, output_dir, folder_id, progress)
            if folder_id is None:
                folder_id = _folder_id(output_dir)  # the snapshot a new run (or a resume of a run without one) just wrote
            if world_size > 1:
                _shared_dataset(config, (images, priors, str(output_dir)))
            return _train_and_record(catalog, config, images, priors, output_dir, components, progress, started, folder_id)
    finally:  # a refused or failed run too: the connection it opened again (to record the failure) is let go
        catalog.close_if_released()


def _shared_dataset(config: TrainConfig, sent: tuple | None) -> tuple:
    """The main process's (images, priors, output_dir), broadcast to every accelerate process."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    PartialState(cpu=runs_on_cpu(config))  # joins the process group accelerate launch set up
    payload = [sent]
    broadcast_object_list(payload, from_process=0)
    return payload[0]


@contextmanager
def _run_folder_lock(output_dir: Path, *, resuming: bool = False) -> Iterator[None]:
    """One training process per run folder: the catalog is free while a model trains, so a second
    `workbench train --resume` could otherwise start on the same checkpoints."""
    from filelock import FileLock, Timeout

    from workbench.config import OUTPUT_MARKER, mark_output_folder

    if output_dir.exists() and not output_dir.is_dir():
        raise RunRefused(f"--output-dir {output_dir} is a file: give a folder (a new one, or a run's to --resume).")
    if not resuming and output_dir.is_dir() and not (output_dir / OUTPUT_MARKER).exists():
        # a folder no workbench run has used: never overwrite what another tool (or the user) put there
        taken = sorted(p.name for p in output_dir.iterdir() if p.name in RUN_WRITES)
        if taken:
            raise RunRefused(
                f"{output_dir} already holds {', '.join(taken)}, which this run would overwrite, and no workbench run "
                "wrote them: give an empty or new --output-dir."
            )
    if not resuming:
        _refuse_nested_run_folder(output_dir)
    new_folder = not output_dir.exists()
    mark_output_folder(output_dir)  # its samples and plots must never be ingested as training images
    lock = FileLock(output_dir / ".train.lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunRefused(f"Another process is training into {output_dir}: wait for it to finish, or give another --output-dir.") from None
    try:
        yield
    finally:
        lock.release()
        # a run refused before it wrote anything (no such concept, an empty dataset) leaves no folder behind
        if new_folder and {p.name for p in output_dir.iterdir()} <= {OUTPUT_MARKER, ".train.lock"}:
            shutil.rmtree(output_dir, ignore_errors=True)


def _refuse_nested_run_folder(output_dir: Path) -> None:
    """A new run gets a folder of its own: not one inside another run's (or class priors') folder, nor one that
    holds other runs (`--output-dir runs` wrote its model and samples among 16 run folders)."""
    from workbench.config import OUTPUT_MARKER
    from workbench.progress import named_few

    resolved = output_dir.expanduser().resolve()
    for parent in resolved.parents:
        if (parent / OUTPUT_MARKER).exists():
            raise RunRefused(f"--output-dir {output_dir} is inside {parent}, a folder the workbench wrote (a run or class "
                             f"images): give a folder of its own, e.g. {parent.parent / (resolved.name)}.")
    if resolved.is_dir() and not (resolved / OUTPUT_MARKER).exists():
        held = sorted(p.name for p in resolved.iterdir() if p.is_dir() and (p / OUTPUT_MARKER).exists())
        if held:
            raise RunRefused(f"--output-dir {output_dir} holds other runs or class images ({named_few(held)}): give each "
                             f"run a folder of its own, e.g. {output_dir / 'my-run'}.")


def _record_outcome(con, run, train_id: int, result: TrainResult | None, failure: BaseException | None, output_dir: Path,
                    base_model: dict) -> None:
    if base_model:  # loaded: a run that failed after is recorded with it too (the one someone resumes)
        con.execute("UPDATE training_runs SET model_path = ?, model_revision = ?, model_fingerprint = ? WHERE train_id = ?",
                    [base_model["model_path"], base_model["model_revision"], base_model["model_fingerprint"], train_id])
    if result is not None:
        run.counts.update({"train_id": train_id, "steps": result.steps, "images": result.images, "final_loss": result.final_loss})
        con.execute(
            "UPDATE training_runs SET run_id = ?, status = 'ok', outputs = ?, steps = ?, final_loss = ?, seconds = ?, "
            "finished_at = current_timestamp WHERE train_id = ?",
            [run.run_id, json.dumps(result.outputs), result.steps, result.final_loss, result.seconds, train_id],
        )
        # earlier finished sessions of this run (continued with --resume and more steps): their outputs are now this
        # one's, so they are no longer 'ok' rows a query for the best finished run would list with files they lack
        con.execute(
            "UPDATE training_runs SET status = 'continued' WHERE status = 'ok' AND train_id < ? AND output_dir = ? "
            "AND folder_id IS NOT DISTINCT FROM (SELECT folder_id FROM training_runs WHERE train_id = ?)",
            [train_id, str(output_dir), train_id],
        )
    else:
        reason = str(failure) or "stopped by the user or a signal"
        con.execute(  # steps and seconds: where a --resume would continue from (a review found seconds NULL)
            "UPDATE training_runs SET status = ?, error = ?, steps = ?, seconds = ?, finished_at = current_timestamp "
            "WHERE train_id = ?",
            [run_status(failure), f"{failure.__class__.__name__}: {reason}", *_last_checkpoint(output_dir), train_id],
        )
    finish_run(con, run, failure)


def _record_training_images(con, train_id: int, images, priors) -> None:
    """The run's images as it trains them (`training_images`): caption, concept, repeats and bucket of each."""
    rows = [(image, "instance") for image in images] + [(image, "class_prior") for pool in (priors or {}).values() for image in pool]
    # Columns as list parameters, zipped by unnest: not an Arrow table, so training does not carry pyarrow (26 MiB
    # of library in its peak memory); 100,000 images take half a second.
    con.execute(
        "INSERT INTO training_images SELECT $train_id, unnest($image_ids::VARCHAR[]), unnest($roles::VARCHAR[]), "
        "unnest($captions::VARCHAR[]), unnest($concepts::VARCHAR[]), unnest($repeats::INTEGER[]), "
        "unnest($widths::INTEGER[]), unnest($heights::INTEGER[]) "
        "ON CONFLICT DO NOTHING",  # a class image in two pools: once
        dict(train_id=train_id, image_ids=[image.image_id for image, _ in rows], roles=[role for _, role in rows],
             captions=[image.caption for image, _ in rows], concepts=[image.concept for image, _ in rows],
             repeats=[image.repeats for image, _ in rows], widths=[image.bucket[0] for image, _ in rows],
             heights=[image.bucket[1] for image, _ in rows]),
    )


def _train_and_record(catalog: _RunCatalog, config: TrainConfig, images, priors, output_dir: Path, components,
                      progress: ProgressHook, started: float, folder_id: str | None) -> TrainResult:
    """Train, with the run recorded in `training_runs` and `runs` (and its metrics, when asked for)."""
    _mark_interrupted_runs(catalog.con, output_dir)
    class_ids = sorted(train_data.class_image_ids(priors))
    from pipelines.train.loop import trained_bucket_settings

    # the bucket settings it trains with, filled in (unset options are NULL in config.to_dict(): a query over runs
    # could not tell which buckets one used once `workbench buckets` ran again)
    buckets = trained_bucket_settings(config, output_dir)
    recorded = {**config.to_dict(), "min_bucket_reso": buckets["min_bucket_reso"], "max_bucket_reso": buckets["max_bucket_reso"],
                "bucket_reso_steps": buckets["bucket_reso_steps"], "bucket_no_upscale": bool(buckets["no_upscale"])}
    train_id = catalog.con.execute(
        "INSERT INTO training_runs (mode, model, status, config, image_ids, class_image_ids, output_dir, folder_id) "
        "VALUES (?, ?, 'running', ?, ?, ?, ?, ?) RETURNING train_id",
        [config.mode, config.model, json.dumps(recorded), [i.image_id for i in images], class_ids, str(output_dir),
         folder_id],
    ).fetchall()[0][0]
    _record_training_images(catalog.con, train_id, images, priors)
    run = start_run(catalog.con, f"train:{config.mode}", {"train_id": train_id, **config.to_dict(), "output_dir": str(output_dir)})
    result, failure = None, None
    base_model: dict = {}  # main fills it in once the model is loaded
    try:
        with catalog.released(
            progress, task="record run", reopen_after_error=True,
            waiting=f"Waiting to record the run in the catalog {catalog.path}, which {{holder}} has open; it is recorded "
                    f"as soon as that closes it. The outputs are already in {output_dir}.",
            stopped=f"Stopped before the run was recorded: its outputs are in {output_dir}; the catalog lists it as "
                    "'running' until the next run in that folder marks it 'interrupted'.",
        ):
            # main loads the model when none was given: with the catalog already free
            result = main(config, images, output_dir=output_dir, priors=priors, components=components, progress=progress,
                          base_model=base_model)
            # the whole run from the call on: class-prior generation, model loading, caching, training, samples and
            # outputs (main's own count starts after the priors); not the wait to record it, nor evaluation. A resumed
            # run adds its earlier sessions up to the checkpoint it went on from (kohya's ss_training_seconds does too)
            result.seconds = result.seconds_before + time.perf_counter() - started
    except BaseException as error:
        failure = error
        raise
    finally:
        if failure is not None and run_status(failure) == "failed" and getattr(progress, "cancelled", False):
            # asked to stop, it failed on the way (several processes: one stopped a step before the other, whose next
            # collective then broke): a run the user stopped, recorded so, with the error that followed
            failure_recorded = StepCancelled(f"stopped by the user; while stopping: {failure.__class__.__name__}: {failure}")
        else:
            failure_recorded = failure
        if catalog.con is not None:  # None: stopped while waiting to reopen it; the next run here marks the row 'interrupted'
            _record_outcome(catalog.con, run, train_id, result, failure_recorded, output_dir, base_model)
    from pipelines.train.evaluate import finished_sessions, run_metrics

    try:
        result.train_id = train_id
        continued = [other for other in finished_sessions(catalog.con, train_id) if other < train_id]
        if continued:
            progress(task="record run", message=(
                f"This run continued run {', '.join(map(str, continued))} in {output_dir}: the weights and samples there "
                f"are now this run's (run {train_id}); the earlier rows keep their own config and metrics."))
        if config.evaluate and config.num_validation_images > 0:
            try:
                result.metrics = run_metrics(catalog.con, train_id, clip_model=config.clip_model, device=config.device, progress=progress)
            except Exception as error:  # evaluation must never cost a finished training run
                result.metrics = {"error": f"{error.__class__.__name__}: {error}"}
                catalog.con.execute("UPDATE training_runs SET metrics = ? WHERE train_id = ?", [json.dumps(result.metrics), train_id])
    finally:
        catalog.close_if_released()
    return result


@dataclass
class PlannedItem:
    """One item of a planned micro-batch, as training will see it."""

    step: int  # the optimizer step it belongs to (1-based)
    path: str
    pool: str  # 'instance', or the class prompt of a class image
    bucket: tuple[int, int]
    crop: tuple[int, int]
    flip: bool
    caption: str  # after tag shuffling, keep_tokens and caption dropout: what the text encoder gets
    dropped: bool  # caption dropout emptied a caption the image has


def planned_batches(con: duckdb.DuckDBPyConnection, config: TrainConfig, steps: int, *,
                    progress: ProgressHook = null_progress) -> list[PlannedItem]:
    """The items of a new run's first `steps` optimizer steps, from the run's own plan (kohya's --debug_dataset):
    no model is loaded and nothing is written. Class images are the ones the catalog has now (those a run would
    still generate are left out, and said)."""
    config.validate()
    images = train_data.training_images(con, config, progress=progress)
    from pipelines.train.loop import say_long_captions
    from workbench.models import load_sd_tokenizer

    tokenizer = load_sd_tokenizer(config.model)  # the tokens alone: captions the run would cut are said here too
    if tokenizer is not None:
        say_long_captions(images, tokenizer, progress, config.max_token_length, config.shuffle_tags)
    priors = None
    if config.with_prior_preservation:
        _, _, wanted = _class_images_wanted(con, config, images)
        priors = train_data.class_prior_images(con, config, wanted, config.model, progress=progress)
        for prompt, pool in priors.items():
            if len(pool) < wanted[prompt]:
                progress(task="plan", message=f"{len(pool)} of {wanted[prompt]} class images of {prompt!r} exist: training "
                         "would generate the rest, which this plan cannot show")
        if any(not pool for pool in priors.values()):
            raise RunRefused("No class image exists yet for "
                             + ", ".join(repr(p) for p, pool in priors.items() if not pool)
                             + ": make them first (`workbench priors`), or train, which makes them.")
    micro = config.gradient_accumulation_steps
    plan = train_data.run_plan(images, config, steps * micro, priors)
    dataset = PlanDataset(images, priors or {}, None, None)  # the loader's own item → image mapping
    items = []
    for index, batch in enumerate(plan):
        for spec in batch:
            image = dataset.image_of(spec)
            items.append(PlannedItem(step=index // micro + 1, path=image.path, pool=spec.pool.removeprefix("prior:"),
                                     bucket=image.bucket, crop=spec.crop, flip=spec.flip, caption=spec.caption,
                                     dropped=bool(image.caption) and not spec.caption))
    return items
