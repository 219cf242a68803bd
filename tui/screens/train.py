"""The Train tab: every run with its status, and a live view of one that replays its events, then tails them.

A run started before the TUI opened (or by another TUI, or from the CLI) shows its whole history and keeps
updating; a dead process without an end event reads `interrupted` and offers resume, never `running`.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import DataTable, ProgressBar, Static
from textual.worker import get_current_worker

from engine.display import (
    LEARNING_RATE_SPEC,
    LOSS_SPEC,
    TOKENS_PER_S_SPEC,
    compact_duration,
    format_metric,
)
from tui.messages import ActiveRunChanged, RunLaunched, RunsChanged
from tui.run_state import LogLine, RunSnapshot, format_age, short_run_label
from tui.screens.base import TabView
from tui.widgets.log_tail import LogTail
from tui.widgets.plot import EVAL_COLOR, LOSS_COLOR, LossPlot
from tui.widgets.status_line import STATUS_STYLES

# The opened run is polled ~4×/s; the list of all runs every 2 s.
FOLLOW_INTERVAL_S = 0.25
LIST_INTERVAL_S = 2.0
LOG_STYLES = {"warning": "yellow", "error": "bold red"}


def _metric(label: str, value: str, label_style: str = "dim") -> Text:
    text = Text()
    text.append(f"{label} ", style=label_style)
    text.append(value, style="bold")
    text.append("  ")
    return text


def header_text(snap: RunSnapshot) -> Text:
    """Run id and status, then what it trains."""
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(f"{snap.glyph} {snap.run_id} ", style="bold")
    text.append(snap.status, style=STATUS_STYLES.get(snap.status, "dim"))
    parts = [p for p in (snap.method, snap.base_model, snap.dataset, snap.device) if p]
    if parts:
        text.append("\n" + " · ".join(parts), style="dim")
    return text


def metrics_text(snap: RunSnapshot) -> Text:
    """Loss, eval loss, learning rate, tokens/s, GPU memory, elapsed time and checkpoint."""
    text = Text()
    text.append_text(_metric("━ loss", format_metric(snap.loss, LOSS_SPEC, missing="—"), LOSS_COLOR))
    if snap.eval_loss is not None:
        best = (
            f" (best {snap.best_eval_loss:{LOSS_SPEC}})"
            if snap.best_eval_loss not in (None, snap.eval_loss)
            else ""
        )
        text.append_text(_metric("━ eval", f"{snap.eval_loss:{LOSS_SPEC}}{best}", EVAL_COLOR))
    text.append_text(_metric("lr", format_metric(snap.learning_rate, LEARNING_RATE_SPEC, missing="—")))
    text.append_text(_metric("tok/s", format_metric(snap.tokens_per_s, TOKENS_PER_S_SPEC, missing="—")))
    text.append_text(_metric("mem", format_metric(snap.gpu_mem_gib, ".1f", missing="—", unit=" GiB")))
    text.append_text(_metric("time", compact_duration(snap.elapsed_s)))
    if snap.checkpoints:
        text.append_text(_metric("ckpt", f"step {snap.checkpoints[-1][0]}"))
    return text


def progress_label(snap: RunSnapshot) -> Text:
    """`12/48 ep 1.5 eta 2m03s` beside the bar, or the stage being prepared before the first step."""
    if snap.step == 0 and snap.stages and snap.is_active:
        stage = snap.stages[-1]
        total = f" {stage.current:.0f}/{stage.total:.0f}" if stage.total else ""
        return Text(
            f"{stage.stage}{total} {stage.message}".strip(), style="dim", no_wrap=True, overflow="ellipsis"
        )
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(f"{snap.step}/{snap.total_steps or '?'}", style="bold")
    text.append(f" ep {snap.epoch:.2f}", style="dim")
    if snap.is_active:
        text.append(f" eta {compact_duration(snap.eta_s)}", style="dim")
    elif snap.ended and snap.started:
        text.append(f" took {compact_duration(snap.ended - snap.started)}", style="dim")
    return text


def problem_text(snap: RunSnapshot) -> tuple[Text, str] | None:
    """The banner for a run that needs attention (failed, interrupted, stopped) or just ended, with its CSS
    class."""
    newest = f"step {snap.checkpoints[-1][0]}" if snap.checkpoints else "none yet"
    if snap.status == "failed":
        text = Text()
        text.append(f"✖ {snap.failure_title or 'Training failed'}: ", style="bold")
        text.append(snap.cause or "the trainer reported a failure without a cause.")
        if snap.next_step:
            text.append(f"\n→ {snap.next_step}")
        if snap.details_path:
            text.append(f"\n  details: {snap.details_path}", style="dim")
        if snap.can_resume:
            text.append(f"\n  r resumes from the newest checkpoint ({newest}).", style="dim")
        return text, "-failed"
    if snap.status == "interrupted":
        text = Text()
        text.append("⚠ Interrupted: ", style="bold")
        text.append(
            f"the trainer (pid {snap.pid}) is gone without a final event; last seen "
            f"{format_age(snap.last_event_time)} at step {snap.step}."
        )
        text.append(f"\n→ r resumes from the newest checkpoint ({newest}).")
        return text, "-interrupted"
    if snap.status == "stopped":
        return Text(
            f"■ Stopped at step {snap.step} after saving a checkpoint. Press r to resume."
        ), "-stopped"
    if snap.status == "finished":
        final = f" with loss {snap.final_loss:{LOSS_SPEC}}" if snap.final_loss is not None else ""
        return Text(
            f"✔ Finished at step {snap.step}{final}. Press c to chat with it, e to export it."
        ), "-finished"
    return None


def log_line_text(line: LogLine) -> Text:
    """One log-tail line with its level's colour."""
    return Text(line.message, style=LOG_STYLES.get(line.level, ""))


