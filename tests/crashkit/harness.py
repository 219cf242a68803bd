"""Client side of the crash harness: start a warm zygote, run seeded kill trials, and check what a kill left."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

ZYGOTE = Path(__file__).resolve().parent / "zygote.py"
REPO_ROOT = ZYGOTE.parent.parent.parent


@dataclasses.dataclass
class TrialResult:
    """How one trial process ended."""

    pid: int
    killed: bool
    code: int | None
    seconds: float
    timer: bool
    first_write_s: float | None = None
    writes: int | None = None


class Zygote:
    """A warm process (modules imported once) that forks each trial; use as a context manager."""

    def __init__(self, preload: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in close()
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO_ROOT), full_env.get("PYTHONPATH", "")])
        )
        self.process = subprocess.Popen(
            [sys.executable, str(ZYGOTE), *preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=full_env,
            cwd=REPO_ROOT,
        )
        self._read()

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self._log.flush()
            raise RuntimeError(f"the zygote died: {self.log_path.read_text(errors='replace')[-3000:]}")
        return json.loads(line)

    def trial(
        self,
        target: str,
        *args: Any,
        watch: Path | None = None,
        kill_at_event: int | None = None,
        kill_after_s: float | None = None,
        arm_on: str | None = None,
        env: dict[str, str] | None = None,
        unset: tuple[str, ...] = (),
        stdout: Path | None = None,
        stderr: Path | None = None,
        cwd: Path | None = None,
        timeout_s: float = 300,
    ) -> TrialResult:
        """Fork one trial of `target(*args)`; with `watch`, its writes under that folder are counted."""
        count_file = self.log_path.with_name(f"{self.log_path.stem}.count")
        count_file.unlink(missing_ok=True)
        command = {
            "target": target,
            "args": list(args),
            "watch": str(watch) if watch else None,
            "kill_at_event": kill_at_event,
            "kill_after_s": kill_after_s,
            "arm_on": arm_on,
            "env": env or {},
            "unset": list(unset),
            "stdout": str(stdout) if stdout else None,
            "stderr": str(stderr or self.log_path),
            "cwd": str(cwd) if cwd else None,
            "count_file": str(count_file),
            "timeout_s": timeout_s,
        }
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        result = TrialResult(**self._read())
        if count_file.is_file():
            result.writes = int(count_file.read_text() or 0)
        return result

    def close(self) -> None:
        """Stop the zygote."""
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------
# What a kill may leave behind


def leftover_problems(folder: Path, finals: set[str]) -> list[str]:
    """Entries of `folder` that are neither an expected final name nor a temp name (which no reader trusts)."""
    from engine.atomic import is_partial

    return [
        f"unexpected {entry.name} in {folder}"
        for entry in sorted(Path(folder).iterdir())
        if entry.name not in finals and not is_partial(entry)
    ]


def events_problems(events_path: Path) -> list[str]:
    """A kill may cut the last line of events.jsonl short; any other unreadable line is a problem."""
    from engine.events import parse_event

    if not Path(events_path).is_file():
        return []
    lines = Path(events_path).read_text(encoding="utf-8", errors="replace").split("\n")
    whole, last = lines[:-1], lines[-1]
    bad = [number for number, line in enumerate(whole, start=1) if line.strip() and parse_event(line) is None]
    problems = [f"{events_path.name} line {number} is unreadable" for number in bad]
    if last.strip() and parse_event(last) is not None:
        problems.append(f"{events_path.name} ends without a newline after a whole event")
    return problems


def tree_digest(folder: Path) -> str:
    """One sha256 over every file's relative name and bytes."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


CHECKPOINT_FILES = frozenset(
    {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "trainer_state.json",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
    }
)


