"""Training faults end to end: a run SIGKILLed again and again resumes through `tunedeck train --resume` with one
continuous loss curve; a changed recipe or dataset is refused by the CLI and the TUI with the difference shown;
a simulated CUDA OOM and a vanished model folder end as run_failed within 5 seconds, and the Train tab marks them.

The trainer's own tests (tests/test_train.py) cover the engine API for these; this file covers what they do not:
the CLI and the TUI as a user meets them, resume after many kills at seeded points, and loss equality with an
uninterrupted run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.register_assert_rewrite("crashkit")

from crashkit.fixtures import CHAIN_MAX_STEPS  # noqa: E402
from crashkit.harness import KillChain, Zygote, checkpoint_problems, tree_digest  # noqa: E402
from crashkit.plugin import Trials, family  # noqa: E402
from tuikit import (  # noqa: E402
    mounted,
    notifications,
    open_in_train_tab,
    runs_table_glyphs,
    train_detail_text,
    wait_for,
)

from engine.events import CheckpointSaved, RunFailed, RunFinished, RunStarted, Step, read_events  # noqa: E402
from engine.launch import prepare_run  # noqa: E402
from engine.workspace import Workspace, checkpoint_dirs, checkpoint_step, latest_checkpoint, summarize_run  # noqa: E402

pytest_plugins = ["crashkit.plugin", "crashkit.fixtures"]

REPO_ROOT = Path(__file__).resolve().parent.parent
FAILURE_BUDGET_S = 5.0


def tunedeck(workspace: Workspace, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The `tunedeck` command as a user types it."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "engine.cli", "--workspace", str(workspace.root), *args]
    return subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=workspace.root, timeout=timeout
    )


def attempts(events: list) -> list[tuple[int, list[Step]]]:
    """(resumed-from step, the steps it logged) for each attempt of a run, in order."""
    found: list[tuple[int, list[Step]]] = []
    for event in events:
        if isinstance(event, RunStarted):
            found.append((event.resumed_from_step or 0, []))
        elif isinstance(event, Step) and found:
            found[-1][1].append(event)
    return found


def curve(events: list) -> dict[int, float]:
    """Step → loss as a viewer draws it: a resumed attempt's steps replace the ones it redid."""
    points: dict[int, float] = {}
    for resumed_from, steps in attempts(events):
        points = {step: loss for step, loss in points.items() if step <= resumed_from}
        points.update({step.step: step.loss for step in steps})
    return points


@family("training-faults")
@pytest.mark.slow
def test_cli_resume_after_repeated_kills_continues_one_loss_curve_and_overwrites_nothing(
    kill_chain_run: KillChain, ml_zygote: Zygote, reliability_workspace: Workspace, trials: Trials
) -> None:
    run_dir = kill_chain_run.run_dir
    kept = {path.name: tree_digest(path) for path in checkpoint_dirs(run_dir)}
    resume_from = checkpoint_step(latest_checkpoint(run_dir))
    assert summarize_run(run_dir).status in ("interrupted", "new")

    result = tunedeck(reliability_workspace, "train", "--resume", run_dir.name, "--wait")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == run_dir.name and f"Resumed run {run_dir.name}" in result.stderr
    events = read_events(run_dir / "events.jsonl")
    assert isinstance(events[-1], RunFinished) and events[-1].status == "finished"
    assert events[-1].step == CHAIN_MAX_STEPS
    runs = attempts(events)
    assert runs[-1][0] == resume_from, "the CLI resumed from the newest complete checkpoint"
    for resumed_from, steps in runs:
        numbers = [step.step for step in steps]
        assert numbers == list(range(resumed_from + 1, resumed_from + 1 + len(numbers))), (
            resumed_from,
            numbers,
        )
    assert [step.step for step in runs[-1][1]] == list(range(resume_from + 1, CHAIN_MAX_STEPS + 1))
    assert sorted(curve(events)) == list(range(1, CHAIN_MAX_STEPS + 1))
    # Nothing written before the resume changed; every checkpoint the resume wrote is complete.
    assert {name: tree_digest(run_dir / "checkpoints" / name) for name in kept} == kept
    names = [path.name for path in checkpoint_dirs(run_dir)]
    assert names == [f"step_{step}" for step in range(1, CHAIN_MAX_STEPS + 1)]
    assert [
        problem
        for name in names
        if name not in kept
        for problem in checkpoint_problems(run_dir / "checkpoints" / name)
    ] == []
    saved = [event.step for event in events if isinstance(event, CheckpointSaved)]
    assert len(saved) == len(set(saved)), "no checkpoint was saved twice"

    # The same recipe trained without interruption gives the same loss at every step.
    reference = prepare_run(
        reliability_workspace,
        reliability_workspace.root / "recipes" / "tiny.toml",
        [f"train.max_steps={CHAIN_MAX_STEPS}", "train.save_steps=1000"],
    )
    done = ml_zygote.trial("engine.train:main", ["--run-dir", str(reference)])
    assert done.code == 0
    expected = curve(read_events(reference / "events.jsonl"))
    measured = curve(events)
    worst = max(abs(measured[step] - expected[step]) / max(abs(expected[step]), 1e-6) for step in expected)
    assert worst < 1e-3, f"the resumed curve departs from the uninterrupted one by {worst:.2e}"
    identical = sum(measured[step] == expected[step] for step in expected)
    trials.note(
        f"{len(runs)} attempts; loss vs an uninterrupted run: worst relative difference {worst:.1e}, "
        f"{identical}/{len(expected)} steps bit-identical"
    )
    trials.case()