class RunDetail(Vertical):
    """The live view of one run; `show()` takes a snapshot and updates only what changed."""

    def compose(self) -> ComposeResult:
        yield Static("Open a run on the left, or press n to start one.", id="run-header")
        yield Static(id="run-problem")
        with Horizontal(id="run-progress-row"):
            yield ProgressBar(total=100, show_eta=False, id="run-progress")
            yield Static(id="run-progress-label")
        yield Static(id="run-metrics")
        yield LossPlot(id="run-plot")
        yield LogTail(id="run-log")

    def on_mount(self) -> None:
        self.shown_run_id: str | None = None
        self.logs_shown = 0
        self._shown: dict[str, Text] = {}
        self.query_one("#run-problem").display = False

    big_log = False

    def toggle_big_log(self) -> None:
        """Swap the room of the plot and the log tail."""
        self.big_log = not self.big_log
        # Inline heights, not a CSS class: a class change restyles every widget of the detail, which a key
        # press would wait for.
        self.query_one("#run-log", LogTail).styles.height = "1fr" if self.big_log else 4
        self.query_one(LossPlot).styles.height = 4 if self.big_log else "1fr"

    def _update(self, widget_id: str, content: Text) -> None:
        """Update a Static only when its content changed (an unchanged update still costs a repaint)."""
        if self._shown.get(widget_id) != content:
            self._shown[widget_id] = content
            # These widgets have fixed sizes, so a repaint is enough (a layout pass costs the whole screen).
            self.query_one(f"#{widget_id}", Static).update(content, layout=widget_id == "run-problem")

    def show(self, snap: RunSnapshot) -> None:
        """Draw `snap`; switching to another run clears the log first."""
        log = self.query_one("#run-log", LogTail)
        if snap.run_id != self.shown_run_id:
            self.shown_run_id = snap.run_id
            self.logs_shown = 0
            log.clear()
        self._update("run-header", header_text(snap))
        banner = problem_text(snap)
        problem = self.query_one("#run-problem", Static)
        if banner is None:
            problem.display = False
        else:
            self._update("run-problem", banner[0])
            if not problem.has_class(banner[1]):
                # Changing classes restyles the widget, so only when the kind of banner changes.
                problem.set_classes(banner[1])
            problem.display = True
        bar = self.query_one("#run-progress", ProgressBar)
        total, progress = max(snap.total_steps, 1), snap.step if snap.total_steps else 0
        if (bar.total, bar.progress) != (total, progress):
            bar.update(total=total, progress=progress)
        self._update("run-progress-label", progress_label(snap))
        self._update("run-metrics", metrics_text(snap))
        self.query_one(LossPlot).set_series(snap.loss_points, snap.eval_points)
        # `log_total` counts every line ever logged, so only the ones not shown yet are written.
        fresh = min(snap.log_total - self.logs_shown, len(snap.logs))
        if fresh < 0:
            self.logs_shown, fresh = 0, len(snap.logs)
            log.clear()
        log.extend([log_line_text(line) for line in snap.logs[len(snap.logs) - fresh :]])
        self.logs_shown = snap.log_total


