"""The Export tab: run the export engine on a run's checkpoint and read the parity report it writes.

Two pages, r switches: the form (run, checkpoint, quantisation types, folder) with a pre-flight verdict and
per-stage progress; and the report of one export (this one when it finishes, or any earlier one found under
<workspace>/exports/): per-file agreement with the adapter, tokens/s, size and runaway answers, then every
question with the reference, the adapter's answer and each GGUF's. c opens the Chat tab on a GGUF file.

`python -m engine.export` runs detached, as `tunedeck export` starts it: quitting the TUI or losing SSH leaves it
running, and the tab follows it through <export dir>/events.jsonl, again when tunedeck is reopened.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import events, on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import (
    Button,
    Checkbox,
    ContentSwitcher,
    DataTable,
    Input,
    Label,
    ProgressBar,
    Select,
    Static,
)
from textual.worker import get_current_worker

from engine.display import compact_duration
from engine.errors import EngineError, ExportError
from engine.events import Event, EventTail, Log, Progress, RunFailed, RunFinished, RunStarted
from engine.workspace import checkpoint_dirs, checkpoint_step, latest_checkpoint, pid_alive
from tui.engine_client import ChatSource
from tui.export_report import (
    DEFAULT_QUANTS,
    EVENTS_FILE,
    LLAMA_TYPES,
    PID_FILE,
    REPORT_JSON,
    AnswerRow,
    ExportRecord,
    FileRow,
    answer_rows,
    file_rows,
    list_exports,
    load_report,
    megabytes,
    parse_quants,
    percent,
    quant_problem,
    splits,
    summary_line,
)
from tui.messages import RunsChanged
from tui.screens.base import TabView

QUANTS = DEFAULT_QUANTS
NEWEST = "newest"
FORM_PAGE = "export-form-page"
REPORT_PAGE = "export-report-page"
PREFLIGHT_STAGE = "preflight"
STDERR_FILE = "stderr.log"
FOLLOW_INTERVAL_S = 0.2
# The log line engine/export.py writes once its pre-flight passed.
PREFLIGHT_SUMMARY = re.compile(
    r"exporting (?P<run>\S+) step (?P<step>\d+) \((?P<model>.*)\) to (?P<folder>.+)"
)
# Width of the answer columns' fixed parts: row number, and each GGUF's `100% ✗R` cell.
NUMBER_WIDTH = 3
GGUF_CELL_WIDTH = 7


def stage_id(stage: str) -> str:
    """A widget id for a stage name."""
    return "stage-" + "".join(ch if ch.isalnum() else "-" for ch in stage)


def one_line(text: str, width: int) -> Text:
    """`text` on one line (newlines shown as ⏎), cut with an ellipsis at `width`."""
    flat = " ⏎ ".join(part.strip() for part in text.strip().splitlines() if part.strip())
    return Text(flat if len(flat) <= width else flat[: max(1, width - 1)] + "…", no_wrap=True)


def cell_text(agrees: bool, similarity: float, runaway: bool) -> Text:
    """A GGUF's answer in the answers table: its similarity to the adapter's, ✓/✗, and R when it ran away."""
    text = Text(f"{similarity * 100:3.0f}%", style="" if agrees else "bold red")
    text.append(" ✓" if agrees else " ✗", style="green" if agrees else "bold red")
    if runaway:
        text.append("R", style="bold magenta")
    return text


def answers_text(row: AnswerRow, *, width: int | None = None) -> Text:
    """One question with every answer: one line each at `width`, or in full when width is None."""
    text = Text()

    def line(label: str, body: str, style: str = "", note: str = "") -> None:
        text.append(f"{label:<10}", style="bold " + style)
        if note:
            text.append(note + " ", style=style or "dim")
        if width is None:
            text.append(body.strip() + "\n\n")
        else:
            room = max(8, width - 11 - len(note))
            flat = " ⏎ ".join(part.strip() for part in body.strip().splitlines() if part.strip())
            text.append((flat if len(flat) <= room else flat[: room - 1] + "…") + "\n")

    line("question", row.question, note=f"({row.split})")
    line("reference", row.reference, "dim")
    line("adapter", row.adapter, "cyan", "runaway" if row.adapter_runaway else "")
    for cell in row.cells:
        note = f"{cell.similarity * 100:.0f}% {'✓' if cell.agrees else '✗'}" + (
            " runaway" if cell.runaway else ""
        )
        line(cell.kind, cell.text, "" if cell.agrees else "red", note)
    text.rstrip()
    return text


class StageRow(Horizontal):
    """One export stage: its name, a bar and what it is doing, with the stage's ETA."""

    def __init__(self, stage: str) -> None:
        super().__init__(id=stage_id(stage), classes="stage-row")
        self.stage = stage
        self.started: float | None = None
        # What arrived before the row's children were composed, applied once they are (on a busy machine a
        # second event of the stage can come first).
        self.latest: Progress | None = None
        self.completed = False

    def compose(self) -> ComposeResult:
        yield Label(self.stage, classes="stage-name")
        yield ProgressBar(total=None, show_eta=False, show_percentage=False, classes="stage-bar")
        yield Static(classes="stage-message")

    def on_mount(self) -> None:
        if self.latest is not None:
            self.show(self.latest)
        if self.completed:
            self.complete()

    def show(self, event: Progress) -> None:
        """Update from a progress event."""
        self.latest = event
        bars = self.query(ProgressBar)
        if not bars:
            return
        bar = bars.first()
        if event.total:
            bar.update(total=event.total, progress=event.current)
        # The events' own times, so a stage replayed from events.jsonl shows how long it really took.
        self.started = event.time if self.started is None else self.started
        done = event.total and event.current >= event.total
        timing = (
            f" · {compact_duration(event.time - self.started)}"
            if done
            else (f" · eta {compact_duration(event.eta_s)}" if event.eta_s else "")
        )
        self.query_one(".stage-message", Static).update(
            Text(f"{event.message}{timing}", style="dim", no_wrap=True, overflow="ellipsis")
        )

    def complete(self) -> None:
        """Mark the stage done."""
        self.completed = True
        bars = self.query(ProgressBar)
        if not bars:
            return
        bar = bars.first()
        bar.update(total=bar.total or 1, progress=bar.total or 1)


