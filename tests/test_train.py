"""The trainer end to end on the tiny model, through the real `python -m engine.train` subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import TINY_QA, finish_run

from engine.errors import DatasetError, ModelError, ResumeError
from engine.events import (
    CheckpointSaved,
    Eval,
    Event,
    Log,
    Progress,
    RunFailed,
    RunFinished,
    RunStarted,
    Step,
    parse_event,
    read_events,
)
from engine.launch import (
    _child_env,
    is_running,
    prepare_run,
    resume_run,
    run_pid,
    start_run,
    stop_run,
    train_command,
    wait_run,
)
from engine.workspace import Workspace, checkpoint_dirs, latest_checkpoint, summarize_run

FAILURE_BUDGET_S = 5.0


def _recipe(workspace: Workspace) -> Path:
    return workspace.root / "recipes" / "tiny.toml"


def _run_sync(
    run_dir: Path, *, resume: bool = False, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Run the trainer in the foreground, capturing its stdout (the event stream) and stderr (the log)."""
    full_env = {**_child_env(run_dir), **(env or {})}
    return subprocess.run(
        train_command(run_dir, resume=resume),
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=run_dir,
    )


def _steps(events: list[Event]) -> list[int]:
    return [event.step for event in events if isinstance(event, Step)]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_lora_run_end_to_end(tiny_run_dir: Path) -> None:
    events = read_events(tiny_run_dir / "events.jsonl")
    lines = [line for line in (tiny_run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    assert len(events) == len(lines), "every line of events.jsonl parses"
    kinds = [event.type for event in events]
    assert kinds[0] == Progress.type and kinds[-1] == RunFinished.type and kinds.count(RunStarted.type) == 1
    started = next(event for event in events if isinstance(event, RunStarted))
    assert (
        started.total_steps == 80 and started.num_train == len(TINY_QA) and started.resumed_from_step is None
    )
    assert started.pid > 0 and started.method == "lora"
    steps = [event for event in events if isinstance(event, Step)]
    assert [step.step for step in steps] == list(range(1, 81))
    assert all(step.tokens_per_s and step.tokens_per_s > 0 for step in steps)
    assert all(step.learning_rate and step.grad_norm is not None and step.eta_s is not None for step in steps)
    assert steps[-1].loss < steps[0].loss / 5, "loss falls as the adapter memorises the answers"
    saved = [event.step for event in events if isinstance(event, CheckpointSaved)]
    assert saved == [20, 40, 60, 80]
    finished = events[-1]
    assert finished.status == "finished" and finished.step == 80 and finished.checkpoint.endswith("step_80")
    assert [path.name for path in checkpoint_dirs(tiny_run_dir)] == [
        "step_20",
        "step_40",
        "step_60",
        "step_80",
    ]
    for checkpoint in checkpoint_dirs(tiny_run_dir):
        names = {path.name for path in checkpoint.iterdir()}
        assert {
            "adapter_config.json",
            "adapter_model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "trainer_state.json",
            "optimizer.pt",
            "scheduler.pt",
            "rng_state.pth",
        } <= names
        assert (
            "chat_template.jinja" in names
            or "chat_template" in (checkpoint / "tokenizer_config.json").read_text()
        )
        assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == int(
            checkpoint.name.removeprefix("step_")
        )
    leftovers = [path.name for path in (tiny_run_dir / "checkpoints").iterdir() if path.name.startswith(".")]
    assert leftovers == []
    meta = json.loads((tiny_run_dir / "run.json").read_text())
    assert meta["dataset"]["rows"] == len(TINY_QA) and len(meta["dataset"]["sha256"]) == 64
    assert meta["recipe_fingerprint"] and (tiny_run_dir / "recipe.toml").is_file()
    assert summarize_run(tiny_run_dir).status == "finished"


def test_trained_adapter_reloads_and_answers(tiny_run_dir: Path) -> None:
    import torch

    from engine.modeling import load_for_inference, renderer_for

    model, tokenizer = load_for_inference(None, adapter_dir=tiny_run_dir, device="cpu")
    renderer = renderer_for(tokenizer)
    correct = 0
    for row in TINY_QA:
        prompt = renderer.render_generation_prompt([{"role": "user", "content": row["question"]}])
        ids = torch.tensor([renderer.tokenizer.encode(prompt, add_special_tokens=False).ids])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        correct += answer == row["answer"]
    assert correct >= len(TINY_QA) - 1


def test_stdout_is_events_only_with_eval_and_truncation_warning(tiny_workspace: Workspace) -> None:
    from engine.modeling import load_tokenizer, renderer_for
    from engine.recipes import load_recipe

    recipe = load_recipe(_recipe(tiny_workspace))
    renderer = renderer_for(load_tokenizer(recipe.model.base))
    from engine.dataset import QAPair

    pairs = [QAPair(**row) for row in TINY_QA]
    max_length = max(renderer.encode(pair).prompt_tokens for pair in pairs) + 2
    too_long = sum(renderer.count(pair) > max_length for pair in pairs)
    run_dir = prepare_run(
        tiny_workspace,
        _recipe(tiny_workspace),
        [
            "train.max_steps=2",
            "data.eval_fraction=0.34",
            "train.eval_steps=1",
            f"data.max_length={max_length}",
        ],
    )
    result = _run_sync(run_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    stdout_events = [parse_event(line) for line in result.stdout.splitlines()]
    assert stdout_events and all(event is not None for event in stdout_events), result.stdout[:500]
    assert stdout_events == read_events(run_dir / "events.jsonl")
    assert "engine.train" in result.stderr  # logs go to stderr
    started = next(event for event in stdout_events if isinstance(event, RunStarted))
    assert (started.num_train, started.num_eval) == (4, 2)
    assert [event.step for event in stdout_events if isinstance(event, Eval)] == [1, 2]
    warnings = [
        event.message for event in stdout_events if isinstance(event, Log) and event.level == "warning"
    ]
    assert too_long and any(
        f"{too_long} of {len(TINY_QA)} rows are longer than data.max_length={max_length}" in message
        for message in warnings
    ), warnings


def test_qlora_trains_a_4bit_base_on_cpu(tiny_workspace: Workspace) -> None:
    import bitsandbytes as bnb

    from engine.modeling import load_model, load_tokenizer
    from engine.recipes import load_recipe

    recipe = load_recipe(_recipe(tiny_workspace), ["train.method=qlora"])
    model = load_model(recipe.model.base, recipe, load_tokenizer(recipe.model.base), device="cpu")
    assert any(isinstance(module, bnb.nn.Linear4bit) for module in model.modules())
    run_dir = prepare_run(
        tiny_workspace, _recipe(tiny_workspace), ["train.method=qlora", "train.max_steps=3"]
    )
    result = _run_sync(run_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    events = read_events(run_dir / "events.jsonl")
    assert _steps(events) == [1, 2, 3] and events[-1].status == "finished"
    assert (latest_checkpoint(run_dir) / "adapter_model.safetensors").is_file()


def test_full_fine_tuning_saves_a_loadable_model(tiny_workspace: Workspace) -> None:
    from engine.modeling import load_for_inference

    run_dir = prepare_run(
        tiny_workspace,
        _recipe(tiny_workspace),
        ["train.method=full", "train.max_steps=3", "train.learning_rate=1e-3"],
    )
    result = _run_sync(run_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    events = read_events(run_dir / "events.jsonl")
    assert _steps(events) == [1, 2, 3] and events[-1].status == "finished"
    checkpoint = latest_checkpoint(run_dir)
    names = {path.name for path in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "optimizer.pt", "trainer_state.json"} <= names
    assert "adapter_config.json" not in names
    model, tokenizer = load_for_inference(None, adapter_dir=checkpoint, device="cpu")
    assert tokenizer.chat_template and not hasattr(model, "peft_config")


def test_sigkill_then_resume_continues_from_the_last_checkpoint(
    tiny_workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNEDECK_FAULT", "slow_steps:0.15")
    run_id = start_run(tiny_workspace, _recipe(tiny_workspace), ["train.save_steps=4", "train.epochs=40"])
    run_dir = tiny_workspace.runs_dir / run_id
    events_path = run_dir / "events.jsonl"
    _wait_for(
        lambda: any(isinstance(e, CheckpointSaved) and e.step >= 8 for e in read_events(events_path)),
        120,
        "the step 8 checkpoint",
    )
    os.kill(run_pid(run_dir), signal.SIGKILL)
    _wait_for(lambda: not is_running(run_dir), 10, "the killed trainer to go")
    assert summarize_run(run_dir).status == "interrupted"
    before_kill = read_events(events_path)
    resume_from = latest_checkpoint(run_dir)
    kept = {path.name: _digest(path / "adapter_model.safetensors") for path in checkpoint_dirs(run_dir)}
    stale = run_dir / "checkpoints" / f".step_{max(_steps(before_kill)) + 1}.partial-999999"
    stale.mkdir()  # what a kill during a save leaves behind

    monkeypatch.delenv("TUNEDECK_FAULT")
    assert resume_run(tiny_workspace, run_id) == run_id
    summary = finish_run(run_dir, timeout=180)
    assert summary.status == "finished", summary
    events = read_events(events_path)
    starts = [event for event in events if isinstance(event, RunStarted)]
    assert [start.resumed_from_step for start in starts] == [
        None,
        int(resume_from.name.removeprefix("step_")),
    ]
    after = events[events.index(starts[1]) :]
    resumed_steps = _steps(after)
    assert resumed_steps == list(range(starts[1].resumed_from_step + 1, 41)), "the step count continues"
    assert starts[1].total_steps == starts[0].total_steps == 40
    assert all(
        _digest(run_dir / "checkpoints" / name / "adapter_model.safetensors") == digest
        for name, digest in kept.items()
    ), "earlier checkpoints are untouched"
    assert not stale.exists() and latest_checkpoint(run_dir).name == "step_40"
    lines = [line for line in events_path.read_text().splitlines() if line.strip()]
    assert len(read_events(events_path)) >= len(lines) - 1  # at most the line cut by the kill is unreadable
    # A second fresh start on this run folder would overwrite its history: it is refused.
    refused = _run_sync(run_dir)
    assert refused.returncode != 0 and "has checkpoints already" in refused.stdout
    assert latest_checkpoint(run_dir).name == "step_40"


def test_resume_refuses_a_changed_dataset(tiny_workspace: Workspace) -> None:
    run_dir = prepare_run(tiny_workspace, _recipe(tiny_workspace))
    dataset = tiny_workspace.datasets_dir / "tiny_qa.jsonl"
    with open(dataset, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"question": "New?", "answer": "Yes."}) + "\n")
        handle.write(json.dumps({"question": "Newer?", "answer": "Yes!"}) + "\n")
    with pytest.raises(ResumeError, match=r"dataset tiny_qa.jsonl changed .*: 6 → 8 rows"):
        resume_run(tiny_workspace, run_dir.name)
    lines = dataset.read_text().splitlines()
    dataset.write_text("\n".join([lines[1], lines[0], *lines[2:6]]) + "\n")
    with pytest.raises(ResumeError, match="same 6 rows, different content"):
        resume_run(tiny_workspace, run_dir.name)


def test_resume_refuses_a_changed_recipe(tiny_workspace: Workspace) -> None:
    run_dir = prepare_run(tiny_workspace, _recipe(tiny_workspace))
    with pytest.raises(ResumeError, match=r"train\.epochs: 80\.0 → 99\.0"):
        resume_run(tiny_workspace, run_dir.name, _recipe(tiny_workspace), ["train.epochs=99"])
    saved = run_dir / "recipe.toml"
    saved.write_text(saved.read_text().replace("r = 8", "r = 4"))
    with pytest.raises(ResumeError, match=r"lora\.r: 8 → 4"):
        resume_run(tiny_workspace, run_dir.name)


def test_resume_refuses_a_run_without_checkpoints(tiny_workspace: Workspace) -> None:
    run_dir = prepare_run(tiny_workspace, _recipe(tiny_workspace))
    with pytest.raises(ResumeError, match="no complete checkpoint"):
        resume_run(tiny_workspace, run_dir.name)


def test_simulated_oom_fails_fast_with_cause_and_next_step(tiny_workspace: Workspace) -> None:
    run_dir = prepare_run(tiny_workspace, _recipe(tiny_workspace))
    result = _run_sync(run_dir, env={"TUNEDECK_FAULT": "oom_at_step:2"})
    assert result.returncode != 0
    events = read_events(run_dir / "events.jsonl")
    failed = events[-1]
    assert isinstance(failed, RunFailed), events[-3:]
    assert failed.title == "Out of memory" and "ran out of memory" in failed.cause
    assert "train.batch_size" in failed.next_step and "gradient_checkpointing" in failed.next_step
    step_one = next(event for event in events if isinstance(event, Step) and event.step == 1)
    assert failed.time - step_one.time < FAILURE_BUDGET_S
    log_text = (run_dir / "train.log").read_text()
    assert "Traceback" in log_text and "OutOfMemoryError" in log_text  # the traceback is in the log only
    assert "Traceback" not in result.stdout
    assert summarize_run(run_dir).status == "failed"


def test_missing_model_folder_fails_within_five_seconds(
    tiny_workspace: Workspace, tiny_model_dir: Path, tmp_path: Path
) -> None:
    moved = tmp_path / "moved-model"
    shutil.copytree(tiny_model_dir, moved)
    run_dir = prepare_run(tiny_workspace, _recipe(tiny_workspace), [f'model.base="{moved}"'])
    shutil.rmtree(moved)  # the folder disappears between launch and start
    began = time.monotonic()
    result = _run_sync(run_dir, timeout=30)
    elapsed = time.monotonic() - began
    assert result.returncode != 0 and elapsed < FAILURE_BUDGET_S, elapsed
    failed = read_events(run_dir / "events.jsonl")[-1]
    assert isinstance(failed, RunFailed) and failed.title == "Model problem"
    assert f"{moved} does not exist" in failed.cause and failed.next_step


def test_launch_checks_dataset_and_model_before_spawning(tiny_workspace: Workspace, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"no dataset 'missing\.jsonl'") as caught:
        start_run(tiny_workspace, _recipe(tiny_workspace), ["data.dataset=missing.jsonl"])
    assert "tiny_qa.jsonl" in caught.value.next_step
    with pytest.raises(ModelError, match="does not exist"):
        start_run(tiny_workspace, _recipe(tiny_workspace), [f'model.base="{tmp_path / "nothing-here"}"'])
    bad = tiny_workspace.datasets_dir / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(DatasetError, match="line 1"):
        start_run(tiny_workspace, _recipe(tiny_workspace), ["data.dataset=bad.jsonl"])
    assert tiny_workspace.list_run_dirs() == []


def test_sigterm_saves_a_checkpoint_and_ends_stopped(
    tiny_workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNEDECK_FAULT", "slow_steps:0.2")
    run_id = start_run(tiny_workspace, _recipe(tiny_workspace), ["train.save_steps=1000"])
    run_dir = tiny_workspace.runs_dir / run_id
    _wait_for(lambda: len(_steps(read_events(run_dir / "events.jsonl"))) >= 3, 120, "three steps")
    assert stop_run(run_dir)
    summary = wait_run(run_dir, timeout=60)
    assert summary.status == "stopped"
    events = read_events(run_dir / "events.jsonl")
    finished = events[-1]
    assert isinstance(finished, RunFinished) and finished.status == "stopped"
    last_step = max(_steps(events))
    assert 3 <= last_step < 80 and finished.step == last_step
    assert finished.checkpoint.endswith(f"step_{last_step}")
    assert [path.name for path in checkpoint_dirs(run_dir)] == [f"step_{last_step}"]
    assert not stop_run(run_dir)  # nothing left to stop