def checkpoint_problems(checkpoint: Path) -> list[str]:
    """Why a step_<n> folder is not a complete checkpoint: a missing file, or one that does not load in full."""
    import torch
    from safetensors import safe_open

    name = checkpoint.name
    present = {path.name for path in checkpoint.iterdir()}
    problems = [f"{name} lacks {missing}" for missing in sorted(CHECKPOINT_FILES - present)]
    if problems:
        return problems
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        if state["global_step"] != int(name.removeprefix("step_")):
            problems.append(f"{name}/trainer_state.json says step {state['global_step']}")
        json.loads((checkpoint / "adapter_config.json").read_text(encoding="utf-8"))
        json.loads((checkpoint / "tokenizer.json").read_text(encoding="utf-8"))
        with safe_open(str(checkpoint / "adapter_model.safetensors"), framework="pt") as weights:
            if not list(weights.keys()):
                problems.append(f"{name}/adapter_model.safetensors holds no tensors")
            for key in weights.keys():  # noqa: SIM118 - safe_open is not a dict
                weights.get_tensor(key)
        for file in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
            # torch.save writes a zip: every member's CRC must check out (rng_state holds numpy objects, which a
            # weights-only load refuses without an allow-list, so the archive is checked instead).
            with zipfile.ZipFile(checkpoint / file) as archive:
                damaged = archive.testzip()
            if damaged is not None:
                problems.append(f"{name}/{file} member {damaged} is damaged")
        torch.load(checkpoint / "optimizer.pt", weights_only=True)
    except Exception as exc:
        problems.append(f"{name} does not load: {type(exc).__name__}: {str(exc)[:200]}")
    return problems


def gguf_problems(path: Path) -> list[str]:
    """Why a GGUF with a final name is not a complete file of the type its name says."""
    from engine.convert import read_gguf
    from engine.quantize import llama_file_report

    kind = path.stem.rsplit("-", 1)[1]
    try:
        info = read_gguf(path)
        loaded = llama_file_report(path)
    except Exception as exc:
        return [f"{path.name} does not load: {type(exc).__name__}: {str(exc)[:200]}"]
    problems = []
    if info.file_type_name != kind or loaded["ftype_name"] != kind:
        problems.append(f"{path.name} reads as {info.file_type_name}/{loaded['ftype_name']}, not {kind}")
    return problems


def export_problems(export_dir: Path) -> list[str]:
    """What in an export folder looks finished but is not: a GGUF that does not load as its type, a merged/ folder
    missing a file or holding unreadable weights, a Modelfile or report naming a missing file."""
    from safetensors import safe_open

    from engine.atomic import is_partial
    from engine.export import LOG_NAMES, MERGED_DIR, MODELFILE, REPORT_JSON, REPORT_MD

    problems = []
    for entry in sorted(export_dir.iterdir()):
        name = entry.name
        if name in LOG_NAMES or is_partial(entry):
            continue
        if name.endswith(".gguf"):
            problems += gguf_problems(entry)
        elif name == MERGED_DIR:
            present = {path.name for path in entry.iterdir()}
            needed = {
                "config.json",
                "model.safetensors",
                "tokenizer.json",
                "tokenizer_config.json",
                "chat_template.jinja",
            }
            problems += [f"merged/ lacks {missing}" for missing in sorted(needed - present)]
            if "model.safetensors" in present:
                try:
                    with safe_open(str(entry / "model.safetensors"), framework="pt") as weights:
                        for key in weights.keys():  # noqa: SIM118 - safe_open is not a dict
                            weights.get_tensor(key)
                    json.loads((entry / "config.json").read_text())
                except Exception as exc:
                    problems.append(f"merged/ does not load: {exc}")
        elif name == MODELFILE:
            target = re.search(r"^FROM \./(\S+)$", entry.read_text(), re.MULTILINE)
            if target is None or not (export_dir / target.group(1)).is_file():
                problems.append("the Modelfile names a GGUF that is not there")
        elif name == REPORT_JSON:
            report = json.loads(entry.read_text())
            files = [check["file"] for check in report.get("files", {}).values()]
            problems += [
                f"report.json names missing {file}" for file in files if not (export_dir / file).is_file()
            ]
        elif name != REPORT_MD:
            problems.append(f"unexpected {name}")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# A training run killed again and again, resumed each time


@dataclasses.dataclass
class ChainTrial:
    """One attempt of a run in a kill chain and what it left."""

    index: int
    kill: dict[str, Any]
    killed: bool
    resumed: bool
    checkpoints_after: list[str]
    problems: list[str]
    lost: list[str]


@dataclasses.dataclass
class KillChain:
    """A run trained in attempts that were SIGKILLed, each resuming the last (see `kill_chain`)."""

    run_dir: Path
    trials: list[ChainTrial]
    digests: dict[str, str]


