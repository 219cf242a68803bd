"""The app shell: tabs by key at 80×24, help, palette, status line, failures, import hygiene, entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures" / "tui"))

from textual import work
from textual.widgets import Input
from tui_workspace import engine_for, make_workspace
from tuikit import run_in_app, screen_text, wait_for

from engine.errors import DiskFullError
from engine.workspace import Workspace
from tui.app import TunedeckApp
from tui.screens.modals import ErrorScreen, HelpScreen
from tui.widgets.status_line import StatusLine

REPO = Path(__file__).resolve().parent.parent
HEAVY_MODULES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "llama_cpp")


def test_opens_at_80x24_with_tabs_status_line_and_footer(tmp_path: Path, live_pid: int) -> None:
    workspace = make_workspace(tmp_path / "ws", live_pid)

    async def scenario(app, pilot, view) -> None:
        await wait_for(pilot, lambda: app.query_one(StatusLine).run is not None)
        await wait_for(pilot, lambda: "? Help" in screen_text(app))
        text = screen_text(app)
        assert "1 Dataset" in text and "2 Train" in text and "3 Chat" in text and "4 Export" in text
        assert str(tmp_path / "ws")[-20:] in text or "ws" in text
        # The running recorded run is the active one until the Train tab opens another.
        assert "running" in app.query_one(StatusLine).render().plain
        assert "? Help" in text and "^q Quit" in text
        assert len(text.splitlines()) == 24

    run_in_app(engine_for(workspace), scenario)


def test_number_and_function_keys_switch_tabs_but_type_into_inputs(tmp_path: Path) -> None:
    workspace = Workspace.init(tmp_path / "ws")

    async def scenario(app, pilot, view) -> None:
        for key, tab in (
            ("2", "train"),
            ("4", "export"),
            ("1", "dataset"),
            ("f3", "chat"),
            ("f2", "train"),
            ("f1", "dataset"),
            ("f4", "export"),
            ("3", "chat"),
        ):
            await pilot.press(key)
            await pilot.pause()
            assert app.active_tab == tab, key
        chat_input = app.query_one("#chat-input", Input)
        await wait_for(pilot, lambda: chat_input.has_focus)
        await pilot.press("2", "4")
        assert app.active_tab == "chat"
        assert chat_input.value == "24"
        await pilot.press("f2")
        assert app.active_tab == "train"

    run_in_app(engine_for(workspace), scenario)


def test_tabs_other_than_the_first_are_built_on_first_show(tmp_path: Path) -> None:
    workspace = Workspace.init(tmp_path / "ws")

    async def scenario(app, pilot, view) -> None:
        assert not app.query("#train-view")
        await pilot.press("2")
        await wait_for(pilot, lambda: bool(app.query("#train-view")))

    run_in_app(engine_for(workspace), scenario)


def test_help_lists_the_keys_of_every_tab(tmp_path: Path) -> None:
    workspace = Workspace.init(tmp_path / "ws")

    async def scenario(app, pilot, view) -> None:
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
        assert "Everywhere" in screen_text(app)
        help_text = " ".join(
            f"{title}: " + " ".join(binding.description for binding in bindings)
            for title, bindings in app.screen.sections
        )
        for expected in (
            "Dataset tab",
            "Train: New run",
            "Stop reply",
            "Compare",
            "Export",
            "Undo",
            "Filter",
        ):
            assert expected in help_text, expected
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, HelpScreen))

    run_in_app(engine_for(workspace), scenario)


def test_command_palette_offers_every_tab_action(tmp_path: Path) -> None:
    workspace = Workspace.init(tmp_path / "ws")

    async def scenario(app, pilot, view) -> None:
        await pilot.press("2")
        await wait_for(pilot, lambda: bool(app.query("#train-view")))
        titles = [command.title for command in app.get_system_commands(app.screen)]
        assert "Go to Chat" in titles
        assert "Train: New run" in titles
        assert "Dataset: Add" in titles
        await pilot.press("ctrl+p")
        await pilot.pause(0.3)
        assert app.screen.__class__.__name__ == "CommandPalette"
        await pilot.press(*"go to export")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.active_tab == "export")

    run_in_app(engine_for(workspace), scenario)


def test_an_engine_error_in_a_worker_becomes_a_titled_notification(tmp_path: Path) -> None:
    workspace = Workspace.init(tmp_path / "ws")

    async def scenario(app, pilot, view) -> None:
        @work(thread=True, exit_on_error=False)
        def failing(self) -> None:
            raise DiskFullError(
                "The disk filled up while writing x.jsonl; the previous version is untouched.",
                next_step="Free some disk space and try again.",
            )

        failing(view)
        await wait_for(pilot, lambda: bool(app._notifications))
        notification = list(app._notifications)[-1]
        assert notification.title == "Disk full"
        assert notification.message.startswith("The disk filled up while writing x.jsonl")
        assert "→ Free some disk space" in notification.message
        assert notification.severity == "error"

    run_in_app(engine_for(workspace), scenario)


def test_an_unexpected_error_opens_a_modal_and_logs_the_traceback(tmp_path: Path) -> None:
    workspace = Workspace.init(tmp_path / "ws")

    async def scenario(app, pilot, view) -> None:
        @work(thread=True, exit_on_error=False)
        def buggy(self) -> None:
            raise KeyError("question")

        buggy(view)
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorScreen))
        assert app.screen.failure.title == "Unexpected error"
        assert "KeyError" in app.screen.failure.message
        log = workspace.root / ".tunedeck" / "logs" / "tui-errors.log"
        assert "KeyError: 'question'" in log.read_text()
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, ErrorScreen))

    run_in_app(engine_for(workspace), scenario)


def test_quit_key_exits(tmp_path: Path) -> None:
    workspace = Workspace.init(tmp_path / "ws")

    async def scenario(app, pilot, view) -> None:
        await pilot.press("ctrl+q")
        await pilot.pause(0.2)

    app = run_in_app(engine_for(workspace), scenario)
    assert app.return_code == 0


def test_the_tui_never_imports_the_ml_stack(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "import tui.app\n"
        "from tui.app import TABS, _view_class\n"
        "for _, _, path in TABS: _view_class(path)\n"
        "import tui.screens.new_run, tui.screens.edit_pair, tui.screens.chat_settings, tui.screens.modals\n"
        "from engine.workspace import Workspace\n"
        "from tui.engine_client import EngineClient\n"
        f"engine = EngineClient(Workspace.init({str(tmp_path / 'ws')!r}))\n"
        "engine.launcher\n"
        f"print(','.join(m for m in {HEAVY_MODULES!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert result.stdout.strip() == "", f"the TUI imported {result.stdout.strip()}"
    for source in (REPO / "tui").rglob("*.py"):
        for line in source.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")):
                module = stripped.split()[1].split(".")[0]
                assert module not in HEAVY_MODULES, f"{source}: {stripped}"


def test_cli_and_module_entry_points_share_the_factory(tmp_path: Path) -> None:
    import argparse

    from engine.commands import tui as tui_command

    parser = argparse.ArgumentParser()
    tui_command.add_arguments(parser)
    assert tui_command.HELP
    opened: list[TunedeckApp] = []

    class Recorder(TunedeckApp):
        def run(self, *args, **kwargs):
            opened.append(self)

    import tui.app as app_module

    original = app_module.TunedeckApp
    app_module.TunedeckApp = Recorder
    try:
        assert tui_command.run(argparse.Namespace(workspace=tmp_path / "ws")) == 0
    finally:
        app_module.TunedeckApp = original
    assert opened and opened[0].workspace.root == (tmp_path / "ws").resolve()
    assert (tmp_path / "ws" / "tunedeck.toml").exists()


def test_runs_under_the_web_driver_that_textual_serve_uses(tmp_path: Path) -> None:
    """`textual serve "python -m tui.app"` runs the module with the web driver; it must start and draw."""
    workspace = Workspace.init(tmp_path / "ws")
    env = dict(
        os.environ,
        TEXTUAL_DRIVER="textual.drivers.web_driver:WebDriver",
        TUNEDECK_WORKSPACE=str(workspace.root),
        COLUMNS="80",
        LINES="24",
        PYTHONPATH=str(REPO),
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "tui.app"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    try:
        output = b""
        import select
        import time

        deadline = time.monotonic() + 20
        while b"Dataset" not in output and time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], 0.5)
            if ready:
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    break
                output += chunk
        assert b"Dataset" in output, (
            process.stderr.read1(4000) if process.poll() is not None else output[:400]
        )
    finally:
        process.kill()
        process.wait()
