"""A real terminal (tmux, 80×24): open, edit a row, start a run, quit, reopen, see the run still going."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from tuikit import LONG_SLUG, LONG_STEPS, Tmux, wait_until, write_long_recipe

from engine.dataset import load_pairs
from engine.launch import stop_run
from engine.workspace import Workspace, pid_alive

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
]


@pytest.mark.parametrize("terminal", ["xterm-256color", "screen"])
def test_edit_train_quit_reopen_in_a_real_terminal(
    terminal: str, tiny_workspace: Workspace, tmp_path: Path
) -> None:
    write_long_recipe(tiny_workspace.root)
    dataset = tiny_workspace.datasets_dir / "tiny_qa.jsonl"
    tmux = Tmux(f"tunedeck-test-{os.getpid()}-{terminal}", tmp_path, terminal)
    run_dirs: list[Path] = []
    try:
        tmux.start("first", tmux.tui_command(tiny_workspace.root))
        tmux.wait_for("first", r"1 Dataset")
        tmux.wait_for("first", r"tiny_qa\.jsonl · 6 pairs")
        # Edit the first row's answer by keyboard; the file on disk changes.
        tmux.keys("first", "Enter")
        tmux.wait_for("first", r"Edit pair 1")
        tmux.keys("first", "Tab", "End")
        tmux.type("first", " Edited in tmux.")
        tmux.keys("first", "C-s")
        wait_until(
            lambda: load_pairs(dataset)[0].answer.endswith("Edited in tmux."),
            20,
            "the edit to reach the file",
        )
        assert load_pairs(dataset)[0].answer == "The sky is blue. Edited in tmux."
        tmux.wait_for("first", r"saved ✓")

        # Start a run from the form: the recipe list ends with the workspace's own recipes.
        first_step = tmux.start_long_run_from_form("first")
        run_dirs += [p for p in tiny_workspace.list_run_dirs() if p.name.endswith(LONG_SLUG)]
        assert len(run_dirs) == 1
        pid = int((run_dirs[0] / "pid").read_text())

        # Quit: the TUI exits, the detached trainer does not.
        tmux.keys("first", "C-q")
        wait_until(lambda: not tmux.alive("first"), 15, "the TUI to quit")
        assert pid_alive(pid)

        # Reopen: the same run shows, still running, further along.
        tmux.start("second", tmux.tui_command(tiny_workspace.root))
        tmux.wait_for("second", r"tiny_qa\.jsonl · 6 pairs")
        tmux.keys("second", "2")
        tmux.wait_for("second", r"Runs \(1\)")
        tmux.wait_for("second", rf"▶ \S+-{LONG_SLUG} running")
        step = int(tmux.wait_for("second", rf"(\d+)/{LONG_STEPS}").group(1))
        assert step >= first_step
        wait_until(
            lambda: int(tmux.wait_for("second", rf"(\d+)/{LONG_STEPS}").group(1)) > first_step + 2,
            60,
            f"the step shown to pass {first_step + 2}",
        )
        screen = tmux.screen("second")
        assert len(screen.rstrip("\n").splitlines()) <= 24
        assert "┤" in screen  # the loss plot is drawn
        tmux.keys("second", "C-q")
    finally:
        for run_dir in run_dirs:
            stop_run(run_dir)
        tmux.kill_server()
