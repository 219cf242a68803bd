"""Helpers for driving the Textual app in reliability tests (App.run_test) and real terminals (tmux)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


async def wait_for(
    pilot: Any, predicate: Callable[[], object], timeout: float = 15.0, what: str = ""
) -> None:
    """Let the app run until `predicate()` is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        await pilot.pause(0.05)


def train_detail_text(app: Any) -> str:
    """The Train tab's run header, problem banner and metrics as plain text."""
    return " ".join(
        str(app.query_one(f"#{name}").render()) for name in ("run-header", "run-problem", "run-metrics")
    )


async def mounted(app: Any, pilot: Any, view_class: type) -> Any:
    """The app's view of `view_class` once its tab has been built (tabs are built after the app starts)."""
    await wait_for(pilot, lambda: app.query(view_class), what=f"the {view_class.__name__} to be built")
    return app.query_one(view_class)


async def open_in_train_tab(app: Any, pilot: Any, run_id: str) -> None:
    """Select `run_id` in the Train tab's runs table, as a user does with the arrow keys, and wait until it shows."""
    from textual.widgets import DataTable

    from tui.screens.train import RunDetail, TrainView

    view = app.query_one(TrainView)
    await wait_for(pilot, lambda: run_id in view._row_order, what=f"{run_id} in the runs table")
    app.query_one("#runs-table", DataTable).move_cursor(row=view._row_order.index(run_id))
    await wait_for(pilot, lambda: app.query_one(RunDetail).shown_run_id == run_id, what=f"{run_id} opened")


def runs_table_glyphs(app: Any) -> dict[str, str]:
    """Run id → the status glyph the Train tab's runs table shows for it."""
    from textual.widgets import DataTable

    table = app.query_one("#runs-table", DataTable)
    return {str(key.value): str(table.get_cell(key, "glyph")) for key in table.rows}


def notifications(app: Any) -> list[Any]:
    """The app's notifications (title, message, severity), oldest first."""
    return list(app._notifications)


class Tmux:
    """A private tmux server (own socket) running commands in 80×24 sessions, as a user's SSH terminal would."""

    def __init__(self, socket: str, config_dir: Path) -> None:
        self.socket = socket
        self.config = Path(config_dir) / "tmux.conf"
        self.config.write_text(
            'set -g default-terminal "xterm-256color"\nset -g status off\nset -sg escape-time 10\n'
        )

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-L", self.socket, "-f", str(self.config), *args],
            capture_output=True,
            text=True,
            check=check,
        )

    def start(self, session: str, command: str) -> None:
        """Open a detached 80×24 session running `command` (through `exec`, so the pane's pid is the program)."""
        self("new-session", "-d", "-s", session, "-x", "80", "-y", "24", f"exec {command}")

    def tui_command(self, workspace: Path) -> str:
        """The shell command that opens tunedeck's TUI on `workspace`."""
        return f"env PYTHONPATH={REPO_ROOT} TUNEDECK_WORKSPACE={workspace} {sys.executable} -m tui"

    def pane_pid(self, session: str) -> int:
        return int(self("display-message", "-p", "-t", session, "#{pane_pid}").stdout.strip())

    def screen(self, session: str) -> str:
        return self("capture-pane", "-p", "-t", session, check=False).stdout

    def keys(self, session: str, *keys: str) -> None:
        for key in keys:
            self("send-keys", "-t", session, key)
            time.sleep(0.15)

    def wait_for(self, session: str, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.screen(session))
            if match:
                return match
            time.sleep(0.2)
        raise AssertionError(f"{pattern!r} never appeared; the screen was:\n{self.screen(session)}")

    def alive(self, session: str) -> bool:
        return self("has-session", "-t", session, check=False).returncode == 0

    def kill_server(self) -> None:
        self("kill-server", check=False)
