"""The Train tab on recorded and fake runs: honest statuses, replay then tail, new-run form, stop, resume."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures" / "tui"))

from textual.widgets import Input
from tui_workspace import (
    FAILED,
    FINISHED,
    INTERRUPTED,
    RECORDED,
    RUN_IDS,
    RUNNING,
    FakeLauncher,
    engine_for,
    make_workspace,
)
from tuikit import (
    open_in_train_tab,
    run_in_app,
    runs_table_glyphs,
    screen_text,
    train_detail_text,
    wait_for,
)

from engine.events import read_events
from engine.workspace import Workspace, summarize_events
from tui.run_state import RunState, Series, short_run_label
from tui.screens.modals import ConfirmScreen
from tui.screens.new_run import NewRunScreen, estimated_steps, override_text
from tui.screens.train import RunDetail
from tui.widgets.plot import plot_lines
from tui.widgets.status_line import StatusLine


@pytest.fixture
def workspace(tmp_path: Path, live_pid: int) -> Workspace:
    return make_workspace(tmp_path / "ws", live_pid)


def run_app(workspace: Workspace, scenario, launcher: object | None = None) -> None:
    """Run `scenario(app, pilot, view)` in the Train tab once it has opened a run."""
    run_in_app(
        engine_for(workspace, launcher), scenario, tab="train", ready=lambda view: view.opened is not None
    )


@pytest.mark.parametrize("kind", list(RUN_IDS))
def test_incremental_state_agrees_with_summarize_events(
    kind: str, workspace: Workspace, live_pid: int
) -> None:
    run_dir = workspace.runs_dir / RUN_IDS[kind]
    events = read_events(run_dir / "events.jsonl")
    state = RunState(run_dir)
    for event in events:  # one at a time, as a tail delivers them
        state.apply([event])
    snapshot = state.snapshot()
    summary = summarize_events(run_dir.name, events)
    assert snapshot.status == summary.status == kind
    assert snapshot.step == summary.step
    assert snapshot.loss == summary.loss
    assert snapshot.cause == summary.cause


def test_statuses_are_honest_in_the_list_and_the_detail(workspace: Workspace) -> None:
    async def scenario(app, pilot, view) -> None:
        assert view.opened.run_id == RUNNING  # the newest active run opens first
        assert runs_table_glyphs(app) == {RUNNING: "▶", INTERRUPTED: "⚠", FAILED: "✖", FINISHED: "✔"}
        assert "running" in train_detail_text(app)
        assert "30/96" in str(app.query_one("#run-progress-label").render())

        await open_in_train_tab(app, pilot, FAILED)
        text = train_detail_text(app)
        assert "failed" in text and "running" not in text
        assert "Out of memory: The GPU ran out of memory at step 38" in text
        assert "→ Lower train.batch_size or data.max_length" in text

        await open_in_train_tab(app, pilot, INTERRUPTED)
        text = train_detail_text(app)
        assert "interrupted" in text and "running" not in text
        assert (
            "gone without a final event" in text and "r resumes from the newest checkpoint (step 50)" in text
        )

        await open_in_train_tab(app, pilot, FINISHED)
        assert "✔ Finished at step 48" in train_detail_text(app)
        assert "mem" in train_detail_text(app)
        # The status line follows the run the Train tab opened.
        await wait_for(pilot, lambda: app.query_one(StatusLine).run.run_id == FINISHED)

    run_app(workspace, scenario)


def test_a_run_replays_its_history_then_keeps_tailing(workspace: Workspace, live_pid: int) -> None:
    events_file = workspace.runs_dir / RUNNING / "events.jsonl"

    async def scenario(app, pilot, view) -> None:
        detail = app.query_one(RunDetail)
        assert view.opened.step == 30
        assert len(view.opened.loss_points) == 30
        with open(events_file, "a", encoding="utf-8") as handle:
            for step in range(31, 36):
                handle.write(
                    json.dumps(
                        {
                            "v": 1,
                            "type": "step",
                            "time": time.time(),
                            "step": step,
                            "total_steps": 96,
                            "loss": 0.9,
                            "tokens_per_s": 2000.0,
                        }
                    )
                    + "\n"
                )
            handle.write('{"v":1,"type":"log","time":1,"message":"half a li')
        await wait_for(pilot, lambda: view.opened.step == 35, timeout=5)
        assert "35/96" in str(app.query_one("#run-progress-label").render())
        with open(events_file, "a", encoding="utf-8") as handle:
            handle.write('ne finished"}\n')
        await wait_for(
            pilot, lambda: any(line.message == "half a line finished" for line in view.opened.logs)
        )
        assert detail.logs_shown == view.opened.log_total

    run_app(workspace, scenario)


def test_a_run_whose_process_dies_turns_interrupted(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    workspace = make_workspace(tmp_path / "ws", sleeper.pid, runs=("running",))

    async def scenario(app, pilot, view) -> None:
        assert view.opened.status == "running"
        sleeper.kill()
        sleeper.wait()
        await wait_for(pilot, lambda: view.opened.status == "interrupted", timeout=5)
        assert "Interrupted" in str(app.query_one("#run-problem").render())

    try:
        run_app(workspace, scenario)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_new_run_form_validates_as_you_type_then_starts_a_run(tmp_path: Path) -> None:
    workspace = make_workspace(tmp_path / "ws", 0, runs=("finished",))
    launcher = FakeLauncher(steps=400, rate=40)

    async def scenario(app, pilot, view) -> None:
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, NewRunScreen))
        form = app.screen
        await wait_for(pilot, lambda: form.recipe_path.endswith("demo-cpu.toml"))
        batch = form.query_one("#f-train-batch_size", Input)
        batch.value = "0"
        await wait_for(pilot, lambda: "`train.batch_size` must be greater than 0" in form.error)
        assert batch.has_class("-invalid")
        assert form.query_one("#start").disabled
        await pilot.press("ctrl+s")  # refused while invalid
        assert isinstance(app.screen, NewRunScreen)
        batch.value = "4"
        form.query_one("#f-train-epochs", Input).value = "2"
        await wait_for(pilot, lambda: not form.error)
        assert "12 pairs → about 6 steps" in str(form.query_one("#new-run-summary").render())
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: launcher.calls)
        assert launcher.calls[0] == ("start", "demo-cpu.toml", ["train.epochs=2", "train.batch_size=4"])
        await wait_for(
            pilot,
            lambda: (
                view.opened is not None
                and view.opened.run_id.endswith("demo-cpu")
                and view.opened.run_id != FINISHED
                and view.opened.step > 3
            ),
            timeout=15,
        )
        assert view.opened.status == "running"
        # Stop asks first, then the trainer checkpoints and ends `stopped`.
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: view.opened.status == "stopped", timeout=10)
        assert launcher.calls[-1][0] == "stop"
        assert "Stopped at step" in str(app.query_one("#run-problem").render())

    try:
        run_app(workspace, scenario, launcher)
    finally:
        launcher.close()


def test_resume_continues_an_interrupted_run(workspace: Workspace) -> None:
    launcher = FakeLauncher(steps=20, rate=40)

    async def scenario(app, pilot, view) -> None:
        await open_in_train_tab(app, pilot, INTERRUPTED)
        await pilot.press("r")
        await wait_for(pilot, lambda: launcher.calls == [("resume", INTERRUPTED)])
        await wait_for(pilot, lambda: view.opened.status in ("running", "finished"), timeout=10)
        assert "resumed from step 5" in [line.message for line in view.opened.logs]
        # The curve drops points after the resumed step instead of folding back.
        xs = [x for x, _ in view.opened.loss_points]
        assert xs == sorted(xs)

    try:
        run_app(workspace, scenario, launcher)
    finally:
        launcher.close()


def test_resume_is_refused_for_a_running_or_finished_run(workspace: Workspace) -> None:
    launcher = FakeLauncher()

    async def scenario(app, pilot, view) -> None:
        await pilot.press("r")
        await wait_for(pilot, lambda: bool(app._notifications))
        assert "only stopped, failed or interrupted runs resume" in list(app._notifications)[-1].message
        assert launcher.calls == []

    run_app(workspace, scenario, launcher)


def test_new_run_form_takes_a_gpu_count_or_all(tmp_path: Path) -> None:
    workspace = make_workspace(tmp_path / "ws", 0, runs=("finished",))
    launcher = FakeLauncher(steps=4, rate=40)

    async def scenario(app, pilot, view) -> None:
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, NewRunScreen))
        form = app.screen
        await wait_for(pilot, lambda: form.recipe_path.endswith("demo-cpu.toml") and not form.error)
        gpus = form.query_one("#f-train-gpus", Input)
        assert gpus.value == "1"
        text = screen_text(app)  # the whole form, buttons included, fits 80×24
        assert "gpus" in text and "Start (ctrl+s)" in text and "Cancel (esc)" in text
        gpus.value = "two"
        await wait_for(pilot, lambda: "`train.gpus`" in form.error)
        assert gpus.has_class("-invalid")
        gpus.value = "2"
        await wait_for(pilot, lambda: not form.error)
        assert "train.gpus=2" in form.overrides
        gpus.value = "all"
        await wait_for(pilot, lambda: not form.error)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: launcher.calls)
        assert launcher.calls[0] == ("start", "demo-cpu.toml", ['train.gpus="all"'])

    run_app(workspace, scenario, launcher)


def test_launch_errors_surface_with_their_title(workspace: Workspace) -> None:
    from engine.errors import DatasetError

    class Refusing(FakeLauncher):
        def start_run(self, workspace, recipe_path, overrides):
            raise DatasetError("There is no dataset 'gone.jsonl' in datasets.", next_step="Set data.dataset.")

    async def scenario(app, pilot, view) -> None:
        await pilot.press("n")
        await wait_for(pilot, lambda: isinstance(app.screen, NewRunScreen))
        await wait_for(pilot, lambda: app.screen.recipe_path != "" and not app.screen.error)
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: bool(app._notifications))
        notification = list(app._notifications)[-1]
        assert notification.title == "Dataset problem"
        assert "There is no dataset 'gone.jsonl'" in notification.message

    run_app(workspace, scenario, Refusing())


def test_the_train_tab_fits_80x24(workspace: Workspace) -> None:
    async def scenario(app, pilot, view) -> None:
        await pilot.pause(0.3)
        text = screen_text(app)
        lines = text.splitlines()
        assert len(lines) == 24
        assert any("┤" in line for line in lines), "the loss plot is drawn"
        assert "11-23 13:15 demo-cpu" in text
        assert "n New run" in text

    run_app(workspace, scenario)


def test_series_stays_bounded_and_keeps_its_shape() -> None:
    series = Series(capacity=64)
    for step in range(1, 10_001):
        series.append(step, 10_000 / step)
    points = series.view()
    assert len(points) <= 65
    xs = [x for x, _ in points]
    assert xs == sorted(xs) and xs[0] < 200 and xs[-1] > 9_000
    series.truncate_after(5_000)
    assert max(x for x, _ in series.view()) <= 5_000


def test_plot_draws_both_series_within_its_size() -> None:
    lines = plot_lines([([(1, 2.0), (2, 1.0), (3, 0.5)], "cyan"), ([(2, 1.5)], "yellow")], 40, 8)
    assert len(lines) == 8
    assert all(len(line.plain) <= 40 for line in lines)
    assert lines[0].plain.strip().startswith("2.000")
    assert "step 1" in lines[-1].plain
    assert any(span.style == "yellow" for line in lines for span in line.spans)
    empty = plot_lines([((), "cyan")], 40, 6)
    assert "waiting for the first logged step" in "".join(line.plain for line in empty)


def test_form_helpers() -> None:
    assert override_text("model.base", "models/x", "text") == 'model.base="models/x"'
    assert override_text("train.epochs", " 3 ", "number") == "train.epochs=3"
    assert estimated_steps(30, 8, 0, 8, 1, 0.0) == 32
    assert estimated_steps(30, 8, 100, 8, 1, 0.0) == 100
    assert estimated_steps(30, 8, 0, 8, 1, 0.0, processes=2) == 16  # the batch is per GPU
    assert override_text("train.gpus", "2", "gpus") == "train.gpus=2"
    assert override_text("train.gpus", "all", "gpus") == 'train.gpus="all"'
    assert short_run_label("20261123-131500-demo-cpu") == "11-23 13:15 demo-cpu"
    assert short_run_label("my-run") == "my-run"
    assert RECORDED.is_dir()


def test_train_screen_text_names_the_running_run(workspace: Workspace) -> None:
    async def scenario(app, pilot, view) -> None:
        assert "▶ 20261123-131500-demo-cpu running" in screen_text(app)

    run_app(workspace, scenario)
