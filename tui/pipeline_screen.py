"""Pipeline: every step with its catalog counts, settings and a Run button; Run all, live progress, log, cancel."""

from __future__ import annotations

import time
from dataclasses import dataclass

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Footer, Input, Label, ProgressBar, RichLog, Static

from tui.messages import CatalogChanged, StepFinished, StepProgress
from tui.safe_text import markup_safe
from tui.screen_bar import ScreenBar
from tui.size_classes import SizeClasses
from tui.steps import STEPS, STEPS_BY_NAME, StepSpec, last_settings, parse_settings, step_counts
from tui.workers import cancellable_progress, people_message
from workbench.progress import StepCancelled


def counts_text(counts: dict) -> str:
    if not counts or all(v in (0, None) for v in counts.values()):
        return "[dim]not run yet[/]"
    return "  ".join(f"{k.replace('_', ' ')} [b]{v if v is not None else '·'}[/]" for k, v in counts.items())


class StepRow(Horizontal):
    """One step: name, counts, settings, Run, progress."""

    def __init__(self, spec: StepSpec) -> None:
        # more than two settings take two lines in a narrow terminal (.-many in pipeline_screen.tcss)
        super().__init__(id=f"step-{spec.name}", classes="step-row" + (" -many" if len(spec.settings) > 2 else ""))
        self.spec = spec

    def compose(self) -> ComposeResult:
        with Vertical(classes="step-head"):
            yield Label(f"[b]{self.spec.label}[/]", classes="step-name")
            yield Static("…", classes="step-counts", id=f"counts-{self.spec.name}")
        with Horizontal(classes="step-settings"):
            for setting in self.spec.settings:
                # what an empty field means is shown in it while it is empty (the label kept it, cut off at 120
                # columns); other help stays beside the label
                says_empty = setting.help.startswith("empty:")
                with Vertical(classes=f"setting setting-{setting.name}"):
                    yield Label(setting.label + (f" [dim]({setting.help})[/]" if setting.help and not says_empty else ""),
                                classes="setting-label")
                    yield Input(
                        setting.default, placeholder=setting.help if says_empty else setting.label, id=f"set-{self.spec.name}-{setting.name}",
                        tooltip=f"{setting.label}: {setting.help}" if setting.help else setting.label, compact=True,
                    )
            if not self.spec.settings:
                yield Label("settings on the Train screen (F7)", classes="step-note")
        with Vertical(classes="step-run"):
            yield Button("Run" if self.spec.name != "train" else "Open", id=f"run-{self.spec.name}", classes="run-step")
            yield ProgressBar(total=1, id=f"bar-{self.spec.name}", show_eta=False)
            yield Label("", id=f"state-{self.spec.name}", classes="step-state")

    def settings(self) -> dict[str, str]:
        return {s.name: self.query_one(f"#set-{self.spec.name}-{s.name}", Input).value for s in self.spec.settings}


