"""`tunedeck logs RUN [--follow]`: a run's events as readable lines, optionally until the run ends.

Also home of the event formatting and the one-line progress display that `train --wait` and `demo` share.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from engine.display import (
    LEARNING_RATE_SPEC,
    LOSS_SPEC,
    TOKENS_PER_S_SPEC,
    clock_duration,
    format_metric,
)
from engine.events import (
    CheckpointSaved,
    Eval,
    Event,
    EventTail,
    Log,
    Progress,
    RunFailed,
    RunFinished,
    RunStarted,
    Step,
)
from engine.launch import find_run, is_running
from engine.workspace import RUN_EVENTS_FILE, RunSummary, Workspace, summarize_run

HELP = "show a run's events (--follow to keep watching)"
POLL_S = 0.25
BAR_WIDTH = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """RUN (an id, a unique part of one, or `latest`) and --follow."""
    parser.add_argument(
        "run", nargs="?", default="latest", help="run id, a unique part of it, or latest (default)"
    )
    parser.add_argument(
        "--follow", "-f", action="store_true", help="keep printing new events until the run ends"
    )


def describe(event: Event) -> str | None:
    """One human-readable line for an event (None for events a run log does not show)."""
    if isinstance(event, Step):
        parts = [
            f"step {event.step}/{event.total_steps}",
            f"epoch {event.epoch:.2f}",
            f"loss {format_metric(event.loss, LOSS_SPEC)}",
            f"lr {format_metric(event.learning_rate, LEARNING_RATE_SPEC)}",
            f"grad {format_metric(event.grad_norm, '.3f')}",
            f"{format_metric(event.tokens_per_s, TOKENS_PER_S_SPEC)} tok/s",
        ]
        if event.gpu_mem_gib is not None:
            parts.append(f"{event.gpu_mem_gib:.1f} GiB")
        parts.append(f"ETA {clock_duration(event.eta_s)}")
        return "  ".join(parts)
    if isinstance(event, RunStarted):
        resumed = (
            f", resumed from step {event.resumed_from_step}" if event.resumed_from_step is not None else ""
        )
        return (
            f"started {event.method} on {event.dataset} ({event.num_train} train / {event.num_eval} eval): "
            f"{event.total_steps} steps on {event.device}, pid {event.pid}{resumed}"
        )
    if isinstance(event, Eval):
        return f"eval at step {event.step}: loss {event.eval_loss:{LOSS_SPEC}}"
    if isinstance(event, CheckpointSaved):
        return f"checkpoint step {event.step}: {event.path}"
    if isinstance(event, Progress):
        total = f"{event.current:g}/{event.total:g} " if event.total else ""
        return f"{event.stage} {total}{event.message}".rstrip()
    if isinstance(event, Log):
        return f"{event.level}: {event.message}" if event.level != "info" else event.message
    if isinstance(event, RunFinished):
        loss = f", loss {event.final_loss:{LOSS_SPEC}}" if event.final_loss is not None else ""
        saved = f"; checkpoint {event.checkpoint}" if event.checkpoint else ""
        return f"{event.status} at step {event.step}{loss} after {clock_duration(event.elapsed_s)}{saved}"
    if isinstance(event, RunFailed):
        details = f" (details: {event.details_path})" if event.details_path else ""
        return (
            f"FAILED — {event.title}: {event.cause}"
            + (f" → {event.next_step}" if event.next_step else "")
            + details
        )
    return None


def event_line(event: Event) -> str | None:
    """An event as a timestamped log line."""
    text = describe(event)
    return None if text is None else f"{time.strftime('%H:%M:%S', time.localtime(event.time))} {text}"


class ProgressLine:
    """A one-line progress display on a terminal (redrawn in place), or periodic lines when not a terminal."""

    def __init__(self, stream: IO[str] | None = None, *, interval_s: float = 10.0) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.interval_s = interval_s
        self._last_print = 0.0
        self._drawn = False

    def _bar(self, fraction: float) -> str:
        filled = round(max(0.0, min(fraction, 1.0)) * BAR_WIDTH)
        return "[" + "#" * filled + "-" * (BAR_WIDTH - filled) + f"] {fraction * 100:3.0f}%"

    def status(self, text: str, fraction: float | None = None) -> None:
        """Show `text` (with a bar when `fraction` is known) as the current status."""
        line = f"{self._bar(fraction)} {text}" if fraction is not None else text
        if self.live:
            self.stream.write("\r\x1b[2K" + line[: max(self._width() - 1, 20)])
            self._drawn = True
        elif time.monotonic() - self._last_print >= self.interval_s:
            self.stream.write(line + "\n")
            self._last_print = time.monotonic()
        self.stream.flush()

    def message(self, text: str) -> None:
        """Print a line that stays (above the live status line)."""
        if self._drawn:
            self.stream.write("\r\x1b[2K")
            self._drawn = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the live line."""
        if self._drawn:
            self.stream.write("\n")
            self._drawn = False
        self.stream.flush()

    def _width(self) -> int:
        import shutil

        return shutil.get_terminal_size((100, 20)).columns

    def emit(self, event: Event) -> None:
        """Render an event (the EventWriter interface, so engine functions can report progress here)."""
        self.show(event)

    def show(self, event: Event) -> None:
        """Render an event: steps and progress update the status line, everything else prints a line."""
        if isinstance(event, Step):
            loss = f" loss {event.loss:{LOSS_SPEC}}" if event.loss is not None else ""
            speed = (
                f" {event.tokens_per_s:{TOKENS_PER_S_SPEC}} tok/s" if event.tokens_per_s is not None else ""
            )
            fraction = event.step / event.total_steps if event.total_steps else None
            self.status(
                f"step {event.step}/{event.total_steps}{loss}{speed} ETA {clock_duration(event.eta_s)}",
                fraction,
            )
        elif isinstance(event, Progress):
            fraction = event.current / event.total if event.total else None
            self.status(f"{event.stage}: {event.message}", fraction)
        else:
            text = describe(event)
            if text:
                self.message(text)


def follow_run(
    run_dir: Path, on_event: Callable[[Event], None], *, since: float = 0.0, follow: bool = True
) -> RunSummary:
    """Feed the run's events (at or after `since`) to `on_event`; with `follow`, until the trainer ends."""
    tail = EventTail(Path(run_dir) / RUN_EVENTS_FILE)
    while True:
        running = follow and is_running(run_dir)
        for event in tail.poll():
            if event.time >= since:
                on_event(event)
        if not running:
            for event in tail.poll():  # what the trainer wrote just before it exited
                if event.time >= since:
                    on_event(event)
            return summarize_run(run_dir)
        time.sleep(POLL_S)


def run(args: argparse.Namespace) -> int:
    """Print the run's events; exit 0 unless the run failed."""
    workspace = Workspace.open(args.workspace, create=False)
    run_dir = find_run(workspace, args.run)

    def show(event: Event) -> None:
        line = event_line(event)
        if line:
            print(line, flush=True)

    try:
        summary = follow_run(run_dir, show, follow=args.follow)
    except KeyboardInterrupt:
        return 130
    if summary.status in ("running", "starting"):
        print(
            f"(run {run_dir.name} is still {summary.status}; add --follow to keep watching)", file=sys.stderr
        )
    elif summary.status == "interrupted":
        print(f"(run {run_dir.name} was interrupted) {summary.next_step}", file=sys.stderr)
    return 1 if summary.status == "failed" else 0