class TrainView(TabView):
    """Runs list on the left, the opened run on the right."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("n", "new_run", "New run"),
        Binding("s", "stop_run", "Stop"),
        Binding("r", "resume_run", "Resume"),
        Binding("c", "chat_run", "Chat with run"),
        Binding("e", "export_run", "Export run", show=False),
        Binding("l", "toggle_log", "Bigger log", show=False),
    ]

    class RunUpdated(Message):
        """The opened run has new events (or its process came or went)."""

        def __init__(self, snapshot: RunSnapshot) -> None:
            super().__init__()
            self.snapshot = snapshot

    class RunsListed(Message):
        """Fresh snapshots of every run, newest first."""

        def __init__(self, snapshots: list[RunSnapshot]) -> None:
            super().__init__()
            self.snapshots = snapshots

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.opened_run_id: str | None = None
        self.snapshots: dict[str, RunSnapshot] = {}
        self._wake = threading.Event()
        self._row_order: list[str] = []

    def compose(self) -> ComposeResult:
        with Horizontal():
            with Vertical(id="runs-column"):
                yield Static("Runs", id="runs-title")
                table: DataTable[Text | str] = DataTable(
                    cursor_type="row", zebra_stripes=False, id="runs-table"
                )
                yield table
            yield RunDetail(id="run-detail")

    def on_mount(self) -> None:
        table = self.query_one("#runs-table", DataTable)
        table.add_column(" ", key="glyph", width=1)
        table.add_column("run", key="run", width=21)
        table.add_column("done", key="step", width=4)
        self._follow()

    def focus_default(self) -> None:
        self.query_one("#runs-table", DataTable).focus()

    # Polling

    @work(thread=True, exclusive=True, group="train-follow", exit_on_error=False)
    def _follow(self) -> None:
        """Poll the opened run ~4×/s and all runs every 2 s; posts messages, never touches widgets."""
        worker = get_current_worker()
        runs = self.engine.runs
        last_list = 0.0
        last_posted: tuple[str, int, str] | None = None
        while not worker.is_cancelled:
            now = time.monotonic()
            if now - last_list >= LIST_INTERVAL_S:
                self.post_message(self.RunsListed(runs.poll_all()))
                last_list = now
            run_id = self.opened_run_id
            if run_id:
                snap, _ = runs.follower(run_id).poll()
                key = (run_id, snap.event_count, snap.status)
                if key != last_posted:
                    self.post_message(self.RunUpdated(snap))
                    last_posted = key
            self._wake.wait(FOLLOW_INTERVAL_S)
            self._wake.clear()

    @on(RunsListed)
    def _runs_listed(self, event: RunsListed) -> None:
        table = self.query_one("#runs-table", DataTable)
        order = [snap.run_id for snap in event.snapshots]
        self.snapshots = {snap.run_id: snap for snap in event.snapshots}
        if order != self._row_order:
            cursor_run = self._row_order[table.cursor_row] if self._row_order and table.row_count else None
            table.clear()
            for snap in event.snapshots:
                table.add_row(*self._row_cells(snap), key=snap.run_id)
            self._row_order = order
            target = self.opened_run_id or cursor_run
            if target in order:
                table.move_cursor(row=order.index(target), animate=False)
            elif order and self.opened_run_id is None:
                # First listing: open the newest active run, else the newest run.
                chosen = next((s.run_id for s in event.snapshots if s.is_active), order[0])
                table.move_cursor(row=order.index(chosen), animate=False)
                self.open_run(chosen)
        else:
            for snap in event.snapshots:
                glyph, _, step = self._row_cells(snap)
                table.update_cell(snap.run_id, "glyph", glyph)
                table.update_cell(snap.run_id, "step", step)
        title = f"Runs ({len(order)})" if order else "Runs  [dim]none yet: press n[/]"
        self.query_one("#runs-title", Static).update(title, layout=False)

    @staticmethod
    def _row_cells(snap: RunSnapshot) -> tuple[Text, Text, Text]:
        style = STATUS_STYLES.get(snap.status, "")
        done = f"{snap.fraction:4.0%}" if snap.total_steps else ""
        label = Text(short_run_label(snap.run_id), no_wrap=True, overflow="ellipsis")
        return Text(snap.glyph, style=style), label, Text(done, style="dim")

    @on(DataTable.RowHighlighted, "#runs-table")
    def _row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value:
            self.open_run(str(event.row_key.value))

    def open_run(self, run_id: str) -> None:
        """Show `run_id` (the follower thread replays its history) and make it the status line's run."""
        if run_id == self.opened_run_id:
            return
        self.opened_run_id = run_id
        self.post_message(ActiveRunChanged(run_id))
        if run_id in self.snapshots:
            self.query_one(RunDetail).show(self.snapshots[run_id])
        self._wake.set()

    @on(RunUpdated)
    def _run_updated(self, event: RunUpdated) -> None:
        if event.snapshot.run_id == self.opened_run_id:
            self.snapshots[event.snapshot.run_id] = event.snapshot
            self.query_one(RunDetail).show(event.snapshot)

    @on(RunsChanged)
    def _run_launched(self, event: RunsChanged) -> None:
        self.opened_run_id = None
        self._row_order = []
        self.open_run(event.run_id)

    # Actions

    @property
    def opened(self) -> RunSnapshot | None:
        """The snapshot of the opened run, if any."""
        return self.snapshots.get(self.opened_run_id or "")

    def action_new_run(self) -> None:
        """Open the new-run form; starting it launches a detached trainer."""
        from tui.screens.new_run import NewRunScreen

        def started(request: tuple[str, list[str]] | None) -> None:
            if request is not None:
                self._start_run(*request)

        self.app.push_screen(NewRunScreen(self.engine, self.prefs), started)

    @work(thread=True, exclusive=True, group="train-launch", exit_on_error=False)
    def _start_run(self, recipe_path: str, overrides: list[str]) -> None:
        run_id = self.engine.start_run(Path(recipe_path), overrides)
        self.post_message(RunLaunched(run_id))
        self.app.call_from_thread(
            self.notify, f"Run {run_id} started; it keeps training if you quit.", title="Run started"
        )

    def action_stop_run(self) -> None:
        """Ask the opened run to save a checkpoint and exit."""
        snap = self.opened
        if snap is None or not snap.is_active:
            self.notify("The opened run is not running.", severity="warning")
            return
        from tui.screens.modals import ConfirmScreen

        def confirmed(yes: bool | None) -> None:
            if yes:
                self._stop_run(snap)

        self.app.push_screen(
            ConfirmScreen(
                "Stop run", f"Stop {snap.run_id}? It saves a checkpoint first; r resumes it.", "Stop"
            ),
            confirmed,
        )

    @work(thread=True, exclusive=True, group="train-launch", exit_on_error=False)
    def _stop_run(self, snap: RunSnapshot) -> None:
        self.engine.stop_run(snap.run_dir)
        self.app.call_from_thread(
            self.notify, f"Stop requested: {snap.run_id} saves a checkpoint, then exits.", title="Stopping"
        )

    def action_resume_run(self) -> None:
        """Resume the opened run from its newest checkpoint."""
        snap = self.opened
        if snap is None:
            self.notify("Open a run first.", severity="warning")
            return
        if snap.is_active or snap.status == "finished":
            self.notify(
                f"{snap.run_id} is {snap.status}; only stopped, failed or interrupted runs resume.",
                severity="warning",
            )
            return
        self._resume_run(snap.run_id)

    @work(thread=True, exclusive=True, group="train-launch", exit_on_error=False)
    def _resume_run(self, run_id: str) -> None:
        resumed = self.engine.resume_run(run_id)
        self.post_message(RunLaunched(resumed))
        self.app.call_from_thread(self.notify, f"Resuming {resumed}.", title="Run resumed")

    async def action_chat_run(self) -> None:
        """Open the Chat tab on the opened run's newest checkpoint."""
        snap = self.opened
        if snap is None:
            self.notify("Open a run first.", severity="warning")
            return
        chat = await self.app.open_tab("chat")  # type: ignore[attr-defined]
        chat.use_run(snap)

    async def action_export_run(self) -> None:
        """Open the Export tab on the opened run."""
        snap = self.opened
        if snap is None:
            self.notify("Open a run first.", severity="warning")
            return
        export = await self.app.open_tab("export")  # type: ignore[attr-defined]
        export.use_run(snap.run_id)

    def action_toggle_log(self) -> None:
        """Give the log tail more room (or the plot back)."""
        self.query_one(RunDetail).toggle_big_log()
