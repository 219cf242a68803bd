"""Training on several processes through accelerate: the launch command, the recipe fields, and real 2-process
CPU runs (gloo) of the tiny model through `start_run`, compared step by step with one process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import TINY_QA, TINY_RECIPE, finish_run

from engine import distributed
from engine.distributed import (
    LaunchPlan,
    accelerate_command,
    ended_since,
    process_count,
    read_failures,
    report_failure,
)
from engine.errors import RecipeError, TrainingError
from engine.events import (
    CheckpointSaved,
    Event,
    RunFailed,
    RunFinished,
    RunStarted,
    Step,
    read_events,
    write_events,
)
from engine.launch import is_running, resume_run, run_command, run_pid, start_run, stop_run
from engine.recipes import UNHASHED_DEFAULTS, find_recipe, load_recipe
from engine.workspace import Workspace, checkpoint_dirs, summarize_run

# Per-rank batches of 1 against one process's batches of 2: the same samples per optimizer step.
TWO_RANKS = ["train.gpus=2", "train.batch_size=1", "train.max_steps=6", "train.save_steps=3"]
ONE_PROCESS = ["train.batch_size=2", "train.max_steps=6", "train.save_steps=3"]


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


# ----------------------------------------------------------------------------------------------------
# The launch command and the plan (nothing is launched)


def test_ddp_command_launches_the_trainer_module_with_the_plan(tmp_path: Path) -> None:
    plan = LaunchPlan(processes=4, strategy="ddp", cpu=False, mixed_precision="bf16", port=31234)
    command = accelerate_command(tmp_path / "run", plan, resume=True)
    assert command[1:4] == ["-P", "-m", "accelerate.commands.launch"]
    assert "--multi_gpu" in command and "--use_fsdp" not in command
    assert _option(command, "--num_processes") == "4" and _option(command, "--num_machines") == "1"
    assert _option(command, "--main_process_port") == "31234"
    assert _option(command, "--mixed_precision") == "bf16"
    assert _option(command, "--max_restarts") == "0"
    assert _option(command, "--gpu_ids") == "all" and _option(command, "--machine_rank") == "0"
    assert command[command.index("--module") :] == [
        "--module",
        "engine.train",
        "--run-dir",
        str(tmp_path / "run"),
        "--resume",
    ]
    fresh = accelerate_command(tmp_path / "run", plan)
    assert "--resume" not in fresh


def test_fsdp_command_fully_shards_and_wraps_decoder_layers(tmp_path: Path) -> None:
    plan = LaunchPlan(processes=2, strategy="fsdp", mixed_precision="bf16", port=29999)
    command = accelerate_command(tmp_path, plan)
    assert "--use_fsdp" in command and "--multi_gpu" not in command
    assert _option(command, "--fsdp_sharding_strategy") == "FULL_SHARD"
    assert _option(command, "--fsdp_auto_wrap_policy") == "TRANSFORMER_BASED_WRAP"
    # Full state dicts keep checkpoints the plain adapter files chat and export load.
    assert _option(command, "--fsdp_state_dict_type") == "FULL_STATE_DICT"
    assert _option(command, "--fsdp_cpu_ram_efficient_loading") == "true"
    assert _option(command, "--num_processes") == "2"
    assert command.index("--use_fsdp") < command.index("--module")


def test_free_ports_differ_and_can_be_bound() -> None:
    import socket

    port = distributed.free_port()
    assert 1024 < port < 65536
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))


@pytest.mark.parametrize(
    ("gpus", "device", "visible", "expected"),
    [
        (1, "auto", 8, 1),
        (2, "auto", 2, 2),
        ("all", "auto", 4, 4),
        ("all", "auto", 0, 1),
        ("all", "cuda", 1, 1),
        (3, "cpu", 0, 3),
        ("all", "cpu", 8, 1),
    ],
)
def test_process_count(gpus: int | str, device: str, visible: int, expected: int) -> None:
    assert process_count(gpus, device, visible) == expected


def test_process_count_refuses_what_the_machine_cannot_run() -> None:
    with pytest.raises(TrainingError, match=r"train\.gpus is 4, but only 2 GPUs are visible") as caught:
        process_count(4, "auto", 2)
    assert "train.gpus=2" in caught.value.next_step
    with pytest.raises(TrainingError, match="no CUDA GPU is visible") as caught:
        process_count(2, "auto", 0)
    assert "train.device=cpu" in caught.value.next_step
    with pytest.raises(RecipeError, match=r"train\.device=cuda:1 names one GPU"):
        process_count(2, "cuda:1", 4)


def test_recipe_fields_validate_and_keep_old_fingerprints(tmp_path: Path) -> None:
    path = find_recipe("demo-cpu")
    assert load_recipe(path, ["train.gpus=all"]).train.gpus == "all"
    assert load_recipe(path, ["train.gpus=2", "train.distributed=fsdp"]).train.distributed == "fsdp"
    with pytest.raises(RecipeError, match=r"`train\.gpus` must be a count of 1 or more"):
        load_recipe(path, ["train.gpus=0"])
    with pytest.raises(RecipeError, match=r"`train\.gpus` must be a count of 1 or more"):
        load_recipe(path, ["train.gpus=some"])
    with pytest.raises(RecipeError, match=r"`train\.distributed` is 'fsdb' \(did you mean 'fsdp'\?\)"):
        load_recipe(path, ["train.distributed=fsdb"])
    base = load_recipe(path)
    # A run saved before these fields existed hashes without them; at their defaults they must not count.
    assert {("train", "gpus"), ("train", "distributed")} <= set(UNHASHED_DEFAULTS)
    data = base.to_dict()
    for section, key in UNHASHED_DEFAULTS:
        del data[section][key]
    data.pop("description")
    old = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    assert base.fingerprint() == old
    assert load_recipe(path, ["train.gpus=2"]).fingerprint() != base.fingerprint()
    assert load_recipe(path, ["train.distributed=fsdp"]).fingerprint() != base.fingerprint()
    saved = tmp_path / "saved.toml"
    saved.write_text(load_recipe(path, ["train.gpus=all"]).to_toml(), encoding="utf-8")
    assert load_recipe(saved).train.gpus == "all"


def test_run_command_uses_the_launcher_only_when_more_than_one_process_may_train(
    tiny_workspace: Workspace,
) -> None:
    from engine.launch import prepare_run

    recipe = tiny_workspace.root / "recipes" / "tiny.toml"
    single = prepare_run(tiny_workspace, recipe)
    assert run_command(single)[3] == "engine.train"
    several = prepare_run(tiny_workspace, recipe, ["train.gpus=2"])
    assert run_command(several)[3:] == ["engine.distributed", "--run-dir", str(several)]
    assert run_command(several, resume=True)[-1] == "--resume"


def test_the_first_failure_of_any_rank_is_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.errors import OutOfMemoryError

    monkeypatch.setenv(distributed.CONTROL_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(distributed.ELASTIC_RUN_ENV, "none")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert report_failure(OutOfMemoryError("The GPU ran out of memory.", next_step="Lower it."))
    time.sleep(0.01)
    monkeypatch.setenv("RANK", "0")
    assert report_failure(TrainingError("Connection closed by peer."))
    failures = read_failures(tmp_path)
    assert [(f.rank, f.title, f.cause) for f in failures] == [
        (1, "Out of memory", "The GPU ran out of memory."),
        (0, "Training failed", "Connection closed by peer."),
    ]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not report_failure(TrainingError("one process reports its own failure"))


def test_ended_since_reads_only_what_was_appended(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    write_events(events, [RunStarted(run_id="r"), RunFinished(status="stopped")])
    offset = events.stat().st_size
    assert not ended_since(events, offset)
    write_events(events, [RunStarted(run_id="r"), Step(step=1)])
    assert not ended_since(events, offset)
    write_events(events, [RunFailed(title="t", cause="c")])
    assert ended_since(events, offset) and ended_since(events, 0)
    assert not ended_since(tmp_path / "missing.jsonl", 0)


# ----------------------------------------------------------------------------------------------------
# Real runs: two CPU processes (gloo) against one


def _tiny_workspace(root: Path, model_dir: Path, qa_path: Path) -> tuple[Workspace, Path]:
    workspace = Workspace.init(root)
    shutil.copyfile(qa_path, workspace.datasets_dir / "tiny_qa.jsonl")
    recipe = workspace.root / "recipes" / "tiny.toml"
    recipe.parent.mkdir(exist_ok=True)
    recipe.write_text(TINY_RECIPE.format(model=model_dir), encoding="utf-8")
    return workspace, recipe


def _train(workspace: Workspace, recipe: Path, overrides: list[str]) -> Path:
    run_dir = workspace.runs_dir / start_run(workspace, recipe, overrides)
    summary = finish_run(run_dir, timeout=240)
    assert summary.status == "finished", (summary, (run_dir / "train.log").read_text()[-3000:])
    return run_dir


@pytest.fixture(scope="module")
def paired_runs(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_qa_path: Path
) -> tuple[Path, Path]:
    """The same 6 steps trained by two CPU processes (batches of 1 each) and by one (batches of 2)."""
    workspace, recipe = _tiny_workspace(tmp_path_factory.mktemp("ddp-runs"), tiny_model_dir, tiny_qa_path)
    return _train(workspace, recipe, TWO_RANKS), _train(workspace, recipe, ONE_PROCESS)


def _steps(events: list[Event]) -> list[Step]:
    return [event for event in events if isinstance(event, Step)]


@pytest.mark.slow
def test_two_processes_report_once_through_rank_zero(paired_runs: tuple[Path, Path]) -> None:
    run_dir, _ = paired_runs
    events = read_events(run_dir / "events.jsonl")
    kinds = [event.type for event in events]
    assert kinds.count(RunStarted.type) == 1 and kinds.count(RunFinished.type) == 1
    assert kinds[-1] == RunFinished.type and events[-1].status == "finished"
    assert [step.step for step in _steps(events)] == [1, 2, 3, 4, 5, 6], "no step is reported twice"
    assert [event.step for event in events if isinstance(event, CheckpointSaved)] == [3, 6]
    started = next(event for event in events if isinstance(event, RunStarted))
    assert started.device == "cpu × 2 (ddp)" and started.num_train == len(TINY_QA)
    # The pid reported (and kept in the pid file) is the launcher's, the one a stop signals.
    assert started.pid == run_pid(run_dir)
    log_text = (run_dir / "train.log").read_text()
    assert "launching 2 CPU processes" in log_text
    assert "INFO rank1" not in log_text and "INFO rank0 engine.train" in log_text


@pytest.mark.slow
def test_two_processes_count_every_rank_and_train_like_one(paired_runs: tuple[Path, Path]) -> None:
    two, one = (_steps(read_events(run / "events.jsonl")) for run in paired_runs)
    # Each step of both runs trains the same two samples, so the token counts agree exactly: rank 0 alone
    # would have counted about half.
    assert [step.tokens for step in two] == [step.tokens for step in one]
    assert all(step.tokens and step.tokens_per_s and step.tokens_per_s > 0 for step in two)
    # The gradients are the same sums in another order (float32), so the losses agree to rounding; 1e-4
    # relative leaves room for that drift over six steps while any change of samples, of loss scaling
    # (e.g. a mean over one rank's tokens only) or of learning rate moves them by percents.
    for ddp_step, single_step in zip(two, one, strict=True):
        assert ddp_step.loss == pytest.approx(single_step.loss, rel=1e-4)
        assert ddp_step.grad_norm == pytest.approx(single_step.grad_norm, rel=1e-3)
    assert two[-1].loss < two[0].loss


@pytest.mark.slow
def test_two_processes_end_with_the_adapter_one_process_trains(paired_runs: tuple[Path, Path]) -> None:
    from safetensors.torch import load_file

    two, one = (
        load_file(run / "checkpoints" / "step_6" / "adapter_model.safetensors") for run in paired_runs
    )
    assert two.keys() == one.keys() and len(two) > 10
    for name, weights in one.items():
        # Same tolerance reasoning as for the losses, relative to each tensor's largest value; it was 7e-6.
        scale = float(weights.abs().max()) or 1.0
        assert float((two[name] - weights).abs().max()) <= 1e-4 * scale, name


@pytest.mark.slow
def test_two_process_checkpoints_are_complete(paired_runs: tuple[Path, Path]) -> None:
    run_dir, _ = paired_runs
    assert [path.name for path in checkpoint_dirs(run_dir)] == ["step_3", "step_6"]
    for checkpoint in checkpoint_dirs(run_dir):
        names = {path.name for path in checkpoint.iterdir()}
        assert {
            "adapter_config.json",
            "adapter_model.safetensors",
            "optimizer.pt",
            "scheduler.pt",
            "trainer_state.json",
            "rng_state_0.pth",
            "rng_state_1.pth",
        } <= names
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        assert state["global_step"] == int(checkpoint.name.removeprefix("step_"))
    assert [path.name for path in (run_dir / "checkpoints").iterdir() if path.name.startswith(".")] == []


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_every_rank_at_one_step_then_resume_finishes(
    tiny_workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNEDECK_FAULT", "slow_steps:0.3")
    recipe = tiny_workspace.root / "recipes" / "tiny.toml"
    overrides = ["train.gpus=2", "train.batch_size=3", "train.max_steps=30", "train.save_steps=100"]
    run_dir = tiny_workspace.runs_dir / start_run(tiny_workspace, recipe, overrides)
    deadline = time.monotonic() + 180
    while len(_steps(read_events(run_dir / "events.jsonl"))) < 3:
        assert time.monotonic() < deadline and is_running(run_dir), "three steps in time"
        time.sleep(0.2)
    assert stop_run(run_dir)
    summary = finish_run(run_dir, timeout=120)
    assert summary.status == "stopped", summary
    events = read_events(run_dir / "events.jsonl")
    last_step = max(step.step for step in _steps(events))
    assert 3 <= last_step < 30 and events[-1].step == last_step
    assert [path.name for path in checkpoint_dirs(run_dir)] == [f"step_{last_step}"]
    names = {path.name for path in checkpoint_dirs(run_dir)[0].iterdir()}
    assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors"} <= names

    monkeypatch.delenv("TUNEDECK_FAULT")
    resume_run(tiny_workspace, run_dir.name)
    summary = finish_run(run_dir, timeout=240)
    assert summary.status == "finished", (summary, (run_dir / "train.log").read_text()[-3000:])
    events = read_events(run_dir / "events.jsonl")
    starts = [event for event in events if isinstance(event, RunStarted)]
    assert [start.resumed_from_step for start in starts] == [None, last_step]
    resumed = events[events.index(starts[1]) :]
    assert [step.step for step in _steps(resumed)] == list(range(last_step + 1, 31))


@pytest.mark.slow
def test_a_crash_on_one_rank_ends_as_one_run_failed_naming_it(
    tiny_workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNEDECK_FAULT", "crash_at_step:3")
    monkeypatch.setenv("TUNEDECK_FAULT_RANK", "1")
    recipe = tiny_workspace.root / "recipes" / "tiny.toml"
    run_dir = tiny_workspace.runs_dir / start_run(
        tiny_workspace, recipe, ["train.gpus=2", "train.batch_size=3", "train.max_steps=30"]
    )
    assert finish_run(run_dir, timeout=240).status == "failed"
    events = read_events(run_dir / "events.jsonl")
    failed = [event for event in events if isinstance(event, RunFailed)]
    assert len(failed) == 1 and events[-1] is failed[0]
    # Rank 0 fails too once rank 1 is gone; the report names the first cause, not the broken connection.
    assert "simulated crash" in failed[0].cause and "step 3" in failed[0].cause
    assert failed[0].details_path.endswith("train.log")
    assert not any(isinstance(event, RunFinished) for event in events)
    assert [step.step for step in _steps(events)] == [1, 2]
    assert summarize_run(run_dir).status == "failed"


@pytest.mark.slow
def test_sigkill_of_the_launcher_leaves_no_rank_training(
    tiny_workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNEDECK_FAULT", "slow_steps:0.3")
    recipe = tiny_workspace.root / "recipes" / "tiny.toml"
    run_dir = tiny_workspace.runs_dir / start_run(
        tiny_workspace, recipe, ["train.gpus=2", "train.batch_size=3", "train.max_steps=200"]
    )
    deadline = time.monotonic() + 180
    while not _steps(read_events(run_dir / "events.jsonl")):
        assert time.monotonic() < deadline, "a first step in time"
        time.sleep(0.2)
    os.kill(run_pid(run_dir), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "every rank exits with its launcher"
        time.sleep(0.2)
    assert summarize_run(run_dir).status == "interrupted"


def test_cli_gpus_flag_is_validated_before_anything_starts(
    tiny_workspace: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.cli import main

    code = main(["--workspace", str(tiny_workspace.root), "train", "tiny", "--gpus", "0"])
    assert code != 0 and "`train.gpus` must be a count of 1 or more" in capsys.readouterr().err
    assert tiny_workspace.list_run_dirs() == []


@pytest.mark.slow
def test_cli_gpus_flag_starts_the_launcher_and_a_stop_during_setup_ends_it_stopped(
    tiny_workspace: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.cli import main

    assert main(["--workspace", str(tiny_workspace.root), "train", "tiny", "--gpus", "2"]) == 0
    run_dir = tiny_workspace.runs_dir / capsys.readouterr().out.strip()
    assert json.loads((run_dir / "run.json").read_text())["recipe"]["train"]["gpus"] == 2
    deadline = time.monotonic() + 60
    while "launching 2 CPU processes" not in (run_dir / "train.log").read_text():
        assert time.monotonic() < deadline and is_running(run_dir), "the launcher starts the ranks"
        time.sleep(0.05)
    # Stopped before any rank has loaded the model: every rank must agree to stop, then rank 0 reports it.
    assert stop_run(run_dir)
    summary = finish_run(run_dir, timeout=120)
    assert summary.status == "stopped", (summary, (run_dir / "train.log").read_text()[-2000:])
    events = read_events(run_dir / "events.jsonl")
    assert [event.type for event in events].count(RunFinished.type) == 1
    assert not _steps(events) and checkpoint_dirs(run_dir) == []


@pytest.mark.slow
def test_a_model_gone_before_the_ranks_start_fails_once_naming_it(
    tiny_workspace: Workspace, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from engine.launch import prepare_run, spawn_training

    moved = tmp_path / "moved-model"
    shutil.copytree(tiny_model_dir, moved)
    recipe = tiny_workspace.root / "recipes" / "tiny.toml"
    run_dir = prepare_run(tiny_workspace, recipe, ["train.gpus=2", f'model.base="{moved}"'])
    shutil.rmtree(moved)  # rank 0 fails inside its setup while rank 1 waits for it
    spawn_training(run_dir)
    assert finish_run(run_dir, timeout=120).status == "failed"
    failed = [event for event in read_events(run_dir / "events.jsonl") if isinstance(event, RunFailed)]
    assert len(failed) == 1 and failed[0].title == "Model problem"
    assert f"{moved} does not exist" in failed[0].cause


@pytest.mark.slow
def test_all_gpus_on_a_machine_with_one_process_to_give_is_the_plain_trainer(
    tiny_workspace: Workspace,
) -> None:
    recipe = tiny_workspace.root / "recipes" / "tiny.toml"
    run_dir = tiny_workspace.runs_dir / start_run(
        tiny_workspace, recipe, ["train.gpus=all", "train.max_steps=2"]
    )
    launcher = run_pid(run_dir)
    assert finish_run(run_dir, timeout=120).status == "finished"
    started = next(event for event in read_events(run_dir / "events.jsonl") if isinstance(event, RunStarted))
    # The launcher became the trainer (same pid, no accelerate), so the pid file still names the process.
    assert started.pid == launcher == run_pid(run_dir) and started.device == "cpu"
    assert "launching" not in (run_dir / "train.log").read_text()


def test_accelerate_accepts_the_fsdp_command_and_hands_it_to_every_rank(tmp_path: Path) -> None:
    # The real launcher parses the real command; the ranks are a probe that prints what they were given.
    (tmp_path / "rank_probe.py").write_text(
        "import json, os\n"
        "print(json.dumps({k: v for k, v in os.environ.items() if k.startswith(('FSDP_', 'ACCELERATE_'))"
        " or k in ('RANK', 'WORLD_SIZE')}), flush=True)\n",
        encoding="utf-8",
    )
    plan = LaunchPlan(processes=2, strategy="fsdp", mixed_precision="bf16", port=distributed.free_port())
    command = accelerate_command(tmp_path, plan)
    command[command.index("--module") + 1 :] = ["rank_probe"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    ranks = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(rank["RANK"] for rank in ranks) == ["0", "1"]
    for rank in ranks:
        assert rank["WORLD_SIZE"] == "2" and rank["ACCELERATE_MIXED_PRECISION"] == "bf16"
        assert rank["ACCELERATE_USE_FSDP"] == "true" and rank["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
        assert rank["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
        assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in rank  # the model's own decoder layer class is wrapped
        assert rank["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT" and rank["FSDP_USE_ORIG_PARAMS"] == "false"


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
@pytest.mark.parametrize("dtype", ["auto", "float32", "bfloat16", "float16"])
def test_launch_mixed_precision_is_off_exactly_where_the_trainer_autocasts_nothing(
    method: str, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from engine.distributed import launch_mixed_precision
    from engine.train import _mixed_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    recipe = load_recipe(find_recipe("qlora-7b"), [f"train.method={method}", f"model.dtype={dtype}"])
    trainer_autocasts = any(_mixed_precision(recipe, "cuda").values())
    assert (launch_mixed_precision(recipe, cpu=False) != "no") == trainer_autocasts
    assert launch_mixed_precision(recipe, cpu=True) == "no"


def test_a_world_size_left_in_the_shell_does_not_make_a_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(distributed.ELASTIC_RUN_ENV, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert not distributed.is_distributed() and distributed.is_main_process()
    assert distributed.process_device("cuda") == "cuda" and distributed.device_label("cuda") == "cuda"
    monkeypatch.setenv(distributed.ELASTIC_RUN_ENV, "none")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.is_distributed() and not distributed.is_main_process()
    assert (
        distributed.process_device("cuda") == "cuda:3"
        and distributed.device_label("cuda:3") == "cuda × 4 (ddp)"
    )


@pytest.mark.parametrize(
    ("overrides", "title", "cause"),
    [
        (
            ["train.device=auto", "train.gpus=2"],
            "Training failed",
            "train.gpus is 2, but no CUDA GPU is visible",
        ),
        (["train.gpus=2", "train.distributed=fsdp"], "Recipe problem", "accelerate runs FSDP on GPUs only"),
    ],
)
def test_a_plan_this_machine_cannot_run_fails_at_once_in_one_sentence(
    tiny_workspace: Workspace, overrides: list[str], title: str, cause: str
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA GPUs")
    recipe = tiny_workspace.root / "recipes" / "tiny.toml"
    run_dir = tiny_workspace.runs_dir / start_run(tiny_workspace, recipe, overrides)
    assert finish_run(run_dir, timeout=60).status == "failed"
    events = read_events(run_dir / "events.jsonl")
    assert len(events) == 1 and isinstance(events[0], RunFailed)
    assert events[0].title == title and cause in events[0].cause and events[0].next_step
    assert "Traceback" not in (run_dir / "train.log").read_text()
