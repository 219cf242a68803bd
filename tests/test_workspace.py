"""Workspace layout, path containment and run summaries derived from events."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.errors import WorkspaceError
from engine.events import CheckpointSaved, Eval, RunFailed, RunFinished, RunStarted, Step
from engine.workspace import Workspace, latest_checkpoint, summarize_events


def test_init_creates_the_layout_and_keeps_content(tmp_path: Path) -> None:
    workspace = Workspace.init(tmp_path / "ws")
    for folder in ("datasets", "models", "runs", "exports"):
        assert (workspace.root / folder).is_dir()
    (workspace.datasets_dir / "mine.jsonl").write_text("{}\n")
    Workspace.init(workspace.root)
    assert workspace.list_datasets() == [workspace.datasets_dir / "mine.jsonl"]


def test_open_without_create_explains_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceError, match="not a tunedeck workspace"):
        Workspace.open(tmp_path, create=False)


def test_paths_outside_the_workspace_are_refused(tmp_path: Path) -> None:
    workspace = Workspace.init(tmp_path / "ws")
    assert workspace.inside("datasets/a.jsonl") == workspace.root / "datasets" / "a.jsonl"
    with pytest.raises(WorkspaceError, match="outside the workspace"):
        workspace.inside("../../etc/passwd")
    os.symlink("/etc", workspace.root / "escape")
    with pytest.raises(WorkspaceError):
        workspace.inside("escape/passwd")


def test_run_ids_are_unique_and_unknown_runs_are_named(tmp_path: Path) -> None:
    workspace = Workspace.init(tmp_path)
    first = workspace.new_run_id("Demo CPU!")
    (workspace.runs_dir / first).mkdir()
    second = workspace.new_run_id("Demo CPU!")
    assert first != second and first.endswith("demo-cpu")
    with pytest.raises(WorkspaceError, match="no run called 'nope'"):
        workspace.run_dir("nope")


def test_latest_checkpoint_ignores_partial_folders(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "step_10").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_9").mkdir()
    (tmp_path / "checkpoints" / ".step_20.partial-123").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_10"


def test_summary_statuses_follow_the_events() -> None:
    started = RunStarted(run_id="r", total_steps=10, pid=1)
    steps = [
        Step(step=1, loss=2.0),
        Step(step=2, loss=1.0),
        Eval(step=2, eval_loss=1.2),
        CheckpointSaved(step=2, path="p"),
    ]
    running = summarize_events("r", [started, *steps], alive=True)
    assert (running.status, running.step, running.loss, running.eval_loss, running.last_checkpoint) == (
        "running",
        2,
        1.0,
        1.2,
        "p",
    )
    assert summarize_events("r", [started, *steps], alive=False).status == "interrupted"
    failed = summarize_events(
        "r", [started, RunFailed(title="t", cause="OOM at step 3.", next_step="smaller batch")]
    )
    assert (failed.status, failed.cause, failed.next_step) == ("failed", "OOM at step 3.", "smaller batch")
    assert summarize_events("r", [started, RunFinished(status="stopped", step=2)]).status == "stopped"
    resumed = summarize_events("r", [started, RunFailed(title="t", cause="c"), started], alive=True)
    assert resumed.status == "running" and resumed.cause == ""
