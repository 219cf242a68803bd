"""The one-line status bar: workspace, the run being followed, and the chat engine's state."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text
from textual import on, work
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Static
from textual.worker import Worker, WorkerState, get_current_worker

from engine.display import compact_duration
from tui.messages import WorkerFailed

if TYPE_CHECKING:
    from tui.run_state import RunSnapshot

STATUS_STYLES = {
    "running": "bold green",
    "starting": "bold green",
    "finished": "bold cyan",
    "stopped": "bold yellow",
    "failed": "bold red",
    "interrupted": "bold yellow",
}


def short_path(path: Path, limit: int = 28) -> str:
    """`~`-relative and cut from the left so the end of a long path stays visible."""
    text = str(path)
    home = str(Path.home())
    if text.startswith(home + "/") or text == home:
        text = "~" + text[len(home) :]
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def describe_run(snapshot: RunSnapshot) -> Text:
    """`▶ 20261123-demo running 12/48 loss 1.234 eta 2m` as styled text."""
    text = Text()
    text.append(f"{snapshot.glyph} ", style=STATUS_STYLES.get(snapshot.status, ""))
    text.append(snapshot.run_id, style="bold")
    text.append(f" {snapshot.status}", style=STATUS_STYLES.get(snapshot.status, "dim"))
    if snapshot.total_steps:
        text.append(f" {snapshot.step}/{snapshot.total_steps}")
    if snapshot.loss is not None:
        text.append(f" loss {snapshot.loss:.3f}")
    if snapshot.is_active and snapshot.eta_s is not None:
        text.append(f" eta {compact_duration(snapshot.eta_s)}", style="dim")
    return text


def pick_run(snapshots: list[RunSnapshot], follow_run_id: str | None) -> RunSnapshot | None:
    """The run to show: the one the Train tab opened, else the newest active one, else the newest."""
    if follow_run_id:
        chosen = next((snap for snap in snapshots if snap.run_id == follow_run_id), None)
        if chosen is not None:
            return chosen
    return next((snap for snap in snapshots if snap.is_active), snapshots[0] if snapshots else None)


class StatusLine(Static):
    """Shows where you are; it follows the active run itself, once a second, from a worker thread."""

    POLL_INTERVAL_S = 1.0

    workspace: reactive[Path | None] = reactive(None)
    run: reactive[RunSnapshot | None] = reactive(None)
    chat: reactive[str] = reactive("")
    follow_run_id: reactive[str | None] = reactive(None)

    class RunPolled(Message):
        """The worker's latest view of the run to show."""

        def __init__(self, snapshot: RunSnapshot | None) -> None:
            super().__init__()
            self.snapshot = snapshot

    def on_mount(self) -> None:
        # Reading every run's events can wait until the first frame is on screen.
        self.call_after_refresh(self._watch_runs)

    @work(thread=True, exclusive=True, group="status-line", exit_on_error=False)
    def _watch_runs(self) -> None:
        worker = get_current_worker()
        runs = self.app.engine.runs  # type: ignore[attr-defined]
        while not worker.is_cancelled:
            snapshot = pick_run(runs.poll_all(), self.follow_run_id)
            self.post_message(self.RunPolled(snapshot))
            worker.cancelled_event.wait(self.POLL_INTERVAL_S)

    @on(Worker.StateChanged)
    def _forward_worker_failure(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            self.post_message(WorkerFailed(event.worker.error, event.worker.name))

    @on(RunPolled)
    def _run_polled(self, event: RunPolled) -> None:
        self.run = event.snapshot

    def render(self) -> Text:
        text = Text(no_wrap=True, overflow="ellipsis")
        if self.workspace is not None:
            text.append("⌂ ", style="dim")
            text.append(short_path(self.workspace), style="bold")
        text.append("  ")
        if self.run is not None:
            text.append_text(describe_run(self.run))
        else:
            text.append("no run yet · press 2 then n to start one", style="dim")
        if self.chat:
            text.append(f"  · chat: {self.chat}", style="dim")
        return text
