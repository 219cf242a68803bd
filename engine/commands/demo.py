"""`tunedeck demo [DIR]`: a workspace with SmolLM2-135M-Instruct and the demo Q/A set, then the TUI."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.commands.logs import ProgressLine
from engine.workspace import Workspace

HELP = "prepare the demo workspace (SmolLM2-135M + demo dataset) and open the TUI"
DEFAULT_DIR = Path("workspace")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """DIR (default ./workspace) and --no-tui."""
    parser.add_argument("dir", nargs="?", type=Path, help="workspace folder (default: ./workspace)")
    parser.add_argument("--no-tui", action="store_true", help="prepare everything but do not open the TUI")


def run(args: argparse.Namespace) -> int:
    """Prepare the demo model and dataset (with progress on stderr) and open the TUI on the workspace."""
    from engine.demo import prepare_demo_dataset, prepare_demo_model

    target = args.dir or args.workspace or DEFAULT_DIR
    workspace = Workspace.init(target)
    dataset = prepare_demo_dataset(workspace)
    display = ProgressLine(interval_s=0.0)
    try:
        model = prepare_demo_model(workspace, display)
    finally:
        display.close()
    print(f"Demo ready in {workspace.root}:\n  model   {model}\n  dataset {dataset}", file=sys.stderr)
    if args.no_tui:
        _print_next_steps(workspace)
        return 0
    try:
        from tui import app as tui_app
    except ImportError as exc:
        print(f"The terminal UI is not available here ({exc}).", file=sys.stderr)
        _print_next_steps(workspace)
        return 0
    runner = getattr(tui_app, "run_app", None)
    if runner is not None:
        runner(workspace)
    else:
        tui_app.create_app(workspace).run()
    return 0


def _print_next_steps(workspace: Workspace) -> None:
    print(
        "Train the demo (about four minutes on a 2-core CPU):\n"
        f"  tunedeck --workspace {workspace.root} train demo-cpu --wait\n"
        f"Then chat with it: tunedeck --workspace {workspace.root} chat --run RUN (the id train printed)",
        file=sys.stderr,
    )
