"""The SSH drop: the terminal running tunedeck dies mid-run (tmux session killed, or SIGHUP to the TUI, as sshd
sends when a connection drops); the detached trainer keeps training, and a new TUI shows the whole run again.

tests/test_tui_tmux.py covers quitting the TUI politely (ctrl+q); these tests kill its terminal instead.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.register_assert_rewrite("crashkit")

from crashkit.plugin import Trials, family  # noqa: E402
from tuikit import (  # noqa: E402
    LONG_RECIPE,
    LONG_STEPS,
    REPO_ROOT,
    Tmux,
    wait_until,
    write_long_recipe,
)

from engine.events import Step, read_events  # noqa: E402
from engine.launch import stop_run, wait_run  # noqa: E402
from engine.workspace import Workspace, pid_alive  # noqa: E402

pytest_plugins = ["crashkit.plugin", "crashkit.fixtures"]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
]


@pytest.fixture
def tmux(tiny_workspace: Workspace, tmp_path: Path) -> Iterator[Tmux]:
    """A private tmux server beside a tiny workspace that holds the long recipe; at the end the server is killed
    and every run in the workspace stopped."""
    write_long_recipe(tiny_workspace.root)
    server = Tmux(f"tunedeck-drop-{os.getpid()}", tmp_path)
    yield server
    server.kill_server()
    for run_dir in tiny_workspace.list_run_dirs():
        stop_run(run_dir)
        wait_run(run_dir, timeout=60)


def steps_logged(run_dir: Path) -> list[int]:
    return [event.step for event in read_events(run_dir / "events.jsonl") if isinstance(event, Step)]


def assert_keeps_training(run_dir: Path, trainer_pid: int) -> int:
    """The trainer is alive and events.jsonl grows by new steps; returns the newest step."""
    assert pid_alive(trainer_pid), "the trainer died with the terminal"
    size, newest = (run_dir / "events.jsonl").stat().st_size, max(steps_logged(run_dir))
    wait_until(lambda: max(steps_logged(run_dir)) >= newest + 3, 60, "three more steps after the drop")
    assert (run_dir / "events.jsonl").stat().st_size > size and pid_alive(trainer_pid)
    return max(steps_logged(run_dir))


def reattach_and_check(tmux: Tmux, session: str, workspace: Workspace, run_dir: Path, seen: int) -> int:
    """A new TUI lists the run as running and draws its progress and its loss curve from step 1."""
    tmux.start(session, tmux.tui_command(workspace.root))
    tmux.wait_for(session, r"1 Dataset")
    tmux.keys(session, "2")
    tmux.wait_for(session, r"Runs \(1\)")
    tmux.wait_for(session, rf"▶ {re.escape(run_dir.name)} running")
    shown = int(tmux.wait_for(session, rf"(\d+)/{LONG_STEPS}").group(1))
    assert shown >= seen
    screen = tmux.screen(session)
    assert "┤" in screen and "step 1" in screen, f"the loss plot starts at step 1:\n{screen}"
    return shown


@family("ssh-drop")
def test_killing_the_tuis_terminal_or_sighup_leaves_training_running_and_reattachable(
    tiny_workspace: Workspace, tmux: Tmux, trials: Trials
) -> None:
    tmux.start("first", tmux.tui_command(tiny_workspace.root))
    tmux.wait_for("first", r"1 Dataset")
    seen = tmux.start_long_run_from_form("first")
    run_dirs = tiny_workspace.list_run_dirs()
    assert len(run_dirs) == 1
    run_dir = run_dirs[0]
    trainer = int((run_dir / "pid").read_text())

    # Drop 1: the terminal disappears (tmux hangs up the pane, as sshd does when the connection drops).
    tui = tmux.pane_pid("first")
    tmux("kill-session", "-t", "first")
    wait_until(lambda: not pid_alive(tui), 15, "the TUI to exit with its terminal")
    seen = assert_keeps_training(run_dir, trainer)
    seen = reattach_and_check(tmux, "second", tiny_workspace, run_dir, seen)
    trials.case()

    # Drop 2: SIGHUP straight to the TUI process, its terminal left in place.
    tui = tmux.pane_pid("second")
    os.kill(tui, signal.SIGHUP)
    wait_until(lambda: not pid_alive(tui), 15, "the TUI to exit on SIGHUP")
    seen = assert_keeps_training(run_dir, trainer)
    reattach_and_check(tmux, "third", tiny_workspace, run_dir, seen)
    trials.case()

    steps = steps_logged(run_dir)
    assert steps == list(range(1, len(steps) + 1)), (
        "the run was never interrupted: one unbroken step sequence"
    )


@family("ssh-drop")
def test_killing_the_terminal_of_train_wait_detaches_and_training_goes_on(
    tiny_workspace: Workspace, tmux: Tmux, trials: Trials
) -> None:
    command = (
        f"env PYTHONPATH={REPO_ROOT} {sys.executable} -m engine.cli --workspace {tiny_workspace.root} "
        f"train {LONG_RECIPE} --wait"
    )
    tmux.start("cli", command)
    wait_until(lambda: tiny_workspace.list_run_dirs(), 60, "the run folder")
    run_dir = tiny_workspace.list_run_dirs()[0]
    wait_until(lambda: (run_dir / "events.jsonl").exists() and steps_logged(run_dir), 180, "the first step")
    tmux.wait_for("cli", rf"step [1-9]\d*/{LONG_STEPS}", timeout=60)  # the progress line is up
    waiter = tmux.pane_pid("cli")
    trainer = int((run_dir / "pid").read_text())
    tmux("kill-session", "-t", "cli")
    wait_until(lambda: not pid_alive(waiter), 15, "`tunedeck train --wait` to exit with its terminal")
    assert_keeps_training(run_dir, trainer)
    trials.case()
