"""The Export tab on a fake export engine: per-stage progress, written files, failures with their cause."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures" / "tui"))

from textual.widgets import Checkbox, Select
from tui_workspace import FAILED, FINISHED, engine_for, make_workspace, screen_text, wait_for

from engine.workspace import Workspace
from tui.app import create_app
from tui.screens.export import ExportView, StageRow
from tui.screens.train import TrainView


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return make_workspace(tmp_path / "ws", 0, runs=("finished", "failed"))


def run_export(workspace: Workspace, scenario) -> None:
    async def main() -> None:
        app = create_app(engine=engine_for(workspace), initial_tab="export")
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: app.shell_ready)
            await scenario(app, pilot, app.query_one(ExportView))
            await app.action_quit()

    asyncio.run(main())


def test_choices_list_runs_checkpoints_and_quants(workspace: Workspace) -> None:
    async def scenario(app, pilot, view) -> None:
        run = app.query_one("#export-run", Select)
        assert run.value == FAILED  # newest first
        run.value = FINISHED
        await pilot.pause(0.1)
        checkpoints = app.query_one("#export-checkpoint", Select)
        labels = [str(option[0]) for option in checkpoints._options]
        assert labels == ["newest checkpoint", "step_48", "step_36", "step_24", "step_12"]
        assert [box.value for box in app.query(Checkbox)] == [True, False, True, False]

    run_export(workspace, scenario)


def test_export_shows_each_stage_and_the_written_files(workspace: Workspace) -> None:
    async def scenario(app, pilot, view) -> None:
        app.query_one("#export-run", Select).value = FINISHED
        app.query_one("#quant-q5_1", Checkbox).value = True
        await pilot.pause(0.1)
        app.query_one("#export-checkpoint", Select).value = "36"
        await pilot.press("x")
        await wait_for(pilot, lambda: view.finished)
        stages = [row.stage for row in view.query(StageRow)]
        assert stages == ["merge", "convert", "quantize q4_0", "quantize q5_1", "quantize q8_0"]
        text = screen_text(app)
        assert "model-q5_1.gguf" in text and "Export finished" in text
        await wait_for(pilot, lambda: not view.running)

    run_export(workspace, scenario)


def test_a_failed_export_names_its_cause(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_EXPORT_FAIL", "1")

    async def scenario(app, pilot, view) -> None:
        await pilot.press("x")
        await wait_for(pilot, lambda: view.finished and bool(app._notifications))
        notification = list(app._notifications)[-1]
        assert notification.title == "Export failed"
        assert "does not know the tensor" in notification.message
        assert "✖ Export failed" in str(app.query_one("#export-status").render())

    run_export(workspace, scenario)


def test_export_from_the_train_tab_preselects_the_run(workspace: Workspace) -> None:
    async def main() -> None:
        app = create_app(engine=engine_for(workspace), initial_tab="train")
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: app.shell_ready)
            train = app.query_one(TrainView)
            await wait_for(pilot, lambda: train.opened is not None and train.opened.run_id == FAILED)
            await pilot.press("e")
            await wait_for(pilot, lambda: bool(app.query(ExportView)))
            await wait_for(pilot, lambda: app.query_one("#export-run", Select).value == FAILED)
            await app.action_quit()

    asyncio.run(main())
