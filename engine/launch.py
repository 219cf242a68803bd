"""Starting, resuming, stopping and waiting for detached training runs (`python -m engine.train`).

Standard library only (plus the pure engine modules), so the TUI and CLI start runs without importing the ML
stack. Everything that can be checked before spawning is checked here, so a bad recipe, a missing dataset or a
missing model folder fails at once in one sentence instead of inside a background process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engine.atomic import atomic_directory, atomic_write_text
from engine.distributed import launcher_command, wants_launcher
from engine.errors import DatasetError, ResumeError, WorkspaceError
from engine.modeling import DEMO_BASE, check_model_folder, is_local_model, resolve_base_model
from engine.recipes import Recipe, find_recipe, load_recipe
from engine.workspace import (
    RUN_LOG_FILE,
    RUN_META_FILE,
    RUN_PID_FILE,
    RUN_RECIPE_FILE,
    RunSummary,
    Workspace,
    latest_checkpoint,
    pid_alive,
    summarize_run,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_MODULE = "engine.train"
# Processes this interpreter started, kept so they can be reaped (no zombies in a long-lived TUI).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """A dataset file as a run recorded it: where, which bytes (sha256) and how many rows."""

    path: str
    sha256: str
    rows: int

    @property
    def name(self) -> str:
        """The file name, as messages show it."""
        return Path(self.path).name


def _as_workspace(workspace: Workspace | Path | str) -> Workspace:
    return workspace if isinstance(workspace, Workspace) else Workspace.open(Path(workspace))


def resolve_dataset(workspace: Workspace, name: str) -> Path:
    """The dataset file a recipe names: a file in datasets/, else a path (absolute, or relative to the current
    folder or the workspace); DatasetError listing the available files when none exists."""
    candidate = Path(name).expanduser()
    places = (
        [candidate]
        if candidate.is_absolute()
        else [workspace.datasets_dir / candidate, Path.cwd() / candidate, workspace.root / candidate]
    )
    for place in places:
        if place.is_file():
            return place.resolve()
    available = ", ".join(p.name for p in workspace.list_datasets()) or "none yet"
    raise DatasetError(
        f"There is no dataset {name!r} in {workspace.datasets_dir}.",
        next_step=f"Set data.dataset to one of: {available} (or a path), or `tunedeck data import` one.",
    )


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_info(path: Path) -> DatasetInfo:
    """Validate a dataset (every bad line is reported) and describe it for run.json."""
    from engine.dataset import load_pairs

    pairs = load_pairs(path)
    if not pairs:
        raise DatasetError(
            f"The dataset {Path(path).name} has no question/answer pairs.",
            next_step="Add pairs in the Dataset tab or with `tunedeck data import`.",
        )
    return DatasetInfo(str(Path(path).resolve()), sha256_file(path), len(pairs))


def recipe_path_for(workspace: Workspace, recipe: str | Path) -> Path:
    """A recipe file from a path or a shipped/workspace recipe name."""
    candidate = Path(recipe).expanduser()
    if candidate.suffix == ".toml" and candidate.is_file():
        return candidate.resolve()
    return find_recipe(str(recipe), workspace.root)


def check_base_model(workspace: Workspace, recipe: Recipe) -> str:
    """Resolve the recipe's base model now, so a missing local folder fails before spawning."""
    base = recipe.model.base.strip()
    if base == DEMO_BASE:
        return base  # the trainer prepares the demo model on first use
    resolved = resolve_base_model(base, workspace)
    if is_local_model(resolved):
        check_model_folder(Path(resolved))
    return resolved


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def recipe_differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """`section.key: old → new` for each field that differs between two recipe dicts (not the description)."""
    old, new = _flatten(before), _flatten(after)
    changes = []
    for key in sorted(set(old) | set(new)):
        if key == "description" or old.get(key) == new.get(key):
            continue
        changes.append(f"{key}: {_show(old.get(key))} → {_show(new.get(key))}")
    return changes


def _show(value: Any) -> str:
    if value is None:
        return "(unset)"
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (str, list)) else str(value)
    return text if len(text) <= 40 else text[:37] + "…"


def _run_label(recipe: Recipe) -> str:
    return recipe.name or "run"


