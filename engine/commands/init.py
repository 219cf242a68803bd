"""`tunedeck init [DIR]`: create a workspace folder (datasets/, models/, runs/, exports/)."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.workspace import Workspace

HELP = "create a workspace folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """DIR (default: --workspace, $TUNEDECK_WORKSPACE or the current folder)."""
    parser.add_argument(
        "dir", nargs="?", type=Path, help="the folder to make a workspace (created if missing)"
    )


def run(args: argparse.Namespace) -> int:
    """Create (or complete) the workspace and say what to do next."""
    target = args.dir if args.dir is not None else args.workspace
    workspace = Workspace.init(target) if target is not None else Workspace.open(None)
    print(f"Workspace ready: {workspace.root}")
    print("  Put Q/A datasets (JSONL) in datasets/, or import one: tunedeck data import FILE")
    print("  Try the demo model and dataset: tunedeck demo " + str(workspace.root))
    return 0
