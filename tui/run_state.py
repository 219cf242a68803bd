"""Incremental fold of a run's events.jsonl into what the Train tab draws, so a 100k-event run replays once.

Pure (no Textual): the Train tab's worker thread polls `RunFollower`s and hands immutable `RunSnapshot`s to
widgets, and tests fold recorded event files without an app.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import threading
import time
from pathlib import Path

from engine.display import compact_duration
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
from engine.workspace import RUN_EVENTS_FILE, RUN_PID_FILE, pid_alive

# Points kept per plotted series; older points are merged pairwise so memory and drawing stay bounded.
SERIES_CAPACITY = 1024
LOG_LINES_KEPT = 400

# Status names shared with engine.workspace.summarize_events, plus `starting` (a pid file, no events yet).
ACTIVE_STATUSES = frozenset({"running", "starting"})
STATUS_GLYPHS = {
    "running": "▶",
    "starting": "…",
    "finished": "✔",
    "stopped": "■",
    "failed": "✖",
    "interrupted": "⚠",
    "new": "·",
}


class Series:
    """A bounded (x, y) series: past `capacity` points, neighbours are averaged so the shape survives."""

    def __init__(self, capacity: int = SERIES_CAPACITY) -> None:
        self.capacity = capacity
        self.points: list[tuple[float, float]] = []
        self._stride = 1
        self._bucket: list[tuple[float, float]] = []

    def append(self, x: float, y: float) -> None:
        """Add one point (x increasing)."""
        if self._stride == 1:
            self.points.append((x, y))
        else:
            self._bucket.append((x, y))
            if len(self._bucket) >= self._stride:
                self.points.append(_mean(self._bucket))
                self._bucket = []
        if len(self.points) > self.capacity:
            merged = [_mean(self.points[i : i + 2]) for i in range(0, len(self.points) - 1, 2)]
            if len(self.points) % 2:
                merged.append(self.points[-1])
            self.points = merged
            self._stride *= 2

    def truncate_after(self, x: float) -> None:
        """Forget points past `x` (a resumed run redoes the steps after its checkpoint)."""
        self.points = [point for point in self.points if point[0] <= x]
        self._bucket = [point for point in self._bucket if point[0] <= x]

    def view(self) -> tuple[tuple[float, float], ...]:
        """The points to draw, including a partly filled bucket."""
        if self._bucket:
            return (*self.points, _mean(self._bucket))
        return tuple(self.points)


def _mean(points: list[tuple[float, float]]) -> tuple[float, float]:
    return (sum(p[0] for p in points) / len(points), sum(p[1] for p in points) / len(points))


@dataclasses.dataclass(frozen=True)
class LogLine:
    """One line of a run's log tail."""

    time: float
    level: str
    message: str


@dataclasses.dataclass(frozen=True)
class StageProgress:
    """The latest progress of one named stage (model loading, tokenizing, an export step)."""

    stage: str
    current: float
    total: float
    eta_s: float | None
    message: str


@dataclasses.dataclass(frozen=True)
class RunSnapshot:
    """Everything the Train tab shows about one run at one moment; safe to hand across threads."""

    run_id: str
    run_dir: Path
    status: str = "new"
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    loss: float | None = None
    eval_loss: float | None = None
    best_eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_s: float | None = None
    gpu_mem_gib: float | None = None
    eta_s: float | None = None
    elapsed_s: float | None = None
    recipe: str = ""
    method: str = ""
    base_model: str = ""
    dataset: str = ""
    device: str = ""
    pid: int = 0
    started: float | None = None
    ended: float | None = None
    last_event_time: float | None = None
    resumed_from_step: int | None = None
    checkpoints: tuple[tuple[int, str], ...] = ()
    failure_title: str = ""
    cause: str = ""
    next_step: str = ""
    details_path: str = ""
    final_loss: float | None = None
    loss_points: tuple[tuple[float, float], ...] = ()
    eval_points: tuple[tuple[float, float], ...] = ()
    logs: tuple[LogLine, ...] = ()
    log_total: int = 0
    stages: tuple[StageProgress, ...] = ()
    event_count: int = 0

    @property
    def glyph(self) -> str:
        """A one-character status mark for lists."""
        return STATUS_GLYPHS.get(self.status, "?")

    @property
    def is_active(self) -> bool:
        """True while a live process is (or is about to be) training."""
        return self.status in ACTIVE_STATUSES

    @property
    def fraction(self) -> float:
        """Progress in [0, 1]."""
        if self.total_steps <= 0:
            return 1.0 if self.status == "finished" else 0.0
        return min(1.0, self.step / self.total_steps)

    @property
    def can_resume(self) -> bool:
        """True when resuming makes sense: the run ended early and left a checkpoint (or was interrupted)."""
        return self.status in ("interrupted", "stopped", "failed") and bool(self.checkpoints or self.step)


