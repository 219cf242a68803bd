"""`tunedeck` with no command (or `tunedeck tui`): open the terminal UI on the workspace."""

from __future__ import annotations

import argparse

HELP = "open the terminal UI (the default)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The TUI takes only the global --workspace option."""


def run(args: argparse.Namespace) -> int:
    """Build the app for the workspace and run it until the user quits."""
    from engine.workspace import Workspace
    from tui.app import create_app

    create_app(Workspace.open(getattr(args, "workspace", None))).run()
    return 0