class ExportView(TabView):
    """The export form with pre-flight and progress, and the parity report of any export."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("x", "start_export", "Export"),
        Binding("r", "toggle_report", "Reports"),
        Binding("c", "chat_gguf", "Chat with GGUF"),
        Binding("escape", "cancel_export", "Stop export", show=False),
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
        self.current_stage = ""
        self.checked = False
        self.cancelling = False
        self.export_pid = 0
        self._process: subprocess.Popen[bytes] | None = None
        self.export_dir: Path | None = None
        self.exports: list[ExportRecord] = []
        self.report: dict | None = None
        self.report_dir: Path | None = None
        self.answers: list[AnswerRow] = []
        self.files: list[FileRow] = []
        self.preflight_problem = ""
        self._written_elsewhere: list[Path] = []

    def compose(self) -> ComposeResult:
        with ContentSwitcher(initial=FORM_PAGE, id="export-pages"):
            with Vertical(id=FORM_PAGE):
                with Vertical(id="export-form"):
                    with Horizontal(classes="form-row"):
                        yield Label("run", classes="form-label")
                        yield Select([], prompt="(no runs yet)", compact=True, id="export-run")
                    with Horizontal(classes="form-row"):
                        yield Label("checkpoint", classes="form-label")
                        yield Select(
                            [("newest checkpoint", NEWEST)],
                            allow_blank=False,
                            compact=True,
                            id="export-checkpoint",
                        )
                    with Horizontal(classes="form-row", id="export-quants"):
                        yield Label("quantise", classes="form-label")
                        for quant in QUANTS:
                            yield Checkbox(quant, value=True, compact=True, id=f"quant-{quant}")
                        yield Input(placeholder="more: q4_k_m q6_k", compact=True, id="export-more-quants")
                    with Horizontal(classes="form-row"):
                        yield Label("folder", classes="form-label")
                        yield Input(compact=True, id="export-out")
                        yield Checkbox("overwrite", value=False, compact=True, id="export-force")
                    with Horizontal(classes="form-row"):
                        yield Label("", classes="form-label")
                        yield Button("Export (x)", variant="primary", compact=True, id="export-start")
                        yield Button("Reports (r)", compact=True, id="export-reports")
                yield Static(id="export-preflight")
                yield Static(
                    "[dim]Merges the adapter into the base model, converts it to GGUF, quantises it and checks "
                    "each file's answers against the adapter's.[/]",
                    id="export-status",
                )
                yield VerticalScroll(id="export-stages")
            with Vertical(id=REPORT_PAGE):
                with Horizontal(id="report-bar"):
                    yield Label("export", classes="form-label")
                    yield Select([], prompt="(no exports yet)", compact=True, id="report-pick")
                yield Static(id="report-summary")
                yield DataTable(cursor_type="row", id="parity-files")
                yield DataTable(cursor_type="row", id="parity-answers")
                yield Static(id="parity-detail")

    def on_mount(self) -> None:
        self._refresh_runs()
        self._refresh_exports()
        self._follow_running_export()

    def focus_default(self) -> None:
        if self.query_one(ContentSwitcher).current == REPORT_PAGE:
            self.query_one("#parity-answers" if self.answers else "#report-pick").focus()
        else:
            self.query_one("#export-run", Select).focus()

    # The form

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

    def _run_dir(self) -> Path | None:
        run = self.query_one("#export-run", Select).value
        return None if run is Select.NULL else self.workspace.runs_dir / str(run)

    def _refresh_checkpoints(self) -> None:
        run_dir = self._run_dir()
        found = checkpoint_dirs(run_dir) if run_dir is not None else []
        # The newest choice's value names its step, so the shown label follows when the run changes.
        newest = (f"newest checkpoint ({found[-1].name})", f"{NEWEST}:{found[-1].name}") if found else None
        options = [newest or ("newest checkpoint", NEWEST)]
        options += [(path.name, str(checkpoint_step(path))) for path in reversed(found)]
        self.query_one("#export-checkpoint", Select).set_options(options)
        if not self.running:
            self._update_preflight()

    def _chosen_step(self) -> int | None:
        """The checkpoint step the export will read (the newest when `newest` is chosen), if any."""
        run_dir = self._run_dir()
        if run_dir is None:
            return None
        value = self.query_one("#export-checkpoint", Select).value
        if value is Select.NULL or str(value).startswith(NEWEST):
            newest = latest_checkpoint(run_dir)
            return checkpoint_step(newest) if newest is not None else None
        return int(str(value))

    def _chosen_quants(self) -> tuple[list[str], str]:
        """The ticked and typed quantisation types, and what is wrong with them (empty when nothing)."""
        quants = [quant for quant in QUANTS if self.query_one(f"#quant-{quant}", Checkbox).value]
        typed = parse_quants(self.query_one("#export-more-quants", Input).value)
        problems = [problem for name in typed if (problem := quant_problem(name))]
        quants += [name for name in typed if name not in quants]
        if not quants:
            problems.insert(0, "tick or type at least one quantisation type")
        return quants, "; ".join(problems)

    def _out_dir(self) -> Path | None:
        """The export folder: the typed one (relative to the workspace), else exports/<run>-step<N>/."""
        typed = self.query_one("#export-out", Input).value.strip()
        if typed:
            path = Path(typed).expanduser()
            return path if path.is_absolute() else self.workspace.root / path
        run_dir, step = self._run_dir(), self._chosen_step()
        if run_dir is None or step is None:
            return None
        return self.workspace.exports_dir / f"{run_dir.name}-step{step}"

    def _shown_path(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.workspace.root)) + "/"
        except ValueError:
            return str(path) + "/"

    def _update_preflight(self) -> None:
        """The checks the form can make before anything starts; the engine's pre-flight does the rest."""
        widget = self.query_one("#export-preflight", Static)
        run_dir, step = self._run_dir(), self._chosen_step()
        out_input = self.query_one("#export-out", Input)
        if run_dir is not None and step is not None:
            out_input.placeholder = self._shown_path(
                self.workspace.exports_dir / f"{run_dir.name}-step{step}"
            )
        quants, quant_problems = self._chosen_quants()
        out_dir = self._out_dir()
        problem, hint = "", ""
        if run_dir is None:
            problem = "no run to export yet: train one in the Train tab (2, then n)"
        elif step is None:
            problem = f"{run_dir.name} has no checkpoint yet: wait for its first save"
        elif quant_problems:
            problem = quant_problems
        elif out_dir is not None and (out_dir / REPORT_JSON).is_file():
            if not self.query_one("#export-force", Checkbox).value:
                problem = (
                    f"{self._shown_path(out_dir)} already holds a finished export: r shows its report; tick "
                    "overwrite to replace it, or type another folder"
                )
            else:
                hint = "overwrites the finished export there"
        if not problem and out_dir is not None:
            pid = _pid_in(out_dir)
            if pid and pid_alive(pid):
                problem = f"another export (pid {pid}) is writing into {self._shown_path(out_dir)}"
        self.preflight_problem = problem
        text = Text(no_wrap=False)
        text.append("pre-flight ", style="bold")
        if problem:
            text.append("✖ ", style="bold red")
            text.append(problem)
        else:
            unknown = [name for name in quants if name not in (*LLAMA_TYPES, *QUANTS)]
            text.append("✔ ", style="bold green")
            text.append(
                f"step {step} → {self._shown_path(out_dir) if out_dir else '?'} · f16 + {', '.join(quants)}"
            )
            if unknown:
                text.append(f" · {', '.join(unknown)}: the engine checks llama.cpp knows it", style="yellow")
            if hint:
                text.append(f" · {hint}", style="yellow")
            text.append(" · model, converter, disk and memory are checked when it starts", style="dim")
        widget.update(text)

    @on(Select.Changed, "#export-run")
    def _run_changed(self) -> None:
        self._refresh_checkpoints()

    @on(Select.Changed, "#export-checkpoint")
    @on(Checkbox.Changed)
    @on(Input.Changed, "#export-more-quants, #export-out")
    def _form_changed(self) -> None:
        if not self.running:
            self._update_preflight()

    @on(Input.Submitted, "#export-more-quants, #export-out")
    def _field_submitted(self) -> None:
        self.screen.focus_next()

    def use_run(self, run_id: str) -> None:
        """Preselect a run (from the Train tab)."""
        self._show_page(FORM_PAGE)
        self._refresh_runs(select=run_id)

    @on(RunsChanged)
    def _run_launched(self, event: RunsChanged) -> None:
        self._refresh_runs()

    # Running an export

    @on(Button.Pressed, "#export-start")
    def action_start_export(self) -> None:
        """Start exporting the chosen run."""
        if self.running:
            self.notify("An export is already running; esc stops it.", severity="warning")
            return
        self._show_page(FORM_PAGE)
        self._update_preflight()
        run_dir = self._run_dir()
        if self.preflight_problem or run_dir is None:
            self.notify(
                self.preflight_problem or "Pick a run first.", title="Cannot export", severity="warning"
            )
            return
        quants, _ = self._chosen_quants()
        checkpoint = self.query_one("#export-checkpoint", Select).value
        step = (
            None if checkpoint is Select.NULL or str(checkpoint).startswith(NEWEST) else int(str(checkpoint))
        )
        out_dir = self._out_dir()
        force = self.query_one("#export-force", Checkbox).value
        if out_dir is None:
            return
        argv = self.engine.export_argv(run_dir, step, quants, out_dir=out_dir, force=force)
        try:
            process = self.engine.spawn_detached(argv, out_dir / STDERR_FILE)
        except EngineError as exc:
            self.app.show_failure(exc)  # type: ignore[attr-defined]
            return
        self._follow(out_dir, process.pid, process)
        self._status(
            f"Exporting {run_dir.name} step {self._chosen_step()} → f16 + {', '.join(quants)} (pid "
            f"{process.pid}) · it goes on if you quit · esc stops it"
        )

    def _follow(self, export_dir: Path, pid: int, process: subprocess.Popen[bytes] | None) -> None:
        """Show the progress of the export writing into `export_dir`: started here, or found running."""
        self.query_one("#export-stages", VerticalScroll).remove_children()
        self.running, self.finished, self.current_stage, self.checked = True, False, "", False
        self.cancelling = False
        self.export_dir, self.export_pid, self._process = export_dir, pid, process
        if not export_dir.resolve().is_relative_to(self.workspace.exports_dir.resolve()):
            # Listed with the others for as long as this TUI runs (only exports/ is searched on a restart).
            self._written_elsewhere.append(export_dir)
        self._follow_worker(export_dir, pid, process)

    @work(thread=True, exclusive=True, group="export", exit_on_error=False)
    def _follow_worker(self, export_dir: Path, pid: int, process: subprocess.Popen[bytes] | None) -> None:
        """Read the export's events file until its final event or its process's end; posts messages only."""
        worker = get_current_worker()
        tail = EventTail(export_dir / EVENTS_FILE)
        # events.jsonl keeps every attempt; this one's events start at the run_started carrying its pid.
        ours = False
        while not worker.is_cancelled:
            alive = process.poll() is None if process is not None else pid_alive(pid)
            for event in tail.poll():
                ours = ours or (isinstance(event, RunStarted) and event.pid == pid)
                if not ours:
                    continue
                self.post_message(self.EngineEvent(event))
                if isinstance(event, (RunFinished, RunFailed)):
                    # The process exits right after its final event; it is reaped then, not waited for here.
                    self.post_message(self.EngineExited(0, "", export_dir / STDERR_FILE))
                    return
            if not alive:
                code = process.returncode if process is not None else -1
                self.post_message(
                    self.EngineExited(code, _exit_cause(export_dir, code), export_dir / STDERR_FILE)
                )
                return
            worker.cancelled_event.wait(FOLLOW_INTERVAL_S)

    def action_cancel_export(self) -> None:
        """Stop the running export (or go back to the form from a report)."""
        if not self.running:
            if self.query_one(ContentSwitcher).current == REPORT_PAGE:
                self._show_page(FORM_PAGE)
            return
        from tui.screens.modals import ConfirmScreen

        def confirmed(yes: bool | None) -> None:
            if yes and self.running:
                self.cancelling = True
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(self.export_pid, signal.SIGTERM)
                self._status("Stopping the export…")

        self.app.push_screen(
            ConfirmScreen(
                "Stop export",
                "Stop the running export? Its unfinished files are removed when it runs again.",
                "Stop",
            ),
            confirmed,
        )

    def _follow_running_export(self) -> None:
        """Pick up an export that is still running (started before this TUI was opened)."""
        running = next((record for record in self.exports if record.status == "running"), None)
        if running is None or self.running:
            return
        self._follow(running.folder, running.pid, None)
        self._status(
            f"Following the export into {self._shown_path(running.folder)} (pid {running.pid}); esc stops it."
        )

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
            if self.current_stage == PREFLIGHT_STAGE and event.stage != PREFLIGHT_STAGE and not self.checked:
                self._preflight_passed("")
            self.current_stage = event.stage
            (await self._stage_row(event.stage)).show(event)
        elif isinstance(event, Log):
            found = PREFLIGHT_SUMMARY.fullmatch(event.message) if event.level == "info" else None
            if found is not None:
                # The engine's pre-flight summary: what it found (architecture, size, method) and the folder.
                self.export_dir = Path(found["folder"])
                self._preflight_passed(
                    f"{found['model']} · step {found['step']} → {self._shown_path(self.export_dir)}"
                )
            elif event.level in ("warning", "error"):
                self._status(f"⚠ {event.message}")
        elif isinstance(event, RunFinished):
            self.finished = True
            for row in self.query(StageRow):
                row.complete()
            outputs = event.outputs or {}
            folder = Path(outputs.get("export_dir") or self.export_dir or self.workspace.exports_dir)
            files = outputs.get("files") or {}
            self._status(
                f"✔ Export {event.status} in {compact_duration(event.elapsed_s)}: {len(files)} GGUF files in "
                f"{self._shown_path(folder)} · Modelfile for Ollama · report.md"
            )
            self.open_report(folder)
        elif isinstance(event, RunFailed):
            self.finished = True
            text = f"✖ {event.title}: {event.cause}" + (f" → {event.next_step}" if event.next_step else "")
            if self.current_stage in ("", PREFLIGHT_STAGE):
                self._show_preflight_failure(event)
            self._status(text)
            self.app.show_failure(ExportError(event.cause, title=event.title, next_step=event.next_step))  # type: ignore[attr-defined]

    @on(EngineExited)
    def _engine_exited(self, event: EngineExited) -> None:
        self.running = False
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            # It exits right after its final event: reap it then, so no zombie is left behind.
            self.set_timer(1.0, process.poll)
        if self.finished:
            return
        if self.cancelling:
            self._status("Export stopped; its unfinished files are removed when it runs again.")
            self._update_preflight()
            return
        self._status(f"✖ {event.cause}")
        self.app.show_failure(ExportError(event.cause, next_step=f"See {event.log_path}."))  # type: ignore[attr-defined]

    def _preflight_passed(self, found: str) -> None:
        self.checked = True
        text = Text()
        text.append("pre-flight ", style="bold")
        text.append("✔ passed", style="bold green")
        if found:
            text.append(f": {found}")
        self.query_one("#export-preflight", Static).update(text)

    def _show_preflight_failure(self, event: RunFailed) -> None:
        text = Text()
        text.append("pre-flight ", style="bold")
        text.append("✖ ", style="bold red")
        text.append(event.cause)
        if event.next_step:
            text.append(f" → {event.next_step}", style="yellow")
        self.query_one("#export-preflight", Static).update(text)

    def _status(self, text: str) -> None:
        self.query_one("#export-status", Static).update(Text(text))

    # Reports

    @on(Button.Pressed, "#export-reports")
    def action_toggle_report(self) -> None:
        """Show the parity reports of this and earlier exports (or the form again)."""
        if self.query_one(ContentSwitcher).current == REPORT_PAGE:
            self._show_page(FORM_PAGE)
            return
        self._refresh_exports()
        if self.report_dir is None and self.exports:
            finished = [record for record in self.exports if record.status == "finished"]
            self.open_report((finished or self.exports)[0].folder)
            return
        if not self.exports:
            self.query_one("#report-summary", Static).update(
                Text("No exports yet: r goes back to the form, x exports the chosen run.", style="dim")
            )
        self._show_page(REPORT_PAGE)

    def _show_page(self, page: str) -> None:
        switcher = self.query_one(ContentSwitcher)
        if switcher.current != page:
            # A focused widget left on the hidden page would keep the keys.
            self.screen.set_focus(None)
            switcher.current = page
            self.focus_default()

    def _refresh_exports(self) -> None:
        self.exports = list_exports(self.workspace, self._written_elsewhere)
        picker = self.query_one("#report-pick", Select)
        with self.prevent(Select.Changed):
            picker.set_options([(record.label(), str(record.folder)) for record in self.exports])
            if self.report_dir is not None and any(r.folder == self.report_dir for r in self.exports):
                picker.value = str(self.report_dir)

    @on(Select.Changed, "#report-pick")
    def _export_picked(self, event: Select.Changed) -> None:
        if event.value is not Select.NULL and Path(str(event.value)) != self.report_dir:
            self.open_report(Path(str(event.value)))

    def open_report(self, folder: Path) -> None:
        """Show the report of the export in `folder` (its state and cause when it did not finish)."""
        folder = Path(folder).resolve()
        self.report_dir = folder
        self._refresh_exports()
        record = next((r for r in self.exports if r.folder == folder), None)
        self.report, self.files, self.answers = None, [], []
        summary = self.query_one("#report-summary", Static)
        if record is not None and record.status != "finished":
            detail = f": {record.cause}" if record.cause else (f" (pid {record.pid})" if record.pid else "")
            summary.update(Text(f"{record.name} is {record.status}{detail}", style="yellow"))
        else:
            try:
                self.report = load_report(folder)
            except ExportError as exc:
                summary.update(Text(f"✖ {exc.message} {exc.next_step}", style="red"))
            else:
                self.files, self.answers = file_rows(self.report), answer_rows(self.report)
                summary.update(Text(summary_line(self.report), no_wrap=True, overflow="ellipsis"))
        self._fill_files_table()
        self._fill_answers_table()
        self._show_page(REPORT_PAGE)
        self.focus_default()

    def _fill_files_table(self) -> None:
        table = self.query_one("#parity-files", DataTable)
        table.clear(columns=True)
        names = splits(self.report or {})
        table.add_column("file", key="kind", width=8)
        for split in names:
            table.add_column(f"agree {split}" if len(names) > 1 else "agrees", key=f"split-{split}")
        if len(names) > 1:
            table.add_column("all", key="all")
        for label, key in (("vs ref", "ref"), ("runaway", "runaway"), ("tok/s", "speed"), ("size", "size")):
            table.add_column(label, key=key)
        for row in self.files:
            cells: list[Text | str] = [Text(row.kind, style="bold cyan" if row.kind == "adapter" else "bold")]
            cells += [Text(percent(row.agreement_by_split.get(split)), justify="right") for split in names]
            if len(names) > 1:
                cells.append(Text(percent(row.agreement), justify="right"))
            runaway = "–" if row.runaway is None else str(row.runaway)
            cells += [
                Text(percent(row.reference_similarity), justify="right"),
                Text(runaway, style="bold magenta" if row.runaway else "", justify="right"),
                Text("–" if row.tokens_per_s is None else f"{row.tokens_per_s:.1f}", justify="right"),
                Text(megabytes(row.size_bytes), justify="right"),
            ]
            table.add_row(*cells, key=row.kind)
        table.display = bool(self.files)
        table.styles.height = len(self.files) + 1
        default = next((i for i, row in enumerate(self.files) if row.kind == "q4_0"), None)
        if default is not None:
            table.move_cursor(row=default, animate=False)

    def _fill_answers_table(self) -> None:
        table = self.query_one("#parity-answers", DataTable)
        table.clear(columns=True)
        kinds = [cell.kind for cell in self.answers[0].cells] if self.answers else []
        width = max(40, (table.size.width or self.size.width or 80) - 2)
        flexible = max(24, width - NUMBER_WIDTH - len(kinds) * GGUF_CELL_WIDTH - 2 * (4 + len(kinds)))
        question_width = flexible * 2 // 5
        answer_width = (flexible - question_width) // 2
        table.add_column("#", key="index", width=NUMBER_WIDTH)
        table.add_column("question", key="question", width=question_width)
        table.add_column("reference", key="reference", width=answer_width)
        table.add_column("adapter", key="adapter", width=answer_width)
        for kind in kinds:
            table.add_column(kind, key=kind, width=GGUF_CELL_WIDTH)
        for row in self.answers:
            cells: list[Text | str] = [
                Text(str(row.index), style="dim"),
                one_line(row.question, question_width),
                one_line(row.reference, answer_width),
                one_line(row.adapter, answer_width),
            ]
            cells += [cell_text(cell.agrees, cell.similarity, cell.runaway) for cell in row.cells]
            table.add_row(*cells, key=str(row.index))
        table.display = bool(self.answers)
        self._show_detail(0 if self.answers else None)

    @on(DataTable.RowHighlighted, "#parity-answers")
    def _answer_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_detail(event.cursor_row)

    def _show_detail(self, index: int | None) -> None:
        detail = self.query_one("#parity-detail", Static)
        if index is None or index >= len(self.answers):
            parity = (self.report or {}).get("parity") or {}
            note = parity.get("note") or ("" if self.report is None or parity else "skipped (--no-parity)")
            detail.update(Text(f"Parity check: {note}.", style="dim") if note else "")
            return
        width = max(30, (detail.size.width or self.size.width or 80) - 2)
        text = answers_text(self.answers[index], width=width)
        gguf = self.chosen_gguf()
        chat = f" · c chats with the {gguf.kind} file" if gguf is not None else ""
        text.append(f"\n⏎ shows this question in full{chat}", style="dim")
        detail.update(text)

    @on(DataTable.RowHighlighted, "#parity-files")
    @on(events.DescendantFocus)
    def _gguf_choice_changed(self) -> None:
        if self.answers:
            self._show_detail(self.query_one("#parity-answers", DataTable).cursor_row)

    @on(DataTable.RowSelected, "#parity-files")
    async def _file_selected(self, event: DataTable.RowSelected) -> None:
        row = self.files[event.cursor_row]
        if row.kind != "adapter":
            await self.action_chat_gguf()
            return
        # The adapter row: chat with the exported checkpoint itself, the model the GGUF files are checked against.
        checkpoint = Path(str((self.report or {}).get("checkpoint", "")))
        if not checkpoint.is_dir():
            self.notify(f"The checkpoint {checkpoint} is gone.", severity="error", title="Cannot chat")
            return
        chat = await self.app.open_tab("chat")  # type: ignore[attr-defined]
        chat.use_source(ChatSource("adapter", str((self.report or {}).get("base", "")), str(checkpoint)))

    @on(DataTable.RowSelected, "#parity-answers")
    def _answer_selected(self, event: DataTable.RowSelected) -> None:
        from tui.screens.modals import TextScreen

        row = self.answers[event.cursor_row]
        self.app.push_screen(TextScreen(f"Question {row.index} of {len(self.answers)}", answers_text(row)))

    def chosen_gguf(self) -> FileRow | None:
        """The GGUF the files table points at (when it has the focus), else q4_0, else the first file."""
        ggufs = [row for row in self.files if row.kind != "adapter" and row.file]
        table = self.query_one("#parity-files", DataTable)
        if (
            table.has_focus
            and 0 <= table.cursor_row < len(self.files)
            and self.files[table.cursor_row] in ggufs
        ):
            return self.files[table.cursor_row]
        return next((row for row in ggufs if row.kind == "q4_0"), ggufs[0] if ggufs else None)

    async def action_chat_gguf(self) -> None:
        """Open the Chat tab on a GGUF of the shown export (llama.cpp), to talk to it as to the adapter."""
        if self.query_one(ContentSwitcher).current != REPORT_PAGE or self.report is None:
            self.notify("Open an export's report first (r).", severity="warning")
            return
        chosen = self.chosen_gguf()
        if chosen is None or self.report_dir is None:
            self.notify("This export wrote no GGUF file.", severity="warning")
            return
        path = self.report_dir / chosen.file
        if not path.is_file():
            self.notify(f"The GGUF file {path} is gone.", severity="error", title="Cannot chat")
            return
        chat = await self.app.open_tab("chat")  # type: ignore[attr-defined]
        chat.use_gguf(path)

    def on_resize(self) -> None:
        if self.answers:
            row = self.query_one("#parity-answers", DataTable).cursor_row
            self._fill_answers_table()
            self.query_one("#parity-answers", DataTable).move_cursor(row=row, animate=False)


def _exit_cause(export_dir: Path, code: int) -> str:
    """Why an export process ended without a final event: its exit code and the last line it logged."""
    try:
        lines = (export_dir / STDERR_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    last = next((line.strip() for line in reversed(lines) if line.strip()), "")
    detail = f": {last[-200:]}" if last else ""
    how = f"with code {code}" if code >= 0 else "without reporting an outcome"
    return f"The export process ended {how}{detail}."


def _pid_in(folder: Path) -> int:
    """The pid an export recorded in its folder while it runs (0 when none)."""
    try:
        return int((folder / PID_FILE).read_text(encoding="ascii").strip() or 0)
    except (OSError, ValueError):
        return 0