class RunState:
    """Folds a run's events one by one; `snapshot()` adds the liveness check `summarize_events` makes."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_id = self.run_dir.name
        self.status = "new"
        self.fields: dict[str, object] = {}
        self.loss = Series()
        self.eval = Series()
        self.best_eval: float | None = None
        self.checkpoints: list[tuple[int, str]] = []
        self.logs: collections.deque[LogLine] = collections.deque(maxlen=LOG_LINES_KEPT)
        self.stages: dict[str, StageProgress] = {}
        self.event_count = 0
        self.log_total = 0

    def apply(self, events: list[Event]) -> None:
        """Fold `events` (in file order) into the state."""
        for event in events:
            self._apply_one(event)
        self.event_count += len(events)

    def _log(self, line: LogLine) -> None:
        self.logs.append(line)
        self.log_total += 1

    def _set(self, **values: object) -> None:
        self.fields.update(values)

    def _apply_one(self, event: Event) -> None:
        self._set(last_event_time=event.time)
        if isinstance(event, Step):
            self._set(
                step=event.step,
                epoch=event.epoch,
                learning_rate=event.learning_rate,
                tokens_per_s=event.tokens_per_s,
                gpu_mem_gib=event.gpu_mem_gib
                if event.gpu_mem_gib is not None
                else self.fields.get("gpu_mem_gib"),
                eta_s=event.eta_s,
                elapsed_s=event.elapsed_s,
            )
            if event.total_steps:
                self._set(total_steps=event.total_steps)
            if event.loss is not None:
                self._set(loss=event.loss)
                self.loss.append(event.step, event.loss)
        elif isinstance(event, Eval):
            self._set(eval_loss=event.eval_loss)
            self.eval.append(event.step, event.eval_loss)
            self.best_eval = (
                event.eval_loss if self.best_eval is None else min(self.best_eval, event.eval_loss)
            )
        elif isinstance(event, RunStarted):
            self._apply_started(event)
        elif isinstance(event, CheckpointSaved):
            self.checkpoints.append((event.step, event.path))
            self._log(LogLine(event.time, "info", f"checkpoint saved at step {event.step}"))
        elif isinstance(event, Log):
            self._log(LogLine(event.time, event.level, event.message))
        elif isinstance(event, Progress):
            self.stages[event.stage] = StageProgress(
                event.stage, event.current, event.total, event.eta_s, event.message
            )
        elif isinstance(event, RunFinished):
            self.status = event.status
            self._set(
                ended=event.time,
                final_loss=event.final_loss,
                step=max(int(self.fields.get("step", 0) or 0), event.step),
            )
            self._log(LogLine(event.time, "info", f"run {event.status} at step {event.step}"))
        elif isinstance(event, RunFailed):
            self.status = "failed"
            self._set(
                ended=event.time,
                failure_title=event.title,
                cause=event.cause,
                next_step=event.next_step,
                details_path=event.details_path,
            )
            self._log(LogLine(event.time, "error", f"{event.title}: {event.cause}"))

    def _apply_started(self, event: RunStarted) -> None:
        self.status = "running"
        resumed = event.resumed_from_step
        if resumed is not None:
            # Steps after the checkpoint are trained again; drop their old points so the curve does not fold
            # back.
            self.loss.truncate_after(resumed)
            self.eval.truncate_after(resumed)
            self._log(LogLine(event.time, "info", f"resumed from step {resumed}"))
        else:
            self._log(LogLine(event.time, "info", f"run started on {event.device or 'the default device'}"))
        self._set(
            recipe=event.recipe,
            method=event.method,
            base_model=event.base_model,
            dataset=event.dataset,
            device=event.device,
            pid=event.pid,
            total_steps=event.total_steps or self.fields.get("total_steps", 0),
            started=self.fields.get("started") or event.time,
            resumed_from_step=resumed,
            ended=None,
            failure_title="",
            cause="",
            next_step="",
            details_path="",
        )
        self.stages.clear()

    def snapshot(self, *, alive: bool | None = None) -> RunSnapshot:
        """An immutable copy; a `running` run whose process is gone reads `interrupted`, as in
        summarize_events."""
        status = self.status
        next_step = str(self.fields.get("next_step", "") or "")
        pid = int(self.fields.get("pid", 0) or 0)
        if status == "running":
            is_alive = pid_alive(pid) if alive is None else alive
            if not is_alive:
                status = "interrupted"
                next_step = (
                    "The trainer ended without a final event; press r to resume from the newest checkpoint."
                )
        elif status == "new":
            status, pid = self._starting_status(pid)
        known = {f.name for f in dataclasses.fields(RunSnapshot)}
        extra = {key: value for key, value in self.fields.items() if key in known}
        extra.update(
            run_id=self.run_id,
            run_dir=self.run_dir,
            status=status,
            pid=pid,
            next_step=next_step,
            best_eval_loss=self.best_eval,
            checkpoints=tuple(self.checkpoints),
            loss_points=self.loss.view(),
            eval_points=self.eval.view(),
            logs=tuple(self.logs),
            log_total=self.log_total,
            stages=tuple(self.stages.values()),
            event_count=self.event_count,
        )
        return RunSnapshot(**extra)

    def _starting_status(self, pid: int) -> tuple[str, int]:
        pid_file = self.run_dir / RUN_PID_FILE
        try:
            pid = int(pid_file.read_text(encoding="ascii").strip() or 0)
        except (OSError, ValueError):
            return "new", pid
        return ("starting", pid) if pid_alive(pid) else ("new", pid)


class RunFollower:
    """A run's EventTail plus its RunState: each `poll()` reads only what was appended since the last."""

    def __init__(self, run_dir: Path) -> None:
        self.state = RunState(run_dir)
        self.tail = EventTail(Path(run_dir) / RUN_EVENTS_FILE)
        self.lock = threading.Lock()

    def poll(self) -> tuple[RunSnapshot, int]:
        """The run's snapshot after folding new events, and how many new events there were."""
        with self.lock:
            events = self.tail.poll()
            self.state.apply(events)
            return self.state.snapshot(), len(events)