def _checkpoint_names(run_dir: Path) -> list[str]:
    from engine.workspace import checkpoint_dirs

    return [path.name for path in checkpoint_dirs(run_dir)]


def run_problems(run_dir: Path, digests: dict[str, str]) -> tuple[list[str], list[str]]:
    """(problems, losses) of a run folder after a kill: new checkpoints must load in full, earlier ones and the
    run's own files must be byte-identical, and only temp names may sit beside step_<n> folders."""
    from engine.atomic import is_partial

    problems: list[str] = []
    lost: list[str] = []
    folder = run_dir / "checkpoints"
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        if re.fullmatch(r"step_\d+", entry.name):
            if entry.name not in digests:
                problems += checkpoint_problems(entry)
        elif not (is_partial(entry) or entry.name.startswith(".staging")):
            problems.append(f"unexpected {entry.name} in checkpoints/")
    for name, digest in digests.items():
        path = run_dir / name if name in ("run.json", "recipe.toml") else folder / name
        if not path.exists():
            lost.append(f"{name} disappeared")
        elif (
            tree_digest(path) if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        ) != digest:
            lost.append(f"{name} changed")
    problems += events_problems(run_dir / "events.jsonl")
    pid_text = (run_dir / "pid").read_text() if (run_dir / "pid").exists() else "0"
    if not pid_text.strip().isdigit():
        problems.append(f"the pid file holds {pid_text!r}")
    return problems, lost


# Counting kill points from the commit of the attempt's first checkpoint guarantees progress on any machine.
FIRST_COMMIT = r".*/checkpoints/step_\d+"


def save_period(run_dir: Path, default: float) -> float:
    """The median time from one checkpoint to the next within an attempt (a step plus a save) on this machine."""
    from engine.events import CheckpointSaved, RunStarted, read_events

    gaps, last = [], None
    for event in read_events(run_dir / "events.jsonl"):
        if isinstance(event, RunStarted):
            last = None
        elif isinstance(event, CheckpointSaved):
            if last is not None:
                gaps.append(event.time - last)
            last = event.time
    return sorted(gaps)[len(gaps) // 2] if gaps else default


def kill_chain(
    zygote: Zygote, run_dir: Path, seed: int, count: int, *, writes_per_save: int, save_s: float
) -> KillChain:
    """Train `run_dir` in `count` attempts, each SIGKILLed and each resuming the newest checkpoint.

    Most attempts commit one checkpoint, then die before a seeded k-th later write under the run folder (k up to
    two saves' worth) or a seeded delay after that commit (up to two saves' duration, as measured on this machine
    so far, `save_s` before any); every sixth dies at one of its very first writes instead (the pid file, events,
    the clean-up of what the previous kill left). So each attempt adds at most a few checkpoints on any machine.
    """
    rng = random.Random(seed)
    digests = {
        name: hashlib.sha256((run_dir / name).read_bytes()).hexdigest()
        for name in ("run.json", "recipe.toml")
    }
    trials = []
    for index in range(count):
        resume = bool(_checkpoint_names(run_dir))
        argv = ["--run-dir", str(run_dir), *(["--resume"] if resume else [])]
        if index % 6 == 5:
            kill: dict[str, Any] = {"kill_at_event": rng.randint(1, 8)}
        elif index % 2 == 0:
            kill = {"kill_at_event": rng.randint(1, 2 * writes_per_save), "arm_on": FIRST_COMMIT}
        else:
            period = save_period(run_dir, save_s)
            kill = {"kill_after_s": round(rng.uniform(0, 2 * period), 3), "arm_on": FIRST_COMMIT}
        result = zygote.trial("engine.train:main", argv, watch=run_dir, **kill)
        problems, lost = run_problems(run_dir, digests)
        for name in _checkpoint_names(run_dir):
            if name not in digests and not checkpoint_problems(run_dir / "checkpoints" / name):
                digests[name] = tree_digest(run_dir / "checkpoints" / name)
        trials.append(
            ChainTrial(
                index=index,
                kill=kill,
                killed=result.killed,
                resumed=resume,
                checkpoints_after=_checkpoint_names(run_dir),
                problems=problems,
                lost=lost,
            )
        )
    return KillChain(run_dir, trials, digests)
