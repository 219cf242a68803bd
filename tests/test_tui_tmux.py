"""A real terminal (tmux, 80×24): open, edit a row, start a run, quit, reopen, see the run still going."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.dataset import load_pairs
from engine.launch import stop_run
from engine.workspace import Workspace, pid_alive

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
]

REPO = Path(__file__).resolve().parent.parent
# A recipe that trains far longer than the test watches it (the test stops it); its file name sorts last.
LONG_RECIPE = "tiny_long"
LONG_SLUG = "tiny-long"  # how the recipe name appears in run ids
LONG_STEPS = 4000


class Tmux:
    """One private tmux server (its own socket) whose sessions run the TUI in an 80×24 window."""

    def __init__(self, socket: str, terminal: str, tmp: Path) -> None:
        self.socket = socket
        self.config = tmp / "tmux.conf"
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

    def open_tui(self, session: str, workspace: Workspace) -> None:
        env = f"PYTHONPATH={REPO} TUNEDECK_WORKSPACE={workspace.root}"
        self(
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            "80",
            "-y",
            "24",
            f"cd {workspace.root} && env {env} {sys.executable} -m tui",
        )

    def screen(self, session: str) -> str:
        return self("capture-pane", "-p", "-t", session).stdout

    def keys(self, session: str, *keys: str) -> None:
        for key in keys:
            self("send-keys", "-t", session, key)
            time.sleep(0.15)

    def type(self, session: str, text: str) -> None:
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


@pytest.mark.parametrize("terminal", ["xterm-256color", "screen"])
def test_edit_train_quit_reopen_in_a_real_terminal(
    terminal: str, tiny_workspace: Workspace, tmp_path: Path
) -> None:
    recipe = (tiny_workspace.root / "recipes" / "tiny.toml").read_text()
    recipe = re.sub(r"(?m)^epochs = .*$", f"epochs = {LONG_STEPS}", recipe)
    recipe = re.sub(r"(?m)^save_steps = .*$", "save_steps = 25", recipe)
    recipe = re.sub(r"(?m)^name = .*$", f'name = "{LONG_RECIPE}"', recipe)
    (tiny_workspace.root / "recipes" / f"{LONG_RECIPE}.toml").write_text(recipe)
    dataset = tiny_workspace.datasets_dir / "tiny_qa.jsonl"
    tmux = Tmux(f"tunedeck-test-{os.getpid()}-{terminal}", terminal, tmp_path)
    run_dirs: list[Path] = []
    try:
        tmux.open_tui("first", tiny_workspace)
        tmux.wait_for("first", r"1 Dataset")
        tmux.wait_for("first", r"tiny_qa\.jsonl · 6 pairs")
        # Edit the first row's answer by keyboard; the file on disk changes.
        tmux.keys("first", "Enter")
        tmux.wait_for("first", r"Edit pair 1")
        tmux.keys("first", "Tab", "End")
        tmux.type("first", " Edited in tmux.")
        tmux.keys("first", "C-s")
        deadline = time.monotonic() + 20
        while not load_pairs(dataset)[0].answer.endswith("Edited in tmux.") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert load_pairs(dataset)[0].answer == "The sky is blue. Edited in tmux."
        tmux.wait_for("first", r"saved ✓")

        # Start a run from the form: the recipe list ends with the workspace's own recipes.
        tmux.keys("first", "2")
        tmux.wait_for("first", r"Runs")
        tmux.keys("first", "n")
        tmux.wait_for("first", r"New training run")
        time.sleep(0.5)
        tmux.keys("first", "Enter")
        tmux.wait_for("first", r"qlora-7b")  # the recipe list is open
        tmux.keys("first", "End", "Enter")
        tmux.wait_for("first", rf"recipe\s+{LONG_RECIPE}")
        tmux.keys("first", "C-s")
        tmux.wait_for("first", rf"{LONG_SLUG} running", timeout=60)
        first_step = int(tmux.wait_for("first", rf"(\d+)/{LONG_STEPS}", timeout=180).group(1))
        run_dirs += [p for p in tiny_workspace.list_run_dirs() if p.name.endswith(LONG_SLUG)]
        assert len(run_dirs) == 1
        pid = int((run_dirs[0] / "pid").read_text())

        # Quit: the TUI exits, the detached trainer does not.
        tmux.keys("first", "C-q")
        deadline = time.monotonic() + 15
        while tmux.alive("first") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not tmux.alive("first")
        assert pid_alive(pid)

        # Reopen: the same run shows, still running, further along.
        tmux.open_tui("second", tiny_workspace)
        tmux.wait_for("second", r"tiny_qa\.jsonl · 6 pairs")
        tmux.keys("second", "2")
        tmux.wait_for("second", r"Runs \(1\)")
        tmux.wait_for("second", rf"▶ \S+-{LONG_SLUG} running")
        step = int(tmux.wait_for("second", rf"(\d+)/{LONG_STEPS}").group(1))
        assert step >= first_step
        deadline = time.monotonic() + 60
        while step <= first_step + 2 and time.monotonic() < deadline:
            time.sleep(0.5)
            step = int(tmux.wait_for("second", rf"(\d+)/{LONG_STEPS}").group(1))
        assert step > first_step + 2, tmux.screen("second")
        screen = tmux.screen("second")
        assert len(screen.rstrip("\n").splitlines()) <= 24
        assert "┤" in screen  # the loss plot is drawn
        tmux.keys("second", "C-q")
    finally:
        for run_dir in run_dirs:
            stop_run(run_dir)
        tmux("kill-server", check=False)
