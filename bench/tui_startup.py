"""TUI responsiveness: cold start to first frame, and key latency while 200 events/s stream into a viewed run.

Run: `.venv/bin/python bench/tui_startup.py` (targets: first frame ≤ 0.3 s, key latency ≤ 50 ms).

Every measurement runs in a fresh interpreter, headless at 80×24, and the candidates take turns round by round
(a bare two-widget Textual app, this tunedeck, and with `--before DIR` an earlier copy of tui/ and engine/, e.g.
`mkdir /tmp/before && git archive HEAD tui engine | tar -x -C /tmp/before`), so a busy machine slows them
alike. A frame counts when Textual hands the screen update to the driver (App._display); each time is given as
wall clock and as the process's CPU time, which other load on the machine disturbs less.

- first frame: from the interpreter's first line (imports included) to the first screen update;
- dataset rows: to the first update showing the Dataset tab's table filled (read by a worker thread);
- key latency: from a key press (the Train tab's log toggle) to the screen update showing it, sampled while a
  fake trainer appends 200 events/s to the run the Train tab follows.

By default the sources are byte-compiled once (into a temporary PYTHONPYCACHEPREFIX), as an installed copy is;
`--no-bytecode` sets PYTHONDONTWRITEBYTECODE=1 instead, so each start compiles tunedeck's modules again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "tui"
BASELINE = "textual"

# Patches App._display before anything else runs, so both probes time frames the same way.
FRAME_HOOK = """
import sys, time, json
started, cpu_started = time.perf_counter(), time.process_time()
from textual.app import App
marks = {}
_display = App._display

def _timed_display(self, screen, renderable):
    _display(self, screen, renderable)
    if renderable is None or self._batch_count:
        return
    now = {"wall": time.perf_counter() - started, "cpu": time.process_time() - cpu_started}
    marks.setdefault("first_frame", now)
    check = getattr(self, "_bench_check", None)
    if check is not None and check(self):
        marks["rows"] = now
    if set(marks) >= MARKS:
        self.exit()

App._display = _timed_display
"""

BASELINE_PROBE = (
    FRAME_HOOK
    + """
MARKS = {"first_frame"}
from textual.widgets import Footer, Static


class Hello(App):
    def compose(self):
        yield Static("hello")
        yield Footer()


Hello().run(headless=True, size=(80, 24))
print(json.dumps(marks))
"""
)

TUNEDECK_PROBE = (
    FRAME_HOOK
    + """
MARKS = {"first_frame", "rows"}
sys.path.insert(0, {root!r})
from tui.app import create_app
from engine.workspace import Workspace

app = create_app(Workspace.open({workspace!r}))

def rows_shown(app):
    tables = app.query("#ds-table")
    return bool(tables) and tables.first().row_count > 0

app._bench_check = rows_shown
app.run(headless=True, size=(80, 24))
print(json.dumps(marks))
"""
)


def probe_env(bytecode_dir: Path | None) -> dict[str, str]:
    """The probes' environment: shared bytecode in `bytecode_dir`, or none written at all."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if bytecode_dir is None:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
    else:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(bytecode_dir)
    return env


def run_probe(code: str, env: dict[str, str], cwd: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=cwd
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def cold_starts(
    roots: dict[str, Path], workspace: Path, repeats: int, env: dict[str, str], cwd: Path
) -> dict[str, list[dict]]:
    """Each candidate's probe results, the candidates taking turns in every round."""
    probes = {BASELINE: BASELINE_PROBE}
    for name, root in roots.items():
        probes[name] = TUNEDECK_PROBE.replace("{root!r}", repr(str(root))).replace(
            "{workspace!r}", repr(str(workspace))
        )
    for code in probes.values():
        run_probe(code, env, cwd)  # warm-up: compiles the bytecode (when kept) and fills the disk cache
    results: dict[str, list[dict]] = {name: [] for name in probes}
    for _ in range(repeats):
        for name, code in probes.items():
            results[name].append(run_probe(code, env, cwd))
    return results


async def key_latency(root: Path, workspace_root: Path, rate: float, samples: int) -> dict:
    """Key-to-screen-update latencies (ms) while a fake trainer streams `rate` events/s; and events seen."""
    sys.path.insert(0, str(FIXTURES))
    from textual import events
    from tui_workspace import FAKE_TRAINER, engine_for, wait_for

    # After the fixtures (which put this repository on the path): `tui` comes from the candidate's tree.
    sys.path.insert(0, str(root))

    from engine.workspace import Workspace
    from tui.app import create_app
    from tui.screens.train import RunDetail, TrainView

    workspace = Workspace.open(workspace_root)
    run_dir = workspace.runs_dir / "20261123-140000-stream"
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = subprocess.Popen(
        [
            sys.executable,
            str(FAKE_TRAINER),
            "--run-dir",
            str(run_dir),
            "--steps",
            "1000000",
            "--rate",
            str(rate),
        ]
    )
    latencies: list[float] = []
    try:
        app = create_app(engine=engine_for(workspace), initial_tab="train")
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: app.shell_ready)
            view = app.query_one(TrainView)
            await wait_for(pilot, lambda: view.opened is not None and view.opened.run_id == run_dir.name)
            log = app.query_one(RunDetail).query_one("#run-log")
            await pilot.pause(1.0)
            loop = asyncio.get_running_loop()
            for _ in range(samples):
                before = str(log.styles.height)
                pressed = time.perf_counter()
                # The key goes in as the terminal driver delivers it; latency ends when the frame showing it
                # is drawn.
                app.post_message(events.Key("l", "l"))
                while str(log.styles.height) == before:
                    await asyncio.sleep(0.001)
                drawn = loop.create_future()
                app.call_after_refresh(lambda future=drawn: future.done() or future.set_result(None))
                await drawn
                latencies.append((time.perf_counter() - pressed) * 1000)
                await asyncio.sleep(0.1)
            seen = view.opened.event_count
            app.exit()
    finally:
        trainer.kill()
        trainer.wait()
    return {"latencies_ms": latencies, "events": seen}


