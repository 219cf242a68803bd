"""Write SVG screenshots of each TUI tab (80×24, realistic fake data) to assets/ for the README.

Run: `.venv/bin/python bench/tui_screenshots.py [--out assets]`. Uses the recorded runs and fake engines of
tests/fixtures/tui, so it needs no model and no GPU. The workspace is made at ~/tunes under a temporary home,
so the status line shows a path a reader could have rather than a temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "fixtures" / "tui"))

from tui_workspace import FAILED, FINISHED, engine_for, make_workspace, wait_for  # noqa: E402

from tui.app import create_app  # noqa: E402


async def shoot(workspace, out: Path, size: tuple[int, int]) -> list[Path]:
    """Drive the app through the four tabs and save one screenshot of each."""
    written = []
    app = create_app(engine=engine_for(workspace))
    async with app.run_test(size=size) as pilot:
        await wait_for(pilot, lambda: app.shell_ready)
        from tui.screens.chat import ChatView
        from tui.screens.dataset import DatasetView
        from tui.screens.export import ExportView, StageRow
        from tui.screens.train import TrainView

        dataset = app.query_one(DatasetView)
        await wait_for(
            pilot, lambda: dataset.document is not None and dataset.lint_version == dataset.document.version
        )
        await pilot.press("down", "down", "down", "down")
        await pilot.pause(0.5)
        written.append(Path(app.save_screenshot(str(out / "tui-dataset.svg"))))

        await pilot.press("2")
        await wait_for(
            pilot, lambda: bool(app.query(TrainView)) and app.query_one(TrainView).opened is not None
        )
        await pilot.pause(1.2)
        written.append(Path(app.save_screenshot(str(out / "tui-train.svg"))))
        train = app.query_one(TrainView)
        table = app.query_one("#runs-table")
        table.move_cursor(row=train._row_order.index(FAILED))
        await pilot.pause(0.8)
        written.append(Path(app.save_screenshot(str(out / "tui-train-failed.svg"))))

        await pilot.press("3")
        await wait_for(pilot, lambda: bool(app.query(ChatView)))
        chat = app.query_one(ChatView)
        await pilot.press(*"What is the capital of France?", "enter")
        await wait_for(pilot, lambda: chat.active_request is None and chat.state == "ready", 30)
        await pilot.press("ctrl+t")
        await pilot.press(*"What is the capital of France?", "enter")
        await wait_for(pilot, lambda: chat.active_request is None and chat.state == "ready", 30)
        await pilot.pause(0.5)
        written.append(Path(app.save_screenshot(str(out / "tui-chat.svg"))))

        await pilot.press("f4")  # digits would type into the chat input
        await wait_for(pilot, lambda: bool(app.query(ExportView)))
        export = app.query_one(ExportView)
        app.query_one("#export-run").value = FINISHED
        await pilot.pause(0.3)
        await pilot.press("x")
        # Mid-export: the pre-flight verdict, finished stages with their times, the current one with its ETA.
        await wait_for(pilot, lambda: "quantize:q5_1" in [row.stage for row in app.query(StageRow)], 30)
        await pilot.pause(0.4)
        written.append(Path(app.save_screenshot(str(out / "tui-export.svg"))))
        await wait_for(pilot, lambda: export.finished and export.report is not None, 60)
        # The parity report opens by itself; show a question where q4_0 ran away from the adapter's answer.
        answers = app.query_one("#parity-answers")
        runaway = next(i for i, row in enumerate(export.answers) if any(cell.runaway for cell in row.cells))
        answers.move_cursor(row=runaway)
        await pilot.pause(0.5)
        written.append(Path(app.save_screenshot(str(out / "tui-export-report.svg"))))

        await pilot.press("f10")
        await pilot.pause(0.5)
        written.append(Path(app.save_screenshot(str(out / "tui-help.svg"))))
        await app.action_quit()
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "assets")
    parser.add_argument("--width", type=int, default=80)
    parser.add_argument("--height", type=int, default=24)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["HOME"] = tmp
            # Slow enough that the export screenshot catches it mid-way.
            os.environ["FAKE_EXPORT_DELAY"] = "0.3"
            workspace = make_workspace(Path(tmp) / "tunes", trainer.pid)
            for path in asyncio.run(shoot(workspace, args.out, (args.width, args.height))):
                print(path)
    finally:
        trainer.kill()
        trainer.wait()


if __name__ == "__main__":
    main()