def read_run_meta(run_dir: Path) -> dict[str, Any]:
    """The run.json of a run folder (what it was started with)."""
    path = Path(run_dir) / RUN_META_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WorkspaceError(
            f"{Path(run_dir).name} has no {RUN_META_FILE}, so it is not a tunedeck run.",
            next_step="Start runs with `tunedeck train RECIPE` or from the Train tab.",
        ) from None
    except ValueError:
        raise WorkspaceError(
            f"{path} is not valid JSON.", next_step="Restore it, or start a new run."
        ) from None


def prepare_run(workspace: Workspace | Path | str, recipe: str | Path, overrides: Iterable[str] = ()) -> Path:
    """Validate a recipe, its dataset and base model, then create `runs/<id>/` with recipe.toml, run.json."""
    ws = _as_workspace(workspace)
    recipe_file = recipe_path_for(ws, recipe)
    overrides = list(overrides)
    loaded = load_recipe(recipe_file, overrides)
    dataset = dataset_info(resolve_dataset(ws, loaded.data.dataset))
    resolved_base = check_base_model(ws, loaded)
    meta = {
        "recipe_name": loaded.name,
        "recipe_source": str(recipe_file),
        "overrides": overrides,
        "recipe_fingerprint": loaded.fingerprint(),
        "recipe": loaded.to_dict(),
        "dataset": dataclasses.asdict(dataset),
        "base_model": loaded.model.base,
        "base_model_resolved": resolved_base,
        "workspace": str(ws.root),
        "argv": list(sys.argv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    while True:
        run_id = ws.new_run_id(_run_label(loaded))
        run_dir = ws.runs_dir / run_id
        meta["run_id"] = run_id
        try:
            # The run folder appears complete or not at all, so a viewer never lists a half-made run.
            with atomic_directory(run_dir) as temp:
                (temp / RUN_RECIPE_FILE).write_text(loaded.to_toml(), encoding="utf-8")
                (temp / RUN_META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            return run_dir
        except Exception:
            if run_dir.exists():
                continue  # another process took this id in the same second
            raise


def _reap() -> None:
    for pid, process in list(_CHILDREN.items()):
        if process.poll() is not None:
            del _CHILDREN[pid]


def train_command(run_dir: Path, *, resume: bool = False) -> list[str]:
    """The command line of the trainer process for a run folder."""
    # -P keeps the run folder (the working directory) off sys.path, so no file there can shadow a library.
    resume_flag = ["--resume"] if resume else []
    return [sys.executable, "-P", "-m", TRAIN_MODULE, "--run-dir", str(run_dir), *resume_flag]


def run_command(run_dir: Path, *, resume: bool = False) -> list[str]:
    """The command that trains a run folder: the trainer itself, or, when its recipe asks for more than one
    GPU, the launcher that starts one trainer per GPU through accelerate (engine.distributed)."""
    recipe = load_recipe(Path(run_dir) / RUN_RECIPE_FILE)
    if wants_launcher(recipe):
        return launcher_command(run_dir, resume=resume)
    return train_command(run_dir, resume=resume)


def _child_env(run_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO_ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    # The trainer forks no dataloader workers, so tokenizers may use threads; saying so silences its warning.
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["TUNEDECK_WORKSPACE"] = str(Path(run_dir).resolve().parent.parent)
    return env


def spawn_training(run_dir: Path, *, resume: bool = False) -> int:
    """Start the trainer for `run_dir` detached (own session, no terminal), record its pid and return it.

    Events go to run_dir/events.jsonl; stderr (tracebacks of crashes before logging starts) to train.log.
    The recorded pid is the one to signal: the trainer's, or the launcher's for a run on several GPUs.
    """
    run_dir = Path(run_dir).resolve()
    _reap()
    with open(run_dir / RUN_LOG_FILE, "ab") as log:
        process = subprocess.Popen(
            run_command(run_dir, resume=resume),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=run_dir,
            env=_child_env(run_dir),
            start_new_session=True,
            close_fds=True,
        )
    _CHILDREN[process.pid] = process
    atomic_write_text(run_dir / RUN_PID_FILE, f"{process.pid}\n")
    return process.pid


def start_run(
    workspace: Workspace | Path | str, recipe_path: str | Path, overrides: Iterable[str] = ()
) -> str:
    """Validate, create and start a detached training run; returns its id at once."""
    run_dir = prepare_run(workspace, recipe_path, overrides)
    spawn_training(run_dir)
    return run_dir.name


def run_pid(run_dir: Path) -> int:
    """The pid recorded for a run's trainer (0 when none)."""
    try:
        return int((Path(run_dir) / RUN_PID_FILE).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def is_running(run_dir: Path) -> bool:
    """True while the run's trainer process is alive."""
    _reap()
    return pid_alive(run_pid(run_dir))


def check_resumable(run_dir: Path, recipe: Recipe | None = None, *, check_running: bool = True) -> Path:
    """The checkpoint a run resumes from; ResumeError when it is running, finished, has no checkpoint, or its
    recipe (`recipe`, else its own recipe.toml) or dataset changed since it started."""
    run_dir = Path(run_dir)
    run_id = run_dir.name
    meta = read_run_meta(run_dir)
    if check_running and is_running(run_dir):
        raise ResumeError(
            f"Run {run_id} is still running (pid {run_pid(run_dir)}).",
            next_step="Watch it with `tunedeck logs --follow`, or stop it before resuming.",
        )
    current = recipe if recipe is not None else load_recipe(run_dir / RUN_RECIPE_FILE)
    if current.fingerprint() != meta.get("recipe_fingerprint"):
        changes = recipe_differences(meta.get("recipe", {}), current.to_dict()) or ["its fingerprint differs"]
        raise ResumeError(
            f"The recipe of run {run_id} changed since it started ({'; '.join(changes)}).",
            next_step="Undo the change to resume, or start a new run with the changed recipe.",
        )
    recorded = DatasetInfo(**meta["dataset"])
    if not Path(recorded.path).is_file():
        raise ResumeError(
            f"The dataset {recorded.path} that run {run_id} trained on is gone.",
            next_step="Put the file back to resume, or start a new run.",
        )
    digest = sha256_file(Path(recorded.path))
    if digest != recorded.sha256:
        try:
            rows_now: int | str = dataset_info(Path(recorded.path)).rows
        except DatasetError:
            rows_now = "unreadable"
        change = (
            f"{recorded.rows} → {rows_now} rows"
            if rows_now != recorded.rows
            else f"same {recorded.rows} rows, different content"
        )
        raise ResumeError(
            f"The dataset {recorded.name} changed since run {run_id} started: {change}.",
            next_step="Restore the original file to resume, or start a new run on the new data.",
        )
    summary = summarize_run(run_dir)
    if summary.status == "finished":
        raise ResumeError(
            f"Run {run_id} already finished all {summary.step} steps.",
            next_step="Start a new run to train longer (e.g. with a higher train.epochs).",
        )
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise ResumeError(
            f"Run {run_id} has no complete checkpoint to resume from.",
            next_step=f"Start it again: `tunedeck train {meta.get('recipe_source', 'RECIPE')}`.",
        )
    return checkpoint


def resume_run(
    workspace: Workspace | Path | str,
    run_id: str,
    recipe_path: str | Path | None = None,
    overrides: Iterable[str] = (),
) -> str:
    """Continue a stopped or interrupted run from its newest complete checkpoint; returns the run id."""
    ws = _as_workspace(workspace)
    run_dir = find_run(ws, run_id)
    recipe = None
    overrides = list(overrides)
    if recipe_path is not None or overrides:
        source = recipe_path_for(ws, recipe_path) if recipe_path is not None else run_dir / RUN_RECIPE_FILE
        recipe = load_recipe(source, overrides)
    check_resumable(run_dir, recipe)
    spawn_training(run_dir, resume=True)
    return run_dir.name


def stop_run(run_dir: Path) -> bool:
    """Ask a run to save a checkpoint and stop (SIGTERM); False when it was not running."""
    pid = run_pid(run_dir)
    if not is_running(run_dir):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True


def wait_run(run_dir: Path, timeout: float | None = None, *, poll_s: float = 0.2) -> RunSummary:
    """Wait until the run's trainer exits (or `timeout` seconds pass) and return the run's summary."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while is_running(run_dir):
        if deadline is not None and time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    return summarize_run(run_dir)


def find_run(workspace: Workspace | Path | str, ref: str) -> Path:
    """A run folder from its id, a unique prefix or substring of it, or `latest`."""
    ws = _as_workspace(workspace)
    runs = ws.list_run_dirs()
    if ref in ("latest", "last") and runs:
        return runs[-1]
    if (ws.runs_dir / ref).is_dir():
        return ws.runs_dir / ref
    matches = [p for p in runs if p.name.startswith(ref)] or [p for p in runs if ref in p.name]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise WorkspaceError(
            f"{ref!r} matches {len(matches)} runs ({', '.join(p.name for p in matches[:3])}…).",
            next_step="Give more of the run id.",
        )
    return ws.run_dir(ref)  # raises with the newest run ids listed