def _fake_interrupted_history(run_dir: Path, dead_pid: int) -> None:
    """Events of an attempt that checkpointed at step 5 and died (with an empty step_5 folder: resume checks the
    recipe and dataset before it reads a checkpoint)."""
    from engine.events import write_events

    (run_dir / "checkpoints" / "step_5").mkdir(parents=True)
    write_events(
        run_dir / "events.jsonl",
        [RunStarted(run_id=run_dir.name, total_steps=80, pid=dead_pid, method="lora")]
        + [Step(step=step, total_steps=80, loss=3.0 - step / 10) for step in range(1, 7)]
        + [CheckpointSaved(step=5, path=str(run_dir / "checkpoints" / "step_5"))],
    )


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@family("training-faults")
def test_resume_with_a_changed_recipe_or_dataset_is_refused_with_the_difference(
    tiny_workspace: Workspace, trials: Trials
) -> None:
    from tui.app import create_app
    from tui.engine_client import EngineClient
    from tui.screens.train import TrainView

    run_dir = prepare_run(tiny_workspace, tiny_workspace.root / "recipes" / "tiny.toml")
    _fake_interrupted_history(run_dir, _dead_pid())
    before = tree_digest(run_dir)

    changed_recipe = tunedeck(
        tiny_workspace, "train", "--resume", run_dir.name, "train.epochs=99", "lora.r=4"
    )
    assert changed_recipe.returncode == 2 and "Traceback" not in changed_recipe.stderr
    assert (
        f"Cannot resume: The recipe of run {run_dir.name} changed since it started" in changed_recipe.stderr
    )
    assert "lora.r: 8 → 4; train.epochs: 80.0 → 99.0" in changed_recipe.stderr
    assert "→ Undo the change to resume, or start a new run" in changed_recipe.stderr
    trials.case()

    dataset = tiny_workspace.datasets_dir / "tiny_qa.jsonl"
    with open(dataset, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"question": "Is this new?", "answer": "Yes."}) + "\n")
        handle.write(json.dumps({"question": "And this?", "answer": "Also new."}) + "\n")
    changed_data = tunedeck(tiny_workspace, "train", "--resume", run_dir.name)
    assert changed_data.returncode == 2 and "Traceback" not in changed_data.stderr
    assert (
        "The dataset tiny_qa.jsonl changed since run" in changed_data.stderr
        and "6 → 8 rows" in changed_data.stderr
    )
    assert "→ Restore the original file to resume" in changed_data.stderr
    trials.case()

    async def press_resume_in_the_train_tab() -> None:
        app = create_app(engine=EngineClient(tiny_workspace), initial_tab="train")
        async with app.run_test(size=(80, 24)) as pilot:
            view = await mounted(app, pilot, TrainView)
            await wait_for(pilot, lambda: view.opened is not None and view.opened.run_id == run_dir.name)
            assert view.opened.status == "interrupted" and view.opened.can_resume
            await pilot.press("r")
            await wait_for(pilot, lambda: notifications(app), what="a notification")
            shown = notifications(app)[-1]
            assert shown.title == "Cannot resume" and "6 → 8 rows" in shown.message, shown
            assert "Restore the original file" in shown.message
            assert view.opened.status == "interrupted"

    asyncio.run(press_resume_in_the_train_tab())
    trials.case()
    assert tree_digest(run_dir) == before, "a refused resume must not touch the run folder"
    assert not (run_dir / "pid").exists(), "no trainer was started"


