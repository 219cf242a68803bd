"""Training on several processes: `python -m engine.distributed --run-dir DIR` starts the ranks through
`accelerate launch`, forwards stops to them and reports a failure of any rank as one run_failed event.

A recipe asks for processes with `train.gpus` (a count or "all") and picks the strategy with
`train.distributed` (ddp, or fsdp to shard a model too large for one card). Only rank 0 writes events, logs at
info level, the run's metadata and checkpoints; every rank counts its tokens and the counts are summed, so a step
event's tokens/s is the whole job's. The launcher is the process the run's pid file names: SIGTERM to it asks
every rank to stop, and all of them stop after the same optimizer step, with a checkpoint.

This module imports no ML library at import time: the launcher command line is built without torch, and the
rank helpers import torch only when a process group exists.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from engine.atomic import atomic_write_text
from engine.errors import EngineError, RecipeError, TrainingError
from engine.events import EventWriter, RunFailed, RunFinished, claim_stdout, parse_event
from engine.recipes import ALL_GPUS
from engine.workspace import RUN_EVENTS_FILE, RUN_LOG_FILE, RUN_PID_FILE, RUN_RECIPE_FILE, latest_checkpoint

if TYPE_CHECKING:
    from engine.recipes import Recipe

log = logging.getLogger("engine.distributed")

DISTRIBUTED_MODULE = "engine.distributed"
# Set by the launcher for its ranks: its own pid (the one the run's pid file names) and a private folder where
# each rank registers its pid and, if it fails, its error.
LAUNCHER_PID_ENV = "TUNEDECK_LAUNCHER_PID"
CONTROL_DIR_ENV = "TUNEDECK_CONTROL_DIR"
USE_CPU_ENV = "ACCELERATE_USE_CPU"
ELASTIC_RUN_ENV = "TORCHELASTIC_RUN_ID"
POLL_S = 0.2
# The gloo process group of the ranks' own small collectives, made by join().
_CONTROL: dict[str, Any] = {"group": None}
PR_SET_PDEATHSIG = 1


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """How many processes train a run, how they share the model, and where they meet."""

    processes: int
    strategy: str = "ddp"
    cpu: bool = False
    mixed_precision: str = "no"
    port: int = 29500


# ----------------------------------------------------------------------------------------------------
# The plan and the accelerate command line (no torch)


def wants_launcher(recipe: Recipe) -> bool:
    """True when a recipe may need more than one process, so the run starts through this module."""
    return recipe.train.gpus != 1


def process_count(gpus: int | str, device: str, visible_gpus: int) -> int:
    """The number of training processes for `train.gpus` on `train.device` with `visible_gpus` CUDA GPUs.

    On `train.device=cpu` a count means that many CPU processes (gloo), which is how the multi-process path
    is tested without GPUs; "all" there is one process.
    """
    device = (device or "auto").strip().lower()
    if device == "cpu":
        return 1 if gpus == ALL_GPUS else int(gpus)
    if gpus == ALL_GPUS:
        return max(visible_gpus, 1)
    count = int(gpus)
    if count == 1:
        return 1
    if device.startswith("cuda:"):
        raise RecipeError(
            f"train.device={device} names one GPU, but train.gpus is {count}.",
            next_step="Set train.device=auto (or cuda) to train on several GPUs, or train.gpus=1.",
        )
    if device == "mps":
        raise RecipeError(
            f"train.gpus is {count}, but Apple GPUs (mps) train in one process.",
            next_step="Set train.gpus=1.",
        )
    if visible_gpus == 0:
        raise TrainingError(
            f"train.gpus is {count}, but no CUDA GPU is visible to torch.",
            next_step=f"Set train.gpus=1, or train.device=cpu to run {count} CPU processes.",
        )
    if count > visible_gpus:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        limit = f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else ""
        raise TrainingError(
            f"train.gpus is {count}, but only {visible_gpus} GPU{'s' if visible_gpus != 1 else ''} "
            f"{'are' if visible_gpus != 1 else 'is'} visible{limit}.",
            next_step=f'Set train.gpus={visible_gpus} or train.gpus="all".',
        )
    return count


def free_port() -> int:
    """A TCP port on this machine that nothing listens on now, for the ranks to meet at."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fsdp_arguments() -> list[str]:
    """accelerate's FSDP options: full sharding, one unit per decoder layer, full state dicts on save.

    TRANSFORMER_BASED_WRAP without a class name wraps the model's own decoder layer class (its
    `_no_split_modules`); transformers then wraps the LoRA layers separately, so each flat parameter is wholly
    frozen or wholly trained and use_orig_params can stay off. Full state dicts keep checkpoints the ordinary
    adapter files that chat and export load. Loading on rank 0 only (then broadcasting) keeps host memory at one
    copy of the model.
    """
    return [
        "--use_fsdp",
        "--fsdp_version",
        "1",
        "--fsdp_sharding_strategy",
        "FULL_SHARD",
        "--fsdp_auto_wrap_policy",
        "TRANSFORMER_BASED_WRAP",
        "--fsdp_backward_prefetch",
        "BACKWARD_PRE",
        "--fsdp_state_dict_type",
        "FULL_STATE_DICT",
        "--fsdp_use_orig_params",
        "false",
        "--fsdp_cpu_ram_efficient_loading",
        "true",
        "--fsdp_sync_module_states",
        "true",
        "--fsdp_offload_params",
        "false",
    ]


