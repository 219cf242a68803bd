"""`tunedeck train RECIPE [key=value…] [--gpus N|all] [--wait] [--resume RUN]`: start or resume a detached run.

The run id goes to stdout (so `RUN=$(tunedeck train demo-cpu)` works); everything else to stderr. Without
--wait the command returns at once and the run goes on in the background, surviving a closed terminal or SSH
session. `--gpus 2` (the same as `train.gpus=2`) trains on two GPUs, one process each, through accelerate. With
--wait it shows a progress line until the run ends and exits with the run's outcome:
0 finished, 1 failed or interrupted, 3 stopped; Ctrl-C detaches and leaves the run going.
"""

from __future__ import annotations

import argparse
import sys
import time

from engine.commands.logs import ProgressLine, follow_run
from engine.errors import RecipeError
from engine.launch import find_run, resume_run, run_pid, start_run
from engine.workspace import Workspace

HELP = "start (or resume) a detached training run"
EXIT_CODES = {"finished": 0, "stopped": 3}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """RECIPE, overrides, --wait and --resume."""
    parser.add_argument("recipe", nargs="?", help="recipe name (see `tunedeck recipes`) or a .toml path")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. train.epochs=4"
    )
    parser.add_argument(
        "--gpus",
        metavar="N|all",
        help="train on N GPUs (or all visible ones) through accelerate; the same as train.gpus=N",
    )
    parser.add_argument("--wait", action="store_true", help="show progress and wait for the run to end")
    parser.add_argument("--resume", metavar="RUN", help="continue RUN from its newest checkpoint")


def run(args: argparse.Namespace) -> int:
    """Start or resume the run, print its id, and optionally follow it."""
    workspace = Workspace.open(args.workspace)
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe and "=" in recipe and not recipe.endswith(".toml"):
        recipe, overrides = None, [recipe, *overrides]
    if args.gpus:
        overrides.append(f"train.gpus={args.gpus}")
    since = time.time()
    if args.resume:
        run_id = resume_run(workspace, args.resume, recipe, overrides)
        verb = "Resumed"
    else:
        if not recipe:
            raise RecipeError(
                "Name a recipe to train, e.g. `tunedeck train demo-cpu`.",
                next_step="List them with `tunedeck recipes`, or resume a run with --resume RUN.",
            )
        run_id = start_run(workspace, recipe, overrides)
        verb = "Started"
    run_dir = find_run(workspace, run_id)
    print(run_id, flush=True)
    print(f"{verb} run {run_id} (pid {run_pid(run_dir)}) in {run_dir}", file=sys.stderr)
    if not args.wait:
        print(f"  Follow it: tunedeck logs {run_id} --follow", file=sys.stderr)
        return 0
    display = ProgressLine()
    try:
        summary = follow_run(run_dir, display.show, since=since - 1)
    except KeyboardInterrupt:
        display.close()
        print(
            f"Detached; run {run_id} goes on. Watch it with `tunedeck logs {run_id} --follow`; "
            f"stop it with `kill {run_pid(run_dir)}` (it saves a checkpoint first).",
            file=sys.stderr,
        )
        return 130
    display.close()
    if summary.status == "interrupted":
        print(f"The trainer exited without reporting an end. {summary.next_step}", file=sys.stderr)
    return EXIT_CODES.get(summary.status, 1)
