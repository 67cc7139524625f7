"""Train: pick LoRA / DreamBooth / fine-tune and a preset, edit validated settings, watch loss, samples, step and ETA."""

from __future__ import annotations

import csv
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Footer, Input, Label, Log, ProgressBar, Select
from textual_plotext import PlotextPlot

from tui import queries
from tui.image_table import cell
from tui.messages import CatalogChanged, StepFinished, StepProgress
from tui.page_table import PageTable
from tui.preview import ImagePreview, load_preview
from tui.safe_text import markup_safe, visible
from tui.screen_bar import ScreenBar
from tui.size_classes import SizeClasses
from tui.workers import cancellable_progress, people_message
from workbench.progress import StepCancelled

MODES = (("LoRA", "lora"), ("DreamBooth", "dreambooth"), ("Fine-tune", "finetune"))
# (TrainConfig field, label, kind); the form shows these, "more" takes any other field as KEY=VALUE.
FIELDS = (
    ("resolution", "resolution", int),
    ("max_train_steps", "steps", int),
    ("train_batch_size", "batch size", int),
    ("learning_rate", "learning rate", float),
    ("lr_scheduler", "scheduler", str),
    ("rank", "LoRA rank", int),
    ("seed", "seed", int),
    ("checkpointing_steps", "checkpoint every", int),
    ("validation_steps", "samples every", int),
    ("validation_prompt", "sample prompt", list),
    ("device", "device (cpu/cuda)", str),
    ("output_dir", "output folder", str),
)
FIELD_LABELS = {name: label for name, label, _ in FIELDS}
FIELD_PLACEHOLDERS = {"output_dir": "empty: runs/… beside the catalog", "learning_rate": "empty: the mode's default",
                      "validation_prompt": "empty: the dataset's first captions"}
_OPTION = re.compile(r"--([a-z][a-z0-9-]*)")


def form_message(text: str) -> str:
    """A trainer message in the form's words: an option the form shows is named by its label, any other by the
    KEY that "more settings" takes, and `--resume latest` is the Resume button."""
    def named(match: re.Match) -> str:
        key = match.group(1).replace("-", "_")
        if key == "resume":
            return "Resume"
        return f"'{FIELD_LABELS[key]}'" if key in FIELD_LABELS else key
    text = text.replace("--resume latest", "--resume").replace("the command line", "the form")
    # the offline preset as the form picks it, not as the command line names it (a review read "`model tiny`")
    text = re.sub(r"\(`--model tiny`[^)]*\)", "(the preset tiny)", text)
    # a command to run elsewhere (`workbench concept add NAME --class NOUN`) keeps its options as they are typed
    parts = re.split(r"(`workbench [^`]*`)", text)
    return "".join(part if part.startswith("`workbench ") else _OPTION.sub(named, part) for part in parts)


# Starting values per preset: tiny trains in seconds on a CPU; real presets, and a model of one's own, use the
# trainer's defaults.
OWN_MODEL = ""  # the form's defaults while a model of one's own is typed
PRESET_VALUES = {
    "tiny": {"resolution": "64", "max_train_steps": "20", "train_batch_size": "2", "learning_rate": "0.001",
             "checkpointing_steps": "10", "validation_steps": "10", "device": "cpu"},
}


def preset_names() -> list[str]:
    try:
        from workbench.models import PRESETS

        return list(PRESETS)
    except Exception:
        return ["tiny"]


def default_values(preset: str) -> dict[str, str]:
    try:
        from pipelines.train import TrainConfig

        base = TrainConfig()
    except Exception:
        base = None
    values = {}
    for name, _, _ in FIELDS:
        value = getattr(base, name, None) if base is not None else None
        if isinstance(value, list):
            value = "; ".join(value)
        values[name] = "" if value is None else str(value)
    values.update(PRESET_VALUES.get(preset, {}))
    return values


def parse_more(text: str) -> dict[str, Any]:
    """`key=value; key=value` (TOML values) for any other TrainConfig option."""
    import tomllib

    values: dict[str, Any] = {}
    for pair in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"More settings: write KEY=VALUE, not {pair!r}.")
        try:
            values[key.strip()] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            values[key.strip()] = raw.strip()
    return values


def read_losses(output_dir: Path) -> list[tuple[int, float]]:
    try:
        with (output_dir / "loss.csv").open(newline="") as handle:
            return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(handle)]
    except (OSError, ValueError, KeyError):
        return []


