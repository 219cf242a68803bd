"""The TUI's one door to the engine: pure engine modules in-process, the ML stack only as subprocesses.

Tests swap the subprocess commands (`module_commands`) and the launcher for fakes that speak the same
protocol, so every tab can be driven without torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import EngineError
from engine.events import Event, parse_event
from engine.workspace import RUN_RECIPE_FILE, Workspace

if TYPE_CHECKING:
    from tui.run_state import RunsIndex

DEMO_MODEL = "demo"
TUI_STATE_DIR = ".tunedeck"
REPO_ROOT = Path(__file__).resolve().parent.parent
# How long an engine subprocess gets to exit after a quit request before it is terminated, then killed.
QUIT_GRACE_S = 2.0
STDERR_LINES_KEPT = 40


@dataclasses.dataclass(frozen=True)
class ChatSource:
    """What the chat engine loads: a base model alone, a run's newest checkpoint, an adapter folder or a GGUF
    file."""

    kind: str  # base, run, adapter, gguf
    base: str
    path: str = ""

    def label(self) -> str:
        """A short human description, e.g. `run 20261123-demo (newest checkpoint)`."""
        if self.kind == "run":
            return f"run {Path(self.path).name} (newest checkpoint)"
        if self.kind == "adapter":
            return f"adapter {self.path}"
        if self.kind == "gguf":
            return f"GGUF {Path(self.path).name}"
        return f"base {self.base}"


class EngineClient:
    """How the TUI reaches the engine for one workspace."""

    def __init__(
        self,
        workspace: Workspace,
        *,
        python: str | None = None,
        module_commands: dict[str, list[str]] | None = None,
        launcher: Any = None,
    ) -> None:
        self.workspace = workspace
        self.python = python or sys.executable
        self.module_commands = dict(module_commands or {})
        self._launcher = launcher
        self._renderers: dict[str, Any] = {}
        self._runs: Any = None
        self._runs_lock = threading.Lock()

    @property
    def runs(self) -> RunsIndex:
        """Followers of every run in the workspace, shared by the status line and the Train tab."""
        with self._runs_lock:
            if self._runs is None:
                from tui.run_state import RunsIndex

                self._runs = RunsIndex(self.workspace.runs_dir)
            return self._runs

    # Folders

    @property
    def state_dir(self) -> Path:
        """The workspace's hidden folder for TUI preferences and engine logs."""
        return self.workspace.root / TUI_STATE_DIR

    def log_path(self, name: str) -> Path:
        """A fresh log file for an engine subprocess's stderr."""
        folder = self.state_dir / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"

    def list_models(self) -> list[str]:
        """Base model choices: `demo`, then the folders in models/ (as paths relative to the workspace)."""
        found = [DEMO_MODEL]
        if self.workspace.models_dir.is_dir():
            for folder in sorted(self.workspace.models_dir.iterdir()):
                if folder.is_dir() and not folder.name.startswith("."):
                    found.append(f"models/{folder.name}")
        return found

    def model_dir(self, base: str) -> Path | None:
        """The local folder a base-model choice names, when it is one that holds a tokenizer."""
        if not base or base == DEMO_MODEL:
            candidates = [
                self.workspace.models_dir / "demo",
                self.workspace.models_dir / "SmolLM2-135M-Instruct",
            ]
        else:
            path = Path(base).expanduser()
            candidates = [path if path.is_absolute() else self.workspace.root / path]
        for candidate in candidates:
            if (candidate / "tokenizer.json").is_file():
                return candidate
        return None

    def list_recipes(self) -> list[Path]:
        """Shipped and workspace recipes."""
        from engine.recipes import list_recipes

        return list_recipes(self.workspace.root)

    def run_base_model(self, run_dir: Path, fallback: str = "") -> str:
        """The base model a run trained from, read from its resolved recipe."""
        if fallback:
            return fallback
        recipe = Path(run_dir) / RUN_RECIPE_FILE
        with contextlib.suppress(OSError, ValueError):
            import tomllib

            return (
                str(tomllib.loads(recipe.read_text(encoding="utf-8")).get("model", {}).get("base", ""))
                or DEMO_MODEL
            )
        return DEMO_MODEL

    # Prompt rendering (pure engine.template; tokenizers and jinja2 only)

    def renderer(self, model_dir: Path | None) -> Any:
        """A cached engine.template.PromptRenderer for `model_dir`, or the ChatML one without a tokenizer."""
        key = str(model_dir or "")
        if key not in self._renderers:
            template = importlib.import_module("engine.template")
            if model_dir is None:
                self._renderers[key] = None
            else:
                self._renderers[key] = template.PromptRenderer.from_model_dir(model_dir)
        return self._renderers[key]

    # Training runs (engine.launch is pure stdlib: it starts a detached trainer and returns)

    @property
    def launcher(self) -> Any:
        """engine.launch, or the fake a test installed."""
        if self._launcher is None:
            try:
                self._launcher = importlib.import_module("engine.launch")
            except ModuleNotFoundError as exc:
                raise EngineError(
                    "This tunedeck has no training launcher (engine.launch is missing).",
                    title="Cannot start training",
                    next_step="Reinstall tunedeck; `tunedeck doctor` checks the installation.",
                ) from exc
        return self._launcher

    def start_run(self, recipe_path: Path, overrides: list[str]) -> str:
        """Start a detached training run; returns its id."""
        return str(self.launcher.start_run(self.workspace, Path(recipe_path), list(overrides)))

    def resume_run(self, run_id: str) -> str:
        """Resume an interrupted or stopped run from its newest checkpoint; returns the run id."""
        result = self.launcher.resume_run(self.workspace, run_id)
        return str(result or run_id)

    def stop_run(self, run_dir: Path) -> None:
        """Ask a run to save a checkpoint and exit."""
        self.launcher.stop_run(Path(run_dir))

    # Subprocesses

    def module_argv(self, module: str, *args: str) -> list[str]:
        """The command that runs `python -m module args…` (or the test fake registered for that module)."""
        prefix = self.module_commands.get(module) or [self.python, "-P", "-m", module]
        return [*prefix, *args]

    def chat_argv(self, source: ChatSource) -> list[str]:
        """The chat engine command for `source` (a GGUF needs no base model: llama.cpp serves the file)."""
        args = [] if source.kind == "gguf" else ["--base", source.base]
        args += ["--workspace", str(self.workspace.root)]
        if source.kind in ("run", "adapter", "gguf"):
            args += [f"--{source.kind}", source.path]
        return self.module_argv("engine.chat", *args)

    def export_argv(
        self,
        run_dir: Path,
        checkpoint: int | None,
        quants: list[str],
        *,
        out_dir: Path | None = None,
        force: bool = False,
    ) -> list[str]:
        """The export engine command for a run (and checkpoint), the quantisations, the folder and overwrite."""
        args = ["--run-dir", str(run_dir)]
        if checkpoint is not None:
            args += ["--checkpoint", str(checkpoint)]
        if quants:
            args += ["--quant", ",".join(quants)]
        if out_dir is not None:
            args += ["--out", str(out_dir)]
        if force:
            args.append("--force")
        return self.module_argv("engine.export", *args)

    def spawn_detached(self, argv: list[str], stderr_path: Path) -> subprocess.Popen[bytes]:
        """Start an engine process that outlives the TUI (its own session, no terminal, stderr to a file), as
        `tunedeck export` starts exports: it follows the work through the events file the engine writes."""
        stderr_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(stderr_path, "ab") as stderr:
                return subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    cwd=self.workspace.root,
                    env=self.subprocess_env(),
                    start_new_session=True,
                    close_fds=True,
                )
        except OSError as exc:
            raise EngineError(
                f"The engine could not be started ({exc.strerror or exc}).",
                title="Engine did not start",
                next_step="Run `tunedeck doctor` to check the installation.",
            ) from exc

    def subprocess_env(self) -> dict[str, str]:
        """The environment of engine subprocesses: this one, with the repository importable and the workspace
        set."""
        env = dict(os.environ)
        paths = [str(REPO_ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        env["TUNEDECK_WORKSPACE"] = str(self.workspace.root)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env


class EngineProcess:
    """An engine subprocess speaking JSON lines: requests on stdin, events on stdout, logs to a file."""

    def __init__(self, argv: list[str], *, env: dict[str, str], cwd: Path, log_path: Path) -> None:
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_LINES_KEPT)
        self._stderr_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Spawn the process; raises EngineError with the reason when it cannot start."""
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=self.cwd,
                env=self.env,
                limit=16 * 1024 * 1024,
                start_new_session=True,
            )
        except OSError as exc:
            raise EngineError(
                f"The engine could not be started ({exc.strerror or exc}).",
                title="Engine did not start",
                next_step="Run `tunedeck doctor` to check the installation.",
            ) from exc
        self._stderr_task = asyncio.create_task(self._drain_stderr())

    async def _drain_stderr(self) -> None:
        # Reading stderr continuously keeps the pipe from filling (which would freeze the engine).
        if self.process is None or self.process.stderr is None:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as log:
            while line := await self.process.stderr.readline():
                text = line.decode("utf-8", errors="replace")
                log.write(text)
                log.flush()
                if text.strip():
                    self.stderr_tail.append(text.rstrip())

    async def send(self, request: dict[str, Any]) -> None:
        """Write one request line; raises EngineError when the engine is gone."""
        if self.process is None or self.process.stdin is None or self.process.returncode is not None:
            raise EngineError(
                "The engine is not running.", title="Engine stopped", next_step="Load a model again."
            )
        try:
            self.process.stdin.write((json.dumps(request, ensure_ascii=False) + "\n").encode("utf-8"))
            await self.process.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise EngineError(
                "The engine exited before it read the request.",
                title="Engine stopped",
                next_step=f"See its log at {self.log_path}.",
            ) from exc

    async def events(self) -> AsyncIterator[Event]:
        """Events from stdout until the process closes it; unknown or malformed lines are skipped."""
        if self.process is None or self.process.stdout is None:
            return
        while line := await self.process.stdout.readline():
            event = parse_event(line.decode("utf-8", errors="replace"))
            if event is not None:
                yield event

    async def wait(self) -> int:
        """The exit code, once the process and its stderr reader are done."""
        if self.process is None:
            return -1
        code = await self.process.wait()
        if self._stderr_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._stderr_task
        return code

    async def close(self, quit_request: dict[str, Any] | None = None) -> None:
        """Ask politely (`quit_request`), then terminate, then kill; never leaves a child behind."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        if quit_request is not None:
            with contextlib.suppress(EngineError):
                await self.send(quit_request)
        # Without a quit request there is nothing to wait for: the process is terminated at once.
        steps = ("wait", "terminate", "kill") if quit_request is not None else ("terminate", "kill")
        for signal_step in steps:
            if signal_step == "terminate":
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
            elif signal_step == "kill":
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            try:
                await asyncio.wait_for(process.wait(), QUIT_GRACE_S)
                return
            except TimeoutError:
                continue

    def exit_cause(self, code: int) -> str:
        """One sentence on why the process ended without a final event."""
        last = next((line for line in reversed(self.stderr_tail) if line.strip()), "")
        detail = f": {last[-200:]}" if last else ""
        return f"The engine exited with code {code}{detail}."
