"""`tunedeck export RUN [--checkpoint N] [--quant …] [--out DIR] [--wait]`: a run's adapter as GGUF files.

The export folder goes to stdout (so `DIR=$(tunedeck export latest)` works); everything else to stderr. The
export runs as a detached `python -m engine.export` process (it survives a closed terminal or SSH session),
writing its events to <export dir>/events.jsonl. With --wait the command shows its progress and exits with
its outcome: 0 finished, 1 failed or interrupted; Ctrl-C detaches and leaves the export going.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from engine.commands.logs import ProgressLine, describe
from engine.events import Event, EventTail, RunFailed, RunFinished, RunStarted
from engine.export import (
    EVENTS_FILE,
    PID_FILE,
    STDERR_FILE,
    ExportOptions,
    add_export_arguments,
    check_export_dir,
    locate,
)
from engine.launch import REPO_ROOT, find_run
from engine.quantize import DEFAULT_QUANTS
from engine.workspace import Workspace, pid_alive

HELP = "merge a run's adapter and write GGUF files (q4_0, q5_1, q8_0)"
POLL_S = 0.25


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """RUN plus the export options and --wait."""
    parser.add_argument(
        "run",
        nargs="?",
        default="latest",
        help="run id, a unique part of it, a run folder, or latest (default)",
    )
    add_export_arguments(parser)
    parser.add_argument("--wait", action="store_true", help="show progress and wait for the export to end")


def _run_dir(args: argparse.Namespace) -> Path:
    candidate = Path(args.run).expanduser()
    if candidate.is_dir() and (candidate / "recipe.toml").is_file():
        return candidate.resolve()
    return find_run(Workspace.open(args.workspace, create=False), args.run)


def export_command(run_dir: Path, args: argparse.Namespace) -> list[str]:
    """The `python -m engine.export` command line for these options."""
    command = [
        sys.executable,
        "-P",
        "-m",
        "engine.export",
        "--run-dir",
        str(run_dir),
        "--quant",
        args.quant,
        "--questions",
        str(args.questions),
        "--max-new-tokens",
        str(args.max_new_tokens),
    ]
    for flag, value in (
        ("--checkpoint", args.checkpoint),
        ("--out", args.out),
        ("--base", args.base),
        ("--threads", args.threads),
    ):
        if value is not None:
            command += [flag, str(value)]
    command += ["--no-parity"] if args.no_parity else []
    command += ["--force"] if args.force else []
    return command


def spawn_export(command: list[str], export_dir: Path) -> int:
    """Start the export process detached (own session, no terminal); its stderr goes to the export folder."""
    export_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    paths = [str(REPO_ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with open(export_dir / STDERR_FILE, "ab") as stderr:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=str(REPO_ROOT),
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    return process.pid


def follow_export(export_dir: Path, pid: int, display: ProgressLine) -> Event | None:
    """Show the export's events until it reports its end (returned) or its process is gone (None)."""
    # events.jsonl keeps every attempt; this one's events start at the run_started carrying its pid.
    tail = EventTail(export_dir / EVENTS_FILE)
    ours = False
    while True:
        alive = pid_alive(pid)
        for event in tail.poll():
            ours = ours or (isinstance(event, RunStarted) and event.pid == pid)
            if not ours:
                continue
            display.show(event)
            if isinstance(event, (RunFinished, RunFailed)):
                return event
        if not alive:
            return None
        time.sleep(POLL_S)


def run(args: argparse.Namespace) -> int:
    """Check the request, start the export, print its folder, and optionally follow it."""
    run_dir = _run_dir(args)
    options = ExportOptions(
        run_dir=run_dir, checkpoint=args.checkpoint, out_dir=args.out, quants=list(DEFAULT_QUANTS)
    )
    # The cheap checks (run, checkpoint, quant names) fail here, before anything starts.
    _, _, _, _, step, export_dir = locate(options)
    from engine.quantize import parse_quant_types

    parse_quant_types(args.quant)
    check_export_dir(export_dir, force=args.force)
    pid = spawn_export(export_command(run_dir, args), export_dir)
    print(export_dir, flush=True)
    print(f"Exporting {run_dir.name} step {step} to {export_dir} (pid {pid})", file=sys.stderr)
    if not args.wait:
        print(
            f"  Follow it: tail -f {export_dir / EVENTS_FILE}   (or run the export with --wait)",
            file=sys.stderr,
        )
        return 0
    display = ProgressLine()
    try:
        end = follow_export(export_dir, pid, display)
    except KeyboardInterrupt:
        display.close()
        print(
            f"Detached; the export goes on (pid {pid}). Its events: {export_dir / EVENTS_FILE}",
            file=sys.stderr,
        )
        return 130
    display.close()
    if isinstance(end, RunFinished):
        outputs = end.outputs
        for kind, path in (outputs.get("files") or {}).items():
            print(f"  {kind:>6}  {path}", file=sys.stderr)
        print(f"  report  {outputs.get('report', '')}", file=sys.stderr)
        print(f"  Ollama  cd {export_dir} && ollama create NAME -f Modelfile", file=sys.stderr)
        return 0
    if isinstance(end, RunFailed):
        return 1
    left = (export_dir / PID_FILE).exists()
    print(
        f"The export process ended without reporting an outcome{' (it was killed?)' if left else ''}; "
        f"see {export_dir / STDERR_FILE}. {describe(end) if end else ''}".rstrip(),
        file=sys.stderr,
    )
    return 1