def latest_sample(output_dir: Path) -> Path | None:
    grids = sorted((output_dir / "samples").glob("*.png"), key=lambda p: p.stat().st_mtime)
    return grids[-1] if grids else None


class TrainScreen(SizeClasses, Screen):
    """One Train button; training runs in this process, stoppable and resumable from its last checkpoint."""

    CSS_PATH = "train_screen.tcss"
    BINDINGS = [
        # Priority: a focused Input would take ctrl+x as cut.
        Binding("ctrl+t", "train", "Train", priority=True),
        Binding("ctrl+x", "stop", "Stop", priority=True),
        Binding("ctrl+o", "resume", "Resume", priority=True),
        # reaches the screen only from the runs table: inputs, selects and buttons take Enter themselves
        Binding("enter", "show_run", "Show the run", show=False),
    ]

    @dataclass
    class _Defaults(Message):
        presets: list[str] | None  # None: keep the choices shown
        preset: str
        values: dict[str, str]
        initial: bool

    @dataclass
    class _Polled(Message):
        losses: list
        sample: str | None
        picture: Any

    @dataclass
    class _Runs(Message):
        rows: list[list]
        folders: list[str]

    def __init__(self) -> None:
        super().__init__()
        self._progress = None
        self.running = False
        self.output_dir: Path | None = None
        self.step_started: tuple[float, int] | None = None
        self.shown_sample: str | None = None
        self.ready = False  # the form has its defaults (loaded in a worker)
        self._presets: list[str] = ["tiny"]  # the preset names, once loaded (they import torch: in a worker)
        self._defaults_for: str | None = None  # the preset (or OWN_MODEL) whose starting values the form shows
        self.run_rows: list[list] = []  # the runs table's rows (queries.RUN_COLUMNS), and each run's output folder
        self.run_folders: list[str] = []

    def compose(self) -> ComposeResult:
        yield ScreenBar("train")
        with Horizontal():
            with VerticalScroll(id="train-form"):
                yield Label("method")
                yield Select(MODES, value="lora", allow_blank=False, id="mode")
                yield Label("preset (base model)")
                yield Select([("tiny", "tiny")], value="tiny", allow_blank=False, id="preset")  # the rest load in on_mount
                yield Label("or a model of your own")
                yield Input(id="field-model", compact=True, placeholder="a folder, a .safetensors or a Hub id")
                for name, label, _ in FIELDS:
                    yield Label(label)
                    yield Input(id=f"field-{name}", compact=True, placeholder=FIELD_PLACEHOLDERS.get(name, ""))
                yield Label("more settings (KEY=VALUE; ...)")
                yield Input(placeholder="snr_gamma=5; random_flip=true", id="field-more", compact=True)
            with Vertical(id="train-live"):
                with Horizontal(id="train-actions"):
                    yield Button("Train", id="train", variant="success", disabled=True)
                    yield Button("Stop", id="stop", variant="error", disabled=True)
                    yield Button("Resume", id="resume", disabled=True)
                yield Label("", id="train-error")
                yield ProgressBar(total=1, id="train-bar", show_eta=False)
                yield Label("not started", id="train-state")
                yield Log(id="train-log", max_lines=500)  # every message of the run, kept: the state line shows the last
                yield Label("runs (Enter or a double click shows one's loss and samples)", id="runs-label")
                yield PageTable(id="runs-table")
                yield PlotextPlot(id="loss-plot")
                yield Label("latest sample grid", id="sample-label")
                yield ImagePreview(id="sample-preview")
        yield Footer()

    def on_mount(self) -> None:
        self._draw_losses([])
        self.query_one("#train-state", Label).update("loading the training settings…")
        self._load_defaults("tiny", initial=True)
        self._load_runs()

    # --- past runs ------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="train-runs")
    def _load_runs(self) -> None:
        rows, folders = queries.training_runs(self.app.con)
        self.post_message(self._Runs(rows, folders))

    @on(_Runs)
    def _runs(self, message: _Runs) -> None:
        self.run_rows, self.run_folders = message.rows, message.folders
        self.query_one("#runs-table", PageTable).set_rows(
            queries.RUN_COLUMNS, [[cell(name, value) for name, value in zip(queries.RUN_COLUMNS, row)] for row in message.rows],
            right_aligned=[False, False, False, True, True, True, True, False])

    @on(PageTable.RowSelected, "#runs-table")
    def _run_picked(self, event: PageTable.RowSelected) -> None:
        self._show_run(event.row)

    def action_show_run(self) -> None:
        table = self.query_one("#runs-table", PageTable)
        if table.has_focus and table.row_count:
            self._show_run(table.cursor_row)

    def _show_run(self, index: int) -> None:
        """Draw a past run's loss curve and newest sample grid (the live run's stay while one trains)."""
        if self.running:
            self.notify("A run is training: its loss and samples are shown until it ends.", title="Train")
            return
        folder = self.run_folders[index]
        run, status = self.run_rows[index][0], self.run_rows[index][2]
        if not folder or not Path(folder).is_dir():
            self.notify(f"Run {run}'s folder {folder or '?'} is gone (moved or deleted).", title="Train", severity="warning")
            return
        self.output_dir, self.shown_sample = Path(folder), None
        # a later run in the same folder (a --resume of a stopped or finished run) wrote over its loss and samples
        later = [row[0] for row, other in zip(self.run_rows, self.run_folders) if other == folder and row[0] > run]
        continued = (f" (run {min(later)} went on in its folder: the folder's loss and samples are the later run's)"
                     if later else " (continued by a later run: the folder's loss and samples are that run's)"
                     if status == "continued" else "")
        self.query_one("#train-state", Label).update(f"showing run {run}{continued}: {markup_safe(folder)}")
        self._poll()

    @on(Select.Changed, "#preset")
    def _preset_changed(self, event: Select.Changed) -> None:
        # the Select posts a Changed when it mounts: the first fill covers that preset, and reloading it
        # would overwrite what was typed while it loaded
        if self.ready:
            self._load_defaults(str(event.value))
            self._defaults_for = str(event.value)

    @on(Input.Changed, "#field-model")
    def _own_model_changed(self, event: Input.Changed) -> None:
        # a model of one's own starts from the trainer's defaults, as a real preset does, not from tiny's CPU-sized
        # values (a review: an SD 1.5 folder typed there trained at 64 px on the CPU); cleared, the preset's come back
        typed = event.value.strip()
        # a preset's name typed there is that preset, with its values
        kind = typed if typed in self._presets else (OWN_MODEL if typed else str(self.query_one("#preset", Select).value))
        if self.ready and kind != self._defaults_for:
            self._load_defaults(kind)
        self._defaults_for = kind

    @work(thread=True, exclusive=True, group="train-defaults")
    def _load_defaults(self, preset: str, initial: bool = False) -> None:
        # The presets and defaults import torch (seconds the first time): never on the UI thread.
        presets = preset_names() if initial else None
        if presets is not None and preset not in presets:
            preset = presets[0]
        self.post_message(self._Defaults(presets, preset, default_values(preset), initial))

    @on(_Defaults)
    def _defaults(self, message: _Defaults) -> None:
        if message.presets is not None:
            self._presets = list(message.presets)
            select = self.query_one("#preset", Select)
            with select.prevent(Select.Changed):
                select.set_options([(p, p) for p in message.presets])
                select.value = message.preset
        shown = getattr(self, "_shown_defaults", {})
        for name, value in message.values.items():
            field = self.query_one(f"#field-{name}", Input)
            # what was typed stays: while the first fill loaded, or before another preset was picked (a field still
            # holding the last preset's value takes the new one's)
            if (not field.value) if message.initial else field.value == shown.get(name, field.value):
                field.value = value
        self._shown_defaults = dict(message.values)
        if message.initial:
            self.query_one("#train-state", Label).update("not started")
        self.ready = True
        self._set_buttons()

    # --- settings -------------------------------------------------------------------

    def config(self, *, resume: bool = False):
        """A validated TrainConfig from the form; raises ValueError (ConfigError is one) with a message for people."""
        from pipelines.train import load_train_config

        preset = self.query_one("#preset", Select).value
        values: dict[str, Any] = {"mode": self.query_one("#mode", Select).value}
        # Resume goes on with the run's saved options: the form's own defaults are not given (they would clash with
        # a run made with other values, from the command line or before a restart), only what was typed
        defaults = default_values(str(preset)) if resume else {}
        own_model = self.query_one("#field-model", Input).value.strip()
        if not resume:
            values["model"] = own_model or preset
        elif own_model:  # a resume trains the run's own model: one typed here is checked against it
            values["model"] = own_model
        for name, label, kind in FIELDS:
            text = self.query_one(f"#field-{name}", Input).value.strip()
            if not text or (resume and text == defaults.get(name, "").strip()):
                continue
            try:
                values[name] = [p.strip() for p in text.split(";") if p.strip()] if kind is list else kind(text)
            except ValueError:
                raise ValueError(f"{label} must be {'a whole number' if kind is int else 'a number'}, not {text!r}.") from None
        values.update(parse_more(self.query_one("#field-more", Input).value))
        from pipelines.train.run import catalog_project_dir, default_output_dir

        cur = self.app.con.cursor()  # workers may be using the main connection
        try:
            if "output_dir" in values:  # relative to the catalog's folder, as ingest folders and SQL exports are
                values["output_dir"] = str(catalog_project_dir(cur) / Path(values["output_dir"]).expanduser())
            elif resume:  # an empty folder field: for Resume the latest run's, else a new folder
                row = cur.execute("SELECT output_dir FROM training_runs WHERE mode = ? ORDER BY train_id DESC LIMIT 1",
                                  [values["mode"]]).fetchone()
                if row is None:
                    raise ValueError(f"There is no earlier {values['mode']} run to resume: type its output folder.")
                values["output_dir"] = row[0]
            else:
                values["output_dir"] = str(default_output_dir(cur, values["mode"]))
            if own_model and values.get("model") == own_model:
                # a local model typed relative to the catalog's folder too, as the output folder is (a Hub id stays)
                local = catalog_project_dir(cur) / Path(own_model).expanduser()
                if own_model.startswith((".", "~", "/")) or local.exists():
                    values["model"] = str(local.resolve())
        finally:
            cur.close()
        if resume:
            values["resume"] = "latest"
        return load_train_config(None, values)

    # --- run ------------------------------------------------------------------------

    @on(Button.Pressed, "#train")
    def action_train(self) -> None:
        self._start(resume=False)

    @on(Button.Pressed, "#resume")
    def action_resume(self) -> None:
        self._start(resume=True)

    def _start(self, *, resume: bool) -> None:
        if self.running:
            self.notify("Training is running.", severity="warning")
            return
        if not self.ready:
            self.notify("The training settings are still loading.", severity="warning")
            return
        error_label = self.query_one("#train-error", Label)
        try:
            config = self.config(resume=resume)
        except Exception as error:  # ConfigError, ValueError, a missing trainer module
            error_label.update(f"[red]{markup_safe(form_message(people_message(error)))}[/]")
            self.query_one("#train-state", Label).update("not started")  # not the previous run's outcome under this error
            return
        error_label.update("")
        self.query_one("#train-log", Log).clear()  # this run's messages
        self.output_dir = Path(config.output_dir)
        # the folder field is left as typed: empty, the next Train starts a new folder and Resume continues the latest run
        self.running = True
        self.step_started = None
        self._set_buttons()
        self.query_one("#train-state", Label).update(
            (f"resuming {config.mode} in {config.output_dir}" if resume else f"starting {config.mode} on {config.model}") + "…")
        self._poll_timer = self.set_interval(1.0, self._poll)
        self._train(config)

    def _set_buttons(self) -> None:
        self.query_one("#train", Button).disabled = self.running or not self.ready
        self.query_one("#resume", Button).disabled = self.running or not self.ready
        self.query_one("#stop", Button).disabled = not self.running

    @work(thread=True, exclusive=True, group="train")
    def _train(self, config) -> None:
        from pipelines.filter import unfiltered_note
        from pipelines.train import ConfigError, RunRefused, trained_model
        from pipelines.train.data import DataError

        app = self.app  # held: once quitting has unmounted this screen, self.app no longer resolves here
        progress = cancellable_progress(self.post_message, "train")
        self._progress = progress
        app.running_steps.add(progress)
        app.training_in = config.output_dir
        started = time.perf_counter()
        cur = app.con.cursor()
        try:
            note = unfiltered_note(cur)  # as `workbench train` says it: images the last filter run never judged
            if note:
                progress(task="dataset", message="Note: " + note)
            result = trained_model(cur, config, progress=progress)
            summary = {"steps": result.steps, "final loss": None if result.final_loss is None else round(result.final_loss, 4),
                       "train id": result.train_id, **{k: v for k, v in result.outputs.items() if k in ("lora_diffusers", "lora_kohya", "pipeline", "single_file", "samples")}}
            status, error = "ok", None
            error = result.evaluation_failure()  # the run is fine; only its scores are missing
        except StepCancelled:
            from pipelines.train.checkpoint import checkpoint_step, list_checkpoints

            kept = list_checkpoints(Path(config.output_dir) / "checkpoints") if config.output_dir else []
            where = f"from step {checkpoint_step(kept[-1])} ({kept[-1].name})" if kept else "from step 0 (no checkpoint yet)"
            summary, status, error = None, "cancelled", f"stopped; Resume continues {where}"
        except (RunRefused, ConfigError, DataError) as exc:  # nothing trained: the settings or the folder say no
            summary, status, error = None, "refused", people_message(exc)
        except Exception as exc:
            summary, status, error = None, "failed", people_message(exc)
        finally:
            cur.close()
            self._progress = None
            app.running_steps.discard(progress)
            app.training_in = None
        self.post_message(StepFinished(step="train", status=status, summary=summary, error=error, seconds=time.perf_counter() - started))

    @on(Button.Pressed, "#stop")
    def action_stop(self) -> None:
        if self._progress is not None:
            self._progress.cancel()
            self.query_one("#train-state", Label).update("stopping after this step…")

    @on(StepProgress)
    def _on_progress(self, message: StepProgress) -> None:
        if message.message:
            self.query_one("#train-state", Label).update(markup_safe(f"{message.task}: {message.message}"))
            self.query_one("#train-log", Log).write_line(visible(f"{message.task}: {message.message}"))
        if message.task != "train" or not message.total:
            return
        self.query_one("#train-bar", ProgressBar).update(total=message.total, progress=message.completed)
        now = time.monotonic()
        if self.step_started is None:
            self.step_started = (now, message.completed)
            eta = "…"
        else:
            t0, s0 = self.step_started
            done = message.completed - s0
            eta = f"{(message.total - message.completed) * (now - t0) / done:.0f} s" if done > 0 else "…"
        self.query_one("#train-state", Label).update(f"step {message.completed:,}/{message.total:,} · ETA {eta}")

    @on(StepFinished)
    def _on_finished(self, message: StepFinished) -> None:
        self.running = False
        self._set_buttons()
        if hasattr(self, "_poll_timer"):
            self._poll_timer.stop()
        self._poll()
        if message.status == "ok":
            text = ", ".join(f"{k} {v}" for k, v in (message.summary or {}).items())
            self.query_one("#train-state", Label).update(
                f"[green]finished[/] in {message.seconds:.0f} s: {markup_safe(text)} · outputs in {markup_safe(str(self.output_dir))}")
            self.notify("Training finished.", title="Train")
            if message.error:  # finished, with a note (its evaluation failed)
                self.query_one("#train-log", Log).write_line("Note: " + message.error)
                self.notify(message.error, title="Train: no scores", severity="warning", timeout=10)
        else:
            self.query_one("#train-state", Label).update(f"[yellow]{message.status}[/]: {markup_safe(form_message(message.error or ''))}")
            self.notify(form_message(message.error or message.status), title=f"Train {message.status}",
                        severity="error" if message.status == "failed" else "warning", timeout=10)
        self._load_runs()
        self.post_message(CatalogChanged("train"))

    # --- live loss and samples ----------------------------------------------------------

    def _poll(self) -> None:
        if self.output_dir is not None:
            self._read_outputs(self.output_dir, self.shown_sample)

    @work(thread=True, exclusive=True, group="train-poll")
    def _read_outputs(self, output_dir: Path, shown: str | None) -> None:
        losses = read_losses(output_dir)
        sample = latest_sample(output_dir)
        sample_text = str(sample) if sample else None
        picture = load_preview(sample_text, max_side=512) if sample_text and sample_text != shown else None
        self.post_message(self._Polled(losses, sample_text, picture))

    @on(_Polled)
    def _polled(self, message: _Polled) -> None:
        self._draw_losses(message.losses)
        if message.picture is not None:
            self.shown_sample = message.sample
            self.query_one("#sample-label", Label).update(f"latest sample grid: {Path(message.sample).name}")
            self.query_one("#sample-preview", ImagePreview).show(message.picture)

    def _draw_losses(self, losses: list[tuple[int, float]]) -> None:
        plot = self.query_one("#loss-plot", PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.title("training loss")
        plt.xlabel("step")
        if losses:
            plt.plot([s for s, _ in losses], [v for _, v in losses], marker="braille")
        plot.refresh()