class PipelineScreen(SizeClasses, Screen):
    """Run the curation pipeline in this process; the catalog counts update as steps finish."""

    CSS_PATH = "pipeline_screen.tcss"
    BINDINGS = [
        Binding("ctrl+r", "run_all", "Run all", priority=True),
        Binding("escape", "cancel", "Cancel step"),
        Binding("ctrl+l", "clear_log", "Clear log", priority=True),
    ]

    @dataclass
    class _Counts(Message):
        counts: dict

    @dataclass
    class _LastSettings(Message):
        settings: dict
        ingested_before: bool

    def __init__(self) -> None:
        super().__init__()
        self.running: str | None = None
        self._progress = None

    def compose(self) -> ComposeResult:
        yield ScreenBar("pipeline")
        with Horizontal(id="pipeline-actions"):
            yield Button("Run all (ctrl+r)", id="run-all", variant="primary")
            yield Button("Cancel (esc)", id="cancel", variant="error", disabled=True)
            yield Label("", id="pipeline-state")
        with VerticalScroll(id="steps"):
            for spec in STEPS:
                yield StepRow(spec)
        yield RichLog(id="log", wrap=True, markup=True, max_lines=2000)
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_counts()
        self._load_last_settings()

    @work(thread=True, exclusive=True, group="pipeline-settings")
    def _load_last_settings(self) -> None:
        try:
            settings = last_settings(self.app.con)
            cur = self.app.con.cursor()
            try:
                ingested_before = bool(cur.execute("SELECT count(*) FROM runs WHERE step = 'ingest'").fetchone()[0])
            finally:
                cur.close()
        except Exception:  # a busy or older catalog: the defaults stay
            return
        self.post_message(self._LastSettings(settings, ingested_before))

    @on(_LastSettings)
    def _show_last_settings(self, message: _LastSettings) -> None:
        ingest = self.query_one("#set-ingest-folders", Input)
        sample = self.app.catalog_path.resolve().parent / "sample_data"
        if not message.ingested_before and not ingest.value and sample.is_dir():
            # a first run beside the sample set (the demo's layout); once the catalog has folders, empty means those
            ingest.value = "sample_data"
        for step, values in message.settings.items():
            for setting in STEPS_BY_NAME[step].settings:
                box = self.query_one(f"#set-{step}-{setting.name}", Input)
                if setting.name in values and box.value == setting.default:  # never over what was typed meanwhile
                    box.value = values[setting.name]

    def on_screen_resume(self) -> None:
        self.refresh_counts()

    @work(thread=True, exclusive=True, group="pipeline-counts")
    def refresh_counts(self) -> None:
        try:
            counts = step_counts(self.app.con)
        except Exception as error:  # the catalog may be busy; counts refresh next time
            counts = {"error": people_message(error)}
        self.post_message(self._Counts(counts))

    @on(_Counts)
    def _show_counts(self, message: _Counts) -> None:
        for spec in STEPS:
            self.query_one(f"#counts-{spec.name}", Static).update(counts_text(message.counts.get(spec.name, {})))

    # --- running ----------------------------------------------------------------

    @on(Button.Pressed, ".run-step")
    def _run_one(self, event: Button.Pressed) -> None:
        name = event.button.id.removeprefix("run-")
        if name == "train":
            self.app.action_show("train")
            return
        self.start([name])

    @on(Button.Pressed, "#run-all")
    def action_run_all(self) -> None:
        self.start([s.name for s in STEPS if s.in_run_all])

    def start(self, names: list[str]) -> None:
        """Validate the settings of `names`, then run them one after another in a worker."""
        if self.running:
            self.notify(f"{self.running} is running; cancel it or wait.", severity="warning")
            return
        try:
            jobs = [(name, parse_settings(STEPS_BY_NAME[name], self.query_one(f"#step-{name}", StepRow).settings())) for name in names]
        except ValueError as error:
            self.notify(str(error), title="Settings", severity="error")
            return
        if self.app.training_in:  # a review ran filter and buckets mid-run, unsaid: the next run's dataset changed
            self.notify(f"A training run is going on ({self.app.training_in}): it trains on the dataset as it was when "
                        "it started; what these steps change is for the next run.", title="Pipeline", severity="warning",
                        timeout=10)
        # the Run pressed is disabled while its step runs, which takes focus away: it comes back to it at the end
        self._focus_after = self.focused
        self._set_running(names[0])
        self._run_steps(jobs)

    def _set_running(self, name: str | None) -> None:
        self.running = name
        for button in self.query(".run-step"):
            button.disabled = name is not None and button.id != "run-train"
        self.query_one("#run-all", Button).disabled = name is not None
        self.query_one("#cancel", Button).disabled = name is None
        self.query_one("#pipeline-state", Label).update(f"running {name}…" if name else "")

    @work(thread=True, exclusive=True, group="pipeline-run")
    def _run_steps(self, jobs: list[tuple[str, dict]]) -> None:
        app = self.app  # held: once quitting has unmounted this screen, self.app no longer resolves here
        project = app.catalog_path.resolve().parent
        for name, settings in jobs:
            progress = cancellable_progress(self.post_message, name)
            self._progress = progress
            app.running_steps.add(progress)
            self.post_message(StepProgress(step=name, task=name, completed=0, total=None, message="started"))
            started = time.perf_counter()
            cur = app.con.cursor()
            try:
                summary = STEPS_BY_NAME[name].run(cur, settings, progress, project)
                status, error = "ok", None
            except StepCancelled:
                summary, status, error = None, "cancelled", "cancelled by you"
            except Exception as exc:
                summary, status, error = None, "failed", people_message(exc)
            finally:
                cur.close()
                app.running_steps.discard(progress)
            self.post_message(StepFinished(step=name, status=status, summary=summary, error=error, seconds=time.perf_counter() - started))
            if status != "ok":
                break
        self._progress = None
        self.post_message(StepFinished(step="", status="done"))

    def action_cancel(self) -> None:
        if self._progress is not None:
            self._progress.cancel()
            self.query_one("#pipeline-state", Label).update(f"cancelling {self.running}… (stops at the next item)")

    @on(Button.Pressed, "#cancel")
    def _cancel_pressed(self) -> None:
        self.action_cancel()

    def action_clear_log(self) -> None:
        self.query_one("#log", RichLog).clear()

    @on(StepProgress)
    def _progress_message(self, message: StepProgress) -> None:
        if message.step != self.running and message.step in STEPS_BY_NAME:
            self._set_running(message.step)
        bar = self.query_one(f"#bar-{message.step}", ProgressBar)
        if message.total:
            bar.update(total=message.total, progress=message.completed)
        state = f"{message.task} {message.completed:,}" + (f"/{message.total:,}" if message.total else "")
        self.query_one(f"#state-{message.step}", Label).update(state)
        if message.message:
            self.query_one("#log", RichLog).write(f"[dim]{time.strftime('%H:%M:%S')}[/] {message.step}: {markup_safe(message.message)}")

    @on(StepFinished)
    def _finished(self, message: StepFinished) -> None:
        log = self.query_one("#log", RichLog)
        if message.status == "done":
            self._set_running(None)
            self.refresh_counts()
            returning, self._focus_after = getattr(self, "_focus_after", None), None
            if self.focused is None and returning is not None and returning.is_attached:  # not where you moved since
                self.call_after_refresh(returning.focus)
            return
        state = self.query_one(f"#state-{message.step}", Label)
        if message.status == "ok":
            bar = self.query_one(f"#bar-{message.step}", ProgressBar)
            bar.update(total=bar.total or 1, progress=bar.total or 1)
            state.update(f"[green]done[/] in {message.seconds:.1f} s")
            shown = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in (message.summary or {}).items())
            log.write(f"[green]✔[/] {message.step} finished in {message.seconds:.1f} s: {markup_safe(shown)}")
            if self.app.screen is not self:  # its log is out of sight
                self.notify(f"{message.step} finished: {shown}", title="Pipeline")
        else:
            colour = "yellow" if message.status == "cancelled" else "red"
            state.update(f"[{colour}]{message.status}[/]")
            log.write(f"[{colour}]✘ {message.step} {message.status}:[/] {markup_safe(message.error or '')}")
            self.notify(message.error or message.status, title=f"{message.step} {message.status}",
                        severity="warning" if message.status == "cancelled" else "error", timeout=10)
        self.post_message(CatalogChanged(message.step))
        self.refresh_counts()
