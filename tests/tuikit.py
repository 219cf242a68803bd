"""Helpers for driving the Textual app in tests: headless (App.run_test at 80×24) and in real terminals (tmux)."""

from __future__ import annotations

import asyncio
import html
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
TERMINAL_SIZE = (80, 24)
# The width of one terminal cell in Textual's SVG screenshots.
SVG_CELL_WIDTH = 12.2


async def wait_for(
    pilot: Any, predicate: Callable[[], object], timeout: float = 15.0, what: str = ""
) -> None:
    """Let the app run until `predicate()` is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        await pilot.pause(0.05)


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `predicate()` outside an app until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def run_in_app(
    engine: Any,
    scenario: Callable[[Any, Any, Any], Awaitable[None]],
    *,
    tab: str = "dataset",
    ready: Callable[[Any], object] | None = None,
    quit_after: bool = False,
) -> Any:
    """Run `scenario(app, pilot, view)` in the app opened on `tab` at 80×24 once `ready(view)` holds, and return
    the app; with `quit_after` the app then quits as ctrl+q does (each tab shuts its engine down)."""
    from tui.app import create_app

    async def main() -> Any:
        app = create_app(engine=engine, initial_tab=tab)
        async with app.run_test(size=TERMINAL_SIZE) as pilot:
            await wait_for(pilot, lambda: app.shell_ready, what="the app's first tab")
            view = app.query_one(f"#{tab}-view")
            if ready is not None:
                await wait_for(pilot, lambda: ready(view), what=f"the {tab} tab to be ready")
            await scenario(app, pilot, view)
            if quit_after:
                await app.action_quit()
        return app

    return asyncio.run(main())


def screen_text(app: Any) -> str:
    """The visible screen as plain text lines (from the SVG screenshot): what a user would read."""
    rows: dict[float, dict[int, str]] = {}
    pattern = r'<text class="[^"]*" x="([\d.]+)" y="([\d.]+)" textLength="[\d.]+"[^>]*>(.*?)</text>'
    for match in re.finditer(pattern, app.export_screenshot(), re.S):
        text = html.unescape(match.group(3)).replace("\xa0", " ")
        if text == "\n":
            continue
        row = rows.setdefault(float(match.group(2)), {})
        column = round(float(match.group(1)) / SVG_CELL_WIDTH)
        for offset, char in enumerate(text):
            row[column + offset] = char
    lines = []
    for y in sorted(rows):
        row = rows[y]
        lines.append("".join(row.get(i, " ") for i in range(max(row) + 1)).rstrip())
    return "\n".join(lines)


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


async def start_run_from_form(app: Any, pilot: Any, recipe: Path, dataset: str) -> None:
    """In the Train tab, open the new-run form, pick `recipe`, wait until it resolves to `dataset` with no
    error, and press ctrl+s."""
    from textual.widgets import Select

    from tui.screens.new_run import NewRunScreen

    await pilot.press("n")
    await wait_for(pilot, lambda: isinstance(app.screen, NewRunScreen), what="the new-run form")
    form = app.screen
    form.query_one("#f-recipe", Select).value = str(recipe)
    await wait_for(
        pilot,
        lambda: form.resolved.get("data.dataset") == dataset and not form.error,
        what=f"{recipe.name} to resolve to {dataset}",
    )
    await pilot.press("ctrl+s")


def runs_table_glyphs(app: Any) -> dict[str, str]:
    """Run id → the status glyph the Train tab's runs table shows for it."""
    from textual.widgets import DataTable

    table = app.query_one("#runs-table", DataTable)
    return {str(key.value): str(table.get_cell(key, "glyph")) for key in table.rows}


def notifications(app: Any) -> list[Any]:
    """The app's notifications (title, message, severity), oldest first."""
    return list(app._notifications)


# A recipe that trains far longer than a tmux test watches it (the test stops it); its file name sorts after
# the workspace's other recipes, so End picks it in the new-run form's recipe list.
LONG_STEPS = 4000
LONG_RECIPE = "tiny_long"
LONG_SLUG = "tiny-long"  # how the recipe name appears in run ids


def write_long_recipe(workspace_root: Path) -> None:
    """recipes/tiny_long.toml: the workspace's tiny recipe, trained for LONG_STEPS epochs with frequent saves."""
    text = (workspace_root / "recipes" / "tiny.toml").read_text()
    text = re.sub(r"(?m)^epochs = .*$", f"epochs = {LONG_STEPS}", text)
    text = re.sub(r"(?m)^save_steps = .*$", "save_steps = 25", text)
    text = re.sub(r"(?m)^name = .*$", f'name = "{LONG_RECIPE}"', text)
    (workspace_root / "recipes" / f"{LONG_RECIPE}.toml").write_text(text)


class Tmux:
    """A private tmux server (own socket) running commands in 80×24 sessions, as a user's SSH terminal would."""

    def __init__(self, socket: str, config_dir: Path, terminal: str = "xterm-256color") -> None:
        self.socket = socket
        self.config = Path(config_dir) / "tmux.conf"
        self.config.write_text(
            f'set -g default-terminal "{terminal}"\nset -g status off\nset -sg escape-time 10\n'
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
        columns, lines = TERMINAL_SIZE
        self("new-session", "-d", "-s", session, "-x", str(columns), "-y", str(lines), f"exec {command}")

    def tui_command(self, workspace_root: Path) -> str:
        """The shell command that opens tunedeck's TUI on a workspace, from inside it as a user would."""
        root = shlex.quote(str(workspace_root))
        return (
            f"env -C {root} PYTHONPATH={shlex.quote(str(REPO_ROOT))} TUNEDECK_WORKSPACE={root} "
            f"{shlex.quote(sys.executable)} -m tui"
        )

    def pane_pid(self, session: str) -> int:
        return int(self("display-message", "-p", "-t", session, "#{pane_pid}").stdout.strip())

    def screen(self, session: str) -> str:
        return self("capture-pane", "-p", "-t", session, check=False).stdout

    def keys(self, session: str, *keys: str) -> None:
        for key in keys:
            self("send-keys", "-t", session, key)
            time.sleep(0.15)

    def type(self, session: str, text: str) -> None:
        """Type `text` literally (no key names)."""
        self("send-keys", "-t", session, "-l", text)

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

    def start_long_run_from_form(self, session: str) -> int:
        """In a TUI showing its first tab, start the long recipe from the new-run form; returns the first
        step shown."""
        self.keys(session, "2")
        self.wait_for(session, r"Runs")
        self.keys(session, "n")
        self.wait_for(session, r"New training run")
        time.sleep(0.5)
        self.keys(session, "Enter")
        self.wait_for(session, r"qlora-7b")  # the recipe list is open
        self.keys(session, "End", "Enter")
        self.wait_for(session, rf"recipe\s+{LONG_RECIPE}")
        self.keys(session, "C-s")
        self.wait_for(session, rf"{LONG_SLUG} running", timeout=60)
        return int(self.wait_for(session, rf"([1-9]\d*)/{LONG_STEPS}", timeout=180).group(1))

    def kill_server(self) -> None:
        self("kill-server", check=False)