def accelerate_command(run_dir: Path, plan: LaunchPlan, *, resume: bool = False) -> list[str]:
    """The `accelerate launch` command line that starts `plan.processes` trainers for a run folder."""
    strategy = fsdp_arguments() if plan.strategy == "fsdp" else ["--multi_gpu"]
    return [
        sys.executable,
        "-P",
        "-m",
        "accelerate.commands.launch",
        *strategy,
        # Every option the run depends on is given here, so a user's accelerate config file cannot change it.
        "--num_machines",
        "1",
        "--machine_rank",
        "0",
        "--rdzv_backend",
        "static",
        "--gpu_ids",
        "all",
        "--num_processes",
        str(plan.processes),
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(plan.port),
        "--mixed_precision",
        plan.mixed_precision,
        "--dynamo_backend",
        "no",
        "--max_restarts",
        "0",
        "--module",
        "engine.train",
        "--run-dir",
        str(run_dir),
        *(["--resume"] if resume else []),
    ]


def launcher_command(run_dir: Path, *, resume: bool = False) -> list[str]:
    """The command line of this module's launcher for a run folder."""
    resume_flag = ["--resume"] if resume else []
    return [sys.executable, "-P", "-m", DISTRIBUTED_MODULE, "--run-dir", str(run_dir), *resume_flag]


def launch_mixed_precision(recipe: Recipe, cpu: bool) -> str:
    """accelerate's --mixed_precision for a recipe: "no" exactly where engine.train autocasts nothing (CPUs, full
    fine-tuning, a float32 model), else "bf16".

    Each rank's Trainer sets bf16 or fp16 itself and its flag overrides this one, so only "no" has to match; not
    asking torch whether the GPU has bf16 keeps CUDA uninitialised in the launcher, which would otherwise hold
    memory on GPU 0 for the whole run.
    """
    if cpu or recipe.train.method == "full" or recipe.model.dtype == "float32":
        return "no"
    return "bf16"


def resolve_plan(recipe: Recipe) -> LaunchPlan:
    """The launch plan for a recipe on this machine (imports torch to count the visible GPUs)."""
    import torch

    device = (recipe.train.device or "auto").strip().lower()
    visible = torch.cuda.device_count() if device != "cpu" else 0
    processes = process_count(recipe.train.gpus, device, visible)
    if processes > 1 and device == "cpu" and recipe.train.distributed == "fsdp":
        raise RecipeError(
            "train.distributed=fsdp shards the model across GPUs, and accelerate runs FSDP on GPUs only.",
            next_step='Set train.distributed="ddp" for CPU processes, or train on GPUs.',
        )
    cpu = device == "cpu" or visible == 0
    mixed = launch_mixed_precision(recipe, cpu)
    return LaunchPlan(processes, recipe.train.distributed, cpu, mixed, free_port())


# ----------------------------------------------------------------------------------------------------
# Helpers for the ranks (the trainer calls these; each is a no-op in a single process)


def _launched() -> bool:
    # Only torch's elastic agent (what accelerate launch runs) makes a rank; a WORLD_SIZE or RANK left in a
    # user's shell must not turn a plain trainer into one.
    return ELASTIC_RUN_ENV in os.environ


def world_size() -> int:
    """How many processes train this run (1 outside a distributed launch)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) if _launched() else 1


def rank() -> int:
    """This process's rank (0 outside a distributed launch)."""
    return int(os.environ.get("RANK", "0") or 0) if _launched() else 0


def local_rank() -> int:
    """This process's rank on this machine, which is also its GPU index."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0) if _launched() else 0


def is_distributed() -> bool:
    """True inside a launch of more than one process."""
    return world_size() > 1


def is_main_process() -> bool:
    """True for the process that reports: rank 0, or the only process."""
    return rank() == 0


def control_dir() -> Path | None:
    """The launcher's private folder for rank pids and failures (None without a launcher)."""
    folder = os.environ.get(CONTROL_DIR_ENV, "")
    return Path(folder) if folder else None


def launcher_pid() -> int:
    """The pid that stops the whole run: the launcher's, else this process's."""
    return int(os.environ.get(LAUNCHER_PID_ENV, "0") or 0) or os.getpid()