class RunsIndex:
    """Followers of every run folder in a workspace, found by listing runs/ (new folders appear on poll)."""

    def __init__(self, runs_dir: Path) -> None:
        self.runs_dir = Path(runs_dir)
        self.followers: dict[str, RunFollower] = {}
        self._lock = threading.Lock()

    def follower(self, run_id: str) -> RunFollower:
        """The follower of `run_id`, created on first use."""
        with self._lock:
            if run_id not in self.followers:
                self.followers[run_id] = RunFollower(self.runs_dir / run_id)
            return self.followers[run_id]

    def run_ids(self) -> list[str]:
        """Run folder names, oldest first (ids start with a timestamp)."""
        if not self.runs_dir.is_dir():
            return []
        return sorted(p.name for p in self.runs_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def poll_all(self) -> list[RunSnapshot]:
        """Snapshots of every run, newest first."""
        ids = self.run_ids()
        with self._lock:
            for gone in set(self.followers) - set(ids):
                del self.followers[gone]
        return [self.follower(run_id).poll()[0] for run_id in reversed(ids)]


def short_run_label(run_id: str) -> str:
    """`11-23 13:15 demo-cpu` for an id like `20261123-131500-demo-cpu` (other ids come back unchanged)."""
    match = re.fullmatch(r"\d{4}(\d{2})(\d{2})-(\d{2})(\d{2})\d{2}-(.+)", run_id)
    if match is None:
        return run_id
    month, day, hour, minute, label = match.groups()
    return f"{month}-{day} {hour}:{minute} {label}"


def format_age(timestamp: float | None, now: float | None = None) -> str:
    """How long ago `timestamp` was, e.g. `3m ago`."""
    if timestamp is None:
        return "—"
    return f"{compact_duration((now or time.time()) - timestamp)} ago"
