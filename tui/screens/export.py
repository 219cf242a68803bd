"""The Export tab: pick run, checkpoint and quantisations; run `python -m engine.export`, watch each stage."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Button, Checkbox, Label, ProgressBar, Select, Static

from engine.errors import EngineError, ExportError
from engine.events import Event, Log, Progress, RunFailed, RunFinished
from engine.workspace import checkpoint_dirs, checkpoint_step
from tui.engine_client import EngineProcess
from tui.messages import RunsChanged
from tui.run_state import format_duration
from tui.screens.base import TabView

QUANTS = ("q4_0", "q5_1", "q8_0")
NEWEST = "newest"


def stage_id(stage: str) -> str:
    """A widget id for a stage name."""
    return "stage-" + "".join(ch if ch.isalnum() else "-" for ch in stage)


def outputs_text(outputs: dict) -> Text:
    """The files an export wrote, one per line (nested lists and dicts flattened; timings left out)."""
    text = Text("Written:\n", style="bold")
    for name, value in outputs.items():
        if name.endswith("_s") or name == "durations_s":
            continue
        items = (
            value.items()
            if isinstance(value, dict)
            else ([(name, item) for item in value] if isinstance(value, list) else [(name, value)])
        )
        for label, path in items:
            text.append(f"  {label}: ", style="dim")
            text.append(f"{path}\n")
    return text


class StageRow(Horizontal):
    """One export stage: its name, a bar and what it is doing."""

    def __init__(self, stage: str) -> None:
        super().__init__(id=stage_id(stage), classes="stage-row")
        self.stage = stage

    def compose(self) -> ComposeResult:
        yield Label(self.stage, classes="stage-name")
        yield ProgressBar(total=None, show_eta=False, classes="stage-bar")
        yield Static(classes="stage-message")

    def show(self, event: Progress) -> None:
        """Update from a progress event."""
        bar = self.query_one(ProgressBar)
        if event.total:
            bar.update(total=event.total, progress=event.current)
        eta = f" eta {format_duration(event.eta_s)}" if event.eta_s else ""
        self.query_one(".stage-message", Static).update(
            Text(f"{event.message}{eta}", style="dim", no_wrap=True, overflow="ellipsis")
        )

    def complete(self) -> None:
        """Mark the stage done."""
        bar = self.query_one(ProgressBar)
        bar.update(total=bar.total or 1, progress=bar.total or 1)


class ExportView(TabView):
    """Choices on top, per-stage progress and the written files below."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("x", "start_export", "Export"),
        Binding("escape", "cancel_export", "Cancel export", show=False),
    ]

    class EngineEvent(Message):
        """An event from the export engine."""

        def __init__(self, event: Event) -> None:
            super().__init__()
            self.event = event

    class EngineExited(Message):
        """The export process ended."""

        def __init__(self, code: int, cause: str, log_path: Path) -> None:
            super().__init__()
            self.code, self.cause, self.log_path = code, cause, log_path

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.running = False
        self.finished = False

    def compose(self) -> ComposeResult:
        with Vertical(id="export-form"):
            with Horizontal(classes="form-row"):
                yield Label("run", classes="form-label")
                yield Select([], prompt="(no runs yet)", compact=True, id="export-run")
            with Horizontal(classes="form-row"):
                yield Label("checkpoint", classes="form-label")
                yield Select(
                    [("newest checkpoint", NEWEST)], allow_blank=False, compact=True, id="export-checkpoint"
                )
            with Horizontal(classes="form-row", id="export-quants"):
                yield Label("quantise", classes="form-label")
                for quant in QUANTS:
                    yield Checkbox(quant, value=quant != "q5_1", compact=True, id=f"quant-{quant}")
                yield Checkbox("overwrite", value=False, compact=True, id="export-force")
            with Horizontal(classes="form-row"):
                yield Button("Export (x)", variant="primary", compact=True, id="export-start")
        yield Static(
            "[dim]Merges the adapter into the base model, converts it to GGUF and quantises it.[/]",
            id="export-status",
        )
        yield VerticalScroll(id="export-stages")
        yield Static(id="export-outputs")

    def on_mount(self) -> None:
        self._refresh_runs()

    def focus_default(self) -> None:
        self.query_one("#export-run", Select).focus()

    def _refresh_runs(self, select: str | None = None) -> None:
        runs = [path.name for path in reversed(self.workspace.list_run_dirs())]
        widget = self.query_one("#export-run", Select)
        current = select or (str(widget.value) if widget.value is not Select.NULL else None)
        widget.set_options([(run_id, run_id) for run_id in runs])
        if current in runs:
            widget.value = current
        elif runs:
            widget.value = runs[0]
        self._refresh_checkpoints()

    def _refresh_checkpoints(self) -> None:
        run = self.query_one("#export-run", Select).value
        options = [("newest checkpoint", NEWEST)]
        if run is not Select.NULL:
            options += [
                (path.name, str(checkpoint_step(path)))
                for path in reversed(checkpoint_dirs(self.workspace.runs_dir / str(run)))
            ]
        self.query_one("#export-checkpoint", Select).set_options(options)

    @on(Select.Changed, "#export-run")
    def _run_changed(self) -> None:
        self._refresh_checkpoints()

    def use_run(self, run_id: str) -> None:
        """Preselect a run (from the Train tab)."""
        self._refresh_runs(select=run_id)

    @on(RunsChanged)
    def _run_launched(self, event: RunsChanged) -> None:
        self._refresh_runs()

    @on(Button.Pressed, "#export-start")
    def action_start_export(self) -> None:
        """Start exporting the chosen run."""
        if self.running:
            self.notify("An export is already running; esc cancels it.", severity="warning")
            return
        run = self.query_one("#export-run", Select).value
        if run is Select.NULL:
            self.notify("Pick a run first (train one in the Train tab).", severity="warning")
            return
        quants = [quant for quant in QUANTS if self.query_one(f"#quant-{quant}", Checkbox).value]
        checkpoint = self.query_one("#export-checkpoint", Select).value
        step = None if checkpoint in (NEWEST, Select.NULL) else int(str(checkpoint))
        self.query_one("#export-stages", VerticalScroll).remove_children()
        self.query_one("#export-outputs", Static).update("")
        self.running, self.finished = True, False
        self._status(
            f"Exporting {run}{'' if step is None else f' at step {step}'} → {', '.join(quants) or 'f16'}…"
        )
        force = self.query_one("#export-force", Checkbox).value
        self._export_worker(self.workspace.runs_dir / str(run), step, quants, force)

    @work(exclusive=True, group="export", exit_on_error=False)
    async def _export_worker(self, run_dir: Path, step: int | None, quants: list[str], force: bool) -> None:
        process = EngineProcess(
            self.engine.export_argv(run_dir, step, quants, force=force),
            env=self.engine.subprocess_env(),
            cwd=self.workspace.root,
            log_path=self.engine.log_path("export"),
        )
        try:
            try:
                await process.start()
            except EngineError as exc:
                self.post_message(
                    self.EngineExited(-1, f"{exc.message} {exc.next_step}".strip(), process.log_path)
                )
                return
            async for event in process.events():
                self.post_message(self.EngineEvent(event))
            code = await process.wait()
            self.post_message(self.EngineExited(code, process.exit_cause(code), process.log_path))
        finally:
            await process.close()

    def action_cancel_export(self) -> None:
        """Stop a running export."""
        if self.running:
            self.workers.cancel_group(self, "export")
            self.running = False
            self._status("Export cancelled.")

    async def _stage_row(self, stage: str) -> StageRow:
        found = self.query(f"#{stage_id(stage)}")
        if found:
            return found.first(StageRow)
        container = self.query_one("#export-stages", VerticalScroll)
        for row in container.query(StageRow):
            row.complete()
        row = StageRow(stage)
        await container.mount(row)
        container.scroll_end(animate=False)
        return row

    @on(EngineEvent)
    async def _engine_event(self, message: EngineEvent) -> None:
        event = message.event
        if isinstance(event, Progress):
            (await self._stage_row(event.stage)).show(event)
        elif isinstance(event, Log) and event.level in ("warning", "error"):
            self._status(event.message)
        elif isinstance(event, RunFinished):
            self.finished = True
            for row in self.query(StageRow):
                row.complete()
            self.query_one("#export-outputs", Static).update(outputs_text(event.outputs or {}))
            self._status(f"Export {event.status} in {format_duration(event.elapsed_s)}.")
        elif isinstance(event, RunFailed):
            self.finished = True
            self._status(
                f"✖ {event.title}: {event.cause}" + (f" → {event.next_step}" if event.next_step else "")
            )
            self.app.show_failure(ExportError(event.cause, title=event.title, next_step=event.next_step))  # type: ignore[attr-defined]

    @on(EngineExited)
    def _engine_exited(self, event: EngineExited) -> None:
        self.running = False
        if not self.finished:
            self._status(f"✖ {event.cause}")
            self.app.show_failure(ExportError(event.cause, next_step=f"See {event.log_path}."))  # type: ignore[attr-defined]

    def _status(self, text: str) -> None:
        self.query_one("#export-status", Static).update(Text(text))