def die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies, so no rank trains on after a killed launcher."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def join() -> None:
    """Prepare this rank: die with the launcher, register its pid for stops, and join the process group."""
    if not is_distributed():
        return
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)
    folder = control_dir()
    if folder is not None:
        atomic_write_text(folder / f"rank_{rank()}.pid", f"{os.getpid()}\n")
    from accelerate import PartialState

    # The Trainer later builds its own state over this process group (gloo on CPUs, NCCL on GPUs).
    PartialState(cpu=os.environ.get(USE_CPU_ENV, "").lower() in ("1", "true", "yes"))
    import torch.distributed as dist

    # Stop flags, token counts and checkpoint barriers go over a gloo group of their own (on GPUs too): they
    # need no GPU synchronisation, and a gloo collective fails at once when a peer dies, where an NCCL one
    # would hang until its timeout.
    _CONTROL["group"] = dist.new_group(backend="gloo")


def label_logging() -> None:
    """Mark each log line with its rank, and keep only warnings and errors from ranks other than 0."""
    if not is_distributed():
        return
    root = logging.getLogger()
    formatter = logging.Formatter(
        f"%(asctime)s %(levelname)s rank{rank()} %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"
    )
    for handler in root.handlers:
        handler.setFormatter(formatter)
    if not is_main_process():
        root.setLevel(logging.WARNING)


def strategy() -> str:
    """How this launch shares the model across ranks, as accelerate was told."""
    return "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" else "ddp"


def shards_model() -> bool:
    """True when FSDP shards the model across this launch's ranks (it then places the weights itself)."""
    return is_distributed() and strategy() == "fsdp"


def device_label(device: str) -> str:
    """The device as run_started shows it: `cuda × 2 (ddp)` for a distributed run, else the device itself."""
    if not is_distributed():
        return device
    return f"{device.split(':')[0]} × {world_size()} ({strategy()})"


def process_device(device: str) -> str:
    """The device this rank trains on: each rank of a multi-GPU run owns the GPU of its local rank."""
    if is_distributed() and device == "cuda":
        return f"cuda:{local_rank()}"
    return device


