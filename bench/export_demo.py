"""Times a whole demo export (SmolLM2-135M-Instruct + the demo-cpu adapter) and prints each stage's share.

Usage:
    python bench/export_demo.py                      # new workspace: prepare the demo, train demo-cpu, export
    python bench/export_demo.py --run RUN_DIR        # export an already trained run (skips training)
    python bench/export_demo.py --workspace DIR      # reuse a workspace (its newest finished demo-cpu run)

The export runs as `python -m engine.export` (exactly what the TUI and `tunedeck export` start); stage times
come from its Progress events and from report.json, so the process start and imports are counted too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from engine.events import Log, Progress, RunFailed, RunFinished, parse_event  # noqa: E402
from engine.workspace import Workspace, summarize_run  # noqa: E402


def trained_demo_run(workspace: Workspace) -> Path:
    """The newest finished demo-cpu run of `workspace`, training one when there is none."""
    for run_dir in reversed(workspace.list_run_dirs()):
        summary = summarize_run(run_dir)
        if summary.status == "finished" and summary.recipe == "demo-cpu":
            return run_dir
    from engine.demo import prepare_demo
    from engine.launch import start_run, wait_run

    started = time.monotonic()
    prepare_demo(workspace)
    print(f"demo model prepared in {time.monotonic() - started:.1f} s", flush=True)
    started = time.monotonic()
    run_dir = workspace.runs_dir / start_run(workspace, "demo-cpu")
    summary = wait_run(run_dir, timeout=7200)
    if summary.status != "finished":
        raise SystemExit(f"demo-cpu training ended {summary.status}: {summary.cause} (see {run_dir})")
    print(f"demo-cpu trained in {time.monotonic() - started:.1f} s ({summary.step} steps)", flush=True)
    return run_dir


def export(
    run_dir: Path,
    out: Path,
    quants: str,
    extra_args: list[str],
    log_path: Path | None = None,
    echo: bool = False,
) -> tuple[float, dict[str, float], dict[str, Any], list[dict[str, Any]]]:
    """Run `python -m engine.export`; returns its wall time, each stage's wall time from the Progress events,
    report.json, and the timeline of progress messages (where the time goes inside a stage).

    `echo` prints progress as it comes (long exports); the process's stderr goes to `log_path` if given.
    """
    command = [sys.executable, "-m", "engine.export", "--run-dir", str(run_dir), "--out", str(out), "--force"]
    command += ["--quant", quants, *extra_args]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    stage_start: dict[str, float] = {}
    stage_end: dict[str, float] = {}
    first_event: float | None = None
    outcome = None
    last_print = 0.0
    timeline: list[dict[str, Any]] = []
    with (
        open(log_path or os.devnull, "w", encoding="utf-8") as stderr,
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=REPO_ROOT
        ) as process,
    ):
        assert process.stdout is not None
        for line in process.stdout:
            event = parse_event(line)
            now = time.monotonic()
            if event is None:
                continue
            first_event = first_event if first_event is not None else now
            if isinstance(event, Progress):
                new_stage = event.stage not in stage_start
                if not timeline or (timeline[-1]["stage"], timeline[-1]["message"]) != (
                    event.stage,
                    event.message,
                ):
                    timeline.append(
                        {"t_s": round(now - started, 1), "stage": event.stage, "message": event.message}
                    )
                stage_start.setdefault(event.stage, now)
                if event.current >= event.total:
                    stage_end[event.stage] = now
                if echo and (new_stage or now - last_print > 30 or event.current >= event.total):
                    last_print = now
                    print(
                        f"  [{now - started:7.1f} s] {event.stage:<16} {event.current / event.total:4.0%}  "
                        f"{event.message}",
                        flush=True,
                    )
            elif isinstance(event, Log) and echo:
                print(f"  [{now - started:7.1f} s] log: {event.message}", flush=True)
            elif isinstance(event, (RunFinished, RunFailed)):
                outcome = event
    wall = time.monotonic() - started
    if not isinstance(outcome, RunFinished):
        detail = (
            f"{outcome.title}: {outcome.cause} {outcome.next_step}" if isinstance(outcome, RunFailed) else ""
        )
        raise SystemExit(
            f"export failed: {detail or 'no outcome'}" + (f" (see {log_path})" if log_path else "")
        )
    stages = {"process start + imports": (first_event or started) - started}
    stages.update({name: stage_end[name] - stage_start[name] for name in stage_start if name in stage_end})
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return wall, stages, report, timeline


def main() -> None:
    """Parse arguments, find or train the demo run, export it and print the breakdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, help="workspace to use (default: a new temporary one)")
    parser.add_argument("--run", type=Path, help="a trained run folder to export (skips training)")
    parser.add_argument("--quant", default="q4_0,q5_1,q8_0")
    parser.add_argument("--questions", type=int, default=30, help="parity questions per split")
    args = parser.parse_args()
    if args.run:
        run_dir = args.run.resolve()
    else:
        root = args.workspace or Path(tempfile.mkdtemp(prefix="tunedeck-bench-"))
        run_dir = trained_demo_run(Workspace.open(root))
    out = Path(tempfile.mkdtemp(prefix="tunedeck-export-bench-")) / "export"
    wall, stages, report, _ = export(run_dir, out, args.quant, ["--questions", str(args.questions)])

    print(
        f"\nDemo export of {run_dir.name} step {report['step']} ({report['parameters'] / 1e6:.1f}M "
        f"parameters, {report['architecture']}) on {os.cpu_count()} CPU cores"
    )
    print(f"{'stage':<26}{'seconds':>9}{'share':>8}")
    for name, seconds in stages.items():
        print(f"{name:<26}{seconds:>9.1f}{seconds / wall * 100:>7.0f}%")
    print(f"{'total (wall)':<26}{wall:>9.1f}")
    print(
        "\nfile sizes: "
        + ", ".join(f"{kind} {check['size_bytes'] / 1e6:.0f} MB" for kind, check in report["files"].items())
    )
    parity = report.get("parity") or {}
    for kind, summary in (parity.get("files") or {}).items():
        print(
            f"parity {kind}: agrees with the adapter on {summary['agreement'] * 100:.0f}% of "
            f"{parity['questions']} questions, {summary['tokens_per_s']:.0f} tok/s, "
            f"runaway {summary['runaway']}"
        )
    if parity:
        print(
            f"adapter (HF): {parity['adapter']['tokens_per_s']:.0f} tok/s, "
            f"similarity to reference {parity['adapter']['reference_similarity']:.2f}"
        )
    print(f"\nexport folder: {out}")


if __name__ == "__main__":
    main()