@dataclasses.dataclass
class Failure:
    """A run that failed in the real trainer, and how fast."""

    run_dir: Path
    seconds: float  # from the trial's start (missing model) or the last good step (OOM) to run_failed
    event: RunFailed


@family("training-faults")
def test_oom_and_a_vanished_model_fail_within_five_seconds_and_the_train_tab_marks_them(
    tiny_workspace: Workspace, tiny_model_dir: Path, tmp_path: Path, ml_zygote: Zygote, trials: Trials
) -> None:
    from tui.app import create_app
    from tui.engine_client import EngineClient
    from tui.screens.train import TrainView

    recipe = tiny_workspace.root / "recipes" / "tiny.toml"
    oom_run = prepare_run(tiny_workspace, recipe, ["train.max_steps=20"])
    moved = tmp_path / "model-that-goes-away"
    shutil.copytree(tiny_model_dir, moved)
    gone_run = prepare_run(tiny_workspace, recipe, [f'model.base="{moved}"'])
    shutil.rmtree(moved)
    failures: dict[str, Failure] = {}

    def run_trainers() -> None:
        result = ml_zygote.trial(
            "engine.train:main", ["--run-dir", str(oom_run)], env={"TUNEDECK_FAULT": "oom_at_step:3"}
        )
        assert result.code == 1 and not result.killed
        events = read_events(oom_run / "events.jsonl")
        last_step = max(event.time for event in events if isinstance(event, Step))
        failures["oom"] = Failure(oom_run, events[-1].time - last_step, events[-1])
        started = time.time()
        result = ml_zygote.trial("engine.train:main", ["--run-dir", str(gone_run)])
        assert result.code == 1
        events = read_events(gone_run / "events.jsonl")
        failures["gone"] = Failure(gone_run, events[-1].time - started, events[-1])

    async def watch_in_the_train_tab() -> None:
        app = create_app(engine=EngineClient(tiny_workspace), initial_tab="train")
        async with app.run_test(size=(80, 24)) as pilot:
            view = await mounted(app, pilot, TrainView)
            await wait_for(
                pilot, lambda: set(view.snapshots) == {oom_run.name, gone_run.name}, what="both runs"
            )
            await open_in_train_tab(app, pilot, oom_run.name)
            # The trainers run while the tab watches, as they would in a real session.
            await asyncio.to_thread(run_trainers)
            await wait_for(
                pilot,
                lambda: view.opened.run_id == oom_run.name and view.opened.status == "failed",
                what="the OOM run marked failed",
            )
            text = train_detail_text(app)
            assert f"{oom_run.name} failed" in text
            assert "✖ Out of memory: The GPU ran out of memory during a training step." in text
            assert "→ Lower train.batch_size or data.max_length" in text and "train.log" in text
            await wait_for(
                pilot,
                lambda: runs_table_glyphs(app) == {oom_run.name: "✖", gone_run.name: "✖"},
                what="the runs table to mark both runs failed",
            )
            await open_in_train_tab(app, pilot, gone_run.name)
            text = train_detail_text(app)
            assert f"{gone_run.name} failed" in text and "✖ Model problem:" in text
            assert f"The model folder {moved} does not exist." in text and "→ Set model.base" in text
            assert "running" not in text and "interrupted" not in text

    asyncio.run(watch_in_the_train_tab())
    oom, gone = failures["oom"], failures["gone"]
    assert oom.event.title == "Out of memory" and "train.batch_size" in oom.event.next_step
    assert gone.event.title == "Model problem" and gone.event.next_step
    assert oom.seconds < FAILURE_BUDGET_S and gone.seconds < FAILURE_BUDGET_S, (oom.seconds, gone.seconds)
    trials.note(
        f"run_failed after {oom.seconds:.2f} s (OOM, from the last step) and {gone.seconds:.2f} s (no model)"
    )
    for failure in (oom, gone):
        assert summarize_run(failure.run_dir).status == "failed"
        assert checkpoint_dirs(failure.run_dir) == []
        trials.case()