def _reduce(value: float, op_name: str) -> float:
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op_name), group=_CONTROL["group"])
    return float(tensor.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any of them (a collective: every rank must call it)."""
    if not is_distributed():
        return flag
    return _reduce(1.0 if flag else 0.0, "MAX") > 0


def total(count: int) -> int:
    """The sum of `count` over all ranks (a collective: every rank must call it)."""
    if not is_distributed():
        return count
    return round(_reduce(float(count), "SUM"))


def barrier() -> None:
    """Wait until every rank gets here."""
    if is_distributed():
        import torch.distributed as dist

        dist.barrier(group=_CONTROL["group"])


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Run a block on rank 0 first (it may write, e.g. prepare the demo model), then on the other ranks."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def report_failure(error: EngineError) -> bool:
    """Record this rank's failure for the launcher, which reports the first one as the run's run_failed;
    False when there is no launcher to tell (the caller then reports it itself)."""
    folder = control_dir()
    if folder is None or not is_distributed():
        return False
    record = {
        "rank": rank(),
        "time": time.time(),
        "title": error.title,
        "cause": error.message,
        "next_step": error.next_step,
    }
    atomic_write_text(folder / f"rank_{rank()}.failure.json", json.dumps(record) + "\n")
    return True


# ----------------------------------------------------------------------------------------------------
# The launcher process


@dataclasses.dataclass(frozen=True)
class RankFailure:
    """A failure one rank recorded: which rank, when, and its error."""

    rank: int
    time: float
    title: str
    cause: str
    next_step: str


def read_failures(folder: Path) -> list[RankFailure]:
    """The failures ranks recorded in a control folder, earliest first (the first is the cause)."""
    failures = []
    for path in sorted(Path(folder).glob("rank_*.failure.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            failures.append(RankFailure(**data))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("unreadable failure record %s: %s", path.name, exc)
    return sorted(failures, key=lambda failure: failure.time)


def rank_pids(folder: Path) -> list[int]:
    """The pids the ranks registered in a control folder."""
    pids = []
    for path in sorted(Path(folder).glob("rank_*.pid")):
        with contextlib.suppress(OSError, ValueError):
            pids.append(int(path.read_text().strip()))
    return pids


def ended_since(events_path: Path, offset: int) -> bool:
    """True when a run_finished or run_failed event was appended to events.jsonl after byte `offset`."""
    try:
        with open(events_path, "rb") as handle:
            handle.seek(offset)
            tail = handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return False
    for line in tail.splitlines():
        event = parse_event(line)
        if isinstance(event, (RunFinished, RunFailed)):
            return True
    return False


class _StopRequest:
    """SIGTERM/SIGINT to the launcher, noted for the watch loop to pass on to the ranks."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
            log.warning("received %s: asking every rank to checkpoint and stop", signal.Signals(signum).name)
        self.requested = True


def _forward_stop(folder: Path, signalled: set[int]) -> None:
    # Ranks that register after the request get it too; a rank that already exited is skipped.
    for pid in rank_pids(folder):
        if pid in signalled:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        signalled.add(pid)


def _launch_env(plan: LaunchPlan, folder: Path) -> dict[str, str]:
    env = dict(os.environ)
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    env[CONTROL_DIR_ENV] = str(folder)
    # The ranks start as `python -m engine.train` in the run folder; this keeps that folder off sys.path.
    env["PYTHONSAFEPATH"] = "1"
    if plan.cpu:
        env[USE_CPU_ENV] = "true"
    return env


def _report_stopped(writer: EventWriter, run_dir: Path, elapsed_s: float) -> None:
    checkpoint = latest_checkpoint(run_dir)
    writer.emit(
        RunFinished(status="stopped", elapsed_s=round(elapsed_s, 2), checkpoint=str(checkpoint or ""))
    )


def supervise(
    run_dir: Path, plan: LaunchPlan, writer: EventWriter, stream: Any, stop: _StopRequest, *, resume: bool
) -> int:
    """Run the ranks through accelerate, pass stops on, and make sure the run ends with exactly one report."""
    events_path = run_dir / RUN_EVENTS_FILE
    offset = events_path.stat().st_size if events_path.exists() else 0
    folder = Path(tempfile.mkdtemp(prefix="tunedeck-ranks-"))
    command = accelerate_command(run_dir, plan, resume=resume)
    log.info(
        "launching %d %s processes (%s, mixed precision %s, port %d)",
        plan.processes,
        "CPU" if plan.cpu else "GPU",
        plan.strategy,
        plan.mixed_precision,
        plan.port,
    )
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=stream,
            cwd=run_dir,
            env=_launch_env(plan, folder),
            preexec_fn=die_with_parent,  # the launcher runs no threads, so a pre-exec hook is safe
        )
        signalled: set[int] = set()
        while process.poll() is None:
            if stop.requested:
                _forward_stop(folder, signalled)
            time.sleep(POLL_S)
        code = process.returncode
        if ended_since(events_path, offset):
            return 0 if code == 0 else 1
        failures = read_failures(folder)
        if failures:
            first = failures[0]
            log.error("rank %d failed first: %s: %s", first.rank, first.title, first.cause)
            writer.emit(
                RunFailed(
                    title=first.title,
                    cause=first.cause,
                    next_step=first.next_step,
                    details_path=str(run_dir / RUN_LOG_FILE),
                )
            )
            return 1
        if stop.requested:
            _report_stopped(writer, run_dir, time.monotonic() - started)
            return 0
        error = TrainingError(
            f"A training process ended without reporting why (accelerate exited with code {code}).",
            next_step=f"See {run_dir / RUN_LOG_FILE}; resume from the last checkpoint once it is fixed.",
        )
        writer.emit(RunFailed.of(error, run_dir / RUN_LOG_FILE))
        return 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Launch the ranks of one run folder (or, when one process is enough, become the plain trainer)."""
    from engine.launch import train_command
    from engine.recipes import load_recipe

    parser = argparse.ArgumentParser(prog="python -m engine.distributed", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="the run folder (runs/<id>/)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    args = parser.parse_args(argv)
    started = time.monotonic()
    stop = _StopRequest()
    stop.install()
    run_dir = args.run_dir.expanduser().resolve()
    stream = claim_stdout()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s launcher %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        force=True,
    )
    atomic_write_text(run_dir / RUN_PID_FILE, f"{os.getpid()}\n")
    writer = EventWriter(stream, run_dir / RUN_EVENTS_FILE)
    try:
        plan = resolve_plan(load_recipe(run_dir / RUN_RECIPE_FILE))
        if stop.requested:
            _report_stopped(writer, run_dir, time.monotonic() - started)
            return 0
        if plan.processes == 1:
            # One process needs no launcher: become the trainer, keeping this pid (the pid file names it).
            writer.close()
            os.dup2(stream.fileno(), 1)
            command = train_command(run_dir, resume=args.resume)
            os.execv(command[0], command)
        return supervise(run_dir, plan, writer, stream, stop, resume=args.resume)
    except Exception as exc:  # the launcher's own failure becomes the run's one run_failed
        from engine.train import failure_of

        error = failure_of(exc, run_dir / RUN_LOG_FILE)
        if isinstance(exc, EngineError):
            log.error("%s: %s", error.title, error)
        else:
            log.exception("launching failed")
        writer.emit(RunFailed.of(error, run_dir / RUN_LOG_FILE))
        return 1
    finally:
        writer.close()


if __name__ == "__main__":
    sys.exit(main())
