"""The workspace: one folder holding datasets/, models/, runs/<id>/ and exports/, plus run-folder bookkeeping.

Standard library only, so the TUI and CLI can list and summarise runs without the ML stack.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path

from engine.atomic import pid_alive
from engine.errors import WorkspaceError
from engine.events import (
    CheckpointSaved,
    Eval,
    Event,
    RunFailed,
    RunFinished,
    RunStarted,
    Step,
    read_events,
)

MARKER_FILE = "tunedeck.toml"
DATASETS_DIR = "datasets"
MODELS_DIR = "models"
RUNS_DIR = "runs"
EXPORTS_DIR = "exports"

# Names inside a run folder.
RUN_RECIPE_FILE = "recipe.toml"
RUN_META_FILE = "run.json"
RUN_EVENTS_FILE = "events.jsonl"
RUN_LOG_FILE = "train.log"
RUN_PID_FILE = "pid"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"

WORKSPACE_ENV = "TUNEDECK_WORKSPACE"


def default_workspace_path() -> Path:
    """`$TUNEDECK_WORKSPACE`, else the current folder."""
    return Path(os.environ.get(WORKSPACE_ENV) or os.getcwd())


@dataclasses.dataclass(frozen=True)
class Workspace:
    """A tunedeck workspace rooted at `root`."""

    root: Path

    @property
    def datasets_dir(self) -> Path:
        return self.root / DATASETS_DIR

    @property
    def models_dir(self) -> Path:
        return self.root / MODELS_DIR

    @property
    def runs_dir(self) -> Path:
        return self.root / RUNS_DIR

    @property
    def exports_dir(self) -> Path:
        return self.root / EXPORTS_DIR

    @classmethod
    def init(cls, root: Path) -> Workspace:
        """Create (or complete) a workspace at `root`; existing content is kept."""
        root = Path(root).expanduser().resolve()
        workspace = cls(root)
        for folder in (
            root,
            workspace.datasets_dir,
            workspace.models_dir,
            workspace.runs_dir,
            workspace.exports_dir,
        ):
            folder.mkdir(parents=True, exist_ok=True)
        marker = root / MARKER_FILE
        if not marker.exists():
            marker.write_text("# tunedeck workspace\nversion = 1\n", encoding="utf-8")
        return workspace

    @classmethod
    def open(cls, root: Path | None = None, *, create: bool = True) -> Workspace:
        """The workspace at `root` (default: `$TUNEDECK_WORKSPACE` or the current folder)."""
        root = Path(root if root is not None else default_workspace_path()).expanduser().resolve()
        if (root / MARKER_FILE).exists():
            return cls(root)
        if create:
            return cls.init(root)
        raise WorkspaceError(
            f"{root} is not a tunedeck workspace.",
            next_step=f"Run `tunedeck init {root}` or pass --workspace DIR.",
        )

    def inside(self, path: Path | str, *, base: Path | None = None) -> Path:
        """Resolve a user path against `base` (default: the root), refusing one that escapes the workspace."""
        candidate = Path(path).expanduser()
        if not candidate.is_absolute():
            candidate = (base or self.root) / candidate
        resolved = candidate.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise WorkspaceError(
                f"{path} lies outside the workspace {self.root}.",
                next_step="Choose a path inside the workspace.",
            )
        return resolved

    def new_run_id(self, label: str) -> str:
        """A sortable, unique run id such as 20261123-063012-demo."""
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:40] or "run"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_id = f"{stamp}-{slug}"
        suffix = 2
        while (self.runs_dir / run_id).exists():
            run_id = f"{stamp}-{slug}-{suffix}"
            suffix += 1
        return run_id

    def run_dir(self, run_id: str) -> Path:
        """The folder of run `run_id`; raises if there is no such run."""
        folder = self.runs_dir / run_id
        if not folder.is_dir():
            known = ", ".join(p.name for p in self.list_run_dirs()[-5:]) or "none yet"
            raise WorkspaceError(
                f"There is no run called {run_id!r} in {self.runs_dir}.",
                next_step=f"Run `tunedeck runs` to list them (newest: {known}).",
            )
        return folder

    def list_run_dirs(self) -> list[Path]:
        """Run folders, oldest first."""
        if not self.runs_dir.is_dir():
            return []
        return sorted(p for p in self.runs_dir.iterdir() if p.is_dir() and not p.name.startswith("."))

    def list_datasets(self) -> list[Path]:
        """Dataset files in datasets/, by name."""
        if not self.datasets_dir.is_dir():
            return []
        return sorted(
            p for p in self.datasets_dir.iterdir() if p.suffix == ".jsonl" and not p.name.startswith(".")
        )


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run (step_<n>/ folders that were renamed into place), oldest first."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    """The step number a step_<n> folder holds."""
    return int(Path(path).name.removeprefix(CHECKPOINT_PREFIX))


@dataclasses.dataclass
class RunSummary:
    """What a runs table shows about one run, derived from its events alone (plus a liveness check)."""

    run_id: str
    status: str = "new"  # new, running, finished, stopped, failed, interrupted
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    eval_loss: float | None = None
    recipe: str = ""
    method: str = ""
    base_model: str = ""
    dataset: str = ""
    started: float | None = None
    ended: float | None = None
    last_checkpoint: str = ""
    cause: str = ""
    next_step: str = ""
    pid: int = 0


def summarize_events(run_id: str, events: list[Event], *, alive: bool | None = None) -> RunSummary:
    """Fold a run's events into its summary; a run with no end event whose process is gone is `interrupted`."""
    summary = RunSummary(run_id=run_id)
    for event in events:
        if isinstance(event, RunStarted):
            summary.status = "running"
            summary.recipe, summary.method = event.recipe, event.method
            summary.base_model, summary.dataset = event.base_model, event.dataset
            summary.total_steps = event.total_steps or summary.total_steps
            summary.pid = event.pid
            summary.started = summary.started or event.time
            summary.ended, summary.cause, summary.next_step = None, "", ""
        elif isinstance(event, Step):
            summary.step = event.step
            summary.total_steps = event.total_steps or summary.total_steps
            if event.loss is not None:
                summary.loss = event.loss
        elif isinstance(event, Eval):
            summary.eval_loss = event.eval_loss
        elif isinstance(event, CheckpointSaved):
            summary.last_checkpoint = event.path
        elif isinstance(event, RunFinished):
            summary.status = event.status
            summary.step = max(summary.step, event.step)
            summary.ended = event.time
        elif isinstance(event, RunFailed):
            summary.status = "failed"
            summary.cause, summary.next_step = event.cause, event.next_step
            summary.ended = event.time
    if summary.status == "running":
        is_alive = pid_alive(summary.pid) if alive is None else alive
        if not is_alive:
            summary.status = "interrupted"
            summary.next_step = f"Resume it with `tunedeck train --resume {run_id}`."
    return summary


def summarize_run(run_dir: Path) -> RunSummary:
    """The summary of the run stored in `run_dir`."""
    run_dir = Path(run_dir)
    summary = summarize_events(run_dir.name, read_events(run_dir / RUN_EVENTS_FILE))
    if summary.status == "new":
        pid_file = run_dir / RUN_PID_FILE
        if pid_file.exists():
            try:
                pid = int(pid_file.read_text().strip() or 0)
            except ValueError:
                pid = 0
            if pid_alive(pid):
                summary.status, summary.pid = "starting", pid
    return summary