def latency_in_subprocess(
    root: Path, workspace: Path, rate: float, samples: int, env: dict[str, str]
) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--latency-probe",
        str(root),
        "--workspace",
        str(workspace),
        "--rate",
        str(rate),
        "--samples",
        str(samples),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env, cwd=workspace)
    return json.loads(result.stdout.strip().splitlines()[-1])


def stats(values: list[float], digits: int = 3) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": round(statistics.median(ordered), digits),
        "p95": round(ordered[max(0, int(len(ordered) * 0.95 + 0.5) - 1)], digits),
        "max": round(ordered[-1], digits),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="cold starts per candidate")
    parser.add_argument("--rate", type=float, default=200.0, help="events per second while keys are pressed")
    parser.add_argument("--samples", type=int, default=40, help="key presses per candidate")
    parser.add_argument(
        "--before", type=Path, default=None, help="an earlier tree (tui/ and engine/) to compare"
    )
    parser.add_argument("--no-bytecode", action="store_true", help="compile the sources on every start")
    parser.add_argument("--skip-latency", action="store_true", help="measure cold start only")
    parser.add_argument("--latency-probe", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workspace", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.latency_probe is not None:
        print(
            json.dumps(asyncio.run(key_latency(args.latency_probe, args.workspace, args.rate, args.samples)))
        )
        return
    sys.path.insert(0, str(FIXTURES))
    from tui_workspace import make_workspace

    roots = {"tunedeck": REPO}
    if args.before is not None:
        roots = {"before": args.before.resolve(), "after": REPO}
    report: dict = {"bytecode": not args.no_bytecode, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        bytecode_dir = None if args.no_bytecode else Path(tmp) / "pycache"
        env = probe_env(bytecode_dir)
        workspace = Path(tmp) / "ws"
        make_workspace(workspace, 0)
        starts = cold_starts(roots, workspace, args.repeats, env, Path(tmp))
        for name, results in starts.items():
            entry = {"first_frame_s": stats([r["first_frame"]["wall"] for r in results])}
            entry["first_frame_cpu_s"] = stats([r["first_frame"]["cpu"] for r in results])
            if name != BASELINE:
                entry["dataset_rows_s"] = stats([r["rows"]["wall"] for r in results])
                entry["dataset_rows_cpu_s"] = stats([r["rows"]["cpu"] for r in results])
            report[name] = entry
        if not args.skip_latency:
            rounds = 2
            collected: dict[str, list[float]] = {name: [] for name in roots}
            seen: dict[str, int] = dict.fromkeys(roots, 0)
            for _ in range(rounds):
                for name, root in roots.items():
                    probe_ws = Path(tmp) / f"ws-latency-{name}"
                    if not probe_ws.exists():
                        make_workspace(probe_ws, 0, runs=("finished",), dataset=False)
                    result = latency_in_subprocess(root, probe_ws, args.rate, args.samples // rounds, env)
                    collected[name] += result["latencies_ms"]
                    seen[name] += result["events"]
            for name in roots:
                report[name]["key_latency_ms"] = stats(collected[name], 1)
                report[name]["events_streamed"] = seen[name]
    print(
        f"cold start to first frame, median of {args.repeats} "
        f"({'byte-compiled' if report['bytecode'] else 'compiled on every start'}; wall / CPU):"
    )
    for name in report:
        if isinstance(report[name], dict):
            entry = report[name]
            frame, frame_cpu = entry["first_frame_s"]["median"], entry["first_frame_cpu_s"]["median"]
            line = f"  {name:<9} first frame {frame:.3f} s / {frame_cpu:.3f} s"
            if "dataset_rows_s" in entry:
                line += (
                    f"   dataset rows {entry['dataset_rows_s']['median']:.3f} s / "
                    f"{entry['dataset_rows_cpu_s']['median']:.3f} s"
                )
            if "key_latency_ms" in entry:
                latency = entry["key_latency_ms"]
                line += f"   key latency median {latency['median']} ms (p95 {latency['p95']} ms)"
            print(line)
    print("targets: first frame ≤ 0.3 s, key latency ≤ 50 ms with 200 events/s streaming")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
