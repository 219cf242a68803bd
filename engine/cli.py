"""The `tunedeck` command: opens the TUI by default and dispatches sub-commands to engine/commands/ modules."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from engine.errors import EngineError

# Sub-command name -> module under engine.commands; each is imported only when its command runs.
COMMANDS: dict[str, str] = {
    "init": "init",
    "demo": "demo",
    "train": "train",
    "runs": "runs",
    "logs": "logs",
    "data": "data",
    "chat": "chat",
    "export": "export",
    "doctor": "doctor",
    "recipes": "recipes",
    "tui": "tui",
}

BRIEF_HELP: dict[str, str] = {
    "init": "create a workspace folder",
    "demo": "prepare the demo workspace (SmolLM2-135M + demo dataset) and open the TUI",
    "train": "start (or resume) a detached training run",
    "runs": "list runs with status, step and loss",
    "logs": "show a run's events (--follow to keep watching)",
    "data": "lint, import or export Q/A datasets",
    "chat": "chat with a base model, an adapter or a GGUF file in the terminal",
    "export": "merge a run's adapter and write GGUF files (q4_0, q5_1, q8_0)",
    "doctor": "check python, torch, CUDA, bitsandbytes, llama-cpp-python and disk",
    "recipes": "list the shipped and workspace recipes",
    "tui": "open the terminal UI (the default)",
}


def _workspace_option(parser: argparse.ArgumentParser, *, default: object) -> None:
    parser.add_argument(
        "--workspace",
        "-w",
        type=Path,
        default=default,
        help="workspace folder (default: $TUNEDECK_WORKSPACE or the current folder)",
    )


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The top-level parser; only the sub-command being run has its module imported."""
    parser = argparse.ArgumentParser(
        prog="tunedeck", description="Fine-tune, chat with and export LLMs from a terminal."
    )
    _workspace_option(parser, default=None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        sub_parser = sub.add_parser(name, help=BRIEF_HELP[name], description=BRIEF_HELP[name])
        _workspace_option(sub_parser, default=argparse.SUPPRESS)
        if name == command:
            _load(name).add_arguments(sub_parser)
    return parser


def _load(name: str):
    return importlib.import_module(f"engine.commands.{COMMANDS[name]}")


def report_error(exc: EngineError) -> None:
    """Print an expected failure as title, cause and next step, without a traceback."""
    print(f"{exc.title}: {exc.message}", file=sys.stderr)
    if exc.next_step:
        print(f"  → {exc.next_step}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tunedeck` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if arg in COMMANDS), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.workspace is not None:
        os.environ["TUNEDECK_WORKSPACE"] = str(Path(args.workspace).expanduser().resolve())
    name = args.command or "tui"
    try:
        if args.command is None:
            _load("tui").add_arguments(argparse.ArgumentParser())
        return int(_load(name).run(args) or 0)
    except EngineError as exc:
        report_error(exc)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
